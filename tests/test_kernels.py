"""overspill's CPU kernels (overspill/kernels): panel layout, bf16 and int8 skinny matmuls, fallbacks."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from overspill.kernels import blockable, block_weight, cpu_kernels, cpu_supported, unblock_weight
from overspill.model.linear import BlockedLinear, DenseLinear, dense_linear

K_ = cpu_kernels()
needs_kernels = pytest.mark.skipif(K_ is None, reason="CPU kernels unavailable on this machine (no AVX512-BF16)")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_kernels_build_where_the_cpu_supports_them():
    # A machine that can run them must not silently fall back (CI runs on one).
    assert (cpu_kernels() is not None) == cpu_supported()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8, torch.float32])
def test_panel_layout_roundtrip(dtype):
    w = (torch.randn(48, 70) * 50).to(dtype)
    wb = block_weight(w)
    assert wb.shape == (3, 35, 16, 2) and wb.is_contiguous()
    assert wb[1, 5, 3, 1] == w[16 + 3, 11]
    assert torch.equal(unblock_weight(wb), w)
    assert blockable(48, 70) and not blockable(40, 64) and not blockable(48, 63)


@needs_kernels
@pytest.mark.parametrize("M", [1, 2, 5, 6, 7, 13, 40])
@pytest.mark.parametrize("N", [16, 48, 64, 80, 272])
@pytest.mark.parametrize("K", [96, 2, 70])
def test_bf16_mm_vs_reference(M, N, K):
    torch.manual_seed(M * 1000 + N + K)
    x, w, b = torch.randn(M, K).bfloat16(), torch.randn(N, K).bfloat16(), torch.randn(N).bfloat16()
    ref = F.linear(x.float(), w.float(), b.float())
    got = K_.bf16_mm(x, block_weight(w), b)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    # fp32 accumulation, one rounding to bf16 at the end: within half a bf16 ulp of the fp32 result
    assert (got.float() - ref).abs().le(ref.abs() * 2 ** -8 + 1e-3).all()
    nob = K_.bf16_mm(x, block_weight(w), None)
    assert rel(nob, ref - b.float()) < 4e-3


@needs_kernels
@pytest.mark.parametrize("M", [1, 3, 8, 20])
@pytest.mark.parametrize("N", [80, 112])
def test_int8_mm_vs_reference(M, N):
    torch.manual_seed(M)
    K = 128
    x = torch.randn(M, K).bfloat16()
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    s = torch.rand(N) * 0.01
    ref = (x.float() @ q.float().t()) * s
    got = K_.int8_mm(x, block_weight(q), s, None)
    assert (got.float() - ref).abs().le(ref.abs() * 2 ** -8 + 1e-3).all()


@needs_kernels
def test_rows_independent_and_thread_count_independent():
    """Each output is summed in one fixed order: a row's result does not depend on its batch or on threads."""
    torch.manual_seed(0)
    x, w = torch.randn(11, 256).bfloat16(), block_weight(torch.randn(160, 256).bfloat16())
    full = K_.bf16_mm(x, w, None)
    alone = torch.cat([K_.bf16_mm(x[i:i + 1].contiguous(), w, None) for i in range(11)])
    assert torch.equal(full, alone)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = K_.bf16_mm(x, w, None)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(full, one)


@needs_kernels
def test_bad_arguments_raise():
    x, w = torch.randn(2, 64).bfloat16(), block_weight(torch.randn(32, 64).bfloat16())
    with pytest.raises(RuntimeError, match="K=32"):
        K_.bf16_mm(x[:, :32].contiguous(), w, None)
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        K_.bf16_mm(x.float(), w, None)
    with pytest.raises(RuntimeError, match="panel layout"):
        K_.bf16_mm(x, torch.randn(32, 64).bfloat16(), None)


