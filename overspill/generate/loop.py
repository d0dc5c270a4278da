"""The decode loop: left-padded batched prefill, then one token per step from the KV cache.

                prompts (token ids, different lengths)
                   |  left-pad to T0; key_valid masks the padding slots
                   v
   prefill  ->  logits[:, -1] -> Sampler.choose -> token per sequence
                   ^                                   |
                   |  forward(tokens [B,1], pos+1) <---+  (until EOS / stop string / max_new_tokens)
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from ..errors import OverspillError
from ..runtime.executor import Executor
from ..tokenizer import Detokenizer
from .config import GenerationConfig
from .sampling import Sampler


def _pad_batch(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    lens = [len(p) for p in prompts]
    T0 = max(lens)
    ids = torch.full((len(prompts), T0), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T0 - len(p):] = torch.tensor(p, dtype=torch.long)
    pads = torch.tensor([T0 - n for n in lens])
    positions = (torch.arange(T0)[None, :] - pads[:, None]).clamp(min=0)   # (B, T0)
    return ids, positions, lens


def check_prompts(prompts: list[list[int]], vocab: int, max_len: int, max_positions: int, learned: bool) -> None:
    if not prompts:
        raise OverspillError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise OverspillError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise OverspillError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")
    if learned and max_len > max_positions:
        raise OverspillError(f"prompt + max_new_tokens = {max_len} exceeds the model's {max_positions} positions")


def prefill(ex: Executor, prompts: list[list[int]], max_new: int, pad_id: int = 0):
    """Allocate the cache, run the padded prompts; returns (last logits [B, V], cache, next positions [B, 1])."""
    ids, positions, lens = _pad_batch(prompts, pad_id)
    B, T0 = ids.shape
    cache = ex.new_cache(B, T0 + max_new)
    if min(lens) < T0:
        cache.key_valid = torch.ones(B, T0 + max_new, dtype=torch.bool)
        for b, n in enumerate(lens):
            cache.key_valid[b, : T0 - n] = False
    logits = ex.forward(ids, positions, cache, last_only=True)[:, -1]
    return logits, cache, torch.tensor(lens)[:, None]


def decode_steps(ex: Executor, prompts: list[list[int]], gc: GenerationConfig,
                 finished: list[bool], stats: dict) -> Iterator[list[int]]:
    """Yield the next token of every sequence, step by step. The caller marks sequences
    done in ``finished``; the loop stops when all are done or after max_new_tokens.

    ``stats`` is brought up to date before every yield, so it holds whenever the caller stops
    reading: batch, prompt_tokens, prefill_s (prompt forward + first token), new_tokens (steps
    so far: the longest sequence's new tokens), generated_tokens (new tokens summed over the
    sequences, a finished one no longer counting) and decode_s (first token to latest token).
    """
    cfg = ex.cfg
    check_prompts(prompts, cfg.vocab_size, max(map(len, prompts)) + gc.max_new_tokens, cfg.max_positions,
                  cfg.learned_positions)
    gc.check_batch(len(prompts))
    sampler = Sampler(gc, len(prompts), cfg.vocab_size, prompts)
    t0 = time.perf_counter()
    logits, cache, pos = prefill(ex, prompts, gc.max_new_tokens)
    stats.update(batch=len(prompts), prompt_tokens=sum(map(len, prompts)), new_tokens=0, generated_tokens=0,
                 decode_s=0.0)
    t1 = 0.0
    for i in range(gc.max_new_tokens):
        tok = sampler.choose(logits)
        now = time.perf_counter()
        if i == 0:
            stats["prefill_s"] = now - t0
            t1 = now
        stats["new_tokens"] = i + 1
        stats["generated_tokens"] += finished.count(False)   # the sequences still running get this token
        stats["decode_s"] = now - t1
        yield tok.tolist()
        if all(finished) or i == gc.max_new_tokens - 1:
            break
        logits = ex.forward(tok[:, None], pos, cache, last_only=True)[:, -1]
        pos = pos + 1


class StopChecker:
    """EOS ids and stop strings for one sequence, fed one new token at a time.

    Stop strings are found incrementally: a Detokenizer decodes a few ids per token (never the
    whole output), and only the new text plus the ``keep`` characters before it (longest stop
    string - 1) are searched, since a match ending earlier would already have ended the sequence.
    The cut is the length of the sequence's text before the earliest stop string.
    """

    __slots__ = ("eos", "stop", "detok", "keep", "tail", "start")

    def __init__(self, gc: GenerationConfig, decode: Callable[[list[int]], str] | None):
        self.eos = frozenset() if gc.ignore_eos else frozenset(gc.eos_token_ids)
        self.stop = gc.stop
        self.detok: Detokenizer | None = None
        if self.stop:
            if decode is None:
                raise OverspillError("stop strings need the model's tokenizer.json")
            self.detok = Detokenizer(decode)
        self.keep = max(map(len, self.stop), default=1) - 1
        self.tail = ""        # the last `keep` characters of the emitted text
        self.start = 0        # emitted text length before `tail`

    def check(self, tok: int) -> tuple[bool, int | None]:
        """Take the sequence's next token -> (done, cut): cut is the text length to keep when a stop string matched."""
        if tok in self.eos:
            return True, None
        if self.detok is None:
            return False, None
        piece = self.detok.push(tok)
        window = self.tail + piece + self.detok.pending   # pending: text withheld inside a split character
        hits = [i for i in map(window.find, self.stop) if i >= 0]
        if hits:
            return True, self.start + min(hits)
        if piece:
            text = self.tail + piece
            drop = max(0, len(text) - self.keep)
            self.start, self.tail = self.start + drop, text[drop:]
        return False, None

    def copy(self) -> "StopChecker":
        """An independent copy (beam search forks hypotheses)."""
        c = StopChecker.__new__(StopChecker)
        c.eos, c.stop, c.keep, c.tail, c.start = self.eos, self.stop, self.keep, self.tail, self.start
        c.detok = self.detok.copy() if self.detok is not None else None
        return c


def generate_ids(ex: Executor, prompts: list[list[int]], gc: GenerationConfig,
                 decode: Callable[[list[int]], str] | None = None, stats: dict | None = None
                 ) -> tuple[list[list[int]], list[int | None]]:
    """Returns, per prompt, the new token ids (EOS included when it ended the sequence) and,
    when a stop string ended it, the length of the text before the stop string."""
    stats = {} if stats is None else stats
    checkers = [StopChecker(gc, decode) for _ in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    cuts: list[int | None] = [None] * len(prompts)
    finished = [False] * len(prompts)
    for toks in decode_steps(ex, prompts, gc, finished, stats):
        for b, t in enumerate(toks):
            if finished[b]:
                continue
            out[b].append(t)
            finished[b], cuts[b] = checkers[b].check(t)
    return out, cuts


def stream_ids(ex: Executor, prompt: list[int], gc: GenerationConfig, decode: Callable[[list[int]], str] | None,
               stats: dict | None = None) -> Iterator[int]:
    """Yield new token ids of one prompt as they are produced (EOS and stop handling included)."""
    stats = {} if stats is None else stats
    checker = StopChecker(gc, decode)
    finished = [False]
    for toks in decode_steps(ex, [prompt], gc, finished, stats):
        finished[0], _ = checker.check(toks[0])
        yield toks[0]
        if finished[0]:
            return
