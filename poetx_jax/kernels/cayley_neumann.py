"""The Cayley–Neumann map (k = 3) from packed skew vectors, forward and backward fused.

    Q2 = Q·Q;   G = I + 2Q + 2Q2 + Q2·(2Q + Q2)         (= I + 2Q + 2Q² + 2Q³ + Q⁴)

The first kernel unpacks `Q` from the strict upper triangle
(`q[r, slot(min(i,j), max(i,j))]` with the sign of `j - i`) once, so the product
kernels read plain contiguous tiles. Every product loop only loads and multiplies:
each polynomial operand is formed once, in the epilogue of the kernel before it
(computing `2Q + Q2` inside the loop of the next kernel cost a conversion per
loaded element per output tile, and kept the loads from being pipelined):

* forward: `Q`; then `Q2` with `P = Q2 + 2Q` (and `M` below, when the caller keeps
  `Q`, `Q2`, `M` for the backward, which then skips its first two kernels); then
  `G = Q2·P + 2(Q + Q2) + I`;
* backward (SPEC §3, with `Qᵀ = −Q`, `Q2ᵀ = Q2`): `Q`; then `Q2` with `M = Q2 − 2Q`;
  then `∇2 = −(dG·Q + Q·dG)` with `L = ∇2 + 2dG`; then the dense
  `dQ = L·Q2 + M·∇2 + 2(dG + ∇2)`; then a packing kernel whose programs each read
  a pair of mirrored tiles `dQ[m, n]`, `dQ[n, m]` and write `dq = dQ − dQᵀ` straight
  into the packed triangle.

Operands. `Q`, `Q2`, `∇2` and the polynomials `P`, `M`, `L` are stored, and multiplied, in `operand_dtype`
(accumulating in float32). The layer passes its activation dtype: with bfloat16
activations the rotations round `G` to bfloat16 anyway (an absolute error up to
2⁻⁹ on the diagonal), which dwarfs what bfloat16 operands do to the `Q²` terms
(2⁻⁹·‖Q‖²), and bfloat16 halves every operand read and doubles the tensor-core
rate (measured: `benchmarks/cayley_sweep.py`). With float32 operands the products
run on TF32 by default, or IEEE float32 with `precision=HIGHEST`. `G` and the packed
gradient are always float32. In the backward, `2dG` enters exactly (float32) and
`2∇2`, first order in `Q`, from its stored copy: with bfloat16 operands the gradient
carries a relative error of about 2⁻⁹ in its `O(‖Q‖)` part. Measured on a whole bf16
layer against float32 (raw/run125c_bf16_gradients_by_q_cpu.txt), the generators'
gradient is as accurate as the XLA path's while `‖Q‖ ≤ 0.16`; at `‖Q‖ ≈ 0.8` its error
is 1.5× the XLA path's (8.1e-3 against 5.3e-3), which float32 operands remove.
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

OPERAND_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _slot(i, j, block):
  lo, hi = jnp.minimum(i, j), jnp.maximum(i, j)
  return lo * block - (lo * (lo + 1)) // 2 + (hi - lo - 1)


def _skew_tile(q_ref, r, i, j, block):
  """`Q_r[i, j]` for a tile (`i` a column of row indices, `j` a row of column indices).

  Above the diagonal the packed slots run along `j`; below it (`Q[i, j] = −q[slot(j, i)]`)
  they run along `i`, so that half is loaded as the tile's transpose: both loads
  read contiguous runs, and off the diagonal one of them is fully masked.
  """
  upper = i < j
  above = tb.load(q_ref.at[r, jnp.where(upper, _slot(i, j, block), 0)], mask=upper, other=0.0)
  i_t, j_t = i.T, j.T  # a row of row indices, a column of column indices
  lower_t = j_t < i_t
  below_t = tb.load(q_ref.at[r, jnp.where(lower_t, _slot(j_t, i_t, block), 0)], mask=lower_t, other=0.0)
  return above - below_t.T


def _tile_indices(tiles):
  rows = tb.program_id(0) * tiles.side + jnp.arange(tiles.side)
  cols = tb.program_id(1) * tiles.width + jnp.arange(tiles.width)
  return rows[:, None], cols[None, :]


def _skew_kernel(q_ref, o_ref, *, block, tiles):
  r = tb.program_id(2)
  i, j = _tile_indices(tiles)
  tb.store(o_ref.at[r, i, j], _skew_tile(q_ref, r, i, j, block).astype(o_ref.dtype))


def _f32(ref_at):
  return tb.load(ref_at).astype(jnp.float32)


def _reduce(tiles, block, *steps):
  """`Σ_s Σ_k step_s(k)` over the block's inner dimension, a `side x width` float32 tile.

  A sum of two products runs as two loops, one after the other, into one accumulator:
  each loop's pipeline stages then hold two operand tiles, not four, which leaves
  shared memory for wider tiles or deeper pipelines.
  """
  acc = jnp.zeros((tiles.side, tiles.width), jnp.float32)
  loops = [lambda k: sum(step(k) for step in steps)] if tiles.one_loop else steps
  for step in loops:
    acc = jax.lax.fori_loop(0, block // tiles.depth, lambda k, acc, step=step: acc + step(k), acc)
  return acc


def _inner(k, tiles):
  return k * tiles.depth + jnp.arange(tiles.depth)


def _product(a_ref, b_ref, r, i, j, tiles, precision):
  """The step `k` of `A_r[i, :]·B_r[:, j]`: one `depth`-wide slice of the inner dimension."""
  def step(k):
    inner = _inner(k, tiles)
    return tb.dot(tb.load(a_ref.at[r, i, inner[None, :]]), tb.load(b_ref.at[r, inner[:, None], j]), precision)
  return step


def _square_kernel(q_ref, q2_ref, *poly_refs, block, tiles, precision, signs):
  """`Q2 = Q·Q`, and the next products' operands `Q2 + s·2Q` for `s` in `signs` (`P`: +1, `M`: −1)."""
  r = tb.program_id(2)
  i, j = _tile_indices(tiles)

  q2 = _reduce(tiles, block, _product(q_ref, q_ref, r, i, j, tiles, precision))
  tb.store(q2_ref.at[r, i, j], q2.astype(q2_ref.dtype))
  q = _f32(q_ref.at[r, i, j])
  for sign, poly_ref in zip(signs, poly_refs):
    tb.store(poly_ref.at[r, i, j], (q2 + (2.0 * sign) * q).astype(poly_ref.dtype))


