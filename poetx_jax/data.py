"""Training and validation batches: tfds array_record datasets through grain.

    documents (tfds data source: C4, converted local files, or the embedded corpus)
      → global shuffle, reshuffled every epoch (index permutation, no buffer)
      → this process's share (every `process_count`-th document), repeated forever
      → sentencepiece tokens + EOS                (in grain threads or worker processes)
      → concatenated and cut into windows of seq_len + 1 tokens (no token dropped)
      → inputs = window[:-1], targets = window[1:], weights = 1 on real targets
      → batches of global_batch_size // process_count rows

Every stage is a grain dataset with a checkpointable position, so an iterator's
`get_state()` (or orbax via `grain.checkpoint.CheckpointSave/Restore`) resumes the
exact batch sequence. Each process packs its own documents: the global batch is
the concatenation of the processes' batches, and different processes never share
a document within an epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any, Iterator

import grain
import numpy as np

from poetx_jax import corpus
from poetx_jax import tokenizer as tokenizer_lib
from poetx_jax.tokenizer import Tokenizer

TOKENIZER_TYPE = "bpe"
# Enough text for a 32k vocabulary; a larger corpus (C4) is sampled evenly up to this.
TOKENIZER_TRAINING_CHARS = 40_000_000
TOKENS = "tokens"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from, how it is tokenized and cut (see configs/base.py for each field)."""

  tfds_name: str | None = None  # e.g. "c4/en:3.1.0"; None with files=() -> the embedded corpus
  tfds_dir: str | None = None
  files: tuple[str, ...] = ()  # glob patterns of local text files
  text_key: str = "text"
  train_split: str = "train"
  eval_split: str = "validation"
  tokenizer: str | None = None  # sentencepiece model path; None -> train/reuse one for the corpus
  vocab_size: int = 32000  # for a trained tokenizer
  seq_len: int = 256
  cache_dir: str = "~/.cache/poetx_jax"
  shuffle_seed: int = 0
  num_workers: int = 0  # grain worker processes (0 = in-process)
  prefetch_batches: int = 2  # training batches made ahead by a thread (0 = on demand)
  add_eos: bool = True

  def __post_init__(self):
    if isinstance(self.files, str):  # a single pattern given bare: accept it
      object.__setattr__(self, "files", (self.files,) if self.files else ())
    object.__setattr__(self, "files", tuple(self.files))
    if self.files and self.tfds_name:
      raise ValueError("set either data.files or data.tfds_name, not both.")
    for name in ("seq_len", "vocab_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"data.{name} must be > 0, got {getattr(self, name)}.")
    if self.num_workers < 0:
      raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}.")
    if self.prefetch_batches < 0:
      raise ValueError(f"data.prefetch_batches must be >= 0, got {self.prefetch_batches}.")
    if not 0 <= self.shuffle_seed < 2**32:
      raise ValueError(f"data.shuffle_seed must be in [0, 2**32), got {self.shuffle_seed}.")


# ----------------------------------------------------------------------------- the documents


