"""Feature permutations of POET-BS and their keys (SPEC §1, §6).

Permutations are int32 index vectors `p` acting as `x[..., p]`. Keys come from
(seed, merge index, layer path) alone, so every replica of a data-parallel run
draws the same permutations without communication.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp


def layer_key(seed: int, merge_index: jax.Array | int, layer_path: str) -> jax.Array:
  """The key of one layer's permutations after merge number `merge_index` (0 at init).

  `layer_path` is hashed with CRC32, which, unlike Python's `hash`, is the same in
  every process.
  """
  key = jax.random.fold_in(jax.random.key(seed), merge_index)
  return jax.random.fold_in(key, zlib.crc32(layer_path.encode()) & 0x7FFFFFFF)


def draw_permutations(key: jax.Array, d_in: int, d_out: int) -> tuple[jax.Array, jax.Array]:
  """Draws `(perm_in_inv, perm_out)`: the two gathers of the forward (SPEC §4)."""
  key_in, key_out = jax.random.split(key)
  perm_in_inv = jax.random.permutation(key_in, d_in).astype(jnp.int32)
  perm_out = jax.random.permutation(key_out, d_out).astype(jnp.int32)
  return perm_in_inv, perm_out


def invert(perm_D: jax.Array) -> jax.Array:
  """The inverse permutation (`x[..., p][..., invert(p)] == x`), by one int32 scatter."""
  return jnp.zeros_like(perm_D).at[perm_D].set(jnp.arange(perm_D.shape[0], dtype=perm_D.dtype))


@functools.partial(jax.jit, static_argnums=(1,))
def is_permutation(perm_D: jax.Array, size: int) -> jax.Array:
  """True when `perm_D` holds each of `0 .. size-1` exactly once."""
  counts = jnp.zeros((size,), jnp.int32).at[perm_D].add(1, mode="drop")
  return (perm_D.shape[0] == size) & jnp.all(counts == 1)
