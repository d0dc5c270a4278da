"""quant's portable path: every weight format computed with torch ops only, as it runs on an accelerator.

Run here on the CPU, forced (make_linear(portable=True), quant.portable()), with the CPU-only ops (overspill's C++
kernels, int8pack/int4pack matmuls, int4pack conversion, oneDNN) made to fail; and a quantized model under a
cuda:0 plan, standing in on the CPU (load(stand_in=...)), against the CPU's own quantized model.
tests/test_gpu.py runs the same on a real GPU.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import overspill
import overspill.quant as Q
from conftest import VOCAB
from overspill.quant import codebook as cb_mod, int4 as int4_mod, int8 as int8_mod

ALL = list(Q.SCHEMES)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# portable output vs F.linear(x.float(), dequantize(W)) + bias, relative L2, by x's dtype (the weight is rounded to
# that dtype, then one matmul): fp32 measured <= 6e-8 (summation order only); bf16 2.7e-3-3.5e-3 (8-bit mantissa);
# fp16 3.2e-4-4.4e-4 (11-bit mantissa)
PORTABLE_ERR = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def W(N, K, seed=0):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.02


def _boom(*a, **k):
    raise AssertionError("a CPU-only op was called on the portable path")


def forbid_cpu_ops(monkeypatch):
    """From here on every CPU-only op a quantized Linear might reach fails the test. quantize() uses some (int4 packs
    with torch's CPU int4pack conversion): call it first, as the loader quantizes on the CPU before a weight moves."""
    for name in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"):
        monkeypatch.setattr(torch, name, _boom)
    for mod in (int8_mod, int4_mod, cb_mod):
        monkeypatch.setattr(mod, "cpu_kernels", _boom)
    monkeypatch.setattr(int8_mod, "_onednn_int8_ok", _boom)
    monkeypatch.setattr(int4_mod, "native_layout", _boom)


# -- one Linear ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ALL)
@pytest.mark.parametrize("shape", [(256, 512), (100, 64)])   # 100 rows: int4 pads to 112, the view drops them
def test_portable_linear_matches_the_dequantized_weight(scheme, shape, monkeypatch):
    N, K = shape
    t = Q.quantize(W(N, K), scheme)
    forbid_cpu_ops(monkeypatch)
    d = Q.dequantize(scheme, t)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(1)) * 0.1
    lin = Q.make_linear(scheme, t, bias, portable=True)
    assert lin.portable and torch.equal(lin.dequantize(), d)
    for dtype in DTYPES:
        for lead in [(1,), (7,), (2, 3), (100,)]:   # 100 rows: past int4's int4pack limit and int8's DEQUANT_MIN_M
            x = torch.randn(*lead, K, generator=torch.Generator().manual_seed(2)).to(dtype)
            y = lin(x)
            assert y.dtype == dtype and y.shape == (*lead, N)
            assert rel(y, F.linear(x.float(), d, bias)) < PORTABLE_ERR[dtype], (dtype, lead)


@pytest.mark.parametrize("scheme", ALL)
def test_portable_input_gradient_is_grad_times_dequantize(scheme, monkeypatch):
    """dL/dx = dL/dy @ dequantize() in float32, bit for bit: the backward multiplies by the same just-in-time weight,
    which in float32 is dequantize()'s, in the same [N, K] layout."""
    N, K = 96, 128
    t = Q.quantize(W(N, K), scheme)
    forbid_cpu_ops(monkeypatch)
    lin = Q.make_linear(scheme, t, torch.randn(N) * 0.1, portable=True)
    x = torch.randn(3, 5, K, requires_grad=True)
    g = torch.randn(3, 5, N)
    lin(x).backward(g)
    want = g @ lin.dequantize()
    assert torch.equal(x.grad, want)
    xb = x.detach().bfloat16().requires_grad_(True)
    lin(xb).backward(g.bfloat16())
    assert xb.grad.dtype == torch.bfloat16 and rel(xb.grad, want) < 0.01   # bf16 weight and matmul rounding
    with torch.no_grad():
        assert not lin(x).requires_grad


