"""Tile sizes of the block-rotation kernel, timed side by side on the GPU.

  python -m benchmarks.rotation_sweep

Feeds `block_sizes.rotation_tiles`: each row is one candidate, forward only, at the
two Llama-8B MLP widths (N = 2048 tokens, b = 256, bf16), gather and scatter forms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import timing
from poetx_jax.kernels import block_rotation, block_sizes

CANDIDATES = (
    block_sizes.RotationTiles(rows=256, tokens=64, depth=32, num_warps=8),
    block_sizes.RotationTiles(rows=256, tokens=128, depth=32, num_warps=8),
    block_sizes.RotationTiles(rows=256, tokens=128, depth=32, num_warps=16),
    block_sizes.RotationTiles(rows=128, tokens=128, depth=32, num_warps=8),
    block_sizes.RotationTiles(rows=128, tokens=128, depth=64, num_warps=8),
    block_sizes.RotationTiles(rows=128, tokens=64, depth=64, num_warps=4),
)


def main():
  print(f"device: {jax.devices()[0].device_kind}", flush=True)
  for d in (14336, 4096):
    block, tokens = 256, 2048
    sets = []
    for s in range(4):
      k1, k2, k3 = jax.random.split(jax.random.key(s), 3)
      sets.append((jax.random.normal(k1, (d, tokens), jnp.bfloat16),
                   (jax.random.normal(k2, (d // block, block, block)) / 16).astype(jnp.bfloat16),
                   jax.random.permutation(k3, d).astype(jnp.int32)))
    floor_ms = 2 * d * tokens * 2 / 3.0e12 * 1e3
    print(f"D={d} N={tokens} b={block}: memory floor {floor_ms:.3f} ms (read + write at 3 TB/s)")
    for tiles in CANDIDATES:
      gather = jax.jit(lambda a, g, p, t=tiles: block_rotation._launch(a, g, p, None, False, False, t))  # pylint: disable=protected-access
      scatter = jax.jit(lambda a, g, p, t=tiles: block_rotation._launch(a, g, None, p, False, False, t))  # pylint: disable=protected-access
      try:
        print(f"  {tiles}  gather {timing.time_ms(gather, sets):.3f} ms  scatter {timing.time_ms(scatter, sets):.3f} ms", flush=True)
      except Exception as err:  # pylint: disable=broad-except
        print(f"  {tiles}  failed: {type(err).__name__}: {str(err)[:200]}", flush=True)


if __name__ == "__main__":
  main()
