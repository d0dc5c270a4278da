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
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight) + _nbytes(self.bias)

    def dequantize(self) -> torch.Tensor:
        return self.weight


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


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


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, *, pack: bool = True) -> Linear:
    """The fastest exact linear for this weight: prepacked oneDNN for bf16 on CPU, else F.linear."""
    if pack and weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and onednn_available():
        return PackedLinear(weight, bias)
    return DenseLinear(weight, bias)
