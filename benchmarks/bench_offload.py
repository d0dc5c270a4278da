"""Offload benchmark: a model bigger than the memory budget, overspill against accelerate, each run
inside a memory cgroup, page cache dropped first, sides interleaved and repeated.

    driver ─► bandwidths (overspill's cached probe; matmul TFLOP/s for throughput mode)
           ─► per run, sides interleaved (A, B, C, A, B, C, ... --repeats rounds):
                disk probe on that side's files (O_DIRECT, 8 threads, 2 GiB)  -> bound for this run
                drop_caches()                                                 -> the run starts cold
                fresh cgroup, limit = budget + overhead; fresh worker inside it:
                    load, one greedy generate of --new-tokens at --batch rows, per-token stamps,
                    /proc/self/io read_bytes before/after, VmHWM, plan prediction (overspill: from its
                    own probes taken fresh in the worker, as `overspill plan` does)
                cgroup max usage / failcnt / OOM kills read by the driver
           ─► table per mode, raw rows appended to --out

Sides: overspill-hf (overspill.load on the HF dir), overspill-store (on a layer store made by
`overspill convert`), accelerate (transformers + accelerate `device_map="auto"` with
max_memory={"cpu": budget}, the rest "disk").

Examples (from the repository root; see benchmarks/README.md section "Offload"):
    .venv/bin/python benchmarks/bench_offload.py --hf bench-cache/gptj-6b-bfloat16 \
        --store bench-cache/gptj-6b-store --budget 4GiB
    .venv/bin/python benchmarks/bench_offload.py --hf bench-cache/gptj-6b-bfloat16 \
        --store bench-cache/gptj-6b-store --budget 4GiB --mode throughput --batches 1,8,32
    # the same 6 GiB cgroup for both, overspill planning from it (cpu=auto), accelerate at cpu=4GiB of weights
    .venv/bin/python benchmarks/bench_offload.py --hf bench-cache/gptj-6b-bfloat16 --budget 4GiB \
        --overspill-budget auto --sides overspill-hf,accelerate
    # smoke: a tiny random Llama and its layer store, streamed under a budget below its size, every side once
    .venv/bin/python benchmarks/bench_offload.py --smoke
Worker (run by the driver; prints one JSON line):
    .venv/bin/python benchmarks/bench_offload.py --worker accelerate --path DIR --budget 4GiB
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: E402  (also puts the repository root on sys.path)
from common import fmt, med_of  # noqa: E402

SIDES = ("overspill-hf", "overspill-store", "accelerate")
DEFAULT_OUT = common.CACHE_DIR / "results" / "offload.jsonl"
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1}


# ---------------------------------------------------------------------------------------------
# worker


def drop_unavailable_accelerate(sides: list[str], smoke: bool) -> None:
    """Without transformers + accelerate: a full run refuses in one line; a smoke run drops that side, saying so."""
    if "accelerate" in sides and (importlib.util.find_spec("accelerate") is None
                                  or importlib.util.find_spec("transformers") is None):
        if not smoke:
            raise SystemExit("the accelerate side needs transformers and accelerate: .venv/bin/pip install -e "
                             "'.[bench]', or leave accelerate out of --sides")
        print("smoke: accelerate side skipped: transformers or accelerate is not installed", file=sys.stderr)
        sides.remove("accelerate")


def proc_io() -> dict:
    """This process's /proc/self/io (all threads): read_bytes = bytes fetched from the block
    device on its behalf (page-cache misses incl. readahead and mmap faults, O_DIRECT reads)."""
    out = {}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                k, v = line.split(":")
                out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def io_delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in ("read_bytes", "rchar") if k in a and k in b}


def make_prompts(vocab_size: int, batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=gen).tolist()


def step_figures(first_token_s: float, steps: list[float], batch: int, new_tokens: int, total_s: float) -> dict:
    med = common.median(steps) if steps else None
    return {"first_token_s": first_token_s, "steps_s": steps, "step_s_median": med,
            "decode_s": sum(steps), "total_s": total_s,
            "agg_tok_s": batch / med if med else None,               # decode, all rows
            "e2e_tok_s": batch * new_tokens / total_s if total_s > 0 else None}


def run_overspill(a: argparse.Namespace, prompts: list[list[int]]) -> dict:
    import overspill
    from overspill.placement import Bandwidths
    from overspill.placement.bandwidth import measure

    # The planner's own probes (memory, the model's files with O_DIRECT, matmul), fresh as `overspill plan` takes
    # them: this machine's disk drifts 0.9-1.8 GB/s, so a cached probe predicts another day's speed. (--smoke: the
    # driver's quick probe instead.)
    t0 = time.perf_counter()
    bw_fresh = Bandwidths(**json.loads(a.bw)) if a.smoke else measure(model_paths=[a.path], cache=False)
    probe_s = time.perf_counter() - t0
    io0 = proc_io()
    kw = {"quantize": a.quantize} if a.quantize else {}
    if a.kv_cache:
        kw["kv_cache"] = a.kv_cache
    dtype = "auto" if a.worker == "overspill-store" else a.dtype   # a store keeps the dtype it was converted to
    t0 = time.perf_counter()
    model = overspill.load(a.path, dtype=dtype, max_memory=f"cpu={a.overspill_budget or a.budget}",
                           max_batch_size=a.batch,
                           max_seq_len=a.prompt_len + a.new_tokens, **kw)
    load_s = time.perf_counter() - t0
    io1 = proc_io()

    # Per-token stamps: generate() runs one weight pass for the prompts and one per later token, and stamps
    # when each ends (stats["step_ends"]; sampling the token after it is negligible).
    t0 = time.perf_counter()
    outs = model.generate(prompts, max_new_tokens=a.new_tokens, temperature=0, ignore_eos=True)
    total_s = time.perf_counter() - t0
    io2 = proc_io()
    stats = dict(model.last_stats)
    ends = list(stats.pop("step_ends"))
    assert [len(o) for o in outs] == [a.new_tokens] * len(prompts), [len(o) for o in outs]
    ends = ends[-a.new_tokens:]
    steps = [y - x for x, y in zip(ends, ends[1:])]
    r = {"load_s": load_s, **step_figures(stats["prefill_s"], steps, a.batch, a.new_tokens, total_s),
         "last_stats": stats, "forward_calls": len(ends), "tokens0": list(outs[0][:16]),
         "io_load": io_delta(io0, io1), "io_run": io_delta(io1, io2), "io_total": io_delta(io0, io2)}
    plan = model.plan
    if plan is not None:
        bw = Bandwidths(**json.loads(a.bw))
        r["plan"] = {"disk_bytes_per_token": plan.disk_bytes_per_token(),
                     "streamed_bytes_per_token": plan.streamed_bytes_per_token(),
                     "resident_cpu_bytes": plan.resident_bytes("cpu"),
                     "usage": plan.usage, "ring_slots": plan.ring_slots, "staging_bytes": plan.staging_bytes,
                     "streamed_units": sum(p.tier == "stream" for p in plan.placements),
                     "units": len(plan.placements)}
        r["bw_fresh"], r["probe_s"] = dataclasses.asdict(bw_fresh), probe_s
        r["predict"] = plan.predict(bw_fresh, batch=a.batch)          # what `overspill plan` prints on this run
        r["predict_cached"] = plan.predict(bw, batch=a.batch)         # with the driver's cached bandwidths
        if a.disk_gbps:
            r["predict_run_disk"] = plan.predict(dataclasses.replace(bw, disk_gbps=a.disk_gbps), batch=a.batch)
        r["plan_table"] = plan.table(bw)
    src_stats = getattr(model.executor.source, "stats", None)
    if src_stats is not None:
        r["source_stats"] = dict(src_stats)
        r["io_wait_s"] = src_stats.get("io_wait_s")
    return r


def run_accelerate(a: argparse.Namespace, prompts: list[list[int]]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    import accelerate
    import transformers

    offload = tempfile.mkdtemp(prefix="offload-", dir=a.offload_dir)
    try:
        io0 = proc_io()
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(a.path, dtype=getattr(torch, a.dtype), device_map="auto",
                                                     max_memory={"cpu": a.budget}, offload_folder=offload)
        model.eval()
        load_s = time.perf_counter() - t0
        io1 = proc_io()
        dmap = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}

        out, st, t0 = common.hf_generate_timed(model, prompts, a.new_tokens)
        total_s = time.perf_counter() - t0
        io2 = proc_io()
        steps = [y - x for x, y in zip(st, st[1:])]
        return {"load_s": load_s, **step_figures(st[0] - t0, steps, a.batch, a.new_tokens, total_s),
                "device_map": dmap, "tokens0": out[0, len(prompts[0]):len(prompts[0]) + 16].tolist(),
                "offload_folder_bytes": sum(f.stat().st_size for f in Path(offload).rglob("*") if f.is_file()),
                "io_load": io_delta(io0, io1), "io_run": io_delta(io1, io2), "io_total": io_delta(io0, io2),
                "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    finally:
        shutil.rmtree(offload, ignore_errors=True)


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    vocab = a.vocab or common.read_config(a.path)["vocab_size"]
    prompts = make_prompts(vocab, a.batch, a.prompt_len, a.seed)
    r = run_accelerate(a, prompts) if a.worker == "accelerate" else run_overspill(a, prompts)
    r["peak_rss_bytes"] = common.peak_rss_bytes()
    r["threads"] = torch.get_num_threads()
    r["torch"] = torch.__version__
    common.emit(r)


# ---------------------------------------------------------------------------------------------
# byte accounting (driver side, from file headers only)


def store_files(store: Path) -> list[Path]:
    return sorted(p for p in store.glob("*.safetensors") if p.is_file())


def side_files(a: argparse.Namespace, side: str) -> list[Path]:
    return store_files(Path(a.store)) if side == "overspill-store" else common.safetensors_files(a.hf)


def param_count(ckpt: Path) -> int:
    """Non-embedding parameters a decode step multiplies by (head included; tied: counted once),
    the same selection as common.weight_bytes_per_token, in elements."""
    elem = {}
    for f in common.safetensors_files(ckpt):
        for info in common.safetensors_header(f).values():
            elem[info["dtype"]] = elem.get(info["dtype"], 0) + 1
    dt = max(elem, key=elem.get)
    return common.weight_bytes_per_token(ckpt) // DTYPE_BYTES.get(dt, 2)


def accelerate_bytes_by_device(dmap: dict[str, str], sizes: dict[str, int]) -> dict[str, int]:
    """Checkpoint tensor bytes per device of accelerate's hf_device_map (longest module prefix)."""
    out: dict[str, int] = {}
    for name, n in sizes.items():
        best = None
        for k in dmap:
            if (k == "" or name == k or name.startswith(k + ".")) and (best is None or len(k) > len(best)):
                best = k
        dev = dmap[best] if best is not None else "unmapped"
        out[dev] = out.get(dev, 0) + n
    return out


