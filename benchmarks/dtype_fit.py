"""Does every Pallas kernel compile, and match its reference, in each activation dtype?

  python -m benchmarks.dtype_fit
  python -m benchmarks.dtype_fit --shapes 512x7,2048x1000,5632x32768 --cases "layer fast"

The tile rules were swept with bfloat16 activations; float32 ones double every tile's
shared memory. For each dtype and block size this runs, compiled on the GPU: the
forward rotations (gather and scatter forms), the backward's fused rotation + outer
sum with the rule's tiles, and the whole layer's forward and backward (fast and mem),
each against the XLA path. It prints `ok` with the relative (L2) error of each output,
for a layer the loss and the gradients of `x`, `q_in` and `q_out` (runs 121 to 125
printed the largest of these for `Σ y²`, whose output-side generator gradient is
nearly zero, so their bfloat16 errors overstate the gap), or the
first line of the error (a tiling that asks for more shared memory than the H100 has
fails here, at compile time).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from poetx_jax import ops, rotation, skew
from poetx_jax.kernels import block_rotation, rotate_outer_sum


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _cases(dtype, block, width, tokens):
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((width, tokens)), dtype)
  s = jnp.asarray(rng.standard_normal((width, tokens)), dtype)
  g = jnp.asarray(rng.standard_normal((width // block, block, block)) / block**0.5, dtype)
  perm = jnp.asarray(rng.permutation(width), jnp.int32)
  inv = jnp.argsort(perm).astype(jnp.int32)
  fresh = jax.ShapeDtypeStruct(g.shape, jnp.float32)

  def kernel_rotations():
    got = jax.jit(lambda: block_rotation.gather_rotate(a, perm, g))()
    want = rotation.gather_rotate(a, perm, g)
    got2 = jax.jit(lambda: block_rotation.rotate_gather(a, g, perm, inv))()
    want2 = rotation.rotate_gather(a, g, perm, inv)
    return max(_rel(got, want), _rel(got2, want2))

  def fused_backward_side():
    got = jax.jit(lambda: rotate_outer_sum.rotate_outer_sum_into(fresh, s, inv, a, perm, g, perm, 0))()
    want = rotate_outer_sum.rotate_outer_sum_reference(s, inv, a, perm, g, perm)
    return max(_rel(x, y) for x, y in zip(got, want))

  def layer(variant):
    x = jnp.asarray(rng.standard_normal((tokens, width)), dtype)
    k = jnp.asarray(rng.standard_normal((width, width)) / width**0.5, dtype)
    # Generators of one size at every block size: ‖Q‖₂ ≈ 2·scale·√B = 0.3, inside the
    # Neumann series' reach (runs 121 to 127 used scale 0.05, ‖Q‖ ≈ 1.6 at b = 256 and
    # 2.3 at 512, where the truncated map amplifies any rounding).
    scale = 0.15 / block**0.5
    q = [jnp.asarray(scale * rng.standard_normal((width // block, skew.packed_size(block))), jnp.float32) for _ in range(2)]

    # Not `Σ y²`: an orthogonal output side leaves that unchanged, so its generators'
    # gradient is nearly zero and any rounding is a large relative error of it. Nor a
    # sum of terms of both signs, which can cancel to near zero. `Σ sin²(y)` is neither.
    def loss(impl):
      def f(x, q_in, q_out):
        y = ops.poet_linear(x, k, q_in, q_out, perm, perm, block_size=block, variant=variant, implementation=impl)
        return jnp.sum(jnp.square(jnp.sin(y.astype(jnp.float32))))
      return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, *q)

    got, want = loss("pallas"), loss("xla")
    return [_rel(x, y) for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))]

  return [("rotations", kernel_rotations), ("fused backward side", fused_backward_side),
          ("layer fast", lambda: layer("fast")), ("layer mem", lambda: layer("mem"))]


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--blocks", default="32,64,128,256,512")
  parser.add_argument("--shapes", default="1024x2048", help="comma-separated WIDTHxTOKENS (square layers)")
  parser.add_argument("--cases", default="", help='comma-separated case names (e.g. "layer fast"); default all')
  args = parser.parse_args(argv)
  wanted = {c for c in args.cases.split(",") if c}
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for shape in args.shapes.split(","):
    width, tokens = (int(v) for v in shape.split("x"))
    for dtype in args.dtypes.split(","):
      for block in (int(b) for b in args.blocks.split(",")):
        if width % block:
          continue
        for name, case in _cases(jnp.dtype(dtype), block, width, tokens):
          if wanted and name not in wanted:
            continue
          try:
            errors = case()
            result = (f"ok, rel err {errors:.1e}" if isinstance(errors, float) else
                      "ok, rel err " + " ".join(f"{n} {e:.1e}" for n, e in zip(("loss", "dx", "dq_in", "dq_out"), errors)))
          except Exception as error:  # pylint: disable=broad-except  (report and go on)
            result = f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
          print(f"{width}x{tokens:<7} {dtype:<9} b={block:<4} {name:<20} {result}", flush=True)


if __name__ == "__main__":
  main()
