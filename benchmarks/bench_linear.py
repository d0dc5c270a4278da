"""Quantized linear throughput: GB/s of stored weight bytes, speed-up vs bf16 F.linear and vs PackedLinear.

Method: every method rotates through a pool of distinct weight copies
>= POOL_BYTES (default 300 MB) so nothing is served from the 32 MiB L3; methods interleaved in a shuffled
order per repeat; value = median over repeats of the per-repeat median call time. Machine is shared: compare
only within one (shape, batch) block.

    .venv/bin/python benchmarks/bench_linear.py                 # all shapes, batch 1 and 8
    .venv/bin/python benchmarks/bench_linear.py 2048x5632 --batches 1,8,64
    .venv/bin/python benchmarks/bench_linear.py --int4-sweep   # int4pack vs dequant+matmul by batch size
    .venv/bin/python benchmarks/bench_linear.py --smoke        # every method once on a small shape (seconds)
"""
import argparse
import math
import os
import random
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402
from overspill.model.linear import BlockedLinear, PackedLinear, blocked_available  # noqa: E402
import overspill.quant as Q  # noqa: E402

warnings.filterwarnings("ignore")
POOL_BYTES = int(float(os.environ.get("POOL_BYTES", 300e6)))
SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632), (16384, 4096)]


def n_copies(nbytes, minimum=2):
    return max(minimum, math.ceil(POOL_BYTES / nbytes))


def time_calls(fn, npool, warm, calls):
    for i in range(warm):
        fn(i % npool)
    ts = []
    for i in range(calls):
        t0 = time.perf_counter_ns()
        fn(i % npool)
        ts.append(time.perf_counter_ns() - t0)
    return statistics.median(ts) / 1e9


