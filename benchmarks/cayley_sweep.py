"""Tile sweep of the Cayley–Neumann kernels: forward and backward, per operand dtype.

  python -m benchmarks.cayley_sweep

One table: for each (b, blocks), the XLA map (DEFAULT precision) and the Pallas
kernels over a few tilings (side, depth, warps, stages), in float32 and bfloat16
operands; device µs (profiler trace) of the forward and of the backward alone (the
backward recomputes `Q` and `Q²`). A tiling Triton cannot compile (shared memory) prints why.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import kernel_profile
from poetx_jax import cayley, skew
from poetx_jax.kernels import block_sizes
from poetx_jax.kernels import cayley_neumann as cn

C = block_sizes.CayleyTiles
TILINGS = {
    "float32": (C(128, 64, 8, 2), C(64, 64, 4, 2)),
    "bfloat16": (C(128, 64, 8, 3), C(128, 64, 8, 3, cols=256), C(128, 32, 8, 3, cols=256), C(64, 64, 4, 3, cols=256),
                 C(128, 64, 4, 3, cols=128), C(128, 64, 8, 2, cols=256)),
}
CASES = ((256, 72), (256, 320), (512, 64), (512, 160))


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--sets", type=int, default=4)
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  for block, blocks in CASES:
    sets = []
    for s in range(args.sets):
      k1, k2 = jax.random.split(jax.random.key(s))
      sets.append((0.05 * jax.random.normal(k1, (blocks, skew.packed_size(block)), jnp.float32),
                   jax.random.normal(k2, (blocks, block, block), jnp.float32)))
    default = jax.lax.Precision.DEFAULT
    fwd = jax.jit(lambda q, g: cayley.cayley_neumann(q, block, 3, default))
    bwd = jax.jit(lambda q, g: jax.vjp(lambda v: cayley.cayley_neumann(v, block, 3, default), q)[1](g))
    f_us, b_us = kernel_profile.device_us(fwd, sets), kernel_profile.device_us(bwd, sets)
    print(f"b={block:<4} blocks={blocks:<4} xla DEFAULT (fwd+bwd via autodiff of the closed form)"
          f"  fwd {f_us:7.1f}  fwd+bwd {b_us:7.1f} µs", flush=True)
    for dtype, tilings in TILINGS.items():
      for tiles in tilings:
        if max(tiles.side, tiles.width, tiles.depth) > block:
          continue
        fwd = jax.jit(lambda q, g, t=tiles, d=dtype: cn._forward(q, block, jnp.dtype(d), None, False, t))  # pylint: disable=protected-access
        bwd = jax.jit(lambda q, g, t=tiles, d=dtype: cn._backward(q, g, block, jnp.dtype(d), None, False, t))  # pylint: disable=protected-access
        label = f"{dtype:<8} tile {tiles.side:>3}x{tiles.width:<3} depth {tiles.depth:<3} w{tiles.num_warps} s{tiles.num_stages}"
        try:
          f_us, b_us = kernel_profile.device_us(fwd, sets), kernel_profile.device_us(bwd, sets)
        except Exception as err:  # pylint: disable=broad-except  (report and go on)
          print(f"b={block:<4} blocks={blocks:<4} {label}  failed: {str(err).splitlines()[0][:90]}", flush=True)
          continue
        print(f"b={block:<4} blocks={blocks:<4} {label}  fwd {f_us:7.1f}  bwd {b_us:7.1f}  fwd+bwd {f_us + b_us:7.1f} µs", flush=True)


if __name__ == "__main__":
  main()
