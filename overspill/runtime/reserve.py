"""What the runtime holds besides weights, for the largest request it accepts: the KV cache, activations, the LM
head's output chunk and the quantized formats' dequantization scratch. The planner subtracts this from the budgets
before it places a single weight, so a budget counts everything."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..model.kv_cache import KVCache
from ..model.weights import linear_shapes


def _es(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class Reserve:
    """The largest request a loaded model accepts, and the memory it needs for it.

    A forward over B sequences of T tokens runs each block over micro-batches of max(1, micro_tokens // T)
    sequences (FlexGen's block schedule: the block's weights serve every micro-batch before the next block), so
    a large prompt batch needs activations for about micro_tokens tokens, not B x T. The LM head runs over at most
    max(head_tokens, max_batch) tokens at a time, so a forward over many tokens never builds [B, T, V] logits
    inside the runtime (``Model.logits`` returns them: that tensor is the caller's; ``eval`` never holds it).
    A decode step's float32 last-token logits are counted for max_batch rows; a wider batch of shorter sequences
    (which the KV reserve also admits) returns B x V of them, outside the count."""
    max_batch: int = 1
    max_seq_len: int = 1024
    micro_tokens: int = 1024
    kv_format: str | None = None      # None: the compute dtype; "int8": model/kv_cache.QuantKV
    head_tokens: int = 64             # LM head chunk: from ~16 tokens a chunk's matmul, not its weight read, dominates
    quantize: str | None = None       # the block linears' scheme: int8-dynamic / nf4 prefill dequantizes into scratch
    quantize_head: bool = False       # the LM head in that scheme too
    training: bool = False            # a training step (finetune/backward.py) rather than inference: see train_bytes
    keep_graphs: bool = False         # training without gradient checkpointing: every block's graph is held
    train_dtype: torch.dtype | None = None   # a training step's activations when not the weights' dtype (float32
                                             # for a 16-bit base on a CPU without native bf16: finetune.compute_dtype)
    extra_bytes: int = 0              # held besides (a LoRA adapter's parameters, gradients, optimizer state)

    def kv_bytes_per_block(self, cfg: ModelConfig, dtype: torch.dtype) -> int:
        if self.training:   # a training step runs without a cache
            return 0
        return KVCache.nbytes_for(cfg, self.max_batch, self.max_seq_len, dtype, self.kv_format) // cfg.n_layers

    def micro_batch(self, T: int) -> int:
        """Sequences per micro-batch for a forward over T new tokens."""
        return max(1, self.micro_tokens // max(1, T))

    def activation_bytes(self, cfg: ModelConfig, dtype: torch.dtype) -> int:
        """Peak transient tensors of one block over the largest micro-batch (rows x T tokens, T up to max_seq_len):
        residual, norm output, qkv, attention output and scores, MLP hidden (x2 for a gated MLP), plus the whole
        batch's hidden state, one LM-head chunk (its output and the float32 copy) with the float32 last-token
        logits a decode step returns, and the dequantization scratch of the quantized formats that have it."""
        L = self.max_seq_len
        tok = max(min(self.max_batch * L, self.micro_tokens), L)     # rows * T over every T <= L
        es = _es(dtype)
        per_tok = (3 * cfg.hidden_size + cfg.q_size + 2 * cfg.kv_size + 2 * cfg.intermediate_size * (2 if cfg.gated_mlp else 1)) * es
        scores = tok * cfg.n_heads * L * 4 if L > 1 else 0
        batch_x = 2 * self.max_batch * L * cfg.hidden_size * es       # the batch's hidden state, in and out
        head = self.head_tokens * cfg.vocab_size * (es + 4) + self.max_batch * cfg.vocab_size * 4
        # an int8 cache is read back dequantized: one micro-batch's keys and values over all L slots
        kv_read = 2 * min(self.max_batch, self.micro_tokens) * L * cfg.kv_size * es if self.kv_format else 0
        return tok * per_tok + scores + batch_x + head + kv_read + self.scratch_bytes(cfg, dtype) + \
            self.train_bytes(cfg, dtype) + self.extra_bytes

    def train_bytes(self, cfg: ModelConfig, dtype: torch.dtype) -> int:
        """A training step's own memory: each block's saved input (gradient checkpointing), and the graph of the
        block being recomputed (about twice one forward's activations: the saved tensors and their gradients),
        float32 attention scores and their gradient included; without checkpointing (keep_graphs) what every block's
        graph saves, and one block's gradients at a time. The KV cache is never allocated for training."""
        if not self.training:
            return 0
        tok, es = self.max_batch * self.max_seq_len, _es(self.train_dtype or dtype)
        saved = cfg.n_layers * tok * cfg.hidden_size * es
        per_tok = (3 * cfg.hidden_size + cfg.q_size + 2 * cfg.kv_size + 2 * cfg.intermediate_size * (2 if cfg.gated_mlp else 1)) * es
        scores = 2 * self.max_batch * cfg.n_heads * self.max_seq_len ** 2 * 4
        # a quantized linear's input gradient multiplies by its weight dequantized to float32, one weight at a time
        deq = 4 * max(N * K for N, K in linear_shapes(cfg, "block.0").values()) if self.quantize else 0
        graph = 2 * tok * per_tok + scores
        if self.keep_graphs:
            # what a block's graph saves, every block: measured 1.5-1.6 x per_tok in float32 and 1.8-2.0 x in 16 bits
            # (GPT-J and Llama blocks, LoRA with dropout on every linear: the masks and softmax stay float32 or bool,
            # the adapter keeps its input as it came, lora._Pair)
            kept = tok * 5 * per_tok // 2 + scores // 2
            return cfg.n_layers * kept + graph + deq
        return saved + graph + deq

    def scratch_bytes(self, cfg: ModelConfig, dtype: torch.dtype) -> int:
        """The quantized formats' per-thread dequantization buffers (kept for reuse, sized by the largest linear)."""
        if self.quantize is None:   # bf16 prefill and training on a CPU without native bf16 convert slices to fp32
            from ..kernels import f32_slice_rows      # (with it, training keeps the weights row-major: loader.py)
            from ..model.linear import bf16_native
            if dtype != torch.bfloat16 or bf16_native():
                return 0
            shapes = list(linear_shapes(cfg, "block.0").values()) + list(linear_shapes(cfg, "head").values())
            return 4 * max(min(N, f32_slice_rows(K)) * K for N, K in shapes)
        from .. import quant
        shapes = list(linear_shapes(cfg, "block.0").values()) + (list(linear_shapes(cfg, "head").values())
                                                                 if self.quantize_head else [])
        return max((quant.scratch_nbytes_for(self.quantize, N, K, dtype) for N, K in shapes), default=0)
