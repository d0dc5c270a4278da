"""The public Python API: ``overspill.load(path, dtype=...)`` -> Model."""
from __future__ import annotations

import os
from importlib import resources
from typing import Iterator, Sequence

import torch

from .config import ModelConfig
from .errors import OverspillError
from .generate import GenerationConfig, generate_ids, stream_ids
from .model.weights import LinearHook
from .runtime.executor import Executor
from .tokenizer import Detokenizer, Tokenizer


def default_model_path() -> str:
    """The built-in GPT-NeoX model trained on Shakespeare (package data)."""
    return str(resources.files("overspill") / "data" / "shakespeare")


class Model:
    """A loaded model: logits, generation and streaming over one shared decoder.

    ``close()`` (or ``with overspill.load(...) as m:``, or dropping the last reference) stops the streaming reader
    thread and frees its staging buffers and open files; a closed model refuses further work."""

    def __init__(self, cfg: ModelConfig, executor: Executor, tokenizer: Tokenizer | None, path: str,
                 generation_defaults: dict | None = None, plan=None):
        self.config, self.executor, self.tokenizer, self.path = cfg, executor, tokenizer, path
        self.generation_defaults = generation_defaults or {}
        self.plan = plan          # placement.Plan under memory budgets, else None
        self.adapter = None       # the LoRA adapter applied (finetune.lora.LoraAdapter), if any
        self.last_stats: dict = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.executor.dtype

    def close(self) -> None:
        """Free the reader thread, staging buffers and files now (idempotent)."""
        self.executor.close()

    def wait_loaded(self) -> "Model":
        """Until every resident weight is read (a background load's error, if any, is raised here)."""
        wait = getattr(self.executor.source, "wait_loaded", None)
        if wait is not None:
            wait()
        return self

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
    def _full_pass(self, input_ids, attention_mask):
        """(ids [B, T], positions, a fresh cache) for a forward over whole sequences."""
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
        return ids, positions, cache

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] (left-padded if attention_mask is given) -> float32 logits [B, T, V].

        The returned tensor is the caller's memory (B x T x V x 4 bytes), outside any budget; inside the runtime the
        LM head runs over a bounded chunk of tokens at a time. To score text, ``logprobs`` never builds it."""
        ids, positions, cache = self._full_pass(input_ids, attention_mask)
        return self.executor.forward(ids, positions, cache)

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p(input_ids[:, t + 1] | input_ids[:, :t + 1]) for t < T - 1: float32 [B, T - 1].

        Computed from each LM-head chunk as it is produced: the [B, T, V] logits never exist at once."""
        ids, positions, cache = self._full_pass(input_ids, attention_mask)
        B, T = ids.shape
        out = torch.empty(B, max(T - 1, 0), dtype=torch.float32)

        def consume(t0: int, t1: int, logits: torch.Tensor) -> None:
            t1 = min(t1, T - 1)                          # the last position predicts nothing in the input
            if t1 > t0:
                lp = logits[:, : t1 - t0].log_softmax(-1)                            # (B, t1-t0, V)
                out[:, t0:t1] = lp.gather(-1, ids[:, t0 + 1:t1 + 1, None]).squeeze(-1)
        self.executor.forward(ids, positions, cache, consume=consume)
        return out

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
                 stop: list[str] | str | None = None, seed: int | list[int] | None = None, ignore_eos: bool = False,
                 length_penalty: float = 1.0) -> list[str] | list[list[int]]:
        """One entry per prompt: the new text (string prompts) or the new token ids (id prompts).

        ``seed``: an int seeds every sequence alike (a prompt samples the same tokens alone or in
        any batch), a list gives one seed per prompt, None draws an independent seed per sequence.
        A stop string ends a sequence (beam hypotheses too); the text is cut before it."""
        ids, as_text = self._prompt_ids(prompts)
        gc = self._gen_config(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, num_beams=num_beams, stop=stop, seed=seed,
                              ignore_eos=ignore_eos, length_penalty=length_penalty)
        stats: dict = {}
        decode = self.decode if (as_text or gc.stop) else None
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
        from dataclasses import replace

        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        gc = self._gen_config(**kw)
        if gc.num_beams > 1:
            raise OverspillError("streaming supports num_beams=1 only")
        detok = Detokenizer(self._tok(), ids)
        held = ""          # text that might be the start of a stop string
        self.last_stats = {}
        # Stop strings are found below, in the streamed text; stream_ids handles EOS and the length.
        for tok in stream_ids(self.executor, ids, replace(gc, stop=[]), None, self.last_stats):
            if tok in gc.eos_token_ids and not gc.ignore_eos:
                break
            held += detok.push(tok)
            hits = [i for i in map(held.find, gc.stop) if i >= 0]
            if hits:                                   # the earliest stop string, as generate() cuts
                yield held[: min(hits)]
                return
            keep = max((k for s in gc.stop for k in range(len(s), 0, -1) if held.endswith(s[:k])), default=0)
            if len(held) > keep:
                yield held[: len(held) - keep]
                held = held[len(held) - keep:]
        held += detok.flush()
        if held:
            yield held



