"""Beam search (deterministic), batched over prompts, with the KV cache reordered per step.

Scores are summed log-probabilities; a finished hypothesis (EOS or stop string) is ranked by
sum_logprobs / generated_len ** length_penalty. Like Hugging Face's default
(early_stopping=False), a prompt is done when it has num_beams finished hypotheses and
no running beam can still beat the worst of them.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..runtime.executor import Executor
from .config import GenerationConfig
from .loop import StopChecker, check_prompts, prefill
from .sampling import Sampler


Hyp = tuple[float, list[int], int | None]   # (ranking score, new ids, text cut when a stop string ended it)


def beam_search(ex: Executor, prompts: list[list[int]], gc: GenerationConfig, stats: dict | None = None,
                decode: Callable[[list[int]], str] | None = None) -> tuple[list[list[int]], list[int | None]]:
    """Returns, per prompt, the best hypothesis's new ids and, when a stop string ended it, the
    length of its text before the stop string (like generate_ids). A hypothesis whose text
    reaches a stop string finishes there, as one ending in EOS does."""
    cfg, nb = ex.cfg, gc.num_beams
    stats = {} if stats is None else stats
    check_prompts(prompts, cfg.vocab_size, max(map(len, prompts)) + gc.max_new_tokens, cfg.max_positions,
                  cfg.learned_positions)
    gc.check_batch(len(prompts))
    B, V = len(prompts), cfg.vocab_size
    eos = set() if gc.ignore_eos else set(gc.eos_token_ids)
    expanded = [p for p in prompts for _ in range(nb)]                       # (B*nb) sequences
    sampler = Sampler(gc, B * nb, V, expanded)                               # repetition penalty only
    checkers = [StopChecker(gc, decode) for _ in expanded] if gc.stop else None   # text state per beam
    t0 = time.perf_counter()
    logits, cache, pos = prefill(ex, expanded, gc.max_new_tokens)
    scores = torch.full((B, nb), float("-inf"))
    scores[:, 0] = 0.0                                                       # identical beams: expand only one
    seqs = [[] for _ in range(B * nb)]
    finished: list[list[Hyp]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(gc.max_new_tokens):
        logp = sampler.process(logits).log_softmax(-1).view(B, nb, V)         # (B, nb, V)
        cand = (scores[:, :, None] + logp).view(B, nb * V)
        top, idx = cand.topk(2 * nb, dim=-1)                                 # (B, 2nb)
        new_scores = torch.full((B, nb), float("-inf"))
        src = torch.arange(B * nb).view(B, nb).clone()
        toks = torch.zeros(B, nb, dtype=torch.long)
        new_checkers = list(checkers) if checkers is not None else None
        gen_len = step + 1
        for b in range(B):
            if done[b]:
                new_scores[b] = scores[b]
                continue
            k = 0
            for rank, (s, j) in enumerate(zip(top[b].tolist(), idx[b].tolist())):
                beam, tok = divmod(j, V)
                cut, checker = None, None
                if checkers is not None and tok not in eos:
                    checker = checkers[b * nb + beam].copy()
                    cut = checker.check(tok)[1]
                if tok in eos or cut is not None:
                    if rank < nb:
                        _add(finished[b], nb, (s / gen_len ** gc.length_penalty, seqs[b * nb + beam] + [tok], cut))
                    continue
                new_scores[b, k], src[b, k], toks[b, k] = s, b * nb + beam, tok
                if new_checkers is not None:
                    new_checkers[b * nb + k] = checker
                k += 1
                if k == nb:
                    break
            best_running = new_scores[b].max().item()
            if len(finished[b]) == nb and min(f[0] for f in finished[b]) >= best_running / gen_len ** gc.length_penalty:
                done[b] = True
        if step == 0:
            stats["prefill_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
        flat_src = src.view(-1)
        seqs = [seqs[s] + [t] for s, t in zip(flat_src.tolist(), toks.view(-1).tolist())]
        scores, checkers = new_scores, new_checkers
        if all(done) or step == gc.max_new_tokens - 1:
            break
        cache.reorder(flat_src)
        if sampler.seen is not None:
            sampler.seen = sampler.seen.index_select(0, flat_src)
            sampler.seen[torch.arange(B * nb), toks.view(-1)] = True
        logits = ex.forward(toks.view(-1, 1), pos, cache, last_only=True)[:, -1]
        pos = pos + 1
    stats.update(batch=B, prompt_tokens=sum(map(len, prompts)), new_tokens=step + 1,
                 decode_s=time.perf_counter() - t1)
    results = [_best(finished[b], done[b], scores[b], seqs[b * nb:(b + 1) * nb], gc) for b in range(B)]
    stats["generated_tokens"] = sum(len(r[1]) for r in results)
    return [r[1] for r in results], [r[2] for r in results]


def _best(finished: list[Hyp], done: bool, scores: torch.Tensor, seqs: list[list[int]], gc: GenerationConfig) -> Hyp:
    """The best of a prompt's finished hypotheses and, unless it is done, its running beams."""
    hyps = list(finished)
    if not done:
        for k, s in enumerate(scores.tolist()):
            if s > float("-inf"):
                _add(hyps, gc.num_beams, (s / len(seqs[k]) ** gc.length_penalty, seqs[k], None))
    return max(hyps, key=lambda h: h[0])


def _add(hyps: list[Hyp], nb: int, hyp: Hyp) -> None:
    """Keep the nb best hypotheses."""
    hyps.append(hyp)
    if len(hyps) > nb:
        hyps.remove(min(hyps, key=lambda h: h[0]))
