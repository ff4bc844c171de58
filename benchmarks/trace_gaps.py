"""Where the device waits in a profiled training run, and what the host did meanwhile.

  python train.py ... --config.train.profile_steps=60:63
  python -m benchmarks.trace_gaps WORKDIR/profile

Reads the Perfetto trace `train.profile_steps` wrote: per train step (one host
`Execute (jit_train_step)` event each), the wall time from its start to the next
one's and how much of it the GPU had a kernel running; then every stretch of at least
`--min_gap_ms` with no kernel running, with the host events (Python functions
included) that overlap it most. A step whose device time is well under its wall time
is host-bound, and the gaps say on what.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re

from benchmarks import kernel_profile

_STEP = re.compile(r"\S+::Execute \(jit_train_step\)")


def _busy(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The union of (start, end) intervals, sorted."""
  merged = []
  for start, end in sorted(intervals):
    if merged and start <= merged[-1][1]:
      merged[-1] = (merged[-1][0], max(merged[-1][1], end))
    else:
      merged.append((start, end))
  return merged


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
  return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def report(trace_dir: str, min_gap_ms: float, top: int) -> None:
  (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  events = kernel_profile.read_trace(path)
  device_events = kernel_profile.kernel_events(events)
  device_pids = {e["pid"] for e in device_events}
  kernels = [(e["ts"], e["ts"] + e["dur"]) for e in device_events]
  host = [e for e in events if e.get("ph") == "X" and "dur" in e and e.get("pid") not in device_pids]
  busy = _busy(kernels)
  starts = sorted(e["ts"] for e in host if _STEP.fullmatch(e["name"]))
  if len(starts) < 2 or not busy:
    raise SystemExit(f"{trace_dir}: need at least two train-step executions and GPU kernels in the trace.")
  print(f"{len(starts)} steps, {len(kernels)} kernels")
  for i, (start, end) in enumerate(zip(starts, starts[1:])):
    device = sum(_overlap((start, end), b) for b in busy)
    print(f"step {i}: wall {(end - start) / 1e3:8.1f} ms  device busy {device / 1e3:8.1f} ms ({device / (end - start):.0%})")
  gaps = [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] - a[1] >= min_gap_ms * 1e3]
  print(f"device idle stretches of >= {min_gap_ms} ms: {len(gaps)}, {sum(b - a for a, b in gaps) / 1e3:.1f} ms in all")
  for gap in gaps:
    overlaps = collections.Counter()
    for e in host:
      overlaps[e["name"]] += _overlap(gap, (e["ts"], e["ts"] + e["dur"]))
    busiest = ", ".join(f"{name[:60]} {us / 1e3:.1f}" for name, us in overlaps.most_common(top) if us > 0)
    print(f"  idle {(gap[1] - gap[0]) / 1e3:7.1f} ms at +{(gap[0] - starts[0]) / 1e3:8.1f} ms: {busiest}")


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("trace_dir")
  parser.add_argument("--min_gap_ms", type=float, default=1.0)
  parser.add_argument("--top", type=int, default=8)
  args = parser.parse_args(argv)
  report(args.trace_dir, args.min_gap_ms, args.top)


if __name__ == "__main__":
  main()
