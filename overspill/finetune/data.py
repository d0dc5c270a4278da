"""Training data for ``overspill finetune --data FILE``: read, check, tokenize, split and batch.

Everything is read, tokenized and checked in ``load_dataset``, before training starts: a bad line
90000 fails with ``FILE:90000: ...`` before step 1. Each failure is one ``OverspillError`` line
("FILE:LINE: what is wrong; expected ...").

Formats
  .txt    the whole file is one token stream (tokenized in chunks that end at a blank line, so RAM
          stays bounded; a token may split differently at a chunk edge than in one pass), cut into
          examples of seq_len positions. Each example starts where the previous one's inputs end,
          so every token after the first is a label exactly once:

            stream     t0 t1 ... tS-1 tS tS+1 ... t2S-1 t2S ...
            example 0  inputs t0 .. tS-1     labels t1 .. tS
            example 1  inputs tS .. t2S-1    labels tS+1 .. t2S

          A trailing remainder shorter than seq_len is dropped (``Dataset.dropped_tokens``, and
          ``summary()`` says so) unless it is the only example. Loss on every token.
  .jsonl  one object a line, blank lines skipped; each is its own example (never packed):
            {"text": ...}                      loss on every token
            {"prompt": ..., "completion": ...} loss on the completion only; the tokens are
                                               encode(prompt) + encode(completion, no specials)
          Other fields are ignored. When eos_id is not None it follows the text or the completion
          and is a label too, so the model learns to stop. An example may need at most seq_len
          positions (its tokens less one).

Representation
  An example is a span of one flat int32 token buffer: input_ids = tokens[s : s+L] and
  labels = tokens[s+1 : s+L+1], with labels[:loss_from] = -100. So labels[t] is the target of
  input position t, already shifted (transformers' ``labels`` are shifted inside the model; these
  are not), and -100 marks a position without loss, as in PEFT / transformers. For a
  prompt/completion row loss_from = len(prompt ids) - 1: the first label is the first completion
  token.

Batches
  Rows are right-padded to the longest row of the batch with pad_id (eos_id, else 0) and label
  -100. Causal attention never looks right, so padding changes nothing to the left of it and no
  attention mask is needed. Epoch e visits the rows in the order of a permutation seeded with
  seed + e. The data position is plain data, ``Position(epoch, index)``: ``index`` rows of that
  epoch's order are done. ``Batch.position`` is the position after the batch; passing it back as
  ``start=`` continues exactly there.

API
  load_dataset(path, tokenizer, seq_len, max_positions, eos_id=None) -> Dataset
  Dataset: len(ds) examples; ds.example(i) -> (input_ids, labels) lists; ds.loss_tokens;
           ds.max_length; ds.dropped_tokens; ds.steps_per_epoch(batch_size); ds.summary();
           ds.fingerprint (to check that a resumed run reads the same data)
  Dataset.split(eval_fraction=0.05, seed=0) -> (train, eval)
  Dataset.batches(batch_size, seed=0, start=(0, 0), epochs=None, shuffle=True) -> Iterator[Batch]
  Batch(input_ids LongTensor [B, T], labels LongTensor [B, T], position: Position, loss_tokens: int)
"""
from __future__ import annotations

import hashlib
import json
import os
from array import array
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from ..errors import OverspillError

IGNORE = -100                 # label of a position without loss (transformers' ignore_index)
_CHUNK_CHARS = 1 << 16        # .txt: tokenize about this many characters at a time, ending at a blank line ...
_MAX_CHUNK_CHARS = 1 << 20    # ... or at any line end once a chunk has grown this long
_FIELDS = '{"text": ...} or {"prompt": ..., "completion": ...}'


class Position(NamedTuple):
    """Where the data stands: ``index`` rows of epoch ``epoch``'s order are done. JSON: [epoch, index]."""
    epoch: int
    index: int


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor   # (B, T) long, right-padded with pad_id
    labels: torch.Tensor      # (B, T) long, labels[b, t] = target of input_ids[b, t]; -100: no loss
    position: Position        # the position after this batch: start= here to resume
    loss_tokens: int          # labels != -100


