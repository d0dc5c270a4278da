"""Pipeline parallel over torch.distributed: one process per stage, each running a contiguous range of the units.

    overspill.load(path, pp=2)  on every rank (torchrun starts them; the CLI's --pp does this)
      └─ load_stage: join the group ─► agree on the checkpoint and settings ─► split the units by bytes
                     ─► build this rank's range under its own budget ─► wait for every rank's load
           rank 0:  a PipelineExecutor; Model, generate(), stream(), beams and the engine run on it unchanged
           rank k:  a StageWorker that serves rank 0's steps until rank 0 closes the model (load returns None)

Launch, one machine (two processes; gloo on the CPU, NCCL when every rank computes on CUDA)::

    torchrun --nproc-per-node 2 -m overspill.cli generate "PROMPT" --pp 2 --max-memory "cpu=5GiB;cpu=4GiB"

``--max-memory`` is one spec for every rank, or one per rank separated by ';' (quote it for the shell). Device
names are the machine's own: two GPUs are "cuda:0=20GiB;cuda:1=20GiB". Under NCCL, rank k's tensors cross on GPU
LOCAL_RANK. Several ranks on one machine share its RAM: give each its own budget rather than cpu=auto.

Several machines (here two, one rank each; run the same command on both, with the checkpoint on each)::

    machine A:  torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --rdzv-backend c10d \\
                    --rdzv-endpoint A:29500 -m overspill.cli generate "PROMPT" --pp 2
    machine B:  torchrun --nnodes 2 --node-rank 1 --nproc-per-node 1 --rdzv-backend c10d \\
                    --rdzv-endpoint A:29500 -m overspill.cli generate "PROMPT" --pp 2

Rank 0 (node rank 0's first process) embeds, prints and samples; the last rank runs the LM head. The ranks check
at start that they load the same model (config, a digest of the weights) and settings, and name the first thing
they disagree on. Failures end every rank with one line within ``--pp-timeout`` seconds (default 30; see
group.py), and torchrun reports the exit codes.

Tensor parallel (``--tp N``, ``overspill.load(path, tp=N)``): load_tensor in tensor_run.py, the same launch, group
and step protocol, with each block sharded across the ranks (model/shard.py) instead of the blocks split between them.
"""
from __future__ import annotations

import dataclasses

import torch

from ..errors import OverspillError
from .group import (Group, agree, checkpoint_digest, choose_backend, first_line, join, load_everywhere, launch_env,
                    resolve_timeout)
from .pipeline import Link, PipelineExecutor, StageCache, StageWorker, micro_batch_setting
from .split import rank_budgets, split_units
from .tensor_run import (TensorExecutor, TensorPipelineExecutor, TensorStageWorker, TensorWorker, all_reducer,
                         load_tensor, stage_groups)

__all__ = ["load_stage", "load_tensor", "stage_plans", "PipelineExecutor", "StageWorker", "StageCache",
           "TensorExecutor", "TensorWorker", "split_units", "rank_budgets"]


def _stage_bytes(src, reserve, quantize_head: bool) -> list[int]:
    """What each unit holds on its stage: weights, and KV cache for a block (the split balances these)."""
    from ..model.weights import units
    from ..runtime.loader import unit_weight_bytes

    cfg = src.ckpt.config
    kv = reserve.kv_bytes_per_block(cfg, src.dtype)
    return [unit_weight_bytes(src.ckpt, cfg, u, src.dtype, src.quantize, quantize_head) +
            (kv if u.startswith("block.") else 0) for u in units(cfg)]


def stage_plans(path: str, dtype, quantize: str | None, budgets: list[dict], reserve, stages: int,
                quantize_head: bool = False) -> list[tuple[tuple[int, int], object]]:
    """What ``overspill plan --pp N`` shows: each rank's unit range and its placement under its own budget."""
    from ..runtime.loader import make_plan, open_source

    src = open_source(path, dtype, quantize)
    cfg = src.ckpt.config
    qh = bool(src.quantize and quantize_head and not src.is_store)
    ranges = split_units(_stage_bytes(src, reserve, qh), stages)
    out = []
    for rank, (r, b) in enumerate(zip(ranges, budgets)):
        try:
            out.append((r, make_plan(src.ckpt, cfg, src.dtype, src.quantize, b, reserve, quantize_head=qh,
                                     unit_range=r)))
        except OverspillError as e:
            raise OverspillError(f"rank {rank}: {e}") from None
    return out


