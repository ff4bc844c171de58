"""A few dozen real optimizer steps with merges: the whole core working together."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SmallModel, relative_error

import poetx_jax


def _task(batch=64):
  key_x, key_w = jax.random.split(jax.random.key(42))
  x = jax.random.normal(key_x, (batch, 12))
  teacher = jax.random.normal(key_w, (12, 8))
  return x, jnp.argmax(jnp.tanh(x @ teacher), axis=-1)


def _train(config, steps, lr=3e-2, poet_lr=5e-2):
  model = SmallModel()
  wrapped = poetx_jax.wrap(model, config)
  x, labels = _task()
  variables = wrapped.init(jax.random.key(0), x)
  tx = poetx_jax.optimizer(config, learning_rate=lr, poet_learning_rate=poet_lr, clip_norm=1.0)
  opt_state = tx.init(variables["params"])

  def loss_fn(params, frozen):
    logits = wrapped.apply({"params": params, **frozen}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def train_step(step, variables, opt_state):
    frozen = {k: v for k, v in variables.items() if k != "params"}
    loss, grads = jax.value_and_grad(loss_fn)(variables["params"], frozen)
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    variables = {**variables, "params": optax.apply_updates(variables["params"], updates)}
    pre_merge = variables
    variables, opt_state = poetx_jax.merge_if_needed(step + 1, variables, opt_state, config)
    return loss, pre_merge, variables, opt_state

  losses, merge_errors, snapshots = [], [], [variables]
  for step in range(steps):
    loss, pre_merge, variables, opt_state = train_step(jnp.int32(step), variables, opt_state)
    losses.append(float(loss))
    if (step + 1) % config.merge_interval == 0:
      merge_errors.append(relative_error(wrapped.apply(variables, x), wrapped.apply(pre_merge, x)))
      snapshots.append(variables)
  return losses, merge_errors, snapshots, opt_state


_singular_values = jax.jit(poetx_jax.singular_values)


@pytest.mark.parametrize("variant", ["fast", "mem"])
def test_loss_falls_and_merges_keep_the_function(variant):
  config = poetx_jax.POETConfig(block_size=4, merge_interval=6, variant=variant)
  losses, merge_errors, snapshots, opt_state = _train(config, 36)
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
  assert len(merge_errors) == 6 and max(merge_errors) <= 1e-5, merge_errors
  # after the last merge (step 36) the orthogonal Adam state is fresh, the others are not
  groups = opt_state[1].inner_states
  assert int(groups["orthogonal"].inner_state[0].count) == 0
  assert int(groups["matrix"].inner_state[0].count) == 36
  for snap in snapshots[1:]:
    assert float(jnp.abs(snap["params"]["mlp"]["q_in"]).max()) == 0.0


def test_exact_cayley_keeps_every_spectrum_through_merges():
  config = poetx_jax.POETConfig(block_size=4, merge_interval=4, neumann_terms=None)
  _, _, snapshots, _ = _train(config, 16, poet_lr=1e-1)
  reference = _singular_values(snapshots[0])
  assert len(reference) == 4
  for snap in snapshots[1:]:
    drift = poetx_jax.spectrum_drift(_singular_values(snap), reference)
    assert max(float(d) for d in drift.values()) <= 1e-5, drift


def test_truncated_map_drifts_and_drift_shrinks_with_more_terms():
  drifts = {}
  for k in (1, 3, 5):
    config = poetx_jax.POETConfig(block_size=4, merge_interval=4, neumann_terms=k)
    _, _, snapshots, _ = _train(config, 16, poet_lr=1e-1)
    reference = _singular_values(snapshots[0])
    drift = poetx_jax.spectrum_drift(_singular_values(snapshots[-1]), reference)
    drifts[k] = max(float(d) for d in drift.values())
  assert drifts[1] > drifts[3] > drifts[5] and drifts[3] > 0, drifts
