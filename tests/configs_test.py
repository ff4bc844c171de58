"""Every shipped config builds, and its train and eval steps trace, at full size.

Tracing is abstract (no arrays, no compile), so the 8B and 13B steps check in seconds;
this is what catches a config whose dtypes or shapes the step cannot take (the bfloat16
configs once failed in the optimizer's clip) before a GPU run does.
"""

import glob
import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from poetx_jax import train_config, trainer

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIGS = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")) if not os.path.basename(p).startswith("_")
)


def test_every_config_is_listed():
  assert {"base", "tiny", "llama60m", "llama1b", "llama8b", "llama13b"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_steps_trace(name):
  _trace(importlib.import_module(f"configs.{name}").get_config())


@pytest.mark.parametrize("name", ["llama60m", "llama8b"])
def test_config_steps_trace_through_the_pallas_kernels(name):
  # The path a GPU run takes (on the CPU the layer would otherwise pick XLA).
  raw = importlib.import_module(f"configs.{name}").get_config()
  raw.poet.pallas_interpret = True
  _trace(raw)


def _trace(raw):
  config = train_config.from_config_dict(raw, vocab_size=32000)
  run = trainer.build(config)
  state = jax.eval_shape(run.init_fn)
  rows, seq_len = config.train.global_batch_size, config.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32) for k in ("inputs", "targets", "weights")}
  new_state, metrics = jax.eval_shape(run.train_step, state, batch)
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
  for before, after in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(new_state)):
    assert (before.shape, before.dtype) == (after.shape, after.dtype)
  assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
  loss_sum, tokens = jax.eval_shape(run.eval_step, state.params, state.frozen, batch)
  assert loss_sum.shape == tokens.shape == ()
