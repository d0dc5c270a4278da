"""Byte counts of bound weights (what a unit occupies where it lives)."""
from __future__ import annotations

import dataclasses

import torch

from ..model.weights import Weights


def _nb(x) -> int:
    if x is None:
        return 0
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, tuple):
        return sum(_nb(t) for t in x)
    return x.nbytes  # a Linear


def weights_nbytes(w: Weights) -> int:
    return sum(_nb(getattr(w, f.name)) for f in dataclasses.fields(w))
