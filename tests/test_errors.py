"""Bad input gets one clear line naming the file and the tensor or field; the CLI exits 2, no traceback."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import overspill
from overspill.errors import CheckpointError, ConfigError


@pytest.fixture()
def ckpt(ref_dir, tmp_path):
    src, _ = ref_dir("gpt_neox_parallel")
    d = tmp_path / "m"
    shutil.copytree(src, d)
    return d


def _edit_weights(d, fn):
    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "overspill.cli", *args], capture_output=True, text=True)
    return r.returncode, r.stderr.strip()


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope: no such model directory"):
        overspill.load(tmp_path / "nope")


def test_missing_config(ckpt):
    os.remove(ckpt / "config.json")
    with pytest.raises(ConfigError, match=r"config\.json: missing config\.json"):
        overspill.load(ckpt)


def test_missing_config_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"missing field 'hidden_size'"):
        overspill.load(ckpt)


def test_unsupported_architecture_lists_supported(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["MambaForCausalLM"], "mamba"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"unsupported architecture \['MambaForCausalLM'\] \(supported: "
                                          r"GPTJForCausalLM, GPTNeoXForCausalLM, GPT2LMHeadModel, LlamaForCausalLM\)"):
        overspill.load(ckpt)


def test_no_weights(ckpt):
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no weights found \(expected one of model\.safetensors"):
        overspill.load(ckpt)


def test_missing_tensor(ckpt):
    _edit_weights(ckpt, lambda sd: sd.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.weight'"):
        overspill.load(ckpt)


def test_unexpected_tensor(ckpt):
    import torch
    _edit_weights(ckpt, lambda sd: sd.__setitem__("gpt_neox.layers.0.mystery.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'gpt_neox\.layers\.0\.mystery\.weight'"):
        overspill.load(ckpt)


def test_shape_mismatch_names_the_tensor(ckpt):
    import torch

    def shrink(sd):
        sd["gpt_neox.layers.0.attention.dense.weight"] = torch.zeros(64, 60)
    _edit_weights(ckpt, shrink)
    with pytest.raises(CheckpointError, match=r"shape mismatch in block\.0: tensor 'gpt_neox\.layers\.0\.attention\.dense\.weight' \[64, 60\]"):
        overspill.load(ckpt)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '.*' needs bytes up to \d+ but the file has \d+"):
        overspill.load(ckpt)


def test_corrupt_safetensors_header(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        overspill.load(ckpt)


def test_missing_shard(ref_dir, tmp_path):
    from conftest import build_reference
    m = build_reference("gpt2")
    m.save_pretrained(tmp_path, max_shard_size="60KB")
    shard = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=rf"{shard}: shard listed in model\.safetensors\.index\.json is missing"):
        overspill.load(tmp_path)


def test_cli_one_line_exit_2(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    code, err = _cli("generate", "--model", str(ckpt), "hello")
    assert code == 2
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("overspill: error: ") and "model.safetensors: truncated" in err


def test_cli_debug_shows_traceback(tmp_path):
    code, err = _cli("--debug", "info", str(tmp_path / "missing"))
    assert code != 0 and "Traceback" in err


def test_bad_generation_settings(ref_dir):
    model = overspill.load(ref_dir("gpt2")[0])
    with pytest.raises(overspill.OverspillError, match="top_p must be in"):
        model.generate([[1, 2]], top_p=0)
    with pytest.raises(overspill.OverspillError, match="outside the vocabulary"):
        model.generate([[1, 10_000]])
    with pytest.raises(overspill.OverspillError, match="prompt 0 is empty"):
        model.generate([[]])
    with pytest.raises(overspill.OverspillError, match="missing tokenizer.json"):
        model.generate(["text needs a tokenizer"])


def test_quantize_head_without_a_scheme_is_one_clear_line():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "overspill.cli", "generate", "hi", "-n", "1", "--quantize-head"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "needs a scheme" in r.stderr