def _neumann_kernel(packed_ref, q2_ref, p_ref, o_ref, *, block, tiles, precision):
  """`G = Q2·P + 2(Q + Q2) + I` with `P = Q2 + 2Q`."""
  r = tb.program_id(2)
  i, j = _tile_indices(tiles)

  acc = _reduce(tiles, block, _product(q2_ref, p_ref, r, i, j, tiles, precision))
  # 2Q from the packed float32 vector: bfloat16 operands round only the Q² terms.
  exact_q = _skew_tile(packed_ref, r, i, j, block)
  g = acc + 2.0 * (exact_q + _f32(q2_ref.at[r, i, j])) + jnp.where(i == j, 1.0, 0.0)
  tb.store(o_ref.at[r, i, j], g.astype(o_ref.dtype))


def _grad2_kernel(q_ref, dg_ref, dg32_ref, g2_ref, l_ref, *, block, tiles, precision):
  """`∇2 = dG·Qᵀ + Qᵀ·dG = −(dG·Q + Q·dG)`, and the dQ product's operand `L = ∇2 + 2dG`."""
  r = tb.program_id(2)
  i, j = _tile_indices(tiles)

  g2 = -_reduce(tiles, block, _product(dg_ref, q_ref, r, i, j, tiles, precision),
                 _product(q_ref, dg_ref, r, i, j, tiles, precision))
  tb.store(g2_ref.at[r, i, j], g2.astype(g2_ref.dtype))
  tb.store(l_ref.at[r, i, j], (g2 + 2.0 * tb.load(dg32_ref.at[r, i, j])).astype(l_ref.dtype))


def _dense_dq_kernel(l_ref, q2_ref, m_ref, g2_ref, dg32_ref, o_ref, *, block, tiles, precision):
  """`dQ = L·Q2 + M·∇2 + 2(dG + ∇2)`, one `side x width` tile, float32."""
  r = tb.program_id(2)
  i, j = _tile_indices(tiles)

  acc = _reduce(tiles, block, _product(l_ref, q2_ref, r, i, j, tiles, precision),
                _product(m_ref, g2_ref, r, i, j, tiles, precision))
  tb.store(o_ref.at[r, i, j], acc + 2.0 * (tb.load(dg32_ref.at[r, i, j]) + _f32(g2_ref.at[r, i, j])))


def _pack_kernel(pair_rows_ref, pair_cols_ref, dq_ref, o_ref, *, block, tiles):
  """`dq[slot(i, j)] = dQ[i, j] − dQ[j, i]` for `i < j`, from a pair of mirrored tiles."""
  pair, r = tb.program_id(0), tb.program_id(1)
  m, n = tb.load(pair_rows_ref.at[pair]), tb.load(pair_cols_ref.at[pair])
  span = jnp.arange(tiles.side)
  i, j = (m * tiles.side + span)[:, None], (n * tiles.side + span)[None, :]
  ij = tb.load(dq_ref.at[r, i, j])
  ji = tb.load(dq_ref.at[r, j.T, i.T])
  upper = i < j
  # Lanes off the strict upper triangle aim at the spare slot E (sliced off by the
  # caller): no two lanes of a store ever share an address, masked or not.
  spare = block * (block - 1) // 2
  tb.store(o_ref.at[r, jnp.where(upper, _slot(i, j, block), spare)], ij - ji.T, mask=upper)


def _call(kernel, out_shape, grid, tiles, name, interpret, *args):
  return tb.pallas_call(
      kernel, grid=grid, out_shape=out_shape, name=name, interpret=interpret,
      num_warps=tiles.num_warps, num_stages=tiles.num_stages,
  )(*args)


