"""What a client of the batching engine hands in and gets back (generate/engine.py runs them).

    Request ──submit──► Engine ──► Handle: TokenEvent, TokenEvent, ..., Finished
                                   (iterate it on a thread, ``async for`` it on an event loop, cancel() it)
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

from ..errors import OverspillError


class EngineBusy(OverspillError):
    """The waiting queue is full (a server answers 429 with Retry-After)."""


class EngineClosed(OverspillError):
    """The engine is shutting down or closed (a server answers 503)."""


class RequestTooLong(OverspillError):
    """prompt + max_tokens does not fit the context or the KV reserve (a server answers 400); the message names both
    numbers."""


@dataclass
class Request:
    """One sequence to continue. ``prompt``: token ids (at least one). Sampling follows OpenAI's parameters:
    temperature 0 is greedy; presence/frequency penalties subtract from the logits of tokens already generated
    (presence once, frequency per occurrence), as OpenAI documents them."""
    prompt: list[int]
    max_tokens: int = 16                    # new tokens; 0 with prompt_logprobs scores the prompt only
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                          # 0: off
    seed: int | None = None                 # None: a random seed
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0         # CTRL's, as generate() takes it (1.0: off)
    stop: list[str] = field(default_factory=list)          # strings that end the text (cut before, not returned)
    stop_token_ids: list[int] = field(default_factory=list)  # ids that end it (EOS); the id is not in the text
    logprobs: int | None = None             # None: none; k >= 0: the chosen token's log-probability and the top k
    prompt_logprobs: bool = False           # the prompt's own log-probabilities (the first None), top `logprobs`
    num_beams: int = 1                      # > 1: beam search (temperature 0), a cache row per beam; the events
                                            # come at the end, the best hypothesis's tokens
    length_penalty: float = 1.0             # beam score = sum log p / generated_len ** length_penalty


@dataclass
class TokenEvent:
    """One generated token: ``text`` is the text it completes (may be "" while a character or a possible stop
    string is withheld); ``logprob`` and ``top`` (list of (id, logprob), best first) when asked for."""
    token: int
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Finished:
    """The end of a request. finish_reason: "stop" (a stop string or stop id), "length" (max_tokens or the
    context), "cancelled", "error" (``error`` says what). ``text``: all the text (stop string cut off).
    ``prompt_logprobs``/``prompt_top``: per prompt token, when asked for (the first entry None)."""
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    text: str
    tokens: list[int]
    error: str | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top: list[list[tuple[int, float]] | None] | None = None
    first_token_s: float | None = None      # from submit to the first token


_END = object()


class Handle:
    """The stream of one request's events. The engine thread puts; one consumer reads, on a thread (iterate) or on
    an asyncio loop (``async for``, bound to the loop that first awaits it). ``cancel()`` is safe from any thread:
    the engine drops the sequence at its next step and frees its slot."""

    def __init__(self, request: Request):
        self.request = request
        self.cancelled = threading.Event()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aq: asyncio.Queue | None = None
        self._lock = threading.Lock()
        self.result: Finished | None = None

    # engine side
    def put(self, ev: TokenEvent | Finished) -> None:
        if isinstance(ev, Finished):
            self.result = ev
        with self._lock:
            loop, aq = self._loop, self._aq
            if loop is None:
                self._q.put(ev)
                return
        try:
            loop.call_soon_threadsafe(aq.put_nowait, ev)
        except RuntimeError:   # the loop is closed: nobody is listening any more
            pass

    # consumer side
    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[TokenEvent | Finished]:
        while True:
            ev = self._q.get()
            yield ev
            if isinstance(ev, Finished):
                return

    def poll(self) -> list[TokenEvent | Finished]:
        """The events there are now, without waiting (a consumer on the engine's own thread)."""
        out = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out

    def wait(self) -> Finished:
        """Consume every event; the Finished one."""
        for ev in self:
            if isinstance(ev, Finished):
                return ev
        raise AssertionError("unreachable")

    async def __aiter__(self) -> AsyncIterator[TokenEvent | Finished]:
        with self._lock:
            if self._loop is None:
                self._loop, self._aq = asyncio.get_running_loop(), asyncio.Queue()
                while True:   # what arrived before the consumer moved to the loop
                    try:
                        self._aq.put_nowait(self._q.get_nowait())
                    except queue.Empty:
                        break
        while True:
            ev = await self._aq.get()
            yield ev
            if isinstance(ev, Finished):
                return
