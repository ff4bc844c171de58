"""How long the train step takes to compile, and then to run, per model and implementation.

  python -m benchmarks.compile_time --models 60m,1b --implementations pallas,xla

Synthetic tokens; prints one row per (model, implementation): compile seconds,
median step seconds, tokens/s and the compiled memory estimate.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import time

import jax

from configs import base
from benchmarks import synthetic
from poetx_jax import train_config, trainer


def parse_overrides(items) -> dict:
  """`["poet.keep_cayley_state=true", ...]` -> `{"poet.keep_cayley_state": True, ...}` (Python literals)."""
  out = {}
  for item in items or ():
    key, _, value = item.partition("=")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = {"true": True, "false": False}.get(value.lower(), value)
  return out


def apply_overrides(c, overrides) -> None:
  """Sets `{"poet.keep_cayley_state": True, ...}` on the ConfigDict `c`."""
  for key, value in (overrides or {}).items():
    group, _, field = key.rpartition(".")
    (c[group] if group else c)[field] = value


def build(model: str, implementation: str, batch: int, seq_len: int, method: str, scan: bool = False, overrides=None):
  """`(run, config, state, batch)`: a bf16 LLaMA train step on synthetic tokens, as the trainer builds it.

  `overrides`: `{"poet.keep_cayley_state": True, ...}`, config fields set last.
  """
  c = base.get_config()
  c.model.size = model
  c.model.vocab_size = 32000
  c.model.dtype = "bfloat16"
  c.data.seq_len = seq_len
  c.optimizer.name = method
  c.poet.implementation = implementation
  c.model.scan_layers = scan
  c.train.steps = 1000
  c.train.global_batch_size = batch
  apply_overrides(c, overrides)
  config = train_config.from_config_dict(c)
  run = trainer.build(config)
  state = run.init_fn()
  data = synthetic.token_batch(run, batch, seq_len, config.model.vocab_size)
  return run, config, state, data


def step_seconds(compiled, state, data, steps: int) -> tuple[list[float], object]:
  """`(wall seconds of each of `steps` calls of the compiled step, the state)`: the step
  donates its state, so the caller goes on with the one returned."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return times, state


def measure(model: str, implementation: str, batch: int, seq_len: int, steps: int, method: str, scan: bool = False) -> dict:
  run, _, state, data = build(model, implementation, batch, seq_len, method, scan)
  start = time.perf_counter()
  compiled = run.train_step.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  times, _ = step_seconds(compiled, state, data, steps)
  step_s = statistics.median(times[1:] or times)
  return {"model": model, "method": method, "implementation": implementation, "scan_layers": scan, "compile_s": compile_s, "step_s": step_s,
          "tokens_per_sec": batch * seq_len / step_s, "temp_gib": memory.temp_size_in_bytes / 2**30 if memory else None}


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="60m")
  parser.add_argument("--implementations", default="pallas,xla")
  parser.add_argument("--method", default="poetx")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--scan", default="false", help="comma-separated: false,true (unrolled and/or scanned blocks)")
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}", flush=True)
  for model in args.models.split(","):
    for implementation in args.implementations.split(","):
      for scan in (s == "true" for s in args.scan.split(",")):
        r = measure(model, implementation, args.batch, args.seq_len, args.steps, args.method, scan)
        print(f"{model:>5} {r['method']} {implementation:<7} {'scan' if scan else 'unrolled':<8}"
              f" compile {r['compile_s']:7.1f} s  step {r['step_s'] * 1e3:8.1f} ms"
              f"  {r['tokens_per_sec']:9.0f} tokens/s  temp {r['temp_gib']:.2f} GiB", flush=True)


if __name__ == "__main__":
  main()
