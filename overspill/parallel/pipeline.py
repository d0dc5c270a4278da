"""Pipeline-parallel steps: rank 0 drives, every other rank serves, each over its own range of units.

    rank 0: PipelineExecutor          rank 1: StageWorker             rank 2 (last): StageWorker
    engine, generate(), beams, logits
      │ forward_ragged / forward
      ├─ broadcast the step ─────────► the step ──────────────────────► the step
      │  (ids, positions, segments, cache ops: a few KiB)
      ├─ embed, its blocks ─ hidden ─► its blocks ─ hidden [B, T, C] ─► its blocks, the LM head
      │                                                                  │ logits of the rows the step asked for
      ◄──────────────────────── LOGITS chunks [B, t, V] float32 ... DONE ┘
      └─ consume(...) ─► the engine's samplers: sampling happens once, on rank 0, so seeded runs match a
                         single process

Every rank runs the ordinary Executor over its units (runtime/executor.py's StageLink hands it its input and takes
its output), so a step computes what the single-process run computes, tensor for tensor. Each rank builds only its
range (streamed from disk under its own budget, KV cache for its own blocks only, StageCache).

Each hop is a small header (kind, shape) then the tensor. A stage that fails sends ERROR with its one-line reason
instead of its output; the stages after it pass the ERROR on, and rank 0 raises it (the pipeline stays in step,
and the next request runs). A pass the engine aborts (every sequence cancelled) stops after rank 0's blocks and
ABORT travels the same way. A peer that is gone is another matter: see group.py.

Micro-batches (GPipe): a ragged step of several sequences is split into as many groups of whole sequences as there
are stages (``micro_batches``); rank 0 runs group 1 and sends it on, then group 2 while rank 1 runs group 1, and so
on, every send asynchronous, so the stages work at once and a pass of m groups over S stages takes about (m + S - 1)
group-steps instead of m x S. Only where no stage streams (a streamed stage would read its weights once per group);
OVERSPILL_PP_MICRO_BATCHES sets the count (1: off). Not yet: the engine's abort inside a worker's range (it is asked
on rank 0's blocks only, before the first group).
"""
from __future__ import annotations

import atexit
import itertools
import os
import threading
import time
import weakref
from typing import Callable

import torch

from ..config import ModelConfig
from ..errors import OverspillError
from ..model.kv_cache import KVCache
from ..runtime.executor import Executor
from .group import Group, first_line

DATA, LOGITS, DONE, ABORT, ERROR = range(5)
_HEADER = 8                  # int64: kind, a, b, ndim, d0, d1, d2, nbytes


class Upstream(Exception):
    """A stage before this one sent ERROR or ABORT instead of hidden states."""

    def __init__(self, kind: int, msg: str = ""):
        super().__init__(msg)
        self.kind, self.msg = kind, msg