class Dataset:
    """Examples as spans of one token buffer (see the module docstring), plus where they came from.

    ``split`` returns views over the same buffer; nothing is copied.
    """

    def __init__(self, path: str, kind: str, seq_len: int, pad_id: int, tokens: np.ndarray, start: np.ndarray,
                 length: np.ndarray, loss_from: np.ndarray, rows: np.ndarray | None = None, dropped_tokens: int = 0):
        self.path, self.kind, self.seq_len, self.pad_id = path, kind, seq_len, pad_id
        self.tokens = tokens                  # (N,) int32: every token, one stream
        self.start = start                    # (E,) int64: inputs of e: tokens[start[e] : start[e] + length[e]]
        self.length = length                  # (E,) int32: input positions, 1 .. seq_len
        self.loss_from = loss_from            # (E,) int32: positions before this have label -100
        self.rows = np.arange(len(start), dtype=np.int64) if rows is None else rows   # the examples of this view
        self.dropped_tokens = dropped_tokens  # .txt: tokens of the short remainder left out
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, i: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of the i-th example of this view; labels are -100 where there is no loss."""
        ids, labels = self._collate(self.rows[i:i + 1])
        return ids[0].tolist(), labels[0].tolist()

    @property
    def loss_tokens(self) -> int:
        """Positions with a label over all examples (what one epoch trains on)."""
        return int((self.length[self.rows].astype(np.int64) - self.loss_from[self.rows]).sum())

    @property
    def max_length(self) -> int:
        return int(self.length[self.rows].max()) if len(self) else 0

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches in one epoch; the last one may be short."""
        return -(-len(self) // _check_batch_size(batch_size))

    @property
    def fingerprint(self) -> str:
        """A short hash of this view's examples (tokens, spans, masks): equal iff the data is the same."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for a in (self.rows, self.start[self.rows], self.length[self.rows], self.loss_from[self.rows]):
                h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
            h.update(self.tokens.tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def summary(self) -> str:
        """One line for the log: examples, tokens with loss, longest row, and what was dropped."""
        what = f"packed into {self.seq_len}-token rows" if self.kind == "txt" else "one row per line"
        s = (f"{self.path}: {len(self)} examples ({what}), {self.loss_tokens:,} tokens with loss, "
             f"longest {self.max_length} positions")
        if self.dropped_tokens:
            s += f"; dropped the last {self.dropped_tokens} tokens (shorter than --seq-len {self.seq_len})"
        return s

    def split(self, eval_fraction: float = 0.05, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """(train, eval): a seeded shuffle of the examples puts the first max(1, floor(n * eval_fraction)) in eval.

        Deterministic for a seed and disjoint. eval is empty when eval_fraction is 0 or there is a single
        example; train always keeps at least one. Both keep file order (train is shuffled per epoch anyway).
        """
        if not 0 <= eval_fraction < 1:
            raise OverspillError(f"--eval-split {eval_fraction}: expected a fraction in [0, 1)")
        n = len(self)
        k = 0 if eval_fraction == 0 or n < 2 else min(n - 1, max(1, int(n * eval_fraction)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
        return self._view(np.sort(perm[k:])), self._view(np.sort(perm[:k]))

    def batches(self, batch_size: int, seed: int = 0, start: Sequence[int] = (0, 0), epochs: int | None = None,
                shuffle: bool = True) -> Iterator[Batch]:
        """Batches of ``batch_size`` rows from ``start`` on, through ``epochs`` epochs (None: forever).

        Epoch e visits the rows in a permutation seeded with seed + e (``shuffle=False``: file order, for
        evaluation). An epoch's last batch may be short; the next batch starts the next epoch. The same
        (seed, batch_size) from a batch's ``position`` gives exactly the batches that followed it.
        """
        _check_batch_size(batch_size)
        epoch, index = (int(x) for x in start)
        n = len(self)
        if n == 0:
            raise OverspillError(f"{self.path}: no examples to batch")
        if epoch < 0 or not 0 <= index <= n:
            raise OverspillError(f"data position ({epoch}, {index}) is outside an epoch of {n} examples; expected "
                                 f"the same --data, --seq-len and --eval-split as the run it resumes")
        if index == n:
            epoch, index = epoch + 1, 0
        return self._batches(batch_size, seed, epoch, index, epochs, shuffle)

    def _batches(self, batch_size: int, seed: int, epoch: int, index: int, epochs: int | None,
                 shuffle: bool) -> Iterator[Batch]:
        n = len(self)
        while epochs is None or epoch < epochs:
            order = self.rows
            if shuffle:
                order = order[torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).numpy()]
            while index < n:
                rows = order[index:index + batch_size]
                index += len(rows)
                ids, labels = self._collate(rows)
                pos = Position(epoch, index) if index < n else Position(epoch + 1, 0)
                yield Batch(ids, labels, pos, int((labels != IGNORE).sum()))
            epoch, index = epoch + 1, 0

    def _collate(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = self.length[rows]
        T = int(lengths.max())
        ids = np.full((len(rows), T), self.pad_id, dtype=np.int64)       # (B, T)
        labels = np.full((len(rows), T), IGNORE, dtype=np.int64)         # (B, T)
        for b, r in enumerate(rows):
            s, L, lf = int(self.start[r]), int(self.length[r]), int(self.loss_from[r])
            ids[b, :L] = self.tokens[s:s + L]
            labels[b, lf:L] = self.tokens[s + 1 + lf:s + 1 + L]
        return torch.from_numpy(ids), torch.from_numpy(labels)

    def _view(self, rows: np.ndarray) -> "Dataset":
        return Dataset(self.path, self.kind, self.seq_len, self.pad_id, self.tokens, self.start, self.length,
                       self.loss_from, self.rows[rows], self.dropped_tokens)


def load_dataset(path: str, tokenizer, seq_len: int, max_positions: int, eos_id: int | None = None) -> Dataset:
    """Read, tokenize and check ``path`` (.txt or .jsonl) into examples of at most ``seq_len`` positions.

    tokenizer: anything with ``encode(text, add_special_tokens=True) -> list[int]``. max_positions: the
    model's context. eos_id: appended after each .jsonl text or completion (None: nothing appended); also the
    pad id (0 when None). Raises OverspillError, one line naming the file and line, on any bad input.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".jsonl"):
        raise OverspillError(f"{path}: unknown data format {ext or '(no extension)'!r}; expected a .txt or .jsonl file")
    if not os.path.exists(path):
        raise OverspillError(f"{path}: no such file; expected a .txt or .jsonl training file")
    if not os.path.isfile(path):
        raise OverspillError(f"{path}: not a file; expected a .txt or .jsonl training file")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise OverspillError(f"--seq-len {seq_len}: expected a positive number of positions")
    if seq_len > max_positions:
        raise OverspillError(f"--seq-len {seq_len} is longer than the model's context of {max_positions} positions; "
                             f"expected --seq-len up to {max_positions}")
    if os.path.getsize(path) == 0:
        raise OverspillError(f"{path}: the file is empty; expected {'text' if ext == '.txt' else _FIELDS + ' lines'}")
    pad_id = 0 if eos_id is None else eos_id
    if ext == ".txt":
        return _load_txt(path, tokenizer, seq_len, pad_id)
    return _load_jsonl(path, tokenizer, seq_len, max_positions, eos_id, pad_id)


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line, decoded as UTF-8; a leading byte-order mark is dropped."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise OverspillError(f"{path}:{n}: byte {raw[e.start:e.start + 1]!r} at column {e.start + 1} is not "
                                     f"UTF-8; expected a UTF-8 text file") from None
            if n == 1 and line.startswith("\ufeff"):
                line = line[1:]
            yield n, line


