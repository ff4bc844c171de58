"""Whether each LLaMA config's train step fits one device, and how fast it trains there.

  python -m benchmarks.config_fit --configs llama1b --settings "" "train.grad_accum_steps=16"

For each config file and each setting (comma-separated `field=value` overrides; ""
is the file as shipped): the train step as `train.py` builds it, on random tokens
of the config's batch shape. It prints the compiled step's memory need against what
the device gives JAX (the trainer's own check, `trainer.check_fits`) and, where it
fits, the median wall time of a few steps, tokens/s per device and MFU.

The configs run one after another in one process. With
`XLA_PYTHON_CLIENT_PREALLOCATE=false` the allocator keeps the regions a smaller config
took, and a larger one after it can fail to find room (llama1b after llama60m did,
raw/run74_fit.txt; alone, in run 75, it fit): measure such configs in separate runs.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import statistics
import time

import jax

from benchmarks import compile_time, synthetic
from poetx_jax import metrics, train_config, trainer
from poetx_jax.models import llama

VOCAB = 32000  # the T5 tokenizer's (SPEC §9), as train.py pads it


def measure(name: str, setting: str, steps: int, show_steps: bool = False) -> str:
  raw = importlib.import_module(f"configs.{name}").get_config()
  compile_time.apply_overrides(raw, compile_time.parse_overrides([s for s in setting.split(",") if s]))
  config = train_config.from_config_dict(raw, vocab_size=VOCAB)
  run = trainer.build(config)
  state = run.init_fn()
  rows, seq_len = config.train.global_batch_size, config.data.seq_len
  batch = synthetic.token_batch(run, rows, seq_len, VOCAB)
  start = time.perf_counter()
  compiled = run.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  limit = trainer.device_memory_limit()
  memory = compiled.memory_analysis()
  head = f"{name:<10} {setting or '(as shipped)':<48} compile {compile_s:6.1f} s"
  head += f"  need {trainer.memory_need_bytes(memory) / 2**30:6.1f} GiB" if memory else ""
  head += f" of {limit / 2**30:.1f}" if limit else ""
  try:
    trainer.check_fits(compiled, config, limit)
  except ValueError:
    return head + "  DOES NOT FIT"
  times, state = compile_time.step_seconds(compiled, state, batch, steps)
  step_s = statistics.median(times[1:] or times)
  tokens = rows * seq_len
  peak = metrics.peak_flops_per_device()
  mfu = llama.flops_per_token(config.model, seq_len) * tokens / step_s / jax.device_count() / peak if peak else float("nan")
  line = head + f"  step {step_s:7.3f} s  {tokens / step_s / jax.device_count():9.0f} tokens/s/device  MFU {mfu:.3f}"
  return line + ("\n  each step (s): " + " ".join(f"{t:.3f}" for t in times) if show_steps else "")


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="llama1b", help="comma-separated config names under configs/")
  parser.add_argument("--settings", nargs="*", default=[""], help='override sets, e.g. "" "train.grad_accum_steps=16,model.remat=dots"')
  parser.add_argument("--steps", type=int, default=3, help="timed steps (the first is dropped when there are more)")
  parser.add_argument("--show_steps", action="store_true", help="also print every step's seconds (clock drift, say)")
  args = parser.parse_args(argv)
  settings = args.settings or [""]  # `--settings` with no value: the files as shipped
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}", flush=True)
  for name in args.configs.split(","):
    for setting in settings:
      try:
        print(measure(name, setting, args.steps, args.show_steps), flush=True)
      except Exception as error:  # an OOM at run time, say: report it and go on to the next setting
        print(f"{name:<10} {setting or '(as shipped)':<48} FAILED: {type(error).__name__}: {str(error)[:300]}", flush=True)
      gc.collect()
      jax.clear_caches()


if __name__ == "__main__":
  main()
