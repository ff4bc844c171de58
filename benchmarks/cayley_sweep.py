"""Tile sweep of the Cayley–Neumann kernels: forward and backward, per operand dtype.

  python -m benchmarks.cayley_sweep

One table: for each (b, blocks), the XLA map (DEFAULT precision) and the Pallas
kernels over a few tilings (side, depth, warps, stages), in float32 and bfloat16
operands; device µs (profiler trace) of the forward and of the backward alone, as the
`fast` layer runs them (the forward keeps `Q`, `Q2`, `Q2 − 2Q`, the backward reads
them). A tiling Triton cannot compile (shared memory) prints why.
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
    "float32": (C(128, 32, 8, 2, one_loop=True), C(128, 32, 8, 2), C(128, 32, 8, 3), C(64, 32, 4, 3),
                C(64, 64, 4, 2), C(64, 64, 4, 3), C(64, 32, 4, 3, cols=128)),
    "bfloat16": (C(64, 64, 4, 3, one_loop=True), C(64, 64, 4, 3), C(64, 64, 4, 4), C(64, 64, 4, 3, cols=128),
                 C(64, 64, 4, 4, cols=128), C(128, 64, 8, 3, one_loop=True), C(128, 64, 8, 3), C(128, 64, 8, 4),
                 C(128, 64, 8, 3, cols=256), C(128, 32, 8, 4, cols=256)),
}
CASES = ((256, 72), (256, 320), (512, 36), (512, 160))


# The two kernels that only move data: unpacking `q` into `Q` and packing `dQ − dQᵀ`.
SKEW_TILINGS = (C(64, 64, 4), C(128, 128, 8), C(64, 64, 4, cols=128), C(32, 32, 4), C(128, 128, 4), C(64, 64, 2))
PACK_TILINGS = (C(64, 64, 4), C(32, 32, 4), C(32, 32, 2), C(128, 128, 8), C(64, 64, 8))


def _input_sets(block, blocks, count):
  """`count` independent `(q, dG)` pairs: packed generators and a float32 cotangent."""
  sets = []
  for s in range(count):
    k1, k2 = jax.random.split(jax.random.key(s))
    sets.append((0.05 * jax.random.normal(k1, (blocks, skew.packed_size(block)), jnp.float32),
                 jax.random.normal(k2, (blocks, block, block), jnp.float32)))
  return sets


def data_kernels(cases, sets_per_case=3):
  """Device µs of the unpacking (`skew`) and packing kernels alone, per tiling."""
  for block, blocks in cases:
    sets = _input_sets(block, blocks, sets_per_case)
    for t in SKEW_TILINGS:
      if t.side > block or t.width > block:
        continue
      fn = jax.jit(lambda q, g, t=t: cn._square_blocks(  # pylint: disable=protected-access
          cn._skew_kernel, "poetx_cayley_skew", blocks, block, t, False, (jnp.bfloat16,), q))  # pylint: disable=protected-access
      kernel_profile.report_device_us(f"b={block} blocks={blocks} skew {t}", fn, sets)
    for t in PACK_TILINGS:
      if t.side > block:
        continue
      fn = jax.jit(lambda q, g, t=t: cn._pack(g, block, False, t))  # pylint: disable=protected-access
      kernel_profile.report_device_us(f"b={block} blocks={blocks} pack {t}", fn, sets)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--sets", type=int, default=4)
  parser.add_argument("--cases", default=",".join(f"{b}x{r}" for b, r in CASES), help="bxblocks,...")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--data_kernels", action="store_true", help="sweep only the unpacking and packing kernels")
  args = parser.parse_args(argv)
  cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  if args.data_kernels:
    data_kernels(cases, args.sets)
    return
  for block, blocks in cases:
    sets = _input_sets(block, blocks, args.sets)
    default = jax.lax.Precision.DEFAULT
    fwd = jax.jit(lambda q, g: cayley.cayley_neumann(q, block, 3, default))
    bwd = jax.jit(lambda q, g: jax.vjp(lambda v: cayley.cayley_neumann(v, block, 3, default), q)[1](g))
    f_us, b_us = kernel_profile.device_us(fwd, sets), kernel_profile.device_us(bwd, sets)
    print(f"b={block:<4} blocks={blocks:<4} xla DEFAULT (fwd+bwd via autodiff of the closed form)"
          f"  fwd {f_us:7.1f}  fwd+bwd {b_us:7.1f} µs", flush=True)
    for dtype in args.dtypes.split(","):
      for tiles in TILINGS[dtype]:
        if max(tiles.side, tiles.width, tiles.depth) > block:
          continue
        d = jnp.dtype(dtype)
        fwd = jax.jit(lambda q, g, t=tiles, d=d: cn._forward(q, block, d, None, False, t, keep_state=True))  # pylint: disable=protected-access
        bwd = jax.jit(lambda q, g, state, t=tiles, d=d: cn._backward(q, g, block, d, None, False, t, state=state))  # pylint: disable=protected-access
        loops = " one loop" if tiles.one_loop else ""
        label = f"{dtype:<8} tile {tiles.side:>3}x{tiles.width:<3} depth {tiles.depth:<3} w{tiles.num_warps} s{tiles.num_stages}{loops}"
        try:
          with_state = [(q, g, fwd(q, g)[1]) for q, g in sets]
          f_us, b_us = kernel_profile.device_us(fwd, sets), kernel_profile.device_us(bwd, with_state)
        except Exception as err:  # pylint: disable=broad-except  (report and go on)
          print(f"b={block:<4} blocks={blocks:<4} {label}  failed: {str(err).splitlines()[0][:90]}", flush=True)
          continue
        print(f"b={block:<4} blocks={blocks:<4} {label}  fwd {f_us:7.1f}  bwd {b_us:7.1f}  fwd+bwd {f_us + b_us:7.1f} µs", flush=True)


if __name__ == "__main__":
  main()
