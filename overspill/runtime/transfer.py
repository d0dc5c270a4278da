"""Moving unit weights onto the device that computes them (an accelerator), overlapped with compute.

A unit whose weights live elsewhere than where it computes (host RAM or disk, computing on cuda:N) is copied
to the device for every forward. The streaming reader thread makes the copy on a side stream right after it has
the host bytes, and records an event; the compute stream waits on that event (not the Python thread), so the
copy of unit i+1 runs while unit i computes, as the host->device stage of FlexGen's and accelerate's offload.

Device-agnostic: on a CUDA device the copy is asynchronous from pinned memory; on any other device it is a plain
synchronous copy (``copy=True``, so tests on the CPU exercise the same path with real copies).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time

import torch

from ..errors import OverspillError
from ..io import is_pinned
from ..model.linear import DenseLinear


def map_tensors(obj, fn):
    """``obj`` (a unit's tensor dict, a Weights dataclass, a tuple, a DenseLinear) with every tensor replaced by
    fn(tensor). Only dense linears can move: packed and quantized linears are CPU kernels' layouts."""
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    if isinstance(obj, DenseLinear):
        return DenseLinear(fn(obj.weight), map_tensors(obj.bias, fn))
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)})
    raise OverspillError(f"{type(obj).__name__} weights cannot move to an accelerator (dense weights only)")


def pack(obj, pin: bool):
    """``obj`` with its tensors copied into one ALIGN-aligned host buffer (pinned where CUDA is used), and that
    buffer (release it with io.unpin). Tensors keep 64-byte-aligned offsets."""
    from ..io import aligned_buffer
    ts = tensors(obj)
    size = lambda t: -(-t.numel() * t.element_size() // 64) * 64
    buf = aligned_buffer(sum(size(t) for t in ts), pin)
    off = 0

    def put(t: torch.Tensor) -> torch.Tensor:
        nonlocal off
        n = t.numel() * t.element_size()
        v = buf[off: off + n].view(t.dtype).view(t.shape)
        v.copy_(t)
        off += size(t)
        return v
    return map_tensors(obj, put), buf


def tensors(obj):
    """Every tensor in ``obj`` (as map_tensors walks it)."""
    found: list[torch.Tensor] = []
    map_tensors(obj, lambda t: found.append(t) or t)
    return found


class DeviceCopier:
    """Copies a fetched unit onto ``device`` from the reader thread; the compute side waits for it.

    ``stats`` (read them with read_stats(), which first sums the copies still in flight): copies / copy_bytes, the
    units and bytes copied; pageable_bytes, those copied from unpinned host memory (CUDA makes such a copy
    synchronous with the reader thread: it cannot run ahead); issue_s, reader-thread time spent issuing copies.
    CUDA, timed with events on the GPU: copy_s, the copies on the side stream; stall_s, the compute stream waiting
    for a copy. copy_s - stall_s is copy time hidden behind compute (or done ahead of it, while the host was busy
    elsewhere). On other devices copies are synchronous: copy_s is the time they took and stall_s stays 0."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.stats = {"copies": 0, "copy_bytes": 0, "pageable_bytes": 0, "issue_s": 0.0, "copy_s": 0.0, "stall_s": 0.0}
        self._timed: collections.deque = collections.deque()   # (stat, start event, end event), not yet summed
        self._lock = threading.Lock()   # the reader thread adds copies, the compute thread waits

    def _time(self, key: str | None, start, end, block: bool = False) -> None:
        """Queue an event pair timing ``key``; sum every pair that has completed (all of them when block)."""
        with self._lock:
            if key is not None:
                self._timed.append((key, start, end))
            while self._timed and (block or self._timed[0][2].query()):
                k, a, b = self._timed.popleft()
                b.synchronize()
                self.stats[k] += a.elapsed_time(b) / 1e3

    def read_stats(self) -> dict:
        """A copy of ``stats`` with every copy and wait issued so far summed (waits for them on CUDA)."""
        if self.cuda:
            self._time(None, None, None, block=True)
        return dict(self.stats)

    def copy(self, obj):
        """Reader thread: -> (obj on the device, event or None)."""
        t0 = time.perf_counter()
        ts = tensors(obj)
        self.stats["copies"] += 1
        self.stats["copy_bytes"] += sum(t.numel() * t.element_size() for t in ts)
        if not self.cuda:
            out = map_tensors(obj, lambda t: t.to(self.device, copy=True))
            self.stats["issue_s"] += time.perf_counter() - t0
            self.stats["copy_s"] += time.perf_counter() - t0
            return out, None
        self.stats["pageable_bytes"] += sum(t.numel() * t.element_size() for t in ts
                                            if t.device.type == "cpu" and not is_pinned(t))
        start, ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            out = map_tensors(obj, lambda t: t.to(self.device, non_blocking=True, copy=True))
            ev.record(self.stream)
        self.stats["issue_s"] += time.perf_counter() - t0
        self._time("copy_s", start, ev)
        return out, ev

    def compute_done(self):
        """Compute thread, after a unit's kernels are queued: an event the reader waits on before it reuses the
        unit's ring slot, so at most ring_slots device copies exist, as the plan counts, even when the GPU runs
        behind the Python thread (the caching allocator would otherwise hand out fresh memory for every copy)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def ready(self, obj, ev) -> None:
        """Compute thread, before using obj: order the compute stream after the copy, and tell the caching
        allocator the copies are used there (they were allocated on the copy stream)."""
        if ev is None:
            return
        cur = torch.cuda.current_stream(self.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(cur)
        cur.wait_event(ev)
        after.record(cur)   # before -> after: how long the compute stream stalled for this copy
        self._time("stall_s", before, after)
        for t in tensors(obj):
            t.record_stream(cur)
