import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SmallModel, relative_error
from wrapping_test import _init, _randomize_q

import poetx_jax


def _opt(config):
  return poetx_jax.optimizer(config, learning_rate=1e-2, poet_learning_rate=1e-2, clip_norm=1.0)


def test_merge_keeps_the_function_zeroes_q_and_redraws_permutations():
  config = poetx_jax.POETConfig(block_size=4, merge_interval=5)
  _, wrapped, variables, x = _init(config)
  variables = _randomize_q(variables, 0.3)
  tx = _opt(config)
  opt_state = tx.init(variables["params"])
  before = wrapped.apply(variables, x)
  merged, new_state = jax.jit(poetx_jax.merge, static_argnums=2)(variables, opt_state, config, 1)
  assert relative_error(wrapped.apply(merged, x), before) < 1e-5
  for name in ("embed_proj", "split", "join", "mlp"):
    assert float(jnp.abs(merged["params"][name]["q_in"]).max()) == 0.0
    assert float(jnp.abs(merged["params"][name]["q_out"]).max()) == 0.0
    assert not np.array_equal(merged["poet"][name]["perm_out"], variables["poet"][name]["perm_out"])
  np.testing.assert_array_equal(merged["params"]["head"]["kernel"], variables["params"]["head"]["kernel"])
  np.testing.assert_array_equal(merged["params"]["embed_proj"]["bias"], variables["params"]["embed_proj"]["bias"])
  chex.assert_trees_all_equal_shapes_and_dtypes(merged, variables)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, opt_state)


def test_merge_is_identical_for_every_replica_and_keyed_by_index():
  config = poetx_jax.POETConfig(block_size=4)
  _, _, variables, _ = _init(config)
  variables = _randomize_q(variables, 0.1)
  opt_state = _opt(config).init(variables["params"])
  first, _ = poetx_jax.merge(variables, opt_state, config, 3)
  second, _ = poetx_jax.merge(variables, opt_state, config, 3)
  chex.assert_trees_all_equal(first["poet"], second["poet"])
  other, _ = poetx_jax.merge(variables, opt_state, config, 4)
  assert not np.array_equal(first["poet"]["mlp"]["perm_in_inv"], other["poet"]["mlp"]["perm_in_inv"])


def test_merge_in_float32_with_bfloat16_storage():
  config = poetx_jax.POETConfig(block_size=4)
  _, wrapped, variables, x = _init(config, SmallModel(param_dtype="bfloat16"))
  variables = _randomize_q(variables, 0.2)
  merged, _ = poetx_jax.merge(variables, _opt(config).init(variables["params"]), config, 1)
  assert merged["poet"]["mlp"]["base_kernel"].dtype == jnp.bfloat16
  # one bf16 rounding of K_eff: the function moves by bf16 precision, not more
  assert relative_error(wrapped.apply(merged, x), wrapped.apply(variables, x)) < 1e-2


def test_merge_if_needed_merges_exactly_at_multiples_inside_jit():
  """Inside jit, at multiples of the interval it returns exactly what `merge` does, elsewhere
  exactly its inputs (the frozen state goes through a cond, the rest through selects)."""
  config = poetx_jax.POETConfig(block_size=4, merge_interval=3)
  _, _, variables, _ = _init(config)
  variables = _randomize_q(variables, 0.1)
  tx = _opt(config)
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.01), variables["params"])
  _, opt_state = tx.update(grads, tx.init(variables["params"]), variables["params"])  # nonzero moments
  step_fn = jax.jit(lambda s, v, o: poetx_jax.merge_if_needed(s, v, o, config))
  for step in range(8):
    got = step_fn(jnp.int32(step), variables, opt_state)
    merges = step > 0 and step % 3 == 0
    want = poetx_jax.merge(variables, opt_state, config, step // 3) if merges else (variables, opt_state)
    chex.assert_trees_all_equal(got, want)
    zeroed = float(jnp.abs(got[0]["params"]["mlp"]["q_in"]).max()) == 0.0
    assert zeroed == merges, step


def test_merging_a_mismatched_params_tree_names_the_path():
  config = poetx_jax.POETConfig(block_size=4)
  _, _, variables, _ = _init(config)
  params = dict(variables["params"])
  del params["mlp"]
  with pytest.raises(KeyError, match="'mlp'"):
    poetx_jax.merge({**variables, "params": params}, None, config, 1)


@pytest.mark.parametrize("base_dtype", ["float32", "int8"])
def test_merging_in_the_train_step_costs_one_layers_temporaries_not_a_copy_of_the_kernels(base_dtype, monkeypatch):
  """The step's compiled memory with merges exceeds the one without by about one layer's float32
  temporaries: the merge loops update the donated base kernels in place. A `lax.cond` around the
  merge (a second copy of every kernel) or a `vmap` over the stack (every layer's float32 kernel
  at once) needs several times the bound."""
  from poetx_jax import merging, train_config, trainer

  raw = __import__("configs.tiny", fromlist=["get_config"]).get_config()
  raw.model.update(scan_layers=True, layers=8, hidden=256, ffn=512, remat="full")
  raw.poet.update(block_size=32, base_dtype=base_dtype, quant_group_size=128)
  raw.train.global_batch_size = 2
  config = train_config.from_config_dict(raw, vocab_size=512)

  def need(merges: bool) -> int:
    with monkeypatch.context() as patch:
      if not merges:
        patch.setattr(merging, "merge_if_needed", lambda step, variables, opt_state, poet: (variables, opt_state))
      run = trainer.build(config, devices=jax.devices()[:1])
      state = jax.eval_shape(run.init_fn)
      batch = {k: jax.ShapeDtypeStruct((2, config.data.seq_len), jnp.int32) for k in ("inputs", "targets", "weights")}
      return trainer.memory_need_bytes(run.train_step.lower(state, batch).compile().memory_analysis())

  largest_layer_f32 = 256 * 512 * 4
  extra = need(True) - need(False)
  assert extra <= 4 * largest_layer_f32, (extra, largest_layer_f32)


def test_merge_refuses_the_optimizer_state_of_another_model():
  config = poetx_jax.POETConfig(block_size=4)
  _, _, variables, _ = _init(config)
  _, _, other, _ = _init(config, SmallModel(width=8, classes=8))
  with pytest.raises(ValueError, match="belongs to another model"):
    poetx_jax.merge(variables, _opt(config).init(other["params"]), config, 1)
  with pytest.raises(ValueError, match="belongs to another model"):
    poetx_jax.merge_if_needed(3, variables, _opt(config).init(other["params"]), config)
