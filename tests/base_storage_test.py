"""POET-XQ (int8 base kernels) through wrap, apply, merge and export; per-collection dtypes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SmallModel, relative_error
from wrapping_test import _init, _randomize_q

import poetx_jax
from poetx_jax import base_storage, quantization, train_config, trainer
from poetx_jax.models import llama

GROUP = 4  # divides every wrapped d_in of SmallModel (12 and 16)


def _config(**kwargs):
  return poetx_jax.POETConfig(block_size=4, quant_group_size=GROUP, **kwargs)


def _opt(config):
  return poetx_jax.optimizer(config, learning_rate=1e-2, poet_learning_rate=1e-2)


def _as_float_variables(variables):
  """The same model with every XQ kernel replaced by its dequantized float32 kernel."""
  poet = jax.tree_util.tree_map(lambda x: x, variables["poet"])
  for name, state in variables["poet"].items():
    if base_storage.is_quantized(state):
      kernel = quantization.dequantize(state["base_kernel"].reshape(-1, state["base_scale"].shape[-1]),
                                       state["base_scale"], state["base_offset"])
      poet[name] = {k: v for k, v in state.items() if k not in base_storage.STORED}
      poet[name]["base_kernel"] = kernel.reshape(state["base_kernel"].shape)
  return {**variables, "poet": poet}


def test_int8_layers_store_codes_and_compute_with_their_dequantized_kernels():
  _, xq, variables, x = _init(_config(base_dtype="int8"))
  state = variables["poet"]["split"]
  assert state["base_kernel"].dtype == jnp.uint8 and state["base_kernel"].shape == (16, 2, 8)
  assert state["base_scale"].shape == state["base_offset"].shape == (16 // GROUP, 16)
  assert state["base_scale"].dtype == jnp.float32
  variables = _randomize_q(variables, 0.2)
  _, f32, _, _ = _init(_config(base_dtype="float32"))
  # Exactly the float layer on the dequantized kernel: the codes are what the GEMMs read.
  assert relative_error(xq.apply(variables, x), f32.apply(_as_float_variables(variables), x)) < 1e-5


def test_int8_outputs_within_the_quantization_error_of_float32_base_kernels():
  _, xq, xq_vars, x = _init(_config(base_dtype="int8"))
  _, f32, f32_vars, _ = _init(_config(base_dtype="float32"))
  xq_vars, f32_vars = _randomize_q(xq_vars, 0.2), _randomize_q(f32_vars, 0.2)
  # Same initializer draws and permutations: the kernels differ by rounding (≤ half a step,
  # about 1/510 of each group's range), so the outputs differ by about that much, not more.
  error = relative_error(xq.apply(xq_vars, x), f32.apply(f32_vars, x))
  assert 1e-5 < error < 2e-2


@pytest.mark.parametrize("feedback", [False, True])
def test_int8_merge_keeps_the_function_within_quantization_error(feedback):
  config = _config(base_dtype="int8", quant_error_feedback=feedback)
  _, wrapped, variables, x = _init(config)
  assert ("base_residual" in variables["poet"]["mlp"]) == feedback
  variables = _randomize_q(variables, 0.2)
  opt_state = _opt(config).init(variables["params"])
  merged, _ = jax.jit(poetx_jax.merge, static_argnums=2)(variables, opt_state, config, 1)
  assert float(jnp.abs(merged["params"]["mlp"]["q_in"]).max()) == 0.0
  assert merged["poet"]["mlp"]["base_kernel"].dtype == jnp.uint8
  chex.assert_trees_all_equal_shapes_and_dtypes(merged, variables)
  error = relative_error(wrapped.apply(merged, x), wrapped.apply(variables, x))
  assert 1e-6 < error < 2e-2  # one re-quantization on new groups: it moves, by rounding only


@pytest.mark.parametrize("feedback", [False, True])
def test_effective_params_of_int8_are_float32_and_reproduce_the_model(feedback):
  """The export is the kernel the forward computes with (the codes), not the finer kernel a
  merge starts from (codes plus residual)."""
  model, wrapped, variables, x = _init(_config(base_dtype="int8", quant_error_feedback=feedback))
  variables = _randomize_q(variables, 0.2)
  dense = poetx_jax.effective_params(variables)
  assert dense["split"]["kernel"].dtype == jnp.float32 and dense["split"]["kernel"].shape == (16, 2, 8)
  assert relative_error(model.apply({"params": dense}, x), wrapped.apply(variables, x)) < 1e-5


def test_base_kernel_settings_must_match_the_variables():
  _, _, variables, x = _init(_config(base_dtype="float32"))
  for wrong in (dict(base_dtype="int8"), dict(base_dtype="bfloat16")):
    with pytest.raises(ValueError, match="base_dtype"):
      poetx_jax.wrap(SmallModel(), _config(**wrong)).apply(variables, x)
  _, _, xq_variables, _ = _init(_config(base_dtype="int8"))
  with pytest.raises(ValueError, match="quant_error_feedback"):
    poetx_jax.wrap(SmallModel(), _config(base_dtype="int8", quant_error_feedback=True)).apply(xq_variables, x)


def test_group_size_must_divide_d_in():
  with pytest.raises(ValueError, match="quant_group_size"):
    _init(poetx_jax.POETConfig(block_size=4, base_dtype="int8", quant_group_size=8))  # embed_proj has d_in 12


def test_bad_dtype_settings_are_refused():
  with pytest.raises(ValueError, match="param_dtype must be a floating dtype"):
    poetx_jax.POETConfig(param_dtype="int8")
  with pytest.raises(ValueError, match="base_dtype"):
    poetx_jax.POETConfig(base_dtype="float16")
  with pytest.raises(ValueError, match="mu_dtype"):
    train_config.OptimizerConfig(mu_dtype="int8")


def _drift_after_merges(feedback: bool, merges: int = 20) -> float:
  """Relative deviation of an int8 model's effective kernels from a float32 twin merged alongside it."""
  xq_config = _config(base_dtype="int8", quant_error_feedback=feedback)
  f32_config = _config(base_dtype="float32")
  _, _, xq_vars, _ = _init(xq_config)
  _, _, f32_vars, _ = _init(f32_config)
  merge_xq = jax.jit(poetx_jax.merge, static_argnums=2)
  merge_f32 = jax.jit(poetx_jax.merge, static_argnums=2)
  for index in range(1, merges + 1):
    q = _randomize_q(f32_vars, 0.05, seed=index)["params"]  # the same rotations for both
    xq_vars = merge_xq({**xq_vars, "params": q}, _opt(xq_config).init(q), xq_config, index)[0]
    f32_vars = merge_f32({**f32_vars, "params": q}, _opt(f32_config).init(q), f32_config, index)[0]
  got, want = poetx_jax.effective_params(xq_vars), poetx_jax.effective_params(f32_vars)
  return relative_error(got["mlp"]["kernel"], want["mlp"]["kernel"])


