"""``overspill`` command line: one entry point, subcommands registered in one table.

Errors from bad input print one line and exit with code 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

from .errors import OverspillError

COMMANDS: dict[str, tuple[Callable, Callable, str]] = {}   # name -> (add_arguments, run, help)


def command(name: str, help: str):
    def wrap(run):
        COMMANDS[name] = (getattr(run, "_args", lambda p: None), run, help)
        return run
    return wrap


def args(fn: Callable[[argparse.ArgumentParser], None]):
    def wrap(run):
        run._args = fn
        return run
    return wrap


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="Hugging Face model directory (default: the built-in model)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--max-memory", default=None, help="budgets, e.g. cpu=4GiB or cuda:0=10GiB,cpu=8GiB (cpu=auto: this "
                   "process's memory cgroup limit, else the RAM available, less the process's own ~0.45 GiB); the rest "
                   "streams from disk")
    p.add_argument("--quantize", default=None, help="int8 | int4 | int8-dynamic | nf4 (on the fly)")
    p.add_argument("--quantize-head", action="store_true", help="quantize the LM head too (with --quantize), and "
                   "an untied token table in int8")
    p.add_argument("--kv-cache", default=None, help="int8: keys and values in int8 (about half the KV memory of bf16)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (overspill finetune's output or PEFT's "
                   "save_pretrained) applied to the model")


def _pp_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pp", type=int, default=None, help="pipeline-parallel stages, one process each: run under "
                   "`torchrun --nproc-per-node N -m overspill.cli ... --pp N`; each rank loads its own range of the "
                   "blocks; --max-memory then takes one spec for all ranks or one per rank: 'cpu=5GiB;cpu=4GiB'")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks, one process each: run under "
                   "`torchrun --nproc-per-node N -m overspill.cli ... --tp N`; each rank holds its share of every "
                   "block's heads and MLP (from a Hugging Face directory) and the ranks sum their partial results")
    p.add_argument("--pp-timeout", type=float, default=None, help="seconds a silent rank is waited for before "
                   "every rank stops with one line (default 30, or $OVERSPILL_PP_TIMEOUT)")


def _gen_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    _pp_args(p)
    p.add_argument("--max-new-tokens", "-n", type=int, default=128)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stats", action="store_true", help="print timing to stderr at the end")


def _load(a: argparse.Namespace, max_batch: int = 1, max_seq: int | None = None):
    from .api import load

    model = load(a.model, dtype=a.dtype, max_memory=a.max_memory, quantize=a.quantize,
                 quantize_head=a.quantize_head, max_batch_size=max_batch, max_seq_len=max_seq, kv_cache=a.kv_cache,
                 adapter=a.adapter, pp=getattr(a, "pp", None), pp_timeout=getattr(a, "pp_timeout", None),
                 tp=getattr(a, "tp", None))
    if model is None:      # a pipeline rank other than 0: it served rank 0's steps until rank 0 was done
        raise SystemExit(0)
    return model


def _gen_kwargs(a: argparse.Namespace) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                repetition_penalty=a.repetition_penalty, stop=a.stop, seed=a.seed, ignore_eos=a.ignore_eos,
                num_beams=a.num_beams)


@command("generate", "generate text from a prompt (streamed), or from a JSONL file of prompts in batches")
@args(lambda p: (_gen_args(p), p.add_argument("prompt", nargs="?", default=None),
                 p.add_argument("--prompts", default=None, help="JSONL input: one {\"prompt\": ...} per line"),
                 p.add_argument("--out", default=None, help="JSONL output for --prompts"),
                 p.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --prompts")))
def cmd_generate(a: argparse.Namespace) -> int:
    if a.prompts:
        return _generate_file(a)
    if a.prompt is None:
        raise OverspillError("give a PROMPT, or --prompts FILE.jsonl --out FILE.jsonl")
    seq = None
    if a.max_memory is not None:   # reserve KV cache for exactly this request
        from .api import default_model_path
        from .tokenizer import Tokenizer
        seq = len(Tokenizer(a.model or default_model_path()).encode(a.prompt)) + a.max_new_tokens
    model = _load(a, max(1, a.num_beams), seq)
    kw = _gen_kwargs(a)
    out = sys.stdout
    out.write(a.prompt)
    out.flush()
    if a.num_beams > 1:
        out.write(model.generate([a.prompt], **kw)[0])
    else:
        kw.pop("num_beams")
        for piece in model.stream(a.prompt, **kw):
            out.write(piece)
            out.flush()
    out.write("\n")
    if a.stats:
        _print_stats(model)
    return 0


def _print_stats(model) -> None:
    """Timing of the last request: new tokens summed over its sequences, and the decode rate of those
    after each sequence's first (which comes with the prefill)."""
    s = model.last_stats
    gen, batch, dec = s.get("generated_tokens", 0), s.get("batch", 1), s.get("decode_s", 0.0)
    rate = f"{(gen - batch) / dec:.2f} tokens/s" if gen > batch and dec > 0 else "n/a (one token per sequence)"
    print(f"prefill {s.get('prefill_s', 0):.3f}s, {gen} new tokens over {batch} sequence(s), decode {rate}",
          file=sys.stderr)


