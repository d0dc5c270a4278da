"""Fine-tuning benchmark: `overspill finetune` (LoRA on a frozen base) against PEFT + transformers, in RAM and
streamed from disk, each run in a fresh worker process, configurations interleaved over rounds.

    --part ram (default): a 1B checkpoint that fits in RAM, one worker per configuration and round
        overspill        base as stored (bf16), gradient checkpointing on
        overspill-int8   base quantized to int8 on load (the blocks, the LM head and the token table: --quantize-head,
                         as the 8-bit GPT-J recipe froze every large matrix), checkpointing on
        overspill-int8-blocks  the blocks in int8, the head and table as stored (bf16)
        overspill-int4   base quantized to int4 on load, checkpointing on
        overspill-no-ckpt  bf16 base, checkpointing off
        peft             transformers AutoModelForCausalLM (bf16) + PEFT LoRA on the same modules,
                         gradient_checkpointing_enable(), torch AdamW, the same batches
      each: one warm-up optimizer step, then --steps steps; s/step = median of the steps' times (the trainer's
      history "s"), tokens/s = tokens per step / that median, peak RSS = the worker's VmHWM.
      Targets: int8 peak RSS / bf16 peak RSS <= 0.6; int8 tokens/s / bf16 tokens/s >= 0.8;
      overspill bf16 tokens/s / PEFT tokens/s >= 1 (same-round ratios, median over rounds).

    --part streamed: GPT-J-6B's shape as layer stores (bf16 and int8), --max-memory cpu=4GiB, each worker in a
      6 GiB memory cgroup with the page cache dropped first (root)
        per run: disk probe on that side's files (O_DIRECT, 8 threads, 2 GiB) -> drop_caches -> cgroup -> worker
      s/optimizer step (median after the first) against the bound of two reads of the streamed bytes (a training
      pass reads the streamed blocks forward, then again in reverse for the backward) at the run's disk speed;
      target ratio <= 1.3; peak RSS against the budget. store-no-ckpt / store-int8-no-ckpt: the same stores with
      gradient checkpointing off (each block's graph kept, its weights read again for the backward). Then accelerate + PEFT on the Hugging Face checkpoint the
      stores were converted from, in the same cgroup: from_pretrained(device_map="auto", max_memory={"cpu": 4GiB},
      offload_folder=...), PEFT LoRA, one training step; recorded as ok (with its time), refused (an exception
      before the step), failed (an exception in it), OOM (killed by the cgroup) or timed out.

Data: overspill/data/shakespeare/heldout.txt packed into --seq-len rows. The random checkpoints of
make_checkpoint.py ship no tokenizer, so each is trained through a view (bench-cache/finetune-views/<name>: symlinks
to its files plus the built-in model's tokenizer.json, a 4096-token BPE whose ids fit any larger vocabulary); the
checkpoints themselves are not touched. Every side reads the same batches in the same order (PEFT's worker uses
overspill's data loader with the trainer's split and seed), so the first step's loss (the base's: LoRA's B starts
at zero) agrees across sides.

Examples (from the repository root; see benchmarks/README.md):
    .venv/bin/python benchmarks/bench_finetune.py --part ram --rounds 3
    .venv/bin/python benchmarks/bench_finetune.py --part streamed
    .venv/bin/python benchmarks/bench_finetune.py --part streamed --seq-len 64 --sides store,store-int8
    .venv/bin/python benchmarks/bench_finetune.py --smoke      # every path on a tiny random GPT-J, ~30 s
Worker (run by the driver; prints one JSON line):
    .venv/bin/python benchmarks/bench_finetune.py --worker overspill --path DIR --data FILE ...
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: E402  (also puts the repository root on sys.path)
from common import fmt, med_of  # noqa: E402

DEFAULT_OUT = common.CACHE_DIR / "results" / "finetune.jsonl"
DEFAULT_RAM_MODEL = common.CACHE_DIR / "gptj-1b-bfloat16"
DEFAULT_HF_6B = common.CACHE_DIR / "gptj-6b-bfloat16"
DEFAULT_STORE_6B = common.CACHE_DIR / "gptj-6b-bfloat16-store"
DEFAULT_STORE_6B_INT8 = common.CACHE_DIR / "gptj-6b-bfloat16-int8-store"
BUILTIN_MODEL = common.REPO_ROOT / "overspill" / "data" / "shakespeare"
DEFAULT_DATA = BUILTIN_MODEL / "heldout.txt"

# ram configurations: name -> (worker, quantize, gradient checkpointing, quantize_head). The int8 base is the 8-bit
# GPT-J recipe's: every large matrix frozen in 8 bits, the LM head and the token table too (--quantize-head);
# overspill-int8-blocks leaves those two in bf16.
RAM_CONFIGS: dict[str, tuple[str, str | None, bool, bool]] = {
    "overspill": ("overspill", None, True, False),
    "overspill-int8": ("overspill", "int8", True, True),
    "overspill-int8-blocks": ("overspill", "int8", True, False),
    "overspill-int4": ("overspill", "int4", True, False),
    "overspill-no-ckpt": ("overspill", None, False, False),
    "peft": ("peft", None, True, False),
}
STREAMED_SIDES = ("store", "store-int8", "store-no-ckpt", "store-int8-no-ckpt", "accelerate")

# overspill's targets (qkv, out, up, down) as Hugging Face module names per model_type: what PEFT adapts
OVERSPILL_TARGETS = "qkv,out,up,down"
PEFT_TARGETS: dict[str, list[str]] = {
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


# ---------------------------------------------------------------------------------------------
# model directories with a tokenizer


def model_vocab(path: Path) -> int:
    manifest = path / "manifest.json"
    if manifest.exists():
        return json.loads(manifest.read_text())["config"]["vocab_size"]
    return common.read_config(path)["vocab_size"]


def tokenizer_view(src: Path, views: Path) -> Path:
    """`src` itself where it ships a tokenizer.json; else views/<name>: a symlink to each of its entries plus the
    built-in model's tokenizer.json (remade every run; the checkpoint is not touched)."""
    src = src.resolve()
    if (src / "tokenizer.json").exists():
        return src
    from tokenizers import Tokenizer

    tok = BUILTIN_MODEL / "tokenizer.json"
    n = Tokenizer.from_file(str(tok)).get_vocab_size(with_added_tokens=True)
    if n > model_vocab(src):
        raise SystemExit(f"{src}: a vocabulary of {model_vocab(src)} is smaller than the built-in tokenizer's {n}; "
                         f"give the checkpoint a tokenizer.json of its own")
    view = views / src.name
    if view.is_symlink() or view.is_file():
        view.unlink()
    elif view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for entry in src.iterdir():
        (view / entry.name).symlink_to(entry)
    shutil.copyfile(tok, view / "tokenizer.json")
    return view


