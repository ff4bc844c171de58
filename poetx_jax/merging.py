"""Merge-then-reinitialize (SPEC §6), exports of plain dense parameters.

A merge folds the current rotations into the frozen base kernels in float32, draws
new permutations from (seed, merge index, layer path), zeroes the orthogonal
parameters and resets their Adam moments; the function of the network is unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from poetx_jax import cayley, layers, ops, optim, permutation, skew, tree_paths
from poetx_jax.config import POETConfig

Variables = dict[str, Any]


def _layer_blocks(q_layer, neumann_terms, dynamic: bool):
  """`(G_in, G_out)` of one layer in float32 (any leading layer axes)."""
  blocks = []
  for name in layers.ORTHOGONAL_PARAMS:
    q_RxE = tree_paths.unboxed(q_layer[name])
    block = skew.block_size_from_packed(q_RxE.shape[-1])
    if dynamic:
      blocks.append(cayley.cayley_neumann_dynamic(q_RxE, block, neumann_terms))
    else:
      blocks.append(cayley.cayley_neumann(q_RxE, block, neumann_terms))
  return tuple(blocks)


def _layer_arrays(state, q_layer):
  """The layer's arrays, base kernel flattened to `(..., d_in, d_out)`, and its layer count (None: unstacked).

  Layers built under `nn.scan` hold their state stacked on a leading axis.
  """
  perm_in_inv = tree_paths.unboxed(state[layers.PERM_IN_INV])
  perm_out = tree_paths.unboxed(state[layers.PERM_OUT])
  stacked = perm_in_inv.shape[0] if perm_in_inv.ndim == 2 else None
  lead = (stacked,) if stacked else ()
  k_s = tree_paths.unboxed(state[layers.BASE_KERNEL]).reshape(lead + (perm_in_inv.shape[-1], perm_out.shape[-1]))
  q = tuple(tree_paths.unboxed(q_layer[name]) for name in layers.ORTHOGONAL_PARAMS)
  return q, k_s, perm_in_inv, perm_out, stacked


def _per_layer(fn, stacked, *args):
  """`fn(*args)` for one layer, or mapped over the leading layer axis of stacked state."""
  return jax.vmap(fn)(*args) if stacked else fn(*args)


def merge(variables: Variables, opt_state: Any, config: POETConfig, merge_index: jax.Array | int) -> tuple[Variables, Any]:
  """Folds every wrapped layer's rotations into its base kernel (SPEC §6), jit-safe.

  Args:
    variables: `{"params": ..., "poet": ..., ...}` of a wrapped model (layers may be
      stacked by `nn.scan`).
    opt_state: the state of `poetx_jax.optimizer` (or any optax state holding it).
    config: the `POETConfig` the model was wrapped with.
    merge_index: which merge this is (>= 1); keys the new permutations.

  Returns:
    `(variables, opt_state)` with new `K_s` and permutations, zero orthogonal
    parameters, and their Adam moments and step count reset. Every other
    parameter, optimizer state and the learning-rate schedules go on.
  """
  params, poet = variables["params"], variables[layers.POET_COLLECTION]
  variables = {
      **variables,
      "params": _zeroed_orthogonal(params, poet),
      layers.POET_COLLECTION: _merged_poet(params, poet, config, merge_index),
  }
  return variables, optim.reset_orthogonal_state(opt_state)


def _zeroed_orthogonal(params, poet, where=None):
  """`params` with every wrapped layer's orthogonal parameters zeroed (where `where`, if given)."""
  for path, _ in tree_paths.poet_layers(poet):
    new_q = dict(tree_paths.get_path(params, path))
    for name in layers.ORTHOGONAL_PARAMS:
      new_q[name] = optim.zeroed(new_q[name], where)
    params = tree_paths.with_path(params, path, new_q)
  return params


def _merged_poet(params, poet, config: POETConfig, merge_index):
  """The `poet` collection after a merge: every layer's new `K_s` and permutations."""
  for path, state in tree_paths.poet_layers(poet):
    q_layer = tree_paths.get_path(params, path)
    (q_in, q_out), k_s, perm_in_inv, perm_out, stacked = _layer_arrays(state, q_layer)
    key = permutation.layer_key(config.seed, merge_index, "/".join(path))
    if stacked:  # one key per layer of the stack
      key = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(stacked))

    def merge_one(q_in, q_out, k_s, perm_in_inv, perm_out, key):
      g_in, g_out = _layer_blocks({layers.Q_IN: q_in, layers.Q_OUT: q_out}, config.neumann_terms, dynamic=False)
      k_true_IxO = ops.effective_kernel(k_s, g_in, g_out, perm_in_inv, perm_out)
      new_perm_in_inv, new_perm_out = permutation.draw_permutations(key, *k_true_IxO.shape)
      return ops.permuted_base_kernel(k_true_IxO, new_perm_in_inv, new_perm_out), new_perm_in_inv, new_perm_out

    new_k, new_perm_in_inv, new_perm_out = _per_layer(merge_one, stacked, q_in, q_out, k_s, perm_in_inv, perm_out, key)
    old_kernel = state[layers.BASE_KERNEL]
    old_k = tree_paths.unboxed(old_kernel)
    new_state = dict(state)
    new_k = _row_major(new_k.astype(old_k.dtype).reshape(old_k.shape))
    new_state[layers.BASE_KERNEL] = tree_paths.reboxed(old_kernel, new_k)
    new_state[layers.PERM_IN_INV] = tree_paths.reboxed(state[layers.PERM_IN_INV], new_perm_in_inv)
    new_state[layers.PERM_OUT] = tree_paths.reboxed(state[layers.PERM_OUT], new_perm_out)
    poet = tree_paths.with_path(poet, path, new_state)
  return poet