# ---------------------------------------------------------------------------------------------
# driver


def worker_cmd(a: argparse.Namespace, side: str, batch: int, bw_json: str, disk_gbps: float) -> list[str]:
    path = a.store if side == "overspill-store" else a.hf
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--path", str(path),
           "--budget", a.budget, "--batch", str(batch), "--prompt-len", str(a.prompt_len),
           "--new-tokens", str(a.new_tokens), "--seed", str(a.seed), "--threads", str(a.threads),
           "--bw", bw_json, "--disk-gbps", repr(disk_gbps), "--vocab", str(a.vocab), "--dtype", a.dtype]
    if a.smoke:
        cmd += ["--smoke"]
    if side != "accelerate" and a.overspill_budget:
        cmd += ["--overspill-budget", a.overspill_budget]
    if side != "accelerate" and a.quantize:
        cmd += ["--quantize", a.quantize]
    if side != "accelerate" and a.kv_cache:
        cmd += ["--kv-cache", a.kv_cache]
    if a.offload_dir:
        cmd += ["--offload-dir", a.offload_dir]
    return cmd


def cgroup_memory_stat(path: Path) -> dict:
    out = {}
    try:
        for line in (path / "memory.stat").read_text().splitlines():
            k, v = line.split()
            if k in ("cache", "rss", "mapped_file", "total_cache", "total_rss", "pgmajfault"):
                out[k] = int(v)
    except (OSError, ValueError):
        pass
    return out


