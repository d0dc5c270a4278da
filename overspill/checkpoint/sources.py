"""Which format a checkpoint directory is in, and its reader.

    open_source(path, config)  ->  HFCheckpoint        a Hugging Face directory
                                   MeshJaxCheckpoint   GPT-J's mesh-transformer-jax slim shards (mesh_jax.py)
                                   NeoXCheckpoint      GPT-NeoX's DeepSpeed layer files (neox_ds.py)
"""
from __future__ import annotations

import os

from ..errors import CheckpointError, ConfigError
from . import mesh_jax, neox_ds
from .hf import WEIGHT_FILES, HFCheckpoint

FORMATS = ("a Hugging Face directory (config.json + model.safetensors or pytorch_model.bin), "
           "a mesh-transformer-jax slim checkpoint (step_N/shard_0..7/*.npz, GPT-J-6B), "
           "or a GPT-NeoX DeepSpeed checkpoint (layer_XX-model_YY-model_states.pt, GPT-NeoX-20B)")


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and \
        any(os.path.exists(os.path.join(path, f)) for f in WEIGHT_FILES)


def open_source(path: str, config: str | None = None):
    """The reader for a checkpoint directory in any format overspill converts; one-line errors otherwise.

    ``config``: a config file for an original checkpoint (GPT-NeoX .yml, mesh-transformer-jax .json, or a Hugging Face
    config.json); without it each reader looks for the one its format ships with (see mesh_jax.py, neox_ds.py)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such model directory")
    if config is not None and not os.path.isfile(config):
        raise ConfigError(f"{config}: no such config file")
    if is_hf_dir(path):
        if config is not None:
            raise ConfigError(f"{path}: a Hugging Face directory has its own config.json; --config is for "
                              f"original checkpoints")
        return HFCheckpoint(path)
    for fmt in (mesh_jax, neox_ds):
        found = fmt.find(path)
        if found is not None:
            return fmt.open_checkpoint(found, config)
    if os.path.isfile(os.path.join(path, "config.json")):
        return HFCheckpoint(path)   # its own "no weights found" line
    raise CheckpointError(f"{path}: not a checkpoint overspill can convert (expected {FORMATS})")
