"""merge_adapter: a PEFT LoRA adapter merged into its Hugging Face base gives the logits of the adapted model, and
the same tensors as PEFT's own merge_and_unload; sharded and .bin bases, dtype, and every refusal (nothing written)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from overspill.errors import OverspillError
from overspill.finetune import merge as merge_mod
from overspill.finetune.merge import merge_adapter

pytest.importorskip("peft")

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEOX = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
# variant -> LoraConfig settings: attention and MLP everywhere; lm_head and rsLoRA on the Llamas
LORA = {
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),   # Conv1D: [in, out]
    "llama_gqa": dict(target_modules=LLAMA + ["lm_head"]),
    "llama_tied": dict(target_modules=LLAMA, use_rslora=True, lora_alpha=6),
    "gptj": dict(target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]),
    "gpt_neox_parallel": dict(target_modules=NEOX),
    "gpt_neox_sequential": dict(target_modules=NEOX, r=2),
}


def _adapt(base_dir: str, variant: str, adapter_dir: str, seed: int = 1):
    """A PEFT model over a fresh copy of the base, its LoRA weights random (std 0.2: a large delta), saved."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    kw = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **LORA[variant]}
    pm = get_peft_model(model, LoraConfig(**kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(adapter_dir)
    return pm


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _load(path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(seed: int = 0):
    return torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(seed))


def _left(tmp_path, name="out") -> list[str]:
    return sorted(p for p in os.listdir(tmp_path) if p == name or p.startswith(name + "."))


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory, ref_dir):
    base, _ = ref_dir("llama_gqa")
    ad = str(tmp_path_factory.mktemp("llama-adapter"))
    _adapt(base, "llama_gqa", ad)
    return base, ad


@pytest.mark.parametrize("variant", list(LORA))
def test_merge_matches_peft(variant, ref_dir, tmp_path, monkeypatch):
    """Logits of the merged checkpoint (loaded by transformers) equal the PEFT model's, and every tensor equals
    PEFT's merge_and_unload. Small row chunks, so the chunked merge (and Conv1D's column slices of A) runs."""
    from safetensors.torch import load_file

    base, _ = ref_dir(variant)
    pm = _adapt(base, variant, str(tmp_path / "adapter"))
    seen = []
    rows = merge_mod.Shard.rows
    monkeypatch.setattr(merge_mod, "CHUNK_ELEMENTS", 500)
    monkeypatch.setattr(merge_mod.Shard, "rows", lambda self, n, a, b: seen.append(rows(self, n, a, b)) or seen[-1])
    out = merge_adapter(base, str(tmp_path / "adapter"), str(tmp_path / "out"), progress=False)
    assert out == str(tmp_path / "out")
    assert all(t.numel() <= max(500, t[0].numel()) for t in seen)   # no read larger than a chunk (or one row)

    ids = _ids()
    want = _logits(pm, ids)
    base_logits = _logits(_load(base), ids)
    assert (want - base_logits).abs().max().item() > 0.5         # the adapter changes the model substantially
    merged = _load(out)
    got = _logits(merged, ids)
    ref = pm.merge_and_unload()
    d_peft, d_merged = (got - want).abs().max().item(), (got - _logits(ref, ids)).abs().max().item()
    print(f"{variant}: max |logits - peft| {d_peft:.2e}, max |logits - merge_and_unload| {d_merged:.2e}")
    assert d_peft <= 1e-5 and d_merged <= 1e-5
    mine = load_file(os.path.join(out, "model.safetensors"))
    ref.save_pretrained(tmp_path / "peft-merged")         # PEFT's merge under the names transformers writes
    theirs = load_file(str(tmp_path / "peft-merged" / "model.safetensors"))
    stored = load_file(os.path.join(base, "model.safetensors"))
    assert set(mine) == set(stored)                         # the base's names, nothing added or dropped
    worst = max((mine[n] - theirs[n]).abs().max().item() for n in mine)
    print(f"{variant}: max |merged - merge_and_unload| tensor {worst:.2e}")
    assert worst <= 1e-6
    changed = {n for n in mine if not torch.equal(mine[n], stored[n])}
    assert changed == {n for n in mine if n.endswith(".weight") and
                       n.rsplit(".", 2)[-2] in LORA[variant]["target_modules"]}
    for f in ("config.json", "generation_config.json"):
        with open(os.path.join(base, f)) as a, open(os.path.join(out, f)) as b:
            assert a.read() == b.read()


def test_gpt2_conv1d_needs_the_transpose(ref_dir, tmp_path):
    """GPT-2's square attn.c_proj ([in, out] = [64, 64]) is where a missing transpose would pass the shape check:
    its merged weight is W + s (B A)^T, and not W + s B A."""
    from safetensors.torch import load_file

    base, _ = ref_dir("gpt2")
    _adapt(base, "gpt2", str(tmp_path / "adapter"))
    out = merge_adapter(base, str(tmp_path / "adapter"), str(tmp_path / "out"), progress=False)
    ad, w0 = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")), load_file(f"{base}/model.safetensors")
    name = "transformer.h.0.attn.c_proj"
    A, B = ad[f"base_model.model.{name}.lora_A.weight"], ad[f"base_model.model.{name}.lora_B.weight"]
    got = load_file(os.path.join(out, "model.safetensors"))[f"{name}.weight"]
    torch.testing.assert_close(got, w0[f"{name}.weight"] + 2.0 * (B @ A).T, atol=1e-6, rtol=0)
    assert (got - (w0[f"{name}.weight"] + 2.0 * (B @ A))).abs().max() > 0.1


def test_bare_prefix_checkpoint(ref_dir, tmp_path):
    """A checkpoint of the bare base model (GPT-2's h.0... without transformer.) still matches the adapter's
    transformer.h.0... modules, and keeps its own names."""
    from safetensors.torch import load_file, save_file

    base, _ = ref_dir("gpt2")
    pm = _adapt(base, "gpt2", str(tmp_path / "adapter"))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(f"{base}/config.json", bare)
    save_file({n.removeprefix("transformer."): t for n, t in load_file(f"{base}/model.safetensors").items()},
              str(bare / "model.safetensors"), metadata={"format": "pt"})
    out = merge_adapter(str(bare), str(tmp_path / "adapter"), str(tmp_path / "out"), progress=False)
    mine = load_file(os.path.join(out, "model.safetensors"))
    theirs = pm.merge_and_unload().state_dict()
    assert all(not n.startswith("transformer.") for n in mine)
    assert max((t - theirs["transformer." + n if "transformer." + n in theirs else n]).abs().max().item()
               for n, t in mine.items()) <= 1e-6


def _bin_shards(src: str, dst, parts: int = 3) -> None:
    """``src``'s weights as pytorch_model-0000i-of-0000n.bin shards with their index."""
    from safetensors.torch import load_file

    sd = load_file(f"{src}/model.safetensors")
    names = list(sd)
    shutil.copy(f"{src}/config.json", dst)
    wm = {}
    for i in range(parts):
        fname = f"pytorch_model-{i + 1:05d}-of-{parts:05d}.bin"
        torch.save({n: sd[n] for n in names[i::parts]}, os.path.join(dst, fname))
        wm.update((n, fname) for n in names[i::parts])
    with open(os.path.join(dst, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_base(fmt, llama_adapter, tmp_path):
    """One output shard per base shard, each tensor in the shard it came from, an index; the same model."""
    import transformers
    from safetensors.torch import load_file

    base, ad = llama_adapter
    sharded = tmp_path / "base"
    sharded.mkdir()
    if fmt == "bin":
        _bin_shards(base, sharded)
    else:
        transformers.AutoModelForCausalLM.from_pretrained(base).save_pretrained(sharded, max_shard_size="20KB")
    n = len({v for v in json.load(open(next(sharded.glob("*.index.json"))))["weight_map"].values()})
    assert n > 1
    whole = merge_adapter(base, ad, str(tmp_path / "whole"), progress=False)
    out = merge_adapter(str(sharded), ad, str(tmp_path / "out"), progress=False)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    assert sorted(os.listdir(out)) == sorted(files + ["config.json", "model.safetensors.index.json"] +
                                             [f for f in os.listdir(sharded) if f == "generation_config.json"])
    ref = load_file(os.path.join(whole, "model.safetensors"))
    got = {}
    for f in files:
        part = load_file(os.path.join(out, f))
        assert all(index["weight_map"][k] == f for k in part)
        got.update(part)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    ids = _ids()
    assert torch.equal(_logits(_load(out), ids), _logits(_load(whole), ids))


def test_dtype(llama_adapter, tmp_path):
    """dtype=bfloat16: every tensor is the float32 merge cast once, and config.json says bfloat16."""
    from safetensors.torch import load_file

    base, ad = llama_adapter
    f32 = load_file(os.path.join(merge_adapter(base, ad, str(tmp_path / "f32"), progress=False), "model.safetensors"))
    out = merge_adapter(base, ad, str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    bf = load_file(os.path.join(out, "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, f32[n].to(torch.bfloat16)) for n, t in bf.items())
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert _load(out) is not None
    # a bf16 base keeps bf16 without dtype, its merge summed in float32
    out2 = merge_adapter(out, ad, str(tmp_path / "again"), progress=False)
    assert all(t.dtype == torch.bfloat16 for t in load_file(os.path.join(out2, "model.safetensors")).values())
    with pytest.raises(OverspillError, match="unsupported dtype 'int8'"):
        merge_adapter(base, ad, str(tmp_path / "out"), dtype="int8")
    assert _left(tmp_path) == []


def test_base_must_be_hugging_face(llama_adapter, tmp_path):
    from overspill.checkpoint.store import convert

    base, ad = llama_adapter
    store = convert(base, str(tmp_path / "store"), dtype="float32", progress=False)
    with pytest.raises(OverspillError, match=r"layer store\); merge needs the Hugging Face directory the adapter "
                                             r"was trained on"):
        merge_adapter(store, ad, str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(OverspillError, match="not a Hugging Face directory"):
        merge_adapter(str(tmp_path / "empty"), ad, str(tmp_path / "out"))
    with pytest.raises(OverspillError, match="no such base model directory"):
        merge_adapter(str(tmp_path / "nowhere"), ad, str(tmp_path / "out"))
    with pytest.raises(OverspillError, match="no such adapter directory"):
        merge_adapter(base, str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert _left(tmp_path) == []


def _edited_adapter(src: str, dst, edit) -> str:
    from safetensors.torch import load_file, save_file

    os.makedirs(dst)
    shutil.copy(os.path.join(src, "adapter_config.json"), dst)
    save_file(edit(load_file(os.path.join(src, "adapter_model.safetensors"))),
              os.path.join(dst, "adapter_model.safetensors"))
    return str(dst)


def test_module_without_base_weight(llama_adapter, ref_dir, tmp_path):
    base, ad = llama_adapter
    moved = _edited_adapter(ad, tmp_path / "ad", lambda sd: {k.replace("layers.1.", "layers.7."): v
                                                            for k, v in sd.items()})
    with pytest.raises(OverspillError, match=r"adapter module model\.layers\.7\.([\w.]+) has no weight "
                                             r"model\.layers\.7\.\1\.weight in "):
        merge_adapter(base, moved, str(tmp_path / "out"))
    tied, _ = ref_dir("llama_tied")   # its lm_head is the embedding: no lm_head.weight to merge into
    with pytest.raises(OverspillError, match="lm_head has no weight lm_head.weight .* ties it to the input embeddings"):
        merge_adapter(tied, ad, str(tmp_path / "out"))
    assert _left(tmp_path) == []


def test_shape_mismatch(llama_adapter, ref_dir, tmp_path):
    base, ad = llama_adapter
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    cut = _edited_adapter(ad, tmp_path / "ad", lambda sd: {k: (v[:100] if k == key else v) for k, v in sd.items()})
    with pytest.raises(OverspillError, match=r"shape mismatch for model\.layers\.0\.mlp\.up_proj: base weight "
                                             r"model\.layers\.0\.mlp\.up_proj\.weight is \[128, 64\] float32, the "
                                             r"adapter's B @ A gives \[100, 64\]"):
        merge_adapter(base, cut, str(tmp_path / "out"))
    gpt2, _ = ref_dir("gpt2")   # a Llama adapter on GPT-2: no such modules at all
    with pytest.raises(OverspillError, match="has no weight"):
        merge_adapter(gpt2, ad, str(tmp_path / "out"))
    assert _left(tmp_path) == []


def test_out_exists(llama_adapter, tmp_path):
    base, ad = llama_adapter
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OverspillError, match=r"out: already exists \(pass overwrite=True"):
        merge_adapter(base, ad, str(out))
    with pytest.raises(OverspillError, match="not a Hugging Face model directory; refusing to replace it"):
        merge_adapter(base, ad, str(out), overwrite=True)
    assert os.listdir(out) == ["keep.txt"]
    with pytest.raises(OverspillError, match="is the base directory"):
        merge_adapter(base, ad, base, overwrite=True)
    (out / "keep.txt").unlink()
    merge_adapter(base, ad, str(out), overwrite=True)   # an empty directory is replaced
    first = (out / "model.safetensors").read_bytes()
    merge_adapter(base, ad, str(out), overwrite=True)   # so is an earlier merge
    assert (out / "model.safetensors").read_bytes() == first
    assert _left(tmp_path) == ["out"]


def test_failure_midway_leaves_nothing(llama_adapter, tmp_path, monkeypatch):
    """A merge that dies while writing leaves no out (and no temporary beside it); with overwrite, the previous
    out is untouched."""
    base, ad = llama_adapter
    rows, calls = merge_mod.Shard.rows, []

    def failing(self, name, a, b):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk went away")
        return rows(self, name, a, b)

    monkeypatch.setattr(merge_mod.Shard, "rows", failing)
    with pytest.raises(OSError, match="disk went away"):
        merge_adapter(base, ad, str(tmp_path / "out"), progress=False)
    assert _left(tmp_path) == []
    monkeypatch.setattr(merge_mod.Shard, "rows", rows)
    merge_adapter(base, ad, str(tmp_path / "out"), progress=False)
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    calls.clear()
    monkeypatch.setattr(merge_mod.Shard, "rows", failing)
    with pytest.raises(OSError):
        merge_adapter(base, ad, str(tmp_path / "out"), overwrite=True, progress=False)
    assert _left(tmp_path) == ["out"] and (tmp_path / "out" / "model.safetensors").read_bytes() == before


def test_bin_tied_weights(ref_dir, tmp_path, monkeypatch):
    """A single pytorch_model.bin whose lm_head.weight shares its storage with the embedding (torch.save of a tied
    model): pages dropped from the mmap after each chunk are read again intact, and the result equals the merge
    of the safetensors checkpoint."""
    import transformers
    from safetensors.torch import load_file

    base, _ = ref_dir("llama_tied")
    _adapt(base, "llama_tied", str(tmp_path / "adapter"))
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    (tmp_path / "bin").mkdir()
    shutil.copy(f"{base}/config.json", tmp_path / "bin")
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    monkeypatch.setattr(merge_mod, "CHUNK_ELEMENTS", 700)
    ref = load_file(os.path.join(merge_adapter(base, str(tmp_path / "adapter"), str(tmp_path / "st"),
                                               progress=False), "model.safetensors"))
    got = load_file(os.path.join(merge_adapter(str(tmp_path / "bin"), str(tmp_path / "adapter"),
                                               str(tmp_path / "out"), progress=False), "model.safetensors"))
    assert all(torch.equal(got[n], t) for n, t in ref.items())
    assert torch.equal(got["lm_head.weight"], ref["model.embed_tokens.weight"])
    ids = _ids()
    assert torch.equal(_logits(_load(str(tmp_path / "out")), ids), _logits(_load(str(tmp_path / "st")), ids))