def one_run(a: argparse.Namespace, side: str, batch: int, rnd: int, bw, ctx: dict) -> dict:
    """Probe the disk on this side's files, drop caches, run one worker in a fresh cgroup; the
    returned row carries the bounds computed with this run's disk bandwidth."""
    files = side_files(a, side)
    disk = common.disk_read_gbps(files, max_bytes=2 << 30, threads=8, direct=True)
    if a.drop_caches:
        common.drop_caches()
    else:
        os.sync()
    cmd = worker_cmd(a, side, batch, json.dumps(dataclasses.asdict(bw)), disk)
    if ctx["cgroups"]:
        with common.MemoryCgroup(f"bench-offload-{os.getpid()}", ctx["limit"]) as cg:
            res = common.run_worker(cmd, cgroup=cg.path, check=False, timeout=a.timeout)
            cg_stat = cgroup_memory_stat(cg.path)
    else:   # --smoke where no memory cgroup can be made: the worker runs without a limit
        res, cg_stat = common.run_worker(cmd, check=False, timeout=a.timeout), {}
    unquantized = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[a.dtype]
    scheme = ((a.quantize or unquantized) + (f" kv {a.kv_cache}" if a.kv_cache else "")) if side != "accelerate" else unquantized
    row = {"kind": "run", "mode": a.mode, "time": ctx["stamp"], "hf": str(a.hf), "store": a.store, "side": side,
           "scheme": scheme, "batch": batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
           "round": rnd, "budget": a.budget, "budget_bytes": ctx["budget_bytes"], "cgroup_limit": ctx["limit"],
           "drop_caches": a.drop_caches, "disk_gbps_run": disk, "bw": dataclasses.asdict(bw),
           "cgroup_memory_stat_after": cg_stat, **res}
    cg = res.get("cgroup") or {}
    row["oom_kills"] = cg.get("oom_kill_during_run", cg.get("oom_kill"))
    file_bytes = sum(f.stat().st_size for f in files)
    row["first_token_bound_s"] = file_bytes / (disk * 1e9)  # every weight read from disk once
    if not row.get("ok"):
        return row
    # what a user waits for: from the start of load to the first token (a background load reads during the prefill)
    row["first_token_total_s"] = row["load_s"] + row["first_token_s"]
    row["first_token_total_ratio"] = row["first_token_total_s"] / row["first_token_bound_s"]
    if side == "accelerate":
        by_dev = accelerate_bytes_by_device(res.get("device_map") or {"": "cpu"}, ctx["sizes"])
        row["bytes_by_device"] = by_dev
        row["disk_bytes_per_token"] = by_dev.get("disk", 0)
    else:
        row["disk_bytes_per_token"] = (res.get("plan") or {}).get("disk_bytes_per_token", 0)
    row["disk_bound_s"] = row["disk_bytes_per_token"] / (disk * 1e9)
    # memory side of the roofline: every decode-step weight byte read once from RAM
    row["mem_bound_s"] = ctx["wbpt"] / (bw.mem_gbps * 1e9)
    row["bound_s"] = max(row["disk_bound_s"], row["mem_bound_s"])
    med = row.get("step_s_median")
    row["ratio_to_disk_bound"] = med / row["disk_bound_s"] if med and row["disk_bound_s"] else None
    row["ratio_to_bound"] = med / row["bound_s"] if med and row["bound_s"] else None
    if ctx.get("tflops"):
        row["compute_bound_tok_s"] = ctx["tflops"] * 1e12 / (2 * ctx["params"])
        if row.get("agg_tok_s"):
            row["fraction_of_compute_bound"] = row["agg_tok_s"] / row["compute_bound_tok_s"]
    for key in ("predict", "predict_cached", "predict_run_disk"):
        p = res.get(key)
        if p and med:
            row[key + "_rel_err"] = abs(p["s_per_token"] - med) / med
    return row


