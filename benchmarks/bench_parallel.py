"""Pipeline and tensor parallel on one machine: ranks as separate processes (as torchrun starts them), against one
process, in the same run.

    --part 6b   "two small machines instead of one": a GPT-J-6B-shaped bf16 Hugging Face checkpoint (12.1 GB)
                  pp2     two ranks (--pp 2), each in its own memory cgroup (--rank-cgroup, default 6GiB) with its
                          own budget (--rank-budget, default cpu=5GiB), one thread each
                  single  one process in one cgroup (--single-cgroup 6GiB) streaming from disk with
                          --single-budget (default cpu=4GiB), two threads (bench_offload.py's configuration)
                each side after dropping the page cache; batch 1, a --prompt-len random prompt, --new-tokens greedy.
                Reports s/token and its bound: every rank's plan (bytes resident in RAM, bytes streamed from disk
                per token) over the memory and disk read speeds probed in the run; batch-1 ranks run in turn, so
                the pair's bound is the sum of its ranks'.
    --part 1b   the 1.2B GPT-J shape in RAM, batch 1 and --batch (default 8): one process (2 threads) against
                --tp 2 and --pp 2 (one thread per rank; at --batch also --pp 2 without micro-batches). Reports decode tokens/s and, from every rank's counters
                (PipelineExecutor.rank_stats: wall time in steps, blocked on receives/sends, in all-reduces) over
                the timed generate: all-reduce time per token (tp) and each rank's idle share (pp: the bubble).

Sides alternate within each round (--rounds); medians and same-round ratios are printed, raw rows appended to
bench-cache/results/parallel.jsonl.

Examples (from the repository root; --part 6b needs root for drop_caches and cgroups):
    .venv/bin/python benchmarks/bench_parallel.py --part 1b
    .venv/bin/python benchmarks/bench_parallel.py --part 6b --rounds 1
    .venv/bin/python benchmarks/bench_parallel.py --smoke        # a tiny random model, every side, seconds
Worker (one per rank; the driver starts them with RANK/WORLD_SIZE/MASTER_ADDR set):
    .venv/bin/python benchmarks/bench_parallel.py --worker --ckpt DIR --pp 2 --max-memory cpu=5GiB
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: E402  (also puts the repository root on sys.path)
from common import fmt  # noqa: E402

from overspill.placement.planner import parse_size  # noqa: E402

DEFAULT_OUT = common.CACHE_DIR / "results" / "parallel.jsonl"
COUNTERS = ("steps", "step_s", "recv_s", "send_s", "allreduce_s", "allreduces")


# -- worker (one rank, or the single process) -------------------------------------------------------------------

def _delta(after: list[dict], before: list[dict]) -> list[dict]:
    return [{k: a[k] - b[k] for k in COUNTERS} for a, b in zip(after, before)]


def worker(a: argparse.Namespace) -> None:
    import torch

    import overspill

    torch.set_num_threads(a.threads)
    kw = {}
    if a.pp > 1:
        kw["pp"] = a.pp
    if a.tp > 1:
        kw["tp"] = a.tp
    t0 = time.perf_counter()
    m = overspill.load(a.ckpt, dtype=a.dtype, max_memory=a.max_memory, max_batch_size=a.batch,
                       max_seq_len=a.prompt_len + a.new_tokens + 8, background=False, **kw)
    load_s = time.perf_counter() - t0
    rank = int(os.environ.get("RANK", "0"))
    if m is None:       # a rank other than 0: it served rank 0's steps until rank 0 closed the model
        common.emit({"rank": rank, "load_s": load_s, "peak_rss_bytes": common.peak_rss_bytes()})
        return
    gen = torch.Generator().manual_seed(a.seed)
    vocab = m.config.vocab_size
    prompts = torch.randint(0, vocab, (a.batch, a.prompt_len), generator=gen).tolist()
    m.generate(prompts, max_new_tokens=2, ignore_eos=True)            # warm-up: first-call costs, caches
    parallel = hasattr(m.executor, "rank_stats")
    before = m.executor.rank_stats() if parallel else None
    t0 = time.perf_counter()
    outs = m.generate(prompts, max_new_tokens=a.new_tokens, ignore_eos=True)
    wall = time.perf_counter() - t0
    st = dict(m.last_stats)
    r = {"rank": 0, "load_s": load_s, "wall_s": wall, "prefill_s": st["prefill_s"], "decode_s": st["decode_s"],
         "steps": a.new_tokens - 1, "tokens0": outs[0][:8], "threads": torch.get_num_threads()}
    r["s_per_token"] = st["decode_s"] / r["steps"]
    if parallel:
        r["ranks"] = _delta(m.executor.rank_stats(), before)
        r["plans"] = [s.get("plan") for s in m.executor.stages]
        r["units"] = [s.get("units") for s in m.executor.stages]
    else:
        r["plans"] = [json.loads(m.plan.to_json())] if m.plan is not None else [None]
    r["peak_rss_bytes"] = common.peak_rss_bytes()
    m.close()
    common.emit(r)


# -- driver -----------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_side(name: str, ckpt: str, ranks: int, flag: str | None, budget: str, threads: int, cgroup_limit: int | None,
             a: argparse.Namespace, batch: int, drop: bool, extra_env: dict | None = None) -> dict:
    """Start ``ranks`` worker processes (each in its own cgroup of ``cgroup_limit`` where cgroups work) and return
    rank 0's result with every rank's peak RSS / cgroup peak."""
    if drop:
        common.drop_caches()
    port = _free_port()
    cmd = [sys.executable, __file__, "--worker", "--ckpt", ckpt, "--max-memory", budget, "--threads", str(threads),
           "--batch", str(batch), "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens),
           "--dtype", a.dtype, "--seed", str(a.seed)]
    if flag:
        cmd += [flag, str(ranks)]
    groups, procs, logs = [], [], []
    try:
        for r in range(ranks):
            cg = None
            if cgroup_limit:
                try:
                    cg = common.make_cgroup(f"overspill-par-{name}-{r}-{os.getpid()}", cgroup_limit)
                except OSError:
                    cg = None
            groups.append(cg)
            env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(r),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads),
                   "OVERSPILL_PP_TIMEOUT": "120", **(extra_env or {})}
            log = tempfile.TemporaryFile("w+")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                          preexec_fn=common._join_cgroup(cg) if cg else None))
        outs = [p.communicate(timeout=a.timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return {"side": name, "ok": False, "error": f"timed out after {a.timeout} s"}
    results = []
    for r, (p, out, log) in enumerate(zip(procs, outs, logs)):
        lines = [ln for ln in out.splitlines() if ln.strip()]
        if p.returncode != 0 or not lines:
            log.seek(0)
            tail = "\n".join(log.read().splitlines()[-8:])
            return {"side": name, "ok": False, "error": f"rank {r} exit {p.returncode}: {tail}"}
        res = json.loads(lines[-1])
        if groups[r] is not None:
            res["cgroup"] = common.cgroup_stats(groups[r])
        results.append(res)
    for cg in groups:
        if cg is not None:
            common.remove_cgroup(cg)
    out = dict(results[0])
    out.update(side=name, ok=True, batch=batch, budget=budget, rank_peak_rss=[x["peak_rss_bytes"] for x in results],
               rank_cgroup_peak=[(x.get("cgroup") or {}).get("max_usage_bytes") for x in results],
               rank_oom_kills=[(x.get("cgroup") or {}).get("oom_kill") for x in results])
    return out


def plan_bytes(plan: dict | None) -> tuple[int, int]:
    """(bytes read from RAM, bytes read from disk) per decode token under ``plan`` (the embedding table aside: a
    token reads one row of it)."""
    if not plan:
        return 0, 0
    if isinstance(plan, str):
        plan = json.loads(plan)
    ram = disk = 0
    for p in plan["placements"]:
        if p["unit"] == "embed":
            continue
        if p["tier"] == "stream" and p.get("home") == "disk":
            disk += p.get("stream_bytes") or p["weight_bytes"]
        else:
            ram += p["weight_bytes"]
    return ram, disk


def bound_s(res: dict, mem_gbps: float, disk_gbps: float) -> float:
    """Batch-1 seconds per token if every rank read its bytes at the probed speeds, one rank after another."""
    return sum(r / (mem_gbps * 1e9) + d / (disk_gbps * 1e9) for r, d in map(plan_bytes, res.get("plans") or []))


def part_6b(a) -> list[dict]:
    ckpt = a.ckpt or str(common.CACHE_DIR / "gptj-6b-bfloat16")
    files = sorted(Path(ckpt).glob("*.safetensors"))
    rows = []
    for rnd in range(a.rounds):
        mem = common.mem_read_gbps()
        disk = common.disk_read_gbps(files)
        print(f"round {rnd + 1}: memory read {mem:.1f} GB/s, disk read {disk:.2f} GB/s", flush=True)
        for name in (("pp2", "single") if rnd % 2 == 0 else ("single", "pp2")):
            if name == "pp2":
                res = run_side(name, ckpt, 2, "--pp", a.rank_budget, 1, parse_size(a.rank_cgroup), a, 1,
                               a.drop_caches)
            else:
                res = run_side(name, ckpt, 1, None, a.single_budget, 2, parse_size(a.single_cgroup), a, 1,
                               a.drop_caches)
            res.update(round=rnd, mem_gbps=mem, disk_gbps=disk)
            if res["ok"]:
                res["bound_s"] = bound_s(res, mem, disk)
                ram_disk = [plan_bytes(p) for p in res["plans"]]
                print(f"  {name}: {res['s_per_token']:.2f} s/token (bound {res['bound_s']:.2f}: "
                      + ", ".join(f"rank {i} {r / 1e9:.2f} GB RAM + {d / 1e9:.2f} GB disk" for i, (r, d)
                                  in enumerate(ram_disk))
                      + f"), load {res['load_s']:.1f} s, prefill {res['prefill_s']:.1f} s, cgroup peaks "
                      + ", ".join(f"{(x or 0) / 2**30:.2f}" for x in res["rank_cgroup_peak"]) + " GiB", flush=True)
            else:
                print(f"  {name}: FAILED {res['error']}", flush=True)
            rows.append(res)
    ok = [r for r in rows if r["ok"]]
    for name in ("pp2", "single"):
        xs = [r["s_per_token"] for r in ok if r["side"] == name]
        if xs:
            b = common.median([r["s_per_token"] / r["bound_s"] for r in ok if r["side"] == name])
            print(f"{name}: median {common.median(xs):.2f} s/token, {b:.2f}x its bound")
    ratios = []
    for rnd in range(a.rounds):
        s = {r["side"]: r["s_per_token"] for r in ok if r["round"] == rnd}
        if len(s) == 2:
            ratios.append(s["single"] / s["pp2"])
    if ratios:
        print(f"pp2 faster than single by {common.median(ratios):.2f}x (median of same-round ratios {ratios})")
    return rows


def part_1b(a) -> list[dict]:
    ckpt = a.ckpt or str(common.CACHE_DIR / "gptj-1b-bfloat16")
    sides = [("single", 1, None, 2, None), ("tp2", 2, "--tp", 1, None), ("pp2", 2, "--pp", 1, None),
             ("pp2-no-micro", 2, "--pp", 1, {"OVERSPILL_PP_MICRO_BATCHES": "1"})]
    rows = []
    for rnd in range(a.rounds):
        for batch in (1, a.batch):
            order = sides if rnd % 2 == 0 else sides[::-1]
            for name, n, flag, threads, env in order:
                if batch == 1 and env:
                    continue                 # one sequence: nothing to split
                res = run_side(name, ckpt, n, flag, a.budget_1b, threads, None, a, batch, False, env)
                res["round"] = rnd
                rows.append(res)
                if not res["ok"]:
                    print(f"  {name} batch {batch}: FAILED {res['error']}", flush=True)
                    continue
                res["tok_s"] = 1 / res["s_per_token"]
                line = f"  {name} batch {batch}: {res['tok_s']:.2f} tok/s per sequence ({res['tok_s'] * batch:.2f} in all)"
                if "ranks" in res:
                    wall, steps = res["wall_s"], max(res["ranks"][0]["steps"], 1)
                    busy = [x["step_s"] - x["recv_s"] - x["send_s"] - x["allreduce_s"] for x in res["ranks"]]
                    res["idle_share"] = [1 - b / wall for b in busy]
                    res["allreduce_ms_per_step"] = [1e3 * x["allreduce_s"] / steps for x in res["ranks"]]
                    line += "; idle share per rank " + ", ".join(f"{x:.0%}" for x in res["idle_share"])
                    if flag == "--tp":
                        line += "; all-reduce per step " + ", ".join(f"{x:.1f}" for x in res["allreduce_ms_per_step"]) \
                            + f" ms ({res['ranks'][0]['allreduces'] // steps} per step)"
                print(line, flush=True)
    for batch in (1, a.batch):
        base = {r["round"]: r["tok_s"] for r in rows if r["ok"] and r["side"] == "single" and r["batch"] == batch}
        for name in ("tp2", "pp2", "pp2-no-micro"):
            rs = [r["tok_s"] / base[r["round"]] for r in rows
                  if r["ok"] and r["side"] == name and r["batch"] == batch and r["round"] in base]
            if rs:
                print(f"batch {batch}: {name} / single = {common.median(rs):.2f}x")
    return rows


def smoke(a) -> int:
    with tempfile.TemporaryDirectory() as d:
        ck = Path(d) / "gptj"
        r = subprocess.run([sys.executable, str(Path(__file__).with_name("make_checkpoint.py")), "--preset",
                            "gptj-tiny", "--dtype", "float32", "--out", str(ck)], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-2000:])
            return 1
        a.ckpt, a.rounds, a.batch, a.new_tokens, a.prompt_len, a.dtype = str(ck), 1, 2, 4, 8, "float32"
        a.out = str(Path(d) / "rows.jsonl")
        rows = part_1b(a)
        a.rank_budget, a.single_budget, a.drop_caches = "cpu=1GiB", "cpu=1GiB", False
        rows += part_6b(a)
        bad = [r for r in rows if not r["ok"]]
        print(f"smoke: {len(rows) - len(bad)} of {len(rows)} runs ok")
        return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("6b", "1b"), default="1b")
    p.add_argument("--ckpt", default=None, help="checkpoint (default bench-cache/gptj-6b-bfloat16 or gptj-1b-bfloat16)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=None, help="default 4 (6b) or 16 (1b)")
    p.add_argument("--batch", type=int, default=8, help="1b: the larger batch (batch 1 always runs)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rank-budget", default="cpu=5GiB", help="6b: each pp rank's --max-memory")
    p.add_argument("--rank-cgroup", default="6GiB", help="6b: each pp rank's memory cgroup limit")
    p.add_argument("--single-budget", default="cpu=4GiB", help="6b: the single process's --max-memory")
    p.add_argument("--single-cgroup", default="6GiB", help="6b: the single process's memory cgroup limit")
    p.add_argument("--budget-1b", default="cpu=8GiB", help="1b: every rank's and the single process's budget")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per side")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--smoke", action="store_true", help="every side on a tiny random GPT-J in seconds; measures nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--max-memory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.new_tokens is None:
        a.new_tokens = 4 if a.part == "6b" else 16
    if a.worker:
        worker(a)
        return 0
    if a.smoke:
        return smoke(a)
    rows = part_6b(a) if a.part == "6b" else part_1b(a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps({"part": a.part, "time": stamp, **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
