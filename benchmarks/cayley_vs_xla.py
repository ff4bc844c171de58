"""The Pallas Cayley–Neumann kernels against XLA running the same bfloat16 algorithm.

  python -m benchmarks.cayley_vs_xla [--cases 256x72,512x36,...]

The README's XLA columns multiply float32 operands. A bf16 layer's Pallas kernels
read bfloat16 ones, so this asks whether XLA's batched GEMMs (cuBLAS / its own
Triton emitter), given the same bfloat16 operands, float32 accumulation and the
same polynomial forms, beat them. Device µs (profiler trace) of the forward (`G` in
bfloat16, as the layer takes it) and of the backward that recomputes `Q` and `Q2`
(the default, lean layer).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import kernel_profile
from poetx_jax import skew
from poetx_jax.kernels import cayley_neumann as cn

BF16 = jnp.bfloat16


def _mm(a, b):
  return jnp.einsum("rij,rjk->rik", a.astype(BF16), b.astype(BF16), preferred_element_type=jnp.float32)


def xla_forward(q_RxE, block):
  q = skew.skew_from_packed(q_RxE, block)
  q2 = _mm(q, q)
  g = _mm(q2, q2 + 2.0 * q) + 2.0 * (q + q2) + jnp.eye(block, dtype=jnp.float32)
  return g.astype(BF16)


def xla_backward(q_RxE, dg_RxBxB, block):
  q = skew.skew_from_packed(q_RxE, block)
  q2 = _mm(q, q)
  grad2 = -(_mm(dg_RxBxB, q) + _mm(q, dg_RxBxB))
  dq = _mm(grad2 + 2.0 * dg_RxBxB, q2) + _mm(q2 - 2.0 * q, grad2) + 2.0 * (dg_RxBxB + grad2)
  return skew.packed_skew_cotangent(dq)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--cases", default="256x72,256x320,512x36,512x64,512x160,512x320")
  parser.add_argument("--sets", type=int, default=4)
  parser.add_argument("--interpret", action="store_true", help="Pallas interpreter (a CPU smoke run)")
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  for case in args.cases.split(","):
    block, blocks = (int(v) for v in case.split("x"))
    sets = []
    for s in range(args.sets):
      k1, k2 = jax.random.split(jax.random.key(s))
      sets.append((0.05 * jax.random.normal(k1, (blocks, skew.packed_size(block)), jnp.float32),
                   jax.random.normal(k2, (blocks, block, block), jnp.float32)))
    pallas_fwd = jax.jit(lambda q, g: cn.cayley_neumann_forward(q, block, operand_dtype=BF16, out_dtype=BF16, interpret=args.interpret))
    pallas_bwd = jax.jit(lambda q, g: cn.cayley_neumann_backward(q, g, block, operand_dtype=BF16, interpret=args.interpret))
    xla_fwd = jax.jit(lambda q, g: xla_forward(q, block))
    xla_bwd = jax.jit(lambda q, g: xla_backward(q, g, block))
    # The same numbers, to the rounding of bfloat16 operands.
    q, g = sets[0]
    fwd_gap = float(jnp.max(jnp.abs(pallas_fwd(q, g).astype(jnp.float32) - xla_fwd(q, g).astype(jnp.float32))))
    bwd_ref = xla_bwd(q, g)
    bwd_gap = float(jnp.max(jnp.abs(pallas_bwd(q, g) - bwd_ref)) / jnp.max(jnp.abs(bwd_ref)))
    row = {}
    for name, fwd, bwd in (("pallas", pallas_fwd, pallas_bwd), ("xla", xla_fwd, xla_bwd)):
      row[name] = (kernel_profile.device_us(fwd, sets), kernel_profile.device_us(bwd, sets))
    (pf, pb), (xf, xb) = row["pallas"], row["xla"]
    print(f"b={block:<4} blocks={blocks:<4} pallas fwd {pf:7.1f} bwd {pb:7.1f} sum {pf + pb:7.1f} µs |"
          f" xla bf16 fwd {xf:7.1f} bwd {xb:7.1f} sum {xf + xb:7.1f} µs | xla/pallas {(xf + xb) / (pf + pb):.2f}"
          f"  (max |dG| gap {fwd_gap:.1e}, dq rel gap {bwd_gap:.1e})", flush=True)


if __name__ == "__main__":
  main()