def latency_table(rows: list[dict], sides: list[str], budget_bytes: int) -> str:
    lines = ["| side | scheme | ok runs | load s | first token s (cold) | from start of load s | first-token bound s | "
             "ratio | median s/token | "
             "disk bound s/token | ratio to disk bound | bound s/token (max disk, mem) | ratio to bound | "
             "predicted s/token | pred err | pred @run disk | io wait s | disk GB read (run) | peak RSS GiB | "
             "cgroup max GiB | budget GiB | OOMs |",
             "|" + "---|" * 22]
    for side in sides:
        all_ = [r for r in rows if r["side"] == side]
        ok = [r for r in all_ if r.get("ok")]
        if not all_:
            continue
        rb = med_of(ok, "io_total", "read_bytes")
        lines.append(
            f"| {side} | {all_[0]['scheme']} | {len(ok)}/{len(all_)} | {fmt(med_of(ok, 'load_s'), '.2f')} | "
            f"{fmt(med_of(ok, 'first_token_s'))} | {fmt(med_of(ok, 'first_token_total_s'))} | "
            f"{fmt(med_of(ok, 'first_token_bound_s'))} | {fmt(med_of(ok, 'first_token_total_ratio'), '.2f')} | "
            f"{fmt(med_of(ok, 'step_s_median'))} | {fmt(med_of(ok, 'disk_bound_s'))} | "
            f"{fmt(med_of(ok, 'ratio_to_disk_bound'))} | {fmt(med_of(ok, 'bound_s'))} | "
            f"{fmt(med_of(ok, 'ratio_to_bound'))} | {fmt(med_of(ok, 'predict', 's_per_token'))} | "
            f"{fmt(med_of(ok, 'predict_rel_err'), '.0%')} | {fmt(med_of(ok, 'predict_run_disk', 's_per_token'))} | "
            f"{fmt(med_of(ok, 'io_wait_s'))} | {fmt(rb / 1e9 if rb is not None else None)} | "
            f"{fmt(med_of(ok, 'peak_rss_bytes') / 2**30 if ok else None, '.2f')} | "
            f"{fmt(max((r.get('cgroup') or {}).get('max_usage_bytes') or 0 for r in all_) / 2**30, '.2f')} | "
            f"{budget_bytes / 2**30:.3g} | {sum(r.get('oom_kills') or 0 for r in all_)} |")
    return "\n".join(lines)


