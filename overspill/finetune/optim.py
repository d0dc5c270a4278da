"""Optimizers over the adapter's parameters: torch's AdamW, and AdamW with blockwise 8-bit moments.

``AdamW8bit`` follows Dettmers et al. 2021 (8-bit Optimizers via Block-wise Quantization): each Adam moment is
held as one uint8 code per parameter plus one fp32 scale per block of BLOCK_SIZE parameters, 2.03 B/param of state
instead of torch AdamW's 8. The first moment uses the signed dynamic-tree map (overspill.quant.codebook's
``dynamic_code``), the second the unsigned one (``unsigned_dynamic_code``: the same tree over [0, 1] with twice the
fraction bins per decade; the second moment is never negative). Tensors under MIN_8BIT_SIZE elements (biases,
norms) keep fp32 moments, as bitsandbytes does, and get torch AdamW's single-tensor update op for op.

One step of a quantized tensor, CHUNK elements at a time (scratch buffers are reused, nothing is allocated per chunk):

    m, v  = code1[c1] * s1[block], code2[c2] * s2[block]          dequantize
    m     = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2           Adam's moments, in fp32
    p     = p (1 - lr wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
    s1,c1 = quantize(m),   s2,c2 = quantize(v)                     blockwise, for the next step

The update uses the fp32 moments before they are requantized, as bitsandbytes' kernels do, so the first step equals
torch AdamW's exactly. A block's scale is the signed value of its largest-magnitude element (as codebook.py does
for weights): that element maps onto code +1.0 and is stored exactly (the signed map has +1.0 but no -1.0). The
nearest code comes from one table lookup instead of a binary search (torch.bucketize: 45 ns/element here): the sign,
exponent and top 11 mantissa bits of value / scale (its fp32 bits >> 12) index a table of the code nearest to each
such cell's centre, so the decision boundaries are the midpoints between codes rounded to 2**-11 of their binade
(values closer than that to a midpoint may get the other neighbour). Plain torch ops: the same code runs on CUDA.

Block size 256, as bitsandbytes: over the tests' 100-step MLP regression its final loss is within 1.2% of torch
AdamW's and its weights within 4.8% of their travel (bitsandbytes AdamW8bit: 1.2%, 4.8%); block size 2048 gave 2.0%
and 5.6%, at the same speed and 2.004 B/param.

One step over 16.8M fp32 parameters on this 2-core AVX2 machine, 1 thread, CPU time per step (median of 5, methods
interleaved; other work shared the cores, so wall times ran 1.4-1.5x these):

                                           [4096, 4096] x 1   [4096, 32] x 128 (LoRA-like)   state
    torch.optim.AdamW(fused=True)               19.6 ms            16.5 ms                  8 B/param
    AdamW8bit (this)                             150 ms             180 ms                  2.03 B/param
    bitsandbytes 0.50.2 AdamW8bit (C kernel)     674 ms             502 ms                  2.03 B/param

The first step adds ~0.2 s once per process to build the two 1M-entry tables. Nearest code by torch.bucketize
instead of the table: 45 ns/element, ~1.5 s a step.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

from ..quant.codebook import dynamic_code

OPTIMIZERS = ("adamw", "adamw8bit")
BLOCK_SIZE = 256          # parameters per fp32 scale
MIN_8BIT_SIZE = 4096      # smaller tensors keep fp32 moments
CHUNK = {"cpu": 1 << 18}  # elements per pass. CPU, 16.8M: 136 ms/step at 256K, 204 ms at 64K (per-call overhead),
CHUNK_OTHER = 1 << 22     # 187 ms at 4M (out of cache). Elsewhere: fewer, larger kernel launches

_SHIFT = 12               # fp32 bits >> 12: sign, exponent and the top 11 mantissa bits name a table cell
_OFFSET = 1 << (31 - _SHIFT)  # makes the arithmetic shift's negative keys (negative values) non-negative


@functools.lru_cache(maxsize=None)
def unsigned_dynamic_code() -> torch.Tensor:
    """256 sorted fp32 values in [0, 1]: the dynamic tree map without a sign bit: per exponent e = 0..6 (decades
    1e-6 .. 1), 2**(e+1) linearly spaced fraction bins in [0.1, 1] (their midpoints), plus 0 and 1.0. Summed in
    fp64 as codebook.dynamic_code is; within 1 ulp of bitsandbytes' create_dynamic_map(signed=False) (fp32 sums)."""
    data = [0.0, 1.0]
    for i in range(7):
        fr = torch.linspace(0.1, 1, 2 ** (i + 1) + 1, dtype=torch.float64)
        data += (((fr[:-1] + fr[1:]) / 2) * 10.0 ** (-6 + i)).tolist()
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


def _code(signed: bool) -> torch.Tensor:
    return dynamic_code() if signed else unsigned_dynamic_code()


