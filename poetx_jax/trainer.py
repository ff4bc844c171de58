"""The training loop: build, restore or init, step, log, evaluate, checkpoint.

The loop dispatches step t before it reads step t−1's metrics, so the host never
waits on the device except at checkpoints, evaluations and the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import sys
from typing import Any

import jax
import numpy as np

from poetx_jax import checkpointing, data, evaluate, metrics, recipes, sharding, steps, workdir_lock
from poetx_jax.models import llama
from poetx_jax.train_config import TrainConfig
from poetx_jax.wrapping import wrap

logger = logging.getLogger("poetx_jax")


def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize()` when the environment describes several processes."""
  env = os.environ
  several = any(int(env.get(v, "1") or 1) > 1 for v in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
  if env.get("JAX_COORDINATOR_ADDRESS") or several:
    jax.distributed.initialize()


@dataclasses.dataclass
class Run:
  """The built pieces of one run (model, optimizer, mesh, shardings, jitted steps)."""

  config: TrainConfig
  model: Any
  tx: Any
  schedule: Any
  mesh: Any
  state_shardings: Any
  batch_sharding: Any
  init_fn: Any
  train_step: Any
  eval_step: Any
  spectrum_fn: Any


def _traced_under(mesh, fn):
  """`fn` traced with `mesh` as the abstract mesh, so POET-X layers run on each
  device's tokens (see `ops.poet_linear`'s `batch_axes`)."""

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return traced


def build(config: TrainConfig, devices=None) -> Run:
  """Builds the model (wrapped for POET-X), optimizer, mesh and jitted functions.

  Args:
    config: the run.
    devices: the devices of the mesh (default: all); scaling studies pass subsets.
  """
  base_model = llama.Llama(config.model)
  is_poet = config.optimizer.name == "poetx"
  model = wrap(base_model, config.poet) if is_poet else base_model
  tx, schedule = recipes.make_optimizer(config.optimizer, config.poet, config.train.steps)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  devices = mesh.devices.size
  if config.train.global_batch_size % devices:
    raise ValueError(f"train.global_batch_size={config.train.global_batch_size} must be divisible by the {devices} devices.")
  micro = config.train.global_batch_size // config.train.grad_accum_steps
  if micro % devices:
    raise ValueError(f"each of the {config.train.grad_accum_steps} microbatches ({micro} rows) must split over {devices} devices.")
  init = lambda: steps.init_state(model, tx, config.seed, config.data.seq_len)
  abstract = jax.eval_shape(init)
  state_shardings = sharding.tree_shardings(abstract, mesh)
  # Checked here, before anything compiles; only when the spectrum is logged at all.
  spectrum_targets = steps.spectrum_targets(
      tuple(p.strip() for p in config.train.spectrum_layers.split(",") if p.strip()), abstract.params, abstract.frozen,
      config.model.scan_layers, config.model.layers,
  ) if config.train.spectrum_every else ()
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  train_step = steps.make_train_step(
      model,
      tx,
      schedule,
      poet=config.poet if is_poet else None,
      grad_accum_steps=config.train.grad_accum_steps,
      log_every=config.train.log_every,
      total_steps=config.train.steps,
      cayley_once=config.train.cayley_once,
      activation_dtype=config.model.dtype,
  )
  return Run(
      config=config,
      model=model,
      tx=tx,
      schedule=schedule,
      mesh=mesh,
      state_shardings=state_shardings,
      batch_sharding=batch_sharding,
      init_fn=jax.jit(init, out_shardings=state_shardings),
      train_step=jax.jit(
          _traced_under(mesh, train_step), in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated), donate_argnums=(0,)
      ),
      eval_step=jax.jit(
          _traced_under(mesh, steps.make_eval_step(model)),
          in_shardings=(state_shardings.params, state_shardings.frozen, batch_sharding),
          out_shardings=(replicated, replicated),
      ),
      spectrum_fn=jax.jit(functools.partial(steps.largest_singular_values, targets=spectrum_targets)),
  )


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _describe(run: Run, state, compiled) -> None:
  frozen = _count(state.frozen)
  logger.info(
      "model: %s | optimizer: %s | trainable params: %s | frozen POET-X state: %s | devices: %d (mesh %s)",
      run.config.model, run.config.optimizer.name, f"{_count(state.params):,}", f"{frozen:,}",
      run.mesh.devices.size, dict(run.mesh.shape),
  )
  memory = compiled.memory_analysis()
  if memory is not None:
    gib = 2.0**30
    logger.info(
        "compiled train step memory estimate per device: arguments %.2f GiB, outputs %.2f GiB, temporaries %.2f GiB",
        memory.argument_size_in_bytes / gib, memory.output_size_in_bytes / gib, memory.temp_size_in_bytes / gib,
    )


