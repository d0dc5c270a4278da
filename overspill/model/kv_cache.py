"""Preallocated key/value cache: one (k, v) pair of [B, nkv, S_max, hs] per block.

Entries are plain tensors in the compute dtype, or (``kv_cache="int8"``) QuantKV: int8 codes with one scale per
sequence, head and slot, a bit over half the bytes of bf16. That is what lets a large throughput batch fit
beside streamed weights (FlexGen compresses its KV cache for the same reason).
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import OverspillError

KV_FORMATS = ("int8",)


def check_kv_format(kv_format: str | None) -> str | None:
    """The format, or one clear error naming the ones there are (None: the compute dtype)."""
    if kv_format not in (None, *KV_FORMATS):
        raise OverspillError(f"kv_cache: unknown format {kv_format!r}; expected one of {', '.join(KV_FORMATS)} "
                             f"(or none for the compute dtype)")
    return kv_format


class QuantKV:
    """One block's keys or values in int8: codes [B, nkv, S, hs] and fp32 scales [B, nkv, S, 1].

    Each (sequence, head, slot) vector is rounded to absmax/127 steps when it is written; reads dequantize the
    slots [0, end) into the compute dtype (a transient the memory plan counts). Rows slice like a tensor
    (micro-batches)."""

    __slots__ = ("q", "s")

    def __init__(self, q: torch.Tensor, s: torch.Tensor):
        self.q, self.s = q, s

    @classmethod
    def empty(cls, shape: tuple, device) -> "QuantKV":
        return cls(torch.empty(shape, dtype=torch.int8, device=device),
                   torch.empty(shape[:-1] + (1,), dtype=torch.float32, device=device))

    @staticmethod
    def nbytes_per_vector(head_dim: int) -> int:
        return head_dim + 4

    @property
    def device(self) -> torch.device:
        return self.q.device

    def __getitem__(self, rows) -> "QuantKV":
        return QuantKV(self.q[rows], self.s[rows])

    def write(self, start: int, x: torch.Tensor) -> None:
        """x [B, nkv, T, hs] (any float dtype) into slots [start, start + T)."""
        xf = x.to(torch.float32, copy=True)              # the one fp32 temporary (a copy even for fp32 input)
        s = xf.abs().amax(-1, keepdim=True) / 127.0
        end = start + x.shape[2]
        self.q[:, :, start:end] = xf.div_(s.clamp_min(torch.finfo(torch.float32).tiny)).round_()
        self.s[:, :, start:end] = s

    def read(self, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Slots [0, end) dequantized: [B, nkv, end, hs] in ``dtype``. Codes are exact in bf16/fp16; the in-place
        multiply by the fp32 scale computes in fp32 and rounds once."""
        return self.q[:, :, :end].to(dtype).mul_(self.s[:, :, :end])


class KVCache:
    """Slots [0, length) hold keys/values; ``key_valid`` marks which slots are real tokens.

    Batched prompts are left-padded so every sequence writes new tokens to the same slot,
    and padding slots are masked out through ``key_valid`` (None when nothing is padded).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", layer_devices: list | None = None, kv_format: str | None = None):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        devs = layer_devices or [device] * cfg.n_layers
        # torch.empty does not touch the pages: memory is committed only as slots fill.
        new = (lambda d: QuantKV.empty(shape, d)) if kv_format == "int8" else \
            (lambda d: torch.empty(shape, dtype=dtype, device=d))
        self.k = [new(d) for d in devs]
        self.v = [new(d) for d in devs]
        self.max_len = max_len
        self.length = 0
        self.key_valid: torch.Tensor | None = None   # [B, max_len] bool

    @staticmethod
    def nbytes_for(cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, kv_format: str | None = None) -> int:
        vectors = 2 * cfg.n_layers * batch * cfg.n_kv_heads * max_len
        if kv_format == "int8":
            return vectors * QuantKV.nbytes_per_vector(cfg.head_dim)
        return vectors * cfg.head_dim * torch.empty((), dtype=dtype).element_size()

    def valid_prefix(self, end: int) -> torch.Tensor | None:
        return None if self.key_valid is None else self.key_valid[:, :end]

    def copy_rows(self, src: list[int], dst: list[int], end: int) -> None:
        """Slots [0, end) of rows ``src`` into rows ``dst`` (a beam continued by two beams: the second gets a copy of
        its row). The rows of ``dst`` are not among ``src``."""
        for cache in (self.k, self.v):
            for t in cache:
                if t is None:
                    continue
                for x in ((t.q, t.s) if isinstance(t, QuantKV) else (t,)):
                    i, j = torch.tensor(src, device=x.device), torch.tensor(dst, device=x.device)
                    x[j, :, :end] = x[i, :, :end]
        if self.key_valid is not None:
            self.key_valid[dst, :end] = self.key_valid[src, :end]
