"""Every wrapped layer's blocks `G`, computed once per train step instead of in each layer.

With gradient accumulation each layer would otherwise run the Cayley–Neumann map
forward (twice under remat) and backward for every microbatch, on the same
generators. The map is linear in its cotangent's accumulation, `dq = J(q)ᵀ · Σ dG`, so
a train step can compute `G` for all layers at once, pass it to the model in the
`poet_blocks` collection (`layers.BLOCKS_COLLECTION`), accumulate `dG` over the
microbatches, and run the map's backward once (`jax.vjp` of `layer_blocks`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from poetx_jax import ops, tree_paths
from poetx_jax.config import POETConfig
from poetx_jax.layers import BLOCKS, Q_IN, Q_OUT


def layer_blocks(params, poet_state, config: POETConfig, activation_dtype=jnp.float32) -> dict[str, Any]:
  """`{...path: {"blocks": G}}` for every wrapped layer (found, as merges find them, in
  the `poet` collection `poet_state`), G float32.

  A layer's `G` is `(..., R_in + R_out, B, B)` with the leading (layer) axes of an
  `nn.scan` stack. All layers' generators go through one call of the map (one set of
  kernels, every block in one grid). Differentiable in `params`: `jax.vjp` turns the
  summed cotangent of the blocks into the generators' gradients.
  """
  nodes = [(path, tree_paths.get_path(params, path)) for path, _ in tree_paths.poet_layers(poet_state)]
  if not nodes:
    raise ValueError("layer_blocks found no wrapped layer in the poet collection.")
  packed = []
  for _, node in nodes:
    q = jnp.concatenate([node[Q_IN], node[Q_OUT]], axis=-2).astype(jnp.float32)
    packed.append(q.reshape(-1, q.shape[-1]))
  g_all = ops.cayley_map(
      jnp.concatenate(packed, axis=0), block_size=config.block_size, neumann_terms=config.neumann_terms,
      implementation=config.implementation, interpret=config.pallas_interpret, activation_dtype=activation_dtype,
  )
  out: dict[str, Any] = {}
  offset = 0
  for (path, node), q in zip(nodes, packed):
    rows = q.shape[0]
    lead = node[Q_IN].shape[:-2]
    sides = node[Q_IN].shape[-2] + node[Q_OUT].shape[-2]
    g = g_all[offset:offset + rows].reshape(lead + (sides, config.block_size, config.block_size))
    offset += rows
    target = out
    for key in path:
      target = target.setdefault(key, {})
    target[BLOCKS] = g
  return out
