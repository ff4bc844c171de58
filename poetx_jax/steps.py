"""The pure, jitted functions of a run: state init, train step (merge inside), eval step."""

from __future__ import annotations

import re
from typing import Any, Callable

import flax.linen as nn
from flax.core import meta
import flax.struct
import jax
import jax.numpy as jnp
import optax

from poetx_jax import blocks as poet_blocks
from poetx_jax import layers, merging, spectrum, tree_paths
from poetx_jax.config import POETConfig


@flax.struct.dataclass
class TrainState:
  """Everything a run carries from step to step (and checkpoints).

  Attributes:
    step: optimizer updates applied so far (int32).
    params: the trainable collection.
    frozen: every other collection (POET-X's `poet`: base kernels, permutations); `{}` for baselines.
    opt_state: the optax state.
    rng: a raw uint32 PRNG key, split per step for anything stochastic.
  """

  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array


def init_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, seq_len: int) -> TrainState:
  """A fresh state (call under `jax.jit` with output shardings to build it sharded)."""
  rng = jax.random.PRNGKey(seed)
  init_rng, rng = jax.random.split(rng)
  variables = model.init(init_rng, jnp.zeros((1, seq_len), jnp.int32))
  params = variables["params"]
  frozen = {k: v for k, v in variables.items() if k != "params"}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=tx.init(params), rng=rng)


