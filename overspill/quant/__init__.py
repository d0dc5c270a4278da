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
      where the tensors are: on an accelerator (or with portable=True) the portable path below
  stored_linear(scheme, tensors, bias=None) -> StoredLinear: the stored tensors as a Linear that moves between
      devices with the loader's tensor maps, and builds its make_linear() Linear where it is first called
  dequantize(scheme, tensors) -> float32 [N, K]   (on the tensors' device)
  quantize_table(weight [V, C]) -> Int8Table: a token embedding table in int8 with a scale per row, looked up by
      rows(ids) (float32); what --quantize-head does to an untied table whatever the blocks' scheme
  quantized_nbytes(scheme, out_features, in_features, **opts) -> bytes of the stored tensors
  scratch_nbytes_for(scheme, out_features, in_features, dtype, device="cpu") -> bytes of reusable dequantization
      scratch a prefill-sized call leaves allocated on its thread (0 where the kernels compute from the codes directly)
Linear objects: lin(x[..., K] fp32|bf16) -> [..., N] in x.dtype; in_features, out_features, nbytes, dequantize();
differentiable w.r.t. x (backward = grad @ dequant(W)) when grad is enabled and x.requires_grad.

Portable path: the stored tensors live on any device (quantize() output moved with .to(device)); each call
dequantizes this one weight with torch ops into a reusable scratch buffer on that device, in x's dtype (fp32, bf16,
fp16), and runs F.linear; the backward multiplies by the same just-in-time weight. No dequantized copy outlives the
call but the per-thread scratch (scratch_nbytes_for(..., device=...) sizes it). Taken by every Linear whose tensors
are off the CPU, and on the CPU by make_linear(..., portable=True), or every Linear built inside ``with portable():``
/ after set_portable(True) / with OVERSPILL_QUANT_PORTABLE=1 (tests run the accelerator path on the CPU this way).
"""
from __future__ import annotations

import dataclasses

import torch

from . import codebook, int4, int8
from ._base import QuantLinear, nbytes_of, portable, release_scratch, scratch_nbytes, set_portable

SCHEMES: tuple[str, ...] = ("int8", "int8-dynamic", "int4", "nf4")

__all__ = ["SCHEMES", "exact_options", "quantize", "quantize_table", "table_nbytes", "Int8Table", "make_linear", "stored_linear",
           "StoredLinear", "dequantize", "quantized_nbytes",
           "QuantLinear", "scratch_nbytes", "scratch_nbytes_for", "release_scratch", "portable", "set_portable"]


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


def quantize(weight: torch.Tensor, scheme: str, inplace: bool = False, **opts) -> dict[str, torch.Tensor]:
    """Float weight [N, K] -> the plain contiguous CPU tensors that store it. ``inplace``: the weight's memory is the
    caller's to give away, and int8 writes its result there (int8.quantize); otherwise the weight is untouched."""
    _check_scheme(scheme)
    _check_weight(weight, scheme)
    if scheme == "int8":
        if opts:
            raise TypeError(f"int8: unexpected options {sorted(opts)}")
        return int8.quantize(weight, inplace)
    if scheme == "int4":
        return int4.quantize(weight, **opts)
    return codebook.quantize(weight, scheme, **opts)


Int8Table = int8.Int8Table


def quantize_table(weight: torch.Tensor) -> Int8Table:
    """A token embedding table [V, C] -> Int8Table (int8, a bf16 scale per row; rows(ids) gives float32)."""
    _check_weight(weight, "int8")
    return Int8Table.quantize(weight)


def table_nbytes(vocab: int, hidden: int) -> int:
    """Bytes of quantize_table()'s tensors for a [vocab, hidden] table."""
    return int8.nbytes(vocab, hidden)


def exact_options(scheme: str, dtype: torch.dtype) -> dict:
    """make_linear() options for a model computing in ``dtype``: a float32 model's int8 products stay exact
    (weight-only, act_quant="never"); other dtypes take the kernels' arithmetic, as served."""
    return {"act_quant": "never"} if scheme == "int8" and dtype == torch.float32 else {}


