#!/usr/bin/env bash
# Kernel tests compiled on the GPU, tile sweeps, the layer table, a kernel trace.
#   bash benchmarks/gpu_check.sh   (on the H100; writes under $OUT when set)
# Each step has its own timeout so one slow step cannot take the others' output with it.
# All steps together take longer than one 10-minute device call: run the sweeps
# (SWEEP=1, the default) and the rest (SWEEP= LAYER_ARGS=...) in separate calls, and
# GPU_TESTS to narrow the tests (pytest -k).
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/poetx_out}; mkdir -p "$OUT"
TESTS=${GPU_TESTS:-GPU}
timeout 240 python3 -m pytest tests/kernels_test.py -q -k "$TESTS" -p no:cacheprovider --tb=line 2>&1 | tail -6 | tee "$OUT/gpu_tests.txt"
if [ -n "${SWEEP:-1}" ]; then
  timeout 150 python3 -m benchmarks.rotation_sweep --widths 14336 2>&1 | grep -v Warning | tee "$OUT/rotation_sweep.txt"
  timeout 150 python3 -m benchmarks.cayley_sweep 2>&1 | grep -v Warning | tee "$OUT/cayley_sweep.txt"
fi
timeout ${LAYER_TIMEOUT:-360} python3 -m benchmarks.layer --out "$OUT/layer_h100.json" ${LAYER_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/layer.txt"
timeout 120 python3 -m benchmarks.kernel_profile --shapes 4096x14336 --impls pallas_fast,dense --top 30 2>&1 | grep -v Warning | tee "$OUT/profile.txt"
