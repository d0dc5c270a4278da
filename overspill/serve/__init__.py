"""``overspill serve``: an OpenAI-compatible HTTP server over the batching engine (FastAPI + uvicorn).

    protocol.py   request bodies (pydantic): every bad field is a 400 naming it
    errors.py     OpenAI-shaped error bodies and the status of each failure
    chat.py       chat templates (the checkpoint's, the built-in model's, a plain default), sandboxed jinja2
    backend.py    the model and engine, loaded on a thread; readiness; submitting
    events.py     a request's engine events on the event loop: merged, keep-alives, cancel on disconnect
    completions.py  /v1/completions and /v1/chat/completions: JSON and SSE
    metrics.py    Prometheus metrics fed by the engine's observer
    app.py        routes and guards (API key, body size); server.py runs it under uvicorn
    static/chat.html  the chat page at /
"""
from .backend import ServeConfig
from .app import create_app

__all__ = ["ServeConfig", "create_app"]