def bench(methods, repeats, warm, calls, seed=0):
    rng = random.Random(seed)
    per = {k: [] for k in methods}
    names = list(methods)
    for _ in range(repeats):
        rng.shuffle(names)
        for k in names:
            fn, npool, _, slow = methods[k]
            per[k].append(time_calls(fn, npool, min(warm, 2) if slow else warm, max(5, calls // 5) if slow else calls))
    return {k: (statistics.median(v), min(v), max(v)) for k, v in per.items()}


def build(N, K, M, xdtype):
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    wb = w.to(torch.bfloat16)
    x = torch.randn(M, K).to(xdtype)
    m = {}
    nb = N * K * 2
    n = n_copies(nb)
    Wd = [wb.clone() for _ in range(n)]
    m["bf16 F.linear"] = (lambda i: F.linear(x.to(torch.bfloat16), Wd[i]), n, nb, False)
    if common.bf16_matmul_ok():
        Wp = [PackedLinear(wb.clone()) for _ in range(n)]
        m["PackedLinear bf16"] = (lambda i: Wp[i](x.to(torch.bfloat16)), n, nb, False)
    if blocked_available(wb):
        Wk = [BlockedLinear(wb.clone()) for _ in range(n)]
        m["BlockedLinear bf16 (panel kernel)"] = (lambda i: Wk[i](x.to(torch.bfloat16)), n, nb, False)
    for scheme in Q.SCHEMES:
        t = Q.quantize(w, scheme)
        b = Q.quantized_nbytes(scheme, N, K)
        k = n_copies(b)
        lins = [Q.make_linear(scheme, {kk: v.clone() for kk, v in t.items()}) for _ in range(k)]
        slow = scheme in ("int8-dynamic", "nf4")
        m[f"{scheme}"] = (lambda i, lins=lins: lins[i](x), k, b, slow)
        if scheme in ("int8", "int4"):   # torch's own kernel on the stored layout, for comparison
            lt = [Q.make_linear(scheme, {kk: v.clone() for kk, v in t.items()}, repack=False) for _ in range(k)]
            m[f"{scheme} torch kernel (repack=False)"] = (lambda i, lt=lt: lt[i](x), k, b, False)
        if scheme == "int8" and M > 1:
            lw = [Q.make_linear(scheme, {kk: v.clone() for kk, v in t.items()}, act_quant="never", repack=False) for _ in range(k)]
            m["int8 act_quant=never (int8pack)"] = (lambda i, lw=lw: lw[i](x), k, b, False)
        if scheme == "int8" and M == 1:
            la = [Q.make_linear(scheme, {kk: v.clone() for kk, v in t.items()}, act_quant="always") for _ in range(k)]
            m["int8 act_quant=always (oneDNN w8a8)"] = (lambda i, la=la: la[i](x), k, b, False)
    return m


def report(N, K, M, xdtype, res, methods):
    base = res["bf16 F.linear"][0]
    pk = res["PackedLinear bf16"][0] if "PackedLinear bf16" in res else None
    print(f"== W[{N}x{K}] batch {M} x {str(xdtype).replace('torch.', '')}")
    for k, (med, lo, hi) in sorted(res.items(), key=lambda kv: kv[1][0]):
        b = methods[k][2]
        print(f"  {k:36s} {b / med / 1e9:6.1f} GB/s [{b / hi / 1e9:5.1f}-{b / lo / 1e9:5.1f}]  {med * 1e3:8.3f} ms"
              f"  x{base / med:5.2f} vs bf16 F.linear" + (f"  x{pk / med:5.2f} vs PackedLinear" if pk else ""))
    sys.stdout.flush()


def int4_sweep(N=5632, K=2048):
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    t = Q.quantize(w, "int4")
    b = Q.quantized_nbytes("int4", N, K)
    k = n_copies(b)
    lins = [Q.make_linear("int4", {kk: v.clone() for kk, v in t.items()}, repack=False) for _ in range(k)]
    wb = w.to(torch.bfloat16)
    Wp = [PackedLinear(wb.clone()) for _ in range(n_copies(N * K * 2))] if common.bf16_matmul_ok() else []
    for M in (4, 8, 16, 32, 64, 128, 256):
        x = torch.randn(M, K, dtype=torch.bfloat16)
        f = torch._weight_int4pack_mm_for_cpu
        meth = {
            "int4pack one call": (lambda i: f(x, lins[i].qweight, lins[i].group_size, lins[i].scales_zeros), k, b, False),
            "int4pack chunks of 4": (lambda i: torch.cat([f(c, lins[i].qweight, lins[i].group_size, lins[i].scales_zeros) for c in x.split(4)]), k, b, False),
            "dequant bf16 + matmul": (lambda i: x @ lins[i]._dequant_bf16_t(), k, b, False),
        }
        if Wp:
            meth["PackedLinear bf16 (ref)"] = (lambda i: Wp[i % len(Wp)](x), len(Wp), N * K * 2, False)
        res = bench(meth, repeats=3, warm=2, calls=10)
        print(f"== int4 W[{N}x{K}] M={M}: " + "  ".join(f"{kk} {v[0] * 1e3:.2f} ms" for kk, v in res.items()))
        sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", nargs="*", help="NxK (out x in)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--x-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int4-sweep", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="every method once on one small shape, batch 1 and 2, a "
                    "small weight pool (seconds; measures nothing)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not common.bf16_matmul_ok():
        print("oneDNN's bf16 path needs AVX-512 or AVX-NE-CONVERT on this CPU: PackedLinear left out", flush=True)
    if a.smoke:
        global POOL_BYTES
        POOL_BYTES = 1 << 20
        a.shapes, a.batches, a.repeats, a.calls = a.shapes or ["128x256"], "1,2", 1, 3
        torch.set_num_threads(1)
    if a.int4_sweep:
        return int4_sweep()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes] or SHAPES
    xdtype = getattr(torch, a.x_dtype)
    for N, K in shapes:
        for M in (int(v) for v in a.batches.split(",")):
            methods = build(N, K, M, xdtype)
            res = bench(methods, a.repeats, warm=3, calls=a.calls)
            report(N, K, M, xdtype, res, methods)
            del methods
            Q.release_scratch()


if __name__ == "__main__":
    main()