def _probe_wire(g: Group, dtype: torch.dtype) -> bool:
    """Does a ``dtype`` tensor cross each hop intact? (gloo and NCCL send bf16 as bytes on torch 2.13; an older
    build that mangles or refuses it makes the pipeline send float32.)"""
    import torch.distributed as dist

    if dtype == torch.float32:
        return True
    ref = torch.cat([torch.linspace(-3, 3, 61), torch.tensor([1e-30, -6e4, 0.1, 3.14159])]).to(dtype)
    ok = True
    try:
        if g.rank > 0:
            buf = torch.empty_like(ref, device=g.device)
            dist.recv(buf, g.rank - 1, group=g.data)
            ok = torch.equal(buf.cpu(), ref)
        if g.rank + 1 < g.world:
            dist.send(ref.to(g.device), g.rank + 1, group=g.data)
    except Exception as e:
        raise g.broken("a neighbour while checking the wire", e) from None
    return ok


def load_stage(path: str, dtype, quantize: str | None, budgets: list[dict | None], reserve, *, stages: int,
               timeout: float | None = None, quantize_head: bool = False, linear_hook=None,
               stand_in: dict[str, str] | None = None, kv_cache: str | None = None, tp: int = 1):
    """This rank's part of a ``stages``-rank pipeline (see the module docstring): a loader.Built whose executor is a
    PipelineExecutor on rank 0 and a StageWorker (call ``serve()``) on the others. ``budgets``: parsed, by rank.
    ``tp`` > 1: each stage is ``tp`` tensor-parallel ranks (rank = stage * tp + t; tensor_run.py), stages * tp in
    all."""
    timeout = resolve_timeout(timeout)
    micro_batch_setting()                    # a bad value ends every rank with its line before anything loads
    flag = "--pp" if tp == 1 else f"--pp {stages} x --tp {tp} ="
    rank, world, _ = launch_env(stages * tp, flag)
    g = join(stages * tp, timeout, choose_backend([any(k.startswith("cuda") for k in (b or {})) for b in budgets]),
             flag)
    # an error that every rank raises together (a budget too small on one rank, mismatched checkpoints) leaves the
    # group in step: the script may try again
    return _load(g, path, dtype, quantize, budgets[rank], reserve, stages, quantize_head, linear_hook, stand_in,
                 kv_cache, tp)


def _load(g: Group, path: str, dtype, quantize, budget, reserve, stages: int, quantize_head: bool, linear_hook,
          stand_in, kv_cache, tp: int = 1):
    from ..runtime.loader import build, open_source
    from ..model.shard import local_config

    run_cfg = None
    t = g.rank % tp
    try:
        src = open_source(path, dtype, quantize, (t, tp) if tp > 1 else None)
        cfg = src.ckpt.config
        qh = bool(src.quantize and quantize_head and not src.is_store)
        ranges = split_units(_stage_bytes(src, reserve, qh), stages)
        if tp > 1:
            run_cfg = local_config(cfg, tp)   # each rank reads its share of a block (open_source's tp view)
        facts = {"model": f"{cfg.family}, {cfg.n_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}",
                 "weights": f"digest {checkpoint_digest(path)}", "dtype": str(src.dtype).replace("torch.", ""),
                 "quantize": [src.quantize, qh], "kv_cache": kv_cache,
                 "reserve": [reserve.max_batch, reserve.max_seq_len], "unit ranges": ranges, "tp": tp}
        if hasattr(src.ckpt, "close"):
            src.ckpt.close()
    except OverspillError as e:
        facts = {"error": str(e)}
    except Exception as e:
        facts = {"error": f"{type(e).__name__}: {first_line(e)}"}
    agree(g, facts)
    lossless = _probe_wire(g, src.dtype)
    first, end = ranges[g.rank // tp]
    built, stages_info = load_everywhere(
        g, lambda: build(path, dtype, quantize, budget, reserve, quantize_head=quantize_head, linear_hook=linear_hook,
                         stand_in=stand_in, kv_cache=kv_cache, unit_range=(first, end),
                         run_config=run_cfg, tp=(t, tp) if tp > 1 else None),
        [first, end], lossless=lossless)
    link = Link(g, first, end, cfg.n_layers + 2, all(s["lossless"] for s in stages_info), tp)
    local = built.executor
    local.link = link
    if tp > 1:
        local.reduce = all_reducer(g, local.dtype, stage_groups(g, tp))
        ex = TensorPipelineExecutor(local, link, g, stages_info) if g.rank == 0 else TensorStageWorker(local, link, g)
    else:
        ex = PipelineExecutor(local, link, g, stages_info) if g.rank == 0 else StageWorker(local, link, g)
    return dataclasses.replace(built, config=cfg, executor=ex)