def make_linear(scheme: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None, *,
                repack: bool | str = True, portable: bool | None = None, **opts):
    """Runtime Linear from stored tensors, computing where they are (bias on the same device).

    On the CPU: ``repack=True`` converts int8/int4 into the CPU kernels' panel layout where they build (a one-time
    copy; the fast path). ``repack="inplace"`` converts the given tensors' own bytes into that layout (same size; a
    few MB of scratch at a time): for weights in a streaming staging buffer, whose memory the budget already counts,
    so streamed units run the same kernels as resident ones. ``repack=False`` uses the tensors as they are with
    torch's kernels. (int8's oneDNN prepack without the kernels happens lazily; int4 files packed for another CPU
    layout are repacked regardless.)
    Portable path (module docstring): tensors on any other device, or ``portable=True``; ``portable=None`` follows
    set_portable(). The tensors are used as they are there (``repack`` and ``act_quant`` do not apply)."""
    _check_scheme(scheme)
    if scheme == "int8":
        return int8.Int8Linear(tensors, bias, repack=repack, portable=portable, **opts)
    if scheme == "int4":
        return int4.Int4Linear(tensors, bias, repack=repack, portable=portable, **opts)
    if opts:
        raise TypeError(f"{scheme}: unexpected options {sorted(opts)}")
    return codebook.CodebookLinear(scheme, tensors, bias, repack=repack, portable=portable)


@dataclasses.dataclass(eq=False)
class StoredLinear:
    """A quantized linear held as its stored tensors (quantize()'s dict) and bias: the form that moves.

    Every field is a tensor (or a dict of them), so the loader's tensor maps (runtime/transfer.py: pack into pinned
    host RAM, copy to an accelerator per forward) handle it as any unit's weights, through dataclasses.replace.
    The runtime Linear (make_linear(scheme, tensors, bias)) is built on the first call, where the tensors then are:
    on an accelerator that is the portable path. A copy that is never called (a host-held unit's pinned original)
    builds nothing. ``scheme`` is a class attribute: stored_linear() picks the subclass."""

    tensors: dict[str, torch.Tensor]
    bias: torch.Tensor | None = None
    scheme = ""

    def __post_init__(self):
        self._lin: QuantLinear | None = None

    @property
    def linear(self) -> QuantLinear:
        if self._lin is None:
            self._lin = make_linear(self.scheme, self.tensors, self.bias)
        return self._lin

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def nbytes(self) -> int:
        return nbytes_of(*self.tensors.values(), self.bias)

    def dequantize(self) -> torch.Tensor:
        return self.linear.dequantize()

    def refill_(self, new: "StoredLinear") -> None:
        """``new``'s tensors (the same unit fetched again) in place of these, in the runtime Linear a kept training
        graph holds (model/linear.refill_)."""
        if self._lin is not None:
            vars(self._lin).update(vars(new.linear))
        self.tensors, self.bias = new.tensors, new.bias

    def __repr__(self) -> str:
        dev = next(iter(self.tensors.values())).device
        return f"StoredLinear({self.scheme}, {dev}, {self.nbytes} bytes)"


_STORED = {s: type(f"Stored{s.title().replace('-', '')}", (StoredLinear,), {"scheme": s}) for s in SCHEMES}


def stored_linear(scheme: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> StoredLinear:
    """quantize()'s tensors (and a bias) as a Linear that moves between devices; see StoredLinear."""
    _check_scheme(scheme)
    return _STORED[scheme](dict(tensors), bias)


def store_form(scheme: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """quantize()'s tensors as a layer store keeps them (the same bytes; int8 in its kernels' panel layout)."""
    _check_scheme(scheme)
    return int8.store_form(tensors) if scheme == "int8" else tensors


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


def scratch_nbytes_for(scheme: str, out_features: int, in_features: int, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> int:
    """Bytes of per-thread dequantization scratch (quant/_base.scratch) that a prefill-sized call of a linear of this
    shape leaves allocated, activations in ``dtype``. The buffers are kept for reuse, so memory plans count them.
    A ``device`` other than the CPU: the portable path's, which every call leaves there (the weight in ``dtype``;
    int4 also its unpacked codes, the code books a bounded index buffer)."""
    _check_scheme(scheme)
    N, K = int(out_features), int(in_features)
    es = torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu":
        if scheme == "int8":
            return N * K * es
        if scheme == "int4":
            return K * (-(-N // 16) * 16) * (1 + es)
        return codebook.scratch_nbytes(scheme, N, K, es, portable=True)
    if scheme == "int4":
        return int4.scratch_nbytes(N, K)
    if scheme == "int8":
        return 0
    return codebook.scratch_nbytes(scheme, N, K, es)
