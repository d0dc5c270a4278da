"""int4: group-wise asymmetric 4-bit, stored in torch's CPU int4pack layout (no repack at load).

Stored: {"qweight": uint8 [Np, K/2] (``torch._convert_weight_to_int4pack_for_cpu`` layout),
         "scales_zeros": bf16 [K/gs, Np, 2], "meta": int32 [N, K, group_size, layout]}
w[n, k] = (q[n, k] - 8) * scale[k//gs, n] + zero[k//gs, n], q in 0..15.
Np = N rounded up to a multiple of 16 (the kernel's requirement; padded rows are zero and sliced off).

The packed layout depends on the CPU capability torch dispatches to (AVX512: blocks of 64 rows, byte j =
row j | row j+32 << 4; AVX2: blocks of 32; scalar: row pairs). ``layout`` records which one the file holds;
``make_linear`` repacks only if this machine's layout differs.

Kernels: where overspill's CPU kernels build (AVX512-BF16) and N % 16 == 0, the weight is converted at load into
the kernels' int4 panel layout (same bytes; the int4pack copy is dropped) and M <= KERNEL_MAX_M rows run
``kernels.int4_mm`` (1.3-1.5x int4pack at batch 1, 1.6x at batch 8, benchmarks/bench_linear.py); larger M
dequantizes into a bf16 panel scratch buffer for the bf16 kernel. Otherwise: M <= INT4PACK_MAX_M (96): ``_weight_int4pack_mm_for_cpu`` (bf16 activation; time grows ~linearly
with M: blocks of 4 rows each re-decode the weights); larger M (prefill): dequantize to bf16 W^T in a scratch
buffer and one bf16 matmul (chunking the int4pack call by 4 rows measured no gain).
"""
from __future__ import annotations

import functools

import torch

from ..kernels import PANEL, cpu_kernels, unblock_weight
from ._base import QuantLinear, nbytes_of, scratch

GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 64
# int4pack time grows linearly with M (~0.15 ms per row at 5632x2048) while dequant+matmul costs ~10 ms
# flat + bf16 GEMM: measured crossover between M=64 (9.8 vs 13.8 ms) and M=128 (19.6 vs 17.2 ms).
INT4PACK_MAX_M = 96
KERNEL_MAX_M = 16  # int4_mm up to here; above, dequantize to a bf16 panel + the bf16 kernel (compute-bound)


