"""The decoder's math: norms, rotary embeddings, attention and MLP, over plain tensors.

No I/O, no device moves, no knowledge of where weights came from or how they are stored.
Shapes: B batch, T new tokens, S cached + new keys, C hidden, nh/nkv heads, hs head size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..kernels import cpu_kernels
from .kv_cache import QuantKV
from .linear import bf16_native
from .weights import BlockWeights, EmbedWeights, HeadWeights


def norm(cfg: ModelConfig, x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor | None], fused: bool = True) -> torch.Tensor:
    """fused: bf16 on the CPU, the kernels' RMSNorm (one call, the same rounding as the torch expression)."""
    w, b = wb
    if fused and cfg.norm == "rmsnorm" and x.dtype == torch.bfloat16 and x.device.type == "cpu" and not x.requires_grad:
        kern = cpu_kernels()
        if kern is not None:   # one call for the 7 ops below (same rounding)
            return kern.rms_norm(x, w, cfg.norm_eps)
    if cfg.norm == "rmsnorm":
        # Zhang & Sennrich 2019, eq. 4; computed in fp32 and cast back before the gain, as Llama does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
        return w * xf.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), w, b, cfg.norm_eps)


def act(cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    a = cfg.activation
    if a == "silu":
        return F.silu(x)
    if a == "gelu":
        return F.gelu(x)
    if a == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.relu(x)


class Rope:
    """Rotary position embedding tables (Su et al. 2021, eq. 34), rotate-half form.

    inv_freq_i = theta^(-2i/d) for the ``rotary_dim`` = d leading dims of each head;
    GPT-J's interleaved form is converted to this one at load (families/transforms.py).
    """

    def __init__(self, cfg: ModelConfig):
        d = cfg.rotary_dim
        self.dim = d
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)) / cfg.rope_scale

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, 1, d] (broadcast over heads)."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)  # (B, T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]                      # (B, T, 1, d)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, hs); rotates the first cos.shape[-1] dims of every head."""
    d = cos.shape[-1]
    xr = x[..., :d] if d < x.shape[-1] else x
    x1, x2 = xr.chunk(2, dim=-1)
    out = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, x[..., d:]), dim=-1) if d < x.shape[-1] else out


@dataclass
class Step:
    """Everything a forward over T new tokens needs besides weights; built once, shared by all blocks."""
    positions: torch.Tensor            # [B, T] absolute positions (for rotary / learned tables)
    start: int                         # cache slot of the first new token; new keys go to [start, start+T)
    cos: torch.Tensor | None = None    # [B, T, 1, rotary_dim]
    sin: torch.Tensor | None = None
    mask: torch.Tensor | None = None   # [B, 1, T, start+T] bool (True = attend), or None
    causal: bool = False               # use SDPA's built-in causal mask (prefill from slot 0, no padding)
    fused: bool = True                 # bf16 on the CPU: the kernels' fused ops (same rounding as the torch lines)

    @property
    def end(self) -> int:
        return self.start + self.positions.shape[1]

    def rows(self, b0: int, b1: int) -> "Step":
        """The same step for sequences [b0, b1) of the batch (a micro-batch)."""
        cut = lambda t: None if t is None else t[b0:b1]
        return Step(self.positions[b0:b1], self.start, cut(self.cos), cut(self.sin), cut(self.mask), self.causal,
                    self.fused)

    def to(self, device: torch.device) -> "Step":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Step(mv(self.positions), self.start, mv(self.cos), mv(self.sin), mv(self.mask), self.causal, self.fused)


def make_step(cfg: ModelConfig, rope: Rope | None, positions: torch.Tensor, start: int,
              key_valid: torch.Tensor | None, dtype: torch.dtype, fused: bool = True) -> Step:
    """key_valid: [B, start+T] bool over cache slots (False = padding), or None when nothing is padded."""
    B, T = positions.shape
    step = Step(positions, start, fused=fused)
    if rope is not None and cfg.rotary_dim:
        step.cos, step.sin = rope.cos_sin(positions, dtype)
    S = start + T
    if key_valid is None:
        step.causal = T > 1 and start == 0
        if T > 1 and start > 0:
            key_valid = torch.ones(B, S, dtype=torch.bool, device=positions.device)
    if key_valid is not None:
        q_slot = torch.arange(start, S, device=positions.device)
        causal = torch.arange(S, device=positions.device)[None, :] <= q_slot[:, None]       # (T, S)
        mask = causal[None] & key_valid[:, None, :]                                        # (B, T, S)
        # A padding query sees no valid key; let it see itself so its (unused) row stays finite.
        mask |= (torch.arange(S, device=positions.device)[None, :] == q_slot[:, None])[None]
        step.mask = mask[:, None]                                                          # (B, 1, T, S)
    return step


