import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from poetx_jax import cayley, ops, permutation, skew

# Exact comparisons ask for IEEE float32 throughout: on a GPU the layer's default
# precision (TF32) would round the Cayley map's Q² terms and the GEMMs.
HIGHEST = jax.lax.Precision.HIGHEST


def _layer(rng, d_in, d_out, block, q_scale=0.1, dtype=jnp.float32):
  e = skew.packed_size(block)
  return dict(
      base_kernel_IxO=jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), dtype),
      q_in_RxE=jnp.asarray(q_scale * rng.standard_normal((d_in // block, e)), jnp.float32),
      q_out_RxE=jnp.asarray(q_scale * rng.standard_normal((d_out // block, e)), jnp.float32),
      perm_in_inv_I=jnp.asarray(rng.permutation(d_in), jnp.int32),
      perm_out_O=jnp.asarray(rng.permutation(d_out), jnp.int32),
  )


def _dense_from_effective(x, layer, block, k=3):
  g_in = cayley.cayley_neumann_reference(layer["q_in_RxE"], block, k)
  g_out = cayley.cayley_neumann_reference(layer["q_out_RxE"], block, k)
  k_eff = ops.effective_kernel(layer["base_kernel_IxO"], g_in, g_out, layer["perm_in_inv_I"], layer["perm_out_O"])
  return x @ k_eff


def test_zero_generators_equal_unpermuted_base_kernel(rng):
  layer = _layer(rng, 24, 16, 8, q_scale=0.0)
  x = jnp.asarray(rng.standard_normal((5, 24)), jnp.float32)
  k_s = layer["base_kernel_IxO"]
  perm_in = permutation.invert(layer["perm_in_inv_I"])
  unpermuted = k_s[perm_in][:, layer["perm_out_O"]]  # K_eff[r, c] = K_s[perm_in[r], perm_out[c]]
  for variant in ops.VARIANTS:
    y = ops.poet_linear(x, **layer, block_size=8, variant=variant, implementation="xla", precision=HIGHEST)
    assert relative_error(y, x @ unpermuted) < 1e-6


@pytest.mark.parametrize("variant", ops.VARIANTS)
@pytest.mark.parametrize("k", [3, 1, None])
def test_matches_dense_formulation_forward_and_backward(rng, variant, k):
  block = 8
  layer = _layer(rng, 32, 48, block, q_scale=0.2)
  x = jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((2, 7, 48)), jnp.float32)

  def poet(x, q_in, q_out):
    args = dict(layer, q_in_RxE=q_in, q_out_RxE=q_out)
    return ops.poet_linear(
        x, **args, block_size=block, neumann_terms=k, variant=variant, implementation="xla", precision=HIGHEST
    )

  def dense(x, q_in, q_out):
    return _dense_from_effective(x, dict(layer, q_in_RxE=q_in, q_out_RxE=q_out), block, k)

  primals = (x, layer["q_in_RxE"], layer["q_out_RxE"])
  y, vjp = jax.vjp(poet, *primals)
  y_ref, vjp_ref = jax.vjp(dense, *primals)
  assert y.shape == (2, 7, 48)
  assert relative_error(y, y_ref) < 1e-5
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    assert relative_error(got, want) < 1e-5


def test_fast_and_mem_agree_and_match_autodiff_reference(rng):
  block = 4
  layer = _layer(rng, 16, 8, block, q_scale=0.3)
  x = jnp.asarray(rng.standard_normal((9, 16)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((9, 8)), jnp.float32)

  def run(fn, **kw):
    def f(x, q_in, q_out):
      return fn(x, dict(layer, q_in_RxE=q_in, q_out_RxE=q_out), **kw)

    y, vjp = jax.vjp(f, x, layer["q_in_RxE"], layer["q_out_RxE"])
    return (y,) + vjp(dy)

  settings = dict(block_size=block, implementation="xla", precision=HIGHEST)
  fast = run(lambda x, l: ops.poet_linear(x, **l, variant="fast", **settings))
  mem = run(lambda x, l: ops.poet_linear(x, **l, variant="mem", **settings))
  ref = run(lambda x, l: ops.poet_linear_reference(x, **l, block_size=block))
  for a, b, c in zip(fast, mem, ref):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert relative_error(a, c) < 1e-5


def test_mem_keeps_no_hidden_state(rng):
  layer = _layer(rng, 16, 64, 8)
  x = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)

  def residual_sizes(variant):
    f = lambda x, q: ops.poet_linear(x, **dict(layer, q_in_RxE=q), block_size=8, variant=variant, implementation="xla")
    _, vjp = jax.vjp(f, x, layer["q_in_RxE"])
    return sorted(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(vjp))

  assert 32 * 64 in residual_sizes("fast")  # h: N x d_out
  assert 32 * 64 not in residual_sizes("mem")


def test_mem_saves_memory_in_one_program_with_its_forward(rng):
  """Forward and backward compiled together, without remat: XLA's CSE must not merge mem's
  recomputed `h` with the forward's (it did, on the XLA path, before the recomputation was
  tied to the cotangent), so mem computes the GEMM (and, as XLA versions fuse it, the input
  rotation, a batched dot on this path) once more per layer and its program holds about
  one `h` less per layer."""
  if jax.__version_info__ < (0, 11):
    pytest.skip("jax 0.10.2's XLA:CPU still merges mem's recomputed input rotation with the forward's and keeps"
                " it alive (measured: equal memory for fast and mem); the tie holds from jax 0.11")
  layers, tokens, width, block = 8, 512, 64, 8
  stack = [_layer(rng, width, width, block) for _ in range(layers)]
  x = jnp.asarray(rng.standard_normal((tokens, width)), jnp.float32)

  def compiled(variant):
    def loss(qs, x):
      for layer, (q_in, q_out) in zip(stack, qs):
        layer = dict(layer, q_in_RxE=q_in, q_out_RxE=q_out)
        x = jnp.tanh(ops.poet_linear(x, **layer, block_size=block, variant=variant, implementation="xla"))
      return jnp.sum(x * x)

    qs = [(layer["q_in_RxE"], layer["q_out_RxE"]) for layer in stack]
    program = jax.jit(jax.grad(loss)).lower(qs, x).compile()
    return program.memory_analysis().temp_size_in_bytes, len(re.findall(r"\bdot\(", program.as_text()))

  (fast_bytes, fast_dots), (mem_bytes, mem_dots) = compiled("fast"), compiled("mem")
  h_bytes = tokens * width * 4
  assert fast_dots + layers <= mem_dots <= fast_dots + 2 * layers
  # mem's backward needs its own `h` and workspace, so the saving falls short of `layers` h.
  assert fast_bytes - mem_bytes >= layers // 2 * h_bytes, (fast_bytes, mem_bytes, h_bytes)


@pytest.mark.parametrize("variant", ops.VARIANTS)
@pytest.mark.parametrize("keep_cayley_state", [False, True])
def test_the_backward_saves_only_what_it_cannot_cheaply_recompute(rng, capsys, variant, keep_cayley_state):
  """Saved arrays that are not the layer's own arguments: both sides' blocks `G`, `h` (fast)
  and the Cayley intermediates only when asked. Under `nn.scan` each one is stacked per
  layer and copied in and out, so the inverse permutations, the joined generators, `xᵀ`
  and the cast base kernel (cheap to rebuild) must not be among them."""
  block, d_in, d_out, tokens = 16, 32, 48, 5
  layer = _layer(rng, d_in, d_out, block)
  x = jnp.asarray(rng.standard_normal((tokens, d_in)), jnp.float32)

  def loss(x, q_in, q_out):
    y = ops.poet_linear(
        x, **dict(layer, q_in_RxE=q_in, q_out_RxE=q_out), block_size=block, variant=variant,
        keep_cayley_state=keep_cayley_state, implementation="pallas", interpret=True,
    )
    return jnp.sum(y * weights)  # linear: the loss itself saves nothing

  weights = jnp.asarray(rng.standard_normal((tokens, d_out)), jnp.float32)
  jax.ad_checkpoint.print_saved_residuals(loss, x, layer["q_in_RxE"], layer["q_out_RxE"])
  lines = capsys.readouterr().out.strip().splitlines()
  computed = sorted(line.split()[0] for line in lines if " output of " in line or " named " in line)  # no arguments, constants
  blocks = (d_in + d_out) // block
  expected = [f"f32[{blocks},{block},{block}]"] * (4 if keep_cayley_state else 1)  # G (+ Q, Q2, M)
  expected += [f"f32[{d_out},{tokens}]"] if variant == "fast" else []  # h (x is saved as the argument it is)
  assert computed == sorted(expected), lines
  # G (and the Cayley state) carry the name a remat policy can save them by.
  named = [line.split()[0] for line in lines if f"named '{ops.BLOCKS_CHECKPOINT_NAME}'" in line]
  assert named == [f"f32[{blocks},{block},{block}]"] * (4 if keep_cayley_state else 1), lines
  assert not any(line.startswith("i32") and " output of " in line for line in lines)


def test_bfloat16_stays_close_to_float32(rng):
  block = 16
  layer = _layer(rng, 64, 32, block, q_scale=0.05)
  x = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
  y32 = ops.poet_linear(x, **layer, block_size=block, implementation="xla")
  y16 = ops.poet_linear(x.astype(jnp.bfloat16), **layer, block_size=block, implementation="xla")
  assert y16.dtype == jnp.bfloat16
  assert relative_error(y16, y32) < 2e-2


def test_bad_arguments_raise(rng):
  layer = _layer(rng, 16, 8, 4)
  x = jnp.zeros((2, 16))
  with pytest.raises(ValueError, match="variant must be one of"):
    ops.poet_linear(x, **layer, block_size=4, variant="slow")
  with pytest.raises(ValueError, match="keep_cayley_state must be True or False"):
    ops.poet_linear(x, **layer, block_size=4, keep_cayley_state="no")
  with pytest.raises(ValueError, match="implementation must be one of"):
    ops.poet_linear(x, **layer, block_size=4, implementation="cuda")
  with pytest.raises(ValueError, match="input has 15 features"):
    ops.poet_linear(jnp.zeros((2, 15)), **layer, block_size=4, implementation="xla")
  with pytest.raises(ValueError, match="d_out=8 is not divisible by block_size=3"):
    odd = dict(layer, base_kernel_IxO=jnp.zeros((15, 8)), q_in_RxE=jnp.zeros((5, 3)))
    ops.poet_linear(jnp.zeros((2, 15)), **odd, block_size=3, implementation="xla")
  with pytest.raises(ValueError, match=r"shape \(4, 6\), expected \(4, 3\)"):
    ops.check_shapes((2, 12), (12, 12), (4, 6), (4, 3), 3)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(rng, implementation):
  block = 16
  layer = _layer(rng, 32, 48, block)

  def f(x, q_in, q_out):
    args = dict(layer, q_in_RxE=q_in, q_out_RxE=q_out)
    return ops.poet_linear(x, **args, block_size=block, implementation=implementation, interpret=True)

  x = jnp.zeros((2, 0, 32), jnp.float32)
  y, vjp = jax.vjp(f, x, layer["q_in_RxE"], layer["q_out_RxE"])
  assert y.shape == (2, 0, 48) and y.dtype == x.dtype
  dx, dq_in, dq_out = vjp(y)
  assert dx.shape == x.shape
  np.testing.assert_array_equal(dq_in, jnp.zeros_like(layer["q_in_RxE"]))
  np.testing.assert_array_equal(dq_out, jnp.zeros_like(layer["q_out_RxE"]))


@pytest.mark.parametrize(
    "precision, highest",
    [("default", False), (jax.lax.Precision.DEFAULT, False), ("tensorfloat32", False),
     (jax.lax.Precision.HIGHEST, True), ("highest", True), ("float32", True),
     ((jax.lax.Precision.HIGHEST, "highest"), True), ((jax.lax.Precision.HIGHEST, "default"), False),
     (jax.lax.DotAlgorithmPreset.F32_F32_F32, True), ("F32_F32_F32", True), ("TF32_TF32_F32", False)],
)
def test_every_spelling_of_highest_reaches_the_cayley_map(precision, highest):
  want = jax.lax.Precision.HIGHEST if highest else jax.lax.Precision.DEFAULT
  assert ops._cayley_settings(jnp.float32, precision)["precision"] == want  # pylint: disable=protected-access
  # bfloat16 operands multiply exactly: precision does not apply to them.
  assert ops._cayley_settings(jnp.bfloat16, precision)["precision"] == jax.lax.Precision.DEFAULT  # pylint: disable=protected-access


@pytest.mark.parametrize("default, highest", [(None, False), ("tensorfloat32", False), ("highest", True), ("float32", True)])
def test_an_unset_precision_follows_jax_default_matmul_precision(default, highest):
  # Like the layer's GEMMs and rotations (lax.dot reads the default for precision=None).
  want = jax.lax.Precision.HIGHEST if highest else jax.lax.Precision.DEFAULT
  with jax.default_matmul_precision(default):
    assert ops._cayley_settings(jnp.float32, None)["precision"] == want  # pylint: disable=protected-access
    # a precision given for the layer wins over the default
    assert ops._cayley_settings(jnp.float32, "default")["precision"] == jax.lax.Precision.DEFAULT  # pylint: disable=protected-access


@pytest.mark.parametrize("implementation,variant,dtype", [
    ("xla", "fast", jnp.float32), ("xla", "mem", jnp.float32), ("pallas", "fast", jnp.float32),
    ("pallas", "mem", jnp.float32), ("pallas", "fast", jnp.bfloat16),
])
def test_the_layer_from_given_blocks_is_the_layer(rng, implementation, variant, dtype):
  """`cayley_blocks` then `poet_linear_with_blocks` (a train step computing G once) gives
  `poet_linear`'s output and gradients for x, q_in, q_out, with random cotangents."""
  block, d_in, d_out, tokens = 16, 32, 48, 7
  layer = _layer(rng, d_in, d_out, block, dtype=dtype)
  x = jnp.asarray(rng.standard_normal((tokens, d_in)), dtype)
  dy = jnp.asarray(rng.standard_normal((tokens, d_out)), dtype)
  common = dict(block_size=block, implementation=implementation, interpret=implementation == "pallas")
  k, p_in, p_out = layer["base_kernel_IxO"], layer["perm_in_inv_I"], layer["perm_out_O"]

  def inside(x, q_in, q_out):
    return ops.poet_linear(x, k, q_in, q_out, p_in, p_out, variant=variant, **common)

  def given(x, q_in, q_out):
    g = ops.cayley_blocks(q_in, q_out, activation_dtype=x.dtype, **common)
    assert g.dtype == jnp.float32 and g.shape == ((d_in + d_out) // block, block, block)
    return ops.poet_linear_with_blocks(x, k, g, p_in, p_out, variant=variant, **common)

  with jax.default_matmul_precision("highest"):
    y, vjp = jax.vjp(inside, x, layer["q_in_RxE"], layer["q_out_RxE"])
    y_given, vjp_given = jax.vjp(given, x, layer["q_in_RxE"], layer["q_out_RxE"])
    grads, grads_given = vjp(dy), vjp_given(dy)
  # float32: the same kernels on the same values. bfloat16: the layer's own map writes G
  # in bfloat16, the given blocks are float32 cast to bfloat16, so the two round alike.
  tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
  assert relative_error(y_given, y) < tolerance
  for got, want in zip(grads_given, grads):
    assert relative_error(got, want) < tolerance


def test_given_blocks_keep_leading_layer_axes_and_wrong_shapes_raise(rng):
  block = 8
  q_in = jnp.asarray(0.1 * rng.standard_normal((3, 2, skew.packed_size(block))), jnp.float32)  # 3 stacked layers
  q_out = jnp.asarray(0.1 * rng.standard_normal((3, 4, skew.packed_size(block))), jnp.float32)
  g = ops.cayley_blocks(q_in, q_out, block_size=block, implementation="xla")
  assert g.shape == (3, 6, block, block)
  np.testing.assert_allclose(g[1, 2:], cayley.cayley_neumann(q_out[1], block, 3), atol=1e-6)
  with pytest.raises(ValueError, match="leading"):
    ops.cayley_blocks(q_in, q_out[:2], block_size=block)
  layer = _layer(rng, 16, 32, block)
  with pytest.raises(ValueError, match=r"blocks have shape \(5, 8, 8\), expected \(6, 8, 8\)"):
    ops.poet_linear_with_blocks(jnp.zeros((2, 16)), layer["base_kernel_IxO"], g[0, :5], layer["perm_in_inv_I"],
                                layer["perm_out_O"], block_size=block)
