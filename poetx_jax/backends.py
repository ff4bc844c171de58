"""Implementations of the layer's primitives, chosen by `implementation` (DESIGN §2).

A backend bundles the Cayley–Neumann map and the three data-path primitives of
`rotation.py`. `"xla"` is plain jnp and runs anywhere; `"pallas"` is the Triton
kernels of `poetx_jax.kernels` (GPU, or interpreted on any backend); None picks
by measurement on the H100 (bf16): Pallas on a GPU for blocks up to 256 on layers at
least 4096 wide on both sides, where its fused gathers beat XLA (fast variant 1.62 vs
1.89 ms at 4096x14336, 0.76 vs 0.87 ms at 4096x4096, N = 2048;
benchmarks/results/layer_h100.json); XLA otherwise: for larger blocks (2.82 vs 2.57 ms
at b = 512), for narrow layers (a llama60m train step, widths 512 and 1280: 48.1 vs
38.3 ms; benchmarks/results/raw/run8_compile_time.txt) and off-GPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax

from poetx_jax import cayley, rotation

IMPLEMENTATIONS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class Backend:
  """The primitives one implementation supplies (hashable: a static argument)."""

  name: str
  cayley_neumann: Callable[..., jax.Array]
  gather_rotate: Callable[..., jax.Array]
  rotate_gather: Callable[..., jax.Array]
  gathered_block_outer_sum: Callable[..., jax.Array]


def _xla_cayley_neumann(q_RxE, block_size, neumann_terms=3, precision=None, operand_dtype=None):
  """The XLA map ignores `operand_dtype`: it is the reference and multiplies in float32."""
  del operand_dtype
  return cayley.cayley_neumann(q_RxE, block_size, neumann_terms, precision)


XLA = Backend(
    name="xla",
    cayley_neumann=_xla_cayley_neumann,
    gather_rotate=rotation.gather_rotate,
    rotate_gather=rotation.rotate_gather,
    gathered_block_outer_sum=rotation.gathered_block_outer_sum,
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


# Where None picks Pallas on a GPU (see the module docstring): blocks up to this size ...
PALLAS_MAX_AUTO_BLOCK = 256
# ... on layers whose narrower side has at least this many features.
PALLAS_MIN_AUTO_FEATURES = 4096


def resolve(
    implementation: str | None, *, interpret: bool = False, block_size: int | None = None, features: int | None = None
) -> Backend:
  """The backend for an `implementation` setting.

  Args:
    implementation: "xla", "pallas" or None (by measurement: Pallas on a GPU for
      blocks up to 256 on layers at least 4096 wide, XLA otherwise).
    interpret: run the Pallas kernels in the Pallas interpreter (any backend, slow).
    block_size: the layer's block size, for the choice None makes.
    features: the narrower of the layer's two widths, for the choice None makes.

  Raises:
    ValueError: for an unknown implementation, or "pallas" off-GPU without `interpret`.
  """
  if implementation is None:
    fits = (block_size is None or block_size <= PALLAS_MAX_AUTO_BLOCK) and (
        features is None or features >= PALLAS_MIN_AUTO_FEATURES
    )
    implementation = "pallas" if interpret or (_on_gpu() and fits) else "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}.")
  if implementation == "xla":
    return XLA
  if not interpret and not _on_gpu():
    raise ValueError(
        f"implementation='pallas' compiles Triton kernels for a GPU, but JAX's backend is"
        f" {jax.default_backend()!r}; set interpret=True (pallas_interpret in POETConfig) to"
        " run the kernels in the Pallas interpreter, or use implementation='xla'."
    )
  return _pallas_backend(interpret)