def token_loss(model: nn.Module, params, frozen, batch) -> tuple[jax.Array, jax.Array]:
  """(summed next-token cross-entropy over real tokens, their count)."""
  logits = model.apply({"params": params, **frozen}, batch["inputs"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weights = batch["weights"].astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(weights)


def _split_microbatches(batch, count: int):
  # (B, S) -> (count, B / count, S) with rows strided so each device keeps its own rows.
  def split(x):
    x = x.reshape((x.shape[0] // count, count) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree_util.tree_map(split, batch)


def make_gradients(
    model: nn.Module,
    *,
    poet: POETConfig | None,
    grad_accum_steps: int = 1,
    cayley_once: bool = False,
    activation_dtype=jnp.float32,
) -> Callable[[Any, Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array, Any]]:
  """`gradients(params, frozen, batch) -> (loss sum, tokens, grads)` over the microbatches
  (grads summed, not yet divided by the tokens); the arguments are `make_train_step`'s."""
  cayley_once = bool(cayley_once and poet is not None)
  # Differentiated with respect to the parameters and to the extra collections given to
  # the model: none, or the blocks when `cayley_once`.
  grad_fn = jax.value_and_grad(
      lambda p, extra, f, b: token_loss(model, p, {**f, **extra}, b), argnums=(0, 1), has_aux=True
  )

  def summed_gradients(params, extra, frozen, batch):
    """(loss sum, tokens, (grads of params, grads of extra)) over the microbatches."""
    if grad_accum_steps == 1:
      (loss_sum, tokens), grads = grad_fn(params, extra, frozen, batch)
      return loss_sum, tokens, grads

    def accumulate(carry, micro):
      loss_acc, tok_acc, grad_acc = carry
      (loss_sum, tokens), grads = grad_fn(params, extra, frozen, micro)
      grad_acc = jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
      return (loss_acc + loss_sum, tok_acc + tokens, grad_acc), None

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), (params, extra))
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (loss_sum, tokens, grads), _ = jax.lax.scan(accumulate, init, _split_microbatches(batch, grad_accum_steps))
    return loss_sum, tokens, grads

  def gradients(params, frozen, batch):
    if not cayley_once or not frozen.get(layers.POET_COLLECTION):  # no wrapped layer: no blocks to pass
      loss_sum, tokens, (grads, _) = summed_gradients(params, {}, frozen, batch)
    else:
      poet_state = frozen[layers.POET_COLLECTION]
      blocks, blocks_vjp = jax.vjp(lambda p: poet_blocks.layer_blocks(p, poet_state, poet, activation_dtype), params)
      # The model reads the blocks in its activations' dtype, as its layers' own map writes
      # them (a bfloat16 model holds them, and each microbatch's cotangent, at half the
      # memory); the cotangent is summed in float32.
      extra = {layers.BLOCKS_COLLECTION: jax.tree_util.tree_map(lambda g: g.astype(activation_dtype), blocks)}
      try:
        with layers.expecting_blocks():
          loss_sum, tokens, (grads, extra_grads) = summed_gradients(params, extra, frozen, batch)
      except ValueError as err:
        if layers.BLOCKS_COLLECTION not in str(err):
          raise
        raise ValueError(f"{err} In a run: set train.cayley_once=False.") from err
      # The generators' gradient: the map's backward of the summed blocks' cotangent (the
      # model itself gives `q_in`, `q_out` none, as its layers read the blocks).
      blocks_grads = extra_grads[layers.BLOCKS_COLLECTION]
      from_blocks = blocks_vjp(jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), blocks_grads))[0]
      grads = jax.tree_util.tree_map(lambda g, d: g.astype(jnp.float32) + d.astype(jnp.float32), grads, from_blocks)
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss_sum, tokens, grads

  return gradients


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    poet: POETConfig | None,
    grad_accum_steps: int = 1,
    log_every: int = 1,
    total_steps: int | None = None,
    cayley_once: bool = False,
    activation_dtype=jnp.float32,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step(state, batch) -> (state, metrics)`: loss, grads, update, and the merge.

  Args:
    model: the (wrapped or plain) linen model.
    tx: its optax transformation.
    schedule: the base learning rate, for the logs.
    poet: the POETConfig when the model is wrapped (merges run inside the step), else None.
    grad_accum_steps: microbatches per step, accumulated in float32.
    log_every: the step also reports the blocks' orthogonality error (before any
      merge) when the step it completes is a multiple of this or `total_steps`;
      0 elsewhere (the loop logs exactly those steps).
    total_steps: the run's last step.
    cayley_once: (POET-X) compute every layer's blocks `G` once per step
      (`blocks.layer_blocks`), pass them to the model and accumulate their gradient
      over the microbatches, so the Cayley–Neumann map runs forward and backward once
      a step instead of in every microbatch's forward, remat and backward. Same
      gradients up to the rounding of each microbatch's blocks cotangent to the
      activations' dtype; the blocks (in that dtype) and their float32 summed
      gradient stay in memory for the step, whole on every device (the map runs
      outside the layers' `shard_map`, on generators XLA gathers for it). Every
      Flax transform around a wrapped layer must carry the `poet_blocks` collection
      (a layer that finds none raises). The map runs at the default matmul precision
      (the layers' own `precision` is not known here). Ignored without `poet`.
    activation_dtype: the model's computation dtype, which picks the map's operand
      dtype when `cayley_once` (bfloat16 operands for a bfloat16 model, as in a layer).
  """
  gradients = make_gradients(
      model, poet=poet, grad_accum_steps=grad_accum_steps, cayley_once=cayley_once, activation_dtype=activation_dtype
  )

  def train_step(state: TrainState, batch):
    loss_sum, tokens, grads = gradients(state.params, state.frozen, batch)
    denominator = jnp.maximum(tokens, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denominator.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    frozen = state.frozen
    metrics = {
        "loss": loss_sum / denominator,
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),  # the loop stops on a non-finite one before saving
        "lr": schedule(state.step),
        "tokens": tokens,
    }
    if poet is not None:
      logged = (step % log_every == 0) | (step == (total_steps or -1))
      metrics["ortho_error"] = jax.lax.cond(
          logged,
          lambda: orthogonality_metric(params, frozen),
          lambda: jnp.zeros((), jnp.float32),
      )
      variables, opt_state = merging.merge_if_needed(step, {"params": params, **frozen}, opt_state, poet)
      params = variables["params"]
      frozen = {k: v for k, v in variables.items() if k != "params"}
      metrics["merged"] = merging.should_merge(step, poet).astype(jnp.int32)
    new_state = state.replace(step=step, params=params, frozen=frozen, opt_state=opt_state, rng=jax.random.split(state.rng)[0])
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module):
  """`eval_step(params, frozen, batch) -> (summed loss, tokens)`."""

  def eval_step(params, frozen, batch):
    return token_loss(model, params, frozen, batch)

  return eval_step


def orthogonality_metric(params, frozen) -> jax.Array:
  """The largest Frobenius `‖GGᵀ − I‖` over all wrapped layers (cheap enough to log)."""
  return spectrum.max_orthogonality_error({"params": params, **frozen}, norm="fro")


def spectrum_targets(paths: tuple[str, ...], params, frozen, scanned: bool, num_layers: int):
  """`(label, layer path, layer index or None)` for each `train.spectrum_layers` entry, checked against the model.

  A model's blocks are `blocks_<i>/...`, or, scanned, one `nn.scan` stack `blocks/...`.
  In a scanned model `blocks_<i>/rest` reads layer `i` of the stack `blocks/rest`, so
  the configs' default paths work either way; a stack path alone reads its first
  layer. The index is None for a layer that is not part of a stack. The label (what
  the logs call it) is the path as written.

  Raises:
    ValueError: for no paths, or a path that names no wrapped (POET-X) or dense layer
      of the model, listing the ones it has.
  """
  if not paths:
    raise ValueError("train.spectrum_every is set but train.spectrum_layers names no layer; name some, or set spectrum_every=0.")
  is_poet = bool(frozen.get("poet"))
  if is_poet:
    available = {"/".join(path) for path, _ in tree_paths.poet_layers(frozen["poet"])}
  else:
    available = {"/".join(path) for path in _kernel_paths(params)}
  hint = f" (in this scanned model blocks_<i>/<rest> reads layer i of blocks/<rest>, i < {num_layers})" if scanned else ""
  targets = []
  for label in paths:
    head, _, rest = label.partition("/")
    match = _BLOCK.fullmatch(head)
    if scanned and match and rest:
      path, index = f"blocks/{rest}", int(match.group(1))
      if index >= num_layers:
        raise ValueError(f"train.spectrum_layers names {label!r}, but the model has {num_layers} blocks: use blocks_0 … blocks_{num_layers - 1}.")
    else:
      path = label
      index = 0 if scanned and head == "blocks" else None
    if path not in available:
      raise ValueError(
          f"train.spectrum_layers names {label!r}, which is no {'POET-X' if is_poet else 'dense'} layer of this"
          f" model; set it to some of: {', '.join(sorted(available))}{hint}."
      )
    targets.append((label, path, index))
  return tuple(targets)


_BLOCK = re.compile(r"blocks_(0|[1-9]\d*)")


def _kernel_paths(params, prefix=()):
  """Paths of every dict holding a `kernel` of two or more axes (dense layers, stacked or not)."""
  if not hasattr(params, "keys"):
    return
  if "kernel" in params and len(getattr(tree_paths.unboxed(params["kernel"]), "shape", ())) >= 2:
    yield prefix
  for name in sorted(params):
    if name != "kernel":
      yield from _kernel_paths(params[name], prefix + (str(name),))


def _layer_of(tree, index):
  """`tree` (a layer's arrays), or layer `index` of a stack of them."""
  if index is None:
    return tree
  return jax.tree.map(lambda x: tree_paths.unboxed(x)[index], tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def largest_singular_values(params, frozen, targets) -> dict[str, jax.Array]:
  """σ_max of the (effective, for POET-X) kernels `spectrum_targets` names: the spectrum the method holds fixed.

  Only the layer asked for is computed, not the rest of its stack.
  """
  out = {}
  for label, path, index in targets:
    keys = tuple(path.split("/"))
    if frozen.get("poet"):
      state = _layer_of(tree_paths.get_path(frozen["poet"], keys), index)
      kernel = merging.flat_effective_kernel(state, _layer_of(tree_paths.get_path(params, keys), index))
    else:
      kernel = _layer_of(tree_paths.get_path(params, keys), index)["kernel"]
    out[label] = jnp.linalg.svd(tree_paths.unboxed(kernel).astype(jnp.float32), compute_uv=False)[0]
  return out
