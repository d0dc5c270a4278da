"""Pieces shared by the benchmarks: memory figures, page-cache control, memory cgroups, worker
subprocesses, medians and interleaving, and how many weight bytes one decode step must read.

Method (benchmarks/RESULTS.md): this VM's speed drifts 2-10x for tens of seconds, so systems
are compared interleaved in one run (A, B, A, B, ...), each run in a fresh worker process, and
medians and paired ratios are quoted. Bounds use bandwidths measured in the same run.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import time
import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / "bench-cache"
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

CGROUP_MEMORY_ROOT = Path("/sys/fs/cgroup/memory")


# ---------------------------------------------------------------------------------------------
# memory and page cache


def _status_kib(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM): anonymous memory plus touched file pages,
    so mmap'd weights count once read."""
    return _status_kib("VmHWM") * 1024


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def page_cache_bytes() -> int:
    """`Cached` from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return -1


def drop_caches() -> bool:
    """sync, then drop the page cache (needs root). Warns and returns False where not permitted.
    Pages a live process still maps are not dropped."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        warnings.warn(f"could not drop the page cache ({e}); the next reads may be served from memory")
        return False


# ---------------------------------------------------------------------------------------------
# memory cgroup (v1)
#
#   /sys/fs/cgroup/memory/<our cgroup>/            this process (no limit)
#                        └── <name>/               memory.limit_in_bytes = limit
#                              cgroup.procs  <──── the worker writes its own PID before exec
#
# Charges include the page cache the worker's reads bring in, so a limit also bounds how much of
# a checkpoint can stay cached: the honest "bigger than memory" set-up (with drop_caches first).


def own_memory_cgroup() -> Path:
    """The v1 memory cgroup directory this process belongs to."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return CGROUP_MEMORY_ROOT / path.lstrip("/")
    raise RuntimeError("no v1 memory cgroup for this process (is /sys/fs/cgroup/memory mounted?)")


def make_cgroup(name: str, limit_bytes: int) -> Path:
    """Create (or reuse) child cgroup `name` of our own memory cgroup with a hard limit; returns its
    path. Pair with `remove_cgroup`."""
    path = own_memory_cgroup() / name
    path.mkdir(exist_ok=True)
    (path / "memory.limit_in_bytes").write_text(f"{int(limit_bytes)}\n")
    try:  # reset the high-water mark and failure count of a reused group
        (path / "memory.max_usage_in_bytes").write_text("0\n")
        (path / "memory.failcnt").write_text("0\n")
    except OSError:
        pass
    return path


def cgroup_stats(path: Path) -> dict:
    """Limit, peak usage, failcnt and OOM kills of a v1 memory cgroup."""
    def read_int(f: str) -> int | None:
        try:
            return int((path / f).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    oom = {}
    try:
        for line in (path / "memory.oom_control").read_text().splitlines():
            k, v = line.split()
            oom[k] = int(v)
    except (OSError, ValueError):
        pass
    return {"limit_bytes": read_int("memory.limit_in_bytes"),
            "max_usage_bytes": read_int("memory.max_usage_in_bytes"),
            "failcnt": read_int("memory.failcnt"),
            "oom_kill": oom.get("oom_kill"),  # absent on kernels older than 4.13
            "under_oom": oom.get("under_oom")}


def remove_cgroup(path: Path) -> None:
    """Move any leftover tasks to the parent, then rmdir (charges move to the parent)."""
    try:
        pids = (path / "cgroup.procs").read_text().split()
        for pid in pids:
            try:
                (path.parent / "cgroup.procs").write_text(pid + "\n")
            except OSError:
                pass
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        warnings.warn(f"could not remove cgroup {path}: {e}")


class MemoryCgroup:
    """`with MemoryCgroup("bench-6b", 6 << 30) as cg: run_worker(cmd, cgroup=cg.path)`."""

    def __init__(self, name: str, limit_bytes: int):
        self.name, self.limit_bytes = name, limit_bytes
        self.path: Path | None = None

    def __enter__(self) -> "MemoryCgroup":
        self.path = make_cgroup(self.name, self.limit_bytes)
        return self

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            remove_cgroup(self.path)

    def stats(self) -> dict:
        return cgroup_stats(self.path)


def _join_cgroup(path: Path):
    """A preexec_fn: runs in the child after fork, before exec, so the worker starts charged to
    the cgroup (everything it allocates or reads counts)."""
    procs = str(Path(path) / "cgroup.procs")

    def join() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    return join


# ---------------------------------------------------------------------------------------------
# workers


class WorkerError(RuntimeError):
    def __init__(self, cmd: Sequence[str], returncode: int, stderr_tail: str, cgroup: dict | None):
        self.cmd, self.returncode, self.stderr_tail, self.cgroup = list(cmd), returncode, stderr_tail, cgroup
        oom = f", cgroup {cgroup}" if cgroup else ""
        super().__init__(f"worker exited {returncode}{oom}: {shlex.join(cmd)}\n{stderr_tail}")


def run_worker(cmd: Sequence[str], cgroup: str | Path | None = None, timeout: float | None = None,
               check: bool = True, env: dict | None = None) -> dict:
    """Run `cmd` (a worker whose last stdout line is one JSON object) and return that object.

    With `cgroup` (a path from make_cgroup) the worker runs inside it and the result gains
    `cgroup`: its peak usage, failcnt and OOM kills. On failure raises WorkerError, or with
    check=False returns {"ok": False, "returncode", "stderr_tail", "cgroup"}.
    """
    before = cgroup_stats(Path(cgroup)) if cgroup else None
    try:
        proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=timeout, env=env,
                              preexec_fn=_join_cgroup(Path(cgroup)) if cgroup else None)
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        returncode = -9
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")) + \
            f"\n[timed out after {timeout} s]"
    cg = None
    if cgroup:
        cg = cgroup_stats(Path(cgroup))
        if before and before.get("oom_kill") is not None and cg.get("oom_kill") is not None:
            cg["oom_kill_during_run"] = cg["oom_kill"] - before["oom_kill"]
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    result = None
    if returncode == 0 and lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    if result is None:
        tail = "\n".join(stderr.splitlines()[-25:])
        if returncode == 0:
            returncode, tail = -1, tail + "\n[worker printed no JSON line last]"
        if check:
            raise WorkerError(cmd, returncode, tail, cg)
        return {"ok": False, "returncode": returncode, "stderr_tail": tail, "cgroup": cg}
    result.setdefault("ok", True)
    if cg is not None:
        result["cgroup"] = cg
    return result


def emit(result: dict) -> None:
    """A worker's last act: print its result as one JSON line on stdout."""
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# statistics and interleaving


