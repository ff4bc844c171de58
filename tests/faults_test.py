"""The training loop under faults: non-finite steps, unreadable checkpoints, a second process, failed saves.

Each case ends in a workdir from which a rerun finishes (CPU, the trainer tests' small set-up).
"""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trainer_test import _config, _records, cache_dir  # noqa: F401  (a module fixture)

from poetx_jax import checkpointing, trainer, workdir_lock


def _newest_state(config, workdir):
  run = trainer.build(config)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), every=1, keep=100)
  try:
    return trainer.restore_or_init(run, checkpointer, None)
  finally:
    checkpointer.close()


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_step_stops_before_its_state_is_saved_and_a_rerun_recovers(cache_dir, tmp_path,  # noqa: F811
                                                                                  monkeypatch, poison):
  """A NaN in the 5th step (a poisoned batch; in the loss, or only in the gradient under a finite
  loss): the run stops naming step 5 and the finite checkpoint of step 4, no checkpoint holds a
  non-finite value, and a rerun resumes from step 4 and finishes."""
  from poetx_jax import sharding, steps

  workdir = str(tmp_path)
  config = _config(cache_dir, steps=12, train__checkpoint_every=1)
  sentinel = config.model.vocab_size - 1  # a padding id the tokenizer never produces
  real_loss, real_batch, calls = steps.token_loss, sharding.device_batch, []

  def poisoned_loss(model, params, frozen, batch):
    loss_sum, tokens = real_loss(model, params, frozen, batch)
    poisoned = jnp.any(batch["inputs"] == sentinel)
    if poison == "loss":
      return jnp.where(poisoned, jnp.nan, loss_sum), tokens
    # sqrt at 0 (poisoned) or 1, of a term whose value does not depend on the parameters: the
    # loss keeps its value, and only the poisoned step's gradient is 0·inf = NaN
    gate = jnp.where(poisoned, 0.0, 1.0)
    term = gate * (1.0 + 0.0 * sum(jnp.sum(p) for p in jax.tree_util.tree_leaves(params)))
    return loss_sum + jnp.sqrt(term) - gate, tokens

  def batches(batch, batch_sharding):
    calls.append(1)
    if len(calls) == 5:  # the 5th training batch
      batch = {**batch, "inputs": np.full_like(batch["inputs"], sentinel)}
    return real_batch(batch, batch_sharding)

  monkeypatch.setattr(steps, "token_loss", poisoned_loss)
  monkeypatch.setattr(sharding, "device_batch", batches)
  names = "loss nan" if poison == "loss" else "grad_norm nan, update_norm nan"
  with pytest.raises(FloatingPointError, match=rf"non-finite {names} at step 5: .* newest checkpoint, step 4 "):
    trainer.train(config, workdir)
  assert max(r["step"] for r in _records(workdir)) == 5  # the failing step is logged under its own number
  monkeypatch.undo()
  step, state = _newest_state(config, workdir)
  assert step == 4
  assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree_util.tree_leaves(state)
             if np.issubdtype(np.asarray(x).dtype, np.floating))
  result = trainer.train(config, workdir)
  assert np.isfinite(result["val_loss"])


def _corrupt(step_dir: str, kind: str) -> None:
  if kind == "array":  # the largest array data file, truncated
    arrays = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
    with open(max(arrays, key=os.path.getsize), "r+b") as f:
      f.truncate(10)
  elif kind == "metadata":  # the state's tree metadata, garbled
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
      f.write("{not json")
  elif kind == "iterator":  # the data iterator's position, garbled
    with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w") as f:
      f.write("\x00garbage")


@pytest.mark.parametrize("kind", ["array", "metadata", "iterator"])
def test_a_corrupt_newest_checkpoint_is_set_aside_and_its_step_written_again(cache_dir, tmp_path, kind):  # noqa: F811
  workdir = str(tmp_path)
  config = _config(cache_dir, steps=16, train__checkpoint_every=8)
  trainer.train(config, workdir)
  _corrupt(os.path.join(workdir, "checkpoints", "16"), kind)
  for _ in range(2):  # twice: the workdir must not be stuck on the corrupt step
    result = trainer.train(config, workdir)
    assert np.isfinite(result["val_loss"])
  assert glob.glob(os.path.join(workdir, "unreadable_checkpoints", "16-*"))
  step, _ = _newest_state(config, workdir)
  assert step == 16
  # steps 9-16 trained again from checkpoint 8 give the first attempt's losses (kept as replayed)
  with open(os.path.join(workdir, "metrics.replayed.jsonl")) as f:
    first = {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}
  again = {r["step"]: r["loss"] for r in _records(workdir) if r["step"] > 8}
  assert sorted(again) == sorted(first) == list(range(9, 17))
  if jax.default_backend() == "cpu":
    assert again == first


