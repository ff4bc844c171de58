"""The layer backward's fused rotation + outer sum against the two kernels it replaces.

  python -m benchmarks.fused_backward_sweep

For each side of a layer's backward (bf16, N = 2048 tokens by default), device
microseconds from a profiler trace (`benchmarks.kernel_profile.device_us`) of:
the pair as the layer ran it before (`block_outer_sum` + `block_rotation`, their own
tile rules), and `rotate_outer_sum` with each candidate tiling (the rule's first).
The output side reads `dy` through the inverse output permutation and `h`; the input
side reads `dxr` and `x` through the inverse input permutation and scatters `dx`.
Feeds `block_sizes.rotate_outer_sum_tiles`.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from benchmarks import kernel_profile
from poetx_jax.kernels import block_outer_sum, block_rotation, block_sizes, rotate_outer_sum

T = block_sizes.RotateOuterSumTiles
CANDIDATES = {  # (rows, tokens, warps, stages); splits from the rule unless swept below
    "small": ((64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (32, 64, 8, 3),
              (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)),
    "large": ((32, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 3), (16, 64, 4, 2), (64, 16, 8, 2)),
}


def _inputs(d, n, block, seed):
  k = jax.random.split(jax.random.key(seed), 5)
  shared = jax.random.normal(k[0], (d, n), jnp.bfloat16)
  other = jax.random.normal(k[1], (d, n), jnp.bfloat16)
  g = (jax.random.normal(k[2], (d // block, block, block)) / 16).astype(jnp.bfloat16)
  perm = jax.random.permutation(k[3], d).astype(jnp.int32)
  return shared, other, g, perm


def _pair(side, block):
  """The two kernels as the layer's backward called them (float32 dG and its bf16 copy)."""
  def run(s, a, g, p):
    fresh = jax.ShapeDtypeStruct(g.shape, jnp.float32)
    copy = jax.ShapeDtypeStruct(g.shape, jnp.bfloat16)
    if side == "output":
      dg = block_outer_sum.block_outer_sum_into(fresh, a, None, s, p, 0, copy_into=copy)
      return block_rotation.block_rotate(s, g, gather=p, transpose=True), dg
    dg = block_outer_sum.block_outer_sum_into(fresh, a, p, s, None, 0, copy_into=copy)
    return block_rotation.block_rotate(s, g, scatter=p, transpose=True), dg
  del block
  return jax.jit(run)


def _fused(side, tiles):
  def run(s, a, g, p):
    fresh = jax.ShapeDtypeStruct(g.shape, jnp.float32)
    copy = jax.ShapeDtypeStruct(g.shape, jnp.bfloat16)
    gathers = (p, None, None) if side == "output" else (None, p, p)
    return rotate_outer_sum.rotate_outer_sum_into(
        fresh, s, gathers[0], a, gathers[1], g, gathers[2], 0, copy_into=copy, tiles=tiles
    )
  return jax.jit(run)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--widths", default="14336,4096")
  parser.add_argument("--blocks", default="256,512")
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--sides", default="output,input")
  parser.add_argument("--tiles", default="", help="instead of the built-in candidates: rows:tokens:warps:stages:splits,...")
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  n = args.tokens
  for d in (int(w) for w in args.widths.split(",")):
    for block in (int(b) for b in args.blocks.split(",")):
      sets = [_inputs(d, n, block, seed) for seed in range(3)]
      # reads s and a, writes the rotation: 3 passes of D x N bf16
      print(f"D={d} N={n} b={block}: fused memory floor {3 * d * n * 2 / 3.0e12 * 1e6:.1f} µs at 3 TB/s", flush=True)
      rule = block_sizes.rotate_outer_sum_tiles(block, n, d // block)  # None: the pair runs (b = 512)
      sizes = CANDIDATES["small" if block <= 256 else "large"]
      rule_tiles = (rule.rows, rule.tokens, rule.num_warps, rule.num_stages) if rule else None
      candidates = ([rule] if rule else []) + [
          T(rows=r, tokens=t, num_warps=w, num_stages=st, splits=rule.splits if rule else 1)
          for r, t, w, st in sizes if r <= block and (r, t, w, st) != rule_tiles
      ]
      if rule and rule.splits > 1:  # the same tiles with other token splits
        candidates += [dataclasses.replace(rule, splits=s) for s in (1, 2 * rule.splits) if s != rule.splits]
      if args.tiles:
        candidates = [T(*(int(v) for v in spec.split(":"))) for spec in args.tiles.split(",")]
      for side in args.sides.split(","):
        kernel_profile.report_device_us(f"{side:6s} pair (rotation + outer sum)", _pair(side, block), sets)
        for t in candidates:
          kernel_profile.report_device_us(f"{side:6s} fused {t}", _fused(side, t), sets)


if __name__ == "__main__":
  main()
