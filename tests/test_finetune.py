"""LoRA fine-tuning against PEFT: gradients, adapter files both ways, every base tier and format, the trainer's
checkpoints and resume, and a real fine-tune of the built-in model on a play it has not seen."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file
import torch
import torch.nn.functional as F

import overspill
from overspill.finetune.backward import IGNORE, train_pass
from overspill.finetune.lora import LoraAdapter, LoraSettings

from conftest import VARIANTS, VOCAB, play_split

peft = pytest.importorskip("peft")

# PEFT target_modules per variant: every block linear (GPT-2's c_proj is in attn and mlp: both match)
TARGETS = {"gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
           "gpt_neox_parallel": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
           "gpt_neox_sequential": ["query_key_value", "dense_4h_to_h"],
           "gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama_gqa": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "llama_tied": ["q_proj", "v_proj", "up_proj", "lm_head"]}


def _peft_model(hf_model, variant, r=4):
    """The transformers model wrapped by PEFT, with random (nonzero) A and B so every gradient and delta is live."""
    import copy
    m = copy.deepcopy(hf_model)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS[variant], lora_dropout=0.0,
                                                fan_in_fan_out=variant == "gpt2"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm


def _labels(ids):
    return torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), IGNORE)], 1)


def _grads(ad: LoraAdapter) -> dict[str, torch.Tensor]:
    out = {}
    for s in ad.slots:
        out[f"base_model.model.{s.path}.lora_A.weight"] = s.A.grad
        out[f"base_model.model.{s.path}.lora_B.weight"] = s.B.grad
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_gradients_equal_peft(ref_dir, tmp_path, variant):
    """One step in float32: the loss and every LoRA gradient equal PEFT's on the transformers model with the same
    adapter, with gradient checkpointing on and off. Tolerance 1e-6 absolute on gradients of size ~0.1-0.4: float32
    rounding of the same sums taken in another order (measured: <= 3e-7)."""
    path, hf = ref_dir(variant)
    pm = _peft_model(hf, variant)
    pm.save_pretrained(tmp_path / "ad")
    ids = torch.randint(3, VOCAB, (3, 13), generator=torch.Generator().manual_seed(2))
    logits = pm(ids).logits
    ref_loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    ref_loss.backward()
    ref = {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if "lora_" in n}
    cfg = overspill.load(path, dtype="float32", background=False).config
    ad = LoraAdapter.load(str(tmp_path / "ad"), cfg)
    m = overspill.load(path, dtype="float32", linear_hook=ad.hook)
    for ckpt in (True, False):
        for p in ad.parameters():
            p.grad = None
        total, n = train_pass(m.executor, ids, _labels(ids), checkpoint=ckpt)
        assert n == 3 * 12 and abs(total / n - ref_loss.item()) < 1e-5
        got = _grads(ad)
        assert set(got) == set(ref)
        for k in ref:
            assert torch.allclose(got[k], ref[k], atol=1e-6, rtol=0), (k, (got[k] - ref[k]).abs().max())


NORMS = {"gpt2": ["ln_1", "ln_2", "ln_f"], "gpt_neox_parallel": ["input_layernorm", "final_layer_norm"],
         "llama_gqa": ["post_attention_layernorm", "norm"]}


@pytest.mark.parametrize("variant,bias", [(v, "lora_only") for v in NORMS] +
                         [(v, "all") for v in ("gpt2", "gpt_neox_parallel", "gptj")])
def test_trained_biases_and_norms_equal_peft(ref_dir, tmp_path, variant, bias):
    """PEFT's bias="lora_only" (or "all": every bias of the model, of modules without pairs and norms too) and
    modules_to_save=[norms], every trainable tensor moved off its base value: the
    adapter loads in overspill with PEFT's logits (5e-5: the moved norms enlarge the logits, and other tests' thread
    settings change float32 summation order; measured up to 1.3e-5); one float32 step gives PEFT's gradients for the pairs, the biases
    and the norms (a norm's or bias's gradient sums over every token position, so float32 order differences grow
    with its size: within 1e-4 of its largest entry, plus 1e-6; measured 2e-6 on 0.04); overspill's file loads back in
    PEFT with the same logits; a new adapter
    that trains them starts equal to the base (GPT-2, NeoX: biases and LayerNorms; Llama: RMSNorms, no biases)."""
    import copy
    path, hf = ref_dir(variant)
    targets = TARGETS[variant] if bias == "lora_only" else TARGETS[variant][:1]   # "all": most biases without pairs
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=variant == "gpt2",
        bias=bias, modules_to_save=NORMS.get(variant, [])[: None if bias == "lora_only" else 1]))
    g = torch.Generator().manual_seed(1)
    trained = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    with torch.no_grad():   # pairs as in _peft_model; biases and norms moved by 5% (larger moves make this tiny
        for n, p in trained:  # random model's attention sharp enough that float32 order differences reach 1e-5)
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if "lora_" in n else 0.05))
    pm.save_pretrained(tmp_path / "peft")
    ids = torch.randint(3, VOCAB, (3, 13), generator=torch.Generator().manual_seed(2))
    logits = pm(ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    key = lambda n: n.replace(".modules_to_save.default", "").replace(".default", "")
    ref = {key(n): p.grad for n, p in trained}
    assert any(k.endswith("bias") for k in ref) == (variant != "llama_gqa")
    cfg = overspill.load(path, dtype="float32", background=False).config
    ad = LoraAdapter.load(str(tmp_path / "peft"), cfg)
    assert ad.settings.bias == bias and ad.norms
    m = overspill.load(path, dtype="float32", linear_hook=ad.train().hook)
    with torch.no_grad():
        torch.testing.assert_close(m.logits(ids), logits.detach(), rtol=0, atol=5e-5)
    total, n = train_pass(m.executor, ids, _labels(ids))
    assert abs(total / n - loss.item()) < 1e-5
    got = {k: p.grad for k, p in zip(ad.state_dict(), _state_params(ad))}
    assert set(got) == set(ref)
    for k in ref:
        tol = 1e-6 + (0 if ".lora_" in k else 1e-4 * ref[k].abs().max().item())
        assert torch.allclose(got[k], ref[k], atol=tol, rtol=0), (k, (got[k] - ref[k]).abs().max())
    ad.eval().save(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, logits.detach(), rtol=0, atol=5e-5)
        via_api = overspill.load(path, dtype="float32", adapter=tmp_path / "ours").logits(ids)
        torch.testing.assert_close(via_api, logits.detach(), rtol=0, atol=5e-5)
    from overspill.finetune.merge import merge_adapter
    merged = merge_adapter(path, str(tmp_path / "peft"), str(tmp_path / "merged"), progress=False)
    with torch.no_grad():   # the trained biases and norms replace the base's tensors in the merged checkpoint
        torch.testing.assert_close(overspill.load(merged, dtype="float32").logits(ids), logits.detach(), rtol=0,
                                   atol=5e-5)
    fresh = LoraAdapter(cfg, LoraSettings(r=2, targets=("qkv", "out", "up", "down"), bias=bias, norms=("all",)))
    plain = overspill.load(path, dtype="float32").logits(ids)
    assert torch.equal(overspill.load(path, dtype="float32", linear_hook=fresh.hook).logits(ids), plain)


def _state_params(ad: LoraAdapter) -> list[torch.Tensor]:
    """The adapter's tensors in state_dict's order."""
    out = []
    for s in ad.slots:
        out += [p for p in (s.A, s.B, s.bias) if p is not None]
    for nm in ad.norms:
        out += [p for p in (nm.weight, nm.bias) if p is not None]
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapter_files_round_trip_with_peft(ref_dir, tmp_path, variant):
    """PEFT's adapter loads in overspill with PEFT's logits; overspill's saved adapter loads in
    peft.PeftModel.from_pretrained with overspill's logits (float32)."""
    path, hf = ref_dir(variant)
    pm = _peft_model(hf, variant)
    pm.save_pretrained(tmp_path / "peft")
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pm(ids).logits
    m = overspill.load(path, dtype="float32", adapter=tmp_path / "peft")
    got = m.logits(ids)
    assert (got - ref).abs().max() < 1e-5
    assert (overspill.load(path, dtype="float32").logits(ids) - ref).abs().max() > 0.1   # the adapter matters
    # overspill -> PEFT: a fresh adapter with random pairs, saved, loaded by PEFT over the transformers model
    ad = LoraAdapter(m.config, LoraSettings(r=3, alpha=6, targets=("qkv", "out", "up", "down")),
                     generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    ad.save(str(tmp_path / "ours"))
    conf = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["fan_in_fan_out"] == (variant == "gpt2")
    import copy
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours"))
    with torch.no_grad():
        ref2 = theirs(ids).logits
    got2 = overspill.load(path, dtype="float32", linear_hook=ad.hook).logits(ids)
    assert (got2 - ref2).abs().max() < 1e-5
    n_lora = sum(1 for n, _ in theirs.named_parameters() if "lora_A" in n)
    assert n_lora == len(ad.slots)


def _budget_streaming(path, quantize=None, dtype="float32"):
    """The planner's smallest cpu budget for this model and format (read from its refusal of 1 KiB): it streams."""
    import re
    with pytest.raises(overspill.OverspillError) as e:
        overspill.load(path, dtype=dtype, quantize=quantize, max_memory="cpu=1KiB", max_seq_len=64)
    return int(re.search(r"= (\d+) B", str(e.value)).group(1))


@pytest.mark.parametrize("variant", ["gptj", "llama_gqa", "gpt2"])
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_streamed_base_gives_the_resident_gradients(deep_dir, tmp_path, variant, quantize):
    """Every block streamed from disk (read forward, then again in reverse for the backward) gives bitwise the
    gradients of the resident base in the same format, with LoRA dropout on (the recompute redraws its masks).
    Quantized bases stream from a layer store in that format (the frozen int8 / int4 weights run backward too)."""
    path, _ = deep_dir(variant)
    if quantize is not None:
        from overspill.checkpoint.store import convert
        path = convert(path, str(tmp_path / "store"), dtype="float32", quantize=quantize, progress=False)
    cfg = overspill.load(path, dtype="float32", background=False).config
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    out = []
    for budget in (None, _budget_streaming(path)):
        ad = LoraAdapter(cfg, LoraSettings(r=4, dropout=0.1), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for p in ad.parameters():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        kw = {} if budget is None else dict(max_memory={"cpu": budget}, max_seq_len=64)
        m = overspill.load(path, dtype="float32", linear_hook=ad.hook, **kw)
        if budget is not None:
            assert "stream" in [p.tier for p in m.plan.placements]
        ad.train()
        grads = []
        for _ in range(2):   # the second step reuses the source's order: the reader keeps in step
            torch.manual_seed(7)
            for p in ad.parameters():
                p.grad = None
            train_pass(m.executor, ids, _labels(ids))
            grads.append(torch.cat([p.grad.flatten() for p in ad.parameters()]))
        assert torch.equal(grads[0], grads[1])
        out.append(grads[0])
        if budget is not None:
            st = m.executor.source.stats
            assert st["units_read"] >= 2 * (2 * cfg.n_layers)   # each block twice per step
        m.close()
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("variant", ["gptj", "llama_gqa", "llama_tied"])
def test_a_quantized_head_and_table_train_as_their_dequantized_weights(deep_dir, variant):
    """quantize_head (the 8-bit recipe: every large matrix frozen in int8): the head is an int8 Linear and an untied
    token table an Int8Table, and a training step gives the LoRA gradients of the same model holding their
    dequantized float32 weights instead (the head's input gradient from the int8 panels against a dense float32
    matmul: the sums differ only in order, hence the relative 1e-5)."""
    from overspill.model.linear import DenseLinear
    from overspill.quant import Int8Table, QuantLinear

    path, _ = deep_dir(variant)
    cfg = overspill.load(path, dtype="float32", background=False).config
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    ad = LoraAdapter(cfg, LoraSettings(r=4, dropout=0.0), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    ad.train()
    m = overspill.load(path, dtype="float32", quantize="int8", quantize_head=True, linear_hook=ad.hook,
                       background=False)
    ws = m.executor.source.weights
    assert isinstance(ws[-1].lm, QuantLinear)
    assert isinstance(ws[0].tok, Int8Table) != cfg.tie_embeddings    # a tied table is the dense one it shares

    def step():
        for p in ad.parameters():
            p.grad = None
        loss, _ = train_pass(m.executor, ids, _labels(ids))
        return loss, torch.cat([p.grad.flatten() for p in ad.parameters()])

    loss_q, g_q = step()
    ws[-1] = dataclasses.replace(ws[-1], lm=DenseLinear(ws[-1].lm.dequantize(), ws[-1].lm.bias))
    if not cfg.tie_embeddings:
        ws[0] = dataclasses.replace(ws[0], tok=ws[0].tok.dequantize())
    loss_d, g_d = step()
    assert abs(loss_q - loss_d) <= 1e-5 * abs(loss_d), (loss_q, loss_d)
    assert (g_q - g_d).abs().max() <= 1e-5 * g_d.abs().max(), (g_q - g_d).abs().max()
    m.close()


@pytest.mark.parametrize("variant", ["gptj", "llama_gqa"])
@pytest.mark.parametrize("store", ["hf", "float32", "int8", "bfloat16"])
def test_streamed_base_without_checkpointing_keeps_the_graphs(deep_dir, tmp_path, variant, store):
    """Checkpointing off on a streamed base: each block's graph is kept, the backward reads the block again and the
    graph multiplies by the bytes fetched again (the forward's were recycled, or let go: the kept graph holds no
    streamed weight). The gradients equal the resident
    base's with checkpointing on: bitwise in float32 and int8 (the same products either way), within float32 sums
    for bf16 panels (laid out for the kernel in the kept graph's forward, sliced in the checkpointed forward)."""
    from overspill.checkpoint.store import convert
    path, _ = deep_dir(variant)
    if store != "hf":   # a layer store (staging slots), else the Hugging Face directory (memory per fetch)
        path = convert(path, str(tmp_path / "store"), dtype="bfloat16" if store == "bfloat16" else "float32",
                       quantize="int8" if store == "int8" else None, progress=False)
    dt = "bfloat16" if store == "bfloat16" else "float32"
    cfg = overspill.load(path, dtype=dt, background=False).config
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    out = []
    # a budget that streams blocks but holds the head: then each block's backward fetch lands in the other of the two
    # staging slots than its forward's did (checked below), whose bytes the ring has recycled meanwhile
    b0 = _budget_streaming(path, dtype=dt)
    for f in (1.1, 1.2, 1.3, 1.5):
        m = overspill.load(path, dtype=dt, max_memory={"cpu": int(f * b0)}, max_seq_len=64, background=False)
        streamed = getattr(m.executor.source, "streamed", [])
        m.close()
        if len(streamed) >= 2 and cfg.n_layers + 1 not in streamed:
            break
    assert len(streamed) >= 2 and cfg.n_layers + 1 not in streamed, streamed
    for budget, checkpoint in ((None, True), (int(f * b0), False)):
        ad = LoraAdapter(cfg, LoraSettings(r=4, dropout=0.1), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for p in ad.parameters():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        kw = {} if budget is None else dict(max_memory={"cpu": budget}, max_seq_len=64)
        m = overspill.load(path, dtype=dt, linear_hook=ad.hook, **kw)
        src, where = m.executor.source, {}
        if budget is not None:   # which staging slot each fetch of a block lands in
            acquire = src.acquire

            def tracked(i):
                w = acquire(i)
                if i in src._in_use:
                    where.setdefault(i, []).append(src._in_use[i])
                return w
            src.acquire = tracked
        ad.train()
        grads = []
        for _ in range(2):
            torch.manual_seed(7)
            for p in ad.parameters():
                p.grad = None
            train_pass(m.executor, ids, _labels(ids), checkpoint=checkpoint)
            grads.append(torch.cat([p.grad.flatten() for p in ad.parameters()]))
        assert torch.equal(grads[0], grads[1])
        out.append(grads[0])
        if budget is not None:
            assert src.stats["units_read"] >= 2 * (2 * len(streamed))   # each streamed block twice per step
            # the backward's fetch of a block lands in other bytes than its forward's, which the ring recycled
            assert all(len(set(where[i][:2])) == 2 for i in where if i <= cfg.n_layers), where
        m.close()
    if store == "bfloat16":
        assert torch.allclose(out[0], out[1], rtol=1e-4, atol=1e-6 * out[0].abs().max())
    else:
        assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("kind", ["dense-f32", "blocked-bf16-native", "stored-int8", "stored-int4"])
def test_a_kept_graph_holds_no_weight_and_takes_the_refetched_one(kind, monkeypatch):
    """Every frozen product under a graph saves its Linear, never its weight or a dense copy of it (which would keep a
    streamed block's memory alive until the backward); emptied after the forward (hollow_) and refilled from the same
    weight fetched again (refill_), the backward gives dL/dx = g @ W."""
    from overspill import quant
    from overspill.model import linear as L
    from overspill.model.linear import BlockedLinear, DenseLinear, hollow_, refill_
    torch.manual_seed(0)
    N, K = 64, 128
    w = torch.randn(N, K)

    def make():
        if kind == "dense-f32":
            return DenseLinear(w.clone())
        if kind == "blocked-bf16-native":      # the path of CPUs with native bf16 (oneDNN's bf16 matmul)
            monkeypatch.setattr(L, "bf16_native", lambda: True)
            return BlockedLinear(w.bfloat16())
        scheme = kind.split("-")[1]     # a quantized weight held in host RAM, moved where it computes
        return quant.stored_linear(scheme, quant.quantize(w, scheme))
    from overspill.kernels import bf16_kernels
    if kind == "blocked-bf16-native" and bf16_kernels() is None:
        pytest.skip("no bf16 kernel build on this CPU")
    lin = make()
    want_w = lin.dequantize().float()
    x = torch.randn(3, K, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = lin(x)
    assert not saved or max(saved) < N * K, saved
    hollow_(lin)
    assert not any(isinstance(t, torch.Tensor) and t.numel() >= N * K for t in _tensors_of(lin))
    refill_(lin, make())
    g = torch.randn(3, N)
    y.backward(g.to(y.dtype))
    assert torch.allclose(x.grad, g @ want_w, rtol=1e-2 if kind == "blocked-bf16-native" else 1e-5, atol=1e-3)


def _tensors_of(obj, depth=3):
    from overspill.finetune.backward import _tensors_in
    return list(_tensors_in(obj, depth))


@pytest.mark.parametrize("variant", ["gptj", "llama_gqa"])
@pytest.mark.parametrize("step_dtype", [torch.float32, torch.bfloat16])
def test_the_planner_counts_what_kept_graphs_save(deep_dir, variant, step_dtype, monkeypatch):
    """Without checkpointing the planner's training reserve covers the bytes every block's kept graph saves (measured
    with a saved-tensor hook over a real step) in the step's dtype (bf16 where a CPU or GPU computes in it: the
    adapter's tensors stay float32 there), and counts a float32 step where a 16-bit base trains in float32."""
    from overspill.finetune import backward
    from overspill.runtime.reserve import Reserve
    monkeypatch.setattr(backward, "compute_dtype", lambda ex: step_dtype)
    path, _ = deep_dir(variant)
    cfg = overspill.load(path, dtype="float32", background=False).config
    ad = LoraAdapter(cfg, LoraSettings(r=8, dropout=0.05))
    m = overspill.load(path, dtype=str(step_dtype).split(".")[1], linear_hook=ad.hook)
    ad.train()
    B, T = 2, 32
    ids = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_pass(m.executor, ids, _labels(ids), checkpoint=False)
    keep = Reserve(B, T, training=True, keep_graphs=True)
    counted = keep.train_bytes(cfg, step_dtype)
    assert sum(saved.values()) <= counted <= 2 * sum(saved.values()), (sum(saved.values()), counted)
    assert counted > Reserve(B, T, training=True).train_bytes(cfg, step_dtype)
    f32 = dataclasses.replace(keep, train_dtype=torch.float32)
    assert f32.train_bytes(cfg, torch.bfloat16) == keep.train_bytes(cfg, torch.float32) > \
        keep.train_bytes(cfg, torch.bfloat16)


def test_bad_targets_and_adapters_are_one_line(ref_dir, tmp_path):
    path, hf = ref_dir("gptj")
    cfg = overspill.load(path, dtype="float32", background=False).config
    with pytest.raises(overspill.OverspillError, match="matches no module.*q_proj"):
        LoraAdapter(cfg, LoraSettings(targets=("query_key_value",)))
    with pytest.raises(overspill.OverspillError, match="missing adapter_config.json"):
        overspill.load(path, adapter=tmp_path)
    # an adapter for another architecture names modules this model lacks
    npath, nhf = ref_dir("gpt_neox_parallel")
    _peft_model(nhf, "gpt_neox_parallel").save_pretrained(tmp_path / "neox")
    with pytest.raises(overspill.OverspillError, match="does not have"):
        overspill.load(path, adapter=tmp_path / "neox")
    conf = json.loads((tmp_path / "neox" / "adapter_config.json").read_text())
    conf["use_dora"] = True
    (tmp_path / "neox" / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(overspill.OverspillError, match="use_dora"):
        overspill.load(npath, adapter=tmp_path / "neox")
    # trained biases and saved modules: only the adapted modules' biases, only norm modules, every tensor present
    from overspill.finetune.merge import merge_adapter
    for change, match in (({"bias": "every"}, "bias='every' is not supported"),
                          ({"bias": "all"}, r"no base_model.model.gpt_neox.layers.0.\S*bias \(its adapter_config.json "
                                            r"trains it\)"),
                          ({"modules_to_save": ["dense"]}, "modules_to_save: norm module 'dense' matches no norm"),
                          ({"modules_to_save": ["final_layer_norm"]}, "no base_model.model.gpt_neox.final_layer_norm"
                                                                      r".weight \(its adapter_config.json trains it\)")):
        (tmp_path / "neox" / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": False, **change}))
        with pytest.raises(overspill.OverspillError, match=match):
            overspill.load(npath, adapter=tmp_path / "neox")
    tensors = load_file(str(tmp_path / "neox" / "adapter_model.safetensors"))
    save_file({**tensors, "base_model.model.gpt_neox.nope.weight": torch.ones(3)},
              str(tmp_path / "neox" / "adapter_model.safetensors"))
    (tmp_path / "neox" / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": False,
                                                                       "modules_to_save": ["nope"]}))
    with pytest.raises(overspill.OverspillError, match="trains gpt_neox.nope.weight, which .* does not have"):
        merge_adapter(npath, str(tmp_path / "neox"), str(tmp_path / "merged"), progress=False)
    assert not (tmp_path / "merged").exists()


# -- the trainer ---------------------------------------------------------------------------------------------------

def _cli(*argv, timeout=600):
    return subprocess.run([sys.executable, "-m", "overspill.cli", *argv], capture_output=True, text=True,
                          timeout=timeout)


def test_finetuning_the_builtin_model_on_an_unseenplay_split(tmp_path):
    """LoRA on the built-in model, trained on 90% of Twelfth Night: the held-out rest of the play gets a lower loss,
    and greedy generation changes."""
    train, rest = play_split(tmp_path)
    out = str(tmp_path / "adapter")
    r = _cli("finetune", "--data", train, "--output", out, "--max-steps", "14", "--batch-size", "4", "--seq-len", "128",
             "--lr", "3e-3", "--dtype", "float32", "--eval-split", "0")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))

    def nll(adapter):
        r = _cli("eval", "--text", rest, "--dtype", "float32", *(["--adapter", adapter] if adapter else []))
        assert r.returncode == 0, r.stderr
        return float(r.stdout.split("mean NLL ")[1].split()[0])
    before, after = nll(None), nll(out)
    assert after < before - 0.15, (before, after)          # measured: 4.78 -> 4.47 nats after 30 steps
    gen = lambda *a: _cli("generate", "ORSINO:", "-n", "24", "--dtype", "float32", *a).stdout
    assert gen("--adapter", out) != gen()


def test_resume_after_kill_reproduces_the_loss_curve(tmp_path):
    """kill -9 after the first checkpoint, --resume: at most one interval is lost and the loss curve equals an
    uninterrupted run's exactly (every bias (--train-bias all: of the linears without pairs and of the norms too)
    and a norm module training too, so the checkpoint must restore them)."""
    train, _ = play_split(tmp_path)
    args = ["--data", train, "--max-steps", "6", "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3",
            "--save-every", "2", "--target", "qkv,up", "--train-bias", "all", "--train-norms", "input_layernorm",
            "--dtype", "float32", "--lora-dropout", "0.1"]
    full = str(tmp_path / "full")
    r = _cli("finetune", "--output", full, *args)
    assert r.returncode == 0, r.stderr
    want = json.load(open(os.path.join(full, "checkpoint", "trainer_state.json")))["history"]
    conf = json.load(open(os.path.join(full, "adapter_config.json")))
    assert conf["bias"] == "all" and conf["modules_to_save"] == ["input_layernorm"]
    from safetensors.torch import load_file
    saved = load_file(os.path.join(full, "adapter_model.safetensors"))
    head = overspill.load(dtype="float32", background=False).executor.source.acquire(-1)   # the base's final norm
    for key in ("layers.0.attention.query_key_value.base_layer.bias", "layers.0.attention.dense.bias",
                "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.bias", "final_layer_norm.bias"):
        assert f"base_model.model.gpt_neox.{key}" in saved, key
    assert "base_model.model.gpt_neox.final_layer_norm.weight" not in saved     # its bias alone trains
    assert not torch.equal(saved["base_model.model.gpt_neox.final_layer_norm.bias"], head.norm[1].float())
    cut = str(tmp_path / "cut")
    p = subprocess.Popen([sys.executable, "-m", "overspill.cli", "finetune", "--output", cut, *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = os.path.join(cut, "checkpoint", "trainer_state.json")
    t0 = time.time()
    while not os.path.exists(state) and time.time() - t0 < 300 and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = json.load(open(state))["step"]
    assert 2 <= done < 6
    r = _cli("finetune", "--output", cut, *args)             # without --resume: refuses to overwrite the checkpoint
    assert r.returncode == 2 and "--resume" in r.stderr
    r = _cli("finetune", "--output", cut, *args, "--resume")
    assert r.returncode == 0, r.stderr
    got = json.load(open(state))["history"]
    assert [h["loss"] for h in got] == [h["loss"] for h in want]
    assert [h.get("eval_loss") for h in got] == [h.get("eval_loss") for h in want]
    r = _cli("finetune", "--output", cut, *args[:-2], "--lora-dropout", "0.2", "--resume")
    assert r.returncode == 2 and "other settings" in r.stderr


def test_finetune_rejects_bad_input_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no completion"}\n')
    r = _cli("finetune", "--data", str(bad), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o")
    txt = tmp_path / "t.txt"
    txt.write_text("some words to train on\n" * 50)
    r = _cli("finetune", "--data", str(txt), "--output", str(tmp_path / "o"), "--target", "nope")
    assert r.returncode == 2 and "matches no module" in r.stderr
    assert not os.path.exists(tmp_path / "o")
    r = _cli("finetune", "--data", str(txt), "--output", str(tmp_path / "o"), "--quantize-head")
    assert r.returncode == 2 and "--quantize-head needs a scheme" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o")


def test_server_applies_the_adapter(tmp_path):
    """overspill serve --adapter: completions through the official client equal overspill generate with the adapter
    (and differ from the base model's)."""
    openai = pytest.importorskip("openai")
    from _serve_util import live_server

    m = overspill.load(dtype="float32")
    ad = LoraAdapter(m.config, LoraSettings(r=4, targets=("qkv", "up")), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    ad.save(str(tmp_path / "ad"))
    want = overspill.load(dtype="float32", adapter=tmp_path / "ad").generate(["ROMEO:"], max_new_tokens=12)[0]
    base = m.generate(["ROMEO:"], max_new_tokens=12)[0]
    assert want != base
    with live_server(dtype="float32", adapter=str(tmp_path / "ad")) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none")
        r = client.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=12, temperature=0)
    assert r.choices[0].text == want


def test_bf16_base_gradients_close_to_float32(ref_dir):
    """A bf16 base (its matmuls and their input gradients through float32 slices on CPUs without native bf16) gives
    the float32 base's LoRA gradients within bf16 rounding: relative L2 error under 3% (measured ~0.5%)."""
    path, _ = ref_dir("llama_gqa")
    cfg = overspill.load(path, dtype="float32", background=False).config
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    out = []
    for dt in ("float32", "bfloat16"):
        ad = LoraAdapter(cfg, LoraSettings(r=4, dropout=0.0))
        with torch.no_grad():
            for p in ad.parameters():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        m = overspill.load(path, dtype=dt, linear_hook=ad.hook)
        train_pass(m.executor, ids, _labels(ids))
        out.append(torch.cat([p.grad.flatten() for p in ad.parameters()]))
    rel = (out[1] - out[0]).norm() / out[0].norm()
    assert rel < 0.03, rel


@pytest.mark.parametrize("native", [True, False])
def test_training_load_keeps_bf16_weights_row_major_where_bf16_is_native(ref_dir, monkeypatch, native):
    """A training load (Reserve.training) of a bf16 base on a CPU that multiplies bf16 natively keeps every block and
    head linear row-major as it was read (DenseLinear: oneDNN's GEMM for the forward and the input gradient, nothing
    re-laid out); without native bf16 they take the kernels' blocked layout as an inference load does. The LoRA
    gradients are the inference load's within bf16 rounding (relative L2 under 3%)."""
    import overspill.runtime.loader as LD
    from overspill.kernels import bf16_kernels
    from overspill.model.linear import BlockedLinear, DenseLinear
    from overspill.runtime.reserve import Reserve
    from overspill.model.weights import linear_names

    if bf16_kernels() is None:
        pytest.skip("needs the CPU kernels (the blocked layout)")
    monkeypatch.setattr(LD, "bf16_native", lambda: native)
    path, _ = ref_dir("llama_gqa")
    cfg = overspill.load(path, dtype="float32", background=False).config
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    grads, kinds = [], []
    for training in (False, True):
        ad = LoraAdapter(cfg, LoraSettings(r=4, dropout=0.0))
        with torch.no_grad():
            for p in ad.parameters():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        ex = LD.build(path, "bfloat16", None, None, Reserve(2, 24, training=training), linear_hook=ad.hook).executor
        w = ex.source.acquire(1)
        kinds.append({type(getattr(w, n).base) for n in linear_names("block.0")})
        ex.source.release(1)
        train_pass(ex, ids, _labels(ids))
        grads.append(torch.cat([p.grad.flatten() for p in ad.parameters()]))
        ex.close()
    assert kinds[0] == {BlockedLinear}
    assert kinds[1] == ({DenseLinear} if native else {BlockedLinear})
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 0.03


def test_lora_dropout_drops_at_its_rate_and_replays_from_the_generator_state():
    """LoRA's dropout (lora.dropout, 15 random bits a decision): over 2M elements the dropped share is within 5 sigma
    of drop_probability(p) (p rounded to 2^-15), the kept elements are scaled by exactly 1 / (1 - that), the gradient
    is the same mask and scale, and the same generator state gives the same mask (a checkpointed recompute)."""
    from overspill.finetune.lora import drop_probability, dropout
    for p in (0.05, 0.3):
        q = drop_probability(p)
        assert abs(q - p) <= 2 ** -16
        x = torch.full((4, 512, 1024), 2.0, requires_grad=True)
        state = torch.get_rng_state()
        y = dropout(x, p)
        dropped = (y == 0).float().mean().item()
        assert abs(dropped - q) < 5 * (q * (1 - q) / y.numel()) ** 0.5, (p, dropped)
        assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 2.0 * (1.0 / (1.0 - q))))
        y.sum().backward()
        assert torch.equal(x.grad, (y != 0) * (1.0 / (1.0 - q)))
        torch.set_rng_state(state)
        assert torch.equal(dropout(x.detach(), p), y.detach())


def test_frozen_bf16_linear_input_gradient():
    """The bf16 linear's autograd: dL/dx = dL/dy W (float32 sums of bf16 products), no weight gradient."""
    from overspill.model.linear import DenseLinear
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(300, 200, generator=g).bfloat16(), torch.randn(300, generator=g).bfloat16()
    x = torch.randn(3, 40, 200, generator=g).bfloat16().requires_grad_()
    y = DenseLinear(w, b)(x)
    gy = torch.randn(y.shape, generator=g).bfloat16()
    y.backward(gy)
    ref = gy.float() @ w.float()
    assert (x.grad.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert not w.requires_grad and w.grad is None


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_training_after_inference_on_the_same_thread(quantize):
    """A prefill under inference mode leaves reusable buffers behind (float32 slices, dequantization scratch); a
    training pass on the same thread afterwards must still be able to write them."""
    cfg = overspill.load(background=False).config
    ad = LoraAdapter(cfg, LoraSettings(r=2))
    m = overspill.load(linear_hook=ad.hook, quantize=quantize, background=False)   # bf16, as shipped
    ids = torch.randint(3, 4000, (2, 40), generator=torch.Generator().manual_seed(0))
    m.logits(ids)
    total, n = train_pass(m.executor, ids, _labels(ids))
    assert n == 2 * 39 and total > 0 and all(p.grad is not None for p in ad.parameters())
