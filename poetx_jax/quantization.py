"""POET-XQ: frozen base kernels stored as uint8 codes on a per-group min/max grid.

A kernel `k_IxO` of shape `(..., I, O)` (any leading axes, e.g. a stack of layers)
is split along `I` into groups of `G` contiguous input features of one output
column. Each group `g` gets an asymmetric grid of 256 levels,

  scale = (max - min) / 255,   offset = min,   code = clip(round((w - offset) / scale), 0, 255),

and is read back as `code * scale + offset`, so every value lands within half a
step (`scale / 2`) of the original. The zero point is kept as a float offset: it
is exact, whereas an integer zero point `round(-min / scale)` must itself be
clipped to [0, 255] and so clips every code of a group that does not straddle
zero (all weights positive, or all negative). Scales and offsets are float32 of
shape `(..., I / G, O)`.

Error feedback (optional): the rounding residual `r = target - dequantize(codes)`,
`|r| <= scale / 2`, is kept at 4 bits, level `l = clip(round(14 r / scale) + 7, 0, 14)`
standing for `(l - 7) * scale / 14` (15 levels, so that a zero residual, as at each
group's minimum and maximum, is exact rather than a tie), two levels per uint8 along
`I`. Codes plus residual give a "master" kernel within `scale / 28` of the target, which the next
merge starts from, so rounding errors do not pile up merge after merge; the
forward reads only the 8-bit codes.

Letters: `I` input features (d_in), `O` output features (d_out), `G` the group
size, `N = I / G` groups per column, `H = I / 2` packed residual rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_LEVELS = 255  # Highest 8-bit code.
_RESIDUAL_STEPS = 14  # Residual levels per quantization step: level `l` stands for
_RESIDUAL_CENTER = 7  # `(l - 7) * scale / 14`, l in [0, 14] (one of the 16 nibble values unused).
# The scale of a constant group: any positive value gives codes 0 and reads back
# exactly `offset`; the smallest normal float32 keeps the division finite.
_TINY_SCALE = float(np.finfo(np.float32).tiny)


def check_group_size(d_in: int, group_size: int, where: str) -> None:
  """Checks that quantization groups tile the input features of a kernel.

  Args:
    d_in: number of input features `I` of the kernel.
    group_size: `G`, contiguous input features sharing one scale and offset.
    where: what is being quantized (e.g. a layer path), named in the error.

  Raises:
    ValueError: if `G` is not a positive divisor of `I`.
  """
  if group_size < 1 or d_in % group_size:
    raise ValueError(
        f"{where}: POETConfig.quant_group_size = {group_size} must be a positive divisor"
        f" of the kernel's input features d_in = {d_in}."
    )


def _check_kernel(k_IxO: jax.Array, group_size: int, where: str) -> None:
  if k_IxO.ndim < 2:
    raise ValueError(f"{where}: kernels are (..., d_in, d_out); got shape {k_IxO.shape}.")
  check_group_size(k_IxO.shape[-2], group_size, where)


def _check_even(group_size: int, where: str) -> None:
  if group_size % 2:
    raise ValueError(
        f"{where}: POETConfig.quant_group_size = {group_size} must be even to pack two"
        " 4-bit residuals per byte."
    )


def _grouped(x_IxO: jax.Array, group_size: int) -> jax.Array:
  """`(..., I, O)` -> `(..., N, G, O)`."""
  *lead, d_in, d_out = x_IxO.shape
  return x_IxO.reshape(*lead, d_in // group_size, group_size, d_out)


def _ungrouped(x_NxGxO: jax.Array) -> jax.Array:
  """`(..., N, G, O)` -> `(..., I, O)`."""
  *lead, groups, group_size, d_out = x_NxGxO.shape
  return x_NxGxO.reshape(*lead, groups * group_size, d_out)


def _grid(k_NxGxO: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(scale, offset) of each group, `(..., N, O)` float32."""
  low_NxO = jnp.min(k_NxGxO, axis=-2)
  high_NxO = jnp.max(k_NxGxO, axis=-2)
  # max(.., tiny) also covers ranges so small that range / 255 underflows.
  scale_NxO = jnp.maximum((high_NxO - low_NxO) / _LEVELS, _TINY_SCALE)
  return scale_NxO, low_NxO


def _encode(k_IxO: jax.Array, group_size: int):
  """Codes (rounded to nearest), scale and offset."""
  k_NxGxO = _grouped(k_IxO.astype(jnp.float32), group_size)
  scale_NxO, offset_NxO = _grid(k_NxGxO)
  t_NxGxO = jnp.round((k_NxGxO - offset_NxO[..., None, :]) / scale_NxO[..., None, :])
  codes_IxO = _ungrouped(jnp.clip(t_NxGxO, 0, _LEVELS)).astype(jnp.uint8)
  return codes_IxO, scale_NxO, offset_NxO


