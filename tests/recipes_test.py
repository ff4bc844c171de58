"""The optimizers a run can choose: the choices that are refused say what to change."""

import jax
import jax.numpy as jnp
import pytest

from poetx_jax import recipes, train_config
from poetx_jax.config import POETConfig


def _params(stacked: bool):
  kernel = jnp.zeros((2, 8, 8) if stacked else (8, 8))
  return {"embed": {"embedding": jnp.zeros((16, 8))}, "blocks": {"mlp": {"up_proj": {"kernel": kernel}}},
          "lm_head": {"kernel": jnp.zeros((8, 16))}}


def test_galore_projects_unstacked_kernels_and_refuses_a_scanned_stack():
  config = train_config.OptimizerConfig(name="galore", galore_rank=4)
  tx, _ = recipes.make_optimizer(config, POETConfig(), total_steps=1000)
  params = _params(stacked=False)
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), tx.init(params), params)
  assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)
  with pytest.raises(ValueError, match="blocks/mlp/up_proj/kernel has shape .*set model.scan_layers=False"):
    tx.init(_params(stacked=True))