@needs_kernels
def test_dense_linear_picks_the_kernel_for_bf16_and_falls_back_otherwise():
    w = torch.randn(64, 96).bfloat16()
    lin = dense_linear(w, torch.randn(64).bfloat16())
    assert isinstance(lin, BlockedLinear) and lin.nbytes == 64 * 96 * 2 + 64 * 2
    assert torch.equal(lin.dequantize(), w)
    x = torch.randn(2, 3, 96).bfloat16()
    assert lin(x).shape == (2, 3, 64) and rel(lin(x), F.linear(x.float(), w.float(), lin.bias.float())) < 4e-3
    assert lin(x.float()).dtype == torch.float32
    assert not isinstance(dense_linear(torch.randn(60, 96).bfloat16()), BlockedLinear)   # N % 16
    assert isinstance(dense_linear(torch.randn(64, 96)), DenseLinear)                     # fp32: exact path


def test_disabled_by_environment():
    code = "from overspill.kernels import cpu_kernels; import sys; sys.exit(0 if cpu_kernels() is None else 1)"
    env = dict(os.environ, OVERSPILL_KERNELS="0")
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


@needs_kernels
@pytest.mark.parametrize("M", [1, 2, 3, 9, 17, 40])
@pytest.mark.parametrize("N,K,gs", [(80, 256, 64), (32, 96, 32), (112, 256, 128), (48, 256, 256)])
def test_int4_linear_kernel_vs_its_dequantized_weight(M, N, K, gs):
    """int4 through the kernels (M <= 16: int4_mm; larger: bf16 panel dequant + bf16_mm) against the float
    weight the stored tensors describe; and the panel conversion keeps the weight exactly."""
    import overspill.quant as Q
    from overspill.quant import int4 as int4_mod

    torch.manual_seed(M)
    w = torch.randn(N, K) * 0.02
    t = Q.quantize(w, "int4", group_size=gs)
    lin = Q.make_linear("int4", t, bias=torch.randn(N).bfloat16())
    assert lin._k is not None and lin.qweight is None          # only the panel copy is held
    d = Q.dequantize("int4", t)
    assert torch.equal(lin.dequantize(), d)                      # conversion to panels is exact
    q = int4_mod.from_panels(lin.qpanels)                        # bytes unpack to the bf16 panel order
    Np = -(-N // 16) * 16
    assert torch.equal(unblock_weight(q), int4_mod._unpack_kn(t["qweight"], Np, K, int(t["meta"][3])).t()[:N])
    x = torch.randn(M, K).bfloat16()
    ref = F.linear(x.float(), d, lin.bias.float())
    assert rel(lin(x), ref) < 4e-3


@needs_kernels
@pytest.mark.parametrize("nh,nkv,hs", [(4, 4, 64), (8, 2, 80), (6, 1, 32)])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_attention_kernel_vs_float_reference(nh, nkv, hs, padded):
    """One-token attention over a strided slice of a bf16 cache, GQA, head sizes with a masked tail, padding."""
    torch.manual_seed(nh + hs)
    B, S, cap = 3, 37, 50
    q = torch.randn(B, nh, 1, hs).bfloat16()
    kc, vc = torch.randn(B, nkv, cap, hs).bfloat16(), torch.randn(B, nkv, cap, hs).bfloat16()
    k, v = kc[:, :, :S], vc[:, :, :S]                       # strided, as the executor passes them
    valid = torch.ones(B, S, dtype=torch.bool)
    if padded:
        valid[1, :5] = False
        valid[2, :20] = False
    scale = hs ** -0.5
    got = K_.decode_attn(q, k, v, valid if padded else None, scale)
    g = nh // nkv
    kf, vf = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    ref = s.softmax(-1) @ vf
    assert got.shape == (B, nh, 1, hs) and got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max().item() < 2e-2      # bf16 rounding of the output only
    from overspill.model.layers import decode_attention
    assert torch.equal(decode_attention(q, k, v, valid[:, None, None, :] if padded else None, scale), got)


@needs_kernels
@pytest.mark.parametrize("hs,S", [(40, 1), (72, 9), (64, 1)])
def test_decode_attention_kernel_matches_torch_fallback(monkeypatch, hs, S):
    """The kernel path and the torch path of layers.decode_attention agree (tails under 16, a single key)."""
    import overspill.model.layers as L
    torch.manual_seed(hs + S)
    q = torch.randn(2, 4, 1, hs).bfloat16()
    k, v = torch.randn(2, 2, S + 3, hs).bfloat16()[:, :, :S], torch.randn(2, 2, S + 3, hs).bfloat16()[:, :, :S]
    got = L.decode_attention(q, k, v, None, hs ** -0.5)
    monkeypatch.setattr(L, "cpu_kernels", lambda: None)
    want = L.decode_attention(q, k, v, None, hs ** -0.5)
    assert (got.float() - want.float()).abs().max().item() < 2e-2


@needs_kernels
def test_kernel_paths_keep_autograd():
    """Training through bf16 weights (LoRA on a frozen base) needs gradients to x: the kernels have no backward,
    so inputs that require grad take the dense path."""
    torch.manual_seed(0)
    w = torch.randn(32, 64).bfloat16()
    lin = dense_linear(w)
    x = torch.randn(3, 64).bfloat16().requires_grad_()
    y = lin(x)
    assert y.requires_grad
    y.float().sum().backward()
    assert torch.allclose(x.grad.float(), w.float().sum(0).expand(3, 64), atol=0.05)
    from overspill.model.layers import decode_attention
    q = torch.randn(1, 2, 1, 32).bfloat16().requires_grad_()
    kv = torch.randn(1, 2, 5, 32).bfloat16()
    assert decode_attention(q, kv, kv, None, 0.2).requires_grad


@needs_kernels
def test_empty_batch_and_bad_group_size():
    w = block_weight(torch.randn(32, 64).bfloat16())
    assert K_.bf16_mm(torch.empty(0, 64, dtype=torch.bfloat16), w, None).shape == (0, 32)
    qp = torch.zeros(2, 16, 32, dtype=torch.uint8)
    sz = torch.zeros(2, 1, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="group_size"):
        K_.int4_mm(torch.zeros(1, 64, dtype=torch.bfloat16), qp, sz, 0, None)


@needs_kernels
@pytest.mark.parametrize("rot_dims", [64, 16])
def test_fused_rope_equals_apply_rope(rot_dims):
    from overspill.model.layers import apply_rope
    torch.manual_seed(rot_dims)
    B, T, H, hs, n_rot = 2, 3, 6, 64, 4
    x = torch.randn(B, T, H, hs).bfloat16()
    ang = torch.randn(B, T, 1, rot_dims // 2)
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    want = x.clone()
    want[:, :, :n_rot] = apply_rope(x[:, :, :n_rot], cos, sin)
    got = x.clone()
    K_.rope_(got, cos, sin, n_rot)
    assert torch.equal(got, want)                  # same rounding steps as the torch expression


@needs_kernels
def test_fused_rms_norm_matches_torch_expression():
    torch.manual_seed(0)
    x, w, eps = (torch.randn(5, 7, 96) * 3).bfloat16(), torch.randn(96).bfloat16(), 1e-5
    xf = x.float()
    want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(torch.bfloat16)
    got = K_.rms_norm(x, w, eps)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    diff = (got.float() - want.float()).abs()
    assert (diff <= want.float().abs() * 2 ** -7).all()     # at most one bf16 ulp (fp32 sum order may differ)
    assert (diff == 0).float().mean().item() > 0.95


@needs_kernels
def test_dequantize_to_panels_matches_torch_expressions():
    """Prefill-sized batches dequantize int8/int4 panels in C++; same bf16 values as the torch expressions."""
    import overspill.quant as Q
    from overspill.quant import int4 as int4_mod

    torch.manual_seed(1)
    w = torch.randn(48, 128) * 0.02
    l8 = Q.make_linear("int8", Q.quantize(w, "int8"))
    out = torch.empty(l8._qblocked.shape, dtype=torch.bfloat16)
    K_.int8_dequant_(out, l8._qblocked, l8.scales_f32)
    want = l8._qblocked.to(torch.bfloat16).mul_(l8.scales_bf16.view(3, 1, 16, 1))
    assert torch.equal(out, want)
    l4 = Q.make_linear("int4", Q.quantize(w, "int4", group_size=32))
    got = l4._dequant_panels()
    q = int4_mod.from_panels(l4.qpanels).to(torch.bfloat16).sub_(8).view(3, 4, 16, 16, 2)
    want4 = torch.addcmul(l4.szpanels[:, :, 1][:, :, None, :, None], q, l4.szpanels[:, :, 0][:, :, None, :, None])
    assert torch.equal(got.view(3, 4, 16, 16, 2), want4)
