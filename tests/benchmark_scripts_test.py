"""Every benchmark script starts as its README command runs it (`python -m benchmarks.<name>`).

Run as `__main__`, a script is a second copy of its module: an import cycle between two
scripts that works in-process can fail there (`kernel_profile` <-> `layer` once did, on
the GPU). `--help` imports everything and runs nothing.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(
    name[:-3] for name in os.listdir(os.path.join(ROOT, "benchmarks"))
    if name.endswith(".py") and name not in ("__init__.py", "timing.py", "synthetic.py")
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_imports_and_parses_its_arguments(script):
  result = subprocess.run(
      [sys.executable, "-m", f"benchmarks.{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
      timeout=240, env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "usage:" in result.stdout


def test_mosaic_probe_product_matches_einsum():
  """The probe's Mosaic GPU product, interpreted on the CPU, against a float32 einsum
  (so the timings it reports are of a correct product), persistent or not."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  if not hasattr(plgpu, "force_gpu_interpret_mode"):
    pytest.skip(f"jax {jax.__version__} has no Mosaic GPU interpreter")
  from benchmarks import batched_matmul_probe as probe

  a = jax.random.normal(jax.random.key(0), (3, 128, 192), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (3, 192, 128), jnp.bfloat16)
  want = np.einsum("rmk,rkn->rmn", np.asarray(a, np.float32), np.asarray(b, np.float32))
  for tiles in (probe.MatmulTiles(64, 64), probe.MatmulTiles(128, 64, 64, 2, programs=2)):
    with plgpu.force_gpu_interpret_mode():
      got = np.asarray(probe.batched_matmul(a, b, tiles, out_dtype=jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="must divide"):
    probe.batched_matmul(a, b, probe.MatmulTiles(128, 256))


@pytest.mark.parametrize("context", ["norm_silu", "gated_residual"])
def test_layer_in_context_gives_the_same_gradients_for_dense_and_poetx_at_identity(context):
  """With every generator zero (G = I) and identity permutations, POET-X is the dense
  layer: the in-context benchmark then gets the same output and input gradients from
  both, so both rows time the same computation."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from benchmarks import layer_in_context as bench

  (a,) = bench._inputs(tokens=32, d_in=64, d_out=96, block=32, sets=1)[0]
  a = {k: (v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v) for k, v in a.items()}
  a.update(q_in=jnp.zeros_like(a["q_in"]), q_out=jnp.zeros_like(a["q_out"]),
           perm_in_inv=jnp.arange(64, dtype=jnp.int32), perm_out=jnp.arange(96, dtype=jnp.int32))
  dense_out, (*dense_grads, _) = bench.dense_fn(context)(a)
  poet_out, (*poet_grads, (dq_in, dq_out)) = bench.poet_fn(32, "fast", "xla", False, context=context)(a)
  np.testing.assert_allclose(poet_out, dense_out, rtol=1e-4, atol=1e-4)
  assert len(poet_grads) == (2 if context == "norm_silu" else 3)
  for got, want in zip(poet_grads, dense_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
  assert dq_in.shape == a["q_in"].shape and dq_out.shape == a["q_out"].shape
  assert float(jnp.abs(dq_in).max()) > 0 and float(jnp.abs(dq_out).max()) > 0


def test_mosaic_probe_square_kernel_matches_its_three_outputs():
  """The probe's whole Mosaic GPU square kernel, interpreted: `Q2`, `Q2 + 2Q`, `Q2 − 2Q`
  of a skew-symmetric `Q` (the outputs differ, so a mixed-up epilogue fails)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  if not hasattr(plgpu, "force_gpu_interpret_mode"):
    pytest.skip(f"jax {jax.__version__} has no Mosaic GPU interpreter")
  from benchmarks import batched_matmul_probe as probe

  q = 0.1 * jax.random.normal(jax.random.key(2), (2, 128, 128), jnp.float32)
  q = (q - jnp.swapaxes(q, 1, 2)).astype(jnp.bfloat16)
  qf = np.asarray(q, np.float32)
  q2 = np.einsum("rij,rjk->rik", qf, qf)
  for tiles in (probe.MatmulTiles(64, 64), probe.MatmulTiles(64, 128, 64, 2, programs=2)):
    with plgpu.force_gpu_interpret_mode():
      got = [np.asarray(g, np.float32) for g in probe.square_with_polynomials(q, tiles)]
    for g, want in zip(got, (q2, q2 + 2 * qf, q2 - 2 * qf)):
      np.testing.assert_allclose(g, want, atol=2e-2 * np.abs(want).max())
  with pytest.raises(ValueError, match="must divide"):
    probe.square_with_polynomials(q, probe.MatmulTiles(96, 64))


@pytest.mark.parametrize("keep_hidden", [True, False])
def test_layer_floor_ideal_layer_has_the_blockwise_layers_gradients(keep_hidden):
  """The floor benchmark's best-case layer computes `y = x·BD(G_in)·K·BD(G_out)` and its
  hand-written VJP gives autodiff's gradients (x, G_in, G_out; K frozen), so the time it
  reports is of the whole forward and backward, fast (h kept) or mem (h recomputed)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from benchmarks import layer_floor

  k = jax.random.split(jax.random.key(3), 5)
  block, n, d_in, d_out = 8, 12, 16, 24
  x = jax.random.normal(k[0], (n, d_in))
  kernel = jax.random.normal(k[1], (d_in, d_out))
  g_in = jax.random.normal(k[2], (d_in // block, block, block))
  g_out = jax.random.normal(k[3], (d_out // block, block, block))
  dy = jax.random.normal(k[4], (n, d_out))

  def blockwise(x_ND, g):
    r = g.shape[0]
    return jnp.einsum("nrb,rbc->nrc", x_ND.reshape(n, r, block), g).reshape(x_ND.shape)

  def reference(x, gi, go):
    return blockwise(blockwise(x, gi) @ kernel, go)

  with jax.default_matmul_precision("highest"):
    y, vjp = jax.vjp(lambda x, gi, go: layer_floor.ideal_layer(x, kernel, gi, go, keep_hidden), x, g_in, g_out)
    y_ref, vjp_ref = jax.vjp(reference, x, g_in, g_out)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
    for got, want in zip(vjp(dy), vjp_ref(dy)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_ptx_census_counts_each_kernels_own_instructions():
  """wgmma's `.sync` suffixes are not `mma.sync`; cp.async's commit/wait and the bulk
  stores are not loads; each count lands on the kernel whose body holds it. Imported
  after jax, the module leaves XLA_FLAGS alone: its dump flags, inherited by a later
  test's subprocess, crashed XLA:CPU there (two CI runs)."""
  flags = os.environ.get("XLA_FLAGS")
  from benchmarks import ptx_census
  assert os.environ.get("XLA_FLAGS") == flags
  ptx = """
.version 8.4
.visible .entry poetx_rotate(
  .param .u64 a
)
{
  wgmma.fence.sync.aligned;
  wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd1, %rd2;
  wgmma.commit_group.sync.aligned;
  cp.async.cg.shared.global [%r1], [%rd3], 16;
  cp.async.commit_group;
  ld.global.v4.b32 {%r2, %r3, %r4, %r5}, [%rd4];
}
.entry gemm_fusion(
  .param .u64 b
)
{
  mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f2}, {%r6}, {%r7}, {%f3};
  cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r8], [%rd5, {%r9, %r10}], [%r11];
  cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%rd6, {%r12, %r13}], [%r14];
  cp.async.bulk.commit_group;
}
"""
  counts = ptx_census.kernels_in_ptx(ptx)
  assert dict(counts["poetx_rotate"]) == {"wgmma": 1, "mma.sync": 0, "ld.global": 1, "cp.async": 1, "TMA load": 0}
  assert dict(counts["gemm_fusion"]) == {"wgmma": 0, "mma.sync": 1, "ld.global": 0, "cp.async": 0, "TMA load": 1}


def test_cayley_rows_probe_is_the_cayley_neumann_map():
  """The probe's one-kernel forward, interpreted, equals the reference map (float32
  operands to 1e-6; bfloat16 within its rounding of the Q² terms), so what it times is right."""
  import jax
  import jax.numpy as jnp
  from benchmarks import cayley_rows_probe as probe
  from poetx_jax import cayley, skew

  block = 32
  q = 0.3 / block ** 0.5 * jax.random.normal(jax.random.key(3), (3, skew.packed_size(block)))
  want = cayley.cayley_neumann(q, block, 3)
  for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-3)):
    got = probe.rows_forward(q, block, side=16, operand_dtype=dtype, out_dtype=jnp.float32, interpret=True,
                             precision=jax.lax.Precision.HIGHEST)
    assert float(jnp.max(jnp.abs(got - want))) < tol, dtype
