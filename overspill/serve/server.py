"""Running the app under uvicorn, with a graceful stop.

SIGTERM or Ctrl-C: /health and new requests answer 503 at once, the listening socket closes, in-flight requests
get ``drain_timeout`` seconds to finish (then they are cancelled), the engine shuts down, and the process exits
with 0. A second Ctrl-C stops at once.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading

import uvicorn

from .app import create_app
from .backend import ServeConfig


class Server(uvicorn.Server):
    """uvicorn's server, telling the backend to drain on the first signal and exiting normally afterwards (uvicorn
    itself re-raises the signal once it is done, which ends the process with it)."""

    def __init__(self, config: uvicorn.Config, backend):
        super().__init__(config)
        self.backend = backend

    def handle_exit(self, sig, frame) -> None:
        self.backend.drain()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Serve until a signal; 0 after a clean drain, 2 if the model failed to load."""
    app = create_app(cfg)
    backend = app.state.backend
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=cfg.drain_timeout,
                            timeout_keep_alive=5)
    server = Server(config, backend)

    def failed() -> None:
        server.should_exit = True
    backend.on_failure = failed
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    server.run()
    return 2 if backend.state == "failed" else 0
