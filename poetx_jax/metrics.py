"""What a user sees: one MaxText-style line per log step, tensorboardX, metrics.jsonl, tqdm.

Every record goes to three places at once: the log (a line), tensorboard scalars in
the workdir, and `workdir/metrics.jsonl` (one JSON object per line), written only by
process 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable

import jax

logger = logging.getLogger("poetx_jax")

# Dense bf16 peak FLOP/s per device, for MFU (datasheet values, no sparsity).
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "v5e": 197e12, "v5p": 459e12, "v4": 275e12}


def peak_flops_per_device() -> float | None:
  """The device's dense bf16 peak, or None where it is unknown (CPU)."""
  kind = jax.devices()[0].device_kind
  for name, flops in _PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


class StepClock:
  """Seconds per train step, from the times at which the loop reads each step's metrics.

  The loop reads step t−1 right after dispatching step t. With asynchronous dispatch
  that read returns once t−1 has run; on a GPU, dispatching a step returns only once
  that step has nearly run (likely the merge's `lax.cond`), so the read of
  t−1 returns once t has. Either way consecutive reads are one step apart. A read
  forced right after its own step's dispatch (before a checkpoint, an evaluation, the
  last step) fits neither pattern, so the loop does not `mark` it: counted, it made
  the last window of a GPU run one step short (2.39 against 3.18 s a step). Saving and
  evaluating are not a step's time either (`restart`).
  """

  def __init__(self, now: Callable[[], float] = time.perf_counter):
    self._now = now
    self._start: tuple[float, int] | None = None
    self._last: tuple[float, int] | None = None

  def mark(self, step: int) -> None:
    """Step `step`'s metrics were just read, right after the next step's dispatch."""
    self._last = (self._now(), step)
    if self._start is None:
      self._start = self._last

  def restart(self) -> None:
    """Time spent since the last mark (a save, an evaluation) is not a step's."""
    self._start = self._last = None

  def window_seconds(self) -> float:
    """Mean seconds per step since the previous call; NaN until two marks are a step apart."""
    if self._start is None or self._last[1] == self._start[1]:
      return math.nan
    seconds = (self._last[0] - self._start[0]) / (self._last[1] - self._start[1])
    self._start = self._last
    return seconds


class StepProfiler:
  """A `jax.profiler` trace of the steps `train.profile_steps` names (device kernels and
  host events, Perfetto `perfetto_trace.json.gz` beside TensorBoard's files).

  The trace starts before the first step's batch is made and stops once the last
  step has run, so host gaps between steps are in it. Steps before `start` (a resumed
  run) or from `total` on are never run: a range with none left is reported, not
  silently skipped.
  """

  def __init__(self, log_dir: str, steps: range | None, start: int, total: int):
    self._log_dir = log_dir
    self._running = False
    self._steps = None
    if steps is None:
      return
    kept = range(max(steps.start, start), min(steps.stop, total))
    if not kept:
      logger.warning("train.profile_steps %d:%d: none of these steps runs (steps %d to %d do): no profile",
                     steps.start, steps.stop, start, total)
      return
    self._steps = kept

  def before(self, step: int) -> bool:
    """Starts the trace before the range's first step; True then (starting is not a step's time)."""
    if self._steps is None or step != self._steps.start:
      return False
    try:
      jax.profiler.start_trace(self._log_dir, create_perfetto_trace=True)
    except RuntimeError as error:  # another trace is running in this process: train on without ours
      logger.warning("train.profile_steps: no profile, the profiler would not start (%s)", error)
      return False
    self._running = True
    return True

  def after(self, step: int, step_metrics) -> bool:
    """Stops the trace after the range's last step; True then (writing it is not a step's time)."""
    if not (self._running and step == self._steps[-1]):
      return False
    jax.block_until_ready(step_metrics)
    self.close()
    logger.info("profiled steps %d to %d: %s", self._steps.start, step, self._log_dir)
    return True

  def close(self) -> None:
    """Stops a running trace (also when the loop ends early)."""
    if self._running:
      self._running = False
      jax.profiler.stop_trace()


def _format(value: Any) -> str:
  if isinstance(value, float):
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
      return f"{value:.3e}"
    return f"{value:.4f}"
  return str(value)


class MetricsLogger:
  """Writes each record to the log, tensorboard, `metrics.jsonl` and a progress bar."""

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0):
    self.is_main = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._writer = None
    self._bar = None
    if not self.is_main:
      return
    os.makedirs(workdir, exist_ok=True)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    if sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top

      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, record: dict[str, Any], *, kind: str = "train") -> None:
    """Logs one record (floats, ints) at `step`; `kind` prefixes the tensorboard tags."""
    if not self.is_main:
      return
    clean = {k: (float(v) if hasattr(v, "dtype") else v) for k, v in record.items()}
    line = ", ".join(f"{k}: {_format(v)}" for k, v in clean.items())
    message = f"{kind} step: {step}, {line}"
    if self._bar is not None:
      self._bar.write(message)
    else:
      logger.info(message)
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, "kind": kind, **_jsonable(clean)}) + "\n")
    for key, value in clean.items():
      if isinstance(value, (int, float)) and math.isfinite(value):
        self._writer.add_scalar(f"{kind}/{key}", value, step)
    self._writer.flush()

  def advance(self, steps: int) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._writer is not None:
      self._writer.close()


def set_aside_stale(workdir: str) -> None:
  """Renames a metrics.jsonl left by a run that saved no checkpoint: a fresh run starts a fresh log."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() == 0 and os.path.exists(path):
    stale = f"{path}.stale-{int(time.time())}"
    os.rename(path, stale)
    logger.warning("no checkpoint in %s: starting from step 0; the old metrics.jsonl is kept as %s", workdir, stale)


def drop_replayed(workdir: str, step: int) -> None:
  """On resuming at `step`: moves records of later steps (written after that checkpoint, before
  the run stopped; the resumed run writes them again) from metrics.jsonl to metrics.replayed.jsonl,
  so each step is in metrics.jsonl once and nothing is lost."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep, replayed = [], []
  for line in lines:
    try:
      later = json.loads(line)["step"] > step
    except (ValueError, KeyError, TypeError):
      later = True  # a torn last line of a killed run: moved with the replayed records, not lost
    (replayed if later else keep).append(line if line.endswith("\n") else line + "\n")
  if not replayed:
    return
  with open(os.path.join(workdir, "metrics.replayed.jsonl"), "a") as f:
    f.writelines(replayed)
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)
  logger.info("resuming at step %d: %d records of later steps moved to metrics.replayed.jsonl", step, len(replayed))


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
