"""overspill serve through the official openai client (and raw HTTP where the client hides the body): the same
answers as the Python API, OpenAI's shapes, exact usage, every error as an OpenAI error body."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

import overspill
from _serve_util import live_server, metrics

PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def server():
    with live_server(max_batch_size=4) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref():
    """The same model, loaded apart from the server's: the reference answers."""
    m = overspill.load(dtype="float32")
    yield m
    m.close()


def http(server, path: str, body=None, **kw) -> httpx.Response:
    if body is None:
        return httpx.get(server.url + path, timeout=60, **kw)
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60,
                      **kw)


def test_health_and_models(server, client):
    r = http(server, "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == ["shakespeare"]
    assert models[0].max_model_len == 512


def test_greedy_completion_matches_generate(client, ref):
    want = ref.generate([PROMPT], max_new_tokens=12, temperature=0)[0]
    r = client.completions.create(model="shakespeare", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == "shakespeare"
    assert r.choices[0].text == want
    ids = ref.encode(PROMPT)
    new = ref.generate([ids], max_new_tokens=12, temperature=0)[0]
    assert r.choices[0].finish_reason == ("stop" if len(new) < 12 else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), len(new),
                                                                                      len(ids) + len(new))
    by_ids = client.completions.create(model="shakespeare", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == want


def test_streamed_completion_equals_whole(client):
    whole = client.completions.create(model="shakespeare", prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="shakespeare", prompt=PROMPT, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len(chunks) > 3   # streamed token by token, not in one piece


def test_sse_wire_format(server):
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4,
                                                                     "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_chat_whole_and_streamed(server, client, ref):
    msgs = [{"role": "system", "content": "A room in the castle."},
            {"role": "user", "content": "Good morrow, sir. How fare you?"}]
    r = client.chat.completions.create(model="shakespeare", messages=msgs, temperature=0)
    reply = r.choices[0].message
    assert r.object == "chat.completion" and reply.role == "assistant" and reply.content
    assert "\n\n" not in reply.content and r.choices[0].finish_reason == "stop"   # one speech: the scene's stop
    # the prompt is the rendered scene (documented in serve/chat.py), token for token
    scene = "A room in the castle.\n\nUSER:\nGood morrow, sir. How fare you?\n\nASSISTANT:\n"
    assert r.usage.prompt_tokens == len(ref.encode(scene))
    tok = http(server, "/tokenize", {"messages": msgs}).json()
    assert tok["tokens"] == ref.encode(scene)
    assert reply.content == ref.generate([scene], max_new_tokens=64, temperature=0, stop=["\n\n"])[0]
    chunks = list(client.chat.completions.create(model="shakespeare", messages=msgs, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_chat_n_streamed_equals_whole(client):
    kw = dict(model="shakespeare", messages=[{"role": "user", "content": "Who goes there?"}], n=2, seed=3,
              temperature=0.9, max_tokens=12)
    whole = client.chat.completions.create(**kw)
    texts = {0: "", 1: ""}
    for c in client.chat.completions.create(stream=True, **kw):
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(server, client):
    long = [{"role": "user", "content": "O " * 490}]
    n = http(server, "/tokenize", {"messages": long}).json()["count"]
    assert 400 < n < 510
    r = client.chat.completions.create(model="shakespeare", messages=long, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == n and r.usage.completion_tokens <= 512 - n
    assert r.choices[0].finish_reason == "length" or "\n\n" not in r.choices[0].message.content
    err = _err(http(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "O " * 600}]}), 400,
               "messages")
    assert "512" in err["message"]


def test_n_seeds_and_multiple_prompts(client):
    r = client.completions.create(model="shakespeare", prompt=["ROMEO:", "JULIET:"], n=2, max_tokens=8,
                                  temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]

    def one(prompt, seed):
        return client.completions.create(model="shakespeare", prompt=prompt, max_tokens=8, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text
    # choice i runs prompt i // n with seed + i % n
    assert [c.text for c in r.choices] == [one("ROMEO:", 7), one("ROMEO:", 8), one("JULIET:", 7), one("JULIET:", 8)]
    assert one("ROMEO:", 7) == one("ROMEO:", 7)
    assert len({one("ROMEO:", s) for s in range(4)}) > 1   # sampling does sample
    assert r.usage.prompt_tokens == 2 * 2                  # each prompt counted once ("ROMEO" ":" tokens)
    assert r.usage.completion_tokens == 4 * 8 and {c.finish_reason for c in r.choices} == {"length"}


def test_penalties_change_the_text(client, ref):
    """Greedy 'ROMEO:' repeats itself; each penalty (as the engine applies it) breaks the loop."""
    plain = client.completions.create(model="shakespeare", prompt=PROMPT, max_tokens=40, temperature=0)
    for kw in ({"presence_penalty": 1.5}, {"frequency_penalty": 1.5}, {"extra_body": {"repetition_penalty": 1.8}}):
        r = client.completions.create(model="shakespeare", prompt=PROMPT, max_tokens=40, temperature=0, **kw)
        assert r.choices[0].text != plain.choices[0].text, kw
    want = ref.generate([PROMPT], max_new_tokens=40, temperature=0, repetition_penalty=1.8)[0]
    r = client.completions.create(model="shakespeare", prompt=PROMPT, max_tokens=40, temperature=0,
                                  extra_body={"repetition_penalty": 1.8})
    assert r.choices[0].text == want


def test_stop_strings(client, ref):
    full = ref.generate([PROMPT], max_new_tokens=16, temperature=0)[0]
    word = full.strip().split()[1]                          # a word in the middle of the greedy text
    r = client.completions.create(model="shakespeare", prompt=PROMPT, max_tokens=16, temperature=0, stop=[word, "@@"])
    assert r.choices[0].text == full[: full.index(word)] and r.choices[0].finish_reason == "stop"
    s = "".join(c.choices[0].text for c in client.completions.create(
        model="shakespeare", prompt=PROMPT, max_tokens=16, temperature=0, stop=word, stream=True))
    assert s == r.choices[0].text


def test_completion_logprobs(client, ref):
    ids = ref.encode(PROMPT)
    new = ref.generate([ids], max_new_tokens=6, temperature=0)[0]
    r = client.completions.create(model="shakespeare", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.tokens == [ref.tokenizer.decode([t]) for t in new]
    want = ref.logprobs(torch.tensor([ids + new]))[0, len(ids) - 1:]
    assert torch.allclose(torch.tensor(lp.token_logprobs), want, atol=2e-3)
    for tok, p, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and max(top.values()) == pytest.approx(p)   # greedy: the chosen is the best
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]


def test_echo_scores_the_prompt(client, ref):
    """What lm-evaluation-harness's local-completions sends for loglikelihood: token ids, max_tokens 0, echo,
    logprobs."""
    prompts = [ref.encode("ROMEO:\nWhat light through yonder window breaks?"), ref.encode("JULIET:\nAy me!")]
    r = client.completions.create(model="shakespeare", prompt=prompts, max_tokens=0, echo=True, logprobs=1,
                                  temperature=0)
    assert len(r.choices) == 2 and r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == sum(map(len, prompts))
    for ids, c in zip(prompts, r.choices):
        assert c.text == ref.decode(ids) and c.finish_reason == "length"
        lp = c.logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
        want = ref.logprobs(torch.tensor([ids]))[0]
        assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=2e-3)
        assert all(t is not None and 1 <= len(t) <= 2 for t in lp.top_logprobs[1:])
    # the other form lm-evaluation-harness sends: max_tokens 1, then it drops the last (generated) entry
    one = client.completions.create(model="shakespeare", prompt=prompts, max_tokens=1, echo=True, logprobs=1,
                                    temperature=0)
    for ids, c, scored in zip(prompts, one.choices, r.choices):
        lp = c.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[:-1] == scored.logprobs.token_logprobs
        greedy = [tok == max(top.values()) for tok, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:])]
        assert greedy[-1]    # the generated token (temperature 0) is the top one, compared as the harness does
    # echo without logprobs: the prompt's text before the new text
    e = client.completions.create(model="shakespeare", prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    plain = client.completions.create(model="shakespeare", prompt=PROMPT, max_tokens=5, temperature=0)
    assert e.choices[0].text == PROMPT + plain.choices[0].text


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="shakespeare", messages=[{"role": "user", "content": "Hark!"}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens or r.choices[0].finish_reason == "stop"
    for e in content:
        assert e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 2
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)   # greedy


def _err(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "any":
        assert err["param"] == param
    return err


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [5000]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({}, "prompt"),
])
def test_bad_completion_fields(server, body, param):
    err = _err(http(server, "/v1/completions", body), 400, param)
    assert err["type"] == "invalid_request_error" and param in err["message"]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
])
def test_bad_chat_fields(server, body, param):
    _err(http(server, "/v1/chat/completions", body), 400, param)


