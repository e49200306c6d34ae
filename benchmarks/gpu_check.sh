#!/usr/bin/env bash
# GPU readiness of the `flex` backend, in under 5 minutes on one CUDA GPU: correctness against `reference` (forward and
# backward, float32 and bfloat16) and timing against dense SDPA / FlashAttention at 8k-64k
# (benchmarks/results/gpu_check.json). Uses whatever torch is installed (a CUDA build); the package is put on the path.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
if python -c "import pytest, hypothesis" 2>/dev/null; then  # the CUDA tests of the suite, where its tools exist
    python -m pytest -q -p no:cacheprovider tests/test_attention.py -k "cuda"
fi
cd benchmarks && python gpu_check.py "$@"
