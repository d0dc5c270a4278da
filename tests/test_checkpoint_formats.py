"""The same model saved as single/sharded safetensors and single/sharded .bin loads to identical logits."""
import json
import os

import pytest
import torch

import overspill


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from conftest import build_reference

    model = build_reference("gptj", seed=11)
    out = {}
    for name, kw in {"safetensors": {}, "safetensors_sharded": dict(max_shard_size="60KB")}.items():
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d, **kw)
        out[name] = str(d)
    # transformers 5 writes only safetensors; write the .bin layouts the way older versions did.
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    d = tmp_path_factory.mktemp("bin")
    model.config.save_pretrained(d)
    torch.save(sd, d / "pytorch_model.bin")
    out["bin"] = str(d)
    d = tmp_path_factory.mktemp("bin_sharded")
    model.config.save_pretrained(d)
    names = list(sd)
    shards = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-00003.bin"
        torch.save({k: sd[k] for k in part}, d / fname)
        weight_map.update({k: fname for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out["bin_sharded"] = str(d)
    return out


def test_formats_are_what_they_claim(saved):
    files = {k: sorted(os.listdir(v)) for k, v in saved.items()}
    assert "model.safetensors" in files["safetensors"]
    assert "model.safetensors.index.json" in files["safetensors_sharded"]
    assert sum(f.endswith(".safetensors") for f in files["safetensors_sharded"]) > 2
    assert "pytorch_model.bin" in files["bin"]
    assert "pytorch_model.bin.index.json" in files["bin_sharded"]
    assert sum(f.endswith(".bin") for f in files["bin_sharded"]) > 2


def test_all_formats_give_identical_logits(saved):
    ids = torch.randint(3, 96, (2, 13), generator=torch.Generator().manual_seed(0))
    logits = {k: overspill.load(v, dtype="float32").logits(ids) for k, v in saved.items()}
    base = logits["safetensors"]
    for k, v in logits.items():
        assert torch.equal(v, base), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtype_choice(saved, dtype):
    model = overspill.load(saved["safetensors_sharded"], dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    w = model.executor.source.weights[1].attn_norm[0]
    assert w.dtype == getattr(torch, dtype)


def test_peak_rss_while_loading_stays_near_model_size(tmp_path):
    """Load a ~60 MB fp32 model in a fresh process: peak RSS grows by about the model, never 2x."""
    import subprocess
    import sys
    import textwrap

    import transformers

    cfg = transformers.GPTNeoXConfig(vocab_size=4000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                     intermediate_size=2048, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path, max_shard_size="20MB")
    model_bytes = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    code = textwrap.dedent(f"""
        import torch, overspill, json
        def hwm():
            for l in open('/proc/self/status'):
                if l.startswith('VmHWM'): return int(l.split()[1]) * 1024
        base = hwm()
        m = overspill.load({str(tmp_path)!r}, dtype='float32')
        print(json.dumps({{'base': base, 'peak': hwm()}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grown = r["peak"] - r["base"]
    assert grown < 1.45 * model_bytes, f"peak grew {grown / 1e6:.1f} MB for a {model_bytes / 1e6:.1f} MB model"


@pytest.mark.parametrize("threshold", [1 << 30, 1])
def test_large_tensors_read_with_o_direct_equal_safetensors(tmp_path, monkeypatch, threshold):
    """Large tensors are read with O_DIRECT into an aligned buffer (a view at the tensor's offset inside it);
    every offset and dtype, including ones whose offset does not suit O_DIRECT's alignment for the dtype (buffered
    fallback), reads what safetensors reads. threshold 1 takes the O_DIRECT path for every tensor."""
    from safetensors.torch import load_file, save_file
    import overspill.checkpoint.safetensors_io as S
    monkeypatch.setattr(S, "DIRECT_MIN", threshold)
    g = torch.Generator().manual_seed(0)
    tensors = {"a_odd": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g),   # shifts later offsets
               "b_big": torch.randn(1100, 1000, generator=g),                           # 4.4 MB fp32
               "c_bf16": torch.randn(777, 333, generator=g).to(torch.bfloat16),
               "d_i64": torch.arange(5000), "e_small": torch.randn(7, generator=g)}
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    want = load_file(path)
    f = S.SafetensorsFile(path)
    for name in tensors:
        got = f.read(name)
        assert got.dtype == want[name].dtype and torch.equal(got, want[name]), name
    assert f._direct is None if threshold > 1 else f._direct is not None
    f.close()
