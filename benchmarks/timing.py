"""Timing on an accelerator: warm-up, rotating inputs larger than L2, median of batches.

Each measurement dispatches `calls` invocations back to back over a ring of input
sets (so the data is not served from L2), synchronizes once, and reports the median
per-call time of several such batches (DESIGN §6).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import jax


def time_ms(fn: Callable[..., Any], input_sets: Sequence[tuple], *, calls: int = 20, batches: int = 7, warmup: int = 3) -> float:
  """Median milliseconds per call of `fn(*inputs)` over rotating `input_sets`."""
  for i in range(warmup):
    jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
  per_call = []
  for _ in range(batches):
    start = time.perf_counter()
    out = None
    for i in range(calls):
      out = fn(*input_sets[i % len(input_sets)])
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - start) * 1e3 / calls)
  return statistics.median(per_call)


def spread(fn, input_sets, **kw) -> tuple[float, float]:
  """Two independent medians of the same thing: their gap is the noise floor."""
  return time_ms(fn, input_sets, **kw), time_ms(fn, input_sets, **kw)
