"""Data-parallel / FSDP scaling of the train step on 1, 2, 4, 8 devices of one host.

  python -m benchmarks.scaling --out benchmarks/results/scaling.json            # Llama-1B, DP
  python -m benchmarks.scaling --model 8b --fsdp --methods poetx,adamw            # FSDP where memory needs it

Fixed per-device batch, sequence 1024, synthetic tokens (the step, not the input
pipeline, is measured). For each device count: tokens/s per device and scaling
efficiency against one device. After a step that merges, every device's copy of
the replicated POET-X state is compared byte for byte (replicas must merge
identically without communication). Multi-process: launch one process per GPU with
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set; the same step runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np

from configs import base
from benchmarks import kernel_profile, step_profile, synthetic
from poetx_jax import train_config, trainer


def _config(args, method: str, devices: int):
  c = base.get_config()
  c.model.size = args.model if args.model != "tiny" else None
  if args.model == "tiny":
    c.model.update(hidden=128, ffn=256, heads=2, layers=1)
  c.model.vocab_size = 32000 if args.model != "tiny" else 512
  c.model.dtype = args.dtype
  c.model.remat = args.remat
  c.model.scan_layers = args.scan_layers
  c.data.seq_len = args.seq_len
  c.optimizer.name = method
  c.poet.block_size = args.block_size
  c.poet.merge_interval = args.merge_interval
  c.train.steps = 1000
  c.train.global_batch_size = args.per_device_batch * devices
  c.mesh.data, c.mesh.fsdp = (1, devices) if args.fsdp else (devices, 1)
  return train_config.from_config_dict(c)


def replicas_identical(tree) -> bool:
  """Every device's copy of every fully replicated array holds the same bytes."""
  for leaf in jax.tree_util.tree_leaves(tree):
    if not isinstance(leaf, jax.Array) or not leaf.sharding.is_fully_replicated:
      continue
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    if any(s.tobytes() != shards[0].tobytes() for s in shards[1:]):
      return False
  return True


def measure(args, method: str, devices: int) -> dict:
  config = _config(args, method, devices)
  run = trainer.build(config, devices=jax.devices()[:devices])
  state = run.init_fn()
  rows = config.train.global_batch_size
  batch = synthetic.token_batch(run, rows, args.seq_len, config.model.vocab_size)
  compiled = run.train_step.lower(state, batch).compile()
  identical = None
  for _ in range(args.merge_interval):  # reaches the first merge: step == merge_interval
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  if method == "poetx":
    identical = replicas_identical(state.frozen) and replicas_identical(state.params)
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / args.steps
  if args.profile:
    _print_kernel_kinds(compiled, state, batch, devices, steps=args.merge_interval)
  return {"model": args.model, "method": method, "gpus": devices, "parallelism": "fsdp" if args.fsdp else "data",
          "per_device_batch": args.per_device_batch, "seq_len": args.seq_len, "step_s": seconds,
          "tokens_per_sec_per_gpu": rows * args.seq_len / seconds / devices, "replicas_identical_after_merge": identical,
          "device": jax.devices()[0].device_kind}


COLLECTIVE = re.compile(r"nccl|all.?reduce|all.?gather|reduce.?scatter|all.?to.?all|collective", re.I)


def kernel_kind(name: str) -> str:
  """`step_profile`'s kinds, with communication kernels as "collective"."""
  return "collective" if COLLECTIVE.search(name) else step_profile.kind_of(name)


def _print_kernel_kinds(compiled, state, batch, devices: int, steps: int) -> None:
  """Kernel ms per step and device by kind (collectives apart) over `steps` steps (one
  merge among them when `steps` is the merge interval): where scaling loses time.

  The profiler records this process's devices only: the sums are divided by how many
  of the `devices` used are local (all of them in one process; one per process when
  each GPU has its own).
  """
  local = sum(d.process_index == jax.process_index() for d in jax.devices()[:devices])
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
    kernels = [k for path in kernel_profile.trace_paths(log_dir) for k in kernel_profile.device_kernels(path)]
  by_kind, by_name = collections.Counter(), collections.Counter()
  for name, us in kernels:
    by_kind[kernel_kind(name)] += us / steps / local / 1e3
    by_name[name] += us / steps / local / 1e3
  print(f"  {devices} devices ({local} in this process), kernel ms per step and device: "
        + ", ".join(f"{kind} {ms:.1f}" for kind, ms in by_kind.most_common()), flush=True)
  for name, ms in by_name.most_common(8):
    print(f"    {ms:8.2f} ms  {name[:90]}", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="1b")
  parser.add_argument("--methods", default="poetx,adamw")
  parser.add_argument("--gpus", default="1,2,4,8")
  parser.add_argument("--fsdp", action="store_true")
  parser.add_argument("--per_device_batch", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--merge_interval", type=int, default=3)
  parser.add_argument("--block_size", type=int, default=256)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--scan_layers", type=lambda v: v.lower() == "true", default=True, help="true/false: nn.scan the blocks")
  parser.add_argument("--out", default=None)
  parser.add_argument("--profile", action="store_true", help="also print each run's kernel time by kind (collectives apart)")
  args = parser.parse_args(argv)
  trainer.maybe_initialize_distributed()
  available = len(jax.devices())
  records = []
  for method in args.methods.split(","):
    for devices in (int(g) for g in args.gpus.split(",")):
      if devices > available:
        print(f"skipping {devices} devices: only {available} available", flush=True)
        continue
      record = measure(args, method, devices)
      one = next((r for r in records if r["method"] == method and r["gpus"] == 1), record)
      record["efficiency"] = record["tokens_per_sec_per_gpu"] / one["tokens_per_sec_per_gpu"]
      records.append(record)
      _write(args.out, records, argv)
      print(f"{args.model} {method:<6} {devices} devices: {record['tokens_per_sec_per_gpu']:10.0f} tokens/s/device"
            f"  efficiency {record['efficiency']:.2f}  replicas identical after merge: {record['replicas_identical_after_merge']}",
            flush=True)
  return records


def _write(path, records, argv):
  """Rewritten after every record, so a run cut short keeps what it measured."""
  if not path:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  command = "python -m benchmarks.scaling " + " ".join(sys.argv[1:] if argv is None else argv)
  with open(path, "w") as f:
    json.dump([{**r, "command": command} for r in records], f, indent=1)


if __name__ == "__main__":
  main()
