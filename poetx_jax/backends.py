"""Implementations of the layer's primitives, chosen by `implementation` (DESIGN §2).

A backend bundles the Cayley–Neumann map (forward and backward apart, with the
state the forward may keep for the backward) and the data-path primitives of
`rotation.py`: the forward's two rotations and the backward's fused sides. `"xla"` is plain jnp and runs anywhere; `"pallas"` is the Triton
kernels of `poetx_jax.kernels` (GPU, or interpreted on any backend); None picks
by measurement on the H100 (bf16, N = 2048; benchmarks/results/layer_h100.json):
Pallas on a GPU wherever its kernels apply (power-of-two blocks of 16 or more),
since it beat XLA at every measured shape and block size: fwd+bwd 1.15 against
1.87 ms at 4096x14336, b = 256; 1.48 against 2.80 ms at b = 512; 0.37 against
0.68 ms at 2048x5632 (run 28); and a whole llama60m train step with widths 512 and
1280, 22.7 against 23.9 ms (benchmarks/results/raw/run15_train_steps.txt). XLA elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from poetx_jax import cayley, rotation
from poetx_jax.kernels import block_sizes  # tile rules only: no Pallas import

IMPLEMENTATIONS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class Backend:
  """The primitives one implementation supplies (hashable: a static argument).

  None of them is differentiated: the layer (`ops.py`) writes its own VJP from them.
  """

  name: str
  # (q_RxE, block_size, neumann_terms, precision, operand_dtype, out_dtype, keep_state)
  #   -> (G (R, B, B) in out_dtype, state): state, arrays or None, saves the backward work
  cayley_forward: Callable[..., tuple]
  # (q_RxE, dG_RxBxB float32, block_size, neumann_terms, precision, operand_dtype, state, dg_operand)
  #   -> dq (R, E) float32; dg_operand: dG already in operand_dtype, or None
  cayley_backward: Callable[..., jax.Array]
  gather_rotate: Callable[..., jax.Array]  # rotation.gather_rotate
  rotate_gather: Callable[..., jax.Array]  # rotation.rotate_gather
  rotate_outer_sum_into: Callable[..., tuple]  # rotation.rotate_outer_sum_into


def xla_cayley_forward(q_RxE, block_size, neumann_terms, precision, operand_dtype, out_dtype, keep_state=False):
  """The XLA map ignores `operand_dtype`: it is the reference and multiplies in float32.
  It keeps no state: its backward is autodiff's, which recomputes what it needs."""
  del operand_dtype, keep_state
  return cayley.cayley_neumann(q_RxE, block_size, neumann_terms, precision).astype(out_dtype), None


def xla_cayley_backward(q_RxE, dg_RxBxB, block_size, neumann_terms, precision, operand_dtype, state=None, dg_operand=None):
  del operand_dtype, state, dg_operand
  _, vjp = jax.vjp(lambda q: cayley.cayley_neumann(q, block_size, neumann_terms, precision), q_RxE)
  return vjp(dg_RxBxB.astype(jnp.float32))[0]


XLA = Backend(
    name="xla",
    cayley_forward=xla_cayley_forward,
    cayley_backward=xla_cayley_backward,
    gather_rotate=rotation.gather_rotate,
    rotate_gather=rotation.rotate_gather,
    rotate_outer_sum_into=rotation.rotate_outer_sum_into,
)


def _on_gpu() -> bool:
  """The default backend is a GPU, or we are lowering for an abstract GPU (AOT, or lowering tests)."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return jax.default_backend() == "gpu" or getattr(device, "platform", None) == "gpu"


@functools.lru_cache(maxsize=None)
def _pallas_backend(interpret: bool) -> Backend:
  try:
    from poetx_jax.kernels import backend as pallas_backend  # pylint: disable=g-import-not-at-top
  except ImportError as err:  # pragma: no cover - depends on the installed jax
    raise RuntimeError(f"implementation='pallas' needs jax.experimental.pallas with its Triton backend: {err}") from err
  return pallas_backend.make_backend(interpret=interpret)


def resolve(implementation: str | None, *, interpret: bool = False, block_size: int | None = None) -> Backend:
  """The backend for an `implementation` setting.

  Args:
    implementation: "xla", "pallas" or None (Pallas on a GPU where its kernels apply,
      XLA otherwise; see the module docstring).
    interpret: run the Pallas kernels in the Pallas interpreter (any backend, slow).
    block_size: the layer's block size, which the Pallas kernels must cover.

  Raises:
    ValueError: for an unknown implementation, "pallas" off-GPU without `interpret`,
      or "pallas" with a block size its kernels do not cover.
  """
  covered = block_size is None or block_sizes.covers(block_size)
  if implementation is None:
    implementation = "pallas" if covered and (interpret or _on_gpu()) else "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}.")
  if implementation == "xla":
    return XLA
  if not covered:
    raise ValueError(
        f"the Pallas kernels need a power-of-two block_size of at least 16, got {block_size};"
        " change block_size or use implementation='xla'."
    )
  if not interpret and not _on_gpu():
    raise ValueError(
        f"implementation='pallas' compiles Triton kernels for a GPU, but JAX's backend is"
        f" {jax.default_backend()!r}; set interpret=True (pallas_interpret in POETConfig) to"
        " run the kernels in the Pallas interpreter, or use implementation='xla'."
    )
  return _pallas_backend(interpret)
