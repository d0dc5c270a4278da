"""Blockwise code-book quantization, dequantized just in time (forward = LUT gather * absmax, then dense matmul).

* ``int8-dynamic``: the signed "dynamic tree" 8-bit data type of Dettmers et al. 2021 (8-bit Optimizers via
  Block-wise Quantization): per exponent e = 0..6 (decades 1e-6 .. 1), 2**e linearly spaced fraction bins in
  [0.1, 1] (their midpoints), both signs, plus 0 and 1.0 -> 256 values in [-1, 1] (identical to
  bitsandbytes' ``create_dynamic_map(signed=True)``).
  Stored: {"qweight": uint8 [N, K] (code index), "absmax": fp32 [ceil(N*K/bs)], "meta": int32 [N, K, bs]}.
* ``nf4``: QLoRA's 4-bit NormalFloat (16 values), two codes per byte (low nibble = even element).
  Stored: {"qweight": uint8 [ceil(N*K/2)], "absmax": fp32 [ceil(N*K/bs)], "meta": int32 [N, K, bs]}.

Blocks run over the row-major flattened weight (any shape works; the last block may be short).
int8-dynamic scale: the *signed* value of each block's largest-magnitude element (the dynamic map has +1.0 but
no -1.0, so a plain absmax would put a block's negative maximum on -0.993 and dequant->quantize would drift; with
a signed scale the maximum lands exactly on code 1.0 and the round trip is exact). nf4 (symmetric +-1.0): plain
absmax. w = code[q] * absmax[block].

Kernels. Where overspill's CPU kernels build, N % 16 == 0 and the blocks tile the rows (K % blocksize == 0,
blocksize % 16 == 0), the codes are held in the kernel's panel layout and up to KERNEL_MAX_M rows run
``kernels.lut_mm``: each code is decoded in registers (bf16 table lookup by word permutes), multiplied on
vdpbf16ps, and its block's absmax applied in fp32: the weight bytes are read once per call, at about the memory
bandwidth (the decode-everything path below ran TinyLlama at 0.9 tok/s). The table entries are rounded to bf16 (as
the bf16 path below rounds code*absmax); float32 activations (training, float32 models) take the exact path below.
Otherwise, and for larger M (prefill), the whole weight is dequantized just in time: uint8 -> int32 index (copy into
a scratch buffer), ``index_select`` from a 256-entry LUT in the activation dtype (nf4: a [256, 2] pair LUT, one
lookup per byte), in-place per-block scale multiply: ~25 ms per 16M weights (bf16, 2 threads) vs 58 ms with fresh
allocations; bitsandbytes' CPU kernel ~2x slower; then one dense matmul.
Portable path (tensors off the CPU, or asked for: quant/_base.py): that same just-in-time dequantization at every M,
on the weight's device, with the code indices converted PORTABLE_IDX_CHUNK codes at a time (an int32 index per code
would be 4x the codes: bounded scratch on an accelerator).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..kernels import PANEL, block_weight, convert_stripes_, cpu_kernels
from ._base import QuantLinear, nbytes_of, scratch, wants_portable

DEFAULT_BLOCKSIZE = 64
KERNEL_MAX_M = 16   # lut_mm up to here; it decodes the codes once per 2 rows, so prefill dequantizes once instead
PORTABLE_IDX_CHUNK = 1 << 22   # codes indexed at a time on the portable path (16 MiB of int32 indices)

NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982445526123, 0.5626170039176941,
            0.7229568362236023, 1.0)


@functools.lru_cache(maxsize=None)
def dynamic_code() -> torch.Tensor:
    """256 sorted fp32 values in [-1, 1] (the signed dynamic tree map, max_exponent_bits=7)."""
    data = []
    for i in range(7):
        fr = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float64)
        means = ((fr[:-1] + fr[1:]) / 2) * 10.0 ** (-6 + i)
        data += means.tolist() + (-means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _code(scheme: str) -> torch.Tensor:
    return dynamic_code() if scheme == "int8-dynamic" else torch.tensor(NF4_CODE, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _lut(scheme: str, dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    c = _code(scheme)
    if scheme == "nf4":   # byte b -> (code[b & 15], code[b >> 4])
        b = torch.arange(256)
        return torch.stack([c[b & 15], c[b >> 4]], -1).to(device, dtype).contiguous()   # [256, 2]
    return c.to(device, dtype).contiguous()


def _bits(scheme):
    return 8 if scheme == "int8-dynamic" else 4


def quantize(weight: torch.Tensor, scheme: str, blocksize: int = DEFAULT_BLOCKSIZE) -> dict[str, torch.Tensor]:
    if weight.dim() != 2:
        raise ValueError(f"{scheme}: weight must be 2-D [N, K], got {tuple(weight.shape)}")
    bs = int(blocksize)
    if bs < 2 or bs % 2:
        raise ValueError(f"{scheme}: blocksize must be an even integer >= 2, got {blocksize}")
    N, K = weight.shape
    n = N * K
    nblk = -(-n // bs)
    w = weight.detach().to("cpu", torch.float32).reshape(-1)
    wp = F.pad(w, (0, nblk * bs - n)).view(nblk, bs)
    if scheme == "int8-dynamic":   # signed max-magnitude element (the map has +1.0 but no -1.0)
        scale = wp.gather(1, wp.abs().argmax(1, keepdim=True)).squeeze(1)
    else:                          # nf4 has both +-1.0: plain absmax
        scale = wp.abs().amax(1)
    code = _code(scheme)
    mids = (code[1:] + code[:-1]) / 2
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.empty(nblk * bs, dtype=torch.uint8)
    step = max(1, (1 << 22) // bs)                             # chunks of ~4M values bound the int64 temp
    for b0 in range(0, nblk, step):
        v = wp[b0:b0 + step] / safe[b0:b0 + step, None]
        q[b0 * bs:(b0 + v.shape[0]) * bs] = torch.bucketize(v.view(-1), mids).to(torch.uint8)
    q = q[:n]
    if _bits(scheme) == 4:
        qq = F.pad(q, (0, n % 2))
        q = (qq[0::2] | (qq[1::2] << 4)).contiguous()
    else:
        q = q.view(N, K).contiguous()
    return {"qweight": q, "absmax": scale.contiguous(), "meta": torch.tensor([N, K, bs], dtype=torch.int32)}


def _meta(t):
    N, K, bs = (int(v) for v in t["meta"].tolist())
    return N, K, bs


def _dequant_into(scheme, qweight, absmax, N, K, bs, dtype, out_flat, idx_buf):
    """Write code[q]*absmax (dtype) into out_flat (>= nblk*bs elements; on qweight's device); returns the [N, K]
    view. The codes are looked up idx_buf.numel() at a time (all at once where it holds them all)."""
    n = N * K
    nblk = absmax.numel()
    lut = _lut(scheme, dtype, qweight.device)
    q = qweight.reshape(-1)
    per = 2 if scheme == "nf4" else 1            # outputs per stored byte
    step = idx_buf.numel()
    for c0 in range(0, q.numel(), step):
        c1 = min(q.numel(), c0 + step)
        idx = idx_buf[: c1 - c0]
        idx.copy_(q[c0:c1])
        dst = out_flat[per * c0: per * c1]
        torch.index_select(lut, 0, idx, out=dst.view(-1, 2) if per == 2 else dst)
    full = n // bs
    if full:
        out_flat[: full * bs].view(full, bs).mul_(absmax[:full, None])
    if full < nblk:
        out_flat[full * bs: n].mul_(absmax[full])
    return out_flat[:n].view(N, K)


def dequantize(scheme: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    N, K, bs = _meta(t)
    q = t["qweight"]
    out = torch.empty(max(N * K, 2 * q.numel()), dtype=torch.float32, device=q.device)
    idx = torch.empty(q.numel() if q.device.type == "cpu" else min(q.numel(), PORTABLE_IDX_CHUNK), dtype=torch.int32,
                      device=q.device)
    w = _dequant_into(scheme, q, t["absmax"].float(), N, K, bs, torch.float32, out, idx)
    return w if out.numel() == N * K else w.clone()


def nbytes(scheme: str, N: int, K: int, blocksize: int = DEFAULT_BLOCKSIZE) -> int:
    n = N * K
    qb = n if _bits(scheme) == 8 else -(-n // 2)
    return qb + 4 * (-(-n // int(blocksize))) + 3 * 4


def _unpack4(q: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """nf4 bytes (low nibble = even element of the flattened weight) -> uint8 codes [N, K]."""
    return torch.stack([q & 15, q >> 4], -1).view(-1)[: N * K].view(N, K)


def _pack4_panels(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15) -> lut_mm's 4-bit panels [N/16, K/4, 32]: byte 2c+e of quad P =
    codes[16p+c, 4P+e] | codes[16p+c, 4P+2+e] << 4."""
    N, K = codes.shape
    t = codes.reshape(N // PANEL, PANEL, K // 4, 2, 2).permute(0, 2, 1, 4, 3)     # [p, P, c, e, h]
    return (t[..., 0] | (t[..., 1] << 4)).reshape(N // PANEL, K // 4, 2 * PANEL).contiguous()


def _unpack4_panels(p: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack4_panels -> uint8 codes [N, K]."""
    NP, KQ = p.shape[:2]
    b = p.view(NP, KQ, PANEL, 2)                                                    # [p, P, c, e]
    t = torch.stack([b & 15, b >> 4], -1)                                            # [p, P, c, e, h]
    return t.permute(0, 2, 1, 4, 3).reshape(NP * PANEL, KQ * 4)


def scratch_nbytes(scheme: str, N: int, K: int, itemsize: int, blocksize: int = 64, portable: bool = False) -> int:
    """Scratch a prefill call (more than KERNEL_MAX_M rows) leaves allocated: the dequantized weight in the
    activations' dtype and its int32 code indices, plus (8-bit codes held in panels) the codes in plain layout.
    portable: what every call of the portable path leaves (the weight, indices for PORTABLE_IDX_CHUNK codes)."""
    codes = N * K if _bits(scheme) == 8 else -(-N * K // 2)
    if portable:
        return max(N * K, 2 * codes) * itemsize + 4 * min(codes, PORTABLE_IDX_CHUNK)
    panels = cpu_kernels() is not None and N % PANEL == 0 and K % blocksize == 0
    weight = max(N * K, 2 * codes) * itemsize          # _weight's "cb_w" buffer (room for the LUT's two passes)
    return weight + 4 * codes + (N * K if panels and _bits(scheme) == 8 else 0)


class CodebookLinear(QuantLinear):
    def __init__(self, scheme: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
                 repack: bool | str = True, portable: bool | None = None):
        self.scheme = scheme
        N, K, bs = _meta(tensors)
        q, am = tensors["qweight"], tensors["absmax"]
        nq = N * K if _bits(scheme) == 8 else -(-N * K // 2)
        if q.dtype != torch.uint8 or q.numel() != nq or am.numel() != -(-N * K // bs):
            raise ValueError(f"{scheme}: stored tensors qweight {q.dtype} {tuple(q.shape)}, absmax {tuple(am.shape)} "
                             f"do not match meta N={N} K={K} blocksize={bs}")
        portable = wants_portable(q, portable)
        super().__init__(N, K, bias, nbytes_of(q, am, tensors["meta"]), portable)
        self.blocksize = bs
        ok = (repack and not portable and N % PANEL == 0 and K % bs == 0 and bs % 16 == 0
              and (repack is True or (q.is_contiguous() and am.dtype == torch.float32 and am.is_contiguous())))
        self._k = cpu_kernels() if ok else None
        if self._k is None:
            self.qweight = q.contiguous()
            self.absmax = am.float().contiguous()
        else:   # hold only the panels (codes and absmax), plus the bf16 table
            G = K // bs
            if repack == "inplace":   # the staging buffer's own bytes become the panels
                if _bits(scheme) == 8:
                    qs = q.view(N // PANEL, PANEL * K)
                    self._k.stripe_transpose_(qs, PANEL, K // 2, 2, 0)       # = block_weight, in place
                    self._panels = qs.view(N // PANEL, K // 2, PANEL, 2)
                else:
                    qs = q.view(N // PANEL, PANEL * K // 2)
                    convert_stripes_(qs, lambda c: _pack4_panels(_unpack4(c.reshape(-1), c.shape[0] * PANEL, K)))
                    self._panels = qs.view(N // PANEL, K // 4, 2 * PANEL)
                ams = am.view(N // PANEL, PANEL * G)
                self._k.stripe_transpose_(ams.view(torch.uint8).view(N // PANEL, -1), PANEL, G, 4, 0)  # fp32 as 4 bytes
                self._am_panels = ams.view(N // PANEL, G, PANEL)
            else:
                codes = q.view(N, K) if _bits(scheme) == 8 else _unpack4(q, N, K)
                self._panels = block_weight(codes) if _bits(scheme) == 8 else _pack4_panels(codes)
                self._am_panels = am.float().view(N // PANEL, PANEL, G).permute(0, 2, 1).contiguous()
            self._lut_bf16 = _code(scheme).to(torch.bfloat16).contiguous()
            self._fast_ok = True
            self._bias_f32 = None if bias is None else bias.float().contiguous()
            self.qweight = self.absmax = None
        self._absmax_cast: dict[torch.dtype, torch.Tensor] = {}

    def _plain(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qweight, absmax) in the stored layout; transient copies when the panels are held."""
        if self._k is None:
            return self.qweight, self.absmax
        if _bits(self.scheme) == 8:   # into a scratch buffer: prefill calls this once per linear
            N, K = self.out_features, self.in_features
            q = scratch("cb_codes", N * K, torch.uint8).view(N // PANEL, PANEL, K // 2, 2)
            q.copy_(self._panels.permute(0, 2, 1, 3))
            q = q.view(N, K)
        else:
            c = _unpack4_panels(self._panels).reshape(-1)
            q = c[0::2] | (c[1::2] << 4)
        return q, self._am_panels.permute(0, 2, 1).reshape(-1)

    def _fast(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.numel() > KERNEL_MAX_M * self.in_features:
            return None
        return self._k.lut_mm(x, self._panels, self._am_panels, self._lut_bf16, _bits(self.scheme), self.blocksize,
                              self._bias_f32)

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight [N, K] in dtype, in a scratch buffer (valid until the next JIT dequant)."""
        q, am32 = self._plain()
        am = self._absmax_cast.get(dtype) if self._k is None else None
        if am is None:
            am = am32.to(dtype)
            if self._k is None:
                self._absmax_cast[dtype] = am
        N, K, dev = self.out_features, self.in_features, q.device
        out = scratch("cb_w", max(N * K, 2 * q.numel()), dtype, dev)
        idx = scratch("cb_idx", min(q.numel(), PORTABLE_IDX_CHUNK) if self.portable else q.numel(), torch.int32, dev)
        return _dequant_into(self.scheme, q, am, N, K, self.blocksize, dtype, out, idx)

    def _jit_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self._weight(dtype)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self._k is not None and x.shape[0] <= KERNEL_MAX_M and x.dtype != torch.float32:   # float32 stays exact
            y = self._k.lut_mm(x.to(torch.bfloat16).contiguous(), self._panels, self._am_panels, self._lut_bf16,
                               _bits(self.scheme), self.blocksize, None)
            return y if x.dtype == torch.bfloat16 else y.to(x.dtype)
        return F.linear(x, self._weight(x.dtype))

    def dequantize(self) -> torch.Tensor:
        q, am = self._plain()
        return dequantize(self.scheme, {"qweight": q, "absmax": am,
                                        "meta": torch.tensor([self.out_features, self.in_features, self.blocksize])})