def throughput_table(rows: list[dict], sides: list[str], batches: list[int]) -> str:
    acc_best = max((med_of([r for r in rows if r["side"] == "accelerate" and r["batch"] == b and r.get("ok")],
                           "agg_tok_s") or 0) for b in batches) if "accelerate" in sides else 0
    lines = ["| side | scheme | batch | ok runs | first token s | median s/step | aggregate tok/s | "
             "disk bound tok/s | compute bound tok/s | fraction of compute bound | ratio to accelerate best | "
             "predicted tok/s | peak RSS GiB | cgroup max GiB | OOMs |",
             "|" + "---|" * 15]
    for b in batches:
        for side in sides:
            all_ = [r for r in rows if r["side"] == side and r["batch"] == b]
            ok = [r for r in all_ if r.get("ok")]
            if not all_:
                continue
            agg = med_of(ok, "agg_tok_s")
            dbs = med_of(ok, "disk_bound_s")
            pred = med_of(ok, "predict", "s_per_token")
            lines.append(
                f"| {side} | {all_[0]['scheme']} | {b} | {len(ok)}/{len(all_)} | {fmt(med_of(ok, 'first_token_s'))} | "
                f"{fmt(med_of(ok, 'step_s_median'))} | {fmt(agg)} | {fmt(b / dbs if dbs else None)} | "
                f"{fmt(med_of(ok, 'compute_bound_tok_s'))} | {fmt(med_of(ok, 'fraction_of_compute_bound'))} | "
                f"{fmt(agg / acc_best if agg and acc_best else None, '.2f')} | {fmt(b / pred if pred else None)} | "
                f"{fmt(med_of(ok, 'peak_rss_bytes') / 2**30 if ok else None, '.2f')} | "
                f"{fmt(max((r.get('cgroup') or {}).get('max_usage_bytes') or 0 for r in all_) / 2**30, '.2f')} | "
                f"{sum(r.get('oom_kills') or 0 for r in all_)} |")
    return "\n".join(lines)


