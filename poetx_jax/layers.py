"""The POET-X computation of one intercepted `nn.Dense` / `nn.DenseGeneral` call.

Runs inside the intercepted module's own (compact) scope, so the variables it
creates sit at the layer's own path:

* `params/<path>/q_in`, `q_out`: packed skew generators (zeros at init and after
  every merge), and `bias` when the layer has one;
* `poet/<path>/base_kernel`: `K_s`, the frozen base kernel already permuted, in the
  layer's kernel shape and `POETConfig.base_dtype` (default: the layer's
  `param_dtype`); for XQ (`base_dtype="int8"`) uint8 codes, with `base_scale`,
  `base_offset` (and `base_residual`) beside it (`base_storage.py`);
* `poet/<path>/perm_in_inv`, `perm_out`: the two gathers of the forward;
* `poet/<path>/neumann_terms`: `k` (int32, -1 for exact), so that exports and
  monitoring need the variables alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from poetx_jax import base_storage, cayley, ops, permutation, quantization, skew
from poetx_jax.config import POETConfig

logger = logging.getLogger("poetx_jax")

POET_COLLECTION = "poet"
BASE_KERNEL = base_storage.BASE_KERNEL
PERM_IN_INV = "perm_in_inv"
PERM_OUT = "perm_out"
NEUMANN_TERMS = "neumann_terms"
Q_IN = "q_in"
Q_OUT = "q_out"
ORTHOGONAL_PARAMS = (Q_IN, Q_OUT)
# Blocks `G` computed outside the model (`poetx_jax.blocks.layer_blocks`), one entry per
# wrapped layer at its own path: the layer then uses them instead of running the
# Cayley–Neumann map itself, and its gradient flows to them, not to `q_in`, `q_out`.
BLOCKS_COLLECTION = "poet_blocks"
BLOCKS = "blocks"
_EXPECT_BLOCKS = contextvars.ContextVar("poetx_expect_blocks", default=False)


@contextlib.contextmanager
def expecting_blocks():
  """While tracing a model given blocks, a wrapped layer that finds none raises: a Flax
  transform around it (an `nn.scan` whose `variable_axes` name only some collections, say)
  did not pass the collection on, and the layer would silently run the map itself."""
  token = _EXPECT_BLOCKS.set(True)
  try:
    yield
  finally:
    _EXPECT_BLOCKS.reset(token)


def module_path(module: nn.Module) -> str:
  """The "/"-joined path of a bound module, as `targets` and `exclude` see it."""
  return "/".join(str(p) for p in module.path)


def _dense_geometry(module: nn.Module, inputs: jax.Array) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(contracted input axes, output features) of a Dense or DenseGeneral call."""
  if isinstance(module, nn.DenseGeneral):
    batch_dims = tuple(np.atleast_1d(module.batch_dims))
    if batch_dims:
      raise ValueError(
          f"POET-X cannot wrap DenseGeneral {module_path(module)!r} with batch_dims={batch_dims}:"
          " exclude it with POETConfig.exclude."
      )
    axis = tuple(int(a) % inputs.ndim for a in np.atleast_1d(module.axis))
    features = tuple(int(f) for f in np.atleast_1d(module.features))
    return axis, features
  return (inputs.ndim - 1,), (int(module.features),)


def _check_supported(module: nn.Module) -> None:
  if getattr(module, "dot_general", None) is not None or getattr(module, "dot_general_cls", None) is not None:
    raise ValueError(
        f"layer {module_path(module)!r} sets a custom dot_general, which POET-X would replace;"
        " exclude it with POETConfig.exclude."
    )


def _normalized_base_kernel(module: nn.Module, d_in: int, d_out: int, config: POETConfig, perms):
  """`K0` from the layer's own initializer, columns scaled to unit L2 norm, then permuted (float32)."""
  boxed = module.kernel_init(module.make_rng("params"), (d_in, d_out), module.param_dtype)
  k0_IxO = (boxed.unbox() if isinstance(boxed, meta.AxisMetadata) else boxed).astype(jnp.float32)
  if config.init_scale is not None:
    k0_IxO = config.init_scale * k0_IxO / jnp.maximum(jnp.linalg.norm(k0_IxO, axis=0, keepdims=True), 1e-12)
  perm_in_inv, perm_out = perms
  return boxed, ops.permuted_base_kernel(k0_IxO, perm_in_inv, perm_out)