def load(path: str | os.PathLike | None = None, dtype: str | torch.dtype = "auto", *,
         max_memory: str | dict | None = None, quantize: str | None = None, quantize_head: bool = False,
         max_batch_size: int = 1, max_seq_len: int | None = None, kv_cache: str | None = None,
         linear_hook: LinearHook | None = None, stand_in: dict[str, str] | None = None,
         background: bool = True, adapter: str | os.PathLike | None = None, pp: int | None = None,
         pp_timeout: float | None = None, tp: int | None = None) -> Model | None:
    """Load a Hugging Face checkpoint directory or an overspill layer store (the built-in model when path is None).

    dtype: "auto" (bfloat16 for 16-bit checkpoints, else float32), "float32", "bfloat16", "float16".
    max_memory: budgets like "cpu=4GiB" (or {"cpu": 4 << 30} or {"cpu": "4GiB"}); what does not fit is streamed from disk.
      "cpu=auto": this process's memory cgroup limit (else the RAM available) less ~0.45 GiB for the process itself.
      Budgets cover weights, staging buffers, the KV cache for max_batch_size x max_seq_len tokens,
      and activations; requests larger than that reserve are refused.
    quantize: int8 | int4 | int8-dynamic | nf4 for the block matmul weights.
    quantize_head: the LM head in the same scheme too (as llama.cpp's quantized files do); a layer store keeps
      the head it was converted with (``overspill convert --quantize-head``).
    kv_cache: None (the compute dtype) or "int8": keys and values rounded per head and slot, a bit over half the
      bytes of bf16 (model/kv_cache.QuantKV), so a budget holds about twice the batch x length.
    linear_hook: ``hook(unit, name, linear) -> linear``, applied to every matmul of every unit wherever it lives
      (resident, held in host RAM, streamed from disk; unit "block.N" or "head", name qkv|out|up|down|lm): how
      adapters such as LoRA wrap the base weights. Resident units are hooked once at load; streamed and host-held
      units every forward, as their weights arrive (keep the hook cheap: look adapters up, don't build them).
    stand_in: run a plan made for devices this machine lacks on ones it has, e.g. {"cuda:0": "cpu"} (testing).
    adapter: a LoRA adapter directory (PEFT's files, as ``overspill finetune`` or PEFT's save_pretrained write them):
      applied unmerged to the base in whatever format and tier it has (``overspill merge`` writes a merged copy).
    background: on the CPU, return once the plan is made and read the resident weights on a thread while the first
      forward runs, each unit computed as soon as it is in (the first token then costs about one read of the
      checkpoint, not a load followed by a pass); an unreadable weight is reported by the forward that needs it.
      False: read everything before returning (``Model.wait_loaded()`` does that for a background load).
    pp: pipeline stages, one process each, started by torchrun (overspill/parallel): every rank calls load() alike;
      each loads only its range of the units under its own budget (max_memory: one spec for all, or one per rank
      separated by ';', e.g. "cpu=5GiB;cpu=4GiB"). Rank 0 gets the Model; on the other ranks load() serves rank 0's
      steps until rank 0 closes the model (or exits), then returns None.
    pp_timeout: seconds a silent rank is waited for before every rank ends with one line (default 30, or
      $OVERSPILL_PP_TIMEOUT); tensor parallel runs too.
    tp: tensor-parallel ranks, one process each, started by torchrun (Megatron-style, parallel/tensor_run.py): every
      rank loads the embedding and head whole and its share of each block's heads and MLP from a Hugging Face
      directory (quantize: on the fly, after sharding), and every step runs on every rank with one all-reduce per
      sublayer. As with pp, rank 0 gets the Model and the others return None when it closes. With pp too: pp stages
      of tp ranks each (pp x tp processes, rank = stage * tp + t; max_memory per rank as for pp).
      An ``adapter`` is sharded with the weights (each rank adds its part of every LoRA product).
      pp=1 or tp=1 given explicitly under a launcher (torchrun --nproc-per-node 1) joins a group of one and runs the
      tensor-parallel executor with its collectives (NCCL on a GPU), as N ranks would: a check of a machine's setup.
    """
    from .model.kv_cache import check_kv_format
    from .runtime.loader import Reserve, build

    path = str(path) if path is not None else default_model_path()
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    asked = pp is not None or tp is not None
    pp, tp = pp or 1, tp or 1
    distributed = pp * tp > 1 or (launched and asked)
    tensor = distributed and pp == 1         # one rank in all: the tensor-parallel executor (its collectives run)
    if (tensor or tp > 1) and linear_hook is not None:
        raise OverspillError(f"--tp {tp}: a linear hook wraps whole linears; a tensor-parallel rank holds shards "
                             f"(pass adapter=, which is sharded with the weights)")
    if distributed:
        from .parallel import rank_budgets
        budgets = [_budgets(b) for b in rank_budgets(max_memory, pp * tp)]
    else:
        budgets = _budgets(max_memory)
    reserve = Reserve(max_batch_size, max_seq_len or 1024)
    lora = None
    if adapter is not None:
        if linear_hook is not None:
            raise OverspillError("pass either adapter or linear_hook, not both")
        from .finetune.lora import LoraAdapter
        from .runtime.loader import open_source

        t = int(os.environ.get("RANK", 0)) % tp      # this rank's place in its tensor-parallel group
        src = open_source(path, dtype, quantize, (t, tp) if tp > 1 else None)
        cfg = src.ckpt.config
        if hasattr(src.ckpt, "close"):
            src.ckpt.close()
        lora = LoraAdapter.load(str(adapter), cfg).shard_(t, tp)
        linear_hook = lora.hook
    try:
        if tensor:
            from .parallel import load_tensor
            built = load_tensor(path, dtype, quantize, budgets, reserve, tp=tp, timeout=pp_timeout,
                                quantize_head=quantize_head, stand_in=stand_in, kv_cache=check_kv_format(kv_cache),
                                linear_hook=linear_hook)
        elif distributed:
            from .parallel import load_stage
            built = load_stage(path, dtype, quantize, budgets, reserve, stages=pp, timeout=pp_timeout,
                               quantize_head=quantize_head, linear_hook=linear_hook, stand_in=stand_in,
                               kv_cache=check_kv_format(kv_cache), tp=tp)
        else:
            built = build(path, dtype, quantize, budgets, reserve, quantize_head=quantize_head,
                          linear_hook=linear_hook, stand_in=stand_in, kv_cache=check_kv_format(kv_cache),
                          background=background)
    except ValueError as e:   # PlanError and friends carry one clear line
        if isinstance(e, OverspillError):
            raise
        raise OverspillError(str(e)) from None
    tok = Tokenizer(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
    gen = {}
    gcfg = getattr(built.checkpoint, "generation_config", None) or {}
    if gcfg.get("eos_token_id") is not None:
        e = gcfg["eos_token_id"]
        gen["eos_token_ids"] = e if isinstance(e, list) else [e]
    if lora is not None:
        from .model.weights import units
        lora.place(dict(zip(units(built.config), built.executor.unit_devices)))
    if distributed and hasattr(built.executor, "serve"):   # a parallel rank other than 0
        built.executor.serve()
        return None
    model = Model(built.config, built.executor, tok, path, gen, built.plan)
    model.adapter = lora
    return model


def _budgets(max_memory: str | dict | None) -> dict[str, int] | None:
    """"cpu=4GiB,..." or "cpu=auto" or {"cpu": 4 << 30} or, as accelerate takes it, {"cpu": "4GiB"} -> bytes."""
    if max_memory is None:
        return None
    from .placement import parse_memory, parse_size
    from .placement.machine import resolve_auto
    if isinstance(max_memory, str) and ";" in max_memory:
        raise OverspillError(f"max_memory {max_memory!r}: budgets per rank (separated by ';') are for pipeline "
                             f"parallel runs (--pp N / pp=N, --tp N / tp=N)")
    try:
        if isinstance(max_memory, str):
            return parse_memory(resolve_auto(max_memory))
        return {str(k): (parse_memory(resolve_auto(f"{k}=auto"))[str(k)] if v == "auto" else
                         parse_size(v) if isinstance(v, str) else v) for k, v in dict(max_memory).items()}
    except ValueError as e:
        raise OverspillError(f"max_memory: {e}; expected sizes like 4GiB") from None
