#!/usr/bin/env bash
# One device call: kernel tests compiled on the GPU, component timings, the layer table.
#   bash benchmarks/gpu_check.sh   (on the H100; writes under $OUT when set)
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/poetx_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -m pytest tests/kernels_test.py -q -x -k GPU -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
python3 -m benchmarks.components 2>&1 | grep -v Warning | tee "$OUT/components.txt"
python3 -m benchmarks.layer --out "$OUT/layer_h100.json" ${LAYER_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/layer.txt"
