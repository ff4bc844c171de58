"""The POET-X linear map `y = x · P·K_s·R` computed input-centrically (SPEC §4).

`K_eff` is never formed in the forward: two gathers, two sets of `B x B` block
products and one large GEMM. The backward is written by hand (a `custom_vjp`) so
that gathers transpose into inverse gathers, `K_s` gets no gradient (so there is
no third GEMM), and the two variants differ only in what they keep:

* `fast` keeps `x`, `G` and `h = x[perm_in_inv]·BD(G_in)·K_s`;
* `mem` keeps only `x` and `G`, and recomputes `h` in the backward (one extra large
  GEMM), from operands tied to the cotangent: without remat XLA's CSE would otherwise
  merge it with the forward's `h` and keep that alive (on the XLA path it did). With
  jax 0.10.2 XLA:CPU still merged the recomputed input rotation, so there mem saved
  nothing; from jax 0.11 it holds (`tests/ops_test.py`).

Either can also keep the Cayley–Neumann map's intermediates (`Q`, `Q²`, `Q² − 2Q`
per block, Pallas only; `keep_cayley_state`), which saves the backward two small
kernels but costs three more saved arrays per layer. Under `nn.scan` every saved
array is stacked per layer, written and read back by a copy each, which costs more
than the two kernels (see `POETConfig.keep_cayley_state`). For the same reason the
backward rebuilds what is cheap to rebuild rather than saving it: the inverse
permutations (a scatter each), `xᵀ` (a transpose of the saved `x`, which layers
reading one input share) and the base kernel cast to the activations' dtype (fused
into the GEMM that reads it).

Inside the layer activations are feature-major (`(D, N)`, see `rotation.py`), so
every permutation moves whole rows of tokens.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from poetx_jax import backends, base_storage, cayley, permutation, rotation

VARIANTS = ("fast", "mem")

# The name of each layer's orthogonal blocks `G` under `jax.checkpoint`. A remat policy
# that also saves it (`jax.checkpoint_policies.save_only_these_names(...)`, combined
# with the caller's own through `save_from_both_policies`) keeps the Cayley–Neumann
# forward from running again in the backward, for `B` saved values per feature (`B/N`
# of the activation it rotates) and a copy per layer under `nn.scan`. The Cayley
# intermediates that `keep_cayley_state` keeps carry the same name. Measured on the
# LLaMA models it is close to even, so their "dots" policy leaves it out (see
# `models/llama.py`).
BLOCKS_CHECKPOINT_NAME = "poetx_blocks"


def _hidden_t(backend, x_IxN, k_IxO, g_RxBxB, perm_in_inv, precision):
  """`hᵀ = K_sᵀ · (x[..., perm_in_inv]·BD(G_in))ᵀ`, `(O, N)`: the one large GEMM of the forward.

  `G_in` is the first `I / B` blocks of `g_RxBxB`.
  """
  xr_IxN = backend.gather_rotate(x_IxN, perm_in_inv, g_RxBxB)
  return jnp.matmul(base_storage.dense(k_IxO, x_IxN.dtype).T, xr_IxN, precision=precision)


# Both sides' blocks live in one array, `G = [G_in; G_out]` (`(R_in + R_out, B, B)`):
# one Cayley–Neumann call serves both sides (the input side alone, 16 blocks at 4096
# wide with b = 256, fills only half of an H100's multiprocessors), and the backward
# writes both sides' cotangents into one buffer, so no slice, padding or sum is
# copied between the kernels.
_STATIC = ("backend", "keep_hidden", "keep_cayley_state", "precision", "block_size", "neumann_terms")


@functools.partial(jax.custom_vjp, nondiff_argnums=tuple(range(len(_STATIC))))
def _poet_layer(backend, keep_hidden, keep_cayley_state, precision, block_size, neumann_terms, x_NI, k_IxO, qs, perms):
  """`qs`: `(q_in_RxE, q_out_RxE)`, the packed generators; `perms`: `(perm_in_inv, perm_out)`."""
  return _poet_layer_fwd(
      backend, keep_hidden, keep_cayley_state, precision, block_size, neumann_terms, x_NI, k_IxO, qs, perms
  )[0]


def _joined(qs):
  """Both sides' generators as one float32 `(R_in + R_out, E)` array, input side first.

  Built again in the backward rather than saved: the layer's own arguments are saved
  by reference, a new array would be stacked per layer under `nn.scan`.
  """
  return jnp.concatenate([q.astype(jnp.float32) for q in qs], axis=0)


def _with_inverses(perms):
  """`(perm_in_inv, perm_in, perm_out, perm_out_inv)` from the two stored gathers."""
  perm_in_inv, perm_out = perms
  return perm_in_inv, permutation.invert(perm_in_inv), perm_out, permutation.invert(perm_out)


def _cayley_settings(x_dtype, precision):
  """DEFAULT precision (TF32 on GPUs) only rounds the `Q²` terms of `G`; merges use
  HIGHEST, and so does the layer when its caller asks for HIGHEST, or leaves
  `precision` unset under `jax_default_matmul_precision="highest"` (as the GEMMs and
  rotations then do): float32 activations then give the reference's numbers on a GPU
  too. With bfloat16 activations the Pallas kernels also read bfloat16 operands and
  write `G` in bfloat16 (see `kernels/cayley_neumann.py`): the rotations round `G` to
  the activations' dtype anyway."""
  operand_dtype = jnp.bfloat16 if x_dtype == jnp.bfloat16 else jnp.float32
  if precision is None:
    precision = jax.config.jax_default_matmul_precision
  # Precision only means something for float32 operands (bfloat16 ones multiply exactly).
  highest = operand_dtype == jnp.float32 and _asks_for_highest(precision)
  return dict(precision=jax.lax.Precision.HIGHEST if highest else jax.lax.Precision.DEFAULT, operand_dtype=operand_dtype)