def to_panels(q: torch.Tensor, sz: torch.Tensor, N: int, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q uint8 [N, K] (0..15), scales_zeros bf16 [K/gs, >=N, 2] -> the kernels' int4 panels:
    qp uint8 [N/16, K/4, 32] (byte 2c+e of quad P = q[c, 4P+e] | q[c, 4P+2+e] << 4), sz bf16 [N/16, K/gs, 2, 16]."""
    K = q.shape[1]
    t = q.reshape(N // PANEL, PANEL, K // 4, 2, 2).permute(0, 2, 1, 4, 3)           # [p, P, c, e, h]
    qp = (t[..., 0] | (t[..., 1] << 4)).reshape(N // PANEL, K // 4, 2 * PANEL).contiguous()
    szp = sz[:, :N].reshape(K // gs, N // PANEL, PANEL, 2).permute(1, 0, 3, 2).contiguous()
    return qp, szp.to(torch.bfloat16)


def from_panels(qp: torch.Tensor) -> torch.Tensor:
    """Inverse of to_panels' byte packing -> q uint8 in the bf16 panel order [N/16, K/2, 16, 2]."""
    NPN, KQ = qp.shape[:2]
    b = qp.view(NPN, KQ, PANEL, 2)                                                  # [p, P, c, e]
    return torch.stack([b & 15, b >> 4], dim=2).view(NPN, KQ * 2, PANEL, 2)         # [p, 2P+h, c, e]


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
    """packed int4pack bytes -> uint8 q values laid out [K, Np] (i.e. W^T)."""
    flat = packed.reshape(-1)
    if out is None:
        out = torch.empty(K, Np, dtype=torch.uint8)
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
    w = weight.detach().to("cpu", torch.float32)
    if Np != N:
        w = torch.cat([w, w.new_zeros(Np - N, K)])
    wg = w.view(Np, K // gs, gs)
    mn, mx = wg.amin(-1), wg.amax(-1)
    s = ((mx - mn) / 15).clamp_(min=1e-10).to(torch.bfloat16)
    z = (mn + 8 * s.float()).to(torch.bfloat16)
    # q against the stored (rounded) scale/zero so that dequant -> quantize reproduces the bytes
    lo = z.float() - 8 * s.float()
    q = torch.round((wg - lo[..., None]) / s.float()[..., None]).clamp_(0, 15).to(torch.int32).view(Np, K)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
    sz = torch.stack([s, z], -1).transpose(0, 1).contiguous()   # [K/gs, Np, 2]
    meta = torch.tensor([N, K, gs, native_layout()], dtype=torch.int32)
    return {"qweight": packed.contiguous(), "scales_zeros": sz, "meta": meta}


def _meta(t):
    N, K, gs, lay = (int(v) for v in t["meta"].tolist())
    return N, K, gs, lay


def dequantize(t: dict[str, torch.Tensor]) -> torch.Tensor:
    N, K, gs, lay = _meta(t)
    Np = -(-N // 16) * 16
    qkn = _unpack_kn(t["qweight"], Np, K, lay).float()                       # [K, Np]
    sz = t["scales_zeros"].float()
    s, z = sz[..., 0], sz[..., 1]                                              # [K/gs, Np]
    w = (qkn.view(K // gs, gs, Np) - 8).mul_(s[:, None]).add_(z[:, None]).view(K, Np)
    return w.t()[:N].contiguous()


def nbytes(N: int, K: int, group_size: int | None = None) -> int:
    gs = _default_gs(K) if group_size is None else int(group_size)
    _check(N, K, gs)
    Np = -(-N // 16) * 16
    return Np * K // 2 + (K // gs) * Np * 2 * 2 + 4 * 4


class Int4Linear(QuantLinear):
    scheme = "int4"

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None, repack: bool = True):
        N, K, gs, lay = _meta(tensors)
        _check(N, K, gs)
        Np = -(-N // 16) * 16
        qw, sz = tensors["qweight"], tensors["scales_zeros"]
        if qw.numel() != Np * K // 2 or sz.shape != (K // gs, Np, 2):
            raise ValueError(f"int4: stored tensors {tuple(qw.shape)}, {tuple(sz.shape)} do not match meta N={N} K={K} gs={gs}")
        super().__init__(N, K, bias, nbytes_of(qw, sz, tensors["meta"]))
        self.group_size, self.Np = gs, Np
        self._k = cpu_kernels() if repack and N % PANEL == 0 and K % 4 == 0 else None
        if self._k is not None:   # hold only the kernel's panel layout
            q = _unpack_kn(qw, Np, K, lay).t()[:N]
            self.qpanels, self.szpanels = to_panels(q, sz, N, gs)
            self.qweight = self.scales_zeros = None
            self.layout, self._sz8 = lay, None
            self._fast_ok = True
            self._bias_f32 = None if bias is None else bias.float().contiguous()
            return
        if lay != native_layout():   # file packed on a CPU with another layout: repack once
            q = _unpack_kn(qw, Np, K, lay).t().to(torch.int32).contiguous()
            qw, lay = torch._convert_weight_to_int4pack_for_cpu(q, 2), native_layout()
        self.qweight = qw.view(Np, K // 2)
        self.layout = lay
        self.scales_zeros = sz.to(torch.bfloat16).contiguous()
        self._sz8 = None

    def _fast(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.numel() > KERNEL_MAX_M * self.in_features:
            return None
        return self._k.int4_mm(x, self.qpanels, self.szpanels, self.group_size, self._bias_f32)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        M = x.shape[0]
        xb = x.to(torch.bfloat16).contiguous()
        if self._k is not None:
            if M <= KERNEL_MAX_M:
                y = self._k.int4_mm(xb, self.qpanels, self.szpanels, self.group_size, None)
            else:
                y = self._k.bf16_mm(xb, self._dequant_panels(), None)
            return y if x.dtype == torch.bfloat16 else y.to(x.dtype)
        if M <= INT4PACK_MAX_M:
            y = torch._weight_int4pack_mm_for_cpu(xb, self.qweight, self.group_size, self.scales_zeros)
        else:
            y = xb @ self._dequant_bf16_t()
        if self.Np != self.out_features:
            y = y[:, : self.out_features].contiguous()
        return y if x.dtype == torch.bfloat16 else y.to(x.dtype)

    def _dequant_bf16_t(self) -> torch.Tensor:
        """bf16 W^T [K, Np] in a scratch buffer (valid until the next int4 prefill call on this thread)."""
        K, Np, gs = self.in_features, self.Np, self.group_size
        if self._sz8 is None:
            self._sz8 = (self.scales_zeros[..., 0].contiguous()[:, None], self.scales_zeros[..., 1].contiguous()[:, None])
        s, z = self._sz8
        qkn = _unpack_kn(self.qweight, Np, K, self.layout, out=scratch("int4_u8", K * Np, torch.uint8).view(K, Np))
        w = scratch("int4_w", K * Np, torch.bfloat16).view(K, Np)
        w.copy_(qkn).sub_(8)                       # small integers: exact in bf16
        wg = w.view(K // gs, gs, Np)
        torch.addcmul(z, wg, s, out=wg)            # (q-8)*s + z, one rounding (folding z-8s into bf16 doubled the error)
        return w

    def _dequant_panels(self) -> torch.Tensor:
        """bf16 weight in the bf16 panel layout [N/16, K/2, 16, 2], in a scratch buffer: bf16((q-8)*s + z)."""
        N, K = self.out_features, self.in_features
        w = scratch("int4_panel", N * K, torch.bfloat16).view(N // PANEL, K // 2, PANEL, 2)
        self._k.int4_dequant_(w, self.qpanels, self.szpanels, self.group_size)
        return w

    def dequantize(self) -> torch.Tensor:
        if self._k is not None:
            N, K, gs = self.out_features, self.in_features, self.group_size
            wg = (from_panels(self.qpanels).float() - 8).view(N // PANEL, K // gs, gs // 2, PANEL, 2)
            s, z = (self.szpanels[:, :, i].float()[:, :, None, :, None] for i in (0, 1))
            return unblock_weight((wg * s + z).view(N // PANEL, K // 2, PANEL, 2))
        return dequantize({"qweight": self.qweight, "scales_zeros": self.scales_zeros,
                           "meta": torch.tensor([self.out_features, self.in_features, self.group_size, self.layout])})
