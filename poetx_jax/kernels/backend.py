"""The Pallas implementation of the layer's primitives (see `poetx_jax.backends`).

The Cayley–Neumann kernel fuses POET-X's map, `k = 3`; other `k` (and the exact
map) have no kernel and run the XLA map, which this module states rather than hides.
"""

from __future__ import annotations

import functools

from poetx_jax import backends
from poetx_jax.kernels import block_rotation, rotate_outer_sum
from poetx_jax.kernels import cayley_neumann as cayley_kernel


def _cayley_forward(q_RxE, block_size, neumann_terms, precision, operand_dtype, out_dtype, keep_state=False, *, interpret):
  if neumann_terms != 3:
    # Only POET-X's k = 3 has a fused kernel (`backends.resolve` already refused block
    # sizes the kernels do not cover).
    return backends.xla_cayley_forward(q_RxE, block_size, neumann_terms, precision, operand_dtype, out_dtype)
  out = cayley_kernel.cayley_neumann_forward(
      q_RxE, block_size, operand_dtype=operand_dtype, out_dtype=out_dtype, precision=precision, interpret=interpret,
      keep_state=keep_state,
  )
  return out if keep_state else (out, None)


def _cayley_backward(
    q_RxE, dg_RxBxB, block_size, neumann_terms, precision, operand_dtype, state=None, dg_operand=None, *, interpret
):
  if neumann_terms != 3:
    return backends.xla_cayley_backward(q_RxE, dg_RxBxB, block_size, neumann_terms, precision, operand_dtype)
  return cayley_kernel.cayley_neumann_backward(
      q_RxE, dg_RxBxB, block_size, operand_dtype=operand_dtype, precision=precision, interpret=interpret, state=state,
      dg_operand=dg_operand,
  )


def _rotate_outer_sum_into(
    into, s_DxN, gather_s, a_DxN, gather_a, g_RxBxB, block_offset, out_perm=None, out_perm_inv=None, copy_into=None,
    *, interpret,
):
  del out_perm  # the kernel scatters by the inverse
  return rotate_outer_sum.rotate_outer_sum_into(
      into, s_DxN, gather_s, a_DxN, gather_a, g_RxBxB, out_perm_inv, block_offset, interpret=interpret,
      copy_into=copy_into,
  )


def make_backend(interpret: bool) -> backends.Backend:
  """The Pallas backend, compiled for the GPU or run by the Pallas interpreter."""
  return backends.Backend(
      name="pallas_interpret" if interpret else "pallas",
      cayley_forward=functools.partial(_cayley_forward, interpret=interpret),
      cayley_backward=functools.partial(_cayley_backward, interpret=interpret),
      gather_rotate=functools.partial(block_rotation.gather_rotate, interpret=interpret),
      rotate_gather=functools.partial(block_rotation.rotate_gather, interpret=interpret),
      rotate_outer_sum_into=functools.partial(_rotate_outer_sum_into, interpret=interpret),
  )
