"""Block-diagonal rotations applied without building the block-diagonal matrix.

`x @ BD(G)` for `G` of shape `(R, B, B)` is `R` batched `B x B` products on the
feature axis split as `(R, B)`: about `2·N·D·B` FLOPs instead of `2·N·D²`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`einsum` with float32 accumulation and output.

  XLA:CPU has no bf16 x bf16 -> f32 dot, so there the operands are upcast first;
  elsewhere the dot reads them in their own dtype.
  """
  if jax.default_backend() == "cpu":
    return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def rotate_blocks(x_ND: jax.Array, g_RxBxB: jax.Array, *, transpose: bool = False) -> jax.Array:
  """`x @ BD(G)` (or `x @ BD(G)ᵀ`), accumulated in float32, returned in `x`'s dtype.

  Args:
    x_ND: `(..., D)` with `D = R·B`.
    g_RxBxB: `(R, B, B)` blocks, cast to `x`'s dtype for the product.
    transpose: multiply by each block's transpose (the backward of a rotation).

  Returns:
    `(..., D)` rotated features.
  """
  num_blocks, block, _ = g_RxBxB.shape
  x_NxRxB = x_ND.reshape(x_ND.shape[:-1] + (num_blocks, block))
  spec = "...rb,rcb->...rc" if transpose else "...rb,rbc->...rc"
  y_NxRxB = einsum_f32(spec, x_NxRxB, g_RxBxB.astype(x_ND.dtype))
  return y_NxRxB.astype(x_ND.dtype).reshape(x_ND.shape)


