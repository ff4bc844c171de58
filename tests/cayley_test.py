import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from poetx_jax import cayley, skew


def _packed(rng, blocks, block, scale):
  return jnp.asarray(scale * rng.standard_normal((blocks, skew.packed_size(block))), jnp.float32)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, None])
def test_zero_generators_give_identity(k):
  g = cayley.cayley_neumann(jnp.zeros((3, skew.packed_size(8))), 8, k)
  np.testing.assert_array_equal(g, jnp.broadcast_to(jnp.eye(8), (3, 8, 8)))


def test_k3_is_the_published_polynomial(rng):
  q = _packed(rng, 4, 8, 0.3)
  q_BxB = np.asarray(skew.skew_from_packed(q, 8), np.float64)
  eye = np.eye(8)
  mp = np.linalg.matrix_power
  expected = eye + 2 * q_BxB + 2 * mp(q_BxB, 2) + 2 * mp(q_BxB, 3) + mp(q_BxB, 4)
  assert relative_error(cayley.cayley_neumann(q, 8, 3), expected) < 1e-6
  # and it is (I + Q)(I + Q + Q² + Q³), the general truncation at k = 3
  general = (eye + q_BxB) @ (eye + q_BxB + mp(q_BxB, 2) + mp(q_BxB, 3))
  assert relative_error(expected, general) < 1e-12


def test_exact_map_is_orthogonal_and_matches_cayley(rng):
  q = _packed(rng, 3, 16, 0.5)
  g = cayley.cayley_neumann(q, 16, None)
  assert float(cayley.orthogonality_error(g)) < 1e-5
  q_BxB = np.asarray(skew.skew_from_packed(q, 16), np.float64)
  eye = np.eye(16)
  assert relative_error(g, (eye + q_BxB) @ np.linalg.inv(eye - q_BxB)) < 1e-5


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("scale", [0.02, 0.1, 0.4])
def test_orthogonality_error_equals_its_closed_form(rng, k, scale):
  # G Gᵀ = (I − Q^{k+1})(I − Q^{k+1})ᵀ: with Q's eigenvalues ±iλ the error is
  # max_λ | |1 − (iλ)^{k+1}|² − 1 |, about 2λ^{k+1} for small λ.
  block = 16
  q = _packed(rng, 2, block, scale)
  lam = np.linalg.svd(np.asarray(skew.skew_from_packed(q, block), np.float64), compute_uv=False)
  expected = np.max(np.abs(np.abs(1 - (1j * lam) ** (k + 1)) ** 2 - 1))
  actual = float(cayley.orthogonality_error(cayley.cayley_neumann(q, block, k)))
  assert abs(actual - expected) <= 1e-5 + 1e-3 * expected
  assert actual <= (2 * lam.max() ** (k + 1) + lam.max() ** (2 * k + 2)) * (1 + 1e-5) + 1e-5


def test_error_shrinks_with_more_terms_and_grows_with_norm(rng):
  q = _packed(rng, 4, 16, 0.05)
  errors = [float(cayley.orthogonality_error(cayley.cayley_neumann(q, 16, k))) for k in (1, 3, 5)]
  assert errors[0] > errors[1] > errors[2]
  growing = [float(cayley.orthogonality_error(cayley.cayley_neumann(s * q, 16, 3))) for s in (1, 4, 16)]
  assert growing[0] < growing[1] < growing[2]


def test_closed_form_gradient_equals_autodiff(rng):
  q = _packed(rng, 5, 12, 0.3)
  cot = jnp.asarray(rng.standard_normal((5, 12, 12)), jnp.float32)
  _, vjp = jax.vjp(lambda v: cayley.cayley_neumann(v, 12, 3), q)
  _, vjp_ref = jax.vjp(lambda v: cayley.cayley_neumann_reference(v, 12, 3), q)
  assert relative_error(vjp(cot)[0], vjp_ref(cot)[0]) < 1e-5


def test_gradient_matches_finite_differences(rng):
  block = 6
  q = np.asarray(_packed(rng, 2, block, 0.3), np.float64)
  cot = rng.standard_normal((2, block, block))

  def loss(v):
    return jnp.sum(cayley.cayley_neumann(v, block, 3) * cot)

  grad = np.asarray(jax.grad(loss)(jnp.asarray(q, jnp.float32)), np.float64)
  direction = rng.standard_normal(q.shape)
  eps = 1e-3
  plus = float(loss(jnp.asarray(q + eps * direction, jnp.float32)))
  minus = float(loss(jnp.asarray(q - eps * direction, jnp.float32)))
  numeric = (plus - minus) / (2 * eps)
  assert abs(numeric - np.sum(grad * direction)) < 1e-2 * max(1.0, abs(numeric))


def test_dynamic_k_matches_static(rng):
  q = _packed(rng, 3, 8, 0.3)
  for k in (0, 2, 3, None):
    dynamic = jax.jit(cayley.cayley_neumann_dynamic, static_argnums=1)(q, 8, jnp.int32(cayley.encode_neumann_terms(k)))
    assert relative_error(dynamic, cayley.cayley_neumann(q, 8, k)) < 1e-6


def test_negative_terms_raise():
  with pytest.raises(ValueError, match="neumann_terms"):
    cayley.cayley_neumann(jnp.zeros((1, 1)), 2, -2)


def test_the_xla_bf16_benchmark_computes_the_same_map_and_gradient(rng):
  """`benchmarks.cayley_vs_xla` times XLA on the kernels' bf16 algorithm: it must be the same
  map and VJP as the reference, to bfloat16 operand rounding."""
  from benchmarks import cayley_vs_xla  # pylint: disable=g-import-not-at-top

  block = 32
  q = _packed(rng, 3, block, 0.2)
  g_ref, vjp_ref = jax.vjp(lambda v: cayley.cayley_neumann_reference(v, block, 3), q)
  eye = jnp.eye(block)
  g = cayley_vs_xla.xla_forward(q, block).astype(jnp.float32)
  assert g.dtype == jnp.float32 and relative_error(g - eye, g_ref - eye) < 2e-2
  dg = jnp.asarray(rng.standard_normal(g_ref.shape), jnp.float32)
  assert relative_error(cayley_vs_xla.xla_backward(q, dg, block), vjp_ref(dg)[0]) < 2e-2
