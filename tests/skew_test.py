import jax.numpy as jnp
import numpy as np
import pytest

from poetx_jax import skew


@pytest.mark.parametrize("block", [2, 3, 8, 16])
def test_packing_round_trips_and_is_skew(rng, block):
  q_RxE = jnp.asarray(rng.standard_normal((5, skew.packed_size(block))), jnp.float32)
  q_RxBxB = skew.skew_from_packed(q_RxE, block)
  np.testing.assert_array_equal(q_RxBxB, -jnp.swapaxes(q_RxBxB, -1, -2))
  np.testing.assert_array_equal(skew.packed_from_skew(q_RxBxB), q_RxE)


def test_packing_is_row_major_upper_triangle():
  q_E = jnp.arange(1.0, 7.0)  # B = 4: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
  q_BxB = skew.skew_from_packed(q_E[None], 4)[0]
  assert q_BxB[0, 1] == 1 and q_BxB[0, 3] == 3 and q_BxB[1, 2] == 4 and q_BxB[2, 3] == 6
  assert q_BxB[3, 2] == -6


@pytest.mark.parametrize("block", [2, 5, 64, 256, 512])
def test_block_size_from_packed_inverts_packed_size(block):
  assert skew.block_size_from_packed(skew.packed_size(block)) == block


def test_bad_sizes_raise():
  with pytest.raises(ValueError, match="not B\\(B-1\\)/2"):
    skew.block_size_from_packed(7)
  with pytest.raises(ValueError, match="block size 4 needs 6"):
    skew.skew_from_packed(jnp.zeros((2, 5)), 4)
