"""/v1/completions and /v1/chat/completions: a validated body -> engine Requests -> OpenAI JSON or SSE chunks.

Choice ``i`` of a request runs prompt ``i // n`` with seed ``seed + i % n`` (when a seed is given), so choices
come back ordered by ``index``. Usage counts each prompt once and every choice's generated tokens.

Log-probabilities report each token's text as ``decode([id])`` (a piece of a character split across tokens reads
as U+FFFD), and ``text_offset`` counts those texts from the start of the choice's text (the echoed prompt
included). A streamed echo carries the prompt's own log-probabilities only when the prompt is scored alone
(``max_tokens: 0``): the engine reports them when the sequence finishes.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request as HTTPRequest

from ..generate.requests import Finished, Request, TokenEvent
from .backend import Backend
from .chat import TemplateRaised
from .errors import APIError, error_body
from .events import ClientGone, follow
from .protocol import ChatCompletionRequest, CompletionRequest, _Sampling

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
MIN_LOGPROB = -9999.0   # JSON has no -inf: a token the sampler ruled out reports this


@dataclass
class Choice:
    """One sequence's progress: what was streamed, the per-token log-probabilities, how it ended."""
    index: int
    prompt: list[int]
    prompt_text: str = ""
    started: bool = False
    streamed: str = ""
    offset: int = 0                                    # text_offset of the next token (completions)
    entries: list[tuple[int, float | None, list | None]] = field(default_factory=list)
    finished: Finished | None = None


@dataclass
class Job:
    """One HTTP request's sequences and how to answer it."""
    chat: bool
    model: str
    prompts: list[list[int]]
    choices: list[Choice]
    requests: list[Request | None]                    # None: nothing to run (max_tokens 0 without scoring)
    stream: bool
    include_usage: bool
    logprobs: int | None                              # top alternatives per token; None: no logprobs
    echo: bool = False
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def usage(self) -> dict:
        p = sum(map(len, self.prompts))
        c = sum(ch.finished.completion_tokens for ch in self.choices if ch.finished is not None)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _lp(x: float) -> float:
    return x if x > MIN_LOGPROB else MIN_LOGPROB   # also maps NaN, which compares false


# -- building the engine's requests -----------------------------------------------------------------------------
def _requests(backend: Backend, body: _Sampling, prompts: list[list[int]], max_tokens: int, extra_stop: list[str],
              logprobs: int | None, prompt_logprobs: bool) -> list[Request]:
    eos = [] if body.ignore_eos else backend.eos_ids
    out = []
    for p in prompts:
        for j in range(body.n):
            out.append(Request(
                prompt=p, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                top_k=max(0, body.top_k), seed=None if body.seed is None else (body.seed + j) % 2**63,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
                stop=list(body.stop) + [s for s in extra_stop if s not in body.stop],
                stop_token_ids=list(dict.fromkeys(list(body.stop_token_ids) + eos)),
                logprobs=logprobs, prompt_logprobs=prompt_logprobs))
    return out


def _check_length(backend: Backend, prompts: list[list[int]], max_tokens: int | None) -> int:
    """The max_tokens to run (None: the rest of the context); 400 naming both numbers when it does not fit."""
    limit, longest = backend.max_len, max(map(len, prompts))
    if max_tokens is None:
        if longest >= limit:
            raise APIError(400, f"the prompt has {longest} tokens, which leaves no room in this model's context "
                                f"of {limit} tokens", "prompt", "context_length_exceeded")
        return limit - longest
    if longest + max_tokens > limit:
        raise APIError(400, f"this model's context is {limit} tokens, but the prompt has {longest} tokens and "
                            f"max_tokens is {max_tokens} ({longest + max_tokens} in all): shorten the prompt or "
                            f"lower max_tokens", "max_tokens", "context_length_exceeded")
    return max_tokens


def _check_count(backend: Backend, count: int) -> None:
    most = backend.cfg.max_queue + backend.cfg.max_batch_size
    if count > most:
        raise APIError(400, f"this request has {count} sequences (prompts x n) but the server holds at most {most} "
                            f"(--max-queue + --max-batch-size)", "n")


