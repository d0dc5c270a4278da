"""EleutherAI's original checkpoints: GPT-J's mesh-transformer-jax slim shards and GPT-NeoX's DeepSpeed layer files.

A tiny transformers model is written in each original format by the writers below (the reverse of the
conversion, from the format descriptions in overspill/checkpoint/mesh_jax.py and neox_ds.py), converted
by the CLI to a layer store and to a Hugging Face directory, and both must give transformers' logits.
Bad inputs (a missing shard, a wrong shape, a folder that is no checkpoint) fail in one line naming the file.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

import overspill
from conftest import VOCAB, build_reference
from overspill.checkpoint import mesh_jax
from overspill.checkpoint.sources import open_source
from overspill.cli import main

IDS = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))


# -- writers -----------------------------------------------------------------------------------------

def _np(t: torch.Tensor, bf16: bool) -> np.ndarray:
    t = t.detach().contiguous()
    if bf16:   # jax's bfloat16 arrays land in .npz files as 2-byte void
        return t.to(torch.bfloat16).view(torch.int16).numpy().view("V2")
    return t.float().numpy()


def _parts(t: torch.Tensor, n: int, g: torch.Generator) -> list[torch.Tensor]:
    """n random tensors that sum to t (what each rank adds before an all-reduce)."""
    r = [torch.randn(t.shape, generator=g) * 0.05 for _ in range(n - 1)]
    return [t - sum(r)] + r if r else [t]


def write_mesh_jax(model, root: str, shards: int, bf16: bool = False, pieces: int = 16) -> str:
    """A GPTJForCausalLM as mesh-transformer-jax's write_ckpt lays out a slim checkpoint."""
    sd, cfg, S = model.state_dict(), model.config, shards
    g = torch.Generator().manual_seed(7)
    col = lambda w: list(w.t().chunk(S, dim=1))          # [out, in] -> S x [in, out/S]
    row = lambda w: list(w.t().chunk(S, dim=0))          # [out, in] -> S x [in/S, out]
    same = lambda t: [t] + [t + 0.5 for _ in range(S - 1)]   # only rank 0's norm is used (all_gather()[0])
    b = _parts(torch.zeros(cfg.n_embd), S, g)             # the embedding bias every rank adds: folded into wte
    leaves = [b, list((sd["transformer.wte.weight"] - sum(b)).chunk(S, dim=0))]
    for i in sorted(range(cfg.n_layer), key=str):         # jax sorts module names: layer_0, layer_1, layer_10, ...
        p = f"transformer.h.{i}."
        leaves += [col(sd[p + "attn.q_proj.weight"]), col(sd[p + "attn.v_proj.weight"]),
                   col(sd[p + "attn.k_proj.weight"]), row(sd[p + "attn.out_proj.weight"]),
                   list(sd[p + "mlp.fc_in.bias"].chunk(S)), col(sd[p + "mlp.fc_in.weight"]),
                   _parts(sd[p + "mlp.fc_out.bias"], S, g), row(sd[p + "mlp.fc_out.weight"]),
                   same(sd[p + "ln_1.bias"]), same(sd[p + "ln_1.weight"])]
    leaves += [list(sd["lm_head.bias"].chunk(S)), col(sd["lm_head.weight"]),
               same(sd["transformer.ln_f.bias"]), same(sd["transformer.ln_f.weight"])]
    step = os.path.join(root, "step_100")
    k, m = divmod(len(leaves) + 1, pieces)               # +1: the step counter; dealt out as write_ckpt does
    for s in range(S):
        arrays = [_np(leaf[s], bf16) for leaf in leaves] + [np.array(100, dtype=np.int32)]
        os.makedirs(os.path.join(step, f"shard_{s}"))
        for i in range(pieces):
            np.savez(os.path.join(step, f"shard_{s}", f"{i}.npz"),
                     *arrays[i * k + min(i, m):(i + 1) * k + min(i + 1, m)])
    with open(os.path.join(root, "6B_roto_tiny.json"), "w") as f:   # mesh-transformer-jax's own config format
        json.dump({"layers": cfg.n_layer, "d_model": cfg.n_embd, "n_heads": cfg.n_head, "n_vocab": cfg.vocab_size,
                   "norm": "layernorm", "pe": "rotary", "pe_rotary_dims": cfg.rotary_dim, "seq": cfg.n_positions,
                   "cores_per_replica": S}, f)
    return step