def cgroups_available() -> str | None:
    """None where this process can make a child memory cgroup (v1, root), else why not."""
    try:
        common.remove_cgroup(common.make_cgroup(f"bench-offload-probe-{os.getpid()}", 1 << 30))
        return None
    except (OSError, RuntimeError) as e:
        return str(e)


def quick_bandwidths(files: list[Path]):
    """--smoke: short probes in place of overspill's full `measure` (tens of seconds on a slow machine)."""
    import torch
    from overspill.placement import Bandwidths
    from overspill.placement.bandwidth import matmul_tflops

    return Bandwidths(mem_gbps=common.mem_read_gbps(64 << 20, reps=1),
                      disk_gbps=common.disk_read_gbps(files, max_bytes=64 << 20, threads=2, direct=False),
                      matmul_tflops=matmul_tflops(torch.float32, m=64, n=256, k=256, reps=1))


def driver(a: argparse.Namespace) -> Path:
    """Runs every side and batch, prints the table; returns the results file."""
    from overspill.placement import parse_size
    from overspill.placement.bandwidth import matmul_tflops, measure

    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        raise SystemExit(f"--sides takes a comma list of {SIDES}, got {a.sides!r}")
    if "overspill-store" in sides and not a.store:
        print("no --store given: skipping overspill-store", file=sys.stderr)
        sides.remove("overspill-store")
    drop_unavailable_accelerate(sides, a.smoke)
    no_cgroup = cgroups_available()
    if no_cgroup and not a.smoke:
        raise SystemExit(f"cannot make a memory cgroup ({no_cgroup}): the offload benchmark runs each side in one "
                         "(cgroup v1 mounted at /sys/fs/cgroup/memory, as root)")
    if no_cgroup:
        print(f"smoke: no memory cgroup ({no_cgroup}): workers run without a memory limit", file=sys.stderr)
    if a.mode == "throughput":  # one overspill side: the store if given, else the HF dir
        osp = "overspill-store" if "overspill-store" in sides else ("overspill-hf" if "overspill-hf" in sides else None)
        sides = [s for s in (osp, "accelerate" if "accelerate" in sides else None) if s]
    if not sides:
        raise SystemExit("no side left to run")
    a.hf = str(Path(a.hf).resolve())
    a.store = str(Path(a.store).resolve()) if a.store else None
    a.vocab = common.read_config(a.hf)["vocab_size"]
    budget_bytes = parse_size(a.budget)
    limit = budget_bytes + parse_size(a.cgroup_overhead)
    batches = [int(b) for b in a.batches.split(",")] if a.mode == "throughput" else [a.batch]
    out = Path(a.out)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    hf = Path(a.hf)
    ctx = {"stamp": stamp, "limit": limit, "budget_bytes": budget_bytes, "sizes": common.tensor_bytes(hf),
           "wbpt": common.weight_bytes_per_token(hf), "params": param_count(hf), "cgroups": not no_cgroup}
    # overspill's own probe (cached): what the plan's prediction uses
    bw = quick_bandwidths(common.safetensors_files(hf)) if a.smoke else measure(cache=True)
    if a.mode == "throughput":
        ctx["tflops"] = bw.matmul_tflops if a.smoke else matmul_tflops(reps=5)
    if not a.drop_caches:
        print("--no-drop-caches: runs may be served from the page cache (plumbing checks only)", file=sys.stderr)
    title = (f"{hf.name}{' / ' + Path(a.store).name if a.store else ''}  mode {a.mode}  budget cpu={a.budget}"
             f"{f' (overspill cpu={a.overspill_budget})' if a.overspill_budget else ''}  "
             f"cgroup limit {limit / 2**30:.3g} GiB  prompt {a.prompt_len}  new {a.new_tokens}  "
             f"scheme {a.quantize or a.dtype}  params {ctx['params'] / 1e9:.3g} B  "
             f"weights/step {ctx['wbpt'] / 1e9:.3g} GB  drop caches {a.drop_caches}")
    print(f"== {title}", file=sys.stderr, flush=True)
    rows: list[dict] = []
    for batch in batches:
        for rnd, side in common.interleave(sides, a.repeats):
            row = one_run(a, side, batch, rnd, bw, ctx)
            rows.append(row)
            common.append_jsonl(out, row)
            if row.get("ok"):
                print(f"   batch {batch} round {rnd + 1}/{a.repeats} {side:15s}: load {row['load_s']:.2f} s, "
                      f"first token {row['first_token_s']:.3f} s ({row['first_token_total_s']:.1f} s from the start of "
                      f"load, {row['first_token_total_ratio']:.2f}x one read), {fmt(row['step_s_median'])} s/token "
                      f"(disk bound {fmt(row['disk_bound_s'])} @ {row['disk_gbps_run']:.2f} GB/s), "
                      f"peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB, cgroup max "
                      f"{((row.get('cgroup') or {}).get('max_usage_bytes') or 0) / 2**30:.2f} GiB, OOMs {row['oom_kills']}",
                      file=sys.stderr, flush=True)
            else:
                print(f"   batch {batch} round {rnd + 1}/{a.repeats} {side:15s}: FAILED (exit {row['returncode']}, "
                      f"OOMs {row['oom_kills']})\n"
                      + "\n".join("      " + ln for ln in row["stderr_tail"].splitlines()[-8:]),
                      file=sys.stderr, flush=True)
    table = latency_table(rows, sides, budget_bytes) if a.mode == "latency" else throughput_table(rows, sides, batches)
    probes = [r["disk_gbps_run"] for r in rows]
    note = (f"disk (O_DIRECT, 8 threads, per run): median {common.median(probes):.2f} GB/s "
            f"({', '.join(f'{p:.2f}' for p in probes)}); cached probe for predictions: disk {bw.disk_gbps:.2f} GB/s, "
            f"mem {bw.mem_gbps:.1f} GB/s, matmul {fmt(bw.matmul_tflops)} TFLOP/s"
            + (f"; matmul measured now {ctx['tflops']:.3f} TFLOP/s" if ctx.get("tflops") else ""))
    seqs = {json.dumps(r["tokens0"]) for r in rows if r.get("ok") and "tokens0" in r}
    if len(sides) > 1 and seqs and a.mode == "latency":
        note += f"\ngreedy tokens (row 0, first 16) identical across sides and rounds: {'yes' if len(seqs) == 1 else f'NO ({len(seqs)} variants)'}"
    print(f"### {title}\n\n{table}\n{note}\n", flush=True)
    summary = {"kind": "summary", "mode": a.mode, "time": stamp, "title": title, "sides": sides,
               "batches": batches, "disk_gbps_probes": probes, "bw": dataclasses.asdict(bw),
               "matmul_tflops_now": ctx.get("tflops"), "params": ctx["params"],
               "weight_bytes_per_token": ctx["wbpt"], "cgroup_limit": limit, "budget_bytes": budget_bytes}
    for side in sides:
        for b in batches:
            ok = [r for r in rows if r["side"] == side and r["batch"] == b and r.get("ok")]
            summary[f"{side}@{b}"] = {k: med_of(ok, k) for k in
                                      ("load_s", "first_token_s", "step_s_median", "agg_tok_s", "disk_bound_s",
                                       "bound_s", "first_token_bound_s", "peak_rss_bytes")}
    common.append_jsonl(out, summary)
    print(f"raw rows appended to {out}", file=sys.stderr)
    return out


