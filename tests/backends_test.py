"""`implementation` resolution: what None picks where, and the errors for what cannot run."""

import jax
import pytest

from poetx_jax import backends


def _abstract_gpu_mesh():
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  device = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU default")
def test_none_is_xla_off_gpu():
  assert backends.resolve(None, block_size=256).name == "xla"


@pytest.mark.parametrize("block_size,expected", [(16, "pallas"), (256, "pallas"), (512, "pallas"), (8, "xla"), (24, "xla"), (96, "xla")])
def test_none_on_a_gpu_picks_pallas_where_its_kernels_apply(block_size, expected):
  with _abstract_gpu_mesh():
    assert backends.resolve(None, block_size=block_size).name == expected


def test_none_with_interpret_runs_the_kernels_interpreted():
  assert backends.resolve(None, interpret=True, block_size=64).name == "pallas_interpret"


@pytest.mark.parametrize("block_size", [8, 24, 96])
def test_pallas_with_an_uncovered_block_size_says_what_to_change(block_size):
  with pytest.raises(ValueError, match="power-of-two block_size of at least 16.*implementation='xla'"):
    backends.resolve("pallas", interpret=True, block_size=block_size)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error")
def test_compiled_pallas_off_gpu_says_to_interpret():
  with pytest.raises(ValueError, match="interpret=True"):
    backends.resolve("pallas", block_size=64)


def test_unknown_implementation():
  with pytest.raises(ValueError, match="implementation must be one of"):
    backends.resolve("cuda", block_size=64)
