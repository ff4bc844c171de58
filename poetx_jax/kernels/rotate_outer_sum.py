"""One side of the layer's backward in one pass: a block rotation and the blocks'
cotangents, which read the same operand.

For each block `r` of `B` rows, with `S = s[gather_s]` and `A = a[gather_a]`:

    rot[rB + c, n] = Σ_b G[off + r, c, b] · S[rB + b, n]     out[scatter[j], n] = rot[j, n]
    dG[off + r, b, c] = Σ_n A[rB + b, n] · S[rB + c, n]

The layer's backward needs exactly this twice: on the output side `S = dy` gathered
by the inverse output permutation, `A = h`, and `rot = dh`; on the input side
`S = dxr`, `A = x` gathered, and `rot` scattered into `dx`. Apart, a rotation kernel
and an outer-sum kernel each read `S` from memory (at 14336 rows, 59 MB each in
bfloat16); here each program loads its block's `S` tile once per token step and
feeds both products from it. A program owns a `rows`-row slice of one block: the
slice's rotated rows for every token step, and its `rows x B` cotangent rows,
accumulated over the token steps (over one token range when the caller splits the
tokens to fill the GPU; the ranges' partial cotangents are then added).

At b = 512 no tiling beat the two kernels apart (`block_sizes.rotate_outer_sum_tiles`),
and with float32 operands at b = 256 the tiles do not fit in shared memory, so there
this function runs them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from poetx_jax import rotation
from poetx_jax.kernels import block_outer_sum, block_rotation, block_sizes
from poetx_jax.kernels import triton_backend as tb


def rotate_outer_sum_reference(s_DxN, gather_s, a_DxN, gather_a, g_RxBxB, scatter, block_offset=0):
  """The same two results in plain jnp: `(out (D, N) in s's dtype, dG (R, B, B) float32)`."""
  num_blocks = rotation.blocks_used(s_DxN.shape[0], g_RxBxB, block_offset)
  g_used = jax.lax.slice_in_dim(g_RxBxB, block_offset, block_offset + num_blocks)
  out = block_rotation.block_rotate_reference(s_DxN, g_used, gather=gather_s, scatter=scatter, transpose=True)
  dg = block_outer_sum.block_outer_sum_reference(a_DxN, gather_a, s_DxN, gather_s, g_RxBxB.shape[-1])
  return out, dg


def _kernel(*refs, block, block_offset, tokens_total, split_tokens, tiles, gather_s, gather_a, scatter, aliased, copy):
  refs = list(refs)
  gather_s_ref = refs.pop(0) if gather_s else None
  gather_a_ref = refs.pop(0) if gather_a else None
  scatter_ref = refs.pop(0) if scatter else None
  for _ in range(aliased):
    refs.pop(0)  # buffers written in place: their output refs are the same memory
  s_ref, a_ref, g_ref, rot_ref, dg_ref = refs[:5]
  copy_ref = refs[5] if copy else None  # (with several token ranges, refs[5:] are never written)
  r, row_tile = tb.program_id(0), tb.program_id(1)
  split = tb.program_id(2) if tiles.splits > 1 else 0
  rows = row_tile * tiles.rows + jnp.arange(tiles.rows)  # this program's rows of the block
  whole = jnp.arange(block)
  source_s = block_outer_sum.block_rows(gather_s_ref, r, block, whole)
  source_a = block_outer_sum.block_rows(gather_a_ref, r, block, rows)
  dest = block_outer_sum.block_rows(scatter_ref, r, block, rows)
  # This slice of G, `rows x B`, is the same for every token step: loaded once.
  g_slice = tb.load(g_ref.at[r + block_offset, rows[:, None], whole[None, :]])
  first = split * split_tokens

  def step(k, acc):
    tokens = first + k * tiles.tokens + jnp.arange(tiles.tokens)
    mask = (tokens < tokens_total)[None, :]
    s = tb.load(s_ref.at[source_s[:, None], tokens[None, :]], mask=mask, other=0)  # B x T, shared
    rot = tb.dot(g_slice.astype(s.dtype), s)
    tb.store(rot_ref.at[dest[:, None], tokens[None, :]], rot.astype(rot_ref.dtype), mask=mask)
    a = tb.load(a_ref.at[source_a[:, None], tokens[None, :]], mask=mask, other=0)
    return acc + tb.dot(a.astype(s.dtype), s.T)

  acc = jax.lax.fori_loop(0, split_tokens // tiles.tokens, step, jnp.zeros((tiles.rows, block), jnp.float32))
  block_outer_sum.store_cotangent(acc, dg_ref, copy_ref, r, block_offset, rows, whole, split, tiles.splits)


def _pair(into, s_DxN, gather_s, a_DxN, gather_a, g_RxBxB, scatter, block_offset, interpret, copy_into):
  """The same results from the separate rotation and outer-sum kernels."""
  sums = block_outer_sum.block_outer_sum_into(
      into, a_DxN, gather_a, s_DxN, gather_s, block_offset, interpret=interpret, copy_into=copy_into
  )
  rot = block_rotation.block_rotate(
      s_DxN, g_RxBxB, gather=gather_s, scatter=scatter, transpose=True, interpret=interpret, block_offset=block_offset
  )
  return (rot, sums) if copy_into is None else (rot, *sums)


def rotate_outer_sum_into(
    into, s_DxN, gather_s, a_DxN, gather_a, g_RxBxB, scatter, block_offset, *, interpret=False, copy_into=None,
    tiles=None,
):
  """The rotation of `s` by `G` and the blocks' cotangents `Σ_n a·sᵀ`, in one kernel.

  Not differentiable (the layer's VJP calls it). `G[block_offset + r]` rotates row
  block `r`, and the cotangents go to the same blocks of `into`.

  Args:
    into: float32 `(R', B, B)`: an array updated in place (its other blocks kept), or
      a `jax.ShapeDtypeStruct` for a fresh buffer whose other blocks are left unwritten.
    s_DxN: the shared operand, `(D, N)`, `D = R·B`: rotated, and the right factor of
      the cotangents. The rotation runs in its dtype (accumulating in float32).
    gather_s: optional `(D,)` int32: row `i` of `S` is row `gather_s[i]` of `s`.
    a_DxN: the cotangents' left factor, `(D, N)`, any float dtype (multiplied in `s`'s).
    gather_a: optional `(D,)` int32 row gather of `a`.
    g_RxBxB: the blocks (`rot = G·S` per block, `G`'s orientation of the backward).
    scatter: optional `(D,)` int32 permutation: rotated row `j` goes to row `scatter[j]`.
    block_offset: the first block of `G` (and of `into`) that this side uses.
    interpret: run in the Pallas interpreter.
    copy_into: optional second buffer like `into`, in any float dtype, that gets the
      same blocks rounded (the Cayley backward's bfloat16 operand).
    tiles: `block_sizes.RotateOuterSumTiles`, or None for the rule there, which
      picks the separate rotation and outer-sum kernels where they measured faster
      (b = 512) or the fused kernel's tiles do not fit (float32 at b = 256).

  Returns:
    `(rot (D, N) in s's dtype, dG)`, or `(rot, dG, copy)` with `copy_into`.
  """
  d, n = s_DxN.shape
  block = g_RxBxB.shape[-1]
  if a_DxN.shape != s_DxN.shape:
    raise ValueError(f"s and a must have the same (D, N) shape; got {s_DxN.shape} and {a_DxN.shape}.")
  num_blocks = rotation.blocks_used(d, g_RxBxB, block_offset)
  if into.shape != g_RxBxB.shape or into.dtype != jnp.float32:
    raise ValueError(f"the cotangent buffer must be float32 {g_RxBxB.shape} like G; got {into.dtype} {into.shape}.")
  if copy_into is not None and copy_into.shape != into.shape:
    raise ValueError(f"copy_into must have the result's shape {into.shape}, got {copy_into.shape}.")
  # The tiles the kernel loads: s's and a's in their dtypes, G's slice cast to s's (below).
  itemsize = max(jnp.dtype(v.dtype).itemsize for v in (s_DxN, a_DxN))
  tiles = tiles or block_sizes.rotate_outer_sum_tiles(block, n, num_blocks, itemsize)
  if tiles is not None and block % tiles.rows:
    raise ValueError(f"fused backward tiles {tiles} do not divide block size {block}: rows must.")
  if tiles is None:  # measured faster apart at this block size (see the rule)
    return _pair(into, s_DxN, gather_s, a_DxN, gather_a, g_RxBxB, scatter, block_offset, interpret, copy_into)
  split_tokens, splits = block_outer_sum.token_ranges(n, tiles.splits, tiles.tokens)
  tiles = dataclasses.replace(tiles, splits=splits)
  operands = [p.astype(jnp.int32) for p in (gather_s, gather_a, scatter) if p is not None]
  grid = (num_blocks, block // tiles.rows)
  if tiles.splits > 1:
    grid += (tiles.splits,)
  rot_out = jax.ShapeDtypeStruct(s_DxN.shape, s_DxN.dtype)
  dg_outputs = block_outer_sum.cotangent_outputs(into, copy_into, tiles.splits, num_blocks, block, unwritten_fresh=True)
  aliases = block_outer_sum.alias_held_buffers(operands, dg_outputs, 1)  # output 0 is the rotation
  kernel = functools.partial(
      _kernel, block=block, block_offset=block_offset, tokens_total=n,
      split_tokens=split_tokens, tiles=tiles, gather_s=gather_s is not None, gather_a=gather_a is not None,
      scatter=scatter is not None, aliased=len(aliases), copy=copy_into is not None and tiles.splits == 1,
  )
  out_shape = (rot_out,) + tuple(jax.ShapeDtypeStruct(b.shape, b.dtype) for b in dg_outputs)
  call = tb.pallas_call(
      kernel, grid=grid, out_shape=out_shape, name="poetx_rotate_outer_sum", interpret=interpret,
      num_warps=tiles.num_warps, num_stages=tiles.num_stages, input_output_aliases=aliases,
  )
  rot, *dg = call(*operands, s_DxN, a_DxN, g_RxBxB.astype(s_DxN.dtype))
  placed = block_outer_sum.placed_cotangents(dg, into, copy_into, block_offset, tiles.splits, unwritten_fresh=True)
  return (rot, placed) if copy_into is None else (rot, *placed)
