"""Merge a LoRA adapter into the Hugging Face checkpoint it was trained on: W' = W + s * B A (Hu et al. 2021, eq. 3;
s = alpha / r, or alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023), written as a new Hugging Face directory that
transformers (or overspill) loads like any other.

    merge_adapter("llama-7b", "my-adapter", "llama-7b-merged")

Everything happens in Hugging Face tensor space: the adapter's ``base_model.model.<module>.lora_A.weight`` [r, in]
and ``.lora_B.weight`` [out, r] change the base tensor ``<module>.weight``; a trained bias (``<module>.base_layer.bias``,
PEFT's bias="lora_only"; any ``<module>.bias`` with bias="all") or norm module (``<norm>.weight``/``.bias``, its
modules_to_save) replaces the base tensor of that name; every other tensor is copied. GPT-2's Conv1D stores its
weight [in, out], so there the transpose of B A is added.

Streaming, so a model far bigger than RAM merges in a fixed amount of memory:

    base shard i ──► tensor by tensor, in row chunks of <= CHUNK_ELEMENTS ──► float32 (+ s B[rows] A)
                 ──► cast to the output dtype ──► appended to out shard i (its header written first, from shapes)

Peak memory is one row chunk plus the adapter's A and B, whatever the size of the model or of its shards: at most
16 Mi elements, read in the stored dtype, widened to float32 (64 MiB), cast to the output dtype, so about 96 MiB for
bf16 weights (measured: merging a 1 GiB bf16 shard of sixteen adapted 8192x4096 weights peaks 110 MiB above the
imports; the same as a pytorch_model.bin, 145 MiB). Safetensors shards are read with positional reads into that
chunk (not ``safe_open``, whose mmap keeps every touched page in the process's RSS); pytorch_model.bin shards are
mmap'd (``torch.load(mmap=True, weights_only=True)``) and each chunk's pages are dropped from the mapping once
written (a legacy non-zip .bin cannot be mmap'd and is loaded whole: that shard's size). Output shards go out
through ``io.DirectWriter`` (O_DIRECT where allowed: no page-cache build-up).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass

import torch

from ..checkpoint.hf import read_json
from ..checkpoint.safetensors_io import DTYPE_NAMES, SafetensorsFile, pread_into
from ..checkpoint.sources import is_hf_dir
from ..checkpoint.store import EXTRA_FILES, is_layer_store, publish, staging_dir
from ..errors import ConfigError, OverspillError
from .lora import PREFIX, WEIGHTS_FILE, read_config, read_weights

MERGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHUNK_ELEMENTS = 1 << 24          # rows per step: at most this many elements (64 MiB as float32)
COPY_FILES = tuple(dict.fromkeys(EXTRA_FILES + ("added_tokens.json", "chat_template.jinja", "chat_template.json",
                                                "vocab.txt", "spiece.model")))
_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
_BASE_LAYER = re.compile(r"(?:base_model\.model\.)?(.+)\.base_layer\.weight")
_BIAS = re.compile(r"(?:base_model\.model\.)?(.+)\.base_layer\.bias")
_SAVED = re.compile(r"(?:base_model\.model\.)?(.+)\.(weight|bias)")


@dataclass
class Pair:
    """One adapted module: lora_A [r, in] and lora_B [out, r], in float32."""
    module: str
    A: torch.Tensor
    B: torch.Tensor


@dataclass(frozen=True)
class Stored:
    """One base tensor as its shard stores it."""
    dtype: torch.dtype
    shape: tuple[int, ...]


# -- the base checkpoint -------------------------------------------------------------------------------------------

class Shard:
    """One base weight file; ``rows(name, a, b)``: rows a:b of a tensor (its first dimension), in its stored dtype."""

    def __init__(self, path: str):
        self.path = path
        self._st: SafetensorsFile | None = None
        self._sd: dict[str, torch.Tensor] | None = None
        if path.endswith(".safetensors"):
            self._st = SafetensorsFile(path)
            self.tensors = {n: Stored(i.dtype, tuple(i.shape)) for n, i in self._st.tensors.items()}
        else:
            sd, mapped = _load_bin(path)
            self.tensors = {n: Stored(t.dtype, tuple(t.shape)) for n, t in sd.items()}
            self._sd = sd if mapped else None   # a whole in-RAM load waits until this shard is written
        self._mapped = self._st is None and mapped

    def _state_dict(self) -> dict[str, torch.Tensor]:
        if self._sd is None:
            self._sd = _load_bin(self.path)[0]
        return self._sd

    def rows(self, name: str, a: int, b: int) -> torch.Tensor:
        st = self.tensors[name]
        if self._st is None:
            t = self._state_dict()[name]
            return (t.reshape(1) if t.dim() == 0 else t)[a:b]   # a view of the mmap: only these pages are read
        info = self._st.tensors[name]
        row = math.prod(st.shape[1:]) * st.dtype.itemsize
        out = torch.empty((b - a, *st.shape[1:]) if st.shape else (1,), dtype=st.dtype)
        if out.numel():
            pread_into(self._st.fd, out, info.offset + a * row, self.path)
            if hasattr(os, "posix_fadvise"):   # the bytes now live in ``out``: drop them from the page cache
                os.posix_fadvise(self._st.fd, info.offset + a * row, out.numel() * st.dtype.itemsize,
                                 os.POSIX_FADV_DONTNEED)
        return out

    def done(self, name: str, a: int, b: int) -> None:
        """Rows a:b of ``name`` are written: drop their pages of a .bin shard's mmap from this process (the
        safetensors path already reads into memory it frees). Without this a .bin shard's RSS would grow to the
        whole shard's size; the pages are clean, so they are read again from the file should anything touch them."""
        if not self._mapped or self._sd is None:
            return
        t = self._sd[name]
        if t.is_contiguous():
            row = math.prod(t.shape[1:]) * t.element_size()
            _drop_pages(t.data_ptr() + a * row, (b - a) * row)
        elif b >= (t.shape[0] if t.dim() else 1):   # a strided view: its whole storage, once its last rows are out
            st = t.untyped_storage()
            _drop_pages(st.data_ptr(), st.nbytes())

    def close(self) -> None:
        if self._st is not None:
            self._st.close()
        self._sd = None


