"""Orbax checkpoints of the train state and the grain iterator, with safe resume.

One `CheckpointManager` per run directory; each step is one `ocp.args.Composite`
of `state` (params, POET-X frozen state, optimizer state, step, RNG) and `data`
(the grain iterator's position), plus `checksums` of every array of the state.
Orbax writes each step to a temporary directory and renames it when complete, so a
partial save is never listed; a complete but unreadable one, or one whose arrays no
longer match their checksums, is reported, moved aside once an older step restores,
and the previous step is used.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

logger = logging.getLogger("poetx_jax")


class Checkpointer:
  """Saves every `every` steps (and on request), keeps the last `keep`, restores the newest readable."""

  def __init__(self, directory: str, *, every: int, keep: int):
    self.directory = epath.Path(directory).expanduser().resolve()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True),
    )
    self._unchecked = False  # a save started whose outcome `check_saves` has not seen yet

  def save(self, step: int, state: Any, data_iterator: Any | None, *, force: bool = False) -> bool:
    """Saves `state` (and the iterator's position) at `step` when due or when forced, with a
    checksum of every array (`checksums`), which restoring verifies.

    Raises:
      FloatingPointError: when the state holds a non-finite value (a merge or an optimizer
        moment overflowed although the step's norms were finite): it is not saved.
      RuntimeError: when this or the previous (asynchronous) save failed.
    """
    if not (force or self.manager.should_save(step)):
      return False
    sums, finite = checksums_and_finiteness(state)
    if not finite:
      newest = self.newest_step()
      raise FloatingPointError(
          f"the state after step {step} holds non-finite values: not saved; the newest checkpoint"
          f" {'is step ' + str(newest) if newest is not None else 'does not exist'} in {self.directory}"
          " (lower optimizer.lr / optimizer.poet_lr, or check the data)."
      )
    items = {"state": ocp.args.StandardSave(state), CHECKSUMS: ocp.args.JsonSave(sums)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:  # orbax first waits for the previous save, whose failure surfaces here
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as err:  # pylint: disable=broad-except
      raise self._save_failed(err) from err
    self._unchecked = self._unchecked or saved
    return saved

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
      raise self._save_failed(err) from err
    self._unchecked = False

  def check_saves(self) -> None:
    """Raises, naming the newest complete checkpoint, if an asynchronous save has failed.

    Only after a save started and once none is in flight: then `wait_until_finished`
    returns at once and raises the finished save's error (orbax's `check_for_errors`
    misses errors its own background thread has already collected). Other steps pay a
    flag test, not a call into orbax (which may synchronize processes).
    """
    if self._unchecked and not self.manager.is_saving_in_progress():
      self.wait()

  def _complete_steps(self) -> list[int]:
    """Steps whose directories are complete on disk (orbax renames a step's directory from
    its temporary name only once it is written)."""
    if not self.directory.exists():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())

  def _save_failed(self, err: Exception) -> RuntimeError:
    newest = max(self._complete_steps(), default=None)
    kept = f"the newest complete checkpoint is step {newest}" if newest is not None else "no checkpoint is complete"
    return RuntimeError(f"saving a checkpoint in {self.directory} failed ({type(err).__name__}: {str(err)[:300]}); {kept}."
                        " Fix the cause (a full disk, say) and re-run to resume.")

  def newest_step(self) -> int | None:
    return max(self._complete_steps(), default=None)

  def _set_aside(self, step: int) -> str | None:
    """Moves an unreadable step's directory aside (nothing is deleted), so that training can
    write that step again: to `unreadable_checkpoints/` beside the checkpoints, or, where that
    is another file system, to a non-step name inside the checkpoints' directory."""
    source = self.directory / str(step)
    target = None
    if jax.process_index() == 0 and source.exists():
      name = f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
      for folder in (self.directory.parent / "unreadable_checkpoints", self.directory / "unreadable"):
        try:
          folder.mkdir(parents=True, exist_ok=True)
          source.rename(folder / name)
          target = str(folder / name)
          break
        except OSError as err:  # another file system (EXDEV), say: try the next place
          logger.warning("could not move %s to %s (%s)", source, folder, err)
    if jax.process_count() > 1:  # every process lists the steps only after the move
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("poetx_jax_set_aside_checkpoint")
    self.manager.reload()
    return target

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any, data_iterator: Any | None) -> tuple[int, Any] | None:
    """Restores the newest readable checkpoint into `abstract_state`'s shapes and shardings.

    Args:
      abstract_state: a tree of `jax.ShapeDtypeStruct` with shardings (restoring
        against it keeps optax NamedTuples and places shards directly).
      data_iterator: a grain iterator to move to the saved position, or None.

    Returns:
      `(step, state)`, or None when the directory holds no checkpoint.

    Raises:
      RuntimeError: when checkpoints exist but none can be read.
    """
    steps = self.steps()
    failures = []
    for step in reversed(steps):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      recorded = (self.directory / str(step) / CHECKSUMS).exists()  # checkpoints of older versions have none
      if recorded:
        items[CHECKSUMS] = ocp.args.JsonRestore()
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if recorded:
          verify_checksums(restored["state"], restored[CHECKSUMS])
      except Exception as err:  # pylint: disable=broad-except
        # Any failure to read one step (missing files, bad metadata, truncated
        # arrays) must not lose the run: report it and fall back to the previous.
        logger.error("checkpoint at step %d in %s is unreadable (%s: %s); trying the previous one.",
                     step, self.directory, type(err).__name__, str(err)[:500])
        failures.append(step)
        last_error = f"{type(err).__name__}: {str(err)[:500]}"
        continue
      if failures:
        # Set aside only once a previous step has restored: with no readable checkpoint at
        # all the likelier cause is a settings mismatch, and the files stay where they are.
        moved = [self._set_aside(bad) for bad in failures]
        logger.warning("resumed from step %d; unreadable checkpoints %s moved to %s", step, failures,
                       ", ".join(m for m in moved if m))
      return step, restored["state"]
    if steps:
      raise RuntimeError(
          f"no readable checkpoint in {self.directory}: steps {failures} all failed to restore (the last"
          f" error: {last_error}). Checkpoints written with other model, optimizer or POET-X settings, or"
          " by a poetx_jax whose train state differs, do not restore: use their settings and version,"
          " or a new --workdir."
      )
    return None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


