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


def _gen_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
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


@command("generate", "generate text from a prompt, streamed to the terminal")
@args(lambda p: (_gen_args(p), p.add_argument("prompt")))
def cmd_generate(a: argparse.Namespace) -> int:
    from .api import load

    model = load(a.model, dtype=a.dtype)
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
              repetition_penalty=a.repetition_penalty, stop=a.stop, seed=a.seed, ignore_eos=a.ignore_eos)
    out = sys.stdout
    out.write(a.prompt)
    out.flush()
    if a.num_beams > 1:
        out.write(model.generate([a.prompt], num_beams=a.num_beams, **kw)[0])
    else:
        for piece in model.stream(a.prompt, **kw):
            out.write(piece)
            out.flush()
    out.write("\n")
    if a.stats:
        s = model.last_stats
        dec = s.get("decode_s", 0.0)
        rate = (s.get("new_tokens", 1) - 1) / dec if dec else float("nan")
        print(f"prefill {s.get('prefill_s', 0):.3f}s, {s.get('new_tokens', 0)} new tokens, decode {rate:.1f} tokens/s",
              file=sys.stderr)
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