def _load_txt(path: str, tokenizer, seq_len: int, pad_id: int) -> Dataset:
    buf = array("i")
    parts: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal size
        buf.extend(tokenizer.encode("".join(parts), add_special_tokens=not buf))   # specials once, at the start
        parts.clear()
        size = 0

    for _, line in _lines(path):
        parts.append(line)
        size += len(line)
        if size >= _MAX_CHUNK_CHARS or (size >= _CHUNK_CHARS and not line.strip()):
            flush()
    if parts:
        flush()
    tokens = np.frombuffer(buf, dtype=np.int32) if len(buf) else np.zeros(0, dtype=np.int32)
    N = len(tokens)
    if N < 2:
        raise OverspillError(f"{path}: {N} token(s), no example; expected text of at least 2 tokens "
                             f"(one to read, one to predict)")
    full = (N - 1) // seq_len
    if full == 0:                                           # shorter than seq_len: the only example, kept
        start, length, dropped = np.zeros(1, dtype=np.int64), np.array([N - 1], dtype=np.int32), 0
    else:
        start = np.arange(full, dtype=np.int64) * seq_len
        length = np.full(full, seq_len, dtype=np.int32)
        dropped = N - 1 - full * seq_len                    # labels of the remainder, left out
    return Dataset(path, "txt", seq_len, pad_id, tokens, start, length, np.zeros(len(start), dtype=np.int32),
                   dropped_tokens=dropped)


