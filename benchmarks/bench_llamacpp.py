"""llama.cpp and overspill side by side on the same Llama-shaped checkpoint, interleaved in every round.

llama.cpp is an optional benchmark dependency, built from source (see benchmarks/README.md, "llama.cpp"):
its GGUF files come from benchmarks/llamacpp_gguf.py + llama-quantize. Per round, in order, for each pair:
    llama-bench -m GGUF -p 128 -n 64 -t 2 -r 1      (prompt 128 tokens; decode 64 tokens from an empty context)
    bench_decode.py --worker overspill ...           (prompt 128 tokens, then 64 decoded tokens, batch 1)
and the memory read bandwidth probe after each round. Prints medians, per-round ratios and the bound.

    .venv/bin/python benchmarks/bench_llamacpp.py --llama-bench $BUILD/bin/llama-bench --ckpt tinyllama \
        --pair bf16=$G/tiny-bf16.gguf --pair int8+head=$G/tiny-q8_0.gguf --pair int4+head=$G/tiny-q4_0.gguf
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import common  # noqa: E402
from bench_decode import quantized_bytes_per_token, resolve_ckpt, split_scheme


def llama_bench(exe: str, gguf: str, threads: int) -> dict:
    out = subprocess.run([exe, "-m", gguf, "-p", "128", "-n", "64", "-t", str(threads), "-r", "1", "-o", "json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=True).stdout
    rows = json.loads(out)
    pp = next(r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0)
    tg = next(r for r in rows if r.get("n_gen", 0) > 0)
    return {"prefill_tok_s": pp["avg_ts"], "decode_tok_s": tg["avg_ts"]}


def overspill_run(ckpt: Path, scheme: str, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).with_name("bench_decode.py")), "--worker", "overspill", "--ckpt", str(ckpt),
           "--batch", "1", "--prompt-len", "128", "--new-tokens", "64", "--threads", str(threads)]
    s, head = split_scheme(scheme)
    if s:
        cmd += ["--quantize", s] + (["--quantize-head"] if head else [])
    r = common.run_worker(cmd)
    return {"prefill_tok_s": 128 / r["prefill_s"], "decode_tok_s": r["decode_tok_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-bench", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--pair", action="append", required=True, help="SCHEME=GGUF: overspill scheme (bf16, int8, "
                   "int8+head, int4+head, ...) and the llama.cpp file it is compared with")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(common.CACHE_DIR / "results" / "llamacpp.jsonl"))
    a = p.parse_args()
    ckpt = resolve_ckpt(a.ckpt)
    pairs = [tuple(x.split("=", 1)) for x in a.pair]
    rows, probes = [], [common.mem_read_gbps()]
    for rnd in range(a.repeats):
        for scheme, gguf in pairs:
            for side in ("llama.cpp", "overspill"):
                r = llama_bench(a.llama_bench, gguf, a.threads) if side == "llama.cpp" else overspill_run(ckpt, scheme, a.threads)
                r.update(round=rnd, side=side, scheme=scheme, gguf=Path(gguf).name, ckpt=ckpt.name)
                rows.append(r)
                common.append_jsonl(Path(a.out), r)
                print(f"  round {rnd + 1} {side:9s} {scheme:10s} decode {r['decode_tok_s']:6.1f} tok/s, "
                      f"prompt {r['prefill_tok_s']:6.0f} tok/s", file=sys.stderr, flush=True)
        probes.append(common.mem_read_gbps())
    mem = common.median(probes)
    print("| overspill weights | llama.cpp file | overspill decode tok/s | llama.cpp decode tok/s | ratio (per round) | "
          "overspill bytes/token | bound tok/s | prompt tok/s (ours / llama.cpp) |\n|---|---|---|---|---|---|---|---|")
    for scheme, gguf in pairs:
        o = [r for r in rows if r["side"] == "overspill" and r["scheme"] == scheme]
        l = [r for r in rows if r["side"] == "llama.cpp" and r["scheme"] == scheme]
        ratios = [x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(o, l)]
        s, head = split_scheme(scheme)
        nb = quantized_bytes_per_token(ckpt, s, head) if s else common.weight_bytes_per_token(ckpt)
        print(f"| {scheme} | {Path(gguf).name} | {common.median(r['decode_tok_s'] for r in o):.1f} | "
              f"{common.median(r['decode_tok_s'] for r in l):.1f} | {common.median(ratios):.2f}x "
              f"({', '.join(f'{x:.2f}' for x in ratios)}) | {nb / 1e9:.3f} GB | {mem * 1e9 / nb:.1f} | "
              f"{common.median(r['prefill_tok_s'] for r in o):.0f} / {common.median(r['prefill_tok_s'] for r in l):.0f} |")
    print(f"\nmemory read {mem:.1f} GB/s (probes: {', '.join(f'{x:.1f}' for x in probes)}); llama.cpp decodes from an empty "
          f"context, overspill after the 128-token prompt")


if __name__ == "__main__":
    main()
