"""Thin wrapper over the ``tokenizers`` library, plus an incremental detokenizer for streaming."""
from __future__ import annotations

import os
from typing import Callable

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
    then ends in U+FFFD. We decode a short window (the ids of the last emitted piece plus
    the new ones) and emit the new part only once it no longer ends in U+FFFD, as vLLM's
    incremental detokenizer does. Decoding a window rather than one token keeps merges that
    depend on the left context (e.g. SentencePiece's leading-space handling) right; ids left
    of the window are dropped, so a push costs the same however long the text has grown.
    """

    __slots__ = ("decode", "ids", "read", "pending")

    def __init__(self, tokenizer: Tokenizer | Callable[[list[int]], str], prompt_ids: list[int] | None = None):
        self.decode: Callable[[list[int]], str] = getattr(tokenizer, "decode", tokenizer)
        self.ids: list[int] = list(prompt_ids or [])[-4:]   # the window: a little left context, then new ids
        self.read = len(self.ids)                           # ids before this are emitted
        self.pending = ""                                   # decoded but withheld (ends in a split character)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still split)."""
        self.ids.append(token_id)
        before = self.decode(self.ids[: self.read])
        after = self.decode(self.ids)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            del self.ids[: self.read]                       # the emitted ids become the next left context
            self.read, self.pending = len(self.ids), ""
            return after[len(before):]
        self.pending = after[len(before):]
        return ""

    def flush(self) -> str:
        """The withheld text, if any (the output ended inside a character)."""
        piece = self.decode(self.ids)[len(self.decode(self.ids[: self.read])):]
        del self.ids[: self.read]
        self.read, self.pending = len(self.ids), ""
        return piece

    def copy(self) -> "Detokenizer":
        """An independent copy (beam search forks a hypothesis's text state)."""
        d = Detokenizer.__new__(Detokenizer)
        d.decode, d.ids, d.read, d.pending = self.decode, self.ids.copy(), self.read, self.pending
        return d
