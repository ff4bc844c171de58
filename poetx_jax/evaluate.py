"""Validation loss and perplexity: during training and from a checkpoint directory alone."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
import numpy as np

from poetx_jax import sharding


def process_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's share of a global batch (every process reads the same eval batches)."""
  count, index = jax.process_count(), jax.process_index()
  rows = next(iter(batch.values())).shape[0]
  if rows % count:
    raise ValueError(f"eval batch of {rows} rows cannot be split over {count} processes.")
  per = rows // count
  return {k: v[index * per : (index + 1) * per] for k, v in batch.items()}


def evaluate(
    eval_step: Callable[..., Any], params: Any, frozen: Any, batches: Iterable[dict[str, np.ndarray]], batch_sharding
) -> dict[str, float]:
  """Token-weighted mean loss over `batches` and its perplexity.

  Raises:
    ValueError: when the batches hold no real token (an empty validation split).
  """
  loss_sum, tokens = 0.0, 0.0
  for batch in batches:
    batch_loss, batch_tokens = eval_step(params, frozen, sharding.device_batch(process_rows(batch), batch_sharding))
    loss_sum += float(batch_loss)
    tokens += float(batch_tokens)
  if tokens == 0:
    raise ValueError("the validation batches hold no tokens: check data.eval_split and train.eval_batches.")
  val_loss = loss_sum / tokens
  return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)), "val_tokens": tokens}