def _asks_for_highest(precision) -> bool:
  """Whether `precision`, in any form `jax.lax.dot` takes, asks for IEEE float32 products:
  `Precision.HIGHEST`, "highest" or "float32", a pair of those, or the F32_F32_F32 preset
  (or its name)."""
  if isinstance(precision, (tuple, list)):
    return bool(precision) and all(_asks_for_highest(p) for p in precision)
  if isinstance(precision, str) and precision in jax.lax.DotAlgorithmPreset.__members__:
    precision = jax.lax.DotAlgorithmPreset[precision]  # a preset by name, as jax.lax.dot reads it
  elif isinstance(precision, str):
    try:
      precision = jax.lax.Precision(precision)
    except ValueError:
      return False  # the GEMMs, which take the same argument, say what is wrong with it
  return precision in (jax.lax.Precision.HIGHEST, jax.lax.DotAlgorithmPreset.F32_F32_F32)


def _poet_layer_fwd(backend, keep_hidden, keep_cayley_state, precision, block_size, neumann_terms, x, k_IxO, qs, perms):
  """`x`: `(..., I)`, flattened to token rows here rather than by the caller (see the residuals)."""
  # Optionally keeps what the Cayley backward would recompute (`Q`, `Q2`, `Q2 − 2Q`:
  # 3·B² operand-dtype values per block).
  settings = _cayley_settings(x.dtype, precision)
  g_RxBxB, cayley_state = backend.cayley_forward(
      _joined(qs), block_size, neumann_terms, out_dtype=x.dtype, keep_state=keep_cayley_state, **settings
  )
  g_RxBxB, cayley_state = checkpoint_name((g_RxBxB, cayley_state), BLOCKS_CHECKPOINT_NAME)
  y, saved_h = _rotations_fwd(backend, keep_hidden, precision, block_size, x, k_IxO, g_RxBxB, perms)
  return y, (x, saved_h, k_IxO, qs, g_RxBxB, cayley_state, perms)


