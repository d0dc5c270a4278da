"""Memory the budget must count or bound: the LM head's output over long inputs, the quantized formats'
dequantization scratch, and the page cache behind buffered reads."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import overspill
from conftest import VOCAB


def test_lm_head_runs_over_bounded_chunks(ref_dir, monkeypatch):
    """logits() over 100 tokens runs the head over at most head_tokens tokens at a time (the whole [B, T, V] in the
    head's dtype plus its float32 copy used to be built at once), with the same logits as one call."""
    import overspill.runtime.executor as E
    path, _ = ref_dir("llama_gqa")
    m = overspill.load(path, dtype="float32", max_seq_len=128)
    seen = []
    real = E.head_forward
    monkeypatch.setattr(E, "head_forward", lambda cfg, w, x, *a: seen.append(x.shape[0] * x.shape[1]) or real(cfg, w, x, *a))
    ids = torch.randint(3, VOCAB, (2, 100), generator=torch.Generator().manual_seed(0))
    got = m.logits(ids)
    assert max(seen) <= m.executor.head_reserve.head_tokens and sum(seen) == 200
    lp = m.logprobs(ids)
    want = torch.log_softmax(got[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-5)


def test_eval_and_logits_peak_rss_under_a_budget(tmp_path):
    """A model with a 32768-token vocabulary, all resident under a budget that holds exactly its plan: scoring 512
    tokens (eval's path) grows RSS by at most budget + the documented 48 MiB overhead (the [1, 512, V] float32
    logits alone are 64 MiB; cross-entropy over them needed as much again), and logits() by at most that plus the
    returned tensor."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32768, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    code = textwrap.dedent(f"""
        import json, torch, overspill
        from overspill.evaluate import perplexity
        def hwm():
            for l in open('/proc/self/status'):
                if l.startswith('VmHWM'): return int(l.split()[1]) * 1024
        x = torch.ones(64, 64) @ torch.ones(64, 64)
        probe = overspill.load({str(tmp_path)!r}, dtype='float32', max_memory='cpu=4GiB', max_seq_len=512)
        budget = probe.plan.usage['cpu']['total']
        del probe
        ids = torch.randint(3, 32768, (1, 512), generator=torch.Generator().manual_seed(0))
        base = hwm()
        m = overspill.load({str(tmp_path)!r}, dtype='float32', max_memory={{'cpu': budget}}, max_seq_len=512)
        r = perplexity(m, ids[0].tolist(), context=512, stride=512)
        after_eval = hwm()
        out = m.logits(ids)
        print(json.dumps({{'budget': budget, 'eval': after_eval - base, 'logits': hwm() - base,
                           'out': out.numel() * 4, 'ppl': r['perplexity']}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    overhead = 48 << 20
    assert res["eval"] <= res["budget"] + overhead, res
    assert res["logits"] <= res["budget"] + overhead + res["out"], res


@pytest.mark.parametrize("scheme", ["nf4", "int8-dynamic", "int4"])
def test_dequantization_scratch_is_planned(ref_dir, scheme):
    """A prefill through the formats that dequantize into per-thread scratch leaves at most what the plan's reserve
    counted for it (the buffers are kept for reuse); the reserve adds exactly that to the activations."""
    from overspill.quant import release_scratch, scratch_nbytes
    from overspill.runtime.reserve import Reserve
    path, _ = ref_dir("llama_gqa")
    m = overspill.load(path, dtype="float32", quantize=scheme, max_memory="cpu=1GiB", max_seq_len=64)
    cfg, r = m.config, m.executor.reserve
    planned = r.scratch_bytes(cfg, torch.float32)
    plain = Reserve(r.max_batch, r.max_seq_len)
    assert r.activation_bytes(cfg, torch.float32) == plain.activation_bytes(cfg, torch.float32) + planned
    release_scratch()
    m.logits(torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1)))
    used = scratch_nbytes()
    assert used <= planned
    if scheme == "nf4":      # dequantizes at prefill on every path
        assert used > 0
    release_scratch()


def test_buffered_fallback_after_o_direct_einval_leaves_no_page_cache(tmp_path, monkeypatch):
    """A piece that O_DIRECT refuses (EINVAL) is re-read buffered; those pages are dropped from the page cache like
    any buffered read's, so the cache cannot quietly grow past the budget."""
    from overspill.io import DirectFile, aligned_buffer
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(1 << 20))
    f = DirectFile(str(p), direct=False)
    f.direct = True                                   # as if opened O_DIRECT, whatever this filesystem allows
    real_preadv, dropped = os.preadv, []

    def preadv(fd, bufs, off):
        if fd == f.fd:
            raise OSError(22, "Invalid argument")
        return real_preadv(fd, bufs, off)
    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: dropped.append((off, n, advice)))
    buf = aligned_buffer(1 << 20)
    f.read_into(buf, 0, 1 << 20)
    assert bytes(buf.numpy()) == p.read_bytes()
    covered = sorted((o, o + n) for o, n, a in dropped if a == os.POSIX_FADV_DONTNEED)
    assert covered and covered[0][0] == 0 and covered[-1][1] >= 1 << 20
    f.close()