class Link:
    """This stage's channels: hidden states from the previous rank and to the next, logits from the last rank to
    rank 0 (the executor's StageLink). ``lossless``: bf16/fp16 cross the wire as they are (checked at start-up),
    else as float32. ``tp``: ranks per stage (tensor parallel within each stage, ranks stage * tp + t): rank
    (s, t) hands its hidden states to (s + 1, t), and the last stage's rank (S - 1, 0) answers rank 0."""

    def __init__(self, g: Group, first: int, end: int, n_units: int, lossless: bool = True, tp: int = 1):
        self.g, self.first, self.end, self.n_units, self.lossless = g, first, end, n_units, lossless
        self.prev = g.rank - tp if g.rank >= tp else None
        self.next = g.rank + tp if g.rank + tp < g.world else 0   # the last stage answers rank 0
        self.last = g.world - tp
        self.pending = False          # a worker's pass whose input it has not read yet
        self._sends: list = []        # (work, tensor, peer) of sends in flight: hidden states and logits go out
                                      # asynchronously, so a stage computes its next micro-batch meanwhile

    # -- wire ---------------------------------------------------------------------------------------------------
    def _send(self, t: torch.Tensor, dst: int) -> None:
        import torch.distributed as dist
        t0 = time.perf_counter()
        try:
            dist.send(t, dst, group=self.g.data)
        except Exception as e:
            raise self.g.broken(f"rank {dst} while sending to it", e) from None
        self.g.stats["send_s"] += time.perf_counter() - t0

    def _isend(self, t: torch.Tensor, dst: int) -> None:
        import torch.distributed as dist
        t0 = time.perf_counter()
        try:
            self._sends.append((dist.isend(t, dst, group=self.g.data), t, dst))
        except Exception as e:
            raise self.g.broken(f"rank {dst} while sending to it", e) from None
        self.g.stats["send_s"] += time.perf_counter() - t0

    def flush(self) -> None:
        """Wait for the sends in flight (their tensors are kept alive until then)."""
        t0 = time.perf_counter()
        sends, self._sends = self._sends, []
        for work, _, dst in sends:
            try:
                work.wait()
            except Exception as e:
                raise self.g.broken(f"rank {dst} while sending to it", e) from None
        self.g.stats["send_s"] += time.perf_counter() - t0

    def _recv(self, t: torch.Tensor, src: int) -> None:
        import torch.distributed as dist
        t0 = time.perf_counter()
        try:
            dist.recv(t, src, group=self.g.data)
        except Exception as e:
            raise self.g.broken(f"rank {src} while receiving from it", e) from None
        self.g.stats["recv_s"] += time.perf_counter() - t0

    def _head(self, dst: int, kind: int, a: int = 0, b: int = 0, shape: tuple = (), nbytes: int = 0,
              wait: bool = True) -> None:
        h = torch.tensor([kind, a, b, len(shape), *shape, *[0] * (3 - len(shape)), nbytes], dtype=torch.long,
                         device=self.g.device)
        if wait:
            self.flush()                 # in order after what is in flight (a status follows its data)
            self._send(h, dst)
        else:
            self._isend(h, dst)

    def _read_head(self, src: int) -> tuple[int, int, int, tuple, int]:
        h = torch.empty(_HEADER, dtype=torch.long, device=self.g.device)
        self._recv(h, src)
        kind, a, b, ndim, *dims, nbytes = h.tolist()
        return kind, a, b, tuple(dims[:ndim]), nbytes

    def _wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if self.lossless or dtype == torch.float32 else torch.float32

    def _text(self, src: int, nbytes: int) -> str:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.g.device)
        self._recv(buf, src)
        return bytes(buf.cpu().tolist()).decode("utf-8", "replace")

    # -- StageLink (the executor's side) ------------------------------------------------------------------------
    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        self.pending = False
        kind, _, _, got, nbytes = self._read_head(self.prev)
        if kind == ERROR:
            raise Upstream(ERROR, self._text(self.prev, nbytes))
        if kind == ABORT:
            raise Upstream(ABORT)
        if kind != DATA or got != tuple(shape):
            self.g.failed = True
            raise OverspillError(f"rank {self.g.rank}: pipeline out of step: expected hidden states {list(shape)} "
                                 f"from rank {self.prev}, got kind {kind} {list(got)}")
        buf = torch.empty(shape, dtype=self._wire_dtype(dtype), device=self.g.device)
        self._recv(buf, self.prev)
        return buf.to(device=device, dtype=dtype)

    def send(self, x: torch.Tensor) -> None:
        self._head(self.next, DATA, shape=tuple(x.shape), wait=False)
        self._isend(x.to(device=self.g.device, dtype=self._wire_dtype(x.dtype)).contiguous(), self.next)

    def drain(self, dtype: torch.dtype) -> Upstream | None:
        """A pass this stage failed before reading its input: read it and drop it (a send waits for its receive, so
        the stage before would wait forever). An ERROR or ABORT from upstream is returned: it came first."""
        self.pending = False
        kind, _, _, shape, nbytes = self._read_head(self.prev)
        if kind == DATA:
            self._recv(torch.empty(shape, dtype=self._wire_dtype(dtype), device=self.g.device), self.prev)
            return None
        return Upstream(kind, self._text(self.prev, nbytes) if kind == ERROR else "")

    # -- status and logits ----------------------------------------------------------------------------------------
    def send_status(self, kind: int, msg: str = "") -> None:
        """DONE / ABORT / ERROR to the next stage (from the last stage: to rank 0)."""
        data = msg.encode("utf-8")[:4000]
        self._head(self.next, kind, nbytes=len(data))
        if data:
            self._send(torch.tensor(list(data), dtype=torch.uint8, device=self.g.device), self.next)

    def send_logits(self, t0: int, t1: int, logits: torch.Tensor) -> None:
        """The last stage's LM-head chunk (float32 [rows, t1 - t0, V]) to rank 0."""
        self._head(0, LOGITS, t0, t1, tuple(logits.shape), wait=False)
        self._isend(logits.to(device=self.g.device, dtype=torch.float32).contiguous(), 0)

    def collect(self, consume: Callable[[int, int, torch.Tensor], None]) -> bool:
        """Rank 0: the last stage's logits chunks into ``consume`` until DONE (True) or ABORT (False); ERROR raises
        the failing stage's line. A consumer that raises does so after the pass is read to its end."""
        failure: BaseException | None = None
        while True:
            kind, a, b, shape, nbytes = self._read_head(self.last)
            if kind == LOGITS:
                buf = torch.empty(shape, dtype=torch.float32, device=self.g.device)
                self._recv(buf, self.last)
                if failure is None:
                    try:
                        consume(a, b, buf.cpu())
                    except BaseException as e:   # keep the pipeline in step, then raise it
                        failure = e
            elif kind == ERROR:
                raise OverspillError(self._text(self.last, nbytes))
            elif kind in (DONE, ABORT):
                if failure is not None:
                    raise failure
                return kind == DONE
            else:
                self.g.failed = True
                raise OverspillError(f"rank 0: pipeline out of step: kind {kind} from rank {self.last}")


