"""Thin wrapper over the ``tokenizers`` library, plus an incremental detokenizer for streaming."""
from __future__ import annotations

import os

from .errors import CheckpointError


class Tokenizer:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tok

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise CheckpointError(f"{file}: missing tokenizer.json (pass token ids instead of text, or add the file)")
        try:
            self.tok = _Tok.from_file(file)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot load tokenizer ({str(e).splitlines()[0][:200]})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


class Detokenizer:
    """Turns a growing list of token ids into text pieces, never splitting a character.

    Byte-level BPE can spread one UTF-8 character over several tokens; decoding a prefix
    then ends in U+FFFD. We decode a short window (from ``prefix`` to the end) and emit the
    new part only once it no longer ends in U+FFFD, as vLLM's incremental detokenizer does.
    Decoding a window rather than one token keeps merges that depend on the left context
    (e.g. SentencePiece's leading-space handling) right.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None):
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids or [])[-4:]   # a little left context
        self.prefix = 0                                     # window start
        self.read = len(self.ids)                           # ids before this are emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]
