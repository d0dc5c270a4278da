"""Linear weight objects: the one interface every weight format implements.

Model code never branches on how a weight is stored. It calls ``lin(x)``. A
format (dense fp32/bf16, oneDNN-prepacked bf16, int8, int4, ...) is an object
with this small surface:

    lin(x: Tensor[..., in_features]) -> Tensor[..., out_features]
    lin.in_features, lin.out_features
    lin.nbytes            bytes the weight (and bias) occupy where it lives
    lin.dequantize()      -> Tensor[out_features, in_features] (float, for backward / checks)

Quantized formats live in ``overspill.quant``; the dense ones live here.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ..kernels import (F32_MIN_ROWS, GRAD_KERNEL_MAX_ROWS, bf16_native, bf16_sliced_grad_input, f32_kernels,
                       f32_sliced_grad_input, f32_sliced_linear)


@runtime_checkable
class Linear(Protocol):
    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    @property
    def nbytes(self) -> int: ...

    def dequantize(self) -> torch.Tensor: ...


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class DenseLinear:
    """Plain ``F.linear`` over a [out, in] weight. Exact; the reference path."""

    __slots__ = ("weight", "bias", "in_features", "out_features")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        assert weight.dim() == 2, f"linear weight must be 2-D, got {tuple(weight.shape)}"
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype == torch.bfloat16 and w.device.type == "cpu" and not bf16_native():
            if x.requires_grad and torch.is_grad_enabled():     # training through the frozen weight
                return _FrozenFn.apply(x, self.f32_forward, self.f32_grad_input)
            if x.numel() >= F32_MIN_ROWS * self.in_features or x.dtype != w.dtype:   # (float32 activations:
                return self.f32_forward(x)                                             # training's, see finetune)
        if x.requires_grad and torch.is_grad_enabled():
            return _FrozenFn.apply(x, self._linear, self._grad_input)
        return F.linear(x, w, self.bias)

    def f32_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T + b in float32 over float32 slices of the bf16 weight (result in x's dtype)."""
        return _bf16_via_f32(x, self.weight, self.bias)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _grad_input(self, g: torch.Tensor) -> torch.Tensor:
        return g @ self.weight.to(g.dtype)

    def f32_grad_input(self, g: torch.Tensor) -> torch.Tensor:
        """g @ W in float32 over float32 slices of the weight's rows (result in g's dtype)."""
        return f32_sliced_grad_input(g, self.out_features, self.in_features, self.fill_rows)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight) + _nbytes(self.bias)

    def dequantize(self) -> torch.Tensor:
        return self.weight

    def fill_rows(self, dst: torch.Tensor, n0: int, n1: int) -> None:
        """Rows [n0, n1) of the weight into ``dst`` (float32 [n1 - n0, K])."""
        dst.copy_(self.weight[n0:n1])


def _bf16_via_f32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return f32_sliced_linear(x, w.shape[0], w.shape[1], lambda dst, n0, n1: dst.copy_(w[n0:n1]), bias)