def test_settings_are_recorded_only_once_the_run_has_restored(cache_dir, tmp_path):  # noqa: F811
  workdir = str(tmp_path)
  config = _config(cache_dir, steps=8, train__checkpoint_every=8)
  trainer.train(config, workdir, settings={"model": {"hidden": 128}})
  wider = _config(cache_dir, steps=8, model__hidden=256)
  with pytest.raises(RuntimeError, match="no readable checkpoint"):
    trainer.train(wider, workdir, settings={"model": {"hidden": 256}})
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f) == {"model": {"hidden": 128}}
  assert not os.path.exists(os.path.join(workdir, "unreadable_checkpoints"))  # a mismatch moves nothing


def test_a_second_run_in_the_same_workdir_stops_naming_the_first(cache_dir, tmp_path):  # noqa: F811
  config = _config(cache_dir, steps=8)
  with workdir_lock.hold(str(tmp_path)):
    with pytest.raises(RuntimeError, match=rf"another run is using .*pid {os.getpid()}"):
      trainer.train(config, str(tmp_path))
  assert trainer.train(config, str(tmp_path)) is not None  # released: the next run trains


def test_a_failed_asynchronous_save_stops_the_run_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
  """The plumbing (the real failure is the full-disk test below): once no save is in flight, a
  finished save's error is raised as one RuntimeError naming the newest complete step on disk."""
  import time

  checkpointer = checkpointing.Checkpointer(str(tmp_path), every=1, keep=3)

  def disk_full():
    raise OSError(28, "No space left on device")

  with monkeypatch.context() as patch:  # no save started yet: nothing to check, orbax is not called
    patch.setattr(checkpointer.manager, "wait_until_finished", disk_full)
    checkpointer.check_saves()
  checkpointer.save(1, {"w": np.ones(3, np.float32)}, None, force=True)
  while checkpointer.manager.is_saving_in_progress():  # finished, its outcome not yet checked
    time.sleep(0.01)
  monkeypatch.setattr(checkpointer.manager, "wait_until_finished", disk_full)
  with pytest.raises(RuntimeError, match="newest complete checkpoint is step 1.*a full disk"):
    checkpointer.check_saves()
  monkeypatch.undo()
  checkpointer.close()


def test_a_state_with_a_non_finite_value_is_not_saved(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), every=1, keep=3)
  checkpointer.save(1, {"w": np.ones(3, np.float32)}, None, force=True)
  checkpointer.wait()
  with pytest.raises(FloatingPointError, match=r"after step 2 holds non-finite values: not saved; the newest checkpoint is step 1"):
    checkpointer.save(2, {"w": np.array([1.0, np.inf, 0.0], np.float32)}, None, force=True)
  checkpointer.close()
  assert sorted(os.listdir(tmp_path)) == ["1"]


def test_a_resumed_run_logs_each_step_once_and_keeps_the_replayed_records(cache_dir, tmp_path):  # noqa: F811
  """A run that dies after logging steps its last checkpoint does not hold (here: checkpoint 16
  removed after a finished run) resumes at 8; metrics.jsonl then has each step once, and the
  first attempt's records of steps 9-16 move to metrics.replayed.jsonl."""
  import shutil

  workdir = str(tmp_path)
  config = _config(cache_dir, steps=16, train__checkpoint_every=8)
  trainer.train(config, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "16"))
  trainer.train(config, workdir)
  steps = [r["step"] for r in _records(workdir)]
  assert sorted(steps) == list(range(1, 17)), steps
  with open(os.path.join(workdir, "metrics.replayed.jsonl")) as f:
    replayed = [json.loads(line) for line in f]
  assert sorted(r["step"] for r in replayed if r["kind"] == "train") == list(range(9, 17))


def test_a_binary_file_is_refused_before_training(cache_dir, tmp_path):  # noqa: F811
  blob = tmp_path / "blob.txt"
  blob.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
  from poetx_jax import data, train_config

  raw = __import__("configs.tiny", fromlist=["get_config"]).get_config()
  raw.data.update(files=str(blob), cache_dir=str(tmp_path / "cache"), vocab_size=300)
  with pytest.raises(ValueError, match=r"blob.txt is not UTF-8 text .* remove it from data.files"):
    data.load_tokenizer(train_config.data_config(raw))


def test_a_missing_validation_split_stops_the_run_before_step_0(cache_dir, tmp_path):  # noqa: F811
  config = _config(cache_dir, steps=8, data__eval_split="nonexistent")
  with pytest.raises(ValueError, match="data.eval_split"):
    trainer.train(config, str(tmp_path))
  assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints", "8"))  # nothing trained, nothing saved