def _rotations_fwd(backend, keep_hidden, precision, block_size, x, k_IxO, g_RxBxB, perms):
  """The forward from the blocks `G` (in `x`'s dtype) on: `(y, h if keep_hidden else None)`."""
  x_NI = x.reshape(-1, x.shape[-1])
  perm_in_inv, _, perm_out, perm_out_inv = _with_inverses(perms)
  x_IxN = x_NI.T  # feature-major inside the layer: permutations move whole rows
  h_OxN = _hidden_t(backend, x_IxN, k_IxO, g_RxBxB, perm_in_inv, precision)
  y_OxN = backend.rotate_gather(h_OxN, g_RxBxB, perm_out, perm_out_inv, block_offset=x_NI.shape[-1] // block_size)
  # x is saved as it came (by reference: layers reading the same input, like q/k/v,
  # share it) and flattened and transposed again in the backward; a saved `x_IxN`
  # would be one more array per layer, stacked per layer under `nn.scan`.
  return y_OxN.T.reshape(x.shape[:-1] + (y_OxN.shape[0],)), (h_OxN if keep_hidden else None)


def _poet_layer_bwd(backend, keep_hidden, keep_cayley_state, precision, block_size, neumann_terms, residuals, dy):
  del keep_hidden, keep_cayley_state
  x, h_OxN, k_IxO, qs, g_RxBxB, cayley_state, perms = residuals
  settings = _cayley_settings(x.dtype, precision)
  # The Cayley backward multiplies dG in its operand dtype: with bfloat16 operands the
  # outer sums also write that rounded copy (no separate cast of the cotangent).
  operand_dtype = jnp.dtype(settings["operand_dtype"])
  dx, dg_RxBxB, copy = _rotations_bwd(
      backend, precision, block_size, x, h_OxN, k_IxO, g_RxBxB, perms, dy,
      copy_dtype=operand_dtype if operand_dtype != jnp.float32 else None,
  )
  dq_RxE = backend.cayley_backward(
      _joined(qs), dg_RxBxB, block_size, neumann_terms, state=cayley_state, dg_operand=copy, **settings
  )
  blocks_in = x.shape[-1] // block_size
  dqs = (dq_RxE[:blocks_in].astype(qs[0].dtype), dq_RxE[blocks_in:].astype(qs[1].dtype))
  return dx, None, dqs, None


def _rotations_bwd(backend, precision, block_size, x, h_OxN, k_IxO, g_RxBxB, perms, dy, copy_dtype=None):
  """`(dx, dG float32, dG's copy in copy_dtype or None)` from the blocks `G` (in `x`'s dtype) on."""
  x_IxN = x.reshape(-1, x.shape[-1]).T
  perm_in_inv, perm_in, _, perm_out_inv = _with_inverses(perms)
  blocks_in = x_IxN.shape[0] // block_size
  dy_OxN = dy.reshape(-1, dy.shape[-1]).T
  if h_OxN is None:  # mem: recompute the hidden state, one extra large GEMM
    # Without remat the forward and this backward are one XLA program, whose CSE pass
    # would merge the recomputation with the forward's own `h` and keep that alive
    # until here: mem would then save nothing. The barrier ties the recomputation's
    # operands to the cotangent, which exists only in the backward (enough from jax
    # 0.11; jax 0.10.2's XLA:CPU still merged the input rotation).
    x_for_h, k_for_h, g_for_h = _tied_to_cotangent((x_IxN, k_IxO, g_RxBxB), dy_OxN)
    h_OxN = _hidden_t(backend, x_for_h, k_for_h, g_for_h, perm_in_inv, precision)
  fresh = jax.ShapeDtypeStruct(g_RxBxB.shape, jnp.float32)
  copy = jax.ShapeDtypeStruct(g_RxBxB.shape, copy_dtype) if copy_dtype is not None else None
  # dG_out[i] = Σ h_iᵀ g1_i with g1 = dy[..., perm_out_inv]; dh = g1 · BD(G_out)ᵀ (one pass: both read g1).
  dh_OxN, dg_RxBxB, copy = _rotate_outer_sum(backend, fresh, copy, dy_OxN, perm_out_inv, h_OxN, None, g_RxBxB, blocks_in)
  # The second large GEMM; K_s gets no gradient, so there is no third.
  dxr_IxN = jnp.matmul(base_storage.dense(k_IxO, dh_OxN.dtype), dh_OxN, precision=precision)
  # dG_in[j] = Σ xp_jᵀ dxr_j with xp = x[..., perm_in_inv]; dx = (dxr · BD(G_in)ᵀ)[..., perm_in].
  dx_IxN, dg_RxBxB, copy = _rotate_outer_sum(
      backend, dg_RxBxB, copy, dxr_IxN, None, x_IxN, perm_in_inv, g_RxBxB, 0, perm_in, perm_in_inv
  )
  return dx_IxN.T.reshape(x.shape), dg_RxBxB, copy


def _tied_to_cotangent(operands, cotangent):
  """`operands`, as values XLA cannot compute before `cotangent` exists."""
  *operands, _ = jax.lax.optimization_barrier((*operands, cotangent))
  return tuple(operands)


_poet_layer.defvjp(_poet_layer_fwd, _poet_layer_bwd)


# The same layer from blocks `G` computed elsewhere (`cayley_blocks`), differentiated
# with respect to `G`: a train step that accumulates gradients over microbatches runs
# the Cayley–Neumann map once per step, not forward (twice under remat) and backward
# per microbatch, since `dq = J(q)ᵀ · Σ dG` is linear in the summed cotangent.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _blocks_layer(backend, keep_hidden, precision, block_size, x, k_IxO, g_RxBxB, perms):
  return _blocks_layer_fwd(backend, keep_hidden, precision, block_size, x, k_IxO, g_RxBxB, perms)[0]


def _blocks_layer_fwd(backend, keep_hidden, precision, block_size, x, k_IxO, g_RxBxB, perms):
  # `G` is saved as given (by reference) and cast to the activations' dtype again in the
  # backward: the cast is a new array, which `nn.scan` would stack per layer.
  y, saved_h = _rotations_fwd(backend, keep_hidden, precision, block_size, x, k_IxO, g_RxBxB.astype(x.dtype), perms)
  return y, (x, saved_h, k_IxO, g_RxBxB, perms)


def _blocks_layer_bwd(backend, keep_hidden, precision, block_size, residuals, dy):
  del keep_hidden
  x, h_OxN, k_IxO, g_RxBxB, perms = residuals
  # The cotangent in G's dtype: below float32 the outer sums write that copy themselves.
  narrow = g_RxBxB.dtype if g_RxBxB.dtype != jnp.float32 else None
  dx, dg_RxBxB, copy = _rotations_bwd(
      backend, precision, block_size, x, h_OxN, k_IxO, g_RxBxB.astype(x.dtype), perms, dy, copy_dtype=narrow
  )
  return dx, None, dg_RxBxB if copy is None else copy, None


_blocks_layer.defvjp(_blocks_layer_fwd, _blocks_layer_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _cayley_map(backend, block_size, neumann_terms, precision, operand_dtype, q_RxE):
  return _cayley_map_fwd(backend, block_size, neumann_terms, precision, operand_dtype, q_RxE)[0]


def _cayley_map_fwd(backend, block_size, neumann_terms, precision, operand_dtype, q_RxE):
  g_RxBxB, _ = backend.cayley_forward(
      q_RxE, block_size, neumann_terms, precision=precision, operand_dtype=operand_dtype, out_dtype=jnp.float32
  )
  return g_RxBxB, q_RxE


def _cayley_map_bwd(backend, block_size, neumann_terms, precision, operand_dtype, q_RxE, dg_RxBxB):
  dq_RxE = backend.cayley_backward(
      q_RxE, dg_RxBxB.astype(jnp.float32), block_size, neumann_terms, precision=precision, operand_dtype=operand_dtype
  )
  return (dq_RxE.astype(q_RxE.dtype),)


_cayley_map.defvjp(_cayley_map_fwd, _cayley_map_bwd)


def cayley_map(
    q_RxE: jax.Array,
    *,
    block_size: int,
    neumann_terms: int | None = 3,
    implementation: str | None = None,
    interpret: bool = False,
    activation_dtype=jnp.float32,
    precision=None,
) -> jax.Array:
  """The blocks `G` (float32 `(R, B, B)`) of packed generators `(R, E)`, differentiable.

  The map `poet_linear` runs inside, for `poet_linear_with_blocks`. `activation_dtype`
  and `precision` are the layer's: with bfloat16 activations the Pallas map multiplies
  bfloat16 operands, as the layer's own map does.
  """
  backend = backends.resolve(implementation, interpret=interpret, block_size=block_size)
  settings = _cayley_settings(jnp.dtype(activation_dtype), precision)
  return _cayley_map(backend, block_size, neumann_terms, settings["precision"], settings["operand_dtype"],
                     q_RxE.astype(jnp.float32))


def cayley_blocks(q_in_RxE: jax.Array, q_out_RxE: jax.Array, *, block_size: int, **kwargs) -> jax.Array:
  """Both sides' blocks `G = [G_in; G_out]`, float32 `(..., R_in + R_out, B, B)`: `cayley_map`
  of the joined generators, leading (layer) axes kept."""
  if q_in_RxE.shape[:-2] != q_out_RxE.shape[:-2]:
    raise ValueError(f"q_in {q_in_RxE.shape} and q_out {q_out_RxE.shape} must share their leading (layer) axes.")
  q_RxE = jnp.concatenate([q_in_RxE, q_out_RxE], axis=-2)
  g = cayley_map(q_RxE.reshape((-1, q_RxE.shape[-1])), block_size=block_size, **kwargs)
  return g.reshape(q_RxE.shape[:-1] + (block_size, block_size))


def _rotate_outer_sum(backend, into, copy_into, s, gather_s, a, gather_a, g_RxBxB, block_offset, out_perm=None,
                      out_perm_inv=None):
  """`(rotated s, dG, dG's operand-dtype copy or None)` with one side's blocks of dG written."""
  args = (into, s, gather_s, a, gather_a, g_RxBxB, block_offset, out_perm, out_perm_inv)
  if copy_into is None:
    return (*backend.rotate_outer_sum_into(*args), None)
  return backend.rotate_outer_sum_into(*args, copy_into=copy_into)


def check_shapes(x_shape, k_shape, q_in_shape, q_out_shape, block_size: int) -> None:
  """Raises one ValueError naming what to change when shapes and block size disagree
  (generator shapes None: not checked)."""
  d_in, d_out = k_shape
  if x_shape[-1] != d_in:
    raise ValueError(f"input has {x_shape[-1]} features, the base kernel expects {d_in}.")
  for name, d, q_shape in (("d_in", d_in, q_in_shape), ("d_out", d_out, q_out_shape)):
    if d % block_size:
      raise ValueError(f"{name}={d} is not divisible by block_size={block_size}.")
    expected = (d // block_size, block_size * (block_size - 1) // 2)
    if q_shape is not None and tuple(q_shape) != expected:
      raise ValueError(f"orthogonal parameters for {name} have shape {tuple(q_shape)}, expected {expected}.")


def poet_linear(
    x_NI: jax.Array,
    base_kernel_IxO: jax.Array,
    q_in_RxE: jax.Array,
    q_out_RxE: jax.Array,
    perm_in_inv_I: jax.Array,
    perm_out_O: jax.Array,
    *,
    block_size: int,
    neumann_terms: int | None = 3,
    variant: str = "fast",
    keep_cayley_state: bool = False,
    implementation: str | None = None,
    interpret: bool = False,
    precision=None,
    batch_axes: tuple[str, ...] | None = None,
) -> jax.Array:
  """One POET-X linear map, `y = x[..., perm_in_inv]·BD(G_in)·K_s·BD(G_out)[..., perm_out]`.

  Args:
    x_NI: `(..., I)` inputs; the computation runs in their dtype.
    base_kernel_IxO: `(I, O)` frozen `K_s`, stored permuted (cast to `x`'s dtype where
      the GEMMs read it), or a `base_storage.QuantizedKernel` (XQ: dequantized there).
    q_in_RxE: `(I/B, E)` packed generators of the input-side blocks.
    q_out_RxE: `(O/B, E)` packed generators of the output-side blocks.
    perm_in_inv_I: `(I,)` int32, the input gather.
    perm_out_O: `(O,)` int32, the output gather.
    block_size: `B`.
    neumann_terms: `k` of the Cayley–Neumann map; None for the exact Cayley map.
    variant: "fast" (keep `h`) or "mem" (recompute it in the backward).
    keep_cayley_state: keep the Cayley–Neumann intermediates for the backward
      (Pallas only; see the module docstring and `POETConfig.keep_cayley_state`).
    implementation: "xla", "pallas" or None (chosen by measurement); see `backends.resolve`.
    interpret: run Pallas kernels in the interpreter.
    precision: of the two large GEMMs (any form `jax.lax.dot` takes; None: JAX's
      `jax_default_matmul_precision`, as for any matmul). With float32 activations
      HIGHEST (in any spelling, given here or as that default) also makes the
      Cayley–Neumann map multiply in IEEE float32; otherwise it runs at DEFAULT (TF32
      on GPUs, which rounds only its `Q²` terms).
    batch_axes: when traced under `jit` with a mesh set (`jax.set_mesh`, or
      `jax.sharding.use_abstract_mesh` as the trainer does), the mesh axes that split
      the token rows; the layer then runs on each device's rows (`shard_map`), on
      either implementation, with the base kernel and generators whole on each device
      (so the rows must divide over those axes; a tensor-parallel axis belongs out
      of this list). None: every axis of the mesh that is not already manual; ():
      none, the layer left to XLA's partitioner (which gathers a Pallas kernel's
      operands onto every device, and on the XLA path aborted in a scanned model on a
      2-D mesh; see `_on_local_tokens`).

  Returns:
    `(..., O)` outputs in `x`'s dtype.

  Raises:
    ValueError: for a bad variant, implementation or shape.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
  if not isinstance(keep_cayley_state, bool):
    raise ValueError(f"keep_cayley_state must be True or False, got {keep_cayley_state!r}.")
  check_shapes(x_NI.shape, base_kernel_IxO.shape, q_in_RxE.shape, q_out_RxE.shape, block_size)
  backend = backends.resolve(implementation, interpret=interpret, block_size=block_size)
  if math.prod(x_NI.shape[:-1]) == 0:
    # No tokens: the exact result is empty, and every gradient a sum over no tokens
    # (zero). The kernels' grids and gathers need at least one row, so skip them.
    return jnp.zeros(x_NI.shape[:-1] + (base_kernel_IxO.shape[-1],), x_NI.dtype)

  def local(x, base_kernel_IxO, q_in_RxE, q_out_RxE, perm_in_inv_I, perm_out_O):
    return _poet_layer(
        backend, variant == "fast", keep_cayley_state, precision, block_size, neumann_terms, x, base_kernel_IxO,
        (q_in_RxE, q_out_RxE), (perm_in_inv_I, perm_out_O),
    )

  params = (base_kernel_IxO, q_in_RxE, q_out_RxE, perm_in_inv_I, perm_out_O)
  return _sharded_over_tokens(local, batch_axes, x_NI, params, base_kernel_IxO.shape[-1])


def _sharded_over_tokens(local, batch_axes, x_NI, params, d_out):
  """`local(x, *params)`, on each device's own tokens when a mesh splits them."""
  mesh = jax.sharding.get_abstract_mesh()
  token_axes = _token_axes(mesh, batch_axes)
  if not token_axes:
    return local(x_NI, *params)
  # The devices split the leading axis: x's own when it divides (x then stays the array
  # the caller passed, which layers reading one input share in what they save), else
  # the flattened token rows.
  shards = math.prod(mesh.shape[a] for a in token_axes)
  x_split = x_NI if x_NI.ndim > 1 and x_NI.shape[0] % shards == 0 else x_NI.reshape(-1, x_NI.shape[-1])
  y = _on_local_tokens(local, mesh, token_axes, x_split.shape[0], len(params))(x_split, *params)
  return y.reshape(x_NI.shape[:-1] + (d_out,))


def poet_linear_with_blocks(
    x_NI: jax.Array,
    base_kernel_IxO: jax.Array,
    g_RxBxB: jax.Array,
    perm_in_inv_I: jax.Array,
    perm_out_O: jax.Array,
    *,
    block_size: int,
    variant: str = "fast",
    implementation: str | None = None,
    interpret: bool = False,
    precision=None,
    batch_axes: tuple[str, ...] | None = None,
) -> jax.Array:
  """`poet_linear` from both sides' blocks `G = [G_in; G_out]` (`cayley_blocks`), not the generators.

  Differentiable with respect to `x` and `G` (its cotangent in `G`'s dtype, float32 from
  `cayley_blocks`). The other arguments are `poet_linear`'s.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
  check_shapes(x_NI.shape, base_kernel_IxO.shape, None, None, block_size)
  d_in, d_out = base_kernel_IxO.shape
  expected = ((d_in + d_out) // block_size, block_size, block_size)
  if tuple(g_RxBxB.shape) != expected:
    raise ValueError(f"blocks have shape {tuple(g_RxBxB.shape)}, expected {expected}"
                     f" (both sides' blocks of a {d_in}x{d_out} kernel, input side first).")
  backend = backends.resolve(implementation, interpret=interpret, block_size=block_size)
  if math.prod(x_NI.shape[:-1]) == 0:
    return jnp.zeros(x_NI.shape[:-1] + (d_out,), x_NI.dtype)

  g_dtype = g_RxBxB.dtype

  # G crosses a `shard_map` (when a mesh splits the tokens) in float32, so that its
  # cotangent is summed over the devices in float32 and rounded to G's dtype once, as
  # on one device.
  def local(x, base_kernel_IxO, g_RxBxB, perm_in_inv_I, perm_out_O):
    return _blocks_layer(backend, variant == "fast", precision, block_size, x, base_kernel_IxO,
                         g_RxBxB.astype(g_dtype), (perm_in_inv_I, perm_out_O))

  # Only then: on one device G stays the array given, which the backward saves by reference.
  sharded = bool(_token_axes(jax.sharding.get_abstract_mesh(), batch_axes))
  params = (base_kernel_IxO, g_RxBxB.astype(jnp.float32) if sharded else g_RxBxB, perm_in_inv_I, perm_out_O)
  return _sharded_over_tokens(local, batch_axes, x_NI, params, d_out)


def _token_axes(mesh, batch_axes) -> tuple[str, ...]:
  """Axes of the current (abstract) mesh, if any, that split the tokens: `batch_axes`, or all of them."""
  if mesh.empty:
    return ()
  names = mesh.axis_names if batch_axes is None else tuple(batch_axes)
  unknown = [a for a in names if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"batch_axes {unknown} are not axes of the current mesh {mesh.axis_names}.")
  # Axes already manual (inside the caller's own shard_map) hold local tokens already.
  manual = set(getattr(mesh, "manual_axes", ()))
  return tuple(a for a in names if mesh.shape[a] > 1 and a not in manual)


def _on_local_tokens(local, mesh, token_axes, rows, num_params):
  """Runs the layer on each device's own tokens (`shard_map`).

  XLA's partitioner cannot see into a Pallas kernel: left alone it gathers the
  kernel's operands onto every device, so each device would rotate every token of
  the global batch. The XLA path goes the same way: left to the partitioner, a
  scanned model of two or more layers on a mesh with both axes over 1 aborted the
  process in XLA's SPMD partitioner (a failed check on device groups, `2 vs. 8`, in
  jax 0.11.2's XLA). Here each device runs the layer on its rows; the base kernel
  and the generators enter whole (FSDP gathers the kernel as it would for a GEMM),
  and the generators' cotangents are summed over `token_axes` by `shard_map`'s
  transpose, like any data-parallel gradient.
  """
  shards = math.prod(mesh.shape[a] for a in token_axes)
  if rows % shards:
    raise ValueError(
        f"a POET-X layer got {rows} token rows, which do not split over mesh axes {token_axes}"
        f" ({shards} devices); make the batch divisible by {shards}, or set POETConfig.batch_axes"
        " to the mesh axes that actually split the batch."
    )
  spec = jax.sharding.PartitionSpec(token_axes)
  replicated = jax.sharding.PartitionSpec()
  return jax.shard_map(
      local, mesh=mesh, in_specs=(spec,) + (replicated,) * num_params, out_specs=spec, check_vma=False
  )


def poet_linear_reference(
    x_NI, base_kernel_IxO, q_in_RxE, q_out_RxE, perm_in_inv_I, perm_out_O, *, block_size, neumann_terms=3
):
  """SPEC §4 literally, differentiated by autodiff: the reference for both variants."""
  g_in = cayley.cayley_neumann_reference(q_in_RxE, block_size, neumann_terms)
  g_out = cayley.cayley_neumann_reference(q_out_RxE, block_size, neumann_terms)
  xr = rotation.rotate_blocks(jnp.take(x_NI, perm_in_inv_I, axis=-1), g_in)
  h = xr @ base_storage.dense(base_kernel_IxO, x_NI.dtype)
  return jnp.take(rotation.rotate_blocks(h, g_out), perm_out_O, axis=-1)


def effective_kernel(
    base_kernel_IxO: jax.Array, g_in: jax.Array, g_out: jax.Array, perm_in_inv_I: jax.Array, perm_out_O: jax.Array
) -> jax.Array:
  """`K_eff = Π(perm_in_inv)·BD(G_in)·K_s·BD(G_out)·Π(perm_out)` in float32 (SPEC §4, §6.1).

  `K_eff[r, c] = M[perm_in[r], perm_out[c]]` with `M = BD(G_in)·K_s·BD(G_out)`.
  """
  m_IxO = rotation.rotate_matrix_rows(base_storage.dense(base_kernel_IxO, jnp.float32), g_in.astype(jnp.float32))
  m_IxO = rotation.rotate_matrix_cols(m_IxO, g_out.astype(jnp.float32))
  return m_IxO[permutation.invert(perm_in_inv_I)][:, perm_out_O]


def permuted_base_kernel(k_true_IxO: jax.Array, perm_in_inv_I: jax.Array, perm_out_O: jax.Array) -> jax.Array:
  """`K_s = K_true[perm_in_inv][:, perm_out_inv]`: with `G = I` the layer computes `K_true` (SPEC §6.3)."""
  return k_true_IxO[perm_in_inv_I][:, permutation.invert(perm_out_O)]
