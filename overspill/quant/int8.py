"""int8: per-output-channel symmetric int8 weights, bf16 scales.

Stored: {"qweight": int8 [N, K], "scales": bf16 [N]}; w[n, k] = qweight[n, k] * scales[n]. Layer stores keep
{"qpanels": uint8 [N/16, K/4, 64], "scales"} instead (store_form: the kernels' layout, read and used as it is).

Kernels (benchmarks/bench_linear.py; shared/anchors/kernels/RESULTS.md), by ``act_quant``:
* "auto" (the default where a w8a8 kernel builds) and N % 16 == 0, K % 32 == 0: activations quantized on the fly to
  int8 with one scale per ACT_BLOCK inputs of each row, as llama.cpp's Q8_0 does, then integer products, at every
  batch size. With AVX512-BF16 + VNNI ``kernels.int8_vnni_mm`` (vpdpbusd); on CPUs with only AVX2 + FMA
  ``avx2_kernels().int8_w8a8_mm`` (vpmaddubsw), the same arithmetic and results. The weight is held only in the
  kernels' panel layout. Batch 1 at about the read bandwidth; prefill faster than bf16 (integer MACs are 2x denser
  than fp32 FMAs), so no dequantization pass ever runs. The activation rounding is in the quality table
  (quality.py). Training's float32 activations take the same arithmetic as inference in "auto" on VNNI (5x the
  exact product's rate at 32-256 rows); on AVX2, where w8a8 is no faster, they stay weight-only
  (``int8_w8a16_mm``, or float32 slices of the panels above W8A16_F32_MAX_ROWS rows without native bf16). A float32
  model is exact on both: the loader asks for "never" (exact_options). Input gradients are exact on every build
  (the AVX2 module's ``int8_mm_t`` over the same panels, which an AVX-512 CPU runs too).
  Without either kernel the default is "never" (below); an explicit "auto" there means torch's
  ``_weight_int8pack_mm`` at M == 1 (w8a16) and oneDNN ``qlinear_pointwise`` u8 x s8 with per-token activation
  scales at M >= 2, whose prepacked weight is a second N*K-byte copy that memory budgets do not count.
* "never": weight-only, exact activations: ``int8_w8a16_mm`` over the panels where the AVX2 module runs; elsewhere
  ``_weight_int8pack_mm`` up to DEQUANT_MIN_M rows, above that a transient bf16 weight and one dense matmul.
``repack=False`` (the stored tensors used as they are) takes the no-kernel paths of the chosen mode.
* "always": activations quantized at every M (the kernels, else oneDNN w8a8).
Portable path (tensors off the CPU, or asked for: quant/_base.py): weight-only at every M, exact activations:
q -> x.dtype into a scratch buffer, times the scales, then F.linear; ``act_quant`` does not apply.
"""
from __future__ import annotations

import dataclasses

import torch

from ..io import drop_pages
from ..kernels import (GRAD_KERNEL_MAX_ROWS, avx2_kernels, bf16_native, bf16_sliced_grad_input, cpu_kernels,
                       f32_kernels, f32_sliced_grad_input, f32_sliced_linear, pack_int8, pack_int8_, panel_empty,
                       unpack_int8, vnni_block)
from ._base import QuantLinear, nbytes_of, scratch, wants_portable

INT8PACK_MAX_M = 1  # largest M that uses _weight_int8pack_mm in "auto" mode


# in place from this size: the whole pages behind q are nearly all of the rest (a smaller weight's would keep its
# storage's tail resident, up to a page, where a copy holds exactly N*K bytes)
INPLACE_MIN_BYTES = 1 << 20


