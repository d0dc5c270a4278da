"""Perplexity with a sliding window (the Hugging Face "perplexity of fixed-length models" method).

Windows of ``context`` tokens advance by ``stride``; each window scores only the tokens
not scored by the previous one, so every token after the first is predicted exactly once,
with up to ``context - stride`` tokens of left context.
"""
from __future__ import annotations

import math
import time

import torch

from .errors import OverspillError


def perplexity(model, ids: list[int], context: int = 1024, stride: int = 512, progress: bool = False) -> dict:
    if len(ids) < 2:
        raise OverspillError("perplexity needs a text of at least 2 tokens")
    if not 0 < stride <= context:
        raise OverspillError(f"stride must be in (0, context]; got stride {stride}, context {context}")
    context = min(context, model.config.max_positions)
    stride = min(stride, context)
    data = torch.tensor(ids, dtype=torch.long)
    nll, count, prev_end = 0.0, 0, 0
    t0 = time.perf_counter()
    starts = list(range(0, len(ids) - 1, stride))
    it = starts
    if progress:
        from tqdm import tqdm
        it = tqdm(starts, unit="window", leave=False)
    for begin in it:
        end = min(begin + context, len(ids))
        window = data[begin:end][None]                              # (1, T)
        lp = model.logprobs(window)[0]                               # lp[j] = log p(window[j+1]); no [T, V] logits
        first = max(prev_end - begin - 1, 0)                         # lp[j] scores ids[begin+j+1]: skip scored ones
        nll -= lp[first:].double().sum().item()
        count += lp.numel() - first
        prev_end = end
        if end == len(ids):
            break
    dt = time.perf_counter() - t0
    return {"tokens": count, "nll": nll / count, "perplexity": math.exp(nll / count), "seconds": dt,
            "tokens_per_s": count / dt, "context": context, "stride": stride}
