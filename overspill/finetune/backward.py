"""One training pass over the executor's units: the forward, a chunked loss, and the backward block by block.

    forward  (no graph kept)      embed ─► b0 ─► b1 ─► ... ─► b(L-1) ─► head: loss in chunks of tokens ─► dL/dx_L
             saves each block's input (one [B, T, C] tensor per block: gradient checkpointing)
    backward (reverse order)      b(L-1): fetch its weights again, recompute its forward with the graph, backprop
                                  dL/dx_(i+1) into the adapter's gradients and dL/dx_i; free the graph; next block

The base weights are frozen in whatever format and tier they have: a streamed block is read once for the forward
and once more for the backward (the source is told the order, so its reader prefetches the backward's blocks while
the loss runs), and no weight view outlives its block's turn.

Without checkpointing (``checkpoint=False``) each block's graph is kept instead and nothing is recomputed: a third
less compute for a block, for every block's activations held until the backward. A kept graph holds the forward's
Linear objects (the frozen products' backward multiplies by them, model/linear.py), so the backward fetches a
streamed block again and refills those objects with the new bytes (``refill_``); anything else the graph saved from
the block's bytes (a norm's weight) is copied when saved, since the forward's bytes are recycled on release.

The loss never builds the [B, T, V] logits: the LM head runs over ``head_tokens`` tokens at a time, and only over
tokens that carry a label.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from ..errors import OverspillError
from ..kernels import bf16_native
from ..model.linear import attributes, hollow_, refill_
from ..model.weights import BlockWeights, HeadWeights, linear_names
from ..model.layers import Step, block_forward, head_forward, make_step
from ..runtime.executor import Executor

IGNORE = -100   # label of a position without loss (transformers' convention)


def trains_in_float32(dtype: torch.dtype, cpu_only: bool) -> bool:
    """Whether a base of ``dtype`` trains with float32 activations: a 16-bit base computing only on a CPU without
    native bf16. Its matmuls convert weight slices to float32 anyway (model/linear.py), and the elementwise ops,
    attention and their backward run several times slower in bf16 there (measured ~10x for a training step of the
    built-in model). The weights stay as stored; only the norms' small vectors are converted, per use. The planner's
    reserve asks this before the load (trainer.py), compute_dtype after it."""
    return dtype in (torch.bfloat16, torch.float16) and cpu_only and not bf16_native()


def compute_dtype(ex: Executor) -> torch.dtype:
    """The activations' dtype for training (trains_in_float32)."""
    return torch.float32 if trains_in_float32(ex.dtype, all(d.type == "cpu" for d in ex.unit_devices)) else ex.dtype


def _in(w, dt: torch.dtype):
    """A unit's weights with its norm vectors in ``dt`` (linears take activations of any float dtype)."""
    cv = lambda nb: None if nb is None else (nb[0].to(dt), None if nb[1] is None else nb[1].to(dt))
    if isinstance(w, BlockWeights) and w.attn_norm[0].dtype != dt:
        return dataclasses.replace(w, attn_norm=cv(w.attn_norm), mlp_norm=cv(w.mlp_norm))
    if isinstance(w, HeadWeights) and w.norm[0].dtype != dt:
        return dataclasses.replace(w, norm=cv(w.norm))
    return w


def _rng_state(d: torch.device):
    """The generator states dropout on device ``d`` draws from: the CPU's, and the device's own on CUDA."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(d) if d.type == "cuda" else None)


def _set_rng_state(d: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], d)


def pass_order(n_layers: int) -> list[int]:
    """Units a training step acquires, in order: embed, blocks, head, then the blocks again in reverse."""
    return list(range(n_layers + 2)) + list(range(n_layers, 0, -1))


SAVED_COPY_MAX = 1 << 20   # bytes: a kept graph may copy what it saves of a streamed block's bytes up to this size


def _tensors_in(obj, depth: int = 3):
    """Tensors reachable from a unit's weights object: its fields, tuples, and Linear objects' attributes."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth and isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors_in(o, depth - 1)
    elif depth and obj is not None and not isinstance(obj, (str, int, float, bool, torch.dtype, torch.device)):
        for n in attributes(obj):
            yield from _tensors_in(getattr(obj, n, None), depth - 1)


