"""Could the layer's rotations live in a Pallas GEMM's prologue or epilogue? The baseline.

  python -m benchmarks.gemm_baseline

Fusing the output rotation into the forward GEMM (`hᵀ = K_sᵀ·xrᵀ`, then `B x B`
blocks of `hᵀ` rotated and scattered) would save one read and one write of `hᵀ`
(the rotate-and-scatter kernel: 57–68 µs at 4096x14336, N = 2048, b = 256;
`raw/run14_profile.txt`), but only in a GEMM we write ourselves in Pallas. So the
question is first how far a Pallas (Triton) GEMM of that shape stands from XLA's
(cuBLAS) one: if the gap is larger than what the fusion saves, the fusion loses.

Times, as device µs from profiler traces, XLA's `K_sᵀ·xrᵀ` against a plain tiled
Pallas GEMM over a few tilings (the epilogue-fused form needs at least one whole
block of `B` output rows per program, so the tilings keep 128 or 256 rows).

Measured (raw/run17_gemm_baseline.txt, H100, N = 2048, b = 256): at 4096x14336 the best
Pallas GEMM took 384.5 µs against XLA's 298.5, 86 µs more than XLA, more than the
whole rotate-and-scatter kernel it would absorb (57–68 µs); with the 256-row tiles a
fused rotation needs, 421.5 µs. At 14336x4096 the best took 310.3 against 294.6 µs,
and 347.6 with 256 rows, while the output rotation there is only a 4096-row kernel
(17–20 µs). So the layer keeps XLA's GEMMs and separate rotation kernels.

`--mosaic N` instead times JAX's Mosaic GPU Hopper matmul over N tilings against XLA on
the same row-major operands (raw/run57_gemm_mosaic.txt: best 1.03x XLA at 4096x14336,
0.99x at 14336x4096): a GEMM with the rotation in its epilogue would be written on
that backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp

from benchmarks import kernel_profile
from poetx_jax.kernels import triton_backend as tb


@dataclasses.dataclass(frozen=True)
class GemmTiles:
  rows: int  # output features per program
  tokens: int  # tokens per program
  depth: int  # reduction chunk over input features
  num_warps: int
  num_stages: int


TILINGS = (
    GemmTiles(128, 128, 64, 4, 3),
    GemmTiles(128, 128, 64, 8, 3),
    GemmTiles(128, 128, 64, 8, 4),
    GemmTiles(128, 256, 64, 8, 3),
    GemmTiles(256, 128, 64, 8, 3),
    GemmTiles(256, 64, 64, 8, 3),
)


def _kernel(k_ref, x_ref, o_ref, *, tiles, depth_total):
  rows = tb.program_id(0) * tiles.rows + jnp.arange(tiles.rows)
  tokens = tb.program_id(1) * tiles.tokens + jnp.arange(tiles.tokens)

  def step(k, acc):
    inner = k * tiles.depth + jnp.arange(tiles.depth)
    k_tile = tb.load(k_ref.at[inner[:, None], rows[None, :]])  # (depth, rows) of K_s
    x_tile = tb.load(x_ref.at[inner[:, None], tokens[None, :]])  # (depth, tokens) of xrᵀ
    return acc + tb.dot(k_tile.T, x_tile)

  acc = jax.lax.fori_loop(0, depth_total // tiles.depth, step, jnp.zeros((tiles.rows, tiles.tokens), jnp.float32))
  tb.store(o_ref.at[rows[:, None], tokens[None, :]], acc.astype(o_ref.dtype))


def pallas_kt_x(k_IxO, x_IxN, tiles: GemmTiles, interpret: bool = False):
  """`K_sᵀ·xrᵀ`, `(O, N)`: shapes must be multiples of the tiles (a baseline, not a product kernel)."""
  (d_in, d_out), n = k_IxO.shape, x_IxN.shape[1]
  if d_out % tiles.rows or n % tiles.tokens or d_in % tiles.depth:
    raise ValueError(f"shapes {k_IxO.shape} x {x_IxN.shape} are not multiples of {tiles}.")
  kernel = functools.partial(_kernel, tiles=tiles, depth_total=d_in)
  call = tb.pallas_call(
      kernel, grid=(d_out // tiles.rows, n // tiles.tokens), out_shape=jax.ShapeDtypeStruct((d_out, n), x_IxN.dtype),
      name="poetx_gemm_baseline", interpret=interpret, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
  )
  return call(k_IxO, x_IxN)


def mosaic_configs():
  """Tilings of JAX's Mosaic GPU (wgmma, TMA, warp-specialized) Hopper matmul to try."""
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as mgpu  # pylint: disable=g-import-not-at-top

  dims = mgpu.MatmulDimension
  for tile_n in (128, 256):
    for grid_minor in dims:
      for width in (4, 8, 16):
        for wg in dims:
          for cluster in (None, dims.M, dims.N):
            if tile_n == 256 and wg == dims.N:
              continue  # a 512-wide CTA tile: out of registers
            yield mgpu, mgpu.TuningConfig(
                tile_m=128, tile_n=tile_n, tile_k=64, max_concurrent_steps=4, epi_tile_n=64, epi_tile_m=64,
                grid_minor_dim=grid_minor, grid_tile_width=width, wg_dimension=wg, cluster_dimension=cluster,
            )


