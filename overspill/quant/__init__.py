"""Quantized weight formats for the big linear weights (W is [out=N, in=K]).

Schemes (details and measured kernel choices in each module):
  int8          per-output-channel symmetric int8 + bf16 scales. overspill's w8a8 VNNI kernel (activations
                quantized per 64 inputs); without it int8pack (M=1) / oneDNN w8a8 (M>=2).           (int8.py)
  int8-dynamic  blockwise (64) dynamic-tree 8-bit code (Dettmers 2021) + fp32 absmax; JIT LUT dequant + F.linear. (codebook.py)
  int4          group-wise (64) asymmetric 4-bit, stored in torch's CPU int4pack layout; overspill's w4a8 VNNI kernel
                (activations quantized per group); without it int4pack / JIT dequant + matmul.       (int4.py)
  nf4           blockwise (64) 4-bit NormalFloat (QLoRA) + fp32 absmax; JIT LUT dequant + F.linear.  (codebook.py)

API:
  quantize(weight [N,K], scheme, **opts) -> dict of plain contiguous CPU tensors (safetensors-ready)
      opts: int4: group_size (32/64/128/256; default 64, or 32 if K % 64); int8-dynamic/nf4: blocksize (default 64)
  make_linear(scheme, tensors, bias=None, **opts) -> Linear   (int8: act_quant="auto"|"never"|"always"; int4: act_quant="auto"|"never")
  dequantize(scheme, tensors) -> float32 [N, K]
  quantized_nbytes(scheme, out_features, in_features, **opts) -> bytes of the stored tensors
  scratch_nbytes_for(scheme, out_features, in_features, dtype) -> bytes of reusable dequantization scratch a
      prefill-sized call leaves allocated on its thread (0 where the kernels compute from the codes directly)
Linear objects: lin(x[..., K] fp32|bf16) -> [..., N] in x.dtype; in_features, out_features, nbytes, dequantize();
differentiable w.r.t. x (backward = grad @ dequant(W)) when grad is enabled and x.requires_grad.
"""
from __future__ import annotations

import torch

from . import codebook, int4, int8
from ._base import QuantLinear, release_scratch, scratch_nbytes

SCHEMES: tuple[str, ...] = ("int8", "int8-dynamic", "int4", "nf4")

__all__ = ["SCHEMES", "quantize", "make_linear", "dequantize", "quantized_nbytes", "QuantLinear",
           "scratch_nbytes", "scratch_nbytes_for", "release_scratch"]


def _check_scheme(scheme: str):
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {SCHEMES}")


def _check_weight(weight: torch.Tensor, scheme: str):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{scheme}: weight must be a 2-D [out, in] tensor, got {getattr(weight, 'shape', type(weight))}")
    if not weight.is_floating_point():
        raise ValueError(f"{scheme}: weight must be floating point, got {weight.dtype}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{scheme}: empty weight {tuple(weight.shape)}")


def quantize(weight: torch.Tensor, scheme: str, **opts) -> dict[str, torch.Tensor]:
    """Pure function: float weight [N, K] -> the plain contiguous CPU tensors that store it."""
    _check_scheme(scheme)
    _check_weight(weight, scheme)
    if scheme == "int8":
        if opts:
            raise TypeError(f"int8: unexpected options {sorted(opts)}")
        return int8.quantize(weight)
    if scheme == "int4":
        return int4.quantize(weight, **opts)
    return codebook.quantize(weight, scheme, **opts)


def make_linear(scheme: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None, *,
                repack: bool | str = True, **opts):
    """Runtime Linear from stored tensors. ``repack=True`` converts int8/int4 into the CPU kernels' panel layout
    where they build (a one-time copy; the fast path). ``repack="inplace"`` converts the given tensors' own bytes
    into that layout (same size; a few MB of scratch at a time): for weights in a streaming staging buffer, whose
    memory the budget already counts, so streamed units run the same kernels as resident ones. ``repack=False``
    uses the tensors as they are with torch's kernels. (int8's oneDNN prepack without the kernels happens lazily;
    int4 files packed for another CPU layout are repacked regardless.)"""
    _check_scheme(scheme)
    if scheme == "int8":
        return int8.Int8Linear(tensors, bias, repack=repack, **opts)
    if scheme == "int4":
        return int4.Int4Linear(tensors, bias, repack=repack, **opts)
    if opts:
        raise TypeError(f"{scheme}: unexpected options {sorted(opts)}")
    return codebook.CodebookLinear(scheme, tensors, bias, repack=repack)


def dequantize(scheme: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Stored tensors -> float32 [N, K]."""
    _check_scheme(scheme)
    if scheme == "int8":
        return int8.dequantize(tensors)
    if scheme == "int4":
        return int4.dequantize(tensors)
    return codebook.dequantize(scheme, tensors)


def quantized_nbytes(scheme: str, out_features: int, in_features: int, **opts) -> int:
    """Bytes of the stored tensors, from the shape only (raises ValueError for unsupported shapes)."""
    _check_scheme(scheme)
    N, K = int(out_features), int(in_features)
    if scheme == "int8":
        return int8.nbytes(N, K)
    if scheme == "int4":
        return int4.nbytes(N, K, **opts)
    return codebook.nbytes(scheme, N, K, **opts)


def scratch_nbytes_for(scheme: str, out_features: int, in_features: int, dtype: torch.dtype) -> int:
    """Bytes of per-thread dequantization scratch (quant/_base.scratch) that a prefill-sized call of a linear of this
    shape leaves allocated, activations in ``dtype``. The buffers are kept for reuse, so memory plans count them."""
    _check_scheme(scheme)
    N, K = int(out_features), int(in_features)
    if scheme == "int4":
        return int4.scratch_nbytes(N, K)
    if scheme == "int8":
        return 0
    return codebook.scratch_nbytes(scheme, N, K, torch.empty((), dtype=dtype).element_size())
