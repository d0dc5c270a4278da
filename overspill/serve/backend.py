"""The model and its engine behind the HTTP layer: loaded on a thread after the server starts listening.

    loading ──► ready ──► draining ──► closed        (/health: 503, 200, 503, 503)
       └──► failed (the load raised; the server exits)
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import OverspillError
from ..generate.requests import Handle, Request
from .chat import ChatTemplate, load_template
from .errors import APIError
from .metrics import Metrics

log = logging.getLogger("overspill.serve")


@dataclass
class ServeConfig:
    """What ``overspill serve`` takes: the model and its load settings, the engine's limits, the server's."""
    model: str | None = None                  # checkpoint dir or layer store; None: the built-in model
    dtype: str = "auto"
    max_memory: str | None = None
    quantize: str | None = None
    quantize_head: bool = False
    kv_cache: str | None = None
    adapter: str | None = None                # a LoRA adapter directory applied to the model
    max_batch_size: int = 16
    max_seq_len: int | None = None            # None: the engine's default
    max_queue: int = 64
    served_model_name: str | None = None      # None: the model directory's name
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    drain_timeout: float = 30.0               # SIGTERM: in-flight requests get this long to finish
    pp: int | None = None                     # pipeline stages / tensor-parallel ranks under torchrun: rank 0
    tp: int | None = None                     # serves HTTP and its engine drives the others (overspill.load's pp, tp)
    pp_timeout: float | None = None
    keepalive_s: float = 3.0                  # an SSE comment after this long without a token

    def name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        from ..api import default_model_path

        return os.path.basename(os.path.normpath(self.model or default_model_path()))


EngineFactory = Callable[..., object]   # (model, *, max_batch_size, max_seq_len, max_queue, observer) -> engine


def default_engine(model, **kw):
    from ..generate.engine import Engine

    return Engine(model, **kw)


class Backend:
    """Holds the state, the model, the engine, the chat template and the metrics; answers what routes need."""

    def __init__(self, cfg: ServeConfig, model=None, engine_factory: EngineFactory | None = None):
        self.cfg = cfg
        self.name = cfg.name()
        self.state = "loading"
        self.error: str | None = None
        self.model = model
        self.owns_model = model is None
        self.engine = None
        self.template: ChatTemplate | None = None
        self.engine_factory = engine_factory or default_engine
        self.metrics = Metrics(lambda: self.engine.status() if self.engine is not None else None)
        self.created = int(time.time())
        self.on_failure: Callable[[], None] = lambda: None
        self._token_strings: dict[int, str] = {}
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Load on a thread; the server answers /health with 503 meanwhile."""
        self._thread = threading.Thread(target=self._load, name="overspill-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        cfg = self.cfg
        try:
            t0 = time.perf_counter()
            if self.model is None:
                from ..api import load

                self.model = load(cfg.model, dtype=cfg.dtype, max_memory=cfg.max_memory, quantize=cfg.quantize,
                                  quantize_head=cfg.quantize_head, kv_cache=cfg.kv_cache, adapter=cfg.adapter,
                                  max_batch_size=cfg.max_batch_size, max_seq_len=cfg.max_seq_len, pp=cfg.pp,
                                  tp=cfg.tp, pp_timeout=cfg.pp_timeout)
            self.model.wait_loaded()   # every resident weight in (a read error is a failed load, not a failed request)
            from ..api import default_model_path

            builtin = os.path.samefile(self.model.path, default_model_path())
            self.template = load_template(self.model.path, builtin=builtin)
            engine = self.engine_factory(self.model, max_batch_size=cfg.max_batch_size, max_seq_len=cfg.max_seq_len,
                                         max_queue=cfg.max_queue, observer=self.metrics)
            engine.start()
            self.engine = engine
            if self.state == "loading":
                self.state = "ready"
            log.info("%s ready in %.1f s (context %d tokens, chat template: %s)", self.name,
                     time.perf_counter() - t0, engine.max_seq_len, self.template.origin)
        except Exception as e:   # noqa: BLE001 - any failure is reported by /health and ends the server
            self.state = "failed"
            self.error = str(e) if isinstance(e, OverspillError) else f"{type(e).__name__}: {e}"
            log.error("loading failed: %s", self.error)
            self.on_failure()

    def drain(self) -> None:
        """Stop admitting: new requests get 503 from now on."""
        if self.state in ("loading", "ready"):
            self.state = "draining"

    def close(self, timeout: float | None = None) -> None:
        """Finish in-flight requests (up to ``timeout``), cancel the rest, stop the engine; close a model we loaded."""
        self.drain()
        if self._thread is not None:
            self._thread.join(timeout=5)   # a load still running is left to die with the process
        if self.engine is not None:
            self.engine.shutdown(self.cfg.drain_timeout if timeout is None else timeout)
        if self.owns_model and self.model is not None and self.state != "closed":
            self.model.close()
        if self.state != "failed":
            self.state = "closed"

    # -- what routes ask -------------------------------------------------------------------
    def health(self) -> tuple[int, dict]:
        """(status, body) for /health: 200 only when ready with a live engine."""
        error = self.error
        if self.state == "ready" and getattr(self.engine, "error", None) is not None:
            error = f"the engine stopped: {self.engine.error}"
        if self.state == "ready" and error is None:
            return 200, {"status": "ok"}
        body = {"status": "failed" if self.state == "ready" else self.state}
        if error:
            body["error"] = error
        return 503, body

    def require_ready(self, model_name: str | None = None) -> None:
        """503 unless ready; 404 for another model's name."""
        if self.state != "ready":
            what = {"loading": "the model is still loading", "draining": "the server is shutting down",
                    "closed": "the server is shutting down"}.get(self.state, f"the model failed to load: {self.error}")
            raise APIError(503, what, code="unavailable", headers={"Retry-After": "5"})
        if model_name is not None and model_name not in (self.name, self.cfg.model):
            raise APIError(404, f"The model `{model_name}` does not exist; this server serves `{self.name}`",
                           "model", "model_not_found")

    @property
    def max_len(self) -> int:
        return int(self.engine.max_seq_len)

    @property
    def eos_ids(self) -> list[int]:
        m = self.model
        return list(m.generation_defaults.get("eos_token_ids") or m.config.eos_token_ids or [])

    def tokenizer(self):
        if self.model.tokenizer is None:
            raise APIError(400, f"{self.model.path} has no tokenizer.json: send token ids, not text", "prompt")
        return self.model.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer().encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer().decode(list(ids))

    def token_string(self, token: int) -> str:
        """One token's text, as logprobs report it (a piece of a split character decodes to U+FFFD)."""
        s = self._token_strings.get(token)
        if s is None:
            s = self._token_strings[token] = self.tokenizer().decode([token], skip_special_tokens=False)
        return s

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.model.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab})", param)

    def submit(self, reqs: list[Request]) -> list[Handle]:
        """Submit all or none: a refusal cancels what was already queued and raises the matching APIError."""
        handles: list[Handle] = []
        try:
            for r in reqs:
                handles.append(self.engine.submit(r))
        except OverspillError as e:
            for h in handles:
                h.cancel()
            from .errors import from_engine

            raise from_engine(e) from None
        return handles
