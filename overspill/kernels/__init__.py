"""Hand-written CPU kernels, compiled on first use (torch.utils.cpp_extension + the system C++ compiler).

Only what no library serves at memory speed lives here (why, with figures: cpu_gemv.cpp's header):
skinny matmuls over bf16, int8 and int4 weights in panel layouts, one-token attention, small fused ops.

    kernels = cpu_kernels()        # the compiled module, or None where unavailable
    wb = block_weight(w)           # [N, K] -> panels [N/16, K/2, 16, 2] (any dtype); unblock_weight inverts it
    y = kernels.bf16_mm(x, wb, bias)                       # x bf16 [..., K] contiguous -> bf16 [..., N]
    y = kernels.int8_vnni_mm(x, pack_int8(q), s, bias, 64) # x @ (q * s)^T, x quantized to int8 per 64 inputs
    y = kernels.int4_vnni_mm(x, pack_int4(q), sz, gs, bias)# group-wise int4, x quantized per group

alloc.cpp is no kernel but native code built the same way: the reuse allocator a training step's transient tensors
come from (``reuse_large_allocations``).

Unavailable (None) when: OVERSPILL_KERNELS=0, not x86-64 with AVX512F/BW/VL + AVX512_BF16 + AVX512_VNNI, or the build
fails (no compiler, no ninja): callers fall back to oneDNN / torch ops, slower but the same results up
to rounding. On x86-64 CPUs with AVX2 + FMA only, ``bf16_kernels()`` is cpu_avx2.cpp's module: the same bf16_mm over
the same panels (fp32 FMAs over weights widened in registers), so bf16 linears still run from panels there, and int8
linears run ``int8_w8a8_mm`` (the AVX-512 w8a8 arithmetic on vpmaddubsw). The build (~40 s, once per machine and source version) is cached under
~/.cache/overspill/kernels; `python -m overspill.kernels` builds it ahead of time (``make setup`` does).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import mmap
import os
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("overspill.kernels")

_SRC = Path(__file__).with_name("cpu_gemv.cpp")
PANEL = 16  # output columns per panel
_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")


def cpu_supported() -> bool:
    """x86-64 Linux CPU with the AVX-512 subsets the kernels use."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return all(f in flags for f in _FLAGS)


def _build_dir(src: Path = _SRC) -> Path:
    headers = b"".join(h.read_bytes() for h in sorted(src.parent.glob("*.h")))   # included by the sources
    digest = hashlib.sha256(src.read_bytes() + headers + torch.__version__.encode()).hexdigest()[:12]
    root = Path(os.environ.get("OVERSPILL_CACHE", Path.home() / ".cache" / "overspill")) / "kernels" / digest
    root.mkdir(parents=True, exist_ok=True)
    return root


_LOCK = threading.Lock()
_UNSET = object()
_module = _UNSET


def cpu_kernels():
    """The compiled kernel module, or None (see module docstring). Builds once, then loads from cache.

    Called on the decode path (per layer), so after the first call it is one global read, no lock."""
    global _module
    if _module is _UNSET:
        with _LOCK:   # one build even when threads (e.g. the prefetch thread) ask at once
            if _module is _UNSET:
                _module = _load()
    return _module


def _load():
    if os.environ.get("OVERSPILL_KERNELS", "1") == "0" or not cpu_supported():
        return None
    return _build("overspill_cpu_gemv", _SRC, [f"-m{f.replace('_', '')}" for f in _FLAGS])