def _read_prompts(path: str) -> list[str]:
    prompts = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise OverspillError(f"{path}:{n}: not valid JSON") from None
                p = obj.get("prompt") if isinstance(obj, dict) else obj
                if not isinstance(p, str):
                    raise OverspillError(f"{path}:{n}: expected {{\"prompt\": \"...\"}} or a JSON string")
                prompts.append(p)
    except FileNotFoundError:
        raise OverspillError(f"{path}: no such prompts file") from None
    if not prompts:
        raise OverspillError(f"{path}: no prompts")
    return prompts


def _generate_file(a: argparse.Namespace) -> int:
    """Throughput mode: every streamed block serves a whole batch before the next block is read."""
    import os

    prompts = _read_prompts(a.prompts)
    if not a.out:
        raise OverspillError("--prompts needs --out FILE.jsonl")
    bs = max(1, a.batch_size)
    from .api import default_model_path
    from .tokenizer import Tokenizer

    tok = Tokenizer(a.model or default_model_path())
    longest = max(len(tok.encode(p)) for p in prompts)
    model = _load(a, bs, longest + a.max_new_tokens)   # the KV reserve fits exactly this job
    kw = _gen_kwargs(a)
    tmp = f"{a.out}.tmp-{os.getpid()}"
    t0 = time.perf_counter()
    new_tokens = 0
    try:
        with open(tmp, "w") as f:
            for i in range(0, len(prompts), bs):
                batch = prompts[i:i + bs]
                texts = model.generate(batch, **kw)
                new_tokens += model.last_stats.get("generated_tokens", 0)   # early-finished sequences count less
                for p, t in zip(batch, texts):
                    f.write(json.dumps({"prompt": p, "text": t}) + "\n")
                print(f"{min(i + bs, len(prompts))}/{len(prompts)} prompts, "
                      f"{new_tokens / (time.perf_counter() - t0):.2f} tokens/s", file=sys.stderr)
        os.replace(tmp, a.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return 0


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@command("info", "print architecture, parameter count and bytes per dtype")
@args(lambda p: (p.add_argument("model", nargs="?", default=None), p.add_argument("--json", action="store_true")))
def cmd_info(a: argparse.Namespace) -> int:
    from .api import default_model_path
    from .checkpoint.hf import HFCheckpoint
    from .model.weights import units

    path = a.model or default_model_path()
    ck = HFCheckpoint(path)
    cfg = ck.config
    params = {u: sum(_numel(ck.shape(n)) for n in ck.unit_names(u)) for u in units(cfg)}
    if cfg.tie_embeddings:   # the head reads the embedding matrix; count it once
        params["head"] -= cfg.vocab_size * cfg.hidden_size
    total = sum(params.values())
    info = {
        "path": path, "architecture": ck.hf_config.get("architectures", [cfg.family])[0], "family": cfg.family,
        "parameters": total, "layers": cfg.n_layers, "hidden": cfg.hidden_size,
        "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size, "context": cfg.max_positions,
        "stored_dtype": str(ck.stored_dtype()).replace("torch.", ""),
        "bytes": {"float32": total * 4, "bfloat16": total * 2, "float16": total * 2},
        "per_block_bytes_bf16": params.get("block.0", 0) * 2,
        "config": cfg.to_dict(),
    }
    from . import quant
    from .runtime.loader import unit_weight_bytes
    import torch

    info["quantized_bytes"] = {s: sum(unit_weight_bytes(ck, cfg, u, torch.bfloat16, s) for u in units(cfg))
                               for s in quant.SCHEMES}   # block matmuls quantized; embeddings, head, norms in bf16
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['architecture']}  ({cfg.family})  {path}")
    print(f"  parameters   {total:,}  ({total / 1e9:.3f} B)")
    print(f"  shape        {cfg.n_layers} layers x hidden {cfg.hidden_size}, {cfg.n_heads} heads"
          f" ({cfg.n_kv_heads} kv) x {cfg.head_dim}, mlp {cfg.intermediate_size}, vocab {cfg.vocab_size}")
    print(f"  context      {cfg.max_positions}   stored as {info['stored_dtype']}")
    for dt, n in info["bytes"].items():
        print(f"  {dt:12s} {_fmt_bytes(n)}")
    for sch, n in info["quantized_bytes"].items():
        print(f"  {sch:12s} {_fmt_bytes(n)}  (block matmuls quantized, rest bfloat16)")
    print(f"  one block    {_fmt_bytes(info['per_block_bytes_bf16'])} in bfloat16")
    return 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@command("tokenize", "convert text to token ids, or ids to text with --decode")