@dataclass
class Segment:
    """One sequence's tokens in a ragged step: rows [t0, t1) of the packed tokens, cache row ``row``, and the
    ordinary Step of those tokens alone (their positions, start slot, rotary tables, causal mask)."""
    row: int
    t0: int
    t1: int
    step: Step


@dataclass
class RaggedStep:
    """A forward over several sequences' new tokens packed into one [1, N, C] batch (continuous batching): each
    sequence has its own cache row and length. Linears, norms and the MLP run over all N tokens at once (one read
    of the weights); attention runs per segment with exactly the arithmetic of that sequence's forward alone.
    Tokens [n_real, N) are padding (so the linears see a row count that keeps their results row-invariant)."""
    segments: list[Segment]
    n_real: int
    fused: bool = True
    cos: torch.Tensor | None = None    # [1, N, 1, rotary_dim]: every packed token's (padding: position 0)
    sin: torch.Tensor | None = None
    rows: torch.Tensor | None = None   # [n_real] cache row of each real token
    slots: torch.Tensor | None = None  # [n_real] its cache slot
    decode: object = None              # the batched single-token segments (_decode_batch), made on first use

    def to(self, device: torch.device) -> "RaggedStep":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)
        return RaggedStep([Segment(s.row, s.t0, s.t1, s.step.to(device)) for s in self.segments], self.n_real,
                          self.fused, mv(self.cos), mv(self.sin), mv(self.rows), mv(self.slots))


def attention(cfg: ModelConfig, w: BlockWeights, x: torch.Tensor, step: Step | RaggedStep,
              k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    y = w.qkv(x)                                                       # (B, T, (nh+2nkv)*hs)
    if isinstance(step, RaggedStep):
        return w.out(ragged_attend(cfg, y, step, k_cache, v_cache))
    return w.out(attend(cfg, y, step, k_cache, v_cache))


def ragged_attend(cfg: ModelConfig, y: torch.Tensor, step: RaggedStep, k_cache, v_cache) -> torch.Tensor:
    """attend() for packed sequences: (1, N, (nh+2nkv)*hs) -> (1, N, nh*hs), each segment over its own cache row.
    Rotary and the cache writes run once over all tokens (elementwise: the same values as per sequence); the
    attention itself per segment. With the bf16 kernels (one fused call per decode token) or an int8 cache, each
    segment runs attend() whole."""
    _, N, _ = y.shape
    nh, nkv, hs = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    o = y.new_zeros(1, N, nh * hs)                                     # padding tokens attend to nothing
    kern = cpu_kernels() if y.dtype == torch.bfloat16 and y.device.type == "cpu" and not y.requires_grad else None
    if (step.fused and kern is not None) or isinstance(k_cache, QuantKV) or step.rows is None:
        for s in step.segments:
            o[:, s.t0:s.t1] = attend(cfg, y[:, s.t0:s.t1], s.step, k_cache[s.row:s.row + 1], v_cache[s.row:s.row + 1])
        return o
    qkv = y.view(1, N, nh + 2 * nkv, hs)
    qk = qkv[:, :, : nh + nkv]
    if step.cos is not None:
        qk = apply_rope(qk, step.cos, step.sin)                        # (1, N, nh+nkv, hs)
    n = step.n_real
    k_cache[step.rows, :, step.slots] = qk[0, :n, nh:]                 # (n, nkv, hs) into their rows and slots
    v_cache[step.rows, :, step.slots] = qkv[0, :n, nh + nkv:]
    batched = _decode_batch(step, y.device) if _batch_decode(y.device) else None
    if batched is not None:
        dec, tok, rows, mask, S = batched
        q = qk[0].index_select(0, tok)[:, :nh].unsqueeze(2)            # (n, nh, 1, hs)
        a = decode_attention(q, k_cache[rows, :, :S], v_cache[rows, :, :S], mask, cfg.scale)
        o[0].index_copy_(0, tok, a.reshape(len(dec), nh * hs))
    for s in step.segments:
        st, T = s.step, s.t1 - s.t0
        if batched is not None and T == 1 and st.mask is None:
            continue                                                   # done above
        q = qk[:, s.t0:s.t1, :nh].transpose(1, 2)                     # (1, nh, T, hs)
        k, v = k_cache[s.row:s.row + 1, :, :st.end], v_cache[s.row:s.row + 1, :, :st.end]
        if T == 1:
            a = decode_attention(q, k, v, st.mask, cfg.scale)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=st.mask, is_causal=st.causal, scale=cfg.scale,
                                               enable_gqa=nkv != nh)
        o[:, s.t0:s.t1] = a.transpose(1, 2).reshape(1, T, nh * hs)
    return o


