"""The train step's `cayley_once`: the blocks of every layer computed once a step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import relative_error

import poetx_jax
from poetx_jax import blocks, layers, steps
from poetx_jax.kernels import triton_backend
from poetx_jax.models import llama


def _setup(scan_layers, implementation="xla", remat="dots", dtype="float32", interpret=False):
  cfg = llama.LlamaConfig(vocab_size=64, hidden=32, ffn=64, heads=2, layers=2, max_seq_len=16, dtype=dtype,
                          param_dtype="float32", scan_layers=scan_layers, remat=remat)
  poet = poetx_jax.POETConfig(block_size=16, implementation=implementation, pallas_interpret=interpret)
  model = poetx_jax.wrap(llama.Llama(cfg), poet)
  tx = poetx_jax.optimizer(poet, 1e-2, 1e-2)
  # Initialized through the XLA path (the Pallas one needs a GPU or the interpreter): the same variables.
  state = steps.init_state(poetx_jax.wrap(llama.Llama(cfg), dataclasses.replace(poet, implementation="xla")), tx, 0, 16)
  # Generators away from zero, each layer its own, so the blocks are not the identity.
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state.params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree_util.tree_unflatten(treedef, [
      0.05 * jax.random.normal(k, v.shape, v.dtype) if any(getattr(p, "key", None) in layers.ORTHOGONAL_PARAMS for p in path)
      else v for k, (path, v) in zip(keys, leaves)
  ])
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.integers(0, 64, (4, 16)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, 64, (4, 16)), jnp.int32), "weights": jnp.ones((4, 16))}
  return model, tx, poet, state.replace(params=params), batch


ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.parametrize("scan_layers,grad_accum_steps,dtype,implementation", [
    (True, 2, "float32", "xla"), (False, 2, "float32", "xla"), (True, 1, "float32", "xla"),
    (True, 2, "bfloat16", "xla"),
    pytest.param(True, 2, "bfloat16", "pallas", marks=pytest.mark.skipif(not ON_GPU, reason="compiled kernels: GPU")),
])
def test_cayley_once_gives_the_same_gradients_and_step(scan_layers, grad_accum_steps, dtype, implementation):
  """Loss and gradients (every parameter's) equal those of layers that run the map
  themselves, for scanned and unrolled blocks, with and without microbatches, and so does
  the whole step. A bfloat16 model reads the same bfloat16 blocks (the same loss); each
  microbatch's blocks cotangent is rounded to bfloat16 before the sum, which the
  generators' gradients then differ by."""
  model, tx, poet, state, batch = _setup(scan_layers, dtype=dtype, implementation=implementation)
  grads, steps_taken = [], []
  with jax.default_matmul_precision("highest"):
    for once in (False, True):
      kw = dict(poet=poet, grad_accum_steps=grad_accum_steps, cayley_once=once, activation_dtype=dtype)
      grads.append(jax.jit(steps.make_gradients(model, **kw))(state.params, state.frozen, batch))
      steps_taken.append(jax.jit(steps.make_train_step(model, tx, optax.constant_schedule(1e-2), **kw))(state, batch))
  (loss_a, tokens_a, grads_a), (loss_b, tokens_b, grads_b) = grads
  assert relative_error(loss_b, loss_a) < 1e-6 and float(tokens_a) == float(tokens_b) == 64
  tolerance = 1e-5 if dtype == "float32" else 1e-2
  for path, got in jax.tree_util.tree_leaves_with_path(grads_b):
    want = _at(grads_a, path)
    assert relative_error(got, want) < tolerance, jax.tree_util.keystr(path)
  if dtype == "float32":
    (state_a, metrics_a), (state_b, metrics_b) = steps_taken
    assert relative_error(metrics_b["grad_norm"], metrics_a["grad_norm"]) < 1e-5
    for got, want in zip(jax.tree_util.tree_leaves(state_b.params), jax.tree_util.tree_leaves(state_a.params)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_cayley_once_runs_the_map_once_a_step():
  """Lowered for an H100 (unrolled blocks, 14 wrapped layers, 2 microbatches, remat): one
  forward Neumann kernel and one of each backward kernel for all layers together, where
  every layer would run its own forward (twice, with remat) and backward."""
  model, tx, poet, state, batch = _setup(scan_layers=False, implementation="pallas", dtype="bfloat16")
  names = ("poetx_cayley_neumann", "poetx_cayley_grad2", "poetx_cayley_dq", "poetx_cayley_pack")
  counts = {}
  for once in (False, True):
    step = steps.make_train_step(model, tx, optax.constant_schedule(1e-2), poet=poet, grad_accum_steps=2,
                                 cayley_once=once, activation_dtype="bfloat16")
    module = triton_backend.lower_for_h100(step, state, batch)
    counts[once] = {name: module.count(f'name = "{name}"') for name in names}
  wrapped = 2 * 7
  assert counts[False] == {"poetx_cayley_neumann": 2 * wrapped, "poetx_cayley_grad2": wrapped,
                           "poetx_cayley_dq": wrapped, "poetx_cayley_pack": wrapped}, counts
  assert counts[True] == {name: 1 for name in names}, counts


@pytest.mark.parametrize("scan_layers", [True, False])
def test_layer_blocks_mirror_the_layers_and_the_layers_read_them(scan_layers):
  """The blocks reach every layer (scaled blocks change the loss) and give the loss of
  layers that run the map themselves."""
  model, _, poet, state, batch = _setup(scan_layers=scan_layers)
  tree = blocks.layer_blocks(state.params, state.frozen[layers.POET_COLLECTION], poet)
  if scan_layers:
    g = tree["blocks"]["attention"]["q_proj"][layers.BLOCKS]
    assert g.shape == (2, 4, 16, 16) and g.dtype == jnp.float32  # 2 stacked layers, 32 in + 32 out features
    assert float(jnp.abs(g[0] - g[1]).max()) > 0
  loss = lambda extra: steps.token_loss(model, state.params, {**state.frozen, **extra}, batch)[0]
  with layers.expecting_blocks():
    given = loss({layers.BLOCKS_COLLECTION: tree})
    for path, _ in jax.tree_util.tree_leaves_with_path(tree):  # every layer's blocks matter
      scaled = jax.tree_util.tree_map_with_path(lambda p, g, path=path: 0.5 * g if p == path else g, tree)
      assert abs(float(loss({layers.BLOCKS_COLLECTION: scaled}) - given)) > 1e-4, jax.tree_util.keystr(path)
  assert relative_error(given, loss({})) < 1e-6
  with pytest.raises(ValueError, match="no wrapped layer"):
    blocks.layer_blocks({"dense": {"kernel": jnp.zeros((2, 2))}}, {}, poet)


def test_a_transform_that_drops_the_blocks_is_an_error():
  """An nn.scan whose variable_axes name only 'params' and 'poet' does not pass the blocks
  on: under the train step's `expecting_blocks`, the layer says so instead of silently
  running the map itself."""
  import flax.linen as nn

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.Dense(32, use_bias=False)(x), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Layer, variable_axes={"params": 0, "poet": 0}, split_rngs={"params": True}, length=2)
      return scan(name="layers")(x, None)[0]

  poet = poetx_jax.POETConfig(block_size=16, implementation="xla", exclude=r"^$")
  model = poetx_jax.wrap(Stack(), poet)
  x = jnp.ones((3, 32))
  variables = model.init(jax.random.key(0), x)
  tree = blocks.layer_blocks(variables["params"], variables[layers.POET_COLLECTION], poet)
  model.apply({**variables, layers.BLOCKS_COLLECTION: tree}, x)  # outside a train step: the layer's own map
  with layers.expecting_blocks(), pytest.raises(ValueError, match=r"found no blocks.*variable_axes=\{True: 0\}"):
    model.apply({**variables, layers.BLOCKS_COLLECTION: tree}, x)