@functools.lru_cache(maxsize=None)
def _tables(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(code fp32 [256], nearest uint8 [2 * _OFFSET]) on device: nearest[k] is the code nearest to the centre of the
    cell of fp32 values whose int32 bits >> _SHIFT equal k - _OFFSET (a cell spans 2**-11 of its binade)."""
    code = _code(signed)
    mids = (code[1:] + code[:-1]) / 2                                          # [255] decision boundaries
    k = torch.arange(-_OFFSET, _OFFSET, dtype=torch.int64)
    centre = ((k << _SHIFT) + (1 << (_SHIFT - 1))).to(torch.int32).view(torch.float32)
    nearest = torch.bucketize(centre.nan_to_num(nan=0.0), mids).to(torch.uint8)   # #{mids < centre}
    return code.to(device), nearest.to(device)


def _blocks(x: torch.Tensor, block_size: int) -> list[tuple[int, torch.Tensor]]:
    """(first block, [blocks, size] view) pairs covering the flat x: the full blocks, then a short last one."""
    full = x.numel() // block_size
    out = [(0, x[: full * block_size].view(full, block_size))] if full else []
    if x.numel() > full * block_size:
        out.append((full, x[full * block_size:].view(1, -1)))
    return out


def _decode(codes: torch.Tensor, scale: torch.Tensor, code: torch.Tensor, block_size: int,
            idx: torch.Tensor, out: torch.Tensor) -> None:
    """out = code[codes] * scale[block] (flat, fp32); idx: int32 scratch of the same length."""
    idx.copy_(codes)
    torch.index_select(code, 0, idx, out=out)
    for b, v in _blocks(out, block_size):
        v.mul_(scale[b: b + v.shape[0], None])


def _encode(x: torch.Tensor, signed: bool, block_size: int, codes: torch.Tensor, scale: torch.Tensor,
            y: torch.Tensor, key: torch.Tensor) -> None:
    """codes, scale <- x (flat fp32) blockwise; y fp32 and key int32: scratch of x's length."""
    for b, v in _blocks(x, block_size):
        s = scale[b: b + v.shape[0]]
        torch.amax(v, 1, out=s)
        if signed:   # the largest-magnitude element, with its sign
            mn = v.amin(1)
            torch.where(s >= -mn, s, mn, out=s)
        torch.div(v, torch.where(s == 0, 1.0, s)[:, None], out=y[b * block_size: b * block_size + v.numel()].view_as(v))
    torch.bitwise_right_shift(y.view(torch.int32), _SHIFT, out=key)
    key.add_(_OFFSET)
    torch.index_select(_tables(signed, x.device)[1], 0, key, out=codes)


def _chunk(device: torch.device) -> int:
    return CHUNK.get(device.type, CHUNK_OTHER)


def _scratch(n: int, device: torch.device) -> dict[str, torch.Tensor]:
    f = functools.partial(torch.empty, n, device=device)
    return {"m": f(dtype=torch.float32), "v": f(dtype=torch.float32), "y": f(dtype=torch.float32),
            "idx": f(dtype=torch.int32)}


def quantize_blockwise(x: torch.Tensor, signed: bool, block_size: int = BLOCK_SIZE
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape, fp32) -> (uint8 codes [numel], fp32 scale [ceil(numel / block_size)]) over the flattened x."""
    xf = x.detach().to(torch.float32).reshape(-1)
    n = xf.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    scale = torch.empty(-(-n // block_size), dtype=torch.float32, device=x.device)
    c = max(block_size, _chunk(x.device) // block_size * block_size)
    buf = _scratch(min(c, n), x.device)
    for s in range(0, n, c):
        e = min(n, s + c)
        _encode(xf[s:e], signed, block_size, codes[s:e], scale[s // block_size: -(-e // block_size)],
                buf["y"][: e - s], buf["idx"][: e - s])
    return codes, scale


def dequantize_blockwise(codes: torch.Tensor, scale: torch.Tensor, signed: bool,
                         block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Inverse of quantize_blockwise: fp32 [numel]."""
    out = torch.empty(codes.numel(), dtype=torch.float32, device=codes.device)
    idx = torch.empty(codes.numel(), dtype=torch.int32, device=codes.device)
    _decode(codes.reshape(-1), scale, _tables(signed, codes.device)[0], block_size, idx, out)
    return out


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) with blockwise 8-bit moments; see the module docstring.

    State per quantized parameter: ``step`` (int), ``exp_avg_codes``/``exp_avg_sq_codes`` (uint8 [numel]),
    ``exp_avg_scale``/``exp_avg_sq_scale`` (fp32 [blocks]); per small one: ``step``, ``exp_avg``, ``exp_avg_sq``
    (fp32, shaped like the parameter). The state dict holds only these, so torch.save / torch.load(weights_only=True)
    and safetensors carry it, and load_state_dict restores every tensor as saved: resuming is bit-exact.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, block_size: int = BLOCK_SIZE, min_8bit_size: int = MIN_8BIT_SIZE):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamW8bit: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        if block_size < 1:
            raise ValueError(f"AdamW8bit: block_size must be >= 1, got {block_size}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      block_size=int(block_size), min_8bit_size=int(min_8bit_size)))
        self._buf: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        st = self.state[p]
        st["step"] = 0
        if p.numel() < group["min_8bit_size"]:
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            return st
        n, nblk = p.numel(), -(-p.numel() // group["block_size"])
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            zero = int(torch.searchsorted(_code(signed), 0.0))                     # the code of 0.0
            st[key + "_codes"] = torch.full((n,), zero, dtype=torch.uint8, device=p.device)
            st[key + "_scale"] = torch.zeros(nblk, dtype=torch.float32, device=p.device)
        return st

    def _scratch(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        buf = self._buf.get(device)
        if buf is None or buf["m"].numel() < n:
            buf = self._buf[device] = _scratch(n, device)
        return buf

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                st = self.state[p] or self._init_state(p, group)
                st["step"] += 1
                if "exp_avg" in st:
                    self._step_fp32(p, st, group)
                else:
                    self._step_8bit(p, st, group)
        return loss

    @staticmethod
    def _coefficients(st: dict, group: dict) -> tuple[float, float]:
        """(step size lr / bc1, sqrt(bc2)), computed as torch's single-tensor AdamW does."""
        b1, b2 = group["betas"]
        t = st["step"]
        return group["lr"] / (1 - b1 ** t), (1 - b2 ** t) ** 0.5

    def _step_fp32(self, p: torch.Tensor, st: dict, group: dict) -> None:
        """torch.optim.AdamW(foreach=False)'s update, op for op (in fp32 for a parameter of another dtype)."""
        b1, b2 = group["betas"]
        step_size, bc2_sqrt = self._coefficients(st, group)
        pd = p.detach()
        work = pd if pd.dtype == torch.float32 else pd.float()
        m, v, g = st["exp_avg"], st["exp_avg_sq"], p.grad.detach().float()
        if group["weight_decay"] != 0:
            work.mul_(1 - group["lr"] * group["weight_decay"])
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / bc2_sqrt).add_(group["eps"])
        work.addcdiv_(m, denom, value=-step_size)
        if work is not pd:
            pd.copy_(work)

    def _step_8bit(self, p: torch.Tensor, st: dict, group: dict) -> None:
        b1, b2 = group["betas"]
        lr, eps, wd, bs = group["lr"], group["eps"], group["weight_decay"], group["block_size"]
        step_size, bc2_sqrt = self._coefficients(st, group)
        pd = p.detach()
        work = pd if pd.dtype == torch.float32 and pd.is_contiguous() else pd.float().contiguous()
        pf = work.view(-1)
        gf = p.grad.detach().float().contiguous().view(-1)
        n = pf.numel()
        c = max(bs, _chunk(p.device) // bs * bs)
        buf = self._scratch(min(c, n), p.device)
        code1, code2 = _tables(True, p.device)[0], _tables(False, p.device)[0]
        for s in range(0, n, c):
            e = min(n, s + c)
            k0, k1 = s // bs, -(-e // bs)
            m, v, y, idx = (buf[k][: e - s] for k in ("m", "v", "y", "idx"))
            _decode(st["exp_avg_codes"][s:e], st["exp_avg_scale"][k0:k1], code1, bs, idx, m)
            _decode(st["exp_avg_sq_codes"][s:e], st["exp_avg_sq_scale"][k0:k1], code2, bs, idx, v)
            pc, gc = pf[s:e], gf[s:e]
            if wd != 0:
                pc.mul_(1 - lr * wd)
            m.lerp_(gc, 1 - b1)
            v.mul_(b2).addcmul_(gc, gc, value=1 - b2)
            torch.sqrt(v, out=y)
            y.div_(bc2_sqrt).add_(eps)
            pc.addcdiv_(m, y, value=-step_size)
            for x, key, signed in ((m, "exp_avg", True), (v, "exp_avg_sq", False)):
                _encode(x, signed, bs, st[key + "_codes"][s:e], st[key + "_scale"][k0:k1], y, idx)
        if work is not pd:
            pd.copy_(work)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but every state tensor comes back with its saved dtype (torch would cast the uint8 codes
        and fp32 moments to the parameter's dtype), on its parameter's device, as a copy."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {i: {"step": s["step"]} for i, s in saved.items()}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for k, v in saved.get(i, {}).items():
                if k != "step":
                    self.state[p][k] = v.to(p.device, copy=True) if torch.is_tensor(v) else v


def state_nbytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (moments, codes, scales, step counters)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def make_optimizer(name: str, params: Iterable, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``adamw``: torch.optim.AdamW, fused where every parameter's device has the fused kernel, else foreach.
    ``adamw8bit``: AdamW8bit. params: tensors or param-group dicts."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    params = [{**x, "params": list(x["params"])} if isinstance(x, dict) else x for x in params]
    if name == "adamw8bit":
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    fused = all(p.is_floating_point() and p.device.type in _get_fused_kernels_supported_devices()
                for x in params for p in (x["params"] if isinstance(x, dict) else [x]))
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             **({"fused": True} if fused else {"foreach": True}))
