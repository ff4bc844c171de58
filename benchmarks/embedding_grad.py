"""The embedding's gradient on the GPU: flax's `nn.Embed` against `llama.Embed`.

  python -m benchmarks.embedding_grad

`nn.Embed` casts its float32 table to bfloat16 before the gather, so its gradient
is a bfloat16 scatter-add; `llama.Embed` gathers first, so its gradient is a float32
one. Device µs of forward + backward for one llama60m batch (512 x 256 tokens, a
32000 x 512 table), on uniformly random tokens and on Zipf-distributed ones (word
frequencies in text follow Zipf's law, so real batches repeat their frequent tokens).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import kernel_profile
from poetx_jax.models import llama


def _tokens(kind: str, shape, vocab: int, seed: int) -> jax.Array:
  rng = np.random.default_rng(seed)
  if kind == "uniform":
    return jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)
  weights = 1.0 / np.arange(1, vocab + 1)  # Zipf's law over the vocabulary: rank 0 the most frequent
  return jnp.asarray(rng.choice(vocab, size=shape, p=weights / weights.sum()), jnp.int32)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--hidden", type=int, default=512)
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, tokens {args.batch}x{args.seq_len},"
        f" table {args.vocab}x{args.hidden}", flush=True)
  init = nn.initializers.normal(0.02)
  modules = {
      "nn.Embed (bf16 scatter)": nn.Embed(args.vocab, args.hidden, dtype=jnp.bfloat16, param_dtype=jnp.float32, embedding_init=init),
      "llama.Embed (f32 scatter)": llama.Embed(args.vocab, args.hidden, dtype=jnp.bfloat16, param_dtype=jnp.float32, embedding_init=init),
  }
  shape = (args.batch, args.seq_len)
  for kind in ("uniform", "zipf"):
    sets = [(_tokens(kind, shape, args.vocab, s),) for s in range(3)]
    top = np.bincount(np.asarray(sets[0][0]).ravel()).max() / np.prod(shape)
    times = {}
    for name, module in modules.items():
      params = module.init(jax.random.key(0), sets[0][0])
      cotangent = jnp.ones(shape + (args.hidden,), jnp.bfloat16)

      def fwd_bwd(tokens, module=module, params=params, cotangent=cotangent):
        out, vjp = jax.vjp(lambda p: module.apply(p, tokens), params)
        return out, vjp(cotangent)

      times[name] = kernel_profile.device_us(jax.jit(fwd_bwd), sets)
    base = times["nn.Embed (bf16 scatter)"]
    for name, us in times.items():
      ratio = f"x{us / base:6.3f}" if base else "(no GPU kernels timed)"
      print(f"{kind:<8} (most frequent token {top:5.1%})  {name:<26} {us:10.1f} µs  {ratio}", flush=True)


if __name__ == "__main__":
  main()