def _initial_permutations(module: nn.Module, config: POETConfig, path: str, d_in: int, d_out: int):
  """Merge 0's permutations: keyed by (seed, 0, path) and by the init RNG, so the layers of
  an `nn.scan` (which share one path) draw different ones; the same on every replica."""
  layer_bits = jax.random.bits(module.make_rng("params"), (), jnp.uint32)
  key = jax.random.fold_in(permutation.layer_key(config.seed, 0, path), layer_bits)
  return permutation.draw_permutations(key, d_in, d_out)


def _check_stored_kind(module: nn.Module, config: POETConfig, path: str, base_dtype: str) -> None:
  """Raises when the variables were made with other base-kernel settings than `config`'s."""
  has = lambda name: module.has_variable(POET_COLLECTION, name)
  quantized = base_dtype == "int8"
  if has(base_storage.BASE_SCALE) != quantized:
    stored = "int8 (XQ) codes" if has(base_storage.BASE_SCALE) else "float base kernels"
    raise ValueError(f"layer {path!r}: POETConfig.base_dtype={config.base_dtype!r}, but the variables hold {stored}:"
                     " wrap with the base_dtype the variables were made with.")
  if quantized and has(base_storage.BASE_RESIDUAL) != config.quant_error_feedback:
    raise ValueError(f"layer {path!r}: POETConfig.quant_error_feedback={config.quant_error_feedback}, but the variables"
                     f" {'hold' if has(base_storage.BASE_RESIDUAL) else 'lack'} a residual: wrap with the setting they were"
                     " made with.")
  stored_dtype = jnp.dtype(module.get_variable(POET_COLLECTION, BASE_KERNEL).dtype)
  if not quantized and config.base_dtype is not None and stored_dtype != jnp.dtype(base_dtype):
    raise ValueError(f"layer {path!r}: POETConfig.base_dtype={config.base_dtype!r}, but the variables hold"
                     f" {stored_dtype.name} base kernels: wrap with the base_dtype they were made with.")


