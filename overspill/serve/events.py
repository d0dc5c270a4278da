"""The engine's events for one HTTP request, on the event loop: several handles merged into one stream, with
keep-alive ticks while nothing comes and cancellation when the client goes away.

    handle 0 ──pump──┐
    handle 1 ──pump──┼──► asyncio.Queue ──► follow(): (choice, TokenEvent | Finished) ... or None (keep-alive)
    handle k ──pump──┘                         │ client gone or consumer closed: cancel every unfinished handle
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from starlette.requests import Request as HTTPRequest

from ..generate.requests import Finished, Handle, TokenEvent

POLL_S = 0.5        # how often a waiting request checks that its client is still there
KEEPALIVE_S = 3.0   # an SSE comment after this long without a token (a streamed model's step takes seconds)


_pumps: set[asyncio.Task] = set()


class ClientGone(Exception):
    """The client disconnected; its requests were cancelled."""


async def follow(handles: list[Handle], http: HTTPRequest | None, keepalive: float = KEEPALIVE_S
                 ) -> AsyncIterator[tuple[int, TokenEvent | Finished] | None]:
    """Yield ``(index into handles, event)`` as events arrive, each handle's ending with its Finished; ``None`` when
    ``keepalive`` seconds passed without one. Raises ClientGone when ``http``'s client disconnected. However it
    ends (done, disconnect, the consumer closing the generator), unfinished handles are cancelled."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: Handle) -> None:
        async for ev in h:
            q.put_nowait((i, ev))

    for i, h in enumerate(handles):
        task = asyncio.create_task(pump(i, h))
        _pumps.add(task)   # a cancelled handle's pump ends with its Finished, after follow() is gone
        task.add_done_callback(_pumps.discard)
    open_ = len(handles)
    now = time.monotonic()
    last_event = last_check = now
    try:
        while open_:
            try:
                item = await asyncio.wait_for(q.get(), timeout=POLL_S)
            except asyncio.TimeoutError:
                item = None
            now = time.monotonic()
            if http is not None and now - last_check >= POLL_S:
                last_check = now
                if await http.is_disconnected():
                    raise ClientGone()
            if item is None:
                if now - last_event >= keepalive:
                    last_event = now
                    yield None
                continue
            last_event = now
            if isinstance(item[1], Finished):
                open_ -= 1
            yield item
    finally:
        for h in handles:
            if h.result is None:
                h.cancel()