def smoke(a: argparse.Namespace) -> None:
    """--smoke: a tiny random Llama and its layer store (`overspill convert`), streamed under a tiny budget; every
    side once, page cache not dropped. Fails unless every run succeeded."""
    with common.Smoke(a.keep) as sm:
        a.dtype = a.dtype or common.compute_dtype()
        if not a.hf:
            a.hf = str(sm.checkpoint("llama-tiny", a.dtype))
            if not a.store and "overspill-store" in a.sides:
                from overspill.cli import main as overspill_cli
                a.store = str(sm.dir / "store")
                rc = overspill_cli(["convert", a.hf, a.store, "--dtype", a.dtype]
                                   + (["--quantize", a.quantize] if a.quantize else []))
                if rc:
                    raise SystemExit(f"smoke: overspill convert exited {rc}")
        if a.budget is None:   # below the model's bytes in a.dtype, so units stream, above the planner's minimum
            elems = sum(math.prod(t["shape"]) for f in common.safetensors_files(a.hf)
                        for t in common.safetensors_header(f).values())
            a.budget = f"{int(0.9 * elems * (4 if a.dtype == 'float32' else 2)) >> 10}KiB"
        a.out = a.out or str(sm.out("offload.jsonl"))
        out = driver(a)
        common.smoke_check(out, min_runs=1)


