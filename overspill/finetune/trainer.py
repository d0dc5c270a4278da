"""The fine-tuning loop: ``finetune(model, data, output, ...)`` trains a LoRA adapter on a frozen base.

    load the base (any format, under --max-memory: resident or streamed)   check and tokenize all the data
        │                                                                       │ split off --eval-split
        ▼                                                                       ▼
    step: grad_accum batches ─► train_pass each (backward.py) ─► clip ─► optimizer ─► lr schedule
        │ every --save-every steps and at the end: eval loss, the adapter into OUTPUT (PEFT files), and
        ▼ OUTPUT/checkpoint/ (adapter, optimizer state, step, data position, RNG state, loss history), atomically
    --resume: continue from OUTPUT/checkpoint with the same settings; the loss curve is the uninterrupted one's

Everything that can be wrong with the inputs is checked before the first step (the data, the targets, the budget).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from ..errors import OverspillError
from ..io import map_large_allocations
from ..kernels import restart_kept_allocations, reuse_large_allocations
from ..runtime.reserve import Reserve
from .backward import eval_loss, train_pass, trains_in_float32
from .data import load_dataset
from .lora import LoraAdapter, LoraSettings
from .optim import make_optimizer

CHECKPOINT = "checkpoint"
STATE_FILE, TENSORS_FILE = "trainer_state.json", "trainer_tensors.pt"
QUANTIZE = ("int8", "int4", "nf4", "int8-dynamic", "none")


@dataclass
class TrainSettings:
    lora: LoraSettings = field(default_factory=LoraSettings)
    epochs: float = 1.0
    max_steps: int | None = None          # overrides epochs
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0                 # linear warm-up, then constant
    batch_size: int = 1                   # rows per forward
    grad_accum: int = 1                   # forwards per optimizer step
    seq_len: int = 256
    seed: int = 0
    eval_split: float = 0.05
    save_every: int | None = None         # steps; None: only at the end
    max_grad_norm: float | None = 1.0
    optim: str = "adamw"                  # adamw | adamw8bit
    grad_checkpoint: bool = True

    def check(self) -> "TrainSettings":
        for name, ok in (("batch_size", self.batch_size >= 1), ("grad_accum", self.grad_accum >= 1),
                         ("seq_len", self.seq_len >= 1), ("lr", self.lr > 0), ("epochs", self.epochs > 0),
                         ("max_steps", self.max_steps is None or self.max_steps >= 1),
                         ("save_every", self.save_every is None or self.save_every >= 1),
                         ("warmup_steps", self.warmup_steps >= 0)):
            if not ok:
                raise OverspillError(f"--{name.replace('_', '-')} {getattr(self, name)}: out of range")
        self.lora.check()
        return self

    def resume_key(self) -> dict:
        """What a resumed run must share with the run it continues (everything that shapes the loss curve)."""
        d = dataclasses.asdict(self)
        d.pop("save_every")
        d.pop("max_steps")
        d.pop("epochs")
        return d


@dataclass
class Result:
    output: str
    steps: int
    train_loss: float | None
    eval_loss: float | None
    history: list[dict]
    tokens_per_s: float
    peak_rss_bytes: int


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tokenizer(path: str):
    from ..tokenizer import Tokenizer
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise OverspillError(f"{path}: missing tokenizer.json (fine-tuning reads text, so the model directory needs "
                             f"its tokenizer)")
    return Tokenizer(path)


# bytes the reuse allocator may keep mapped beyond the step's peak in use (kernels.reuse_large_allocations): 1.2B LoRA
# step, bf16 / int8 base: 4.0-4.3 / 4.2-4.4 s with 16-32 MiB, 4.7-5.0 with none, 6.4 / 7.8 with fresh mappings
KEEP_SLACK = 16 << 20


def train_reserve(settings: TrainSettings, adapter_bytes: int, optim_bytes_per_param: float) -> Reserve:
    """What a training step holds besides weights, for the planner (see Reserve.training): the adapter with its
    gradients and optimizer state, and the freed blocks kept for reuse beyond the step's peak (KEEP_SLACK)."""
    return Reserve(settings.batch_size, settings.seq_len, training=True, keep_graphs=not settings.grad_checkpoint,
                   extra_bytes=int(adapter_bytes * (2 + optim_bytes_per_param / 4)) + KEEP_SLACK)


def _lr_at(settings: TrainSettings, step: int) -> float:
    """Linear warm-up over warmup_steps, then constant (step counts from 0)."""
    w = settings.warmup_steps
    return settings.lr * min(1.0, (step + 1) / w) if w else settings.lr


