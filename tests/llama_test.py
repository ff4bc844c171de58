"""The LLaMA model: causality, and POET-X over its unrolled and scanned (nn.scan) forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

import poetx_jax
from poetx_jax import optim
from poetx_jax.models import llama


def _model(scan, layers=3):
  return llama.Llama(llama.LlamaConfig(vocab_size=96, hidden=64, ffn=128, heads=2, layers=layers, scan_layers=scan))


@pytest.mark.parametrize("scan", [False, True])
def test_causal(scan):
  model = _model(scan)
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 96)
  params = model.init(jax.random.key(1), tokens)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 96)
  a, b = model.apply(params, tokens), model.apply(params, changed)
  np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
  assert not np.allclose(a[:, 7:], b[:, 7:])


def test_scanned_poetx_merges_exports_and_labels():
  config = poetx_jax.POETConfig(block_size=32, merge_interval=2)
  model = _model(scan=True)
  wrapped = poetx_jax.wrap(model, config)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 96)
  variables = wrapped.init(jax.random.key(1), tokens)
  up = variables["poet"]["blocks"]["mlp"]["up_proj"]
  assert up["base_kernel"].shape == (3, 64, 128) and up["perm_out"].shape == (3, 128)
  assert not np.array_equal(up["perm_out"][0], up["perm_out"][1])  # every layer draws its own
  key = jax.random.key(2)
  variables["params"] = jax.tree_util.tree_map_with_path(
      lambda p, x: 0.2 * jax.random.normal(jax.random.fold_in(key, x.size), x.shape) if p[-1].key in ("q_in", "q_out") else x,
      variables["params"],
  )
  before = wrapped.apply(variables, tokens)
  # the export runs through the unwrapped, scanned model
  dense = poetx_jax.effective_params(variables)
  assert dense["blocks"]["mlp"]["up_proj"]["kernel"].shape == (3, 64, 128)
  assert relative_error(model.apply({"params": dense}, tokens), before) < 1e-5
  tx = poetx_jax.optimizer(config, learning_rate=1e-3, poet_learning_rate=1e-3)
  labels = optim.param_labels(variables["params"])
  assert labels["blocks"]["mlp_norm"]["scale"] == "vector"  # stacked (3, 64) but still a vector
  merged, _ = jax.jit(poetx_jax.merge, static_argnums=2)(variables, tx.init(variables["params"]), config, 1)
  assert relative_error(wrapped.apply(merged, tokens), before) < 1e-5
  new_up = merged["poet"]["blocks"]["mlp"]["up_proj"]["perm_out"]
  assert not np.array_equal(new_up[0], new_up[1]) and not np.array_equal(new_up[0], up["perm_out"][0])
  assert float(jnp.abs(merged["params"]["blocks"]["mlp"]["up_proj"]["q_in"]).max()) == 0.0


@pytest.mark.parametrize("dtype,param_dtype", [("bfloat16", "float32"), ("float32", "float32"),
                                               ("bfloat16", "bfloat16"), ("float32", "bfloat16")])
def test_embedding_gradient_is_a_float32_scatter(dtype, param_dtype):
  """Same parameter and forward as `nn.Embed`; the gradient is a float32 scatter-add
  (a bfloat16 one is a compare-and-swap loop on the GPU), summed exactly, then cast."""
  init = jax.nn.initializers.normal(0.02)
  ours = llama.Embed(50, 8, dtype=dtype, param_dtype=param_dtype, embedding_init=init)
  flax_embed = nn.Embed(50, 8, dtype=dtype, param_dtype=param_dtype, embedding_init=init)
  tokens = jnp.array([[3, 3, 3, 7], [3, 49, 0, 7]])
  params = ours.init(jax.random.key(0), tokens)
  assert jax.tree.map(lambda p: (p.shape, p.dtype), params) == jax.tree.map(
      lambda p: (p.shape, p.dtype), flax_embed.init(jax.random.key(0), tokens))
  out = ours.apply(params, tokens)
  assert out.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(out, flax_embed.apply(params, tokens))

  cotangent = jax.random.normal(jax.random.key(1), (2, 4, 8), jnp.float32).astype(dtype)

  def grad(module, p=params):
    _, vjp = jax.vjp(lambda p: module.apply(p, tokens), p)
    return vjp(cotangent)[0]["params"]["embedding"]

  def scatters(module):
    def walk(jaxpr):
      for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
          inner = getattr(value, "jaxpr", value)  # closed jaxprs (pjit, custom_vjp) and open ones
          if hasattr(inner, "eqns"):
            yield from walk(inner)

    jaxpr = jax.make_jaxpr(lambda p: grad(module, p))(params).jaxpr
    return [e for e in walk(jaxpr) if "scatter" in e.primitive.name]

  expected = np.zeros((50, 8), np.float32)
  np.add.at(expected, np.asarray(tokens).ravel(), np.asarray(cotangent, np.float32).reshape(-1, 8))
  got = grad(ours)
  assert got.dtype == jnp.dtype(param_dtype)
  # summed in float32 (in any order), rounded once to the table's dtype
  rtol = 1e-6 if param_dtype == "float32" else 2.0**-8
  np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=rtol, atol=1e-7)
  assert scatters(ours) and all(e.outvars[0].aval.dtype == jnp.float32 for e in scatters(ours)), scatters(ours)
  if dtype == "bfloat16":  # flax casts the table to `dtype` first: a bfloat16 scatter, what this module avoids
    assert any(e.outvars[0].aval.dtype == jnp.bfloat16 for e in scatters(flax_embed))
