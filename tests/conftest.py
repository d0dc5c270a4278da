"""Tiny random-weight reference models built with transformers, saved in HF format."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)

VOCAB = 96

# name -> (transformers config class name, kwargs). Every architecture variant the issue names.
VARIANTS = {
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128)),
    "gpt_neox_parallel": ("GPTNeoXConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=128, rotary_pct=0.25, use_parallel_residual=True,
                                                max_position_embeddings=128)),
    "gpt_neox_sequential": ("GPTNeoXConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                  intermediate_size=128, rotary_pct=0.5, use_parallel_residual=False,
                                                  max_position_embeddings=128)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "llama_gqa": ("LlamaConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, rope_theta=500.0, max_position_embeddings=128,
                                      tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                       intermediate_size=96, max_position_embeddings=128, tie_word_embeddings=True)),
}
MODEL_CLASS = {"GPTJConfig": "GPTJForCausalLM", "GPTNeoXConfig": "GPTNeoXForCausalLM",
               "GPT2Config": "GPT2LMHeadModel", "LlamaConfig": "LlamaForCausalLM"}


def build_reference(variant: str, seed: int = 0, layers: int | None = None):
    import transformers

    cls_name, kw = VARIANTS[variant]
    if layers is not None:
        kw = {**kw, ("n_layer" if "n_layer" in kw else "num_hidden_layers"): layers}
    cfg = getattr(transformers, cls_name)(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASS[cls_name])(cfg).eval()
    # Random init has tiny weights: scale them up so logits are far from uniform and
    # greedy choices are not decided by 1e-6 ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.02)
            else:
                p.normal_(1.0, 0.05)
    return model


@pytest.fixture(scope="session")
def ref_dir(tmp_path_factory):
    """variant -> (directory with a safetensors checkpoint, the transformers model)."""
    cache = {}

    def get(variant: str, layers: int | None = None):
        if (variant, layers) not in cache:
            model = build_reference(variant, layers=layers)
            d = tmp_path_factory.mktemp(variant if layers is None else f"{variant}-{layers}")
            model.save_pretrained(d, safe_serialization=True)
            cache[variant, layers] = (str(d), model)
        return cache[variant, layers]

    return get


@pytest.fixture
def deep_dir(ref_dir):
    """variant -> a 6-block version of it: deep enough that streaming some blocks beats holding them all."""
    return lambda variant: ref_dir(variant, layers=6)


def play_split(tmp_path):
    """Twelfth Night, which the built-in model never saw, from its held-out text: the first 90% of its lines to train
    on (tmp_path/train.txt), the rest held out (rest.txt). Returns both paths."""
    import overspill

    text = open(os.path.join(overspill.default_model_path(), "heldout.txt")).read().split("\n")
    play = text[text.index("TWELFTH NIGHT"):]
    cut = int(len(play) * 0.9)
    (tmp_path / "train.txt").write_text("\n".join(play[:cut]))
    (tmp_path / "rest.txt").write_text("\n".join(play[cut:]))
    return str(tmp_path / "train.txt"), str(tmp_path / "rest.txt")
