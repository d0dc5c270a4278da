"""GPT-2: learned absolute positions, Conv1D ([in, out]) weights, tied LM head."""
from ..config import ModelConfig
from ..errors import ConfigError
from .base import Family, Tensors, activation, eos_list, field
from .transforms import conv1d_to_linear


def config_from_hf(hf: dict) -> ModelConfig:
    f = "gpt2"
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ConfigError("config.json: scale_attn_by_inverse_layer_idx=true is not supported for gpt2")
    C, nh = field(hf, "n_embd", f), field(hf, "n_head", f)
    hs = C // nh
    return ModelConfig(
        family=f, vocab_size=field(hf, "vocab_size", f), hidden_size=C, n_layers=field(hf, "n_layer", f),
        n_heads=nh, n_kv_heads=nh, head_dim=hs, intermediate_size=hf.get("n_inner") or 4 * C,
        max_positions=field(hf, "n_positions", f, "n_ctx"), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=activation(hf.get("activation_function", "gelu_new"), f), learned_positions=True,
        qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_list(hf), pad_token_id=hf.get("pad_token_id"),
    )


def finish_block(cfg: ModelConfig, t: Tensors) -> Tensors:
    return {k: conv1d_to_linear(v) if k.endswith(".weight") and not k.endswith("norm.weight") else v
            for k, v in t.items()}


FAMILY = Family(
    name="gpt2", architectures=("GPT2LMHeadModel",), model_types=("gpt2",), config_from_hf=config_from_hf,
    base_prefix="transformer.",
    embed_table={"transformer.wte.weight": "tok.weight", "transformer.wpe.weight": "pos.weight"},
    block_table={
        "transformer.h.{}.ln_1.weight": "attn_norm.weight",
        "transformer.h.{}.ln_1.bias": "attn_norm.bias",
        "transformer.h.{}.ln_2.weight": "mlp_norm.weight",
        "transformer.h.{}.ln_2.bias": "mlp_norm.bias",
        "transformer.h.{}.attn.c_attn.weight": "qkv.weight",   # Conv1D [C, 3C], q|k|v columns
        "transformer.h.{}.attn.c_attn.bias": "qkv.bias",
        "transformer.h.{}.attn.c_proj.weight": "out.weight",
        "transformer.h.{}.attn.c_proj.bias": "out.bias",
        "transformer.h.{}.mlp.c_fc.weight": "up.weight",
        "transformer.h.{}.mlp.c_fc.bias": "up.bias",
        "transformer.h.{}.mlp.c_proj.weight": "down.weight",
        "transformer.h.{}.mlp.c_proj.bias": "down.bias",
        "transformer.h.{}.attn.bias": None,          # causal-mask buffers in old checkpoints
        "transformer.h.{}.attn.masked_bias": None,
    },
    head_table={
        "transformer.ln_f.weight": "norm.weight",
        "transformer.ln_f.bias": "norm.bias",
        "lm_head.weight": "lm.weight",
    },
    finish_block=finish_block, conv1d=True,
)
