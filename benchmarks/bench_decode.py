"""Decode benchmark: overspill against transformers on the same checkpoint, in the same run.

    driver ──► probe mem BW ──► worker overspill ──► worker hf ──► probe mem BW ──► ... (--repeats)
               (in-process)     (fresh process:      (fresh process)
                                 load, warm-up, timed generate, one JSON line)

Each worker loads the checkpoint in bfloat16 (--dtype; 2 threads), runs one short warm-up generate (which
also pulls the weights into memory: transformers maps safetensors lazily), then one timed greedy
generate of exactly --new-tokens tokens after a random --prompt-len token prompt at --batch rows.
Sides alternate within every round so the machine's drift hits both alike; the driver quotes
medians, paired per-round ratios, and a bound from the memory bandwidth measured between rounds:

    bound tok/s (per sequence) = memory read GB/s / weight bytes per decode step
    weight bytes per decode step = all tensors but the embedding tables (the head counts)

Examples (from the repository root):
    .venv/bin/python benchmarks/bench_decode.py --ckpt bench-cache/gptj-1b-bfloat16 --batches 1,8
    .venv/bin/python benchmarks/bench_decode.py --ckpt bench-cache/llama-tiny-bfloat16 --sides hf --repeats 1
    .venv/bin/python benchmarks/bench_decode.py --ckpt bench-cache/tinyllama-bfloat16 --sides overspill \
        --quantize int8 --batches 1
    # every weight format side by side, interleaved in each round:
    .venv/bin/python benchmarks/bench_decode.py --ckpt tinyllama --repeats 2 \
        --sides overspill,overspill:int8,overspill:int8+head,overspill:int8-dynamic,overspill:int4,overspill:int4+head
    # smoke: the whole path on a tiny random checkpoint in seconds (results under a temp dir)
    .venv/bin/python benchmarks/bench_decode.py --smoke
Worker (run by the driver; prints one JSON line):
    .venv/bin/python benchmarks/bench_decode.py --worker hf --ckpt DIR --batch 1
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import common  # noqa: E402  (also puts the repository root on sys.path)
from common import fmt  # noqa: E402

SIDES = ("overspill", "hf")
DEFAULT_OUT = common.CACHE_DIR / "results" / "decode.jsonl"


# ---------------------------------------------------------------------------------------------
# worker


def make_prompts(vocab_size: int, batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    """Seeded random token ids in [0, vocab_size): the same prompts for both sides."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=gen).tolist()


def run_hf(ckpt: str, prompts: list[list[int]], new_tokens: int, warmup_tokens: int, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype))
    model.eval()
    load_s = time.perf_counter() - t0

    common.hf_generate_timed(model, prompts, warmup_tokens)
    out, times, t0 = common.hf_generate_timed(model, prompts, new_tokens)
    total_s = time.perf_counter() - t0
    steps = [b - a for a, b in zip(times, times[1:])]
    T = len(prompts[0])
    return {"load_s": load_s, "prefill_s": times[0] - t0, "decode_s": times[-1] - times[0],
            "total_s": total_s, "step_s_median": common.median(steps), "tokens0": out[0, T:T + 16].tolist()}


