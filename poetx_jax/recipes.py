"""The optimizers a run can choose, on the same model and data (a fair comparison).

* `poetx`: the model's dense layers wrapped by POET-X, trained by `poetx_jax.optimizer`;
* `adamw`: plain optax AdamW on the unwrapped model (decay on matrices only);
* `muon`: `optax.contrib.muon` on the hidden matrices, Adam on the rest;
* `galore`: `optax.contrib.galore` (Adam in a low-rank projection of each hidden
  matrix's gradient, plain Adam elsewhere), the memory baseline of the POET-X paper.

All share the warmup-cosine schedule and one global-norm clip, and store Adam's
first moment in `optimizer.mu_dtype` where set.
"""

from __future__ import annotations

import jax
import optax

from poetx_jax import optim, schedules
from poetx_jax.config import POETConfig
from poetx_jax.train_config import OptimizerConfig


def _schedule(peak: float, config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  return schedules.warmup_cosine(
      peak, warmup_steps=config.warmup_steps, total_steps=total_steps, min_ratio=config.min_lr_ratio
  )


def _is_matrix_mask(params):
  """Weight decay on matrices only (the same groups as POET-X's "matrix")."""
  return jax.tree_util.tree_map(lambda label: label == optim.MATRIX, optim.param_labels(params))


def _names(path) -> list[str]:
  return [str(getattr(p, "key", p)) for p in path]


def _is_hidden_kernel(path) -> bool:
  """A blocks' dense kernel: what Muon and GaLore treat as a matrix (not the embedding, not the head)."""
  names = _names(path)
  return names[-1] == "kernel" and "embed" not in names and "lm_head" not in names


def _muon_dimensions(params):
  """Muon acts on the blocks' kernels (`(d_in, d_out)`, or stacked `(L, d_in, d_out)` under
  nn.scan); embeddings, the head and vectors use Adam."""

  def dims(path, leaf):
    if not _is_hidden_kernel(path):
      return None
    return optax.contrib.MuonDimensionNumbers(reduction_axis=(leaf.ndim - 2,), output_axis=(leaf.ndim - 1,))

  return jax.tree_util.tree_map_with_path(dims, params)


def _galore_dimensions(params):
  """GaLore projects the blocks' `(d_in, d_out)` kernels; embeddings, the head and vectors get plain Adam.

  optax's GaLore projects 2-D matrices only: a kernel stacked by nn.scan (`(L, d_in,
  d_out)`) would be projected as one matrix across layers, so it is refused.
  """

  def dims(path, leaf):
    if not _is_hidden_kernel(path):
      return None
    if leaf.ndim != 2:
      raise ValueError(
          f"optimizer.name='galore' projects 2-D kernels, but {'/'.join(_names(path))} has shape {leaf.shape}"
          " (layers stacked by nn.scan): set model.scan_layers=False."
      )
    return optax.contrib.GaLoreDimensionNumbers(reduction_axis=0, output_axis=1)

  return jax.tree_util.tree_map_with_path(dims, params)


def make_optimizer(config: OptimizerConfig, poet: POETConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The run's optax transformation and its base learning-rate schedule (for logging)."""
  lr = _schedule(config.lr, config, total_steps)
  if config.name == "poetx":
    poet_lr = _schedule(config.poet_lr, config, total_steps)
    tx = optim.optimizer(
        poet,
        learning_rate=lr,
        poet_learning_rate=poet_lr,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        mu_dtype=config.mu_dtype,
    )
    return tx, lr
  if config.name == "adamw":
    inner = optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                        mask=_is_matrix_mask, mu_dtype=config.mu_dtype)
  elif config.name == "muon":
    inner = optax.contrib.muon(
        lr,
        weight_decay=config.weight_decay,
        adam_b1=config.b1,
        adam_b2=config.b2,
        adam_weight_decay=config.weight_decay,
        muon_weight_dimension_numbers=_muon_dimensions,
        mu_dtype=config.mu_dtype,
    )
  elif config.name == "galore":
    inner = optax.contrib.galore(
        lr,
        rank=config.galore_rank,
        update_proj_gap=config.galore_update_proj_gap,
        base_optimizer=optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps, mu_dtype=config.mu_dtype),
        weight_decay=config.weight_decay,
        mask=_is_matrix_mask,
        weight_dimension_numbers=_galore_dimensions,
    )
  else:  # OptimizerConfig validates the name; this guards a new name without a recipe.
    raise ValueError(f"no recipe for optimizer {config.name!r}.")
  if config.clip_norm is None:
    return inner, lr
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), inner), lr
