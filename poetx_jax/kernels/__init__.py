"""Pallas (Triton backend) kernels of POET-X, each beside its plain-jnp reference.

* `cayley_neumann`: packed skew generators -> `B x B` blocks, forward and backward fused;
* `block_rotation`: row gather + block rotation, and block rotation + row scatter;
* `block_outer_sum`: the blocks' cotangents `Σ_n a_r g_rᵀ`, with fused row gathers;
* `rotate_outer_sum`: one side of the layer's backward, a rotation and those cotangents
  in one pass over their shared operand (the two kernels above run it at b = 512).

All work on feature-major `(D, N)` activations (see `poetx_jax.rotation`).
Backend-specific imports live in `triton_backend.py` only.
"""