def run_overspill(ckpt: str, prompts: list[list[int]], new_tokens: int, warmup_tokens: int,
                  quantize: str | None, quantize_head: bool = False, dtype: str = "bfloat16") -> dict:
    import overspill

    kw = {"quantize": quantize, "quantize_head": quantize_head} if quantize else {}
    t0 = time.perf_counter()
    model = overspill.load(ckpt, dtype=dtype, **kw)
    load_s = time.perf_counter() - t0

    model.generate(prompts, max_new_tokens=warmup_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = model.generate(prompts, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    total_s = time.perf_counter() - t0
    stats = dict(model.last_stats)
    assert [len(o) for o in outs] == [new_tokens] * len(prompts), [len(o) for o in outs]
    assert stats.get("new_tokens", new_tokens) == new_tokens, stats
    result = {"load_s": load_s, "prefill_s": stats["prefill_s"], "decode_s": stats["decode_s"],
              "total_s": total_s, "tokens0": list(outs[0][:16]), "last_stats": stats}
    try:
        result["info"] = model.info()
    except Exception as e:  # informative only
        result["info_error"] = repr(e)
    return result


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    ckpt = str(a.ckpt[0])
    vocab = common.read_config(ckpt)["vocab_size"]
    prompts = make_prompts(vocab, a.batch, a.prompt_len, a.seed)
    if a.worker == "hf":
        r = run_hf(ckpt, prompts, a.new_tokens, a.warmup_tokens, a.dtype)
    else:
        r = run_overspill(ckpt, prompts, a.new_tokens, a.warmup_tokens, a.quantize, a.quantize_head, a.dtype)
    steps = a.new_tokens - 1
    r["decode_tok_s"] = steps / r["decode_s"] if steps > 0 and r["decode_s"] > 0 else None  # per sequence
    r["agg_tok_s"] = r["decode_tok_s"] * a.batch if r["decode_tok_s"] else None
    r["peak_rss_bytes"] = common.peak_rss_bytes()
    r["threads"] = torch.get_num_threads()
    r["torch"] = torch.__version__
    if a.worker == "hf":
        import transformers
        r["transformers"] = transformers.__version__
    common.emit(r)


# ---------------------------------------------------------------------------------------------
# driver


def resolve_ckpt(text: str) -> Path:
    """A directory, or a name under bench-cache/ (`gptj-1b` -> bench-cache/gptj-1b-bfloat16)."""
    p = Path(text)
    for cand in (p, common.CACHE_DIR / text, common.CACHE_DIR / f"{text}-bfloat16"):
        if (cand / "config.json").exists():
            return cand.resolve()
    raise SystemExit(f"no checkpoint at {text} (make one with benchmarks/make_checkpoint.py)")


def split_scheme(spec: str) -> tuple[str | None, bool]:
    """'int4+head' -> ('int4', True); 'int8' -> ('int8', False); 'bf16' / 'none' -> (None, False)."""
    scheme, head = (spec[:-5], True) if spec.endswith("+head") else (spec, False)
    return (None, False) if scheme in ("bf16", "none") else (scheme, head)


def parse_side(side: str, a: argparse.Namespace) -> tuple[str, str | None, bool]:
    """'hf' | 'overspill' | 'overspill:SCHEME' | 'overspill:SCHEME+head' -> (kind, scheme, quantize_head).
    Plain 'overspill' takes --quantize / --quantize-head."""
    kind, _, spec = side.partition(":")
    if kind not in SIDES or (spec and kind != "overspill"):
        raise SystemExit(f"--sides: unknown side {side!r}; expected hf, overspill or overspill:SCHEME[+head]")
    if not spec:
        return kind, (a.quantize if kind == "overspill" else None), bool(a.quantize and a.quantize_head)
    scheme, head = split_scheme(spec)
    if scheme is None:
        return kind, None, False
    from overspill.quant import SCHEMES
    if scheme not in SCHEMES:
        raise SystemExit(f"--sides: unknown scheme {scheme!r} in {side!r}; expected one of {SCHEMES}")
    return kind, scheme, head


DTYPE_LABELS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def scheme_label(scheme: str | None, head: bool, dtype: str = "bfloat16") -> str:
    return (scheme or DTYPE_LABELS[dtype]) + ("+head" if scheme and head else "")


def worker_cmd(a: argparse.Namespace, side: str, ckpt: Path, batch: int) -> list[str]:
    kind, scheme, head = parse_side(side, a)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--ckpt", str(ckpt),
           "--batch", str(batch), "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens),
           "--warmup-tokens", str(a.warmup_tokens), "--seed", str(a.seed), "--threads", str(a.threads),
           "--dtype", a.dtype]
    if scheme:
        cmd += ["--quantize", scheme] + (["--quantize-head"] if head else [])
    return cmd


def summarize(rows: list[dict], mem_gbps: float, wbpt: dict[str, int], sides: list[str]) -> str:
    """Markdown table for one (checkpoint, batch): medians per side, bound, paired ratios."""
    lines = ["| side | scheme | ok runs | prefill s | decode tok/s/seq | aggregate tok/s | peak RSS GiB | "
             "load s | bound tok/s/seq | fraction of bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for side in sides:
        ok = [r for r in rows if r["side"] == side and r.get("ok")]
        n = len([r for r in rows if r["side"] == side])
        dec = common.median(r["decode_tok_s"] for r in ok)
        bound = mem_gbps * 1e9 / wbpt[side]  # tokens/s per sequence if every step reads the weights once
        scheme = next((r["scheme"] for r in rows if r["side"] == side), "-")
        lines.append(
            f"| {side} | {scheme} | {len(ok)}/{n} | "
            f"{fmt(common.median(r['prefill_s'] for r in ok))} | {fmt(dec)} | "
            f"{fmt(common.median(r['agg_tok_s'] for r in ok))} | "
            f"{fmt(common.median(r['peak_rss_bytes'] / 2**30 for r in ok), '.2f')} | "
            f"{fmt(common.median(r['load_s'] for r in ok), '.2f')} | {fmt(bound)} | {fmt(dec / bound, '.3g')} |")
    if {"overspill", "hf"} <= set(sides):
        dec_r = common.paired_ratios(rows, "decode_tok_s", "overspill", "hf")
        pre_r = common.paired_ratios(rows, "prefill_s", "hf", "overspill")
        lines.append(f"\noverspill/hf decode tok/s: {fmt(common.median(dec_r), '.2f')}x "
                     f"(per round: {', '.join(fmt(x, '.2f') for x in dec_r) or '-'}); "
                     f"prefill speed-up (hf s / overspill s): {fmt(common.median(pre_r), '.2f')}x")
    return "\n".join(lines)


def tokens_note(rows: list[dict], sides: list[str]) -> str:
    """Greedy decoding on the same weights and prompt should give the same tokens: compare row 0's
    first 16 new tokens across every successful run (bf16 rounding can split near-ties)."""
    plain = [r for r in rows if r.get("ok") and "tokens0" in r and r["scheme"] in DTYPE_LABELS.values()]
    seqs = {json.dumps(r["tokens0"]) for r in plain}
    if len({r["side"] for r in plain}) < 2 or not seqs:
        return ""
    return ("\ngreedy tokens (row 0, first 16) identical across sides and rounds: "
            + ("yes" if len(seqs) == 1 else f"NO ({len(seqs)} variants)") + " (unquantized sides)")


def quantized_bytes_per_token(ckpt: Path, scheme: str, quantize_head: bool, dtype: str = "bfloat16") -> int:
    import torch

    from overspill.checkpoint.hf import HFCheckpoint
    from overspill.model.weights import units
    from overspill.runtime.loader import unit_weight_bytes

    ck = HFCheckpoint(str(ckpt))
    return sum(unit_weight_bytes(ck, ck.config, u, getattr(torch, dtype), scheme, quantize_head)
               for u in units(ck.config) if u != "embed")


def driver(a: argparse.Namespace) -> Path:
    """Runs every (checkpoint, batch), prints one table each; returns the results file."""
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    if not sides:
        raise SystemExit(f"--sides takes a comma list of hf, overspill, overspill:SCHEME[+head]; got {a.sides!r}")
    spec = {side: parse_side(side, a) for side in sides}
    batches = [int(b) for b in a.batches.split(",")] if a.batches else [a.batch]
    ckpts = [resolve_ckpt(c) for c in a.ckpt]
    out = Path(a.out)
    labels = {side: scheme_label(sc, hd, a.dtype) for side, (_, sc, hd) in spec.items()}
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    reports = []

    for ckpt in ckpts:
        # quantized weights: the bytes overspill's planner counts (all units but the embedding)
        wbpt = {side: quantized_bytes_per_token(ckpt, sc, hd, a.dtype) if sc else common.weight_bytes_per_token(ckpt)
                for side, (_, sc, hd) in spec.items()}
        kv_step = common.kv_bytes_per_token(ckpt) * (a.prompt_len + a.new_tokens // 2)  # mid-decode, per seq
        for batch in batches:
            title = (f"{ckpt.name}  batch {batch}  prompt {a.prompt_len}  new {a.new_tokens}  weights/step "
                     + ", ".join(f"{labels[sd]} {wbpt[sd] / 1e9:.3f} GB" for sd in dict.fromkeys(sides)))
            print(f"== {title}", file=sys.stderr, flush=True)
            probes = [a.mem_probe()]
            rows: list[dict] = []
            for rnd, side in common.interleave(sides, a.repeats):
                os.sync()  # dirty pages being flushed made steps erratic
                res = common.run_worker(worker_cmd(a, side, ckpt, batch), check=False, timeout=a.timeout)
                row = {"kind": "run", "time": stamp, "ckpt": str(ckpt), "ckpt_name": ckpt.name, "side": side,
                       "scheme": labels[side], "batch": batch,
                       "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "round": rnd,
                       "mem_gbps_before": probes[-1], "weight_bytes_per_token": wbpt[side],
                       "kv_bytes_per_seq_mid_decode": kv_step, **res}
                rows.append(row)
                common.append_jsonl(out, row)
                if row.get("ok"):
                    print(f"   round {rnd + 1}/{a.repeats} {side:9s}: prefill {row['prefill_s']:.3f} s, "
                          f"decode {fmt(row['decode_tok_s'])} tok/s/seq, peak RSS "
                          f"{row['peak_rss_bytes'] / 2**30:.2f} GiB, load {row['load_s']:.2f} s",
                          file=sys.stderr, flush=True)
                else:
                    print(f"   round {rnd + 1}/{a.repeats} {side:9s}: FAILED (exit {row['returncode']})\n"
                          + "\n".join("      " + ln for ln in row["stderr_tail"].splitlines()[-8:]),
                          file=sys.stderr, flush=True)
                if side == sides[-1]:
                    probes.append(a.mem_probe())
            mem = common.median(probes)
            table = summarize(rows, mem, wbpt, sides)
            table += tokens_note(rows, sides)
            note = (f"memory read {mem:.1f} GB/s (median of {len(probes)} probes: "
                    f"{', '.join(f'{p:.1f}' for p in probes)}); KV read per step at mid-decode "
                    f"{kv_step * batch / 1e6:.1f} MB (not in the bound)")
            reports.append(f"### {title}\n\n{table}\n{note}\n")
            summary = {"kind": "summary", "time": stamp, "ckpt": str(ckpt), "ckpt_name": ckpt.name,
                       "schemes": labels, "batch": batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                       "repeats": a.repeats, "sides": sides, "mem_gbps_probes": probes, "mem_gbps": mem,
                       "weight_bytes_per_token": wbpt, "dtype": a.dtype,
                       "bound_tok_s_per_seq": {sd: mem * 1e9 / wbpt[sd] for sd in wbpt}}
            for side in sides:
                ok = [r for r in rows if r["side"] == side and r.get("ok")]
                summary[side] = {k: common.median(r[k] for r in ok) for k in
                                 ("prefill_s", "decode_tok_s", "agg_tok_s", "peak_rss_bytes", "load_s")}
            if {"overspill", "hf"} <= set(sides):
                summary["ratio_decode_overspill_over_hf"] = common.median(
                    common.paired_ratios(rows, "decode_tok_s", "overspill", "hf"))
            common.append_jsonl(out, summary)
            print(reports[-1], flush=True)
    print(f"raw rows appended to {out}", file=sys.stderr)
    return out


def smoke(a: argparse.Namespace) -> None:
    """--smoke: a tiny random Llama, every side for one round, a few tokens; fails unless every run succeeded."""
    with common.Smoke(a.keep) as sm:
        if importlib.util.find_spec("transformers") is None:
            print("smoke: transformers is not installed: the hf side is skipped", file=sys.stderr)
            a.sides = ",".join(s for s in a.sides.split(",") if s.strip() != "hf")
        a.dtype = a.dtype or common.compute_dtype()
        a.ckpt = a.ckpt or [str(sm.checkpoint("llama-tiny", a.dtype))]
        a.out = a.out or str(sm.out("decode.jsonl"))
        a.mem_probe = lambda: common.mem_read_gbps(64 << 20, reps=1)
        out = driver(a)
        common.smoke_check(out, min_runs=len(a.sides.split(",")))


# --smoke changes these defaults (flags given explicitly still win)
SMOKE_DEFAULTS = dict(batches="1", prompt_len=8, new_tokens=4, warmup_tokens=2, repeats=1,
                      sides="hf,overspill", threads=1, timeout=300)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", help="checkpoint dirs (or names under bench-cache/)")
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes (default 1,8)")
    p.add_argument("--batch", type=int, default=1, help="worker: batch size")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup-tokens", type=int, default=4, help="new tokens in the warm-up generate")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--sides", default="overspill,hf",
                   help="comma list: hf, overspill (with --quantize), overspill:SCHEME or overspill:SCHEME+head")
    p.add_argument("--quantize", default=None, help="scheme passed to overspill.load(quantize=...)")
    p.add_argument("--quantize-head", action="store_true", help="overspill.load(quantize_head=True): the LM head too")
    p.add_argument("--seed", type=int, default=0, help="prompt token ids")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    p.add_argument("--dtype", default=None, help="weights and compute, both sides (default bfloat16)")
    p.add_argument("--out", default=None, help=f"JSONL file the raw rows are appended to (default {DEFAULT_OUT})")
    p.add_argument("--smoke", action="store_true", help="check the whole path in seconds: a tiny random checkpoint "
                   "made in a temp dir, one round, a few tokens (measures nothing)")
    p.add_argument("--keep", action="store_true", help="--smoke: keep the temp dir")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**SMOKE_DEFAULTS)
    a = p.parse_args(argv)
    if a.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed is measured after the first token)")
    if a.smoke:
        return smoke(a)
    if not a.ckpt:
        p.error("--ckpt is required (or --smoke)")
    a.dtype = a.dtype or "bfloat16"
    if a.worker:
        return worker(a)
    a.out = a.out or str(DEFAULT_OUT)
    a.mem_probe = common.mem_read_gbps
    driver(a)


if __name__ == "__main__":
    main()
