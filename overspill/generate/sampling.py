"""Logit processing and token choice: repetition penalty, temperature, top-k, top-p, greedy.

The order follows Hugging Face's (penalty, then temperature, top-k, top-p), so the same
settings mean the same thing. Each sequence samples with its own generator, seeded with that
sequence's seed alone (not its row), so a seeded sequence gives the same tokens whatever batch
it shares and at whichever row.
"""
from __future__ import annotations

import torch

from ..errors import OverspillError
from .config import GenerationConfig


def row_seeds(seed: int | list[int] | None, batch: int) -> list[int]:
    """One generator seed per row: the int for every row, the row's own list entry, or, for None,
    an independent random seed per row (drawn from torch's global generator)."""
    if seed is None:
        return torch.randint(0, 2**62, (batch,)).tolist()
    if isinstance(seed, int):
        return [seed] * batch
    if len(seed) != batch:
        raise OverspillError(f"{len(seed)} seeds for {batch} sequences")
    return list(seed)


class Sampler:
    def __init__(self, gc: GenerationConfig, batch: int, vocab: int, prompts: list[list[int]]):
        self.gc = gc
        self.seen: torch.Tensor | None = None
        if gc.repetition_penalty != 1.0:
            self.seen = torch.zeros(batch, vocab, dtype=torch.bool)
            for b, p in enumerate(prompts):
                self.seen[b, torch.tensor(p, dtype=torch.long)] = True
        self.gens: list[torch.Generator] | None = None
        if not gc.greedy:
            self.gens = [torch.Generator().manual_seed(s) for s in row_seeds(gc.seed, batch)]

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32 -> processed logits (new tensor)."""
        gc = self.gc
        if self.seen is not None:
            p = gc.repetition_penalty
            logits = torch.where(self.seen, torch.where(logits < 0, logits * p, logits / p), logits)
        if gc.greedy:
            return logits
        logits = logits / gc.temperature
        if gc.top_k > 0 and gc.top_k < logits.shape[-1]:
            kth = torch.topk(logits, gc.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if gc.top_p < 1.0:
            # Holtzman et al. 2020 (nucleus sampling): keep the smallest set whose mass exceeds top_p.
            sorted_logits, idx = torch.sort(logits, descending=False, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            remove = cum <= (1 - gc.top_p)
            remove[:, -1] = False
            logits = logits.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
        return logits

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> next token ids [B]."""
        logits = self.process(logits)
        if self.gc.greedy:
            tok = logits.argmax(-1)
        else:
            probs = logits.softmax(-1)
            tok = torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(self.gens)])
        if self.seen is not None:
            self.seen[torch.arange(tok.shape[0]), tok] = True
        return tok