_LIBC = None


def _drop_pages(addr: int, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) on the whole pages inside [addr, addr + nbytes) of a read-only file mapping (Linux;
    a no-op elsewhere). Only pages wholly inside the range: a neighbour's bytes are never touched."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    lo, hi = -(-addr // mmap.PAGESIZE) * mmap.PAGESIZE, (addr + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if _LIBC and hi > lo:
        _LIBC.madvise(lo, hi - lo, 4)   # MADV_DONTNEED; a refusal only leaves the pages resident


def _load_bin(path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, whether it is mmap'd). Tensors only (weights_only): a pickle never runs code."""
    mapped = True
    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):   # a legacy (non-zip) .bin cannot be mmap'd: loaded whole
                raise
            sd, mapped = torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as e:  # pickle / zip errors of many kinds
        raise OverspillError(f"{path}: cannot load PyTorch weights ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise OverspillError(f"{path}: expected a state dict of tensors")
    return sd, mapped


def base_shards(base: str) -> list[str]:
    """The weight files of a Hugging Face directory, in order; one line naming what ``base`` is otherwise."""
    if not os.path.isdir(base):
        raise OverspillError(f"{base}: no such base model directory")
    if not is_hf_dir(base):
        what = "an overspill layer store" if is_layer_store(base) else \
            "an original (pre-Hugging Face) checkpoint" if _is_original(base) else \
            "no config.json with model.safetensors or pytorch_model.bin"
        raise OverspillError(f"{base}: not a Hugging Face directory ({what}); merge needs the Hugging Face "
                             f"directory the adapter was trained on")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        single = index.removesuffix(".index.json")
        if os.path.exists(os.path.join(base, index)):
            wm = read_json(os.path.join(base, index), index).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise OverspillError(f"{os.path.join(base, index)}: missing or empty 'weight_map'")
            files = sorted(set(wm.values()))
            for f in files:
                if not os.path.isfile(os.path.join(base, f)):
                    raise OverspillError(f"{os.path.join(base, f)}: shard listed in {index} is missing")
            return files
        if os.path.isfile(os.path.join(base, single)):
            return [single]
    raise OverspillError(f"{base}: no weights found")   # unreachable after is_hf_dir, kept for safety


def _is_original(path: str) -> bool:
    from ..checkpoint import mesh_jax, neox_ds
    for fmt in (mesh_jax, neox_ds):
        try:
            if fmt.find(path) is not None:
                return True
        except OverspillError:
            return True   # it is that format (e.g. several steps in one directory)
    return False


def _conv1d(hf_config: dict, conf: dict) -> bool:
    """Whether adapted weights are stored [in, out]: the family says so where overspill knows it (GPT-2's Conv1D),
    else the adapter's fan_in_fan_out (PEFT's name for the same layout)."""
    from ..families import family_for
    try:
        return family_for(hf_config).conv1d
    except ConfigError:
        return bool(conf.get("fan_in_fan_out", False))


# -- the adapter ---------------------------------------------------------------------------------------------------

def read_pairs(adapter: str) -> tuple[dict, list[Pair], float, dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """(adapter_config.json, its pairs, s, {module: shape of a saved base layer}, {base tensor name: trained value})
    from a PEFT LoRA directory, every tensor checked against r. PEFT also saves the whole frozen weight of a
    targeted lm_head or embedding (``<module>.base_layer.weight``, its save_embedding_layers); that is the base's
    own, so only its shape is kept, to check against the base checkpoint. Trained biases and norm modules are the
    values that replace the base's tensors."""
    conf = read_config(adapter)
    r = conf["r"]
    scale = float(conf.get("lora_alpha", 8)) / (math.sqrt(r) if conf.get("use_rslora") else r)
    got: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, tuple[int, ...]] = {}
    replace: dict[str, torch.Tensor] = {}
    to_save = conf.get("modules_to_save") or []
    where = os.path.join(adapter, WEIGHTS_FILE)
    for key, t in read_weights(adapter).items():
        m = _KEY.fullmatch(key)
        if m is None and _BASE_LAYER.fullmatch(key):
            saved[_BASE_LAYER.fullmatch(key).group(1)] = tuple(t.shape)
            continue
        if m is None and _BIAS.fullmatch(key):
            replace[f"{_BIAS.fullmatch(key).group(1)}.bias"] = t
            continue
        sv = _SAVED.fullmatch(key) if m is None else None
        if sv is not None and conf.get("bias") == "all" and \
                (".original_module." in key or ".modules_to_save." in key):
            continue   # with bias "all" PEFT also saves a norm to save's frozen original and a second copy
        if sv is not None and (any(sv.group(1).endswith(n) for n in to_save)      # PEFT's plain suffix match
                               or (sv.group(2) == "bias" and conf.get("bias") == "all")):
            replace[f"{sv.group(1)}.{sv.group(2)}"] = t
            continue
        if m is None:
            raise OverspillError(f"{where}: tensor {key!r} is not a LoRA weight (expected keys like "
                                 f"{PREFIX}<module>.lora_A.weight)")
        got.setdefault(m.group(1), {})[m.group(2)] = t
    if not got:
        raise OverspillError(f"{where}: no lora_A / lora_B tensors")
    pairs = []
    for module, ab in got.items():
        for k in "AB":
            if k not in ab:
                raise OverspillError(f"{where}: {module} has no lora_{k} weight")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise OverspillError(f"{where}: {module} has lora_A {list(A.shape)} and lora_B {list(B.shape)}; "
                                 f"expected [r, in] and [out, r] with r={r}")
        pairs.append(Pair(module, A.float(), B.float()))
    return conf, pairs, scale, saved, replace


def match_replaced(replace: dict[str, torch.Tensor], stored: dict[str, "Stored"], base: str,
                   adapter: str) -> dict[str, torch.Tensor]:
    """{base tensor name: trained value} for the adapter's trained biases and norms (names as ``match`` resolves
    them), each checked to exist in the base with the same shape."""
    out = {}
    for name, t in replace.items():
        n = name if name in stored or "." not in name else name.split(".", 1)[1]
        if n not in stored:
            raise OverspillError(f"{adapter}: the adapter trains {name}, which {base} does not have; was the adapter "
                                 f"trained on this model?")
        if stored[n].shape != tuple(t.shape):
            raise OverspillError(f"{adapter}: shape mismatch for {name}: base {list(stored[n].shape)}, adapter "
                                 f"{list(t.shape)}")
        out[n] = t
    return out


def match(pairs: list[Pair], stored: dict[str, Stored], conv1d: bool, base: str, adapter: str,
          tied: bool = False, saved: dict[str, tuple[int, ...]] | None = None) -> dict[str, Pair]:
    """{base tensor name: pair}. A module's weight is ``<module>.weight``, or, in a checkpoint of the bare base
    model (GPT-2's ``h.0...`` without ``transformer.``), the same name without its first component. Checks that
    each exists, is floating point, and has the shape the pair's product has ([out, in]; [in, out] for Conv1D)."""
    out = {}
    for p in pairs:
        name = f"{p.module}.weight"
        if name not in stored and "." in p.module and f"{p.module.split('.', 1)[1]}.weight" in stored:
            name = f"{p.module.split('.', 1)[1]}.weight"
        if name not in stored:
            hint = " (config.json ties it to the input embeddings, so the checkpoint has no such tensor)" \
                if tied and p.module.split(".")[-1] == "lm_head" else ""
            raise OverspillError(f"{adapter}: adapter module {p.module} has no weight {p.module}.weight in {base}"
                                 f"{hint}; was the adapter trained on this model?")
        st = stored[name]
        want = (p.A.shape[1], p.B.shape[0]) if conv1d else (p.B.shape[0], p.A.shape[1])
        if st.shape != want or not st.dtype.is_floating_point:
            layout = "[in, out] (Conv1D)" if conv1d else "[out, in]"
            raise OverspillError(f"{adapter}: shape mismatch for {p.module}: base weight {name} is {list(st.shape)} "
                                 f"{str(st.dtype).removeprefix('torch.')}, the adapter's B @ A gives {list(want)} "
                                 f"as {layout}; was the adapter trained on this model?")
        if name in out:
            raise OverspillError(f"{adapter}: modules {out[name].module} and {p.module} both adapt {name}")
        if (saved or {}).get(p.module, st.shape) != st.shape:
            raise OverspillError(f"{adapter}: shape mismatch for {p.module}: base weight {name} is {list(st.shape)}, "
                                 f"the adapter's saved base layer is {list(saved[p.module])} (resized vocabulary?)")
        out[name] = p
    return out


# -- writing -------------------------------------------------------------------------------------------------------

def _bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[bytes, int]:
    """A safetensors header for tensors laid out back to back in this order: (bytes incl. length prefix, data size)."""
    h: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * dtype.itemsize
        h[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    js = json.dumps(h, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)            # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(js)) + js, pos


def write_shard(path: str, shard: Shard, out_dtype: dict[str, torch.dtype], targets: dict[str, Pair], scale: float,
                conv1d: bool, bar, replaced: dict[str, torch.Tensor] | None = None) -> int:
    """Write ``shard``'s tensors (adapted ones merged) to the safetensors file ``path``, chunk by chunk; its bytes."""
    from ..io import DirectWriter

    # widest dtype first (stable), as safetensors orders them: every tensor stays aligned to its element size
    names = sorted(shard.tensors, key=lambda n: -out_dtype[n].itemsize)
    head, size = _header([(n, out_dtype[n], shard.tensors[n].shape) for n in names])
    with DirectWriter(path, fsync=False) as f:
        f.write(head)
        for n in names:
            st, dt, pair = shard.tensors[n], out_dtype[n], targets.get(n)
            if replaced and n in replaced:           # a trained bias or norm: the adapter's value
                t = replaced[n].to(dt).contiguous()
                f.write(_bytes(t))
                bar.update(t.numel() * t.element_size())
                continue
            rows = st.shape[0] if st.shape else 1
            step = max(1, CHUNK_ELEMENTS // max(1, math.prod(st.shape[1:])))
            for a in range(0, rows, step):
                b = min(rows, a + step)
                t = shard.rows(n, a, b)
                if pair is not None:       # W[a:b] += s * (B A)[a:b], or its transpose for Conv1D ([in, out])
                    w = t.to(torch.float32, copy=True)
                    del t
                    if conv1d:
                        w.addmm_(pair.A[:, a:b].T, pair.B.T, alpha=scale)
                    else:
                        w.addmm_(pair.B[a:b], pair.A, alpha=scale)
                    t = w.to(dt)
                    del w
                elif t.dtype != dt:
                    t = t.to(dt)
                f.write(_bytes(t))
                bar.update(t.numel() * t.element_size())
                del t
                shard.done(n, a, b)
    return len(head) + size


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replaceable(out: str) -> bool:
    return os.path.isdir(out) and (not os.listdir(out) or is_hf_dir(out))


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def merge_adapter(base: str, adapter: str, out: str, *, dtype: str | None = None, overwrite: bool = False,
                  progress: bool = True) -> str:
    """Write ``out``: the Hugging Face directory ``base`` with the LoRA adapter ``adapter`` (PEFT's files, or
    overspill's) merged into its weights; returns ``out``'s absolute path.

    Every base tensor keeps its name and shard; adapted ones become W + s * B A, summed in float32 and cast back to
    the stored dtype (or ``dtype``: float32, bfloat16, float16, which then applies to every floating tensor). Writes
    one safetensors file per base shard (model.safetensors.index.json when there are several) and copies
    config.json, generation_config.json and the tokenizer files. Every check runs before anything is written; the
    result is assembled in ``out.tmp-<pid>`` and renamed into place when complete, so a failed merge leaves no
    ``out`` (or the previous one, with ``overwrite``). Memory: see the module docstring (one row chunk)."""
    from tqdm import tqdm

    if dtype is not None and dtype not in MERGE_DTYPES:
        raise OverspillError(f"unsupported dtype '{dtype}' (expected one of float32, bfloat16, float16)")
    out = os.path.abspath(out.rstrip(os.sep) or out)
    if os.path.lexists(out):
        if not overwrite:
            raise OverspillError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
        if _same(out, base) or _same(out, adapter):
            raise OverspillError(f"{out}: is the {'base' if _same(out, base) else 'adapter'} directory; "
                                 f"write the merged model somewhere else")
        if not _replaceable(out):
            raise OverspillError(f"{out}: exists and is not a Hugging Face model directory; refusing to replace it")
    files = base_shards(base)
    hf_config = read_json(os.path.join(base, "config.json"), "config.json")
    conf, pairs, scale, saved, replace = read_pairs(adapter)
    conv1d = _conv1d(hf_config, conf)
    tdtype = MERGE_DTYPES[dtype] if dtype is not None else None

    shards: list[Shard] = []
    tmp = bar = None
    try:
        for f in files:   # headers (or mmaps) only: nothing is read yet
            shards.append(Shard(os.path.join(base, f)))
        stored = {n: s for sh in shards for n, s in sh.tensors.items()}
        targets = match(pairs, stored, conv1d, base, adapter, bool(hf_config.get("tie_word_embeddings")), saved)
        replaced = match_replaced(replace, stored, base, adapter)
        out_dtype = {n: tdtype if tdtype is not None and s.dtype.is_floating_point else s.dtype
                     for n, s in stored.items()}
        odd = next((n for n, d in out_dtype.items() if d not in DTYPE_NAMES), None)
        if odd is not None:
            raise OverspillError(f"{base}: tensor {odd} is {str(out_dtype[odd]).removeprefix('torch.')}, which "
                                 f"safetensors files here cannot hold")
        total = sum(math.prod(s.shape) * out_dtype[n].itemsize for n, s in stored.items())
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = staging_dir(out, total)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"merge {os.path.basename(out)}",
                   disable=not progress or not sys.stderr.isatty(), dynamic_ncols=True)
        names = ["model.safetensors"] if len(files) == 1 else \
            [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
        weight_map = {}
        for fname, sh in zip(names, shards):
            write_shard(os.path.join(tmp, fname), sh, out_dtype, targets, scale, conv1d, bar, replaced)
            _fsync(os.path.join(tmp, fname))   # durable before the rename
            weight_map.update((n, fname) for n in sh.tensors)
            sh.close()
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_json(os.path.join(tmp, "model.safetensors.index.json"), index)
        if tdtype is not None:   # say the new dtype where config.json says one (transformers 5: dtype; 4: torch_dtype)
            name = str(tdtype).removeprefix("torch.")
            keys = [k for k in ("dtype", "torch_dtype") if k in hf_config] or ["torch_dtype"]
            _write_json(os.path.join(tmp, "config.json"), {**hf_config, **{k: name for k in keys}})
        else:
            shutil.copyfile(os.path.join(base, "config.json"), os.path.join(tmp, "config.json"))
        for f in COPY_FILES:
            if os.path.isfile(os.path.join(base, f)):
                shutil.copyfile(os.path.join(base, f), os.path.join(tmp, f))
        publish(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        for sh in shards:
            sh.close()
    return out


def _write_json(path: str, d: dict) -> None:
    with open(path, "w") as f:
        json.dump(d, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