@args(lambda p: (p.add_argument("--model", "-m", default=None), p.add_argument("text", nargs="?", default=None),
                 p.add_argument("--decode", default=None, help="comma-separated ids, e.g. 1,2,3")))
def cmd_tokenize(a: argparse.Namespace) -> int:
    from .api import default_model_path
    from .tokenizer import Tokenizer

    tok = Tokenizer(a.model or default_model_path())
    if a.decode is not None:
        try:
            ids = [int(x) for x in a.decode.split(",") if x.strip()]
        except ValueError:
            raise OverspillError(f"--decode expects comma-separated integers, got {a.decode!r}") from None
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise OverspillError(f"token id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})")
        print(tok.decode(ids, skip_special_tokens=False))
    elif a.text is not None:
        print(",".join(map(str, tok.encode(a.text))))
    else:
        raise OverspillError("give TEXT to tokenize or --decode IDS")
    return 0


@command("eval", "perplexity of a text file (sliding window) and tokens/s")
@args(lambda p: (_model_arg(p), _pp_args(p), p.add_argument("--text", required=True, help="UTF-8 text file"),
                 p.add_argument("--context", type=int, default=1024), p.add_argument("--stride", type=int, default=512),
                 p.add_argument("--max-chars", type=int, default=None, help="evaluate only the first N characters"),
                 p.add_argument("--json", action="store_true")))
def cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import perplexity

    try:
        with open(a.text, encoding="utf-8") as f:
            text = f.read()
    except (FileNotFoundError, UnicodeDecodeError) as e:
        raise OverspillError(f"{a.text}: cannot read as UTF-8 text ({type(e).__name__})") from None
    if a.max_chars:
        text = text[: a.max_chars]
    model = _load(a, 1, a.context)
    r = perplexity(model, model.encode(text), a.context, a.stride, progress=sys.stderr.isatty())
    r.update(model=model.path, quantize=a.quantize, dtype=str(model.dtype).replace("torch.", ""))
    if a.json:
        print(json.dumps(r))
    else:
        print(f"perplexity {r['perplexity']:.3f}  (mean NLL {r['nll']:.4f} nats over {r['tokens']} tokens, "
              f"context {r['context']}, stride {r['stride']}, {r['tokens_per_s']:.0f} tokens/s)")
    return 0


@command("plan", "show where every unit would live under memory budgets, and the predicted speed")
@args(lambda p: (p.add_argument("model", nargs="?", default=None), p.add_argument("--max-memory", required=True),
                 p.add_argument("--dtype", default="auto"), p.add_argument("--quantize", default=None),
                 p.add_argument("--quantize-head", action="store_true"), p.add_argument("--kv-cache", default=None),
                 p.add_argument("--max-batch-size", type=int, default=1), p.add_argument("--max-seq-len", type=int, default=1024),
                 p.add_argument("--cached", action="store_true", help="reuse the last bandwidth measurement instead of probing"),
                 p.add_argument("--pp", type=int, default=1, help="pipeline stages: each rank's units and plan "
                                "(--max-memory: one spec for all ranks, or one per rank: 'cpu=5GiB;cpu=4GiB')"),
                 p.add_argument("--json", action="store_true")))
