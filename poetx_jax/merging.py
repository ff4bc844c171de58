"""Merge-then-reinitialize (SPEC §6), exports of plain dense parameters.

A merge folds the current rotations into the frozen base kernels in float32, draws
new permutations from (seed, merge index, layer path), zeroes the orthogonal
parameters and resets their Adam moments; the function of the network is unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from poetx_jax import base_storage, cayley, layers, ops, optim, permutation, skew, tree_paths
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
  """`(q, stored base arrays, perm_in_inv, perm_out, layer count or None)` of one layer (or an
  `nn.scan` stack of them, whose state has a leading layer axis), unboxed."""
  perm_in_inv = tree_paths.unboxed(state[layers.PERM_IN_INV])
  perm_out = tree_paths.unboxed(state[layers.PERM_OUT])
  stacked = perm_in_inv.shape[0] if perm_in_inv.ndim == 2 else None
  arrays = {name: tree_paths.unboxed(value) for name, value in base_storage.stored(state).items()}
  q = tuple(tree_paths.unboxed(q_layer[name]) for name in layers.ORTHOGONAL_PARAMS)
  return q, arrays, perm_in_inv, perm_out, stacked


def _per_layer(fn, stacked, *args):
  """`fn(*args)` for one layer, or mapped over the leading layer axis of stacked state one
  layer at a time (`lax.map`: one layer's float32 temporaries alive at once, not all)."""
  return jax.lax.map(lambda a: fn(*a), args) if stacked else fn(*args)


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
  params, poet = variables["params"], _poet(variables)
  check_optimizer_state(params, opt_state)
  variables = {**variables, "params": _zeroed_orthogonal(params, poet)}
  if poet:
    variables[layers.POET_COLLECTION] = _merged_poet(params, poet, config, merge_index)
  return variables, optim.reset_orthogonal_state(opt_state)


def check_optimizer_state(params, opt_state) -> None:
  """Raises if `opt_state`'s Adam moments do not have `params`' tree and shapes (an optimizer
  state of another model would otherwise be accepted here and fail later, inside `tx.update`)."""
  if opt_state is None:
    return
  is_adam = lambda n: isinstance(n, optax.ScaleByAdamState)
  another = "it belongs to another model; pass the state made by tx.init of these params."
  for node in (n for n in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(n)):
    try:  # each parameter beside its first moment (an optax.MaskedNode where its group masks it)
      pairs = jax.tree_util.tree_leaves(
          jax.tree_util.tree_map(lambda p, m: (p, m), params, node.mu, is_leaf=lambda x: isinstance(x, optax.MaskedNode)),
          is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2)
    except ValueError as err:
      raise ValueError(f"the optimizer state's tree does not match these params ({err}): {another}") from None
    for p, m in pairs:
      shape = tuple(jnp.shape(tree_paths.unboxed(p)))
      if hasattr(m, "shape") and tuple(m.shape) != shape:
        raise ValueError(f"the optimizer state holds a moment of shape {tuple(m.shape)} for a parameter of shape {shape}:"
                         f" {another}")


def _poet(variables: Variables):
  """The `poet` collection, `{}` for a model with no wrapped layer (every targeted layer
  opted out by `skip_indivisible`, say): merging and exporting it change nothing."""
  return variables.get(layers.POET_COLLECTION, {})


def _zeroed_orthogonal(params, poet, where=None):
  """`params` with every wrapped layer's orthogonal parameters zeroed (where `where`, if given)."""
  for path, _ in tree_paths.poet_layers(poet):
    new_q = dict(tree_paths.get_path(params, path))
    for name in layers.ORTHOGONAL_PARAMS:
      new_q[name] = optim.zeroed(new_q[name], where)
    params = tree_paths.with_path(params, path, new_q)
  return params


def _merged_poet(params, poet, config: POETConfig, merge_index, merging=None):
  """The `poet` collection after a merge: every layer's new `K_s` and permutations.

  `merging`: a traced bool (merge only where true) or None (merge). Each layer (or
  stack) merges in a loop whose trip count is its layer count, or 0 where `merging`
  is false: the loop updates the arrays it carries in place, so a donated state is
  merged with one layer's float32 temporaries alive at a time and no second copy of
  any base kernel (a `lax.cond` around the merge copied every kernel, and a `vmap`
  over a stack held every layer's float32 kernel at once).
  """
  for path, state in tree_paths.poet_layers(poet):
    q_layer = tree_paths.get_path(params, path)
    new = _merged_layer(state, q_layer, config, merge_index, "/".join(path), merging)
    poet = tree_paths.with_path(poet, path, {
        **state, **{name: tree_paths.reboxed(state[name], value) for name, value in new.items()}})
  return poet


def _merged_layer(state, q_layer, config: POETConfig, merge_index, path: str, merging):
  """New stored base arrays and permutations of one wrapped layer or stack (`_merged_poet`)."""
  (q_in, q_out), arrays, perm_in_inv, perm_out, stacked = _layer_arrays(state, q_layer)
  d_in, d_out = perm_in_inv.shape[-1], perm_out.shape[-1]
  key = permutation.layer_key(config.seed, merge_index, path)
  count = stacked or 1
  if merging is not None:
    count = jnp.where(merging, count, 0)

  def take(x, i):
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False) if stacked else x

  def put(x, value, i):
    value = value.astype(x.dtype)
    return jax.lax.dynamic_update_index_in_dim(x, value, i, 0) if stacked else value

  def merge_one(i, carry):
    arrays, perm_in_inv, perm_out = carry
    layer = {name: take(value, i) for name, value in arrays.items()}
    g_in, g_out = _layer_blocks({layers.Q_IN: take(q_in, i), layers.Q_OUT: take(q_out, i)}, config.neumann_terms,
                                dynamic=False)
    k_true_IxO = ops.effective_kernel(base_storage.to_float32(layer, d_in, d_out, master=True), g_in, g_out,
                                      take(perm_in_inv, i),
                                      take(perm_out, i))
    new_perm_in_inv, new_perm_out = permutation.draw_permutations(jax.random.fold_in(key, i) if stacked else key,
                                                                  d_in, d_out)
    new_layer = base_storage.from_float32(ops.permuted_base_kernel(k_true_IxO, new_perm_in_inv, new_perm_out), layer)
    return ({name: put(value, new_layer[name], i) for name, value in arrays.items()},
            put(perm_in_inv, new_perm_in_inv, i), put(perm_out, new_perm_out, i))

  arrays, perm_in_inv, perm_out = jax.lax.fori_loop(0, count, merge_one, (arrays, perm_in_inv, perm_out))
  return {**arrays, layers.PERM_IN_INV: perm_in_inv, layers.PERM_OUT: perm_out}


