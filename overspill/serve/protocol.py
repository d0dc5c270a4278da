"""The OpenAI request bodies as pydantic models: validation is data, and every bad field becomes a 400 naming it.

Fields a client may send that overspill does not act on (``user``, ``logit_bias`` left empty, ...) are accepted and
ignored, as OpenAI's own clients send some of them by default. ``top_k``, ``repetition_penalty``, ``ignore_eos`` and
``stop_token_ids`` are extensions (as vLLM has them).
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import APIError

MAX_N = 16             # choices per prompt
MAX_LOGPROBS = 5       # completions: top alternatives per token (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # chat: top alternatives per token (OpenAI's limit)
MAX_STOP = 4           # stop strings (OpenAI's limit)



class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """What completions and chat share."""
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="extension: sample from the k most likely tokens (0 or -1: off)")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="extension: CTRL's penalty on tokens "
                                      "already in the prompt or the text (1: off)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past the end-of-text token")
    stop_token_ids: list[int] | None = Field(None, validate_default=True, description="extension: token ids that end the text")
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, description="not supported: only empty")

    def check(self) -> None:
        """What one field cannot say alone, and what is accepted only in its default form."""
        if self.logit_bias:
            raise APIError(400, "logit_bias: not supported", "logit_bias")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(v)}")
        if any(not s for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids are >= 0")
        return v or []

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    """POST /v1/completions."""
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0, description="new tokens per choice; 0 with echo scores the prompt")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("the prompt list is empty")
        if isinstance(v, list) and isinstance(v[0], int) and any(t < 0 for t in v):
            raise ValueError("token ids are >= 0")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p or min(p) < 0 for p in v):
            raise ValueError("each token-id list needs at least one id, all >= 0")
        return v

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of: only best_of == n is supported", "best_of")
        if self.suffix:
            raise APIError(400, "suffix: inserting text (suffix) is not supported", "suffix")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a token-id list."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = Field(True, description="extension: end the prompt with the assistant's cue")
    tools: list[dict] | None = Field(None, description="not supported: only empty")
    response_format: dict | None = Field(None, description='not supported beyond {"type": "text"}')

    def check(self) -> None:
        super().check()
        if self.tools:
            raise APIError(400, "tools: function calling is not supported", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format: only {\"type\": \"text\"} is supported", "response_format")
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Body):
    """POST /tokenize: text, or chat messages rendered through the chat template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "prompt: give either prompt or messages", "prompt")


class DetokenizeRequest(_Body):
    """POST /detokenize."""
    model: str | None = None
    tokens: list[int]