def cmd_plan(a: argparse.Namespace) -> int:
    from .api import default_model_path
    from .model.kv_cache import check_kv_format
    from .placement import fmt_bytes, parse_memory
    from .runtime.loader import Reserve, plan_for

    from .placement.machine import PROCESS_OVERHEAD, memory_limit, resolve_auto

    path = a.model or default_model_path()
    reserve = Reserve(a.max_batch_size, a.max_seq_len, kv_format=check_kv_format(a.kv_cache))
    if a.pp > 1:
        return _plan_stages(a, path, reserve)
    try:
        budgets = parse_memory(resolve_auto(a.max_memory))
    except ValueError as e:
        raise OverspillError(str(e)) from None
    plan, src = plan_for(path, a.dtype, a.quantize, budgets, reserve, a.quantize_head)
    if a.json:
        print(plan.to_json())
        return 0
    from .placement.bandwidth import measure

    bw = measure(model_paths=[path], cache=a.cached)   # ~1 s: this machine's speed drifts, so probe by default
    print(plan.table(bw, batch=a.max_batch_size))
    limit, what = memory_limit()
    if limit is not None and "cpu" in plan.usage:
        need = plan.usage["cpu"]["total"] + PROCESS_OVERHEAD
        print(f"host memory: the plan holds {fmt_bytes(plan.usage['cpu']['total'])} + ~{fmt_bytes(PROCESS_OVERHEAD)} "
              f"for the process = {fmt_bytes(need)}, {100 * need / limit:.0f}% of the {what} ({fmt_bytes(limit)})"
              + ("" if need <= limit else ": it will not fit; lower --max-memory cpu or use cpu=auto"))
    return 0


def _plan_stages(a: argparse.Namespace, path: str, reserve) -> int:
    """``plan --pp N``: every rank's range of units and its plan under its own budget."""
    from .parallel import rank_budgets, stage_plans
    from .placement import parse_memory
    from .placement.machine import resolve_auto

    try:
        budgets = [parse_memory(resolve_auto(b)) if b else None for b in rank_budgets(a.max_memory, a.pp)]
    except ValueError as e:
        raise OverspillError(str(e)) from None
    if None in budgets:
        raise OverspillError(f"plan --pp {a.pp}: give every rank a budget (rank {budgets.index(None)} has none)")
    plans = stage_plans(path, a.dtype, a.quantize, budgets, reserve, a.pp, a.quantize_head)
    if a.json:
        print(json.dumps([{"rank": r, "units": list(u), "plan": json.loads(p.to_json())}
                          for r, (u, p) in enumerate(plans)]))
        return 0
    from .placement.bandwidth import measure

    bw = measure(model_paths=[path], cache=a.cached)
    for r, (_, plan) in enumerate(plans):
        print(f"{'' if r == 0 else chr(10)}rank {r}: {plan.placements[0].unit} .. {plan.placements[-1].unit}")
        print(plan.table(bw, batch=a.max_batch_size))
    return 0


@command("convert", "write a layer store (one file per block for one sequential read each), or with --to hf a "
                    "Hugging Face directory; SRC: a Hugging Face directory or EleutherAI's original GPT-J "
                    "(mesh-transformer-jax step_N/shard_*) or GPT-NeoX (DeepSpeed layer_XX-model_YY) checkpoint")
@args(lambda p: (p.add_argument("src"), p.add_argument("dst"),
                 p.add_argument("--dtype", default=None, help="store default bfloat16; --to hf default: as stored"),
                 p.add_argument("--quantize", default=None), p.add_argument("--quantize-head", action="store_true"),
                 p.add_argument("--overwrite", action="store_true"),
                 p.add_argument("--to", choices=("store", "hf"), default="store"),
                 p.add_argument("--config", default=None, help="an original checkpoint's config: GPT-NeoX .yml, "
                                "mesh-transformer-jax .json or Hugging Face config.json (default: the one it ships)"),
                 p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                                help="write each block as N shards, one per tensor-parallel rank, for `torchrun "
                                     "--nproc-per-node N ... --tp N` (each rank reads only its own)"),
                 p.add_argument("--verify", action="store_true", help="re-read and check every checksum")))