def test_checksums_catch_one_flipped_bit_and_a_mismatch_falls_back(cache_dir, tmp_path):  # noqa: F811
  """Orbax restores changed array data silently: every checkpoint records checksums of its arrays.
  A restored state whose bits differ from them is unreadable, set aside like any other."""
  state = {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "codes": np.arange(32, dtype=np.uint8)}
  recorded = checkpointing.checksums(state)
  for key in state:
    flipped = {k: v.copy() for k, v in state.items()}
    flipped[key].view(np.uint8)[5] ^= 0x10  # one bit
    with pytest.raises(ValueError, match="does not match its checksum"):
      checkpointing.verify_checksums(flipped, recorded)
  swapped = {**state, "w": state["w"][::-1].copy()}  # the same values elsewhere: the weighted sum
  with pytest.raises(ValueError, match="does not match its checksum"):
    checkpointing.verify_checksums(swapped, recorded)

  workdir = str(tmp_path)
  config = _config(cache_dir, steps=16, train__checkpoint_every=8)
  trainer.train(config, workdir)
  record = os.path.join(workdir, "checkpoints", "16", "checksums", "metadata")
  with open(record) as f:
    sums = json.load(f)
  key = sorted(sums)[0]
  sums[key] = [(sums[key][0] + 1) % 2**32, sums[key][1]]  # as if that array's data had changed
  with open(record, "w") as f:
    json.dump(sums, f)
  assert np.isfinite(trainer.train(config, workdir)["val_loss"])  # falls back to 8, trains 16 again
  assert glob.glob(os.path.join(workdir, "unreadable_checkpoints", "16-*"))


def test_train_py_reports_an_incompatible_resume_in_one_error_and_logs_the_rest(cache_dir, tmp_path):  # noqa: F811
  """What a user sees: the error in a few lines on stderr; tracebacks, ignored exceptions and
  library logs in workdir/train.log."""
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, os.path.join(repo, "train.py"), "--config", os.path.join(repo, "configs", "tiny.py"),
             f"--workdir={tmp_path}", f"--config.data.files={cache_dir}/*.txt", f"--config.data.cache_dir={cache_dir}/cache",
             "--config.data.vocab_size=300", "--config.data.eval_split=train", "--config.train.steps=4",
             "--config.optimizer.warmup_steps=1", "--config.train.checkpoint_every=4", "--config.train.eval_batches=1"]
  first = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=repo)
  assert first.returncode == 0, first.stderr[-2000:]
  second = subprocess.run(command + ["--config.model.hidden=256"], capture_output=True, text=True, timeout=300, cwd=repo)
  assert second.returncode != 0
  lines = second.stderr.strip().splitlines()
  assert len(lines) <= 3, second.stderr[-3000:]
  assert lines[-2].startswith("FATAL RuntimeError: no readable checkpoint") and "train.log" in lines[-1]
  with open(os.path.join(str(tmp_path), "train.log")) as f:
    assert "Traceback" in f.read()


@pytest.fixture
def small_disk(tmp_path):
  """A 4 MB tmpfs at tmp_path/run/checkpoints (the machine's root may mount one; skipped otherwise)."""
  import subprocess

  mount_point = tmp_path / "run" / "checkpoints"
  mount_point.mkdir(parents=True)
  made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True, text=True)
  if made.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}): the full-disk case needs one")
  yield mount_point
  subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_full_disk_stops_the_run_keeping_the_last_good_checkpoint(cache_dir, small_disk):  # noqa: F811
  import subprocess

  workdir = str(small_disk.parent)
  config = _config(cache_dir, steps=40, train__checkpoint_every=4, train__keep_checkpoints=10)
  with pytest.raises(RuntimeError, match=r"newest complete checkpoint is step (\d+)") as caught:
    trainer.train(config, workdir)
  newest = int(caught.value.args[0].split("newest complete checkpoint is step ")[1].split(".")[0])
  assert 4 <= newest < 40
  step, _ = _newest_state(config, workdir)
  assert step == newest
  subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)  # space freed
  assert np.isfinite(trainer.train(config, workdir)["val_loss"])


def _train_py(cache_dir, workdir, *extra):
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return [sys.executable, os.path.join(repo, "train.py"), "--config", os.path.join(repo, "configs", "tiny.py"),
          f"--workdir={workdir}", f"--config.data.files={cache_dir}/*.txt", f"--config.data.cache_dir={cache_dir}/cache",
          "--config.data.vocab_size=300", "--config.data.eval_split=train", "--config.optimizer.warmup_steps=2",
          "--config.train.eval_batches=1", "--config.train.log_every=1", "--config.train.eval_every=0", *extra]


@pytest.mark.parametrize("seed", [1])
def test_kill_9_while_checkpointing_then_rerun_gives_the_uninterrupted_losses(cache_dir, tmp_path, seed):  # noqa: F811
  """`kill -9` at a random step of a run that saves every other step (so often mid-save); the rerun
  resumes and logs, step for step, the losses of a run never interrupted."""
  import signal
  import subprocess
  import time

  extra = ("--config.train.steps=20", "--config.train.checkpoint_every=2")
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run(_train_py(cache_dir, straight, *extra), check=True, capture_output=True, timeout=300)
  kill_after = int(np.random.default_rng(seed).integers(3, 17))
  process = subprocess.Popen(_train_py(cache_dir, killed, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(killed / "metrics.jsonl") and len(_records(str(killed))) >= kill_after:
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  assert process.wait(timeout=60) == -signal.SIGKILL  # killed mid-run, not finished
  subprocess.run(_train_py(cache_dir, killed, *extra), check=True, capture_output=True, timeout=300)
  want = {r["step"]: r["loss"] for r in _records(str(straight))}
  got = {r["step"]: r["loss"] for r in _records(str(killed))}
  assert sorted(got) == list(range(1, 21))
  if jax.default_backend() == "cpu":
    assert got == want
