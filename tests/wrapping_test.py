import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SmallModel, relative_error

import poetx_jax
from poetx_jax import layers


def _init(config, model=None, features=12):
  model = model or SmallModel()
  wrapped = poetx_jax.wrap(model, config)
  x = jax.random.normal(jax.random.key(0), (3, 5, features))
  return model, wrapped, wrapped.init(jax.random.key(1), x), x


def _randomize_q(variables, scale, seed=0):
  key = jax.random.key(seed)

  def fill(path, leaf):
    if path[-1].key in layers.ORTHOGONAL_PARAMS:
      return scale * jax.random.normal(jax.random.fold_in(key, hash(jax.tree_util.keystr(path)) % 2**31), leaf.shape)
    return leaf

  return {**variables, "params": jax.tree_util.tree_map_with_path(fill, variables["params"])}


def test_targeted_kernels_are_frozen_and_params_keep_their_paths():
  _, _, variables, _ = _init(poetx_jax.POETConfig(block_size=4))
  params, poet = variables["params"], variables["poet"]
  assert set(params) == {"embed_proj", "split", "join", "mlp", "head"}
  for name in ("embed_proj", "split", "join", "mlp"):
    assert "kernel" not in params[name]
    assert {"q_in", "q_out"} <= set(params[name])
    assert set(poet[name]) == {"base_kernel", "perm_in_inv", "perm_out", "neumann_terms"}
    assert params[name]["q_in"].dtype == jnp.float32
  assert set(params["head"]) == {"kernel", "bias"} and "head" not in poet
  assert params["embed_proj"]["bias"].shape == (16,)
  assert poet["split"]["base_kernel"].shape == (16, 2, 8)  # the layer's own kernel shape
  assert poet["join"]["base_kernel"].shape == (2, 8, 16)
  assert params["join"]["q_in"].shape == (4, 6) and params["split"]["q_out"].shape == (4, 6)


def test_base_kernel_is_normalized_per_output_neuron():
  _, _, variables, _ = _init(poetx_jax.POETConfig(block_size=4, init_scale=0.5))
  kernel = poetx_jax.effective_params(variables)["mlp"]["kernel"]
  np.testing.assert_allclose(jnp.linalg.norm(kernel, axis=0), 0.5, rtol=1e-5)


def test_effective_params_reproduce_the_wrapped_model():
  model, wrapped, variables, x = _init(poetx_jax.POETConfig(block_size=4))
  variables = _randomize_q(variables, 0.2)
  dense = poetx_jax.effective_params(variables)
  assert "q_in" not in dense["mlp"] and dense["split"]["kernel"].shape == (16, 2, 8)
  assert relative_error(model.apply({"params": dense}, x), wrapped.apply(variables, x)) < 1e-5


def test_param_dtype_bfloat16_stores_base_kernels_in_bfloat16():
  _, wrapped, variables, x = _init(poetx_jax.POETConfig(block_size=4), SmallModel(param_dtype="bfloat16"))
  assert variables["poet"]["mlp"]["base_kernel"].dtype == jnp.bfloat16
  assert variables["params"]["mlp"]["q_in"].dtype == jnp.float32
  assert wrapped.apply(variables, x).dtype == jnp.float32  # computation dtype follows the inputs


def test_indivisible_layer_raises_naming_layer_shape_and_block():
  with pytest.raises(ValueError, match=r"'embed_proj' has kernel shape \(12, 16\).*block_size=8"):
    _init(poetx_jax.POETConfig(block_size=8))


def test_indivisible_layer_opt_out_is_logged_and_trained_densely(caplog):
  with caplog.at_level(logging.WARNING, logger="poetx_jax"):
    _, wrapped, variables, x = _init(poetx_jax.POETConfig(block_size=8, skip_indivisible=True))
  assert "embed_proj" in caplog.text and "plain dense" in caplog.text
  assert "kernel" in variables["params"]["embed_proj"] and "embed_proj" not in variables["poet"]
  assert "mlp" in variables["poet"]
  assert wrapped.apply(variables, x).shape == (3, 5, 8)


def test_targets_and_exclude_select_layers():
  _, _, variables, _ = _init(poetx_jax.POETConfig(block_size=4, targets=r"split|join", exclude=r"join"))
  assert set(variables["poet"]) == {"split"}


def test_apply_without_poet_collection_raises():
  _, wrapped, variables, x = _init(poetx_jax.POETConfig(block_size=4))
  with pytest.raises(ValueError, match="no frozen POET-X state"):
    wrapped.apply({"params": variables["params"]}, x)


def test_custom_dot_general_is_refused():
  class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, dot_general=jax.lax.dot_general)(x)

  with pytest.raises(ValueError, match="custom dot_general"):
    poetx_jax.wrap(Custom(), poetx_jax.POETConfig(block_size=4)).init(jax.random.key(0), jnp.ones((2, 8)))


def test_init_is_identical_for_the_same_seed_and_differs_for_another():
  config = poetx_jax.POETConfig(block_size=4, seed=5)
  _, _, first, _ = _init(config)
  _, _, second, _ = _init(config)
  np.testing.assert_array_equal(first["poet"]["mlp"]["perm_out"], second["poet"]["mlp"]["perm_out"])
  _, _, other, _ = _init(poetx_jax.POETConfig(block_size=4, seed=6))
  assert not np.array_equal(first["poet"]["mlp"]["perm_out"], other["poet"]["mlp"]["perm_out"])


def test_wrap_rejects_non_modules():
  with pytest.raises(TypeError, match="flax.linen.Module"):
    poetx_jax.wrap(lambda x: x, poetx_jax.POETConfig())


def test_config_validation_lists_every_problem():
  with pytest.raises(ValueError, match=r"block_size must be.*variant must be.*keep_cayley_state must be True or False"):
    poetx_jax.POETConfig(block_size=1, variant="slow", keep_cayley_state="false")