def _build(name: str, src: Path, isa: list[str]):
    """Compile (once per machine, source and torch version; cached) and import one kernel source, or None."""
    from torch.utils import cpp_extension

    # ninja from the same environment as this Python (pip's `ninja` package) even when it is not on PATH
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    try:
        return cpp_extension.load(
            name=name, sources=[str(src)], build_directory=str(_build_dir(src)),
            extra_cflags=["-O3", "-fopenmp", *isa], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler / ninja / headers: fall back, say so once
        log.warning("overspill: CPU kernels unavailable (%s); using oneDNN/torch ops instead",
                    str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return None


_SRC_ALLOC = Path(__file__).with_name("alloc.cpp")
_alloc = _UNSET


def _alloc_module():
    global _alloc
    if _alloc is _UNSET:
        with _LOCK:
            if _alloc is _UNSET:
                _alloc = None if os.environ.get("OVERSPILL_KERNELS", "1") == "0" or sys.platform != "linux" else \
                    _build("overspill_alloc", _SRC_ALLOC, [])
    return _alloc


def reuse_large_allocations(slack: int = 32 << 20, min_bytes: int = 1 << 20) -> bool:
    """From now on, serve CPU tensors of ``min_bytes`` and more from mappings kept for reuse (alloc.cpp): freed blocks
    stay mapped and are handed out again, as long as all it maps stays within the peak in use plus ``slack``. A
    training step frees and allocates the same sizes block after block: fresh mappings cost a page fault per 4 KiB
    (0.7 us here: a 1.2B LoRA step took 6.4 s against 4.1), glibc's heap keeps the fragmented rest resident (+0.4 GiB
    peak RSS). Called again, it changes the slack. Returns whether it is in place (False: no compiler, not Linux,
    OVERSPILL_KERNELS=0)."""
    m = _alloc_module()
    return bool(m is not None and m.install(int(min_bytes), int(slack)))


def restart_kept_allocations() -> None:
    """Unmap every kept block and restart the peak in use from now (after a load: its transients do not set the
    line the training steps' kept blocks may fill up to)."""
    m = _alloc if _alloc is not _UNSET else None
    if m is not None:
        m.trim()


def kept_allocations() -> tuple[int, int, int]:
    """(bytes the reuse allocator has mapped, of which freed and kept, the peak in use); zeros where it is not in
    place."""
    m = _alloc if _alloc is not _UNSET else None
    return tuple(m.stats()) if m is not None else (0, 0, 0)


_SRC_AVX2 = Path(__file__).with_name("cpu_avx2.cpp")
_FLAGS_AVX2 = ("avx2", "fma")
_avx2 = _UNSET


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])


def bf16_kernels():
    """A module with ``bf16_mm`` over the panel layout: the AVX-512 kernels (cpu_kernels()) where they run, else
    cpu_avx2.cpp's on x86-64 CPUs with AVX2 + FMA (the same layout and call, fp32 FMAs over weights widened in
    registers), else None. OVERSPILL_KERNELS=0 turns both off."""
    k = cpu_kernels()
    return k if k is not None else avx2_kernels()


def avx2_kernels():
    """cpu_avx2.cpp's module where the CPU has AVX2 + FMA and it builds, else None: bf16_mm over bf16 panels,
    int8_w8a8_mm (int8_vnni_mm's arithmetic) and int8_w8a16_mm over pack_int8's panels (the bf16 and weight-only
    int8 ones also take float32 x, F32_ACTIVATIONS), int4_w4a8_mm over pack_int4's (int4_vnni_mm's arithmetic),
    bf16_mm_t and int8_mm_t (g @ W over the panels: input gradients), panels_to_f32_, stripe_transpose_ and
    int4pack_to_panels_."""
    global _avx2
    if _avx2 is _UNSET:
        with _LOCK:
            if _avx2 is _UNSET:
                _avx2 = _load_avx2()
    return _avx2


def f32_kernels():
    """The module whose products take float32 activations as they are, over the same panels (bf16_mm and
    int8_w8a16_mm with fp32 x, and the input gradients bf16_mm_t / int8_mm_t): cpu_avx2.cpp's, which an AVX-512 CPU
    runs too (the AVX-512 module rounds x to bf16), else None. Training's exact float32 path on every CPU build."""
    a2 = avx2_kernels()
    return a2 if a2 is not None and getattr(a2, "F32_ACTIVATIONS", False) else None


def _load_avx2():
    if os.environ.get("OVERSPILL_KERNELS", "1") == "0" or not all(f in _cpu_flags() for f in _FLAGS_AVX2):
        return None
    return _build("overspill_cpu_avx2", _SRC_AVX2, ["-mavx2", "-mfma"])


def blockable(N: int, K: int) -> bool:
    return N % PANEL == 0 and K % 2 == 0 and N > 0 and K > 0


_HUGE = 2 << 20


