"""overspill's CPU kernels (overspill/kernels): panel layout, bf16 and int8 skinny matmuls, fallbacks."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from overspill.kernels import (_thp_madvise, avx2_kernels, bf16_kernels, bf16_native, blockable, block_weight,
                               cpu_kernels, cpu_supported, panel_empty, transient, unblock_weight)
from overspill.model.linear import BlockedLinear, DenseLinear, dense_linear

K_ = cpu_kernels()
needs_kernels = pytest.mark.skipif(K_ is None, reason="CPU kernels unavailable on this machine (no AVX512-BF16)")
# every bf16_mm build this CPU runs: the AVX-512 kernels and the AVX2 + FMA one (cpu_avx2.cpp)
BF16_MODS = [pytest.param(k, id=name) for name, k in (("avx512", K_), ("avx2", avx2_kernels())) if k is not None] \
    or [pytest.param(None, marks=pytest.mark.skip(reason="no bf16 kernel builds on this CPU"), id="none")]
A2 = avx2_kernels()
needs_avx2 = pytest.mark.skipif(A2 is None, reason="no AVX2 + FMA build on this CPU")
def _one_thread(fn):
    """fn() with torch's thread count at 1 (kernels must give the same bits whatever the thread count)."""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn()
    finally:
        torch.set_num_threads(n)


needs_f32_kernel = pytest.mark.skipif(A2 is None or bf16_kernels() is not A2 or bf16_native(),
                                      reason="float32 activations take the AVX2 kernel where bf16 is not native")


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


@pytest.mark.parametrize("mod", BF16_MODS)
@pytest.mark.parametrize("M", [1, 2, 5, 6, 7, 13, 40])
@pytest.mark.parametrize("N", [16, 48, 64, 80, 272])
@pytest.mark.parametrize("K", [96, 2, 70])
def test_bf16_mm_vs_reference(mod, M, N, K):
    torch.manual_seed(M * 1000 + N + K)
    x, w, b = torch.randn(M, K).bfloat16(), torch.randn(N, K).bfloat16(), torch.randn(N).bfloat16()
    ref = F.linear(x.float(), w.float(), b.float())
    got = mod.bf16_mm(x, block_weight(w), b)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    # fp32 accumulation, one rounding to bf16 at the end: within half a bf16 ulp of the fp32 result
    assert (got.float() - ref).abs().le(ref.abs() * 2 ** -8 + 1e-3).all()
    nob = mod.bf16_mm(x, block_weight(w), None)
    assert rel(nob, ref - b.float()) < 4e-3
    x3 = x.view(M, 1, K)                                   # any leading shape
    assert torch.equal(mod.bf16_mm(x3, block_weight(w), b).view(M, N), got)


@pytest.mark.parametrize("mod", BF16_MODS)
def test_bf16_mm_rows_and_threads_independent_and_nan_kept(mod):
    """A row's result does not depend on the rows beside it or on the thread count (one fixed summation order per
    output), and a NaN input stays NaN after the rounding to bf16."""
    torch.manual_seed(1)
    x, w = torch.randn(11, 256).bfloat16(), block_weight(torch.randn(160, 256).bfloat16())
    full = mod.bf16_mm(x, w, None)
    assert torch.equal(full, torch.cat([mod.bf16_mm(x[i:i + 1].contiguous(), w, None) for i in range(11)]))
    assert torch.equal(full, _one_thread(lambda: mod.bf16_mm(x, w, None)))
    x[3, 7] = float("nan")
    y = mod.bf16_mm(x, w, None)
    assert y[3].isnan().all() and not y[[0, 1, 2, 4]].isnan().any()
    with pytest.raises(RuntimeError, match="K=32"):
        mod.bf16_mm(x[:, :32].contiguous(), w, None)
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        mod.bf16_mm(x.to(torch.float16), w, None)
    if not getattr(mod, "F32_ACTIVATIONS", False):
        with pytest.raises(RuntimeError, match="contiguous bf16"):
            mod.bf16_mm(x.float(), w, None)
    with pytest.raises(RuntimeError, match="panel layout"):
        mod.bf16_mm(x, torch.randn(32, 256).bfloat16(), None)


@pytest.mark.skipif(bf16_kernels() is None, reason="no bf16 kernel builds on this CPU")
def test_panels_to_f32_rows_equal_the_weight():
    """panels_to_f32_ (stripes.h, both builds) widens a range of panel rows to float32 row-major: bf16 panels give
    the weight's rows exactly, int8 panels q * scale with one rounding (as q.float() * s); bad sizes fail in one line."""
    from overspill.kernels import pack_int8
    torch.manual_seed(4)
    for mod in [k for k in (K_, A2) if k is not None]:
        w = torch.randn(96, 200).bfloat16()
        dst = torch.empty(48, 200)
        mod.panels_to_f32_(block_weight(w)[1:4], dst, 0, None)
        assert torch.equal(dst, w[16:64].float())
        q, s = torch.randint(-127, 128, (64, 128), dtype=torch.int8), torch.rand(64) * 0.01
        dq = torch.empty(32, 128)
        mod.panels_to_f32_(pack_int8(q)[2:4], dq, 1, s[32:64])
        assert torch.equal(dq, q[32:64].float() * s[32:64, None])
        with pytest.raises(RuntimeError, match="panels hold 9600 weights, dst wants 6400"):
            mod.panels_to_f32_(block_weight(w)[1:4], torch.empty(32, 200), 0, None)
        with pytest.raises(RuntimeError, match="need 32 scales"):
            mod.panels_to_f32_(pack_int8(q)[2:4], dq, 1, None)


