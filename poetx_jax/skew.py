"""Skew-symmetric generators packed as the strict upper triangle (SPEC §3).

Each orthogonal block is parameterized by `E = B(B-1)/2` numbers: the strict
upper triangle of a `B x B` matrix `M` in row-major order (`jnp.triu_indices(B, 1)`);
the skew generator is `Q = M - Mᵀ`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def packed_size(block_size: int) -> int:
  """Number of free entries `E = B(B-1)/2` of one `B x B` skew block."""
  return block_size * (block_size - 1) // 2


def block_size_from_packed(packed_size_e: int) -> int:
  """Inverts `packed_size`: the block size `B` whose skew block has `E` entries.

  Raises:
    ValueError: if `E` is not of the form `B(B-1)/2` for an integer `B >= 2`.
  """
  block = (1 + math.isqrt(1 + 8 * packed_size_e)) // 2
  if block < 2 or packed_size(block) != packed_size_e:
    raise ValueError(f"{packed_size_e} is not B(B-1)/2 for any block size B >= 2.")
  return block


def _triu(block_size: int) -> tuple[np.ndarray, np.ndarray]:
  return np.triu_indices(block_size, 1)


def skew_from_packed(q_RxE: jax.Array, block_size: int) -> jax.Array:
  """Builds the skew blocks `Q = M - Mᵀ` from their packed strict upper triangles.

  Args:
    q_RxE: `(..., R, E)` packed generators, `E = B(B-1)/2`.
    block_size: `B`.

  Returns:
    `(..., R, B, B)` skew-symmetric blocks in the dtype of `q_RxE`.

  Raises:
    ValueError: if the last axis is not `B(B-1)/2`.
  """
  if q_RxE.shape[-1] != packed_size(block_size):
    raise ValueError(
        f"packed generators have {q_RxE.shape[-1]} entries per block; block size"
        f" {block_size} needs {packed_size(block_size)}."
    )
  # A gather, not a scatter (much faster on GPUs): entry (i, j) reads packed slot
  # `index[i, j]` (the slot of (min, max); the diagonal reads an appended zero) and
  # takes the sign of j - i.
  index_BxB, sign_BxB = _gather_maps(block_size)
  padded_RxE1 = jnp.concatenate([q_RxE, jnp.zeros(q_RxE.shape[:-1] + (1,), q_RxE.dtype)], axis=-1)
  return jnp.take(padded_RxE1, index_BxB, axis=-1) * sign_BxB.astype(q_RxE.dtype)


def _gather_maps(block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(slot of each entry of a B x B skew block in the packed vector, its sign)."""
  i, j = np.meshgrid(np.arange(block_size), np.arange(block_size), indexing="ij")
  lo, hi = np.minimum(i, j), np.maximum(i, j)
  # Row-major strict upper triangle: row `lo` starts after lo*B - lo(lo+1)/2 entries.
  slot = lo * block_size - lo * (lo + 1) // 2 + (hi - lo - 1)
  slot = np.where(i == j, packed_size(block_size), slot).astype(np.int32)
  return slot, np.sign(j - i).astype(np.int8)


def packed_from_skew(q_RxBxB: jax.Array) -> jax.Array:
  """Reads the packed strict upper triangle off `(..., R, B, B)` blocks."""
  rows, cols = _triu(q_RxBxB.shape[-1])
  return q_RxBxB[..., rows, cols]


def packed_skew_cotangent(dq_RxBxB: jax.Array) -> jax.Array:
  """Pulls a cotangent of `Q` back to the packed vector: `dq = dQ[r, c] - dQ[c, r]`."""
  rows, cols = _triu(dq_RxBxB.shape[-1])
  return dq_RxBxB[..., rows, cols] - dq_RxBxB[..., cols, rows]
