"""Block rotations of feature-major activations with fused row gathers and scatters.

`block_rotate(a, G, gather=p, scatter=s, transpose=t)` computes, for every block `r`
of `B` rows,

    rot[rB + c, n] = Σ_b M_r[c, b] · a[p[rB + b], n]      (M_r = G_rᵀ, or G_r if t)
    out[s[j], n] = rot[j, n]

reading gathered rows straight from `a` and writing scattered rows straight to
`out`: no permuted copy ever reaches memory. Rows are whole token runs (`a` is
`(D, N)`, tokens contiguous), so gathers and scatters move full cache lines.
The one kernel serves the layer's forward (gather then rotate; rotate then
scatter), its backward, and its own VJP.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from poetx_jax import rotation
from poetx_jax.kernels import block_sizes, block_outer_sum
from poetx_jax.kernels import triton_backend as tb


def block_rotate_reference(a_DxN, g_RxBxB, gather=None, scatter=None, transpose=False):
  """The same map in plain jnp (float32 accumulation)."""
  num_blocks, block, _ = g_RxBxB.shape
  if gather is not None:
    a_DxN = jnp.take(a_DxN, gather, axis=0)
  a_RxBxN = a_DxN.reshape(num_blocks, block, -1).astype(jnp.float32)
  spec = "rcb,rbn->rcn" if transpose else "rbc,rbn->rcn"
  g = g_RxBxB.astype(a_DxN.dtype).astype(jnp.float32)
  rot = jnp.einsum(spec, g, a_RxBxN, precision=jax.lax.Precision.HIGHEST).reshape(a_DxN.shape).astype(a_DxN.dtype)
  if scatter is None:
    return rot
  return jnp.zeros_like(rot).at[scatter].set(rot)


def _kernel(*refs, block, block_offset, tokens_total, tiles, transpose, gather, scatter):
  refs = list(refs)
  gather_ref = refs.pop(0) if gather else None
  scatter_ref = refs.pop(0) if scatter else None
  a_ref, g_ref, o_ref = refs
  r, row_tile, token_tile = tb.program_id(0), tb.program_id(1), tb.program_id(2)
  g_r = r + block_offset  # this row block's G among all the blocks passed
  rows = row_tile * tiles.rows + jnp.arange(tiles.rows)  # output rows within the block
  tokens = token_tile * tiles.tokens + jnp.arange(tiles.tokens)
  token_mask = (tokens < tokens_total)[None, :]

  steps = block // tiles.depth
  if gather:
    # The block's whole gather, loaded before the loop as a `steps x depth` tile (one
    # row picked per step): with each step's indices loaded inside the loop, the rows
    # they address waited on them, unpipelined. Measured on the H100 (N = 2048, bf16,
    # raw/run40_preload_sweep.txt): 60.9 against 65.5 µs at D = 14336, b = 256; 93.5
    # against 102.5 at b = 512; 18.5 against 19.6 at D = 4096.
    step_rows = jnp.arange(steps)[:, None]
    sources = tb.load(gather_ref.at[r * block + step_rows * tiles.depth + jnp.arange(tiles.depth)[None, :]])

  def step(k, acc):
    inner = k * tiles.depth + jnp.arange(tiles.depth)  # input rows within the block
    source = r * block + inner
    if gather:
      source = jnp.sum(jnp.where(step_rows == k, sources, 0), axis=0)
    a = tb.load(a_ref.at[source[:, None], tokens[None, :]], mask=token_mask, other=0)
    if transpose:  # M_r = G_r: M[c, b] = G[r, c, b]
      m = tb.load(g_ref.at[g_r, rows[:, None], inner[None, :]])
    else:  # M_r = G_rᵀ: M[c, b] = G[r, b, c]
      m = tb.load(g_ref.at[g_r, inner[:, None], rows[None, :]]).T
    return acc + tb.dot(m, a)

  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((tiles.rows, tiles.tokens), jnp.float32))
  dest = block_outer_sum.block_rows(scatter_ref, r, block, rows)
  tb.store(o_ref.at[dest[:, None], tokens[None, :]], acc.astype(o_ref.dtype), mask=token_mask)


def _launch(a_DxN, g_RxBxB, gather, scatter, transpose, interpret, tiles=None, block_offset=0):
  _, block, _ = g_RxBxB.shape
  d, n = a_DxN.shape
  num_blocks = rotation.blocks_used(d, g_RxBxB, block_offset)
  tiles = tiles or block_sizes.rotation_tiles(block, n)
  # Every token tile re-reads its block's G: cast once (a no-op when the caller
  # already holds G in the activations' dtype, as the layer does), not per tile.
  g_RxBxB = g_RxBxB.astype(a_DxN.dtype)
  kernel = functools.partial(
      _kernel, block=block, block_offset=block_offset, tokens_total=n, tiles=tiles, transpose=transpose,
      gather=gather is not None, scatter=scatter is not None,
  )
  perms = [p.astype(jnp.int32) for p in (gather, scatter) if p is not None]
  call = tb.pallas_call(
      kernel,
      grid=(num_blocks, block // tiles.rows, tb.cdiv(n, tiles.tokens)),
      out_shape=jax.ShapeDtypeStruct(a_DxN.shape, a_DxN.dtype),
      name="poetx_block_rotate",
      interpret=interpret,
      num_warps=tiles.num_warps,
      num_stages=tiles.num_stages,
  )
  return call(*perms, a_DxN, g_RxBxB)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _block_rotate(a_DxN, g_RxBxB, gather, scatter, transpose, interpret, block_offset):
  return _launch(a_DxN, g_RxBxB, gather, scatter, transpose, interpret, block_offset=block_offset)


def _block_rotate_fwd(a_DxN, g_RxBxB, gather, scatter, transpose, interpret, block_offset):
  out = _launch(a_DxN, g_RxBxB, gather, scatter, transpose, interpret, block_offset=block_offset)
  return out, (a_DxN, g_RxBxB, gather, scatter)


def _block_rotate_bwd(transpose, interpret, block_offset, residuals, dout_DxN):
  a_DxN, g_RxBxB, gather, scatter = residuals
  block = g_RxBxB.shape[-1]
  # d(gathered a) = rot with the other orientation of d(rot) = dout gathered by `scatter`;
  # scattered back by `gather`.
  da = _block_rotate(dout_DxN, g_RxBxB, scatter, gather, not transpose, interpret, block_offset)
  if a_DxN.shape[0] == g_RxBxB.shape[0] * block:  # every block of G used: a fresh buffer
    into = jax.ShapeDtypeStruct(g_RxBxB.shape, jnp.float32)
  else:  # the blocks of G this call did not use get zero cotangents
    into = jnp.zeros(g_RxBxB.shape, jnp.float32)
  if transpose:  # rot[c] = Σ_b G[c, b] x[b]  ->  dG[c, b] = Σ_n drot[c] x[b]
    dg = block_outer_sum.block_outer_sum_into(into, dout_DxN, scatter, a_DxN, gather, block_offset, interpret=interpret)
  else:  # rot[c] = Σ_b G[b, c] x[b]  ->  dG[b, c] = Σ_n x[b] drot[c]
    dg = block_outer_sum.block_outer_sum_into(into, a_DxN, gather, dout_DxN, scatter, block_offset, interpret=interpret)
  return da, dg.astype(g_RxBxB.dtype), None, None


_block_rotate.defvjp(_block_rotate_fwd, _block_rotate_bwd)


def block_rotate(a_DxN, g_RxBxB, *, gather=None, scatter=None, transpose=False, interpret=False, block_offset=0):
  """Rotates each block of `B` rows of `a` by its `G_r` (fused gathers/scatters), differentiable.

  Args:
    a_DxN: `(D, N)` activations, `D = R·B`, any float dtype (the product runs in it,
      accumulating in float32).
    g_RxBxB: `(R', B, B)` blocks (cast to `a`'s dtype), `R' >= block_offset + R`.
    gather: optional `(D,)` int32: read row `gather[i]` where row `i` is needed.
    scatter: optional `(D,)` int32 permutation: write result row `j` to `scatter[j]`.
    transpose: use `G_r` instead of `G_rᵀ` (the backward of a rotation).
    interpret: run in the Pallas interpreter (any backend).
    block_offset: row block `r` uses `G[block_offset + r]`: one layer keeps both
      sides' blocks in one array, with no slice copied out of it.

  Returns:
    `(D, N)` in `a`'s dtype.
  """
  return _block_rotate(a_DxN, g_RxBxB, gather, scatter, transpose, interpret, block_offset)


def gather_rotate(a_DxN, perm_D, g_RxBxB, *, transpose=False, interpret=False, block_offset=0):
  """`rotation.gather_rotate`: rows gathered by `perm`, then rotated."""
  return block_rotate(
      a_DxN, g_RxBxB, gather=perm_D, transpose=transpose, interpret=interpret, block_offset=block_offset
  )


def rotate_gather(a_DxN, g_RxBxB, perm_D, perm_inv_D, *, transpose=False, interpret=False, block_offset=0):
  """`rotation.rotate_gather`: rotated, then gathered by `perm` (a scatter by `perm_inv`)."""
  del perm_D
  return block_rotate(
      a_DxN, g_RxBxB, scatter=perm_inv_D, transpose=transpose, interpret=interpret, block_offset=block_offset
  )
