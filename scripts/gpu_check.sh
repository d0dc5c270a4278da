#!/usr/bin/env bash
# Checks overspill's CUDA path on a real GPU (issue item 13). On a machine with one NVIDIA GPU:
#
#     bash scripts/gpu_check.sh
#
# Runs the `gpu` tests of tests/test_gpu.py (a few minutes at most): bf16 resident on cuda:0 against the float32
# references, the accelerator plans of tests/test_streaming.py without the CPU stand-in, and a ~400 MB model streamed
# to the GPU from pinned host RAM and from disk (logits equal to the all-resident run, copy overlap, peak GPU memory
# within the cuda:0 budget). Uses .venv/bin/python if its torch sees CUDA, else python3. Prints PASS or FAIL and
# exits non-zero on failure; without a CUDA GPU prints "no CUDA GPU: GPU checks skipped" and exits 0.
set -u
cd "$(dirname "$0")/.."

PY=""
for cand in .venv/bin/python python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
        timeout 120 "$cand" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' >/dev/null 2>&1; then
        PY=$cand
        break
    fi
done
if [ -z "$PY" ]; then
    echo "no CUDA GPU: GPU checks skipped"
    exit 0
fi
"$PY" -c 'import sys, torch; print(f"gpu_check: {sys.executable}, torch {torch.__version__}, CUDA {torch.version.cuda},",
                                     torch.cuda.get_device_name(0))'
if ! "$PY" -c 'import pytest, transformers, safetensors, overspill' 2>/dev/null; then
    echo "gpu_check: FAIL: $PY sees CUDA but cannot import pytest, transformers, safetensors and overspill"
    exit 2
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
PYTHONUNBUFFERED=1 timeout 420 "$PY" -m pytest tests/test_gpu.py -m gpu -o addopts= -v -s -rs -p no:cacheprovider \
    2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
summary=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
if [ "$rc" -eq 0 ]; then
    echo "gpu_check: PASS ($summary; ${SECONDS}s)"
elif [ "$rc" -eq 124 ]; then
    echo "gpu_check: FAIL (timed out after 420 s; ${SECONDS}s in all)"
else
    echo "gpu_check: FAIL (pytest exit $rc: $summary; ${SECONDS}s)"
fi
exit "$rc"
