"""The Cayley–Neumann parameterization (CNP): packed skew vectors -> orthogonal blocks.

`G = (I + Q)(I + Q + ... + Q^k)` truncates the Neumann series of `(I - Q)^-1` in the
Cayley map `(I + Q)(I - Q)^-1` (SPEC §3). POET-X uses `k = 3`:
`G = I + 2Q + 2Q² + 2Q³ + Q⁴`. `k = None` is the exact map (a batched solve).

All arithmetic here is float32. Merges and exports use HIGHEST precision, since
their error is folded into the frozen weights; the training forward may pass
`precision=DEFAULT` (TF32 on recent GPUs), which only touches the `Q²` terms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from poetx_jax import skew

_HIGHEST = jax.lax.Precision.HIGHEST

# Encodes `neumann_terms=None` (the exact Cayley map) where an integer is needed.
EXACT = -1


def _mm(a: jax.Array, b: jax.Array, precision=_HIGHEST) -> jax.Array:
  return jnp.matmul(a, b, precision=precision)


def _eye_like(q_RxBxB: jax.Array) -> jax.Array:
  return jnp.eye(q_RxBxB.shape[-1], dtype=q_RxBxB.dtype)


def neumann_from_skew(q_RxBxB: jax.Array, neumann_terms: int | None, precision=_HIGHEST) -> jax.Array:
  """`G` from skew blocks by plain jnp (the differentiable reference).

  Args:
    q_RxBxB: `(..., R, B, B)` skew-symmetric blocks.
    neumann_terms: `k >= 0`, or None for the exact Cayley map.
    precision: of the block products.

  Returns:
    `(..., R, B, B)` blocks `G = (I + Q) Σ_{i<=k} Q^i`.
  """
  q_RxBxB = q_RxBxB.astype(jnp.float32)
  eye_BxB = _eye_like(q_RxBxB)
  if neumann_terms is None:
    # (I - Q)^-1 and (I + Q) commute, so G = solve(I - Q, I + Q).
    return jnp.linalg.solve(eye_BxB - q_RxBxB, eye_BxB + q_RxBxB)
  if neumann_terms < 0:
    raise ValueError(f"neumann_terms must be >= 0 or None (exact), got {neumann_terms}.")
  if neumann_terms == 3:
    # I + 2Q + 2Q² + 2Q³ + Q⁴ = I + 2Q + 2Q² + Q²(2Q + Q²): two block products.
    q2_RxBxB = _mm(q_RxBxB, q_RxBxB, precision)
    return eye_BxB + 2.0 * (q_RxBxB + q2_RxBxB) + _mm(q2_RxBxB, 2.0 * q_RxBxB + q2_RxBxB, precision)
  series_RxBxB = jnp.broadcast_to(eye_BxB, q_RxBxB.shape)
  for _ in range(neumann_terms):  # Horner: S <- I + Q S
    series_RxBxB = eye_BxB + _mm(q_RxBxB, series_RxBxB, precision)
  return _mm(eye_BxB + q_RxBxB, series_RxBxB, precision)


def cayley_neumann_reference(q_RxE: jax.Array, block_size: int, neumann_terms: int | None = 3) -> jax.Array:
  """The CNP by plain jnp, differentiated by autodiff: the reference for every kernel."""
  return neumann_from_skew(skew.skew_from_packed(q_RxE.astype(jnp.float32), block_size), neumann_terms)


def neumann3_skew_cotangent(q_RxBxB: jax.Array, dg_RxBxB: jax.Array, precision=_HIGHEST) -> jax.Array:
  """Closed-form VJP of `G = I + 2Q + 2Q² + 2Q³ + Q⁴` with respect to `Q` (SPEC §3).

  With `∇2 = dG·Qᵀ + Qᵀ·dG`:
  `dQ = (∇2 + 2dG)·Q2ᵀ + (Q2ᵀ + 2Qᵀ)·∇2 + 2(dG + ∇2)`.
  """
  mm = lambda a, b: _mm(a, b, precision)
  qt_RxBxB = jnp.swapaxes(q_RxBxB, -1, -2)
  q2t_RxBxB = mm(qt_RxBxB, qt_RxBxB)
  grad2_RxBxB = mm(dg_RxBxB, qt_RxBxB) + mm(qt_RxBxB, dg_RxBxB)
  return (
      mm(grad2_RxBxB + 2.0 * dg_RxBxB, q2t_RxBxB)
      + mm(q2t_RxBxB + 2.0 * qt_RxBxB, grad2_RxBxB)
      + 2.0 * (dg_RxBxB + grad2_RxBxB)
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _cayley_neumann3(q_RxE: jax.Array, block_size: int, precision) -> jax.Array:
  return neumann_from_skew(skew.skew_from_packed(q_RxE, block_size), 3, precision)


def _cayley_neumann3_fwd(q_RxE, block_size, precision):
  return _cayley_neumann3(q_RxE, block_size, precision), q_RxE


def _cayley_neumann3_bwd(block_size, precision, q_RxE, dg_RxBxB):
  q_RxBxB = skew.skew_from_packed(q_RxE, block_size)
  dq_RxBxB = neumann3_skew_cotangent(q_RxBxB, dg_RxBxB.astype(jnp.float32), precision)
  return (skew.packed_skew_cotangent(dq_RxBxB).astype(q_RxE.dtype),)


_cayley_neumann3.defvjp(_cayley_neumann3_fwd, _cayley_neumann3_bwd)


def cayley_neumann(
    q_RxE: jax.Array, block_size: int, neumann_terms: int | None = 3, precision=_HIGHEST
) -> jax.Array:
  """Orthogonal (or nearly orthogonal) blocks from packed skew generators, XLA path.

  For `k = 3` the backward is the closed form of SPEC §3 (saves only `q`); other
  `k` and the exact map are differentiated by autodiff.

  Args:
    q_RxE: `(..., R, E)` packed strict upper triangles, `E = B(B-1)/2`.
    block_size: `B`.
    neumann_terms: `k`, or None for the exact Cayley map.
    precision: of the block products (HIGHEST: true float32).

  Returns:
    `(..., R, B, B)` float32 blocks.
  """
  q_RxE = q_RxE.astype(jnp.float32)
  if neumann_terms == 3:
    return _cayley_neumann3(q_RxE, block_size, precision)
  return neumann_from_skew(skew.skew_from_packed(q_RxE, block_size), neumann_terms, precision)


def cayley_neumann_dynamic(q_RxE: jax.Array, block_size: int, neumann_terms: jax.Array) -> jax.Array:
  """The CNP with `k` a traced int32 (`EXACT` = -1 for the exact map); no gradient needed.

  Used where `k` is read from the variables themselves (exports, monitoring).
  """
  q_RxBxB = skew.skew_from_packed(q_RxE.astype(jnp.float32), block_size)
  eye_BxB = _eye_like(q_RxBxB)

  def truncated(q_RxBxB):
    series_RxBxB = jax.lax.fori_loop(
        0, neumann_terms, lambda _, s: eye_BxB + _mm(q_RxBxB, s), jnp.broadcast_to(eye_BxB, q_RxBxB.shape)
    )
    return _mm(eye_BxB + q_RxBxB, series_RxBxB)

  return jax.lax.cond(neumann_terms == EXACT, lambda q: neumann_from_skew(q, None), truncated, q_RxBxB)


def encode_neumann_terms(neumann_terms: int | None) -> int:
  """`k` as the int32 stored beside each layer (`EXACT` for the exact map)."""
  return EXACT if neumann_terms is None else int(neumann_terms)


def orthogonality_error(g_RxBxB: jax.Array, norm: str = "spectral") -> jax.Array:
  """Largest `‖G Gᵀ - I‖` over the blocks (0 for an orthogonal map).

  For the truncated map, `G Gᵀ = (I - Q^{k+1})(I - Q^{k+1})ᵀ` exactly, so the error
  grows like `2‖Q‖^{k+1}` while `‖Q‖ < 1` and explodes beyond.

  Args:
    g_RxBxB: `(..., R, B, B)` blocks.
    norm: "spectral" (`‖·‖₂`, an eigendecomposition per block) or "fro" (Frobenius,
      an upper bound on the spectral norm, cheap enough to log every few steps).
  """
  g_RxBxB = g_RxBxB.astype(jnp.float32)
  gram_RxBxB = _mm(g_RxBxB, jnp.swapaxes(g_RxBxB, -1, -2)) - _eye_like(g_RxBxB)
  if norm == "fro":
    return jnp.max(jnp.sqrt(jnp.sum(gram_RxBxB * gram_RxBxB, axis=(-2, -1))))
  if norm != "spectral":
    raise ValueError(f"norm must be 'spectral' or 'fro', got {norm!r}.")
  # Symmetric: the spectral norm is the largest |eigenvalue|.
  return jnp.max(jnp.abs(jnp.linalg.eigvalsh(gram_RxBxB)))