def resolve_model(name: str | Path) -> Path:
    """A directory, or a name under bench-cache/ (gptj-1b -> bench-cache/gptj-1b-bfloat16)."""
    for p in (Path(name), common.CACHE_DIR / str(name), common.CACHE_DIR / f"{name}-bfloat16"):
        if (p / "config.json").exists() or (p / "manifest.json").exists():
            return p.resolve()
    raise SystemExit(f"{name}: no checkpoint there; make one: .venv/bin/python benchmarks/make_checkpoint.py "
                     f"--preset gptj-1b")


# ---------------------------------------------------------------------------------------------
# workers


def proc_io() -> dict:
    """/proc/self/io: read_bytes = bytes this process fetched from the block device (page-cache misses)."""
    out = {}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                k, v = line.split(":")
                out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def watch_trainer(seen: dict) -> None:
    """Watch `finetune()` from outside: wrap the two names it looks up when it runs (the loader's `build`, to keep
    the plan and executor it builds, and the trainer's `train_pass`, to take the streaming source's bytes read and
    /proc/self/io around each pass). Nothing inside a step changes."""
    import overspill.finetune.trainer as trainer
    import overspill.runtime.loader as loader

    real_build, real_pass = loader.build, trainer.train_pass
    seen["passes"] = []

    def build(*args, **kw):
        t0 = time.perf_counter()
        built = real_build(*args, **kw)
        seen["built"], seen["build_s"] = built, time.perf_counter() - t0
        return built

    def train_pass(ex, *args, **kw):
        stats = getattr(ex.source, "stats", None)
        b0, io0, t0 = (stats or {}).get("bytes_read", 0), proc_io(), time.perf_counter()
        out = real_pass(ex, *args, **kw)
        b1, io1 = (stats or {}).get("bytes_read", 0), proc_io()
        seen["passes"].append({"s": time.perf_counter() - t0, "source_bytes_read": b1 - b0,
                               "io_read_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0)})
        return out

    loader.build, trainer.train_pass = build, train_pass


def step_figures(history: list[dict]) -> dict:
    """The first optimizer step is a warm-up; the rest give the median. Tokens per step: labelled tokens (a packed
    .txt labels every position, so batch x seq-len)."""
    steps = [h["s"] for h in history]
    med = common.median(steps[1:]) if len(steps) > 1 else None
    tokens_per_step = common.median(h["tokens"] for h in history[1:]) if len(history) > 1 else None
    return {"steps_s": steps, "step_s_median": med, "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step / med if med and tokens_per_step else None,
            "losses": [h["loss"] for h in history], "first_loss": history[0]["loss"] if history else None}


def train_settings(a: argparse.Namespace, no_grad_checkpoint: bool = False):
    """overspill's settings for every run: one warm-up step plus --steps, no eval split, AdamW at 2e-4."""
    from overspill.finetune.lora import LoraSettings
    from overspill.finetune.trainer import TrainSettings

    return TrainSettings(lora=LoraSettings(r=a.lora_r, alpha=2.0 * a.lora_r, dropout=0.05,
                                           targets=tuple(OVERSPILL_TARGETS.split(","))),
                         max_steps=a.steps + 1, lr=2e-4, batch_size=a.batch_size, seq_len=a.seq_len, seed=a.seed,
                         eval_split=0.0, grad_checkpoint=not no_grad_checkpoint)


def run_overspill(a: argparse.Namespace) -> dict:
    from overspill.finetune.trainer import finetune
    from overspill.placement import parse_memory

    seen: dict = {}
    watch_trainer(seen)
    lines: list[str] = []
    st = train_settings(a, a.no_grad_checkpoint)
    out_dir = tempfile.mkdtemp(prefix="finetune-out-")
    is_store = (Path(a.path) / "manifest.json").exists()
    try:
        io0, t0 = proc_io(), time.perf_counter()
        res = finetune(a.path, a.data, out_dir, st, dtype="auto" if is_store else a.dtype, quantize=a.quantize,
                       quantize_head=a.quantize_head,
                       max_memory=parse_memory(a.max_memory) if a.max_memory else None, progress=False,
                       log=lines.append)
        total_s, io1 = time.perf_counter() - t0, proc_io()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    r = {**step_figures(res.history), "steps": res.steps, "total_s": total_s,
         "build_s": seen.get("build_s"), "ru_maxrss_bytes": res.peak_rss_bytes, "passes": seen["passes"],
         "io_total_read_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0), "log": lines}
    m = next((re.search(r"on (\d+) modules, ([\d,]+) parameters", ln) for ln in lines if "LoRA r=" in ln), None)
    if m:
        r["lora_modules"], r["lora_params"] = int(m.group(1)), int(m.group(2).replace(",", ""))
    reads = [p["source_bytes_read"] for p in seen["passes"][1:]]
    r["bytes_read_per_step"] = common.median(reads) if reads else None
    built = seen.get("built")
    if built is not None and built.plan is not None:
        plan = built.plan
        r["plan"] = {"disk_bytes_per_forward": plan.disk_bytes_per_token(),
                     "streamed_bytes_per_forward": plan.streamed_bytes_per_token(),
                     "resident_cpu_bytes": plan.resident_bytes("cpu"), "usage": plan.usage,
                     "staging_bytes": plan.staging_bytes,
                     "streamed_units": sum(p.tier == "stream" for p in plan.placements),
                     "units": len(plan.placements)}
    if built is not None and getattr(built.executor.source, "stats", None) is not None:
        r["source_stats"] = dict(built.executor.source.stats)
    return r


def peft_model(a: argparse.Namespace, **load_kw):
    """transformers' model with PEFT's LoRA on the modules overspill adapts, gradient checkpointing as asked."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.path, dtype=getattr(torch, a.dtype), **load_kw)
    model.config.use_cache = False
    if not a.no_grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = PEFT_TARGETS[common.read_config(a.path)["model_type"]]
    cfg = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.05, target_modules=targets, bias="none",
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def train_batches(a: argparse.Namespace):
    """The trainer's batches: overspill's loader, tokenizer, split (eval 0) and seed."""
    from overspill.finetune.data import load_dataset
    from overspill.tokenizer import Tokenizer

    cfg = common.read_config(a.path)
    max_pos = cfg.get("n_positions") or cfg.get("max_position_embeddings")
    train, _ = load_dataset(a.data, Tokenizer(a.path), a.seq_len, max_pos, None).split(0.0, a.seed)
    return train.batches(a.batch_size, a.seed)


def peft_step(model, opt, params, batch) -> float:
    """One optimizer step as overspill's trainer takes it: mean cross-entropy over the labelled tokens (labels are
    already the next tokens), clip to norm 1, AdamW. Returns the loss."""
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=batch.input_ids).logits                          # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=-100,
                           reduction="sum") / max(batch.loss_tokens, 1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def run_peft(a: argparse.Namespace) -> dict:
    import peft
    import torch
    import transformers

    t0 = time.perf_counter()
    model = peft_model(a)
    load_s = time.perf_counter() - t0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    batches = train_batches(a)
    torch.manual_seed(a.seed)
    history = []
    for step in range(a.steps + 1):
        t0 = time.perf_counter()
        b = next(batches)
        loss = peft_step(model, opt, params, b)
        history.append({"step": step + 1, "loss": loss, "tokens": b.loss_tokens, "s": time.perf_counter() - t0})
    n_mod = sum(1 for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    return {**step_figures(history), "steps": len(history), "build_s": load_s,
            "lora_modules": n_mod, "lora_params": sum(p.numel() for p in params),
            "transformers": transformers.__version__, "peft": peft.__version__}


def run_accelerate(a: argparse.Namespace) -> dict:
    """accelerate's disk offload + PEFT, one training step; what happens is the result (the worker exits 0 unless
    killed). stage: where it stopped."""
    import accelerate
    import torch
    import transformers
    from overspill.placement import parse_memory

    budget = parse_memory(a.max_memory)   # bytes per device, as accelerate also takes them
    offload = tempfile.mkdtemp(prefix="offload-", dir=a.offload_dir)
    r = {"accelerate": accelerate.__version__, "transformers": transformers.__version__, "max_memory": budget}
    stage = "load + wrap"
    try:
        t0 = time.perf_counter()
        model = peft_model(a, device_map="auto", max_memory=budget, offload_folder=offload)
        r["build_s"] = time.perf_counter() - t0
        dmap = {k: str(v) for k, v in (getattr(model.base_model.model, "hf_device_map", None) or {}).items()}
        r["device_map_counts"] = {d: list(dmap.values()).count(d) for d in set(dmap.values())}
        r["offload_folder_bytes"] = sum(f.stat().st_size for f in Path(offload).rglob("*") if f.is_file())
        stage = "optimizer"
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
        b = next(train_batches(a))
        stage = "step"
        torch.manual_seed(a.seed)
        t0 = time.perf_counter()
        r["loss"] = peft_step(model, opt, params, b)
        r["step_s"] = time.perf_counter() - t0
        r["outcome"] = "ok"
    except Exception as e:   # the outcome being measured: where the stack stops, and its first line
        r["outcome"] = "failed" if stage == "step" else "refused"
        first = (str(e).strip().splitlines() or [""])[0][:300]
        r["error"] = f"{type(e).__name__}: {first}"
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    r["stage"] = stage
    return r


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    run = {"overspill": run_overspill, "peft": run_peft, "accelerate": run_accelerate}[a.worker]
    r = run(a)
    r["peak_rss_bytes"] = common.peak_rss_bytes()
    r["threads"] = torch.get_num_threads()
    r["torch"] = torch.__version__
    common.emit(r)


def worker_cmd(a: argparse.Namespace, kind: str, path: Path, quantize: str | None, ckpt: bool,
               max_memory: str | None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--path", str(path), "--data", a.data,
           "--dtype", a.dtype, "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--seq-len",
           str(a.seq_len), "--lora-r", str(a.lora_r), "--seed", str(a.seed), "--threads", str(a.threads)]
    if quantize:
        cmd += ["--quantize", quantize]
    if not ckpt:
        cmd += ["--no-grad-checkpoint"]
    if max_memory:
        cmd += ["--max-memory", max_memory]
    if a.offload_dir:
        cmd += ["--offload-dir", a.offload_dir]
    return cmd


# ---------------------------------------------------------------------------------------------
# driver: formatting


def gib(x) -> float | None:
    return x / 2**30 if x is not None else None


def target_line(label: str, ratios: list[float], op: str, target: float) -> str:
    if not ratios:
        return f"{label}: - (no round with both sides)"
    m = common.median(ratios)
    met = m <= target if op == "<=" else m >= target
    return (f"{label}: {m:.3f} (rounds: {', '.join(f'{x:.3f}' for x in ratios)}; target {op} {target}: "
            f"{'met' if met else 'NOT met'})")


# ---------------------------------------------------------------------------------------------
# driver: --part ram


def ram_part(a: argparse.Namespace, ctx: dict) -> list[dict]:
    ckpt = resolve_model(a.model or DEFAULT_RAM_MODEL)
    view = tokenizer_view(ckpt, ctx["views"])
    configs = [c.strip() for c in (a.configs or ",".join(RAM_CONFIGS)).split(",") if c.strip()]
    bad = [c for c in configs if c not in RAM_CONFIGS]
    if bad or not configs:
        raise SystemExit(f"--configs takes a comma list of {', '.join(RAM_CONFIGS)}, got {a.configs!r}")
    if "peft" in configs and importlib.util.find_spec("peft") is None:
        if not a.smoke:
            raise SystemExit("the peft configuration needs peft: .venv/bin/pip install peft, or leave peft out of "
                             "--configs")
        print("smoke: peft side skipped: peft is not installed", file=sys.stderr)
        configs.remove("peft")
    if a.dtype == "bfloat16" and not common.bf16_matmul_ok():
        print("note: this CPU has no bf16 matmul in oneDNN: transformers' bf16 (the peft side) runs on torch's slow "
              "fallback (~50x slower per step than overspill's bf16 here); --dtype float32 compares both sides in "
              "float32", file=sys.stderr)
    title = (f"{ckpt.name}  ram  dtype {a.dtype}  batch {a.batch_size} x seq {a.seq_len}  LoRA r={a.lora_r} on "
             f"{OVERSPILL_TARGETS}  {a.steps} steps after 1 warm-up  threads {a.threads}  rounds {a.rounds}")
    print(f"== {title}", file=sys.stderr, flush=True)
    rows = []
    for rnd, name in common.interleave(configs, a.rounds):
        kind, quantize, ckpt_on, head = RAM_CONFIGS[name]
        os.sync()
        cmd = worker_cmd(a, kind, view, quantize, ckpt_on, None) + (["--quantize-head"] if head else [])
        res = common.run_worker(cmd, check=False, timeout=a.timeout)
        row = {"kind": "run", "part": "ram", "time": ctx["stamp"], "model": str(ckpt), "side": name,
               "scheme": (quantize + (" (head, table)" if head else "")) if quantize else a.dtype,
               "grad_checkpoint": ckpt_on, "round": rnd, "dtype": a.dtype,
               "batch_size": a.batch_size, "seq_len": a.seq_len, "lora_r": a.lora_r, "cmd": cmd, **res}
        rows.append(row)
        common.append_jsonl(ctx["out"], row)
        if row.get("ok"):
            print(f"   round {rnd + 1}/{a.rounds} {name:18s}: {fmt(row['step_s_median'])} s/step "
                  f"({', '.join(f'{s:.2f}' for s in row['steps_s'])}), {fmt(row['tokens_per_s'])} tokens/s, "
                  f"peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB, first loss {fmt(row['first_loss'], '.4f')}",
                  file=sys.stderr, flush=True)
        else:
            print(f"   round {rnd + 1}/{a.rounds} {name:18s}: FAILED (exit {row['returncode']})\n"
                  + "\n".join("      " + ln for ln in row["stderr_tail"].splitlines()[-8:]), file=sys.stderr,
                  flush=True)
    lines = ["| config | scheme | grad ckpt | ok runs | median s/step | tokens/s | peak RSS GiB | LoRA params | "
             "first-step loss |", "|" + "---|" * 9]
    for name in configs:
        all_ = [r for r in rows if r["side"] == name]
        ok = [r for r in all_ if r.get("ok")]
        lines.append(f"| {name} | {all_[0]['scheme']} | {'on' if all_[0]['grad_checkpoint'] else 'off'} | "
                     f"{len(ok)}/{len(all_)} | {fmt(med_of(ok, 'step_s_median'))} | "
                     f"{fmt(med_of(ok, 'tokens_per_s'))} | "
                     f"{fmt(gib(med_of(ok, 'peak_rss_bytes')), '.2f')} | {fmt(med_of(ok, 'lora_params'), ',.0f')} | "
                     f"{fmt(med_of(ok, 'first_loss'), '.4f')} |")
    ratios = {
        "int8_rss_over_bf16": common.paired_ratios(rows, "peak_rss_bytes", "overspill-int8", "overspill"),
        "int8_tok_s_over_bf16": common.paired_ratios(rows, "tokens_per_s", "overspill-int8", "overspill"),
        "int8_blocks_rss_over_bf16": common.paired_ratios(rows, "peak_rss_bytes", "overspill-int8-blocks", "overspill"),
        "int8_blocks_tok_s_over_bf16": common.paired_ratios(rows, "tokens_per_s", "overspill-int8-blocks",
                                                            "overspill"),
        "int4_rss_over_bf16": common.paired_ratios(rows, "peak_rss_bytes", "overspill-int4", "overspill"),
        "int4_tok_s_over_bf16": common.paired_ratios(rows, "tokens_per_s", "overspill-int4", "overspill"),
        "no_ckpt_tok_s_over_ckpt": common.paired_ratios(rows, "tokens_per_s", "overspill-no-ckpt", "overspill"),
        "overspill_tok_s_over_peft": common.paired_ratios(rows, "tokens_per_s", "overspill", "peft"),
        "overspill_rss_over_peft": common.paired_ratios(rows, "peak_rss_bytes", "overspill", "peft"),
    }
    base = a.dtype.replace("bfloat16", "bf16")
    notes = [target_line(f"int8 peak RSS / {base} peak RSS", ratios["int8_rss_over_bf16"], "<=", 0.6),
             target_line(f"int8 tokens/s / {base} tokens/s", ratios["int8_tok_s_over_bf16"], ">=", 0.8),
             target_line(f"overspill {base} tokens/s / PEFT tokens/s", ratios["overspill_tok_s_over_peft"], ">=", 1.0)]
    for key, label in (("int8_blocks_rss_over_bf16", f"int8 blocks only (bf16 head, table) peak RSS / {base}"),
                       ("int8_blocks_tok_s_over_bf16", f"int8 blocks only tokens/s / {base}"),
                       ("int4_rss_over_bf16", f"int4 peak RSS / {base}"), ("int4_tok_s_over_bf16",
                       f"int4 tokens/s / {base}"), ("no_ckpt_tok_s_over_ckpt", "checkpointing off / on tokens/s"),
                       ("overspill_rss_over_peft", "overspill peak RSS / PEFT peak RSS")):
        if ratios[key]:
            notes.append(f"{label}: {common.median(ratios[key]):.3f}")
    losses = {r["side"]: r["first_loss"] for r in rows if r.get("ok") and r["round"] == 0}
    if losses:
        notes.append("first-step loss (the base's; same batch on every side): "
                     + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    print(f"### {title}\n\n" + "\n".join(lines) + "\n" + "\n".join(notes) + "\n", flush=True)
    summary = {"kind": "summary", "part": "ram", "time": ctx["stamp"], "title": title, "model": str(ckpt),
               "configs": configs, "ratios": ratios,
               "ratio_medians": {k: common.median(v) if v else None for k, v in ratios.items()}}
    for name in configs:
        ok = [r for r in rows if r["side"] == name and r.get("ok")]
        summary[name] = {k: med_of(ok, k) for k in ("step_s_median", "tokens_per_s", "peak_rss_bytes", "first_loss")}
    common.append_jsonl(ctx["out"], summary)
    return rows


# ---------------------------------------------------------------------------------------------
# driver: --part streamed


def store_files(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).glob("*.safetensors") if p.is_file())


def matmul_params(ckpt: Path) -> int:
    """Parameters a token multiplies by: every tensor but the token embedding table (the head included), from the
    safetensors headers."""
    tok = common.EMBEDDINGS[common.read_config(ckpt)["model_type"]][0]
    n = 0
    for f in common.safetensors_files(ckpt):
        for name, info in common.safetensors_header(f).items():
            if name != tok:
                n += math.prod(info["shape"])
    return n


def cgroups_available() -> str | None:
    """None where this process can make a child memory cgroup (v1, root), else why not."""
    try:
        common.remove_cgroup(common.make_cgroup(f"bench-finetune-probe-{os.getpid()}", 1 << 30))
        return None
    except (OSError, RuntimeError) as e:
        return str(e)


def streamed_sides(a: argparse.Namespace) -> list[tuple[str, Path]]:
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    bad = [s for s in sides if s not in STREAMED_SIDES]
    if bad or not sides:
        raise SystemExit(f"--sides takes a comma list of {', '.join(STREAMED_SIDES)}, got {a.sides!r}")
    paths = {"store": Path(a.store), "store-int8": Path(a.store_int8), "accelerate": Path(a.hf)}
    makes = {"store": f".venv/bin/python -m overspill.cli convert {a.hf} {a.store}",
             "store-int8": f".venv/bin/python -m overspill.cli convert {a.hf} {a.store_int8} --quantize int8",
             "accelerate": ".venv/bin/python benchmarks/make_checkpoint.py --preset gptj-6b"}
    for k in ("store", "store-int8"):      # the same stores with gradient checkpointing off (graphs kept)
        paths[f"{k}-no-ckpt"], makes[f"{k}-no-ckpt"] = paths[k], makes[k]
    missing = [s for s in sides if not ((paths[s] / "manifest.json").exists() or (paths[s] / "config.json").exists())]
    if missing:
        raise SystemExit("missing: " + "; ".join(f"{s} ({paths[s]}): {makes[s]}" for s in missing))
    if "accelerate" in sides and (importlib.util.find_spec("accelerate") is None
                                  or importlib.util.find_spec("peft") is None):
        if not a.smoke:
            raise SystemExit("the accelerate side needs accelerate and peft: .venv/bin/pip install -e '.[bench]' peft")
        print("smoke: accelerate side skipped: accelerate or peft is not installed", file=sys.stderr)
        sides.remove("accelerate")
    return [(s, paths[s].resolve()) for s in sides]


def outcome(res: dict) -> str:
    if res.get("ok"):
        return res.get("outcome", "ok")
    cg = res.get("cgroup") or {}
    if "[timed out" in res.get("stderr_tail", ""):
        return "timed out"
    if res.get("returncode") == -9 and (cg.get("oom_kill_during_run") or cg.get("under_oom")
                                        or (cg.get("failcnt") or 0) > 0):
        return "OOM"
    return "error"


def store_scheme(path: Path) -> str:
    m = json.loads((path / "manifest.json").read_text())
    return m.get("quantize") or m["dtype"]


def streamed_part(a: argparse.Namespace, ctx: dict) -> list[dict]:
    import torch
    from overspill.placement import parse_memory
    from overspill.placement.bandwidth import matmul_tflops

    sides = streamed_sides(a)
    no_cgroup = cgroups_available()
    if no_cgroup and not a.smoke:
        raise SystemExit(f"cannot make a memory cgroup ({no_cgroup}): the streamed part runs each side in one "
                         "(cgroup v1 mounted at /sys/fs/cgroup/memory, as root)")
    if no_cgroup:
        print(f"smoke: no memory cgroup ({no_cgroup}): workers run without a memory limit", file=sys.stderr)
    max_memory = {name: ctx.get("max_memory", {}).get(name, a.max_memory) for name, _ in sides}
    limit = parse_memory(f"cpu={a.cgroup_limit}")["cpu"]
    views = {name: tokenizer_view(path, ctx["views"] / "streamed") for name, path in sides}
    hf = Path(a.hf).resolve()
    params = matmul_params(hf)
    # the compute estimate's rate: bf16 where oneDNN has bf16 matmuls, else float32 (overspill's bf16 path there)
    mm_dtype = "float32" if a.dtype == "bfloat16" and not common.bf16_matmul_ok() else a.dtype
    tflops = matmul_tflops(getattr(torch, mm_dtype), reps=1 if a.smoke else 3)
    if not a.drop_caches:
        print("--no-drop-caches: runs may be served from the page cache (plumbing checks only)", file=sys.stderr)
    title = (f"{hf.name}  streamed  max-memory {', '.join(sorted(set(max_memory.values())))}  cgroup limit "
             f"{'none' if no_cgroup else f'{limit / 2**30:.3g} GiB'}  batch {a.batch_size} x seq {a.seq_len}  "
             f"LoRA r={a.lora_r}  {a.steps} steps after 1 warm-up  drop caches {a.drop_caches}  rounds {a.rounds}")
    print(f"== {title}", file=sys.stderr, flush=True)
    rows = []
    for rnd, (name, path) in common.interleave(sides, a.rounds):
        files = store_files(path) if name != "accelerate" else common.safetensors_files(path)
        disk = (common.disk_read_gbps(files, max_bytes=64 << 20, threads=2, direct=False) if a.smoke else
                common.disk_read_gbps(files, max_bytes=2 << 30, threads=8, direct=True))
        if a.drop_caches:
            common.drop_caches()
        else:
            os.sync()
        cmd = worker_cmd(a, "accelerate" if name == "accelerate" else "overspill", views[name], None,
                         not name.endswith("-no-ckpt"), max_memory[name])
        if no_cgroup:
            res = common.run_worker(cmd, check=False, timeout=a.timeout)
        else:
            with common.MemoryCgroup(f"bench-finetune-{os.getpid()}", limit) as cg:
                res = common.run_worker(cmd, cgroup=cg.path, check=False, timeout=a.timeout)
        scheme = a.dtype if name == "accelerate" else store_scheme(path)
        row = {"kind": "run", "part": "streamed", "time": ctx["stamp"], "path": str(path), "side": name,
               "scheme": scheme, "round": rnd, "batch_size": a.batch_size, "seq_len": a.seq_len, "lora_r": a.lora_r,
               "max_memory": max_memory[name], "budget_bytes": parse_memory(max_memory[name])["cpu"],
               "cgroup_limit": None if no_cgroup else limit,
               "drop_caches": a.drop_caches, "disk_gbps_run": disk, "matmul_tflops": tflops, "cmd": cmd, **res}
        row["outcome"] = outcome(res)
        cg = res.get("cgroup") or {}
        row["oom_kills"] = cg.get("oom_kill_during_run", cg.get("oom_kill"))
        # frozen base, checkpointed: forward 2, recomputed forward 2, input gradients 2 flops per parameter and token
        # (graphs kept: no recompute)
        row["compute_s_estimate"] = (4 if name.endswith("-no-ckpt") else 6) * params * a.batch_size * a.seq_len / \
            (tflops * 1e12)
        if name != "accelerate" and res.get("ok"):
            disk_fwd = (res.get("plan") or {}).get("disk_bytes_per_forward", 0)
            row["streamed_bytes_per_step"] = 2 * disk_fwd
            row["bound_s"] = 2 * disk_fwd / (disk * 1e9)
            med = res.get("step_s_median")
            row["ratio_to_bound"] = med / row["bound_s"] if med and row["bound_s"] else None
            row["measured_bound_s"] = (res["bytes_read_per_step"] / (disk * 1e9)
                                       if res.get("bytes_read_per_step") else None)
        rows.append(row)
        common.append_jsonl(ctx["out"], row)
        if name == "accelerate":
            what = (f"ok, one step {fmt(res.get('step_s'))} s" if row["outcome"] == "ok" else
                    f"{row['outcome']} at {res.get('stage')}: {res.get('error')}" if res.get("ok") else
                    f"{row['outcome']} (exit {res.get('returncode')}, OOM kills {row['oom_kills']})")
            print(f"   round {rnd + 1}/{a.rounds} accelerate + PEFT: {what}", file=sys.stderr, flush=True)
        elif res.get("ok"):
            print(f"   round {rnd + 1}/{a.rounds} {name:10s}: {fmt(res['step_s_median'])} s/step "
                  f"({', '.join(f'{s:.2f}' for s in res['steps_s'])}), bound {fmt(row['bound_s'])} s "
                  f"(2 x {fmt(row['streamed_bytes_per_step'] / 2e9)} GB @ {disk:.2f} GB/s), ratio "
                  f"{fmt(row['ratio_to_bound'], '.2f')}, peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"cgroup max {(cg.get('max_usage_bytes') or 0) / 2**30:.2f} GiB", file=sys.stderr, flush=True)
        else:
            print(f"   round {rnd + 1}/{a.rounds} {name:10s}: FAILED ({row['outcome']}, exit {res['returncode']})\n"
                  + "\n".join("      " + ln for ln in res["stderr_tail"].splitlines()[-8:]), file=sys.stderr,
                  flush=True)
    lines = ["| side | scheme | ok runs | median s/step | tokens/s | disk GB/s | streamed GB/step (plan, 2 reads) | "
             "read GB/step (measured) | bound s | ratio to bound | compute s (est.) | peak RSS GiB | cgroup max GiB | "
             "budget GiB | OOMs |", "|" + "---|" * 15]
    acc = []
    for name, _ in sides:
        all_ = [r for r in rows if r["side"] == name]
        if name == "accelerate":
            acc = all_
            continue
        ok = [r for r in all_ if r.get("ok")]
        sb, rb = med_of(ok, "streamed_bytes_per_step"), med_of(ok, "bytes_read_per_step")
        lines.append(
            f"| {name} | {all_[0]['scheme']} | {len(ok)}/{len(all_)} | {fmt(med_of(ok, 'step_s_median'))} | "
            f"{fmt(med_of(ok, 'tokens_per_s'))} | {fmt(med_of(all_, 'disk_gbps_run'), '.2f')} | "
            f"{fmt(sb / 1e9 if sb is not None else None)} | {fmt(rb / 1e9 if rb is not None else None)} | "
            f"{fmt(med_of(ok, 'bound_s'))} | {fmt(med_of(ok, 'ratio_to_bound'), '.2f')} | "
            f"{fmt(med_of(all_, 'compute_s_estimate'))} | {fmt(gib(med_of(ok, 'peak_rss_bytes')), '.2f')} | "
            f"{fmt(gib(max((r.get('cgroup') or {}).get('max_usage_bytes') or 0 for r in all_)), '.2f')} | "
            f"{fmt(gib(all_[0]['budget_bytes']))} | {sum(r.get('oom_kills') or 0 for r in all_)} |")
    notes = []
    for name, _ in sides:
        ok = [r for r in rows if r["side"] == name and r.get("ok") and r.get("ratio_to_bound") is not None]
        if ok:
            notes.append(target_line(f"{name}: s/step / two reads of the streamed bytes",
                                     [r["ratio_to_bound"] for r in ok], "<=", 1.3))
            notes.append(f"{name}: peak RSS / budget: {med_of(ok, 'peak_rss_bytes') / ok[0]['budget_bytes']:.2f}")
    for r in acc:
        if r["outcome"] == "ok":
            what = f"ran one step in {fmt(r.get('step_s'))} s (loss {fmt(r.get('loss'), '.4f')})"
        elif r.get("ok"):
            what = f"{r['outcome']} at {r.get('stage')}: {r.get('error')}"
        else:
            what = f"{r['outcome']} (exit {r.get('returncode')}, OOM kills {r.get('oom_kills')})"
        if r.get("device_map_counts"):
            what += " [modules by device: " + ", ".join(f"{d} {n}" for d, n in sorted(r["device_map_counts"].items()))
            what += "]"
        notes.append(f"accelerate + PEFT ({r['scheme']}, max_memory {r['max_memory']}, same cgroup), round "
                     f"{r['round'] + 1}: {what}; peak RSS {fmt(gib(r.get('peak_rss_bytes')), '.2f')} GiB, cgroup max "
                     f"{fmt(gib((r.get('cgroup') or {}).get('max_usage_bytes')), '.2f')} GiB")
    notes.append(f"matmul ({mm_dtype}) measured now: {tflops:.3f} TFLOP/s; compute s (est.) = 6 x {params / 1e9:.3g} B "
                 f"params x {a.batch_size * a.seq_len} tokens / that rate")
    print(f"### {title}\n\n" + "\n".join(lines) + "\n" + "\n".join(notes) + "\n", flush=True)
    summary = {"kind": "summary", "part": "streamed", "time": ctx["stamp"], "title": title, "hf": str(hf),
               "sides": [s for s, _ in sides], "max_memory": max_memory, "cgroup_limit": None if no_cgroup else limit,
               "matmul_tflops": tflops, "matmul_dtype": mm_dtype,
               "disk_gbps_probes": [r["disk_gbps_run"] for r in rows],
               "accelerate": [{k: r.get(k) for k in ("round", "outcome", "stage", "error", "step_s")} for r in acc]}
    for name, _ in sides:
        ok = [r for r in rows if r["side"] == name and r.get("ok")]
        if name != "accelerate":
            summary[name] = {k: med_of(ok, k) for k in ("step_s_median", "tokens_per_s", "bound_s", "ratio_to_bound",
                                                         "bytes_read_per_step", "peak_rss_bytes")}
    common.append_jsonl(ctx["out"], summary)
    return rows


# ---------------------------------------------------------------------------------------------
# entry points


def driver(a: argparse.Namespace, max_memory: dict[str, str] | None = None) -> Path:
    """Runs the parts asked for, prints their tables; returns the results file. max_memory: per streamed side,
    in place of --max-memory (smoke)."""
    out = Path(a.out)
    ctx = {"stamp": datetime.datetime.now().isoformat(timespec="seconds"), "out": out, "max_memory": max_memory or {},
           "views": Path(a.views) if a.views else common.CACHE_DIR / "finetune-views"}
    a.data = str(Path(a.data).resolve())
    parts = ("ram", "streamed") if a.part == "all" else (a.part,)
    for part in parts:
        steps = a.steps
        if steps is None:
            a.steps = 3 if part == "ram" else 2
        (ram_part if part == "ram" else streamed_part)(a, ctx)
        a.steps = steps
    print(f"raw rows appended to {out}", file=sys.stderr)
    return out


def least_budget(a: argparse.Namespace, store: Path, scratch: Path, no_ckpt: bool = False) -> int:
    """Smoke: the least cpu budget (bytes) the planner accepts for this training step on `store` (checkpointed, or
    with the graphs kept), plus its largest block file: some blocks stream, the rest fit. Asks `finetune()` with 1
    byte and reads the PlanError."""
    from overspill.finetune.trainer import finetune
    from overspill.placement.planner import PlanError

    steps, a.steps = a.steps, 0
    try:
        finetune(str(store), a.data, str(scratch / "probe-out"), train_settings(a, no_ckpt), max_memory={"cpu": 1},
                 progress=False, log=lambda line: None)
    except PlanError as e:
        if e.min_bytes is None:
            raise
        return e.min_bytes + max(f.stat().st_size for f in store_files(store) if f.name.startswith("block."))
    finally:
        a.steps = steps
    raise SystemExit(f"smoke: {store} trained under a 1-byte budget?")


def smoke(a: argparse.Namespace) -> None:
    """--smoke: a tiny random GPT-J (4096-token vocabulary, so the built-in tokenizer fits) in a temp dir; every ram
    configuration once; its layer stores (as computed and int8) streamed under a budget below their size, and
    accelerate + PEFT on it under half its size, in a cgroup where one can be made; page cache not dropped. Fails unless every run
    succeeded (accelerate's outcome, whatever it is, counts as a run that succeeded when its worker reported it)."""
    from make_checkpoint import DTYPES, PRESETS, make_checkpoint
    from overspill.cli import main as overspill_cli

    with common.Smoke(a.keep) as sm:
        a.dtype = a.dtype or common.compute_dtype()
        fields = dict(PRESETS["gptj-tiny"][1], vocab_size=4096, bos_token_id=0, eos_token_id=0)
        hf = sm.dir / "ckpt" / "gptj-tiny-4k"
        make_checkpoint(hf, "gptj", fields, DTYPES[a.dtype], 1 << 30, seed=0, log=lambda msg: None)
        stores = {"store": sm.dir / "store", "store-int8": sm.dir / "store-int8"}
        for name, extra in (("store", []), ("store-int8", ["--quantize", "int8"])):
            rc = overspill_cli(["convert", str(hf), str(stores[name]), "--dtype", a.dtype] + extra)
            if rc:
                raise SystemExit(f"smoke: overspill convert exited {rc}")
        a.model, a.hf, a.store, a.store_int8 = str(hf), str(hf), str(stores["store"]), str(stores["store-int8"])
        a.views = a.views or str(sm.dir / "views")
        if a.data == str(DEFAULT_DATA):   # a slice of it: a few thousand tokens to tokenize per worker, not 100k
            text = DEFAULT_DATA.read_text()[:20000]
            a.data = str(sm.dir / "heldout-20k.txt")
            Path(a.data).write_text(text[:text.rindex("\n\n") + 1])
        ctx_budgets = {}
        if a.max_memory is None:   # per store: the planner's least budget for this step plus one block, so some stream
            for name, store in stores.items():
                for side, no_ckpt in ((name, False), (f"{name}-no-ckpt", True)):
                    n = least_budget(a, tokenizer_view(store, Path(a.views) / "probe"), sm.dir, no_ckpt)
                    ctx_budgets[side] = f"cpu={-(-n // 1024)}KiB"
            # accelerate: half the checkpoint, so its device map offloads to disk as in the full run
            half = sum(f.stat().st_size for f in common.safetensors_files(hf)) // 2
            ctx_budgets["accelerate"] = f"cpu={half >> 10}KiB"
            a.max_memory = ctx_budgets["store"]
        a.views = a.views or str(sm.dir / "views")
        a.out = a.out or str(sm.out("finetune.jsonl"))
        out = driver(a, ctx_budgets)
        rows = common.smoke_check(out, min_runs=1)
        streamed = [r for r in rows if r.get("part") == "streamed" and r["kind"] == "run" and r["side"] != "accelerate"]
        if not all((r.get("plan") or {}).get("streamed_units") for r in streamed):
            raise SystemExit("smoke: FAILED: a streamed side streamed no unit (budget above the model's size?)")


# --smoke changes these defaults (flags given explicitly still win)
SMOKE_DEFAULTS = dict(part="all", steps=1, seq_len=32, rounds=1, threads=1, timeout=300, max_memory=None,
                      cgroup_limit="3GiB", drop_caches=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("ram", "streamed", "all"), default="ram")
    p.add_argument("--model", default=None, help=f"ram: checkpoint dir or bench-cache name (default "
                   f"{DEFAULT_RAM_MODEL.relative_to(common.REPO_ROOT)})")
    p.add_argument("--configs", default=None, help=f"ram: comma list of {', '.join(RAM_CONFIGS)} (default all)")
    p.add_argument("--hf", default=str(DEFAULT_HF_6B), help="streamed: the Hugging Face checkpoint (accelerate side)")
    p.add_argument("--store", default=str(DEFAULT_STORE_6B), help="streamed: its layer store (overspill convert)")
    p.add_argument("--store-int8", default=str(DEFAULT_STORE_6B_INT8), help="streamed: its int8 layer store")
    p.add_argument("--sides", default=",".join(STREAMED_SIDES), help="streamed: comma list of "
                   f"{', '.join(STREAMED_SIDES)}")
    p.add_argument("--max-memory", default="cpu=4GiB", help="streamed: overspill --max-memory, accelerate max_memory")
    p.add_argument("--cgroup-limit", default="6GiB", help="streamed: memory cgroup limit of every worker")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                   help="streamed: do not drop the page cache before runs (plumbing checks only)")
    p.add_argument("--offload-dir", default=None, help="where accelerate's temporary offload_folder goes")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="training text (.txt or .jsonl)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps timed after one warm-up step "
                   "(default: ram 3, streamed 2)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r, dropout 0.05)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds")
    p.add_argument("--dtype", default=None, help="base compute dtype of the HF checkpoints, both sides (default "
                   "bfloat16; float32 on CPUs without bf16 matmuls); a store keeps the dtype it was converted to")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=7200, help="seconds per worker")
    p.add_argument("--views", default=None, help="where the tokenizer views go (default bench-cache/finetune-views)")
    p.add_argument("--out", default=None, help=f"JSONL file the raw rows are appended to (default {DEFAULT_OUT})")
    p.add_argument("--smoke", action="store_true", help="every path on a tiny random checkpoint in seconds "
                   "(measures nothing)")
    p.add_argument("--keep", action="store_true", help="--smoke: keep the temp dir")
    p.add_argument("--worker", choices=("overspill", "peft", "accelerate"), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--quantize", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-grad-checkpoint", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quantize-head", action="store_true", help=argparse.SUPPRESS)
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**SMOKE_DEFAULTS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.steps is not None and a.steps < 1:
        p.error("--steps must be at least 1 (timed after one warm-up step)")
    if a.smoke:
        return smoke(a)
    a.dtype = a.dtype or "bfloat16"
    a.out = a.out or str(DEFAULT_OUT)
    driver(a)


if __name__ == "__main__":
    main()
