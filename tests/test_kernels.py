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
def test_bf16_mm_vs_reference(M, N):
    torch.manual_seed(M * 1000 + N)
    K = 96
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
def test_int8_mm_vs_reference(M):
    torch.manual_seed(M)
    N, K = 80, 128
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
def test_int4_linear_kernel_vs_its_dequantized_weight(M):
    """int4 through the kernels (M <= 16: int4_mm; larger: bf16 panel dequant + bf16_mm) against the float
    weight the stored tensors describe; and the panel conversion keeps the weight exactly."""
    import overspill.quant as Q
    from overspill.quant import int4 as int4_mod

    torch.manual_seed(M)
    w = torch.randn(80, 256) * 0.02
    t = Q.quantize(w, "int4", group_size=64)
    lin = Q.make_linear("int4", t, bias=torch.randn(80).bfloat16())
    assert lin._k is not None and lin.qweight is None          # only the panel copy is held
    d = Q.dequantize("int4", t)
    assert torch.equal(lin.dequantize(), d)                      # conversion to panels is exact
    q = int4_mod.from_panels(lin.qpanels)                        # bytes unpack to the bf16 panel order
    assert torch.equal(unblock_weight(q), int4_mod._unpack_kn(t["qweight"], 80, 256, int(t["meta"][3])).t())
    x = torch.randn(M, 256).bfloat16()
    ref = F.linear(x.float(), d, lin.bias.float())
    assert rel(lin(x), ref) < 4e-3
