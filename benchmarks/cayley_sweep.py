"""Tile sweep of the Cayley–Neumann kernels: forward and backward, per operand dtype.

  python -m benchmarks.cayley_sweep

One table: for each (b, blocks), the XLA map (DEFAULT precision) and the Pallas
kernels over a few tilings (side, depth, warps, stages), in float32 and bfloat16
operands; median ms of the forward and of the backward alone (the backward
recomputes `Q` and `Q²`). A tiling Triton cannot compile (shared memory) prints why.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import timing
from poetx_jax import cayley, skew
from poetx_jax.kernels import block_sizes
from poetx_jax.kernels import cayley_neumann as cn

TILINGS = (
    block_sizes.CayleyTiles(128, 32, 8, 2),
    block_sizes.CayleyTiles(128, 64, 8, 2),
    block_sizes.CayleyTiles(128, 64, 8, 3),
    block_sizes.CayleyTiles(64, 64, 4, 2),
    block_sizes.CayleyTiles(64, 64, 4, 3),
    block_sizes.CayleyTiles(128, 128, 8, 1),
)
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
    print(f"b={block:<4} blocks={blocks:<4} xla DEFAULT                  fwd {timing.time_ms(fwd, sets):7.3f}"
          f"  fwd+bwd {timing.time_ms(bwd, sets):7.3f} ms", flush=True)
    for dtype in (jnp.float32, jnp.bfloat16):
      for tiles in TILINGS:
        if tiles.side > block or tiles.depth > block:
          continue
        fwd = jax.jit(lambda q, g, t=tiles, d=dtype: cn._forward(q, block, jnp.dtype(d), None, False, t))  # pylint: disable=protected-access
        bwd = jax.jit(lambda q, g, t=tiles, d=dtype: cn._backward(q, g, block, jnp.dtype(d), None, False, t))  # pylint: disable=protected-access
        label = f"{jnp.dtype(dtype).name:<8} side {tiles.side:<3} depth {tiles.depth:<3} w{tiles.num_warps} s{tiles.num_stages}"
        try:
          f_ms, b_ms = timing.time_ms(fwd, sets), timing.time_ms(bwd, sets)
        except Exception as err:  # pylint: disable=broad-except  (report and go on)
          print(f"b={block:<4} blocks={blocks:<4} {label}  failed: {str(err).splitlines()[0][:90]}", flush=True)
          continue
        print(f"b={block:<4} blocks={blocks:<4} {label}  fwd {f_ms:7.3f}  bwd {b_ms:7.3f}  fwd+bwd {f_ms + b_ms:7.3f} ms", flush=True)


if __name__ == "__main__":
  main()