def test_int4_file_of_another_cpu_layout_is_used_as_it_is(monkeypatch):
    """An int4 file packed for another CPU's int4pack layout needs no repack (no CPU-only op) on the portable path."""
    N, K = 96, 128
    t = Q.quantize(W(N, K), "int4")
    _, _, gs, lay = t["meta"].tolist()
    q = int4_mod._unpack_kn(t["qweight"], N, K, lay).t()                    # [N, K] codes
    pairs = (q[0::2] | (q[1::2] << 4)).view(N // 32, 16, K).permute(0, 2, 1).contiguous().view(N, K // 2)
    t2 = dict(t, qweight=pairs, meta=torch.tensor([N, K, gs, 0], dtype=torch.int32))   # layout 0: row pairs
    forbid_cpu_ops(monkeypatch)
    lin = Q.make_linear("int4", t2, portable=True)
    assert lin.layout == 0 and torch.equal(lin.dequantize(), Q.dequantize("int4", t))
    x = torch.randn(4, K)
    assert rel(lin(x), F.linear(x, Q.dequantize("int4", t))) < PORTABLE_ERR[torch.float32]


def test_switches():
    t = Q.quantize(W(64, 64), "int8")
    assert not Q.make_linear("int8", t).portable                      # the CPU's own paths by default
    with Q.portable():
        assert Q.make_linear("int8", t).portable
        assert Q.make_linear("nf4", Q.quantize(W(64, 64), "nf4")).portable
        assert not Q.make_linear("int8", t, portable=False).portable  # an explicit choice wins on the CPU
        with Q.portable(False):
            assert not Q.make_linear("int8", t).portable
        assert Q.make_linear("int8", t).portable
    assert not Q.make_linear("int8", t).portable
    assert Q.set_portable(True) is False and Q.set_portable(False) is True
    code = ("import torch, overspill.quant as Q; "
            "print(Q.make_linear('int4', Q.quantize(torch.ones(32, 64), 'int4')).portable)")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OVERSPILL_QUANT_PORTABLE": "1"},
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "True", r.stderr[-2000:]


@pytest.mark.parametrize("scheme", ALL)
def test_portable_scratch_is_one_reused_buffer(scheme):
    """Each call dequantizes into this thread's scratch: one buffer per tag and dtype, sized by the largest weight,
    no growth over calls, within scratch_nbytes_for(..., device=<an accelerator>); results never alias it."""
    Q.release_scratch()
    big = Q.make_linear(scheme, Q.quantize(W(256, 512), scheme), portable=True)
    small = Q.make_linear(scheme, Q.quantize(W(96, 64, seed=1), scheme), portable=True)
    x, xs = torch.randn(3, 512), torch.randn(3, 64)
    y0 = big(x).clone()
    held = Q.scratch_nbytes()
    assert 0 < held <= Q.scratch_nbytes_for(scheme, 256, 512, torch.float32, device="cuda")
    for _ in range(3):
        ys = small(xs)
        y = big(x)
    assert Q.scratch_nbytes() == held and torch.equal(y, y0)
    assert rel(ys, F.linear(xs, small.dequantize())) < PORTABLE_ERR[torch.float32]   # not overwritten by big's call
    assert Q.scratch_nbytes(device="cpu") == held and Q.scratch_nbytes(device="meta") == 0
    Q.release_scratch()


@pytest.mark.parametrize("scheme", ALL)
def test_generation_then_training_on_one_thread(scheme):
    """Buffers and casts first made under torch.inference_mode (generation) serve a later autograd call (training
    on the same thread): no inference tensor is written in place outside inference mode."""
    Q.release_scratch()
    # and the CPU's own prefill paths that dequantize into quant's scratch (int4, the code books; int8's converts in
    # kernels.f32_sliced_linear's buffer, not quant's)
    for portable in (True, False) if scheme != "int8" else (True,):
        lin = Q.make_linear(scheme, Q.quantize(W(96, 64), scheme), torch.randn(96) * 0.1, portable=portable)
        for dtype in (torch.float32, torch.bfloat16):
            with torch.inference_mode():
                lin(torch.randn(100, 64, dtype=dtype))
            x = torch.randn(100, 64, dtype=dtype, requires_grad=True)
            lin(x).sum().backward()
            assert x.grad is not None and torch.isfinite(x.grad).all()
            lin(torch.randn(100, 64, dtype=dtype))
    Q.release_scratch()


@pytest.mark.parametrize("scheme", ALL)
def test_stored_linear_moves_with_the_loaders_tensor_maps(scheme):
    """quant.StoredLinear (what host-held and HF-directory units hold for an accelerator) goes through
    runtime/transfer's pack and device copies as plain tensors, builds its Linear only when called, and computes
    what make_linear does on the same tensors."""
    from overspill.runtime.transfer import DeviceCopier, pack, tensors
    t = Q.quantize(W(96, 64), scheme)
    bias = torch.randn(96) * 0.1
    s = Q.stored_linear(scheme, t, bias)
    assert isinstance(s, Q.StoredLinear) and s.scheme == scheme
    assert s.nbytes == Q.quantized_nbytes(scheme, 96, 64) + 96 * 4
    held, buf = pack({"lin": s}, pin=False)
    h = held["lin"]
    assert type(h) is type(s) and h._lin is None and s._lin is None      # nothing built by moving
    assert all(v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for v in tensors(h))
    moved, _ = DeviceCopier(torch.device("cpu")).copy(held)
    m = moved["lin"]
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(tensors(m), tensors(h)))
    x = torch.randn(5, 64)
    with Q.portable():
        assert torch.equal(m(x), Q.make_linear(scheme, t, bias, portable=True)(x))
    assert m.linear.portable and h._lin is None and (m.in_features, m.out_features) == (64, 96)
    assert torch.equal(m.dequantize(), Q.dequantize(scheme, t))