def _load_jsonl(path: str, tokenizer, seq_len: int, max_positions: int, eos_id: int | None, pad_id: int) -> Dataset:
    buf, start, length, loss_from = array("i"), array("q"), array("i"), array("i")
    for n, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise OverspillError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected one JSON object "
                                 f"a line, {_FIELDS}") from None
        ids, first = _encode_row(obj, where, tokenizer, eos_id)
        positions = len(ids) - 1
        if positions > seq_len:
            raise OverspillError(f"{where}: example needs {positions} positions ({len(ids)} tokens, the last one only "
                                 f"a label), more than --seq-len {seq_len}; expected "
                                 + _suggest(positions, max_positions))
        start.append(len(buf))
        length.append(positions)
        loss_from.append(first)
        buf.extend(ids)
    if not start:
        raise OverspillError(f"{path}: no examples (only blank lines); expected one {_FIELDS} a line")
    return Dataset(path, "jsonl", seq_len, pad_id, np.frombuffer(buf, dtype=np.int32),
                   np.frombuffer(start, dtype=np.int64), np.frombuffer(length, dtype=np.int32),
                   np.frombuffer(loss_from, dtype=np.int32))


def _suggest(positions: int, max_positions: int) -> str:
    if positions <= max_positions:
        return f"a shorter example, or --seq-len {positions} or more (up to {max_positions}, the model's context)"
    return f"a shorter example (at most {max_positions} positions, the model's context)"


def _encode_row(obj, where: str, tokenizer, eos_id: int | None) -> tuple[list[int], int]:
    """One JSONL object -> (token ids, first position with loss)."""
    if not isinstance(obj, dict):
        raise OverspillError(f"{where}: a JSON {_json_type(obj)}, not an object; expected {_FIELDS}")
    eos = [] if eos_id is None else [eos_id]
    if "text" in obj:
        if "prompt" in obj or "completion" in obj:
            raise OverspillError(f'{where}: both "text" and "prompt"/"completion"; expected {_FIELDS}, not both')
        ids = tokenizer.encode(_string(obj, "text", where), add_special_tokens=True) + eos
        if len(ids) < 2:
            raise OverspillError(f'{where}: "text" gives {len(ids)} token(s); expected at least 2 (one to read, '
                                 f'one to predict)')
        return ids, 0
    if "prompt" in obj and "completion" in obj:
        prompt = tokenizer.encode(_string(obj, "prompt", where), add_special_tokens=True)
        completion = tokenizer.encode(_string(obj, "completion", where), add_special_tokens=False)
        if not completion:
            raise OverspillError(f'{where}: "completion" tokenizes to no tokens; expected a non-empty completion')
        ids = prompt + completion + eos
        if len(ids) < 2:
            raise OverspillError(f'{where}: prompt and completion give 1 token; expected at least 2 (one to read, '
                                 f'one to predict)')
        return ids, max(len(prompt) - 1, 0)
    if "prompt" in obj or "completion" in obj:
        missing = "completion" if "prompt" in obj else "prompt"
        raise OverspillError(f'{where}: no "{missing}" field; expected {_FIELDS}')
    have = ", ".join(json.dumps(k) for k in list(obj)[:6]) or "no fields"
    raise OverspillError(f"{where}: object has {'fields ' if obj else ''}{have}; expected {_FIELDS}")


def _string(obj: dict, key: str, where: str) -> str:
    v = obj[key]
    if not isinstance(v, str):
        raise OverspillError(f'{where}: "{key}" is a JSON {_json_type(v)}; expected a string')
    return v


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(v), type(v).__name__)


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise OverspillError(f"batch size {batch_size}: expected a positive number of rows")
    return batch_size