def device_memory_limit() -> int | None:
  """Bytes a JAX program may allocate on each local device, or None where unknown (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return stats.get("bytes_limit") if stats else None


def memory_need_bytes(memory) -> int:
  """What a compiled program holds on a device at its peak (`compiled.memory_analysis()`):
  its arguments, the outputs that do not reuse a donated argument, its temporaries."""
  return memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes


def check_fits(compiled, config: TrainConfig, limit_bytes: int | None) -> None:
  """Raises before the first step when the compiled step needs more than a device holds.

  Without this the first step fails inside XLA with an allocation error that names a
  buffer, not the setting to change. The need is XLA's own buffer assignment
  (`memory_need_bytes`). The eval step is not checked: it keeps no activations for a
  backward pass (llama1b evaluated 512 sequences a batch within the same 59 GiB).
  """
  memory = compiled.memory_analysis()
  if memory is None or limit_bytes is None:
    return
  need = memory_need_bytes(memory)
  if need <= limit_bytes:
    return
  gib = 2.0**30
  train = config.train
  micro = train.global_batch_size // train.grad_accum_steps
  options = []
  if micro > jax.device_count():
    options.append(f"more microbatches per step (train.grad_accum_steps, now {train.grad_accum_steps}: {micro} sequences each)")
  if config.model.remat != "full":
    more = "'dots' or 'full'" if config.model.remat == "none" else "'full'"
    options.append(f"rematerialization (model.remat={more}, now {config.model.remat!r})")
  if config.optimizer.name == "poetx" and config.poet.variant == "fast" and config.model.remat == "none":
    options.append("the mem variant (poet.variant='mem')")
  options.append(f"more devices for the state (mesh.fsdp, now {config.mesh.fsdp})")
  raise ValueError(
      f"the train step needs {need / gib:.1f} GiB per device ({memory.argument_size_in_bytes / gib:.1f} GiB of"
      f" state and batch, {memory.temp_size_in_bytes / gib:.1f} GiB of temporaries) but a device has"
      f" {limit_bytes / gib:.1f} GiB for JAX. To fit, use {', '.join(options[:-1])} or {options[-1]}."
      " On a GPU, XLA_PYTHON_CLIENT_MEM_FRACTION sets JAX's share of its memory (0.75 unless set)."
  )


def _spectrum(run: Run, state) -> dict:
  """σ_max of the configured layers, on the host.

  On the CPU the program runs on host copies, one device: with jax 0.10 on 8 host
  devices (tests/trainer_test.py) it intermittently deadlocked when partitioned over
  the mesh, and jax 0.11 did not. A GPU run keeps it on its mesh.
  """
  params, frozen = state.params, state.frozen
  if jax.default_backend() == "cpu":
    params, frozen = jax.device_get((params, frozen))
  return jax.device_get(run.spectrum_fn(params, frozen))


def _eval_batches(config: TrainConfig):
  size = config.train.eval_batch_size or config.train.global_batch_size
  return data.eval_batches(config.data, batch_size=size, max_batches=config.train.eval_batches)


@contextlib.contextmanager
def _thread_switch_interval(seconds: float):
  """Python's thread switch interval set to `seconds` (0: left alone), then restored.

  While a grain thread makes batches, each time the loop's thread gives up the GIL (in
  a dispatch, a device_put, a device_get) it waits up to the interval, 5 ms by default,
  to run again: a llama60m step on one H100 took 0.281-0.290 s against the compiled
  step's 0.262 s, and 0.266-0.270 s with 0.1 ms (raw/run60_train_profile.txt,
  run62_switch_interval.txt).
  """
  if not seconds:
    yield
    return
  previous = sys.getswitchinterval()
  sys.setswitchinterval(seconds)
  try:
    yield
  finally:
    sys.setswitchinterval(previous)


def restore_or_init(run: Run, checkpointer: checkpointing.Checkpointer, data_iterator) -> tuple[int, Any]:
  """The newest readable checkpoint's (step, state), or a fresh state at step 0."""
  abstract = checkpointing.abstract_tree(jax.eval_shape(run.init_fn), run.state_shardings)
  restored = checkpointer.restore_latest(abstract, data_iterator)
  if restored is None:
    return 0, run.init_fn()
  step, state = restored
  logger.info("resumed from %s at step %d", checkpointer.directory, step)
  return step, state


