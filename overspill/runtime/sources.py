"""Where a unit's weights come from when the executor asks for them.

The executor calls ``acquire(i)`` right before running unit i and ``release(i)`` right
after. A resident source hands back weights it already holds; a streaming source (disk
or host memory) returns them once its prefetcher has them in a staging buffer, and
recycles the buffer on release. Units never know which kind served them.
"""
from __future__ import annotations

import weakref
from typing import Protocol, Sequence

from ..model.weights import Weights
from .background import BackgroundLoad


class WeightSource(Protocol):
    def begin_pass(self, order: Sequence[int] | None = None) -> None:
        """A pass is starting that will acquire the units in ``order`` (default: a forward, every unit once in
        execution order; a training step: the forward, then the blocks again in reverse for the backward).
        Streaming sources read exactly that sequence of their units, and start again at its beginning when it
        is done: the next pass's first units are read while this one's last ones compute."""

    def acquire(self, i: int) -> Weights: ...

    def release(self, i: int) -> None: ...

    def resident_bytes(self) -> int: ...

    def close(self) -> None:
        """Free what the source holds besides weights: reader threads, staging buffers, open files."""


class ResidentSource:
    """All units bound in memory (``loading``: the ones still None are being loaded by a BackgroundLoad, and a
    forward waits for each as it reaches it)."""

    def __init__(self, weights: list[Weights | None], loading: BackgroundLoad | None = None):
        self._weights = weights
        self._loading = loading
        self._finalizer = weakref.finalize(self, loading.cancel) if loading is not None else None

    def begin_pass(self, order: Sequence[int] | None = None) -> None:
        pass

    @property
    def weights(self) -> list[Weights | None]:
        """Every unit's weights (waits for a background load)."""
        self.wait_loaded()
        return self._weights

    def acquire(self, i: int) -> Weights:
        w = self._weights[i]
        if w is None and self._loading is not None:
            w = self._weights[i] = self._loading.get(i)
        return w

    def wait_loaded(self) -> None:
        if self._loading is not None:
            self._loading.wait()
            for i, w in self._loading.into.items():
                self._weights[i] = w

    def release(self, i: int) -> None:
        pass

    def resident_bytes(self) -> int:
        from .accounting import weights_nbytes
        self.wait_loaded()
        return sum(weights_nbytes(w) for w in self.weights if w is not None)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
