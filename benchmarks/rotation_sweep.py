"""Tiles of the block-rotation and outer-sum kernels, timed side by side on the GPU.

  python -m benchmarks.rotation_sweep

Feeds `block_sizes.rotation_tiles` and `outer_sum_tiles`: each row is one candidate
at the Llama-8B MLP widths (N = 2048 tokens unless `--tokens`, bf16, b = 256 and 512), timed as device
microseconds from a profiler trace (`benchmarks.kernel_profile.device_us`), so small
kernels are not hidden behind host dispatch. Gather and scatter forms of the rotation.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import kernel_profile
from poetx_jax.kernels import block_outer_sum, block_rotation, block_sizes

R = block_sizes.RotationTiles
ROTATIONS = (
    R(rows=128, tokens=128, depth=64, num_warps=8),
    R(rows=128, tokens=128, depth=64, num_warps=8, num_stages=3),
    R(rows=128, tokens=128, depth=64, num_warps=8, num_stages=4),
    R(rows=128, tokens=64, depth=64, num_warps=4, num_stages=3),
    R(rows=256, tokens=64, depth=64, num_warps=8, num_stages=3),
    R(rows=128, tokens=256, depth=32, num_warps=8, num_stages=3),
    # 64-row tiles over 4 warps, which won for the Cayley map's products (raw/run72_cayley_sweep.txt).
    R(rows=64, tokens=128, depth=64, num_warps=4, num_stages=3),
    R(rows=64, tokens=128, depth=64, num_warps=4, num_stages=4),
    R(rows=64, tokens=256, depth=64, num_warps=8, num_stages=3),
    # A whole 256-row block per program (its token tile read once), wider token tiles,
    # a 128-deep reduction in two steps, and 4 warps on 128 x 128 (run 110).
    R(rows=256, tokens=128, depth=64, num_warps=8, num_stages=3),
    R(rows=256, tokens=128, depth=64, num_warps=8, num_stages=2),
    R(rows=128, tokens=256, depth=64, num_warps=8, num_stages=3),
    R(rows=128, tokens=128, depth=128, num_warps=8, num_stages=2),
    R(rows=128, tokens=128, depth=64, num_warps=4, num_stages=3),
    R(rows=128, tokens=128, depth=32, num_warps=8, num_stages=4),
    R(rows=256, tokens=64, depth=64, num_warps=8, num_stages=4),
)
O = block_sizes.OuterSumTiles
OUTER_SUMS = (
    O(rows=128, cols=128, depth=64, num_warps=8),
    O(rows=128, cols=128, depth=64, num_warps=8, num_stages=3),
    O(rows=128, cols=128, depth=128, num_warps=8, num_stages=3),
    O(rows=128, cols=128, depth=64, num_warps=8, num_stages=4),
    O(rows=64, cols=128, depth=64, num_warps=4, num_stages=3),
    O(rows=64, cols=64, depth=64, num_warps=4, num_stages=3),
    O(rows=64, cols=64, depth=128, num_warps=4, num_stages=3),
)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--widths", default="14336,4096")
  parser.add_argument("--blocks", default="256,512")
  parser.add_argument("--kernels", default="rotation,outer_sum")
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--tiles", default="", help="only these ROTATIONS entries, by index (comma-separated)")
  args = parser.parse_args(argv)
  kernels = args.kernels.split(",")
  print(f"device: {jax.devices()[0].device_kind}", flush=True)
  tokens = args.tokens
  rotations = [ROTATIONS[int(i)] for i in args.tiles.split(",")] if args.tiles else ROTATIONS
  for d in (int(w) for w in args.widths.split(",")):
    for block in (int(b) for b in args.blocks.split(",")):
      sets = []
      for s in range(3):
        k1, k2, k3, k4 = jax.random.split(jax.random.key(s), 4)
        sets.append((jax.random.normal(k1, (d, tokens), jnp.bfloat16),
                     (jax.random.normal(k2, (d // block, block, block)) / 16).astype(jnp.bfloat16),
                     jax.random.permutation(k3, d).astype(jnp.int32),
                     jax.random.normal(k4, (d, tokens), jnp.bfloat16)))
      floor_us = 2 * d * tokens * 2 / 3.0e12 * 1e6
      print(f"D={d} N={tokens} b={block}: rotation memory floor {floor_us:.1f} µs, outer sum the same (two reads)")
      for t in rotations if "rotation" in kernels else ():
        if t.rows > block:
          continue
        gather = jax.jit(lambda a, g, p, b, t=t: block_rotation._launch(a, g, p, None, False, False, t))  # pylint: disable=protected-access
        scatter = jax.jit(lambda a, g, p, b, t=t: block_rotation._launch(a, g, None, p, False, False, t))  # pylint: disable=protected-access
        kernel_profile.report_device_us(f"rotate gather  {t}", gather, sets)
        kernel_profile.report_device_us(f"rotate scatter {t}", scatter, sets)
      for t in OUTER_SUMS if "outer_sum" in kernels else ():
        programs = (d // block) * (block // t.rows) * (block // t.cols)
        outer = jax.jit(lambda a, g, p, b, t=t: block_outer_sum._launch(a, None, b, p, block, False, t))  # pylint: disable=protected-access
        kernel_profile.report_device_us(f"outer sum      {t} {programs:5d} programs", outer, sets)


if __name__ == "__main__":
  main()
