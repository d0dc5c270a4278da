"""int4: group-wise asymmetric 4-bit, stored in torch's CPU int4pack layout (no repack at load).

Stored: {"qweight": uint8 [Np, K/2] (``torch._convert_weight_to_int4pack_for_cpu`` layout),
         "scales_zeros": bf16 [K/gs, Np, 2], "meta": int32 [N, K, group_size, layout]}
w[n, k] = (q[n, k] - 8) * scale[k//gs, n] + zero[k//gs, n], q in 0..15.
Np = N rounded up to a multiple of 16 (the kernel's requirement; padded rows are zero and sliced off).

The packed layout depends on the CPU capability torch dispatches to (AVX512: blocks of 64 rows, byte j =
row j | row j+32 << 4; AVX2: blocks of 32; scalar: row pairs). ``layout`` records which one the file holds;
``make_linear`` repacks only if this machine's layout differs.

Kernels, by ``act_quant``:
* "auto" (default) where overspill's CPU kernels build (AVX512-BF16 + VNNI, or AVX2 + FMA) and N % 16 == 0: the
  weight is converted at load into the kernel's int4 panel layout (same bytes; the int4pack copy is dropped) and
  every batch size runs ``int4_vnni_mm`` (w4a8, as llama.cpp's Q4 x Q8 dot products): activations quantized to
  int8 with one scale per group of each row, nibbles multiplied on vpdpbusd, the zero points applied with the exact
  fp32 sums of x; on AVX2 ``int4_w4a8_mm``, the same arithmetic on vpmaddubsw. Batch 1 near the read bandwidth;
  prefill faster than bf16 (benchmarks/bench_linear.py).
* "never" (exact bf16 activations), or no kernels, or streamed units (``repack=False``): M <= INT4PACK_MAX_M (96):
  ``_weight_int4pack_mm_for_cpu`` (bf16 activation; time grows ~linearly with M: blocks of 4 rows each re-decode
  the weights); larger M (prefill): dequantize to bf16 W in a scratch buffer and one bf16 matmul (chunking the
  int4pack call by 4 rows measured no gain).
* Portable path (tensors off the CPU, or asked for: quant/_base.py): every M dequantizes W in x.dtype into a
  scratch buffer with torch ops (the int4pack bytes unpacked by shifts and masks, whatever CPU layout the file
  holds: no repack), then one matmul.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..kernels import INPLACE_CHUNK, PANEL, avx2_kernels, bf16_native, bf16_sliced_grad_input, cpu_kernels, \
    f32_sliced_grad_input, pack_int4, unpack_int4, vnni_block
from ._base import QuantLinear, nbytes_of, scratch, wants_portable

GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 64
# int4pack time grows linearly with M (~0.15 ms per row at 5632x2048) while dequant+matmul costs ~10 ms
# flat + bf16 GEMM: measured crossover between M=64 (9.8 vs 13.8 ms) and M=128 (19.6 vs 17.2 ms).
INT4PACK_MAX_M = 96


def to_panels(q: torch.Tensor, sz: torch.Tensor, N: int, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q uint8 [N, K] (0..15), scales_zeros bf16 [K/gs, >=N, 2] -> the kernel's int4 panels:
    qp uint8 [N/16, K/8, 64] (kernels.pack_int4), sz bf16 [N/16, K/gs, 2, 16]."""
    K = q.shape[1]
    szp = sz[:, :N].reshape(K // gs, N // PANEL, PANEL, 2).permute(1, 0, 3, 2).contiguous()
    return pack_int4(q), szp.to(torch.bfloat16)


def w4a8_kernel():
    """(module, its w4a8 matmul) where one builds: the AVX-512 kernels' int4_vnni_mm, else the AVX2 build's
    int4_w4a8_mm (the same arithmetic and call), else (None, None)."""
    k = cpu_kernels()
    if k is not None:
        return k, k.int4_vnni_mm
    a2 = avx2_kernels()
    if a2 is not None and hasattr(a2, "int4_w4a8_mm"):
        return a2, a2.int4_w4a8_mm
    return None, None


def to_panels_(qw: torch.Tensor, sz: torch.Tensor, N: int, K: int, gs: int, layout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """to_panels in place, for tensors in a streaming staging buffer: the int4pack bytes (N % 16 == 0, so no padding
    rows) become the panels, the scales/zeros their panel order; returns views of the same storage. Scratch: about
    INPLACE_CHUNK bytes at a time, plus one copy of the (small: 1/32 of the weight at gs=64) scales/zeros."""
    flat = qw.reshape(-1)
    out = flat.view(N // PANEL, K // 8, 4 * PANEL)
    kern = w4a8_kernel()[0]
    if kern is not None:
        kern.int4pack_to_panels_(flat.view(torch.uint8), N, K, layout)   # ~10x the torch ops below
    else:
        BN = layout if layout else 32                       # rows per int4pack block
        rows = max(BN, INPLACE_CHUNK // K // BN * BN)      # whole blocks per chunk
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)                          # the last chunk may end in a 16/32/48-row tail
            q = _unpack_kn(flat[r0 * K // 2: r1 * K // 2], r1 - r0, K, layout).t()          # [rows, K] 0..15
            out[r0 // PANEL: r1 // PANEL].copy_(pack_int4(q))
    szp = sz.reshape(K // gs, N // PANEL, PANEL, 2).permute(1, 0, 3, 2).contiguous()
    szv = sz.view(-1).view(N // PANEL, K // gs, 2, PANEL)
    szv.copy_(szp)
    return out, szv


@functools.lru_cache(maxsize=None)
def native_layout() -> int:
    """Which int4pack layout this torch/CPU produces: 64 or 32 (split blocks) or 0 (row pairs, blocks of 32)."""
    q = torch.arange(64, dtype=torch.int32)[:, None].remainder(16).expand(64, 2).contiguous()  # row n holds n % 16
    q[32:] = (q[32:] + 1).remainder(16)  # make rows n and n+32 differ
    p = torch._convert_weight_to_int4pack_for_cpu(q, 2).view(-1)
    for lay in (64, 32, 0):
        if torch.equal(_unpack_kn(p.view(64, 1), 64, 2, lay).t(), q.to(torch.uint8)):
            return lay
    raise RuntimeError("int4: unrecognised _convert_weight_to_int4pack_for_cpu layout")


def _unpack_kn(packed: torch.Tensor, Np: int, K: int, layout: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """packed int4pack bytes -> uint8 q values laid out [K, Np] (i.e. W^T), on packed's device (torch ops only)."""
    flat = packed.reshape(-1)
    if out is None:
        out = torch.empty(K, Np, dtype=torch.uint8, device=packed.device)
    BN = layout if layout else 32
    nbf = Np // BN
    full = nbf * BN
    if nbf:
        pb = flat[: full * K // 2].view(nbf, K, BN // 2).permute(1, 0, 2)    # [K, nbf, BN/2]
        o = out[:, :full].view(K, nbf, BN)
        if layout:
            torch.bitwise_and(pb, 15, out=o[:, :, : BN // 2])
            torch.bitwise_right_shift(pb, 4, out=o[:, :, BN // 2:])
        else:
            o2 = o.view(K, nbf, BN // 2, 2)
            torch.bitwise_and(pb, 15, out=o2[..., 0])
            torch.bitwise_right_shift(pb, 4, out=o2[..., 1])
    nb = Np - full
    if nb:  # tail block (16/32/48 rows): row pairs
        pt = flat[full * K // 2:].view(K, nb // 2)
        o2 = out[:, full:].view(K, nb // 2, 2)
        torch.bitwise_and(pt, 15, out=o2[..., 0])
        torch.bitwise_right_shift(pt, 4, out=o2[..., 1])
    return out


def _check(N: int, K: int, gs: int):
    if gs not in GROUP_SIZES:
        raise ValueError(f"int4: group_size must be one of {GROUP_SIZES}, got {gs}")
    if K % gs:
        raise ValueError(f"int4: in_features K={K} of weight [{N}, {K}] must be a multiple of group_size={gs}")


def _default_gs(K: int) -> int:
    for gs in (DEFAULT_GROUP_SIZE, 32):
        if K % gs == 0:
            return gs
    raise ValueError(f"int4: in_features K={K} must be a multiple of 32 (group sizes {GROUP_SIZES})")


def quantize(weight: torch.Tensor, group_size: int | None = None) -> dict[str, torch.Tensor]:
    if weight.dim() != 2:
        raise ValueError(f"int4: weight must be 2-D [N, K], got {tuple(weight.shape)}")
    N, K = weight.shape
    gs = _default_gs(K) if group_size is None else int(group_size)
    _check(N, K, gs)
    Np = -(-N // 16) * 16
    # Rows in chunks (whole 64-row int4pack blocks, so the packed chunks concatenate): fp32/int32 temporaries of
    # ~16 MB instead of several times the weight (an LM head is 50400 x 4096).
    step = max(64, (1 << 22) // K // 64 * 64)
    packed, ss, zs = [], [], []
    for r0 in range(0, Np, step):
        w = weight[r0:r0 + step].detach().to("cpu", torch.float32)
        rows = min(step, Np - r0)
        if w.shape[0] < rows:   # zero padding rows up to Np
            w = torch.cat([w, w.new_zeros(rows - w.shape[0], K)])
        wg = w.view(rows, K // gs, gs)
        mn, mx = wg.amin(-1), wg.amax(-1)
        s = ((mx - mn) / 15).clamp_(min=1e-10).to(torch.bfloat16)
        z = (mn + 8 * s.float()).to(torch.bfloat16)
        # q against the stored (rounded) scale/zero so that dequant -> quantize reproduces the bytes
        lo = z.float() - 8 * s.float()
        q = torch.round((wg - lo[..., None]) / s.float()[..., None]).clamp_(0, 15).to(torch.int32).view(rows, K)
        packed.append(torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2).reshape(-1))
        ss.append(s)
        zs.append(z)
    packed = torch.cat(packed).view(Np, K // 2)
    sz = torch.stack([torch.cat(ss), torch.cat(zs)], -1).transpose(0, 1).contiguous()   # [K/gs, Np, 2]
    meta = torch.tensor([N, K, gs, native_layout()], dtype=torch.int32)
    return {"qweight": packed.contiguous(), "scales_zeros": sz, "meta": meta}


def _meta(t):
    N, K, gs, lay = (int(v) for v in t["meta"].tolist())
    return N, K, gs, lay


def _dequant_into(qweight: torch.Tensor, s: torch.Tensor, z: torch.Tensor, N: int, K: int, gs: int, layout: int,
                  codes: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """W = (q - 8) * scale + zero into ``w`` [Np, K] (its dtype), q unpacked into ``codes`` (uint8 [Np, K]);
    s, z: [Np, K/gs, 1] in w's dtype. Returns W [N, K] (contiguous rows of w). Torch ops only, on any device.
    Row-major W, not W^T: a bf16 [M, K] @ [K, N] without native bf16 ran 25x slower than F.linear on [N, K]
    (4096x4096, M=256: 35 s against 0.6 s here), and a GEMV reads W^T with a stride."""
    Np = w.shape[0]
    _unpack_kn(qweight, Np, K, layout, out=codes.t())   # written through the [K, Np] view: same speed
    w.copy_(codes).sub_(8)                     # small integers: exact in bf16
    wg = w.view(Np, K // gs, gs)
    torch.addcmul(z, wg, s, out=wg)            # (q-8)*s + z, one rounding (folding z-8s into bf16 doubled the error)
    return w[:N]


def _sz_as(sz: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """scales_zeros [K/gs, Np, 2] -> (scales, zeros) [Np, K/gs, 1] in dtype."""
    return tuple(sz[..., i].t().to(dtype).contiguous()[:, :, None] for i in (0, 1))


def _dequant_f32(qweight: torch.Tensor, sz: torch.Tensor, N: int, K: int, gs: int, layout: int) -> torch.Tensor:
    """fp32 W [N, K] (fresh memory, on qweight's device)."""
    Np = -(-N // 16) * 16
    w = torch.empty(Np, K, dtype=torch.float32, device=qweight.device)
    codes = torch.empty(Np, K, dtype=torch.uint8, device=qweight.device)
    return _dequant_into(qweight, *_sz_as(sz, torch.float32), N, K, gs, layout, codes, w)


def dequantize(t: dict[str, torch.Tensor]) -> torch.Tensor:
    N, K, gs, lay = _meta(t)
    return _dequant_f32(t["qweight"], t["scales_zeros"], N, K, gs, lay)


def nbytes(N: int, K: int, group_size: int | None = None) -> int:
    gs = _default_gs(K) if group_size is None else int(group_size)
    _check(N, K, gs)
    Np = -(-N // 16) * 16
    return Np * K // 2 + (K // gs) * Np * 2 * 2 + 4 * 4


def scratch_nbytes(N: int, K: int) -> int:
    """Scratch a prefill call leaves allocated: none with the w4a8 kernel, else the unpacked codes and the bf16
    weight of Int4Linear._jit_weight."""
    if w4a8_kernel()[0] is not None and vnni_block(N, K, _default_gs(K)):
        return 0
    Np = -(-N // 16) * 16
    return K * Np * (1 + 2)


class Int4Linear(QuantLinear):
    scheme = "int4"

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None, repack: bool | str = True,
                 act_quant: str = "auto", portable: bool | None = None):
        N, K, gs, lay = _meta(tensors)
        _check(N, K, gs)
        if act_quant not in ("auto", "never"):
            raise ValueError(f"int4: act_quant must be auto|never, got {act_quant!r}")
        Np = -(-N // 16) * 16
        qw, sz = tensors["qweight"], tensors["scales_zeros"]
        if qw.numel() != Np * K // 2 or sz.shape != (K // gs, Np, 2):
            raise ValueError(f"int4: stored tensors {tuple(qw.shape)}, {tuple(sz.shape)} do not match meta N={N} K={K} gs={gs}")
        portable = wants_portable(qw, portable)
        super().__init__(N, K, bias, nbytes_of(qw, sz, tensors["meta"]), portable)
        self.group_size, self.Np, self.act_quant = gs, Np, act_quant
        self._sz_by: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        ok = repack and not portable and act_quant == "auto" and vnni_block(N, K, gs)
        self._k, self._w4a8 = w4a8_kernel() if ok else (None, None)
        if self._k is not None and repack == "inplace" and (sz.dtype != torch.bfloat16 or not qw.is_contiguous()
                                                            or not sz.is_contiguous()):
            self._k = self._w4a8 = None   # (stores hold bf16 scales; anything else converts with a copy: use it as it is)
        if self._k is not None:   # hold only the kernel's panel layout
            if repack == "inplace":
                self.qpanels, self.szpanels = to_panels_(qw, sz, N, K, gs, lay)
            else:
                q = _unpack_kn(qw, Np, K, lay).t()[:N]
                self.qpanels, self.szpanels = to_panels(q, sz, N, gs)
            self.qweight = self.scales_zeros = None
            self.layout = lay
            self._fast_ok = True
            self._bias_f32 = None if bias is None else bias.float().contiguous()
            return
        if not portable and lay != native_layout():   # file packed on a CPU with another layout: repack once
            q = _unpack_kn(qw, Np, K, lay).t().to(torch.int32).contiguous()
            qw, lay = torch._convert_weight_to_int4pack_for_cpu(q, 2), native_layout()
        self.qweight = qw.view(Np, K // 2)
        self.layout = lay
        self.scales_zeros = sz.to(torch.bfloat16).contiguous()

    def _fast(self, x: torch.Tensor) -> torch.Tensor | None:
        return self._w4a8(x, self.qpanels, self.szpanels, self.group_size, self._bias_f32)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        M = x.shape[0]
        xb = x.to(torch.bfloat16).contiguous()
        if self._k is not None:
            y = self._w4a8(xb, self.qpanels, self.szpanels, self.group_size, None)
            return y if x.dtype == torch.bfloat16 else y.to(x.dtype)
        if M > INT4PACK_MAX_M:
            y = F.linear(xb, self._jit_weight(torch.bfloat16))
        else:
            y = torch._weight_int4pack_mm_for_cpu(xb, self.qweight, self.group_size, self.scales_zeros)
            if self.Np != self.out_features:
                y = y[:, : self.out_features].contiguous()
        return y if x.dtype == torch.bfloat16 else y.to(x.dtype)

    def _panel_rows(self, p0: int, p1: int) -> torch.Tensor:
        """float32 rows [16 p0, 16 p1) of W = (q - 8) * s + z, from the panels."""
        K, gs = self.in_features, self.group_size
        rows = (p1 - p0) * PANEL
        q = unpack_int4(self.qpanels[p0:p1]).float().view(rows, K // gs, gs) - 8
        s, z = (self.szpanels[p0:p1, :, i].float().permute(0, 2, 1).reshape(rows, K // gs, 1) for i in (0, 1))
        return (q * s + z).view(rows, K)

    def _grad_input(self, g: torch.Tensor) -> torch.Tensor:
        """g @ W (training's input gradient) over slices of W's rows dequantized from the panels, never a whole float
        copy of the weight (the base class's dequantize() costs 4 N K bytes and torch's ops per call). A bf16 g on a
        CPU with native bf16 matmuls: bf16 slices (the float32 rows rounded once, kernels' int4_panels_to_bf16_) in
        oneDNN's bf16 GEMM; otherwise float32 slices."""
        if self._k is None or self.portable:
            return super()._grad_input(g)
        kern = cpu_kernels()
        if g.dtype == torch.bfloat16 and bf16_native() and kern is not None and hasattr(kern, "int4_panels_to_bf16_"):
            def fill_bf16(dst: torch.Tensor, n0: int, n1: int) -> None:   # whole panels: N and the slices are x16
                kern.int4_panels_to_bf16_(self.qpanels[n0 // PANEL: n1 // PANEL],
                                          self.szpanels[n0 // PANEL: n1 // PANEL], dst, self.group_size)

            return bf16_sliced_grad_input(g, self.out_features, self.in_features, fill_bf16)

        def fill(dst: torch.Tensor, n0: int, n1: int) -> None:
            p0 = n0 // PANEL
            dst.copy_(self._panel_rows(p0, -(-n1 // PANEL))[n0 - p0 * PANEL: n1 - p0 * PANEL])

        return f32_sliced_grad_input(g, self.out_features, self.in_features, fill)

    def _jit_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W [N, K] in dtype, in this thread's scratch on the weight's device (valid until the next int4
        dequantization on this thread): the CPU's prefill path (bf16) and the portable path."""
        K, Np, dev = self.in_features, self.Np, self.qweight.device
        sz = self._sz_by.get(dtype)
        if sz is None:
            sz = self._sz_by[dtype] = _sz_as(self.scales_zeros, dtype)
        codes = scratch("int4_u8", Np * K, torch.uint8, dev).view(Np, K)
        w = scratch("int4_w", Np * K, dtype, dev).view(Np, K)
        return _dequant_into(self.qweight, *sz, self.out_features, K, self.group_size, self.layout, codes, w)

    def dequantize(self) -> torch.Tensor:
        if self._k is not None:
            return self._panel_rows(0, self.out_features // PANEL)
        return _dequant_f32(self.qweight, self.scales_zeros, self.out_features, self.in_features, self.group_size,
                            self.layout)
