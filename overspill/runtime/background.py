"""Resident units loaded on a thread of their own while the first forward runs.

    load thread:   read+build embed ─ b0 ─ b1 ─ ... ─ bk ─ head ──► then(): start streaming the rest
    compute:                 embed   b0   b1   ...   bk   (waits for each unit it reaches)

A cold ``load`` returns once the plan is made and the files are open; the first forward then computes each resident
unit as soon as it is read, so its compute overlaps the reads of the units after it, and the first token costs
about one read of the checkpoint instead of a read of the resident part followed by a streamed pass. The units are
loaded in execution order (the order the forward needs them); an error while loading one is raised by the
forward that reaches it, and by every forward after.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable

from ..errors import OverspillError
from ..model.weights import Weights


class BackgroundLoad:
    """``load(i)`` for each i of ``order`` on a thread; each result lands in ``into[i]`` (the source's dict of held
    units). ``then()`` runs on that thread once every unit is in (a streaming source starts its reader there, so the
    staging ring's reads follow the resident ones instead of competing with them)."""

    def __init__(self, order: Iterable[int], load: Callable[[int], Weights], into: dict[int, Weights],
                 then: Callable[[], None] | None = None, cleanup: Callable[[], None] | None = None):
        self.order, self._load, self.into, self._then, self._cleanup = list(order), load, into, then, cleanup
        self.units = frozenset(self.order)
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._finished = False
        self._cancelled = False
        self.thread = threading.Thread(target=self._run, name="overspill-load-bg", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for i in self.order:
                if self._cancelled:
                    return
                w = self._load(i)
                with self._cv:
                    self.into[i] = w
                    self._cv.notify_all()
        except BaseException as e:   # handed to the forward that needs the unit
            with self._cv:
                self._error = e
        finally:
            try:
                if self._cleanup is not None:
                    self._cleanup()
                if self._then is not None and not self._cancelled:
                    self._then()
            finally:
                with self._cv:
                    self._finished = True
                    self._cv.notify_all()

    @property
    def finished(self) -> bool:
        return self._finished

    def get(self, i: int) -> Weights:
        """Unit i, waiting until it is loaded; the load's error if it failed before reaching i."""
        with self._cv:
            self._cv.wait_for(lambda: i in self.into or self._finished)
            if i in self.into:
                return self.into[i]
            self._raise()
            raise OverspillError(f"unit {i} was not loaded: the model was closed while loading")

    def wait(self) -> None:
        """Until every unit is loaded (the load's error, if any)."""
        with self._cv:
            self._cv.wait_for(lambda: self._finished)
        if threading.current_thread() is not self.thread:
            self.thread.join()
        with self._cv:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error if isinstance(self._error, OverspillError) else \
                OverspillError(f"loading the model failed: {self._error}") from self._error
        if self._cancelled:
            raise OverspillError("this model was closed; load it again")

    def cancel(self) -> None:
        """Stop after the unit being loaded (idempotent). Waits for the thread unless called from one of
        overspill's own threads (a garbage collection can run anywhere), where waiting could deadlock."""
        self._cancelled = True
        if self.thread.is_alive() and threading.current_thread() is not self.thread \
                and not threading.current_thread().name.startswith("overspill-"):
            self.thread.join()
