"""What an architecture is: a config mapping, literal weight-name tables, and one finishing transform."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ModelConfig
from ..errors import ConfigError

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]       # HF "architectures" strings this family loads
    model_types: tuple[str, ...]         # HF "model_type" strings
    config_from_hf: Callable[[dict], ModelConfig]
    # Literal tables: HF tensor name -> canonical name in the unit (None: present in some
    # checkpoints and deliberately dropped, e.g. causal-mask buffers). Block names use {}
    # for the layer index.
    embed_table: dict[str, str | None]
    block_table: dict[str, str | None]
    head_table: dict[str, str | None]
    # Turns a block's renamed tensors into the canonical block layout (fuse q/k/v, ...).
    finish_block: Callable[[ModelConfig, Tensors], Tensors]
    # Optional prefix that checkpoints of the bare base model (e.g. GPT2Model) omit.
    base_prefix: str = ""
    # The matmul weights are stored [in, out] (GPT-2's Conv1D; PEFT calls this fan_in_fan_out).
    conv1d: bool = False


def field(hf: dict, key: str, family: str, *alts: str):
    """A required config.json field (or one of its historical aliases)."""
    for k in (key, *alts):
        if hf.get(k) is not None:
            return hf[k]
    raise ConfigError(f"config.json: missing field '{key}' (required for {family})")


def eos_list(hf: dict) -> list[int]:
    e = hf.get("eos_token_id")
    if e is None:
        return []
    return [int(x) for x in e] if isinstance(e, (list, tuple)) else [int(e)]


def rope_settings(hf: dict, family: str) -> tuple[float, float, float]:
    """(theta, partial_rotary_factor, linear scale) from either transformers-5 ``rope_parameters``
    or the older ``rope_theta`` / ``rotary_emb_base`` / ``rotary_pct`` / ``rope_scaling`` fields."""
    rp = hf.get("rope_parameters") or {}
    theta = rp.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    scaling = hf.get("rope_scaling") or {}
    rope_type = rp.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    scale = 1.0
    if rope_type == "linear":
        scale = float(rp.get("factor", scaling.get("factor", 1.0)))
    elif rope_type not in ("default", None):
        raise ConfigError(f"config.json: rope type '{rope_type}' is not supported for {family} (supported: default, linear)")
    return float(theta), float(partial), scale


ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "silu": "silu", "swish": "silu", "relu": "relu"}


def activation(name: str, family: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(f"config.json: activation '{name}' is not supported for {family} "
                          f"(supported: {', '.join(sorted(ACTIVATIONS))})")
    return ACTIVATIONS[name]
