"""Live servers for the serve tests: the real app under uvicorn on a free loopback port, in a thread, serving a
built-in model, loaded by the server, through the batching engine. The engine can be paused (a gate) or slowed (a delay
per step) through its observer, which the engine calls between steps on its own thread."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import uvicorn

from overspill.generate.engine import Engine
from overspill.serve import ServeConfig, create_app


class Throttle:
    """An observer in front of the server's: each engine step waits for ``gate`` (when given) and sleeps ``delay``."""

    def __init__(self, inner, delay: float = 0.0, gate: threading.Event | None = None):
        self.inner, self.delay, self.gate = inner, delay, gate

    def on_step(self, *a) -> None:
        if self.gate is not None:
            self.gate.wait()
        if self.delay:
            time.sleep(self.delay)
        self.inner.on_step(*a)

    def on_first_token(self, seconds: float) -> None:
        self.inner.on_first_token(seconds)

    def on_finish(self, finished) -> None:
        self.inner.on_finish(finished)


def throttled(delay: float = 0.0, gate: threading.Event | None = None):
    return lambda model, observer=None, **kw: Engine(model, observer=Throttle(observer, delay, gate), **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, cfg: ServeConfig, engine_factory=None):
        self.app = create_app(cfg, engine_factory=engine_factory)
        self.backend = self.app.state.backend
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, wait_ready: bool = True) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200 or not wait_ready:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server at {self.url} not ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def live_server(engine_factory=None, wait_ready: bool = True, **cfg):
    """A server over the built-in model, in float32 unless told (a sequence's logits are then exact in any batch)."""
    cfg.setdefault("dtype", "float32")
    s = LiveServer(ServeConfig(**cfg), engine_factory).start(wait_ready)
    try:
        yield s
    finally:
        s.stop()


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics as {name{labels}: value}, parsed with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "le") if s.labels else ""
            le = s.labels.get("le") if s.labels else None
            key = s.name + (f"{{{labels}}}" if labels else "") + (f"[le={le}]" if le is not None else "")
            out[key] = s.value
    return out