def find_tfds_dataset(name: str, tfds_dir: str | None) -> str:
  """The directory of a prepared tfds dataset, e.g. `c4/en:3.1.0` → `TFDS_DIR/c4/en/3.1.0`.

  Args:
    name: `dataset[/config][:version]`; without a version, the newest one present.
    tfds_dir: the tfds data_dir (default: `$TFDS_DATA_DIR` or `~/tensorflow_datasets`).

  Raises:
    ValueError: when no prepared dataset is there.
  """
  data_dir = os.path.expanduser(tfds_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
  base, _, version = name.partition(":")
  root = os.path.join(data_dir, base)
  if version:
    candidates = [os.path.join(root, version)]
  else:
    versions = [v for v in (os.listdir(root) if os.path.isdir(root) else []) if re.fullmatch(r"\d+\.\d+\.\d+", v)]
    candidates = [os.path.join(root, v) for v in sorted(versions, key=lambda v: tuple(map(int, v.split("."))), reverse=True)]
  for candidate in candidates:
    if os.path.exists(os.path.join(candidate, "dataset_info.json")):
      return candidate
  raise ValueError(
      f"no prepared tfds dataset {name!r} under {data_dir!r} (looked for {root}/<version>/dataset_info.json):"
      " set data.tfds_dir to the data_dir holding it (prepared with file_format=array_record),"
      " or data.files to local text files, or neither for the embedded corpus."
  )


def dataset_directory(config: DataConfig) -> str:
  """The tfds dataset `config` reads, converting local files or building the embedded corpus on first use.

  Raises:
    ValueError: when the configured data cannot be found (the message says what to set).
  """
  if config.files:
    return corpus.local_files_corpus(config.files, config.cache_dir, config.text_key)
  if config.tfds_name:
    return find_tfds_dataset(config.tfds_name, config.tfds_dir)
  return corpus.embedded_corpus(config.cache_dir)


def open_split(directory: str, split: str, *, setting: str = "data.train_split") -> Any:
  """A random-access source of one split's examples (dicts of features, text as bytes).

  Args:
    directory: a tfds dataset directory (`dataset_directory`).
    split: a split name, optionally sliced (`train[:1%]`).
    setting: the config field to name in errors.

  Raises:
    ValueError: when the split does not exist, cannot be read without TensorFlow, or is empty.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, only when reading)

  builder = tfds.builder_from_directory(directory)
  available = sorted(builder.info.splits.keys())
  if split.split("[")[0] not in available:
    raise ValueError(
        f"split {split!r} is not in {directory}, which has {available} (a split without documents is not"
        f" stored): set {setting} to one of them."
    )
  try:
    empty = builder.info.splits[split].num_examples == 0
  except Exception as err:  # pylint: disable=broad-except  (a malformed slice)
    raise ValueError(f"cannot select split {split!r} of {directory} ({err}): set {setting}.") from err
  if empty:
    raise ValueError(f"split {split!r} of {directory} is empty: set {setting} to a split with documents.")
  try:
    source = builder.as_data_source(split=split)
  except Exception as err:  # pylint: disable=broad-except  (tfds raises several types here)
    raise ValueError(
        f"cannot read split {split!r} of {directory} without TensorFlow ({type(err).__name__}: {err}):"
        " the dataset must be prepared with file_format=array_record."
    ) from err
  return source


def _text(example: Any, text_key: str) -> str:
  text = example[text_key] if isinstance(example, dict) else example
  return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


# ----------------------------------------------------------------------------- the tokenizer


def _corpus_key(config: DataConfig, directory: str) -> str:
  version_dir, version = os.path.split(directory)
  name = os.path.basename(version_dir)
  if config.files or not config.tfds_name:
    return f"{name}-{version}"  # names of built corpora are already unique (and portable between machines)
  where = hashlib.sha256(os.path.abspath(directory).encode()).hexdigest()[:8]
  return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', config.tfds_name)}-{where}"


def tokenizer_path(config: DataConfig, directory: str | None = None) -> str:
  """Where the tokenizer trained for `config`'s corpus and vocabulary lives in the cache."""
  directory = directory or dataset_directory(config)
  key = f"{_corpus_key(config, directory)}-{config.train_split}-{TOKENIZER_TYPE}{config.vocab_size}"
  return os.path.join(os.path.abspath(os.path.expanduser(config.cache_dir)), "tokenizers", re.sub(r"[^\w.-]", "_", key) + ".model")


def _training_lines(source: Any, text_key: str) -> Iterator[str]:
  # Documents at an even stride, so a corpus larger than the budget is sampled
  # across its whole length, deterministically; paragraphs as sentencepiece "sentences".
  budget = TOKENIZER_TRAINING_CHARS
  probe = [len(_text(source[i], text_key)) for i in range(min(len(source), 100))]
  stride = max(1, int(len(source) * (sum(probe) / len(probe)) / budget))
  for index in range(0, len(source), stride):
    text = _text(source[index], text_key)
    for line in text.split("\n"):
      line = line.strip()
      if line:
        yield line
    budget -= len(text)
    if budget <= 0:
      return


def load_tokenizer(config: DataConfig) -> Tokenizer:
  """`config.tokenizer`, or the tokenizer trained (once, cached) on the corpus' train split.

  The model's vocabulary size (`.vocab_size`) is what the model must be sized for:
  a trained one has `config.vocab_size` pieces unless the corpus cannot support them.

  Raises:
    ValueError: when the model file is unreadable, the corpus is missing, or the
      tokenizer has no EOS while `config.add_eos` is set.
  """
  if config.tokenizer:
    tokenizer = tokenizer_lib.load(config.tokenizer)
  else:
    directory = dataset_directory(config)
    path = tokenizer_path(config, directory)
    if not os.path.exists(path):
      cache_dir = os.path.abspath(os.path.expanduser(config.cache_dir))
      with corpus.exclusive(os.path.join(cache_dir, "locks", os.path.basename(path))):
        if not os.path.exists(path):
          source = open_split(directory, config.train_split)
          corpus.progress(f"training a {config.vocab_size}-piece {TOKENIZER_TYPE} tokenizer on {directory} (once) into {path}")
          tokenizer_lib.train(_training_lines(source, config.text_key), path, vocab_size=config.vocab_size, model_type=TOKENIZER_TYPE)
    tokenizer = tokenizer_lib.load(path)
  if config.add_eos and tokenizer.eos_id < 0:
    raise ValueError(f"the tokenizer {tokenizer.path} has no EOS piece: set data.add_eos=False or use another tokenizer.")
  return tokenizer


# ----------------------------------------------------------------------------- grain stages


class Tokenize:
  """Example → `{"tokens": int32[n]}` (EOS appended when `eos_id` is given); picklable for workers."""

  def __init__(self, tokenizer: Tokenizer, text_key: str, eos_id: int | None):
    self.tokenizer = tokenizer
    self.text_key = text_key
    self.eos_id = eos_id

  def __call__(self, example: Any) -> dict[str, np.ndarray]:
    ids = self.tokenizer.encode(_text(example, self.text_key))
    if self.eos_id is not None:
      ids.append(self.eos_id)
    return {TOKENS: np.asarray(ids, np.int32)}


def _has_tokens(example: dict[str, np.ndarray]) -> bool:
  return len(example[TOKENS]) > 0


class NextTokenWindow:
  """A packed window of seq_len + 1 tokens → inputs, targets (shifted by one) and their weights."""

  def __init__(self, pad_id: int, cross_document_targets: bool):
    self.pad_id = pad_id
    # Without EOS separators, predicting a document's first token from the previous
    # document's last one is noise: such targets get weight 0.
    self.cross_document_targets = cross_document_targets

  def __call__(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segments = packed[f"{TOKENS}_segment_ids"]
    tokens = np.where(segments > 0, packed[TOKENS], self.pad_id).astype(np.int32)
    weights = segments[1:] > 0
    if not self.cross_document_targets:
      weights &= segments[1:] == segments[:-1]
    return {"inputs": tokens[:-1], "targets": tokens[1:], "weights": weights.astype(np.int32)}


def shard_documents(documents: grain.MapDataset, *, seed: int, process_index: int, process_count: int) -> grain.MapDataset:
  """The global shuffle (a new permutation every epoch), this process's share of it, repeated forever.

  Every epoch each document goes to exactly one process (the document at shuffled
  position i to process i mod process_count); all processes compute the same permutation.
  """
  return documents.shuffle(seed)[process_index::process_count].repeat()


def pack(tokens: grain.IterDataset, *, seq_len: int, pad_id: int, add_eos: bool) -> grain.IterDataset:
  """Documents' tokens concatenated and cut into next-token windows of `seq_len` inputs.

  Windows hold seq_len + 1 tokens and do not overlap, so every token appears exactly
  once, in order; only a finite stream's last window is padded (weights 0).
  """
  packed = grain.experimental.ConcatThenSplitIterDataset(tokens, length_struct={TOKENS: seq_len + 1})
  return packed.map(NextTokenWindow(pad_id, cross_document_targets=add_eos))


def _tokens(documents: grain.MapDataset, config: DataConfig, tokenizer: Tokenizer) -> grain.MapDataset:
  eos_id = tokenizer.eos_id if config.add_eos else None
  return documents.map(Tokenize(tokenizer, config.text_key, eos_id)).filter(_has_tokens)


def _allow_grain_workers_without_absl_app() -> None:
  # grain's worker processes read absl flags, which raise "before flags were
  # parsed" outside `absl.app.run` (notebooks, pytest); their defaults are fine.
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_dataset(
    config: DataConfig,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
) -> grain.IterDataset:
  """This process's endless stream of training batches.

  Args:
    config: the data settings.
    global_batch_size: rows over all processes; each process yields `global_batch_size // process_count`.
    process_index, process_count: this process among the data-loading processes (`jax.process_index()`, ...).
    seed: the shuffle seed (default `config.shuffle_seed`).

  Returns:
    A `grain.IterDataset` of dicts with int32 `inputs`, `targets`, `weights`, each
    `(global_batch_size // process_count, seq_len)`; `iter()` of it is checkpointable.

  Raises:
    ValueError: on a batch that does not split over the processes, or missing data.
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of process_count={process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
  tokenizer = load_tokenizer(config)
  documents = grain.MapDataset.source(open_split(dataset_directory(config), config.train_split))
  seed = config.shuffle_seed if seed is None else seed
  documents = shard_documents(documents, seed=seed, process_index=process_index, process_count=process_count)
  tokens = _tokens(documents, config, tokenizer).to_iter_dataset()
  if config.num_workers:
    _allow_grain_workers_without_absl_app()
    # Workers tokenize interleaved slices and are read round-robin, so the document
    # order, the packing and the batches are the same for any number of workers.
    tokens = tokens.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
  windows = pack(tokens, seq_len=config.seq_len, pad_id=tokenizer.pad_id, add_eos=config.add_eos)
  batches = windows.batch(global_batch_size // process_count, drop_remainder=True)
  if config.prefetch_batches:
    # The next batches are made while the device runs a step: on a GPU, dispatching a
    # step returns only once it has nearly run (likely the merge's `lax.cond`), so
    # without this the host's tokenizing and packing would sit between steps. The
    # iterator's state is that of the last batch handed out, so checkpoints resume exactly.
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=config.prefetch_batches)
  return batches


def train_iterator(
    config: DataConfig, *, global_batch_size: int, process_index: int = 0, process_count: int = 1, seed: int | None = None
) -> grain.DatasetIterator:
  """`iter(train_dataset(...))`: `next()` gives a batch; `get_state()` / `set_state()` or
  `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` in an orbax Composite save and resume it."""
  return iter(train_dataset(config, global_batch_size=global_batch_size, process_index=process_index,
                            process_count=process_count, seed=seed))


class EvalBatches:
  """The validation split in order, packed and batched; every `iter()` starts over and yields the same batches."""

  def __init__(self, config: DataConfig, *, batch_size: int, max_batches: int | None):
    if batch_size <= 0:
      raise ValueError(f"eval batch_size must be > 0, got {batch_size}.")
    self.config = config
    self.batch_size = batch_size
    self.max_batches = max_batches
    self.tokenizer = load_tokenizer(config)
    self.source = open_split(dataset_directory(config), config.eval_split, setting="data.eval_split")

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    config = self.config
    tokens = _tokens(grain.MapDataset.source(self.source), config, self.tokenizer).to_iter_dataset()
    windows = pack(tokens, seq_len=config.seq_len, pad_id=self.tokenizer.pad_id, add_eos=config.add_eos)
    batches = iter(windows.batch(self.batch_size, drop_remainder=False))
    count = 0
    while self.max_batches is None or count < self.max_batches:
      batch = next(batches, None)
      if batch is None:
        return
      yield _pad_rows(batch, self.batch_size)
      count += 1


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  # The last batch is filled with all-padding rows (weights 0): one shape, one compilation.
  missing = rows - batch["inputs"].shape[0]
  if missing == 0:
    return batch
  return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def eval_batches(config: DataConfig, *, batch_size: int, max_batches: int | None = None) -> EvalBatches:
  """Deterministic validation batches (no shuffle; the same on every call and every process).

  Args:
    config: the data settings (`eval_split` is read).
    batch_size: rows per batch (all processes get the whole batch; split it by process).
    max_batches: stop after this many; None reads the whole split.

  Returns:
    A re-iterable of dicts like the training batches; the last one is padded with weight-0 rows.

  Raises:
    ValueError: when the split is missing or empty.
  """
  return EvalBatches(config, batch_size=batch_size, max_batches=max_batches)


def split_statistics(config: DataConfig, split: str, tokenizer: Tokenizer | None = None) -> dict[str, int]:
  """Documents, characters and tokens (EOS included when `add_eos`) of one split; reads all of it."""
  tokenizer = tokenizer or load_tokenizer(config)
  source = open_split(dataset_directory(config), split, setting="the split")
  tokenize = Tokenize(tokenizer, config.text_key, tokenizer.eos_id if config.add_eos else None)
  documents = characters = tokens = 0
  for index in range(len(source)):
    text = _text(source[index], config.text_key)
    documents += 1
    characters += len(text)
    tokens += len(tokenize(text)[TOKENS])
  return {"documents": documents, "characters": characters, "tokens": tokens}