NEOX_YML = """\
# GPT-NeoX config in the style of EleutherAI's configs/20B.yml: comments, '-' and '_' keys, Python-ish values
{{
  "vocab-file": "./tiny_checkpoints/tiny_tokenizer.json",
  "pipe-parallel-size": 4,
  "model-parallel-size": {tp},

  # model settings
  "num-layers": {layers},
  "hidden-size": {hidden},
  "intermediate_size": {ff},
  "num-attention-heads": {heads},
  "seq-length": {seq},
  "max-position-embeddings": {seq},
  "norm": "layernorm",
  "pos-emb": "rotary",
  "rotary_pct": {pct},
  "no-weight-tying": true,
  "gpt_j_residual": {parallel},
  "output_layer_parallelism": "column",
  "bias-gelu-fusion": false,
  "optimizer": {{
    "type": "Adam",
    "params": {{"lr": 0.97e-4, "betas": [0.9, 0.95], "eps": 1.0e-8,}}
    }},
  "zero_optimization": {{"stage": 1, "overlap_comm": True,}},
  "fp16": {{"fp16": true, "enabled": true}},
  "tokenizer_type": "HFTokenizer",
}}
"""


def write_neox(model, root: str, tp: int = 2) -> str:
    """A GPTNeoXForCausalLM as GPT-NeoX's DeepSpeed pipeline saves it, laid out like EleutherAI's slim_weights."""
    sd, cfg = model.state_dict(), model.config
    g = torch.Generator().manual_seed(8)
    L, T = cfg.num_hidden_layers, tp
    step = os.path.join(root, "global_step10")
    os.makedirs(step)
    os.makedirs(os.path.join(root, "configs"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("global_step10")

    def save(layer: int, per_rank: list[dict]) -> None:
        for r, d in enumerate(per_rank):
            name = f"layer_{layer:02d}-model_{r:02d}-model_states.pt"
            torch.save({k: v.clone() for k, v in d.items()}, os.path.join(step, name))

    def norm(t):   # replicated, drifted apart a little: the model's value is their mean
        drift = torch.randn(t.shape, generator=g) * 0.01
        return [t + drift, t - drift] if T == 2 else [t] * T

    rows = lambda t: list(t.chunk(T, dim=0))
    cols = lambda t: list(t.chunk(T, dim=1))
    save(0, [{"word_embeddings.weight": w} for w in rows(sd["gpt_neox.embed_in.weight"])])
    for i in range(L):
        p = f"gpt_neox.layers.{i}."
        # gpt_j_residual: each rank adds its share of the bias before the all-reduce; else one replicated bias
        bias = (lambda t: _parts(t, T, g)) if cfg.use_parallel_residual else norm
        parts = {"input_layernorm.weight": norm, "input_layernorm.bias": norm, "post_attention_layernorm.weight": norm,
                 "post_attention_layernorm.bias": norm, "attention.query_key_value.weight": rows,
                 "attention.query_key_value.bias": rows, "attention.dense.weight": cols, "attention.dense.bias": bias,
                 "mlp.dense_h_to_4h.weight": rows, "mlp.dense_h_to_4h.bias": rows, "mlp.dense_4h_to_h.weight": cols,
                 "mlp.dense_4h_to_h.bias": bias}
        split = {k: fn(sd[p + k]) for k, fn in parts.items()}
        inv = 1.0 / (10000 ** (torch.arange(0, 4, 2).float() / 4))
        save(i + 2, [{**{k: v[r] for k, v in split.items()}, "attention.rotary_emb.inv_freq": inv} for r in range(T)])
    nw, nb = norm(sd["gpt_neox.final_layer_norm.weight"]), norm(sd["gpt_neox.final_layer_norm.bias"])
    save(L + 3, [{"norm.weight": nw[r], "norm.bias": nb[r]} for r in range(T)])
    lm = sd["embed_out.weight"] if "embed_out.weight" in sd else sd["lm_head.weight"]   # transformers 5 renamed it
    save(L + 4, [{"final_linear.weight": w} for w in rows(lm)])
    rope = cfg.rope_parameters["partial_rotary_factor"]
    with open(os.path.join(root, "configs", "tiny.yml"), "w") as f:
        f.write(NEOX_YML.format(tp=T, layers=L, hidden=cfg.hidden_size, ff=cfg.intermediate_size,
                                heads=cfg.num_attention_heads,
                                seq=cfg.max_position_embeddings, pct=rope,
                                parallel=str(cfg.use_parallel_residual).lower()))
    return root


# -- helpers -----------------------------------------------------------------------------------------

def _cli(capsys, *argv) -> tuple[int, str]:
    rc = main(["convert", *argv])
    return rc, capsys.readouterr().err


def _logits_close(path: str, ref) -> None:
    got = overspill.load(path, dtype="float32").logits(IDS)
    with torch.no_grad():
        want = ref(IDS).logits
    err = (got - want).abs().max().item()
    assert err <= 1e-5, (path, err)


def _transformers_logits(path: str) -> torch.Tensor:
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(IDS).logits


def _one_error_line(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("overspill: error: "), err
    for n in needles:
        assert n in line, (n, line)
    return line


@pytest.fixture(scope="module")
def gptj(tmp_path_factory):
    """An 11-layer GPT-J (layer_10 sorts before layer_2 in the file order) in 4 shards, float32."""
    model = build_reference("gptj", layers=11)
    root = str(tmp_path_factory.mktemp("gptj_jax"))
    return write_mesh_jax(model, root, shards=4), os.path.join(root, "6B_roto_tiny.json"), model


# -- conversions -------------------------------------------------------------------------------------

def test_gptj_slim_to_store_and_hf(gptj, tmp_path, capsys):
    step, cfg, model = gptj
    store, hf = str(tmp_path / "store"), str(tmp_path / "hf")
    assert _cli(capsys, step, store, "--dtype", "float32", "--config", cfg)[0] == 0
    assert _cli(capsys, os.path.dirname(step), hf, "--to", "hf", "--config", cfg)[0] == 0   # the folder above step_N
    _logits_close(store, model)
    _logits_close(hf, model)
    assert (_transformers_logits(hf) - model(IDS).logits).abs().max().item() <= 1e-5
    with open(os.path.join(hf, "config.json")) as f:
        c = json.load(f)
    assert c["model_type"] == "gptj" and c["n_head"] == 4 and c["rotary_dim"] == 8 and c["torch_dtype"] == "float32"
    assert sorted(os.listdir(tmp_path)) == ["hf", "store"]    # no temp directories left behind


def test_gptj_bf16_void_arrays_are_read_bit_for_bit(tmp_path, capsys):
    model = build_reference("gptj")
    step = write_mesh_jax(model, str(tmp_path), shards=2, bf16=True)
    cfg = str(tmp_path / "6B_roto_tiny.json")
    assert _cli(capsys, step, str(tmp_path / "hf"), "--to", "hf", "--config", cfg)[0] == 0
    from safetensors.torch import load_file

    got = {}
    for f in os.listdir(tmp_path / "hf"):
        if f.endswith(".safetensors"):
            got.update(load_file(str(tmp_path / "hf" / f)))
    sd = model.state_dict()
    for name in ("transformer.h.1.attn.k_proj.weight", "transformer.h.0.mlp.fc_out.weight", "lm_head.weight",
                 "transformer.ln_f.weight", "transformer.h.0.mlp.fc_in.bias"):
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], sd[name].to(torch.bfloat16)), name


def test_gptj_6b_shapes_need_no_config(gptj, monkeypatch):
    step, _, model = gptj
    c = model.config
    monkeypatch.setattr(mesh_jax, "GPTJ_6B", {"d_model": c.n_embd, "layers": c.n_layer, "n_vocab": c.vocab_size,
                                               "n_heads": c.n_head, "pe_rotary_dims": c.rotary_dim, "seq": 128,
                                               "eos": 2})
    ck = open_source(step)
    assert ck.config.n_heads == c.n_head and ck.config.rotary_dim == c.rotary_dim and ck.config.eos_token_ids == [2]
    monkeypatch.setattr(mesh_jax, "GPTJ_6B", {**mesh_jax.GPTJ_6B, "layers": 28})
    with pytest.raises(overspill.OverspillError, match="pass --config"):
        open_source(step)


@pytest.mark.parametrize("variant", ["gpt_neox_parallel", "gpt_neox_sequential"])
def test_neox_pipeline_to_store_and_hf(variant, tmp_path, capsys):
    model = build_reference(variant)
    root = write_neox(model, str(tmp_path / "slim_weights"))
    store, hf = str(tmp_path / "store"), str(tmp_path / "hf")
    assert _cli(capsys, root, store, "--dtype", "float32")[0] == 0          # configs/*.yml found next to the weights
    assert _cli(capsys, os.path.join(root, "global_step10"), hf, "--to", "hf")[0] == 0   # and one level up
    _logits_close(store, model)
    _logits_close(hf, model)
    assert (_transformers_logits(hf) - model(IDS).logits).abs().max().item() <= 1e-5


def test_neox_config_mapping(tmp_path):
    model = build_reference("gpt_neox_parallel")
    root = write_neox(model, str(tmp_path / "w"))
    yml = os.path.join(root, "configs", "tiny.yml")
    with open(yml) as f:
        text = f.read().replace('"bias-gelu-fusion": false', '"bias-gelu-fusion": true')
    with open(yml, "w") as f:
        f.write(text + "\n")
    hf = open_source(root).hf_config
    assert hf["hidden_act"] == "gelu_fast" and hf["use_parallel_residual"] and hf["rotary_pct"] == 0.25
    assert hf["vocab_size"] == VOCAB and hf["intermediate_size"] == 128 and hf["max_position_embeddings"] == 128
    json_cfg = str(tmp_path / "config.json")    # a Hugging Face config.json instead of the .yml
    model.config.to_json_file(json_cfg)
    shutil.rmtree(os.path.join(root, "configs"))
    ck = open_source(root, json_cfg)
    assert ck.config.intermediate_size == 128 and ck.config.n_heads == 4


# -- bad inputs --------------------------------------------------------------------------------------

@pytest.fixture
def gptj_copy(gptj, tmp_path):
    step, cfg, _ = gptj
    dst = str(tmp_path / "step_100")
    shutil.copytree(step, dst)
    return dst, cfg


def test_gptj_missing_shard_directory(gptj_copy, tmp_path, capsys):
    step, cfg = gptj_copy
    shutil.rmtree(os.path.join(step, "shard_3"))
    line = _one_error_line(*_cli(capsys, step, str(tmp_path / "out"), "--config", cfg), "shard_3", "missing shard")
    assert "split 4 ways" in line and not os.path.exists(tmp_path / "out")


def test_gptj_missing_shard_file(gptj_copy, tmp_path, capsys):
    step, cfg = gptj_copy
    os.remove(os.path.join(step, "shard_2", "15.npz"))
    _one_error_line(*_cli(capsys, step, str(tmp_path / "out"), "--to", "hf", "--config", cfg),
                    os.path.join("shard_2", "15.npz"), "missing shard file")


def test_gptj_wrong_shape(gptj_copy, tmp_path, capsys):
    step, cfg = gptj_copy
    path = os.path.join(step, "shard_1", "0.npz")
    with np.load(path) as z:
        arrays = [z[f"arr_{i}"] for i in range(len(z.files))]
    arrays[2] = arrays[2][:, :-1]               # layer 0's q projection (after the embedding's b, w) one column short
    np.savez(path, *arrays)
    _one_error_line(*_cli(capsys, step, str(tmp_path / "out"), "--config", cfg), path, "arr_2", "layer_0/~/linear/w",
                    "shape [64, 15], expected [64, 16]")
    assert not os.path.exists(tmp_path / "out")


def test_neox_missing_shard_and_wrong_shape(tmp_path, capsys):
    model = build_reference("gpt_neox_parallel")
    root = write_neox(model, str(tmp_path / "w"))
    step = os.path.join(root, "global_step10")
    victim = os.path.join(step, "layer_03-model_01-model_states.pt")
    os.rename(victim, victim + ".bak")
    _one_error_line(*_cli(capsys, root, str(tmp_path / "out")), victim, "missing shard")
    os.rename(victim + ".bak", victim)
    sd = torch.load(victim, weights_only=True)
    sd["attention.query_key_value.weight"] = sd["attention.query_key_value.weight"][:-4]
    torch.save(sd, victim)
    _one_error_line(*_cli(capsys, root, str(tmp_path / "out"), "--to", "hf"), victim,
                    "'attention.query_key_value.weight'", "expected [96, 64]")
    shutil.rmtree(os.path.join(root, "configs"))
    _one_error_line(*_cli(capsys, root, str(tmp_path / "out")), "no GPT-NeoX config found", "--config")
    assert sorted(os.listdir(tmp_path)) == ["w"]


def test_not_a_checkpoint(tmp_path, capsys):
    src = tmp_path / "notes"
    src.mkdir()
    (src / "readme.txt").write_text("hello")
    (src / "weights.npz").write_bytes(b"not a zip")
    _one_error_line(*_cli(capsys, str(src), str(tmp_path / "out")), str(src), "not a checkpoint overspill can convert")
    _one_error_line(*_cli(capsys, str(tmp_path / "nowhere"), str(tmp_path / "out"), "--to", "hf"),
                    "no such model directory")
    bad = tmp_path / "step_1" / "shard_0"
    bad.mkdir(parents=True)
    (bad / "0.npz").write_bytes(b"not a zip either")
    _one_error_line(*_cli(capsys, str(tmp_path / "step_1"), str(tmp_path / "out")), "0.npz", "not a readable .npz")


# -- memory ------------------------------------------------------------------------------------------

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def test_conversion_holds_a_few_layers_not_the_model(tmp_path):
    """Peak RSS while converting a ~50 MB checkpoint of either format grows by a few blocks (pieces are
    memory-mapped and merged one unit at a time), to a store and to a Hugging Face directory alike."""
    import ctypes
    import gc

    import transformers

    from overspill.checkpoint.hf_writer import convert_to_hf
    from overspill.checkpoint.store import convert

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc")
    torch.manual_seed(0)
    C, L = 256, 16
    gj = transformers.GPTJForCausalLM(transformers.GPTJConfig(vocab_size=VOCAB, n_embd=C, n_layer=L, n_head=8,
                                                              rotary_dim=16, n_positions=64))
    nx = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=C, num_hidden_layers=L, num_attention_heads=8, intermediate_size=4 * C,
        max_position_embeddings=64, rotary_pct=0.25))
    step = write_mesh_jax(gj, str(tmp_path / "gj"), shards=8)
    sources = {step: str(tmp_path / "gj" / "6B_roto_tiny.json"), write_neox(nx, str(tmp_path / "nx")): None}
    del gj, nx
    block = 12 * C * C * 4
    for i, (src, cfg) in enumerate(sources.items()):
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs)
        assert size > 45e6
        for to, fn in (("store", convert), ("hf", convert_to_hf)):
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)   # freed heap goes back: it cannot hide a whole-model load
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                         # reset VmHWM to the current RSS
            base = _status("VmRSS")
            fn(src, str(tmp_path / f"out-{i}-{to}"), dtype="float32", progress=False, config=cfg)
            grew = _status("VmHWM") - base
            # a conversion holds the unit being written and the next one being read and merged (its pieces mapped),
            # plus a 2 MiB write buffer: measured 3-5.3 blocks; the whole model is 16 blocks
            assert grew < 0.4 * size and grew < 7 * block, (src, to, grew, size, block)



