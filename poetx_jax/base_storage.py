"""How a wrapped layer's frozen base kernel `K_s` is stored: a float array, or POET-XQ's codes.

A float kernel is one variable, `base_kernel`, in the dtype `POETConfig.base_dtype`
asks for. An int8 (XQ) kernel is `base_kernel` holding uint8 codes plus per-group
`base_scale` and `base_offset` (`poetx_jax.quantization`), and, with error feedback,
`base_residual` (the 4-bit rounding residual that merges start from). Everything
here reads the stored arrays alone (the group size follows from their shapes), so
merges and exports need no config.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from poetx_jax import quantization

BASE_KERNEL = "base_kernel"
BASE_SCALE = "base_scale"
BASE_OFFSET = "base_offset"
BASE_RESIDUAL = "base_residual"
STORED = (BASE_KERNEL, BASE_SCALE, BASE_OFFSET, BASE_RESIDUAL)

BASE_DTYPES = ("bfloat16", "float32", "int8")


class QuantizedKernel(NamedTuple):
  """A `(d_in, d_out)` base kernel as uint8 codes and per-group `scale`, `offset` (a pytree).

  The layer's GEMMs take it in place of a float kernel and dequantize it where they
  read it (`dense`), so no float copy outlives the one layer that uses it.
  """

  codes: jax.Array
  scale: jax.Array
  offset: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.codes.shape


Kernel = jax.Array | QuantizedKernel


def dense(kernel: Kernel, dtype) -> jax.Array:
  """The kernel as a float array of `dtype` (dequantized for XQ: elementwise, fusible into the GEMM)."""
  if isinstance(kernel, QuantizedKernel):
    return quantization.dequantize(kernel.codes, kernel.scale, kernel.offset, dtype)
  return kernel.astype(dtype)


def is_quantized(state: Mapping[str, Any]) -> bool:
  """Whether a wrapped layer's frozen state holds XQ codes."""
  return BASE_SCALE in state


def stored(state: Mapping[str, Any]) -> dict[str, Any]:
  """The base kernel's stored arrays of a layer's frozen state, by name."""
  return {name: state[name] for name in STORED if name in state}


def layer_kernel(arrays: Mapping[str, jax.Array], d_in: int, d_out: int) -> Kernel:
  """What the layer multiplies by: `(d_in, d_out)` float kernel, or a `QuantizedKernel`."""
  kernel = arrays[BASE_KERNEL].reshape(d_in, d_out)
  if BASE_SCALE not in arrays:
    return kernel
  return QuantizedKernel(kernel, arrays[BASE_SCALE], arrays[BASE_OFFSET])


def to_float32(arrays: Mapping[str, jax.Array], d_in: int, d_out: int, *, master: bool = False) -> jax.Array:
  """The float32 `(d_in, d_out)` kernel: the one the layer computes with, or (`master`, what a
  merge starts from) for XQ with error feedback the codes plus the carried residual, finer
  than what the forward reads."""
  codes = arrays[BASE_KERNEL].reshape(d_in, d_out)
  if BASE_SCALE not in arrays:
    return codes.astype(jnp.float32)
  scale, offset = arrays[BASE_SCALE], arrays[BASE_OFFSET]
  if master and BASE_RESIDUAL in arrays:
    group = d_in // scale.shape[-2]
    return quantization.master_values(codes, scale, offset, arrays[BASE_RESIDUAL], group)
  return quantization.dequantize(codes, scale, offset, jnp.float32)


def from_float32(k_IxO: jax.Array, like: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """A float32 `(d_in, d_out)` kernel stored as `like` is: cast, or re-quantized (same group
  size, with a new residual where `like` carries one)."""
  kernel = like[BASE_KERNEL]
  if BASE_SCALE not in like:
    return {BASE_KERNEL: k_IxO.astype(kernel.dtype).reshape(kernel.shape)}
  group = k_IxO.shape[0] // like[BASE_SCALE].shape[-2]
  return _quantized(k_IxO, kernel.shape, group, BASE_RESIDUAL in like)


def initial(k_IxO: jax.Array, kernel_shape: tuple[int, ...], base_dtype: str, group_size: int,
            error_feedback: bool) -> dict[str, jax.Array]:
  """The stored arrays of a freshly initialized float32 base kernel `(d_in, d_out)`."""
  if base_dtype != "int8":
    return {BASE_KERNEL: k_IxO.astype(base_dtype).reshape(kernel_shape)}
  return _quantized(k_IxO, kernel_shape, group_size, error_feedback)


def _quantized(k_IxO: jax.Array, kernel_shape: tuple[int, ...], group_size: int, residual: bool) -> dict[str, jax.Array]:
  """XQ's stored arrays of a float32 `(d_in, d_out)` kernel, codes in the layer's kernel shape."""
  if residual:
    codes, scale, offset, packed = quantization.quantize_with_residual(k_IxO, group_size)
    extra = {BASE_RESIDUAL: packed}
  else:
    codes, scale, offset = quantization.quantize(k_IxO, group_size)
    extra = {}
  return {BASE_KERNEL: codes.reshape(kernel_shape), BASE_SCALE: scale, BASE_OFFSET: offset, **extra}
