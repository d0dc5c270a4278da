"""The public Python API: ``overspill.load(path, dtype=...)`` -> Model."""
from __future__ import annotations

import os
from importlib import resources
from typing import Iterator, Sequence

import torch

from .config import ModelConfig
from .errors import OverspillError
from .generate import GenerationConfig, generate_ids, stream_ids
from .generate.beam import beam_search
from .model.weights import MakeLinear, default_make_linear
from .runtime.executor import Executor
from .tokenizer import Detokenizer, Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_model_path() -> str:
    """The built-in GPT-NeoX model trained on Shakespeare (package data)."""
    return str(resources.files("overspill") / "data" / "shakespeare")


def resolve_dtype(dtype: str | torch.dtype, ckpt) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        stored = ckpt.stored_dtype()
        return torch.bfloat16 if stored in (torch.bfloat16, torch.float16) else torch.float32
    if dtype not in DTYPES:
        raise OverspillError(f"unknown dtype '{dtype}' (expected auto, float32, bfloat16 or float16)")
    return DTYPES[dtype]


class Model:
    """A loaded model: logits, generation and streaming over one shared decoder."""

    def __init__(self, cfg: ModelConfig, executor: Executor, tokenizer: Tokenizer | None, path: str,
                 generation_defaults: dict | None = None):
        self.config, self.executor, self.tokenizer, self.path = cfg, executor, tokenizer, path
        self.generation_defaults = generation_defaults or {}
        self.last_stats: dict = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.executor.dtype

    # -- text <-> ids -------------------------------------------------------------------
    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise OverspillError(f"{self.path}: missing tokenizer.json (pass token ids instead of text)")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tok().encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok().decode(list(ids))

    # -- forward ------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] (left-padded if attention_mask is given) -> float32 logits [B, T, V]."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        B, T = ids.shape
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise OverspillError(f"input_ids must lie in [0, {self.config.vocab_size})")
        cache = self.executor.new_cache(B, T)
        if attention_mask is not None:
            m = torch.as_tensor(attention_mask).bool()
            cache.key_valid = m.clone()
            positions = (m.long().cumsum(-1) - 1).clamp(min=0)
        else:
            positions = torch.arange(T)[None].expand(B, T)
        return self.executor.forward(ids, positions, cache)

    # -- generation -----------------------------------------------------------------------
    def _gen_config(self, **kw) -> GenerationConfig:
        eos = kw.pop("eos_token_ids", None)
        if eos is None:
            eos = self.generation_defaults.get("eos_token_ids") or self.config.eos_token_ids
        stop = kw.pop("stop", None) or []
        return GenerationConfig(eos_token_ids=list(eos), stop=[stop] if isinstance(stop, str) else list(stop),
                                **kw).validate()

    def _prompt_ids(self, prompts) -> tuple[list[list[int]], bool]:
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            raise OverspillError("prompts must be a list of strings or a list of token-id lists")
        if all(isinstance(p, str) for p in prompts):
            return [self.encode(p) for p in prompts], True
        if all(isinstance(p, (list, tuple)) or torch.is_tensor(p) for p in prompts):
            return [[int(t) for t in p] for p in prompts], False
        raise OverspillError("prompts must be a list of strings or a list of token-id lists, not a mix")

    def generate(self, prompts: list[str] | list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, num_beams: int = 1,
                 stop: list[str] | str | None = None, seed: int | None = None, ignore_eos: bool = False,
                 length_penalty: float = 1.0) -> list[str] | list[list[int]]:
        """One entry per prompt: the new text (string prompts) or the new token ids (id prompts)."""
        ids, as_text = self._prompt_ids(prompts)
        gc = self._gen_config(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, num_beams=num_beams, stop=stop, seed=seed,
                              ignore_eos=ignore_eos, length_penalty=length_penalty)
        stats: dict = {}
        decode = self.decode if (as_text or gc.stop) else None
        if gc.num_beams > 1:
            outs, cuts = beam_search(self.executor, ids, gc, stats), [None] * len(ids)
        else:
            outs, cuts = generate_ids(self.executor, ids, gc, decode, stats)
        self.last_stats = stats
        if not as_text:
            return outs
        texts = []
        for out, cut in zip(outs, cuts):
            text = self.decode(out)
            texts.append(text[:cut] if cut is not None else text)
        return texts

    def stream(self, prompt: str | list[int], **kw) -> Iterator[str]:
        """Yield the new text piece by piece (never a split character; stop strings withheld)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        gc = self._gen_config(**kw)
        if gc.num_beams > 1:
            raise OverspillError("streaming supports num_beams=1 only")
        detok = Detokenizer(self._tok(), ids)
        held = ""          # text that might be the start of a stop string
        self.last_stats = {}
        for tok in stream_ids(self.executor, ids, gc, self.decode if gc.stop else None, self.last_stats):
            if tok in gc.eos_token_ids and not gc.ignore_eos:
                break
            held += detok.push(tok)
            for s in gc.stop:
                if s in held:
                    yield held[: held.find(s)]
                    return
            keep = max((k for s in gc.stop for k in range(len(s), 0, -1) if held.endswith(s[:k])), default=0)
            if len(held) > keep:
                yield held[: len(held) - keep]
                held = held[len(held) - keep:]
        held += detok.flush()
        if held:
            yield held



def quantized_make_linear(scheme: str, include_head: bool = False) -> MakeLinear:
    """Quantize each block matmul weight at load time (the LM head stays dense unless include_head)."""
    from . import quant

    if scheme not in quant.SCHEMES:
        raise OverspillError(f"unknown quantization scheme '{scheme}' (expected one of {', '.join(quant.SCHEMES)})")

    def make(name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        if name == "lm" and not include_head:
            return default_make_linear(name, weight, bias)
        try:
            # the quantized tensors are ours: convert them to the kernels' layout in place (no second copy)
            return quant.make_linear(scheme, quant.quantize(weight, scheme), bias, repack="inplace")
        except ValueError as e:
            raise OverspillError(f"cannot quantize '{name}' {list(weight.shape)} as {scheme}: {e}") from None

    return make


def load(path: str | os.PathLike | None = None, dtype: str | torch.dtype = "auto", *,
         max_memory: str | dict | None = None, quantize: str | None = None, quantize_head: bool = False,
         max_batch_size: int = 1, max_seq_len: int | None = None, kv_cache: str | None = None,
         make_linear: MakeLinear | None = None) -> Model:
    """Load a Hugging Face checkpoint directory or an overspill layer store (the built-in model when path is None).

    dtype: "auto" (bfloat16 for 16-bit checkpoints, else float32), "float32", "bfloat16", "float16".
    max_memory: budgets like "cpu=4GiB" (or {"cpu": 4 << 30} or {"cpu": "4GiB"}); what does not fit is streamed from disk.
      Budgets cover weights, staging buffers, the KV cache for max_batch_size x max_seq_len tokens,
      and activations; requests larger than that reserve are refused.
    quantize: int8 | int4 | int8-dynamic | nf4 for the block matmul weights.
    quantize_head: the LM head in the same scheme too (as llama.cpp's quantized files do); a layer store keeps
      the head it was converted with (``overspill convert --quantize-head``).
    kv_cache: None (the compute dtype) or "int8": keys and values rounded per head and slot, a bit over half the
      bytes of bf16 (model/kv_cache.QuantKV), so a budget holds about twice the batch x length.
    """
    from .model.kv_cache import check_kv_format
    from .runtime.loader import Reserve, build

    path = str(path) if path is not None else default_model_path()
    budgets = None
    if max_memory is not None:
        from .placement import parse_memory
        from .placement.planner import parse_size
        try:   # "cpu=4GiB,..." or {"cpu": 4 << 30} or, as accelerate takes it, {"cpu": "4GiB"}
            budgets = parse_memory(max_memory) if isinstance(max_memory, str) else \
                {str(k): parse_size(v) if isinstance(v, str) else v for k, v in dict(max_memory).items()}
        except ValueError as e:
            raise OverspillError(f"max_memory: {e}; expected sizes like 4GiB") from None
    reserve = Reserve(max_batch_size, max_seq_len or 1024, kv_format=check_kv_format(kv_cache))
    try:
        cfg, executor, plan, src = build(path, dtype, quantize, budgets, reserve, make_linear,
                                         quantize_head=quantize_head)
    except ValueError as e:   # PlanError and friends carry one clear line
        if isinstance(e, OverspillError):
            raise
        raise OverspillError(str(e)) from None
    executor.reserve = reserve if budgets is not None else None
    executor.kv_format = kv_cache
    tok = Tokenizer(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
    gen = {}
    gcfg = getattr(src, "generation_config", None) or {}
    if gcfg.get("eos_token_id") is not None:
        e = gcfg["eos_token_id"]
        gen["eos_token_ids"] = e if isinstance(e, list) else [e]
    model = Model(cfg, executor, tok, path, gen)
    model.plan = plan
    return model