def micro_batch_setting() -> int | None:
    """OVERSPILL_PP_MICRO_BATCHES as a count >= 1, or None when unset (one micro-batch per stage)."""
    env = os.environ.get("OVERSPILL_PP_MICRO_BATCHES")
    if not env:
        return None
    if not env.strip().isdigit() or int(env) < 1:
        raise OverspillError(f"OVERSPILL_PP_MICRO_BATCHES must be a whole number >= 1 (1: off), got {env!r}")
    return int(env)


def micro_batches(segments: list, logit_rows: list[int], n: int) -> list[tuple[list, list[int], int]]:
    """Split a ragged step's segments into at most ``n`` contiguous groups of about equal token counts:
    [(segments, their logit rows renumbered from the group's first token, index of their first row in logit_rows)].
    Consumers see every group's rows at their place in the whole step (first row index + the group's own)."""
    n = max(1, min(n, len(segments)))
    if n == 1:
        return [(segments, logit_rows, 0)]
    sizes = [len(s[2]) for s in segments]
    prefix = list(itertools.accumulate(sizes, initial=0))
    cuts, prev = [0], 0
    for j in range(1, n):              # each cut where the tokens so far come closest to j / n of them
        prev = min(range(prev + 1, len(sizes) - (n - j) + 1), key=lambda k: abs(prefix[k] * n - prefix[-1] * j))
        cuts.append(prev)
    cuts.append(len(sizes))
    groups = list(zip(cuts, cuts[1:]))
    out, tok0, r = [], 0, 0
    for a, b in groups:
        ntok = sum(sizes[a:b])
        first = r
        mine = []
        while r < len(logit_rows) and logit_rows[r] < tok0 + ntok:
            mine.append(logit_rows[r] - tok0)
            r += 1
        out.append((segments[a:b], mine, first))
        tok0 += ntok
    return out