def median(xs: Iterable[float | None]) -> float:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else float("nan")


def fmt(x, spec: str = ".3g") -> str:
    """A figure for a table: "-" for a missing or NaN value."""
    return "-" if x is None or x != x else format(x, spec)


def med_of(rows: list[dict], key: str, sub: str | None = None):
    """The median of rows[i][key] (or rows[i][key][sub]) over the rows that have it; None when none do."""
    vals = [(r.get(key) or {}).get(sub) if sub else r.get(key) for r in rows]
    vals = [v for v in vals if v is not None]
    return median(vals) if vals else None


def interleave(sides: Sequence[str], repeats: int) -> Iterator[tuple[int, str]]:
    """(round, side) in the order A, B, A, B, ...: every side runs once per round, so drift that
    lasts tens of seconds hits both sides alike."""
    for r in range(repeats):
        for side in sides:
            yield r, side


def paired_ratios(rows: Sequence[dict], key: str, num: str, den: str) -> list[float]:
    """Per-round ratio rows[side=num][key] / rows[side=den][key], for rounds where both ran."""
    by_round: dict[int, dict[str, float]] = {}
    for r in rows:
        if r.get("ok", True) and r.get(key) is not None:
            by_round.setdefault(r["round"], {})[r["side"]] = r[key]
    return [d[num] / d[den] for d in by_round.values() if num in d and den in d and d[den]]


# ---------------------------------------------------------------------------------------------
# bandwidth probes (overspill's own; imported, not copied)


def mem_read_gbps(nbytes: int = 1 << 30, reps: int = 5) -> float:
    from overspill.placement.bandwidth import mem_read_gbps as probe
    return probe(nbytes, reps)


