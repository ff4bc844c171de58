"""poetx_jax: POET-X — LLM training by orthogonal equivalence transformation, in JAX.

Every wrapped dense kernel is `K_eff = P · K0 · R` with `K0` frozen and `P`, `R`
block-orthogonal (Cayley–Neumann), folded into `K0` every `merge_interval` steps.

Dimension letters in variable names (`x_NI`, `q_RxE`, `g_RxBxB`):
  N  tokens (all leading axes flattened)      I  input features  (d_in)
  O  output features (d_out)                  D  features of either side
  B  block size                               R  blocks on one side (D / B)
  E  packed entries of a skew block, B(B-1)/2
"""

from poetx_jax.cayley import cayley_neumann, cayley_neumann_reference, orthogonality_error
from poetx_jax.config import POETConfig
from poetx_jax.layers import POET_COLLECTION
from poetx_jax.merging import effective_params, merge, merge_if_needed, should_merge
from poetx_jax.ops import effective_kernel, poet_linear, poet_linear_reference
from poetx_jax.optim import optimizer, param_labels, reset_orthogonal_state
from poetx_jax.spectrum import max_orthogonality_error, orthogonality_errors, singular_values, spectrum_drift
from poetx_jax.wrapping import POETWrapped, wrap

__all__ = [
    "POETConfig",
    "POETWrapped",
    "POET_COLLECTION",
    "cayley_neumann",
    "cayley_neumann_reference",
    "effective_kernel",
    "effective_params",
    "max_orthogonality_error",
    "merge",
    "merge_if_needed",
    "optimizer",
    "orthogonality_error",
    "orthogonality_errors",
    "param_labels",
    "poet_linear",
    "poet_linear_reference",
    "reset_orthogonal_state",
    "should_merge",
    "singular_values",
    "spectrum_drift",
    "wrap",
]
