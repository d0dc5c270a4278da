"""Write an original checkpoint as a Hugging Face directory (``overspill convert SRC DST --to hf``)."""
from __future__ import annotations

import json
import math
import os
import shutil

import torch

from ..errors import OverspillError
from ..model.weights import units as unit_order
from .original import OriginalCheckpoint, checked
from .sources import is_hf_dir, open_source
from .store import publish, staging_dir

HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _replaceable(dst: str) -> bool:
    return os.path.isdir(dst) and (not os.listdir(dst) or is_hf_dir(dst))


def convert_to_hf(src: str, dst: str, dtype: str | None = None, overwrite: bool = False, progress: bool = True,
                  config: str | None = None) -> str:
    """An original checkpoint -> a Hugging Face directory at ``dst`` (config.json, one safetensors shard per unit
    plus model.safetensors.index.json, the tokenizer when the source has one); returns ``dst``.

    Reads one unit at a time (peak memory ~ one unit's pieces plus the merged unit), writes into
    ``dst + '.tmp-<pid>'`` and renames it into place once complete, as ``store.convert`` does. ``dtype``: None
    keeps the checkpoint's own (GPT-J-6B slim: bfloat16, GPT-NeoX-20B: float16)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    dst = os.path.abspath(dst.rstrip(os.sep) or dst)
    if dtype is not None and dtype not in HF_DTYPES:
        raise OverspillError(f"unsupported dtype '{dtype}' (expected one of float32, bfloat16, float16)")
    if os.path.lexists(dst):
        if not overwrite:
            raise OverspillError(f"{dst}: already exists (pass overwrite=True / --overwrite to replace it)")
        if not _replaceable(dst):
            raise OverspillError(f"{dst}: exists and is not a Hugging Face model directory; refusing to replace it")
    ck = open_source(src, config)
    if not isinstance(ck, OriginalCheckpoint):
        ck.close()
        raise OverspillError(f"{src}: already a Hugging Face directory (--to hf converts original checkpoints; "
                             f"use the default --to store for a layer store)")
    tdtype = HF_DTYPES[dtype] if dtype is not None else ck.stored_dtype()
    names = unit_order(ck.config)
    try:
        item = torch.empty((), dtype=tdtype).element_size()
        tmp = staging_dir(dst, sum(math.prod(ck.shape(n)) * item for u in names for n in ck.unit_names(u)))
    except BaseException:
        ck.close()
        raise
    bar = None
    try:
        bar = tqdm(total=len(names), unit="unit", desc=f"convert {os.path.basename(dst)}", disable=not progress,
                   dynamic_ncols=True)
        weight_map, total = {}, 0
        for i, u in enumerate(names):
            bar.set_postfix_str(u, refresh=False)
            t = checked(ck.hf_unit(u, tdtype), ck.hf_shapes(u), ck.path, u)
            fname = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
            save_file({n: v.contiguous() for n, v in t.items()}, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update((n, fname) for n in t)
            total += sum(v.numel() * v.element_size() for v in t.values())
            del t
            bar.update(1)
        hf_config = {**ck.hf_config, "torch_dtype": str(tdtype).removeprefix("torch.")}
        files = {"model.safetensors.index.json": {"metadata": {"total_size": total}, "weight_map": weight_map},
                 "config.json": hf_config}
        gen = {k: ck.hf_config[k] for k in ("bos_token_id", "eos_token_id") if ck.hf_config.get(k) is not None}
        if gen:
            files["generation_config.json"] = gen
        for fname, d in files.items():
            with open(os.path.join(tmp, fname), "w") as f:
                json.dump(d, f, indent=2)
        for name, p in ck.extra_files().items():
            shutil.copyfile(p, os.path.join(tmp, name))
        for fname in os.listdir(tmp):
            with open(os.path.join(tmp, fname), "rb") as f:
                os.fsync(f.fileno())
        publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        ck.close()
    return dst
