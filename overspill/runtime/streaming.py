"""Streaming weights: a background reader keeps a ring of staging buffers filled ahead of compute.

    units:   embed  b0  b1  b2  b3 ... b27  head          (R = resident, S = streamed)
             R      R   R   S   S  ...  S    S
                           |
    reader thread ─────────┘  for u in cycle(streamed units):      compute thread
      slot = free.get()          read u's bytes into slot ──► ready ──► acquire(u): views -> Linear objects
                                                                      (in-place layout conversion)
      (blocks while the ring       (one large read, several          run unit u
       is full: stays ring_slots   threads, O_DIRECT or            release(u): free.put(slot)
       units ahead)                evicted from the page cache)

The reader walks the streamed units cyclically, so while the last blocks and the head of
token t run, the first streamed blocks of token t+1 are already being read. Memory held:
``ring_slots`` x the largest streamed unit (a layer store: allocated once; an HF directory: allocated per fetch,
plus one unit's transform copies, which the plan counts as one more slot); nothing else grows per token.
"""
from __future__ import annotations

import queue
import threading
import time
import weakref
from typing import Callable, Protocol, Sequence

import torch

from ..config import ModelConfig
from ..errors import OverspillError
from ..kernels import transient
from ..model.linear import DenseLinear
from ..model.weights import Weights, bind
from ..io import ALIGN, DirectFile, aligned_buffer, read_pool, unpin
from .background import BackgroundLoad


