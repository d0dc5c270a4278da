"""EleutherAI's original checkpoints as conversion sources: the reader base class and merge helpers.

Two formats predate the Hugging Face uploads of the same models; both store each layer as
tensor-parallel pieces that must be merged:

    GPT-J-6B, mesh-transformer-jax "slim"       step_N/shard_{0..S-1}/{0..15}.npz     (mesh_jax.py)
    GPT-NeoX-20B, DeepSpeed pipeline "slim"     global_stepN/layer_XX-model_YY-model_states.pt
                                                + configs/*.yml                        (neox_ds.py)

A reader merges one unit (embed, block.N, head) at a time into the tensors a Hugging Face
checkpoint of that model holds, under their Hugging Face names (``hf_unit``); the family's
literal tables and ``finish_unit`` then give the canonical unit, exactly as for an HF directory.
So a reader offers HFCheckpoint's interface to ``store.convert`` (config, hf_config, path,
unit_names, shape, read_unit, read_unit_except, close), and ``convert_to_hf`` writes the same
tensors as a sharded safetensors directory that transformers loads (hf_writer.py).

    sources.open_source(path, config)  ->  HFCheckpoint | MeshJaxCheckpoint | NeoXCheckpoint
"""
from __future__ import annotations

import json

import torch

from ..errors import ConfigError
from ..families import config_from_hf
from ..model.weights import units as unit_order
from .hf import finish_unit, needed


class OriginalCheckpoint:
    """A checkpoint read unit by unit as Hugging Face tensors. Subclasses set ``path``, ``hf_config``,
    ``stored`` (the stored float dtype) and implement ``hf_shapes(unit)`` and ``hf_unit(unit, dtype)``."""

    kind = "original"

    def __init__(self, path: str, hf_config: dict, source: str):
        self.path, self.hf_config = path, hf_config
        self.family, self.config = config_from_hf(hf_config, source)
        self._names = {u: self._table_names(u) for u in unit_order(self.config)}
        self._shapes = {u: self.hf_shapes(u) for u in unit_order(self.config)}
        for u, names in self._names.items():
            assert set(names) == set(self._shapes[u]), (u, sorted(names), sorted(self._shapes[u]))

    def _table_names(self, unit: str) -> dict[str, str]:
        fam, cfg = self.family, self.config
        if unit == "embed":
            table, idx = fam.embed_table, None
        elif unit == "head":
            table, idx = fam.head_table, None
        else:
            table, idx = fam.block_table, int(unit.split(".")[1])
        return {(t.format(idx) if idx is not None else t): c for t, c in table.items()
                if c is not None and needed(cfg, c)}

    # -- what subclasses provide ---------------------------------------------------------
    def hf_shapes(self, unit: str) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def hf_unit(self, unit: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The unit's tensors under their Hugging Face names, tensor-parallel pieces merged, in ``dtype``."""
        raise NotImplementedError

    def extra_files(self) -> dict[str, str]:
        """{name in the output directory: source path} of files to copy (a tokenizer)."""
        return {}

    def close(self) -> None:
        pass

    # -- the HFCheckpoint interface store.convert uses -------------------------------------
    def unit_names(self, unit: str) -> dict[str, str]:
        """{hf name: raw canonical name} for 'embed', 'head' or 'block.N'."""
        return self._names[unit]

    def shape(self, name: str) -> tuple[int, ...]:
        for shapes in self._shapes.values():
            if name in shapes:
                return shapes[name]
        raise KeyError(name)

    def stored_dtype(self) -> torch.dtype:
        return self.stored

    def read_unit(self, unit: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return self.read_unit_except(unit, dtype)

    def read_unit_except(self, unit: str, dtype: torch.dtype, *skip: str) -> dict[str, torch.Tensor]:
        names = self.unit_names(unit)
        got = checked(self.hf_unit(unit, dtype), self._shapes[unit], self.path, unit)
        raw = {names[h]: t for h, t in got.items() if names[h] not in skip}
        return finish_unit(self.family, self.config, unit, raw, {c: h for h, c in names.items()}, self.path)


def checked(got: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], path: str, unit: str) -> dict:
    """Assert a reader's merged unit has exactly the expected names and shapes (a reader bug, not a user error,
    when not: each piece was checked against the config as it was read)."""
    assert set(got) == set(want), (path, unit, sorted(set(got) ^ set(want)))
    for n, t in got.items():
        assert tuple(t.shape) == want[n], (path, n, tuple(t.shape), want[n])
    return got


def cat_into(pieces: list[torch.Tensor], dim: int, dtype: torch.dtype, add: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate tensor-parallel pieces along ``dim`` into one new tensor of ``dtype`` (one allocation: each piece
    is copied, converted and, when it is a transposed view, made contiguous in the same step). ``add`` (broadcast,
    float32) is added to every piece in float32 first."""
    shape = list(pieces[0].shape)
    shape[dim] = sum(p.shape[dim] for p in pieces)
    out = torch.empty(shape, dtype=dtype)
    off = 0
    for p in pieces:
        n = p.shape[dim]
        out.narrow(dim, off, n).copy_(p if add is None else p.float() + add)
        off += n
    return out


def summed(pieces: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Pieces each rank adds before the all-reduce (so the model used their sum), summed in float32."""
    return torch.stack([p.float() for p in pieces]).sum(0).to(dtype)


def averaged(pieces: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Replicated parameters (equal on every rank up to training noise), averaged in float32."""
    return torch.stack([p.float() for p in pieces]).mean(0).to(dtype)


def read_config_file(path: str) -> dict:
    """A JSON or YAML (GPT-NeoX .yml) config file as a dict; ConfigError naming the file otherwise."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    if path.endswith((".yml", ".yaml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading a GPT-NeoX .yml config needs PyYAML (pip install pyyaml)") from None
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(d).__name__}")
    return d
