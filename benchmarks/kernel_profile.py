"""Which GPU kernels a POET-X layer's forward+backward runs, and how long each takes.

  python -m benchmarks.kernel_profile --shapes 4096x14336 --block 256 --impls pallas_fast,dense

Runs each layer `--calls` times under `jax.profiler.trace` and reads the device
kernels back from the Perfetto trace (CUPTI timestamps, so no launch gaps are
counted): per kernel name, launches and microseconds per call, then the sum. This
is where the layer's time goes, not how fast it is: `benchmarks/layer.py` times.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile

import jax
import jax.numpy as jnp


def trace_paths(log_dir: str) -> list[str]:
  """Every Perfetto trace (`perfetto_trace.json.gz`) `jax.profiler` wrote under `log_dir`."""
  return glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)


def read_trace(trace_path: str) -> list[dict]:
  """The events of a Perfetto trace (`perfetto_trace.json.gz`)."""
  with gzip.open(trace_path) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def kernel_events(events: list[dict]) -> list[dict]:
  """Every kernel event on a GPU stream line (CUPTI timestamps `ts`, durations `dur`, µs)."""
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  kernels = []
  for e in events:
    if e.get("ph") != "X" or not processes.get(e.get("pid"), "").startswith("/device:GPU"):
      continue
    if not threads.get((e["pid"], e.get("tid")), "").startswith("Stream"):
      continue  # the "XLA Ops" / "XLA Modules" lines repeat the stream's kernels
    kernels.append(e)
  return kernels


def device_kernels(trace_path: str) -> list[tuple[str, float]]:
  """(name, duration µs) of every kernel on a GPU stream line of a Perfetto trace."""
  return [(e["name"], float(e["dur"])) for e in kernel_events(read_trace(trace_path))]


def profile(fn, input_sets, calls: int) -> list[tuple[str, int, float]]:
  """(kernel, launches per call, µs per call), longest first; calls rotate over `input_sets`."""
  for i in range(3):
    jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for i in range(calls):
        jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
    (path,) = trace_paths(log_dir)
    kernels = device_kernels(path)
  count, total = collections.Counter(), collections.Counter()
  for name, dur in kernels:
    count[name] += 1
    total[name] += dur
  return sorted(((n, count[n] / calls, total[n] / calls) for n in count), key=lambda r: -r[2])


def device_us(fn, input_sets, calls: int = 12) -> float:
  """Device microseconds per call of `fn` (all its kernels), inputs rotating: no host overhead."""
  return sum(us for _, _, us in profile(fn, input_sets, calls))


def report_device_us(label: str, fn, input_sets) -> None:
  """Prints `label` and `device_us(fn, input_sets)`, or why it failed (a tiling Triton
  cannot compile, say), and goes on: for sweeps over candidates."""
  try:
    print(f"  {label}  {device_us(fn, input_sets):7.1f} µs", flush=True)
  except Exception as err:  # pylint: disable=broad-except  (report and go on)
    print(f"  {label}  failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}", flush=True)


def main(argv=None):
  # Imported here: `benchmarks.layer` imports this module for `device_us`, and run as
  # `python -m benchmarks.kernel_profile` a top-level import would be circular.
  from benchmarks import layer as layer_bench  # pylint: disable=g-import-not-at-top

  known = {"dense": None, **layer_bench.KNOWN_IMPLS}
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default="4096x14336")
  parser.add_argument("--block", type=int, default=256)
  parser.add_argument("--impls", default="pallas_fast,dense")
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--calls", type=int, default=10)
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, N={args.tokens}", flush=True)
  for shape in args.shapes.split(","):
    d_in, d_out = (int(s) for s in shape.split("x"))
    (inputs,) = layer_bench._inputs(jax.random.key(0), args.tokens, d_in, d_out, args.block, 1, jnp.bfloat16)  # pylint: disable=protected-access
    for impl in args.impls.split(","):
      if known[impl] is None:
        _, fwd_bwd = layer_bench._dense_fns()  # pylint: disable=protected-access
      else:
        _, fwd_bwd = layer_bench._poet_fns(args.block, *known[impl])  # pylint: disable=protected-access
      rows = profile(fwd_bwd, [(inputs,)], args.calls)
      print(f"--- {shape} b={args.block} {impl} fwd+bwd: {sum(r[2] for r in rows):8.1f} µs in "
            f"{sum(r[1] for r in rows):.0f} kernels")
      for name, launches, us in rows[: args.top]:
        print(f"  {us:8.1f} µs  x{launches:<4.0f} {name[:100]}")


if __name__ == "__main__":
  main()
