"""Learning-rate schedules of the POET recipes (SPEC §8): linear warmup, cosine, floor."""

from __future__ import annotations

import optax


def warmup_cosine(peak: float, *, warmup_steps: int, total_steps: int, min_ratio: float) -> optax.Schedule:
  """Linear warmup from 0 to `peak`, then cosine decay to `peak × min_ratio` at `total_steps`.

  Raises:
    ValueError: for a floor outside [0, 1] or a warmup longer than the run.
  """
  if not 0.0 <= min_ratio <= 1.0:
    raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_ratio}.")
  if warmup_steps < 0 or total_steps <= 0:
    raise ValueError(f"need warmup_steps >= 0 and total steps > 0, got {warmup_steps} and {total_steps}.")
  if warmup_steps >= total_steps:
    raise ValueError(f"warmup_steps={warmup_steps} must be smaller than the run's {total_steps} steps.")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup_steps,
      decay_steps=total_steps,
      end_value=peak * min_ratio,
  )