class UnitReader(Protocol):
    def stream_bytes(self, unit: str) -> int:
        """Bytes one fetch of this unit reads."""

    def slot_bytes(self, unit: str) -> int:
        """Staging-buffer bytes this unit needs (0: the reader allocates per fetch)."""

    def fetch(self, unit: str, slot: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The unit's tensors as the loader's make_weights takes them (views into ``slot`` where the reader uses
        one; an HF directory's raw tensors, before the family's transforms)."""


def dense_streamed(name: str, weight: torch.Tensor, bias: torch.Tensor | None):
    """Streamed weights are used where they land: no repacking (compute is far faster than disk)."""
    return DenseLinear(weight, bias)


class HFUnitReader:
    """Per-tensor reads straight from a Hugging Face directory (no conversion needed)."""

    def __init__(self, ckpt, dtype: torch.dtype):
        self.ckpt, self.dtype = ckpt, dtype

    def stream_bytes(self, unit: str) -> int:
        return self.ckpt.unit_read_bytes(unit, self.dtype)

    def slot_bytes(self, unit: str) -> int:
        return 0

    def fetch(self, unit: str, slot: torch.Tensor | None) -> dict[str, torch.Tensor]:
        # raw tensors only (O_DIRECT or evicted from the page cache): the family's transforms (qkv fusion, rotary
        # layout) run where the unit is built, on the compute thread, overlapping the next read
        return self.ckpt.read_unit_raw(unit, self.dtype)

    def close(self) -> None:
        self.ckpt.close()


class StoreUnitReader:
    """One large (parallel, O_DIRECT) read per unit from a layer store into a staging slot."""

    def __init__(self, store, direct: bool = True):
        self.store = store
        self.files: dict[str, DirectFile] = {}
        self.direct = direct

    def stream_bytes(self, unit: str) -> int:
        return self.store.unit_span(unit)[1]

    def slot_bytes(self, unit: str) -> int:
        return -(-self.store.unit_span(unit)[1] // ALIGN) * ALIGN

    def fetch(self, unit: str, slot: torch.Tensor | None) -> dict[str, torch.Tensor]:
        f = self.files.get(unit)
        if f is None:
            f = self.files[unit] = DirectFile(self.store.unit_file(unit), self.direct)
        off, n = self.store.unit_span(unit)
        f.read_into(slot, off, n, read_pool())
        return self.store.views(unit, slot[:n])

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files = {}


class HostUnitReader:
    """Units held in host RAM that compute on an accelerator (plan tier "stream", home "cpu"): a fetch hands over
    the held (pinned, where CUDA is used) weights, and the source's DeviceCopier copies them to the device."""

    def __init__(self, held: dict[str, Weights]):
        self.held = held

    def stream_bytes(self, unit: str) -> int:
        from .accounting import weights_nbytes
        return weights_nbytes(self.held[unit])

    def slot_bytes(self, unit: str) -> int:
        return 0

    def fetch(self, unit: str, slot: torch.Tensor | None) -> Weights:
        return self.held[unit]


class MixedReader:
    """One reader per unit: host-held units and disk units streamed through the same ring, in execution order."""

    def __init__(self, by_unit: dict[str, UnitReader]):
        self.by_unit = by_unit

    def stream_bytes(self, unit: str) -> int:
        return self.by_unit[unit].stream_bytes(unit)

    def slot_bytes(self, unit: str) -> int:
        return self.by_unit[unit].slot_bytes(unit)

    def fetch(self, unit: str, slot: torch.Tensor | None):
        return self.by_unit[unit].fetch(unit, slot)

    def close(self) -> None:
        for r in {id(r): r for r in self.by_unit.values()}.values():
            close = getattr(r, "close", None)
            if close is not None:
                close()


class StreamOrderError(RuntimeError):
    """The reader handed over another unit than the one the executor asked for: a broken invariant, never a
    recoverable condition (the weights would be another unit's)."""


class _Prefetcher:
    """The reader thread and what it works with: the ring of staging slots, the reader, the queues.

    It holds no reference to the StreamingSource that owns it, so dropping the source (the last reference to a
    model) lets a finalizer stop this thread and free the slots; the thread keeps only this object alive."""

    def __init__(self, streamed: list[int], names: list[str], reader: UnitReader, ring_slots: int, pin: bool,
                 copier, stats: dict):
        self.streamed, self.names, self.reader, self.copier, self.stats = streamed, names, reader, copier, stats
        self.cycle = list(streamed)   # the order the reader reads units in, over and over (see begin_pass)
        self.ring_slots = ring_slots
        slot_bytes = max((reader.slot_bytes(names[i]) for i in streamed), default=0)
        self.slots = [aligned_buffer(slot_bytes, pin) if slot_bytes else None for _ in range(ring_slots)]
        self.staging_bytes = slot_bytes * ring_slots
        self.pinned: list[torch.Tensor] = []   # other registered host buffers to release with the slots
        self.thread: threading.Thread | None = None
        self.closed = False
        self.lock = threading.Lock()   # start/stop come from the compute thread and a background load's thread

    def ensure_started(self) -> None:
        """Start the reader unless it runs (or the source was closed): what a background load calls when the
        resident units are in, and the compute thread when it reaches a streamed unit first."""
        with self.lock:
            if self.thread is None and not self.closed:
                self._start()

    def start(self) -> None:
        with self.lock:
            self._start()

    def _start(self) -> None:
        if self.closed:
            raise OverspillError("this model was closed; load it again")
        self.stop_event = threading.Event()
        self.free: queue.Queue[int] = queue.Queue()
        for s in range(self.ring_slots):
            self.free.put(s)
        self.done: dict[int, object] = {}   # slot -> event: the compute that last used it has finished (GPU)
        self.ready: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="overspill-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            if self.closed:   # closed from a thread that could not wait for this one: free what it used here
                self._free_buffers()

    def _loop(self) -> None:
        k = 0
        while not self.stop_event.is_set():
            try:
                slot = self.free.get(timeout=0.1)
            except queue.Empty:
                continue
            if self.stop_event.is_set():
                return
            done = self.done.pop(slot, None)
            if done is not None:   # the GPU has finished with this slot's last unit (its copy too)
                done.synchronize()
            i = self.cycle[k % len(self.cycle)]
            unit = self.names[i]
            try:
                t0 = time.perf_counter()
                t = self.reader.fetch(unit, self.slots[slot])
                self.stats["read_s"] += time.perf_counter() - t0
                self.stats["bytes_read"] += self.reader.stream_bytes(unit)
                self.stats["units_read"] += 1
                ev = None
                if self.copier is not None:
                    t, ev = self.copier.copy(t)
                self.ready.put((i, t, slot, None, ev))
            except BaseException as e:  # hand the error to the compute thread
                self.ready.put((i, None, slot, e, None))
                return
            k += 1

    def stop(self) -> None:
        with self.lock:
            if self.thread is not None:
                self.stop_event.set()
                self.thread.join()
                self.thread = None

    def close(self) -> None:
        """Stop the thread, release the staging slots and pinned buffers, close the reader's files (idempotent).

        Called when the source is dropped, that can happen on any thread (a garbage collection runs wherever it
        is triggered): on one of overspill's own threads (the prefetcher, a reader-pool worker serving it) waiting
        for the prefetch thread could deadlock, so there it only asks the thread to stop, and the thread frees
        the buffers and files itself as it exits."""
        if self.closed:
            return
        self.closed = True
        if self.thread is not None:
            self.stop_event.set()
            self.ready.put((None, None, None, OverspillError("this model was closed; load it again"), None))
            if threading.current_thread().name.startswith("overspill-") and self.thread.is_alive():
                self.thread = None
                return                      # _run frees the buffers when the thread ends
            self.thread.join()
            self.thread = None
        self._free_buffers()

    def _free_buffers(self) -> None:
        for buf in self.slots + self.pinned:
            unpin(buf)
        self.slots, self.pinned = [], []
        close = getattr(self.reader, "close", None)
        if close is not None:
            close()


class StreamingSource:
    """Resident units are held; streamed units come through the prefetching ring. With a ``copier`` (streamed units
    compute on an accelerator), the reader thread also copies each fetched unit onto that device, so the copy of
    the next unit overlaps the compute of this one (runtime/transfer.py).

    ``close()`` (or dropping the last reference) stops the reader thread and frees the ring, pinned buffers and the
    reader's open files; at interpreter exit live sources are closed first (a reader thread still inside a torch op
    at exit would abort the process)."""

    def __init__(self, cfg: ModelConfig, resident: dict[int, Weights], streamed: list[int], unit_names: list[str],
                 reader: UnitReader, make_weights: Callable[[str, dict], Weights] | None = None,
                 ring_slots: int = 2, pin: bool = False, copier=None, pinned: list[torch.Tensor] | None = None,
                 loading: Callable[[Callable[[], None]], BackgroundLoad] | None = None):
        """``loading``: the resident units are still being loaded; ``loading(then)`` starts that load into
        ``resident`` and calls ``then`` (starting this source's reader) when it is done."""
        self.cfg, self.resident, self.streamed, self.names = cfg, resident, streamed, unit_names
        self.reader, self.copier = reader, copier
        self.make_weights = make_weights or (lambda unit, t: bind(cfg, unit, t, dense_streamed))
        self.ring_slots = max(1, min(ring_slots, len(streamed))) if streamed else 0
        # io_wait_s: compute thread blocked on the ring; read_s: reader thread reading bytes; build_s: compute thread
        # turning a slot's bytes into Linear objects (in-place layout conversion)
        self.stats = {"io_wait_s": 0.0, "read_s": 0.0, "build_s": 0.0, "bytes_read": 0, "units_read": 0}
        self._pf = _Prefetcher(streamed, unit_names, reader, self.ring_slots, pin, copier, self.stats)
        self._pf.pinned = list(pinned or [])
        self.staging_bytes = self._pf.staging_bytes
        self._cursor = 0
        self._in_use: dict[int, int] = {}
        self._loading = loading(self._pf.ensure_started) if loading is not None else None
        # runs when this source is dropped, or at interpreter exit; holds the prefetcher, never the source
        self._finalizer = weakref.finalize(self, _close, self._pf, self._loading)
        if streamed and self._loading is None:
            self._pf.start()

    @property
    def slots(self) -> list[torch.Tensor | None]:
        return self._pf.slots

    def close(self) -> None:
        self._finalizer()

    def _restart(self) -> None:
        self._pf.stop()
        self._cursor = 0
        self._in_use = {}
        if self._pf.closed:
            raise OverspillError("this model was closed; load it again")
        self._pf.ensure_started()

    # -- WeightSource ---------------------------------------------------------------------
    def begin_pass(self, order: Sequence[int] | None = None) -> None:
        if not self.streamed:
            return
        mine = set(self.streamed)
        cycle = list(self.streamed) if order is None else [i for i in order if i in mine]
        if cycle != self._pf.cycle:   # another kind of pass (a training step after generation): read its order
            self._pf.stop()
            self._pf.cycle = cycle
            self._restart()
        elif self._cursor % len(cycle) != 0 or self._in_use:
            # a pass interrupted by an exception leaves the cycle mid-way: restart the reader in step
            self._restart()

    def acquire(self, i: int) -> Weights:
        if i in self.resident:
            return self.resident[i]
        if self._loading is not None and i in self._loading.units:
            return self._loading.get(i)
        pf = self._pf
        if pf.thread is None:   # reached a streamed unit before the background load finished
            pf.ensure_started()
        t0 = time.perf_counter()
        j, t, slot, err, ev = pf.ready.get()
        t1 = time.perf_counter()
        self.stats["io_wait_s"] += t1 - t0
        if err is not None:
            if pf.closed:
                raise err
            pf.free.put(slot)
            self._restart()
            raise err
        if j != i:   # a real check, not an assert: under python -O a unit would silently get another's weights
            pf.free.put(slot)
            self._restart()
            raise StreamOrderError(f"streaming order broken: the executor asked for unit {self.names[i]} but the "
                                   f"reader produced {self.names[j]}")
        self._in_use[i] = slot
        if self.copier is not None:
            self.copier.ready(t, ev)
        self._cursor += 1
        # Built here, not in the reader: the layout conversion then overlaps the reader's next read instead of
        # delaying it (a streamed pass is read-bound: the reader must never stop reading). An error here leaves the
        # slot in use, so the next begin_pass restarts the reader.
        with transient():   # lives for this forward only: no fresh huge-page mappings to fault in
            w = self.make_weights(self.names[i], t)
        self.stats["build_s"] += time.perf_counter() - t1
        return w

    def release(self, i: int) -> None:
        slot = self._in_use.pop(i, None)
        if slot is not None:
            if self.copier is not None:
                done = self.copier.compute_done()
                if done is not None:
                    self._pf.done[slot] = done
            self._pf.free.put(slot)

    def wait_loaded(self) -> None:
        if self._loading is not None:
            self._loading.wait()

    def resident_bytes(self) -> int:
        from .accounting import weights_nbytes
        self.wait_loaded()
        return sum(weights_nbytes(w) for w in self.resident.values())


def _close(pf: _Prefetcher, loading: BackgroundLoad | None) -> None:
    if loading is not None:
        loading.cancel()
    _Prefetcher.close(pf)