def _saving_copies(w):
    """While a streamed block's forward builds a graph that is kept: any tensor the graph saves from the block's own
    bytes (which the source recycles on release) is saved as a copy; a large one is a linear saving its weight, which
    refill_ cannot reach, and is refused rather than read stale in the backward."""
    own = set()
    for t in _tensors_in(w):
        if not t.requires_grad and t.device.type != "meta":
            own.add(t.untyped_storage().data_ptr())

    def pack(t: torch.Tensor):
        if t.requires_grad or t.untyped_storage().data_ptr() not in own:
            return t
        if t.numel() * t.element_size() > SAVED_COPY_MAX:
            raise OverspillError(f"a kept training graph would save a streamed weight {tuple(t.shape)}; train with "
                                 "gradient checkpointing on")
        return t.clone()

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _refill_block(old: list, new) -> None:
    """The kept graph's Linear objects of a block, pointed at the block's weights fetched again."""
    for lin, n in zip(old, linear_names("block.0")):
        refill_(lin, getattr(new, n))


def _head_loss(cfg, w, flat: torch.Tensor, flat_labels: torch.Tensor, where: torch.Tensor, chunk: int,
               scale: float | None) -> float:
    """The summed cross-entropy of the labelled rows of ``flat`` [N, C], ``chunk`` rows through the head at a time;
    with a ``scale``, each chunk's (loss * scale) is backpropagated into flat's leaf as it goes. A function of its
    own: its logits are freed on return, before the blocks' backward (12 MiB a chunk for a 50k vocabulary)."""
    total = 0.0
    for c0 in range(0, where.numel(), chunk):
        idx = where[c0:c0 + chunk]
        logits = head_forward(cfg, w, flat.index_select(0, idx)[None], fused=False)[0].float()
        loss = F.cross_entropy(logits, flat_labels.index_select(0, idx), reduction="sum")
        total += float(loss.detach())
        if scale is not None:
            (loss * scale).backward()
    return total


