"""LLaMA in Flax linen, built from plain `nn.Dense` so `poetx_jax.wrap` can target it.

RMSNorm (eps 1e-6), rotary embeddings (base 1e4), SwiGLU, causal attention through
`jax.nn.dot_product_attention`, untied head, no biases (SPEC §9). Layer names match
the POET-X papers' targets: `q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj`; the head is `lm_head` (excluded by POETConfig's default).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Dimensions and numerics of a LLaMA.

  Attributes:
    vocab_size: rows of the embedding and columns of the head.
    hidden: model width `d`.
    ffn: SwiGLU inner width.
    heads: attention heads (`hidden % heads == 0`).
    layers: transformer blocks.
    max_seq_len: longest sequence the rotary tables must cover.
    rope_base: rotary base (1e4).
    norm_eps: RMSNorm epsilon (1e-6).
    dtype: computation dtype ("bfloat16" on GPUs).
    param_dtype: storage dtype of the parameters (and of POET-X's frozen base kernels).
    remat: rematerialize each block in the backward ("none", "full", or "dots":
      keep the matmul outputs without batch dimensions).
    init_std: standard deviation of the normal initializers (0.02).
    attention: `jax.nn.dot_product_attention` implementation: None (XLA picks), "xla", "cudnn".
    scan_layers: run the blocks as one `nn.scan` (parameters stacked on a leading
      layer axis, under the path `blocks`): compile time no longer grows with depth.
  """

  vocab_size: int = 32000
  hidden: int = 512
  ffn: int = 1280
  heads: int = 8
  layers: int = 8
  max_seq_len: int = 2048
  rope_base: float = 10000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  init_std: float = 0.02
  attention: str | None = None
  scan_layers: bool = False

  def __post_init__(self):
    if self.hidden % self.heads:
      raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}.")
    if (self.hidden // self.heads) % 2:
      raise ValueError(f"head dimension {self.hidden // self.heads} must be even for rotary embeddings.")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"remat must be 'none', 'full' or 'dots', got {self.remat!r}.")

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads


def rotary_embedding(x_BxSxHxK: jax.Array, positions_BxS: jax.Array, base: float) -> jax.Array:
  """Rotates channel pairs `(i, i + K/2)` by position-dependent angles (RoPE, half-split form)."""
  half = x_BxSxHxK.shape[-1] // 2
  freqs = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles_BxSxK = positions_BxS[..., None].astype(jnp.float32) * freqs
  sin, cos = jnp.sin(angles_BxSxK)[:, :, None, :], jnp.cos(angles_BxSxK)[:, :, None, :]
  x1, x2 = jnp.split(x_BxSxHxK.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxSxHxK.dtype)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * scale.astype(jnp.float32)).astype(self.dtype)


def _dense(config: LlamaConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(
      features,
      use_bias=False,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      kernel_init=nn.initializers.normal(config.init_std),
      name=name,
  )


class Attention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BxSxD, positions_BxS):
    cfg = self.config
    shape = x_BxSxD.shape[:2] + (cfg.heads, cfg.head_dim)
    q = _dense(cfg, cfg.hidden, "q_proj")(x_BxSxD).reshape(shape)
    k = _dense(cfg, cfg.hidden, "k_proj")(x_BxSxD).reshape(shape)
    v = _dense(cfg, cfg.hidden, "v_proj")(x_BxSxD).reshape(shape)
    q = rotary_embedding(q, positions_BxS, cfg.rope_base)
    k = rotary_embedding(k, positions_BxS, cfg.rope_base)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=cfg.attention)
    return _dense(cfg, cfg.hidden, "o_proj")(out.reshape(x_BxSxD.shape))


class MLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BxSxD):
    cfg = self.config
    gate = _dense(cfg, cfg.ffn, "gate_proj")(x_BxSxD)
    up = _dense(cfg, cfg.ffn, "up_proj")(x_BxSxD)
    return _dense(cfg, cfg.hidden, "down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BxSxD, positions_BxS):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)
    x_BxSxD = x_BxSxD + Attention(cfg, name="attention")(norm("attention_norm")(x_BxSxD), positions_BxS)
    return x_BxSxD + MLP(cfg, name="mlp")(norm("mlp_norm")(x_BxSxD))


class ScannedBlock(Block):
  """A Block with nn.scan's (carry, output) signature."""

  @nn.compact
  def __call__(self, x_BxSxD, positions_BxS):
    return super().__call__(x_BxSxD, positions_BxS), None


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # Not also POET-X's blocks (`ops.BLOCKS_CHECKPOINT_NAME`): saving them spared the
    # Cayley–Neumann forward's second run but cost copies and memory, for at most 0.6%
    # of a step (llama1b −5.9 ms of kernels in 2990; llama3b 6.440 → 6.419 s for
    # 1.5 GiB more; raw/run106_step_old_policy.txt, run107_step_new_policy.txt,
    # run108_fit.txt, run109_fit_3b_policies.txt).
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@jax.custom_vjp
def gather_rows(table_VxD: jax.Array, tokens: jax.Array) -> jax.Array:
  """`table[tokens]` whose gradient is summed in float32, then cast to the table's dtype."""
  return jnp.take(table_VxD, tokens, axis=0)


def _gather_rows_fwd(table_VxD, tokens):
  # Not the table itself: an empty row of its shape and dtype (a cast table would be kept alive).
  return gather_rows(table_VxD, tokens), (tokens, jnp.zeros((table_VxD.shape[0], 0), table_VxD.dtype))


def _gather_rows_bwd(residuals, cotangent):
  tokens, like_Vx0 = residuals
  rows, features = like_Vx0.shape[0], cotangent.shape[-1]
  grad_VxD = jnp.zeros((rows, features), jnp.float32).at[tokens].add(cotangent.astype(jnp.float32))
  return grad_VxD.astype(like_Vx0.dtype), None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


class Embed(nn.Module):
  """Token embedding whose gradient is a float32 scatter-add, whatever the dtypes.

  `nn.Embed` casts the whole table to `dtype` before its gather, so with a float32
  table and bfloat16 activations (and with a bfloat16 table) its gradient is a
  bfloat16 scatter-add, which the GPU does with compare-and-swap loops that serialize
  on repeated tokens: on real text that one scatter took 100–153 ms of a llama60m step
  on the H100, whose GPU-busy time was 359–412 ms and is 259 ms without it
  (`benchmarks/results/raw/run59_trace_gaps.txt`, `run60_trace_gaps.txt`). Here the
  rows are gathered first and then cast, and their gradient is summed in float32
  whatever the dtypes, then cast to the table's. Same parameter and forward values.
  """

  num_embeddings: int
  features: int
  dtype: Any
  param_dtype: Any
  embedding_init: Callable

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    table_VxD = self.param("embedding", self.embedding_init, (self.num_embeddings, self.features), self.param_dtype)
    # Gathered in the wider of the two dtypes, so a float32 computation's cotangent is
    # not rounded to a bfloat16 table's dtype before it is summed.
    wide = jnp.promote_types(table_VxD.dtype, self.dtype)
    return gather_rows(table_VxD.astype(wide), tokens).astype(self.dtype)


class Llama(nn.Module):
  """Decoder-only LLaMA: `tokens (B, S) int32 -> logits (B, S, vocab) float32`."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, tokens_BxS: jax.Array) -> jax.Array:
    cfg = self.config
    embed = Embed(
        cfg.vocab_size,
        cfg.hidden,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=nn.initializers.normal(cfg.init_std),
        name="embed",
    )
    x = embed(tokens_BxS)
    positions_BxS = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)
    base = ScannedBlock if cfg.scan_layers else Block
    block_cls = base if cfg.remat == "none" else nn.remat(base, policy=_REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:
      stack = nn.scan(
          block_cls, variable_axes={True: 0}, split_rngs={"params": True}, in_axes=(nn.broadcast,), length=cfg.layers
      )
      x, _ = stack(cfg, name="blocks")(x, positions_BxS)
    else:
      for i in range(cfg.layers):
        x = block_cls(cfg, name=f"blocks_{i}")(x, positions_BxS)
    x = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x)
    logits = _dense(cfg, cfg.vocab_size, "lm_head")(x)
    return logits.astype(jnp.float32)


# SPEC §9: name -> (hidden, ffn, heads, layers).
SIZES = {
    "60m": (512, 1280, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2816, 16, 24),
    "1b": (2048, 5632, 32, 24),
    "3b": (2560, 7168, 32, 32),
    "8b": (4096, 14336, 32, 32),
    "13b": (5120, 13824, 40, 40),
}


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
  """Training FLOPs per token of the dense model (6·N matmul params + attention), MaxText's count."""
  per_layer = 3 * config.hidden * config.hidden + config.hidden * config.hidden + 3 * config.hidden * config.ffn
  matmul_params = config.layers * per_layer + config.hidden * config.vocab_size
  attention = 12 * config.layers * config.hidden * seq_len / 2  # causal: half the score matrix
  return 6.0 * matmul_params + attention
