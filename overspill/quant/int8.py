"""int8: per-output-channel symmetric int8 weights, bf16 scales.

Stored: {"qweight": int8 [N, K], "scales": bf16 [N]}; w[n, k] = qweight[n, k] * scales[n].

Kernels (benchmarks/bench_linear.py; shared/anchors/kernels/RESULTS.md):
* M <= DEQUANT_MIN_M where overspill's CPU kernels build (AVX512-BF16): ``kernels.int8_mm`` on the weight in the
  blocked layout (w8a16: int8 widened to bf16 in registers, fp32 accumulation, per-row scale at the end).
  It reads int8 weights at about the machine's read bandwidth, where int8pack reaches ~0.6 of it.
  Without the kernels:
* M == 1 (decode): ``torch._weight_int8pack_mm`` (bf16 activation, int8 weight-only: exact activations).
  Memory-bound; about the speed of oneDNN w8a8 at batch 1 in our runs, and more accurate.
* M >= 2: oneDNN ``qlinear_pointwise`` u8 x s8 (VNNI) with dynamic *per-token* symmetric activation
  quantization (x_scale passed as 1.0, the per-token scale applied to the output). int8pack collapses
  beyond M=1 (~bf16 F.linear speed at M=8); oneDNN stays near the bandwidth bound (x1.8-3.3 faster
  than bf16 F.linear at M=8). The prepacked oneDNN weight is built lazily on the first M>=2 call
  (a second N*K-byte copy in oneDNN's blocked layout).
``act_quant="never"`` (the default) keeps every batch on int8pack: weight-only, and no hidden second copy of
the weight, so memory budgets hold. ``act_quant="auto"`` opts into the faster w8a8 path for M >= 2.
"""
from __future__ import annotations

import torch

from ..kernels import blockable, block_weight, cpu_kernels, unblock_weight
from ._base import QuantLinear, nbytes_of, scratch

INT8PACK_MAX_M = 1  # largest M that uses _weight_int8pack_mm in "auto" mode


def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    w = weight.detach().to("cpu", torch.float32)
    # bf16 scales, and q computed against the *rounded* scale: dequant -> quantize reproduces q exactly
    # (127 * s_bf16 is exact in fp32 and /127 rounds back to s_bf16).
    s = (w.abs().amax(1) / 127).clamp_(min=1e-30).to(torch.bfloat16)
    q = torch.round(w / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"qweight": q.contiguous(), "scales": s.contiguous()}


def dequantize(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["qweight"].float() * t["scales"].float()[:, None]


def nbytes(N: int, K: int) -> int:
    return N * K + 2 * N


def _onednn_int8_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_prepack")


DEQUANT_MIN_M = 32   # above this many rows (weight-only mode), dequantize + dense matmul
KERNEL_AUTO_MAX_M = 4  # "auto": the w8a16 kernel up to here, oneDNN w8a8 above (the kernel turns compute-bound)


class Int8Linear(QuantLinear):
    scheme = "int8"

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None, act_quant: str = "never",
                 repack: bool = True):
        q, s = tensors["qweight"], tensors["scales"]
        if q.dtype != torch.int8 or q.dim() != 2 or s.shape != (q.shape[0],):
            raise ValueError(f"int8: expected qweight int8 [N, K] and scales [N], got {q.dtype} {tuple(q.shape)}, {tuple(s.shape)}")
        if act_quant not in ("auto", "never", "always"):
            raise ValueError(f"int8: act_quant must be auto|never|always, got {act_quant!r}")
        super().__init__(q.shape[0], q.shape[1], bias, nbytes_of(q, s))
        self._k = cpu_kernels() if repack and act_quant != "always" and blockable(*q.shape) else None
        # Kernel path: the weight is held only in the blocked layout (no second copy).
        self._qblocked = block_weight(q) if self._k is not None else None
        self._qplain = None if self._k is not None else q.contiguous()
        self.scales_bf16 = s.to(torch.bfloat16).contiguous()
        self.scales_f32 = s.float().contiguous()
        self._fast_ok = self._k is not None and act_quant == "never"
        self._bias_f32 = None if bias is None else bias.float().contiguous()
        self.act_quant = act_quant if _onednn_int8_ok() else "never"
        self._packed = None
        self._zp = None

    def _fast(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.numel() > DEQUANT_MIN_M * self.in_features:
            return None
        return self._k.int8_mm(x, self._qblocked, self.scales_f32, self._bias_f32)

    @property
    def qweight(self) -> torch.Tensor:
        """int8 [N, K] in plain row-major layout (a transient copy when the weight is held blocked)."""
        return self._qplain if self._qplain is not None else unblock_weight(self._qblocked)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        M = x.shape[0]
        if self._k is not None and (M <= KERNEL_AUTO_MAX_M if self.act_quant == "auto" else M <= DEQUANT_MIN_M):
            y = self._k.int8_mm(x.to(torch.bfloat16).contiguous(), self._qblocked, self.scales_f32, None)
            return y if x.dtype == torch.bfloat16 else y.to(x.dtype)
        if self.act_quant == "never" and M > DEQUANT_MIN_M:
            # Prefill-sized batches: int8pack is compute-bound there (3x slower than bf16 at M=128);
            # dequantize into a transient bf16 weight and run one dense matmul instead.
            if self._qblocked is not None:   # dequantize in panel order (no transpose) for the bf16 kernel
                w = scratch("int8_panel", self._qblocked.numel(), torch.bfloat16).view(self._qblocked.shape)
                self._k.int8_dequant_(w, self._qblocked, self.scales_f32)   # = bf16(q * s), one pass
                y = self._k.bf16_mm(x.to(torch.bfloat16).contiguous(), w, None)
                return y if x.dtype == torch.bfloat16 else y.to(x.dtype)
            w = self._qplain.to(torch.bfloat16).mul_(self.scales_bf16[:, None])
            y = torch.nn.functional.linear(x.to(torch.bfloat16), w)
            return y if x.dtype == torch.bfloat16 else y.to(x.dtype)
        if self.act_quant == "never" or (self.act_quant == "auto" and M <= INT8PACK_MAX_M):
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales_bf16)
            return y if x.dtype == torch.bfloat16 else y.to(x.dtype)
        return self._w8a8(x)

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._packed = torch.ops.onednn.qlinear_prepack(self.qweight, [1, self.in_features])
            self._zp = torch.zeros(self.out_features, dtype=torch.long)
        xf = x.float() if x.dtype != torch.float32 else x
        a = xf.abs().amax(-1, keepdim=True).clamp_(min=1e-30).div_(127.0)     # per-token scale [M, 1]
        qx = torch.round(xf / a).add_(128).to(torch.uint8)                    # |x/a| <= 127 -> [1, 255]
        y = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, self._packed, self.scales_f32, self._zp, None,
                                               1.0, 0, torch.float32, "none", [], "")
        y = y.mul_(a)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return dequantize({"qweight": self.qweight, "scales": self.scales_bf16})
