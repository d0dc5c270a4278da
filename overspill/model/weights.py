"""Unit weights as plain objects: tensors for norms and embeddings, Linear objects for matmuls.

``bind_*`` turn a unit's canonical tensors into these objects; the ``make_linear``
argument is where weight formats plug in (dense, oneDNN-prepacked, int8, int4, LoRA).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ModelConfig
from .linear import Linear, dense_linear

# (canonical name of the matmul, weight, bias) -> Linear
MakeLinear = Callable[[str, torch.Tensor, "torch.Tensor | None"], Linear]


def default_make_linear(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    return dense_linear(weight, bias)


@dataclass
class EmbedWeights:
    tok: torch.Tensor                 # [V, C]
    pos: torch.Tensor | None = None   # [P, C], learned absolute positions (GPT-2)


@dataclass
class BlockWeights:
    attn_norm: tuple[torch.Tensor, torch.Tensor | None]
    mlp_norm: tuple[torch.Tensor, torch.Tensor | None] | None   # None: shared with attention (GPT-J)
    qkv: Linear    # C -> (nh + 2*nkv) * hs
    out: Linear    # nh * hs -> C
    up: Linear     # C -> F (or 2F = gate|up for a gated MLP)
    down: Linear   # F -> C


@dataclass
class HeadWeights:
    norm: tuple[torch.Tensor, torch.Tensor | None]
    lm: Linear     # C -> V


Weights = EmbedWeights | BlockWeights | HeadWeights


def linear_names(unit: str) -> tuple[str, ...]:
    """The canonical names of a unit's matmul weights (what quantization and LoRA act on)."""
    if unit == "embed":
        return ()
    if unit == "head":
        return ("lm",)
    return ("qkv", "out", "up", "down")


def bind(cfg: ModelConfig, unit: str, t: dict[str, torch.Tensor], make_linear: MakeLinear = default_make_linear) -> Weights:
    """Canonical tensors of one unit -> its weight object. Pure apart from what make_linear does."""
    if unit == "embed":
        return EmbedWeights(t["tok.weight"], t.get("pos.weight"))
    if unit == "head":
        lm = t.get("lm")  # a prebuilt Linear (quantized stores hand one in)
        if lm is None:
            lm = make_linear("lm", t["lm.weight"], t.get("lm.bias"))
        return HeadWeights((t["norm.weight"], t.get("norm.bias")), lm)
    lin = {n: t[n] if n in t else make_linear(n, t[f"{n}.weight"], t.get(f"{n}.bias")) for n in linear_names(unit)}
    mlp_norm = None if cfg.shared_norm else (t["mlp_norm.weight"], t.get("mlp_norm.bias"))
    return BlockWeights((t["attn_norm.weight"], t.get("attn_norm.bias")), mlp_norm, **lin)


def units(cfg: ModelConfig) -> list[str]:
    """Execution order: embed, block.0 .. block.{L-1}, head."""
    return ["embed"] + [f"block.{i}" for i in range(cfg.n_layers)] + ["head"]
