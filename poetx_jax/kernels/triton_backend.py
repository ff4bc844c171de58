"""Everything specific to Pallas' Triton backend, in one place.

A Mosaic GPU version of the kernels would replace this module's `pallas_call`,
`load` and `store`. JAX 0.11 marks the Triton backend deprecated and warns on
every lowering; that warning is silenced here, deliberately, and only here.
"""

from __future__ import annotations

import warnings

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)

load = plgpu.load
store = plgpu.store
program_id = pl.program_id
cdiv = pl.cdiv


def pallas_call(
    kernel, *, grid, out_shape, name: str, interpret: bool, num_warps: int = 4, num_stages: int = 2,
    input_output_aliases=None,
):
  """`pl.pallas_call` with explicit Triton compiler params (jax 0.10 picks Mosaic GPU without them)."""
  return pl.pallas_call(
      kernel,
      grid=grid,
      out_shape=out_shape,
      interpret=interpret,
      name=name,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      input_output_aliases=input_output_aliases or {},
  )


def lower_for_h100(fn, *args):
  """Lowers `fn(*args)` to StableHLO with Triton IR for an abstract H100, on any host.

  Catches lowering errors (block shapes, dtypes, indexing) without a GPU.
  """
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  device = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(
        jax.jit(fn),
        platforms=["cuda"],
        # Triton kernels, and the layout constraint of a train step's merge: lowered to be
        # read, never serialized.
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)
                         for target in ("__gpu$xla.gpu.triton", "LayoutConstraint")],
    )(*args)
  return exported.mlir_module()


def dot(a, b, precision=None):
  """`a @ b` accumulated in float32 (TF32 for float32 inputs unless precision is HIGHEST)."""
  return jax.lax.dot(a, b, precision=precision, preferred_element_type=jax.numpy.float32)


