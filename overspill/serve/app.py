"""The FastAPI application: routes, the API-key and body-size guards, and the model's life cycle.

    GET  /                      the chat page (static/chat.html)
    GET  /health                200 ready; 503 loading, draining or failed
    GET  /metrics               Prometheus text
    GET  /v1/models
    POST /v1/completions        prompt: text, texts, token ids or lists of them; stream, logprobs, echo, n, ...
    POST /v1/chat/completions   messages through the chat template (chat.py)
    POST /tokenize /detokenize  as vLLM has them

With an API key, /v1/*, /tokenize and /detokenize need ``Authorization: Bearer KEY``; the page, /health and
/metrics stay open (a load balancer and a Prometheus scraper need them without the key).
"""
from __future__ import annotations

import asyncio
import json
import secrets
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .backend import Backend, EngineFactory, ServeConfig
from .chat import TemplateRaised
from .completions import prepare_chat, prepare_completion, run
from .errors import APIError, error_body, install
from .metrics import CONTENT_TYPE
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

PROTECTED = ("/v1/", "/tokenize", "/detokenize")


def create_app(cfg: ServeConfig, model=None, engine_factory: EngineFactory | None = None) -> FastAPI:
    """The server for ``cfg``. ``model``: an already loaded Model to serve (not closed on shutdown); else the
    model is loaded on a thread once the server starts. ``engine_factory(model, **limits, observer=...)``: the
    batching engine (default generate.engine.Engine)."""
    backend = Backend(cfg, model, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.start()
        yield
        # uvicorn has let in-flight requests finish (or cancelled them past the drain timeout): what the engine
        # still holds has nobody waiting for it
        await asyncio.to_thread(backend.close, 2.0)

    app = FastAPI(title="overspill", summary="OpenAI-compatible completions from a model bigger than memory",
                  lifespan=lifespan)
    app.state.backend = backend
    install(app)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    if cfg.api_key:
        app.add_middleware(ApiKey, key=cfg.api_key)   # added last: runs first, before any body is read

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files(__package__).joinpath("static/chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        status, body = backend.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(backend.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        backend.require_ready()
        return {"object": "list", "data": [{"id": backend.name, "object": "model", "created": backend.created,
                                            "owned_by": "overspill", "root": backend.model.path,
                                            "max_model_len": backend.max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await run(backend, prepare_completion(backend, body), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await run(backend, prepare_chat(backend, body), request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        body.check()
        backend.require_ready(body.model)
        if body.messages is not None:
            tpl = backend.template
            try:
                text = tpl.render([{"role": m.role, "content": m.text()} for m in body.messages],
                                  body.add_generation_prompt)
            except TemplateRaised as e:
                raise APIError(400, f"messages: {e}", "messages") from None
            tokens = backend.encode(text, add_special_tokens=body.add_special_tokens and not tpl.own)
        else:
            tokens = backend.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": backend.max_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        backend.require_ready(body.model)
        backend.check_ids(body.tokens, "tokens")
        return {"prompt": backend.decode(body.tokens)}

    return app


async def _send_error(send, status: int, message: str, param: str | None = None, code: str | None = None,
                      headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message, param, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class ApiKey:
    """ASGI guard: 401 unless ``Authorization: Bearer KEY`` on the protected paths."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                what = "missing API key" if not auth else "incorrect API key"
                await _send_error(send, 401, f"{what}: send Authorization: Bearer <key>", code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI guard: 413 for a body over ``limit`` bytes, before anything parses it (Content-Length is checked first;
    a chunked body is counted as it arrives). The body is then handed on whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = f"the request body is larger than the server's limit of {self.limit} bytes"
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await _send_error(send, 400, "bad Content-Length header")
            if n > self.limit:
                return await _send_error(send, 413, too_big, code="request_too_large")
        body = bytearray()
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await _send_error(send, 413, too_big, code="request_too_large")
        handed = False

        async def replay():
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