def disk_read_gbps(paths: Sequence[str | Path], max_bytes: int = 2 << 30, threads: int = 4,
                   direct: bool = True) -> float:
    from overspill.placement.bandwidth import disk_read_gbps as probe
    return probe([str(p) for p in paths], max_bytes=max_bytes, threads=threads, direct=direct)


def disk_write_gbps(directory: str | Path, nbytes: int = 1 << 30, block: int = 16 << 20) -> float:
    """Sequential write bandwidth (GB/s) of the disk holding `directory`, written the way a layer store's unit files
    are (`overspill convert`): `nbytes` of random bytes to a scratch file in `block`-sized buffered writes, timed up
    to the end of its fsync. The file is removed; at most `nbytes` is written (overspill's bandwidth module only
    probes reads)."""
    import tempfile

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(min(block, max(nbytes, 1)))
    fd, name = tempfile.mkstemp(prefix="diskwrite-", dir=directory)
    try:
        left = max(nbytes, 1)
        t0 = time.perf_counter()
        while left > 0:
            left -= os.write(fd, chunk[:min(left, len(chunk))])
        os.fsync(fd)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(name)
    return max(nbytes, 1) / max(dt, 1e-9) / 1e9


# ---------------------------------------------------------------------------------------------
# checkpoint byte accounting (safetensors headers only)

# Per model_type: (token embedding, position embedding or None, head names as stored). A decode
# step gathers one row of each embedding table, but reads the whole head matrix.
EMBEDDINGS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "gptj": ("transformer.wte.weight", None, ("lm_head.weight",)),
    "gpt2": ("transformer.wte.weight", "transformer.wpe.weight", ("lm_head.weight",)),
    "gpt_neox": ("gpt_neox.embed_in.weight", None, ("embed_out.weight", "lm_head.weight")),
    "llama": ("model.embed_tokens.weight", None, ("lm_head.weight",)),
}


