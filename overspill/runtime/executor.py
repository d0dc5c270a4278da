"""Runs the units in order over a batch: embed -> blocks -> head.

The executor calls each unit explicitly (no hooks, no patched ``forward``); a
WeightSource decides where each unit's weights come from.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import OverspillError
from ..model.kv_cache import KVCache
from ..model.layers import Rope, Step, block_forward, embed_forward, head_forward, make_step
from .sources import WeightSource


class Executor:
    """``unit_devices`` (optional) names where each unit computes; activations, not weights, move
    between devices, and each block's KV cache lives on its block's device."""

    def __init__(self, cfg: ModelConfig, source: WeightSource, dtype: torch.dtype, device: str = "cpu",
                 unit_devices: list[str] | None = None):
        self.cfg, self.source, self.dtype, self.device = cfg, source, dtype, torch.device(device)
        n = cfg.n_layers + 2
        self.unit_devices = [torch.device(d) for d in (unit_devices or [device] * n)]
        self.multi = len(set(self.unit_devices)) > 1 or self.unit_devices[0].type != "cpu"
        self.rope = Rope(cfg) if cfg.rotary_dim else None
        self.reserve = None   # set under a memory budget: the largest batch x length planned for
        self.kv_format = None  # None: KV cache in the compute dtype; "int8": model/kv_cache.QuantKV

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        r = self.reserve
        # the cache may be shaped differently (more, shorter sequences), but no sequence may be longer than
        # planned: attention scores grow with the length squared
        if r is not None and (batch * max_len > r.max_batch * r.max_seq_len or max_len > r.max_seq_len):
            raise OverspillError(f"this request needs KV cache for {batch} x {max_len} tokens but the memory plan "
                                 f"reserved {r.max_batch} x {r.max_seq_len}; load with larger max_batch_size / "
                                 f"max_seq_len")
        return KVCache(self.cfg, batch, max_len, self.dtype, self.device, self.unit_devices[1:-1], self.kv_format)

    def step(self, positions: torch.Tensor, cache: KVCache) -> Step:
        T = positions.shape[1]
        return make_step(self.cfg, self.rope, positions, cache.length, cache.valid_prefix(cache.length + T), self.dtype)

    def _block(self, w, x: torch.Tensor, step: Step, k: torch.Tensor, v: torch.Tensor, mb: int) -> torch.Tensor:
        B = x.shape[0]
        if mb >= B:
            return block_forward(self.cfg, w, x, step, k, v)
        # one read of the block's weights serves every micro-batch; activations stay micro-batch sized, and the
        # outputs go straight into one batch-sized tensor (the reserve counts the input and this output)
        out = torch.empty_like(x)
        for b in range(0, B, mb):
            out[b:b + mb] = block_forward(self.cfg, w, x[b:b + mb], step.rows(b, b + mb), k[b:b + mb], v[b:b + mb])
        return out

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """ids, positions [B, T] -> float32 logits [B, T or 1, V] on the CPU; appends T slots to the cache."""
        cfg, src, devs = self.cfg, self.source, self.unit_devices
        step = self.step(positions, cache)
        steps = {torch.device("cpu"): step}
        at = lambda i: steps.setdefault(devs[i], step.to(devs[i])) if self.multi else step
        src.begin_pass()
        x = embed_forward(cfg, src.acquire(0), ids.to(devs[0]), at(0), self.dtype)
        src.release(0)
        B, T = ids.shape
        mb = self.reserve.micro_batch(T) if self.reserve is not None else B
        for layer in range(cfg.n_layers):
            i = layer + 1
            if self.multi and x.device != devs[i]:
                x = x.to(devs[i], non_blocking=True)       # only activations cross devices
            # no local keeps the unit's weights past release: a reader that allocates per fetch would hold one more
            x = self._block(src.acquire(i), x, at(i), cache.k[layer], cache.v[layer], mb)
            src.release(i)
        if last_only:
            x = x[:, -1:]
        i = cfg.n_layers + 1
        logits = head_forward(cfg, src.acquire(i), x.to(devs[i]) if self.multi else x)
        src.release(i)
        cache.length = step.end
        return logits.float().cpu()
