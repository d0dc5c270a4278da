"""overspill serve under operation: API keys, a full queue, clients that go away, loading, a graceful SIGTERM,
and many clients at once (each gets what it would get alone, and the engine batched them)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from _serve_util import free_port, live_server, metrics, throttled
from overspill.generate.engine import Engine


def wait_for(cond, timeout: float = 10.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_api_key():
    with live_server(api_key="sekret", max_batch_size=2) as s:
        body = {"prompt": "ROMEO:", "max_tokens": 2}
        err = _error(httpx.post(s.url + "/v1/completions", json=body), 401)
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        _error(httpx.post(s.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        _error(httpx.post(s.url + "/tokenize", json={"prompt": "x"}), 401)
        assert httpx.get(s.url + "/health").status_code == 200      # probes stay open
        assert httpx.get(s.url + "/metrics").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert ok.completions.create(model="shakespeare", **body).usage.completion_tokens >= 1


def test_api_key_from_the_environment(monkeypatch):
    from overspill import cli

    seen = {}
    monkeypatch.setenv("OVERSPILL_API_KEY", "from-env")
    monkeypatch.setattr("overspill.serve.server.serve", lambda cfg, host, port, level: seen.update(cfg=cfg) or 0)
    assert cli.main(["serve", "--port", "1"]) == 0
    assert seen["cfg"].api_key == "from-env" and seen["cfg"].name() == "shakespeare"


def test_full_queue_is_429_with_retry_after():
    gate = threading.Event()   # shut: the engine holds in its first step
    with live_server(engine_factory=throttled(gate=gate), max_batch_size=1, max_queue=1) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        done = []

        def ask(prompt):
            done.append(client.completions.create(model="shakespeare", prompt=prompt, max_tokens=3, temperature=0))
        a = threading.Thread(target=ask, args=("ROMEO:",))
        a.start()
        wait_for(lambda: metrics(s.url)["overspill_num_requests_running"] == 1, what="A running")
        b = threading.Thread(target=ask, args=("JULIET:",))
        b.start()
        wait_for(lambda: metrics(s.url)["overspill_num_requests_waiting"] == 1, what="B waiting")
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "HAMLET:", "max_tokens": 3})
        err = _error(r, 429)
        assert err["type"] == "rate_limit_error" and int(r.headers["Retry-After"]) >= 1
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="shakespeare", prompt="HAMLET:", max_tokens=3)
        gate.set()
        a.join(30)
        b.join(30)
        assert len(done) == 2 and all(d.usage.completion_tokens == 3 for d in done)


def test_keep_alive_comments_while_a_step_runs():
    gate = threading.Event()   # shut: no token comes
    with live_server(engine_factory=throttled(gate=gate), keepalive_s=0.3) as s:
        body = {"prompt": "ROMEO:", "max_tokens": 2, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            waiting = [next(lines) for _ in range(4)]   # two events: comment, blank, comment, blank
            assert waiting == [": keep-alive", "", ": keep-alive", ""]
            gate.set()
            rest = [ln for ln in lines if ln.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_disconnect_cancels_and_frees_the_slot():
    with live_server(engine_factory=throttled(delay=0.02), max_batch_size=2) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        before = metrics(s.url)
        other = []
        t = threading.Thread(target=lambda: other.append(client.completions.create(
            model="shakespeare", prompt="JULIET:", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})))
        body = {"prompt": "ROMEO:", "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            t.start()
            lines = r.iter_lines()
            got = [ln for ln, _ in zip((ln for ln in lines if ln.startswith("data: {")), range(3))]
            assert len(got) == 3
        # the connection is closed with ~390 tokens (8 s at this pace) to go
        cancelled = 'overspill_request_finished_total{finish_reason="cancelled"}'
        wait_for(lambda: metrics(s.url)[cancelled] - before.get(cancelled, 0) == 1, timeout=3, what="the cancel")
        t.join(30)
        assert other[0].usage.completion_tokens == 40 and other[0].choices[0].finish_reason == "length"
        solo = client.completions.create(model="shakespeare", prompt="JULIET:", max_tokens=40, temperature=0,
                                         extra_body={"ignore_eos": True})
        assert other[0].choices[0].text == solo.choices[0].text
        after = metrics(s.url)
        assert after["overspill_num_requests_running"] == 0 and after["overspill_kv_cache_tokens_used"] == 0
        assert after["overspill_generation_tokens_total"] - before["overspill_generation_tokens_total"] < 200
        # a client that gives up on a whole (not streamed) answer is noticed too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, timeout=1.0)
        wait_for(lambda: metrics(s.url)[cancelled] - before.get(cancelled, 0) == 2, timeout=3, what="the 2nd cancel")
        assert metrics(s.url)["overspill_num_requests_running"] == 0


def test_health_is_503_while_loading():
    release = threading.Event()

    def slow_engine(model, **kw):
        release.wait(30)
        return Engine(model, **kw)

    with live_server(engine_factory=slow_engine, wait_ready=False) as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        err = _error(httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}), 503)
        assert "loading" in err["message"]
        release.set()
        wait_for(lambda: httpx.get(s.url + "/health").status_code == 200, what="ready")


def test_a_model_that_fails_to_load_ends_the_server(tmp_path, caplog):
    from overspill import cli

    (tmp_path / "config.json").write_text("{}")
    assert cli.main(["serve", "--model", str(tmp_path), "--port", str(free_port()), "--log-level", "error"]) == 2
    assert any("loading failed" in r.getMessage() and str(tmp_path) in r.getMessage() for r in caplog.records)


def test_sigterm_drains_in_flight_requests_and_exits_0():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "overspill.cli", "serve", "--port", str(port), "--dtype", "float32",
                             "--max-batch-size", "2", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})   # beside this process on 2 cores
    try:
        def up():
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None   # died: fail below with its output
        wait_for(up, timeout=60, what="the server")
        assert proc.poll() is None, proc.stdout.read()
        first, finished, chunks = threading.Event(), {}, []

        def stream():
            body = {"prompt": "ROMEO:", "max_tokens": 300, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            chunks.append(line[6:])
                            first.set()
            except httpx.HTTPError as e:
                finished["error"] = repr(e)
            finished["t"] = time.monotonic()
        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)

        def refused():
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 503
            except httpx.TransportError:
                return True
        wait_for(refused, what="the server to stop admitting")
        stopped_admitting = time.monotonic()
        t.join(60)
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
        assert stopped_admitting < finished["t"]          # it stopped admitting while the stream ran, and yet:
        assert "error" not in finished and chunks[-1] == "[DONE]", (finished, chunks[-2:])
        assert json.loads(chunks[-2])["usage"]["completion_tokens"] == 300
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


NAMES = ["ROMEO", "JULIET", "HAMLET", "OPHELIA", "MACBETH", "BANQUO", "OTHELLO", "IAGO"]


def _jobs():
    """32 requests: prompts of different lengths, half greedy and half sampled with a seed."""
    out = []
    for i in range(32):
        prompt = f"{NAMES[i % 8]}:\n" + "Why, " * (i % 5)
        out.append(dict(prompt=prompt, max_tokens=12 + i % 7, temperature=0.0 if i % 2 == 0 else 0.8, seed=i))
    return out


def test_concurrent_clients_get_their_solo_answers():
    with live_server(max_batch_size=8, max_queue=64) as s:
        aclient = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        jobs = _jobs()

        async def one(job):
            stream = await aclient.completions.create(model="shakespeare", stream=True, **job)
            return "".join([c.choices[0].text async for c in stream if c.choices])

        async def solo_then_together():
            solo = [await one(j) for j in jobs]
            together = await asyncio.gather(*(one(j) for j in jobs))
            return solo, together
        before = metrics(s.url)
        solo, together = asyncio.run(solo_then_together())
        after = metrics(s.url)
        assert together == solo
        steps = lambda m, le: m.get(f"overspill_step_batch_size_bucket[le={le}]", 0)
        alone = steps(after, "1.0") - steps(before, "1.0")
        total = after["overspill_step_batch_size_count"] - before["overspill_step_batch_size_count"]
        assert total - alone > 0, "no engine step ran more than one sequence"
        wide = (steps(after, "8.0") - steps(before, "8.0")) - (steps(after, "4.0") - steps(before, "4.0"))
        assert wide > 0, "no engine step ran more than 4 sequences"
        assert after["overspill_num_requests_running"] == 0
