"""Write a random Llama-shaped checkpoint (benchmarks/make_checkpoint.py output) as a BF16 GGUF for llama.cpp.

llama.cpp's own converter needs a real tokenizer; these checkpoints have none, and llama-bench feeds random
token ids anyway. So this writes the tensors under llama.cpp's names (q/k rows permuted to its rotary layout,
as convert_hf_to_gguf.py does) plus a placeholder vocabulary of the right size. Needs the `gguf` package
(gguf-py, vendored in llama.cpp's source tree: PYTHONPATH=<llama.cpp>/gguf-py).

    PYTHONPATH=$LC/gguf-py .venv/bin/python benchmarks/llamacpp_gguf.py bench-cache/tinyllama-bfloat16 OUT.gguf
    $BUILD/bin/llama-quantize OUT.gguf OUT-q8_0.gguf Q8_0 2
    # smoke: a tiny random Llama written as GGUF in a temp dir and read back
    PYTHONPATH=$LC/gguf-py .venv/bin/python benchmarks/llamacpp_gguf.py --smoke
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

import common  # noqa: E402


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(src: str | Path, out: str | Path) -> int:
    """Write checkpoint `src` as a BF16 GGUF at `out`; returns the number of tensors written."""
    import gguf

    cfg = json.loads((Path(src) / "config.json").read_text())
    assert cfg.get("model_type") == "llama", "llama-shaped checkpoints only"
    nh, nkv, C = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"]), cfg["hidden_size"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(C)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(C // nh)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    V = cfg["vocab_size"]
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([gguf.TokenType.NORMAL] * V)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    count = 0
    for f in sorted(Path(src).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                if k in names:
                    name = names[k]
                else:
                    parts = k.split(".")            # model.layers.{i}.{module}.weight
                    name = f"blk.{parts[2]}.{per_layer['.'.join(parts[3:-1])]}.weight"
                    if name.endswith("attn_q.weight"):
                        t = permute(t, nh)
                    elif name.endswith("attn_k.weight"):
                        t = permute(t, nkv)
                if t.dim() == 1:   # norms in f32, as llama.cpp's converter writes them
                    w.add_tensor(name, t.float().numpy())
                else:
                    a = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
                    w.add_tensor(name, a, raw_shape=list(t.shape), raw_dtype=gguf.GGMLQuantizationType.BF16)
                count += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return count


def smoke(keep: bool) -> None:
    """A tiny random Llama written as GGUF and read back: every tensor there, under llama.cpp's names."""
    if importlib.util.find_spec("gguf") is None:
        print("smoke: skipped: the gguf package is not importable (PYTHONPATH=<llama.cpp>/gguf-py)", flush=True)
        return
    import gguf

    with common.Smoke(keep) as sm:
        ckpt = sm.checkpoint("llama-tiny")
        out = sm.dir / "tiny-bf16.gguf"
        n = convert(ckpt, out)
        names = [t.name for t in gguf.GGUFReader(str(out)).tensors]
        expected = len(common.tensor_bytes(ckpt))
        print(f"smoke: {len(names)} tensors in {out.name} ({out.stat().st_size / 1e6:.2f} MB), {expected} in the "
              f"checkpoint", flush=True)
        if len(names) != expected or n != expected or "token_embd.weight" not in names:
            raise SystemExit("smoke: FAILED: the GGUF does not hold every tensor of the checkpoint")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", nargs="?", help="a Llama-shaped checkpoint directory")
    p.add_argument("out", nargs="?", help="the .gguf file to write")
    p.add_argument("--smoke", action="store_true", help="write a tiny random Llama as GGUF in a temp dir, read it back")
    p.add_argument("--keep", action="store_true", help="--smoke: keep the temp dir")
    a = p.parse_args(argv)
    if a.smoke:
        return smoke(a.keep)
    if not (a.src and a.out):
        p.error("give SRC and OUT (or --smoke)")
    convert(a.src, a.out)


if __name__ == "__main__":
    main()
