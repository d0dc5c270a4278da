"""Shared plumbing for quantized linears: the call protocol, bias, autograd to x, scratch buffers, and the switch
between the CPU kernels' paths and the portable path.

The portable path runs on any device with torch ops only: ``y = F.linear(x, W)`` where W is this one weight,
dequantized just in time into a reusable scratch buffer on the weight's device (``_jit_weight``). It is what a
Linear over tensors on an accelerator always takes (the CPU-only ops: overspill's C++ kernels, int4pack/int8pack
matmuls, oneDNN, never see a non-CPU tensor), and what a CPU Linear takes when asked: ``make_linear(...,
portable=True)`` for one Linear, ``portable()`` (a context manager) or ``set_portable(True)`` for every Linear built
while it is on, in any thread, or OVERSPILL_QUANT_PORTABLE=1 in the environment for the whole process.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch
import torch.nn.functional as F

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16)
_PORTABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # F.linear runs them natively on every device

# --- choosing the portable path ------------------------------------------------------------------------------------
_force_portable = os.environ.get("OVERSPILL_QUANT_PORTABLE", "0") == "1"


def set_portable(on: bool) -> bool:
    """Process-wide: every quantized Linear built from now on takes the portable path, CPU ones too (tests, and the
    reference for the kernels). Returns the previous setting. Linears already built keep their path."""
    global _force_portable
    was, _force_portable = _force_portable, bool(on)
    return was


@contextlib.contextmanager
def portable(on: bool = True):
    """``with portable():`` set_portable(on) for the block, then the previous setting again. Process-wide, not
    per thread: a streaming source builds its units on the compute thread during forwards, so keep the block
    around the forwards too."""
    was = set_portable(on)
    try:
        yield
    finally:
        set_portable(was)


def wants_portable(t: torch.Tensor, portable: bool | None) -> bool:
    """Whether a Linear over stored tensor ``t`` takes the portable path: always off the CPU; on the CPU when asked
    (``portable=True``) or, with ``portable=None``, when set_portable / OVERSPILL_QUANT_PORTABLE says so."""
    if t.device.type != "cpu":
        return True
    return _force_portable if portable is None else bool(portable)


def nbytes_of(*ts: torch.Tensor | None) -> int:
    return sum(0 if t is None else t.numel() * t.element_size() for t in ts)


# --- scratch buffers ------------------------------------------------------------------------------
# Just-in-time dequantization writes the float weight into a reusable buffer: allocating a fresh
# 64 MB tensor per call costs ~0.6 ms/MB in page faults here (measured: q.int() into a new tensor
# 38 ms vs 8 ms into a preallocated one for 16M elements). One buffer per (thread, tag, dtype, device),
# grown to the largest layer seen. The returned tensor is only valid until the next call that
# uses the same tag on this thread. On an accelerator the kernels that fill and read the buffer are
# queued on one stream, in call order, so the next weight's fill runs after this one's matmul.
_tls = threading.local()


def scratch(tag: str, numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    device = torch.device(device)
    key = (tag, dtype, device)
    b = bufs.get(key)
    if b is None or b.numel() < numel:
        bufs.pop(key, None)          # free the smaller one first (an accelerator's memory is tight)
        # a normal tensor even when first asked for under torch.inference_mode (generation): an inference tensor
        # refuses in-place writes outside it, and the same thread may train (autograd on) later
        with torch.inference_mode(False):
            b = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return b[:numel]


def scratch_nbytes(device: torch.device | str | None = None) -> int:
    """Bytes held by this thread's dequantization scratch buffers (for the memory planner); on ``device`` only
    when given."""
    dev = None if device is None else torch.device(device)
    return sum(nbytes_of(b) for (_, _, d), b in getattr(_tls, "bufs", {}).items() if dev is None or d == dev)


def release_scratch() -> None:
    """Free this thread's scratch buffers."""
    _tls.bufs = {}


# --- autograd to the input ------------------------------------------------------------------------
class _QuantMatmulFn(torch.autograd.Function):
    """y = lin(x) with dL/dx = dL/dy @ dequant(W). No weight (or bias) gradient: the weights are frozen.
    The portable path multiplies by its just-in-time weight in g's dtype (in float32 bit-equal to dequantize()),
    on the weight's device, in the scratch buffer of the thread autograd runs the backward on."""

    @staticmethod
    def forward(ctx, x, lin):
        ctx.lin = lin
        return lin._forward(x)

    @staticmethod
    def backward(ctx, g):
        lin = ctx.lin
        if lin.portable and g.dtype in _PORTABLE_DTYPES:
            return g @ lin._jit_weight(g.dtype), None   # [.., N] @ [N, K]
        return lin._grad_input(g), None


class QuantLinear:
    """Base: subclasses implement ``_mm(x2d) -> [M, N]`` (x2d is [M, K] fp32/bf16, contiguous; result in
    x2d's dtype, no bias; the CPU paths), ``_jit_weight(dtype) -> [N, K]`` (the weight dequantized into this thread's
    scratch on the weight's device, valid until the next such call: the portable path) and
    ``dequantize() -> fp32 [N, K]``. ``portable``: whether calls take the portable path (see the module docstring)."""

    scheme = "?"

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None, stored_nbytes: int,
                 portable: bool = False):
        self.portable = bool(portable)
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

    def _grad_input(self, g: torch.Tensor) -> torch.Tensor:
        """dL/dx = g @ W on the CPU paths; formats that can dequantize a slice of rows at a time override this."""
        return g @ self.dequantize().to(g.dtype)  # [.., N] @ [N, K]

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
        if dt not in (_PORTABLE_DTYPES if self.portable else _COMPUTE_DTYPES):
            y = self._forward(x.to(torch.bfloat16) if dt == torch.float16 else x.float())
            return y.to(dt)
        x2 = x.reshape(-1, K)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = F.linear(x2, self._jit_weight(dt)) if self.portable else self._mm(x2)
        if self.bias is not None:
            y = y.add_(self._bias_for(dt))
        return y.view(*lead, self.out_features)

    def _jit_weight(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError
