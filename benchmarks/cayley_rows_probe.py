"""A one-kernel Cayley–Neumann forward by row tiles, timed against the shipped kernels.

  python -m benchmarks.cayley_rows_probe --cases 256x72,256x320,128x72

Row tile `i` of `Q^k` is row tile `i` of `Q^(k-1)` times the whole `Q`, so a program
holding `Q` (`B x B`, in shared memory) and its own rows can chain the powers without
any other program's results: `G[i] = I[i] + 2Q[i] + 2T2 + 2T3 + T4` with
`T(k+1) = Tk·Q`. Against the shipped forward (square kernel: `Q2`, `P`; Neumann
kernel: `Q2·P`), this does 1.5x the arithmetic but writes and reads no `(R, B, B)`
intermediates. `Q` must fit in shared memory with the row tile: b <= 256 in bf16,
b <= 128 in float32. Both forms start from the same unpacked `Q` (the skew kernel). A
probe, not used by the layer.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks import kernel_profile
from poetx_jax import cayley, skew
from poetx_jax.kernels import block_sizes
from poetx_jax.kernels import cayley_neumann as cn
from poetx_jax.kernels import triton_backend as tb


def _rows_kernel(packed_ref, q_ref, o_ref, *, block, side, precision):
  """One `side x B` row tile of `G`, from the whole `Q` and the packed generators."""
  r = tb.program_id(1)
  rows = (tb.program_id(0) * side + jnp.arange(side))[:, None]
  cols = jnp.arange(block)[None, :]
  q_BxB = tb.load(q_ref.at[r, cols.T, cols])
  t1 = tb.load(q_ref.at[r, rows, cols])
  t2 = tb.dot(t1, q_BxB, precision)
  t3 = tb.dot(t2.astype(q_BxB.dtype), q_BxB, precision)
  t4 = tb.dot(t3.astype(q_BxB.dtype), q_BxB, precision)
  exact_q = cn._skew_tile(packed_ref, r, rows, cols, block)  # pylint: disable=protected-access
  g = t4 + 2.0 * (exact_q + t2 + t3) + jnp.where(rows == cols, 1.0, 0.0)
  tb.store(o_ref.at[r, rows, cols], g.astype(o_ref.dtype))


def rows_forward(q_RxE, block, *, side=64, num_warps=4, operand_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16,
                 precision=None, interpret=False):
  """`G` by the skew kernel and one row-tile kernel."""
  if block % side:
    raise ValueError(f"side {side} must divide block size {block}: other rows would never be written.")
  r = q_RxE.shape[0]
  skew_tiles = block_sizes.cayley_skew_tiles(block, r)
  q = cn._square_blocks(  # pylint: disable=protected-access
      cn._skew_kernel, "poetx_cayley_skew", r, block, skew_tiles, interpret, (operand_dtype,), q_RxE)  # pylint: disable=protected-access
  kernel = functools.partial(_rows_kernel, block=block, side=side, precision=precision)
  return tb.pallas_call(
      kernel, grid=(block // side, r), out_shape=jax.ShapeDtypeStruct((r, block, block), out_dtype),
      name="poetx_cayley_rows", interpret=interpret, num_warps=num_warps, num_stages=1,
  )(q_RxE, q)


def shipped_forward(q_RxE, block, *, operand_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16):
  """The layer's forward as it runs by default (no kept state)."""
  return cn.cayley_neumann_forward(q_RxE, block, operand_dtype=operand_dtype, out_dtype=out_dtype)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--cases", default="256x72,256x320,128x72", help="BxR: block size x number of blocks")
  parser.add_argument("--tilings", default="64x4,64x8,128x8", help="side x warps of the row kernel")
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; device µs of the forward, bf16 operands",
        flush=True)
  for case in args.cases.split(","):
    block, blocks = (int(v) for v in case.split("x"))
    sets = [(0.3 / block ** 0.5 * jax.random.normal(jax.random.key(s), (blocks, skew.packed_size(block))),)
            for s in range(3)]
    want = cayley.cayley_neumann(sets[0][0], block, 3)
    shipped = jax.jit(functools.partial(shipped_forward, block=block))
    err = float(jnp.max(jnp.abs(shipped(*sets[0]).astype(jnp.float32) - want)))
    kernel_profile.report_device_us(f"b={block} blocks={blocks} shipped (skew, square, Neumann)  max err {err:.1e}",
                                    shipped, sets)
    for tiling in args.tilings.split(","):
      side, warps = (int(v) for v in tiling.split("x"))
      if side > block:
        continue
      fn = jax.jit(functools.partial(rows_forward, block=block, side=side, num_warps=warps))
      try:
        err = float(jnp.max(jnp.abs(fn(*sets[0]).astype(jnp.float32) - want)))
      except Exception as e:  # pylint: disable=broad-except  (a tiling that does not compile: report, go on)
        print(f"  b={block} blocks={blocks} rows {side}x{warps}w  failed: {type(e).__name__}: {str(e)[:150]}")
        continue
      kernel_profile.report_device_us(f"b={block} blocks={blocks} rows {side} rows x {warps} warps  max err {err:.1e}",
                                      fn, sets)


if __name__ == "__main__":
  main()
