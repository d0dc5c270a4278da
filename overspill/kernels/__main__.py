"""`python -m overspill.kernels`: build (or load) the CPU kernels now and say which path is in use."""
import sys

from . import _alloc_module, avx2_kernels, cpu_kernels, cpu_supported

if __name__ == "__main__":
    k = cpu_kernels()
    if k is not None:
        print("overspill CPU kernels: built and loaded")
    elif cpu_supported():
        print("overspill CPU kernels: build failed (see warning above); using oneDNN/torch ops")
    elif avx2_kernels() is not None:
        print("overspill CPU kernels: this CPU lacks AVX512-BF16; the AVX2 bf16, int8 and int4 matmuls are built and "
              "loaded, other ops use oneDNN/torch")
    else:
        print("overspill CPU kernels: this CPU lacks AVX512-BF16 and AVX2 + FMA; using oneDNN/torch ops")
    avx2_kernels()   # the float32 training kernels, which AVX-512 CPUs run too
    print("overspill reuse allocator (training steps): " + ("built and loaded" if _alloc_module() is not None
                                                             else "unavailable; fresh mappings are used"))
    sys.exit(0)
