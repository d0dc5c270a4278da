"""GPT-J: parallel residual with one shared LayerNorm, interleaved partial rotary, biased MLP and LM head."""
from ..config import ModelConfig
from .base import Family, Tensors, activation, eos_list, field
from .transforms import fuse_rows, interleaved_to_half_rotary


def config_from_hf(hf: dict) -> ModelConfig:
    f = "gptj"
    C, nh = field(hf, "n_embd", f), field(hf, "n_head", f)
    hs = C // nh
    return ModelConfig(
        family=f, vocab_size=field(hf, "vocab_size", f), hidden_size=C, n_layers=field(hf, "n_layer", f),
        n_heads=nh, n_kv_heads=nh, head_dim=hs, intermediate_size=hf.get("n_inner") or 4 * C,
        max_positions=hf.get("n_positions", 2048), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=activation(hf.get("activation_function", "gelu_new"), f),
        parallel_residual=True, shared_norm=True, rotary_dim=hf.get("rotary_dim") or hs,
        mlp_bias=True, lm_head_bias=True, tie_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_list(hf), pad_token_id=hf.get("pad_token_id"),
    )


def finish_block(cfg: ModelConfig, t: Tensors) -> Tensors:
    rot = lambda w: interleaved_to_half_rotary(w, cfg.n_heads, cfg.head_dim, cfg.rotary_dim)
    out = {k: v for k, v in t.items() if k.split(".")[0] not in ("q", "k", "v")}
    out["qkv.weight"] = fuse_rows(rot(t.pop("q.weight")), rot(t.pop("k.weight")), t.pop("v.weight"))
    return out


FAMILY = Family(
    name="gptj", architectures=("GPTJForCausalLM",), model_types=("gptj",), config_from_hf=config_from_hf,
    base_prefix="transformer.",
    embed_table={"transformer.wte.weight": "tok.weight"},
    block_table={
        "transformer.h.{}.ln_1.weight": "attn_norm.weight",
        "transformer.h.{}.ln_1.bias": "attn_norm.bias",
        "transformer.h.{}.attn.q_proj.weight": "q.weight",
        "transformer.h.{}.attn.k_proj.weight": "k.weight",
        "transformer.h.{}.attn.v_proj.weight": "v.weight",
        "transformer.h.{}.attn.out_proj.weight": "out.weight",
        "transformer.h.{}.mlp.fc_in.weight": "up.weight",
        "transformer.h.{}.mlp.fc_in.bias": "up.bias",
        "transformer.h.{}.mlp.fc_out.weight": "down.weight",
        "transformer.h.{}.mlp.fc_out.bias": "down.bias",
        "transformer.h.{}.attn.bias": None,          # causal-mask buffer in old checkpoints
        "transformer.h.{}.attn.masked_bias": None,
    },
    head_table={
        "transformer.ln_f.weight": "norm.weight",
        "transformer.ln_f.bias": "norm.bias",
        "lm_head.weight": "lm.weight",
        "lm_head.bias": "lm.bias",
    },
    finish_block=finish_block,
)
