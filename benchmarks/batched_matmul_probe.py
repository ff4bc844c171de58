"""Is a Mosaic GPU product faster than the Triton ones of the Cayley–Neumann map?

  python -m benchmarks.batched_matmul_probe
  python -m benchmarks.batched_matmul_probe --square   # the whole square kernel, epilogue included

Device µs (profiler trace) of one batched block product `Q·Q` (bf16 operands, float32
accumulation, bf16 result) per case `b x blocks`: the Cayley map's Triton square
kernel with no polynomial outputs, its own tiles, against `batched_matmul` below,
which loads tiles with TMA and multiplies them with warpgroup MMAs (Pallas Mosaic
GPU, Hopper only) over several tilings. Only a probe: the Cayley map's kernels also
read and write their polynomial operands in their epilogues, which this product
leaves out, and the layer does not call it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import numpy as np

from benchmarks import kernel_profile
from poetx_jax.kernels import block_sizes
from poetx_jax.kernels import cayley_neumann as cn


@dataclasses.dataclass(frozen=True)
class MatmulTiles:
  rows: int  # output rows per tile (one warpgroup's wgmma M: 64 or a multiple)
  cols: int  # output columns per tile
  depth: int = 64  # inner-dimension step (64 bf16 = one 128-byte swizzle row)
  stages: int = 3  # TMA loads in flight
  programs: int = 0  # persistent programs walking the tiles; 0: one program per tile


def _tiled_products(a_RxMxK, b_RxKxN, tiles: MatmulTiles, out_types, epilogue):
  """One Mosaic GPU kernel over every `rows x cols` tile of every block's `A_r · B_r`.

  Each program (one per tile, or `tiles.programs` walking them) pipelines TMA loads
  of its `rows x depth` and `depth x cols` operand tiles into one warpgroup MMA
  accumulator, then calls `epilogue(acc, a_gmem, block, rows, cols, *out_gmems)` to
  store it. Dimensions must divide by the tiles (a probe: no masking).
  """
  r, m, k = a_RxMxK.shape
  n = b_RxKxN.shape[-1]
  if m % tiles.rows or n % tiles.cols or k % tiles.depth:
    raise ValueError(f"tiles {tiles} must divide the blocks' {m} x {k} x {n} product.")
  row_tiles, col_tiles = m // tiles.rows, n // tiles.cols
  total = r * row_tiles * col_tiles

  def body(a_gmem, b_gmem, *out_gmems):
    @plgpu.nd_loop((total,), collective_axes="programs")
    def _tile(info):
      (index,) = info.index
      blk = index // (row_tiles * col_tiles)
      within = index % (row_tiles * col_tiles)
      mi, ni = within // col_tiles, within % col_tiles

      def product(acc_ref):
        plgpu.emit_pipeline(
            lambda _, a_smem, b_smem: plgpu.wgmma(acc_ref, a_smem, b_smem),
            grid=(k // tiles.depth,),
            in_specs=[
                plgpu.BlockSpec((tiles.rows, tiles.depth), lambda kk: (mi, kk), delay_release=1),
                plgpu.BlockSpec((tiles.depth, tiles.cols), lambda kk: (kk, ni), delay_release=1),
            ],
            max_concurrent_steps=tiles.stages,
        )(a_gmem.at[blk], b_gmem.at[blk])
        return acc_ref[...]

      acc = pl.run_scoped(product, plgpu.ACC((tiles.rows, tiles.cols)))
      rows, cols = pl.ds(mi * tiles.rows, tiles.rows), pl.ds(ni * tiles.cols, tiles.cols)
      epilogue(acc, a_gmem, blk, rows, cols, *out_gmems)

  call = plgpu.kernel(
      body, out_type=out_types, grid=(tiles.programs or total,), grid_names=("programs",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )
  return call(a_RxMxK, b_RxKxN)


def batched_matmul(a_RxMxK, b_RxKxN, tiles: MatmulTiles, out_dtype=None):
  """`A_r · B_r` for every block `r`, float32 accumulation, in `out_dtype` (default `a`'s);
  each tile stored through shared memory."""
  out_dtype = jnp.dtype(out_dtype or a_RxMxK.dtype)

  def store(acc, a_gmem, blk, rows, cols, o_gmem):
    del a_gmem

    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((tiles.rows, tiles.cols), out_dtype))
    def _store(o_smem):
      o_smem[...] = acc.astype(out_dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[blk, rows, cols])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out = jax.ShapeDtypeStruct(a_RxMxK.shape[:2] + b_RxKxN.shape[-1:], out_dtype)
  return _tiled_products(a_RxMxK, b_RxKxN, tiles, out, store)


def square_with_polynomials(q_RxBxB, tiles: MatmulTiles):
  """The Cayley map's whole square kernel (`Q2 = Q·Q`, `P = Q2 + 2Q`, `M = Q2 − 2Q`, all
  in `q`'s dtype), as `batched_matmul` with the `Q` tile read in the epilogue: whether
  Mosaic GPU's faster product survives the epilogue's memory traffic."""
  dtype = q_RxBxB.dtype

  def polynomials(acc, q_gmem, blk, rows, cols, *out_gmems):
    @functools.partial(pl.run_scoped, q_smem=plgpu.SMEM((tiles.rows, tiles.cols), dtype),
                       out_smem=plgpu.SMEM((3, tiles.rows, tiles.cols), dtype), barrier=plgpu.Barrier())
    def _epilogue(q_smem, out_smem, barrier):
      plgpu.copy_gmem_to_smem(q_gmem.at[blk, rows, cols], q_smem, barrier)
      plgpu.barrier_wait(barrier)
      two_q = 2.0 * q_smem[...].astype(jnp.float32)
      for slot, value in enumerate((acc, acc + two_q, acc - two_q)):
        out_smem[slot] = value.astype(dtype)
      plgpu.commit_smem()
      for slot, out_gmem in enumerate(out_gmems):
        plgpu.copy_smem_to_gmem(out_smem.at[slot], out_gmem.at[blk, rows, cols])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out = jax.ShapeDtypeStruct(q_RxBxB.shape, dtype)
  return _tiled_products(q_RxBxB, q_RxBxB, tiles, (out, out, out), polynomials)


SQUARE_TILES = (MatmulTiles(64, 64, 64, 3), MatmulTiles(64, 128, 64, 3), MatmulTiles(128, 128, 64, 3))
MOSAIC = (MatmulTiles(64, 64, 64, 3), MatmulTiles(64, 128, 64, 3), MatmulTiles(64, 128, 64, 4),
          MatmulTiles(128, 128, 64, 3), MatmulTiles(128, 128, 64, 4), MatmulTiles(64, 256, 64, 3),
          MatmulTiles(128, 128, 64, 4, programs=132), MatmulTiles(64, 128, 64, 4, programs=132),
          MatmulTiles(128, 256, 64, 3))


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--cases", default="256x72,512x36,256x320,512x160")
  parser.add_argument("--square", action="store_true",
                      help="time the whole square kernel (Q2, Q2 + 2Q, Q2 - 2Q) instead of the product alone")
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  if args.square:
    return _square_main(args.cases)
  for case in args.cases.split(","):
    block, blocks = (int(v) for v in case.split("x"))
    sets = [(jax.random.normal(jax.random.key(s), (blocks, block, block), jnp.bfloat16),) for s in range(4)]
    flops = 2 * blocks * block ** 3
    tiles = block_sizes.cayley_tiles(block, jnp.bfloat16, blocks)
    square = functools.partial(cn._square_kernel, precision=None, signs=())  # pylint: disable=protected-access
    triton = jax.jit(lambda q: cn._square_blocks(square, "square", blocks, block, tiles, False, (jnp.bfloat16,), q))  # pylint: disable=protected-access
    ref = np.asarray(jnp.einsum("rij,rjk->rik", sets[0][0].astype(jnp.float32), sets[0][0].astype(jnp.float32)))
    us = kernel_profile.device_us(triton, sets)
    print(f"b={block} blocks={blocks} triton {tiles}: {us:7.1f} µs ({flops / us / 1e6:6.1f} TFLOP/s)", flush=True)
    for t in MOSAIC:
      if t.rows > block or t.cols > block:
        continue
      fn = jax.jit(lambda q, t=t: batched_matmul(q, q, t))
      try:
        err = float(np.max(np.abs(np.asarray(fn(*sets[0]), np.float32) - ref)) / np.max(np.abs(ref)))
        us = kernel_profile.device_us(fn, sets)
      except Exception as e:  # pylint: disable=broad-except  (report and go on)
        print(f"b={block} blocks={blocks} mosaic {t}: failed {str(e).splitlines()[0][:150]}", flush=True)
        continue
      print(f"b={block} blocks={blocks} mosaic {t}: {us:7.1f} µs ({flops / us / 1e6:6.1f} TFLOP/s) rel err {err:.1e}", flush=True)


def _square_main(cases):
  """The Triton square kernel as the `fast` layer runs it (three outputs) against
  `square_with_polynomials`, on skew-symmetric `Q` like the map's."""
  for case in cases.split(","):
    block, blocks = (int(v) for v in case.split("x"))
    sets = []
    for s in range(4):
      q = 0.05 * jax.random.normal(jax.random.key(s), (blocks, block, block), jnp.float32)
      sets.append(((q - jnp.swapaxes(q, 1, 2)).astype(jnp.bfloat16),))
    q = np.asarray(sets[0][0], np.float32)
    q2 = np.einsum("rij,rjk->rik", q, q)
    want = (q2, q2 + 2 * q, q2 - 2 * q)
    tiles = block_sizes.cayley_tiles(block, jnp.bfloat16, blocks)
    square = functools.partial(cn._square_kernel, precision=None, signs=(1, -1))  # pylint: disable=protected-access
    triton = jax.jit(lambda q: cn._square_blocks(square, "square", blocks, block, tiles, False, (jnp.bfloat16,) * 3, q))  # pylint: disable=protected-access
    rows = [("triton", tiles, triton)] + [
        ("mosaic", t, jax.jit(lambda q, t=t: square_with_polynomials(q, t)))
        for t in SQUARE_TILES if t.rows <= block and t.cols <= block
    ]
    for name, t, fn in rows:
      try:
        err = max(float(np.max(np.abs(np.asarray(g, np.float32) - w)) / np.max(np.abs(w))) for g, w in zip(fn(*sets[0]), want))
        us = kernel_profile.device_us(fn, sets)
      except Exception as e:  # pylint: disable=broad-except  (report and go on)
        print(f"b={block} blocks={blocks} square {name} {t}: failed {str(e).splitlines()[0][:150]}", flush=True)
        continue
      print(f"b={block} blocks={blocks} square {name} {t}: {us:7.1f} µs, max rel err {err:.1e}", flush=True)


if __name__ == "__main__":
  main()