class _FrozenFn(torch.autograd.Function):
    """y = forward(x) through a frozen weight, dL/dx = grad_input(g): no weight or bias gradient, and the graph holds
    the Linear (its bound methods), never the weight bytes or a copy of them, so a kept training graph can be pointed
    at the weight fetched again (refill_). The methods say how: a blocked weight takes its kernel's forward and an
    input gradient over its panels or slices of them on every x86 build (``f32_grad_input``; without native bf16
    the forward is float32 too: bf16 x bf16 matmuls run ~10x slower than fp32 there); a plain weight F.linear; a
    blocked one where no float32 kernel builds, F.linear over it unblocked for each product."""

    @staticmethod
    def forward(ctx, x, forward, grad_input):
        ctx.grad_input = grad_input
        return forward(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.grad_input(g), None, None


def _take_over(old, new) -> None:
    """Every attribute of ``new`` onto ``old`` (same class): slots and instance dict."""
    for a in attributes(new):
        if hasattr(new, a):
            setattr(old, a, getattr(new, a))


def attributes(obj) -> list[str]:
    """An object's attribute names: its classes' slots and its instance dict."""
    return [a for c in type(obj).__mro__ for a in getattr(c, "__slots__", ()) if a != "__weakref__"] + \
        list(getattr(obj, "__dict__", {}))


def hollow_(lin: Linear) -> None:
    """Drop ``lin``'s references to its weight bytes (tensors, and the Linear objects it wraps) until refill_ gives
    it new ones: a kept training graph must not keep a streamed unit's memory alive (a reader that allocates per
    fetch would otherwise hold every block at once). Trainable tensors (an adapter's) stay."""
    base = getattr(lin, "base", None)
    if base is not None and hasattr(lin, "pairs"):     # a LoRA wrapper: its base holds the bytes
        hollow_(base)
        return
    for a in attributes(lin):
        v = getattr(lin, a, None)
        if isinstance(v, torch.Tensor) and not v.requires_grad:
            setattr(lin, a, None)
        elif isinstance(v, dict) and any(isinstance(t, torch.Tensor) for t in v.values()):
            setattr(lin, a, {})
        elif hasattr(v, "in_features") and hasattr(v, "dequantize"):
            hollow_(v)


def refill_(old: Linear, new: Linear) -> None:
    """Point ``old`` at ``new``'s bytes: the same weight of the same unit, fetched again.

    A training step that keeps each block's graph instead of recomputing it (finetune/backward.py) holds the
    forward's Linear objects in that graph (the frozen products' backward multiplies by ``ctx.lin``); a streamed
    unit's bytes are recycled once it is released, so the backward fetches the unit again and refills the kept
    objects from the new ones, in the layout the forward used. Linears with a ``refill_`` method (wrappers, weights
    laid out on first use) say how; the rest take the new object's attributes."""
    if old is new:
        return
    if type(old) is not type(new):
        raise TypeError(f"refill_: a {type(old).__name__} cannot take a {type(new).__name__}'s weight")
    own = getattr(old, "refill_", None)
    if own is not None:
        own(new)
    else:
        _take_over(old, new)


def onednn_available() -> bool:
    """oneDNN's prepacked bf16 linear: built in, and this CPU has its bf16 path (AVX512-BW/VL/DQ or AVX-NE-CONVERT;
    on AVX2-only CPUs the reorder refuses)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return bf16_native()


class PackedLinear:
    """bf16 weight reordered once into oneDNN's blocked layout (CPU only).

    Plain bf16 ``F.linear`` reads only ~22-28 GB/s of weights on this class of CPU;
    the prepacked oneDNN kernel reads 36-46 GB/s (shared/anchors/kernels/RESULTS.md),
    i.e. close to the memory-bandwidth bound that batch-1 decode lives on. The packed
    tensor is opaque (cannot be saved with safetensors), so packing happens at load
    time (or in the prefetch thread for streamed weights: ~3 GB/s, faster than disk).
    """

    __slots__ = ("packed", "bias", "in_features", "out_features", "_nbytes")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, batch_hint: int = 1):
        assert weight.dim() == 2 and weight.device.type == "cpu"
        self.out_features, self.in_features = weight.shape
        self._nbytes = _nbytes(weight) + _nbytes(bias)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def dequantize(self) -> torch.Tensor:
        # oneDNN can reorder back to plain layout; to_dense() does that for mkldnn tensors.
        return self.packed.to_dense()


class BlockedLinear:
    """bf16 weight in overspill's blocked layout, run by its own CPU kernel (overspill/kernels).

    Decode reads every weight once per token, so its speed is the weight-read rate. The kernel streams
    4-row x 32-column tiles at about the machine's read bandwidth for 1-4 activation rows, where oneDNN's
    prepacked bf16 reaches ~0.7-0.85 of it and F.linear ~0.5 (benchmarks/bench_linear.py). Larger M
    (prefill) runs the same kernel compute-bound, at about F.linear's speed. Unlike the opaque oneDNN
    tensor the blocked weight is a plain tensor: it can be written to a store, moved, or unblocked.
    """

    __slots__ = ("blocked", "bias", "_bias_f32", "in_features", "out_features", "_nbytes", "_k")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        from ..kernels import bf16_kernels, block_weight
        assert weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
        self._k = bf16_kernels()
        assert self._k is not None, "BlockedLinear needs the CPU kernels (overspill.kernels.bf16_kernels())"
        self.out_features, self.in_features = weight.shape
        self._nbytes = _nbytes(weight) + _nbytes(bias)
        self.blocked = block_weight(weight)
        self.bias = bias
        self._bias_f32 = None if bias is None else bias.float().contiguous()

    @classmethod
    def from_blocked_(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "BlockedLinear":
        """Block ``weight`` [N, K] in place (its own bytes become the panels; no second copy) and wrap it."""
        from ..kernels import PANEL, bf16_kernels
        N, K = weight.shape
        k = bf16_kernels()
        assert k is not None and weight.is_contiguous() and weight.dtype == torch.bfloat16
        u = weight.view(torch.uint8).view(N // PANEL, -1)
        k.stripe_transpose_(u, PANEL, K // 2, 4, 0)         # [16][K/2][2 x bf16] -> [K/2][16][2 x bf16] per stripe
        self = cls.__new__(cls)
        self._k, self.out_features, self.in_features = k, N, K
        self.blocked = weight.view(N // PANEL, K // 2, PANEL, 2)
        self.bias = bias
        self._bias_f32 = None if bias is None else bias.float().contiguous()
        self._nbytes = _nbytes(weight) + _nbytes(bias)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():   # the kernel has no backward
            if not bf16_native() or f32_kernels() is not None:
                # the forward as without a graph (so a checkpointed block's recompute repeats its first forward), the
                # input gradient in float32 over the panels as they are
                return _FrozenFn.apply(x, self._product, self.f32_grad_input)
            return _FrozenFn.apply(x, self._unblocked, self._unblocked_grad_input)   # exact dense path
        if x.dtype == torch.bfloat16 and x.is_contiguous():   # decode hot path: one call, no reshapes
            return self._k.bf16_mm(x, self.blocked, self._bias_f32)
        return self._product(x)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T + b on the kernels: bf16 activations on the bf16 kernel; float32 ones (training's where the CPU
        has no native bf16) stay float32 where a kernel takes them (f32_forward)."""
        if x.dtype == torch.bfloat16:
            return self._k.bf16_mm(x.contiguous(), self.blocked, self._bias_f32)
        if x.dtype == torch.float32 and (not bf16_native() or f32_kernels() is not None):
            return self.f32_forward(x)
        return self._k.bf16_mm(x.to(torch.bfloat16).contiguous(), self.blocked, self._bias_f32).to(x.dtype)

    def _unblocked(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _unblocked_grad_input(self, g: torch.Tensor) -> torch.Tensor:
        return g @ self.dequantize().to(g.dtype)

    def f32_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T + b with float32 activations, kept float32: the AVX2 kernel takes them as they are (bf16 -> fp32
        weights in registers; 2-4x float32 slices at training's 32-256 rows; an AVX-512 CPU runs it too, with no
        whole float copy of the weight), else float32 slices of the panels."""
        k = f32_kernels()
        if k is not None:
            return k.bf16_mm(x.float().contiguous(), self.blocked, self._bias_f32).to(x.dtype)
        return f32_sliced_linear(x, self.out_features, self.in_features, self.fill_rows, self.bias)

    def f32_grad_input(self, g: torch.Tensor) -> torch.Tensor:
        """g @ W (the input gradient), accumulated in float32: up to GRAD_KERNEL_MAX_ROWS rows the AVX2 kernel reads
        the panels as they are (bf16_mm_t), above that slices of the panels, where a library's matmul is faster: bf16
        slices for a bf16 g where the CPU multiplies bf16 natively (the result is bf16 anyway), else float32."""
        rows = g.numel() // max(1, self.out_features)
        k = f32_kernels()
        if rows <= GRAD_KERNEL_MAX_ROWS and k is not None:
            return k.bf16_mm_t(g.float().contiguous(), self.blocked).to(g.dtype)
        if g.dtype == torch.bfloat16 and bf16_native():     # a bf16 result: oneDNN's bf16 products over bf16 slices
            return bf16_sliced_grad_input(g, self.out_features, self.in_features, self.fill_rows_bf16)
        return f32_sliced_grad_input(g, self.out_features, self.in_features, self.fill_rows)

    def fill_rows_bf16(self, dst: torch.Tensor, n0: int, n1: int) -> None:
        """Rows [n0, n1) (whole panels) of the weight into ``dst`` (bf16 [n1 - n0, K]): the panels' pairs put back
        in row order."""
        from ..kernels import PANEL
        dst.view(-1, PANEL, self.in_features // 2, 2).copy_(self.blocked[n0 // PANEL: n1 // PANEL].permute(0, 2, 1, 3))

    def fill_rows(self, dst: torch.Tensor, n0: int, n1: int) -> None:
        """Rows [n0, n1) (multiples of 16: whole panels) of the weight into ``dst`` (float32 [n1 - n0, K])."""
        from ..kernels import PANEL
        # both kernel builds widen panel rows in one pass (kernels/stripes.h; ~10x torch's permuted copy)
        self._k.panels_to_f32_(self.blocked[n0 // PANEL: -(-n1 // PANEL)], dst, 0, None)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def dequantize(self) -> torch.Tensor:
        from ..kernels import unblock_weight
        return unblock_weight(self.blocked)


class BlockedOnDemand:
    """A bf16 weight used where it landed (a streamed unit's: its bytes are this fetch's own), blocked for the kernel
    in place the first time a product of several rows needs it.

    A one-row product (decode) reads the plain weight with F.linear, which keeps up with a disk, and the weight is
    never re-laid out: the in-place pass costs ~0.7 s per GB on this machine's compute thread, which a streamed
    decode pass cannot hide when the disk is fast. A prefill's products (from ``F32_MIN_ROWS`` rows, where a plain
    weight would go through float32 slices at a third of the kernel's speed) block it once and run on the kernel."""

    __slots__ = ("weight", "bias", "lin", "in_features", "out_features")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias, self.lin = weight, bias, DenseLinear(weight, bias)
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # a product with a graph blocks it too: its backward must find the weight in the layout its forward saw
        if isinstance(self.lin, DenseLinear) and (x.numel() >= F32_MIN_ROWS * self.in_features
                                                  or (x.requires_grad and torch.is_grad_enabled())):
            self.lin = BlockedLinear.from_blocked_(self.weight, self.bias)
        return self.lin(x)

    def fill_rows(self, dst: torch.Tensor, n0: int, n1: int) -> None:
        self.lin.fill_rows(dst, n0, n1)

    def refill_(self, new: "BlockedOnDemand") -> None:
        """``new``'s bytes (the weight fetched again), laid out as this one's forward used them."""
        if isinstance(self.lin, BlockedLinear) and isinstance(new.lin, DenseLinear):
            new.lin = BlockedLinear.from_blocked_(new.weight, new.bias)
        refill_(self.lin, new.lin)
        self.weight, self.bias = new.weight, new.bias

    def f32_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin.f32_forward(x)

    def f32_grad_input(self, g: torch.Tensor) -> torch.Tensor:
        return self.lin.f32_grad_input(g)

    @property
    def nbytes(self) -> int:
        return self.lin.nbytes

    def dequantize(self) -> torch.Tensor:
        return self.lin.dequantize()


def blocked_available(weight: torch.Tensor) -> bool:
    from ..kernels import bf16_kernels, blockable
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and blockable(*weight.shape) and bf16_kernels() is not None)


def dense_linear_copies(weight: torch.Tensor) -> bool:
    """Whether dense_linear(weight) re-lays the weight out into new memory (blocked or oneDNN-packed) rather than
    using it where it is."""
    return blocked_available(weight) or (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
                                         and onednn_available())


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, *, pack: bool = True,
                 owned: bool = False) -> Linear:
    """The fastest exact linear for this weight on its device.

    bf16 on CPU: overspill's blocked kernel where it builds (AVX512-BF16, or AVX2 + FMA), else oneDNN prepacked;
    anything else (fp32, GPU, odd shapes): F.linear. ``owned``: the weight's memory is the caller's to give away (a
    tensor just read for this linear alone): the blocked layout is made in place, with no second copy.
    """
    if pack and blocked_available(weight):
        if owned and weight.is_contiguous():
            return BlockedLinear.from_blocked_(weight, bias)
        return BlockedLinear(weight, bias)
    if pack and weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and onednn_available():
        return PackedLinear(weight, bias)
    return DenseLinear(weight, bias)
