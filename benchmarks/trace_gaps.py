"""Where the device waits in a profiled training run, and what the host did meanwhile.

  python train.py ... --config.train.profile_steps=60:63
  python -m benchmarks.trace_gaps WORKDIR/profile

Reads the newest Perfetto trace `train.profile_steps` wrote: per train step (one
host `Execute (jit_train_step)` event each), the wall time from its start to the
next one's, how much of it the GPU had a kernel running, its longest kernels, and
what the loop's thread did from the step's return to the next dispatch (its
outermost events of 0.1 ms or more); then every stretch of at least `--min_gap_ms`
with no kernel running, with the host events of any thread (Python functions
included) that overlap it most. A step whose device time is well under its wall time
is host-bound, and the gaps say on what.
"""

from __future__ import annotations

import argparse
import collections
import os
import re

from benchmarks import kernel_profile, step_profile

STEP_EXECUTION = re.compile(r"\S+::Execute \(jit_train_step\)")  # one host event per train step run


def newest_trace(trace_dir: str) -> str:
  """The newest `perfetto_trace.json.gz` under `trace_dir` (a resumed run adds one)."""
  paths = kernel_profile.trace_paths(trace_dir)
  if not paths:
    raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}: run train.py with --config.train.profile_steps=START:STOP.")
  return max(paths, key=os.path.getmtime)


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


def _top_level(events: list[dict]) -> list[dict]:
  """The events of one thread not nested in an earlier one, in time order."""
  outer, end = [], -1.0
  for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
    if e["ts"] >= end:
      outer.append(e)
      end = e["ts"] + e["dur"]
  return outer


def report(trace_dir: str, min_gap_ms: float, top: int) -> None:
  path = newest_trace(trace_dir)
  print(path)
  events = kernel_profile.read_trace(path)
  device_events = kernel_profile.kernel_events(events)
  device_pids = {e["pid"] for e in device_events}
  busy = _busy([(e["ts"], e["ts"] + e["dur"]) for e in device_events])
  host = [e for e in events if e.get("ph") == "X" and "dur" in e and e.get("pid") not in device_pids]
  steps = sorted((e for e in host if STEP_EXECUTION.fullmatch(e["name"])), key=lambda e: e["ts"])
  if len(steps) < 2 or not busy:
    raise SystemExit(f"{trace_dir}: need at least two train-step executions and GPU kernels in the trace.")
  starts = [e["ts"] for e in steps]
  loop_thread = (steps[0]["pid"], steps[0]["tid"])  # the thread that runs the steps: the training loop's
  loop_events = _top_level([e for e in host if (e["pid"], e["tid"]) == loop_thread])
  print(f"{len(steps)} steps, {len(device_events)} kernels")
  for i, (step, following) in enumerate(zip(steps, steps[1:])):
    start, end = step["ts"], following["ts"]
    device = sum(_overlap((start, end), b) for b in busy)
    print(f"step {i}: wall {(end - start) / 1e3:8.1f} ms  device busy {device / 1e3:8.1f} ms ({device / (end - start):.0%})")
    per_kernel, per_kind = collections.Counter(), collections.Counter()
    for e in device_events:
      if start <= e["ts"] < end:
        per_kernel[e["name"]] += e["dur"]
        per_kind[step_profile.kind_of(e["name"])] += e["dur"]
    print("  by kind (ms): " + ", ".join(f"{n} {us / 1e3:.1f}" for n, us in per_kind.most_common()))
    print("  longest kernels (ms): " + ", ".join(f"{n[:40]} {us / 1e3:.1f}" for n, us in per_kernel.most_common(top)))
    between = (step["ts"] + step["dur"], end)  # the loop's work from this step's return to the next dispatch
    inside = [e for e in loop_events if between[0] <= e["ts"] and e["ts"] + e["dur"] <= between[1]]
    idle = between[1] - between[0] - sum(e["dur"] for e in inside)
    print(f"  loop thread between steps {(between[1] - between[0]) / 1e3:.1f} ms, {idle / 1e3:.1f} of it in no event: "
          + ", ".join(f"{e['name'][:40]} {e['dur'] / 1e3:.1f}" for e in inside if e["dur"] >= 100))
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