def quantize(weight: torch.Tensor, inplace: bool = False) -> dict[str, torch.Tensor]:
    """Per-row symmetric int8 with a bf16 scale per row. ``inplace``: the weight is the caller's to give away (a CPU
    tensor just read for this linear alone): q is written into its first N*K bytes, a chunk of rows at a time behind
    the rows still to be read, and the rest of its pages go back to the system: loading an LM head never holds its
    bf16 and int8 forms at once (50400x2048: 103 MB less at the peak)."""
    N, K = weight.shape
    own = inplace and weight.device.type == "cpu" and weight.is_contiguous() and \
        weight.numel() * weight.element_size() >= INPLACE_MIN_BYTES
    # converted to the kernel's panels in place later: huge pages from the start
    q = weight.view(-1).view(torch.uint8)[:N * K].view(torch.int8).view(N, K) if own else \
        panel_empty((N, K), torch.int8)
    s = torch.empty(N, dtype=torch.bfloat16)
    step = max(1, (1 << 22) // max(1, K))   # rows per chunk: fp32 temporaries of ~16 MB, not 4x the weight
    # in place, rows [r0, r0 + step) of q cover the bytes of weight rows [r0 / es, (r0 + step) / es), read already:
    # the first chunk by this chunk's copy, later ones since step <= r0
    for r0 in range(0, N, step):
        w = weight[r0:r0 + step].detach().to("cpu", torch.float32)
        # bf16 scales, and q computed against the *rounded* scale: dequant -> quantize reproduces q exactly
        # (127 * s_bf16 is exact in fp32 and /127 rounds back to s_bf16).
        sc = (w.abs().amax(1) / 127).clamp_(min=1e-30).to(torch.bfloat16)
        q[r0:r0 + step] = torch.round(w / sc.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        s[r0:r0 + step] = sc
    if own:
        drop_pages(weight, N * K, weight.numel() * weight.element_size())
    return {"qweight": q, "scales": s}


def store_form(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """quantize()'s tensors as a layer store keeps them: the weight in the kernels' panel layout (``qpanels``, uint8
    [N/16, K/4, 64], pack_int8), so loading and streaming use the bytes as they were read, with no transpose on the
    way; shapes the panels do not fit keep ``qweight``. Int8Linear and dequantize() take either form."""
    q = t["qweight"]
    N, K = q.shape
    if N % 16 or K % 4:
        return t
    return {"qpanels": pack_int8(q), "scales": t["scales"]}


def dequantize(t: dict[str, torch.Tensor]) -> torch.Tensor:
    q = t["qweight"] if "qweight" in t else unpack_int8(t["qpanels"])
    return q.float() * t["scales"].float()[:, None]


def nbytes(N: int, K: int) -> int:
    return N * K + 2 * N


@dataclasses.dataclass(eq=False)
class Int8Table:
    """A token embedding table [V, C] quantized as an int8 weight is (a bf16 scale per row), for lookups: an
    embedding only ever gathers a few rows, so no kernel layout, just ``rows``. A dataclass of tensors: it moves
    between devices with the loader's tensor maps (runtime/transfer.py) as any unit's weights do."""

    qweight: torch.Tensor   # int8 [V, C]
    scales: torch.Tensor    # bf16 [V]

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Int8Table":
        return cls(**quantize(weight))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [*ids.shape, C]: the ids' rows, q * scale (equal to dequantize()'s rows)."""
        return self.qweight[ids].float().mul_(self.scales[ids].float().unsqueeze(-1))

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.qweight, self.scales)

    def dequantize(self) -> torch.Tensor:
        return dequantize({"qweight": self.qweight, "scales": self.scales})


def _onednn_int8_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_prepack")


DEQUANT_MIN_M = 32   # weight-only mode: above this many rows, dequantize + dense matmul
# float32 activations on AVX2: int8_w8a16_mm up to this many rows, float32 slices of the panels above. 2 threads,
# 1B and 6B GPT-J shapes: the kernel 127-132 GFLOP/s at 64-192 rows against the slices' 53-111; even at 256 (127-132
# against 120-141)
W8A16_F32_MAX_ROWS = 192
ACT_BLOCK = 64       # inputs per activation scale in the w8a8 kernel (llama.cpp's Q8_0: 32; measured the same here)


def _act_block(K: int) -> int | None:
    return next((b for b in (ACT_BLOCK, 32) if K % b == 0), None)


class Int8Linear(QuantLinear):
    scheme = "int8"

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None, act_quant: str | None = None,
                 repack: bool | str = True, portable: bool | None = None):
        q, p, s = tensors.get("qweight"), tensors.get("qpanels"), tensors["scales"]
        if p is not None:       # a layer store's form (store_form): already the kernels' panels
            if p.dtype != torch.uint8 or p.dim() != 3 or p.shape[2] != 64 or s.shape != (p.shape[0] * 16,):
                raise ValueError(f"int8: expected qpanels uint8 [N/16, K/4, 64] and scales [N], got {p.dtype} "
                                 f"{tuple(p.shape)}, {tuple(s.shape)}")
            N, K = p.shape[0] * 16, p.shape[1] * 4
        elif q is None or q.dtype != torch.int8 or q.dim() != 2 or s.shape != (q.shape[0],):
            got = "nothing" if q is None else f"{q.dtype} {tuple(q.shape)}"
            raise ValueError(f"int8: expected qweight int8 [N, K] and scales [N], got {got}, {tuple(s.shape)}")
        else:
            N, K = q.shape
        if act_quant not in (None, "auto", "never", "always"):
            raise ValueError(f"int8: act_quant must be auto|never|always, got {act_quant!r}")
        w = q if p is None else p
        portable = wants_portable(w, portable)
        super().__init__(N, K, bias, nbytes_of(w, s), portable)
        self._block = _act_block(K)
        usable = p is not None or repack != "inplace" or q.is_contiguous()    # panels: used as they are (contiguous)
        ok = (repack and not portable and act_quant != "never" and self._block is not None
              and vnni_block(N, K, self._block) and usable)
        self._k = cpu_kernels() if ok else None
        # without them, on AVX2 + FMA, over the same panels: w8a8 with the AVX-512 kernel's arithmetic (act_quant
        # "auto", the default), or weight-only with exact activations ("never")
        self._a2, self._a2_w8a8 = None, False
        if self._k is None and repack and not portable and N % 16 == 0 and K % 4 == 0 and usable:
            a2 = avx2_kernels()
            if a2 is not None and hasattr(a2, "int8_w8a16_mm"):
                w8a8 = act_quant != "never" and self._block is not None and hasattr(a2, "int8_w8a8_mm")
                if w8a8 or act_quant in (None, "never"):
                    self._a2, self._a2_w8a8 = a2, w8a8
        # Kernel path: the weight is held only in the panel layout (no second copy).
        panels = self._k is not None or self._a2 is not None
        # float32 input gradients (and slices of rows) on every build from the AVX2 module's int8_mm_t over the same
        # panels: an AVX-512 CPU runs it too, and nothing else there reads the panels in float32
        self._f32k = self._a2 if self._a2 is not None else f32_kernels() if self._k is not None else None
        if p is not None:       # stored as panels: used as they are, or unpacked (a copy) where no kernel runs
            self._qpanels, self._qplain = (p.contiguous(), None) if panels else (None, unpack_int8(p))
        else:
            self._qpanels = None if not panels else pack_int8_(q) if repack == "inplace" else pack_int8(q)
            self._qplain = None if panels else q.contiguous()
        self.scales_bf16 = s.to(torch.bfloat16).contiguous()
        self.scales_f32 = s.float().contiguous()
        self._fast_ok = panels
        self._bias_f32 = None if bias is None else bias.float().contiguous()
        w8a8_kernel = self._k is not None or self._a2_w8a8
        if act_quant is None:   # the default: w8a8 on our kernels; without them weight-only, which needs no second copy
            act_quant = "auto" if w8a8_kernel else "never"
        self.act_quant = act_quant if act_quant == "never" or _onednn_int8_ok() or w8a8_kernel else "never"
        if portable:
            self.act_quant = "never"
        self._scales_as: dict[torch.dtype, torch.Tensor] = {}
        self._packed = None
        self._zp = None

    def _fast(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._k is None:
            return self._a2_mm(x, self._bias_f32)
        return self._k.int8_vnni_mm(x, self._qpanels, self.scales_f32, self._bias_f32, self._block)

    def _a2_mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._a2_w8a8:
            return self._a2.int8_w8a8_mm(x, self._qpanels, self.scales_f32, bias, self._block)
        return self._a2.int8_w8a16_mm(x, self._qpanels, self.scales_f32, bias)

    def _fill_rows(self, dst: torch.Tensor, n0: int, n1: int) -> None:
        """Rows [n0, n1) of q * scale into ``dst`` (float32 [n1 - n0, K]), from the plain weight or the panels."""
        if self._qplain is not None:
            dst.copy_(self._qplain[n0:n1]).mul_(self.scales_f32[n0:n1, None])
            return
        # panels are held only where a kernel build runs, and both builds widen them (3x torch's permuted copy)
        kern = self._f32k if self._f32k is not None else self._k
        kern.panels_to_f32_(self._qpanels[n0 // 16: -(-n1 // 16)], dst, 1, self.scales_f32[n0:n1])

    def _fill_rows_bf16(self, dst: torch.Tensor, n0: int, n1: int) -> None:
        """Rows [n0, n1) (whole panels) of q * scale, rounded to bf16, into ``dst`` (bf16 [n1 - n0, K])."""
        self._k.panels_to_bf16_(self._qpanels[n0 // 16: n1 // 16], dst, self.scales_f32[n0:n1])

    @property
    def qweight(self) -> torch.Tensor:
        """int8 [N, K] in plain row-major layout (a transient copy when the weight is held in panels)."""
        return self._qplain if self._qplain is not None else unpack_int8(self._qpanels)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        M = x.shape[0]
        if self._a2 is not None:
            if x.dtype == torch.float32 and M > W8A16_F32_MAX_ROWS and not bf16_native():   # float32 stays exact
                return f32_sliced_linear(x, self.out_features, self.in_features, self._fill_rows, None)
            if x.dtype == torch.bfloat16:
                return self._a2_mm(x.contiguous(), None)
            # float32 activations (training, float32 models) stay weight-only and exact: never rounded to int8 or bf16
            return self._a2.int8_w8a16_mm(x.float().contiguous(), self._qpanels, self.scales_f32, None).to(x.dtype)
        if self._k is not None:
            y = self._k.int8_vnni_mm(x.to(torch.bfloat16).contiguous(), self._qpanels, self.scales_f32, None, self._block)
            return y if x.dtype == torch.bfloat16 else y.to(x.dtype)
        if self.act_quant == "never" and M > DEQUANT_MIN_M and self._qplain is not None and not bf16_native():
            # without native bf16 a bf16 matmul crawls (~0.015 TFLOP/s on an AVX2 EPYC): dequantize slices of rows
            # to fp32 and multiply there (400 rows x TinyLlama: ~46 s in bf16)
            q, s = self._qplain, self.scales_f32
            return f32_sliced_linear(x, self.out_features, self.in_features,
                                     lambda dst, n0, n1: dst.copy_(q[n0:n1]).mul_(s[n0:n1, None]), None)
        if self.act_quant == "never" and M > DEQUANT_MIN_M:
            # Prefill-sized batches: int8pack is compute-bound there (3x slower than bf16 at M=128);
            # dequantize into a transient bf16 weight and run one dense matmul instead.
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

    def _grad_input(self, g: torch.Tensor) -> torch.Tensor:
        """g @ W (training's input gradient), never a whole dequantized copy of the weight. A bf16 g on a CPU with
        native bf16 matmuls: oneDNN's bf16 GEMM over slices of W's rows dequantized to bf16 (q * s rounded once, as
        the result is; 1B shapes at 256 rows: 11-16 ms against 35-50 in float32). Otherwise in float32: up to
        GRAD_KERNEL_MAX_ROWS rows straight from the panels (the AVX2 module's int8_mm_t, on AVX-512 CPUs too), else
        over slices of W's rows dequantized into the reused slice buffer."""
        if self.portable or (self._qplain is None and self._k is not None and self._f32k is None):
            return super()._grad_input(g)
        if g.dtype == torch.bfloat16 and self._k is not None and self._qpanels is not None and bf16_native():
            return bf16_sliced_grad_input(g, self.out_features, self.in_features, self._fill_rows_bf16)
        if self._f32k is not None and g.numel() <= GRAD_KERNEL_MAX_ROWS * self.out_features \
                and hasattr(self._f32k, "int8_mm_t"):   # the panels as they are: 1.5-2.3x the slices at 16-64 rows
            return self._f32k.int8_mm_t(g.float().contiguous(), self._qpanels, self.scales_f32).to(g.dtype)
        return f32_sliced_grad_input(g, self.out_features, self.in_features, self._fill_rows)

    def _jit_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W = q * scale in ``dtype`` [N, K], in this thread's scratch on the weight's device (in float32 bit-equal
        to dequantize(): exact conversions, one rounded multiply)."""
        q, N, K = self.qweight, self.out_features, self.in_features
        s = self._scales_as.get(dtype)
        if s is None:
            s = self._scales_as[dtype] = self.scales_bf16.to(dtype)[:, None]                # [N, 1]
        w = scratch("int8_w", N * K, dtype, q.device).view(N, K)
        return w.copy_(q).mul_(s)

    def dequantize(self) -> torch.Tensor:
        return dequantize({"qweight": self.qweight, "scales": self.scales_bf16})
