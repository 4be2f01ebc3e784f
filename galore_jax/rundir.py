"""One process per run directory: an exclusive ``flock`` on ``<out>/.lock``.

The lock belongs to the open file, so the kernel releases it when the process
ends in any way (SIGKILL and out-of-memory kills included): a stale lock file is
never a held lock. The holder writes its PID into the file so that a second
process can name it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

LOCK_NAME = ".lock"


class RunDirError(OSError):
  """``--out`` cannot be used: not a directory, not writable, or locked by another process."""


def _holder(path: str) -> str:
  try:
    with open(path, encoding="ascii") as f:
      pid = f.read().strip()
  except OSError:
    pid = ""
  return f"process {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def locked(out: str) -> Iterator[bool]:
  """Holds the run directory ``out`` (created if missing) for the ``with`` block.

  Yields whether this call created the directory. Raises :class:`RunDirError`
  with a one-line reason if the directory cannot be created or written, or if
  another process holds it; nothing in ``out`` is touched then.
  """
  created = not os.path.exists(out)
  try:
    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    what = "is not a directory" if e.errno in (errno.ENOTDIR, errno.EEXIST) else "cannot be used"
    raise RunDirError(f"{out} {what} ({e.strerror})") from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
        raise RunDirError(f"{out}: cannot lock {LOCK_NAME} ({e.strerror})") from e
      raise RunDirError(
        f"{out} is in use by {_holder(os.path.join(out, LOCK_NAME))} (lock "
        f"{os.path.join(out, LOCK_NAME)}); wait for it to end or choose another --out"
      ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    yield created
  finally:
    os.close(fd)  # releases the lock; the file stays (harmless, and re-used next time)
