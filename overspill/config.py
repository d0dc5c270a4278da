"""The one model config every architecture maps onto.

Architectures differ only in data: which norm, which MLP, how residuals combine,
how much of each head is rotated. ``families/*.py`` map a Hugging Face
``config.json`` onto this dataclass; the decoder reads nothing else.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    family: str                    # registry key: "gptj" | "gpt_neox" | "gpt2" | "llama"
    vocab_size: int
    hidden_size: int               # C, the residual stream width
    n_layers: int
    n_heads: int                   # query heads
    n_kv_heads: int                # key/value heads (< n_heads: grouped-query attention)
    head_dim: int                  # hs; n_heads * head_dim need not equal hidden_size (Llama head_dim)
    intermediate_size: int         # MLP width
    max_positions: int             # context length the checkpoint was trained for
    norm: str = "layernorm"        # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"       # "gelu" (erf) | "gelu_tanh" | "silu" | "relu"
    gated_mlp: bool = False        # SwiGLU: down(act(gate(x)) * up(x)), gate and up fused as one [2F, C] weight
    parallel_residual: bool = False  # x + attn(n1(x)) + mlp(n2(x)) instead of sequential residuals
    shared_norm: bool = False      # GPT-J: one norm feeds both attention and MLP (needs parallel_residual)
    rotary_dim: int = 0            # leading dims of each head that get rotary embeddings; 0 = none
    rope_theta: float = 10000.0
    rope_scale: float = 1.0        # linear position interpolation factor (rope_scaling type "linear")
    learned_positions: bool = False  # GPT-2: absolute position embedding table
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = True         # LayerNorm has a bias; RMSNorm does not
    lm_head_bias: bool = False     # GPT-J's lm_head has one
    tie_embeddings: bool = False   # the LM head reuses the token embedding matrix
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, if config.json says

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def validate(self) -> "ModelConfig":
        from .errors import ConfigError

        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ConfigError(f"config.json: {what}")

        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "intermediate_size", "max_positions"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.n_heads % self.n_kv_heads == 0,
             f"num_attention_heads ({self.n_heads}) must be a multiple of num_key_value_heads ({self.n_kv_heads})")
        need(0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
             f"rotary dims ({self.rotary_dim}) must be even and at most head_dim ({self.head_dim})")
        need(self.norm in ("layernorm", "rmsnorm"), f"unknown norm {self.norm!r}")
        need(self.activation in ("gelu", "gelu_tanh", "silu", "relu"), f"unsupported activation {self.activation!r}")
        need(not self.shared_norm or self.parallel_residual, "a shared norm needs parallel residuals")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)
