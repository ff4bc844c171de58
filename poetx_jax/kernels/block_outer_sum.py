"""The blocks' cotangents `S_r = Σ_n a[pa]_r · g[pg]_rᵀ`, with fused row gathers.

For a rotation `rot_r = G_rᵀ x_r` the cotangent of `G_r` is `Σ_tokens x_r drot_rᵀ`
(SPEC §4): a reduction over all tokens of `B x B` outer products per block. Each
program owns one tile of one block's `B x B` result and streams over the tokens, or,
where a layer has too few tiles to fill the GPU and many tokens, over one range of
them; the ranges' partial sums are then added (`block_sizes.outer_sum_tiles`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from poetx_jax.kernels import block_sizes
from poetx_jax.kernels import triton_backend as tb


def block_outer_sum_reference(a_DxN, perm_a, g_DxN, perm_g, block_size):
  """The same reduction in plain jnp (float32)."""
  if perm_a is not None:
    a_DxN = jnp.take(a_DxN, perm_a, axis=0)
  if perm_g is not None:
    g_DxN = jnp.take(g_DxN, perm_g, axis=0)
  shape = (a_DxN.shape[0] // block_size, block_size, a_DxN.shape[1])
  return jnp.einsum(
      "rbn,rcn->rbc", a_DxN.reshape(shape).astype(jnp.float32), g_DxN.reshape(shape).astype(jnp.float32),
      precision=jax.lax.Precision.HIGHEST,
  )


def block_rows(perm_ref, r, block, within):
  """Rows `r·B + within` of a `(D, N)` operand, read through `perm_ref` (a row gather
  or scatter) when there is one: the row indices every kernel here loads or stores."""
  rows = r * block + within
  return rows if perm_ref is None else tb.load(perm_ref.at[rows])


def _kernel(*refs, block, block_offset, tokens_total, split_tokens, tiles, gather_a, gather_g, aliased, copy):
  refs = list(refs)
  perm_a_ref = refs.pop(0) if gather_a else None
  perm_g_ref = refs.pop(0) if gather_g else None
  for _ in range(aliased):
    refs.pop(0)  # buffers written in place: their output refs are the same memory
  a_ref, g_ref, o_ref = refs[:3]
  copy_ref = refs[3] if copy else None
  r, row_tile, col_tile = tb.program_id(0), tb.program_id(1), tb.program_id(2)
  rows = row_tile * tiles.rows + jnp.arange(tiles.rows)
  cols = col_tile * tiles.cols + jnp.arange(tiles.cols)
  source_a = block_rows(perm_a_ref, r, block, rows)
  source_g = block_rows(perm_g_ref, r, block, cols)

  split = tb.program_id(3) if tiles.splits > 1 else 0
  first = split * split_tokens  # this program's token range: [first, first + split_tokens)

  def step(k, acc):
    tokens = first + k * tiles.depth + jnp.arange(tiles.depth)
    mask = (tokens < tokens_total)[None, :]
    a = tb.load(a_ref.at[source_a[:, None], tokens[None, :]], mask=mask, other=0)
    g = tb.load(g_ref.at[source_g[:, None], tokens[None, :]], mask=mask, other=0)
    return acc + tb.dot(a, g.astype(a.dtype).T)

  steps = split_tokens // tiles.depth
  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((tiles.rows, tiles.cols), jnp.float32))
  store_cotangent(acc, o_ref, copy_ref, r, block_offset, rows, cols, split, tiles.splits)


def store_cotangent(acc, dg_ref, copy_ref, r, block_offset, rows, cols, split, splits):
  """A program's `rows x cols` tile of block `r`'s cotangent: with several token ranges
  its range's partial sum (added by `placed_cotangents`), else the result itself at
  block `block_offset + r`, and its rounded copy when `copy_ref` is given."""
  if splits > 1:
    tb.store(dg_ref.at[split, r, rows[:, None], cols[None, :]], acc)
    return
  tb.store(dg_ref.at[r + block_offset, rows[:, None], cols[None, :]], acc)
  if copy_ref is not None:
    tb.store(copy_ref.at[r + block_offset, rows[:, None], cols[None, :]], acc.astype(copy_ref.dtype))


def token_ranges(tokens: int, splits: int, step: int) -> tuple[int, int]:
  """`(tokens a range, ranges)` for `splits` ranges of whole `step`-token steps;
  recounted, as rounding each range up can cover all tokens with fewer (then none is empty)."""
  per_range = tb.cdiv(tb.cdiv(tokens, splits), step) * step
  return per_range, tb.cdiv(tokens, per_range)


def cotangent_outputs(into, copy_into, splits: int, num_blocks: int, block: int, unwritten_fresh: bool) -> list:
  """A kernel's cotangent outputs. With one token range: the result (and its copy)
  itself, an array written in place or a fresh buffer. With several: the ranges'
  partial sums; with `unwritten_fresh`, then each fresh result buffer as an output the
  kernel never writes, which `placed_cotangents` adds the partials into in place, its
  other blocks left unwritten (building a zeroed buffer around them instead wrote all
  of it: 14.5 µs for a layer's 72 blocks, run 85)."""
  if splits == 1:
    return [into] if copy_into is None else [into, copy_into]
  fresh = [b for b in (into, copy_into) if isinstance(b, jax.ShapeDtypeStruct)] if unwritten_fresh else []
  return [jax.ShapeDtypeStruct((splits, num_blocks, block, block), jnp.float32)] + fresh


def alias_held_buffers(operands: list, outputs, first_output: int) -> dict:
  """Appends each output that is an array (not a `ShapeDtypeStruct`) to `operands`
  and aliases it to its output (`first_output + index`): written in place."""
  aliases = {}
  for index, buffer in enumerate(outputs):
    if not isinstance(buffer, jax.ShapeDtypeStruct):
      aliases[len(operands)] = first_output + index
      operands.append(buffer)
  return aliases


def placed_cotangents(results, into, copy_into, block_offset: int, splits: int, unwritten_fresh: bool):
  """A kernel's cotangent results (`cotangent_outputs`' order, the same `unwritten_fresh`)
  as `dG` or `(dG, copy)`; without `unwritten_fresh` a fresh buffer is zeroed around its blocks."""
  if splits == 1:
    return results[0] if copy_into is None else tuple(results)
  partials, *made = results
  made = iter(made)

  def buffer(b):
    if not isinstance(b, jax.ShapeDtypeStruct):
      return b
    return next(made) if unwritten_fresh else jnp.zeros(b.shape, b.dtype)

  into, copy_into = (None if b is None else buffer(b) for b in (into, copy_into))
  return _add_partials(partials, into, block_offset, copy_into)


def _launch(a_DxN, perm_a, g_DxN, perm_g, block_size, interpret, tiles=None, into=None, block_offset=0, copy_into=None):
  """`into`: None (a fresh `(R, B, B)` result), an array to write blocks `block_offset…`
  of in place (aliased), or a `ShapeDtypeStruct` for a fresh buffer of that shape.
  `copy_into`: the same for a second result in its own dtype (then both are returned)."""
  d, n = a_DxN.shape
  if g_DxN.shape != a_DxN.shape or d % block_size:
    raise ValueError(f"need two (D, N) arrays with D divisible by {block_size}; got {a_DxN.shape} and {g_DxN.shape}.")
  num_blocks = d // block_size
  if into is None:
    into = jax.ShapeDtypeStruct((num_blocks, block_size, block_size), jnp.float32)
  if into.shape[1:] != (block_size, block_size) or into.dtype != jnp.float32 or not (
      0 <= block_offset <= into.shape[0] - num_blocks
  ):
    raise ValueError(
        f"the result buffer must be float32 (R', {block_size}, {block_size}) with room for {num_blocks}"
        f" blocks from block {block_offset} on; got {into.dtype} {into.shape}."
    )
  if copy_into is not None and copy_into.shape != into.shape:
    raise ValueError(f"copy_into must have the result's shape {into.shape}, got {copy_into.shape}.")
  tiles = tiles or block_sizes.outer_sum_tiles(block_size, n, num_blocks)
  split_tokens, splits = token_ranges(n, tiles.splits, tiles.depth)
  tiles = dataclasses.replace(tiles, splits=splits)
  operands = [p.astype(jnp.int32) for p in (perm_a, perm_g) if p is not None]
  grid = (num_blocks, block_size // tiles.rows, block_size // tiles.cols)
  if tiles.splits > 1:
    grid += (tiles.splits,)
  # A fresh buffer is zeroed around its blocks here, as it always was (not measured
  # with the fused kernel's unwritten buffers).
  outputs = cotangent_outputs(into, copy_into, tiles.splits, num_blocks, block_size, unwritten_fresh=False)
  aliases = alias_held_buffers(operands, outputs, 0)
  copy = copy_into is not None and tiles.splits == 1
  kernel = functools.partial(
      _kernel, block=block_size, block_offset=block_offset, tokens_total=n,
      split_tokens=split_tokens,
      tiles=tiles, gather_a=perm_a is not None, gather_g=perm_g is not None, aliased=len(aliases), copy=copy,
  )
  out_shape = tuple(jax.ShapeDtypeStruct(b.shape, b.dtype) for b in outputs)
  call = tb.pallas_call(
      kernel,
      grid=grid,
      out_shape=out_shape if len(out_shape) > 1 else out_shape[0],
      name="poetx_block_outer_sum",
      interpret=interpret,
      num_warps=tiles.num_warps,
      num_stages=tiles.num_stages,
      input_output_aliases=aliases,
  )
  result = call(*operands, a_DxN, g_DxN)
  results = list(result) if len(out_shape) > 1 else [result]
  return placed_cotangents(results, into, copy_into, block_offset, tiles.splits, unwritten_fresh=False)


def _add_partials(partials_SxRxBxB, into, block_offset, copy_into):
  """The ranges' partial sums added (one XLA fusion) into blocks `block_offset…` of
  the arrays `into` and `copy_into`, in place."""
  total_RxBxB = partials_SxRxBxB.sum(axis=0)

  def place(buffer):
    return jax.lax.dynamic_update_slice_in_dim(buffer, total_RxBxB.astype(buffer.dtype), block_offset, axis=0)

  return place(into) if copy_into is None else (place(into), place(copy_into))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _outer_sum(a_DxN, perm_a, g_DxN, perm_g, block_size, interpret):
  return _launch(a_DxN, perm_a, g_DxN, perm_g, block_size, interpret)


def _outer_sum_fwd(a_DxN, perm_a, g_DxN, perm_g, block_size, interpret):
  return _launch(a_DxN, perm_a, g_DxN, perm_g, block_size, interpret), (a_DxN, perm_a, g_DxN, perm_g)


def _outer_sum_bwd(block_size, interpret, residuals, ds_RxBxB):
  from poetx_jax.kernels import block_rotation  # pylint: disable=g-import-not-at-top  (mutual VJPs)

  a_DxN, perm_a, g_DxN, perm_g = residuals
  # S_r = X_r Y_rᵀ: dX_r = dS_r Y_r (read g gathered by perm_g, write back through perm_a), and
  # dY_r = dS_rᵀ X_r (read a gathered by perm_a, write back through perm_g).
  da = block_rotation.block_rotate(g_DxN, ds_RxBxB, gather=perm_g, scatter=perm_a, transpose=True, interpret=interpret)
  dg = block_rotation.block_rotate(a_DxN, ds_RxBxB, gather=perm_a, scatter=perm_g, transpose=False, interpret=interpret)
  return da.astype(a_DxN.dtype), None, dg.astype(g_DxN.dtype), None


_outer_sum.defvjp(_outer_sum_fwd, _outer_sum_bwd)


def block_outer_sum(a_DxN, perm_a, g_DxN, perm_g, block_size, *, interpret=False):
  """`S[r] = Σ_n a[perm_a]_r g[perm_g]_rᵀ`, float32 `(R, B, B)`; `None` perms mean no gather.

  Args:
    a_DxN, g_DxN: `(D, N)` activations of the same shape (any float dtypes).
    perm_a, perm_g: optional `(D,)` int32 row gathers.
    block_size: `B`.
    interpret: run in the Pallas interpreter.
  """
  return _outer_sum(a_DxN, perm_a, g_DxN, perm_g, block_size, interpret)


def block_outer_sum_into(into, a_DxN, perm_a, g_DxN, perm_g, block_offset, *, interpret=False, copy_into=None):
  """`block_outer_sum` written as blocks `block_offset…` of a larger result, for a caller's own VJP.

  Not differentiable. One layer's two sides fill one `(R_in + R_out, B, B)` cotangent
  this way, with no concatenation or padding copied afterwards.

  Args:
    into: a float32 `(R', B, B)` array, updated in place (its other blocks kept), or
      a `jax.ShapeDtypeStruct` of that shape for a fresh buffer whose other blocks
      are left unwritten (the caller fills them with another call).
    a_DxN, perm_a, g_DxN, perm_g: as for `block_outer_sum`.
    block_offset: where the `D / B` blocks of this sum go.
    interpret: run in the Pallas interpreter.
    copy_into: optional second buffer, like `into` but in any float dtype, that gets
      the same blocks rounded to its dtype: the Cayley backward multiplies `dG` in
      bfloat16, and this saves it a separate cast of the whole cotangent.

  Returns:
    the result, or `(result, copy)` with `copy_into`.
  """
  return _launch(
      a_DxN, perm_a, g_DxN, perm_g, into.shape[-1], interpret, into=into, block_offset=block_offset, copy_into=copy_into
  )