# -- a quantized model under a cuda:0 plan, standing in on the CPU -------------------------------------------------

# CPU path vs portable path, max |logit diff| / std(logits), and cosine. Both use the same stored weights; the CPU's
# paths round activations: to bf16 here (int8pack / int4pack take bf16 x; measured 0.018-0.032 std, cosine
# >= 0.99998 on gptj / llama_tied; int8-dynamic / nf4 without the kernels run the same fp32 dequant + F.linear: 0),
# to int8 per 64 inputs on AVX-512 machines (w8a8 / w4a8 kernels), whose error tests/test_quant_models.py bounds at
# 0.2 std (8-bit) against float32. A wrong layout, scale or device mix-up is off by ~1 std.
CPU_PATH_DIFF, CPU_PATH_COS = 0.25, 0.999
CASES = [(s, "hf") for s in ALL] + [(s, "store") for s in ALL]


def _unit_sizes(m):
    p = m.plan
    return ({q.unit: q.weight_bytes for q in p.placements}, {q.unit: q.stream_bytes for q in p.placements},
            sum(q.kv_bytes for q in p.placements), p.activation_bytes)


@pytest.mark.parametrize("scheme,fmt", CASES)
def test_quantized_cuda_plan_on_a_standin_equals_the_cpu_model(deep_dir, tmp_path, scheme, fmt, monkeypatch):
    """--quantize with cuda:0 budgets (no longer refused): units resident on the accelerator (built by the loader's
    accelerator route, UnitBuilder.on_device, here on the stand-in CPU), and, from a layer store, units held in
    host RAM and copied over per forward and units read from disk and copied over, all on the portable path, give
    the logits and greedy tokens of the all-CPU model on the portable path exactly, and the CPU's own quantized
    model's within CPU_PATH_DIFF (tokens: each the CPU model's greedy choice up to that margin).
    (An HF directory quantizing on the fly streams its dense tensors, so its plans keep these tiny quantized units
    resident: its host-held and streamed routes are checked one unit at a time below.)"""
    from overspill.checkpoint.store import convert
    from overspill.runtime.loader import UnitBuilder
    path, _ = deep_dir("llama_tied" if fmt == "store" else "gptj")
    kw = dict(dtype="float32", max_seq_len=64, background=False)
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    prompts = [[5, 6, 7, 8], [9, 10]]
    gen = lambda model: model.generate(prompts, max_new_tokens=8, ignore_eos=True)
    cpu = overspill.load(path, quantize=scheme, **kw)
    want_logits = cpu.logits(ids)
    if fmt == "store":
        path = convert(path, str(tmp_path / "store"), dtype="float32", quantize=scheme, progress=False)
    q = scheme if fmt == "hf" else None
    monkeypatch.setattr(UnitBuilder, "resident", lambda self, unit, device, shared, raw=None:
                        self.on_device(unit, device, shared))        # every resident unit by the accelerator route
    load = lambda spec: overspill.load(path, quantize=q, max_memory=spec, stand_in={"cuda:0": "cpu"}, **kw)
    with Q.portable():
        ref = overspill.load(path, quantize=q, **kw)
        ref_logits, ref_tokens = ref.logits(ids), gen(ref)
        m = load("cuda:0=1GiB,cpu=1GiB")
        if fmt == "store":
            w, s, kv, act = _unit_sizes(m)
            big = max(s.values())
            m = load(f"cuda:0={act + kv + 2 * big + w['embed'] + w['block.0'] + 16},cpu={2 * big + w['block.0'] + 16}")
        kinds = {(p.tier, p.device, p.home) for p in m.plan.placements}
        assert kinds == ({("resident", "cuda:0", "cuda:0"), ("stream", "cuda:0", "cpu"), ("stream", "cuda:0", "disk")}
                         if fmt == "store" else {("resident", "cuda:0", "cuda:0")}), kinds
        got, tokens = m.logits(ids), gen(m)
    assert torch.equal(got, ref_logits), (got - ref_logits).abs().max()
    assert tokens == ref_tokens
    diff = ((got - want_logits).abs().max() / want_logits.std()).item()
    cos = F.cosine_similarity(got.flatten(), want_logits.flatten(), dim=0).item()
    assert diff <= CPU_PATH_DIFF and cos >= CPU_PATH_COS, (diff, cos)
    margin = CPU_PATH_DIFF * want_logits.std().item()
    for p, out in zip(prompts, tokens):
        lg = cpu.logits(torch.tensor([p + out]))[0]
        for k, tok in enumerate(out):
            row = lg[len(p) + k - 1]
            assert row[tok] >= row.max() - 2 * margin, (p, out, k)


