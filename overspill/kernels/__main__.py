"""`python -m overspill.kernels`: build (or load) the CPU kernels now and say which path is in use."""
import sys

from . import avx2_kernels, cpu_kernels, cpu_supported

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
    sys.exit(0)
