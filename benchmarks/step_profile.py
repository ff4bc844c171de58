"""Where a whole LLaMA train step's GPU time goes, by kind of kernel, per method.

  python -m benchmarks.step_profile --model 1b --methods poetx,adamw --batch 8 --scan true

`benchmarks/layer.py` times one layer; this reads the device kernels of the compiled
train step (forward, backward, optimizer update, all layers) back from a profiler
trace and sums them by kind: large GEMMs, the POET-X kernels, transposes, and
everything else XLA fuses. Kernel time only (CUPTI), so launch gaps are not counted;
`benchmarks/compile_time.py` gives the wall time of the same step.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import tempfile

import jax

from benchmarks import compile_time, kernel_profile

# First match wins: the kind of a kernel from its name.
KINDS = (
    ("gemm", re.compile(r"nvjet|gemm|cutlass|xmma|cublas|dot", re.I)),
    ("cayley", re.compile(r"poetx_cayley")),
    ("rotation + outer sum (fused)", re.compile(r"poetx_rotate_outer_sum")),
    ("rotation", re.compile(r"poetx_block_rotate")),
    ("outer_sum", re.compile(r"poetx_block_outer_sum")),
    ("transpose", re.compile(r"transpose", re.I)),
    ("copy/memset", re.compile(r"memcpy|memset|copy", re.I)),
)


def kind_of(kernel_name: str) -> str:
  for kind, pattern in KINDS:
    if pattern.search(kernel_name):
      return kind
  return "other fusions"


def step_wall_ms(compiled, state, data, steps: int = 8) -> tuple[float, object]:
  """`(median wall milliseconds of the compiled step after two warm-up steps, the state)`."""
  times, state = compile_time.step_seconds(compiled, state, data, steps)
  return statistics.median(times[2:]) * 1e3, state


def step_kernels(compiled, state, data, steps: int) -> list[tuple[str, float]]:
  """(kernel name, µs) of every kernel of `steps` train steps (after two warm-up steps)."""
  for _ in range(2):
    state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = compiled(state, data)
      jax.block_until_ready(metrics)
    (path,) = kernel_profile.trace_paths(log_dir)
    return kernel_profile.device_kernels(path)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="1b")
  parser.add_argument("--methods", default="poetx,adamw")
  parser.add_argument("--implementation", default="pallas")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--scan", default="true")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--set", action="append", default=[], help="a config override, e.g. poet.keep_cayley_state=true")
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.model}, "
        f"{args.batch}x{args.seq_len} tokens per step, scan={args.scan}, overrides {args.set}", flush=True)
  overrides = compile_time.parse_overrides(args.set)
  totals = {}
  for method in args.methods.split(","):
    run, _, state, data = compile_time.build(
        args.model, args.implementation, args.batch, args.seq_len, method, args.scan == "true", overrides
    )
    compiled = run.train_step.lower(state, data).compile()
    wall_ms, state = step_wall_ms(compiled, state, data)
    kernels = step_kernels(compiled, state, data, args.steps)
    by_kind, by_name, launches = collections.Counter(), collections.Counter(), collections.Counter()
    for name, us in kernels:
      by_kind[kind_of(name)] += us / args.steps
      by_name[name] += us / args.steps
      launches[name] += 1 / args.steps
    totals[method] = by_kind
    print(f"--- {method}: step {wall_ms:.1f} ms (median wall time), {sum(by_kind.values()) / 1e3:.2f} ms of kernels, "
          f"{len(kernels) / args.steps:.0f} launches")
    for kind, us in by_kind.most_common():
      print(f"  {kind:<14} {us / 1e3:8.2f} ms")
    for name, us in by_name.most_common(args.top):
      print(f"    {us / 1e3:7.2f} ms  x{launches[name]:<5.0f} {name[:90]}")
  if len(totals) > 1:
    kinds = sorted({k for t in totals.values() for k in t})
    print("ms per step by kind: " + "  ".join(f"{m}" for m in totals))
    for kind in kinds:
      print(f"  {kind:<14} " + "  ".join(f"{totals[m][kind] / 1e3:8.2f}" for m in totals))


if __name__ == "__main__":
  main()
