"""Flagship benchmark: GPT-NeoX-20B's shape (41.1 GB bf16) on one machine, every figure in one run.

    driver ─► per round (--repeats), sides interleaved in this order, each run a fresh worker process:
                convert      disk write probe (1 GiB, fsync'd) + disk read probe on the checkpoint, drop caches,
                             overspill.checkpoint.store.convert(ckpt, <ckpt>-int8-store, quantize="int8"), then int4
                store-int8   disk read probe on the store, drop caches, overspill.load(store) in a 22 GiB cgroup: cold
                store-int4   load, first token from the start of load, s/token at batch 1, then tok/s at --batch rows
                bf16         bench_offload.py's overspill-hf worker: overspill.load(ckpt, max_memory="cpu=16GiB"),
                accelerate   bench_offload.py's accelerate worker: device_map="auto", max_memory={"cpu": "16GiB"},
                             offload_folder; both in a fresh 18 GiB memory cgroup, page cache dropped before each
              memory bandwidth and matmul TFLOP/s probed once per round (overspill.placement.bandwidth)
           ─► tables (medians over rounds, bounds from this run's probes, paired ratios), rows appended to --out

Bounds (all from bandwidths measured in the same run):
    convert       write bound = store bytes / disk write GB/s; read bound = checkpoint bytes / disk read GB/s
    store load    the store's bytes / disk read GB/s (one cold read of every unit)
    decode b=1    weight bytes one token reads (every unit but the embedding; streamed units from the plan) /
                  memory GB/s, and the disk bound where a --store-memory budget streams units
    batch --batch compute bound tok/s = best dense matmul TFLOP/s (float32 or the checkpoint's dtype) x 1e12 /
                  (2 x non-embedding params, head included)
    bf16          one read of the checkpoint = checkpoint bytes / disk read GB/s; first-token target = 1.1x that;
                  s/token target: overspill / accelerate <= 0.9 (paired per round, median)

Examples (from the repository root; benchmarks/README.md section "Flagship" has the full-size run):
    .venv/bin/python benchmarks/make_checkpoint.py --preset neox-20b       # bench-cache/neox-20b-bfloat16, 41.1 GB
    .venv/bin/python benchmarks/bench_flagship.py                          # every side, one round
    .venv/bin/python benchmarks/bench_flagship.py --sides bf16,accelerate --tokens 4 --repeats 2
    # the same 18 GiB cgroup for both, overspill planning from it (cpu=auto), accelerate at cpu=16GiB of weights
    .venv/bin/python benchmarks/bench_flagship.py --sides bf16,accelerate --repeats 2 --bf16-budget auto
    .venv/bin/python benchmarks/bench_flagship.py --smoke                  # a tiny random GPT-NeoX, seconds
Workers (run by the driver; each prints one JSON line):
    .venv/bin/python benchmarks/bench_flagship.py --worker convert --path CKPT --dst STORE --scheme int4
    .venv/bin/python benchmarks/bench_flagship.py --worker store --path STORE --batch 32
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import common  # noqa: E402  (also puts the repository root on sys.path)
import bench_offload as offload  # noqa: E402  (its workers, per-run cgroup + drop-caches driver and helpers)

SIDES = ("convert", "store-int8", "store-int4", "bf16", "accelerate")
SCHEMES = ("int8", "int4")
OFFLOAD_SIDE = {"bf16": "overspill-hf", "accelerate": "accelerate"}   # bench_offload.py's names
DEFAULT_CKPT = common.CACHE_DIR / "neox-20b-bfloat16"
DEFAULT_OUT = common.CACHE_DIR / "results" / "flagship.jsonl"
fmt, med_of = offload.fmt, offload.med_of


# ---------------------------------------------------------------------------------------------
# workers


def convert_worker(a: argparse.Namespace) -> dict:
    """One conversion through overspill's public API: seconds, bytes in the store, this process's block-device reads
    and writes, peak RSS."""
    from overspill.checkpoint.store import convert

    io0 = offload.proc_io()
    t0 = time.perf_counter()
    convert(a.path, a.dst, dtype=a.store_dtype, quantize=a.scheme, progress=False)
    seconds = time.perf_counter() - t0
    io1 = offload.proc_io()
    return {"convert_s": seconds, "store_bytes": dir_bytes(Path(a.dst)),
            "io": {k: io1[k] - io0[k] for k in ("read_bytes", "write_bytes", "rchar", "wchar") if k in io0 and k in io1}}


def store_worker(a: argparse.Namespace) -> dict:
    """Cold load of a layer store, one greedy generate at batch 1 (first token timed from the start of load), then
    one at --batch rows on the same loaded model."""
    import overspill

    prompts1 = offload.make_prompts(a.vocab, 1, a.prompt_len, a.seed)
    prompts_b = offload.make_prompts(a.vocab, a.batch, a.batch_prompt_len, a.seed + 1)
    kw = {"max_memory": a.store_memory} if a.store_memory else {}
    io0 = offload.proc_io()
    t0 = time.perf_counter()
    model = overspill.load(a.path, dtype="auto", max_batch_size=a.batch,
                           max_seq_len=max(a.prompt_len + a.store_tokens, a.batch_prompt_len + a.batch_tokens), **kw)
    load_s = time.perf_counter() - t0
    io1 = offload.proc_io()

    r: dict = {"load_s": load_s, "io_load": offload.io_delta(io0, io1)}
    for tag, prompts, n in (("b1", prompts1, a.store_tokens), ("bn", prompts_b, a.batch_tokens)):
        g0 = time.perf_counter()
        outs = model.generate(prompts, max_new_tokens=n, temperature=0, ignore_eos=True)
        total_s = time.perf_counter() - g0
        assert [len(o) for o in outs] == [n] * len(prompts), [len(o) for o in outs]
        stats = dict(model.last_stats)
        e = list(stats.pop("step_ends"))[-n:]     # the end of each weight pass: the prompts', then one per token
        steps = [y - x for x, y in zip(e, e[1:])]
        r[tag] = {**offload.step_figures(e[0] - g0, steps, len(prompts), n, total_s),
                  "last_stats": stats, "tokens0": list(outs[0][:16]),
                  "peak_rss_bytes": common.peak_rss_bytes()}
        if tag == "b1":
            r["first_token_from_load_s"] = e[0] - t0
            r["io_b1"] = offload.io_delta(io1, offload.proc_io())
    plan = model.plan
    if plan is not None:
        r["plan"] = {"disk_bytes_per_token": plan.disk_bytes_per_token(),
                     "streamed_bytes_per_token": plan.streamed_bytes_per_token(),
                     "read_bytes_per_token": sum(p.stream_bytes for p in plan.placements if p.unit != "embed"),
                     "streamed_units": sum(p.tier == "stream" for p in plan.placements),
                     "units": len(plan.placements), "usage": plan.usage}
    return r


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    r = convert_worker(a) if a.worker == "convert" else store_worker(a)
    r["peak_rss_bytes"] = common.peak_rss_bytes()
    r["threads"] = torch.get_num_threads()
    r["torch"] = torch.__version__
    common.emit(r)


# ---------------------------------------------------------------------------------------------
# byte accounting (driver side, from file headers and manifests only)


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def store_path(a: argparse.Namespace, scheme: str) -> Path:
    return Path(a.store_dir) / f"{Path(a.ckpt).name}-{scheme}-store"


def store_read_bytes_per_token(store: Path) -> int:
    """Weight bytes one decode step reads from a layer store: every unit but the embedding (a step gathers one row
    of it), as stored (quantized blocks, the head in the store's dtype)."""
    from overspill.checkpoint.store import LayerStore

    s = LayerStore(str(store))
    return sum(s.unit_bytes(u) for u in s.units() if u != "embed")


def remove_store(path: Path) -> None:
    """Before a conversion: the old store and any half-written one (`<dst>.tmp-<pid>`), so a 20B store never exists
    twice on the disk. Only layer stores are removed."""
    from overspill.checkpoint.store import is_layer_store

    for p in [path, *path.parent.glob(path.name + ".tmp-*")]:
        if p.is_dir() and (is_layer_store(str(p)) or p.name.startswith(path.name + ".tmp-")):
            shutil.rmtree(p)
        elif p.exists():
            raise SystemExit(f"{p} exists and is not a layer store: refusing to remove it")


# ---------------------------------------------------------------------------------------------
# driver: one run per side


def cold_start(a: argparse.Namespace) -> None:
    if a.drop_caches:
        common.drop_caches()
    else:
        os.sync()


def worker_cmd(a: argparse.Namespace, kind: str, **extra) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--threads", str(a.threads),
           "--dtype", a.dtype, "--seed", str(a.seed)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def run_worker(a: argparse.Namespace, cmd: list[str], cgroup: Path | None = None) -> dict:
    """A convert or store worker: a fresh process (common.run_worker), or with --smoke the same command line run in
    this process (the driver has imported torch and overspill already; that saves a few seconds per worker, and a
    smoke run measures nothing)."""
    if not a.smoke:
        return common.run_worker(cmd, cgroup=cgroup, check=False, timeout=a.timeout)
    import contextlib
    import io
    import traceback

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            main(cmd[2:])
        res = json.loads(buf.getvalue().strip().splitlines()[-1])
    except Exception:   # noqa: BLE001  (a failed run is a row, as common.run_worker makes it)
        return {"ok": False, "returncode": None, "stderr_tail": traceback.format_exc()[-3000:]}
    return {**res, "ok": True, "in_process": True}


def run_convert(a: argparse.Namespace, scheme: str, rnd: int, ctx: dict) -> dict:
    dst = store_path(a, scheme)
    remove_store(dst)
    write_gbps = common.disk_write_gbps(dst.parent, nbytes=a.write_probe_bytes)
    read_gbps = common.disk_read_gbps(ctx["files"], max_bytes=a.read_probe_bytes, threads=8, direct=True)
    cold_start(a)
    res = run_worker(a, worker_cmd(a, "convert", path=a.ckpt, dst=dst, scheme=scheme, store_dtype=a.store_dtype))
    row = {**ctx["row"], "side": "convert", "scheme": scheme, "round": rnd, "store": str(dst),
           "disk_write_gbps_run": write_gbps, "disk_gbps_run": read_gbps, **res}
    if row.get("ok"):
        row["write_bound_s"] = row["store_bytes"] / (write_gbps * 1e9)
        row["read_bound_s"] = ctx["ckpt_bytes"] / (read_gbps * 1e9)
        row["ratio_to_write_bound"] = row["convert_s"] / row["write_bound_s"]
        row["ratio_to_io_bound"] = row["convert_s"] / (row["write_bound_s"] + row["read_bound_s"])
    return row


def run_store(a: argparse.Namespace, scheme: str, rnd: int, ctx: dict, probes: dict) -> dict:
    from overspill.checkpoint.store import is_layer_store
    from overspill.placement import parse_size

    store = store_path(a, scheme)
    side = f"store-{scheme}"
    base = {**ctx["row"], "side": side, "scheme": scheme, "round": rnd, "store": str(store), **probes}
    if not is_layer_store(str(store)):
        why = f"no layer store at {store}: put convert in --sides or run overspill convert --quantize {scheme}"
        print(f"   {side}: {why}", file=sys.stderr, flush=True)
        return {**base, "ok": False, "returncode": None, "stderr_tail": why}
    files = offload.store_files(store)
    disk = common.disk_read_gbps(files, max_bytes=a.read_probe_bytes, threads=8, direct=True)
    cold_start(a)
    cmd = worker_cmd(a, "store", path=store, batch=a.batch, prompt_len=a.prompt_len,
                     batch_prompt_len=a.batch_prompt_len, store_tokens=a.store_tokens, batch_tokens=a.batch_tokens,
                     vocab=ctx["vocab"])
    if a.store_memory:
        cmd += ["--store-memory", a.store_memory]
    cgroup = ctx["cgroups"] and not a.smoke
    if cgroup:   # so that a store too big for this machine's memory is an OOM kill of the worker alone
        with common.MemoryCgroup(f"bench-flagship-{os.getpid()}", parse_size(a.store_cgroup_limit)) as cg:
            res = run_worker(a, cmd, cgroup=cg.path)
    else:
        res = run_worker(a, cmd)
    row = {**base, "disk_gbps_run": disk, "cgroup_limit": parse_size(a.store_cgroup_limit) if cgroup else None, **res}
    cg = res.get("cgroup") or {}
    row["oom_kills"] = cg.get("oom_kill_during_run", cg.get("oom_kill"))
    if not row.get("ok"):
        return row
    store_bytes = sum(f.stat().st_size for f in files)
    rbpt = (row.get("plan") or {}).get("read_bytes_per_token") or store_read_bytes_per_token(store)
    disk_bpt = (row.get("plan") or {}).get("disk_bytes_per_token", 0)
    b1, bn = row["b1"], row["bn"]
    row.update(store_bytes=store_bytes, read_bytes_per_token=rbpt, load_bound_s=store_bytes / (disk * 1e9),
               mem_bound_s=rbpt / (probes["mem_gbps"] * 1e9), disk_bound_s=disk_bpt / (disk * 1e9),
               step_s_median=b1["step_s_median"], agg_tok_s=bn["agg_tok_s"],
               compute_bound_tok_s=probes["matmul_tflops"] * 1e12 / (2 * ctx["params"]))
    row["bound_s"] = max(row["mem_bound_s"], row["disk_bound_s"])
    row["ratio_to_bound"] = row["step_s_median"] / row["bound_s"] if row["step_s_median"] else None
    row["fraction_of_compute_bound"] = row["agg_tok_s"] / row["compute_bound_tok_s"] if row["agg_tok_s"] else None
    row["ratio_load_to_bound"] = row["load_s"] / row["load_bound_s"]
    return row


def run_offload_side(a: argparse.Namespace, side: str, rnd: int, ctx: dict, probes: dict) -> dict:
    """bench_offload.py's run as it is: disk probe on the checkpoint, drop caches, fresh memory cgroup (budget +
    overhead), its worker; then the flagship figures on top."""
    from overspill.placement import Bandwidths

    bw = Bandwidths(mem_gbps=probes["mem_gbps"], disk_gbps=ctx["disk_gbps_driver"],
                    matmul_tflops=probes["matmul_tflops"])
    row = offload.one_run(ctx["offload_args"], OFFLOAD_SIDE[side], 1, rnd, bw, ctx["offload_ctx"])
    row.update({k: v for k, v in ctx["row"].items() if k not in row}, **probes)
    row.update(side=side, offload_side=OFFLOAD_SIDE[side], budget=side_budget(a, side),
               ckpt_read_s=ctx["ckpt_bytes"] / (row["disk_gbps_run"] * 1e9))
    row["first_token_target_s"] = 1.1 * row["ckpt_read_s"]
    if row.get("ok"):
        row["first_token_from_load_s"] = row["load_s"] + row["first_token_s"]
    return row


def round_probes(a: argparse.Namespace, ctx: dict) -> dict:
    """Memory bandwidth and dense matmul speed, once per round: overspill's own probes."""
    import torch
    from overspill.placement.bandwidth import matmul_tflops

    t0 = time.perf_counter()
    dtypes = dict.fromkeys([torch.float32, getattr(torch, a.dtype)])
    shape = dict(m=64, n=256, k=256, reps=1) if a.smoke else {}
    tflops = {str(dt).replace("torch.", ""): matmul_tflops(dt, **shape) for dt in dtypes}
    best = max(tflops, key=tflops.get)
    mem = common.mem_read_gbps(64 << 20, reps=1) if a.smoke else common.mem_read_gbps(1 << 30, reps=5)
    return {"mem_gbps": mem, "matmul_tflops": tflops[best], "matmul_dtype": best, "matmul_tflops_by_dtype": tflops,
            "probe_s": time.perf_counter() - t0}


def report(row: dict) -> None:
    side, rnd = row["side"], row["round"] + 1
    label = f"   round {rnd} {side:10s}" + (f" {row['scheme']}" if side == "convert" else "")
    if not row.get("ok"):
        oom = (row.get("cgroup") or {}).get("oom_kill_during_run")
        print(f"{label}: FAILED (exit {row.get('returncode')}{f', OOMs {oom}' if oom is not None else ''})\n"
              + "\n".join("      " + ln for ln in str(row.get("stderr_tail", "")).splitlines()[-8:]),
              file=sys.stderr, flush=True)
        return
    if side == "convert":
        msg = (f"{row['convert_s']:.1f} s, {row['store_bytes'] / 1e9:.3g} GB written (write bound "
               f"{row['write_bound_s']:.3g} s @ {row['disk_write_gbps_run']:.2f} GB/s, read bound "
               f"{row['read_bound_s']:.3g} s @ {row['disk_gbps_run']:.2f} GB/s), peak RSS "
               f"{row['peak_rss_bytes'] / 2**30:.2f} GiB")
    elif side.startswith("store-"):
        msg = (f"load {row['load_s']:.2f} s (bound {row['load_bound_s']:.3g} s), first token "
               f"{row['first_token_from_load_s']:.2f} s from load, {fmt(row['step_s_median'])} s/token "
               f"(bound {fmt(row['bound_s'])}), batch {row['batch']}: {fmt(row['agg_tok_s'])} tok/s "
               f"(compute bound {fmt(row['compute_bound_tok_s'])}), peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB")
    else:
        cg = row.get("cgroup") or {}
        msg = (f"load {row['load_s']:.2f} s, first token {row['first_token_from_load_s']:.2f} s from load "
               f"(one read {row['ckpt_read_s']:.3g} s @ {row['disk_gbps_run']:.2f} GB/s), "
               f"{fmt(row['step_s_median'])} s/token, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB, cgroup max "
               f"{(cg.get('max_usage_bytes') or 0) / 2**30:.2f} GiB, OOMs {row.get('oom_kills')}")
    print(f"{label}: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# tables


def ok_runs(rows, side, scheme=None):
    all_ = [r for r in rows if r["side"] == side and (scheme is None or r.get("scheme") == scheme)]
    return all_, [r for r in all_ if r.get("ok")]


def gib(x):
    return x / 2**30 if x is not None else None


def gb(x):
    return x / 1e9 if x is not None else None


def convert_table(rows: list[dict], schemes: list[str]) -> str:
    lines = ["| store | ok runs | convert s | GB written | disk write GB/s | write bound s | convert / write bound | "
             "read bound s | convert / (read + write bound) | peak RSS GiB |", "|" + "---|" * 10]
    for s in schemes:
        all_, ok = ok_runs(rows, "convert", s)
        if all_:
            lines.append(f"| {s} | {len(ok)}/{len(all_)} | {fmt(med_of(ok, 'convert_s'))} | "
                         f"{fmt(gb(med_of(ok, 'store_bytes')))} | {fmt(med_of(ok, 'disk_write_gbps_run'))} | "
                         f"{fmt(med_of(ok, 'write_bound_s'))} | {fmt(med_of(ok, 'ratio_to_write_bound'), '.2f')} | "
                         f"{fmt(med_of(ok, 'read_bound_s'))} | {fmt(med_of(ok, 'ratio_to_io_bound'), '.2f')} | "
                         f"{fmt(gib(med_of(ok, 'peak_rss_bytes')), '.2f')} |")
    return "\n".join(lines)


def store_table(rows: list[dict], schemes: list[str], batch: int) -> str:
    lines = ["| store | ok runs | GB | load s (cold) | load bound s | first token s from load | s/token b=1 | "
             "GB read/token | bound s/token | s/token / bound | "
             f"tok/s b={batch} | compute bound tok/s | fraction of compute bound | peak RSS GiB | OOM |",
             "|" + "---|" * 15]
    for s in schemes:
        all_, ok = ok_runs(rows, f"store-{s}")
        if all_:
            lines.append(f"| {s} | {len(ok)}/{len(all_)} | {fmt(gb(med_of(ok, 'store_bytes')))} | "
                         f"{fmt(med_of(ok, 'load_s'))} | {fmt(med_of(ok, 'load_bound_s'))} | "
                         f"{fmt(med_of(ok, 'first_token_from_load_s'))} | {fmt(med_of(ok, 'step_s_median'))} | "
                         f"{fmt(gb(med_of(ok, 'read_bytes_per_token')))} | {fmt(med_of(ok, 'bound_s'))} | "
                         f"{fmt(med_of(ok, 'ratio_to_bound'), '.2f')} | {fmt(med_of(ok, 'agg_tok_s'))} | "
                         f"{fmt(med_of(ok, 'compute_bound_tok_s'))} | "
                         f"{fmt(med_of(ok, 'fraction_of_compute_bound'), '.2f')} | "
                         f"{fmt(gib(med_of(ok, 'peak_rss_bytes')), '.2f')} | "
                         f"{'yes' if sum(r.get('oom_kills') or 0 for r in all_) else 'no'} |")
    return "\n".join(lines)


def side_budget(a: argparse.Namespace, side: str) -> str:
    """The cpu budget a bf16-side run plans with: --bf16-budget for overspill where given, else --budget."""
    return a.bf16_budget if side == "bf16" and a.bf16_budget else a.budget


def bf16_table(rows: list[dict], sides: list[str], a: argparse.Namespace) -> str:
    lines = ["| side | budget | ok runs | load s | first token s from load | one read of checkpoint s | "
             "target 1.1x read s | s/token | peak RSS GiB | cgroup max GiB | OOM |", "|" + "---|" * 11]
    for side in sides:
        all_, ok = ok_runs(rows, side)
        if all_:
            cg_max = max(((r.get("cgroup") or {}).get("max_usage_bytes") or 0) for r in all_)
            ooms = sum(r.get("oom_kills") or 0 for r in all_)
            lines.append(f"| {side} | cpu={side_budget(a, side)} | {len(ok)}/{len(all_)} | {fmt(med_of(ok, 'load_s'))} | "
                         f"{fmt(med_of(ok, 'first_token_from_load_s'))} | {fmt(med_of(all_, 'ckpt_read_s'))} | "
                         f"{fmt(med_of(all_, 'first_token_target_s'))} | {fmt(med_of(ok, 'step_s_median'))} | "
                         f"{fmt(gib(med_of(ok, 'peak_rss_bytes')), '.2f')} | "
                         f"{fmt(gib(cg_max) if cg_max else None, '.2f')} | {'yes' if ooms else 'no'} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> tuple[list[str], dict]:
    """The two bf16 targets: overspill's first token within 1.1x one read of the checkpoint, and overspill /
    accelerate s/token <= 0.9 (median of same-round ratios)."""
    out, figs = [], {}
    _, ok = ok_runs(rows, "bf16")
    if ok:
        ratio = common.median([r["first_token_from_load_s"] / r["ckpt_read_s"] for r in ok])
        figs["bf16_first_token_over_read"] = ratio
        out.append(f"bf16 first token from start of load / one read of the checkpoint: {ratio:.2f} "
                   f"(target <= 1.1: {'met' if ratio <= 1.1 else 'NOT met'})")
    ratios = common.paired_ratios([r for r in rows if r["side"] in ("bf16", "accelerate")], "step_s_median",
                                  "bf16", "accelerate")
    if ratios:
        figs["overspill_over_accelerate_s_per_token"] = common.median(ratios)
        figs["overspill_over_accelerate_per_round"] = ratios
        m = common.median(ratios)
        out.append(f"overspill / accelerate s/token (same-round ratios, median): {m:.3f} "
                   f"({', '.join(f'{x:.2f}' for x in ratios)}; target <= 0.9: {'met' if m <= 0.9 else 'NOT met'})")
    seqs = {json.dumps(r["tokens0"][:8]) for r in rows if r["side"] in ("bf16", "accelerate") and r.get("ok")
            and r.get("tokens0") is not None}
    if len(seqs) > 0 and {"bf16", "accelerate"} <= {r["side"] for r in rows if r.get("ok")}:
        out.append("greedy tokens (first 8) identical across bf16 sides and rounds: "
                   + ("yes" if len(seqs) == 1 else f"no ({len(seqs)} variants; random weights: near-tied logits)"))
    return out, figs


# ---------------------------------------------------------------------------------------------
# driver


def driver(a: argparse.Namespace) -> Path:
    from overspill.placement import parse_size

    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        raise SystemExit(f"--sides takes a comma list of {', '.join(SIDES)}; got {a.sides!r}")
    ckpt = Path(a.ckpt).resolve()
    if not (ckpt / "config.json").exists():
        raise SystemExit(f"no checkpoint at {ckpt}: make it first (benchmarks/README.md, section Flagship): "
                         ".venv/bin/python benchmarks/make_checkpoint.py --preset neox-20b")
    a.ckpt = str(ckpt)
    a.store_dir = str(Path(a.store_dir).resolve()) if a.store_dir else str(ckpt.parent)
    offload.drop_unavailable_accelerate(sides, a.smoke)
    cgroup_sides = [s for s in sides if s in OFFLOAD_SIDE]
    no_cgroup = offload.cgroups_available() if cgroup_sides or any(s.startswith("store-") for s in sides) else None
    if no_cgroup and cgroup_sides and not a.smoke:
        raise SystemExit(f"cannot make a memory cgroup ({no_cgroup}): the bf16 and accelerate sides run in one "
                         "(cgroup v1 at /sys/fs/cgroup/memory, as root); leave them out of --sides otherwise")
    if no_cgroup:
        print(f"{'smoke: ' if a.smoke else ''}no memory cgroup ({no_cgroup}): the workers run without a memory limit",
              file=sys.stderr)
    if a.drop_caches and os.geteuid() != 0:
        if not a.smoke:
            raise SystemExit("dropping the page cache needs root (every run here starts cold); --no-drop-caches "
                             "runs anyway, but then nothing is a cold figure")
        a.drop_caches = False
    if not a.drop_caches:
        print(("smoke: " if a.smoke else "--no-drop-caches: ") + "page cache not dropped (runs may be served from "
              "it: not cold figures)", file=sys.stderr)
    store_schemes = [s for s in SCHEMES if f"store-{s}" in sides]
    convert_schemes = (store_schemes or list(SCHEMES)) if "convert" in sides else []
    order = ["convert"] * bool(convert_schemes) + [f"store-{s}" for s in store_schemes] + cgroup_sides

    files = common.safetensors_files(ckpt)
    ckpt_bytes = sum(f.stat().st_size for f in files)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    budget_bytes = parse_size(a.budget)
    limit = parse_size(a.cgroup_limit)
    vocab = common.read_config(ckpt)["vocab_size"]
    params = offload.param_count(ckpt)
    ctx = {"files": files, "ckpt_bytes": ckpt_bytes, "params": params, "vocab": vocab, "cgroups": not no_cgroup,
           "row": {"kind": "run", "time": stamp, "ckpt": a.ckpt, "batch": a.batch, "prompt_len": a.prompt_len,
                   "drop_caches": a.drop_caches, "smoke": a.smoke}}
    if cgroup_sides:   # bench_offload.py's per-run machinery, given its own arguments
        ctx["offload_args"] = argparse.Namespace(
            hf=a.ckpt, store=None, budget=a.budget, overspill_budget=a.bf16_budget, mode="latency", prompt_len=a.prompt_len, new_tokens=a.tokens,
            seed=a.seed, threads=a.threads, vocab=vocab, dtype=a.dtype, smoke=a.smoke, quantize=None, kv_cache=None,
            offload_dir=a.offload_dir, drop_caches=a.drop_caches, timeout=a.timeout)
        ctx["offload_ctx"] = {"stamp": stamp, "limit": limit, "budget_bytes": budget_bytes,
                              "sizes": common.tensor_bytes(ckpt), "wbpt": common.weight_bytes_per_token(ckpt),
                              "params": params, "cgroups": not no_cgroup}
        ctx["disk_gbps_driver"] = common.disk_read_gbps(files, max_bytes=a.read_probe_bytes, threads=8, direct=True)
    title = (f"{ckpt.name}  {params / 1e9:.3g} B non-embedding params  {ckpt_bytes / 1e9:.3g} GB  sides "
             f"{','.join(order)}  prompt {a.prompt_len}  tokens {a.tokens} (stores: {a.store_tokens} at batch 1, "
             f"{a.batch_tokens} at batch {a.batch} after a {a.batch_prompt_len}-token prompt)  "
             f"bf16 budget cpu={a.budget}{f' (overspill cpu={a.bf16_budget})' if a.bf16_budget else ''} in a "
             f"{limit / 2**30:.3g} GiB cgroup  repeats {a.repeats}  "
             f"drop caches {a.drop_caches}")
    print(f"== {title}", file=sys.stderr, flush=True)
    out = Path(a.out)
    rows: list[dict] = []
    probes_all = []
    for rnd in range(a.repeats):
        probes = round_probes(a, ctx)
        probes_all.append(probes)
        print(f"   round {rnd + 1}: memory {probes['mem_gbps']:.1f} GB/s, matmul {probes['matmul_tflops']:.3g} "
              f"TFLOP/s ({probes['matmul_dtype']})", file=sys.stderr, flush=True)
        for side in order:
            if side == "convert":
                new = [run_convert(a, s, rnd, ctx) for s in convert_schemes]
            elif side.startswith("store-"):
                new = [run_store(a, side.split("-", 1)[1], rnd, ctx, probes)]
            else:
                new = [run_offload_side(a, side, rnd, ctx, probes)]
            for row in new:
                rows.append(row)
                common.append_jsonl(out, row)
                report(row)

    parts = []
    if convert_schemes:
        parts.append("convert (overspill.checkpoint.store.convert, cold)\n\n" + convert_table(rows, convert_schemes))
    if store_schemes:
        parts.append("layer stores (cold load, all resident" + (f" under {a.store_memory}" if a.store_memory else "")
                     + ")\n\n" + store_table(rows, store_schemes, a.batch))
    lines, figs = verdicts(rows)
    if cgroup_sides:
        parts.append(f"bf16 from the Hugging Face directory: overspill (side bf16) against accelerate, each run in a "
                     f"{limit / 2**30:.3g} GiB memory cgroup\n\n"
                     + bf16_table(rows, cgroup_sides, a) + ("\n" + "\n".join(lines) if lines else ""))
    mems = ", ".join(f"{p['mem_gbps']:.1f}" for p in probes_all)
    flops = ", ".join(f"{p['matmul_tflops']:.3g}" for p in probes_all)
    note = (f"probes per round: memory {mems} GB/s; matmul {flops} TFLOP/s ({probes_all[0]['matmul_dtype']}); "
            f"disk read (O_DIRECT, 8 threads) per run {fmt(common.median(r.get('disk_gbps_run') for r in rows))} "
            f"GB/s median" + (f"; disk write (fsync'd) per conversion "
                              f"{fmt(common.median(r.get('disk_write_gbps_run') for r in rows))} GB/s median"
                              if convert_schemes else ""))
    print(f"### {title}\n\n" + "\n\n".join(parts) + f"\n\n{note}\n", flush=True)
    summary = {"kind": "summary", "time": stamp, "title": title, "sides": order, "probes": probes_all,
               "ckpt_bytes": ckpt_bytes, "params": params, **figs}
    keys = ("convert_s", "store_bytes", "write_bound_s", "read_bound_s", "load_s", "load_bound_s",
            "first_token_from_load_s", "step_s_median", "bound_s", "agg_tok_s", "compute_bound_tok_s",
            "ckpt_read_s", "first_token_target_s", "peak_rss_bytes")
    for r in rows:
        name = r["side"] + (f"-{r['scheme']}" if r["side"] == "convert" else "")
        if name not in summary:
            _, ok = ok_runs(rows, r["side"], r["scheme"] if r["side"] == "convert" else None)
            summary[name] = {k: med_of(ok, k) for k in keys if med_of(ok, k) is not None}
            summary[name]["ok_runs"] = len(ok)
    common.append_jsonl(out, summary)
    print(f"raw rows appended to {out}", file=sys.stderr)
    return out


def smoke(a: argparse.Namespace) -> None:
    """--smoke: a tiny random GPT-NeoX made in a temp dir, its int8 and int4 stores, every side once, a budget below
    the model's size for the bf16 side (so it streams), page cache not dropped. Fails unless every run succeeded."""
    with common.Smoke(a.keep) as sm:
        a.dtype = a.dtype or common.compute_dtype()
        a.store_dtype = a.store_dtype or a.dtype
        if not a.ckpt:
            a.ckpt = str(sm.checkpoint("neox-tiny", a.dtype))
        a.store_dir = a.store_dir or str(sm.dir / "stores")
        if a.budget is None:   # below the model's bytes in a.dtype, so units stream, above the planner's minimum
            elems = sum(math.prod(t["shape"]) for f in common.safetensors_files(a.ckpt)
                        for t in common.safetensors_header(f).values())
            a.budget = f"{int(0.9 * elems * (4 if a.dtype == 'float32' else 2)) >> 10}KiB"
        if a.cgroup_limit is None:
            from overspill.placement import parse_size
            a.cgroup_limit = f"{(parse_size(a.budget) >> 10) + (1 << 20)}KiB"   # budget + 1 GiB
        a.out = a.out or str(sm.out("flagship.jsonl"))
        out = driver(a)
        common.smoke_check(out, min_runs=1)


# --smoke changes these defaults (flags given explicitly still win)
SMOKE_DEFAULTS = dict(ckpt=None, budget=None, cgroup_limit=None, prompt_len=8, tokens=4, store_tokens=4, batch=8,
                      batch_tokens=3, store_cgroup_limit="2GiB", repeats=1, drop_caches=False, threads=1, timeout=300,
                      read_probe_bytes=64 << 20, write_probe_bytes=16 << 20)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="Hugging Face checkpoint dir (default %(default)s)")
    p.add_argument("--sides", default=",".join(SIDES), help="comma list of %(default)s; run in that order each round "
                   "(convert converts to the schemes of the store sides chosen, both when none is)")
    p.add_argument("--repeats", type=int, default=1, help="rounds; every side runs once per round")
    p.add_argument("--tokens", type=int, default=4, help="new tokens per generate on the bf16 and accelerate sides: "
                   "s/token is the median of the tokens - 1 intervals after the first")
    p.add_argument("--store-tokens", type=int, default=8, help="new tokens of the store sides' batch-1 generate")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt of the batch-1 runs (every side)")
    p.add_argument("--batch", type=int, default=32, help="rows of the stores' throughput run")
    p.add_argument("--batch-tokens", type=int, default=4, help="new tokens of the throughput run: aggregate tok/s = "
                   "batch / median of its batch-tokens - 1 decode steps")
    p.add_argument("--batch-prompt-len", type=int, default=1, help="prompt of the throughput run: its figure is the "
                   "decode steps, and a longer prompt only adds prefill (batch x prompt tokens of compute)")
    p.add_argument("--budget", default="16GiB", help="bf16 and accelerate: overspill max_memory 'cpu=B', accelerate "
                   "max_memory={'cpu': B}")
    p.add_argument("--bf16-budget", default=None, help="the bf16 side's (overspill's) budget when not --budget: "
                   "'auto' plans from the cgroup's limit, as its budget counts everything it holds and accelerate's "
                   "counts weights only")
    p.add_argument("--cgroup-limit", default="18GiB", help="memory cgroup of each bf16 / accelerate run")
    p.add_argument("--store-memory", default=None, help="max_memory of the store sides, e.g. cpu=18GiB (default: none, "
                   "the store is loaded whole)")
    p.add_argument("--store-cgroup-limit", default="22GiB", help="memory cgroup of each store run where cgroups "
                   "can be made (an OOM kills the worker alone, and is reported)")
    p.add_argument("--store-dir", default=None, help="where the int8 / int4 stores go (default: beside the "
                   "checkpoint, as <ckpt name>-<scheme>-store)")
    p.add_argument("--offload-dir", default=None, help="where accelerate's temporary offload_folder goes (default: "
                   "the system temp dir)")
    p.add_argument("--dtype", default=None, help="weights and compute of the bf16 and accelerate sides (default "
                   "bfloat16)")
    p.add_argument("--store-dtype", default=None, help="dtype of the stores' unquantized tensors (embedding, head, "
                   "norms) and so of their compute (default: --dtype); float32 on CPUs without a bf16 matmul")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                   help="do not drop the page cache before runs (not cold: plumbing checks only)")
    p.add_argument("--read-probe-bytes", type=int, default=2 << 30, help="disk read probe per run (O_DIRECT)")
    p.add_argument("--write-probe-bytes", type=int, default=1 << 30, help="disk write probe per conversion")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--timeout", type=float, default=7200, help="seconds per worker")
    p.add_argument("--out", default=None, help=f"JSONL file the raw rows are appended to (default {DEFAULT_OUT})")
    p.add_argument("--smoke", action="store_true", help="check the whole path in seconds: a tiny random GPT-NeoX and "
                   "its stores made in a temp dir, page cache not dropped, quick probes (measures nothing)")
    p.add_argument("--keep", action="store_true", help="--smoke: keep the temp dir")
    p.add_argument("--worker", choices=("convert", "store"), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--dst", help=argparse.SUPPRESS)
    p.add_argument("--scheme", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**SMOKE_DEFAULTS)
    a = p.parse_args(argv)
    if min(a.tokens, a.store_tokens, a.batch_tokens) < 2:
        p.error("--tokens, --store-tokens and --batch-tokens must be at least 2 (steps are timed after the first token)")
    if a.worker:
        return worker(a)
    if a.smoke:
        return smoke(a)
    a.dtype = a.dtype or "bfloat16"
    a.store_dtype = a.store_dtype or a.dtype
    a.out = a.out or str(DEFAULT_OUT)
    driver(a)


if __name__ == "__main__":
    main()
