"""Where each Hugging Face module's rows land in overspill's fused linears: what adapters (LoRA) are keyed by.

A PEFT adapter names Hugging Face modules (``transformer.h.3.attn.q_proj``); overspill runs fused canonical
linears (``qkv`` = q|k|v rows, GPT-J's q and k rows permuted to the rotate-half layout, GPT-NeoX's per-head
interleaving undone, Llama's gate|up). Rather than restate those layouts, the map is traced: each module's rows are
tagged with codes, put through the family's own ``finish_block``, and read back from the canonical tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from .base import Family

_TAG = 1 << 24   # code = module index * _TAG + row (exact in float64)


@dataclass(frozen=True)
class ModuleMap:
    """One Hugging Face module of a unit kind: ``module`` has "{}" for the layer index in blocks."""
    module: str            # "transformer.h.{}.attn.q_proj", "lm_head"
    unit: str              # "block" | "head"
    linear: str            # the canonical linear it feeds: qkv | out | up | down | lm
    out_features: int
    in_features: int
    cols: torch.Tensor     # [out_features] int64: the canonical output row of each of the module's rows

    def path(self, layer: int | None = None) -> str:
        return self.module.format(layer) if "{}" in self.module else self.module

    @property
    def name(self) -> str:
        """The last component, as PEFT's target_modules usually name it (q_proj, query_key_value, c_attn)."""
        return self.module.rsplit(".", 1)[-1]


def _pre_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each pre-fusion matmul name the family tables use."""
    C, F, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    return {"q": (q, C), "k": (kv, C), "v": (kv, C), "qkv": (q + 2 * kv, C), "qkv_neox": (q + 2 * kv, C),
            "out": (C, q), "gate": (F, C), "up": (F, C), "down": (C, F), "lm": (cfg.vocab_size, C)}


def _linear_entries(table: dict[str, str | None]) -> list[tuple[str, str]]:
    """(module template, pre-fusion name) of a table's matmul weights."""
    out = []
    for hf, canon in table.items():
        if canon and hf.endswith(".weight") and canon.endswith(".weight") and "norm" not in canon:
            out.append((hf[: -len(".weight")], canon[: -len(".weight")]))
    return out


def module_maps(fam: Family, cfg: ModelConfig) -> list[ModuleMap]:
    """Every matmul module of a block (then the head) with the canonical rows its outputs fill."""
    shapes = _pre_shapes(cfg)
    entries = _linear_entries(fam.block_table)
    tagged = {}
    for m, (_, pre) in enumerate(entries):
        n = shapes[pre][0]
        code = (m * _TAG + torch.arange(n, dtype=torch.float64))[:, None]          # [n, 1]: one tag per row
        tagged[f"{pre}.weight"] = code.t().contiguous() if fam.conv1d else code     # Conv1D stores [in, out]
    fused = fam.finish_block(cfg, tagged)
    maps = []
    for m, (module, pre) in enumerate(entries):
        out_f, in_f = shapes[pre]
        for lin in ("qkv", "out", "up", "down"):
            codes = fused[f"{lin}.weight"].reshape(-1).long()
            hit = (codes // _TAG == m).nonzero().flatten()
            if hit.numel():
                cols = torch.empty(out_f, dtype=torch.long)
                cols[codes[hit] % _TAG] = hit
                assert hit.numel() == out_f, f"{module}: {hit.numel()} of {out_f} rows found in {lin}"
                maps.append(ModuleMap(module, "block", lin, out_f, in_f, cols))
                break
        else:
            raise AssertionError(f"{fam.name}: module {module} lands in no canonical linear")
    for module, pre in _linear_entries(fam.head_table):
        out_f, in_f = shapes[pre]
        maps.append(ModuleMap(module, "head", "lm", out_f, in_f, torch.arange(out_f)))
    return maps


@dataclass(frozen=True)
class NormMap:
    """One Hugging Face norm module of a unit kind (what PEFT's ``modules_to_save`` trains as a whole copy)."""
    module: str            # "transformer.h.{}.ln_1", "transformer.ln_f"
    unit: str              # "block" | "head"
    norm: str              # the canonical norm it is: attn_norm | mlp_norm | norm
    size: int
    has_bias: bool

    def path(self, layer: int | None = None) -> str:
        return self.module.format(layer) if "{}" in self.module else self.module


def norm_maps(fam: Family, cfg: ModelConfig) -> list[NormMap]:
    """Every norm module of a block (then the head), from the family's name tables."""
    out = []
    for kind, table in (("block", fam.block_table), ("head", fam.head_table)):
        for hf, canon in table.items():
            if canon and canon.endswith("norm.weight") and hf.endswith(".weight"):
                module, norm = hf[: -len(".weight")], canon[: -len(".weight")]
                if norm == "mlp_norm" and cfg.shared_norm:
                    continue
                out.append(NormMap(module, kind, norm, cfg.hidden_size,
                                   cfg.norm_bias and table.get(f"{module}.bias") == f"{norm}.bias"))
    return out
