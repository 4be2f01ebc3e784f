"""Orbax checkpoints of a training run: params, optimizer state, step and run metadata.

Layout: ``<out>/checkpoints/<step>/{params,opt_state,meta}``. ``params`` and
``opt_state`` (GaLore projectors included) are separate items so ``eval`` and
``sample`` restore the weights alone; ``meta`` is JSON: the model and
optimizer configuration, the tokenizer's vocabulary size and hash, the seed
and the data position (the step: batches are a pure function of seed and
step). A checkpoint that cannot be read, or that belongs to another model,
optimizer or tokenizer, raises :class:`CheckpointError`; nothing falls back
to a fresh start. One that cannot be written (a full disk) raises
:class:`CheckpointWriteError`; :func:`recover` removes its partial files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from galore_jax.errors import first_line

CHECKPOINT_FORMAT = 1
KEEP_CHECKPOINTS = 3  # --keep-checkpoints default


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable or incompatible with the requested run."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, quota, permissions). The checkpoints
  written before it are intact."""


class CheckpointPruned(CheckpointError):
  """The checkpoint was deleted while it was read: a run still training in its directory
  keeps only its newest checkpoints. Reading the latest one again finds a newer one."""


def _step_dir(path: str) -> tuple[str, int] | None:
  """``(checkpoints folder, step)`` if ``path`` is one step's folder (``.../checkpoints/35``)."""
  head, tail = os.path.split(os.path.abspath(path))
  if tail.isdigit() and (
    os.path.isdir(os.path.join(path, "meta")) or os.path.basename(head) == "checkpoints"
  ):
    return head, int(tail)
  return None


def checkpoint_dir(path: str) -> str:
  """Accepts a run directory (``--out``), its ``checkpoints`` folder or one step's folder."""
  step_dir = _step_dir(path)
  if step_dir is not None:
    return step_dir[0]
  path = os.path.abspath(path)
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def finished_steps(ckpt_dir: str) -> list[int]:
  """The steps of the committed checkpoints in ``ckpt_dir``, newest first, read from the
  directory alone (no orbax, no JAX: usable before a multi-process job has joined, or
  after one of its processes is gone). Orbax commits a step by renaming its directory to
  the bare number; unfinished saves carry a suffix."""
  try:
    return sorted((int(n) for n in os.listdir(ckpt_dir) if n.isdigit()), reverse=True)
  except OSError:
    return []


def saved_meta(out: str, key: str) -> tuple[int, dict[str, Any]] | None:
  """``(step, metadata)`` of the newest checkpoint in run directory ``out`` whose metadata
  reads and has a dict under ``key`` (:func:`finished_steps`), or None. Read as JSON, without
  orbax: ``train --resume`` takes the run's flags from it before a multi-process job has
  joined."""
  ckpt_dir = os.path.join(os.path.abspath(out), "checkpoints")
  for step in finished_steps(ckpt_dir):
    try:
      with open(os.path.join(ckpt_dir, str(step), "meta", "metadata")) as f:
        meta = json.load(f)
    except (OSError, ValueError):
      continue  # an unreadable one: the trainer's own read reports it
    if isinstance(meta, dict) and isinstance(meta.get(key), dict):
      return step, meta
  return None


def saved_record(out: str, key: str) -> tuple[int, dict[str, Any]] | None:
  """``(step, record)``: the dict under ``key`` in :func:`saved_meta`'s metadata, or None."""
  found = saved_meta(out, key)
  return None if found is None else (found[0], found[1][key])


def saved_train_config(out: str) -> tuple[int, dict[str, Any]] | None:
  """``(step, train_config)`` of the run in ``out`` (:func:`saved_record`)."""
  return saved_record(out, "train_config")


def step_in_path(path: str) -> int | None:
  """The step named by ``path`` if it is one step's folder, else None (the latest)."""
  step_dir = _step_dir(path)
  return None if step_dir is None else step_dir[1]