CHECKSUMS = "checksums"


def _as_uint32(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (narrower types widened), flattened."""
  x = jnp.asarray(x)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).reshape(-1)


@jax.jit
def _summaries(tree: Any) -> tuple[Any, jax.Array]:
  """Every array's two sums, and whether every floating value is finite: one program over the state."""

  def pair(x):
    words = _as_uint32(x)
    weights = jnp.arange(1, words.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])

  finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jax.tree_util.tree_map(pair, tree), jnp.all(jnp.stack(finite)) if finite else jnp.asarray(True)


def checksums_and_finiteness(tree: Any) -> tuple[dict[str, list[int]], bool]:
  """Two 32-bit sums of every array's bits (plain, and weighted by position), keyed by path,
  and whether every floating value of `tree` is finite.

  Computed on the device (orbax stores no checksums of its own); any flipped bit changes
  the plain sum, and moved values the weighted one.
  """
  sums, finite = jax.device_get(_summaries(tree))
  keyed = {jax.tree_util.keystr(path): [int(v) for v in value] for path, value in jax.tree_util.tree_leaves_with_path(sums)}
  return keyed, bool(finite)


def checksums(tree: Any) -> dict[str, list[int]]:
  """The sums of `checksums_and_finiteness`."""
  return checksums_and_finiteness(tree)[0]


def verify_checksums(tree: Any, recorded: dict[str, list[int]]) -> None:
  """Raises ValueError naming the first array whose bits differ from what was saved."""
  actual = checksums(tree)
  if set(actual) != set(recorded):
    raise ValueError(f"the checkpoint's checksums name other arrays ({sorted(set(actual) ^ set(recorded))[:3]} ...).")
  for key, value in actual.items():
    if list(value) != list(recorded[key]):
      raise ValueError(f"array {key} does not match its checksum: the checkpoint's data changed after it was saved.")


def abstract_tree(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s with shardings: the restore target of a checkpoint."""
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
