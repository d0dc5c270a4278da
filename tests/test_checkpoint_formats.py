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


def _write_safetensors(path, tensors):
    """A safetensors file in the given tensor order (the library sorts by dtype; offsets here are what we choose)."""
    import struct
    names = {torch.uint8: "U8", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-(8 + len(h)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.mark.parametrize("threshold", [1 << 30, 1])
def test_large_tensors_read_with_o_direct_equal_safetensors(tmp_path, monkeypatch, threshold):
    """Large tensors are read with O_DIRECT into an aligned buffer (a view at the tensor's offset inside it); every
    tensor reads what safetensors reads, also one whose offset does not suit its dtype (3 bytes after the data start:
    the buffered fallback). threshold 1 takes the O_DIRECT path wherever it can. A file that shrinks after it was
    opened fails with its name, not with uninitialised bytes."""
    from safetensors.torch import load_file
    import overspill.checkpoint.safetensors_io as S
    from overspill.io import DirectFile
    monkeypatch.setattr(S, "DIRECT_MIN", threshold)
    g = torch.Generator().manual_seed(0)
    tensors = {"a_odd": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g),   # shifts the next offset by 3
               "b_f32_unaligned": torch.randn(1100, 1000, generator=g),                 # 4.4 MB at data offset 3
               "p_pad": torch.zeros(1, dtype=torch.uint8),
               "c_bf16": torch.randn(777, 333, generator=g).to(torch.bfloat16),
               "d_i64": torch.arange(5000)}
    path = str(tmp_path / "m.safetensors")
    _write_safetensors(path, tensors)
    want = load_file(path)
    f = S.SafetensorsFile(path)
    for name in tensors:
        got = f.read(name)
        assert got.dtype == want[name].dtype and torch.equal(got, want[name]), name
    # row ranges (a tensor-parallel rank's share): each a contiguous piece, on the same paths, concatenated in order
    parts = {"b_f32_unaligned": [(1, 2), (300, 1100)], "c_bf16": [(0, 5), (770, 777)], "d_i64": [(4999, 5000)]}
    got = f.read_many(list(parts), rows=parts)
    for name, ranges in parts.items():
        assert torch.equal(got[name], torch.cat([want[name][a:b] for a, b in ranges])), name
    with pytest.raises(overspill.CheckpointError, match=r"m.safetensors: tensor 'c_bf16' \[777, 333\] has no rows 9:800"):
        f.read_many(["c_bf16"], rows={"c_bf16": [(5, 9), (9, 800)]})
    if threshold > 1:
        assert f._direct is None
        return
    if f._direct is False:
        pytest.skip("this filesystem refuses O_DIRECT (the buffered path was tested above)")
    assert isinstance(f._direct, DirectFile) and f._direct.direct
    os.truncate(path, os.path.getsize(path) - 100)                          # d_i64's last bytes are gone
    with pytest.raises(overspill.CheckpointError, match="m.safetensors.*end of file"):
        f.read("d_i64")
    f.close()