@pytest.fixture
def gptj_with_config(gptj, tmp_path):
    """The slim shards with a Hugging Face config.json inside the step folder (found without --config)."""
    step, _, model = gptj
    dst = str(tmp_path / "step_100")
    shutil.copytree(step, dst)
    model.config.to_json_file(os.path.join(dst, "config.json"))
    return dst


def test_running_an_original_checkpoint_says_what_converting_writes(gptj_with_config, capsys):
    """generate / plan on an original checkpoint: one line saying to convert it once, the store's size in bf16,
    int8 and int4, and the free disk space, exit 2."""
    rc = main(["plan", gptj_with_config, "--max-memory", "cpu=1GiB"])
    err = capsys.readouterr().err
    _one_error_line(rc, err, "original GPT-J mesh-transformer-jax checkpoint", "overspill convert", "GiB layer store",
                    "int4", "free")
    with pytest.raises(overspill.OverspillError, match="convert it once"):
        overspill.load(gptj_with_config)


def test_convert_removes_stale_temporaries_and_checks_free_space(gptj_with_config, tmp_path, capsys, monkeypatch):
    """A conversion killed midway leaves DST.tmp-PID; the next run of the same destination removes it (a live
    process's is kept). Too little free space is refused in one line before anything is written."""
    from collections import namedtuple
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "store"
    stale = out / "store.tmp-999999999"          # no such process
    live = out / f"store.tmp-{os.getppid()}"     # a running process's conversion
    for d in (stale, live):
        d.mkdir()
        (d / "block.0.safetensors").write_bytes(b"x" * 1000)
    Usage = namedtuple("Usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 1 << 40, 1 << 20))
    rc, err = _cli(capsys, gptj_with_config, str(dst))
    _one_error_line(rc, err, "converting writes about", "GiB free")
    assert sorted(p.name for p in out.iterdir()) == [live.name]        # the stale one is gone, nothing new
    monkeypatch.setattr(shutil, "disk_usage", real)
    stale.mkdir()
    assert _cli(capsys, gptj_with_config, str(dst))[0] == 0
    assert dst.is_dir() and not stale.exists() and live.exists()
    assert overspill.load(str(dst), dtype="bfloat16").config.n_layers == 11