def rotate_matrix_rows(k_IxO: jax.Array, g_RxBxB: jax.Array) -> jax.Array:
  """`BD(G) @ K` for `K` of shape `(I, O)`, `I = R·B` (float32, HIGHEST precision)."""
  num_blocks, block, _ = g_RxBxB.shape
  k_RxBxO = k_IxO.reshape(num_blocks, block, k_IxO.shape[-1])
  out = jnp.einsum("rab,rbo->rao", g_RxBxB, k_RxBxO, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(k_IxO.shape)


def rotate_matrix_cols(k_IxO: jax.Array, g_RxBxB: jax.Array) -> jax.Array:
  """`K @ BD(G)` for `K` of shape `(I, O)`, `O = R·B` (float32, HIGHEST precision)."""
  num_blocks, block, _ = g_RxBxB.shape
  k_IxRxB = k_IxO.reshape(k_IxO.shape[0], num_blocks, block)
  out = jnp.einsum("irb,rbc->irc", k_IxRxB, g_RxBxB, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(k_IxO.shape)


# The data-path primitives of a POET-X layer (SPEC §4), feature-major.
#
# Activations inside the layer are transposed to `(D, N)` (tokens contiguous): the
# permutations then move whole rows, which reads and writes memory in full lines,
# where gathering columns of a row-major `(N, D)` array touches one 32-byte sector
# per element (about 4x slower on an H100). An implementation (XLA here, Pallas in
# `poetx_jax.kernels`) supplies each primitive with the same signature.


def rotate_rows(a_DxN: jax.Array, g_RxBxB: jax.Array, *, transpose: bool = False) -> jax.Array:
  """`(aᵀ · BD(G))ᵀ` (or with `BD(G)ᵀ`): each group of `B` rows mixed by its block."""
  num_blocks, block, _ = g_RxBxB.shape
  a_RxBxN = a_DxN.reshape(num_blocks, block, a_DxN.shape[-1])
  spec = "rcb,rbn->rcn" if transpose else "rbc,rbn->rcn"
  out = einsum_f32(spec, g_RxBxB.astype(a_DxN.dtype), a_RxBxN)
  return out.astype(a_DxN.dtype).reshape(a_DxN.shape)


def blocks_used(rows: int, g_RxBxB, block_offset: int) -> int:
  """How many blocks `rows` rows take, checked against the blocks `G` holds from `block_offset` on."""
  total, block = g_RxBxB.shape[0], g_RxBxB.shape[-1]
  if rows % block or not 0 <= block_offset <= total - rows // block:
    raise ValueError(
        f"activations have {rows} rows and G has {total} blocks of {block}: the rows must be a"
        f" multiple of {block}, and block_offset ({block_offset}) + rows/{block} at most {total}."
    )
  return rows // block


def _blocks_from(g_RxBxB: jax.Array, rows: int, block_offset: int) -> jax.Array:
  """The blocks of `G` that `rows` rows use, starting at `block_offset`."""
  return jax.lax.slice_in_dim(g_RxBxB, block_offset, block_offset + blocks_used(rows, g_RxBxB, block_offset))


def gather_rotate(
    a_DxN: jax.Array, perm_D: jax.Array, g_RxBxB: jax.Array, *, transpose: bool = False, block_offset: int = 0
) -> jax.Array:
  """Rows gathered by `perm`, then rotated: the input side of the forward (`x[..., perm]·BD(G)`).

  `block_offset`: row block `r` uses `G[block_offset + r]` (one layer keeps both
  sides' blocks in one array).
  """
  g_RxBxB = _blocks_from(g_RxBxB, a_DxN.shape[0], block_offset)
  return rotate_rows(jnp.take(a_DxN, perm_D, axis=0), g_RxBxB, transpose=transpose)


def rotate_gather(
    a_DxN: jax.Array, g_RxBxB: jax.Array, perm_D: jax.Array, perm_inv_D: jax.Array, *, transpose: bool = False,
    block_offset: int = 0,
) -> jax.Array:
  """Rows rotated, then gathered by `perm` (a kernel may scatter by `perm_inv` instead)."""
  del perm_inv_D
  g_RxBxB = _blocks_from(g_RxBxB, a_DxN.shape[0], block_offset)
  return jnp.take(rotate_rows(a_DxN, g_RxBxB, transpose=transpose), perm_D, axis=0)


def gathered_block_outer_sum(
    a_DxN: jax.Array, perm_a_D: jax.Array | None, g_DxN: jax.Array, perm_g_D: jax.Array | None, block_size: int
) -> jax.Array:
  """`dG[r] = Σ_n a[perm_a]_r · g[perm_g]_rᵀ` over row blocks (`None`: no gather), float32."""
  if perm_a_D is not None:
    a_DxN = jnp.take(a_DxN, perm_a_D, axis=0)
  if perm_g_D is not None:
    g_DxN = jnp.take(g_DxN, perm_g_D, axis=0)
  shape = (a_DxN.shape[0] // block_size, block_size, a_DxN.shape[-1])
  return einsum_f32("rbn,rcn->rbc", a_DxN.reshape(shape), g_DxN.reshape(shape))


def block_outer_sum_into(into, a_DxN, perm_a_D, g_DxN, perm_g_D, block_offset: int, copy_into=None):
  """`gathered_block_outer_sum` written as blocks `block_offset…` of a float32 `(R', B, B)` result.

  `into`: the result so far (its other blocks kept), or a `jax.ShapeDtypeStruct`
  for a fresh one (its other blocks zero here; a kernel may leave them unwritten).
  `copy_into`: optional second buffer of the same kind in its own dtype, which gets
  the same blocks rounded; then `(result, copy)` is returned.
  """
  sums = gathered_block_outer_sum(a_DxN, perm_a_D, g_DxN, perm_g_D, into.shape[-1])
  if not 0 <= block_offset <= into.shape[0] - sums.shape[0]:
    raise ValueError(f"{sums.shape[0]} blocks from block {block_offset} on do not fit in {into.shape[0]}.")
  result = _write_blocks(into, sums, block_offset)
  if copy_into is None:
    return result
  return result, _write_blocks(copy_into, sums, block_offset)


def rotate_outer_sum_into(
    into, s_DxN, gather_s_D, a_DxN, gather_a_D, g_RxBxB, block_offset: int, out_perm_D=None, out_perm_inv_D=None,
    copy_into=None,
):
  """One side of the layer's backward: `S = s[gather_s]` rotated by `G` (`G_r·S_r` per
  block, then gathered by `out_perm`), and `Σ_n a[gather_a]·Sᵀ` written as blocks
  `block_offset…` of `into` (and of `copy_into`).

  Both read `S`, so a kernel computes them in one pass (`kernels/rotate_outer_sum.py`,
  which scatters by `out_perm_inv` instead). Returns `(rot, dG)` or `(rot, dG, copy)`.
  """
  del out_perm_inv_D
  shared_DxN = s_DxN if gather_s_D is None else jnp.take(s_DxN, gather_s_D, axis=0)
  rot = rotate_rows(shared_DxN, _blocks_from(g_RxBxB, s_DxN.shape[0], block_offset), transpose=True)
  if out_perm_D is not None:
    rot = jnp.take(rot, out_perm_D, axis=0)
  sums = block_outer_sum_into(into, a_DxN, gather_a_D, s_DxN, gather_s_D, block_offset, copy_into=copy_into)
  return (rot, sums) if copy_into is None else (rot, *sums)


def _write_blocks(into, blocks, block_offset):
  """`into` (an array, or a `ShapeDtypeStruct` read as zeros) with `blocks` at `block_offset`, in its dtype."""
  end = block_offset + blocks.shape[0]
  if isinstance(into, jax.ShapeDtypeStruct):
    before = jnp.zeros((block_offset,) + into.shape[1:], into.dtype)
    after = jnp.zeros((into.shape[0] - end,) + into.shape[1:], into.dtype)
  else:
    before, after = into[:block_offset], into[end:]
  return jnp.concatenate([before, blocks.astype(into.dtype), after], axis=0)
