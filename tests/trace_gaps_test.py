"""benchmarks.trace_gaps on a hand-made trace: step wall vs device time, and the gaps."""

import gzip
import json

from benchmarks import trace_gaps


def _trace(path):
  meta = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
  ]
  host = [
      {"ph": "X", "pid": 2, "tid": 1, "name": "TfrtGpu::Execute (jit_train_step)", "ts": 0, "dur": 100},
      {"ph": "X", "pid": 2, "tid": 1, "name": "TfrtGpu::Execute (jit_train_step)", "ts": 1000, "dur": 100},
      {"ph": "X", "pid": 2, "tid": 1, "name": "TfrtGpu::Execute (jit_train_step)", "ts": 2000, "dur": 100},
      {"ph": "X", "pid": 2, "tid": 2, "name": "$data.py read", "ts": 250, "dur": 700},
      {"ph": "X", "pid": 2, "tid": 1, "name": "$queue get", "ts": 300, "dur": 200},
      {"ph": "X", "pid": 2, "tid": 1, "name": "$queue.py get", "ts": 310, "dur": 50},  # nested: not counted twice
  ]
  kernels = [(0, 300), (900, 1000), (1000, 1950), (2000, 2100)]
  device = [{"ph": "X", "pid": 1, "tid": 7, "name": f"k{i}", "ts": a, "dur": b - a} for i, (a, b) in enumerate(kernels)]
  with gzip.open(path / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": meta + host + device}, f)


def test_steps_and_idle_stretches(tmp_path, capsys):
  _trace(tmp_path)
  trace_gaps.report(str(tmp_path), min_gap_ms=0.04, top=2)
  out = capsys.readouterr().out
  assert "step 0: wall      1.0 ms  device busy      0.4 ms (40%)" in out
  assert "step 1: wall      1.0 ms  device busy      0.9 ms (95%)" in out
  assert "  by kind (ms): other fusions 0.4" in out
  assert "  longest kernels (ms): k0 0.3, k1 0.1" in out
  assert "  loop thread between steps 0.9 ms, 0.7 of it in no event: $queue get 0.2" in out
  assert "idle stretches of >= 0.04 ms: 2, 0.7 ms in all" in out  # 300-900 and 1950-2000
  assert "idle     0.6 ms at +     0.3 ms: $data.py read 0.6, $queue get 0.2" in out