def prepare_completion(backend: Backend, body: CompletionRequest) -> Job:
    body.check()
    backend.require_ready(body.model)
    prompts, texts = [], []
    for p in body.prompts():
        if isinstance(p, str):
            ids = backend.encode(p)
            if not ids:
                raise APIError(400, "prompt: a prompt is empty (give at least one token)", "prompt")
        else:
            backend.check_ids(p, "prompt")
            ids = list(p)
        prompts.append(ids)
        texts.append(p if isinstance(p, str) else (backend.decode(ids) if body.echo else ""))
    _check_count(backend, len(prompts) * body.n)
    max_tokens = _check_length(backend, prompts, body.max_tokens)
    scoring = body.echo and body.logprobs is not None
    reqs: list[Request | None] = _requests(backend, body, prompts, max_tokens, [], body.logprobs, scoring)
    if max_tokens == 0 and not scoring:
        reqs = [None] * len(reqs)
    choices = [Choice(i, prompts[i // body.n], texts[i // body.n]) for i in range(len(reqs))]
    return Job(False, backend.name, prompts, choices, reqs, body.stream, body.include_usage, body.logprobs,
               body.echo)


def prepare_chat(backend: Backend, body: ChatCompletionRequest) -> Job:
    body.check()
    backend.require_ready(body.model)
    tpl = backend.template
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    try:
        text = tpl.render(messages, body.add_generation_prompt)
    except TemplateRaised as e:
        raise APIError(400, f"messages: {e}", "messages") from None
    ids = backend.encode(text, add_special_tokens=not tpl.own)
    if not ids:
        raise APIError(400, "messages: the conversation renders to an empty prompt", "messages")
    _check_count(backend, body.n)
    try:
        max_tokens = _check_length(backend, [ids], body.limit)
    except APIError as e:
        e.param = "messages" if body.limit is None else ("max_completion_tokens" if body.max_completion_tokens
                                                           is not None else "max_tokens")
        raise
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    reqs = _requests(backend, body, [ids], max_tokens, tpl.stop, logprobs, False)
    choices = [Choice(i, ids) for i in range(len(reqs))]
    return Job(True, backend.name, [ids], choices, list(reqs), body.stream, body.include_usage, logprobs)


# -- log-probabilities in OpenAI's two shapes --------------------------------------------------------------------
def completion_logprobs(backend: Backend, entries, offset: int = 0) -> dict:
    """Legacy completions: parallel lists; ``top_logprobs`` maps token text -> logprob (the chosen token always
    among them); the first token of an echoed prompt has no logprob (None). ``text_offset``: where each token's
    text starts in the choice's text."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, lp, top in entries:
        s = backend.token_string(tok)
        out["tokens"].append(s)
        out["token_logprobs"].append(None if lp is None else _lp(lp))
        if lp is None:
            out["top_logprobs"].append(None)
        else:
            d = {backend.token_string(t): _lp(v) for t, v in (top or [])}
            d.setdefault(s, _lp(lp))
            out["top_logprobs"].append(d)
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def _chat_entry(backend: Backend, tok: int, lp: float) -> dict:
    s = backend.token_string(tok)
    return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8"))}


def chat_logprobs(backend: Backend, entries) -> dict:
    """Chat: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``."""
    return {"content": [{**_chat_entry(backend, tok, lp or 0.0),
                         "top_logprobs": [_chat_entry(backend, t, v) for t, v in (top or [])]}
                        for tok, lp, top in entries]}


def _prompt_entries(ch: Choice, f: Finished | None):
    lps = (f.prompt_logprobs if f is not None else None) or [None] * len(ch.prompt)
    tops = (f.prompt_top if f is not None else None) or [None] * len(ch.prompt)
    return [(t, lp, top) for t, lp, top in zip(ch.prompt, lps, tops)]


# -- answering --------------------------------------------------------------------------------------------------
def _ended(ch: Choice) -> Finished:
    """The Finished of a choice that had nothing to run (max_tokens 0, not scoring)."""
    return Finished("length", len(ch.prompt), 0, "", [])


async def run(backend: Backend, job: Job, http: HTTPRequest):
    """Submit the job's sequences (all or none; a refusal raises its APIError) and answer."""
    live = [i for i, r in enumerate(job.requests) if r is not None]
    handles = backend.submit([job.requests[i] for i in live])
    for i, r in enumerate(job.requests):
        if r is None:
            job.choices[i].finished = _ended(job.choices[i])
    if job.stream:
        return StreamingResponse(_sse(backend, job, live, handles, http), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        async for item in follow(handles, http):
            if item is not None:
                k, ev = item
                _take(job.choices[live[k]], ev)
    except ClientGone:
        return JSONResponse(error_body(400, "client disconnected"), status_code=499)
    for ch in job.choices:
        f = ch.finished
        if f.finish_reason == "error":
            raise APIError(500, f"generation failed: {f.error}", code="engine_error")
        if f.finish_reason == "cancelled":
            raise APIError(503, "the request was cancelled: the server is shutting down", code="unavailable")
    return JSONResponse(_chat_body(backend, job) if job.chat else _completion_body(backend, job))


def _take(ch: Choice, ev: TokenEvent | Finished) -> None:
    if isinstance(ev, Finished):
        ch.finished = ev
    elif ev.token >= 0:   # a text-only event (withheld text let out at the end) has no token
        ch.entries.append((ev.token, ev.logprob, ev.top))


def _completion_body(backend: Backend, job: Job) -> dict:
    choices = []
    for ch in job.choices:
        f = ch.finished
        text = (ch.prompt_text if job.echo else "") + f.text
        lp = None
        if job.logprobs is not None:
            entries = (_prompt_entries(ch, f) if job.echo else []) + ch.entries
            lp = completion_logprobs(backend, entries)
        choices.append({"index": ch.index, "text": text, "logprobs": lp, "finish_reason": f.finish_reason})
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": job.usage()}


def _chat_body(backend: Backend, job: Job) -> dict:
    choices = [{"index": ch.index, "message": {"role": "assistant", "content": ch.finished.text},
                "logprobs": chat_logprobs(backend, ch.entries) if job.logprobs is not None else None,
                "finish_reason": ch.finished.finish_reason} for ch in job.choices]
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": job.usage()}


def _data(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


def _chunk(job: Job, choice: dict) -> dict:
    d = {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
         "created": job.created, "model": job.model, "choices": [choice]}
    if job.include_usage:
        d["usage"] = None
    return d


def _completion_chunks(backend: Backend, job: Job, ch: Choice, ev: TokenEvent | Finished) -> list[dict]:
    out = []
    if not ch.started:
        ch.started = True
        if job.echo:   # the prompt's own logprobs exist only once it finished (max_tokens 0, as scoring asks)
            f = ev if isinstance(ev, Finished) else None
            lp = completion_logprobs(backend, _prompt_entries(ch, f)) if job.logprobs is not None else None
            ch.offset = len(ch.prompt_text)
            out.append({"index": ch.index, "text": ch.prompt_text, "logprobs": lp, "finish_reason": None})
    if isinstance(ev, TokenEvent):
        lp = None
        if job.logprobs is not None and ev.token >= 0:
            lp = completion_logprobs(backend, [(ev.token, ev.logprob, ev.top)], ch.offset)
            ch.offset += len(lp["tokens"][0])
        if ev.text or lp is not None:
            ch.streamed += ev.text
            out.append({"index": ch.index, "text": ev.text, "logprobs": lp, "finish_reason": None})
    else:
        tail = ev.text[len(ch.streamed):] if ev.text.startswith(ch.streamed) else ""
        out.append({"index": ch.index, "text": tail, "logprobs": None, "finish_reason": ev.finish_reason})
    return out


def _chat_chunks(backend: Backend, job: Job, ch: Choice, ev: TokenEvent | Finished) -> list[dict]:
    out = []
    if not ch.started:
        ch.started = True
        out.append({"index": ch.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None})
    if isinstance(ev, TokenEvent):
        lp = chat_logprobs(backend, [(ev.token, ev.logprob, ev.top)]) \
            if job.logprobs is not None and ev.token >= 0 else None
        if ev.text or lp is not None:
            ch.streamed += ev.text
            out.append({"index": ch.index, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None})
    else:
        tail = ev.text[len(ch.streamed):] if ev.text.startswith(ch.streamed) else ""
        out.append({"index": ch.index, "delta": {"content": tail} if tail else {}, "logprobs": None,
                    "finish_reason": ev.finish_reason})
    return out


async def _sse(backend: Backend, job: Job, live: list[int], handles, http: HTTPRequest) -> AsyncIterator[bytes]:
    """``data: {chunk}`` per token, per choice; a final usage chunk when asked; then ``data: [DONE]``. An SSE comment
    keeps the connection alive while a step runs; a client that goes away cancels its sequences."""
    chunks: Callable = _chat_chunks if job.chat else _completion_chunks

    def emit(ch: Choice, ev) -> list[bytes]:
        if isinstance(ev, Finished):
            ch.finished = ev
            if ev.finish_reason in ("error", "cancelled"):
                msg = f"generation failed: {ev.error}" if ev.finish_reason == "error" else \
                    "the request was cancelled: the server is shutting down"
                return [_data(error_body(500 if ev.finish_reason == "error" else 503, msg))]
        return [_data(_chunk(job, c)) for c in chunks(backend, job, ch, ev)]

    try:
        for ch in job.choices:
            if ch.finished is not None:   # nothing to run
                for b in emit(ch, ch.finished):
                    yield b
        async for item in follow(handles, http, backend.cfg.keepalive_s):
            if item is None:
                yield KEEPALIVE
                continue
            k, ev = item
            for b in emit(job.choices[live[k]], ev):
                yield b
    except ClientGone:
        return
    if job.include_usage:
        yield _data({"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
                     "created": job.created, "model": job.model, "choices": [], "usage": job.usage()})
    yield DONE
