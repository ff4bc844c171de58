"""A layer between the neighbours it has in a model, dense against POET-X.

  python -m benchmarks.layer_in_context --tokens 2048,16384

Timed alone (`benchmarks.layer`), a POET-X layer transposes its input, its output and
their cotangents (it works feature-major, so that permutations move whole rows): four
transposes that nothing else pays for. In a model the layer's input comes out of a
norm or an activation, and its output goes into another, and XLA can write and read
the transposed layouts inside those fusions. Two contexts, as in a LLaMA block:

* `norm_silu`: `silu(layer(rmsnorm(x) · scale))`, as an MLP's gate projection (and, up
  to the activation, the up and attention input projections);
* `gated_residual`: `layer(silu(g) · u) + r`, as the MLP's down projection.

Forward + backward with respect to every input (the norm's scale included) and the
layer's trainable parameters: the kernel for dense, the generators for POET-X. Per
context, shape, block size and token count: wall ms (median of rotating inputs) and
device ms (profiler trace), both as ratios to dense, and the device µs of kernels
whose name says `transpose`: standalone transposes, or fusions XLA names after a
transpose they contain, which may also do the neighbours' work. bf16 throughout.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from benchmarks import kernel_profile, timing
from benchmarks import layer as layer_bench
from poetx_jax import ops

POET_IMPLS = ("pallas_fast_lean", "pallas_fast", "pallas_mem")


def _rmsnorm(x, scale):
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
  return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def _norm_silu(layer):
  def net(a, x, scale, params):
    return jax.nn.silu(layer(_rmsnorm(x, scale), params, a))
  return net, ("x", "scale")


def _gated_residual(layer):
  def net(a, g, u, r, params):
    return layer(jax.nn.silu(g) * u, params, a) + r
  return net, ("x", "u", "residual")


CONTEXTS = {"norm_silu": _norm_silu, "gated_residual": _gated_residual}


def _in_context(context, layer, trainable):
  """`fwd+bwd(a)` of the layer in `context`; `trainable(a)` picks the layer's parameters."""
  net, inputs = CONTEXTS[context](layer)

  def fwd_bwd(a):
    out, vjp = jax.vjp(lambda *args: net(a, *args), *(a[k] for k in inputs), trainable(a))
    return out, vjp(a["dy"])
  return jax.jit(fwd_bwd)


def dense_fn(context="norm_silu"):
  return _in_context(context, lambda h, kernel, a: h @ kernel, lambda a: a["kernel"])


def poet_fn(block, variant, implementation, keep_cayley_state, context="norm_silu"):
  def layer(h, qs, a):
    return ops.poet_linear(
        h, a["kernel"], *qs, a["perm_in_inv"], a["perm_out"], block_size=block, variant=variant,
        implementation=implementation, keep_cayley_state=keep_cayley_state,
    )
  return _in_context(context, layer, lambda a: (a["q_in"], a["q_out"]))


def _inputs(tokens, d_in, d_out, block, sets):
  inputs = layer_bench._inputs(jax.random.key(0), tokens, d_in, d_out, block, sets, jnp.bfloat16)  # pylint: disable=protected-access
  for s, a in enumerate(inputs):
    k = jax.random.split(jax.random.key(1000 + s), 3)
    a["scale"] = (1.0 + 0.1 * jax.random.normal(k[0], (d_in,))).astype(jnp.bfloat16)
    a["u"] = jax.random.normal(k[1], (tokens, d_in), jnp.bfloat16)
    a["residual"] = jax.random.normal(k[2], (tokens, d_out), jnp.bfloat16)
  return [(a,) for a in inputs]


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default=",".join(f"{i}x{o}" for i, o in layer_bench.SHAPES))
  parser.add_argument("--blocks", default="256,512")
  parser.add_argument("--tokens", default="2048,16384")
  parser.add_argument("--contexts", default=",".join(CONTEXTS), help=f"of {tuple(CONTEXTS)}")
  parser.add_argument("--impls", default=",".join(POET_IMPLS), help=f"POET-X rows besides dense, of {POET_IMPLS}")
  parser.add_argument("--out", default=None, help="JSON output path (rewritten after every row)")
  parser.add_argument("--top", type=int, default=0, help="also list each row's longest kernels (device µs per call)")
  args = parser.parse_args(argv)
  unknown = [i for i in args.impls.split(",") if i not in POET_IMPLS]
  if unknown:
    raise SystemExit(f"unknown --impls {unknown}; choose from {POET_IMPLS}.")
  contexts = args.contexts.split(",")
  if [c for c in contexts if c not in CONTEXTS]:
    raise SystemExit(f"unknown --contexts in {contexts}; choose from {tuple(CONTEXTS)}.")
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  records = layer_bench.JsonRecords(args.out, dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                                                   command="python -m benchmarks.layer_in_context " + " ".join(argv or sys.argv[1:])))
  for context, tokens in ((c, int(t)) for c in contexts for t in args.tokens.split(",")):
    for shape in args.shapes.split(","):
      d_in, d_out = (int(s) for s in shape.split("x"))
      for block in (int(b) for b in args.blocks.split(",")):
        if d_in % block or d_out % block:
          continue
        inputs = _inputs(tokens, d_in, d_out, block, sets=4)
        rows = {"dense": dense_fn(context)}
        rows.update({name: poet_fn(block, *layer_bench.KNOWN_IMPLS[name], context=context)
                     for name in args.impls.split(",")})
        base = None
        for name, fn in rows.items():
          wall_ms = timing.time_ms(fn, inputs)
          kernels = kernel_profile.profile(fn, inputs, calls=10)
          device_ms = sum(us for _, _, us in kernels) / 1e3
          transposes_us = sum(us for n, _, us in kernels if "transpose" in n)
          if name == "dense":
            base = (wall_ms, device_ms)
          records.append(dict(context=context, shape=shape, b=block, tokens=tokens, impl=name, fwd_bwd_ms=wall_ms,
                              ratio_to_dense=wall_ms / base[0], fwd_bwd_device_ms=device_ms,
                              device_ratio_to_dense=device_ms / base[1], transposes_device_us=transposes_us))
          print(f"{context:<14} N={tokens:<6} {shape:>11} b={block:<4} {name:<17} fwd+bwd {wall_ms:7.3f} ms x{wall_ms / base[0]:5.2f}"
                f"  device {device_ms:7.3f} ms x{device_ms / base[1]:5.2f}  transposes {transposes_us:7.1f} µs", flush=True)
          for kernel, launches, us in kernels[: args.top]:
            print(f"    {us:8.1f} µs  x{launches:<4.0f} {kernel[:100]}", flush=True)


if __name__ == "__main__":
  main()