class StageCache(KVCache):
    """A stage's KV cache: entries for its own blocks, None for the others' (never allocated). ``on_op``
    tells rank 0's driver of a row copy (beam search), which it repeats on the other ranks."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, layer_devices: list,
                 kv_format: str | None, on_op: Callable[[tuple], None] | None = None):
        own = [d for d in layer_devices if d is not None]
        super().__init__(cfg, batch, max_len, dtype, own[0], own, kv_format)
        ks, vs = iter(self.k), iter(self.v)
        self.k = [next(ks) if d is not None else None for d in layer_devices]
        self.v = [next(vs) if d is not None else None for d in layer_devices]
        self.on_op = on_op
        self.id = -1

    def copy_rows(self, src: list[int], dst: list[int], end: int) -> None:
        super().copy_rows(src, dst, end)
        if self.on_op is not None:
            self.on_op(("copy_rows", list(src), list(dst), end))


def stage_cache(ex: Executor, link: Link, batch: int, max_len: int, on_op=None) -> StageCache:
    """A cache for the blocks of ``link``'s range, on their devices, within the executor's reserve."""
    ex.check_cache(batch, max_len)
    devs = [d if link.first <= i + 1 < link.end else None for i, d in enumerate(ex.unit_devices[1:-1])]
    return StageCache(ex.cfg, batch, max_len, ex.dtype, devs, ex.kv_format, on_op)


def _ignore(*_) -> None:
    pass


class _PipelineSource:
    """What callers ask of ``executor.source``: rank 0's source, and whether any stage streams (the engine puts
    every waiting prompt into one pass when a pass costs a read of weights)."""

    def __init__(self, local, any_streams: bool):
        self.local = local
        self.streamed = list(getattr(local, "streamed", None) or []) or ([-1] if any_streams else [])

    def __getattr__(self, name):
        return getattr(self.local, name)


class PipelineExecutor:
    """Rank 0's executor over the whole pipeline, with the interface the engine, generate(), beam search and Model
    use (new_cache, forward, forward_ragged, close): nothing above it knows the model is split. ``stages``: what
    every rank reported after loading (unit range, plan, whether it streams)."""

    def __init__(self, local: Executor, link: Link, g: Group, stages: list[dict]):
        self.local, self.link, self.g, self.stages = local, link, g, stages
        self.cfg, self.dtype, self.device = local.cfg, local.dtype, local.device
        self.reserve, self.head_reserve, self.unit_devices = local.reserve, local.head_reserve, local.unit_devices
        self.kv_format = local.kv_format
        self.source = _PipelineSource(local.source, any(s.get("streams") for s in stages))
        self._ops: list = []                    # cache ops for the other ranks, sent with the next step
        # a batch's sequences as micro-batches flowing through the stages (GPipe): only where no stage streams (a
        # streamed stage would read its weights once per micro-batch); OVERSPILL_PP_MICRO_BATCHES=1 turns it off
        n = micro_batch_setting()
        self.micro_batches = 1 if any(s.get("streams") for s in stages) else \
            (n or len({tuple(s.get("units") or ()) for s in stages}))
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self.closed = False
        atexit.register(self.close)

    # -- caches -----------------------------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> StageCache:
        self._check_open()
        cid = next(self._ids)
        ops = self._ops
        cache = stage_cache(self.local, self.link, batch, max_len, lambda op: ops.append((op[0], cid, *op[1:])))
        cache.id = cid
        ops.append(("new", cid, batch, max_len))
        weakref.finalize(cache, ops.append, ("free", cid))
        return cache

    # -- steps ------------------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise OverspillError("this model was closed; load it again")
        if self.g.failed:
            raise OverspillError("rank 0: the pipeline is broken (an earlier error said why); start the ranks again")

    def _broadcast(self, msg: tuple) -> None:
        import torch.distributed as dist
        ops = list(self._ops)
        del self._ops[: len(ops)]
        try:
            dist.broadcast_object_list([(ops, msg)], src=0, group=self.g.ctrl)
        except Exception as e:
            peers = "rank 1" if self.g.world == 2 else f"one of ranks 1-{self.g.world - 1}"
            raise self.g.broken(f"{peers} while sending the next step", e) from None

    def _run_local(self, run: Callable[[], object]):
        """Rank 0's own stage; when it fails, the others are told (ERROR) and the pass is read to its end."""
        try:
            return run()
        except BaseException as e:
            if self.g.failed:
                raise
            self.link.send_status(ERROR, f"rank 0: {first_line(e)}")
            try:
                self.link.collect(_ignore)
            except OverspillError:
                if self.g.failed:
                    raise
            raise

    def rank_stats(self) -> list[dict]:
        """Every rank's counters since it joined (Group.stats, in rank order): steps, step_s (wall time in them),
        recv_s / send_s (blocked on hidden states and logits), allreduce_s / allreduces (tensor parallel). A rank's
        compute is step_s less the other three; 1 - compute / wall time is its idle share (the pipeline bubble)."""
        import torch.distributed as dist
        with self._lock:
            self._check_open()
            self._broadcast(("stats",))
            out: list = [None] * self.g.world
            dist.gather_object(dict(self.g.stats), out, dst=0, group=self.g.ctrl)
            return out

    def _count(self, t0: float) -> None:
        self.g.stats["steps"] += 1
        self.g.stats["step_s"] += time.perf_counter() - t0

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: StageCache, last_only: bool = False,
                consume: Callable | None = None) -> torch.Tensor | None:
        """As Executor.forward, over the pipeline."""
        t0 = time.perf_counter()
        with self._lock:
            self._check_open()
            positions = positions.contiguous()
            self._broadcast(("forward", cache.id, ids, positions, cache.key_valid, last_only))
            self._run_local(lambda: self.local.forward(ids, positions, cache, last_only))
            out = None
            if consume is None:
                B, T = ids.shape
                out = torch.empty(B, 1 if last_only else T, self.cfg.vocab_size, dtype=torch.float32)

                def consume(r0: int, r1: int, logits: torch.Tensor) -> None:
                    out[:, r0:r1] = logits
            self.link.collect(consume)
            self._count(t0)
            return out

    @torch.inference_mode()
    def forward_ragged(self, segments: list[tuple[int, int, list[int]]], cache: StageCache, logit_rows: list[int],
                       consume: Callable, pad_to: int = 4, abort: Callable[[], bool] | None = None) -> bool:
        """As Executor.forward_ragged, over the pipeline (``abort`` is asked before rank 0's blocks)."""
        t0 = time.perf_counter()
        with self._lock:
            self._check_open()
            groups = micro_batches(segments, list(logit_rows), self.micro_batches)
            if len(groups) == 1:
                self._broadcast(("ragged", cache.id, segments, list(logit_rows), pad_to))
            else:
                self._broadcast(("ragged_mb", cache.id, groups, pad_to))
            done = True
            for k, (segs, rows, _) in enumerate(groups):
                # abort is asked before the first micro-batch only: once one has gone on, the pass runs to its end
                done = self._run_local(lambda: self.local.forward_ragged(segs, cache, rows, _ignore, pad_to,
                                                                          abort if k == 0 else None))
                if not done:
                    self.link.send_status(ABORT)
                    break
            finished = self.link.collect(consume)
            self.link.flush()
            self._count(t0)
            return finished

    def close(self) -> None:
        """Tell the other ranks this model is done (their load() returns), free this rank's (idempotent; also at
        exit). The process group stays for the next model the script loads."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                if not self.g.failed:
                    self._broadcast(("close",))
            except OverspillError:
                pass
            finally:
                self.local.close()


class StageWorker:
    """A rank other than 0: runs the steps rank 0 broadcasts over its own units until rank 0 closes."""

    def __init__(self, local: Executor, link: Link, g: Group):
        self.local, self.link, self.g = local, link, g
        self.unit_devices = local.unit_devices
        self.last = link.end == local.cfg.n_layers + 2 and g.rank == link.last   # this rank answers rank 0
        self.caches: dict[int, StageCache] = {}
        self.cache_error: dict[int, str] = {}
        self.unread = 0                         # micro-batch inputs of the running step not yet read

    def serve(self) -> None:
        """Serve steps until rank 0 closes the pipeline (a broken channel raises its one line)."""
        import torch.distributed as dist

        try:
            while True:
                box = [None]
                try:
                    dist.broadcast_object_list(box, src=0, group=self.g.ctrl)
                except Exception as e:
                    raise self.g.broken("rank 0 while waiting for its next step", e) from None
                ops, msg = box[0]
                self._cache_ops(ops)
                if msg[0] == "close":
                    return
                if msg[0] == "stats":
                    dist.gather_object(dict(self.g.stats), None, dst=0, group=self.g.ctrl)
                    continue
                t0 = time.perf_counter()
                self._step(msg)
                self.g.stats["steps"] += 1
                self.g.stats["step_s"] += time.perf_counter() - t0
        finally:
            self.local.close()

    def _cache_ops(self, ops: list) -> None:
        for op in ops:
            cid = op[1]
            if op[0] == "new":
                try:
                    self.caches[cid] = stage_cache(self.local, self.link, op[2], op[3])
                except Exception as e:   # reported by the step that uses it
                    self.cache_error[cid] = f"rank {self.g.rank}: {first_line(e)}"
            elif op[0] == "copy_rows" and cid in self.caches:
                self.caches[cid].copy_rows(*op[2:])
            elif op[0] == "free":
                self.caches.pop(cid, None)
                self.cache_error.pop(cid, None)

    def _run_step(self, msg: tuple, send: Callable | None) -> None:
        """Run rank 0's step message on this rank's executor: ``send`` takes the logits (None: a stage without
        the head)."""
        if msg[1] in self.cache_error:
            raise OverspillError(self.cache_error[msg[1]])
        cache = self.caches[msg[1]]
        if msg[0] == "forward":
            _, _, ids, positions, key_valid, last_only = msg
            cache.key_valid = key_valid
            self.local.forward(ids, positions, cache, last_only, consume=send)
        elif msg[0] == "ragged":
            _, _, segments, rows, pad_to = msg
            self.local.forward_ragged(segments, cache, rows, send or _ignore, pad_to)
        else:                          # "ragged_mb": the micro-batches in turn, each sent on as soon as it is done
            _, _, groups, pad_to = msg
            for k, (segments, rows, first) in enumerate(groups):
                self.unread = len(groups) - k - 1      # inputs still to come if this group fails (drained)
                self.link.pending = True               # this group's own input is not read yet
                out = _ignore if send is None else \
                    (lambda r0, r1, lg, f=first: send(r0 + f, r1 + f, lg))
                self.local.forward_ragged(segments, cache, rows, out, pad_to)

    @torch.inference_mode()
    def _step(self, msg: tuple) -> None:
        send = self.link.send_logits if self.last else None
        self.link.pending = True
        self.unread = 0
        try:
            self._run_step(msg, send)
            if self.last:
                self.link.send_status(DONE)
            self.link.flush()
        except Upstream as u:          # a stage before failed or aborted: pass it on
            self.link.send_status(u.kind, u.msg)
        except Exception as e:
            if self.g.failed:
                raise
            up = self.link.drain(self.local.dtype) if self.link.pending else None
            while up is None and self.unread:          # the micro-batches rank 0 sent after the one that failed
                self.unread -= 1
                up = self.link.drain(self.local.dtype)
            if up is not None:
                self.link.send_status(up.kind, up.msg)
            else:
                self.link.send_status(ERROR, str(e) if isinstance(e, OverspillError) and str(e).startswith("rank ")
                                      else f"rank {self.g.rank}: {type(e).__name__}: {first_line(e)}")
