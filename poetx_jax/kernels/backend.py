"""The Pallas implementation of the layer's primitives (see `poetx_jax.backends`).

The Cayley–Neumann kernel fuses POET-X's map, `k = 3`; other `k` (and the exact
map) have no kernel and run the XLA map, which this module states rather than hides.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from poetx_jax import backends, cayley
from poetx_jax.kernels import block_outer_sum, block_rotation
from poetx_jax.kernels import cayley_neumann as cayley_kernel


def _cayley_neumann(q_RxE, block_size, neumann_terms=3, precision=None, operand_dtype=jnp.float32, *, interpret):
  if neumann_terms != 3 or q_RxE.ndim != 2:
    # Only POET-X's k = 3 has a fused kernel (`backends.resolve` already refused block
    # sizes the kernels do not cover).
    return cayley.cayley_neumann(q_RxE, block_size, neumann_terms, precision)
  return cayley_kernel.cayley_neumann(
      q_RxE, block_size, operand_dtype=operand_dtype, precision=precision, interpret=interpret
  )


def _outer_sum(a, perm_a, g, perm_g, block_size, *, interpret):
  return block_outer_sum.block_outer_sum(a, perm_a, g, perm_g, block_size, interpret=interpret)


def make_backend(interpret: bool) -> backends.Backend:
  """The Pallas backend, compiled for the GPU or run by the Pallas interpreter."""
  return backends.Backend(
      name="pallas_interpret" if interpret else "pallas",
      cayley_neumann=functools.partial(_cayley_neumann, interpret=interpret),
      gather_rotate=functools.partial(block_rotation.gather_rotate, interpret=interpret),
      rotate_gather=functools.partial(block_rotation.rotate_gather, interpret=interpret),
      gathered_block_outer_sum=functools.partial(_outer_sum, interpret=interpret),
  )
