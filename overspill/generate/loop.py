"""generate(), stream() and beam search as clients of the batching engine (generate/engine.py), run on the
caller's thread.

    prompts ──run_engine──► Engine: a cache row each (num_beams rows for beam search), all prompts in the first weight
                            pass (micro-batched per block), then one token per sequence (per beam) per pass until
                            EOS / stop string / max_new_tokens
             ◄── (prompt index, TokenEvent | Finished) as they happen
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

from ..errors import OverspillError
from ..runtime.executor import Executor
from .config import GenerationConfig
from .sampling import row_seeds


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
    nb = gc.num_beams
    eng = Engine(_Client(ex, decode), max_batch_size=B * nb, max_seq_len=max(map(len, prompts)) + gc.max_new_tokens,
                 max_queue=B, step_tokens=sum(map(len, prompts)))
    t0 = time.perf_counter()
    handles = [eng.submit(Request(p, max_tokens=gc.max_new_tokens, temperature=gc.temperature, top_p=gc.top_p,
                                  top_k=gc.top_k, seed=s, repetition_penalty=gc.repetition_penalty,
                                  stop=list(gc.stop), stop_token_ids=eos, num_beams=nb,
                                  length_penalty=gc.length_penalty)) for p, s in zip(prompts, seeds)]
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
    ended it, the length of its text before the stop string (a client of the batching engine: generate/engine.py).
    With ``gc.num_beams`` > 1, each prompt's best beam-search hypothesis (generate/beam.py)."""
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
