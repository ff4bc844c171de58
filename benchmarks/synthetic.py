"""Random-token batches for benchmarks that time the train step, not the input pipeline."""

from __future__ import annotations

import numpy as np

from poetx_jax import sharding


def token_batch(run, rows: int, seq_len: int, vocab_size: int, seed: int = 0):
  """A global `{"inputs", "targets", "weights"}` batch of random tokens on `run`'s mesh."""
  tokens = np.random.default_rng(seed).integers(0, vocab_size, (rows, seq_len + 1), dtype=np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((rows, seq_len), np.int32)}
  return sharding.device_batch(batch, run.batch_sharding)
