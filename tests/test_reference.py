"""Every architecture variant against transformers' own implementation of the same checkpoint."""
import pytest
import torch

import overspill
from conftest import VARIANTS, VOCAB

ALL = list(VARIANTS)


def _no_eos(hf_model):
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    return hf_model


@pytest.mark.parametrize("variant", ALL)
def test_logits_match_transformers(ref_dir, variant):
    path, ref = ref_dir(variant)
    model = overspill.load(path, dtype="float32")
    ids = torch.randint(3, VOCAB, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    got = model.logits(ids)
    assert got.shape == want.shape == (3, 21, VOCAB)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ALL)
def test_incremental_decoding_matches_full_forward(ref_dir, variant):
    path, _ = ref_dir(variant)
    model = overspill.load(path, dtype="float32")
    ex = model.executor
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    full = model.logits(ids)
    cache = ex.new_cache(2, 12)
    parts = [ex.forward(ids[:, :5], torch.arange(5)[None].expand(2, 5), cache)]      # prefill 5
    parts.append(ex.forward(ids[:, 5:8], torch.arange(5, 8)[None].expand(2, 3), cache))  # chunk of 3
    for t in range(8, 12):                                                              # then one at a time
        parts.append(ex.forward(ids[:, t:t + 1], torch.full((2, 1), t), cache))
    inc = torch.cat(parts, dim=1)
    assert (inc - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ALL)
def test_greedy_tokens_match_transformers_generate(ref_dir, variant):
    path, ref = ref_dir(variant)
    model = overspill.load(path, dtype="float32")
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    want = _no_eos(ref).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    got = model.generate([ids[0].tolist()], max_new_tokens=32, ignore_eos=True)
    assert got[0] == want[0, 7:].tolist()


@pytest.mark.parametrize("variant", ["gptj", "gpt_neox_parallel", "gpt2", "llama_gqa"])
def test_beam_search_matches_transformers(ref_dir, variant):
    path, ref = ref_dir(variant)
    model = overspill.load(path, dtype="float32")
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    want = _no_eos(ref).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, num_beams=3,
                                 do_sample=False)
    got = model.generate([ids[0].tolist()], max_new_tokens=10, num_beams=3, ignore_eos=True)
    assert got[0] == want[0, 6:].tolist()


@pytest.mark.parametrize("variant", ALL)
def test_left_padded_batch_equals_each_prompt_alone(ref_dir, variant):
    path, _ = ref_dir(variant)
    model = overspill.load(path, dtype="float32")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 3, 6)]
    batch = model.generate(prompts, max_new_tokens=16, ignore_eos=True)
    alone = [model.generate([p], max_new_tokens=16, ignore_eos=True)[0] for p in prompts]
    assert batch == alone


def test_left_padded_logits_match_transformers(ref_dir):
    path, ref = ref_dir("llama_gqa")
    model = overspill.load(path, dtype="float32")
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
    got = model.logits(ids, attention_mask=mask)
    assert (got[mask.bool()] - want[mask.bool()]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["gpt_neox_parallel", "llama_gqa"])
def test_seeded_sampling_is_reproducible(ref_dir, variant):
    path, _ = ref_dir(variant)
    model = overspill.load(path, dtype="float32")
    prompts = [[5, 6, 7], [8, 9]]
    kw = dict(max_new_tokens=24, temperature=1.3, top_k=40, top_p=0.9, repetition_penalty=1.2, ignore_eos=True)
    a = model.generate(prompts, seed=123, **kw)
    b = model.generate(prompts, seed=123, **kw)
    c = model.generate(prompts, seed=124, **kw)
    assert a == b
    assert a != c
    # A sequence's samples do not depend on its batch mates (one generator per sequence).
    assert model.generate([prompts[0]], seed=123, **kw)[0] == a[0]


def test_sampling_with_top_k_1_is_greedy(ref_dir):
    path, _ = ref_dir("gpt2")
    model = overspill.load(path, dtype="float32")
    p = [[4, 5, 6, 7]]
    assert model.generate(p, max_new_tokens=12, temperature=0.7, top_k=1, seed=0, ignore_eos=True) == \
        model.generate(p, max_new_tokens=12, ignore_eos=True)


def test_repetition_penalty_matches_transformers(ref_dir):
    path, ref = ref_dir("gpt_neox_sequential")
    model = overspill.load(path, dtype="float32")
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(7))
    want = _no_eos(ref).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                                 repetition_penalty=1.5)
    got = model.generate([ids[0].tolist()], max_new_tokens=20, repetition_penalty=1.5, ignore_eos=True)
    assert got[0] == want[0, 8:].tolist()


def test_eos_stops_generation(ref_dir):
    path, _ = ref_dir("llama_gqa")
    model = overspill.load(path, dtype="float32")
    free = model.generate([[5, 6, 7]], max_new_tokens=20, ignore_eos=True)[0]
    eos = free[4]
    model.generation_defaults["eos_token_ids"] = [eos]   # what generation_config.json's eos_token_id sets
    out = model.generate([[5, 6, 7]], max_new_tokens=20)[0]
    assert out == free[: free.index(eos) + 1]


def test_bfloat16_close_to_float32(ref_dir):
    path, _ = ref_dir("gptj")
    f32 = overspill.load(path, dtype="float32").logits(torch.tensor([[3, 4, 5, 6, 7, 8]]))
    b16 = overspill.load(path, dtype="bfloat16").logits(torch.tensor([[3, 4, 5, 6, 7, 8]]))
    cos = torch.nn.functional.cosine_similarity(f32.flatten(), b16.flatten(), dim=0)
    assert cos > 0.999
