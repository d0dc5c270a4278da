"""Hand-written CPU kernels, compiled on first use (torch.utils.cpp_extension + the system C++ compiler).

Only what no library serves at memory speed lives here (why, with figures: cpu_gemv.cpp's header):
skinny matmuls over bf16 and int8 weights in a blocked layout, for decode.

    kernels = cpu_kernels()        # the compiled module, or None where unavailable
    wb = block_weight(w)           # [N, K] -> panels [N/16, K/2, 16, 2] (any dtype); unblock_weight inverts it
    y = kernels.bf16_mm(x, wb, bias)              # x bf16 [M, K] contiguous -> bf16 [M, N]
    y = kernels.int8_mm(x, qb, scales_f32, bias)  # (x @ q^T) * scales (+ bias)

Unavailable (None) when: OVERSPILL_KERNELS=0, not x86-64 with AVX512F/BW/VL + AVX512_BF16, or the build
fails (no compiler, no ninja): callers fall back to oneDNN / torch ops, slower but the same results up
to rounding. The build (~40 s, once per machine and source version) is cached under
~/.cache/overspill/kernels; `python -m overspill.kernels` builds it ahead of time (``make setup`` does).
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger("overspill.kernels")

_SRC = Path(__file__).with_name("cpu_gemv.cpp")
PANEL = 16  # output columns per panel
_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")


def cpu_supported() -> bool:
    """x86-64 Linux CPU with the AVX-512 subsets the kernels use."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return all(f in flags for f in _FLAGS)


def _build_dir() -> Path:
    digest = hashlib.sha256(_SRC.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
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
    from torch.utils import cpp_extension

    # ninja from the same environment as this Python (pip's `ninja` package) even when it is not on PATH
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    try:
        return cpp_extension.load(
            name="overspill_cpu_gemv", sources=[str(_SRC)], build_directory=str(_build_dir()),
            extra_cflags=["-O3", "-fopenmp", *(f"-m{f.replace('_', '')}" for f in _FLAGS)],
            extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler / ninja / headers: fall back, say so once
        log.warning("overspill: CPU kernels unavailable (%s); using oneDNN/torch ops instead",
                    str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return None


def blockable(N: int, K: int) -> bool:
    return N % PANEL == 0 and K % 2 == 0 and N > 0 and K > 0


def block_weight(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> panels [N/16, K/2, 16, 2]: element [p, k/2, c, k%2] = w[16p + c, k]."""
    N, K = w.shape
    return w.reshape(N // PANEL, PANEL, K // 2, 2).permute(0, 2, 1, 3).contiguous()


def unblock_weight(wb: torch.Tensor) -> torch.Tensor:
    """Inverse of block_weight (a copy)."""
    NP, KP = wb.shape[:2]
    return wb.permute(0, 2, 1, 3).reshape(NP * PANEL, KP * 2)
