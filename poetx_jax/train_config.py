"""The training run's settings as frozen dataclasses, converted once from ml_collections.

The library never reads a ConfigDict (DESIGN §5.5): `from_config_dict` checks every
field at this boundary and the rest of the code sees typed, immutable values.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

from poetx_jax.config import POETConfig
from poetx_jax.data import DataConfig
from poetx_jax.models.llama import SIZES, LlamaConfig

OPTIMIZERS = ("poetx", "adamw", "muon", "galore")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Which optimizer and its hyperparameters (see configs/base.py for each field)."""

  name: str = "poetx"
  lr: float = 1e-3
  poet_lr: float = 1e-3
  weight_decay: float = 0.01
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  clip_norm: float | None = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-6
  mu_dtype: str | None = None
  galore_rank: int = 128
  galore_update_proj_gap: int = 200

  def __post_init__(self):
    if self.mu_dtype is not None and self.mu_dtype not in ("bfloat16", "float32"):
      raise ValueError(f"optimizer.mu_dtype must be None (the parameters' dtype), 'bfloat16' or 'float32', got {self.mu_dtype!r}.")
    if self.name not in OPTIMIZERS:
      raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {self.name!r}.")
    for field in ("lr", "poet_lr"):
      if not getattr(self, field) > 0:
        raise ValueError(f"optimizer.{field} must be > 0, got {getattr(self, field)!r}.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Steps, batch, cadence of logs, evaluation and checkpoints."""

  steps: int = 1000
  global_batch_size: int = 32
  grad_accum_steps: int = 1
  cayley_once: bool = False
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 20
  eval_batch_size: int = 0
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  spectrum_every: int = 0
  spectrum_layers: str = "blocks_0/attention/q_proj,blocks_0/mlp/down_proj"
  profile_steps: str = ""
  thread_switch_interval_s: float = 1e-4

  def __post_init__(self):
    if self.steps <= 0:
      raise ValueError(f"train.steps must be > 0, got {self.steps}.")
    if not self.thread_switch_interval_s >= 0:
      raise ValueError(f"train.thread_switch_interval_s must be >= 0 (0: Python's own), got {self.thread_switch_interval_s}.")
    self.profile_range()  # raises on a malformed range
    if not isinstance(self.cayley_once, bool):
      raise ValueError(f"train.cayley_once must be True or False, got {self.cayley_once!r}.")
    for field, least in (("log_every", 1), ("checkpoint_every", 1), ("keep_checkpoints", 1), ("eval_batches", 1),
                         ("eval_every", 0), ("eval_batch_size", 0), ("spectrum_every", 0)):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        meaning = " (0: off)" if field in ("eval_every", "spectrum_every") else ""
        raise ValueError(f"train.{field} must be an int >= {least}{meaning}, got {value!r}.")
    if self.grad_accum_steps < 1 or self.global_batch_size % self.grad_accum_steps:
      raise ValueError(
          f"train.global_batch_size={self.global_batch_size} must be divisible by"
          f" train.grad_accum_steps={self.grad_accum_steps}."
      )

  def profile_range(self) -> range | None:
    """The steps `profile_steps` ("START:STOP", 0-based, STOP excluded) asks to trace, or None."""
    if not self.profile_steps:
      return None
    parts = self.profile_steps.split(":")
    try:
      start, stop = (int(p) for p in parts)
    except ValueError:
      start = stop = -1
    if len(parts) != 2 or not 0 <= start < stop:
      raise ValueError(f'train.profile_steps must be "START:STOP" with 0 <= START < STOP, got {self.profile_steps!r}.')
    return range(start, stop)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh: `data` × `fsdp` axes; -1 takes the remaining devices."""

  data: int = -1
  fsdp: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  mode: str
  seed: int
  model: LlamaConfig
  optimizer: OptimizerConfig
  poet: POETConfig
  data: DataConfig
  train: RunConfig
  mesh: MeshConfig


def _build(cls, values: dict[str, Any], section: str):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f"unknown {section} setting(s) {unknown}; known: {sorted(names)}.")
  return cls(**values)


def _model(values: dict[str, Any], seq_len: int, vocab_size: int) -> LlamaConfig:
  values = dict(values)
  size = values.pop("size", None)
  if size is not None:
    if size not in SIZES:
      raise ValueError(f"model.size must be one of {sorted(SIZES)}, got {size!r}.")
    hidden, ffn, heads, layers = SIZES[size]
    for name, value in (("hidden", hidden), ("ffn", ffn), ("heads", heads), ("layers", layers)):
      values.setdefault(name, value)
  values.setdefault("max_seq_len", seq_len)
  if values.get("vocab_size") in (None, 0):
    values["vocab_size"] = vocab_size
  return _build(LlamaConfig, values, "model")


def from_config_dict(config, *, vocab_size: int | None = None) -> TrainConfig:
  """Converts a `get_config()` ConfigDict into a `TrainConfig`.

  Args:
    config: the ml_collections ConfigDict (after command-line overrides).
    vocab_size: the tokenizer's, used where `model.vocab_size` is 0 or None.

  Raises:
    ValueError: naming any unknown or invalid setting.
  """
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  known = {"mode", "seed", "model", "optimizer", "poet", "data", "train", "mesh"}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"unknown top-level setting(s) {unknown}; known: {sorted(known)}.")
  if values.get("mode", "train") not in ("train", "eval"):
    raise ValueError(f"mode must be 'train' or 'eval', got {values['mode']!r}.")
  data_values = dict(values.get("data", {}))
  if "files" in data_values:
    files = data_values["files"]
    data_values["files"] = tuple(f for f in (files.split(",") if isinstance(files, str) else files) if f)
  data = _build(DataConfig, data_values, "data")
  poet_values = dict(values.get("poet", {}))
  poet_values.setdefault("seed", values.get("seed", 0))
  config = TrainConfig(
      mode=values.get("mode", "train"),
      seed=int(values.get("seed", 0)),
      model=_model(values.get("model", {}), data.seq_len, vocab_size or 0),
      optimizer=_build(OptimizerConfig, values.get("optimizer", {}), "optimizer"),
      poet=_build(POETConfig, poet_values, "poet"),
      data=data,
      train=_build(RunConfig, values.get("train", {}), "train"),
      mesh=_build(MeshConfig, values.get("mesh", {}), "mesh"),
  )
  _check_variant_with_remat(config)
  return config


def _check_variant_with_remat(config: TrainConfig) -> None:
  """The mem variant saves memory only where nothing else already drops `h`.

  Under remat a block's backward first recomputes its forward, `h` included ("full"),
  or keeps `h`, a dot's output ("dots"); mem would then compute `h` once more per layer
  for no memory (`python -m benchmarks.mem_variant`, raw/run118_mem_variant.txt).
  """
  if config.optimizer.name == "poetx" and config.poet.variant == "mem" and config.model.remat != "none":
    done = "recomputes" if config.model.remat == "full" else "saves"
    raise ValueError(
        f"poet.variant='mem' with model.remat={config.model.remat!r}: remat already {done} each layer's h, so mem"
        " would only add one large GEMM per layer. Use poet.variant='fast' with remat, or 'mem' with model.remat='none'."
    )


def check_override_names(config, args) -> None:
  """Raises one ValueError for a `--config.a.b=v` argument that names no field of `config`,
  naming the section and the closest valid fields (ml_collections' own error is a bare
  `AttributeError: "'b'"`).

  Args:
    config: the ConfigDict the `--config` file gives (before overrides).
    args: the command line's arguments.
  """
  for arg in args:
    match = re.match(r"^--?config\.([A-Za-z0-9_.]+)(=|$)", arg)
    if not match:
      continue
    node, done = config, []
    for name in match.group(1).split("."):
      fields = list(node.keys()) if hasattr(node, "keys") else []
      if name not in fields:
        section = ".".join(done) or "the config"
        close = difflib.get_close_matches(name, fields, n=3)
        hint = f"did you mean {', '.join(close)}" if close else f"its fields are {', '.join(sorted(fields))}"
        raise ValueError(f"unknown setting --config.{match.group(1)}: {section} has no field {name!r}; {hint}?")
      node, done = node[name], done + [name]


def data_config(config) -> DataConfig:
  """Just the data section (the tokenizer must be known before the model's vocabulary)."""
  return from_config_dict(config, vocab_size=1).data


def padded_vocab(tokenizer_vocab: int, multiple: int = 128) -> int:
  """The tokenizer's vocabulary rounded up to a multiple of 128 (friendlier matmuls)."""
  return -(-tokenizer_vocab // multiple) * multiple


def check_vocab(config: TrainConfig, tokenizer_vocab: int) -> None:
  """Raises when the model's vocabulary cannot hold every token id."""
  if config.model.vocab_size < tokenizer_vocab:
    raise ValueError(
        f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} pieces:"
        " set --config.model.vocab_size=0 to size it from the tokenizer."
    )
