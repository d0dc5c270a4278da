"""Tensor-parallel runs: every rank computes every step over its shard of each block (model/shard.py).

    rank 0: TensorExecutor              rank k: TensorWorker (StageWorker's loop: follow rank 0's calls)
    engine, generate(), beams, logits
      │ forward_ragged / forward
      ├─ broadcast the step ───────────► the step (ids, positions, segments, cache ops: a few KiB)
      ├─ embed, blocks, head             embed, blocks, head          (the same executor method, same inputs)
      │    each block: all-reduce ◄────►   each block: all-reduce      (the partial attention / MLP sums)
      └─ its logits to consume(...)      its logits dropped: after the all-reduces every rank holds the same
                                         hidden states, and sampling happens once, on rank 0

The step protocol, the caches (StageCache over every block, with this rank's KV heads) and the worker's loop are the
pipeline's (pipeline.py); only the step itself differs: no hidden states or logits cross, one all-reduce per
row-parallel projection does. Half-precision partial sums are summed in float32 under gloo (one rounding, as a single
process's matmul; gloo's bf16 sum of two ranks is exact on torch 2.13 but rounds once per rank beyond that).

Failures: a collective cannot be left half done, so a step that fails on one rank after its first all-reduce ends
every rank. The failing rank records its line in the rendezvous store and stops; the others' next all-reduce fails
at once and they end with that line. A lost rank ends them as under --pp (group.py). The engine's ``abort`` is asked
once, before a pass starts (every rank must run the whole pass).

With --pp as well (parallel/__init__.py's load_stage, tp > 1): each pipeline stage is tp ranks that shard its blocks
and all-reduce within the stage (stage_groups); rank (s, t) hands hidden states to (s + 1, t), and the last stage's
first rank sends rank 0 the logits (TensorPipelineExecutor, TensorStageWorker).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from ..errors import OverspillError
from .group import Group, agree, checkpoint_digest, choose_backend, first_line, join, load_everywhere, resolve_timeout
from .pipeline import DONE, PipelineExecutor, StageCache, StageWorker, _ignore
from ..model.shard import local_config


@dataclasses.dataclass
class Whole:
    """Every unit runs on every rank (stage_cache's range: a KV cache for every block); no rank answers rank 0."""
    first: int
    end: int
    last: int = -1


def _peer_error(g: Group) -> str | None:
    """A line another rank left in the store before it stopped (see the module docstring)."""
    hb = g.heartbeat
    if hb is None:
        return None
    for r in range(g.world):
        key = f"tp-error/{r}"
        try:
            if r != g.rank and hb.store.check([key]):
                return hb.store.get(key).decode("utf-8", "replace")
        except Exception:
            return None
    return None


def leave_error(g: Group, line: str) -> None:
    """Record this rank's failure for the others, and send nothing more."""
    g.failed = True
    try:
        if g.heartbeat is not None:
            g.heartbeat.store.set(f"tp-error/{g.rank}", line)
    except Exception:
        pass


def all_reducer(g: Group, dtype: torch.dtype, group=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """reduce(partial) -> the sum over the ranks of ``group`` (default: all of them; under --pp, this stage's):
    Megatron-LM's all-reduce after each row-parallel projection."""
    import torch.distributed as dist

    wire = dtype if dtype == torch.float32 or g.backend == "nccl" else torch.float32

    def reduce(y: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        t = y.to(device=g.device, dtype=wire).contiguous()     # [B, T, C]; float32 partials are summed in place
        try:
            dist.all_reduce(t, group=group if group is not None else g.data)
            g.stats["allreduces"] += 1
            g.stats["allreduce_s"] += time.perf_counter() - t0
        except Exception as e:
            peer = _peer_error(g)
            if peer is not None:
                g.failed = True
                if g.heartbeat is not None:
                    g.heartbeat.stop()
                raise OverspillError(f"rank {g.rank}: {peer}") from None
            raise g.broken("a rank while summing partial results", e) from None
        return t.to(device=y.device, dtype=y.dtype)

    return reduce


class _Deferred:
    """A consumer whose exception is kept until the pass ends (every rank must finish the pass together)."""

    def __init__(self, consume: Callable | None):
        self.inner, self.error = consume, None

    def __call__(self, t0: int, t1: int, logits: torch.Tensor) -> None:
        if self.error is None:
            try:
                self.inner(t0, t1, logits)
            except BaseException as e:
                self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def stage_groups(g: Group, tp: int):
    """Every stage's tensor-parallel group (ranks stage * tp .. + tp - 1); every rank creates them all, in order.
    Returns this rank's."""
    import torch.distributed as dist

    from .group import _FOREVER

    mine = None
    for s in range(g.world // tp):
        grp = dist.new_group(list(range(s * tp, (s + 1) * tp)), backend=g.backend, timeout=_FOREVER)
        if g.rank // tp == s:
            mine = grp
    return mine


def _fatal(g: Group, e: BaseException, rank0: bool = False) -> OverspillError:
    """A step that failed on this rank: the others may be inside its all-reduces, so every rank ends."""
    line = str(e) if isinstance(e, OverspillError) and str(e).startswith("rank ") else \
        f"rank {g.rank}: {type(e).__name__}: {first_line(e)}"
    leave_error(g, line)
    return OverspillError(line + (" (the tensor-parallel ranks are out of step; start them again)" if rank0 else ""))


class TensorPipelineExecutor(PipelineExecutor):
    """Rank 0 under --pp with --tp: the pipeline's steps, with ``abort`` asked once before a pass and a failure
    ending every rank (see the module docstring)."""

    def _run_local(self, run: Callable[[], object]):
        try:
            return run()
        except BaseException as e:
            if self.g.failed:
                raise
            raise _fatal(self.g, e, True) from None

    def forward_ragged(self, segments, cache, logit_rows, consume, pad_to: int = 4, abort=None) -> bool:
        if abort is not None and abort():
            return False
        return super().forward_ragged(segments, cache, logit_rows, consume, pad_to)


class TensorStageWorker(StageWorker):
    """A rank other than 0 under --pp with --tp: its stage's steps on its shards; the last stage's first rank sends
    rank 0 the logits, the others drop theirs. A failure ends every rank."""

    @torch.inference_mode()
    def _step(self, msg: tuple) -> None:
        send = self.link.send_logits if self.last else _ignore
        try:
            self._run_step(msg, send)
            if self.last:
                self.link.send_status(DONE)
            self.link.flush()
        except Exception as e:
            if self.g.failed:
                raise
            raise _fatal(self.g, e) from None


class TensorExecutor(PipelineExecutor):
    """Rank 0's executor over the tensor-parallel ranks, with the executor's interface (new_cache, forward,
    forward_ragged, close). Caches and the broadcast of each step are PipelineExecutor's."""

    def _run(self, run: Callable[[], object]):
        try:
            return run()
        except BaseException as e:
            if self.g.failed:
                raise
            raise _fatal(self.g, e, True) from None    # the others may be inside this pass's all-reduces

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: StageCache, last_only: bool = False,
                consume: Callable | None = None) -> torch.Tensor | None:
        """As Executor.forward, on every rank."""
        t0 = time.perf_counter()
        with self._lock:
            self._check_open()
            positions = positions.contiguous()
            self._broadcast(("forward", cache.id, ids, positions, cache.key_valid, last_only))
            box = _Deferred(consume)
            out = self._run(lambda: self.local.forward(ids, positions, cache, last_only,
                                                       box if consume is not None else None))
            self._count(t0)
            box.check()
            return out

    @torch.inference_mode()
    def forward_ragged(self, segments: list[tuple[int, int, list[int]]], cache: StageCache, logit_rows: list[int],
                       consume: Callable, pad_to: int = 4, abort: Callable[[], bool] | None = None) -> bool:
        """As Executor.forward_ragged, on every rank; ``abort`` is asked once, before the pass."""
        t0 = time.perf_counter()
        with self._lock:
            self._check_open()
            if abort is not None and abort():
                return False
            self._broadcast(("ragged", cache.id, segments, list(logit_rows), pad_to))
            box = _Deferred(consume)
            self._run(lambda: self.local.forward_ragged(segments, cache, logit_rows, box, pad_to))
            self._count(t0)
            box.check()
            return True


class TensorWorker(StageWorker):
    """A rank other than 0: runs each step rank 0 broadcasts on its shards, and drops its logits."""

    @torch.inference_mode()
    def _step(self, msg: tuple) -> None:
        try:
            self._run_step(msg, _ignore)
        except Exception as e:
            if self.g.failed:
                raise
            raise _fatal(self.g, e) from None


def load_tensor(path: str, dtype, quantize: str | None, budgets: list[dict | None], reserve, *, tp: int,
                timeout: float | None = None, quantize_head: bool = False, stand_in: dict[str, str] | None = None,
                kv_cache: str | None = None, linear_hook=None):
    """This rank's part of a ``tp``-way tensor-parallel model: a loader.Built whose executor is a TensorExecutor on
    rank 0 and a TensorWorker (call ``serve()``) on the others. Each rank loads every unit, reading its share of each
    block (an HF directory's slices, quantized on the fly after; a store written by ``convert --tensor-parallel``
    holds the shards), under its own budget (``budgets``, by rank). ``linear_hook`` wraps this rank's shards (a LoRA adapter sharded
    to match, LoraAdapter.shard_)."""
    from ..runtime.loader import build, open_source
    from .group import launch_env

    timeout = resolve_timeout(timeout)
    rank, world, _ = launch_env(tp, "--tp")
    g = join(tp, timeout, choose_backend([any(k.startswith("cuda") for k in (b or {})) for b in budgets]), "--tp")
    try:
        src = open_source(path, dtype, quantize, (rank, world))
        cfg = src.ckpt.config
        if hasattr(src.ckpt, "close"):
            src.ckpt.close()
        run_cfg = local_config(cfg, tp)
        facts = {"model": f"{cfg.family}, {cfg.n_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}",
                 "weights": f"digest {checkpoint_digest(path)}", "dtype": str(src.dtype).replace("torch.", ""),
                 "quantize": [src.quantize, bool(src.quantize and quantize_head)], "kv_cache": kv_cache,
                 "reserve": [reserve.max_batch, reserve.max_seq_len], "tp": tp}
    except OverspillError as e:
        facts = {"error": str(e)}
    except Exception as e:
        facts = {"error": f"{type(e).__name__}: {first_line(e)}"}
    agree(g, facts)
    built, infos = load_everywhere(
        g, lambda: build(path, dtype, quantize, budgets[rank], reserve, quantize_head=quantize_head,
                         stand_in=stand_in, kv_cache=kv_cache, run_config=run_cfg,
                         tp=(rank, world), linear_hook=linear_hook),
        [0, cfg.n_layers + 2])
    local = built.executor
    local.reduce = all_reducer(g, local.dtype)
    whole = Whole(0, cfg.n_layers + 2)
    ex = TensorExecutor(local, whole, g, infos) if rank == 0 else TensorWorker(local, whole, g)
    return dataclasses.replace(built, config=cfg, executor=ex)
