"""Tensor parallel (Megatron-LM, Shoeybi et al. 2019, sec. 3): what each rank holds of a block, and its config.

    qkv  [q heads | k heads | v heads] x C   column-parallel: rank r keeps its q heads and the k/v heads they use
    out  C x (q heads)                       row-parallel: the same heads' columns; partial sums, then all-reduce
    up   [gate | up] x C                     column-parallel: rank r's slice of each section
    down C x F                               row-parallel: the same slice of F; partial sums, then all-reduce

A rank runs the ordinary decoder over its local config (n_heads / T query heads, its KV heads, F / T), so nothing
in the block math changes but one sum across ranks after each row-parallel projection: after the attention and
after the MLP, or once per block when the residual is parallel (GPT-J, parallel GPT-NeoX: x + attn + mlp, both
partial, summed locally, then reduced together). Row-parallel biases stay on rank 0 only, so the sum adds them once.
Grouped-query models with fewer KV heads than ranks replicate a KV head on the ranks whose query heads use it.
The embedding and the LM head are replicated: a vocab-parallel head saves V x C / T bytes per rank but needs an
all-gather of the logits per step, and the sampler wants them whole on one rank.

A rank reads only its share of a Hugging Face directory: ``raw_parts`` says which rows or columns of each tensor as
stored (before the family's transforms: fusing q|k|v and gate|up, GPT-J's rotary layout, NeoX's per-head qkv,
GPT-2's transposed Conv1D) make up that share. Each transform works head by head or row by row, so it turns the
rank's slices, run at the local config, into exactly what ``shard_block`` cuts from the whole block (tested per
family). The same split is applied once on disk by ``overspill convert --tensor-parallel N`` (checkpoint/store.py):
each block stored as N shard files, one contiguous read per rank; quantized stores quantize each shard.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import ModelConfig
from ..errors import OverspillError


def check(cfg: ModelConfig, world: int, flag: str = "--tp") -> None:
    """One line when ``cfg`` cannot be split ``world`` ways (``flag``: the option that asked for it)."""
    nh, nkv, F = cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size
    why = []
    if nh % world:
        why.append(f"{nh} query heads")
    if nkv % world and world % nkv:
        why.append(f"{nkv} key/value heads (for fewer KV heads than ranks, the ranks must be a multiple of them)")
    if F % world:
        why.append(f"an MLP width of {F}")
    if why:
        raise OverspillError(f"{flag} {world}: this model cannot be split {world} ways: {'; '.join(why)} do not "
                             f"divide evenly by {world}")


def local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config one rank's decoder runs: its share of the heads and of the MLP width."""
    check(cfg, world)
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // world, n_kv_heads=max(1, cfg.n_kv_heads // world),
                               intermediate_size=cfg.intermediate_size // world)


def _kv_heads(cfg: ModelConfig, rank: int, world: int) -> range:
    """The key/value heads rank ``rank``'s query heads attend with."""
    nkv = cfg.n_kv_heads
    if nkv % world == 0:
        n = nkv // world
        return range(rank * n, (rank + 1) * n)
    group = cfg.n_heads // nkv                       # query heads per KV head
    first_q = rank * (cfg.n_heads // world)
    return range(first_q // group, first_q // group + 1)


def _rows(t: torch.Tensor | None, parts: list[tuple[int, int]]) -> torch.Tensor | None:
    if t is None:
        return None
    return torch.cat([t[a:b] for a, b in parts]) if len(parts) > 1 else t[parts[0][0]:parts[0][1]].clone()


def linear_parts(cfg: ModelConfig, rank: int, world: int) -> dict[str, tuple[str, list[tuple[int, int]]]]:
    """What rank ``rank`` keeps of each block linear, in canonical indices: {"qkv": ("rows", [(a, b), ...]), "up":
    ("rows", ...), "out": ("cols", [(a, b)]), "down": ("cols", [(a, b)])}: its output rows of a column-parallel
    linear, its input columns of a row-parallel one, as half-open ranges in order."""
    hs, nh, F = cfg.head_dim, cfg.n_heads, cfg.intermediate_size
    nhl, Fl = nh // world, F // world
    kv = _kv_heads(cfg, rank, world)
    q_rows = (rank * nhl * hs, (rank + 1) * nhl * hs)
    k0, v0 = nh * hs, nh * hs + cfg.n_kv_heads * hs
    k_rows = (k0 + kv.start * hs, k0 + kv.stop * hs)
    v_rows = (v0 + kv.start * hs, v0 + kv.stop * hs)
    f_rows = [(rank * Fl, (rank + 1) * Fl)]
    if cfg.gated_mlp:                                # [gate | up]: the same slice of each section
        f_rows.append((F + rank * Fl, F + (rank + 1) * Fl))
    return {"qkv": ("rows", [q_rows, k_rows, v_rows]), "up": ("rows", f_rows), "out": ("cols", [q_rows]),
            "down": ("cols", f_rows[:1])}


Parts = list[tuple[int, int]]


def raw_parts(cfg: ModelConfig, raw: str, conv1d: bool, rank: int, world: int) -> tuple[int, Parts] | None:
    """Which part of a block's raw canonical tensor ``raw`` (e.g. "q.weight", "qkv_neox.bias", "down.weight"; see
    checkpoint/hf.py) rank ``rank`` reads, as stored: (dim, half-open ranges along it, in order); (0, []) when the
    rank needs none of it (a row-parallel bias, added by rank 0 only); None when it needs it whole (norms).
    ``conv1d``: the checkpoint stores its linears as [in, out] (GPT-2), so output rows are columns there."""
    part, _, kind = raw.partition(".")
    hs, Fl = cfg.head_dim, cfg.intermediate_size // world
    lp = linear_parts(cfg, rank, world)
    kv = _kv_heads(cfg, rank, world)
    q_rows, k_rows, v_rows = lp["qkv"][1]
    out_dim = 1 if conv1d and kind == "weight" else 0      # where output rows lie in the stored tensor
    in_dim = 0 if conv1d else 1
    if part == "q":
        return out_dim, [q_rows]
    if part in ("k", "v"):
        return out_dim, [(kv.start * hs, kv.stop * hs)]
    if part == "qkv":                                   # fused q|k|v (GPT-2's c_attn)
        return out_dim, [q_rows, k_rows, v_rows]
    if part == "qkv_neox":                              # per head [q | k | v]: the rank's heads are one range
        nhl = cfg.n_heads // world
        return out_dim, [(rank * nhl * 3 * hs, (rank + 1) * nhl * 3 * hs)]
    if part in ("gate", "up"):                          # stored apart: the same slice of each
        return out_dim, [(rank * Fl, (rank + 1) * Fl)]
    if part in ("out", "down"):
        if kind == "bias":
            return None if rank == 0 else (0, [])
        return in_dim, lp[part][1]
    return None


def shard_block(cfg: ModelConfig, t: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """A block's canonical tensors (model/weights.py layout) -> rank ``rank``'s share. Pure; copies the slices."""
    out = dict(t)
    for name, (kind, parts) in linear_parts(cfg, rank, world).items():
        if kind == "rows":
            out[f"{name}.weight"] = _rows(t[f"{name}.weight"], parts)
            if f"{name}.bias" in t:
                out[f"{name}.bias"] = _rows(t[f"{name}.bias"], parts)
        else:
            (a, b), = parts
            out[f"{name}.weight"] = t[f"{name}.weight"][:, a:b].contiguous()
    if rank != 0:                                    # row-parallel biases: added once, by rank 0's partial sum
        out.pop("out.bias", None)
        out.pop("down.bias", None)
    return out
