"""OpenAI-shaped error bodies, ``{"error": {"message", "type", "param", "code"}}``, for every failure.

    bad JSON, bad field ........ 400 invalid_request_error (param: the field)
    prompt + max_tokens too long 400 (the message names both numbers)
    missing / wrong API key .... 401 authentication_error
    unknown model .............. 404 model_not_found
    body over the limit ........ 413
    queue full ................. 429 (Retry-After)
    loading / draining ......... 503
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import OverspillError
from ..generate.requests import EngineBusy, EngineClosed

log = logging.getLogger("overspill.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable", 500: "internal_error"}
RETRY_AFTER_S = 1

# What a union-typed field accepts, said once (pydantic reports one error per union member).
FIELD_SHAPES = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "stop must be a string or a list of at most 4 strings",
    "content": "content must be a string or a list of text parts",
}


class APIError(Exception):
    """An error answered with status ``status`` and an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def from_engine(e: OverspillError) -> APIError:
    """What the engine's refusals become: queue full 429, closed 503, anything else (too long, bad ids) 400."""
    if isinstance(e, EngineBusy):
        return APIError(429, f"the server is busy ({e}); retry shortly", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, EngineClosed):
        return APIError(503, f"the server is shutting down ({e})", code="unavailable")
    return APIError(400, str(e), code="invalid_request")


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors -> (one message naming the field, the field's path)."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") in ("json_invalid", "json_type"):
        return f"malformed JSON body: {e.get('ctx', {}).get('error') or e.get('msg', 'cannot parse')}", None
    if not loc:
        return f"the body must be a JSON object ({e.get('msg', 'invalid')})", None
    # drop pydantic's union-branch labels ("str", "list[int]", "function-after[...]") from the path
    path = [p for p in loc if not (("[" in p and "]" in p) or p in ("str", "int", "float", "bool", "list"))]
    param = ".".join(path)
    field = next((p for p in reversed(path) if p in FIELD_SHAPES), None)
    if field is not None and e.get("type") not in ("value_error", "missing"):
        return f"{param}: {FIELD_SHAPES[field]}", param
    msg = e.get("msg", "invalid value")
    msg = msg[len("Value error, "):] if msg.startswith("Value error, ") else msg
    return f"{param}: {msg}", param


def install(app: FastAPI) -> None:
    """Route every error through the OpenAI body shape (FastAPI's own 422s become 400s naming the field)."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        if "json" not in request.headers.get("content-type", ""):   # FastAPI parses JSON bodies only when told
            return error_response(400, "send the body as JSON with the header Content-Type: application/json")
        msg, param = validation_message(list(exc.errors()))
        return error_response(400, msg, param)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(OverspillError)
    async def _overspill(request: Request, exc: OverspillError):
        e = from_engine(exc)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unexpected error serving %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
