"""The layer store: one file per unit, each laid out for ONE large sequential read.

A Hugging Face checkpoint scatters a block's tensors over a shard (in name order, often
across two shards) and stores them unfused and, for GPT-2, transposed. Streaming a unit
from it costs many small reads plus the transforms. ``convert`` rewrites a checkpoint
once into a directory where each unit (embed, block.N, head) is one file holding exactly
the unit's canonical tensors (fused QKV, [out, in] linears, optionally quantized), so the
runtime reads a unit with one positional read (O_DIRECT where possible) into a
preallocated buffer and takes tensor views into it: no copy, no transform.

Directory::

    DST/
      manifest.json            the source of truth (below)
      embed.safetensors
      block.0.safetensors ... block.{L-1}.safetensors
      head.safetensors
      tokenizer.json, generation_config.json, ...   copied from the source when present

One unit file (a valid safetensors file, so other tools can read it)::

    byte 0         u64 little-endian N = header length
    byte 8         JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}},
                   right-padded with spaces so that 8 + N is a multiple of 4096
    data_offset    ┌──────────────────────────────┐  = 8 + N, 4096-aligned (O_DIRECT-readable)
    (4096·k)       │ tensor A          (64-aligned)│
                   │ tensor B          (64-aligned)│  tensors whose size is a multiple of 64
                   │ ...                           │  come first, so padding is rare
                   │ tensor X  (odd size)          │
                   │ "__pad__.0"  U8 [g]           │  safetensors forbids gaps, so alignment
                   │ tensor Y          (64-aligned)│  padding is a named U8 tensor (not in the
    data_offset    └──────────────────────────────┘  manifest; readers of the store skip it)
     + data_bytes  = end of file

manifest.json::

    {"format": "overspill-layer-store", "version": 1,
     "config": ModelConfig.to_dict(), "hf_config": {...the original config.json...},
     "dtype": "bfloat16", "quantize": null | "int8" | "int4" | ..., "quantize_head": false (true: the LM head in
     the scheme, and an untied token table in int8 with a scale per row, "tok.q.qweight" and "tok.q.scales"),
     "tied": true when the head stores no LM weight (use the embedding's tok.weight),
     "extra_files": ["tokenizer.json", ...],
     "units": [{"name": "block.0", "file": "block.0.safetensors", "bytes": file size,
                "data_offset": 4096, "data_bytes": ..., "sha256": hex of the whole file,
                "tensors": {canonical name: {"dtype": "BF16", "shape": [...],
                                             "offset": absolute byte offset in the file, "nbytes": ...}}},
               ...]}

Tensor-parallel stores (``convert --tensor-parallel N``, ``"tensor_parallel": N`` in the manifest) hold each block
as N shard files, ``block.{i}.tp{r}.safetensors`` (model/shard.py's split: rank r's heads and MLP slice), and the
block's manifest entry lists them: ``{"name": "block.0", "shards": [{"file", "bytes", ..., "tensors"}, ...]}``. The
embedding and the head are stored once, whole (every rank holds them). ``LayerStore(path, shard=r)`` is rank r's
view: its blocks are its shards, so reading, planning and streaming touch only its bytes.

Quantized stores keep each quantized linear ``lin`` as the tensors of
``overspill.quant.store_form`` under ``"{lin}.q.{key}"`` (e.g. ``qkv.q.qpanels``); biases stay
``"{lin}.bias"`` in the model dtype. ``split_quantized`` regroups them for ``make_linear``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, OverspillError
from ..model.weights import linear_names, linear_shapes, units as unit_order
from ..io import DirectWriter
from .safetensors_io import DTYPE_NAMES, DTYPES, pread_into

FORMAT = "overspill-layer-store"
VERSION = 1
MANIFEST = "manifest.json"
DATA_ALIGN = 4096      # data section start: O_DIRECT needs file offsets aligned to the block size
TENSOR_ALIGN = 64      # every tensor: cache-line / AVX-512 aligned views
PAD_PREFIX = "__pad__."
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "vocab.json", "merges.txt", "generation_config.json")
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# -- writing ---------------------------------------------------------------------------------

def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def layout(tensors: dict[str, torch.Tensor]) -> tuple[list[tuple[str, int, int]], int]:
    """Order and place tensors: [(name, offset in data section, nbytes)] (pads included), data bytes.

    Tensors whose size is a multiple of TENSOR_ALIGN go first (in their given order), so the
    odd-sized ones (small biases, quantization metadata) cluster at the end and padding is rare.
    """
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    order = sorted(tensors, key=lambda n: sizes[n] % TENSOR_ALIGN != 0)   # stable
    placed, pos, pads = [], 0, 0
    for n in order:
        gap = (-pos) % TENSOR_ALIGN
        if gap:
            placed.append((f"{PAD_PREFIX}{pads}", pos, gap))
            pads += 1
            pos += gap
        placed.append((n, pos, sizes[n]))
        pos += sizes[n]
    return placed, pos


def write_unit_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                    fsync: bool = True) -> dict:
    """Write one unit file (see the module docstring; O_DIRECT where possible, io.DirectWriter), and fsync it unless
    the caller syncs it later. The SHA-256 runs on another thread over each chunk while it is written, so hashing
    costs no time of its own. Returns its manifest entry (without "name"/"file"): bytes, data_offset, data_bytes,
    sha256, tensors."""
    placed, data_bytes = layout(tensors)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    for n, off, nb in placed:
        if n in tensors:
            t = tensors[n]
            header[n] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nb]}
        else:
            header[n] = {"dtype": "U8", "shape": [nb], "data_offsets": [off, off + nb]}
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hlen = len(hjson) + (-(8 + len(hjson))) % DATA_ALIGN
    data_offset = 8 + hlen
    h = hashlib.sha256()
    with DirectWriter(path, on_chunk=h.update, fsync=fsync) as f:
        f.write(struct.pack("<Q", hlen) + hjson + b" " * (hlen - len(hjson)))
        for n, off, nb in placed:
            f.write(_as_bytes(tensors[n]) if n in tensors else bytes(nb))
    entries = {n: {"dtype": header[n]["dtype"], "shape": header[n]["shape"], "offset": data_offset + off, "nbytes": nb}
               for n, off, nb in placed if n in tensors}
    return {"bytes": data_offset + data_bytes, "data_offset": data_offset, "data_bytes": data_bytes,
            "sha256": h.hexdigest(), "tensors": entries}


def _quantize_unit(unit: str, t: dict[str, torch.Tensor], scheme: str | None, quantize_head: bool,
                   table: bool = False) -> dict:
    """A unit's tensors as stored: the linears in ``scheme`` (the head too with quantize_head); ``table``: the token
    table in int8 too (quant.quantize_table, as loading an HF directory with quantize_head does to an untied one)."""
    if scheme is None:
        return t
    from ..quant import quantize as qz, quantize_table, store_form

    lins = [l for l in linear_names(unit) if unit != "head" or quantize_head]
    out = {}
    for name, v in t.items():
        lin, _, kind = name.partition(".")
        if lin in lins and kind == "weight":
            for key, q in store_form(scheme, qz(v, scheme)).items():
                out[f"{lin}.q.{key}"] = q.contiguous()
        elif name == "tok.weight" and table:
            tab = quantize_table(v)
            out["tok.q.qweight"], out["tok.q.scales"] = tab.qweight.contiguous(), tab.scales.contiguous()
        else:
            out[name] = v
    return out


def _int8_table(cfg: ModelConfig, scheme: str | None, quantize_head: bool) -> bool:
    """Whether a store holds its token table in int8: quantize_head with a scheme, and a table the head does not
    share (a tied one stays the head's dense source, as when an HF directory is loaded with quantize_head)."""
    return scheme is not None and quantize_head and not cfg.tie_embeddings


def _planned_bytes(ck, cfg: ModelConfig, unit: str, dtype: torch.dtype, scheme: str | None,
                   quantize_head: bool, tied: bool) -> int:
    """Approximate output bytes of a unit (for the progress bar), from shapes only."""
    item = torch.empty((), dtype=dtype).element_size()
    n = 0
    for hf_name, canon in ck.unit_names(unit).items():
        if tied and canon == "lm.weight":
            continue
        n += math.prod(ck.shape(hf_name)) * item
    if scheme is not None:
        from ..quant import quantized_nbytes, table_nbytes

        if unit == "embed" and _int8_table(cfg, scheme, quantize_head):
            n += table_nbytes(cfg.vocab_size, cfg.hidden_size) - cfg.vocab_size * cfg.hidden_size * item
        for lin, (N, K) in linear_shapes(cfg, unit).items():
            if unit == "head" and not quantize_head:
                continue
            try:
                n += quantized_nbytes(scheme, N, K) - N * K * item
            except ValueError:
                pass
    return n


_FUSED_INTO = {"q": "qkv", "k": "qkv", "v": "qkv", "qkv_neox": "qkv", "gate": "up"}


def _shard_bytes(ck, cfg: ModelConfig, unit: str, dtype: torch.dtype, scheme: str | None, world: int) -> list[int]:
    """Bytes of each rank's shard of a block (from shapes only: the split run on meta tensors)."""
    from ..model.shard import shard_block
    from ..model.weights import canonical_shapes

    present = set()
    for raw in ck.unit_names(unit).values():
        lin, _, kind = raw.partition(".")
        present.add(f"{_FUSED_INTO.get(lin, lin)}.{kind}")
    meta = {n: torch.empty(shape, dtype=dtype, device="meta") for n, shape in canonical_shapes(cfg, unit).items()
            if n in present}
    lins = {f"{n}.weight" for n in linear_names(unit)}
    out = []
    for r in range(world):
        n = 0
        for name, t in shard_block(cfg, meta, r, world).items():
            if scheme is not None and name in lins:
                from ..quant import quantized_nbytes

                n += quantized_nbytes(scheme, *t.shape)
            else:
                n += t.numel() * t.element_size()
        out.append(n)
    return out


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_dir(dst: str, need_bytes: int) -> str:
    """A fresh ``dst.tmp-<pid>`` to write a conversion into, renamed to ``dst`` when complete.

    First removes stale temporaries of the same destination (``dst.tmp-<pid>`` whose process is gone: a conversion
    killed midway leaves one, and for a 20B model it holds tens of GB), then refuses in one line when the
    filesystem has less free space than ``need_bytes`` (plus 1% and 64 MiB of slack) for the new copy."""
    parent = os.path.dirname(dst) or "."
    prefix = os.path.basename(dst) + ".tmp-"
    for name in os.listdir(parent) if os.path.isdir(parent) else ():
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    free = shutil.disk_usage(parent).free
    need = int(need_bytes * 1.01) + (64 << 20)
    if free < need:
        raise OverspillError(f"{dst}: converting writes about {need_bytes / 2**30:.2f} GiB but {parent} has "
                             f"{free / 2**30:.2f} GiB free; free some space or choose another destination")
    tmp = os.path.join(parent, f"{prefix}{os.getpid()}")
    os.makedirs(tmp)
    return tmp


def publish(tmp: str, dst: str) -> None:
    """Make a complete conversion in ``tmp`` (its files fsynced) ``dst``: the directory synced, a previous ``dst``
    moved aside, ``tmp`` renamed into place, the parent synced, the previous one removed. A crash at any point
    leaves either the old ``dst`` or the new one, never a mix."""
    _fsync_dir(tmp)
    old = None
    if os.path.lexists(dst):
        old = f"{dst}.old-{os.getpid()}"
        os.rename(dst, old)
    os.rename(tmp, dst)
    _fsync_dir(os.path.dirname(dst))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _planned(ck, cfg: ModelConfig, unit: str, dtype: torch.dtype, scheme: str | None, quantize_head: bool,
             tied: bool, world: int) -> int:
    if world > 1 and unit.startswith("block."):
        return sum(_shard_bytes(ck, cfg, unit, dtype, scheme, world))
    return _planned_bytes(ck, cfg, unit, dtype, scheme, quantize_head, tied)


def planned_store_bytes(ck, dtype: str | torch.dtype = "bfloat16", quantize: str | None = None,
                        quantize_head: bool = False, tensor_parallel: int = 1) -> int:
    """Bytes ``convert`` writes for this checkpoint reader (from shapes only)."""
    tdtype = STORE_DTYPES[_dtype_name(dtype)]
    cfg = ck.config
    tied = cfg.tie_embeddings and not (quantize is not None and quantize_head)
    return sum(_planned(ck, cfg, u, tdtype, quantize, quantize_head, tied, tensor_parallel) for u in unit_order(cfg))


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for k, v in STORE_DTYPES.items():
            if v == dtype:
                return k
        raise OverspillError(f"unsupported layer store dtype {dtype} (expected one of {', '.join(STORE_DTYPES)})")
    name = _ALIASES.get(dtype, dtype)
    if name not in STORE_DTYPES:
        raise OverspillError(f"unsupported layer store dtype '{dtype}' (expected one of {', '.join(STORE_DTYPES)})")
    return name


def convert(src: str, dst: str, dtype: str = "bfloat16", quantize: str | None = None, quantize_head: bool = False,
            overwrite: bool = False, progress: bool = True, config: str | None = None,
            tensor_parallel: int = 1) -> str:
    """HF dir (or an original EleutherAI checkpoint: GPT-J's mesh-transformer-jax shards, GPT-NeoX's DeepSpeed
    layer files, see original.py; ``config`` its config file) -> layer store at ``dst``; returns ``dst``.

    Streams unit by unit (peak memory ~ a few units), writes into ``dst + '.tmp-<pid>'`` next to
    ``dst`` and renames it into place only once everything (files, manifest) is written and
    fsynced, so an interrupted conversion leaves nothing that looks complete. An existing ``dst``
    is refused unless ``overwrite`` (and even then only a layer store or an empty directory is
    replaced, after the new store is complete). ``tensor_parallel`` N > 1: each block is written as N shard files,
    one per tensor-parallel rank (see the module docstring), each quantized on its own."""
    from tqdm import tqdm

    from .sources import open_source

    dst = os.path.abspath(dst.rstrip(os.sep) or dst)
    dname = _dtype_name(dtype)
    tdtype = STORE_DTYPES[dname]
    if quantize is not None:
        from ..quant import SCHEMES
        if quantize not in SCHEMES:
            raise OverspillError(f"unknown quantization scheme '{quantize}' (expected one of {', '.join(SCHEMES)})")
    if not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise OverspillError(f"--tensor-parallel {tensor_parallel}: expected a whole number of ranks >= 1")
    if os.path.lexists(dst):
        if not overwrite:
            raise OverspillError(f"{dst}: already exists (pass overwrite=True / --overwrite to replace it)")
        if not (is_layer_store(dst) or (os.path.isdir(dst) and not os.listdir(dst))):
            raise OverspillError(f"{dst}: exists and is not a layer store; refusing to replace it")
    ck = open_source(src, config)   # bad src: its own one-line CheckpointError / ConfigError
    cfg = ck.config
    world = tensor_parallel
    tied = cfg.tie_embeddings and not (quantize is not None and quantize_head)
    names = unit_order(cfg)
    try:
        if world > 1:
            from ..model.shard import check

            check(cfg, world, "--tensor-parallel")   # one line naming what does not divide
        planned = {u: _planned(ck, cfg, u, tdtype, quantize, quantize_head, tied, world) for u in names}
        tmp = staging_dir(dst, sum(planned.values()))
    except BaseException:
        ck.close()
        raise
    bar = None
    try:
        bar = tqdm(total=sum(planned.values()), unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"convert {os.path.basename(dst)}", disable=not progress, dynamic_ncols=True)
        entries = []

        def prepare(u: str) -> list[dict[str, torch.Tensor]]:   # read (+ shard, quantize): on the read-ahead thread
            skip = ("lm.weight",) if (u == "head" and tied) else ()
            t = ck.read_unit_except(u, tdtype, *skip)
            if world > 1 and u.startswith("block."):
                from ..model.shard import shard_block

                return [_quantize_unit(u, shard_block(cfg, t, r, world), quantize, quantize_head)
                        for r in range(world)]
            table = u == "embed" and _int8_table(cfg, quantize, quantize_head)
            return [_quantize_unit(u, t, quantize, quantize_head, table)]

        # unit i+1 is read and quantized while unit i is written: at most two units in memory
        with ThreadPoolExecutor(1, thread_name_prefix="overspill-convert") as ahead:
            nxt = ahead.submit(prepare, names[0])
            for k, u in enumerate(names):
                bar.set_postfix_str(u, refresh=False)
                parts = nxt.result()
                nxt = ahead.submit(prepare, names[k + 1]) if k + 1 < len(names) else None
                files = []
                for r, t in enumerate(parts):
                    fname = f"{u}.tp{r}.safetensors" if len(parts) > 1 else f"{u}.safetensors"
                    meta = {"overspill_unit": u, **({"overspill_shard": f"{r}/{world}"} if len(parts) > 1 else {})}
                    files.append({"file": fname, **write_unit_file(os.path.join(tmp, fname), t, meta, fsync=False)})
                entries.append({"name": u, "shards": files} if len(parts) > 1 else {"name": u, **files[0]})
                del parts, t
                bar.update(planned[u])
        for e in entries:   # durable before the rename; writeback of the early files ran meanwhile
            for f in e.get("shards", [e]):
                fd = os.open(os.path.join(tmp, f["file"]), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        sources = ck.extra_files() if hasattr(ck, "extra_files") else \
            {f: os.path.join(ck.path, f) for f in EXTRA_FILES if os.path.isfile(os.path.join(ck.path, f))}
        for f, p in sources.items():
            shutil.copyfile(p, os.path.join(tmp, f))
        extra = list(sources)
        manifest = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "hf_config": ck.hf_config,
                    "dtype": dname, "quantize": quantize, "quantize_head": bool(quantize and quantize_head),
                    "tied": tied, "extra_files": extra, "units": entries}
        if world > 1:
            manifest["tensor_parallel"] = world
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
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


# -- reading ---------------------------------------------------------------------------------

def is_layer_store(path: str) -> bool:
    """Whether ``path`` is a directory with a layer-store manifest (not validated further)."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def split_quantized(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """{"qkv.q.qweight": .., "qkv.bias": .., ..} -> (plain tensors, {"qkv": {"qweight": ..}, ..})
    for ``overspill.quant.make_linear(scheme, quant[lin], plain.get(f"{lin}.bias"))``."""
    plain, quant = {}, {}
    for name, t in tensors.items():
        lin, sep, key = name.partition(".q.")
        if sep:
            quant.setdefault(lin, {})[key] = t
        else:
            plain[name] = t
    return plain, quant


class LayerStore:
    """A converted layer store: validated manifest, per-unit spans, zero-copy views, positional reads.

    A tensor-parallel store (``tensor_parallel`` N > 1) is opened as one rank's view, ``shard=r``: its blocks are
    rank r's shard files. Without ``shard`` its blocks cannot be read (a one-line error names how to run it)."""

    def __init__(self, path: str, shard: int | None = None):
        self.path = path
        self.shard = shard
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such layer store directory")
        try:
            with open(mpath) as f:
                m = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{mpath}: missing layer store manifest (convert the model again)") from None
        except OSError as e:
            raise CheckpointError(f"{mpath}: cannot read ({e.strerror})") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{mpath}: corrupt manifest (not valid JSON: {e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise CheckpointError(f"{mpath}: not an overspill layer store manifest")
        if m.get("version") != VERSION:
            raise CheckpointError(f"{mpath}: layer store version {m.get('version')!r} is not supported "
                                  f"(expected {VERSION}; convert the model again)")
        try:
            self.config = ModelConfig.from_dict(m["config"]).validate()
            self.hf_config: dict = m["hf_config"]
            self.dtype: torch.dtype = STORE_DTYPES[m["dtype"]]
            self.quantize: str | None = m["quantize"]
            self.quantize_head: bool = bool(m.get("quantize_head", False))
            self.tied: bool = bool(m.get("tied", False))
            self.extra_files: list[str] = list(m.get("extra_files", []))
            self.tensor_parallel: int = int(m.get("tensor_parallel", 1))
            self._units: dict[str, dict | list[dict]] = {}
            for u in m["units"]:
                if "shards" in u:
                    if len(u["shards"]) != self.tensor_parallel or self.tensor_parallel < 2:
                        raise ValueError(f"{u['name']} has {len(u['shards'])} shards in a store for "
                                         f"{self.tensor_parallel} tensor-parallel ranks")
                    self._units[u["name"]] = [self._entry(e) for e in u["shards"]]
                else:
                    self._units[u["name"]] = self._entry(u)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{mpath}: corrupt manifest (bad or missing field: {type(e).__name__}: {e})") from None
        self.manifest = m
        want = unit_order(self.config)
        if list(self._units) != want:
            raise CheckpointError(f"{mpath}: corrupt manifest (units {list(self._units)[:4]}... do not match the "
                                  f"config's {len(want)} units)")
        if shard is not None and not 0 <= shard < self.tensor_parallel:
            raise CheckpointError(f"{path}: no tensor-parallel shard {shard} in a store for {self.tensor_parallel} "
                                  f"rank(s)")
        for name, u in self._units.items():
            for e in u if isinstance(u, list) else [u]:
                self._check_unit(name, e, mpath)

    @staticmethod
    def _entry(u: dict) -> dict:
        tens = {n: (DTYPES[i["dtype"]], tuple(int(s) for s in i["shape"]), int(i["offset"]), int(i["nbytes"]))
                for n, i in u["tensors"].items()}
        return {"file": u["file"], "bytes": int(u["bytes"]), "data_offset": int(u["data_offset"]),
                "data_bytes": int(u["data_bytes"]), "sha256": u["sha256"], "tensors": tens}

    def _check_unit(self, name: str, u: dict, mpath: str) -> None:
        f = os.path.join(self.path, u["file"])
        try:
            size = os.path.getsize(f)
        except OSError:
            raise CheckpointError(f"{f}: unit file of {name} is missing from the layer store") from None
        if size != u["bytes"]:
            what = "truncated" if size < u["bytes"] else "wrong size"
            raise CheckpointError(f"{f}: {what}: the manifest says {u['bytes']} bytes but the file has {size}")
        d0, n = u["data_offset"], u["data_bytes"]
        if d0 < 8 or d0 + n > size:
            raise CheckpointError(f"{mpath}: corrupt manifest (data span of {name} lies outside {f})")
        for t, (dt, shape, off, nb) in u["tensors"].items():
            if nb != math.prod(shape) * torch.empty((), dtype=dt).element_size() or off < d0 or off + nb > d0 + n \
                    or off % torch.empty((), dtype=dt).element_size():
                raise CheckpointError(f"{mpath}: corrupt manifest (tensor '{t}' of {name} has a bad offset/size)")

    def units(self) -> list[str]:
        return list(self._units)

    def _unit(self, unit: str) -> dict:
        try:
            u = self._units[unit]
        except KeyError:
            raise CheckpointError(f"{self.path}: no unit '{unit}' in this layer store") from None
        if isinstance(u, list):
            if self.shard is None:
                raise CheckpointError(f"{self.path}: its blocks are stored as {len(u)} tensor-parallel shards; open "
                                      f"it as one rank's view (LayerStore(path, shard=r))")
            return u[self.shard]
        return u

    def unit_file(self, unit: str) -> str:
        return os.path.join(self.path, self._unit(unit)["file"])

    def unit_span(self, unit: str) -> tuple[int, int]:
        """(data_offset, data_bytes): one read of these bytes holds every tensor of the unit."""
        u = self._unit(unit)
        return u["data_offset"], u["data_bytes"]

    def unit_bytes(self, unit: str) -> int:
        return self._unit(unit)["data_bytes"]

    def tensor_location(self, unit: str, name: str):
        """(file, byte offset, dtype, shape) of one stored tensor, or None when the unit has no such tensor."""
        t = self._unit(unit)["tensors"].get(name)
        if t is None:
            return None
        dt, shape, off, _ = t
        return self.unit_file(unit), off, dt, tuple(shape)

    def tensor_names(self, unit: str) -> list[str]:
        return list(self._unit(unit)["tensors"])

    def views(self, unit: str, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensor views (no copy) into ``buf``, a uint8 CPU tensor holding the unit's data section
        (buf[0] is file byte data_offset). The views alias ``buf``: keep it alive and unchanged."""
        u = self._unit(unit)
        d0, n = u["data_offset"], u["data_bytes"]
        if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous() or buf.numel() < n:
            raise ValueError(f"{unit}: need a contiguous 1-D uint8 buffer of at least {n} bytes, got "
                             f"{buf.dtype} {tuple(buf.shape)}")
        out = {}
        for name, (dt, shape, off, nb) in u["tensors"].items():
            out[name] = buf[off - d0: off - d0 + nb].view(dt).view(shape)
        return out

    def read_unit(self, unit: str, buf: torch.Tensor | None = None, alloc=None) -> dict[str, torch.Tensor]:
        """One positional read of the unit's data section into ``buf`` (or a fresh buffer from ``alloc(shape,
        dtype)``, torch.empty by default: the runtime passes an allocator on huge pages for units it keeps), then
        views. With a tied embedding the head has no "lm.weight": use the embed unit's "tok.weight"."""
        d0, n = self.unit_span(unit)
        if buf is None:
            buf = alloc((n,), torch.uint8) if alloc is not None else torch.empty(n, dtype=torch.uint8)
        elif buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous() or buf.numel() < n:
            raise ValueError(f"{unit}: need a contiguous 1-D uint8 buffer of at least {n} bytes")
        path = self.unit_file(unit)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
        try:
            pread_into(fd, buf[:n], d0, path)
            if hasattr(os, "posix_fadvise"):   # the bytes now live in buf: don't also keep them as page cache
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return self.views(unit, buf)

    def verify(self, units: list[str] | None = None) -> None:
        """Recompute the SHA-256 of unit files; CheckpointError naming the first file that differs."""
        for unit in units if units is not None else self.units():
            for u in self._units[unit] if isinstance(self._units.get(unit), list) else [self._unit(unit)]:
                self._verify_file(u)

    def _verify_file(self, u: dict) -> None:
        path = os.path.join(self.path, u["file"])
        h = hashlib.sha256()
        try:
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(16 << 20):
                    h.update(chunk)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        if h.hexdigest() != u["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch (file is corrupt; convert the model again)")
