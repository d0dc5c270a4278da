"""Read a Hugging Face model directory: config.json plus safetensors or .bin weights, single or sharded."""
from __future__ import annotations

import json
import math
import os
import re

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..families import config_from_hf
from ..families.base import Family
from ..model.weights import canonical_shapes
from .safetensors_io import SafetensorsFile

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


class _BinFile:
    """A PyTorch .bin shard, loaded lazily with weights_only=True (never unpickles code) and mmap."""

    def __init__(self, path: str):
        self.path = path
        self._sd: dict[str, torch.Tensor] | None = None

    @property
    def sd(self) -> dict[str, torch.Tensor]:
        if self._sd is None:
            try:
                try:
                    sd = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):   # legacy (non-zip) .bin files cannot be mmap'd
                        raise
                    sd = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickle / zip errors of many kinds
                raise CheckpointError(f"{self.path}: cannot load PyTorch weights ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:200]})") from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{self.path}: expected a state dict, got {type(sd).__name__}")
            self._sd = sd
        return self._sd

    def names(self) -> list[str]:
        return list(self.sd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.sd[name].shape)

    def read(self, name: str) -> torch.Tensor:
        return self.sd[name].clone()  # own the memory; the mmap stays shared

    def close(self) -> None:
        self._sd = None


class HFCheckpoint:
    """A checkpoint directory as a name -> tensor source, with its family and config.

    ``shard=(rank, ranks)``: one tensor-parallel rank's view (model/shard.py). Its blocks read only the rows (and
    row-parallel weights' columns) that rank holds and finish at its local config, to what ``shard_block`` cuts
    from the whole block; ``config`` stays the whole model's. A slice along the first dimension is a contiguous
    read. One along the second (the row-parallel out and down weights, stored [out, in]; GPT-2's column-parallel
    ones, stored [in, out]) is strided in the file, a row's 1/ranks in each piece, and small O_DIRECT pieces are
    slow: rank 0's half of each row of GPT-J-6B's down weight (4096 pieces of 16 KiB, 20 KiB aligned) read at 0.30-
    0.40 GB/s of tensor against 0.84-1.23 GB/s for the whole tensor, alternated. So those tensors are read whole
    and cut in memory, one at a time (``unit_read_bytes`` counts them whole): a GPT-J rank reads 71% of a block at
    2 ranks, 56% at 4. A layer store written with ``convert --tensor-parallel`` reads exactly a rank's bytes."""

    def __init__(self, path: str, shard: tuple[int, int] | None = None):
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such model directory")
        self.path = path
        self.hf_config = read_json(os.path.join(path, "config.json"), "config.json")
        gen = os.path.join(path, "generation_config.json")
        self.generation_config = read_json(gen, "generation_config.json") if os.path.exists(gen) else {}
        self.family, self.config = config_from_hf(self.hf_config, os.path.join(path, "config.json"))
        self._files: dict[str, SafetensorsFile | _BinFile] = {}
        self._where: dict[str, str] = {}  # tensor name -> file name
        self._discover()
        self.resolver = NameResolver(self.family, self.config, self._where, path)
        self.shard = shard if shard is not None and shard[1] > 1 else None
        self._block_config = self.config
        if self.shard is not None:
            from ..model.shard import local_config
            self._block_config = local_config(self.config, self.shard[1])

    # -- files ------------------------------------------------------------------------
    def _discover(self) -> None:
        p = lambda f: os.path.join(self.path, f)
        if os.path.exists(p("model.safetensors.index.json")):
            self._from_index("model.safetensors.index.json")
        elif os.path.exists(p("model.safetensors")):
            self._add_file("model.safetensors")
        elif os.path.exists(p("pytorch_model.bin.index.json")):
            self._from_index("pytorch_model.bin.index.json")
        elif os.path.exists(p("pytorch_model.bin")):
            self._add_file("pytorch_model.bin")
        else:
            raise CheckpointError(f"{self.path}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")

    def _from_index(self, index_name: str) -> None:
        index = read_json(os.path.join(self.path, index_name), index_name)
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{os.path.join(self.path, index_name)}: missing or empty 'weight_map'")
        for fname in sorted(set(wm.values())):
            if not os.path.exists(os.path.join(self.path, fname)):
                raise CheckpointError(f"{os.path.join(self.path, fname)}: shard listed in {index_name} is missing")
            self._add_file(fname)
        for name, fname in wm.items():
            if self._where.get(name) != fname:
                raise CheckpointError(f"{os.path.join(self.path, fname)}: tensor '{name}' listed in {index_name} "
                                      f"is not in that shard")

    def _add_file(self, fname: str) -> None:
        full = os.path.join(self.path, fname)
        f = SafetensorsFile(full) if fname.endswith(".safetensors") else _BinFile(full)
        self._files[fname] = f
        names = f.tensors if isinstance(f, SafetensorsFile) else f.names()
        for n in names:
            self._where[n] = fname

    def file_of(self, name: str) -> str:
        return os.path.join(self.path, self._where[name])

    def shape(self, name: str) -> tuple[int, ...]:
        f = self._files[self._where[name]]
        return f.tensors[name].shape if isinstance(f, SafetensorsFile) else f.shape(name)

    def read(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype, in freshly allocated CPU memory."""
        return self._files[self._where[name]].read(name)

    def stored_dtype(self) -> torch.dtype | None:
        for f in self._files.values():
            if isinstance(f, SafetensorsFile):
                for info in f.tensors.values():
                    if info.dtype.is_floating_point:
                        return info.dtype
        return None

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def tensor_location(self, unit: str, canon: str):
        """(file, byte offset, dtype, shape) of the tensor that becomes ``canon`` of ``unit``, as stored, or None
        (not in this unit, or in a pickled .bin file, whose bytes have no fixed place)."""
        for name, c in self.unit_names(unit).items():
            if c == canon:
                f = self._files[self._where[name]]
                if not isinstance(f, SafetensorsFile):
                    return None
                info = f.tensors[name]
                return f.path, info.offset, info.dtype, tuple(info.shape)
        return None

    # -- units ------------------------------------------------------------------------
    def unit_names(self, unit: str) -> dict[str, str]:
        """{hf name: raw canonical name} for 'embed', 'head' or 'block.N'."""
        return self.resolver.unit(unit)

    def read_unit(self, unit: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Canonical tensors of one unit, converted to ``dtype`` (floating tensors only)."""
        return self.read_unit_except(unit, dtype)

    def read_unit_except(self, unit: str, dtype: torch.dtype, *skip: str) -> dict[str, torch.Tensor]:
        return self.finish(unit, self.read_unit_raw(unit, dtype, *skip))

    def parts(self, unit: str) -> dict[str, tuple[int, list[tuple[int, int]]]]:
        """{hf name: (dim, ranges)}: what a tensor-parallel view reads of each of a block's tensors that it does not
        read whole (model/shard.raw_parts); empty for a whole checkpoint and for the embedding and head."""
        if self.shard is None or not unit.startswith("block."):
            return {}
        from ..model.shard import raw_parts
        got = {h: raw_parts(self.config, c, self.family.conv1d, *self.shard) for h, c in self.unit_names(unit).items()}
        return {h: p for h, p in got.items() if p is not None}

    def unit_read_bytes(self, unit: str, dtype: torch.dtype) -> int:
        """Bytes a read of ``unit`` in ``dtype`` takes from the files: a tensor-parallel view's row slices exactly, a
        column-sliced tensor whole (see the class)."""
        es = torch.empty((), dtype=dtype).element_size()
        parts = self.parts(unit)
        n = 0
        for h in self.unit_names(unit):
            shape = self.shape(h)
            dim, ranges = parts.get(h, (None, None))
            if ranges == []:                # none of it (a row-parallel bias, off rank 0)
                continue
            rows = sum(b - a for a, b in ranges) if dim == 0 else (shape[0] if shape else 1)
            n += rows * math.prod(shape[1:]) * es
        return n

    def read_unit_raw(self, unit: str, dtype: torch.dtype, *skip: str, alloc=None) -> dict[str, torch.Tensor]:
        """The unit's tensors as stored (raw canonical names, in ``dtype``), before the family's transforms; each
        large one in its own memory from ``alloc(shape, dtype)`` (default torch.empty). A tensor-parallel view reads
        its rank's slices (``parts``)."""
        parts = self.parts(unit)
        names = {h: c for h, c in self.unit_names(unit).items() if c not in skip and parts.get(h) != (0, [])}
        rows = {h: r for h, (d, r) in parts.items() if d == 0 and r}
        by_file: dict[str, list[str]] = {}
        for h in names:
            by_file.setdefault(self._where[h], []).append(h)
        raw = {}
        for fname, hs in by_file.items():
            f = self._files[fname]
            if isinstance(f, SafetensorsFile) and all(f.tensors[h].dtype == dtype or not f.tensors[h].dtype.is_floating_point
                                                      for h in hs):
                # all at once (parallel, O_DIRECT): no conversion, no extra copy; a column slice is cut from its
                # tensor read alone, so one whole tensor at a time is alive beside the slices
                whole = [h for h in hs if h in parts and h not in rows]
                got = f.read_many([h for h in hs if h not in whole], alloc, rows)
                for h in whole:
                    got[h] = _cut(f.read_many([h])[h], *parts[h], alloc)
                raw.update((names[h], got.pop(h)) for h in hs)
                continue
            for h in hs:                    # one tensor at a time: its stored-dtype copy dies once converted
                if isinstance(f, SafetensorsFile) and h in rows:
                    t = f.read_many([h], rows=rows)[h]
                else:                       # a .bin shard's tensors are read whole, then cut
                    t = f.read(h)
                    if h in parts:
                        t = _cut(t, *parts[h])
                raw[names[h]] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
        return raw

    def finish(self, unit: str, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """read_unit_raw's tensors -> the canonical unit (fused, converted, shape-checked; a tensor-parallel view's
        blocks at the rank's local config)."""
        cfg = self._block_config if unit.startswith("block.") else self.config
        return finish_unit(self.family, cfg, unit, raw, self.resolver.sources(unit), self.path)

    def check_shapes(self) -> None:
        """Every unit's transforms and shape checks run on the headers' shapes alone (meta tensors, nothing read):
        a tensor that does not fit config.json is reported before any weight is read, in the same words as a read."""
        for unit in ["embed"] + [f"block.{i}" for i in range(self.config.n_layers)] + ["head"]:
            raw = {c: torch.empty(self.shape(h), device="meta") for h, c in self.unit_names(unit).items()}
            try:
                finish_unit(self.family, self.config, unit, raw, self.resolver.sources(unit), self.path)
            except NotImplementedError:   # a transform with no meta kernel: checked when the unit is read
                pass


def _cut(t: torch.Tensor, dim: int, ranges: list[tuple[int, int]], alloc=None) -> torch.Tensor:
    """The ranges of ``t`` along ``dim``, concatenated, in their own memory (from ``alloc(shape, dtype)``)."""
    shape = list(t.shape)
    shape[dim] = sum(b - a for a, b in ranges)
    out = alloc(tuple(shape), t.dtype) if alloc else torch.empty(tuple(shape), dtype=t.dtype)
    torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim=dim, out=out)
    return out


def finish_unit(family: Family, cfg: ModelConfig, unit: str, raw: dict[str, torch.Tensor],
                sources: dict[str, str], where: str) -> dict[str, torch.Tensor]:
    """Apply the family's transforms to a block and check every shape against the config."""
    if unit.startswith("block."):
        try:
            out = family.finish_block(cfg, dict(raw))
        except (AssertionError, RuntimeError, KeyError) as e:
            raise CheckpointError(_shape_message(cfg, unit, raw, sources, where, detail=str(e))) from None
    else:
        out = raw
    expected = canonical_shapes(cfg, unit)
    for name, t in out.items():
        if name in expected and tuple(t.shape) != expected[name]:
            raise CheckpointError(_shape_message(cfg, unit, raw, sources, where, name, tuple(t.shape), expected[name]))
    return out


def _shape_message(cfg, unit, raw, sources, where, canon=None, got=None, want=None, detail="") -> str:
    base = canon.split(".")[0] if canon else None
    feeds = {"qkv": ("q", "k", "v", "qkv_neox", "qkv"), "up": ("gate", "up")}.get(base, (base,))
    culprits = [(sources[r], tuple(t.shape)) for r, t in raw.items() if r.split(".")[0] in feeds and r in sources] \
        if base else [(sources.get(r, r), tuple(t.shape)) for r, t in raw.items()]
    names = ", ".join(f"'{n}' {list(s)}" for n, s in culprits[:3])
    dims = f"hidden {cfg.hidden_size}, heads {cfg.n_heads}x{cfg.head_dim}, kv heads {cfg.n_kv_heads}, mlp {cfg.intermediate_size}"
    if canon:
        return f"{where}: shape mismatch in {unit}: tensor {names} gives {canon} {list(got)}, config.json ({dims}) implies {list(want)}"
    return f"{where}: shape mismatch in {unit}: tensors {names} do not fit config.json ({dims})"


def needed(cfg: ModelConfig, canon: str) -> bool:
    """Whether a raw canonical tensor must be present for this config."""
    part, _, kind = canon.partition(".")
    if part == "pos":
        return cfg.learned_positions
    if part == "lm":
        return cfg.lm_head_bias if kind == "bias" else not cfg.tie_embeddings
    if part == "mlp_norm" and cfg.shared_norm:
        return False
    if kind == "bias":
        if part in ("attn_norm", "mlp_norm", "norm"):
            return cfg.norm_bias
        if part in ("q", "k", "v", "qkv", "qkv_neox"):
            return cfg.qkv_bias
        if part == "out":
            return cfg.out_bias
        return cfg.mlp_bias
    return True


class NameResolver:
    """Maps the checkpoint's tensor names onto units, through the family's literal tables.

    Fails loudly: a needed tensor that is absent, or a stored tensor that no table entry
    (mapped or explicitly dropped) accounts for, is an error naming the tensor and file.
    Checkpoints of the bare base model (names without e.g. ``transformer.``) also resolve.
    """

    def __init__(self, family: Family, cfg: ModelConfig, where: dict[str, str], path: str):
        self.family, self.cfg, self.where, self.path = family, cfg, where, path
        pfx = family.base_prefix
        self.strip = bool(pfx) and not any(n.startswith(pfx) for n in where)
        self._units: dict[str, dict[str, str]] = {}
        claimed: set[str] = set()
        for unit in ["embed"] + [f"block.{i}" for i in range(cfg.n_layers)] + ["head"]:
            self._units[unit] = self._resolve(unit, claimed)
        for name in where:
            if name not in claimed and not self._dropped(name):
                raise CheckpointError(f"{os.path.join(path, where[name])}: unexpected tensor '{name}' (not part of a "
                                      f"{family.name} checkpoint with {cfg.n_layers} layers and this config)")

    def _name(self, template: str, i: int | None = None) -> str:
        n = template.format(i) if i is not None else template
        if self.strip and n.startswith(self.family.base_prefix):
            n = n[len(self.family.base_prefix):]
        return n

    def _table(self, unit: str):
        if unit == "embed":
            return self.family.embed_table, None
        if unit == "head":
            return self.family.head_table, None
        return self.family.block_table, int(unit.split(".")[1])

    def _resolve(self, unit: str, claimed: set[str]) -> dict[str, str]:
        table, idx = self._table(unit)
        out: dict[str, str] = {}
        for tmpl, canon in table.items():
            name = self._name(tmpl, idx)
            if canon is None:
                continue
            if name in self.where:
                if not needed(self.cfg, canon) and not (canon == "lm.weight" and self.cfg.tie_embeddings):
                    raise CheckpointError(f"{os.path.join(self.path, self.where[name])}: unexpected tensor '{name}' "
                                          f"(config.json says this {self.family.name} model has no such tensor)")
                out[name] = canon
                claimed.add(name)
            elif needed(self.cfg, canon):
                raise CheckpointError(f"{self.path}: missing tensor '{name}' (needed by {self.family.name} {unit})")
        if unit == "head" and self.cfg.tie_embeddings and "lm.weight" not in out.values():
            tok = next(self._name(t) for t, c in self.family.embed_table.items() if c == "tok.weight")
            out[tok] = "lm.weight"
        return out

    def _dropped(self, name: str) -> bool:
        for tables in (self.family.embed_table, self.family.block_table, self.family.head_table):
            for tmpl, canon in tables.items():
                pattern = re.escape(self._name(tmpl.replace("{}", "\x00"))).replace("\x00", r"\d+")
                if canon is None and re.fullmatch(pattern, name):
                    return True
        return False

    def unit(self, unit: str) -> dict[str, str]:
        return self._units[unit]

    def sources(self, unit: str) -> dict[str, str]:
        return {canon: hf for hf, canon in self._units[unit].items()}
