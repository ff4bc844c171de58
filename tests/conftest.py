"""Test set-up: 8 fake CPU devices (must precede the first jax import) and helpers."""

import os
import zlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Tests of partitioning run on the 8 fake CPU devices above. On a GPU host the default
# backend has its own device count (one H100 here), so they skip there, saying why.
needs_8_devices = pytest.mark.skipif(
    len(jax.devices()) < 8, reason=f"needs 8 devices of the default backend, {jax.default_backend()} has {len(jax.devices())}"
)


@pytest.fixture
def rng(request):
  """A numpy generator seeded from the test's id, so a failure reproduces; the seed is printed
  (pytest shows a failing test's output)."""
  seed = zlib.crc32(request.node.nodeid.encode())
  print(f"rng seed {seed} for {request.node.nodeid}")
  return np.random.default_rng(seed)


def relative_error(actual, expected) -> float:
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


import flax.linen as nn  # noqa: E402


class SmallModel(nn.Module):
  """Dense and DenseGeneral layers (multi-axis in and out, one biased) and a head."""

  width: int = 16
  classes: int = 8
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width, use_bias=True, param_dtype=self.param_dtype, name="embed_proj")(x)
    x = jnp.tanh(x)
    x = nn.DenseGeneral((2, self.width // 2), use_bias=False, param_dtype=self.param_dtype, name="split")(x)
    x = jnp.tanh(x)
    x = nn.DenseGeneral(self.width, axis=(-2, -1), use_bias=False, param_dtype=self.param_dtype, name="join")(x)
    x = x + nn.Dense(self.width, use_bias=False, param_dtype=self.param_dtype, name="mlp")(jnp.tanh(x))
    return nn.Dense(self.classes, name="head")(x)


import jax.numpy as jnp  # noqa: E402
