"""GPT-NeoX / Pythia: per-head interleaved fused QKV, partial rotate-half rotary, either residual style."""
from ..config import ModelConfig
from .base import Family, Tensors, activation, eos_list, field, rope_settings
from .transforms import neox_qkv_to_fused


def config_from_hf(hf: dict) -> ModelConfig:
    f = "gpt_neox"
    C, nh = field(hf, "hidden_size", f), field(hf, "num_attention_heads", f)
    hs = C // nh
    theta, partial, scale = rope_settings(hf, f)
    bias = hf.get("attention_bias", True)
    return ModelConfig(
        family=f, vocab_size=field(hf, "vocab_size", f), hidden_size=C, n_layers=field(hf, "num_hidden_layers", f),
        n_heads=nh, n_kv_heads=nh, head_dim=hs, intermediate_size=field(hf, "intermediate_size", f),
        max_positions=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("layer_norm_eps", 1e-5),
        activation=activation(hf.get("hidden_act", "gelu"), f),
        parallel_residual=hf.get("use_parallel_residual", True), rotary_dim=int(hs * partial),
        rope_theta=theta, rope_scale=scale, qkv_bias=bias, out_bias=bias, mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_list(hf), pad_token_id=hf.get("pad_token_id"),
    )


def finish_block(cfg: ModelConfig, t: Tensors) -> Tensors:
    out = {k: v for k, v in t.items() if not k.startswith("qkv_neox.")}
    out["qkv.weight"] = neox_qkv_to_fused(t["qkv_neox.weight"], cfg.n_heads, cfg.head_dim)
    if "qkv_neox.bias" in t:
        out["qkv.bias"] = neox_qkv_to_fused(t["qkv_neox.bias"], cfg.n_heads, cfg.head_dim)
    return out


FAMILY = Family(
    name="gpt_neox", architectures=("GPTNeoXForCausalLM",), model_types=("gpt_neox",),
    config_from_hf=config_from_hf, base_prefix="gpt_neox.",
    embed_table={"gpt_neox.embed_in.weight": "tok.weight"},
    block_table={
        "gpt_neox.layers.{}.input_layernorm.weight": "attn_norm.weight",
        "gpt_neox.layers.{}.input_layernorm.bias": "attn_norm.bias",
        "gpt_neox.layers.{}.post_attention_layernorm.weight": "mlp_norm.weight",
        "gpt_neox.layers.{}.post_attention_layernorm.bias": "mlp_norm.bias",
        "gpt_neox.layers.{}.attention.query_key_value.weight": "qkv_neox.weight",
        "gpt_neox.layers.{}.attention.query_key_value.bias": "qkv_neox.bias",
        "gpt_neox.layers.{}.attention.dense.weight": "out.weight",
        "gpt_neox.layers.{}.attention.dense.bias": "out.bias",
        "gpt_neox.layers.{}.mlp.dense_h_to_4h.weight": "up.weight",
        "gpt_neox.layers.{}.mlp.dense_h_to_4h.bias": "up.bias",
        "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight": "down.weight",
        "gpt_neox.layers.{}.mlp.dense_4h_to_h.bias": "down.bias",
        "gpt_neox.layers.{}.attention.bias": None,              # causal-mask buffers and rotary
        "gpt_neox.layers.{}.attention.masked_bias": None,       # tables in older checkpoints
        "gpt_neox.layers.{}.attention.rotary_emb.inv_freq": None,
    },
    head_table={
        "gpt_neox.final_layer_norm.weight": "norm.weight",
        "gpt_neox.final_layer_norm.bias": "norm.bias",
        "embed_out.weight": "lm.weight",
    },
    finish_block=finish_block,
)
