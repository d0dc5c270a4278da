"""Write a randomly initialised Hugging Face checkpoint of any size, without holding the model in RAM.

    build on meta ──► plan shards ──► for each shard: for each tensor: init → write ──► rename
    (exact names,     (greedy, in        (a block of rows in RAM at a time, streamed
     shapes, ties)     model order)        after a header computed from shapes)

The transformers model is built on the `meta` device, which gives the exact tensor names, shapes
and tied weights that `save_pretrained` would write, at no memory cost. Tensors are then assigned
to shards greedily in model order (as `save_pretrained` does), and each shard is written as a
safetensors file whose header is known before any data exists, so each tensor is generated and
written in blocks of rows: peak RSS is transformers' import plus ~100 MB, whatever the model and
shard size.

Init (transformers' `_init_weights` distributions): Linear/Embedding/Conv1D weights ~ N(0, 0.02)
(`initializer_range`), biases 0, norm weights 1. Each tensor is drawn from its own generator seeded
by (seed, tensor name), so the weights do not depend on the shard size.

Crash safety: every file is written to a temporary name and renamed; the whole checkpoint is built
in `OUT.tmp` and renamed to `OUT` last, so an interrupted run leaves nothing that looks complete.

Examples (from the repository root):
    .venv/bin/python benchmarks/make_checkpoint.py --preset gptj-tiny
    .venv/bin/python benchmarks/make_checkpoint.py --preset gptj-6b --max-shard-size 2GB
    .venv/bin/python benchmarks/make_checkpoint.py --preset neox-20b     # GPT-NeoX-20B's shape, 41.1 GB
    .venv/bin/python benchmarks/make_checkpoint.py --arch llama --set hidden_size=512 \
        --set num_hidden_layers=4 --set vocab_size=4096 --out bench-cache/llama-small
    .venv/bin/python benchmarks/make_checkpoint.py --smoke    # the four tiny presets, sharded, in a temp dir
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_bytes  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / "bench-cache"

# arch name -> (transformers config class, model class), imported lazily.
ARCHS: dict[str, tuple[str, str]] = {
    "gptj": ("GPTJConfig", "GPTJForCausalLM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}

# Tiny presets use a 1024-token vocabulary (a few MB per checkpoint); their special token ids are
# put inside that vocabulary so transformers does not warn.
_TINY_TOKENS = dict(vocab_size=1024, bos_token_id=1023, eos_token_id=1023)

PRESETS: dict[str, tuple[str, dict]] = {
    "gptj-1b": ("gptj", dict(n_embd=2048, n_layer=20, n_head=16, rotary_dim=64, vocab_size=50400,
                             n_positions=2048)),
    "gptj-6b": ("gptj", dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400,
                             n_positions=2048)),
    # GPT-NeoX-20B's shape (EleutherAI/gpt-neox-20b's config.json): 20.55 B params, 41.1 GB bf16. The fields are
    # those of the `--arch gpt_neox --set ...` command benchmarks/README.md gives; the rest are GPTNeoXConfig's
    # defaults, which are 20B's too (2048 positions, rotary base 10000, layer norm eps 1e-5).
    "neox-20b": ("gpt_neox", dict(hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                                  intermediate_size=24576, vocab_size=50432, rotary_pct=0.25,
                                  use_parallel_residual=True, tie_word_embeddings=False)),
    "tinyllama": ("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                rope_theta=10000.0, max_position_embeddings=2048,
                                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    "gptj-tiny": ("gptj", dict(n_embd=128, n_layer=4, n_head=4, rotary_dim=16, n_positions=512,
                               **_TINY_TOKENS)),
    "neox-tiny": ("gpt_neox", dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=512,
                                   use_parallel_residual=True, tie_word_embeddings=False,
                                   **_TINY_TOKENS)),
    "llama-tiny": ("llama", dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                                 max_position_embeddings=512, tie_word_embeddings=False,
                                 vocab_size=1024, bos_token_id=1, eos_token_id=2)),
    "gpt2-tiny": ("gpt2", dict(n_embd=128, n_layer=4, n_head=4, n_positions=512, **_TINY_TOKENS)),
}

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# safetensors dtype tags, and the integer type with the same width used to get raw bytes via numpy.
_ST_DTYPE = {torch.bfloat16: ("BF16", torch.int16), torch.float16: ("F16", torch.int16),
             torch.float32: ("F32", torch.int32)}


# ---------------------------------------------------------------------------------------------
# model description (meta device)


def parse_value(text: str):
    """`--set` values: JSON where it parses (numbers, true/false, null, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_config(arch: str, overrides: dict):
    import transformers

    config_cls = getattr(transformers, ARCHS[arch][0])
    return config_cls(**overrides)


def meta_model(arch: str, config):
    """The transformers model on the meta device: exact names/shapes, no memory."""
    import transformers

    model_cls = getattr(transformers, ARCHS[arch][1])
    with torch.device("meta"):
        model = model_cls(config)
    return model


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" | "zeros" | "ones"

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * torch.finfo(dtype).bits // 8


def tensor_specs(model) -> list[TensorSpec]:
    """The tensors `save_pretrained` writes, in its order, with how each is initialised.

    Follows save_pretrained: persistent state-dict entries; tied weights written once, under the
    name transformers keeps (GPT-2's head is the `transformer.wte.weight` entry); transformers'
    load-time renamings reverted, so names are those of original checkpoints (GPT-NeoX's head is
    `embed_out.weight`); entries in natural key order (layers.2 before layers.10).
    """
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    state = model.state_dict(keep_vars=True)  # persistent entries only, as save_pretrained
    modules = dict(model.named_modules())
    init_of: dict[int, str] = {}  # id(tensor) -> init kind, decided on the module's own names
    kept: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in tied or id(tensor) in init_of:  # the second name of a tied pair
            continue
        owner, _, leaf = name.rpartition(".")
        init_of[id(tensor)] = _init_kind(leaf, type(modules[owner]).__name__ if owner in modules else owner)
        kept[name] = tensor
    saved = _revert_renamings(model, kept)
    return [TensorSpec(name, tuple(t.shape), init_of.get(id(t)) or _init_kind(name.rpartition(".")[2], name))
            for name, t in saved.items()]


def _init_kind(leaf: str, owner: str) -> str:
    if leaf == "bias":
        return "zeros"
    if leaf == "weight" and ("Norm" in owner or "norm" in owner or ".ln_" in owner):  # LayerNorm, RMSNorm
        return "ones"
    return "normal"  # Linear, Embedding, GPT-2 Conv1D


def _revert_renamings(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply save_pretrained's reversal of transformers' checkpoint-name conversions (a private
    transformers function; without it, names stay as the modules name them)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    return dict(revert_weight_conversion(model, dict(state)))


# ---------------------------------------------------------------------------------------------
# shard planning


def parse_size(text: str) -> int:
    """'2GB' -> 2*10**9, '500MiB' -> 500*2**20 (transformers' convention: GB decimal, GiB binary)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {text!r}; use e.g. 2GB, 500MB, 1GiB")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * scale)


def plan_shards(specs: list[TensorSpec], dtype: torch.dtype, max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy in model order: start a new shard when the next tensor would overflow this one.
    A tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        n = spec.nbytes(dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# ---------------------------------------------------------------------------------------------
# writing


_CHUNK_ELEMS = 1 << 24  # 64 MiB of fp32 per generated piece: bounds the temporary, fixes the stream


def write_tensor(f, spec: TensorSpec, dtype: torch.dtype, seed: int, std: float) -> None:
    """Append one tensor's bytes to `f`, generated in row blocks of at most _CHUNK_ELEMS elements,
    so no full-size temporary exists. Deterministic in (seed, name, shape)."""
    raw_type = _ST_DTYPE[dtype][1]
    n = math.prod(spec.shape)
    if n == 0:
        return
    if spec.init != "normal":
        fill = torch.zeros if spec.init == "zeros" else torch.ones
        f.write(fill(n, dtype=dtype).view(raw_type).numpy())
        return
    gen = torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(spec.name.encode()))
    row = math.prod(spec.shape[1:]) if len(spec.shape) > 1 else 1
    rows_per_chunk = max(1, _CHUNK_ELEMS // row)
    buf = torch.empty(rows_per_chunk * row, dtype=torch.float32)
    for start in range(0, n // row, rows_per_chunk):
        k = min(rows_per_chunk, n // row - start) * row
        piece = buf[:k].normal_(0.0, std, generator=gen).to(dtype)
        f.write(piece.view(raw_type).numpy())  # numpy exposes the buffer: no bytes copy


def write_shard(path: Path, specs: list[TensorSpec], dtype: torch.dtype, seed: int, std: float) -> int:
    """Stream one safetensors file: header first (offsets are known from shapes), then each tensor
    generated, written and freed in turn. Tensors are laid out in name order, as the safetensors
    library lays out the files it writes. Returns the file size."""
    tag = _ST_DTYPE[dtype][0]
    ordered = sorted(specs, key=lambda s: s.name)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in ordered:
        n = spec.nbytes(dtype)
        header[spec.name] = {"dtype": tag, "shape": list(spec.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8-byte alignment with spaces
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for spec in ordered:
            write_tensor(f, spec, dtype, seed, std)
    os.replace(tmp, path)
    return 8 + len(head) + offset


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def make_checkpoint(out: Path, arch: str, overrides: dict, dtype: torch.dtype, max_shard_bytes: int,
                    seed: int, log=print) -> dict:
    """Build the checkpoint in `out`.tmp and rename it to `out`. Returns a summary dict."""
    from transformers import GenerationConfig

    config = build_config(arch, overrides)
    model = meta_model(arch, config)
    specs = tensor_specs(model)
    shards = plan_shards(specs, dtype, max_shard_bytes)
    names = shard_names(len(shards))

    tmp_dir = out.with_name(out.name + ".tmp")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)  # left by an interrupted run
    tmp_dir.mkdir(parents=True)

    config.architectures = [type(model).__name__]
    config.dtype = dtype  # what save_pretrained records ("dtype": "bfloat16")
    config.save_pretrained(tmp_dir)
    gen_config = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(config)
    gen_config.save_pretrained(tmp_dir)

    std = float(getattr(config, "initializer_range", 0.02))
    total = 0
    for name, shard in zip(names, shards):
        t0 = time.perf_counter()
        write_shard(tmp_dir / name, shard, dtype, seed, std)
        nbytes = sum(s.nbytes(dtype) for s in shard)
        total += nbytes
        log(f"  {name}: {len(shard)} tensors, {nbytes / 1e9:.3f} GB, {time.perf_counter() - t0:.1f} s, "
            f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")
    n_params = sum(math.prod(s.shape) for s in specs)
    if len(shards) > 1:
        weight_map = {s.name: name for name, shard in zip(names, shards) for s in shard}
        write_json(tmp_dir / "model.safetensors.index.json",
                   {"metadata": {"total_parameters": n_params, "total_size": total}, "weight_map": weight_map})

    if out.exists():  # only reached with --overwrite
        shutil.rmtree(out)
    os.replace(tmp_dir, out)
    return {"out": str(out), "arch": arch, "model_class": type(model).__name__, "params": n_params,
            "bytes": total, "shards": len(shards), "tensors": len(specs)}


# ---------------------------------------------------------------------------------------------
# CLI


def default_out(preset: str | None, arch: str, sets: dict, dtype_name: str) -> Path:
    stem = preset or arch
    if sets:  # a custom shape must not collide with the preset's directory
        digest = hashlib.sha1(json.dumps(sets, sort_keys=True).encode()).hexdigest()[:8]
        stem = f"{stem}-custom{digest}"
    return DEFAULT_CACHE / f"{stem}-{dtype_name}"


def smoke(keep: bool) -> int:
    """Every tiny preset written with 1 MB shards into a temp dir, then read back from the headers: every tensor
    the meta model names is there once, the index (where sharded) maps each to its file."""
    from common import Smoke, safetensors_files, tensor_bytes

    with Smoke(keep) as sm:
        for preset in sorted(p for p in PRESETS if p.endswith("-tiny")):
            arch, fields = PRESETS[preset]
            out = sm.dir / preset
            summary = make_checkpoint(out, arch, dict(fields), torch.bfloat16, 10**6, seed=0, log=lambda msg: None)
            sizes = tensor_bytes(out)
            ok = (len(sizes) == summary["tensors"] and sum(sizes.values()) == summary["bytes"]
                  and len(safetensors_files(out)) == summary["shards"] and (out / "config.json").exists())
            print(f"smoke: {preset}: {summary['params'] / 1e6:.2f} M params, {summary['tensors']} tensors in "
                  f"{summary['shards']} shard(s): {'ok' if ok else 'MISMATCH'}", flush=True)
            if not ok:
                return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named shape (see PRESETS)")
    p.add_argument("--arch", choices=sorted(ARCHS), help="architecture, for a shape given only by --set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set n_layer=4")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--max-shard-size", default="2GB", help="e.g. 2GB, 500MB, 1GiB (default 2GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="default: bench-cache/<preset>-<dtype>")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--smoke", action="store_true", help="write the tiny presets with small shards in a temp dir and "
                   "check them (seconds)")
    p.add_argument("--keep", action="store_true", help="--smoke: keep the temp dir")
    a = p.parse_args(argv)
    if a.smoke:
        return smoke(a.keep)

    if not a.preset and not a.arch:
        p.error("give --preset or --arch")
    arch, fields = (PRESETS[a.preset][0], dict(PRESETS[a.preset][1])) if a.preset else (a.arch, {})
    if a.preset and a.arch and a.arch != arch:
        p.error(f"--arch {a.arch} conflicts with preset {a.preset} ({arch})")
    sets = {}
    for item in a.set:
        key, eq, value = item.partition("=")
        if not eq:
            p.error(f"--set expects KEY=VALUE, got {item!r}")
        sets[key.strip()] = parse_value(value.strip())
    fields.update(sets)
    out = (a.out or default_out(a.preset, arch, sets, a.dtype)).resolve()

    if out.exists() and not a.overwrite:
        print(f"{out} already exists; skipping (use --overwrite to rebuild)")
        return 0
    print(f"building {a.preset or arch} ({arch}, {a.dtype}) -> {out}", flush=True)
    t0 = time.perf_counter()
    summary = make_checkpoint(out, arch, fields, DTYPES[a.dtype], parse_size(a.max_shard_size), a.seed,
                              log=lambda msg: print(msg, flush=True))
    summary.update(seconds=round(time.perf_counter() - t0, 2), peak_rss_gib=round(peak_rss_bytes() / 2**30, 3),
                   dtype=a.dtype, seed=a.seed, config=fields)
    print(f"done: {summary['params'] / 1e6:.1f} M params, {summary['bytes'] / 1e9:.3f} GB in {summary['shards']} "
          f"shard(s), {summary['seconds']} s, peak RSS {summary['peak_rss_gib']:.2f} GiB")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
