"""Fuzzing overspill serve from its own OpenAPI schema (schemathesis): bodies that fit the schema and bodies that
break it, against a live server. Nothing may answer 5xx, and every refusal is an OpenAI error body. Bounded: a
short context keeps each generation small, examples are derandomized, and the run stops at its time budget."""
from __future__ import annotations

import time

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from _serve_util import live_server  # noqa: E402

BUDGET_S = 20.0
OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
              ("POST", "/detokenize"), ("GET", "/v1/models"), ("GET", "/health")]


def test_fuzz_no_server_errors():
    with live_server(max_seq_len=32, max_batch_size=16) as s:
        schema = schemathesis.openapi.from_url(s.url + "/openapi.json")
        ops = {(op.method.upper(), op.path): op for op in (r.ok() for r in schema.get_all_operations())}
        assert set(OPERATIONS) <= set(ops), sorted(ops)
        cases = st.one_of([ops[k].as_strategy(mode) for k in OPERATIONS
                           for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
        end = time.monotonic() + BUDGET_S
        seen = {"ran": 0, "ok": 0}

        @settings(max_examples=100, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases)
        def check(case):
            if time.monotonic() > end:
                return
            r = case.call(base_url=s.url, timeout=60)
            seen["ran"] += 1
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (case.method, case.path, case.body, r.status_code, r.text[:500])
            if r.status_code >= 400 and case.path != "/health":
                err = r.json()["error"]
                assert isinstance(err["message"], str) and err["message"] and "type" in err, r.text[:500]
            else:
                seen["ok"] += 1

        check()
        assert seen["ran"] >= 30 and seen["ok"] >= 5, seen   # the budget bought a real run, some of it valid
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200   # the engine is alive after it all
        assert s.backend.engine.thread.is_alive() and s.backend.engine.error is None
