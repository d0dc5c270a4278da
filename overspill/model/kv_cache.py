"""Preallocated key/value cache: one (k, v) pair of [B, nkv, S_max, hs] tensors per block."""
from __future__ import annotations

import torch

from ..config import ModelConfig


class KVCache:
    """Slots [0, length) hold keys/values; ``key_valid`` marks which slots are real tokens.

    Batched prompts are left-padded so every sequence writes new tokens to the same slot,
    and padding slots are masked out through ``key_valid`` (None when nothing is padded).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", layer_devices: list | None = None):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        devs = layer_devices or [device] * cfg.n_layers
        # torch.empty does not touch the pages: memory is committed only as slots fill.
        self.k = [torch.empty(shape, dtype=dtype, device=d) for d in devs]
        self.v = [torch.empty(shape, dtype=dtype, device=d) for d in devs]
        self.max_len = max_len
        self.length = 0
        self.key_valid: torch.Tensor | None = None   # [B, max_len] bool

    @staticmethod
    def nbytes_for(cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype) -> int:
        return 2 * cfg.n_layers * batch * cfg.n_kv_heads * max_len * cfg.head_dim * torch.empty((), dtype=dtype).element_size()

    def valid_prefix(self, end: int) -> torch.Tensor | None:
        return None if self.key_valid is None else self.key_valid[:, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder sequences along the batch dimension (beam search)."""
        self.k = [t.index_select(0, index.to(t.device)) for t in self.k]
        self.v = [t.index_select(0, index.to(t.device)) for t in self.v]
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, index)