@pytest.mark.parametrize("scheme", ALL)
def test_hf_units_for_an_accelerator_one_at_a_time(deep_dir, scheme):
    """An HF directory's quantized block by each route to an accelerator: resident there (on_device), held in host
    RAM (packed StoredLinears, copied per forward, built after the copy), streamed from disk (raw tensors copied,
    quantized when bound): the same linears on the portable path."""
    from overspill.runtime.loader import UnitBuilder, open_source
    from overspill.runtime.transfer import DeviceCopier
    path, _ = deep_dir("gpt_neox_parallel")
    src = open_source(path, "float32", scheme)
    b = UnitBuilder(src, False, None)
    cpu, copier = torch.device("cpu"), DeviceCopier(torch.device("cpu"))
    with Q.portable():
        res = b.on_device("block.1", cpu, {})
        held, _ = b.host("block.1", {}, pin=False)
        assert isinstance(held.qkv, Q.StoredLinear) and held.qkv._lin is None
        host = b.finish("block.1", copier.copy(held)[0])
        raw, _ = copier.copy(src.ckpt.read_unit_raw("block.1", torch.float32))
        disk = b.streamed("block.1", raw, {})
        for name in ("qkv", "out", "up", "down"):   # (a StoredLinear builds its Linear on its first call)
            lins = [getattr(u, name) for u in (res, host, disk)]
            x = torch.randn(2, 3, lins[0].in_features)
            ys = [lin(x) for lin in lins]
            assert all(lin.linear.portable if isinstance(lin, Q.StoredLinear) else lin.portable for lin in lins), name
            assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2]), name
