"""Where should a side's permutation happen: in the rotation kernel, or in the transpose?

  python -m benchmarks.rotation_layouts

The layer takes token-major `x` (`N x D`) and works feature-major (`D x N`), so each
side moves its activations through one transpose and one permuted block rotation.
Today the Triton rotation gathers (or scatters) whole rows itself and XLA transposes
apart. The other order would let the transpose carry the permutation (`x.T[perm]`,
or `rot[perm_inv].T` on the way out) and leave the rotation a plain batched product
of contiguous rows, which XLA's batched GEMM or a Mosaic GPU kernel (TMA copies boxes,
not gathered rows) could do. This probe times the parts and both orders, device µs
from a profiler trace (bf16, one H100), against the memory floor of one pass
(read + write at 3 TB/s). Only a probe: the layer does not call these forms.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import kernel_profile
from poetx_jax.kernels import block_rotation


def _mosaic(tiles):
  from benchmarks import batched_matmul_probe as probe  # Mosaic GPU: Hopper only

  def rotate(g_RxBxB, a_RxBxN):
    return probe.batched_matmul(g_RxBxB, a_RxBxN, tiles)
  return rotate


def _forms(block, mosaic_tiles):
  """name -> f(x_NxD, a_DxN, g_RxBxB, perm): each form's output, for checking and timing."""
  def einsum(g, a_DxN):
    a = a_DxN.reshape(g.shape[0], block, -1)
    return jnp.einsum("rcb,rbn->rcn", g, a).reshape(a_DxN.shape)

  def triton(a_DxN, g, gather=None, scatter=None):
    return block_rotation._launch(a_DxN, g, gather, scatter, True, False)  # pylint: disable=protected-access

  forms = {
      # the parts
      "transpose x.T": lambda x, a, g, p: x.T,
      "transpose+gather x.T[p]": lambda x, a, g, p: jnp.take(x.T, p, axis=0),
      "gather+transpose a[p].T": lambda x, a, g, p: jnp.take(a, p, axis=0).T,
      "triton rotate, gathered rows": lambda x, a, g, p: triton(a, g, gather=p),
      "triton rotate, scattered rows": lambda x, a, g, p: triton(a, g, scatter=p),
      "triton rotate, contiguous rows": lambda x, a, g, p: triton(a, g),
      "xla einsum, contiguous rows": lambda x, a, g, p: einsum(g, a),
      # the input side both ways: x (N x D) -> rotated, feature-major
      "in: x.T, triton gathers (shipped)": lambda x, a, g, p: triton(x.T, g, gather=p),
      "in: x.T[p], triton": lambda x, a, g, p: triton(jnp.take(x.T, p, axis=0), g),
      "in: x.T[p], xla einsum": lambda x, a, g, p: einsum(g, jnp.take(x.T, p, axis=0)),
      # the output side both ways: h (D x N, block order) -> y (N x D)
      "out: triton scatters, .T (shipped)": lambda x, a, g, p: triton(a, g, scatter=p).T,
      "out: xla einsum, [p_inv].T": lambda x, a, g, p: jnp.take(einsum(g, a), jnp.argsort(p), axis=0).T,
  }
  for t in mosaic_tiles:
    rotate = _mosaic(t)
    forms[f"mosaic {t.rows}x{t.cols}x{t.depth}/{t.stages}, contiguous rows"] = (
        lambda x, a, g, p, rotate=rotate: rotate(g, a.reshape(g.shape[0], block, -1)).reshape(a.shape))
  return forms


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--cases", default="14336x2048x256,4096x2048x256,14336x32768x256,14336x2048x512",
                      help="D x N x b, comma-separated")
  parser.add_argument("--mosaic", default="128x128x64x4,128x256x64x3",
                      help="Mosaic GPU tilings rows x cols x depth x stages ('' for none)")
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  tilings = []
  if args.mosaic:
    from benchmarks import batched_matmul_probe as probe
    for spec in args.mosaic.split(","):
      rows, cols, depth, stages = (int(v) for v in spec.split("x"))
      tilings.append(probe.MatmulTiles(rows, cols, depth, stages))
  for case in args.cases.split(","):
    d, n, block = (int(v) for v in case.split("x"))
    sets = []
    for s in range(2):
      k1, k2, k3, k4 = jax.random.split(jax.random.key(s), 4)
      sets.append((jax.random.normal(k1, (n, d), jnp.bfloat16), jax.random.normal(k2, (d, n), jnp.bfloat16),
                   (jax.random.normal(k3, (d // block, block, block)) / 16).astype(jnp.bfloat16),
                   jax.random.permutation(k4, d).astype(jnp.int32)))
    floor_us = 2 * d * n * 2 / 3.0e12 * 1e6
    flops = 2 * d * n * block
    print(f"D={d} N={n} b={block}: one pass's memory floor {floor_us:.1f} µs; a rotation {flops / 1e9:.1f} GFLOP",
          flush=True)
    forms = _forms(block, [t for t in tilings if t.rows <= block])
    x, a, g, p = sets[0]
    expect = {"in": np.asarray(forms["in: x.T, triton gathers (shipped)"](x, a, g, p), np.float32),
              "out": np.asarray(forms["out: triton scatters, .T (shipped)"](x, a, g, p), np.float32),
              "rot": np.asarray(forms["triton rotate, contiguous rows"](x, a, g, p), np.float32)}
    for name, form in forms.items():
      fn = jax.jit(form)
      key = name[:2] if name[:3] in ("in:", "out") else "rot" if "contiguous" in name else None
      key = {"in": "in", "ou": "out"}.get(key, key)
      try:
        check = ""
        if key is not None:
          got = np.asarray(fn(*sets[0]), np.float32)
          err = float(np.max(np.abs(got - expect[key])) / np.max(np.abs(expect[key])))
          check = f"  rel. diff to the Triton form {err:.1e}"
        us = kernel_profile.device_us(fn, sets)
        print(f"  {name:42s} {us:8.1f} µs  {us / floor_us:5.2f}x floor{check}", flush=True)
      except Exception as err:  # pylint: disable=broad-except  (report and go on)
        print(f"  {name:42s} failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}", flush=True)


if __name__ == "__main__":
  main()