def manager(
  path: str, *, keep: int | None = KEEP_CHECKPOINTS, create: bool = True
) -> ocp.CheckpointManager:
  """``keep``: how many of the newest checkpoints rotation keeps (None: all).

  The trainer saves only after a healthy step (finite loss and gradients, no skipped
  step in the current streak), so the ``keep`` newest checkpoints always include the
  newest one a diverged run can go back to.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  return ocp.CheckpointManager(checkpoint_dir(path), options=options)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict[str, Any]) -> None:
  """Saves synchronously: when this returns, the checkpoint is committed on disk.

  A write that fails raises :class:`CheckpointWriteError` naming the cause. Orbax commits a
  step by renaming its directory, so the older checkpoints are intact; :func:`recover`
  gives a manager to save with again."""
  meta = dict(meta, format=CHECKPOINT_FORMAT, step=int(step))
  _hide_failed_io_echoes()
  try:
    # Orbax logs every failed write of every array with its traceback (hundreds of lines
    # for one full disk); the error raised below says it once.
    with _quiet_absl():
      mngr.save(
        int(step),
        args=ocp.args.Composite(
          params=ocp.args.StandardSave(params),
          opt_state=ocp.args.StandardSave(opt_state),
          meta=ocp.args.JsonSave(meta),
        ),
        force=True,
      )
      mngr.wait_until_finished()
  except Exception as e:  # noqa: BLE001 - orbax raises ValueError / OSError / RuntimeError
    with contextlib.suppress(Exception), _quiet_absl():
      mngr.wait_until_finished()
    raise CheckpointWriteError(
      f"checkpoint {step} could not be written in {mngr.directory} ({_write_failure(e)})"
    ) from e
  # Partial directories of earlier steps (a failed save, a killed process) are never
  # finished now: their space goes back.
  _remove_partials(str(mngr.directory), lambda s: s < int(step))


def recover(mngr: ocp.CheckpointManager, step: int, keep: int | None) -> ocp.CheckpointManager:
  """After a failed :func:`save` of ``step``: a new manager of the same directory, and (in a
  single process) the step's partial directory removed. The old manager has lost count of
  the checkpoints on disk (its next save would not prune the oldest), and its background
  writes of the failed step may outlive the error; closing it first ends them."""
  directory = str(mngr.directory)
  with contextlib.suppress(Exception), _quiet_absl():
    mngr.close()
  _remove_partials(directory, lambda s: s == int(step))
  return manager(directory, keep=keep)


_PARTIAL = re.compile(r"(\d+)\.orbax-checkpoint-tmp")


def _remove_partials(directory: str, of_step: Callable[[int], bool]) -> None:
  """Removes orbax's uncommitted step directories (``N.orbax-checkpoint-tmp...``) whose step
  ``of_step`` selects; in a single process only (other processes may be writing theirs)."""
  if jax.process_count() != 1:
    return
  for name in os.listdir(directory):
    found = _PARTIAL.match(name)
    if found and of_step(int(found.group(1))):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


_OS_FAILURE = re.compile(
  r"No space left on device|Disk quota exceeded|File too large|Read-only file system|"
  r"Permission denied"
)


def _write_failure(error: BaseException) -> str:
  """The cause of a failed write in a few words: the OS error inside orbax's message."""
  found = _OS_FAILURE.search(str(error))
  if found:
    return found.group(0)
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return first_line(error)


def _from_failed_write(error: BaseException | None) -> bool:
  """An error that only echoes a failed checkpoint write: raised in orbax, or its
  background writes reporting to an event loop that the failed save has closed."""
  if error is None:
    return False
  if "Event loop is closed" in str(error) or ".orbax-checkpoint-tmp" in str(error):
    return True
  tb = error.__traceback__
  while tb is not None:
    if "orbax" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


class _EchoFilter(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and _from_failed_write(record.exc_info[1]))


_echoes_hidden = False