def test_malformed_and_non_object_bodies(server):
    _err(http(server, "/v1/completions", b"{\"prompt\": "), 400, None)
    _err(http(server, "/v1/completions", b"[1, 2]"), 400, None)
    _err(http(server, "/v1/chat/completions", b"\xff\xfe"), 400, None)
    no_type = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x"}', timeout=30)
    assert "Content-Type: application/json" in _err(no_type, 400, None)["message"]


def test_too_long_names_both_numbers(server, client):
    err = _err(http(server, "/v1/completions", {"prompt": "To be, or not to be", "max_tokens": 600}), 400,
               "max_tokens")
    assert "512" in err["message"] and "600" in err["message"] and err["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="shakespeare", prompt=[1] * 600, max_tokens=1)


def test_unknown_model_and_route(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    _err(http(server, "/v1/nothing-here"), 404)


def test_oversized_body_is_413_before_parsing(server):
    r = http(server, "/v1/completions", b"{" + b" " * (5 << 20))   # not even JSON: refused on its size alone
    _err(r, 413)


def test_tokenize_round_trip(server, ref):
    text = "To be, or not to be: that is the question."
    t = http(server, "/tokenize", {"prompt": text}).json()
    assert t == {"tokens": ref.encode(text), "count": len(ref.encode(text)), "max_model_len": 512}
    assert http(server, "/detokenize", {"tokens": t["tokens"]}).json() == {"prompt": text}
    _err(http(server, "/detokenize", {"tokens": [99999]}), 400, "tokens")


def test_metrics_count_what_was_served(server, client):
    before = metrics(server.url)
    r = client.completions.create(model="shakespeare", prompt=["ROMEO:", "JULIET:"], max_tokens=7, temperature=0)
    after = metrics(server.url)
    d = lambda k: after.get(k, 0) - before.get(k, 0)
    assert d("overspill_prompt_tokens_total") == r.usage.prompt_tokens
    assert d("overspill_generation_tokens_total") == r.usage.completion_tokens
    reasons = [c.finish_reason for c in r.choices]
    for reason in ("stop", "length"):
        assert d(f'overspill_request_finished_total{{finish_reason="{reason}"}}') == reasons.count(reason)
    assert d("overspill_time_to_first_token_seconds_count") == 2
    assert d("overspill_step_seconds_count") >= 7 and d("overspill_step_batch_size_count") >= 7
    assert after["overspill_num_requests_running"] == 0 and after["overspill_num_requests_waiting"] == 0
    assert 0 <= after["overspill_kv_cache_usage_ratio"] <= 1 and after["overspill_kv_cache_tokens_total"] > 0
