"""The continuous-batching engine: every architecture's tokens equal generate()'s, a sequence's float32 logits are
bitwise the same alone and inside any batch (joining mid-run too), cancelled sequences free their row, and bad
requests are refused in one line before they reach the engine thread."""
import threading
import time

import pytest
import torch

import overspill
from conftest import VARIANTS, VOCAB
from overspill.generate.engine import Engine, EngineObserver
from overspill.generate.requests import EngineBusy, EngineClosed, Finished, Request, RequestTooLong, TokenEvent

PROMPTS = [[5, 6, 7], [9, 3, 11, 12, 40, 41, 2], [17], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42]]


def _events(h):
    toks, lps = [], []
    for ev in h:
        if isinstance(ev, TokenEvent) and ev.token >= 0:
            toks.append(ev.token)
            lps.append(ev.logprob)
        elif isinstance(ev, Finished):
            return toks, lps, ev


@pytest.fixture
def engine_for():
    made = []

    def make(model, **kw):
        e = Engine(model, **kw).start()
        made.append(e)
        return e
    yield make
    for e in made:
        e.shutdown(timeout=5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_equals_generate_and_batch_invariant(ref_dir, variant, engine_for):
    path, _ = ref_dir(variant)
    m = overspill.load(path, dtype="float32")
    ref = [m.generate([p], max_new_tokens=8, temperature=0, ignore_eos=True)[0] for p in PROMPTS]
    e = engine_for(m, max_batch_size=4, max_seq_len=64, step_tokens=8)   # prompts span several steps
    solo = []
    for p in PROMPTS:
        solo.append(_events(e.submit(Request(p, max_tokens=8, temperature=0, logprobs=0))))
    hs = [e.submit(Request(p, max_tokens=8, temperature=0, logprobs=0)) for p in PROMPTS]
    together = [_events(h) for h in hs]
    for p, r, (st, sl, sf), (bt, bl, bf) in zip(PROMPTS, ref, solo, together):
        assert st == r, f"engine alone differs from generate() for prompt {p}"
        assert bt == st and bl == sl, f"prompt {p}: a batch changed its tokens or float32 log-probabilities"
        assert sf.finish_reason == bf.finish_reason == "length"
        assert (sf.prompt_tokens, sf.completion_tokens) == (len(p), 8)


@pytest.mark.parametrize("variant", ["llama_gqa", "gptj"])
def test_batched_decode_attention_equals_the_per_sequence_loop(ref_dir, variant, engine_for, monkeypatch):
    """The accelerators' path (layers._batch_decode): the single-token sequences of a step attend in one call over
    their rows padded to the longest, keys past each one's length masked. Forced on here (the CPU loops per
    sequence): the same greedy tokens, and float32 log-probabilities within summation order, as the loop; joins
    mid-run (other sequences prefilling in the same step) included."""
    import overspill.model.layers as L
    path, _ = ref_dir(variant)
    m = overspill.load(path, dtype="float32")
    e = engine_for(m, max_batch_size=4, max_seq_len=64, step_tokens=6)
    run = lambda: [_events(h) for h in [e.submit(Request(p, max_tokens=10, temperature=0, logprobs=0))
                                        for p in PROMPTS]]
    want = run()
    calls = []
    real = L.decode_attention
    monkeypatch.setattr(L, "_batch_decode", lambda device: True)
    monkeypatch.setattr(L, "decode_attention", lambda q, *a: calls.append(q.shape[0]) or real(q, *a))
    got = run()
    assert max(calls) == len(PROMPTS)                       # every sequence decoding in one call
    for (wt, wl, _), (gt, gl, _) in zip(want, got):
        assert gt == wt
        assert max(abs(a - b) for a, b in zip(gl, wl)) < 1e-5


def test_join_mid_run_and_sampling_are_batch_invariant(ref_dir, engine_for):
    path, _ = ref_dir("llama_gqa")
    m = overspill.load(path, dtype="float32")
    e = engine_for(m, max_batch_size=4, max_seq_len=64, step_tokens=6)
    kw = dict(max_tokens=12, temperature=0.9, top_p=0.9, top_k=20, seed=7, frequency_penalty=0.5,
              presence_penalty=0.3, logprobs=2)
    solo = [_events(e.submit(Request(p, **kw))) for p in PROMPTS]
    first = [e.submit(Request(p, **kw)) for p in PROMPTS[:2]]
    ev = next(iter(first[0]))                             # the first two are decoding when the others join
    late = [e.submit(Request(p, **kw)) for p in PROMPTS[2:]]
    for k, (h, (st, sl, _)) in enumerate(zip(first + late, solo)):
        bt, bl, _ = _events(h)
        if k == 0:
            bt, bl = [ev.token] + bt, [ev.logprob] + bl
        assert bt == st and bl == sl, f"prompt {k}: joining a running batch changed its tokens or log-probabilities"


def test_prompt_logprobs_equal_model_logprobs(ref_dir, engine_for):
    path, _ = ref_dir("gpt2")
    m = overspill.load(path, dtype="float32")
    e = engine_for(m, max_batch_size=2, max_seq_len=64, step_tokens=5)   # scored across three steps
    p = PROMPTS[3]
    f = e.submit(Request(p, max_tokens=0, prompt_logprobs=True, logprobs=3)).wait()
    ref = m.logprobs(torch.tensor([p]))[0]
    assert f.prompt_logprobs[0] is None and f.completion_tokens == 0 and f.finish_reason == "length"
    torch.testing.assert_close(torch.tensor(f.prompt_logprobs[1:]), ref, rtol=0, atol=1e-5)
    assert all(len(t) == 3 for t in f.prompt_top[1:])
    assert f.prompt_top[1][0][1] >= f.prompt_top[1][1][1]


def test_stop_ids_stop_strings_and_lengths(engine_for):
    m = overspill.load()                                   # the built-in model: a real tokenizer
    e = engine_for(m, max_batch_size=2, max_seq_len=256)
    ids = m.encode("ROMEO:")
    full = e.submit(Request(ids, max_tokens=40, temperature=0)).wait()
    assert full.finish_reason == "length" and full.completion_tokens == 40
    assert full.text == m.generate(["ROMEO:"], max_new_tokens=40, temperature=0, ignore_eos=True)[0]
    stop = full.text[15:17]
    cut = e.submit(Request(ids, max_tokens=40, temperature=0, stop=[stop])).wait()
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    by_id = e.submit(Request(ids, max_tokens=40, temperature=0, stop_token_ids=[full.tokens[3]])).wait()
    assert by_id.finish_reason == "stop" and by_id.tokens == full.tokens[:4]


def test_cancel_frees_the_row_and_others_go_on(ref_dir, engine_for):
    path, _ = ref_dir("gptj")
    m = overspill.load(path, dtype="float32")
    e = engine_for(m, max_batch_size=2, max_seq_len=128)
    long = e.submit(Request([5, 6], max_tokens=100, temperature=0))
    other = e.submit(Request([7, 8], max_tokens=100, temperature=0))
    next(iter(long)), next(iter(other))                              # both rows taken
    waiting = e.submit(Request([9], max_tokens=4, temperature=0))   # no free row until one leaves
    assert e.status()["waiting"] == 1
    long.cancel()
    assert waiting.wait().completion_tokens == 4            # took the cancelled sequence's row
    assert long.wait().finish_reason == "cancelled"
    assert other.wait().completion_tokens == 100


def test_beam_requests_share_the_engine_with_others(ref_dir, engine_for):
    """Beam-search requests run in a live engine beside greedy ones (joining mid-run, prompts split over steps):
    each gives generate(num_beams=...)'s tokens, every beam has its own row (rows copied when two beams continue
    one), and all rows are free again at the end."""
    path, _ = ref_dir("gptj")
    m = overspill.load(path, dtype="float32")
    want = [m.generate([p], max_new_tokens=10, num_beams=3, ignore_eos=True)[0] for p in PROMPTS[:2]]
    greedy = m.generate([PROMPTS[2]], max_new_tokens=30, ignore_eos=True)[0]
    e = engine_for(m, max_batch_size=8, max_seq_len=64, step_tokens=8)
    copies = []
    real = e.cache.copy_rows
    e.cache.copy_rows = lambda src, dst, end: (copies.append((list(src), list(dst), end, 8 - len(e.free_rows))),
                                               real(src, dst, end))
    g = e.submit(Request(PROMPTS[2], max_tokens=30, temperature=0))
    next(iter(g))                                                    # decoding when the beams join
    hs = [e.submit(Request(p, max_tokens=10, temperature=0, num_beams=3)) for p in PROMPTS[:2]]
    got = [h.wait() for h in hs]
    assert [f.tokens for f in got] == want and [f.finish_reason for f in got] == ["length"] * 2
    assert [ev.token for ev in g if isinstance(ev, TokenEvent)] == greedy[1:]
    assert copies and all(set(a).isdisjoint(b) for a, b, _, _ in copies)
    assert max(used for *_, used in copies) == 7                     # 1 + 2 x 3 rows while all three run
    assert {end for _, _, end, _ in copies} >= {len(PROMPTS[0]), len(PROMPTS[1])}  # the prompt, after the 1st token
    assert sorted(e.free_rows) == list(range(8))
    with pytest.raises(RequestTooLong, match="num_beams 9 needs a cache row per beam but the engine has 8"):
        e.submit(Request([1], max_tokens=1, temperature=0, num_beams=9))
    with pytest.raises(overspill.OverspillError, match="beam search is deterministic"):
        e.submit(Request([1], max_tokens=1, num_beams=2))


def test_refusals(ref_dir, engine_for):
    path, _ = ref_dir("gpt_neox_parallel")
    m = overspill.load(path, dtype="float32")
    e = Engine(m, max_batch_size=1, max_seq_len=32, max_queue=1)   # not started: requests stay queued
    with pytest.raises(RequestTooLong, match=r"needs 40 tokens \(prompt 10 \+ max_tokens 30\).*holds 32"):
        e.submit(Request(list(range(10)), max_tokens=30))
    with pytest.raises(overspill.OverspillError, match="outside the vocabulary"):
        e.submit(Request([VOCAB + 1], max_tokens=1))
    with pytest.raises(overspill.OverspillError, match="top_p"):
        e.submit(Request([1], max_tokens=1, top_p=0))
    e.submit(Request([1], max_tokens=1))
    with pytest.raises(EngineBusy, match="queue holds 1"):
        e.submit(Request([1], max_tokens=1))
    e.start()
    e.shutdown(timeout=5)
    with pytest.raises(EngineClosed):
        e.submit(Request([1], max_tokens=1))


def test_streamed_weights_one_pass_serves_every_sequence(deep_dir, engine_for):
    """A model streamed from disk: each step reads the streamed units once whatever the batch."""
    from test_streaming import _budgets
    from overspill.checkpoint.hf import HFCheckpoint
    from overspill.runtime.loader import Reserve
    path, _ = deep_dir("gpt_neox_parallel")
    cfg = HFCheckpoint(path).config
    extra = lambda r: cfg.n_layers * r.kv_bytes_per_block(cfg, torch.float32) + r.activation_bytes(cfg, torch.float32)
    budget = _budgets(path, 1) + extra(Reserve(4, 64)) - extra(Reserve(1, 64))   # a 4-row reserve, 1 block resident
    m = overspill.load(path, dtype="float32", max_memory={"cpu": budget}, max_batch_size=4, max_seq_len=64)
    assert [p.tier for p in m.plan.placements].count("stream") >= 4
    ref = [m.generate([p], max_new_tokens=6, temperature=0, ignore_eos=True)[0] for p in PROMPTS]

    class Steps(EngineObserver):
        sizes = []

        def on_step(self, batch_size, prompt_tokens, decode_tokens, seconds):
            self.sizes.append(batch_size)
    obs = Steps()
    e = engine_for(m, max_batch_size=4, max_seq_len=64, observer=obs)
    src = m.executor.source
    units0 = src.stats["units_read"]
    hs = [e.submit(Request(p, max_tokens=6, temperature=0)) for p in PROMPTS]
    assert [h.wait().tokens for h in hs] == ref
    streamed = len(src.streamed)
    assert max(obs.sizes) == 4
    # every step read each streamed unit once (the reader may have read ahead by at most its ring)
    assert src.stats["units_read"] - units0 <= streamed * len(obs.sizes) + src.ring_slots


def test_a_pass_nobody_waits_for_stops_between_blocks(deep_dir, engine_for, monkeypatch):
    """Cancelling the only sequence of a long (streamed) pass stops it at the next block, not at its end."""
    from overspill.model import layers
    path, _ = deep_dir("gptj")
    m = overspill.load(path, dtype="float32")
    e = engine_for(m, max_batch_size=1, max_seq_len=64)
    calls, started = [], threading.Event()
    real = layers.block_forward

    def slow_block(*a, **kw):
        calls.append(1)
        started.set()
        time.sleep(0.2)
        return real(*a, **kw)
    monkeypatch.setattr("overspill.runtime.executor.block_forward", slow_block)
    h = e.submit(Request([5, 6, 7], max_tokens=4, temperature=0))
    started.wait(5)
    h.cancel()
    assert h.wait().finish_reason == "cancelled"
    assert len(calls) < m.config.n_layers, f"the pass ran {len(calls)} of {m.config.n_layers} blocks after cancel"
    monkeypatch.setattr("overspill.runtime.executor.block_forward", real)
    ok = e.submit(Request([5, 6, 7], max_tokens=4, temperature=0)).wait()     # the engine goes on
    assert ok.tokens == m.generate([[5, 6, 7]], max_new_tokens=4, temperature=0, ignore_eos=True)[0]


def test_one_requests_bad_sampling_never_stops_the_engine(ref_dir, engine_for, monkeypatch):
    path, _ = ref_dir("gpt2")
    m = overspill.load(path, dtype="float32")
    e = engine_for(m, max_batch_size=2, max_seq_len=64)
    tiny = e.submit(Request([5, 6], max_tokens=3, temperature=1e-300)).wait()     # overflows logits / T: greedy
    assert tiny.tokens == m.generate([[5, 6]], max_new_tokens=3, temperature=0, ignore_eos=True)[0]
    for bad in (dict(temperature=float("nan")), dict(frequency_penalty=float("inf")), dict(seed=2**70)):
        with pytest.raises(overspill.OverspillError, match=next(iter(bad))):
            e.submit(Request([5], max_tokens=1, **bad))
    from overspill.generate import sampling
    real = sampling.Sampler.choose
    monkeypatch.setattr(sampling.Sampler, "choose", lambda self, lg: (_ for _ in ()).throw(RuntimeError("boom"))
                        if self.gc.top_k == 7 else real(self, lg))
    broken = e.submit(Request([5], max_tokens=3, top_k=7))
    fine = e.submit(Request([5], max_tokens=3, temperature=0))
    f = broken.wait()
    assert f.finish_reason == "error" and "boom" in f.error
    assert fine.wait().completion_tokens == 3
    assert e.submit(Request([6], max_tokens=2, temperature=0)).wait().completion_tokens == 2
