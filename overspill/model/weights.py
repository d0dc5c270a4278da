"""Unit weights as plain objects: tensors for norms and embeddings, Linear objects for matmuls.

``bind_*`` turn a unit's canonical tensors into these objects; the ``make_linear``
argument is where weight formats plug in (dense, oneDNN-prepacked, int8, int4, LoRA).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ModelConfig
from .linear import Linear, dense_linear

# (canonical name of the matmul, weight, bias) -> Linear: how a weight format is built from tensors
MakeLinear = Callable[[str, torch.Tensor, "torch.Tensor | None"], Linear]
# (unit, canonical name of the matmul, its Linear) -> the Linear to run: applied to a built unit from outside, keyed
# by unit ("block.3", "head") and projection ("qkv", "out", "up", "down", "lm"); LoRA adapters plug in here
LinearHook = Callable[[str, str, Linear], Linear]


def default_make_linear(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    return dense_linear(weight, bias)


@dataclass
class EmbedWeights:
    tok: torch.Tensor                 # [V, C] (or quant.Int8Table: the table quantized, looked up by rows())
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


def hook_linears(unit: str, w: Weights, hook: LinearHook | None) -> Weights:
    """``w`` with each matmul's Linear replaced by hook(unit, name, linear) (``w`` itself without a hook), then, when
    the hook has a ``norms(unit, w)`` method (an adapter that trains norm modules), its norms replaced by it."""
    names = linear_names(unit)
    if hook is None or not names:
        return w
    w = dataclasses.replace(w, **{n: hook(unit, n, getattr(w, n)) for n in names})
    norms = getattr(hook, "norms", None)
    return norms(unit, w) if norms is not None else w


def units(cfg: ModelConfig) -> list[str]:
    """Execution order: embed, block.0 .. block.{L-1}, head."""
    return ["embed"] + [f"block.{i}" for i in range(cfg.n_layers)] + ["head"]


def linear_shapes(cfg: ModelConfig, unit: str) -> dict[str, tuple[int, int]]:
    """{canonical matmul name: (out, in)} of a unit's linear weights, in their fused canonical layout (qkv = q|k|v
    rows, up = gate|up rows for a gated MLP). The one statement of these shapes: the checkpoint readers check against
    it, the planner and the store writer size quantized weights from it."""
    C, F = cfg.hidden_size, cfg.intermediate_size
    if unit == "embed":
        return {}
    if unit == "head":
        return {"lm": (cfg.vocab_size, C)}
    return {"qkv": (cfg.q_size + 2 * cfg.kv_size, C), "out": (C, cfg.q_size),
            "up": ((2 if cfg.gated_mlp else 1) * F, C), "down": (C, F)}


def canonical_shapes(cfg: ModelConfig, unit: str) -> dict[str, tuple[int, ...]]:
    """{canonical tensor name: shape} of every tensor a unit may hold (optional ones included: biases, learned
    positions, a separate MLP norm)."""
    C = cfg.hidden_size
    if unit == "embed":
        return {"tok.weight": (cfg.vocab_size, C), "pos.weight": (cfg.max_positions, C)}
    out: dict[str, tuple[int, ...]] = {}
    norms = ("norm",) if unit == "head" else ("attn_norm", "mlp_norm")
    for n in norms:
        out[f"{n}.weight"], out[f"{n}.bias"] = (C,), (C,)
    for n, (N, K) in linear_shapes(cfg, unit).items():
        out[f"{n}.weight"], out[f"{n}.bias"] = (N, K), (N,)
    return out