def _thp_madvise() -> bool:
    """Whether transparent huge pages can be had by asking for them (Linux, THP not "never", not switched off)."""
    if os.environ.get("OVERSPILL_HUGEPAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


# A CPU without native bf16 matmuls (no AVX512-BF16 / AMX: oneDNN refuses its bf16 path) multiplies bf16 by bf16 at
# ~0.012 TFLOP/s (2-core AVX2 EPYC), 4-10x below its fp32 rate. From F32_MIN_ROWS rows (prefill) a bf16 weight is
# converted to fp32 a slice at a time into a reused buffer and multiplied in fp32 (fp32 accumulation either way):
# 32 rows x 24576x6144 took 205 ms against 469, 128 rows 385 ms against 1828. Decode (1-8 rows) stays on bf16, which
# reads the weight at up to ~18 GB/s there.
F32_MIN_ROWS = 16
# rows up to which an AVX2 input gradient runs on the panels (bf16_mm_t, int8_mm_t) rather than float32 slices +
# sgemm (2-core AVX2 EPYC, 6B shapes: bf16 59-79 against 15-66 GFLOP/s at 16-64 rows, int8 80-100 against 35-55 at
# 32; about even at 128; bf16 62-78 against 97-121 at 512)
GRAD_KERNEL_MAX_ROWS = 128
# weight elements converted at a time: 8 MiB of fp32, counted by the reserve. 256 rows times 1B and 6B GPT-J shapes
# (forward + input gradient, 2 threads) ran as fast as with 32 MiB slices (0.38-0.42 s against 0.41, 1.48-1.50 s
# against 1.47-1.49): a slice of >= 128 rows keeps sgemm at its rate
F32_SCRATCH_ELEMS = 2 << 20
_NATIVE: list[bool] = []
_F32_TLS = threading.local()


def bf16_native() -> bool:
    """Whether this CPU multiplies bf16 natively (oneDNN's bf16 path: AVX512-BF16/AMX, or AVX-NE-CONVERT)."""
    if not _NATIVE:
        supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        _NATIVE.append(bool(supported()) if supported is not None else True)
    return _NATIVE[0]


def _slice_buffer(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This thread's slice buffer in ``dtype`` (float32, or bf16 for bf16_sliced_grad_input), grown as needed. Made
    outside inference mode: a buffer born in an inference-mode forward could not be written later by a training
    forward on the same thread."""
    name = "buf" if dtype == torch.float32 else "buf_bf16"
    buf = getattr(_F32_TLS, name, None)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):
            buf = torch.empty(numel, dtype=dtype)
            setattr(_F32_TLS, name, buf)
    return buf


def f32_slice_rows(K: int) -> int:
    """Weight rows per float32 slice: whole panels of 16 (fills from the kernels' panel layouts, bf16 blocks and int8
    panels, copy whole panels) within F32_SCRATCH_ELEMS elements."""
    return max(PANEL, F32_SCRATCH_ELEMS // K // PANEL * PANEL)


def _row_slices(N: int, K: int, fill, dtype: torch.dtype = torch.float32):
    """(n0, n1, W[n0:n1] as ``dtype`` [n, K]) over W's rows, each slice written by ``fill`` into this thread's buffer
    (valid until the next slice)."""
    rows = f32_slice_rows(K)
    buf = _slice_buffer(min(N, rows) * K, dtype)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        wf = buf[: (n1 - n0) * K].view(n1 - n0, K)
        fill(wf, n0, n1)
        yield n0, n1, wf


def f32_sliced_linear(x: torch.Tensor, N: int, K: int, fill, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T in float32 with W produced a slice of rows at a time: ``fill(dst [n, K] fp32, n0, n1)`` writes rows
    [n0, n1) of W into a reused buffer (F32_SCRATCH_ELEMS elements, counted by the reserve). What a CPU without
    native bf16 uses for prefill-sized batches of bf16 or quantized weights. Result in x's dtype."""
    x2 = x.reshape(-1, K).float()                                       # (M, K)
    out = torch.empty(x2.shape[0], N, dtype=x.dtype)                    # (M, N)
    for n0, n1, wf in _row_slices(N, K, fill):
        out[:, n0:n1] = F.linear(x2, wf, None if bias is None else bias[n0:n1].float())
    return out.view(*x.shape[:-1], N)


def f32_sliced_grad_input(g: torch.Tensor, N: int, K: int, fill) -> torch.Tensor:
    """g @ W in float32 (the input gradient of x @ W^T) with W produced a slice of rows at a time into the same
    reused buffer as f32_sliced_linear: dX = sum over row slices n of g[:, n] @ W[n], each slice's rows contiguous
    (slicing W's columns instead needs strided copies: 2x slower here). Result in g's dtype."""
    g2 = g.reshape(-1, N).float()                                       # (M, N)
    out = torch.zeros(g2.shape[0], K, dtype=torch.float32)              # (M, K)
    for n0, n1, wf in _row_slices(N, K, fill):
        out.addmm_(g2[:, n0:n1], wf)
    return out.view(*g.shape[:-1], K).to(g.dtype)


def bf16_sliced_grad_input(g: torch.Tensor, N: int, K: int, fill) -> torch.Tensor:
    """g @ W for bf16 g on a CPU with native bf16 matmuls: slices of W's rows in bf16 (``fill(dst [n, K] bf16, n0,
    n1)``, in the slice buffer's bytes), one oneDNN bf16 product each, summed in float32; the result in bf16. Each
    slice's product is rounded to bf16 once before the sum (a few slices per weight): the error of a bf16 result.
    2.8x the float32 slices at 256 rows on 1B shapes (6144x2048: 12 against 34 ms)."""
    g2 = g.reshape(-1, N)
    out = torch.zeros(g2.shape[0], K, dtype=torch.float32)
    for n0, n1, wb in _row_slices(N, K, fill, torch.bfloat16):
        out += torch.mm(g2[:, n0:n1], wb)
    return out.view(*g.shape[:-1], K).to(g.dtype)



_TRANSIENT = threading.local()


@contextlib.contextmanager
def transient():
    """``with transient():`` weights built inside live for one forward (a streamed unit): panel_empty hands out
    plain (recycled) heap memory there, not a fresh huge-page mapping that every forward would fault in again."""
    was = getattr(_TRANSIENT, "on", False)
    _TRANSIENT.on = True
    try:
        yield
    finally:
        _TRANSIENT.on = was


def panel_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A new CPU tensor for kernel-layout weights, on transparent huge pages where the system allows.

    Decode streams every weight once per token; with 4 KiB pages the hardware prefetchers restart at every page
    boundary and every page costs a TLB walk. Measured (20 interleaved rounds, 225 MB of panels): 4 KiB vs huge
    pages read at 54.7 vs 59.5 GB/s in a fast memory phase (+9.5%), 35.6 vs 36.3 (+1.3%) in a slow one.
    Advice on a ``torch.empty`` block is not enough: glibc hands back recycled heap pages that are already mapped
    small (half of TinyLlama's weights were), so each tensor gets a fresh anonymous mapping, 2 MiB-aligned and
    advised before its first touch. Only the whole 2 MiB pages inside the tensor are advised; the ragged tail stays
    small, so no memory is held beyond the tensor's bytes. The mapping is unmapped when the storage is freed.
    A plain ``torch.empty`` for small tensors, inside ``transient()``, where THP is off, and with
    OVERSPILL_HUGEPAGES=0."""
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if n < 2 * _HUGE or getattr(_TRANSIENT, "on", False) or not _thp_madvise():
        return torch.empty(shape, dtype=dtype)
    try:
        m = mmap.mmap(-1, n + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = torch.frombuffer(m, dtype=torch.uint8)    # the storage holds the mapping
        off = -whole.data_ptr() % _HUGE
        inner = n // _HUGE * _HUGE
        m.madvise(mmap.MADV_HUGEPAGE, off, inner)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):              # the tail stays small where THP is "always" too
            m.madvise(mmap.MADV_NOHUGEPAGE, off + inner, len(m) - off - inner)
    except OSError:   # a sandbox that refuses the advice, strict overcommit: plain memory, as small tensors get
        return torch.empty(shape, dtype=dtype)
    return whole[off:off + n].view(dtype).view(shape)


def block_weight(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> panels [N/16, K/2, 16, 2]: element [p, k/2, c, k%2] = w[16p + c, k]."""
    N, K = w.shape
    out = panel_empty((N // PANEL, K // 2, PANEL, 2), w.dtype)
    return out.copy_(w.reshape(N // PANEL, PANEL, K // 2, 2).permute(0, 2, 1, 3))


def unblock_weight(wb: torch.Tensor) -> torch.Tensor:
    """Inverse of block_weight (a copy)."""
    NP, KP = wb.shape[:2]
    return wb.permute(0, 2, 1, 3).reshape(NP * PANEL, KP * 2)


# --- 8- and 4-bit panels for the integer kernels (int8_vnni_mm / int4_vnni_mm; layouts in cpu_gemv.cpp) ------

def vnni_block(N: int, K: int, block: int) -> bool:
    """Whether a [N, K] weight fits the integer kernels with activation blocks of ``block`` inputs."""
    return N % PANEL == 0 and N > 0 and K > 0 and block % 16 == 0 and K % block == 0


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> uint8 panels [N/16, K/4, 64]: byte [p, P, 4c + j] = q[16p + c, 4P + j] + 128."""
    N, K = q.shape
    u = (q.view(torch.uint8) ^ 0x80)   # two's complement + 128 == flip the top bit
    return u.reshape(N // PANEL, PANEL, K // 4, 4).permute(0, 2, 1, 3).reshape(N // PANEL, K // 4, 4 * PANEL).contiguous()


def unpack_int8(qp: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int8 (a copy)."""
    NP, KQ = qp.shape[:2]
    return (qp.view(NP, KQ, PANEL, 4).permute(0, 2, 1, 3).reshape(NP * PANEL, KQ * 4) ^ 0x80).view(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of 0..15 -> uint8 panels [N/16, K/8, 64]: byte [p, o, 4c + j] = q[16p+c, 8o+j] | q[16p+c, 8o+4+j] << 4."""
    N, K = q.shape
    t = q.reshape(N // PANEL, PANEL, K // 8, 2, 4).permute(0, 2, 1, 3, 4)          # [p, o, c, h, j]
    return (t[..., 0, :] | (t[..., 1, :] << 4)).reshape(N // PANEL, K // 8, 4 * PANEL).contiguous()


def unpack_int4(qp: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4 -> uint8 [N, K] (a copy)."""
    NP, KO = qp.shape[:2]
    b = qp.view(NP, KO, PANEL, 4)                                                   # [p, o, c, j]
    t = torch.stack([b & 15, b >> 4], dim=3)                                         # [p, o, c, h, j]
    return t.permute(0, 2, 1, 3, 4).reshape(NP * PANEL, KO * 8)


INPLACE_CHUNK = 4 << 20   # bytes of scratch an in-place conversion uses at a time


def convert_stripes_(buf: torch.Tensor, fn) -> None:
    """Rewrite buf [S, E] (contiguous) in place, stripe by stripe: buf[s0:s1] = fn(copy of buf[s0:s1]) (same size).
    The copy is at most INPLACE_CHUNK bytes: how weights in a streaming staging buffer are converted to the kernels'
    layouts without a second copy of the weight outside the budget."""
    S, E = buf.shape
    step = max(1, INPLACE_CHUNK // max(1, E * buf.element_size()))
    for s0 in range(0, S, step):
        chunk = buf[s0:s0 + step]
        chunk.copy_(fn(chunk.clone()).reshape(chunk.shape))


def pack_int8_(q: torch.Tensor) -> torch.Tensor:
    """pack_int8 in place: q's own bytes become the panels (returned as a uint8 view of q's storage).
    Each 16-row stripe is its own panel, so this is convert_stripes_ over stripes."""
    N, K = q.shape
    assert q.is_contiguous() and N % PANEL == 0 and K % 4 == 0
    u = q.view(torch.uint8).view(N // PANEL, PANEL * K)
    kern = bf16_kernels()             # either build has the stripe kernel (stripes.h)
    if kern is not None:
        kern.stripe_transpose_(u, PANEL, K // 4, 4, 0x80)
    else:
        convert_stripes_(u, lambda c: c.view(-1, PANEL, K // 4, 4).permute(0, 2, 1, 3).bitwise_xor(0x80))
    return u.view(N // PANEL, K // 4, 4 * PANEL)
