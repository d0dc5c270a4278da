"""The int8 KV cache (model/kv_cache.QuantKV): its rounding bound, its logits against the reference, and that every
placement, micro-batching and beam search see the same cache."""
import pytest
import torch

import overspill
from conftest import VARIANTS, VOCAB
from overspill.model.kv_cache import KVCache, QuantKV
from overspill.runtime.loader import Reserve


def test_quantkv_rounds_each_vector_to_half_a_step():
    """Every element is within absmax/254 of what was written (round to nearest of 127 steps a side); all-zero
    vectors read back as zeros; slots outside the written range are untouched."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, 16, generator=g) * torch.logspace(-3, 2, 5)[None, None, :, None]
    x[1, 0, 2] = 0.0
    kv = QuantKV.empty((3, 2, 9, 16), "cpu")
    kv.q.zero_(), kv.s.zero_()
    kv.write(4, x)
    back = kv.read(9, torch.float32)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((back[:, :, 4:9] - x).abs() <= step / 2 * (1 + 1e-6)).all()
    assert torch.equal(back[1, 0, 6], torch.zeros(16))
    assert torch.equal(back[:, :, :4], torch.zeros(3, 2, 4, 16))
    sub = kv[1:3]                                        # rows slice like a tensor and share its memory
    sub.write(0, torch.ones(2, 2, 1, 16))
    assert torch.equal(kv.read(1, torch.float32)[1:3], torch.ones(2, 2, 1, 16))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_int8_kv_logits_and_tokens_near_the_reference(ref_dir, variant):
    """Prompt logits (prefill attends over the rounded cache) stay within a small error of transformers', and the
    incremental decode with the int8 cache within the same error of the full forward."""
    path, ref = ref_dir(variant)
    m = overspill.load(path, dtype="float32", kv_cache="int8")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits.float()
    got = m.logits(ids)
    err = (got - want).abs().max().item()
    assert 0 < err < 0.02 * want.abs().max().item()      # rounded (not exact), but close
    cache = m.executor.new_cache(2, 12)
    pos = torch.arange(12)[None].expand(2, 12)
    steps = [m.executor.forward(ids[:, :6], pos[:, :6], cache)]
    steps += [m.executor.forward(ids[:, t:t + 1], pos[:, t:t + 1], cache) for t in range(6, 12)]
    inc = torch.cat(steps, 1)
    assert (inc - want).abs().max().item() < 0.02 * want.abs().max().item()


@pytest.mark.parametrize("variant", ["gptj", "llama_gqa"])
def test_int8_kv_streamed_micro_batched_and_beams_equal_resident(deep_dir, variant):
    """The int8 cache under a budget that streams blocks gives the all-resident int8 run's logits bitwise; split
    into micro-batches as well, the same logits up to SDPA's batch-size rounding, and the same greedy and
    beam-search tokens."""
    path, _ = deep_dir(variant)
    base = overspill.load(path, dtype="float32", kv_cache="int8")
    kw = dict(dtype="float32", max_batch_size=4, max_seq_len=24, kv_cache="int8")
    big = overspill.load(path, max_memory="cpu=1GiB", **kw)
    budget = big.plan.usage["cpu"]["total"] - big.plan.usage["cpu"]["weights"] + 3 * max(
        p.weight_bytes for p in big.plan.placements)
    m = overspill.load(path, max_memory={"cpu": budget}, **kw)
    assert "stream" in [p.tier for p in m.plan.placements]
    ids = torch.randint(3, VOCAB, (4, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(m.logits(ids), base.logits(ids))
    m.executor.reserve.micro_tokens = 10                 # prompts of 5 tokens: 2 rows per micro-batch
    torch.testing.assert_close(m.logits(ids), base.logits(ids), rtol=1e-5, atol=1e-5)   # SDPA over fewer rows
    prompts = [[5, 6, 7, 8, 9], [9, 10], [11, 12, 13], [4]]
    assert m.generate(prompts, max_new_tokens=10, ignore_eos=True) == \
        base.generate(prompts, max_new_tokens=10, ignore_eos=True)
    assert m.generate(prompts[:1], max_new_tokens=8, num_beams=3, ignore_eos=True) == \
        base.generate(prompts[:1], max_new_tokens=8, num_beams=3, ignore_eos=True)


def test_int8_kv_budget_counts_half_the_bytes(ref_dir):
    """The plan counts (head_dim + 4) bytes per cached vector instead of 2 x head_dim (bf16), plus the dequantized
    read of one micro-batch, and the cache the runtime allocates has exactly the counted bytes."""
    path, _ = ref_dir("gptj")
    cfg = overspill.load(path).config
    plain, int8 = Reserve(64, 48), Reserve(64, 48, kv_format="int8")
    hs = cfg.head_dim
    assert int8.kv_bytes_per_block(cfg, torch.bfloat16) * 2 * hs == plain.kv_bytes_per_block(cfg, torch.bfloat16) * (hs + 4)
    assert int8.activation_bytes(cfg, torch.bfloat16) == plain.activation_bytes(cfg, torch.bfloat16) + \
        2 * 64 * 48 * cfg.kv_size * 2
    c = KVCache(cfg, 64, 48, torch.bfloat16, kv_format="int8")
    held = sum(t.q.numel() + 4 * t.s.numel() for t in c.k + c.v)
    assert held == KVCache.nbytes_for(cfg, 64, 48, torch.bfloat16, "int8") == cfg.n_layers * int8.kv_bytes_per_block(cfg, torch.bfloat16)


def test_unknown_kv_format_is_one_clear_error(ref_dir):
    path, _ = ref_dir("gpt2")
    with pytest.raises(overspill.OverspillError, match=r"kv_cache: unknown format 'fp8'; expected one of int8"):
        overspill.load(path, kv_cache="fp8")
