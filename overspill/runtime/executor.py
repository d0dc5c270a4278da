"""Runs the units in order over a batch: embed -> blocks -> head.

The executor calls each unit explicitly (no hooks, no patched ``forward``); a WeightSource decides where each unit's
weights come from. It is complete when constructed: the memory reserve it checks requests against, the KV-cache
format, where each unit computes, and (when the plan leaves the token table on disk) the row table it reads.
Under pipeline parallelism (overspill/parallel) a ``StageLink`` makes it run a contiguous range of the units: the
hidden states come from the stage before and go to the stage after.
Under tensor parallel, ``reduce`` sums each block's partial attention and MLP outputs across the ranks.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..config import ModelConfig
from ..errors import OverspillError
from ..model.kv_cache import KVCache
from ..model.layers import RaggedStep, Rope, Segment, Step, block_forward, embed_forward, head_forward, make_step
from ..model.weights import EmbedWeights
from .reserve import Reserve
from .rows import RowTable
from .sources import WeightSource

# consume(t0, t1, logits): float32 logits [B, t1 - t0, V] of time steps [t0, t1) of a forward's output
LogitsConsumer = Callable[[int, int, torch.Tensor], None]


class StageLink(Protocol):
    """Pipeline parallel: this executor runs units [first, end) of embed, block.0 .., head. A stage without the
    embedding receives its input hidden states, one without the head sends its output on (and forward returns None)."""
    first: int
    end: int

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor: ...

    def send(self, x: torch.Tensor) -> None: ...


class Executor:
    """``unit_devices`` (optional) names where each unit computes; activations, not weights, move between devices,
    and each block's KV cache lives on its block's device. ``reserve`` (under a memory budget) is the largest request
    the plan holds memory for: bigger ones are refused, and blocks run over micro-batches. ``rows``: the token table
    left on disk; the embedding reads just its ids' rows. ``fused``: bf16 on the CPU, the kernels' fused ops."""

    def __init__(self, cfg: ModelConfig, source: WeightSource, dtype: torch.dtype, *,
                 unit_devices: list[str] | None = None, reserve: Reserve | None = None, kv_format: str | None = None,
                 rows: RowTable | None = None, fused: bool = True):
        self.cfg, self.source, self.dtype = cfg, source, dtype
        n = cfg.n_layers + 2
        self.unit_devices = [torch.device(d) for d in (unit_devices or ["cpu"] * n)]
        self.device = self.unit_devices[0]
        self.multi = len(set(self.unit_devices)) > 1 or self.unit_devices[0].type != "cpu"
        self.rope = Rope(cfg) if cfg.rotary_dim else None
        self.reserve, self.kv_format, self.rows, self.fused = reserve, kv_format, rows, fused
        self.head_reserve = reserve or Reserve()      # the LM-head chunk also bounds a run without a budget
        self.link: StageLink | None = None            # pipeline parallel: the units this stage runs (see StageLink)
        # tensor parallel: sums the blocks' partial attention / MLP outputs across ranks (model/layers.block_forward)
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.closed = False

    def close(self) -> None:
        """Stop the source's reader thread, free its staging buffers and close every file (idempotent)."""
        if not self.closed:
            self.closed = True
            close = getattr(self.source, "close", None)
            if close is not None:
                close()
            if self.rows is not None:
                self.rows.close()

    def check_cache(self, batch: int, max_len: int) -> None:
        """Refuse a cache the memory plan has no room for."""
        r = self.reserve
        # the cache may be shaped differently (more, shorter sequences), but no sequence may be longer than
        # planned: attention scores grow with the length squared
        if r is not None and (batch * max_len > r.max_batch * r.max_seq_len or max_len > r.max_seq_len):
            raise OverspillError(f"this request needs KV cache for {batch} x {max_len} tokens but the memory plan "
                                 f"reserved {r.max_batch} x {r.max_seq_len}; load with larger max_batch_size / "
                                 f"max_seq_len")

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        self.check_cache(batch, max_len)
        return KVCache(self.cfg, batch, max_len, self.dtype, self.device, self.unit_devices[1:-1], self.kv_format)

    def _range(self) -> tuple[int, int, range]:
        """(first unit, end unit, the block layers) this executor runs: all of them unless it is a pipeline stage."""
        n = self.cfg.n_layers + 2
        first, end = (self.link.first, self.link.end) if self.link is not None else (0, n)
        return first, end, range(max(first, 1) - 1, min(end, n - 1) - 1)

    def step(self, positions: torch.Tensor, cache: KVCache) -> Step:
        T = positions.shape[1]
        return make_step(self.cfg, self.rope, positions, cache.length, cache.valid_prefix(cache.length + T), self.dtype,
                         self.fused)

    def _block(self, w, x: torch.Tensor, step: Step, k: torch.Tensor, v: torch.Tensor, mb: int) -> torch.Tensor:
        B = x.shape[0]
        if mb >= B:
            return block_forward(self.cfg, w, x, step, k, v, self.reduce)
        # one read of the block's weights serves every micro-batch; activations stay micro-batch sized, and the
        # outputs go straight into one batch-sized tensor (the reserve counts the input and this output)
        out = torch.empty_like(x)
        for b in range(0, B, mb):
            out[b:b + mb] = block_forward(self.cfg, w, x[b:b + mb], step.rows(b, b + mb), k[b:b + mb], v[b:b + mb],
                                          self.reduce)
        return out

    def _embed(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        if self.rows is not None:   # the token table stays on disk: read just these ids' rows
            table, local = self.rows.select(ids)
            return embed_forward(self.cfg, EmbedWeights(table), local, step, self.dtype)
        x = embed_forward(self.cfg, self.source.acquire(0), ids, step, self.dtype)
        self.source.release(0)
        return x

    def _head(self, w, x: torch.Tensor, consume: LogitsConsumer | None) -> torch.Tensor | None:
        """The LM head over at most reserve.head_tokens tokens at a time (rows x time steps): never [B, T, V] inside
        the runtime. Without ``consume`` the float32 logits are the caller's result."""
        B, T, _ = x.shape
        n = self.head_reserve.head_tokens
        if consume is None and B * T <= n:      # a decode step: one chunk, no copy
            return head_forward(self.cfg, w, x, self.fused).float().cpu()
        rb = min(B, n)                          # rows per chunk, then time steps per chunk
        tc = max(1, n // rb)
        out = None if consume is not None else torch.empty(B, T, self.cfg.vocab_size, dtype=torch.float32)
        for t0 in range(0, T, tc):
            t1 = min(T, t0 + tc)
            if consume is not None and rb < B:  # a consumer takes whole rows: gather the row blocks first
                part = torch.cat([head_forward(self.cfg, w, x[b:b + rb, t0:t1], self.fused).float().cpu()
                                  for b in range(0, B, rb)])
                consume(t0, t1, part)
                continue
            for b in range(0, B, rb):
                logits = head_forward(self.cfg, w, x[b:b + rb, t0:t1], self.fused)
                if consume is not None:
                    consume(t0, t1, logits.float().cpu())
                else:
                    out[b:b + rb, t0:t1] = logits
        return out

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, last_only: bool = False,
                consume: LogitsConsumer | None = None) -> torch.Tensor | None:
        """ids, positions [B, T] -> float32 logits [B, T or 1, V] on the CPU; appends T slots to the cache.
        With ``consume``, each LM-head chunk's logits are handed to it instead and None is returned."""
        if self.closed:
            raise OverspillError("this model was closed; load it again")
        cfg, src, devs = self.cfg, self.source, self.unit_devices
        step = self.step(positions, cache)
        steps = {devs[0]: step.to(devs[0]) if self.multi else step}
        at = lambda i: steps[devs[i]] if devs[i] in steps else steps.setdefault(devs[i], step.to(devs[i]))
        first, end, layers = self._range()
        src.begin_pass()
        B, T = ids.shape
        x = self._embed(ids.to(devs[0]), at(0)) if first == 0 else \
            self.link.receive((B, T, cfg.hidden_size), self.dtype, devs[first])
        mb = self.reserve.micro_batch(T) if self.reserve is not None else B
        for layer in layers:
            i = layer + 1
            if self.multi and x.device != devs[i]:
                x = x.to(devs[i], non_blocking=True)       # only activations cross devices
            # no local keeps the unit's weights past release: a reader that allocates per fetch would hold one more
            x = self._block(src.acquire(i), x, at(i), cache.k[layer], cache.v[layer], mb)
            src.release(i)
        if end < cfg.n_layers + 2:      # the head runs on a later stage
            self.link.send(x)
            cache.length = step.end
            return None
        if last_only:
            x = x[:, -1:]
        i = cfg.n_layers + 1
        logits = self._head(src.acquire(i), x.to(devs[i]) if self.multi else x, consume)
        src.release(i)
        cache.length = step.end
        return logits

    @torch.inference_mode()
    def forward_ragged(self, segments: list[tuple[int, int, list[int]]], cache: KVCache, logit_rows: list[int],
                       consume: LogitsConsumer, pad_to: int = 4, abort: Callable[[], bool] | None = None) -> bool:
        """One pass over the weights for several sequences at once (continuous batching).

        segments: (cache row, start slot, new token ids) per sequence; the tokens take slots [start, start + n) of
        their row, at positions start.. (a row holds one sequence). logit_rows: indices into the packed tokens
        (segment after segment) whose logits are wanted, handed to ``consume(r0, r1, logits [1, r1 - r0, V])``
        in LM-head chunks. ``abort()`` is asked before every block: True stops the pass there (its cache slots are
        rewritten by the next pass over them) and returns False; a finished pass returns True.

        Each block runs over micro-batches of whole segments, at most reserve.micro_tokens tokens each (FlexGen's
        block schedule, as ``forward``): one read of the block's weights serves them all, and the activations stay
        micro-batch sized. Each micro-batch is padded to a multiple of ``pad_to`` tokens: the CPU BLAS computes a
        row alike in any batch whose row count is a multiple of 4, so a sequence's float32 logits do not depend on
        what else runs (tested)."""
        if self.closed:
            raise OverspillError("this model was closed; load it again")
        cfg, src, devs = self.cfg, self.source, self.unit_devices
        limit = self.head_reserve.micro_tokens
        ids: list[int] = []
        pos: list[torch.Tensor] = []
        where: list[int] = []                     # real token -> its place in the padded packing
        chunks: list[tuple[int, int, RaggedStep]] = []
        segs: list[Segment] = []
        c0 = 0

        def close_chunk() -> None:
            nonlocal c0, segs
            if segs:
                pad = -(len(ids) - c0) % pad_to
                ids.extend([0] * pad)
                pos.append(torch.zeros(pad, dtype=torch.long))
                st = RaggedStep(segs, len(ids) - c0 - pad, self.fused)
                p = torch.cat(pos[len(pos) - len(segs) - 1:])          # this chunk's positions, padding included
                if self.rope is not None:
                    st.cos, st.sin = self.rope.cos_sin(p[None], self.dtype)
                st.rows = torch.cat([torch.full((s.t1 - s.t0,), s.row) for s in segs])
                st.slots = p[: st.n_real]
                chunks.append((c0, len(ids), st))
                c0, segs = len(ids), []
        for row, start, toks in segments:
            n = len(toks)
            if segs and len(ids) - c0 + n > limit:
                close_chunk()
            p = torch.arange(start, start + n)[None]
            t = len(ids) - c0
            segs.append(Segment(row, t, t + n, make_step(cfg, self.rope, p, start, None, self.dtype, self.fused)))
            where.extend(range(len(ids), len(ids) + n))
            ids += toks
            pos.append(p[0])
        close_chunk()
        ids_t = torch.tensor(ids, dtype=torch.long)[None]
        emb = Step(torch.cat(pos)[None], 0, fused=self.fused)     # the embedding's positions (learned tables)
        on: dict = {}                                              # device -> the chunks' steps there

        def at(i: int) -> list[tuple[int, int, RaggedStep]]:
            d = devs[i]
            if d not in on:
                on[d] = chunks if not self.multi else [(a, b, st.to(d)) for a, b, st in chunks]
            return on[d]
        first, end, layers = self._range()
        src.begin_pass()
        x = self._embed(ids_t.to(devs[0]), emb.to(devs[0]) if self.multi else emb) if first == 0 else \
            self.link.receive((1, len(ids), cfg.hidden_size), self.dtype, devs[first])
        for layer in layers:
            i = layer + 1
            if abort is not None and abort():
                return False   # a streaming source restarts its reader at the next begin_pass
            if self.multi and x.device != devs[i]:
                x = x.to(devs[i], non_blocking=True)
            w, k, v = src.acquire(i), cache.k[layer], cache.v[layer]
            parts = at(i)
            if len(parts) == 1:
                x = block_forward(cfg, w, x, parts[0][2], k, v, self.reduce)
            else:
                out = torch.empty_like(x)
                for a, b, st in parts:
                    out[:, a:b] = block_forward(cfg, w, x[:, a:b], st, k, v, self.reduce)
                x = out
            del w
            src.release(i)
        if end < cfg.n_layers + 2:      # the head runs on a later stage
            self.link.send(x)
            return True
        n = len(logit_rows)
        rows = [where[r] for r in logit_rows] + [0] * (-n % pad_to)
        i = cfg.n_layers + 1
        xs = x[:, torch.tensor(rows, dtype=torch.long, device=x.device)]
        self._head(src.acquire(i), xs.to(devs[i]) if self.multi else xs,
                   lambda t0, t1, lg: consume(t0, min(t1, n), lg[:, : max(0, min(t1, n) - t0)]) if t0 < n else None)
        src.release(i)
        return True