def _batch_decode(device: torch.device) -> bool:
    """Batch the single-token segments' attention into one call? On accelerators, where a per-segment loop costs
    ~15 kernel launches per sequence and layer (batch 8 decode ran at 0.4x batch 1's speed per sequence on an H200).
    Not on the CPU: there each segment's attention is exactly that sequence's alone (bitwise batch invariance), and
    a loop of small matmuls costs little."""
    return device.type != "cpu"


def _decode_batch(step: RaggedStep, device: torch.device):
    """(segments, their token indices, their cache rows (a slice when consecutive), key mask [n, S], S) for the
    step's single-token segments without a mask of their own, made once per step and device; None for fewer than
    two. Keys beyond a sequence's own length are masked out, so each row's softmax is its own."""
    if step.decode is None:
        dec = [s for s in step.segments if s.t1 - s.t0 == 1 and s.step.mask is None]
        step.decode = False
        if len(dec) >= 2:
            S = max(s.step.end for s in dec)
            ends = torch.tensor([s.step.end for s in dec])
            mask = (torch.arange(S)[None, :] < ends[:, None]).to(device, non_blocking=True)
            tok = torch.tensor([s.t0 for s in dec]).to(device, non_blocking=True)
            r = [s.row for s in dec]
            rows = slice(r[0], r[0] + len(r)) if r == list(range(r[0], r[0] + len(r))) else \
                torch.tensor(r).to(device, non_blocking=True)
            step.decode = (dec, tok, rows, mask, S)
    return step.decode or None


