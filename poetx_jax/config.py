"""`POETConfig`: every setting of the reparameterization, validated once."""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from poetx_jax import backends, base_storage, ops


@dataclasses.dataclass(frozen=True)
class POETConfig:
  """What `wrap`, `optimizer` and `merge` need to know (SPEC §1–§8).

  Attributes:
    block_size: `B`, the side of each orthogonal block; must divide every wrapped
      layer's `d_in` and `d_out`.
    merge_interval: `T`, optimizer steps between merges (200 in POET-X, 400 in POET).
    neumann_terms: `k` of the Cayley–Neumann map (3 in POET-X); None for the exact
      Cayley map (a batched solve: exactly orthogonal, slower).
    variant: "fast" (keep the hidden state for the backward) or "mem" (recompute it:
      one more large GEMM per layer, less activation memory). Mem is for models run
      without remat: under `jax.checkpoint` / `nn.remat` the backward already
      recomputes `h` (or saves it, as a dot's output, under a dots policy), and mem
      computes it once more for nothing (H100, four 4096-wide layers, full remat:
      Pallas path same memory, 9.20 against 7.39 ms; XLA path 492 against 460 MiB,
      12.25 against 9.77 ms; `python -m benchmarks.mem_variant`). With jax 0.10.2 on
      the XLA path (CPU) mem saved no memory even without remat (see `ops.py`).
    keep_cayley_state: keep the Cayley–Neumann intermediates (`Q`, `Q²`, `Q² − 2Q`,
      Pallas only) for the backward instead of recomputing them with two small
      kernels. Worth it for layers called directly (H100, 4096×14336, b = 256: 187 →
      145 µs of Cayley kernels per layer); under `nn.scan` (the LLaMA configs) each
      kept array is stacked per layer and copied in and out, which costs more
      (llama1b step: see README, "Where a train step's time goes").
    targets: regular expression (`re.search`) over "/"-joined module paths of the
      Dense / DenseGeneral layers to wrap.
    exclude: regular expression of paths never wrapped (the output head by default).
    seed: seed of the permutations; with the merge index and the layer path it keys
      every draw, so replicas merge identically.
    implementation: "xla", "pallas", or None (Pallas on a GPU for power-of-two block
      sizes of 16 or more, where it measured faster at every shape; XLA otherwise).
    pallas_interpret: run the Pallas kernels in the interpreter (tests, CPU).
    batch_axes: mesh axes that split the batch when a step is traced under a mesh;
      each layer then runs on each device's tokens (`shard_map`), on either
      implementation. None: every mesh axis (the trainer's data × fsdp mesh); ()
      leaves the layer to XLA's partitioner, which cannot split a Pallas kernel and,
      on the XLA path, aborted the process (a failed device-group check) in a scanned
      model on a 2-D mesh.
    skip_indivisible: train targeted layers whose dimensions `block_size` does not
      divide as plain dense layers (each one logged) instead of raising.
    init_scale: scale of the base kernel after each output neuron is normalized to
      unit L2 norm ("normalized Gaussian", SPEC §7); None keeps the layer's own
      initializer unnormalized.
    param_dtype: dtype of the orthogonal parameters (and so of their Adam moments,
      unless the optimizer stores its first moment in another).
    base_dtype: storage of the frozen base kernels: None (the wrapped layer's own
      `param_dtype`), "bfloat16", "float32", or "int8" (POET-XQ: uint8 codes with a
      float32 scale and offset per group, dequantized where the layer's GEMMs read
      them, re-quantized at every merge; see `quantization.py`).
    quant_group_size: XQ's group, contiguous input features of one output column
      (of the stored, permuted kernel) sharing a scale and offset; must divide every
      wrapped layer's `d_in`.
    quant_error_feedback: XQ: also store each merge's rounding residual (4 bits per
      weight) and start the next merge from codes plus residual, so rounding errors
      do not accumulate merge after merge (`docs/performance.md`, "POET-XQ").
    poet_lr_scale: the orthogonal parameters train at `poet_learning_rate × this`.
    clip_ramp_steps: after each merge the clip threshold ramps from 0.1× to 1× over
      this many steps (SPEC §8); 0 disables the ramp.
    clip_ramp_until: the ramp applies only while `step < clip_ramp_until`
      (`gd_warmup_steps` of the public code); None means for the whole run.
  """

  block_size: int = 256
  merge_interval: int = 200
  neumann_terms: int | None = 3
  variant: str = "fast"
  keep_cayley_state: bool = False
  targets: str = r".*"
  exclude: str = r"(^|/)(lm_head|head)(/|$)"
  seed: int = 0
  implementation: str | None = None
  pallas_interpret: bool = False
  batch_axes: tuple[str, ...] | None = None
  skip_indivisible: bool = False
  init_scale: float | None = 1.0
  param_dtype: str = "float32"
  base_dtype: str | None = None
  quant_group_size: int = 256
  quant_error_feedback: bool = False
  poet_lr_scale: float = 0.5
  clip_ramp_steps: int = 10
  clip_ramp_until: int | None = None

  def __post_init__(self):
    problems = []
    if not isinstance(self.block_size, int) or self.block_size < 2:
      problems.append(f"block_size must be an int >= 2, got {self.block_size!r}")
    if not isinstance(self.merge_interval, int) or self.merge_interval < 1:
      problems.append(f"merge_interval must be an int >= 1, got {self.merge_interval!r}")
    if self.neumann_terms is not None and (not isinstance(self.neumann_terms, int) or self.neumann_terms < 0):
      problems.append(f"neumann_terms must be an int >= 0 or None (exact Cayley), got {self.neumann_terms!r}")
    if self.variant not in ops.VARIANTS:
      problems.append(f"variant must be one of {ops.VARIANTS}, got {self.variant!r}")
    if not isinstance(self.keep_cayley_state, bool):
      problems.append(f"keep_cayley_state must be True or False, got {self.keep_cayley_state!r}")
    if self.batch_axes is not None and not (
        isinstance(self.batch_axes, tuple) and all(isinstance(a, str) for a in self.batch_axes)
    ):
      problems.append(f"batch_axes must be None or a tuple of mesh axis names, got {self.batch_axes!r}")
    if self.implementation not in backends.IMPLEMENTATIONS + (None,):
      problems.append(f"implementation must be one of {backends.IMPLEMENTATIONS} or None, got {self.implementation!r}")
    for name in ("targets", "exclude"):
      try:
        re.compile(getattr(self, name))
      except re.error as err:
        problems.append(f"{name} is not a valid regular expression ({err})")
    if self.init_scale is not None and not self.init_scale > 0:
      problems.append(f"init_scale must be > 0 or None, got {self.init_scale!r}")
    try:
      if not jnp.issubdtype(jnp.dtype(self.param_dtype), jnp.floating):
        problems.append(f"param_dtype must be a floating dtype (the generators are trained), got {self.param_dtype!r}")
    except TypeError:
      problems.append(f"param_dtype {self.param_dtype!r} is not a dtype name")
    if self.base_dtype is not None and self.base_dtype not in base_storage.BASE_DTYPES:
      problems.append(f"base_dtype must be None or one of {base_storage.BASE_DTYPES}, got {self.base_dtype!r}")
    if not isinstance(self.quant_group_size, int) or self.quant_group_size < 2 or self.quant_group_size % 2:
      problems.append(f"quant_group_size must be an even int >= 2, got {self.quant_group_size!r}")
    if not isinstance(self.quant_error_feedback, bool):
      problems.append(f"quant_error_feedback must be True or False, got {self.quant_error_feedback!r}")
    if not self.poet_lr_scale > 0:
      problems.append(f"poet_lr_scale must be > 0, got {self.poet_lr_scale!r}")
    if self.clip_ramp_steps < 0:
      problems.append(f"clip_ramp_steps must be >= 0, got {self.clip_ramp_steps!r}")
    if problems:
      raise ValueError("Invalid POETConfig: " + "; ".join(problems) + ".")

  def is_target(self, path: str) -> bool:
    """Whether the layer at this "/"-joined module path is wrapped."""
    return re.search(self.targets, path) is not None and re.search(self.exclude, path) is None