def test_error_feedback_drifts_less_than_round_to_nearest_over_20_merges():
  nearest, feedback = _drift_after_merges(False), _drift_after_merges(True)
  assert feedback < 0.5 * nearest, (feedback, nearest)


def _small_llama():
  return llama.LlamaConfig(vocab_size=128, hidden=256, ffn=512, heads=4, layers=2, max_seq_len=16,
                           param_dtype="bfloat16", scan_layers=True)


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def test_int8_frozen_collection_is_under_30_percent_of_float32():
  sizes = {}
  for base in ("float32", "int8"):
    wrapped = poetx_jax.wrap(llama.Llama(_small_llama()), poetx_jax.POETConfig(block_size=64, base_dtype=base))
    shapes = jax.eval_shape(wrapped.init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    sizes[base] = _bytes(shapes["poet"])
  assert sizes["int8"] <= 0.30 * sizes["float32"], sizes


def test_every_collection_and_moment_has_the_dtype_its_setting_asks_for():
  raw = __import__("configs.tiny", fromlist=["get_config"]).get_config()
  raw.model.param_dtype = "bfloat16"
  raw.model.scan_layers = True
  raw.poet.param_dtype = "float32"
  raw.poet.base_dtype = "int8"
  raw.poet.quant_group_size = 64
  raw.optimizer.mu_dtype = "bfloat16"
  config = train_config.from_config_dict(raw, vocab_size=512)
  run = trainer.build(config, devices=jax.devices()[:1])
  state = jax.eval_shape(run.init_fn)
  flat = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
  assert flat["['embed']['embedding']"] == jnp.bfloat16 and flat["['final_norm']['scale']"] == jnp.bfloat16
  assert all(v == jnp.float32 for k, v in flat.items() if "q_in" in k or "q_out" in k)
  kernels = state.frozen["poet"]["blocks"]["mlp"]["up_proj"]
  assert kernels["base_kernel"].dtype == jnp.uint8 and kernels["base_scale"].dtype == jnp.float32
  adam = [s for s in jax.tree_util.tree_leaves(state.opt_state, is_leaf=lambda n: hasattr(n, "mu") and hasattr(n, "nu"))
          if hasattr(s, "mu")]
  assert adam
  assert all(mu.dtype == jnp.bfloat16 for s in adam for mu in jax.tree_util.tree_leaves(s.mu))  # optimizer.mu_dtype
  nus = {jax.tree_util.keystr(p): x.dtype for s in adam for p, x in jax.tree_util.tree_leaves_with_path(s.nu)}
  assert all(v == jnp.float32 for k, v in nus.items() if "q_in" in k or "q_out" in k)  # nu: the parameter's dtype
  assert any(v == jnp.bfloat16 for k, v in nus.items() if "embedding" in k)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("variant", ["fast", "mem"])
def test_a_quantized_kernel_gives_the_layer_and_its_gradients_of_the_dequantized_kernel(implementation, variant):
  """`poet_linear` (and `poet_linear_with_blocks`) on codes equal the same layer on the dequantized float
  kernel, forward and VJP: the custom VJPs save the codes and dequantize where each GEMM reads them."""
  from poetx_jax import ops, skew

  rng = np.random.default_rng(7)
  d_in, d_out, block, group = 32, 48, 16, 8
  codes, scale, offset = quantization.quantize(jnp.asarray(rng.standard_normal((d_in, d_out)), jnp.float32), group)
  quantized = base_storage.QuantizedKernel(codes, scale, offset)
  dense_kernel = quantization.dequantize(codes, scale, offset)
  e = skew.packed_size(block)
  q_in = jnp.asarray(0.1 * rng.standard_normal((d_in // block, e)), jnp.float32)
  q_out = jnp.asarray(0.1 * rng.standard_normal((d_out // block, e)), jnp.float32)
  perms = (jnp.asarray(rng.permutation(d_in), jnp.int32), jnp.asarray(rng.permutation(d_out), jnp.int32))
  x = jnp.asarray(rng.standard_normal((2, 5, d_in)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((2, 5, d_out)), jnp.float32)
  common = dict(block_size=block, variant=variant, implementation=implementation, interpret=True,
                precision=jax.lax.Precision.HIGHEST)

  def layer(kernel):
    return lambda x, q_in, q_out: ops.poet_linear(x, kernel, q_in, q_out, *perms, **common)

  def blocks_layer(kernel):
    def fn(x, q_in, q_out):
      g = ops.cayley_blocks(q_in, q_out, block_size=block, implementation=implementation, interpret=True)
      return ops.poet_linear_with_blocks(x, kernel, g, *perms, **common)
    return fn

  for make in (layer, blocks_layer):
    y, vjp = jax.vjp(make(quantized), x, q_in, q_out)
    y_ref, vjp_ref = jax.vjp(make(dense_kernel), x, q_in, q_out)
    assert relative_error(y, y_ref) < 1e-5
    for got, want in zip(vjp(dy), vjp_ref(dy)):
      assert relative_error(got, want) < 1e-5