def record_settings(workdir: str, settings: dict) -> None:
  """Writes the run's settings to `workdir/config.json`, once the run has restored or started
  with them; differing settings recorded before are kept as `config.previous.json`."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  text = json.dumps(settings, indent=2, default=str)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old == text:
      return
    os.replace(path, os.path.join(workdir, "config.previous.json"))
  with open(path, "w") as f:
    f.write(text)


def train(config: TrainConfig, workdir: str, *, stop_after_step: int | None = None,
          settings: dict | None = None) -> dict[str, float] | None:
  """Trains (or resumes) in `workdir`; returns the final evaluation.

  Args:
    config: the run.
    workdir: checkpoints, metrics.jsonl and tensorboard go here; a run resumes
      from its newest readable checkpoint.
    stop_after_step: stop (after checkpointing) once this step is done, as a
      preemption would; re-running resumes. Returns None then.
    settings: the run's settings as given (a dict), written to `config.json` once the
      run has restored or initialized (`record_settings`).

  Only one process trains in a workdir at a time (`workdir_lock.hold`).

  While it runs, Python's thread switch interval (process-wide) is
  `config.train.thread_switch_interval_s` (0.1 ms; 0 leaves it alone); it is
  restored afterwards.
  """
  with workdir_lock.hold(workdir), _thread_switch_interval(config.train.thread_switch_interval_s):
    return _train(config, workdir, stop_after_step, settings)


def _train(config: TrainConfig, workdir: str, stop_after_step: int | None, settings: dict | None) -> dict[str, float] | None:
  run = build(config)
  total = config.train.steps
  iterator = data.train_iterator(
      config.data,
      global_batch_size=config.train.global_batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
  validation = _eval_batches(config)  # opened now: a missing or empty split stops the run before step 0
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), every=config.train.checkpoint_every, keep=config.train.keep_checkpoints
  )
  start, state = restore_or_init(run, checkpointer, iterator)
  if settings is not None:
    record_settings(workdir, settings)
  if start == 0:
    metrics.set_aside_stale(workdir)
  else:
    metrics.drop_replayed(workdir, start)
  tokens_per_step = config.train.global_batch_size * config.data.seq_len
  flops_per_step = llama.flops_per_token(config.model, config.data.seq_len) * tokens_per_step
  devices = run.mesh.devices.size
  peak = metrics.peak_flops_per_device()
  log = metrics.MetricsLogger(workdir, total_steps=total, initial_step=start)
  last_eval = None
  profiler = None
  try:
    if start >= total:
      logger.info("already trained to step %d of %d", start, total)
    else:
      first = sharding.device_batch(next(iterator), run.batch_sharding)
      compiled = run.train_step.lower(state, first).compile()
      _describe(run, state, compiled)
      check_fits(compiled, config, device_memory_limit())
      pending = None  # (step number after the update, metrics on device)
      clock = metrics.StepClock()
      profiler = metrics.StepProfiler(os.path.join(workdir, "profile"), config.train.profile_range(), start, total)
      batch = first

      def read(pending, *, forced=False):  # forced: right after its own step's dispatch
        step_done, step_metrics = pending
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        bad = {k: values[k] for k in ("loss", "grad_norm", "update_norm") if k in values and not math.isfinite(values[k])}
        if bad:
          # Read before any save of this step's state: every checkpoint written holds finite values.
          checkpointer.wait()  # the saves in flight complete before the newest is named
          newest = checkpointer.newest_step()
          kept = (f"the newest checkpoint, step {newest} in {checkpointer.directory}, holds the finite state before it"
                  if newest is not None else "no checkpoint was written")
          log.write(step_done, values)  # the failing step's numbers, under the step the message names
          raise FloatingPointError(
              f"non-finite {', '.join(f'{k} {v}' for k, v in bad.items())} at step {step_done}: stopping; {kept}"
              " (lower optimizer.lr / optimizer.poet_lr, or check the data)."
          )
        if not forced:
          clock.mark(step_done)
        log.advance(1)
        if step_done % config.train.log_every == 0 or step_done == total:
          seconds = clock.window_seconds()  # NaN (null in metrics.jsonl) where nothing was timed
          record = {
              "seconds": seconds,
              "tflops_per_device": flops_per_step / seconds / devices / 1e12,
              "tokens_per_sec": tokens_per_step / seconds / devices,
              **({"mfu": flops_per_step / seconds / devices / peak} if peak else {}),
              **values,
          }
          log.write(step_done, record)

      for step in range(start, total):
        if profiler.before(step):
          clock.restart()
        if batch is None:
          batch = sharding.device_batch(next(iterator), run.batch_sharding)
        state, step_metrics = compiled(state, batch)  # dispatch step t ...
        batch = None
        checkpointer.check_saves()  # an earlier asynchronous save that failed stops the run here
        if profiler.after(step, step_metrics):
          clock.restart()
        if pending is not None:
          read(pending)  # ... then read step t-1
        pending = (step + 1, step_metrics)
        step_done = step + 1
        due_eval = config.train.eval_every and step_done % config.train.eval_every == 0
        due_save = step_done % config.train.checkpoint_every == 0 or step_done == total
        stopping = stop_after_step is not None and step_done >= stop_after_step and step_done < total
        due_spectrum = config.train.spectrum_every and (step_done % config.train.spectrum_every == 0 or step == start)
        if due_eval or due_save or stopping or due_spectrum:
          read(pending, forced=True)  # never save, evaluate or measure a state whose loss is unread
          pending = None
          clock.restart()
        if due_save or stopping:
          checkpointer.save(step_done, state, iterator, force=True)
        if stopping:
          logger.info("stopping after step %d as asked; re-run to resume", step_done)
          return None
        if due_spectrum:
          sigmas = _spectrum(run, state)
          log.write(step_done, {f"sigma_max/{k}": float(v) for k, v in sigmas.items()}, kind="spectrum")
        if due_eval or step_done == total:
          last_eval = evaluate.evaluate(run.eval_step, state.params, state.frozen, validation, run.batch_sharding)
          log.write(step_done, last_eval, kind="eval")
      if pending is not None:
        read(pending)
    if last_eval is None:
      last_eval = evaluate.evaluate(run.eval_step, state.params, state.frozen, validation, run.batch_sharding)
      log.write(int(state.step), last_eval, kind="eval")
  finally:
    with contextlib.ExitStack() as closing:  # each runs even if another raises
      closing.callback(checkpointer.close)
      closing.callback(log.close)
      if hasattr(iterator, "close"):
        closing.callback(iterator.close)
      if profiler is not None:
        closing.callback(profiler.close)
  return last_eval


def evaluate_checkpoint(config: TrainConfig, workdir: str) -> dict[str, float]:
  """Evaluates the newest readable checkpoint in `workdir` (no training; it holds the workdir's
  lock too, as it may set aside an unreadable checkpoint and appends to metrics.jsonl)."""
  with workdir_lock.hold(workdir):
    return _evaluate_checkpoint(config, workdir)


def _evaluate_checkpoint(config: TrainConfig, workdir: str) -> dict[str, float]:
  run = build(config)
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), every=config.train.checkpoint_every, keep=config.train.keep_checkpoints
  )
  try:
    abstract = checkpointing.abstract_tree(jax.eval_shape(run.init_fn), run.state_shardings)
    restored = checkpointer.restore_latest(abstract, None)
    if restored is None:
      raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}: train first, or set --workdir to a run directory.")
    step, state = restored
    result = evaluate.evaluate(run.eval_step, state.params, state.frozen, _eval_batches(config), run.batch_sharding)
  finally:
    checkpointer.close()
  log = metrics.MetricsLogger(workdir, total_steps=config.train.steps, initial_step=step)
  log.write(step, result, kind="eval_restored")
  log.close()
  return result
