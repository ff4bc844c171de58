"""Where does a POET-X layer's time go? Each piece of the XLA path timed alone.

  python -m benchmarks.components [--out_dir DIR]

Prints one table (median ms, bf16, N tokens) and, with --out_dir, writes the
optimized HLO of the layer's forward+backward for reading.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

from benchmarks import layer as layer_bench
from benchmarks import timing
from poetx_jax import cayley, rotation


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--out_dir", default=None)
  parser.add_argument("--tokens", type=int, default=2048)
  args = parser.parse_args(argv)
  n = args.tokens
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, N={n}", flush=True)
  for d_in, d_out, block in ((4096, 14336, 256), (14336, 4096, 256)):
    sets = layer_bench._inputs(jax.random.key(0), n, d_in, d_out, block, 4, jnp.bfloat16)  # pylint: disable=protected-access
    args_sets = [(a,) for a in sets]
    g_in = [cayley.cayley_neumann(a["q_in"], block) for a in sets]
    g_out = [cayley.cayley_neumann(a["q_out"], block) for a in sets]
    for a, gi, go in zip(sets, g_in, g_out):
      a["g_in"], a["g_out"] = gi, go
      a["h"] = (a["x"] @ a["kernel"])
      a["xT"], a["hT"], a["dyT"] = a["x"].T, a["h"].T, a["dy"].T
    hp = jax.lax.Precision.HIGHEST
    dp = jax.lax.Precision.DEFAULT
    pieces = {
        "take x[:, perm] (row-major)": lambda a: jnp.take(a["x"], a["perm_in_inv"], axis=-1),
        "take xT[perm] (feature-major)": lambda a: jnp.take(a["xT"], a["perm_in_inv"], axis=0),
        "transpose x": lambda a: a["x"].T,
        "rotate rows xT": lambda a: rotation.rotate_rows(a["xT"], a["g_in"]),
        "gather+rotate xT": lambda a: rotation.gather_rotate(a["xT"], a["perm_in_inv"], a["g_in"]),
        "GEMM x @ K": lambda a: a["x"] @ a["kernel"],
        "GEMM K^T @ xT": lambda a: a["kernel"].T @ a["xT"],
        "rotate+gather hT": lambda a: rotation.rotate_gather(a["hT"], a["g_out"], a["perm_out"], None),
        "dG_out = sum hT gT": lambda a: rotation.gathered_block_outer_sum(a["hT"], None, a["dyT"], a["perm_out"], block),
        "cayley in+out HIGHEST fwd": lambda a: (cayley.cayley_neumann(a["q_in"], block, 3, hp), cayley.cayley_neumann(a["q_out"], block, 3, hp)),
        "cayley in+out DEFAULT fwd": lambda a: (cayley.cayley_neumann(a["q_in"], block, 3, dp), cayley.cayley_neumann(a["q_out"], block, 3, dp)),
        "cayley in+out DEFAULT fwd+bwd": lambda a: jax.vjp(
            lambda qi, qo: (cayley.cayley_neumann(qi, block, 3, dp), cayley.cayley_neumann(qo, block, 3, dp)), a["q_in"], a["q_out"]
        )[1]((a["g_in"], a["g_out"])),
    }
    print(f"--- {d_in}x{d_out} b={block}")
    for name, fn in pieces.items():
      print(f"  {name:<34} {timing.time_ms(jax.jit(fn), args_sets):8.3f} ms", flush=True)
    impls = {"xla fast": ("fast", "xla"), "xla mem": ("mem", "xla")}
    if jax.default_backend() == "gpu":
      from poetx_jax.kernels import block_outer_sum, block_rotation  # pylint: disable=g-import-not-at-top
      pallas_pieces = {
          "pallas gather+rotate xT": lambda a: block_rotation.gather_rotate(a["xT"], a["perm_in_inv"], a["g_in"]),
          "pallas rotate+scatter hT": lambda a: block_rotation.rotate_gather(a["hT"], a["g_out"], None, a["perm_out"]),
          "pallas dG_out": lambda a: block_outer_sum.block_outer_sum(a["hT"], None, a["dyT"], a["perm_out"], block),
      }
      for name, fn in pallas_pieces.items():
        print(f"  {name:<34} {timing.time_ms(jax.jit(fn), args_sets):8.3f} ms", flush=True)
      impls.update({"pallas fast": layer_bench.KNOWN_IMPLS["pallas_fast"], "pallas mem": layer_bench.KNOWN_IMPLS["pallas_mem"]})
    for impl, settings in impls.items():
      fwd, fb = layer_bench._poet_fns(block, *settings)  # pylint: disable=protected-access
      print(f"  layer {impl:<28} fwd {timing.time_ms(fwd, args_sets):7.3f}  fwd+bwd {timing.time_ms(fb, args_sets):7.3f} ms")
      if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, f"hlo_{impl.replace(' ', '_')}_{d_in}x{d_out}.txt"), "w") as f:
          f.write(fb.lower(sets[0]).compile().as_text())
    dfwd, dfb = layer_bench._dense_fns()  # pylint: disable=protected-access
    print(f"  layer {'dense':<28} fwd {timing.time_ms(dfwd, args_sets):7.3f}  fwd+bwd {timing.time_ms(dfb, args_sets):7.3f} ms")


if __name__ == "__main__":
  main()
