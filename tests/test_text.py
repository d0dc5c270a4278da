"""Tokenizer, streaming text and stop strings on the built-in Shakespeare model; the CLI end to end."""
import subprocess
import sys

import pytest

import overspill
from overspill.tokenizer import Detokenizer, Tokenizer


@pytest.fixture(scope="module")
def model():
    return overspill.load()


def test_builtin_model_is_gpt_neox(model):
    assert model.config.family == "gpt_neox" and model.tokenizer is not None


def test_detokenizer_never_splits_a_character(model):
    tok = model.tokenizer
    text = "ROMEO: caf\u00e9 \U0001F642 na\u00efve \u2014 \u00e6on\n  fin"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())          # multi-byte characters span several tokens
    d = Detokenizer(tok)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == text


def test_stream_equals_generate(model):
    kw = dict(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=3)
    streamed = list(model.stream("JULIET:\n", **kw))
    assert len(streamed) > 5
    assert "".join(streamed) == model.generate(["JULIET:\n"], **kw)[0]


def test_stop_strings_cut_text_and_stream(model):
    kw = dict(max_new_tokens=80, temperature=0.8, seed=1)
    free = model.generate(["ROMEO:\n"], **kw)[0]
    assert ":\n" in free
    stop = ":\n"
    cut = model.generate(["ROMEO:\n"], stop=[stop], **kw)[0]
    assert cut == free[: free.index(stop)]
    assert "".join(model.stream("ROMEO:\n", stop=[stop], **kw)) == cut


def test_tokenizer_errors(tmp_path):
    with pytest.raises(overspill.CheckpointError, match="missing tokenizer.json"):
        Tokenizer(str(tmp_path))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "overspill.cli", *args], capture_output=True, text=True)


def test_cli_generate_streams_play_text():
    r = _cli("generate", "ROMEO:", "-n", "160", "-t", "0.8", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and len(r.stdout) > 80
    # play-shaped: verse lines (several short lines), not one run-on blob
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) >= 5 and sorted(map(len, lines))[len(lines) // 2] < 70


def test_cli_info_and_tokenize_round_trip():
    r = _cli("info")
    assert r.returncode == 0 and "4,731,392" in r.stdout and "GPTNeoXForCausalLM" in r.stdout
    ids = _cli("tokenize", "To be, or not to be").stdout.strip()
    assert _cli("tokenize", "--decode", ids).stdout.rstrip("\n") == "To be, or not to be"
    bad = _cli("tokenize", "--decode", "1,x")
    assert bad.returncode == 2 and "comma-separated integers" in bad.stderr
