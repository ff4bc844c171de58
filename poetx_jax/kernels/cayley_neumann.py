"""The Cayley–Neumann map (k = 3) from packed skew vectors, forward and backward fused.

    Q2 = Q·Q;   G = I + 2Q + 2Q2 + Q2·(2Q + Q2)         (= I + 2Q + 2Q² + 2Q³ + Q⁴)

The first kernel unpacks `Q` from the strict upper triangle
(`q[r, slot(min(i,j), max(i,j))]` with the sign of `j - i`) once, so the product
kernels read plain contiguous tiles:

* forward: `Q`, `Q2` (one tiled product), then `G` (one tiled product plus an epilogue);
* backward (SPEC §3, with `Qᵀ = −Q`, `Q2ᵀ = Q2`): `Q`, `Q2`, `∇2 = −(dG·Q + Q·dG)`,
  then `dQ = (∇2 + 2dG)·Q2 + (Q2 − 2Q)·∇2 + 2(dG + ∇2)`, where each program computes
  a pair of mirrored tiles `dQ[m, n]`, `dQ[n, m]` and writes `dq = dQ − dQᵀ`
  straight into the packed triangle.

Products run in float32 on the GPU's TF32 path by default (`precision=HIGHEST` for
IEEE float32), which only rounds the `Q²` terms: `G = I + 2Q + …` keeps `2Q` exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from poetx_jax import skew
from poetx_jax.cayley import cayley_neumann_reference  # noqa: F401  (the reference, re-exported)
from poetx_jax.kernels import block_sizes
from poetx_jax.kernels import triton_backend as tb


def _slot(i, j, block):
  lo, hi = jnp.minimum(i, j), jnp.maximum(i, j)
  return lo * block - (lo * (lo + 1)) // 2 + (hi - lo - 1)


def _skew_tile(q_ref, r, i, j, block):
  """`Q_r[i, j]` for broadcastable index arrays, read from the packed vector."""
  off_diagonal = i != j
  slot = jnp.where(off_diagonal, _slot(i, j, block), 0)
  value = tb.load(q_ref.at[r, slot], mask=off_diagonal, other=0.0)
  return jnp.where(i < j, value, -value)


def _tile_indices(tiles):
  rows = tb.program_id(1) * tiles.side + jnp.arange(tiles.side)
  cols = tb.program_id(2) * tiles.side + jnp.arange(tiles.side)
  return rows[:, None], cols[None, :]


def _skew_kernel(q_ref, o_ref, *, block, tiles):
  r = tb.program_id(0)
  i, j = _tile_indices(tiles)
  tb.store(o_ref.at[r, i, j], _skew_tile(q_ref, r, i, j, block))


def _square_kernel(q_ref, o_ref, *, block, tiles, precision):
  r = tb.program_id(0)
  i, j = _tile_indices(tiles)

  def step(k, acc):
    inner = k * tiles.depth + jnp.arange(tiles.depth)
    left = tb.load(q_ref.at[r, i, inner[None, :]])
    right = tb.load(q_ref.at[r, inner[:, None], j])
    return acc + tb.dot(left, right, precision)

  acc = jax.lax.fori_loop(0, block // tiles.depth, step, jnp.zeros((tiles.side, tiles.side), jnp.float32))
  tb.store(o_ref.at[r, i, j], acc)


def _neumann_kernel(q_ref, q2_ref, o_ref, *, block, tiles, precision):
  r = tb.program_id(0)
  i, j = _tile_indices(tiles)

  def step(k, acc):
    inner = k * tiles.depth + jnp.arange(tiles.depth)
    q2_left = tb.load(q2_ref.at[r, i, inner[None, :]])
    poly = 2.0 * tb.load(q_ref.at[r, inner[:, None], j]) + tb.load(q2_ref.at[r, inner[:, None], j])
    return acc + tb.dot(q2_left, poly, precision)

  acc = jax.lax.fori_loop(0, block // tiles.depth, step, jnp.zeros((tiles.side, tiles.side), jnp.float32))
  g = acc + 2.0 * (tb.load(q_ref.at[r, i, j]) + tb.load(q2_ref.at[r, i, j])) + jnp.where(i == j, 1.0, 0.0)
  tb.store(o_ref.at[r, i, j], g)


def _grad2_kernel(q_ref, dg_ref, o_ref, *, block, tiles, precision):
  """`∇2 = dG·Qᵀ + Qᵀ·dG = −(dG·Q + Q·dG)`."""
  r = tb.program_id(0)
  i, j = _tile_indices(tiles)

  def step(k, acc):
    inner = k * tiles.depth + jnp.arange(tiles.depth)
    dg_left = tb.load(dg_ref.at[r, i, inner[None, :]])
    q_right = tb.load(q_ref.at[r, inner[:, None], j])
    q_left = tb.load(q_ref.at[r, i, inner[None, :]])
    dg_right = tb.load(dg_ref.at[r, inner[:, None], j])
    return acc + tb.dot(dg_left, q_right, precision) + tb.dot(q_left, dg_right, precision)

  acc = jax.lax.fori_loop(0, block // tiles.depth, step, jnp.zeros((tiles.side, tiles.side), jnp.float32))
  tb.store(o_ref.at[r, i, j], -acc)


def _dq_tile(q_ref, dg_ref, q2_ref, g2_ref, r, i, j, block, tiles, precision):
  """`dQ[i, j] = ((∇2 + 2dG)·Q2 + (Q2 − 2Q)·∇2)[i, j] + 2(dG + ∇2)[i, j]`."""

  def step(k, acc):
    inner = k * tiles.depth + jnp.arange(tiles.depth)
    row_k, col_k = inner[None, :], inner[:, None]
    left1 = tb.load(g2_ref.at[r, i, row_k]) + 2.0 * tb.load(dg_ref.at[r, i, row_k])
    left2 = tb.load(q2_ref.at[r, i, row_k]) - 2.0 * tb.load(q_ref.at[r, i, row_k])
    acc = acc + tb.dot(left1, tb.load(q2_ref.at[r, col_k, j]), precision)
    return acc + tb.dot(left2, tb.load(g2_ref.at[r, col_k, j]), precision)

  acc = jax.lax.fori_loop(0, block // tiles.depth, step, jnp.zeros((tiles.side, tiles.side), jnp.float32))
  return acc + 2.0 * (tb.load(dg_ref.at[r, i, j]) + tb.load(g2_ref.at[r, i, j]))


def _dq_kernel(pair_rows_ref, pair_cols_ref, q_ref, dg_ref, q2_ref, g2_ref, o_ref, *, block, tiles, precision):
  # q_ref holds the dense Q here.
  r, pair = tb.program_id(0), tb.program_id(1)
  m, n = tb.load(pair_rows_ref.at[pair]), tb.load(pair_cols_ref.at[pair])
  span = jnp.arange(tiles.side)
  i, j = (m * tiles.side + span)[:, None], (n * tiles.side + span)[None, :]
  ij = _dq_tile(q_ref, dg_ref, q2_ref, g2_ref, r, i, j, block, tiles, precision)
  ji = _dq_tile(q_ref, dg_ref, q2_ref, g2_ref, r, j.T, i.T, block, tiles, precision)
  upper = i < j
  # Lanes off the strict upper triangle aim at the spare slot E (sliced off by the
  # caller): no two lanes of a store ever share an address, masked or not.
  spare = block * (block - 1) // 2
  tb.store(o_ref.at[r, jnp.where(upper, _slot(i, j, block), spare)], ij - ji.T, mask=upper)


def _call(kernel, out_shape, grid, tiles, name, interpret, *args):
  return tb.pallas_call(
      kernel, grid=grid, out_shape=out_shape, name=name, interpret=interpret, num_warps=tiles.num_warps
  )(*args)


def _square_blocks(fn, name, q_RxE, block, tiles, interpret, *args):
  """Launches a kernel with one program per `side x side` tile of each `B x B` block."""
  num_blocks, side = q_RxE.shape[0], block // tiles.side
  out = jax.ShapeDtypeStruct((num_blocks, block, block), jnp.float32)
  return _call(functools.partial(fn, block=block, tiles=tiles), out, (num_blocks, side, side), tiles, name, interpret, *args)


def _dense_skew_and_square(q_RxE, block, precision, interpret):
  tiles = block_sizes.cayley_tiles(block)
  q = _square_blocks(_skew_kernel, "poetx_cayley_skew", q_RxE, block, tiles, interpret, q_RxE)
  square = functools.partial(_square_kernel, precision=precision)
  return tiles, q, _square_blocks(square, "poetx_cayley_square", q_RxE, block, tiles, interpret, q)


def _forward(q_RxE, block, precision, interpret):
  tiles, q, q2 = _dense_skew_and_square(q_RxE, block, precision, interpret)
  neumann = functools.partial(_neumann_kernel, precision=precision)
  return _square_blocks(neumann, "poetx_cayley_neumann", q_RxE, block, tiles, interpret, q, q2)


def _backward(q_RxE, dg_RxBxB, block, precision, interpret):
  tiles, q, q2 = _dense_skew_and_square(q_RxE, block, precision, interpret)
  grad2 = functools.partial(_grad2_kernel, precision=precision)
  g2 = _square_blocks(grad2, "poetx_cayley_grad2", q_RxE, block, tiles, interpret, q, dg_RxBxB)
  pair_tiles = block_sizes.cayley_pair_tiles(block)
  side = block // pair_tiles.side
  pair_rows, pair_cols = (jnp.asarray(a, jnp.int32) for a in np.triu_indices(side))
  kernel = functools.partial(_dq_kernel, block=block, tiles=pair_tiles, precision=precision)
  out = jax.ShapeDtypeStruct((q_RxE.shape[0], q_RxE.shape[1] + 1), jnp.float32)
  dq_padded = _call(
      kernel, out, (q_RxE.shape[0], pair_rows.shape[0]), pair_tiles, "poetx_cayley_dq", interpret,
      pair_rows, pair_cols, q, dg_RxBxB, q2, g2,
  )
  return dq_padded[:, :-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _cayley(q_RxE, block, precision, interpret):
  return _forward(q_RxE, block, precision, interpret)


def _cayley_fwd(q_RxE, block, precision, interpret):
  return _forward(q_RxE, block, precision, interpret), q_RxE


def _cayley_bwd(block, precision, interpret, q_RxE, dg_RxBxB):
  return (_backward(q_RxE, dg_RxBxB.astype(jnp.float32), block, precision, interpret),)


_cayley.defvjp(_cayley_fwd, _cayley_bwd)


def cayley_neumann(q_RxE, block_size: int, *, precision=None, interpret: bool = False):
  """`G = I + 2Q + 2Q² + 2Q³ + Q⁴` from packed generators, with the fused backward.

  Args:
    q_RxE: `(R, E)` packed strict upper triangles (row-major), `E = B(B-1)/2`.
    block_size: `B`, a power of two >= 16.
    precision: of the tile products (None: TF32 on GPUs; HIGHEST: IEEE float32).
    interpret: run in the Pallas interpreter.

  Returns:
    `(R, B, B)` float32.

  Raises:
    ValueError: for a block size the tiles cannot cover or a mismatched `E`.
  """
  if block_size < 16 or block_size & (block_size - 1):
    raise ValueError(f"the Pallas Cayley–Neumann kernel needs a power-of-two block size >= 16, got {block_size}.")
  if q_RxE.ndim != 2 or q_RxE.shape[-1] != skew.packed_size(block_size):
    raise ValueError(f"q must be (R, {skew.packed_size(block_size)}) for block size {block_size}, got {q_RxE.shape}.")
  return _cayley(q_RxE.astype(jnp.float32), block_size, precision, interpret)
