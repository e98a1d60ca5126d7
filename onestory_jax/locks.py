"""One writer per training workdir and per story folder: an exclusive file lock (``filelock``) held for the run.

The lock is the operating system's (``flock`` on a file in the directory), so it goes away when its process ends,
however it ends. Next to it, ``<lock>.holder.json`` names the holder (pid, host, start time) for the message that a
second writer gets. Object stores (``gs://``, ``s3://``) have no file locks: a run there takes none and says so.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from typing import Iterator

from absl import logging
import filelock

_HELD: set[str] = set()  # the lock files this process holds


class InUse(RuntimeError):
  """Another process holds the lock of the directory (the message names it and the lock file)."""


def _describe(holder_file: str) -> str:
  try:
    with open(holder_file) as f:
      h = json.load(f)
    return f"pid {h['pid']} on {h['host']}, since {h['started']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "another process"


@contextlib.contextmanager
def exclusive(directory: str, what: str, name: str = ".lock") -> Iterator[None]:
  """Holds ``directory/name`` for the ``with`` block; ``what`` names the directory's role in messages.

  Nested use in the process that holds the lock is a no-op.

  Raises:
    InUse: another process holds it; the message names that process and the lock file.
  """
  if "://" in directory:
    logging.warning("%s %s is not a local path: no lock is taken, so make sure one run writes it", what, directory)
    yield
    return
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(os.path.abspath(directory), name)
  if path in _HELD:  # this process holds it already (an entry point that locks before it loads anything)
    yield
    return
  holder = path + ".holder.json"
  lock = filelock.FileLock(path)
  try:
    lock.acquire(timeout=0)
  except filelock.Timeout:
    raise InUse(
        f"{what} {directory} is in use by {_describe(holder)}: wait for that run or stop it (its lock {path} goes "
        "when it ends; delete that file only if the process is gone and the lock stays, as on a network filesystem)"
    ) from None
  _HELD.add(path)
  try:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    with open(holder, "w") as f:
      json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": started}, f)
    yield
  finally:
    _HELD.discard(path)
    with contextlib.suppress(OSError):
      os.remove(holder)
    lock.release()
