"""Shared plumbing for quantized linears: the call protocol, bias, autograd to x, scratch buffers."""
from __future__ import annotations

import threading

import torch

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


def nbytes_of(*ts: torch.Tensor | None) -> int:
    return sum(0 if t is None else t.numel() * t.element_size() for t in ts)


# --- scratch buffers ------------------------------------------------------------------------------
# Just-in-time dequantization writes the float weight into a reusable buffer: allocating a fresh
# 64 MB tensor per call costs ~0.6 ms/MB in page faults here (measured: q.int() into a new tensor
# 38 ms vs 8 ms into a preallocated one for 16M elements). One buffer per (thread, tag, dtype),
# grown to the largest layer seen. The returned tensor is only valid until the next call that
# uses the same tag on this thread.
_tls = threading.local()


def scratch(tag: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    key = (tag, dtype)
    b = bufs.get(key)
    if b is None or b.numel() < numel:
        b = bufs[key] = torch.empty(numel, dtype=dtype)
    return b[:numel]


def scratch_nbytes() -> int:
    """Bytes held by this thread's dequantization scratch buffers (for the memory planner)."""
    return sum(nbytes_of(b) for b in getattr(_tls, "bufs", {}).values())


def release_scratch() -> None:
    """Free this thread's scratch buffers."""
    _tls.bufs = {}


# --- autograd to the input ------------------------------------------------------------------------
class _QuantMatmulFn(torch.autograd.Function):
    """y = lin(x) with dL/dx = dL/dy @ dequant(W). No weight (or bias) gradient: the weights are frozen."""

    @staticmethod
    def forward(ctx, x, lin):
        ctx.lin = lin
        return lin._forward(x)

    @staticmethod
    def backward(ctx, g):
        w = ctx.lin.dequantize().to(g.dtype)  # [N, K]
        return g @ w, None


class QuantLinear:
    """Base: subclasses implement ``_mm(x2d) -> [M, N]`` (x2d is [M, K] fp32/bf16, contiguous; result in
    x2d's dtype, no bias) and ``dequantize() -> fp32 [N, K]``."""

    scheme = "?"

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None, stored_nbytes: int):
        self.out_features, self.in_features = int(out_features), int(in_features)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"{self.scheme}: bias shape {tuple(bias.shape)} != ({self.out_features},)")
        self.bias = bias
        self._bias_cache: dict[torch.dtype, torch.Tensor] = {}
        self._stored_nbytes = stored_nbytes

    @property
    def nbytes(self) -> int:
        return self._stored_nbytes + nbytes_of(self.bias)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(out={self.out_features}, in={self.in_features}, bias={self.bias is not None})"

    def _bias_for(self, dtype):
        b = self._bias_cache.get(dtype)
        if b is None:
            b = self._bias_cache[dtype] = self.bias.to(dtype).contiguous()
        return b

    # Subclasses may set ``_fast_ok`` and define ``_fast(x) -> y | None``: a direct kernel call for contiguous bf16
    # x [..., K] (bias included), None when it does not apply (e.g. too many rows). Decode calls it ~150 times per
    # token, so skipping _forward's reshapes and checks there is measurable.
    _fast_ok = False

    def _fast(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return _QuantMatmulFn.apply(x, self)
        if self._fast_ok and x.dtype == torch.bfloat16 and x.is_contiguous() and x.shape[-1] == self.in_features:
            y = self._fast(x)
            if y is not None:
                return y
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.in_features
        if x.shape[-1] != K:
            raise ValueError(f"{self.scheme} linear expects input [..., {K}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        dt = x.dtype
        if dt not in _COMPUTE_DTYPES:
            y = self._forward(x.to(torch.bfloat16) if dt == torch.float16 else x.float())
            return y.to(dt)
        x2 = x.reshape(-1, K)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = self._mm(x2)
        if self.bias is not None:
            y = y.add_(self._bias_for(dt))
        return y.view(*lead, self.out_features)