def train_pass(ex: Executor, ids: torch.Tensor, labels: torch.Tensor, *, checkpoint: bool = True,
               loss_scale: float | None = None, micro_batch: int | None = None) -> tuple[float, int]:
    """Forward and backward over one batch; gradients accumulate into the tensors that require them (the adapter's).

    ids, labels: [B, T] (labels[b, t] is the target for position t, IGNORE where no loss). The loss backpropagated
    is sum(cross-entropy over labelled tokens) * loss_scale (default 1 / their count: the batch mean).
    ``checkpoint=False`` keeps every block's graph instead of recomputing it; streamed blocks are fetched again for
    the backward either way. Returns (summed cross-entropy, labelled tokens)."""
    if ex.closed:
        raise OverspillError("this model was closed; load it again")
    cfg, src, devs = ex.cfg, ex.source, ex.unit_devices
    B, T = ids.shape
    if T > cfg.max_positions:
        raise OverspillError(f"training sequences of {T} tokens exceed the model's context of {cfg.max_positions}")
    n_tok = int((labels != IGNORE).sum())
    scale = loss_scale if loss_scale is not None else 1.0 / max(n_tok, 1)
    mb = micro_batch or B
    dt = compute_dtype(ex)
    positions = torch.arange(T)[None].expand(B, T)
    step0 = make_step(cfg, ex.rope, positions, 0, None, dt, fused=False)
    steps: dict[torch.device, Step] = {}

    def at(i: int) -> Step:
        d = devs[i]
        if d not in steps:
            steps[d] = step0.to(d) if d != torch.device("cpu") else step0
        return steps[d]

    def run_block(w, x: torch.Tensor, i: int) -> torch.Tensor:
        st, w = at(i), _in(w, dt)
        if mb >= x.shape[0]:
            return block_forward(cfg, w, x, st, None, None)
        return torch.cat([block_forward(cfg, w, x[b:b + mb], st.rows(b, b + mb), None, None)
                          for b in range(0, x.shape[0], mb)])

    src.begin_pass(pass_order(cfg.n_layers))
    with torch.no_grad():
        x = ex._embed(ids.to(devs[0]), at(0)).to(dt)
    saved: list[torch.Tensor] = []
    rng: list[torch.Tensor] = []
    kept: list = []                                 # without checkpointing: (block input, output, weights) per block
    streamed = set(getattr(src, "streamed", None) or ())
    for layer in range(cfg.n_layers):
        i = layer + 1
        x = x.to(devs[i])
        w = src.acquire(i)
        if checkpoint:
            saved.append(x)
            rng.append(_rng_state(devs[i]))         # the recompute draws the same dropout masks
            with torch.no_grad():
                x = run_block(w, x, i)
        else:
            x_in = x.detach().requires_grad_()
            with torch.enable_grad(), (_saving_copies(w) if i in streamed else contextlib.nullcontext()):
                y = run_block(w, x_in, i)
            lins = [getattr(w, n) for n in linear_names("block.0")]
            if i in streamed:       # the graph holds these objects, not their bytes: those go back with the unit
                for lin in lins:
                    hollow_(lin)
            kept.append((x_in, y, lins))
            x = y.detach()
        del w
        src.release(i)
    # the loss: the head over labelled tokens only, a chunk at a time; dL/dx_L accumulates in xl.grad
    hi = cfg.n_layers + 1
    xl = x.detach().to(devs[hi]).requires_grad_()
    flat_labels = labels.reshape(-1).to(devs[hi])
    where = (flat_labels != IGNORE).nonzero().flatten()
    total = _head_loss(cfg, _in(src.acquire(hi), dt), xl.view(B * T, -1), flat_labels, where,
                       ex.head_reserve.head_tokens, scale)
    src.release(hi)
    g = xl.grad if xl.grad is not None else torch.zeros_like(xl)
    del xl
    for layer in range(cfg.n_layers - 1, -1, -1):
        i = layer + 1
        w = src.acquire(i)
        if checkpoint:
            x_in = saved[layer].detach().requires_grad_()
            saved[layer] = None
            d = devs[i]
            with torch.enable_grad(), torch.random.fork_rng(devices=[d] if d.type == "cuda" else []):
                _set_rng_state(d, rng[layer])
                y = run_block(w, x_in, i)
                y.backward(g.to(y.device))
        else:
            x_in, y, w_fwd = kept[layer]
            kept[layer] = None
            _refill_block(w_fwd, w)                 # a streamed block's forward bytes are gone: use these
            y.backward(g.to(y.device))
            del w_fwd
        del w, y
        src.release(i)
        g = x_in.grad
    return total, n_tok


@torch.no_grad()
def eval_loss(ex: Executor, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy over the labelled tokens and their count, without gradients (a forward pass)."""
    cfg, src, devs = ex.cfg, ex.source, ex.unit_devices
    B, T = ids.shape
    dt = compute_dtype(ex)
    step = make_step(cfg, ex.rope, torch.arange(T)[None].expand(B, T), 0, None, dt, fused=False)
    src.begin_pass()
    x = ex._embed(ids.to(devs[0]), step).to(dt)
    for layer in range(cfg.n_layers):
        i = layer + 1
        x = block_forward(cfg, _in(src.acquire(i), dt), x.to(devs[i]), step.to(devs[i]), None, None)
        src.release(i)
    hi = cfg.n_layers + 1
    flat = x.to(devs[hi]).reshape(B * T, -1)
    fl = labels.reshape(-1).to(devs[hi])
    where = (fl != IGNORE).nonzero().flatten()
    total = _head_loss(cfg, _in(src.acquire(hi), dt), flat, fl, where, ex.head_reserve.head_tokens, None)
    src.release(hi)
    return total, int(where.numel())
