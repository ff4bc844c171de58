"""What the `mem` variant saves: compiled memory and time of a stack of POET-X layers.

  python -m benchmarks.mem_variant --implementations pallas,xla

`mem` keeps only `x` and `G` and recomputes `h` in the backward. Without remat the
forward and the backward are one XLA program, and its CSE pass can merge that
recomputation with the forward's own `h`, which then lives until the backward: `mem`
saves nothing and costs nothing. The layer ties the recomputation to the cotangent
(`ops._tied_to_cotangent`); `--untied` also runs the layer with that tie removed, to
show what it changes. For each implementation, variant and remat (none, or each layer
under `jax.checkpoint`): the compiled program's temporary memory, the number of dot
ops in it (XLA dots and cuBLAS GEMM calls: where `h` is computed again, one more
per layer on the Pallas path, the GEMM, and up to two on the XLA path, whose input
rotation is a dot too) and the median time of the
jitted forward + backward.
"""

from __future__ import annotations

import argparse
import contextlib
import re

import jax
import jax.numpy as jnp

from benchmarks import timing
from poetx_jax import ops, skew


@contextlib.contextmanager
def untied():
  """The layer as it was before the tie: its recomputation free for CSE to merge."""
  original = ops._tied_to_cotangent
  ops._tied_to_cotangent = lambda operands, cotangent: tuple(operands)
  try:
    yield
  finally:
    ops._tied_to_cotangent = original


def stack_loss(kernels, perm_in_inv, perm_out, block_size, variant, remat, implementation, interpret):
  """`Σ y²` of `tanh` after each layer; its gradient with respect to every generator."""
  def layer(x, k_IxO, q_in, q_out):
    y = ops.poet_linear(
        x, k_IxO, q_in, q_out, perm_in_inv, perm_out, block_size=block_size, variant=variant,
        implementation=implementation, interpret=interpret,
    )
    return jnp.tanh(y)

  step = jax.checkpoint(layer) if remat else layer

  def loss(qs, x):
    for k_IxO, (q_in, q_out) in zip(kernels, qs):
      x = step(x, k_IxO, q_in, q_out)
    return jnp.sum(jnp.square(x.astype(jnp.float32)))

  return jax.jit(jax.grad(loss))


def measure(args, implementation, variant, remat, dtype):
  key = jax.random.PRNGKey(0)
  width, b = args.width, args.block
  kernels = [
      (jax.random.normal(jax.random.fold_in(key, i), (width, width), jnp.float32) / width**0.5).astype(dtype)
      for i in range(args.layers)
  ]
  q_shape = (width // b, skew.packed_size(b))
  qs = [
      tuple(1e-3 * jax.random.normal(jax.random.fold_in(key, 100 + 2 * i + side), q_shape) for side in (0, 1))
      for i in range(args.layers)
  ]
  perm_in_inv = jax.random.permutation(jax.random.fold_in(key, 7), width).astype(jnp.int32)
  perm_out = jax.random.permutation(jax.random.fold_in(key, 8), width).astype(jnp.int32)
  xs = [(qs, jax.random.normal(jax.random.fold_in(key, 200 + i), (args.tokens, width)).astype(dtype)) for i in range(2)]
  fn = stack_loss(kernels, perm_in_inv, perm_out, b, variant, remat, implementation, args.interpret)
  compiled = fn.lower(*xs[0]).compile()
  temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
  dots = len(re.findall(r"\bdot\(|custom_call_target=\"__cublas\$(lt\$matmul|gemm)", compiled.as_text()))
  ms = timing.time_ms(compiled, xs, calls=args.calls, batches=5) if args.calls else float("nan")
  return temp_mib, dots, ms


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--implementations", default="pallas,xla")
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--width", type=int, default=4096)
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--block", type=int, default=256)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--calls", type=int, default=10, help="timed calls per batch; 0: memory only")
  parser.add_argument("--untied", action="store_true", help="also measure mem with the tie removed")
  parser.add_argument("--interpret", action="store_true", help="Pallas in the interpreter (CPU)")
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  h_mib = args.tokens * args.width * dtype.itemsize / 2**20
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; {args.layers} layers {args.width}x{args.width}, "
        f"b = {args.block}, {args.tokens} tokens, {dtype.name}: one h is {h_mib:.1f} MiB")
  print(f"{'impl':<7} {'variant':<12} {'remat':<6} {'temp MiB':>9} {'dots':>5} {'fwd+bwd ms':>11}")
  for implementation in args.implementations.split(","):
    cases = [("fast", "fast", None), ("mem", "mem", None)]
    if args.untied:
      cases.append(("mem untied", "mem", untied))
    for remat in (False, True):
      for label, variant, context in cases:
        with context() if context else contextlib.nullcontext():
          temp_mib, dots, ms = measure(args, implementation, variant, remat, dtype)
        print(f"{implementation:<7} {label:<12} {'full' if remat else 'none':<6} {temp_mib:9.1f} {dots:5d} {ms:11.3f}", flush=True)


if __name__ == "__main__":
  main()
