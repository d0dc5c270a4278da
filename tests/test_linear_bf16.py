"""bf16 weights on a CPU without native bf16 matmuls: prefill-sized inputs run in fp32 a weight slice at a time."""
import pytest
import torch
import torch.nn.functional as F

import overspill.kernels as K
import overspill.model.linear as L
from overspill.runtime.reserve import Reserve


def test_prefill_through_fp32_slices_matches_fp32_math(monkeypatch):
    monkeypatch.setattr(L, "bf16_native", lambda: False)
    monkeypatch.setattr(K, "F32_SCRATCH_ELEMS", 48 * 96)              # 48 rows per slice: 3 slices of a 100-row weight
    monkeypatch.setattr(K._F32_TLS, "buf", None, raising=False)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 96, generator=g).to(torch.bfloat16)
    b = torch.randn(100, generator=g).to(torch.bfloat16)
    lin = L.DenseLinear(w, b)
    x = torch.randn(2, 20, 96, generator=g).to(torch.bfloat16)       # 40 rows >= F32_MIN_ROWS
    calls = []
    real = F.linear
    monkeypatch.setattr(L.F, "linear", lambda a, ww, bb=None: calls.append(ww.dtype) or real(a, ww, bb))
    y = lin(x)
    assert calls == [torch.float32] * 3 and y.dtype == torch.bfloat16 and y.shape == (2, 20, 100)
    want = (x.float() @ w.float().t() + b.float()).to(torch.bfloat16)
    torch.testing.assert_close(y, want, rtol=1 / 128, atol=1e-2)     # one bf16 rounding of fp32 math
    assert K._F32_TLS.buf.numel() == 48 * 96
    calls.clear()
    lin(x[:, :1])                                                    # decode rows stay on bf16
    assert calls == [torch.bfloat16]


def test_reserve_counts_the_fp32_slice(monkeypatch, ref_dir):
    import overspill
    path, _ = ref_dir("llama_gqa")
    cfg = overspill.load(path, dtype="float32").config
    monkeypatch.setattr(L, "bf16_native", lambda: False)
    r = Reserve(1, 64)
    biggest = max(n * k for n, k in [(cfg.vocab_size, cfg.hidden_size), (2 * cfg.intermediate_size, cfg.hidden_size),
                                     (cfg.hidden_size, cfg.intermediate_size)])
    assert r.scratch_bytes(cfg, torch.bfloat16) == 4 * biggest
    assert r.scratch_bytes(cfg, torch.float32) == 0
    monkeypatch.setattr(L, "bf16_native", lambda: True)
    assert r.scratch_bytes(cfg, torch.bfloat16) == 0
    # training keeps the weights row-major where the CPU multiplies bf16 natively (no slices); without, float32 ones
    assert Reserve(1, 64, training=True).scratch_bytes(cfg, torch.bfloat16) == 0
    monkeypatch.setattr(L, "bf16_native", lambda: False)
    assert Reserve(1, 64, training=True).scratch_bytes(cfg, torch.bfloat16) == 4 * biggest


def test_int8_prefill_without_native_bf16_runs_in_fp32_slices(monkeypatch):
    """The int8 weight-only path dequantizes rows to fp32 slices for prefill-sized batches (a bf16 matmul crawls
    there): the result is fp32 math over the dequantized weight, rounded once."""
    import overspill.quant.int8 as Q
    from overspill import quant
    monkeypatch.setattr(Q, "bf16_native", lambda: False)
    monkeypatch.setattr(Q, "cpu_kernels", lambda: None)
    monkeypatch.setattr(K, "F32_SCRATCH_ELEMS", 48 * 64)
    monkeypatch.setattr(K._F32_TLS, "buf", None, raising=False)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g)
    lin = quant.make_linear("int8", quant.quantize(w, "int8"), None, repack=False)
    x = torch.randn(40, 64, generator=g).to(torch.bfloat16)           # 40 rows > DEQUANT_MIN_M
    calls = []
    real = F.linear
    monkeypatch.setattr(K.F, "linear", lambda a, ww, bb=None: calls.append(ww.dtype) or real(a, ww, bb))
    y = lin(x)
    assert calls == [torch.float32] * 2 and y.dtype == torch.bfloat16
    want = (x.float() @ lin.dequantize().float().t()).to(torch.bfloat16)
    torch.testing.assert_close(y, want, rtol=1 / 128, atol=1e-2)


@pytest.mark.skipif(K.f32_kernels() is None or K.bf16_kernels() is None, reason="needs the AVX2 + FMA kernel module")
def test_training_products_never_copy_a_whole_weight(monkeypatch):
    """A training product through a frozen blocked bf16 or int8 linear, on every x86 build (AVX-512 CPUs run the AVX2
    module's float32 kernels too): the forward is the one without a graph (bitwise), the input gradient is the
    product with the weight (dequantized only in the reference: float32 math for float32 g, within bf16's roundings
    for bf16 g), and no whole unblocked or dequantized copy of the weight is made for either (a 6B head's float32
    copy is 0.8 GB)."""
    from overspill import quant
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 96, generator=g).to(torch.bfloat16)
    lins = {"bf16": L.BlockedLinear(w), "int8": quant.make_linear("int8", quant.quantize(w.float(), "int8"), None),
            "int4": quant.make_linear("int4", quant.quantize(w.float(), "int4", group_size=32), None)}
    want_w = {name: lin.dequantize().float() for name, lin in lins.items()}

    def no_copy(*a, **k):
        raise AssertionError("a whole copy of the weight was made")
    monkeypatch.setattr(L.BlockedLinear, "dequantize", no_copy)
    monkeypatch.setattr(type(lins["int8"]), "dequantize", no_copy)
    monkeypatch.setattr(type(lins["int8"]), "_jit_weight", no_copy)
    monkeypatch.setattr(type(lins["int4"]), "dequantize", no_copy)
    monkeypatch.setattr(type(lins["int4"]), "_jit_weight", no_copy)
    for name, lin in lins.items():
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(40, 96, generator=g).to(dt)
            with torch.no_grad():
                y0 = lin(x)
            xg = x.clone().requires_grad_()
            y = lin(xg)
            assert torch.equal(y, y0), (name, dt)         # a checkpointed recompute repeats the first forward
            gy = torch.randn(y.shape, generator=g).to(dt)
            y.backward(gy)
            want = gy.float() @ want_w[name]
            if dt == torch.float32:
                torch.testing.assert_close(xg.grad, want, rtol=1e-5, atol=1e-4 * want.abs().max().item(),
                                           msg=(name, dt))
            else:
                # bf16 g: a bf16 result, and where the CPU multiplies bf16 natively a quantized weight's slices are
                # its float32 rows rounded to bf16 and each slice's product is too: at most 3 roundings of 2^-9 of
                # sum |g||w| each
                err = (xg.grad.float() - want).abs()
                assert bool((err <= 2 ** -7 * (gy.float().abs() @ want_w[name].abs())).all()), (name, dt)
                assert err.max() <= 2 ** -6 * want.abs().max(), (name, dt)
