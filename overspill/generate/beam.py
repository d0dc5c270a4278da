"""Beam search (deterministic) as one request of the batching engine: its beams are sequences with a cache row each.

    prompt ──(its first row, chunked like any prompt)──► logits ──BeamSearch.advance──► nb beams, each (source beam,
    token); the engine gives a beam its source's row when it is the first to continue it, else a free row of the
    request's with the source's slots copied in (KVCache.copy_rows) ──► one token per live beam per weight pass,
    riding the same ragged pass as every other request ──► ... ──► the best hypothesis, as the request's tokens

Scores are summed log-probabilities; a finished hypothesis (EOS or stop string) is ranked by
sum_logprobs / generated_len ** length_penalty. Like Hugging Face's default (early_stopping=False), a prompt is done
when it has num_beams finished hypotheses and no running beam can still beat the worst of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import OverspillError
from ..tokenizer import Detokenizer
from .config import GenerationConfig
from .sampling import Sampler

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


Hyp = tuple[float, list[int], int | None]   # (ranking score, new ids, text cut when a stop string ended it)


@dataclass
class Beam:
    score: float                 # summed log-probabilities of its tokens
    tokens: list[int]            # generated so far; the last one is not in the cache yet
    checker: StopChecker | None  # stop-string state of its text
    row: int = -1                # the cache row holding its slots


class BeamSearch:
    """One prompt's beams. ``advance(logits)`` takes the next-token logits of the live beams (in ``live`` order)
    and makes the next generation; the caller then places the new beams in cache rows (``place``)."""

    def __init__(self, prompt: list[int], num_beams: int, length_penalty: float, repetition_penalty: float,
                 eos: set[int], stop: list[str], decode, vocab: int):
        self.nb, self.length_penalty, self.eos, self.vocab = num_beams, length_penalty, eos, vocab
        gc = GenerationConfig(max_new_tokens=1, temperature=0.0, repetition_penalty=repetition_penalty)
        self.sampler = Sampler(gc, 1, vocab, [prompt])            # repetition penalty only; one row per live beam
        checker = StopChecker(GenerationConfig(max_new_tokens=1, stop=list(stop)), decode) if stop else None
        self.live: list[Beam] = [Beam(0.0, [], checker)]           # before the first token: one beam, the prompt
        self.finished: list[Hyp] = []
        self.done = False

    def advance(self, logits: torch.Tensor) -> list[int]:
        """logits [len(live), V] float32 -> the new live beams (``self.live``); returns each new beam's source index
        into the previous ``live``. Sets ``done`` when no live beam can beat the finished hypotheses."""
        nb, V = self.nb, self.vocab
        logp = self.sampler.process(logits).log_softmax(-1)        # [n, V]
        scores = torch.tensor([b.score for b in self.live])
        cand = (scores[:, None] + logp).view(-1)
        top, idx = cand.topk(min(2 * nb, cand.numel()))
        gen_len = len(self.live[0].tokens) + 1
        new: list[Beam] = []
        src: list[int] = []
        for rank, (s, j) in enumerate(zip(top.tolist(), idx.tolist())):
            beam, tok = divmod(j, V)
            old = self.live[beam]
            cut, checker = None, None
            if old.checker is not None and tok not in self.eos:
                checker = old.checker.copy()
                cut = checker.check(tok)[1]
            if tok in self.eos or cut is not None:
                if rank < nb:
                    self._add((s / gen_len ** self.length_penalty, old.tokens + [tok], cut))
                continue
            new.append(Beam(s, old.tokens + [tok], checker))
            src.append(beam)
            if len(new) == nb:
                break
        if self.sampler.seen is not None:
            seen = self.sampler.seen.index_select(0, torch.tensor(src, dtype=torch.long)) if src else \
                self.sampler.seen[:0]
            seen[torch.arange(len(new)), torch.tensor([b.tokens[-1] for b in new], dtype=torch.long)] = True
            self.sampler.seen = seen
        self.live = new
        best = max((b.score for b in new), default=float("-inf"))
        if not new or (len(self.finished) == nb and
                       min(f[0] for f in self.finished) >= best / gen_len ** self.length_penalty):
            self.done = True
        return src

    def place(self, src: list[int], old_rows: list[int], spare: list[int]) -> list[tuple[int, int]]:
        """Give each live beam a cache row: the first beam continuing a source takes that source's row, the others
        a row no new beam keeps (``old_rows`` of dropped beams, then ``spare``), into which the source's slots must
        be copied. Returns those copies as (source row, destination row); ``spare`` loses the rows it gave."""
        taken = {}
        for k, j in enumerate(src):
            if j not in taken:
                taken[j] = k
                self.live[k].row = old_rows[j]
        free = [r for j, r in enumerate(old_rows) if j not in taken] + spare
        copies = []
        for k, j in enumerate(src):
            if taken[j] != k:
                self.live[k].row = free.pop(0)
                copies.append((old_rows[j], self.live[k].row))
        spare[:] = free
        return copies

    def best(self) -> Hyp:
        """The best of the finished hypotheses and, unless the search is done, the live beams."""
        hyps = list(self.finished)
        if not self.done:
            for b in self.live:
                hyps.append((b.score / max(1, len(b.tokens)) ** self.length_penalty, b.tokens, None))
        return max(hyps, key=lambda h: h[0])

    def _add(self, hyp: Hyp) -> None:
        """Keep the nb best hypotheses."""
        self.finished.append(hyp)
        if len(self.finished) > self.nb:
            self.finished.remove(min(self.finished, key=lambda h: h[0]))
