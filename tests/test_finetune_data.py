"""Fine-tuning data: .txt packing, .jsonl rows and masks, one-line errors, splits, batches and resume."""
from __future__ import annotations

import json
import os

import pytest
import torch

from overspill.errors import OverspillError
from overspill.finetune import data as D
from overspill.finetune.data import IGNORE, Position, load_dataset
from overspill.tokenizer import Tokenizer

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "overspill", "data", "shakespeare")
HELDOUT = os.path.join(TOKENIZER, "heldout.txt")
EOS = 0


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TOKENIZER)


class WithBos:
    """The built-in tokenizer adds no special tokens; this one prepends BOS=1 when asked, as Llama's does."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + self.tok.encode(text, add_special_tokens=False)


def write(tmp_path, name: str, content: str | bytes) -> str:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(p)


def jsonl(tmp_path, rows: list, name: str = "d.jsonl") -> str:
    return write(tmp_path, name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# ---------------------------------------------------------------- .txt


def test_txt_packing_is_the_stream_shifted_by_one(tmp_path, tok):
    text = open(HELDOUT, encoding="utf-8").read()[:20000]
    path = write(tmp_path, "a.txt", text)
    S = 64
    ds = load_dataset(path, tok, seq_len=S, max_positions=512, eos_id=EOS)
    stream = tok.encode(text)
    N = len(stream)
    assert len(ds) == (N - 1) // S and ds.dropped_tokens == N - 1 - len(ds) * S > 0
    assert "dropped the last" in ds.summary()
    inputs, labels = [], []
    for i in range(len(ds)):
        x, y = ds.example(i)
        assert len(x) == len(y) == S and x[1:] == y[:-1]            # labels are the inputs shifted by one
        inputs += x
        labels += y
    assert inputs == stream[:len(inputs)]                            # continuous across the file ...
    assert labels == stream[1:len(labels) + 1]                       # ... every token after the first a label once
    assert ds.loss_tokens == len(ds) * S


def test_txt_chunked_tokenization_matches_one_pass(tmp_path, tok, monkeypatch):
    text = open(HELDOUT, encoding="utf-8").read()[:20000]
    path = write(tmp_path, "a.txt", text)
    whole = load_dataset(path, tok, 32, 512)
    monkeypatch.setattr(D, "_CHUNK_CHARS", 500)                     # many chunks, each ending at a blank line
    monkeypatch.setattr(D, "_MAX_CHUNK_CHARS", 2000)
    chunked = load_dataset(path, tok, 32, 512)
    assert torch.equal(torch.from_numpy(chunked.tokens), torch.from_numpy(whole.tokens))
    bos = load_dataset(path, WithBos(tok), 32, 512)                  # specials once, at the start of the stream
    assert bos.tokens[0] == 1 and (bos.tokens == 1).sum() == (whole.tokens == 1).sum() + 1


def test_txt_short_file_is_one_example(tmp_path, tok):
    path = write(tmp_path, "short.txt", "To be, or not to be")
    ds = load_dataset(path, tok, 256, 512)
    ids = tok.encode("To be, or not to be")
    assert len(ds) == 1 and ds.dropped_tokens == 0
    assert ds.example(0) == (ids[:-1], ids[1:])


# ---------------------------------------------------------------- .jsonl


def test_jsonl_text_and_prompt_completion_masks(tmp_path, tok):
    rows = [{"prompt": "Q: who?\nA:", "completion": " Hamlet.", "id": 7},
            "",
            {"text": "To be, or not to be"},
            "   ",
            {"prompt": "", "completion": "Ophelia"}]
    path = jsonl(tmp_path, rows)
    ds = load_dataset(path, tok, 64, 512, eos_id=EOS)
    assert len(ds) == 3                                              # blank lines skipped, one row a line
    p, c = tok.encode("Q: who?\nA:"), tok.encode(" Hamlet.", add_special_tokens=False)
    full = p + c + [EOS]
    x, y = ds.example(0)
    assert x == full[:-1]
    assert y == [IGNORE] * (len(p) - 1) + c + [EOS]                  # loss exactly on the completion + eos
    t = tok.encode("To be, or not to be") + [EOS]
    assert ds.example(1) == (t[:-1], t[1:])                          # text: loss on every token
    o = tok.encode("Ophelia", add_special_tokens=False) + [EOS]
    assert ds.example(2) == (o[:-1], o[1:])                          # empty prompt: from the 2nd completion token
    assert ds.loss_tokens == len(c) + 1 + len(t) - 1 + len(o) - 1

    no_eos = load_dataset(path, tok, 64, 512, eos_id=None)
    x, y = no_eos.example(0)
    assert x == (p + c)[:-1] and y == [IGNORE] * (len(p) - 1) + c


def test_jsonl_specials_on_the_prompt_only(tmp_path, tok):
    path = jsonl(tmp_path, [{"prompt": "Q:", "completion": " A"}])
    x, y = load_dataset(path, WithBos(tok), 64, 512, eos_id=2).example(0)
    p, c = tok.encode("Q:"), tok.encode(" A", add_special_tokens=False)
    assert x == [1] + p + c and y == [IGNORE] * len(p) + c + [2]


def test_batches_pad_right_to_the_longest_row(tmp_path, tok):
    rows = [{"text": "a"}, {"text": "To be, or not to be, that is the question"}, {"prompt": "Q", "completion": " x"}]
    ds = load_dataset(jsonl(tmp_path, rows), tok, 64, 512, eos_id=EOS)
    (b,) = list(ds.batches(3, shuffle=False, epochs=1))
    lens = [len(ds.example(i)[0]) for i in range(3)]
    assert b.input_ids.dtype == b.labels.dtype == torch.long and b.input_ids.shape == (3, max(lens))
    for r, L in enumerate(lens):
        x, y = ds.example(r)
        assert b.input_ids[r, :L].tolist() == x and b.labels[r, :L].tolist() == y
        assert (b.input_ids[r, L:] == EOS).all() and (b.labels[r, L:] == IGNORE).all()
    assert b.loss_tokens == ds.loss_tokens and b.position == Position(1, 0)


# ---------------------------------------------------------------- errors: one line, file and line


def one_line_error(path, tok, match, seq_len=16, max_positions=64, eos_id=EOS):
    with pytest.raises(OverspillError) as e:
        load_dataset(path, tok, seq_len, max_positions, eos_id)
    msg = str(e.value)
    assert "\n" not in msg and match in msg, msg
    return msg


BAD_JSONL = [
    ('{"text": "ok"}\n{"text": "broken"\n', ":2: invalid JSON"),
    ('{"text": "ok"}\n\n{"input": "a", "output": "b"}\n', ':3: object has fields "input", "output"; expected {"text"'),
    ('{"text": "ok"}\n[1, 2]\n', ":2: a JSON array, not an object"),
    ('{"prompt": "a"}\n', ':1: no "completion" field'),
    ('{"text": 5}\n', ':1: "text" is a JSON number; expected a string'),
    ('{"prompt": "a", "completion": null}\n', ':1: "completion" is a JSON null; expected a string'),
    ('{"prompt": "a", "completion": ""}\n', ':1: "completion" tokenizes to no tokens'),
    ('{"text": "a", "prompt": "b", "completion": "c"}\n', ':1: both "text" and "prompt"'),
    ('\n\n   \n', ": no examples (only blank lines)"),
]


@pytest.mark.parametrize("content,match", BAD_JSONL, ids=[m for _, m in BAD_JSONL])
def test_bad_jsonl_is_one_line_naming_file_and_line(tmp_path, tok, content, match):
    path = write(tmp_path, "bad.jsonl", content)
    assert one_line_error(path, tok, match).startswith(path + match)


def test_bad_line_far_down_fails_before_training(tmp_path, tok):
    rows = [{"text": f"line {i}"} for i in range(3000)] + ['{"text": "unterminated']
    path = jsonl(tmp_path, rows)
    assert one_line_error(path, tok, ":3001: invalid JSON").startswith(f"{path}:3001: ")


def test_non_utf8_names_file_and_line(tmp_path, tok):
    for name in ("bad.txt", "bad.jsonl"):
        path = write(tmp_path, name, b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
        msg = one_line_error(path, tok, ":2: byte b'\\xe9' at column 14 is not UTF-8")
        assert msg.startswith(f"{path}:2: ")


def test_too_long_example_names_both_numbers_and_the_way_out(tmp_path, tok):
    long_text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    n = len(tok.encode(long_text)) + 1                               # + eos
    path = jsonl(tmp_path, [{"text": "ok"}, {"text": long_text}])
    msg = one_line_error(path, tok, f":2: example needs {n - 1} positions", seq_len=8, max_positions=512)
    assert "--seq-len 8" in msg and f"--seq-len {n - 1} or more (up to 512" in msg
    msg = one_line_error(path, tok, f":2: example needs {n - 1} positions", seq_len=8, max_positions=10)
    assert "at most 10 positions, the model's context" in msg


def test_file_level_errors(tmp_path, tok):
    one_line_error(str(tmp_path / "missing.jsonl"), tok, "missing.jsonl: no such file")
    one_line_error(write(tmp_path, "empty.txt", ""), tok, "empty.txt: the file is empty")
    one_line_error(write(tmp_path, "tiny.txt", "x"), tok, "tiny.txt: 1 token(s), no example")
    one_line_error(write(tmp_path, "data.csv", "a,b\n"), tok, "unknown data format '.csv'; expected a .txt or .jsonl")
    msg = one_line_error(write(tmp_path, "ok.txt", "To be, or not to be"), tok, "--seq-len 1024 is longer than the "
                         "model's context of 512 positions; expected --seq-len up to 512", seq_len=1024,
                         max_positions=512)
    assert "\n" not in msg


# ---------------------------------------------------------------- split, batches, resume


@pytest.fixture(scope="module")
def packed(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("d") / "h.txt"
    path.write_text(open(HELDOUT, encoding="utf-8").read()[:12000], encoding="utf-8")
    return load_dataset(str(path), tok, 16, 512)


def test_split_is_deterministic_disjoint_and_covering(packed):
    n = len(packed)
    train, ev = packed.split(0.05, seed=3)
    train2, ev2 = packed.split(0.05, seed=3)
    assert list(ev.rows) == list(ev2.rows) and list(train.rows) == list(train2.rows)
    assert len(ev) == max(1, int(n * 0.05)) and len(train) + len(ev) == n
    assert set(train.rows).isdisjoint(ev.rows) and set(train.rows) | set(ev.rows) == set(range(n))
    assert list(packed.split(0.05, seed=4)[1].rows) != list(ev.rows)
    assert len(packed.split(0.0)[1]) == 0
    assert train.loss_tokens + ev.loss_tokens == packed.loss_tokens


def test_split_keeps_one_eval_example_of_two(tmp_path, tok):
    ds = load_dataset(jsonl(tmp_path, [{"text": "a b"}, {"text": "c d"}]), tok, 16, 64, eos_id=EOS)
    train, ev = ds.split(0.01, seed=0)
    assert len(train) == len(ev) == 1
    one = load_dataset(jsonl(tmp_path, [{"text": "a b"}], "one.jsonl"), tok, 16, 64, eos_id=EOS)
    assert [len(x) for x in one.split(0.5)] == [1, 0]
    with pytest.raises(OverspillError, match="expected a fraction"):
        ds.split(1.0)


def test_epochs_are_seeded_shuffles(packed):
    train, _ = packed.split(0.05, seed=0)
    B = 5
    steps = train.steps_per_epoch(B)
    assert steps == -(-len(train) // B)
    batches = list(train.batches(B, seed=11, epochs=2))
    assert len(batches) == 2 * steps and batches[steps - 1].position == Position(1, 0)
    assert batches[0].position == Position(0, B)
    first = torch.cat([b.input_ids for b in batches[:steps]])
    second = torch.cat([b.input_ids for b in batches[steps:]])
    rows = {tuple(r) for r in first.tolist()}
    assert len(rows) == len(train) and rows == {tuple(r) for r in second.tolist()}   # each epoch sees every row once
    assert not torch.equal(first, second)                                            # ... in another order
    again = list(train.batches(B, seed=11, epochs=1))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(again, batches))


def test_resume_continues_exactly(packed):
    train, _ = packed.split(0.05, seed=0)
    B = -(-len(train) // 5) + 1                                      # 5 steps an epoch, the last one short
    assert train.steps_per_epoch(B) == 5 and len(train) % B
    it = train.batches(B, seed=5)
    seven = [next(it) for _ in range(7)]                             # crosses into epoch 1
    for k in (3, 5, 6):                                              # mid-epoch, at the boundary, after it
        it = train.batches(B, seed=5)
        head = [next(it) for _ in range(k)]
        saved = json.loads(json.dumps(head[-1].position))            # positions are plain data
        it = train.batches(B, seed=5, start=saved)
        resumed = head + [next(it) for _ in range(7 - k)]
        for a, b in zip(seven, resumed, strict=True):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            assert a.position == b.position
    with pytest.raises(OverspillError, match="outside an epoch"):
        train.batches(B, start=(0, len(train) + 1))


def test_fingerprint_tells_data_apart(packed):
    train, ev = packed.split(0.05, seed=0)
    assert train.fingerprint == packed.split(0.05, seed=0)[0].fingerprint
    assert train.fingerprint != ev.fingerprint != packed.fingerprint
