"""Pure weight transforms from Hugging Face layouts to overspill's canonical layout.

Canonical block layout (all linear weights are [out, in], like ``nn.Linear``):

    qkv.weight   [(nh + 2*nkv) * hs, C]   rows: all q heads, then k heads, then v heads
    out.weight   [C, nh * hs]
    up.weight    [F, C]  or, for a gated MLP, [2F, C] = gate rows then up rows
    down.weight  [C, F]

Each function checks the shapes it relies on.
"""
from __future__ import annotations

import torch


def fuse_rows(*ts: torch.Tensor | None) -> torch.Tensor | None:
    """Concatenate weights (or biases) along the output dimension; None if all are None."""
    if all(t is None for t in ts):
        return None
    assert all(t is not None for t in ts), "either all parts of a fused weight have a bias or none"
    assert len({t.shape[1:] for t in ts}) == 1, f"cannot fuse shapes {[tuple(t.shape) for t in ts]}"
    if ts[0].is_meta:   # a shape check (HFCheckpoint.check_shapes): torch.cat on meta costs a 1.5 s first import
        return ts[0].new_empty((sum(t.shape[0] for t in ts), *ts[0].shape[1:]))
    return torch.cat(ts, dim=0)


def conv1d_to_linear(w: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D stores [in, out]; transpose to [out, in]."""
    assert w.dim() == 2
    return w.t().contiguous()


def neox_qkv_to_fused(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """GPT-NeoX's query_key_value is interleaved per head, rows (nh, 3, hs): reorder to q | k | v rows, in one copy
    (a 20B block's 0.23 GB weight, on the load's critical path)."""
    assert t.shape[0] == 3 * n_heads * head_dim, f"query_key_value has {t.shape[0]} rows, expected 3*{n_heads}*{head_dim}"
    parts = t.reshape(n_heads, 3, head_dim, *t.shape[1:])  # (nh, 3, hs, [C])
    return parts.transpose(0, 1).reshape(t.shape)


def interleaved_to_half_rotary(t: torch.Tensor, n_heads: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Permute q or k rows so GPT-J's interleaved rotary becomes the rotate-half form.

    GPT-J rotates pairs (2i, 2i+1) of each head's first ``rotary_dim`` dims; NeoX/Llama
    rotate pairs (i, i + rotary_dim/2). Reordering the projection rows of *both* q and k
    by [0, 2, 4, ..., 1, 3, 5, ...] maps one onto the other, and q.k is unchanged by a
    permutation applied to both, so attention scores are identical and one rotary
    kernel serves every family.
    """
    assert t.shape[0] == n_heads * head_dim
    perm = torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2), torch.arange(rotary_dim, head_dim)])
    x = t.reshape(n_heads, head_dim, *t.shape[1:])  # (nh, hs, [C])
    return x.index_select(1, perm.to(t.device)).reshape(t.shape)
