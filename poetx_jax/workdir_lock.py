"""One training process per run directory: an exclusive lock on `workdir/.lock`.

Two runs in one workdir would interleave `metrics.jsonl` and overwrite each other's
checkpoints. The lock is an `fcntl.flock`, which the operating system releases when
its process ends, however it ends (a `kill -9` leaves no stale lock). The file holds
the holder's pid and host, which a refused run names. In a multi-process run only
process 0 takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from typing import Iterator

import jax

logger = logging.getLogger("poetx_jax")
LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock for the duration of the block.

  Raises:
    RuntimeError: naming the holder (pid, host) when another process holds it.
  """
  if jax.process_index() != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  handle = open(path, "a+")
  try:
    try:
      fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "an unknown process"
      raise RuntimeError(
          f"another run is using {workdir} ({holder}): wait for it to finish or stop it, or use another --workdir."
      ) from None
    except OSError as err:  # a file system without flock (Lustre without -o flock, some FUSE mounts)
      logger.warning("cannot lock %s (%s): not guarding against a second run in this workdir", path, err)
      yield
      return
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    handle.flush()
    yield
  finally:
    handle.close()  # releases the lock