def poet_dense_call(module: nn.Module, inputs: jax.Array, config: POETConfig, next_fun) -> jax.Array:
  """Replaces one Dense/DenseGeneral call by the POET-X computation (or opts it out)."""
  path = module_path(module)
  _check_supported(module)
  axis, features = _dense_geometry(module, inputs)
  in_dims = tuple(inputs.shape[a] for a in axis)
  d_in, d_out = int(np.prod(in_dims)), int(np.prod(features))
  block = config.block_size
  if d_in % block or d_out % block:
    message = (
        f"POET-X layer {path!r} has kernel shape {in_dims + features} (d_in={d_in}, d_out={d_out}),"
        f" which block_size={block} does not divide"
    )
    if not config.skip_indivisible:
      raise ValueError(
          message + ": choose a block size that divides both, exclude the layer with POETConfig.exclude,"
          " or set POETConfig.skip_indivisible=True to train such layers as plain dense layers."
      )
    if module.is_initializing():
      logger.warning("%s; trained as a plain dense layer (skip_indivisible=True).", message)
    return next_fun(inputs)

  if not module.is_initializing() and not module.has_variable(POET_COLLECTION, BASE_KERNEL):
    raise ValueError(
        f"layer {path!r} has no frozen POET-X state: pass the whole variables dict"
        f" (with its {POET_COLLECTION!r} collection) to apply, not only 'params'."
    )
  kernel_shape = in_dims + features
  packed = skew.packed_size(block)
  q_dtype = jnp.dtype(config.param_dtype)
  q_in = module.param(Q_IN, nn.initializers.zeros_init(), (d_in // block, packed), q_dtype)
  q_out = module.param(Q_OUT, nn.initializers.zeros_init(), (d_out // block, packed), q_dtype)

  drawn = []  # one draw shared by the three variables below (only called during init)

  def init_perms():
    if not drawn:
      drawn.append(_initial_permutations(module, config, path, d_in, d_out))
    return drawn[0]

  base_dtype = config.base_dtype or jnp.dtype(module.param_dtype).name
  quantized = base_dtype == "int8"
  if quantized:
    quantization.check_group_size(d_in, config.quant_group_size, path)
  if not module.is_initializing():
    _check_stored_kind(module, config, path, base_dtype)
  names = (base_storage.BASE_KERNEL,)
  if quantized:
    names += (base_storage.BASE_SCALE, base_storage.BASE_OFFSET)
    names += (base_storage.BASE_RESIDUAL,) if config.quant_error_feedback else ()
  made = []  # the stored arrays, computed once for all of them (only called during init)

  def init_stored(name):
    if not made:
      boxed, k_s = _normalized_base_kernel(module, d_in, d_out, config, init_perms())
      arrays = base_storage.initial(k_s, kernel_shape, base_dtype, config.quant_group_size, config.quant_error_feedback)
      made.append((boxed, arrays))
    boxed, arrays = made[0]
    value = arrays[name]
    if name == base_storage.BASE_KERNEL and isinstance(boxed, meta.AxisMetadata):
      return meta.replace_boxed(boxed, value)
    return value

  stored = {name: module.variable(POET_COLLECTION, name, init_stored, name).value for name in names}
  perm_in_inv = module.variable(POET_COLLECTION, PERM_IN_INV, lambda: init_perms()[0]).value
  perm_out = module.variable(POET_COLLECTION, PERM_OUT, lambda: init_perms()[1]).value
  module.variable(
      POET_COLLECTION, NEUMANN_TERMS, lambda: jnp.asarray(cayley.encode_neumann_terms(config.neumann_terms), jnp.int32)
  )
  bias = None
  if module.use_bias:
    bias = module.param(
        "bias", lambda rng, shape, dtype: module.bias_init(rng, (d_out,), dtype).reshape(shape), features, module.param_dtype
    )

  # The base kernel enters the layer in its stored dtype and is cast inside it, in the
  # forward and again in the backward: a cast made here would be a new array that the
  # backward saves, which `nn.scan` stacks per layer (a copy in and out of every kernel,
  # every step); the stored kernel itself is saved by reference.
  # XQ's codes take part as their float32 scale does.
  like_kernel = stored[base_storage.BASE_SCALE] if quantized else stored[base_storage.BASE_KERNEL]
  inputs, _, bias = nn.dtypes.promote_dtype(inputs, like_kernel, bias, dtype=module.dtype)
  lead_axes = tuple(a for a in range(inputs.ndim) if a not in axis)
  x_NI = jnp.transpose(inputs, lead_axes + axis) if axis != tuple(range(inputs.ndim - len(axis), inputs.ndim)) else inputs
  lead_shape = tuple(inputs.shape[a] for a in lead_axes)
  has_blocks = module.has_variable(BLOCKS_COLLECTION, BLOCKS)
  if _EXPECT_BLOCKS.get() and not has_blocks:
    raise ValueError(
        f"POET-X layer {path!r} found no blocks in the {BLOCKS_COLLECTION!r} collection, which its caller passes"
        f" (`blocks.layer_blocks`): a Flax transform around the layer must carry that collection (nn.scan with"
        f" variable_axes={{True: 0}}, or {BLOCKS_COLLECTION!r}: 0 beside 'params' and 'poet'), or the caller must"
        " not pass blocks (then each layer runs the Cayley–Neumann map itself)."
    )
  x_NI = x_NI.reshape(lead_shape + (d_in,))
  k_IxO = base_storage.layer_kernel(stored, d_in, d_out)
  common = dict(
      block_size=block, variant=config.variant, implementation=config.implementation,
      interpret=config.pallas_interpret, precision=module.precision, batch_axes=config.batch_axes,
  )
  if has_blocks:  # given by the train step (`blocks.layer_blocks`): no map here
    y_NO = ops.poet_linear_with_blocks(
        x_NI, k_IxO, module.get_variable(BLOCKS_COLLECTION, BLOCKS), perm_in_inv, perm_out, **common
    )
  else:
    y_NO = ops.poet_linear(
        x_NI, k_IxO, q_in, q_out, perm_in_inv, perm_out, neumann_terms=config.neumann_terms,
        keep_cayley_state=config.keep_cayley_state, **common,
    )
  y = y_NO.reshape(lead_shape + features)
  if bias is not None:
    y = y + bias
  return y


def is_poet_layer(tree: Any) -> bool:
  """Whether a node of the `poet` collection is one wrapped layer's frozen state."""
  return hasattr(tree, "keys") and BASE_KERNEL in tree and PERM_IN_INV in tree and PERM_OUT in tree