@pytest.mark.skipif(bf16_kernels() is None, reason="no bf16 kernel builds on this CPU")
def test_blocked_linear_on_this_cpu_blocks_in_place_and_trains_in_float32():
    """BlockedLinear over this CPU's bf16 kernel: blocking in place (with or without the AVX-512 stripe kernel)
    equals the copying block; rows read back from the panels are the weight's; float32 activations and their gradient
    go through float32 slices of the panels (as DenseLinear's do where bf16 is not native)."""
    torch.manual_seed(2)
    w, b = torch.randn(64, 96).bfloat16(), torch.randn(64).bfloat16()
    lin = BlockedLinear(w, b)
    inplace = BlockedLinear.from_blocked_(w.clone(), b)
    assert torch.equal(inplace.blocked, lin.blocked) and torch.equal(lin.dequantize(), w)
    rows = torch.empty(32, 96)
    lin.fill_rows(rows, 16, 48)
    assert torch.equal(rows, w[16:48].float())
    x = torch.randn(3, 96, requires_grad=True)
    lin(x).pow(2).sum().backward()
    xd = x.detach().clone().requires_grad_(True)
    F.linear(xd, w.float(), b.float()).pow(2).sum().backward()
    assert torch.allclose(x.grad, xd.grad, rtol=1e-4, atol=1e-4)
    from overspill.kernels import bf16_native
    if not bf16_native():        # where bf16 is not native, float32 activations are not rounded to bf16
        with torch.no_grad():
            assert torch.allclose(lin(x), F.linear(x, w.float(), b.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(bf16_kernels() is None, reason="no bf16 kernel builds on this CPU")
def test_a_streamed_weight_under_a_graph_keeps_its_layout_until_the_backward():
    """BlockedOnDemand (a streamed unit's bf16 weight, laid out for the kernel in place on first need) lays the weight
    out before a product with a graph, however few its rows: a later prefill-sized product must not re-lay out the
    bytes the graph's backward reads."""
    from overspill.model.linear import BlockedOnDemand
    torch.manual_seed(8)
    w = torch.randn(64, 96).bfloat16()
    lin = BlockedOnDemand(w.clone())
    x = torch.randn(2, 96, requires_grad=True)
    y = lin(x)
    with torch.no_grad():
        lin(torch.randn(40, 96))
    g = torch.randn(2, 64)
    y.backward(g)
    assert torch.allclose(x.grad, g @ w.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(bf16_kernels() is None, reason="no bf16 kernel builds on this CPU")
def test_float32_slices_of_panels_are_whole_panels(monkeypatch):
    """Float32 slices of a weight held in panels hold whole panels of 16 rows whatever K makes of the slice buffer
    (F32_SCRATCH_ELEMS // K rows: 1489 for K = 5632, TinyLlama's MLP): bf16 panels' products and input gradients, and
    int8 panels' float32 products, equal the float32 math."""
    import overspill.kernels as kern
    import overspill.quant as Q
    monkeypatch.setattr(kern, "F32_SCRATCH_ELEMS", 96 * 20)          # 20 rows a slice: not a multiple of 16
    torch.manual_seed(6)
    w = torch.randn(64, 96).bfloat16()
    lin = BlockedLinear(w)
    g = torch.randn(3, 64)
    assert torch.allclose(kern.f32_sliced_grad_input(g, 64, 96, lin.fill_rows), g @ w.float(), rtol=1e-5, atol=1e-5)
    x = torch.randn(40, 96)
    assert torch.allclose(kern.f32_sliced_linear(x, 64, 96, lin.fill_rows, None), x @ w.float().T, rtol=1e-5,
                          atol=1e-5)
    t = Q.quantize(torch.randn(64, 96) * 0.05, "int8")
    i8 = Q.make_linear("int8", t, None, act_quant="never")
    d = Q.dequantize("int8", t)
    assert torch.allclose(i8(x), x @ d.T, rtol=1e-5, atol=1e-5)


@needs_f32_kernel
@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("N,K", [(16, 2), (48, 70), (160, 256)])
def test_avx2_bf16_mm_t_is_the_input_gradient(M, N, K):
    """bf16_mm_t: g @ W over the panels as they are (training's input gradient), within float32 accumulation of the
    float64 product; a row alone, or another thread count, gives the same bits; BlockedLinear's backward runs it up
    to GRAD_KERNEL_MAX_ROWS rows and float32 slices above, with the same gradient; bad shapes fail in one line."""
    from overspill.kernels import GRAD_KERNEL_MAX_ROWS
    torch.manual_seed(M + N + K)
    w, g = torch.randn(N, K).bfloat16(), torch.randn(M, N)
    ref = g.double() @ w.double()
    got = A2.bf16_mm_t(g, block_weight(w))
    assert got.dtype == torch.float32 and got.shape == (M, K)
    assert ((got.double() - ref).abs() <= 1e-5 * ref.abs().max()).all()
    assert torch.equal(got[-1:], A2.bf16_mm_t(g[-1:].contiguous(), block_weight(w)))
    assert torch.equal(got, _one_thread(lambda: A2.bf16_mm_t(g, block_weight(w))))
    assert A2.bf16_mm_t(g[:, None], block_weight(w)).shape == (M, 1, K)
    assert torch.equal(A2.bf16_mm_t(torch.randn(M, 0), torch.zeros(0, K // 2, 16, 2).bfloat16()), torch.zeros(M, K))
    with pytest.raises(RuntimeError, match=f"g has N={N + 16} but the weight has {N} output features"):
        A2.bf16_mm_t(torch.randn(M, N + 16), block_weight(w))
    lin = BlockedLinear(w)
    for rows in (M, GRAD_KERNEL_MAX_ROWS + 3):
        x = torch.randn(rows, K, requires_grad=True)
        gy = torch.randn(rows, N)
        lin(x).backward(gy)
        assert torch.allclose(x.grad, gy @ w.float(), rtol=1e-5, atol=1e-5)


@needs_f32_kernel
@pytest.mark.parametrize("M", [1, 5, 33])     # row tails of 1, 2 and 0 after groups of 3
@pytest.mark.parametrize("N,K", [(16, 4), (48, 68), (160, 256)])
def test_avx2_int8_mm_t_is_the_input_gradient(M, N, K):
    """int8_mm_t: g @ (Q * s) over the int8 panels as they are (training's input gradient through an int8 base),
    within float32 accumulation of the float64 product of the dequantized weight; a row alone, or one thread, gives
    the same bits; Int8Linear's backward runs it up to GRAD_KERNEL_MAX_ROWS rows and float32 slices above, with the
    same gradient; bad shapes fail in one line."""
    from overspill.kernels import GRAD_KERNEL_MAX_ROWS
    from overspill.quant.int8 import Int8Linear, quantize
    torch.manual_seed(M + N + K)
    lin, g = Int8Linear(quantize(torch.randn(N, K)), act_quant="never"), torch.randn(M, N)
    qp, s, w = lin._qpanels, lin.scales_f32, lin.dequantize()
    ref = g.double() @ w.double()
    got = A2.int8_mm_t(g, qp, s)
    assert got.dtype == torch.float32 and got.shape == (M, K)
    assert ((got.double() - ref).abs() <= 1e-5 * ref.abs().max()).all()
    assert torch.equal(got[-1:], A2.int8_mm_t(g[-1:].contiguous(), qp, s))
    assert torch.equal(got, _one_thread(lambda: A2.int8_mm_t(g, qp, s)))
    assert A2.int8_mm_t(g[:, None], qp, s).shape == (M, 1, K)
    assert torch.equal(A2.int8_mm_t(torch.randn(M, 0), torch.zeros(0, K // 4, 64, dtype=torch.uint8), s[:0]),
                       torch.zeros(M, K))
    with pytest.raises(RuntimeError, match=f"g has N={N + 16} but the weight has {N} output features"):
        A2.int8_mm_t(torch.randn(M, N + 16), qp, s)
    with pytest.raises(RuntimeError, match=f"scales must have {N} elements"):
        A2.int8_mm_t(g, qp, s[:-1])
    for rows in (M, GRAD_KERNEL_MAX_ROWS + 3):
        x = torch.randn(rows, K, requires_grad=True)
        gy = torch.randn(rows, N)
        lin(x).backward(gy)
        assert torch.allclose(x.grad, gy @ w, rtol=1e-5, atol=1e-5)


@needs_f32_kernel
@pytest.mark.parametrize("M", [1, 3, 32, 37])
def test_avx2_bf16_mm_takes_float32_activations(M):
    """Training's float32 activations go into the AVX2 bf16 kernel as they are: a float32 result within float32
    accumulation of the float64 product (never rounded to bf16 on the way in or out), row-independent; BlockedLinear
    runs its float32 forward there, with and without a graph, and its input gradient over the panels' float32 rows."""
    torch.manual_seed(M)
    w, b = torch.randn(80, 192).bfloat16(), torch.randn(80)
    x = torch.randn(M, 192)
    ref = x.double() @ w.double().T + b.double()
    got = A2.bf16_mm(x, block_weight(w), b)
    assert got.dtype == torch.float32 and got.shape == (M, 80)
    assert ((got.double() - ref).abs() <= 1e-5 * ref.abs().max()).all()
    assert torch.equal(got[-1:], A2.bf16_mm(x[-1:].contiguous(), block_weight(w), b))
    lin = BlockedLinear(w, b.bfloat16())
    calls = []
    real = lin._k
    lin._k = type("Spy", (), {"F32_ACTIVATIONS": True, "panels_to_f32_": real.panels_to_f32_,
                              "bf16_mm": lambda self, *a: calls.append(a[0].dtype) or real.bf16_mm(*a)})()
    xg = x.clone().requires_grad_(True)
    y = lin(xg)
    with torch.no_grad():
        y0 = lin(x)
    assert calls == [torch.float32, torch.float32] and torch.equal(y, y0)
    g = torch.randn(M, 80)
    y.backward(g)
    assert torch.allclose(xg.grad, g @ w.float(), rtol=1e-5, atol=1e-5)


def assert_within_bf16_rounding(got, ref):
    """got (bf16) is ref (float64) rounded once: within half a bf16 ulp, plus fp32 accumulation slack."""
    assert ((got.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-4 * ref.abs().max()).all()


def quant_ref(x, xq, d, block):
    """The kernels' activation quantization, checked against its definition; returns the dequantized x (float64)."""
    M, K = x.shape
    xb = x.double().view(M, K // block, block)
    amax = xb.abs().amax(-1)
    assert torch.equal(d, (amax.float() / 127))
    # round-half-even of x * 127 / amax: within half a step (ties may round either way under fp32 rounding)
    assert ((xq.double().view(M, K // block, block) - xb * (127 / amax.clamp(min=1e-30))[..., None]).abs() <= 0.5 + 1e-4).all()
    return (xq.double().view(M, K // block, block) * d.double()[..., None]).view(M, K)


@needs_kernels
@pytest.mark.parametrize("M", [1, 3, 4, 8, 20])
@pytest.mark.parametrize("N,K,block", [(80, 128, 64), (112, 512, 32), (16, 64, 64), (272, 1024, 128)])
def test_int8_vnni_mm_vs_reference(M, N, K, block):
    """w8a8: exact integer dot products of the quantized activations, fp32 scaling, one rounding to bf16."""
    from overspill.kernels import pack_int8, unpack_int8
    torch.manual_seed(M * 7 + N)
    x = torch.randn(M, K).bfloat16()
    x[0, :block] = 0                                   # an all-zero block: scale 0, no NaN
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    s, b = torch.rand(N) * 0.01, torch.randn(N).bfloat16()
    qp = pack_int8(q)
    assert qp.shape == (N // 16, K // 4, 64) and torch.equal(unpack_int8(qp), q)
    assert int(qp[0, 1, 4 * 3 + 2]) == int(q[3, 6]) + 128
    xq, d = K_.quantize_activations(x, block)
    ref = (quant_ref(x, xq, d, block) @ q.double().t()) * s.double() + b.double()
    got = K_.int8_vnni_mm(x, qp, s, b, block)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    assert_within_bf16_rounding(got, ref)
    x3 = x.view(M, 1, K)                               # any leading shape, output shaped like x
    assert torch.equal(K_.int8_vnni_mm(x3, qp, s, b, block).view(M, N), got)


@needs_kernels
@pytest.mark.parametrize("M", [1, 2, 3, 9, 17])
@pytest.mark.parametrize("N,K,gs", [(80, 256, 64), (32, 96, 32), (112, 256, 128), (48, 256, 256)])
def test_int4_vnni_mm_vs_reference(M, N, K, gs):
    """w4a8: sum_g s*d*(sum q xq - 8 sum xq) + z * sum x, against float64."""
    from overspill.kernels import pack_int4, unpack_int4
    torch.manual_seed(M * 5 + N)
    x = torch.randn(M, K).bfloat16()
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    sz = (torch.rand(N // 16, K // gs, 2, 16) * 0.02 - 0.005).bfloat16()
    b = torch.randn(N).bfloat16()
    qp = pack_int4(q)
    assert qp.shape == (N // 16, K // 8, 64) and torch.equal(unpack_int4(qp), q)
    s_nk = sz[:, :, 0].double().permute(0, 2, 1).reshape(N, K // gs, 1).expand(N, K // gs, gs).reshape(N, K)
    z_nk = sz[:, :, 1].double().permute(0, 2, 1).reshape(N, K // gs, 1).expand(N, K // gs, gs).reshape(N, K)
    xq, d = K_.quantize_activations(x, gs)
    ref = quant_ref(x, xq, d, gs) @ ((q.double() - 8) * s_nk).t() + x.double() @ z_nk.t() + b.double()
    got = K_.int4_vnni_mm(x, qp, sz, gs, b)
    assert_within_bf16_rounding(got, ref)


@needs_kernels
def test_rows_independent_and_thread_count_independent():
    """Each output is summed in one fixed order: a row's result does not depend on its batch or on threads."""
    torch.manual_seed(0)
    from overspill.kernels import pack_int4, pack_int8
    x, w = torch.randn(11, 256).bfloat16(), block_weight(torch.randn(160, 256).bfloat16())
    q8, s = pack_int8(torch.randint(-127, 128, (160, 256), dtype=torch.int8)), torch.rand(160)
    q4, sz = pack_int4(torch.randint(0, 16, (160, 256), dtype=torch.uint8)), torch.rand(10, 4, 2, 16).bfloat16()
    for f in (lambda x: K_.bf16_mm(x, w, None), lambda x: K_.int8_vnni_mm(x, q8, s, None, 64),
              lambda x: K_.int4_vnni_mm(x, q4, sz, 64, None)):
        full = f(x)
        alone = torch.cat([f(x[i:i + 1].contiguous()) for i in range(11)])
        assert torch.equal(full, alone)
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = f(x)
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
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("M", [1, 9, 40])
def test_quantized_linears_run_the_integer_kernels(scheme, M):
    """int8/int4 linears hold only the kernel panels (converted exactly) and run w8a8/w4a8 at every batch size:
    within the activation rounding of the float result; act_quant="never" keeps exact activations."""
    import overspill.quant as Q
    torch.manual_seed(M)
    N, K = 80, 256
    w = torch.randn(N, K) * 0.02
    t = Q.quantize(w, scheme)
    lin = Q.make_linear(scheme, t, bias=torch.randn(N).bfloat16())
    assert lin._k is not None and lin._fast_ok
    assert (lin._qplain is None) if scheme == "int8" else (lin.qweight is None)   # only the panel copy is held
    d = Q.dequantize(scheme, t)
    assert torch.equal(lin.dequantize(), d)
    x = torch.randn(2, M, K).bfloat16()
    ref = F.linear(x.float(), d, lin.bias.float())
    got = lin(x)
    assert got.shape == (2, M, N) and 1e-4 < rel(got, ref) < 1.5e-2     # int8 activations: ~0.5% relative
    never = Q.make_linear(scheme, t, bias=lin.bias, act_quant="never")
    assert never._k is None and rel(never(x), ref) < 4e-3
    assert rel(lin(x.float()), ref) < 1.5e-2 and lin(x.float()).dtype == torch.float32


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
    qp = torch.zeros(2, 8, 64, dtype=torch.uint8)
    sz = torch.zeros(2, 1, 2, 16, dtype=torch.bfloat16)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    assert K_.int4_vnni_mm(x[:0], qp, sz, 64, None).shape == (0, 32)
    with pytest.raises(RuntimeError, match="activation block"):
        K_.int4_vnni_mm(x, qp, sz, 0, None)
    with pytest.raises(RuntimeError, match="activation block"):
        K_.int8_vnni_mm(x, torch.zeros(2, 16, 64, dtype=torch.uint8), torch.ones(32), None, 24)
    with pytest.raises(RuntimeError, match="K=64"):
        K_.int8_vnni_mm(x, torch.zeros(2, 8, 64, dtype=torch.uint8), torch.ones(32), None, 32)


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


@pytest.mark.parametrize("chunk", [1 << 22, 1])
@pytest.mark.parametrize("N", [80, 128, 16])
def test_inplace_panel_conversion_equals_the_copying_one(monkeypatch, chunk, N):
    """Streamed units convert the staging buffer's own bytes (int8, int4pack + its 16-row tails) into the panels;
    the result must equal the copying conversion, also when done a chunk at a time."""
    import overspill.kernels as KM
    import overspill.quant as Q
    from overspill.quant import int4 as int4_mod
    monkeypatch.setattr(KM, "INPLACE_CHUNK", chunk)
    monkeypatch.setattr(int4_mod, "INPLACE_CHUNK", chunk)
    K = 256
    w = torch.randn(N, K) * 0.02
    t8 = Q.quantize(w, "int8")
    want8 = KM.pack_int8(t8["qweight"])
    buf = t8["qweight"].clone()
    got8 = KM.pack_int8_(buf)
    assert torch.equal(got8, want8) and got8.data_ptr() == buf.data_ptr()
    t4 = Q.quantize(w, "int4", group_size=64)
    lay = int(t4["meta"][3])
    q = int4_mod._unpack_kn(t4["qweight"], N, K, lay).t()
    want_q, want_sz = int4_mod.to_panels(q, t4["scales_zeros"], N, 64)
    qw, sz = t4["qweight"].clone(), t4["scales_zeros"].clone()
    got_q, got_sz = int4_mod.to_panels_(qw, sz, N, K, 64, lay)
    assert torch.equal(got_q, want_q) and torch.equal(got_sz, want_sz)
    assert got_q.data_ptr() == qw.data_ptr() and got_sz.data_ptr() == sz.data_ptr()


def _int4pack(q: torch.Tensor, layout: int) -> torch.Tensor:
    """torch's int4pack bytes of q [N, K] (0..15) in `layout` (64/32: split blocks, 0: row pairs; tails: row pairs)."""
    N, K = q.shape
    BN = layout or 32
    full = N // BN * BN
    b = q[:full].view(N // BN, BN, K)
    if layout:
        pk = b[:, :BN // 2] | (b[:, BN // 2:] << 4)                     # [nbf, BN/2, K]
    else:
        pk = b[:, 0::2] | (b[:, 1::2] << 4)
    tail = q[full:]
    parts = [pk.permute(0, 2, 1).reshape(-1), (tail[0::2] | (tail[1::2] << 4)).t().reshape(-1)]
    return torch.cat(parts).to(torch.uint8)


@needs_kernels
@pytest.mark.parametrize("layout", [64, 32, 0])
@pytest.mark.parametrize("N", [64, 80, 112, 16])
def test_int4pack_to_panels_kernel_every_layout(layout, N):
    """The C++ in-place int4pack -> panel conversion, for every int4pack layout torch builds on some CPU (blocks of
    64 or 32 rows split in halves, or row pairs) and their 16/32/48-row tails, equals pack_int4 of the values."""
    from overspill.quant import int4 as int4_mod
    K = 96
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=torch.Generator().manual_seed(N + layout))
    pk = _int4pack(q, layout)
    assert torch.equal(int4_mod._unpack_kn(pk, N, K, layout).t(), q)     # the helper builds what torch builds
    import overspill.kernels as KM
    buf = pk.clone()
    K_.int4pack_to_panels_(buf, N, K, layout)
    assert torch.equal(buf.view(N // 16, K // 8, 64), KM.pack_int4(q))
    with pytest.raises(RuntimeError, match="int4pack_to_panels_"):
        K_.int4pack_to_panels_(buf[1:], N, K, layout)


@needs_kernels
@pytest.mark.parametrize("nh,nkv,hs,rot", [(4, 2, 64, 64), (4, 4, 80, 16), (2, 1, 32, 0)])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_decode_step_equals_the_unfused_ops(monkeypatch, nh, nkv, hs, rot, padded):
    """decode_step (rotary + cache write + attention in one call) gives the same output and cache, bit for bit."""
    import overspill.model.layers as L
    from types import SimpleNamespace
    torch.manual_seed(nh * hs + rot)
    B, start, cap = 3, 9, 16
    cfg = SimpleNamespace(n_heads=nh, n_kv_heads=nkv, head_dim=hs, scale=hs ** -0.5)
    qkv_w = torch.randn((nh + 2 * nkv) * hs, 24).bfloat16()
    w = SimpleNamespace(qkv=lambda x: F.linear(x, qkv_w), out=lambda o: o)
    x = torch.randn(B, 1, 24).bfloat16()
    pos = torch.full((B, 1), start)
    cos = sin = None
    if rot:
        ang = torch.randn(B, 1, 1, rot // 2)
        cos, sin = torch.cat([ang, ang], -1).cos().bfloat16(), torch.cat([ang, ang], -1).sin().bfloat16()
    mask = None
    if padded:
        mask = torch.ones(B, 1, 1, start + 1, dtype=torch.bool)
        mask[1, ..., :4] = False
    step = L.Step(pos, start, cos, sin, mask)
    kc, vc = torch.randn(B, nkv, cap, hs).bfloat16(), torch.randn(B, nkv, cap, hs).bfloat16()
    k2, v2 = kc.clone(), vc.clone()
    calls = []
    kern = L.cpu_kernels()

    class Spy:   # the fused call must actually be taken
        def __getattr__(self, name):
            if name == "decode_step":
                calls.append(name)
            return getattr(kern, name)
    monkeypatch.setattr(L, "cpu_kernels", lambda: Spy())
    got = L.attention(cfg, w, x, step, kc, vc)
    assert calls == ["decode_step"]
    step.fused = False
    want = L.attention(cfg, w, x, step, k2, v2)
    assert got.shape == (B, 1, nh * hs)
    assert torch.equal(got, want) and torch.equal(kc, k2) and torch.equal(vc, v2)


@needs_kernels
def test_fused_silu_mul_matches_torch_expression():
    torch.manual_seed(0)
    h = (torch.randn(3, 2, 2 * 200) * 4).bfloat16()
    g, u = h.chunk(2, -1)
    want = F.silu(g) * u
    got = K_.silu_mul(h)
    assert got.shape == want.shape
    diff = (got.float() - want.float()).abs()
    assert (diff <= want.float().abs() * 2 ** -7 + 1e-30).all()    # at most one bf16 ulp (exp approximations differ)
    assert (diff == 0).float().mean().item() > 0.97


@needs_kernels
@pytest.mark.parametrize("scheme", ["int8-dynamic", "nf4"])
@pytest.mark.parametrize("M", [1, 2, 5, 16])
def test_codebook_lut_kernel_vs_reference(scheme, M):
    """lut_mm decodes codes through the bf16 table in registers: sum_blocks absmax * sum code_bf16[q] x, vs float64."""
    import overspill.quant as Q
    from overspill.quant import codebook as cb
    torch.manual_seed(M)
    N, K, bs = 48, 192, 64
    t = Q.quantize(torch.randn(N, K), scheme, blocksize=bs)
    lin = Q.make_linear(scheme, t, bias=torch.randn(N).bfloat16())
    assert lin._k is not None
    codes = t["qweight"].view(N, K) if scheme == "int8-dynamic" else cb._unpack4(t["qweight"], N, K)
    w = cb._code(scheme).bfloat16().double()[codes.long()] * t["absmax"].double().view(N, K // bs, 1).expand(N, K // bs, bs).reshape(N, K)
    x = torch.randn(M, K).bfloat16()
    ref = x.double() @ w.t() + lin.bias.double()
    got = lin(x)
    assert ((got.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-5 * ref.abs().max()).all()
    assert torch.equal(lin.dequantize(), Q.dequantize(scheme, t))          # the plain codes stay exact


@needs_kernels
@pytest.mark.parametrize("scheme", ["int8-dynamic", "nf4"])
def test_codebook_inplace_conversion_matches_the_copying_one(monkeypatch, scheme):
    """Streamed code-book units convert the staging buffer's bytes into the panels (chunk by chunk): same results,
    same storage; only the panels are held (no second copy of the codes)."""
    import overspill.kernels as KM
    import overspill.quant as Q
    monkeypatch.setattr(KM, "INPLACE_CHUNK", 100)     # many chunks
    torch.manual_seed(3)
    t = Q.quantize(torch.randn(64, 128), scheme)
    ref = Q.make_linear(scheme, t)
    buf = {k: v.clone() for k, v in t.items()}
    lin = Q.make_linear(scheme, buf, repack="inplace")
    assert torch.equal(lin._panels, ref._panels) and torch.equal(lin._am_panels, ref._am_panels)
    assert lin._panels.data_ptr() == buf["qweight"].data_ptr() and lin._am_panels.data_ptr() == buf["absmax"].data_ptr()
    assert ref.qweight is None and torch.equal(ref.dequantize(), Q.dequantize(scheme, t))
    x = torch.randn(40, 128).bfloat16()                 # > KERNEL_MAX_M rows: the dequantize-then-matmul path
    assert torch.equal(lin(x), ref(x)) and rel(ref(x), F.linear(x.float(), Q.dequantize(scheme, t))) < 6e-3
    assert Q.make_linear(scheme, t, repack=False)._k is None


@needs_kernels
def test_blocked_linear_in_place_equals_the_copying_one():
    w = torch.randn(48, 96).bfloat16()
    want = BlockedLinear(w.clone(), torch.randn(48).bfloat16())
    buf = w.clone()
    got = BlockedLinear.from_blocked_(buf, want.bias)
    assert torch.equal(got.blocked, want.blocked) and got.blocked.data_ptr() == buf.data_ptr()
    x = torch.randn(3, 96).bfloat16()
    assert torch.equal(got(x), want(x)) and got.nbytes == want.nbytes and torch.equal(got.dequantize(), w)


def test_pack_int8_inplace_torch_fallback(monkeypatch):
    """Without the kernels pack_int8_ converts with chunked torch copies: same bytes."""
    import overspill.kernels as KM
    monkeypatch.setattr(KM, "cpu_kernels", lambda: None)
    monkeypatch.setattr(KM, "bf16_kernels", lambda: None)
    monkeypatch.setattr(KM, "INPLACE_CHUNK", 1000)
    q = torch.randint(-127, 128, (64, 96), dtype=torch.int8)
    want = KM.pack_int8(q)
    buf = q.clone()
    assert torch.equal(KM.pack_int8_(buf), want)


def test_panel_empty_is_a_plain_tensor_and_can_be_switched_off(monkeypatch):
    """Huge-page advice changes nothing about the tensor (and is skipped on request or for small tensors)."""
    from overspill.kernels import panel_empty
    w = torch.randn(64, 96).bfloat16()
    for flag in ("1", "0"):
        monkeypatch.setenv("OVERSPILL_HUGEPAGES", flag)
        big = panel_empty((3 << 20,), torch.uint8)
        assert big.shape == (3 << 20,) and big.is_contiguous() and big.dtype == torch.uint8
        assert torch.equal(unblock_weight(block_weight(w)), w)


def _huge_kib_at(addr: int) -> int | None:
    """AnonHugePages (KiB) of the mapping that holds ``addr`` in this process, or None when no mapping does."""
    import re
    for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) [^\n]*\n(.*?)(?=^[0-9a-f]+-[0-9a-f]+ |\Z)",
                         open("/proc/self/smaps").read(), re.S | re.M):
        if int(m.group(1), 16) <= addr < int(m.group(2), 16):
            return int(re.search(r"AnonHugePages:\s+(\d+)", m.group(3)).group(1))
    return None


@pytest.mark.skipif(not _thp_madvise(), reason="transparent huge pages are off on this system")
def test_panel_empty_gets_huge_pages_even_after_heap_churn(monkeypatch):
    """Kernel-layout weights sit on huge pages: the whole 2 MiB pages inside the tensor, and nothing beyond its bytes.
    Heap churn first, as loading makes it: freed temporaries that glibc would hand back already mapped small."""
    monkeypatch.setenv("OVERSPILL_HUGEPAGES", "1")
    big = torch.ones(16 << 20, dtype=torch.uint8)     # freeing it raises glibc's mmap threshold above 10 MiB,
    del big
    junk = [torch.ones(10 << 20, dtype=torch.uint8) for _ in range(4)]   # so these come from the heap, touched,
    del junk                                                               # and go back to it mapped small
    n = (9 << 20) + 12345
    t = panel_empty((n,), torch.uint8)
    t.fill_(7)
    assert t.shape == (n,) and t.is_contiguous() and int(t[-1]) == 7
    start = -(-t.data_ptr() // (2 << 20)) * (2 << 20)
    inner = (t.data_ptr() + n) // (2 << 20) * (2 << 20) - start
    assert _huge_kib_at(start) >= (inner >> 10) // 2   # (a fault may fall back to small pages on a fragmented host)


@pytest.mark.skipif(not _thp_madvise(), reason="transparent huge pages are off on this system")
def test_panel_empty_inside_transient_is_plain_heap_memory(monkeypatch):
    """A streamed unit's weights live one forward: inside transient() they are plain torch memory (exactly their
    bytes), not a fresh mapping with 2 MiB of slack that every forward would map and fault in again."""
    monkeypatch.setenv("OVERSPILL_HUGEPAGES", "1")
    n = 9 << 20
    assert panel_empty((n,), torch.uint8).untyped_storage().nbytes() > n      # its own mapping
    with transient():
        with transient():
            pass
        t = panel_empty((n,), torch.uint8)                                      # still transient after the inner exit
    assert t.untyped_storage().nbytes() == n
    assert panel_empty((n,), torch.uint8).untyped_storage().nbytes() > n




@needs_avx2
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("N,K", [(16, 4), (48, 128), (160, 96)])
def test_avx2_int8_weight_only_vs_reference(M, N, K):
    """int8_w8a16_mm over pack_int8's panels: x exact (not quantized), fp32 sums, one rounding to bf16; each row
    alone gives its row of the batch."""
    from overspill.kernels import pack_int8
    g = torch.Generator().manual_seed(M * 100 + N + K)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    s, b = torch.rand(N, generator=g) * 0.01, torch.randn(N, generator=g)
    x = torch.randn(M, K, generator=g).bfloat16()
    ref = x.double() @ (q.double() * s.double()[:, None]).T + b.double()
    got = A2.int8_w8a16_mm(x, pack_int8(q), s, b)
    assert_within_bf16_rounding(got, ref)
    assert torch.equal(got, torch.cat([A2.int8_w8a16_mm(x[i:i + 1].contiguous(), pack_int8(q), s, b)
                                       for i in range(M)]))
    with pytest.raises(RuntimeError, match=f"K={K + 4}"):
        A2.int8_w8a16_mm(torch.randn(M, K + 4).bfloat16(), pack_int8(q), s, b)
    xf = torch.randn(M, K, generator=g)              # float32 activations: used as they are, a float32 result
    ref = xf.double() @ (q.double() * s.double()[:, None]).T + b.double()
    got = A2.int8_w8a16_mm(xf, pack_int8(q), s, b)
    assert got.dtype == torch.float32 and ((got.double() - ref).abs() <= 1e-5 * ref.abs().max()).all()


def w8a8_reference(x, q, s, b, KB):
    """int8_vnni_mm's arithmetic in float64: x quantized per (row, block of KB inputs) with d = max|x| / 127 and
    round-half-even(x * (127 / max|x|)) in float32 (a true division: Python's 127 / tensor is a reciprocal times 127,
    which rounds twice), integer block sums, scaled and summed exactly."""
    xf = x.float()
    M, K = xf.shape
    xb = xf.view(M, K // KB, KB)
    amax = xb.abs().amax(-1, keepdim=True)
    xq = torch.round(xb * torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax)))
    isum = torch.einsum("mbk,nbk->mbn", xq.double(), q.double().view(q.shape[0], K // KB, KB))
    return (isum * (amax / 127.0).double()).sum(1) * s.double() + (0 if b is None else b.double())


@needs_avx2
@pytest.mark.parametrize("M,N,K,KB", [(1, 16, 64, 64), (5, 48, 128, 32), (7, 160, 192, 64), (50, 64, 320, 64),
                                      (3, 32, 48, 16)])
def test_avx2_int8_w8a8_vs_reference(M, N, K, KB):
    """int8_w8a8_mm (vpmaddubsw with the weight's sign moved onto the activation): the AVX-512 kernel's arithmetic,
    within one bf16 rounding of its float64 emulation (50 rows cross a pass of 48, 16-input blocks take the tail of
    the quantizer); each row alone gives its row of the batch; int8 extremes (+-127 weights, a block's max input)
    do not saturate the int16 pair sums; bad shapes fail in one line."""
    from overspill.kernels import pack_int8
    g = torch.Generator().manual_seed(M * 100 + N + K)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    q[0] = 127
    q[1] = -127
    s, b = torch.rand(N, generator=g) * 0.01, torch.randn(N, generator=g)
    x = torch.randn(M, K, generator=g).bfloat16()
    x[0, :KB] = 2.0                                  # a whole block at its max: every xq = 127
    got = A2.int8_w8a8_mm(x, pack_int8(q), s, b, KB)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    assert_within_bf16_rounding(got, w8a8_reference(x, q, s, b, KB))
    assert torch.equal(got, torch.cat([A2.int8_w8a8_mm(x[i:i + 1].contiguous(), pack_int8(q), s, b, KB)
                                       for i in range(M)]))
    assert torch.equal(A2.int8_w8a8_mm(x[:, None], pack_int8(q), s, None, KB)[:, 0],
                       A2.int8_w8a8_mm(x, pack_int8(q), s, None, KB))
    with pytest.raises(RuntimeError, match=f"K={K + 16} must be a multiple of the activation block {K + 16 + KB}"):
        A2.int8_w8a8_mm(torch.randn(M, K + 16).bfloat16(), pack_int8(q), s, b, K + 16 + KB)
    with pytest.raises(RuntimeError, match=f"x has K={K + KB} but the weight has {K} input features"):
        A2.int8_w8a8_mm(torch.randn(M, K + KB).bfloat16(), pack_int8(q), s, b, KB)
    assert A2.int8_w8a8_mm(x[:0], pack_int8(q), s, b, KB).shape == (0, N)


@needs_avx2
@needs_kernels
def test_avx2_w8a8_equals_the_avx512_kernel():
    """On a CPU that runs both builds, the AVX2 w8a8 kernel gives the AVX-512 one's results (the same integer block
    sums and fp32 steps; compared to within one bf16 step)."""
    from overspill.kernels import pack_int8
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-127, 128, (96, 256), generator=g, dtype=torch.int8)
    s, b, x = torch.rand(96, generator=g) * 0.01, torch.randn(96, generator=g), torch.randn(13, 256, generator=g).bfloat16()
    a, v = A2.int8_w8a8_mm(x, pack_int8(q), s, b, 64), K_.int8_vnni_mm(x, pack_int8(q), s, b, 64)
    assert torch.allclose(a.float(), v.float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.skipif(A2 is None or K_ is not None, reason="the AVX2 int8 path: CPUs with AVX2 but not AVX512-VNNI")
def test_int8_linear_runs_panels_on_avx2():
    """Without the AVX-512 kernels Int8Linear holds its weight as panels only. bf16 activations run int8_w8a8_mm by
    default (the AVX-512 build's w8a8 arithmetic) and int8_w8a16_mm with act_quant="never" (x exact); float32
    rows and input gradients stay weight-only: the kernel below DEQUANT_MIN_M rows, float32 slices of the panels
    above."""
    import overspill.quant as Q
    torch.manual_seed(3)
    w, b = torch.randn(64, 128) * 0.05, torch.randn(64)
    t = Q.quantize(w, "int8")
    lin = Q.make_linear("int8", t, b)
    never = Q.make_linear("int8", t, b, act_quant="never")
    assert lin._a2 is not None and lin._qplain is None and torch.equal(lin.qweight, t["qweight"])
    assert (lin.act_quant, lin._a2_w8a8, never.act_quant, never._a2_w8a8) == ("auto", True, "never", False)
    d = Q.dequantize("int8", t)
    x = torch.randn(5, 128).bfloat16()
    assert_within_bf16_rounding(never(x), x.double() @ d.double().T + b.double())
    with torch.no_grad():
        assert_within_bf16_rounding(lin(x), w8a8_reference(x, t["qweight"], t["scales"].float(), b, 64))
        assert not torch.equal(lin(x), never(x))       # the activations were rounded to int8
    rows = torch.empty(32, 128)
    lin._fill_rows(rows, 16, 48)
    assert torch.equal(rows, d[16:48])
    for m in (lin, never):
        xs = torch.randn(4, 128)              # float32, few rows: exact float32 on the weight-only kernel
        ref = xs.double() @ d.double().T + b.double()
        assert ((m(xs).double() - ref).abs() <= 1e-5 * ref.abs().max()).all()
        xf = torch.randn(40, 128, requires_grad=True)          # > DEQUANT_MIN_M float32 rows: exact float32
        y = m(xf)
        assert torch.allclose(y, xf @ d.T + b, rtol=1e-5, atol=1e-5)
        y.sum().backward()
        assert torch.allclose(xf.grad, d.sum(0).expand(40, 128), rtol=1e-5, atol=1e-5)


def w4a8_reference(x, q, sz, b, gs):
    """int4_vnni_mm's arithmetic in float64: x quantized per (row, group) as w8a8_reference does, then per group
    s * d * (sum q xq - 8 sum xq) + z * sum x, summed exactly; q uint8 [N, K] in 0..15, sz [N/16, K/gs, 2, 16]."""
    xf = x.float()
    M, K = xf.shape
    N = q.shape[0]
    xb = xf.view(M, K // gs, gs)
    amax = xb.abs().amax(-1, keepdim=True)
    xq = torch.round(xb * torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax)))
    s = sz[:, :, 0].double().permute(0, 2, 1).reshape(N, K // gs)          # [N, G]
    z = sz[:, :, 1].double().permute(0, 2, 1).reshape(N, K // gs)
    isum = torch.einsum("mgk,ngk->mgn", xq.double(), (q.double() - 8).view(N, K // gs, gs))   # sum (q - 8) xq
    d = (amax / 127.0).double()                                             # [M, G, 1]
    xs = xb.double().sum(-1, keepdim=True)
    return (isum * d * s.t()[None] + xs * z.t()[None]).sum(1) + (0 if b is None else b.double())


@needs_avx2
@pytest.mark.parametrize("M,N,K,gs", [(1, 16, 64, 64), (5, 48, 128, 32), (7, 160, 256, 128), (50, 64, 320, 64),
                                      (3, 32, 96, 32)])
def test_avx2_int4_w4a8_vs_reference(M, N, K, gs):
    """int4_w4a8_mm (vpmaddubsw over the unsigned nibbles): int4_vnni_mm's arithmetic, within one bf16 rounding of
    its float64 emulation (50 rows cross a pass of 48); each row alone gives its row of the batch; the extremes (15
    against a group's max input, low and high nibbles' pair sums added in int16) do not saturate; bad shapes fail in
    one line; the in-place conversion from torch's int4pack bytes gives pack_int4's panels."""
    from overspill.kernels import pack_int4
    g = torch.Generator().manual_seed(M * 100 + N + K)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    q[0] = 15
    sz = (torch.rand(N // 16, K // gs, 2, 16, generator=g) * 0.02 - 0.005).bfloat16()
    b = torch.randn(N, generator=g)
    x = torch.randn(M, K, generator=g).bfloat16()
    x[0, :gs] = 2.0                                  # a whole group at its max: every xq = 127
    got = A2.int4_w4a8_mm(x, pack_int4(q), sz, gs, b)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    assert_within_bf16_rounding(got, w4a8_reference(x, q, sz, b, gs))
    assert torch.equal(got, torch.cat([A2.int4_w4a8_mm(x[i:i + 1].contiguous(), pack_int4(q), sz, gs, b)
                                       for i in range(M)]))
    assert torch.equal(A2.int4_w4a8_mm(x[:, None], pack_int4(q), sz, gs, None)[:, 0],
                       A2.int4_w4a8_mm(x, pack_int4(q), sz, gs, None))
    with pytest.raises(RuntimeError, match=f"x has K={K + gs} but the weight has {K} input features"):
        A2.int4_w4a8_mm(torch.randn(M, K + gs).bfloat16(), pack_int4(q), sz, gs, b)
    with pytest.raises(RuntimeError, match="scales/zeros must be bf16"):
        A2.int4_w4a8_mm(x, pack_int4(q), sz.float(), gs, b)
    assert A2.int4_w4a8_mm(x[:0], pack_int4(q), sz, gs, b).shape == (0, N)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)   # this CPU's int4pack layout
    from overspill.quant.int4 import native_layout
    buf = packed.reshape(-1).view(torch.uint8).clone()
    A2.int4pack_to_panels_(buf, N, K, native_layout())
    assert torch.equal(buf.view(N // 16, K // 8, 64), pack_int4(q))


_REUSE_SCRIPT = r"""
import torch
from overspill import kernels as K
MiB = 1 << 20
assert K.reuse_large_allocations(4 * MiB)
K.restart_kept_allocations()
# a freed block is handed out again (same address), holding what the new tensor writes
a = torch.full((2 * MiB,), 1.0)                     # 8 MiB
p = a.data_ptr()
del a
b = torch.full((2 * MiB,), 2.0)
assert b.data_ptr() == p and bool((b == 2).all())
# a slightly smaller request fits the kept block (best fit within 1/4), a much smaller one does not take it
del b
c = torch.empty(int(1.9 * MiB))
assert c.data_ptr() == p
del c
# small tensors stay with the allocator it replaced; its raw frees still work (resize, ops' own buffers)
before = K.kept_allocations()
s = torch.ones(100)
s.resize_(1000)
assert K.kept_allocations() == before
# a resized large tensor keeps its bytes
r = torch.arange(300_000, dtype=torch.float32)
r.resize_(600_000)
assert torch.equal(r[:300_000], torch.arange(300_000, dtype=torch.float32))
del r
# never more mapped than the peak in use plus the slack, however sizes vary
g = torch.Generator().manual_seed(0)
live, worst = [], 0
for i in range(400):
    if live and torch.rand((), generator=g) < 0.5:
        live.pop(int(torch.randint(len(live), (), generator=g)))
    else:
        live.append(torch.empty(int(torch.randint(MiB // 4, 6 * MiB, (), generator=g))))
    mapped, kept, peak = K.kept_allocations()
    worst = max(worst, mapped - peak)
    assert mapped - kept <= peak
assert worst <= 4 * MiB, worst
print("ok")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the reuse allocator maps memory with mmap")
def test_reuse_allocator_hands_blocks_back_within_the_peak():
    """kernels.reuse_large_allocations (alloc.cpp), in a fresh process: a freed large block comes back for the next
    request of its size (no fresh pages to fault in), tensors keep their values through it (resize included), small
    ones stay with torch's own allocator, and all it maps stays within the peak in use plus the slack."""
    r = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


@needs_kernels
def test_panels_to_bf16_is_the_dequantized_weight_rounded_once():
    """int8 and int4 panels -> bf16 rows (training's input-gradient slices where bf16 is native): exactly the float32
    rows (q * s; (q - 8) * s + z) rounded to bf16, i.e. the float32 fill then .to(bfloat16), for any panel range."""
    from overspill import quant
    g = torch.Generator().manual_seed(3)
    lin = quant.make_linear("int8", quant.quantize(torch.randn(96, 256, generator=g), "int8"), None)
    want = torch.empty(96, 256)
    lin._fill_rows(want, 0, 96)
    got = torch.empty(32, 256, dtype=torch.bfloat16)
    K_.panels_to_bf16_(lin._qpanels[2:4], got, lin.scales_f32[32:64])
    assert torch.equal(got, want[32:64].to(torch.bfloat16))
    torch.testing.assert_close(want, lin.dequantize().float(), rtol=0, atol=0)
    # int4 panels with their scales and zeros: (q - 8) * s + z as int4.py's float32 rows, rounded once
    for gs in (32, 64):
        l4 = quant.make_linear("int4", quant.quantize(torch.randn(96, 256, generator=g), "int4", group_size=gs), None)
        got = torch.empty(48, 256, dtype=torch.bfloat16)
        K_.int4_panels_to_bf16_(l4.qpanels[1:4], l4.szpanels[1:4], got, gs)
        assert torch.equal(got, l4._panel_rows(1, 4).to(torch.bfloat16)), gs
