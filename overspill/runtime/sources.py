"""Where a unit's weights come from when the executor asks for them.

The executor calls ``acquire(i)`` right before running unit i and ``release(i)`` right
after. A resident source hands back weights it already holds; a streaming source (disk
or host memory) returns them once its prefetcher has them in a staging buffer, and
recycles the buffer on release. Units never know which kind served them.
"""
from __future__ import annotations

from typing import Protocol

from ..model.weights import Weights


class WeightSource(Protocol):
    def begin_pass(self) -> None:
        """A forward pass over all units is starting (streaming sources start prefetching unit 0)."""

    def acquire(self, i: int) -> Weights: ...

    def release(self, i: int) -> None: ...

    def resident_bytes(self) -> int: ...

    def close(self) -> None:
        """Free what the source holds besides weights: reader threads, staging buffers, open files."""


class ResidentSource:
    """All units bound in memory already."""

    def __init__(self, weights: list[Weights]):
        self.weights = weights

    def begin_pass(self) -> None:
        pass

    def acquire(self, i: int) -> Weights:
        return self.weights[i]

    def release(self, i: int) -> None:
        pass

    def resident_bytes(self) -> int:
        from .accounting import weights_nbytes
        return sum(weights_nbytes(w) for w in self.weights if w is not None)

    def close(self) -> None:
        pass
