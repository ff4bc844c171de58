"""POET-X layer vs a dense layer, forward and forward+backward, on one GPU.

  python -m benchmarks.layer --out benchmarks/results/layer_h100.json

Prints a table and writes JSON records (see the kernels issue): per shape and block
size, `dense`, `xla` (the pure-JAX path), `pallas_fast`, `pallas_mem`, plus the
Cayley–Neumann map alone. All in bf16 with N = 2048 tokens, median of rotating inputs
(wall clock over back-to-back calls), plus the device time of the same calls summed
from a profiler trace (`benchmarks.kernel_profile`), which no host overhead can reach.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import kernel_profile, timing
from poetx_jax import cayley, ops, skew

SHAPES = ((4096, 14336), (14336, 4096), (4096, 4096), (2048, 5632))
BLOCKS = (256, 512)
CAYLEY_BLOCKS = (64, 128, 192, 256, 320)


# (variant, implementation, keep_cayley_state) per row. A layer timed alone is not under
# `nn.scan`, where keeping the Cayley intermediates pays off (see POETConfig), so `fast`
# keeps them and `mem`, the least-memory row, does not; `pallas_fast_lean` is `fast`
# as the scanned LLaMA configs run it.
KNOWN_IMPLS = {
    "xla": ("fast", "xla", False),
    "xla_mem": ("mem", "xla", False),
    "pallas_fast": ("fast", "pallas", True),
    "pallas_fast_lean": ("fast", "pallas", False),
    "pallas_mem": ("mem", "pallas", False),
}


def _inputs(key, tokens, d_in, d_out, block, sets, dtype):
  """`sets` independent input sets (x, base kernel, q_in, q_out, perms, dy)."""
  out = []
  for s in range(sets):
    k = jax.random.split(jax.random.fold_in(key, s), 7)
    e = skew.packed_size(block)
    out.append(
        dict(
            x=jax.random.normal(k[0], (tokens, d_in), dtype),
            kernel=(jax.random.normal(k[1], (d_in, d_out), jnp.float32) / np.sqrt(d_in)).astype(dtype),
            q_in=0.01 * jax.random.normal(k[2], (d_in // block, e), jnp.float32),
            q_out=0.01 * jax.random.normal(k[3], (d_out // block, e), jnp.float32),
            perm_in_inv=jax.random.permutation(k[4], d_in).astype(jnp.int32),
            perm_out=jax.random.permutation(k[5], d_out).astype(jnp.int32),
            dy=jax.random.normal(k[6], (tokens, d_out), dtype),
        )
    )
  return out


def _dense_fns():
  fwd = jax.jit(lambda a: a["x"] @ a["kernel"])

  def fwd_bwd(a):  # the output is returned too, so the forward GEMM is not dead code
    y, vjp = jax.vjp(lambda x, w: x @ w, a["x"], a["kernel"])
    return y, vjp(a["dy"])

  return fwd, jax.jit(fwd_bwd)


def _poet_fns(block, variant, implementation, keep_cayley_state=False):
  def layer(x, q_in, q_out, a):
    return ops.poet_linear(
        x, a["kernel"], q_in, q_out, a["perm_in_inv"], a["perm_out"],
        block_size=block, variant=variant, implementation=implementation, keep_cayley_state=keep_cayley_state,
    )

  fwd = jax.jit(lambda a: layer(a["x"], a["q_in"], a["q_out"], a))

  def fwd_bwd(a):
    y, vjp = jax.vjp(lambda x, qi, qo: layer(x, qi, qo, a), a["x"], a["q_in"], a["q_out"])
    return y, vjp(a["dy"])

  return fwd, jax.jit(fwd_bwd)


def layer_records(impls, records, tokens=2048, sets=4, shapes=SHAPES, blocks=BLOCKS):
  key = jax.random.key(0)
  for d_in, d_out in shapes:
    for block in blocks:
      if d_in % block or d_out % block:
        continue
      inputs = [(a,) for a in _inputs(key, tokens, d_in, d_out, block, sets, jnp.bfloat16)]
      dense_fwd, dense_fb = _dense_fns()
      rows = {"dense": (dense_fwd, dense_fb)}
      for name, impl in impls.items():
        rows[name] = _poet_fns(block, *impl)
      base = None
      for name, (fwd, fb) in rows.items():
        fwd_ms = timing.time_ms(fwd, inputs)
        fb_ms = timing.time_ms(fb, inputs)
        fb_dev = kernel_profile.device_us(fb, inputs) / 1e3
        if name == "dense":
          base, base_dev = fb_ms, fb_dev
        records.append(dict(shape=f"{d_in}x{d_out}", b=block, impl=name, tokens=tokens, fwd_ms=fwd_ms,
                            fwd_bwd_ms=fb_ms, ratio_to_dense=fb_ms / base, fwd_bwd_device_ms=fb_dev,
                            device_ratio_to_dense=fb_dev / base_dev))
        print(f"{d_in:>6}x{d_out:<6} b={block:<4} {name:<12} fwd {fwd_ms:7.3f} ms  fwd+bwd {fb_ms:7.3f} ms"
              f"  x{fb_ms / base:5.2f} dense  (device fwd+bwd {fb_dev:7.3f} ms, x{fb_dev / base_dev:5.2f})", flush=True)
  return records


def _out_and_vjp(fn, q, cot):
  out, vjp = jax.vjp(fn, q)
  return out, vjp(cot)


def cayley_records(impls, records, blocks_list=CAYLEY_BLOCKS, sizes=BLOCKS, sets=4):
  for block in sizes:
    for blocks in blocks_list:
      inputs = []
      for s in range(sets):
        k1, k2 = jax.random.split(jax.random.key(100 + s))
        inputs.append((0.01 * jax.random.normal(k1, (blocks, skew.packed_size(block)), jnp.float32),
                       jax.random.normal(k2, (blocks, block, block), jnp.float32)))
      for name, fn in impls.items():
        fwd = jax.jit(lambda q, g, fn=fn: fn(q, block))
        fb = jax.jit(lambda q, g, fn=fn: _out_and_vjp(lambda v: fn(v, block), q, g))
        fwd_ms, fb_ms = timing.time_ms(fwd, inputs), timing.time_ms(fb, inputs)
        # Device time too: at tens of µs a jitted call's host dispatch can outlast its kernels.
        fwd_dev, fb_dev = (kernel_profile.device_us(f, inputs) / 1e3 for f in (fwd, fb))
        records.append(dict(impl="cayley", backend=name, b=block, blocks=blocks, fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms,
                            fwd_device_ms=fwd_dev, fwd_bwd_device_ms=fb_dev))
        print(f"cayley {name:<11} b={block:<4} blocks={blocks:<4} fwd {fwd_ms:7.3f} ms  fwd+bwd {fb_ms:7.3f} ms"
              f"  (device: fwd {fwd_dev:7.3f}  fwd+bwd {fb_dev:7.3f} ms)", flush=True)
  return records


class JsonRecords(list):
  """Records that rewrite their JSON file after every append: a run cut short keeps its rows."""

  def __init__(self, path, meta):
    super().__init__()
    self.path, self.meta = path, meta
    if path:
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

  def append(self, record):
    super().append({**record, **self.meta})
    if self.path:
      with open(self.path, "w") as f:
        json.dump(list(self), f, indent=1)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=None, help="JSON output path (rewritten after every row)")
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--impls", default="xla,pallas_fast,pallas_mem", help="comma-separated POET-X rows besides dense")
  parser.add_argument("--skip_layers", action="store_true")
  parser.add_argument("--skip_cayley", action="store_true")
  parser.add_argument("--cayley_sizes", default="256,512")
  parser.add_argument("--cayley_blocks", default=",".join(map(str, CAYLEY_BLOCKS)))
  parser.add_argument("--cayley_impls", default="xla,xla_default,pallas,pallas_bf16")
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "command": "python -m benchmarks.layer " + " ".join(sys.argv[1:])}
  records = JsonRecords(args.out, meta)
  known = KNOWN_IMPLS
  impls = {name: known[name] for name in args.impls.split(",") if name}
  if not args.skip_layers:
    layer_records(impls, records, tokens=args.tokens)
  if not args.skip_cayley:
    cayley_impls = {"xla": lambda q, b: cayley.cayley_neumann(q, b, 3)}
    if any(i.startswith("pallas") for i in impls):
      from poetx_jax.kernels import cayley_neumann as cn  # pylint: disable=g-import-not-at-top
      cayley_impls["xla_default"] = lambda q, b: cayley.cayley_neumann(q, b, 3, jax.lax.Precision.DEFAULT)
      cayley_impls["pallas"] = lambda q, b: cn.cayley_neumann(q, b)
      cayley_impls["pallas_bf16"] = lambda q, b: cn.cayley_neumann(q, b, operand_dtype=jnp.bfloat16)
    cayley_impls = {k: v for k, v in cayley_impls.items() if k in args.cayley_impls.split(",")}
    cayley_records(cayley_impls, records, blocks_list=tuple(int(n) for n in args.cayley_blocks.split(",")),
                   sizes=tuple(int(b) for b in args.cayley_sizes.split(",")))


if __name__ == "__main__":
  main()