def _square_blocks(fn, name, num_blocks, block, tiles, interpret, out_dtypes, *args):
  """Launches a kernel with one program per `side x width` tile of each `B x B` block.

  `out_dtypes`: one dtype per `(R, B, B)` output. The block index is the slowest
  grid axis, so a block's tiles run side by side and share its operand panels
  through L2 (with the block fastest, 320 blocks of b = 512 re-read every panel
  from memory).
  """
  if block % tiles.side or block % tiles.width or block % tiles.depth:
    # A wider tile than the block would give an empty grid axis: outputs never written.
    raise ValueError(f"Cayley tiles {tiles} do not divide block size {block}: side, width and depth must.")
  out = tuple(jax.ShapeDtypeStruct((num_blocks, block, block), d) for d in out_dtypes)
  grid = (block // tiles.side, block // tiles.width, num_blocks)
  result = _call(functools.partial(fn, block=block, tiles=tiles), out, grid, tiles, name, interpret, *args)
  return result[0] if len(result) == 1 else result


def _skew_and_square(q_RxE, block, operand_dtype, precision, interpret, tiles, signs):
  """`Q`, `Q2` and `Q2 + s·2Q` for each `s` in `signs`, all `(R, B, B)` in `operand_dtype`."""
  r = q_RxE.shape[0]
  skew_tiles = block_sizes.cayley_skew_tiles(block, r)
  q = _square_blocks(_skew_kernel, "poetx_cayley_skew", r, block, skew_tiles, interpret, (operand_dtype,), q_RxE)
  square = functools.partial(_square_kernel, precision=precision, signs=signs)
  outs = _square_blocks(square, "poetx_cayley_square", r, block, tiles, interpret, (operand_dtype,) * (1 + len(signs)), q)
  return (q,) + tuple(outs)


def _forward(q_RxE, block, operand_dtype, precision, interpret, tiles=None, out_dtype=jnp.float32, keep_state=False):
  """`G`, or `(G, (Q, Q2, M))` with `keep_state`: what the backward would otherwise recompute."""
  tiles = tiles or block_sizes.cayley_tiles(block, operand_dtype, q_RxE.shape[0])
  signs = (1, -1) if keep_state else (1,)
  q, q2, p, *m = _skew_and_square(q_RxE, block, operand_dtype, precision, interpret, tiles, signs)
  neumann = functools.partial(_neumann_kernel, precision=precision)
  g = _square_blocks(
      neumann, "poetx_cayley_neumann", q_RxE.shape[0], block, tiles, interpret, (out_dtype,), q_RxE, q2, p
  )
  return (g, (q, q2, m[0])) if keep_state else g


def _pack(dq_RxBxB, block, interpret, tiles=None):
  tiles = tiles or block_sizes.cayley_pack_tiles(block)
  side = block // tiles.side
  pair_rows, pair_cols = (jnp.asarray(a, jnp.int32) for a in np.triu_indices(side))
  kernel = functools.partial(_pack_kernel, block=block, tiles=tiles)
  out = jax.ShapeDtypeStruct((dq_RxBxB.shape[0], skew.packed_size(block) + 1), jnp.float32)
  grid = (pair_rows.shape[0], dq_RxBxB.shape[0])
  return _call(kernel, out, grid, tiles, "poetx_cayley_pack", interpret, pair_rows, pair_cols, dq_RxBxB)[:, :-1]


def _backward(q_RxE, dg_RxBxB, block, operand_dtype, precision, interpret, tiles=None, state=None, dg_operand=None):
  """`tiles`: for every kernel here (a sweep's); None: the forward's tiles for the
  recomputed `Q`, `Q2`, `M` and the backward's for the two-product kernels."""
  r = q_RxE.shape[0]
  if state is None:
    square_tiles = tiles or block_sizes.cayley_tiles(block, operand_dtype, r)
    state = _skew_and_square(q_RxE, block, operand_dtype, precision, interpret, square_tiles, (-1,))
  tiles = tiles or block_sizes.cayley_tiles(block, operand_dtype, r, backward=True)
  q, q2, m = state
  if dg_operand is None:
    dg_operand = dg_RxBxB.astype(operand_dtype)
  grad2 = functools.partial(_grad2_kernel, precision=precision)
  g2, l = _square_blocks(
      grad2, "poetx_cayley_grad2", r, block, tiles, interpret, (operand_dtype,) * 2, q, dg_operand, dg_RxBxB
  )
  dense = functools.partial(_dense_dq_kernel, precision=precision)
  dq_RxBxB = _square_blocks(dense, "poetx_cayley_dq", r, block, tiles, interpret, (jnp.float32,), l, q2, m, g2, dg_RxBxB)
  return _pack(dq_RxBxB, block, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _cayley(q_RxE, block, operand_dtype, precision, interpret):
  return _forward(q_RxE, block, operand_dtype, precision, interpret)


def _cayley_fwd(q_RxE, block, operand_dtype, precision, interpret):
  return _forward(q_RxE, block, operand_dtype, precision, interpret), q_RxE


def _cayley_bwd(block, operand_dtype, precision, interpret, q_RxE, dg_RxBxB):
  return (_backward(q_RxE, dg_RxBxB.astype(jnp.float32), block, operand_dtype, precision, interpret),)


_cayley.defvjp(_cayley_fwd, _cayley_bwd)


def _checked(q_RxE, block_size, operand_dtype):
  if not block_sizes.covers(block_size):
    raise ValueError(f"the Pallas Cayley–Neumann kernel needs a power-of-two block size >= 16, got {block_size}.")
  if q_RxE.ndim != 2 or q_RxE.shape[-1] != skew.packed_size(block_size):
    raise ValueError(f"q must be (R, {skew.packed_size(block_size)}) for block size {block_size}, got {q_RxE.shape}.")
  operand_dtype = jnp.dtype(operand_dtype)
  if operand_dtype not in OPERAND_DTYPES:
    raise ValueError(f"operand_dtype must be float32 or bfloat16, got {operand_dtype}.")
  return q_RxE.astype(jnp.float32), operand_dtype


def cayley_neumann(q_RxE, block_size: int, *, operand_dtype=jnp.float32, precision=None, interpret: bool = False):
  """`G = I + 2Q + 2Q² + 2Q³ + Q⁴` from packed generators, with the fused backward.

  Args:
    q_RxE: `(R, E)` packed strict upper triangles (row-major), `E = B(B-1)/2`.
    block_size: `B`, a power of two >= 16.
    operand_dtype: float32 or bfloat16: the dtype the block products read (see the
      module docstring); accumulation, `G` and the gradient stay float32.
    precision: of float32 tile products (None: TF32 on GPUs; HIGHEST: IEEE float32).
    interpret: run in the Pallas interpreter.

  Returns:
    `(R, B, B)` float32.

  Raises:
    ValueError: for a block size the tiles cannot cover, a mismatched `E` or an
      unsupported operand dtype.
  """
  q_RxE, operand_dtype = _checked(q_RxE, block_size, operand_dtype)
  return _cayley(q_RxE, block_size, operand_dtype, precision, interpret)


def cayley_neumann_forward(
    q_RxE, block_size: int, *, operand_dtype=jnp.float32, out_dtype=jnp.float32, precision=None, interpret=False,
    keep_state=False,
):
  """The forward kernels alone, `G` stored in `out_dtype`: for a caller with its own VJP.

  A layer whose rotations read `G` in bfloat16 takes it in bfloat16 straight from the
  kernel (no float32 copy to cast), and pairs this with `cayley_neumann_backward`,
  which takes the float32 `dG` its own backward produces. With `keep_state` it also
  returns `(Q, Q2, Q2 − 2Q)` (three `(R, B, B)` arrays in `operand_dtype`) for the
  backward, which then skips two of its kernels. Other arguments as for `cayley_neumann`.
  """
  q_RxE, operand_dtype = _checked(q_RxE, block_size, operand_dtype)
  return _forward(
      q_RxE, block_size, operand_dtype, precision, interpret, out_dtype=jnp.dtype(out_dtype), keep_state=keep_state
  )


def cayley_neumann_backward(
    q_RxE, dg_RxBxB, block_size: int, *, operand_dtype=jnp.float32, precision=None, interpret=False, state=None,
    dg_operand=None,
):
  """`dq` (float32 `(R, E)`) for a float32 cotangent `dG` of `cayley_neumann(q)`: the backward kernels alone.

  `state`: what `cayley_neumann_forward(..., keep_state=True)` returned, or None to recompute it.
  `dg_operand`: `dG` already rounded to `operand_dtype` (the layer's outer sums write
  one), or None to cast it here.
  """
  q_RxE, operand_dtype = _checked(q_RxE, block_size, operand_dtype)
  if dg_operand is not None and (dg_operand.dtype != operand_dtype or dg_operand.shape != dg_RxBxB.shape):
    raise ValueError(f"dg_operand must be {operand_dtype} {dg_RxBxB.shape}, got {dg_operand.dtype} {dg_operand.shape}.")
  return _backward(
      q_RxE, dg_RxBxB.astype(jnp.float32), block_size, operand_dtype, precision, interpret, state=state,
      dg_operand=dg_operand,
  )
