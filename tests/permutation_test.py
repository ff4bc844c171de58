import jax.numpy as jnp
import numpy as np

from poetx_jax import permutation


def test_draws_are_permutations_and_deterministic():
  key = permutation.layer_key(3, 2, "blocks_0/mlp/up")
  p_in, p_out = permutation.draw_permutations(key, 48, 32)
  assert bool(permutation.is_permutation(p_in, 48)) and bool(permutation.is_permutation(p_out, 32))
  again = permutation.draw_permutations(permutation.layer_key(3, 2, "blocks_0/mlp/up"), 48, 32)
  np.testing.assert_array_equal(p_in, again[0])
  other = permutation.draw_permutations(permutation.layer_key(3, 3, "blocks_0/mlp/up"), 48, 32)
  assert not np.array_equal(p_in, other[0])
  other_layer = permutation.draw_permutations(permutation.layer_key(3, 2, "blocks_0/mlp/down"), 48, 32)
  assert not np.array_equal(p_in, other_layer[0])


def test_invert(rng):
  perm = jnp.asarray(rng.permutation(37), jnp.int32)
  inv = permutation.invert(perm)
  np.testing.assert_array_equal(perm[inv], np.arange(37))
  np.testing.assert_array_equal(inv[perm], np.arange(37))
  x = jnp.asarray(rng.standard_normal((3, 37)))
  np.testing.assert_array_equal(x[..., perm][..., inv], x)


def test_is_permutation_rejects_repeats():
  assert not bool(permutation.is_permutation(jnp.asarray([0, 1, 1, 3], jnp.int32), 4))