def _hide_failed_io_echoes() -> None:
  """A failed write leaves orbax's other write futures to fail, during the save and after
  it, each printed with its traceback (asyncio's "exception was never retrieved", and
  "Event loop is closed" through ``sys.unraisablehook``): dozens of tracebacks around the
  one-line report. A corrupt checkpoint's failed read does the same with orbax's other
  reads (up to hundreds, on the way out of ``train --resume``). Drops those echoes, and
  nothing else, from the first save or restore on."""
  global _echoes_hidden
  if _echoes_hidden:
    return
  _echoes_hidden = True
  logging.getLogger("asyncio").addFilter(_EchoFilter())
  # Orbax's write coroutines that a failed save's closed loop never ran, when collected.
  warnings.filterwarnings("ignore", r"coroutine 'async_serialize_from_host\.", RuntimeWarning)
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _from_failed_write(unraisable.exc_value):
      previous(unraisable)

  sys.unraisablehook = hook


@contextlib.contextmanager
def _quiet_absl():
  log = logging.getLogger("absl")
  level = log.level
  log.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    log.setLevel(level)


def latest_step(path: str) -> int | None:
  d = checkpoint_dir(path)
  if not os.path.isdir(d):
    return None
  return manager(d, create=False).latest_step()


def read_meta(path: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """The step and metadata of the latest (or given) checkpoint under ``path``."""
  d = checkpoint_dir(path)
  if not os.path.isdir(d):
    raise CheckpointError(f"no checkpoint directory at {path}")
  mngr = manager(d, create=False)
  step = step_in_path(path) if step is None else step
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no complete checkpoint under {d}")
  if step not in mngr.all_steps():
    have = ", ".join(map(str, sorted(mngr.all_steps()))) or "none"
    raise CheckpointError(f"no checkpoint of step {step} in {d} (steps there: {have})")
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001 - any read failure means the same to the user
    raise _read_error(d, step, e, "is unreadable (corrupt or incomplete)") from e
  if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
    raise CheckpointError(
      f"checkpoint {d}/{step} has no galore-jax metadata (format {CHECKPOINT_FORMAT})"
    )
  return step, meta


def _read_error(d: str, step: int, error: Exception, what: str, limit: int = 200):
  """The CheckpointError for a failed read of checkpoint ``step`` in ``d``. A checkpoint
  that is gone afterwards was not corrupt: a run still training in that directory pruned it
  (``--keep-checkpoints``) while ``eval`` / ``sample`` / ``export`` read it."""
  if not os.path.isdir(os.path.join(d, str(step))):
    return CheckpointPruned(
      f"checkpoint {d}/{step} was removed while it was being read (a run still training "
      f"there keeps only its newest checkpoints, --keep-checkpoints); read it again, or "
      f"name a step it keeps"
    )
  # TensorStore appends a dump of the array's spec, which says nothing to the user.
  why = first_line(error, limit).split(" See full TensorStore details")[0].rstrip(".")
  message = f"checkpoint {d}/{step} {what}: {type(error).__name__}: {why}"
  try:
    older = [s for s in manager(d, create=False).all_steps() if s < step]
  except Exception:  # noqa: BLE001 - the hint is optional; the error is the message above
    older = []
  if older:  # a way on without deleting anything, for a job that resumes on its own too
    message += (
      f"; the checkpoint before it is {d}/{max(older)}: move {d}/{step} aside to resume "
      f"from it, or pass it to --checkpoint"
    )
  return CheckpointError(message)


def restore(path: str, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
  """Restores the items named in ``abstract`` (``params``, ``opt_state``) onto its shardings.

  ``abstract`` holds ``jax.ShapeDtypeStruct`` trees (with ``sharding`` set) of
  the state the current run expects; a shape or structure mismatch is a
  :class:`CheckpointError` naming the checkpoint.
  """
  d = checkpoint_dir(path)
  mngr = manager(d, create=False)
  args = {k: ocp.args.StandardRestore(v) for k, v in abstract.items()}
  _hide_failed_io_echoes()
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # noqa: BLE001
    raise _read_error(
      d,
      step,
      e,
      "could not be restored into this run's state (corrupt, or saved by a different "
      "configuration)",
      limit=300,
    ) from e
  for k, v in abstract.items():
    got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), out[k])
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), v)
    if got != want:
      raise CheckpointError(f"checkpoint {d}/{step}: {k} does not match this run's shapes")
  return {k: out[k] for k in abstract}