def quantize(k_IxO: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Quantizes a kernel to uint8 codes on per-group min/max grids, rounding to nearest.

  Args:
    k_IxO: `(..., I, O)` kernel, any float dtype (computed in float32).
    group_size: `G`, a divisor of `I`; static under jit.

  Returns:
    `(codes, scale, offset)`: `(..., I, O)` uint8 codes and `(..., I / G, O)` float32
    scales and offsets; `dequantize` reads the kernel back within `scale / 2`.

  Raises:
    ValueError: if `k_IxO` has fewer than 2 axes or `G` does not divide `I`.
  """
  _check_kernel(k_IxO, group_size, "quantize")
  return _encode(k_IxO, group_size)


def dequantize(
    codes_IxO: jax.Array,
    scale_NxO: jax.Array,
    offset_NxO: jax.Array,
    dtype: jax.typing.DTypeLike = jnp.float32,
) -> jax.Array:
  """Reads a kernel back from its codes: `codes * scale + offset` per group.

  Elementwise on a `(..., N, G, O)` view so that XLA can fuse it into the matmul
  that consumes the kernel.

  Args:
    codes_IxO: `(..., I, O)` uint8 codes.
    scale_NxO: `(..., N, O)` float32 scales, `N` dividing `I`.
    offset_NxO: `(..., N, O)` float32 offsets.
    dtype: dtype of the result (the arithmetic is float32).

  Returns:
    The `(..., I, O)` kernel in `dtype`.

  Raises:
    ValueError: if the number of groups `N` does not divide `I`.
  """
  d_in, groups = codes_IxO.shape[-2], scale_NxO.shape[-2]
  if groups < 1 or d_in % groups:
    raise ValueError(f"dequantize: {groups} groups do not tile d_in = {d_in}.")
  codes_NxGxO = _grouped(codes_IxO, d_in // groups).astype(jnp.float32)
  k_NxGxO = codes_NxGxO * scale_NxO[..., None, :] + offset_NxO[..., None, :]
  return _ungrouped(k_NxGxO).astype(dtype)


def _pack_nibbles(levels_IxO: jax.Array) -> jax.Array:
  """Rows 2i to the low nibble, rows 2i + 1 to the high nibble: `(..., I, O)` -> `(..., H, O)`."""
  pairs_Hx2xO = _grouped(levels_IxO.astype(jnp.uint8), 2)
  return pairs_Hx2xO[..., 0, :] | (pairs_Hx2xO[..., 1, :] << 4)


def _unpack_nibbles(packed_HxO: jax.Array) -> jax.Array:
  """Inverts `_pack_nibbles`: `(..., H, O)` -> `(..., I, O)` uint8 levels."""
  pairs_Hx2xO = jnp.stack([packed_HxO & 0xF, packed_HxO >> 4], axis=-2)
  return _ungrouped(pairs_Hx2xO)


def quantize_with_residual(
    target_IxO: jax.Array, group_size: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Quantizes a kernel and keeps its rounding residual at 4 bits (error feedback).

  The residual `r = target - dequantize(codes)` is stored as level
  `l = clip(round(14 r / scale) + 7, 0, 14)`, read back as `(l - 7) * scale / 14`.

  Args:
    target_IxO: `(..., I, O)` kernel, any float dtype (computed in float32).
    group_size: `G`, an even divisor of `I`; static under jit.

  Returns:
    `(codes, scale, offset, residual_packed)`: as in `quantize`, plus the
    `(..., I / 2, O)` uint8 residual levels, rows `2i` in the low nibble and `2i + 1`
    in the high one. `master_values` reads the target back within `scale / 28`.

  Raises:
    ValueError: if `target_IxO` has fewer than 2 axes, or `G` is odd or does not divide `I`.
  """
  _check_kernel(target_IxO, group_size, "quantize_with_residual")
  _check_even(group_size, "quantize_with_residual")
  target_IxO = target_IxO.astype(jnp.float32)
  codes_IxO, scale_NxO, offset_NxO = _encode(target_IxO, group_size)
  residual_NxGxO = _grouped(target_IxO - dequantize(codes_IxO, scale_NxO, offset_NxO), group_size)
  steps_NxGxO = residual_NxGxO / (scale_NxO[..., None, :] / _RESIDUAL_STEPS)
  levels_NxGxO = jnp.clip(jnp.round(steps_NxGxO) + _RESIDUAL_CENTER, 0, 2 * _RESIDUAL_CENTER)
  return codes_IxO, scale_NxO, offset_NxO, _pack_nibbles(_ungrouped(levels_NxGxO))


def residual_values(residual_packed_HxO: jax.Array, scale_NxO: jax.Array, group_size: int) -> jax.Array:
  """Unpacks the 4-bit residuals of `quantize_with_residual`.

  Args:
    residual_packed_HxO: `(..., I / 2, O)` uint8, two levels per byte.
    scale_NxO: `(..., I / G, O)` float32 scales of the codes.
    group_size: `G`, even; static under jit.

  Returns:
    `(..., I, O)` float32 residuals, each in `[-1/2, 1/2] * scale`.

  Raises:
    ValueError: if `G` is odd or the shapes do not agree with `G`.
  """
  _check_even(group_size, "residual_values")
  d_in = 2 * residual_packed_HxO.shape[-2]
  if scale_NxO.shape[-2] * group_size != d_in:
    raise ValueError(
        f"residual_values: {scale_NxO.shape[-2]} groups of {group_size} do not tile d_in = {d_in}."
    )
  levels_NxGxO = _grouped(_unpack_nibbles(residual_packed_HxO), group_size).astype(jnp.float32)
  step_NxO = scale_NxO / _RESIDUAL_STEPS
  return _ungrouped((levels_NxGxO - _RESIDUAL_CENTER) * step_NxO[..., None, :])


def master_values(
    codes_IxO: jax.Array,
    scale_NxO: jax.Array,
    offset_NxO: jax.Array,
    residual_packed_HxO: jax.Array,
    group_size: int,
) -> jax.Array:
  """The higher-precision "master" kernel a merge starts from: codes plus residual.

  Args:
    codes_IxO, scale_NxO, offset_NxO, residual_packed_HxO: outputs of
      `quantize_with_residual`.
    group_size: `G`, even; static under jit.

  Returns:
    `(..., I, O)` float32 kernel, within `scale / 28` of the quantized target.

  Raises:
    ValueError: if `G` is odd or the shapes do not agree with `G`.
  """
  base_IxO = dequantize(codes_IxO, scale_NxO, offset_NxO)
  return base_IxO + residual_values(residual_packed_HxO, scale_NxO, group_size)
