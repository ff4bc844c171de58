#!/usr/bin/env bash
# One device call: kernel tests compiled on the GPU, tile sweep, components, the layer table.
#   bash benchmarks/gpu_check.sh   (on the H100; writes under $OUT when set)
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/poetx_out}; mkdir -p "$OUT"
TESTS=${GPU_TESTS:-GPU}
timeout 240 python3 -m pytest tests/kernels_test.py -q -x -k "$TESTS" -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
[ -n "${SWEEP:-1}" ] && timeout 120 python3 -m benchmarks.rotation_sweep 2>&1 | grep -v Warning | tee "$OUT/sweep.txt"
[ -n "${COMPONENTS:-}" ] && timeout 150 python3 -m benchmarks.components 2>&1 | grep -v Warning | tee "$OUT/components.txt"
timeout ${LAYER_TIMEOUT:-300} python3 -m benchmarks.layer --out "$OUT/layer_h100.json" ${LAYER_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/layer.txt"
