"""Llama family: RMSNorm, SwiGLU, grouped-query attention, full rotate-half rotary with rope_theta."""
from ..config import ModelConfig
from .base import Family, Tensors, activation, eos_list, field, rope_settings
from .transforms import fuse_rows


def config_from_hf(hf: dict) -> ModelConfig:
    f = "llama"
    C, nh = field(hf, "hidden_size", f), field(hf, "num_attention_heads", f)
    hs = hf.get("head_dim") or C // nh
    theta, partial, scale = rope_settings(hf, f)
    return ModelConfig(
        family=f, vocab_size=field(hf, "vocab_size", f), hidden_size=C, n_layers=field(hf, "num_hidden_layers", f),
        n_heads=nh, n_kv_heads=hf.get("num_key_value_heads") or nh, head_dim=hs,
        intermediate_size=field(hf, "intermediate_size", f), max_positions=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm", norm_bias=False, norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=activation(hf.get("hidden_act", "silu"), f), gated_mlp=True,
        rotary_dim=int(hs * partial), rope_theta=theta, rope_scale=scale,
        qkv_bias=hf.get("attention_bias", False), out_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False), tie_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_list(hf), pad_token_id=hf.get("pad_token_id"),
    )


def finish_block(cfg: ModelConfig, t: Tensors) -> Tensors:
    out = {k: v for k, v in t.items() if k.split(".")[0] not in ("q", "k", "v", "gate", "up")}
    out["qkv.weight"] = fuse_rows(t["q.weight"], t["k.weight"], t["v.weight"])
    if "q.bias" in t:
        out["qkv.bias"] = fuse_rows(t["q.bias"], t["k.bias"], t["v.bias"])
    out["up.weight"] = fuse_rows(t["gate.weight"], t["up.weight"])
    if "gate.bias" in t:
        out["up.bias"] = fuse_rows(t["gate.bias"], t["up.bias"])
    return out


FAMILY = Family(
    name="llama", architectures=("LlamaForCausalLM",), model_types=("llama",), config_from_hf=config_from_hf,
    base_prefix="model.",
    embed_table={"model.embed_tokens.weight": "tok.weight"},
    block_table={
        "model.layers.{}.input_layernorm.weight": "attn_norm.weight",
        "model.layers.{}.post_attention_layernorm.weight": "mlp_norm.weight",
        "model.layers.{}.self_attn.q_proj.weight": "q.weight",
        "model.layers.{}.self_attn.k_proj.weight": "k.weight",
        "model.layers.{}.self_attn.v_proj.weight": "v.weight",
        "model.layers.{}.self_attn.q_proj.bias": "q.bias",
        "model.layers.{}.self_attn.k_proj.bias": "k.bias",
        "model.layers.{}.self_attn.v_proj.bias": "v.bias",
        "model.layers.{}.self_attn.o_proj.weight": "out.weight",
        "model.layers.{}.self_attn.o_proj.bias": "out.bias",
        "model.layers.{}.mlp.gate_proj.weight": "gate.weight",
        "model.layers.{}.mlp.up_proj.weight": "up.weight",
        "model.layers.{}.mlp.gate_proj.bias": "gate.bias",
        "model.layers.{}.mlp.up_proj.bias": "up.bias",
        "model.layers.{}.mlp.down_proj.weight": "down.weight",
        "model.layers.{}.mlp.down_proj.bias": "down.bias",
        "model.layers.{}.self_attn.rotary_emb.inv_freq": None,  # recomputed, never loaded
    },
    head_table={
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm.weight",
    },
    finish_block=finish_block,
)