# --smoke changes these defaults (flags given explicitly still win)
SMOKE_DEFAULTS = dict(budget=None, cgroup_overhead="1GiB", prompt_len=8, new_tokens=4, repeats=1, batches="1,2",
                      drop_caches=False, threads=1, timeout=300)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", help="Hugging Face checkpoint dir (accelerate, overspill-hf, byte accounting)")
    p.add_argument("--store", default=None, help="overspill layer store of the same model (overspill convert); "
                   "with --quantize it must have been converted with the same scheme")
    p.add_argument("--budget", default="4GiB", help="cpu memory budget: overspill max_memory 'cpu=B', "
                   "accelerate max_memory={'cpu': B}")
    p.add_argument("--overspill-budget", default=None, help="the overspill sides' budget when not --budget: 'auto' "
                   "plans from the cgroup's limit (cpu=auto: the limit less the process's start-up RSS), since "
                   "overspill's budget counts everything it holds and accelerate's counts weights only")
    p.add_argument("--cgroup-overhead", default="2GiB", help="cgroup limit = budget + this (runtime, slack, "
                   "page cache of in-flight reads)")
    p.add_argument("--mode", choices=("latency", "throughput"), default="latency")
    p.add_argument("--batch", type=int, default=1, help="latency mode batch (and worker batch)")
    p.add_argument("--batches", default="1,8,32", help="throughput mode: comma list of batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    p.add_argument("--sides", default="overspill-hf,overspill-store,accelerate")
    p.add_argument("--quantize", default=None, help="scheme for the overspill sides (rows labelled by it)")
    p.add_argument("--kv-cache", default=None, help="KV cache format for the overspill sides: int8")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                   help="do not drop the page cache before runs (plumbing checks only: not a cold run)")
    p.add_argument("--offload-dir", default=None, help="where accelerate's temporary offload_folder goes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    p.add_argument("--dtype", default=None, help="weights and compute of overspill-hf and accelerate (default "
                   "bfloat16); a store keeps the dtype it was converted to")
    p.add_argument("--out", default=None, help=f"JSONL file the raw rows are appended to (default {DEFAULT_OUT})")
    p.add_argument("--smoke", action="store_true", help="check the whole path in seconds: a tiny random checkpoint "
                   "and store made in a temp dir, page cache not dropped, quick probes (measures nothing)")
    p.add_argument("--keep", action="store_true", help="--smoke: keep the temp dir")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--bw", default=None, help=argparse.SUPPRESS)
    p.add_argument("--disk-gbps", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**SMOKE_DEFAULTS)
    a = p.parse_args(argv)
    if a.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (per-token steps are measured after the first token)")
    if a.worker:
        return worker(a)
    if a.smoke:
        return smoke(a)
    if not a.hf:
        p.error("--hf is required (or --smoke)")
    a.dtype = a.dtype or "bfloat16"
    a.out = a.out or str(DEFAULT_OUT)
    driver(a)


if __name__ == "__main__":
    main()
