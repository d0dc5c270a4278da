"""generate() and stream() as clients of the batching engine (generate/engine.py), run on the caller's thread;
and the left-padded batched prefill that beam search still uses.

    prompts ──run_engine──► Engine: a cache row each, all prompts in the first weight pass (micro-batched per
                            block), then one token per sequence per pass until EOS / stop string / max_new_tokens
             ◄── (prompt index, TokenEvent | Finished) as they happen
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from ..errors import OverspillError
from ..runtime.executor import Executor
from ..tokenizer import Detokenizer
from .config import GenerationConfig
from .sampling import row_seeds


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


class _Client:
    """What the engine needs of a model: its executor and, for text, a decode function."""

    def __init__(self, ex: Executor, decode: Callable[[list[int]], str] | None):
        self.executor, self.config, self.tokenizer = ex, ex.cfg, decode
        self.decode = decode


def run_engine(ex: Executor, prompts: list[list[int]], gc: GenerationConfig,
               decode: Callable[[list[int]], str] | None, stats: dict) -> Iterator[tuple[int, object]]:
    """Every prompt through one engine run on this thread, a cache row each: yields (prompt index, TokenEvent or
    Finished) as they happen. ``stats`` is brought up to date before every yield: batch, prompt_tokens, prefill_s
    (until the first token), new_tokens (the longest sequence's), generated_tokens (summed), decode_s (first token
    to latest), step_ends (perf_counter at the end of each weight pass)."""
    from .engine import Engine
    from .requests import Finished, Request

    cfg = ex.cfg
    check_prompts(prompts, cfg.vocab_size, max(map(len, prompts)) + gc.max_new_tokens, cfg.max_positions,
                  cfg.learned_positions)
    gc.check_batch(len(prompts))
    B = len(prompts)
    seeds = row_seeds(gc.seed, B) if not gc.greedy else [0] * B
    eos = [] if gc.ignore_eos else list(gc.eos_token_ids)
    # every prompt in the first pass (one read of the weights for all; no sequence is waiting on a token yet)
    eng = Engine(_Client(ex, decode), max_batch_size=B, max_seq_len=max(map(len, prompts)) + gc.max_new_tokens,
                 max_queue=B, step_tokens=sum(map(len, prompts)))
    t0 = time.perf_counter()
    handles = [eng.submit(Request(p, max_tokens=gc.max_new_tokens, temperature=gc.temperature, top_p=gc.top_p,
                                  top_k=gc.top_k, seed=s, repetition_penalty=gc.repetition_penalty,
                                  stop=list(gc.stop), stop_token_ids=eos)) for p, s in zip(prompts, seeds)]
    stats.update(batch=B, prompt_tokens=sum(map(len, prompts)), new_tokens=0, generated_tokens=0, decode_s=0.0,
                 step_ends=[])
    counts = [0] * B
    first = None
    while eng.step():
        events = [(b, ev) for b, h in enumerate(handles) for ev in h.poll()]
        now = time.perf_counter()
        stats["step_ends"].append(eng.step_ends[-1] if eng.step_ends else now)
        for b, ev in events:
            counts[b] = ev.completion_tokens if isinstance(ev, Finished) else counts[b] + (ev.token >= 0)
        if first is None and any(counts):
            first = now
            stats["prefill_s"] = now - t0
        if first is not None:
            stats.update(new_tokens=max(counts), generated_tokens=sum(counts), decode_s=now - first)
        yield from events


def generate_ids(ex: Executor, prompts: list[list[int]], gc: GenerationConfig,
                 decode: Callable[[list[int]], str] | None = None, stats: dict | None = None
                 ) -> tuple[list[list[int]], list[int | None]]:
    """Returns, per prompt, the new token ids (EOS included when it ended the sequence) and, when a stop string
    ended it, the length of its text before the stop string (a client of the batching engine: generate/engine.py)."""
    from .requests import Finished

    stats = {} if stats is None else stats
    out: list[list[int]] = [[] for _ in prompts]
    cuts: list[int | None] = [None] * len(prompts)
    for b, ev in run_engine(ex, prompts, gc, decode, stats):
        if isinstance(ev, Finished):
            out[b] = ev.tokens
            if ev.finish_reason == "stop" and gc.stop and (not ev.tokens or ev.tokens[-1] not in gc.eos_token_ids
                                                           or gc.ignore_eos):
                cuts[b] = len(ev.text)
    return out, cuts


def stream_ids(ex: Executor, prompt: list[int], gc: GenerationConfig, decode: Callable[[list[int]], str] | None,
               stats: dict | None = None) -> Iterator[int]:
    """Yield new token ids of one prompt as they are produced (EOS and stop handling included)."""
    from .requests import Finished

    stats = {} if stats is None else stats
    for _, ev in run_engine(ex, [prompt], gc, decode, stats):
        if isinstance(ev, Finished):
            if ev.finish_reason == "stop" and ev.tokens and ev.tokens[-1] in gc.eos_token_ids and not gc.ignore_eos:
                yield ev.tokens[-1]                  # the EOS id that ended it (no text event carries it)
            return
        if ev.token >= 0:
            yield ev.token