def _cuda_rng() -> dict[str, torch.Tensor]:
    """Each initialised GPU's generator state ({"rng.cuda:N": state}); none without CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {f"rng.cuda:{i}": torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())}


def _save_checkpoint(output: str, adapter: LoraAdapter, opt, state: dict) -> None:
    """OUTPUT/checkpoint, replaced as a whole: adapter, optimizer state, RNG state, trainer state."""
    from ..checkpoint.store import publish, staging_dir

    dst = os.path.join(output, CHECKPOINT)
    tensors = {"adapter": adapter.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
               **_cuda_rng()}
    tmp = staging_dir(dst, sum(t.numel() * t.element_size() for t in adapter.state_dict().values()) * 4)
    torch.save(tensors, os.path.join(tmp, TENSORS_FILE))
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)
    for name in (TENSORS_FILE, STATE_FILE):
        fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    publish(tmp, dst)


def _load_checkpoint(output: str) -> tuple[dict, dict]:
    d = os.path.join(output, CHECKPOINT)
    sf, tf = os.path.join(d, STATE_FILE), os.path.join(d, TENSORS_FILE)
    if not (os.path.isfile(sf) and os.path.isfile(tf)):
        raise OverspillError(f"{output}: no checkpoint to resume from (expected {d}/{STATE_FILE}; run without "
                             f"--resume to start)")
    try:
        with open(sf) as f:
            state = json.load(f)
        tensors = torch.load(tf, map_location="cpu", weights_only=True)   # tensors and numbers only, never code
    except Exception as e:
        raise OverspillError(f"{d}: unreadable checkpoint ({str(e).splitlines()[0][:200]})") from None
    return state, tensors


class _Progress:
    """A tqdm bar with loss, tokens/s and ETA on a terminal; one line per logged step otherwise (or nothing)."""

    def __init__(self, total: int, start: int, enabled: bool | None, log):
        from tqdm import tqdm
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, unit="step", desc="finetune", dynamic_ncols=True,
                        disable=not (tty if enabled is None else enabled))
        self.log = log if log is not None else ((lambda line: None) if tty else
                                                (lambda line: print(line, file=sys.stderr, flush=True)))

    def step(self, step: int, loss: float, tok_s: float, lr: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f}  {tok_s:,.0f} tok/s  lr {lr:.2e}", refresh=False)
        self.bar.update(1)

    def line(self, text: str) -> None:
        if not self.bar.disable:
            self.bar.write(text)
        else:
            self.log(text)

    def close(self) -> None:
        self.bar.close()


def finetune(model: str, data: str, output: str, settings: TrainSettings | None = None, *, dtype: str = "auto",
             quantize: str | None = None, quantize_head: bool = False, max_memory: dict[str, int] | None = None,
             resume: bool = False, progress: bool | None = None, log=None,
             stand_in: dict[str, str] | None = None) -> Result:
    """Train a LoRA adapter for ``model`` (a Hugging Face directory or layer store) on ``data`` (.txt or .jsonl,
    see data.py) and write it to ``output`` (PEFT's files), with a resumable checkpoint in ``output/checkpoint``.
    ``quantize``: the base's blocks in int8 / int4 / nf4 / int8-dynamic (frozen in that format); ``quantize_head``: its
    LM head too, and an untied token table in int8 (an HF directory's; a layer store is as converted). ``max_memory``:
    budgets in bytes ({"cpu": ...}); what does not fit is streamed from disk, for the forward and the backward.
    ``log``: a callable taking one line (default: stderr when it is not a terminal)."""
    from ..runtime.loader import build, open_source

    st = (settings or TrainSettings()).check()
    # a step's transients: large ones reused from kept mappings within the step's peak (kernels.alloc.cpp), the rest
    # back to the system when freed (io.py); glibc's heap would keep a fragmented 0.4 GiB more resident
    map_large_allocations()
    reuse_large_allocations(KEEP_SLACK)
    if quantize == "none":
        quantize = None
    if quantize is not None and quantize not in QUANTIZE:
        raise OverspillError(f"--quantize {quantize}: expected one of {', '.join(QUANTIZE)}")
    if quantize_head and quantize is None:
        raise OverspillError("--quantize-head needs a scheme for the head: add --quantize int8|int4|nf4|int8-dynamic")
    if os.path.isfile(output):
        raise OverspillError(f"{output}: is a file; expected a directory for the adapter")
    if not resume and os.path.isdir(os.path.join(output, CHECKPOINT)):
        raise OverspillError(f"{output}: holds a training checkpoint; pass --resume to continue it, or choose another "
                             f"--output")
    # 1. everything that can be wrong, before any weight is read
    src = open_source(model, dtype, quantize)
    cfg = src.ckpt.config
    close = getattr(src.ckpt, "close", None)
    if close is not None:
        close()
    tok = _tokenizer(model)
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    ds = load_dataset(data, tok, st.seq_len, cfg.max_positions, eos)
    train, held = ds.split(st.eval_split, st.seed)
    gen = torch.Generator().manual_seed(st.seed)
    adapter = LoraAdapter(cfg, st.lora, generator=gen, base_model=os.path.abspath(model))
    n_params = adapter.n_parameters()
    per_step = st.batch_size * st.grad_accum
    total = st.max_steps or max(1, math.ceil(st.epochs * len(train) / per_step))
    # 2. the base, planned with the training step's memory in the reserve
    reserve = train_reserve(st, n_params * 4, 2.0 if st.optim == "adamw8bit" else 8.0)
    on_cuda = any(str(d).startswith("cuda") and str(d) not in (stand_in or {}) for d in (max_memory or {}))
    if trains_in_float32(src.dtype, cpu_only=not on_cuda):
        reserve = dataclasses.replace(reserve, train_dtype=torch.float32)
    adapter.train()   # before the load: resident units then hold the trained norms themselves, not copies
    built = build(model, dtype, quantize, max_memory, reserve, quantize_head=quantize_head, linear_hook=adapter.hook,
                  stand_in=stand_in)
    ex = built.executor
    restart_kept_allocations()   # the load's transients set no line for the steps' kept blocks
    try:
        names = ["embed"] + [f"block.{i}" for i in range(cfg.n_layers)] + ["head"]
        adapter.place(dict(zip(names, ex.unit_devices)))
        opt = make_optimizer(st.optim, adapter.parameters(), st.lr, st.weight_decay)
        step, position, history = 0, (0, 0), []
        torch.manual_seed(st.seed)          # LoRA dropout draws from the global generator (saved with checkpoints)
        fingerprint = train.fingerprint
        key = {"model": os.path.abspath(model), "quantize": quantize, "data": fingerprint,
               "settings": st.resume_key()}
        if quantize_head:
            key["quantize_head"] = True
        key = json.loads(json.dumps(key))   # as it reads back from the checkpoint (tuples are lists there)
        if resume:
            state, tensors = _load_checkpoint(output)
            if state.get("key") != key:
                old = state.get("key", {})
                diff = [k for k in dict.fromkeys([*key, *old]) if old.get(k) != key.get(k)]
                raise OverspillError(f"{output}/{CHECKPOINT}: was trained with other {', '.join(diff)}; resume with "
                                     f"the same model, data and settings (or start a new --output)")
            adapter.load_state_dict(tensors["adapter"])
            opt.load_state_dict(tensors["optimizer"])
            torch.set_rng_state(tensors["rng"])
            for k, v in tensors.items():      # LoRA dropout on a GPU draws from that GPU's generator
                if k.startswith("rng.cuda:") and int(k.split(":")[1]) < torch.cuda.device_count():
                    torch.cuda.set_rng_state(v, int(k.split(":")[1]))
            step, position, history = state["step"], tuple(state["position"]), state["history"]
        bar = _Progress(total, step, progress, log)
        bar.line(f"finetune: {ds.summary()}; {len(train)} train / {len(held)} eval examples; LoRA r={st.lora.r} on "
                 f"{len(adapter.slots)} modules, {n_params:,} parameters; {total} steps of {per_step} rows"
                 + (f"; resuming at step {step}" if resume else ""))
        batches = train.batches(st.batch_size, st.seed, position)
        t_start, tokens_done, last_loss, ev = time.perf_counter(), 0, None, None
        adapter.train()
        while step < total:
            t0 = time.perf_counter()
            group = [next(batches) for _ in range(st.grad_accum)]
            n_tok = sum(b.loss_tokens for b in group)
            loss_sum = 0.0
            for b in group:
                s_, _ = train_pass(ex, b.input_ids, b.labels, checkpoint=st.grad_checkpoint,
                                   loss_scale=1.0 / max(n_tok, 1))
                loss_sum += s_
            if st.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(adapter.parameters(), st.max_grad_norm)
            lr = _lr_at(st, step)
            for gr in opt.param_groups:
                gr["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            position = tuple(group[-1].position)
            last_loss = loss_sum / max(n_tok, 1)
            dt = time.perf_counter() - t0
            tokens_done += sum(int(b.input_ids.numel()) for b in group)
            history.append({"step": step, "loss": last_loss, "tokens": n_tok, "lr": lr, "s": round(dt, 4)})
            bar.step(step, last_loss, sum(int(b.input_ids.numel()) for b in group) / dt, lr)
            if step == total or (st.save_every and step % st.save_every == 0):
                adapter.eval()
                ev = _evaluate(ex, held, st.batch_size)
                adapter.train()
                if ev is not None:
                    history[-1]["eval_loss"] = ev
                adapter.save(output)
                _save_checkpoint(output, adapter, opt, {"step": step, "position": list(position), "history": history,
                                                        "key": key, "total_steps": total})
                bar.line(f"step {step}/{total}: train loss {last_loss:.4f}"
                         + (f", eval loss {ev:.4f} (ppl {math.exp(min(ev, 50)):.2f})" if ev is not None else "")
                         + f"; saved {output}")
        bar.close()
        adapter.eval()
        elapsed = time.perf_counter() - t_start
        return Result(os.path.abspath(output), step, last_loss, ev, history,
                      tokens_done / elapsed if elapsed > 0 else 0.0, _peak_rss())
    finally:
        ex.close()


def _evaluate(ex, held, batch_size: int) -> float | None:
    """Mean cross-entropy per labelled token over the held-out examples (None without any)."""
    if len(held) == 0:
        return None
    tot, n = 0.0, 0
    for b in held.batches(batch_size, shuffle=False, epochs=1):
        s, k = eval_loss(ex, b.input_ids, b.labels)
        tot, n = tot + s, n + k
    return tot / max(n, 1)
