"""Sentencepiece tokenizers: load any model file, or train one on a corpus once.

A trained model follows T5's id layout (pad 0, eos 1, unk 2, bos 3), so it is
interchangeable with the T5 model the POET papers used. A model loaded from a
path keeps its own ids; one without a pad piece pads with id 0 (padding is
masked out of the loss by the batch's weights, so the id itself never matters).
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Iterable

import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
# Byte fallback (every byte a piece: no unknown characters) needs 256 pieces of
# the vocabulary; below this size it would crowd out the real subwords.
BYTE_FALLBACK_MIN_VOCAB = 1024


class Tokenizer:
  """A sentencepiece model with the ids the data pipeline needs; picklable for grain workers."""

  def __init__(self, model_proto: bytes, path: str = "<memory>"):
    self.path = path
    self._model_proto = model_proto
    self._processor = spm.SentencePieceProcessor(model_proto=model_proto)

  # Grain worker processes receive the pipeline by pickling: ship the model's
  # bytes, not the C++ processor.
  def __getstate__(self):
    return {"path": self.path, "model_proto": self._model_proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], state["path"])

  @property
  def vocab_size(self) -> int:
    """Pieces in the model: every id is in `[0, vocab_size)`."""
    return self._processor.get_piece_size()

  @property
  def eos_id(self) -> int:
    """The end-of-document id, or -1 when the model has none."""
    return self._processor.eos_id()

  @property
  def bos_id(self) -> int:
    return self._processor.bos_id()

  @property
  def pad_id(self) -> int:
    """The padding id: the model's pad piece, or 0 when it has none."""
    pad = self._processor.pad_id()
    return pad if pad >= 0 else 0

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS or EOS added)."""
    return self._processor.encode(text, out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`."""
    return self._processor.decode([int(i) for i in ids])

  def __repr__(self) -> str:
    return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"


def load(path: str) -> Tokenizer:
  """Loads a sentencepiece model file.

  Args:
    path: the `.model` file (`~` expanded).

  Returns:
    The `Tokenizer`.

  Raises:
    ValueError: when the file is missing or is not a sentencepiece model.
  """
  full_path = os.path.abspath(os.path.expanduser(path))
  hint = "set data.tokenizer to a sentencepiece .model file, or to None to train one on the corpus"
  try:
    with open(full_path, "rb") as f:
      proto = f.read()
  except OSError as err:
    raise ValueError(f"cannot read the tokenizer {path!r} ({err.strerror}): {hint}.") from err
  try:
    return Tokenizer(proto, full_path)
  except RuntimeError as err:  # sentencepiece raises RuntimeError on a malformed proto
    raise ValueError(f"{path!r} is not a sentencepiece model ({err}): {hint}.") from err


def train(
    lines: Iterable[str],
    model_path: str,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    num_threads: int | None = None,
) -> Tokenizer:
  """Trains a sentencepiece model on `lines` and writes it atomically to `model_path`.

  Args:
    lines: training sentences (sentencepiece skips lines over 16 KiB: pass paragraphs).
    model_path: where the `.model` file goes; written via a temporary file and a
      rename, so a crash never leaves a truncated model that later runs would reuse.
    vocab_size: pieces in the model.
    model_type: "bpe" or "unigram".
    num_threads: training threads (default: all cores).

  Returns:
    The trained `Tokenizer`.

  Raises:
    ValueError: when the text cannot support `vocab_size` pieces (sentencepiece's
      message names the largest size that would work).
  """
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        byte_fallback=vocab_size >= BYTE_FALLBACK_MIN_VOCAB,
        split_digits=True,
        character_coverage=0.9995,
        max_sentence_length=16384,
        # Feed every line in order: sentencepiece's own sampling is not seeded.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
  except RuntimeError as err:
    raise ValueError(
        f"cannot train a {vocab_size}-piece {model_type} tokenizer on this corpus ({err}): lower data.vocab_size."
    ) from err
  proto = model.getvalue()
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as f:
    f.write(proto)
  os.replace(f.name, model_path)
  return Tokenizer(proto, os.path.abspath(model_path))