def cmd_convert(a: argparse.Namespace) -> int:
    from .checkpoint.store import LayerStore, convert

    if a.to == "hf":
        from .checkpoint.hf_writer import convert_to_hf

        if a.quantize or a.quantize_head or a.verify or a.tensor_parallel != 1:
            raise OverspillError("--quantize, --quantize-head, --tensor-parallel and --verify apply to layer stores, "
                                 "not --to hf")
        convert_to_hf(a.src, a.dst, dtype=a.dtype, overwrite=a.overwrite, progress=sys.stderr.isatty(), config=a.config)
        return 0
    out = convert(a.src, a.dst, dtype=a.dtype or "bfloat16", quantize=a.quantize, quantize_head=a.quantize_head,
                  overwrite=a.overwrite, progress=sys.stderr.isatty(), config=a.config,
                  tensor_parallel=a.tensor_parallel)
    if a.verify:
        LayerStore(out).verify()
        print(f"{out}: all checksums verified", file=sys.stderr)
    return 0


@command("verify", "check a layer store's checksums")
@args(lambda p: p.add_argument("store"))
def cmd_verify(a: argparse.Namespace) -> int:
    from .checkpoint.store import LayerStore

    LayerStore(a.store).verify()
    print(f"{a.store}: all checksums verified")
    return 0


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="Hugging Face model directory or layer store (default: the "
                   "built-in model)")
    p.add_argument("--data", required=True, help=".txt (packed into --seq-len chunks) or .jsonl with {\"text\"} or "
                   "{\"prompt\", \"completion\"} (loss on the completion only)")
    p.add_argument("--output", "-o", required=True, help="adapter directory (PEFT's files; checkpoints in "
                   "OUTPUT/checkpoint)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (the base's compute dtype)")
    p.add_argument("--quantize", default=None, choices=("int8", "int4", "nf4", "int8-dynamic", "none"),
                   help="keep the frozen base's blocks in this format (default: as stored)")
    p.add_argument("--quantize-head", action="store_true", help="the LM head in that format too, and an untied token "
                   "table in int8 (as the 8-bit GPT-J recipe froze them)")
    p.add_argument("--max-memory", default=None, help="budgets, e.g. cpu=4GiB (cpu=auto: the cgroup limit); blocks "
                   "that do not fit stream from disk, forward and backward")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--target", default="qkv,out,up,down", help="comma-separated: qkv, out, up, down, lm (overspill's "
                   "names) or Hugging Face module names (q_proj,v_proj / query_key_value / c_attn ...)")
    p.add_argument("--train-bias", nargs="?", const="lora_only", default="none", choices=("lora_only", "all"),
                   metavar="all", help="the adapted modules' biases train too (PEFT's bias=lora_only); "
                   "--train-bias all: every bias of the model (bias=all)")
    p.add_argument("--train-norms", nargs="?", const="all", default=None, metavar="NAMES",
                   help="norm modules train too (PEFT's modules_to_save): all of them, or comma-separated names "
                        "(ln_f, input_layernorm ...)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="rows per forward")
    p.add_argument("--grad-accum", type=int, default=1, help="forwards per optimizer step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-split", type=float, default=0.05, help="fraction of the examples held out for eval loss")
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    p.add_argument("--optim", default="adamw", choices=("adamw", "adamw8bit"))
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the adapter's gradient norm (0: off)")
    p.add_argument("--no-grad-checkpoint", action="store_true", help="keep every block's graph instead of "
                   "recomputing it in the backward: a third less compute for every block's activations held (the "
                   "planner counts them); streamed blocks are still read twice a step")


@command("finetune", "train a LoRA adapter on a frozen base (dense, 8/4-bit, or streamed from disk)")
@args(_finetune_args)
def cmd_finetune(a: argparse.Namespace) -> int:
    from .api import default_model_path
    from .finetune.lora import LoraSettings
    from .finetune.trainer import TrainSettings, finetune

    budgets = None
    if a.max_memory is not None:
        from .placement import parse_memory
        from .placement.machine import resolve_auto
        try:
            budgets = parse_memory(resolve_auto(a.max_memory))
        except ValueError as e:
            raise OverspillError(f"--max-memory: {e}") from None
    lora = LoraSettings(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout,
                        targets=tuple(t.strip() for t in a.target.split(",") if t.strip()),
                        bias=a.train_bias,
                        norms=tuple(t.strip() for t in (a.train_norms or "").split(",") if t.strip()))
    st = TrainSettings(lora=lora, epochs=a.epochs, max_steps=a.max_steps, lr=a.lr, weight_decay=a.weight_decay,
                       warmup_steps=a.warmup_steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
                       seq_len=a.seq_len, seed=a.seed, eval_split=a.eval_split, save_every=a.save_every,
                       max_grad_norm=a.max_grad_norm or None, optim=a.optim, grad_checkpoint=not a.no_grad_checkpoint)
    r = finetune(a.model or default_model_path(), a.data, a.output, st, dtype=a.dtype, quantize=a.quantize,
                 quantize_head=a.quantize_head, max_memory=budgets, resume=a.resume)
    ev = f", eval loss {r.eval_loss:.4f}" if r.eval_loss is not None else ""
    print(f"{r.output}: {r.steps} steps, train loss {r.train_loss:.4f}{ev}, {r.tokens_per_s:,.0f} tokens/s, "
          f"peak RSS {_fmt_bytes(r.peak_rss_bytes)}", file=sys.stderr)
    return 0


@command("merge", "write BASE with a LoRA ADAPTER merged into its weights, as a Hugging Face directory OUT")
@args(lambda p: (p.add_argument("base"), p.add_argument("adapter"), p.add_argument("out"),
                 p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as stored)"),
                 p.add_argument("--overwrite", action="store_true")))