def _row_major(x: jax.Array) -> jax.Array:
  """`x` laid out row-major, as the state enters the step.

  XLA lays out a conditional's result as its largest branch computes it. The merge's
  rotations and gathers leave `K_s` column-major, so without this every step that
  does not merge transposed each base kernel to that layout and back (measured on
  the H100, llama1b: 7 ms of a 99 ms step, `benchmarks/results/raw/run30_*`).
  """
  return with_layout_constraint(x, Layout(major_to_minor=tuple(range(x.ndim))))


def should_merge(step: jax.Array | int, config: POETConfig) -> jax.Array:
  """`step > 0 and step % merge_interval == 0`."""
  step = jnp.asarray(step)
  return (step > 0) & (step % config.merge_interval == 0)


def merge_if_needed(step: jax.Array | int, variables: Variables, opt_state: Any, config: POETConfig) -> tuple[Variables, Any]:
  """Merges when `step > 0 and step % merge_interval == 0`, through `jax.lax.cond`.

  Call it in the jitted train step after the optimizer update, with `step` the
  number of updates applied so far. The merge index is `step // merge_interval`.
  """
  step = jnp.asarray(step)
  merging = should_merge(step, config)
  params, poet = variables["params"], variables[layers.POET_COLLECTION]
  # Only the new base kernels and permutations need the cond. The orthogonal parameters
  # and their moments are zeroed by a select instead: a cond's untaken branch copies
  # every array it passes through (in the jitted llama1b step, each one of them, every
  # step that does not merge), where the select fuses into the update that writes them.
  poet = jax.lax.cond(
      merging, lambda p, f: _merged_poet(p, f, config, step // config.merge_interval), lambda p, f: f, params, poet
  )
  variables = {**variables, "params": _zeroed_orthogonal(params, poet, merging), layers.POET_COLLECTION: poet}
  return variables, optim.reset_orthogonal_state(opt_state, merging)


def flat_effective_kernel(state, q_layer) -> jax.Array:
  """One wrapped layer's `K_eff` in float32, `(d_in, d_out)` (or `(L, d_in, d_out)` for a stack).

  Reads `k` from the layer's own `neumann_terms`.
  """
  (q_in, q_out), k_s, perm_in_inv, perm_out, stacked = _layer_arrays(state, q_layer)
  terms = tree_paths.unboxed(state[layers.NEUMANN_TERMS])

  def effective_one(q_in, q_out, k_s, perm_in_inv, perm_out, terms):
    g_in, g_out = _layer_blocks({layers.Q_IN: q_in, layers.Q_OUT: q_out}, terms, dynamic=True)
    return ops.effective_kernel(k_s, g_in, g_out, perm_in_inv, perm_out)

  return _per_layer(effective_one, stacked, q_in, q_out, k_s, perm_in_inv, perm_out, terms)


def effective_params(variables: Variables) -> dict[str, Any]:
  """Plain parameters of the *unwrapped* model: `kernel = K_eff` for every wrapped layer.

  Reads `k` from the variables (`neumann_terms`), so no config is needed. Kernels
  are computed in float32 and stored in the base kernel's dtype (stacked, for layers
  built under `nn.scan`, as the unwrapped scanned model expects).

  Returns:
    A `params` tree for `model.apply({"params": ...}, ...)`.
  """
  params, poet = variables["params"], variables[layers.POET_COLLECTION]
  for path, state in tree_paths.poet_layers(poet):
    q_layer = tree_paths.get_path(params, path)
    base_kernel = state[layers.BASE_KERNEL]
    old_k = tree_paths.unboxed(base_kernel)
    kernel = flat_effective_kernel(state, q_layer)
    dense = {k: v for k, v in q_layer.items() if k not in layers.ORTHOGONAL_PARAMS}
    dense["kernel"] = tree_paths.reboxed(base_kernel, kernel.astype(old_k.dtype).reshape(old_k.shape))
    params = tree_paths.with_path(params, path, dense)
  return params