def safetensors_files(ckpt_dir: str | Path) -> list[Path]:
    d = Path(ckpt_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [d / f for f in dict.fromkeys(weight_map.values())]
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {d}")


def safetensors_header(path: str | Path) -> dict:
    """The JSON header of one safetensors file (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def tensor_bytes(ckpt_dir: str | Path) -> dict[str, int]:
    """Stored bytes of every tensor in the checkpoint, from the headers alone."""
    out = {}
    for f in safetensors_files(ckpt_dir):
        for name, info in safetensors_header(f).items():
            start, end = info["data_offsets"]
            out[name] = end - start
    return out


def read_config(ckpt_dir: str | Path) -> dict:
    return json.loads((Path(ckpt_dir) / "config.json").read_text())


def weight_bytes_per_token(ckpt_dir: str | Path) -> int:
    """Bytes a decode step must read: every tensor except the token and position embedding
    tables, plus the head matrix; with tied embeddings the embedding matrix counts once, as the
    head. Read from the safetensors headers only."""
    sizes = tensor_bytes(ckpt_dir)
    model_type = read_config(ckpt_dir).get("model_type", "")
    if model_type not in EMBEDDINGS:
        raise KeyError(f"unknown model_type {model_type!r}: add its embedding names to EMBEDDINGS")
    tok, pos, heads = EMBEDDINGS[model_type]
    if tok not in sizes:
        raise KeyError(f"{tok} not in checkpoint {ckpt_dir}")
    total = sum(sizes.values()) - sizes[tok] - (sizes.get(pos, 0) if pos else 0)
    if not any(h in sizes for h in heads):  # tied: the embedding matrix is the head
        total += sizes[tok]
    return total


def kv_bytes_per_token(ckpt_dir: str | Path, bytes_per_elem: int = 2) -> int:
    """KV-cache bytes one token adds (per sequence): layers x 2 x kv_heads x head_dim x elem."""
    c = read_config(ckpt_dir)
    layers = c.get("num_hidden_layers") or c.get("n_layer")
    hidden = c.get("hidden_size") or c.get("n_embd")
    heads = c.get("num_attention_heads") or c.get("n_head")
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    return layers * 2 * kv_heads * head_dim * bytes_per_elem


def hf_generate_timed(model, prompts: list[list[int]], new_tokens: int, device=None) -> tuple["object", list[float], float]:
    """Greedy transformers generate of exactly ``new_tokens`` tokens, stamping the time each token
    appears (a StoppingCriteria is called once per step). Returns (output ids, stamps, start time).
    ``device``: where the inputs go (the model's); on CUDA each stamp waits for the step's kernels."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    cuda = device is not None and torch.device(device).type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    class Stamp(StoppingCriteria):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kw):
            sync()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ids = torch.tensor(prompts, device=device)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id
        pad = (pad[0] if isinstance(pad, list) else pad) or 0
    stamp = Stamp()
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True,
                             pad_token_id=pad, stopping_criteria=StoppingCriteriaList([stamp]))
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    assert len(stamp.times) == new_tokens, (len(stamp.times), new_tokens)
    return out, stamp.times, t0


def append_jsonl(path, row: dict) -> None:
    """Append one result row (raw rows are kept per run so nothing is lost if a later run fails).
    Creates the file's directory: a fresh clone has no bench-cache/results/."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# smoke mode: every script's --smoke runs its whole path on tiny random checkpoints in seconds
#
#   tempdir/                      made fresh, removed at the end (--keep leaves it)
#     ckpt/<preset>/              tiny checkpoints written by make_checkpoint.py's function
#     cache/                      XDG_CACHE_HOME: overspill's bandwidth cache stays out of ~/.cache
#     bench-cache/results/*.jsonl the default --out: a directory that does not exist yet, as in a fresh clone
#
# A smoke run measures nothing: it checks that the benchmark runs, from a fresh clone, as its README says.


class Smoke:
    """`with common.Smoke(keep=False) as sm: ckpt = sm.checkpoint("llama-tiny")`."""

    def __init__(self, keep: bool = False):
        self.keep = keep
        self.dir: Path | None = None

    def __enter__(self) -> "Smoke":
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="overspill-smoke-"))
        os.environ["XDG_CACHE_HOME"] = str(self.dir / "cache")   # before overspill's probes are imported
        print(f"smoke: scratch in {self.dir}" + ("" if self.keep else " (removed at the end)"), file=sys.stderr,
              flush=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.keep:
            print(f"smoke: kept {self.dir}", file=sys.stderr)
        else:
            import shutil
            shutil.rmtree(self.dir, ignore_errors=True)

    def out(self, name: str) -> Path:
        """Default results file of a smoke run: under a results directory that does not exist yet."""
        return self.dir / "bench-cache" / "results" / name

    def checkpoint(self, preset: str, dtype: str = "bfloat16") -> Path:
        """A tiny random checkpoint (make_checkpoint.py's PRESETS), written once per smoke run."""
        from make_checkpoint import DTYPES, PRESETS, make_checkpoint

        out = self.dir / "ckpt" / f"{preset}-{dtype}"
        if not (out / "config.json").exists():
            arch, fields = PRESETS[preset]
            make_checkpoint(out, arch, dict(fields), DTYPES[dtype], 1 << 30, seed=0, log=lambda msg: None)
        return out


def bf16_matmul_ok() -> bool:
    """Whether oneDNN runs bf16 matmuls on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    import torch

    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return probe is None or probe()


def compute_dtype(fallback: str = "running in float32") -> str:
    """bfloat16 where this CPU runs bf16 matmuls, else float32, saying so with `fallback`: smoke runs use it so they
    run on any x86-64 CPU."""
    if bf16_matmul_ok():
        return "bfloat16"
    print(f"this CPU has no bf16 matmul in oneDNN (AVX-512 BW/VL/DQ or AVX-NE-CONVERT): {fallback}",
          file=sys.stderr, flush=True)
    return "float32"


def smoke_check(path, min_runs: int = 1) -> list[dict]:
    """After a smoke run: the results file holds rows and every run in it succeeded; prints one line."""
    rows = read_jsonl(path)
    runs = [r for r in rows if r.get("kind", "run") == "run"]
    failed = [r for r in runs if r.get("ok") is False]
    print(f"smoke: {len(rows)} rows ({len(runs)} runs, {len(failed)} failed) in {path}", flush=True)
    if failed or len(runs) < min_runs:
        raise SystemExit(f"smoke: FAILED: {len(failed)} failed runs, {len(runs)} runs (need {min_runs})")
    return rows
