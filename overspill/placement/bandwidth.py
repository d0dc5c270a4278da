"""Quick bandwidth probes: host memory, disk, host->device, matmul.

They feed `Plan.predict` (see planner.py). Each probe is short (well under a second with the
defaults `measure` uses) and reports a median or a wall-clock aggregate, so run-to-run noise on a
shared VM (+-25% here, see shared/anchors/RESULTS.md) is damped but not hidden.

Units: GB/s means 1e9 bytes per second; TFLOP/s means 1e12 floating point operations per second.
"""
from __future__ import annotations

import dataclasses
import json
import mmap
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from .planner import Bandwidths

_ALIGN = 4096  # O_DIRECT offset/length/buffer alignment that every common filesystem accepts
DISK_SAMPLES = 3                 # measure(): disk reads of distinct regions, median taken
DISK_SAMPLE_BYTES = 384 << 20   # about one GPT-J-6B block: short reads run slower here (ramp-up)
CACHE_PATH = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "overspill" / "bandwidth.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mem_read_gbps(nbytes: int = 1 << 30, reps: int = 5, device: str = "cpu") -> float:
    """Median read-only bandwidth of `device` memory in GB/s: bf16 `.sum()` over an `nbytes` buffer.

    `nbytes` should be far larger than the last-level cache (32 MiB L3 here) or the number is a
    cache bandwidth. One untimed warm-up pass faults the pages in.
    """
    dev = torch.device(device)
    buf = torch.ones(max(nbytes // 2, 1), dtype=torch.bfloat16, device=dev)
    buf.sum()  # warm-up
    _sync(dev)
    times = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        buf.sum()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    nb = buf.numel() * buf.element_size()
    del buf
    return nb / statistics.median(times) / 1e9


# ---------------------------------------------------------------------------------------------
# disk


def _segments(paths: list[str], max_bytes: int, threads: int, skip: int = 0) -> list[list[tuple[str, int, int]]]:
    """Split `max_bytes` of the concatenated files, from byte `skip` on, into `threads` contiguous pieces.

    Returns per thread a list of (path, offset, length); offsets are _ALIGN-aligned.
    The region starts in the file where byte `skip` falls, at the aligned offset at or before it.
    """
    sizes = []
    for p in paths:                      # drop whole files, then the head of the first kept one, before `skip`
        size = os.path.getsize(p)
        if skip >= size:
            skip -= size
            continue
        sizes.append((p, size, skip // _ALIGN * _ALIGN))
        skip = 0
    total = min(max_bytes, sum(s - o for _, s, o in sizes))
    per = max(_ALIGN, -(-total // max(threads, 1) // _ALIGN) * _ALIGN)
    out: list[list[tuple[str, int, int]]] = []
    cur: list[tuple[str, int, int]] = []
    room, left = per, total
    for p, size, off in sizes:
        while off < size and left > 0:
            n = min(size - off, room, left)
            if off + n < size and n < left:  # a cut where reading resumes must stay aligned (O_DIRECT)
                n = n // _ALIGN * _ALIGN
            if n > 0:
                cur.append((p, off, n))
                off, room, left = off + n, room - n, left - n
            if n == 0 or room == 0:
                if cur:
                    out.append(cur)
                cur, room = [], per
        if left <= 0:
            break
    if cur:
        out.append(cur)
    while len(out) > max(threads, 1):  # rounding can leave a small extra piece: give it to the last reader
        extra = out.pop()                # (not `out[-2] += out.pop()`: that target is taken before the pop)
        out[-1] += extra
    return out


def _direct_ok(path: str) -> bool:
    """Whether `path` can be opened and read with O_DIRECT (not on tmpfs, not on macOS...)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    buf = mmap.mmap(-1, _ALIGN)
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return False
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        buf.close()


def _evict(path: str) -> None:
    """Drop `path` from the page cache (best effort; does not work for pages someone maps)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_segments(segs: list[tuple[str, int, int]], direct: bool, block: int, counts: list[int],
                   idx: int, start: threading.Barrier, errors: list[BaseException]) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT requires
    mv = memoryview(buf)
    got = 0
    try:
        fds = {p: os.open(p, flags) for p in dict.fromkeys(p for p, _, _ in segs)}
        try:
            start.wait()
            for p, off, n in segs:
                pos, end = off, off + n
                while pos < end:
                    want = min(block, end - pos)
                    rlen = -(-want // _ALIGN) * _ALIGN if direct else want
                    r = os.preadv(fds[p], [mv[:rlen]], pos)
                    if r <= 0:
                        break
                    got += min(r, want)
                    pos += min(r, want)
                    if r < rlen and pos < end:  # short read: end of file
                        break
        finally:
            for fd in fds.values():
                os.close(fd)
    except BaseException as e:  # noqa: BLE001 - reported to the caller thread
        errors.append(e)
        try:
            start.abort()
        except threading.BrokenBarrierError:
            pass
    finally:
        counts[idx] = got
        mv.release()
        buf.close()


def disk_read_gbps(paths: list[str] | str, max_bytes: int = 2 << 30, threads: int = 4,
                   direct: bool = True, block: int = 16 << 20, skip: int = 0) -> float:
    """Sequential read bandwidth (GB/s) of existing files, `threads` readers in parallel.

    `max_bytes` of the files from byte `skip` on (taken in order, as one concatenated stream) are split into
    `threads` contiguous ranges, one reader thread each, reading `block` bytes per call. With
    `direct`, files are opened with O_DIRECT into page-aligned (mmap) buffers so the page cache
    cannot fake the number; where the filesystem refuses O_DIRECT the files are read buffered,
    evicted with posix_fadvise(DONTNEED) before (so the read is cold) and after (so the probe
    leaves the cache as it found it, mapped pages excepted).
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("disk_read_gbps needs at least one existing file")
    block = max(_ALIGN, block // _ALIGN * _ALIGN)
    direct = direct and _direct_ok(paths[0])
    if not direct:
        for p in paths:
            _evict(p)
    plan = _segments(paths, max_bytes, threads, skip)
    counts = [0] * len(plan)
    errors: list[BaseException] = []
    start = threading.Barrier(len(plan) + 1)
    workers = [threading.Thread(target=_read_segments, args=(segs, direct, block, counts, i, start, errors),
                                daemon=True) for i, segs in enumerate(plan)]
    for w in workers:
        w.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    dt = time.perf_counter() - t0
    if not direct:
        for p in paths:
            _evict(p)
    if errors:
        raise errors[0]
    total = sum(counts)
    if total == 0:
        raise ValueError(f"disk_read_gbps read nothing from {paths[0]} (empty files?)")
    return total / max(dt, 1e-9) / 1e9


def runtime_read_gbps(paths: list[str], max_bytes: int, skip: int = 0, buf: torch.Tensor | None = None) -> float:
    """Cold read bandwidth (GB/s) of `max_bytes` of the files from byte `skip` on, read the way the streaming runtime
    reads a unit: O_DIRECT (else buffered, evicted before and after) 8 MiB chunks through its pool of reader threads
    into an aligned buffer (overspill/io.py). `buf` (uint8, aligned, at least max_bytes + 4 KiB per file crossed) is
    reused when given. On this VM it reads 15-25% faster than 4 threads on 4 distant regions
    (disk_read_gbps), and so predicts streaming where that underestimates it."""
    from ..io import ALIGN, DirectFile, aligned_buffer, evict, read_pool
    pieces = [x for piece in _segments(paths, max_bytes, 1, skip) for x in piece]
    span = lambda n: -(-n // ALIGN) * ALIGN
    need = sum(span(n) for _, _, n in pieces)
    if buf is None or buf.numel() < need:
        buf = aligned_buffer(need)
    files = {p: DirectFile(p) for p in dict.fromkeys(p for p, _, _ in pieces)}
    try:
        for f in files.values():
            if not f.direct:
                evict(f.fd)
        pos, t0 = 0, time.perf_counter()
        for p, off, n in pieces:
            files[p].read_many([(buf[pos: pos + span(n)], off, n)], read_pool())
            pos += span(n)
        dt = time.perf_counter() - t0
    finally:
        for f in files.values():
            f.close()
    return sum(n for _, _, n in pieces) / max(dt, 1e-9) / 1e9


# ---------------------------------------------------------------------------------------------
# GPU and compute


def h2d_gbps(device: str = "cuda:0", nbytes: int = 256 << 20, reps: int = 5) -> float | None:
    """Median pinned host -> `device` copy bandwidth in GB/s; None when CUDA is not available."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst.copy_(src, non_blocking=True)  # warm-up
    torch.cuda.synchronize(dev)
    times = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def matmul_tflops(dtype: torch.dtype = torch.bfloat16, m: int = 512, n: int = 4096, k: int = 4096,
                  reps: int = 3, device: str = "cpu") -> float:
    """Median dense matmul throughput in TFLOP/s: `F.linear(x[m,k], w[n,k])`, 2*m*n*k flops.

    `F.linear` (weight [n, k], the Hugging Face layout) is the fast path on CPU oneDNN (2x `x @ w`
    in bf16 on this machine, see RESULTS.md).
    """
    dev = torch.device(device)
    x = torch.randn(m, k, device=dev).to(dtype)
    w = torch.randn(n, k, device=dev).to(dtype)
    torch.nn.functional.linear(x, w)  # warm-up
    _sync(dev)
    times = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return 2 * m * n * k / statistics.median(times) / 1e12


# ---------------------------------------------------------------------------------------------
# all probes, cached


def _disk_name(path: str) -> str:
    """Block device name holding `path` ("vda", "nvme0n1p2"), or "dev<major>:<minor>"."""
    st = os.stat(path)
    mm = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    sys_path = Path("/sys/dev/block") / mm
    try:
        return sys_path.resolve().name
    except OSError:
        return f"dev{mm}"


def _cache_key(probe_path: str) -> str:
    return f"{socket.gethostname()}|{_disk_name(probe_path)}"


def _load_cache() -> dict:
    try:
        return json.loads(CACHE_PATH.read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(data: dict) -> None:
    try:
        CACHE_PATH.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE_PATH.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, CACHE_PATH)
    except OSError:
        pass


def _model_files(model_paths) -> list[str]:
    """Files under `model_paths` (files or directories), weight files first, largest first."""
    if model_paths is None:
        return []
    items = [model_paths] if isinstance(model_paths, (str, os.PathLike)) else list(model_paths)
    files: list[str] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            files += [str(f) for f in sorted(p.rglob("*")) if f.is_file()]
        elif p.is_file():
            files.append(str(p))
    weights = [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf"))]
    chosen = weights or files
    return sorted(chosen, key=lambda f: (-os.path.getsize(f), f))


def _probe_file(dirpath: Path, nbytes: int) -> str:
    """Write a scratch file of `nbytes` (fsync'd, then evicted) to probe the disk with."""
    dirpath.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="diskprobe-", dir=dirpath)
    try:
        chunk = os.urandom(1 << 20) * 16  # incompressible enough; 16 MiB
        left = nbytes
        while left > 0:
            left -= os.write(fd, chunk[:min(left, len(chunk))])
        os.fsync(fd)
    finally:
        os.close(fd)
    _evict(name)
    return name


def measure(model_paths=None, cache: bool = True, device: str | None = None) -> Bandwidths:
    """Run the quick probes (a few seconds at most) and return a `Bandwidths`.

    The disk probe reads the model's own files when `model_paths` (files or directories) is given,
    otherwise a scratch file written next to the cache. Results are cached in
    ~/.cache/overspill/bandwidth.json, keyed by hostname and the block device of the probed files;
    `cache=False` re-measures (and refreshes the cache). `device` is the GPU to probe (default
    cuda:0 when CUDA is available).
    """
    files = _model_files(model_paths)
    probe_dir = CACHE_PATH.parent
    probe_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(files[0] if files else str(probe_dir))
    if device is None and torch.cuda.is_available():
        device = "cuda:0"
    if device is not None:
        key += f"|{device}"
    data = _load_cache()
    if cache and key in data:
        fields = {f.name for f in dataclasses.fields(Bandwidths)}
        return Bandwidths(**{k: v for k, v in data[key].items() if k in fields})

    # This kind of machine (a VM on shared hardware) swings 2x in memory and disk bandwidth over seconds: one
    # short probe of each predicted runs 40% off. So: the median of DISK_SAMPLES disk reads of distinct regions of
    # the model's files (a re-read could be served by a host-side cache), each read the way the runtime streams a
    # unit, with a memory probe around each.
    mems = [mem_read_gbps(256 << 20, reps=5)]
    disks = []
    scratch = None
    try:
        if not files:
            scratch = _probe_file(probe_dir, 128 << 20)
            files = [scratch]
        region = min(DISK_SAMPLE_BYTES, max(_ALIGN, sum(os.path.getsize(f) for f in files) // DISK_SAMPLES))
        from ..io import aligned_buffer
        buf = aligned_buffer(region + _ALIGN * len(files))
        for i in range(DISK_SAMPLES):   # disjoint regions (on a small model or the scratch file, smaller ones)
            disks.append(runtime_read_gbps(files, region, skip=i * region, buf=buf))
            mems.append(mem_read_gbps(256 << 20, reps=5))
        del buf
    finally:
        if scratch:
            os.unlink(scratch)
    mem, disk = statistics.median(mems), statistics.median(disks)
    h2d = gpu_mem = None
    tflops_dev = "cpu"
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        h2d = h2d_gbps(device)
        gpu_mem = mem_read_gbps(1 << 30, reps=5, device=device)
        tflops_dev = device
    tflops = matmul_tflops(device=tflops_dev, reps=3)
    bw = Bandwidths(mem_gbps=mem, disk_gbps=disk, h2d_gbps=h2d, gpu_mem_gbps=gpu_mem, matmul_tflops=tflops)
    data[key] = dataclasses.asdict(bw) | {"measured_at": time.time()}
    _save_cache(data)
    return bw
