"""How fast could any unfused POET-X layer be? A best case built from XLA's own kernels.

  python -m benchmarks.layer_floor

The lone layer's targets (issue #3: fast ≤ 0.9× the dense layer at N = 2048, b = 256;
≤ 1.0× at b = 512; mem ≤ 1.3×) are judged here against the least any implementation
that runs the rotations as kernels of their own (not inside the large GEMMs) must do.
`ideal_fast` / `ideal_mem` compute the layer's forward and backward with:

* the two large GEMMs (three for mem) as XLA/cuBLAS runs them;
* every block rotation and outer sum as XLA's batched GEMM on contiguous rows, which
  reached 1.04–1.18× the memory floor where the shipped Triton rotations reach
  1.27–1.58× (`raw/run104_rotation_layouts.txt`);
* the four layout transposes a permuted layer needs (each side's permutation moves
  whole token rows only in feature-major data; see the README), forced to happen
  (`optimization_barrier`) but otherwise free: the permutations themselves cost nothing;
* no Cayley–Neumann map at all (`G` is given; the shipped map's forward and backward
  is reported apart, and each layer pays it).

So the ideal is a lower bound for the shipped design in every part but the GEMMs, which
are the same. Device µs from one profiler trace per row, against the dense layer
(`x @ K` with its full VJP) in the same run.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks import kernel_profile, layer


def _rotate(g_RxBxB, a_DxN, transpose=False):
  """Block `r` of rows times `G_rᵀ` (or `G_r`), as one batched XLA GEMM."""
  r, b, _ = g_RxBxB.shape
  spec = "rcb,rbn->rcn" if transpose else "rbc,rbn->rcn"
  return jnp.einsum(spec, g_RxBxB, a_DxN.reshape(r, b, -1)).reshape(a_DxN.shape)


def _outer_sum(a_DxN, c_DxN, block):
  """`Σ_n a_r[:, n] c_r[:, n]ᵀ` per block, float32, as one batched XLA GEMM."""
  r = a_DxN.shape[0] // block
  return jnp.einsum("rbn,rcn->rbc", a_DxN.reshape(r, block, -1), c_DxN.reshape(r, block, -1),
                    preferred_element_type=jnp.float32)


def _transpose(a):
  """A layout change that happens: XLA may not fold it into the neighbouring GEMM."""
  return jax.lax.optimization_barrier(a.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def ideal_layer(x_NI, k_IxO, g_in, g_out, keep_hidden=True):
  return _ideal_fwd(x_NI, k_IxO, g_in, g_out, keep_hidden)[0]


def _ideal_fwd(x_NI, k_IxO, g_in, g_out, keep_hidden):
  x_IxN = _transpose(x_NI)
  h_OxN = k_IxO.T @ _rotate(g_in, x_IxN)
  y_NO = _transpose(_rotate(g_out, h_OxN))
  return y_NO, (x_IxN, h_OxN if keep_hidden else None, k_IxO, g_in, g_out)


def _ideal_bwd(keep_hidden, residuals, dy_NO):
  x_IxN, h_OxN, k_IxO, g_in, g_out = residuals
  block = g_in.shape[-1]
  if h_OxN is None:  # mem: the third large GEMM (behind a barrier: XLA would reuse the forward's)
    h_OxN = k_IxO.T @ _rotate(g_in, jax.lax.optimization_barrier(x_IxN))
  dy_OxN = _transpose(dy_NO)
  dg_out = _outer_sum(h_OxN, dy_OxN, block)
  dxr_IxN = k_IxO @ _rotate(g_out, dy_OxN, transpose=True)
  dg_in = _outer_sum(x_IxN, dxr_IxN, block)
  dx_NI = _transpose(_rotate(g_in, dxr_IxN, transpose=True))
  del keep_hidden
  return dx_NI, None, dg_in, dg_out


ideal_layer.defvjp(_ideal_fwd, _ideal_bwd)


def _ideal_fb(keep_hidden):
  def fwd_bwd(a):
    y, vjp = jax.vjp(lambda x, gi, go: ideal_layer(x, a["kernel"], gi, go, keep_hidden), a["x"], a["g_in"], a["g_out"])
    return y, vjp(a["dy"])
  return jax.jit(fwd_bwd)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default="4096x14336,14336x4096")
  parser.add_argument("--blocks", default="256,512")
  parser.add_argument("--tokens", default="2048,16384")
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; device µs per forward+backward", flush=True)
  print(f"{'shape':>11s} {'b':>4s} {'N':>6s} {'dense':>8s} {'ideal fast':>11s} {'ideal mem':>10s} "
        f"{'Pallas fast':>12s} {'Pallas mem':>11s}  ideal fast / dense, mem / dense", flush=True)
  for shape in args.shapes.split(","):
    d_in, d_out = (int(v) for v in shape.split("x"))
    for tokens in (int(t) for t in args.tokens.split(",")):
      for block in (int(b) for b in args.blocks.split(",")):
        sets = layer._inputs(jax.random.key(0), tokens, d_in, d_out, block, 2, jnp.bfloat16)  # pylint: disable=protected-access
        for a in sets:
          for side, d in (("g_in", d_in), ("g_out", d_out)):
            a[side] = (jnp.eye(block) + 0.01 * jax.random.normal(jax.random.key(d), (d // block, block, block))
                       ).astype(jnp.bfloat16)
        inputs = [(a,) for a in sets]
        us = {"dense": layer._dense_fns()[1], "ideal fast": _ideal_fb(True), "ideal mem": _ideal_fb(False)}  # pylint: disable=protected-access
        us["Pallas fast"] = layer._poet_fns(block, "fast", "pallas")[1]  # pylint: disable=protected-access
        us["Pallas mem"] = layer._poet_fns(block, "mem", "pallas")[1]  # pylint: disable=protected-access
        us = {name: kernel_profile.device_us(fn, inputs) for name, fn in us.items()}
        dense = us["dense"]
        print(f"{shape:>11s} {block:4d} {tokens:6d} {dense:8.1f} {us['ideal fast']:11.1f} {us['ideal mem']:10.1f} "
              f"{us['Pallas fast']:12.1f} {us['Pallas mem']:11.1f}  "
              f"{us['ideal fast'] / dense:5.2f} {us['ideal mem'] / dense:5.2f}  "
              f"(Pallas {us['Pallas fast'] / dense:5.2f} {us['Pallas mem'] / dense:5.2f})", flush=True)


if __name__ == "__main__":
  main()
