"""`python -m overspill.kernels`: build (or load) the CPU kernels now and say which path is in use."""
import sys

from . import cpu_kernels, cpu_supported

if __name__ == "__main__":
    k = cpu_kernels()
    if k is not None:
        print("overspill CPU kernels: built and loaded")
    elif not cpu_supported():
        print("overspill CPU kernels: this CPU lacks AVX512-BF16; using oneDNN/torch ops")
    else:
        print("overspill CPU kernels: build failed (see warning above); using oneDNN/torch ops")
    sys.exit(0)
