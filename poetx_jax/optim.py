"""POET-X's optimizer as an optax transformation (SPEC §8), and its merge reset.

Three AdamW groups (b1 0.9, b2 0.999, eps 1e-6 added to `sqrt(v_hat)`), chosen by
one path labeller:

* `orthogonal`: the packed generators `q_in`, `q_out` at `poet_lr × poet_lr_scale`,
  no weight decay; their moments and Adam step count are reset at every merge;
* `matrix`: every other parameter with `ndim >= 2` (embeddings, head, unwrapped
  layers) at the base rate with weight decay;
* `vector`: norms and biases at the base rate without decay.

One global-norm clip over all gradients comes first; after each merge it ramps
from 0.1× to 1× over `clip_ramp_steps` updates.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from poetx_jax import layers
from poetx_jax.config import POETConfig

ORTHOGONAL = "orthogonal"
MATRIX = "matrix"
VECTOR = "vector"

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


# Parameters that are vectors per layer, whatever their rank (nn.scan stacks them to 2-D).
VECTOR_NAMES = ("bias", "scale")


def param_labels(params: Any) -> Any:
  """The group of every parameter: "orthogonal", "matrix" or "vector"."""

  def label(path, leaf):
    name = _leaf_name(path)
    if name in layers.ORTHOGONAL_PARAMS:
      return ORTHOGONAL
    return VECTOR if name in VECTOR_NAMES or jnp.ndim(leaf) < 2 else MATRIX

  return jax.tree_util.tree_map_with_path(label, params)


def _scaled(rate: ScalarOrSchedule, scale: float) -> ScalarOrSchedule:
  if callable(rate):
    return lambda count: rate(count) * scale
  return rate * scale


def clip_threshold_schedule(clip_norm: float, config: POETConfig) -> Callable[[jax.Array], jax.Array]:
  """The clip threshold at update `count` (0-based): ramped for a few updates after each merge.

  `clip × (0.1 + 0.9·c / ramp_steps)` with `c = count mod merge_interval`, when a merge
  happened just before (`count >= merge_interval`), `c < ramp_steps`, and
  `count < clip_ramp_until` (if set); `clip` otherwise.
  """

  def threshold(count):
    cycle = count % config.merge_interval
    ramp = config.clip_ramp_steps
    active = (count >= config.merge_interval) & (cycle < ramp)
    if config.clip_ramp_until is not None:
      active &= count < config.clip_ramp_until
    factor = jnp.where(active, 0.1 + 0.9 * cycle / max(ramp, 1), 1.0)
    return jnp.asarray(clip_norm, jnp.float32) * factor

  return threshold


def optimizer(
    config: POETConfig,
    learning_rate: ScalarOrSchedule,
    poet_learning_rate: ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype=None,
) -> optax.GradientTransformation:
  """POETAdamW: the optax transformation POET-X trains with (SPEC §8).

  Args:
    config: the `POETConfig` (merge interval, lr scale, clip ramp).
    learning_rate: base rate (float or optax schedule) of every non-orthogonal parameter.
    poet_learning_rate: rate of the orthogonal parameters before `config.poet_lr_scale`.
    weight_decay: decoupled decay of the `matrix` group only.
    clip_norm: global-norm clip over all gradients; None disables clipping.
    b1, b2, eps: Adam's constants (eps is added to `sqrt(v_hat)`).
    mu_dtype: storage dtype of Adam's first moment (None: each parameter's own
      dtype, as the second moment always is).

  Returns:
    An `optax.GradientTransformation`; give it `variables["params"]` only.
  """

  def adamw(rate, decay):
    return optax.adamw(rate, b1=b1, b2=b2, eps=eps, weight_decay=decay, mu_dtype=mu_dtype)

  groups = optax.multi_transform(
      {
          ORTHOGONAL: adamw(_scaled(poet_learning_rate, config.poet_lr_scale), 0.0),
          MATRIX: adamw(learning_rate, weight_decay),
          VECTOR: adamw(learning_rate, 0.0),
      },
      param_labels,
  )
  if clip_norm is None:
    return groups
  if not clip_norm > 0:
    raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm!r}.")
  return optax.chain(clip_by_scheduled_global_norm(clip_threshold_schedule(clip_norm, config)), groups)


class ScheduledClipState(NamedTuple):
  """The clip's update count, which its threshold schedule reads (merges leave it running)."""

  count: jax.Array


def clip_by_scheduled_global_norm(threshold: Callable[[jax.Array], jax.Array]) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` with its threshold read from a schedule at the update count.

  Not `optax.inject_hyperparams(optax.clip_by_global_norm)`: that multiplies every leaf
  by the float32 threshold array, so a bfloat16 gradient (a model with
  `param_dtype="bfloat16"`) comes back float32 and optax's select fails. Here each leaf
  is scaled in its own dtype, and left exactly as it is while the norm is within the
  threshold.
  """

  def init(params):
    del params
    return ScheduledClipState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    limit = threshold(state.count)
    scale = jnp.where(norm < limit, 1.0, limit / norm)
    clipped = jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), updates)
    return clipped, ScheduledClipState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def zeroed(tree: Any, where: jax.Array | bool | None = None) -> Any:
  """`tree` with every leaf zero, or, given a scalar `where`, zero only where it is true.

  The select form lets a jitted step reset state without a `lax.cond` (whose untaken
  branch would copy every array it passes through); XLA fuses it into the elementwise
  update that writes the array anyway.
  """
  if where is None:
    return jax.tree_util.tree_map(jnp.zeros_like, tree)
  return jax.tree_util.tree_map(lambda x: jnp.where(where, jnp.zeros_like(x), x), tree)


def _zero_adam(state: Any, where=None) -> Any:
  def reset(node):
    if isinstance(node, optax.ScaleByAdamState):
      return optax.ScaleByAdamState(
          count=zeroed(node.count, where), mu=zeroed(node.mu, where), nu=zeroed(node.nu, where)
      )
    return node

  return jax.tree_util.tree_map(reset, state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))


def reset_orthogonal_state(opt_state: Any, where: jax.Array | bool | None = None) -> Any:
  """Zeroes Adam's moments and step count of the `orthogonal` group only (SPEC §6.4).

  The learning-rate schedules (their own counters), the clip counter and every
  other group's state go on. `where`: a scalar bool; reset only when it is true
  (selected elementwise, see `zeroed`), None to reset.

  Raises:
    ValueError: if `opt_state` holds no state of `poetx_jax.optimizer`.
  """
  found = []

  def reset(node):
    if isinstance(node, optax.MultiTransformState) and ORTHOGONAL in node.inner_states:
      found.append(True)
      inner = dict(node.inner_states)
      inner[ORTHOGONAL] = _zero_adam(inner[ORTHOGONAL], where)
      return node._replace(inner_states=inner)
    return node

  new_state = jax.tree_util.tree_map(reset, opt_state, is_leaf=lambda n: isinstance(n, optax.MultiTransformState))
  if not found:
    raise ValueError(
        "the optimizer state holds no 'orthogonal' group: build the optimizer with"
        " poetx_jax.optimizer so that merges can reset the orthogonal parameters' moments."
    )
  return new_state
