"""llama.cpp and overspill side by side on the same Llama-shaped checkpoint, interleaved in every round.

llama.cpp is an optional benchmark dependency, built from source (see benchmarks/README.md, "llama.cpp"):
its GGUF files come from benchmarks/llamacpp_gguf.py + llama-quantize. Per round, in order, for each pair:
    llama-bench -m GGUF -p 128 -n 64 -t 2 -r 1      (prompt 128 tokens; decode 64 tokens from an empty context)
    bench_decode.py --worker overspill ...           (prompt 128 tokens, then 64 decoded tokens, batch 1)
and the memory read bandwidth probe after each round. Prints medians, per-round ratios and the bound.

    .venv/bin/python benchmarks/bench_llamacpp.py --llama-bench $BUILD/bin/llama-bench --ckpt tinyllama \
        --pair bf16=$G/tiny-bf16.gguf --pair int8+head=$G/tiny-q8_0.gguf --pair int4+head=$G/tiny-q4_0.gguf
    # smoke: a tiny random Llama, a few tokens; the llama.cpp side only where llama-bench and gguf are there
    .venv/bin/python benchmarks/bench_llamacpp.py --smoke [--llama-bench $BUILD/bin/llama-bench]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import common  # noqa: E402
from bench_decode import quantized_bytes_per_token, resolve_ckpt, split_scheme

DEFAULT_OUT = common.CACHE_DIR / "results" / "llamacpp.jsonl"


def llama_bench(exe: str, gguf: str, threads: int, prompt_len: int, new_tokens: int) -> dict:
    out = subprocess.run([exe, "-m", gguf, "-p", str(prompt_len), "-n", str(new_tokens), "-t", str(threads),
                          "-r", "1", "-o", "json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=True).stdout
    rows = json.loads(out)
    pp = next(r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0)
    tg = next(r for r in rows if r.get("n_gen", 0) > 0)
    return {"prefill_tok_s": pp["avg_ts"], "decode_tok_s": tg["avg_ts"]}


def overspill_run(ckpt: Path, scheme: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).with_name("bench_decode.py")), "--worker", "overspill", "--ckpt", str(ckpt),
           "--batch", "1", "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens),
           "--threads", str(a.threads), "--dtype", a.dtype]
    s, head = split_scheme(scheme)
    if s:
        cmd += ["--quantize", s] + (["--quantize-head"] if head else [])
    r = common.run_worker(cmd, timeout=a.timeout)
    return {"prefill_tok_s": a.prompt_len / r["prefill_s"], "decode_tok_s": r["decode_tok_s"]}


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def run(a: argparse.Namespace, ckpt: Path, pairs: list[tuple[str, str | None]], mem_probe) -> Path:
    """Interleaved rounds; a pair without a GGUF runs the overspill side only. Returns the results file."""
    out = Path(a.out)
    rows, probes = [], [mem_probe()]
    for rnd in range(a.repeats):
        for scheme, gguf in pairs:
            for side in ("llama.cpp", "overspill"):
                if side == "llama.cpp" and gguf is None:
                    continue
                r = (llama_bench(a.llama_bench, gguf, a.threads, a.prompt_len, a.new_tokens) if side == "llama.cpp"
                     else overspill_run(ckpt, scheme, a))
                r.update(kind="run", round=rnd, side=side, scheme=scheme, gguf=Path(gguf).name if gguf else None,
                         ckpt=ckpt.name)
                rows.append(r)
                common.append_jsonl(out, r)
                print(f"  round {rnd + 1} {side:9s} {scheme:10s} decode {r['decode_tok_s']:6.1f} tok/s, "
                      f"prompt {r['prefill_tok_s']:6.0f} tok/s", file=sys.stderr, flush=True)
        probes.append(mem_probe())
    mem = common.median(probes)
    print("| overspill weights | llama.cpp file | overspill decode tok/s | llama.cpp decode tok/s | ratio (per round) | "
          "overspill bytes/token | bound tok/s | prompt tok/s (ours / llama.cpp) |\n|---|---|---|---|---|---|---|---|")
    for scheme, gguf in pairs:
        o = [r for r in rows if r["side"] == "overspill" and r["scheme"] == scheme]
        l = [r for r in rows if r["side"] == "llama.cpp" and r["scheme"] == scheme]
        ratios = [x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(o, l)]
        s, head = split_scheme(scheme)
        nb = quantized_bytes_per_token(ckpt, s, head, a.dtype) if s else common.weight_bytes_per_token(ckpt)
        per_round = f" ({', '.join(f'{x:.2f}' for x in ratios)})" if ratios else ""
        print(f"| {scheme} | {Path(gguf).name if gguf else '-'} | {fmt(common.median(r['decode_tok_s'] for r in o))} | "
              f"{fmt(common.median(r['decode_tok_s'] for r in l))} | {fmt(common.median(ratios), '.2f') + 'x' if ratios else '-'}{per_round} | "
              f"{nb / 1e9:.3f} GB | {mem * 1e9 / nb:.1f} | "
              f"{fmt(common.median(r['prefill_tok_s'] for r in o), '.0f')} / "
              f"{fmt(common.median(r['prefill_tok_s'] for r in l), '.0f')} |")
    print(f"\nmemory read {mem:.1f} GB/s (probes: {', '.join(f'{x:.1f}' for x in probes)}); llama.cpp decodes from an empty "
          f"context, overspill after the {a.prompt_len}-token prompt", flush=True)
    return out


def smoke(a: argparse.Namespace) -> None:
    """--smoke: a tiny random Llama for both sides. The llama.cpp side runs only where llama-bench (--llama-bench or
    on PATH) and the gguf package are there; otherwise it is skipped with one line."""
    with common.Smoke(a.keep) as sm:
        a.dtype = a.dtype or common.compute_dtype()
        ckpt = sm.checkpoint("llama-tiny", a.dtype)
        a.out = a.out or str(sm.out("llamacpp.jsonl"))
        a.llama_bench = a.llama_bench or shutil.which("llama-bench")
        # overspill's side of a quantized pair; a bf16 pair only where the llama.cpp side runs
        schemes = [x.split("=", 1)[0] for x in a.pair] if a.pair else ["int8+head"]
        pairs: list[tuple[str, str | None]] = [(s, None) for s in schemes]
        if not a.llama_bench:
            print("smoke: llama.cpp side skipped: no llama-bench (--llama-bench, or build it as benchmarks/README.md "
                  "says)", file=sys.stderr, flush=True)
        elif importlib.util.find_spec("gguf") is None:
            print("smoke: llama.cpp side skipped: the gguf package is not importable (PYTHONPATH=<llama.cpp>/gguf-py)",
                  file=sys.stderr, flush=True)
        else:   # only the BF16 file: llama-quantize is not needed for a smoke run
            import llamacpp_gguf
            gguf = sm.dir / "tiny-bf16.gguf"
            llamacpp_gguf.convert(ckpt, gguf)
            pairs = [("bf16", str(gguf))] + [(s, None) for s in schemes if s != "bf16"]
        out = run(a, ckpt, pairs, lambda: common.mem_read_gbps(64 << 20, reps=1))
        common.smoke_check(out, min_runs=len(pairs))


SMOKE_DEFAULTS = dict(repeats=1, prompt_len=8, new_tokens=4, threads=1, timeout=300)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-bench", help="the llama-bench executable")
    p.add_argument("--ckpt", help="the checkpoint the GGUF files were written from (a dir or a name under bench-cache/)")
    p.add_argument("--pair", action="append", help="SCHEME=GGUF: overspill scheme (bf16, int8, "
                   "int8+head, int4+head, ...) and the llama.cpp file it is compared with")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default=None, help="overspill's compute dtype for unquantized weights (default bfloat16)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per overspill worker")
    p.add_argument("--out", default=None, help=f"JSONL file the raw rows are appended to (default {DEFAULT_OUT})")
    p.add_argument("--smoke", action="store_true", help="check the whole path in seconds on a tiny random checkpoint "
                   "(measures nothing)")
    p.add_argument("--keep", action="store_true", help="--smoke: keep the temp dir")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**SMOKE_DEFAULTS)
    a = p.parse_args(argv)
    if a.smoke:
        return smoke(a)
    if not (a.llama_bench and a.ckpt and a.pair):
        p.error("--llama-bench, --ckpt and at least one --pair are required (or --smoke)")
    a.dtype = a.dtype or "bfloat16"
    a.out = a.out or str(DEFAULT_OUT)
    if any("=" not in x for x in a.pair):
        p.error("--pair takes SCHEME=GGUF, e.g. --pair int8+head=tiny-q8_0.gguf")
    pairs = [tuple(x.split("=", 1)) for x in a.pair]
    run(a, resolve_ckpt(a.ckpt), pairs, common.mem_read_gbps)


if __name__ == "__main__":
    main()
