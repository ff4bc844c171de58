"""How fixed is the spectrum? Monitoring for POET-X's central invariant (SPEC §1).

Orthogonal factors leave the singular values of every wrapped kernel unchanged.
The truncated Cayley–Neumann map is only nearly orthogonal, so each merge folds a
small error into `K_s`: these functions measure the blocks' orthogonality error
and the drift of a layer's singular values, cheaply enough to log.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from poetx_jax import cayley, layers, merging, tree_paths


def _layers(variables):
  return tree_paths.poet_layers(variables.get(layers.POET_COLLECTION, {}))


def orthogonality_errors(variables: Mapping[str, Any], norm: str = "spectral") -> dict[str, jax.Array]:
  """`max_blocks ‖G Gᵀ − I‖` of every wrapped layer (both sides), keyed by path.

  `norm` is "spectral" or "fro" (cheaper, an upper bound), as in `cayley.orthogonality_error`.
  """
  out = {}
  for path, state in _layers(variables):
    q_layer = tree_paths.get_path(variables["params"], path)
    k = tree_paths.unboxed(state[layers.NEUMANN_TERMS]).reshape(-1)[0]  # one k per layer stack
    q_in, q_out = (tree_paths.unboxed(q_layer[name]) for name in layers.ORTHOGONAL_PARAMS)

    def error(q_in, q_out):
      g_in, g_out = merging._layer_blocks({layers.Q_IN: q_in, layers.Q_OUT: q_out}, k, dynamic=True)  # pylint: disable=protected-access
      return jnp.maximum(cayley.orthogonality_error(g_in, norm), cayley.orthogonality_error(g_out, norm))

    if q_in.ndim == 3:  # an nn.scan stack: one layer's blocks at a time, not every layer's at once
      out["/".join(path)] = jnp.max(jax.lax.map(lambda qs: error(*qs), (q_in, q_out)))
    else:
      out["/".join(path)] = error(q_in, q_out)
  return out


def max_orthogonality_error(variables: Mapping[str, Any], norm: str = "spectral") -> jax.Array:
  """The largest orthogonality error over all wrapped layers (0 when none is wrapped)."""
  errors = list(orthogonality_errors(variables, norm).values())
  return jnp.max(jnp.stack(errors)) if errors else jnp.zeros((), jnp.float32)


def singular_values(variables: Mapping[str, Any], paths: tuple[str, ...] | None = None) -> dict[str, jax.Array]:
  """Singular values (descending, float32) of the effective kernels `K_eff`, keyed by path.

  Layers stacked by `nn.scan` give one row of singular values per layer. Only the
  layers asked for are computed.

  Args:
    variables: a wrapped model's variables.
    paths: restrict to these "/"-joined layer paths (SVDs of large kernels are costly).
  """
  out = {}
  for path, state in _layers(variables):
    name = "/".join(path)
    if paths is not None and name not in paths:
      continue
    kernel = merging.flat_effective_kernel(state, tree_paths.get_path(variables["params"], path))
    out[name] = jnp.linalg.svd(kernel, compute_uv=False)
  return out


def spectrum_drift(current: Mapping[str, jax.Array], reference: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """`max_i |σ_i − σ_i⁰| / σ_max⁰` per layer: 0 for an exactly fixed spectrum.

  Args:
    current: `singular_values(...)` now.
    reference: `singular_values(...)` at step 0 (or any earlier point).
  """
  return {
      name: jnp.max(jnp.abs(current[name] - sv0)) / jnp.max(sv0) for name, sv0 in reference.items() if name in current
  }