def should_merge(step: jax.Array | int, config: POETConfig) -> jax.Array:
  """`step > 0 and step % merge_interval == 0`."""
  step = jnp.asarray(step)
  return (step > 0) & (step % config.merge_interval == 0)


def merge_if_needed(step: jax.Array | int, variables: Variables, opt_state: Any, config: POETConfig) -> tuple[Variables, Any]:
  """Merges when `step > 0 and step % merge_interval == 0`, jit-safe (no `lax.cond`: see `_merged_poet`).

  Call it in the jitted train step after the optimizer update, with `step` the
  number of updates applied so far. The merge index is `step // merge_interval`.
  """
  step = jnp.asarray(step)
  merging = should_merge(step, config)
  params, poet = variables["params"], _poet(variables)
  check_optimizer_state(params, opt_state)
  # The base kernels and permutations change in loops that run no iteration unless
  # merging (see `_merged_poet`). The orthogonal parameters and their moments are zeroed
  # by a select, which fuses into the update that writes them.
  variables = {**variables, "params": _zeroed_orthogonal(params, poet, merging)}
  if poet:
    variables[layers.POET_COLLECTION] = _merged_poet(params, poet, config, step // config.merge_interval, merging)
  return variables, optim.reset_orthogonal_state(opt_state, merging)


def flat_effective_kernel(state, q_layer) -> jax.Array:
  """One wrapped layer's `K_eff` in float32, `(d_in, d_out)` (or `(L, d_in, d_out)` for a stack).

  Reads `k` from the layer's own `neumann_terms`.
  """
  (q_in, q_out), arrays, perm_in_inv, perm_out, stacked = _layer_arrays(state, q_layer)
  terms = tree_paths.unboxed(state[layers.NEUMANN_TERMS])
  d_in, d_out = perm_in_inv.shape[-1], perm_out.shape[-1]

  def effective_one(q_in, q_out, arrays, perm_in_inv, perm_out, terms):
    g_in, g_out = _layer_blocks({layers.Q_IN: q_in, layers.Q_OUT: q_out}, terms, dynamic=True)
    return ops.effective_kernel(base_storage.to_float32(arrays, d_in, d_out), g_in, g_out, perm_in_inv, perm_out)

  return _per_layer(effective_one, stacked, q_in, q_out, arrays, perm_in_inv, perm_out, terms)


def effective_params(variables: Variables) -> dict[str, Any]:
  """Plain parameters of the *unwrapped* model: `kernel = K_eff` for every wrapped layer.

  Reads `k` from the variables (`neumann_terms`), so no config is needed. Kernels
  are computed in float32 and stored in the base kernel's dtype, float32 for XQ's
  int8 codes (stacked, for layers built under `nn.scan`, as the unwrapped scanned
  model expects).

  Returns:
    A `params` tree for `model.apply({"params": ...}, ...)` (`params` itself when
    no layer is wrapped).
  """
  params, poet = variables["params"], _poet(variables)
  for path, state in tree_paths.poet_layers(poet):
    q_layer = tree_paths.get_path(params, path)
    base_kernel = state[layers.BASE_KERNEL]
    old_k = tree_paths.unboxed(base_kernel)
    dtype = jnp.float32 if base_storage.is_quantized(state) else old_k.dtype
    kernel = flat_effective_kernel(state, q_layer)
    dense = {k: v for k, v in q_layer.items() if k not in layers.ORTHOGONAL_PARAMS}
    dense["kernel"] = tree_paths.reboxed(base_kernel, kernel.astype(dtype).reshape(old_k.shape))
    params = tree_paths.with_path(params, path, dense)
  return params
