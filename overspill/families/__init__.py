"""Architecture registry: Hugging Face ``architectures`` / ``model_type`` -> Family spec."""
from __future__ import annotations

from ..config import ModelConfig
from ..errors import ConfigError
from . import gpt2, gpt_neox, gptj, llama
from .base import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (gptj.FAMILY, gpt_neox.FAMILY, gpt2.FAMILY, llama.FAMILY)}


def supported() -> str:
    return ", ".join(a for f in FAMILIES.values() for a in f.architectures)


def family_for(hf_config: dict, source: str = "config.json") -> Family:
    """Pick the family from ``architectures`` (preferred) or ``model_type``."""
    for arch in hf_config.get("architectures") or []:
        for f in FAMILIES.values():
            if arch in f.architectures:
                return f
    mt = hf_config.get("model_type")
    for f in FAMILIES.values():
        if mt in f.model_types:
            return f
    what = hf_config.get("architectures") or mt
    raise ConfigError(f"{source}: unsupported architecture {what!r} (supported: {supported()})")


def config_from_hf(hf_config: dict, source: str = "config.json") -> tuple[Family, ModelConfig]:
    fam = family_for(hf_config, source)
    cfg = fam.config_from_hf(hf_config)
    cfg.torch_dtype = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return fam, cfg.validate()
