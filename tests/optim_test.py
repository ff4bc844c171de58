import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import poetx_jax
from poetx_jax import optim

CONFIG = poetx_jax.POETConfig(block_size=4, merge_interval=20)


def _params():
  return {
      "layer": {"q_in": jnp.zeros((2, 6)), "q_out": jnp.zeros((3, 6)), "bias": jnp.zeros((12,))},
      "embed": {"embedding": jnp.ones((10, 4))},
      "norm": {"scale": jnp.ones((4,))},
  }


def test_labels():
  labels = optim.param_labels(_params())
  assert labels["layer"] == {"q_in": "orthogonal", "q_out": "orthogonal", "bias": "vector"}
  assert labels["embed"]["embedding"] == "matrix" and labels["norm"]["scale"] == "vector"


def test_groups_rates_and_decay():
  params = _params()
  tx = poetx_jax.optimizer(CONFIG, learning_rate=0.1, poet_learning_rate=0.02, weight_decay=0.5)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # first Adam step with g = 1 is ±1 per element, times the rate
  np.testing.assert_allclose(updates["layer"]["q_in"], -0.02 * 0.5, rtol=1e-4)
  np.testing.assert_allclose(updates["layer"]["bias"], -0.1, rtol=1e-4)
  np.testing.assert_allclose(updates["norm"]["scale"], -0.1, rtol=1e-4)  # no decay on vectors
  np.testing.assert_allclose(updates["embed"]["embedding"], -0.1 * (1 + 0.5 * 1.0), rtol=1e-4)  # decayed


def test_schedules_are_accepted_and_scaled():
  params = _params()
  sched = optax.linear_schedule(0.0, 1.0, 10)
  tx = poetx_jax.optimizer(CONFIG, learning_rate=sched, poet_learning_rate=sched)
  state = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["layer"]["q_in"], -0.2 * 0.5, rtol=1e-4)


def test_clip_threshold_ramps_after_each_merge():
  threshold = optim.clip_threshold_schedule(1.0, CONFIG)
  values = [float(threshold(jnp.int32(c))) for c in (0, 5, 19, 20, 21, 25, 29, 30, 40, 45)]
  np.testing.assert_allclose(values, [1, 1, 1, 0.1, 0.19, 0.55, 0.91, 1, 0.1, 0.55], rtol=1e-6)
  limited = optim.clip_threshold_schedule(2.0, poetx_jax.POETConfig(merge_interval=20, clip_ramp_until=30))
  assert float(limited(jnp.int32(20))) == pytest.approx(0.2) and float(limited(jnp.int32(40))) == 2.0


def test_clipping_bounds_the_global_norm():
  params = _params()
  tx = poetx_jax.optimizer(CONFIG, learning_rate=1.0, poet_learning_rate=1.0, clip_norm=0.5)
  state = tx.init(params)
  grads = jax.tree_util.tree_map(lambda p: 100.0 * jnp.ones_like(p), params)
  clip = optim.clip_by_scheduled_global_norm(optim.clip_threshold_schedule(0.5, CONFIG))
  clipped, clip_state = clip.update(grads, clip.init(params))
  assert float(optax.tree.norm(clipped)) == pytest.approx(0.5, rel=1e-5)
  assert int(clip_state.count) == 1
  small = jax.tree_util.tree_map(lambda p: 1e-3 * jnp.ones_like(p), params)
  chex.assert_trees_all_equal(clip.update(small, clip_state)[0], small)  # within the threshold: untouched
  updates, state = jax.jit(tx.update)(grads, state, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)


def test_clipping_keeps_bfloat16_gradients_bfloat16():
  # A bfloat16 model (configs/llama8b.py) has bfloat16 gradients beside float32 generators;
  # optax's clip given a scheduled threshold returned them float32 and failed in its select.
  params = _params()
  params["embed"]["embedding"] = params["embed"]["embedding"].astype(jnp.bfloat16)
  params["norm"]["scale"] = params["norm"]["scale"].astype(jnp.bfloat16)
  tx = poetx_jax.optimizer(CONFIG, learning_rate=0.1, poet_learning_rate=0.1, clip_norm=0.5)
  grads = jax.tree_util.tree_map(lambda p: 100.0 * jnp.ones_like(p), params)
  clip = optim.clip_by_scheduled_global_norm(optim.clip_threshold_schedule(0.5, CONFIG))
  clipped, _ = jax.jit(clip.update)(grads, clip.init(params))
  chex.assert_trees_all_equal_shapes_and_dtypes(clipped, params)
  assert float(optax.tree.norm(clipped)) == pytest.approx(0.5, rel=1e-2)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)


def test_reset_touches_only_the_orthogonal_moments():
  params = _params()
  tx = poetx_jax.optimizer(CONFIG, learning_rate=optax.cosine_decay_schedule(1.0, 100), poet_learning_rate=optax.linear_schedule(0.0, 1.0, 10), clip_norm=1.0)
  state = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  for _ in range(3):
    _, state = tx.update(grads, state, params)
  reset = optim.reset_orthogonal_state(state)
  groups = reset[1].inner_states
  ortho_adam = groups["orthogonal"].inner_state[0]
  assert int(ortho_adam.count) == 0
  assert float(jnp.abs(ortho_adam.mu["layer"]["q_in"]).sum()) == 0.0
  assert float(jnp.abs(ortho_adam.nu["layer"]["q_out"]).sum()) == 0.0
  matrix_adam = groups["matrix"].inner_state[0]
  assert int(matrix_adam.count) == 3 and float(matrix_adam.mu["embed"]["embedding"].sum()) > 0
  # schedules keep counting: the schedule states are untouched everywhere
  for group in ("orthogonal", "matrix"):
    np.testing.assert_array_equal(groups[group].inner_state[2].count, state[1].inner_states[group].inner_state[2].count)
  assert int(reset[0].count) == 3  # the clip counter goes on
  chex.assert_trees_all_equal_shapes_and_dtypes(reset, state)


def test_reset_works_under_cond_and_jit():
  params = _params()
  tx = poetx_jax.optimizer(CONFIG, learning_rate=0.1, poet_learning_rate=0.1)
  state = tx.init(params)

  @jax.jit
  def maybe_reset(flag, state):
    return jax.lax.cond(flag, optim.reset_orthogonal_state, lambda s: s, state)

  chex.assert_trees_all_equal_shapes_and_dtypes(maybe_reset(True, state), state)


def test_reset_of_a_foreign_state_raises():
  with pytest.raises(ValueError, match="no 'orthogonal' group"):
    optim.reset_orthogonal_state(optax.adam(1e-3).init(_params()))


def test_bad_clip_raises():
  with pytest.raises(ValueError, match="clip_norm must be > 0"):
    poetx_jax.optimizer(CONFIG, 0.1, 0.1, clip_norm=0.0)
