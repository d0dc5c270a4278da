"""Generation correctness: stop strings in beam search, stats in every ending, per-sequence seeds,
incremental stop-string search. Float32 models throughout, so equalities are exact."""
from __future__ import annotations

import json
import types

import pytest

import overspill
from overspill import cli
from overspill.errors import OverspillError
from overspill.generate import GenerationConfig, generate_ids
from overspill.generate.beam import StopChecker

PROMPT = "ROMEO:\n"
SAMPLE = dict(max_new_tokens=48, temperature=0.9, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return overspill.load(dtype="float32")


class CountingDecode:
    """Wraps a decode function, counting calls and ids decoded."""

    def __init__(self, decode):
        self.decode, self.calls, self.ids = decode, 0, 0

    def __call__(self, ids: list[int]) -> str:
        self.calls += 1
        self.ids += len(ids)
        return self.decode(ids)


def _reference_stop(decode, ids: list[int], stops: list[str]) -> tuple[int, int] | None:
    """The definition: the first step whose full decoded text holds a stop string, and the text
    length before the earliest one."""
    for n in range(1, len(ids) + 1):
        text = decode(ids[:n])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return n, min(hits)
    return None


def _feed(checker: StopChecker, ids: list[int]) -> tuple[int, int] | None:
    for n, t in enumerate(ids, 1):
        done, cut = checker.check(t)
        if done:
            return n, cut
    return None


# -- 6: stop strings found incrementally -----------------------------------------------------


@pytest.mark.parametrize("stops", [["\U0001F642"], ["caf\u00e9 \U0001F642 na"], ["ve \u2014"], ["\u00e6on"],
                                   ["na", "f\u00e9"], ["zz"], [" ", "a"], ["O: c"]])
def test_stop_checker_matches_full_decode(model, stops):
    """Stop strings spanning several tokens and split characters end the sequence at the same token,
    with the same cut, as searching the fully decoded text at every step."""
    ids = model.tokenizer.encode("ROMEO: caf\u00e9 \U0001F642 na\u00efve \u2014 \u00e6on, and so on")
    checker = StopChecker(GenerationConfig(stop=stops), model.decode)
    assert _feed(checker, ids) == _reference_stop(model.decode, ids, stops)


def test_stop_checker_matches_full_decode_on_samples(model):
    """Same on sampled text, with stop strings taken from it (most span several tokens)."""
    outs = model.generate([[1867, 26], [1867], [26], [26, 1867]], seed=1, **SAMPLE)
    for k, ids in enumerate(outs):
        text = model.decode(ids)
        stops = [text[10 + 3 * k: 16 + 3 * k], text[-5:]]
        assert len(model.tokenizer.encode(stops[0])) > 1
        got = _feed(StopChecker(GenerationConfig(stop=stops), model.decode), ids)
        assert got == _reference_stop(model.decode, ids, stops) and got is not None


def test_stop_check_decodes_only_a_window_per_token(model):
    """The search does not decode the whole output at each step: the ids decoded grow linearly."""
    n = 200
    counting = CountingDecode(model.decode)
    ids = model.generate([[1867, 26]], max_new_tokens=n, seed=0, temperature=0.9, ignore_eos=True)[0]
    checker = StopChecker(GenerationConfig(stop=["never in this text \u2014"]), counting)
    assert _feed(checker, ids) is None
    assert counting.calls <= 2 * n and counting.ids < 8 * n          # full decodes would be n * (n + 1) / 2


def test_generate_stop_decodes_linearly_and_cuts(model, monkeypatch):
    """End to end: a stop string of several tokens cuts the text where it starts, and the decoding
    done for it stays linear in the output length."""
    free = model.generate([PROMPT], seed=5, **SAMPLE)[0]
    stop = free[20:27]
    assert len(model.tokenizer.encode(stop)) > 1
    counting = CountingDecode(model.tokenizer.decode)
    monkeypatch.setattr(model.tokenizer, "decode", counting)
    assert model.generate([PROMPT], seed=5, stop=[stop], **SAMPLE)[0] == free[: free.index(stop)]
    counting.calls = counting.ids = 0
    model.generate([PROMPT], seed=5, stop=["never in this text"], max_new_tokens=160, temperature=0.9,
                   ignore_eos=True)
    assert counting.ids < 8 * 160


# -- 3: stop strings in beam search ---------------------------------------------------------


def test_beam_search_honours_stop_strings(model):
    """No beam output holds a stop string; a hypothesis ending in one is cut before it."""
    free = model.generate([PROMPT, "JULIET:\n"], max_new_tokens=40, num_beams=3)
    stops = ["tho", "lord?"]
    assert all(any(s in f for s in stops) for f in free)
    cut = model.generate([PROMPT, "JULIET:\n"], max_new_tokens=40, num_beams=3, stop=stops)
    assert all(not any(s in c for s in stops) for c in cut)
    assert cut != free


def test_beam_stop_string_ranks_like_eos(model):
    """A one-character stop string that only one token holds ("?") appears in a text exactly when
    that token is generated: it must end hypotheses exactly as that token does as EOS."""
    ex, prompt = model.executor, model.encode(PROMPT)
    ids = generate_ids(ex, [prompt], GenerationConfig(max_new_tokens=40, num_beams=3))[0][0]
    texts = [model.decode([t]) for t in range(model.config.vocab_size)]
    tok = next(t for t in ids if len(texts[t]) == 1 and sum(texts[t] in x for x in texts) == 1)
    stop = texts[tok]
    as_eos, eos_cuts = generate_ids(ex, [prompt], GenerationConfig(max_new_tokens=40, num_beams=3,
                                                                   eos_token_ids=[tok]))
    as_stop, cuts = generate_ids(ex, [prompt], GenerationConfig(max_new_tokens=40, num_beams=3, stop=[stop]),
                                 decode=model.decode)
    assert as_stop == as_eos and as_eos[0][-1] == tok and eos_cuts == [None]
    assert cuts == [len(model.decode(as_stop[0])) - len(stop)]
    text = model.generate([PROMPT], max_new_tokens=40, num_beams=3, stop=[stop])[0]
    assert text == model.decode(as_stop[0])[: cuts[0]]


# -- 4: stats in every ending ---------------------------------------------------------------


def test_stream_stats_when_a_stop_string_ends_it(model):
    pieces = list(model.stream(PROMPT, stop=[":"], max_new_tokens=60))
    s = model.last_stats
    assert ":" not in "".join(pieces) and 1 < s["generated_tokens"] == s["new_tokens"] < 60
    assert s["decode_s"] > 0


def test_stream_stats_when_eos_ends_it(model):
    greedy = model.generate([model.encode(PROMPT)], max_new_tokens=30, ignore_eos=True)[0]
    eos = next(t for n, t in enumerate(greedy) if n >= 4 and t not in greedy[:n])
    n = greedy.index(eos)
    text = "".join(model.stream(PROMPT, max_new_tokens=30, eos_token_ids=[eos]))
    s = model.last_stats
    assert s["generated_tokens"] == s["new_tokens"] == n + 1 and s["decode_s"] > 0
    assert text == model.decode(greedy[:n])


def test_stream_stats_when_the_reader_stops_early(model):
    for n, _ in enumerate(model.stream(PROMPT, max_new_tokens=60, ignore_eos=True)):
        if n == 10:
            break
    s = model.last_stats
    assert s["decode_s"] > 0 and s["generated_tokens"] == s["new_tokens"] >= 11


def test_generate_stats_count_tokens_per_sequence(model):
    """Sequences that end early add only the tokens they generated."""
    prompts = [[1867, 26], [1867], [26, 1867, 26]]
    kw = dict(max_new_tokens=30, temperature=0.9, seed=[1, 2, 3])
    eos = model.generate(prompts, ignore_eos=True, **kw)[0][4]     # ends the first sequence early
    stats: dict = {}
    outs, _ = generate_ids(model.executor, prompts, GenerationConfig(eos_token_ids=[eos], **kw), stats=stats)
    assert min(map(len, outs)) <= 5 and max(map(len, outs)) == 30
    assert stats["generated_tokens"] == sum(map(len, outs)) and stats["new_tokens"] == 30
    assert stats["decode_s"] > 0


def test_print_stats_rate_counts_generated_tokens(capsys):
    fake = types.SimpleNamespace(last_stats=dict(batch=2, new_tokens=10, generated_tokens=12, prefill_s=0.5,
                                                 decode_s=2.0))
    cli._print_stats(fake)
    err = capsys.readouterr().err
    assert "12 new tokens" in err and "5.00 tokens/s" in err      # (12 - 2 first tokens) / 2 s


def test_cli_stream_stats_have_a_rate_when_a_stop_string_ends_it(capsys):
    assert cli.main(["generate", PROMPT, "--dtype", "float32", "-n", "60", "--stop", ":", "--stats"]) == 0
    err = capsys.readouterr().err
    assert "tokens/s" in err and "nan" not in err and "n/a" not in err


def test_generate_file_rate_counts_generated_tokens(tmp_path, monkeypatch, capsys):
    """The --prompts progress rate adds each batch's generated tokens, not steps x batch size."""
    class Fake:
        last_stats: dict = {}

        def generate(self, batch, **kw):
            self.last_stats = dict(batch=len(batch), new_tokens=5, generated_tokens=7)
            return ["x"] * len(batch)

    clock = iter([0.0, 10.0])
    monkeypatch.setattr(cli, "_load", lambda a, bs, seq: Fake())
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    src, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    src.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    assert cli.main(["generate", "--prompts", str(src), "--out", str(out), "--batch-size", "2"]) == 0
    assert "0.70 tokens/s" in capsys.readouterr().err


# -- 5: one seed per sequence -----------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(ref_dir):
    return overspill.load(ref_dir("llama_gqa")[0], dtype="float32")


SAMPLED = dict(max_new_tokens=24, temperature=1.2, top_k=50, repetition_penalty=1.1, ignore_eos=True)


def test_seeded_prompt_samples_the_same_alone_and_in_any_batch(llama):
    p, q, r = [5, 6, 7], [8, 9], [10, 11, 12, 13]
    alone = llama.generate([p], seed=7, **SAMPLED)[0]
    assert llama.generate([q, r, p], seed=[3, 4, 7], **SAMPLED)[2] == alone
    assert llama.generate([q, p], seed=7, **SAMPLED)[1] == alone        # one int seeds every row alike
    assert llama.generate([p, p], seed=[7, 7], **SAMPLED) == [alone, alone]


def test_seeds_are_not_row_offsets(llama):
    """Seed 1 at row 1 is not seed 2 at row 0."""
    p = [5, 6, 7]
    assert llama.generate([p, p], seed=1, **SAMPLED)[1] != llama.generate([p], seed=2, **SAMPLED)[0]


def test_unseeded_rows_sample_independently(llama):
    a, b = llama.generate([[5, 6, 7]] * 2, **SAMPLED)
    assert a != b


@pytest.mark.parametrize("seed, msg", [([1, 2, 3], "seed has 3 entries for 2 prompts"),
                                       ("7", "seed must be an integer"), ([1, 2.5], "seed must be an integer"),
                                       ([], "seed must be an integer"), (True, "seed must be an integer")])
def test_bad_seeds_are_refused_in_one_line(llama, seed, msg):
    with pytest.raises(OverspillError, match=msg) as e:
        llama.generate([[5, 6], [7]], seed=seed, **SAMPLED)
    assert "\n" not in str(e.value)