def compare_mosaic(shape: str, tokens: int, max_configs: int) -> None:
  """XLA's `a @ b` against JAX's Mosaic GPU matmul on the same row-major operands:
  `a = K_sᵀ` (d_out x d_in, materialized), `b = xrᵀ` (d_in x N). A rotation epilogue
  would be written into a kernel of this kind, so it must first match XLA (cuBLAS)."""
  d_in, d_out = (int(s) for s in shape.split("x"))
  sets = []
  for s in range(3):
    k1, k2 = jax.random.split(jax.random.key(s))
    sets.append((jax.random.normal(k1, (d_out, d_in), jnp.bfloat16) / 64, jax.random.normal(k2, (d_in, tokens), jnp.bfloat16)))
  tflops = lambda us: 2 * d_in * d_out * tokens / us / 1e6
  xla_us = kernel_profile.device_us(jax.jit(lambda a, b: a @ b), sets)
  print(f"{shape}  XLA a @ b (row-major)   {xla_us:7.1f} µs  {tflops(xla_us):5.0f} TFLOP/s", flush=True)
  reference = sets[0][0].astype(jnp.float32) @ sets[0][1].astype(jnp.float32)
  best = None
  for i, (mgpu, config) in enumerate(mosaic_configs()):
    if i >= max_configs:
      break
    label = (f"mosaic n{config.tile_n} minor={config.grid_minor_dim.name} w{config.grid_tile_width}"
             f" wg={config.wg_dimension.name} cluster={getattr(config.cluster_dimension, 'name', None)}")
    fn = jax.jit(lambda a, b, config=config: mgpu.matmul(a, b, None, config))
    try:
      error = float(jnp.max(jnp.abs(fn(*sets[0]).astype(jnp.float32) - reference)))
      us = kernel_profile.device_us(fn, sets)
    except Exception as err:  # pylint: disable=broad-except  (report and go on)
      print(f"{shape}  {label}  failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}", flush=True)
      continue
    print(f"{shape}  {label}  {us:7.1f} µs  {tflops(us):5.0f} TFLOP/s  x{us / xla_us:4.2f} XLA  max err {error:.3g}", flush=True)
    best = us if best is None else min(best, us)
  if best is not None:
    print(f"{shape}  best mosaic {best:7.1f} µs  x{best / xla_us:4.2f} XLA", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default="4096x14336,14336x4096")
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--mosaic", type=int, default=0, help="instead: try this many Mosaic GPU matmul tilings")
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, N={args.tokens}", flush=True)
  if args.mosaic:
    for shape in args.shapes.split(","):
      compare_mosaic(shape, args.tokens, args.mosaic)
    return
  for shape in args.shapes.split(","):
    d_in, d_out = (int(s) for s in shape.split("x"))
    sets = []
    for s in range(3):
      k1, k2 = jax.random.split(jax.random.key(s))
      sets.append((jax.random.normal(k1, (d_in, d_out), jnp.bfloat16) / 64, jax.random.normal(k2, (d_in, args.tokens), jnp.bfloat16)))
    xla_us = kernel_profile.device_us(jax.jit(lambda k, x: k.T @ x), sets)
    tflops = lambda us: 2 * d_in * d_out * args.tokens / us / 1e6
    print(f"{shape}  XLA K^T @ xT            {xla_us:7.1f} µs  {tflops(xla_us):5.0f} TFLOP/s", flush=True)
    for tiles in TILINGS:
      fn = jax.jit(functools.partial(pallas_kt_x, tiles=tiles))
      try:
        us = kernel_profile.device_us(fn, sets)
      except Exception as err:  # pylint: disable=broad-except  (report and go on)
        print(f"{shape}  pallas {tiles}  failed: {str(err).splitlines()[0][:100]}", flush=True)
        continue
      print(f"{shape}  pallas {tiles.rows}x{tiles.tokens}x{tiles.depth} w{tiles.num_warps} s{tiles.num_stages}"
            f"  {us:7.1f} µs  {tflops(us):5.0f} TFLOP/s  x{us / xla_us:4.2f} XLA", flush=True)


if __name__ == "__main__":
  main()
