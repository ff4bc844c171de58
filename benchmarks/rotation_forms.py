"""The forward rotation's two forms: tiled (the rule's) against G-stationary.

  python -m benchmarks.rotation_forms

The tiled form (`block_sizes.rotation_tiles`) gives each program a `rows x tokens`
output tile and re-reads its `rows x B` slice of `G_r` for every token tile; the
G-stationary form (`block_sizes.StationaryRotationTiles`) loads that slice once and
walks a whole token range, as the backward's fused kernel does. For each width D and
token count N, both forms of the forward (gather rows then rotate, as the input side;
rotate then scatter rows, as the output side), bf16, b = 256: device µs from a
profiler trace and the memory floor (one read and one write of `D x N` at 3 TB/s).
Stationary candidates: rows / warps / stages, tokens a step, and token ranges as
multiples of what fills one wave of the H100's 132 multiprocessors.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import kernel_profile
from poetx_jax.kernels import block_rotation, block_sizes

S = block_sizes.StationaryRotationTiles
SHAPES = ((128, 8, 3), (64, 4, 4))  # rows, warps, stages (the fused backward kernel's two tilings)


def _inputs(d, n, block, seed):
  k = jax.random.split(jax.random.key(seed), 3)
  a = jax.random.normal(k[0], (d, n), jnp.bfloat16)
  g = (jax.random.normal(k[1], (d // block, block, block)) / 16).astype(jnp.bfloat16)
  return a, g, jax.random.permutation(k[2], d).astype(jnp.int32)


def candidates(d, n, block, steps=(64, 128), fill_multiples=(1, 2, 4, 8)):
  out = []
  for rows, warps, stages in SHAPES:
    programs = (d // block) * (block // rows)
    fill = max(1, block_sizes.H100_SMS // programs)
    for tokens in steps:
      for splits in sorted({min(fill * m, max(1, n // 256)) for m in fill_multiples}):
        out.append(S(rows, tokens, warps, stages, splits))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--widths", default="14336,2048")
  parser.add_argument("--tokens", default="2048,32768")
  parser.add_argument("--block", type=int, default=256)
  parser.add_argument("--forms", default="gather,scatter")
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, b={args.block}", flush=True)
  block = args.block
  for n in (int(t) for t in args.tokens.split(",")):
    for d in (int(w) for w in args.widths.split(",")):
      sets = [_inputs(d, n, block, s) for s in range(3)]
      floor_us = 2 * d * n * 2 / 3e12 * 1e6
      for form in args.forms.split(","):
        print(f"D={d} N={n} {form}: memory floor {floor_us:.1f} µs", flush=True)
        gather = form == "gather"
        for tiles in [None] + candidates(d, n, block):
          fn = jax.jit(lambda a, g, p, t=tiles, gather=gather: block_rotation._launch(  # pylint: disable=protected-access
              a, g, p if gather else None, None if gather else p, False, False, t))
          label = f"{'rule ' + str(block_sizes.rotation_tiles(block, n)) if tiles is None else tiles}"
          kernel_profile.report_device_us(label, fn, sets)


if __name__ == "__main__":
  main()
