"""Held-out perplexity of the built-in model for every weight format (the README's quality table).

    .venv/bin/python benchmarks/quality.py [--chars 200000] [--context 256 --stride 128]
    .venv/bin/python benchmarks/quality.py --smoke     # every row on 400 characters (seconds; measures nothing)

The built-in model was trained on 256-token windows, so context 256 is its natural window.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

import common  # noqa: E402  (also puts the repository root on sys.path)

import overspill
from overspill.evaluate import perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", default=None, help="default: the built-in model's held-out plays")
    ap.add_argument("--chars", type=int, default=200_000)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="every row on 400 characters, context 32 (measures nothing)")
    a = ap.parse_args()
    if a.smoke:
        a.chars, a.context, a.stride = 400, 32, 32
    torch.set_num_threads(1 if a.smoke else 2)
    path = a.model or overspill.default_model_path()
    text = open(a.text or f"{path}/heldout.txt", encoding="utf-8").read()[: a.chars]
    rows = []
    base = None
    variants = [("float32", None, False, None), ("bfloat16", None, False, None),
                ("float32", "int8", False, None), ("float32", "int8", True, None),
                ("float32", "int8-dynamic", False, None), ("float32", "int4", False, None),
                ("float32", "int4", True, None), ("float32", "nf4", False, None),
                ("float32", None, False, "int8"), ("bfloat16", None, False, "int8")]
    if common.compute_dtype("the bfloat16 rows are left out") != "bfloat16":
        variants = [v for v in variants if v[0] != "bfloat16"]
    for dtype, scheme, head, kv in variants:
        m = overspill.load(path, dtype=dtype, quantize=scheme, quantize_head=head, kv_cache=kv)
        r = perplexity(m, m.encode(text), a.context, a.stride)
        base = base or r["perplexity"]
        lin = [w for w in m.executor.source.weights[1:-1]]
        from overspill.runtime.accounting import weights_nbytes
        rows.append(dict(dtype=dtype, scheme=(scheme or "-") + (" + head" if head else "") + (f", KV {kv}" if kv else ""),
                         ppl=r["perplexity"], nll=r["nll"], tokens=r["tokens"],
                         vs_fp32=r["perplexity"] / base - 1, block_bytes=sum(weights_nbytes(w) for w in lin),
                         head_bytes=weights_nbytes(m.executor.source.weights[-1]),
                         tokens_per_s=r["tokens_per_s"]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| weights | block bytes | head bytes | perplexity | vs float32 |\n|---|---|---|---|---|")
    for r in rows:
        name = r["dtype"] + r["scheme"][1:] if r["scheme"].startswith("-") else r["scheme"]   # "-, KV int8" -> dtype
        print(f"| {name} | {r['block_bytes'] / 2**20:.2f} MiB | {r['head_bytes'] / 2**20:.2f} MiB | {r['ppl']:.3f} | "
              f"{100 * r['vs_fp32']:+.2f}% |")
    if a.smoke and not all(math.isfinite(r["ppl"]) for r in rows):
        raise SystemExit("smoke: FAILED: a perplexity is not finite")
    print(f"\n{rows[0]['tokens']} held-out tokens, context {a.context}, stride {a.stride}; quantized rows run the float32 model, "
          "their int8/int4 linears on the integer kernels (activations rounded to int8 per block) where those build")


if __name__ == "__main__":
    main()