def attend(cfg: ModelConfig, y: torch.Tensor, step: Step, k_cache: torch.Tensor | None,
           v_cache: torch.Tensor | None) -> torch.Tensor:
    """The fused qkv projection's output y (B, T, (nh+2nkv)*hs) -> attention output (B, T, nh*hs), before the output
    projection: rotary, the cache write at [start, start+T), softmax(q k^T * scale) v over slots [0, start+T).
    Without a cache (training: a whole sequence from position 0), the step's own keys and values."""
    B, T, _ = y.shape
    nh, nkv, hs = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    kern = cpu_kernels() if y.dtype == torch.bfloat16 and y.device.type == "cpu" and not y.requires_grad else None
    quant = isinstance(k_cache, QuantKV)
    if step.fused and T == 1 and kern is not None and not quant and k_cache is not None and y.is_contiguous() \
            and k_cache.is_contiguous() and v_cache.is_contiguous():
        # decode: rotary, cache write and attention in one call (same arithmetic as the lines below)
        return kern.decode_step(y, k_cache, v_cache, step.start, step.cos, step.sin, nh, nkv, step.mask, cfg.scale)
    qkv = y.view(B, T, nh + 2 * nkv, hs)                               # (B, T, nh+2nkv, hs)
    qk = qkv[:, :, : nh + nkv]
    if step.fused and step.cos is not None and kern is not None and qkv.is_contiguous():
        kern.rope_(qkv, step.cos, step.sin, nh + nkv)                  # in place, same rounding as apply_rope
    elif step.cos is not None:
        qk = apply_rope(qk, step.cos, step.sin)                        # q and k heads in one go
    q = qk[:, :, :nh].transpose(1, 2)                                  # (B, nh, T, hs)
    if k_cache is None:   # training: no cache, the keys are this step's own (from slot 0)
        k, v = qk[:, :, nh:].transpose(1, 2), qkv[:, :, nh + nkv:].transpose(1, 2)
    elif quant:   # int8 cache: round the new slots in, read all slots back dequantized
        k_cache.write(step.start, qk[:, :, nh:].transpose(1, 2))
        v_cache.write(step.start, qkv[:, :, nh + nkv:].transpose(1, 2))
        k, v = k_cache.read(step.end, q.dtype), v_cache.read(step.end, q.dtype)
    else:
        k_cache[:, :, step.start:step.end] = qk[:, :, nh:].transpose(1, 2)  # (B, nkv, T, hs)
        v_cache[:, :, step.start:step.end] = qkv[:, :, nh + nkv:].transpose(1, 2)
        k, v = k_cache[:, :, :step.end], v_cache[:, :, :step.end]          # (B, nkv, S, hs)
    if T == 1:
        o = decode_attention(q, k, v, step.mask, cfg.scale)            # (B, nh, 1, hs)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, is_causal=step.causal,
                                           scale=cfg.scale, enable_gqa=nkv != nh)  # (B, nh, T, hs)
    return o.transpose(1, 2).reshape(B, T, nh * hs)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """One query token: two small matmuls with the query heads of a KV group stacked as rows.

    For T=1 the CPU flash-attention kernel spends most of its time on set-up (~300 us per layer
    at S~140 here); this is ~4x faster and needs no repeat of K/V for grouped-query attention.
    softmax(q k^T * scale) v, Vaswani et al. 2017, eq. 1; the softmax runs in float32.
    """
    B, nh, _, hs = q.shape
    nkv, S = k.shape[1], k.shape[2]
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and not (q.requires_grad or k.requires_grad or v.requires_grad):
        kern = cpu_kernels()
        if kern is not None:   # reads the cache slice in place (bf16 bmm would copy it), fp32 softmax
            return kern.decode_attn(q, k, v, None if mask is None else mask.reshape(B, S), scale)
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and not bf16_native():
        # bf16 x bf16 matmuls crawl without native bf16 (15 ms for these tiny shapes on an AVX2 EPYC); fp32 copies of
        # one layer's slice cost microseconds, and the scores are softmaxed in fp32 anyway
        return decode_attention(q.float(), k.float(), v.float(), mask, scale).to(q.dtype)
    qg = q.reshape(B, nkv, nh // nkv, hs)                              # (B, nkv, g, hs)
    # K @ q^T rather than q @ K^T: the cache slice is row-major in (S, hs), so bmm reads it in place
    # (q @ K^T made matmul copy the transposed K slice on every call: ~0.6 ms/layer at batch 8).
    s = torch.matmul(k, qg.transpose(-1, -2)).transpose(-1, -2).float() * scale   # (B, nkv, g, S)
    if mask is not None:
        s = s.masked_fill(~mask.view(B, 1, 1, S), float("-inf"))
    p = s.softmax(-1).to(v.dtype)
    return torch.matmul(p, v).reshape(B, nh, 1, hs)                    # (B, nh, 1, hs)


def mlp(cfg: ModelConfig, w: BlockWeights, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
    h = w.up(x)
    if cfg.gated_mlp:  # Shazeer 2020, "GLU Variants Improve Transformer", eq. 6 (SwiGLU)
        if fused and cfg.activation == "silu" and h.dtype == torch.bfloat16 and h.device.type == "cpu" \
                and not h.requires_grad and h.is_contiguous() and cpu_kernels() is not None:
            return w.down(cpu_kernels().silu_mul(h))                   # one call, same roundings as below
        g, u = h.chunk(2, dim=-1)
        h = act(cfg, g) * u
    else:
        h = act(cfg, h)
    return w.down(h)


def block_forward(cfg: ModelConfig, w: BlockWeights, x: torch.Tensor, step: Step | RaggedStep,
                  k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """One transformer block; residual style per config (sequential, parallel, shared-norm parallel). No cache
    (None, None): a training forward over whole sequences (differentiable: autograd flows through every op).
    ``reduce``: tensor parallel (model/shard.py): the attention and MLP outputs are this rank's partial sums,
    and reduce() sums them across ranks: once per block for a parallel residual, after each sublayer otherwise."""
    f = step.fused
    h = norm(cfg, x, w.attn_norm, f)
    a = attention(cfg, w, h, step, k_cache, v_cache)
    if cfg.parallel_residual:
        m = mlp(cfg, w, h if w.mlp_norm is None else norm(cfg, x, w.mlp_norm, f), f)
        return x + a + m if reduce is None else x + reduce(a + m)
    x = x + (a if reduce is None else reduce(a))
    m = mlp(cfg, w, norm(cfg, x, w.mlp_norm, f), f)
    return x + (m if reduce is None else reduce(m))


def embed_forward(cfg: ModelConfig, w: EmbedWeights, ids: torch.Tensor, step: Step, dtype: torch.dtype) -> torch.Tensor:
    tok = w.tok      # a tensor, or a quantized table (quant.Int8Table) that gathers and scales its rows
    x = F.embedding(ids, tok) if isinstance(tok, torch.Tensor) else tok.rows(ids)      # (B, T, C)
    if w.pos is not None:
        x = x + F.embedding(step.positions, w.pos)
    return x.to(dtype)


def head_forward(cfg: ModelConfig, w: HeadWeights, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
    return w.lm(norm(cfg, x, w.norm, fused))                           # (B, T, V)