def cmd_merge(a: argparse.Namespace) -> int:
    from .finetune.merge import merge_adapter

    merge_adapter(a.base, a.adapter, a.out, dtype=a.dtype, overwrite=a.overwrite, progress=sys.stderr.isatty())
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    _pp_args(p)
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences run together per step")
    p.add_argument("--max-seq-len", type=int, default=None, help="context per sequence: prompt + max_tokens "
                   "(default: the model's, within the KV reserve)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/* (default: "
                   "$OVERSPILL_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the "
                   "directory's name; 'shakespeare' for the built-in model)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish "
                   "on SIGTERM / Ctrl-C")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


@command("serve", "an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, a chat page at /)")
@args(_serve_args)
def cmd_serve(a: argparse.Namespace) -> int:
    import os

    try:
        from .serve.backend import ServeConfig
        from .serve.server import serve
    except ImportError as e:
        raise OverspillError(f"overspill serve needs the serve extra: pip install 'overspill[serve]' ({e})") from None
    for name in ("max_batch_size", "max_queue"):
        if getattr(a, name) < 1:
            raise OverspillError(f"--{name.replace('_', '-')} must be at least 1")
    if (a.pp or a.tp) and os.environ.get("RANK", "0") != "0":
        return _serve_rank(a)
    cfg = ServeConfig(model=a.model, dtype=a.dtype, max_memory=a.max_memory, quantize=a.quantize,
                      quantize_head=a.quantize_head, kv_cache=a.kv_cache, adapter=a.adapter,
                      max_batch_size=a.max_batch_size,
                      max_seq_len=a.max_seq_len, max_queue=a.max_queue, served_model_name=a.served_model_name,
                      api_key=a.api_key or os.environ.get("OVERSPILL_API_KEY") or None,
                      drain_timeout=a.drain_timeout, pp=a.pp, tp=a.tp, pp_timeout=a.pp_timeout)
    return serve(cfg, a.host, a.port, a.log_level)


def _serve_rank(a: argparse.Namespace) -> int:
    """``serve --pp/--tp`` on a rank other than 0: no HTTP here; load this rank's part and run the steps rank 0's
    engine sends until rank 0 closes the model (it drains on SIGTERM / Ctrl-C, which torchrun sends every rank:
    this rank waits for rank 0's close instead of leaving the others mid-step)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _load(a, a.max_batch_size, a.max_seq_len)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="overspill", description="Run GPT-style models bigger than your hardware.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (add, _, help) in COMMANDS.items():
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        add(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        import torch
        torch.set_num_threads(max(1, torch.get_num_threads()))
        return COMMANDS[a.command][1](a) or 0
    except OverspillError as e:
        if a.debug:
            raise
        print(f"overspill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("overspill: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
