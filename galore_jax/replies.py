"""``sample --prompts FILE --out REPLIES``: replies written to a file that a killed run
resumes.

REPLIES holds one JSON line per prompt, in the prompts' order: the prompt's record with its
``"completion"`` and ``"finish_reason"``, as ``sample --prompts`` prints it. Each batch's
lines are written and ``fsync``-ed together, so a kill loses at most the batch in hand. A
later run with the same REPLIES keeps its lines and samples from the first prompt without
one. Prompt ``i`` draws with keys from ``--seed`` and ``i`` alone
(``sample.generate_batch``), so the resumed file is the file one uninterrupted run writes,
with the same ``--batch-size`` (which may change, e.g. after running out of memory: in
bfloat16 a batch of another size may round differently).

Guarded, so that a file never mixes replies of two settings or two files of prompts:

* every kept line must be the reply to the prompt at its place (else an error, and nothing
  is written);
* a line a kill cut short is removed (once the run has passed every check and loaded its
  model), if it is the start of the reply due there;
* ``REPLIES.settings.json`` records the sampling flags and the checkpoint's step; a resumed
  run with other flags, or a run directory that has saved a newer step since, is an error
  naming them (``--checkpoint RUN/checkpoints/STEP`` pins a step);
* one process at a time: the file is ``flock``-ed while a run writes it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
from typing import Any

from galore_jax.config import ConfigError

SETTINGS_SUFFIX = ".settings.json"
# What `sample --prompts` adds to each record, in this order ("completion" first: a line a
# kill cut short is recognised by what comes before it, ReplyFile._check_kept). A record's
# own fields of these names are replaced.
REPLY_FIELDS = ("completion", "finish_reason")


def _without(record: dict, *keys: str) -> dict:
  return {k: v for k, v in record.items() if k not in keys}


class ReplyFile:
  """The open, locked REPLIES file of a run; :attr:`kept` replies are already in it."""

  def __init__(
    self, path: str, records: list[tuple[dict, int]], settings: dict[str, Any], source: str
  ):
    """``records``: each prompt's JSON record and its line in ``source``, the prompts file;
    ``settings``: the sampling flags, compared with those the file was written with."""
    self.path = os.path.expanduser(path)
    self.settings_path = self.path + SETTINGS_SUFFIX
    self.settings = dict(settings)
    try:
      self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
      raise ConfigError("--out", f"{path}: {e.strerror}") from e
    try:
      self._lock()
      self.kept = self._check_kept(records, source)
      # Settings of a file without replies (a run killed while loading) bind nothing.
      self.saved = self._read_settings() if self.kept else None
      if self.saved is not None:
        self._compare(_without(self.saved, "step"), _without(self.settings, "step"))
      elif self.kept:
        print(
          f"galore-jax: note: {path} holds {self.kept} replies but no {self.settings_path}: "
          "they are taken to be this run's settings",
          file=sys.stderr,
        )
    except BaseException:
      os.close(self.fd)
      raise

  def _lock(self) -> None:
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
        raise ConfigError("--out", f"{self.path}: cannot lock it ({e.strerror})") from e
      raise ConfigError(
        "--out", f"{self.path} is being written by another galore-jax sample"
      ) from None

  def _check_kept(self, records: list[tuple[dict, int]], source: str) -> int:
    with open(self.path, "rb") as f:
      data = f.read()
    whole = data[: data.rfind(b"\n") + 1]
    lines = whole.decode("utf-8", errors="replace").split("\n")[:-1]
    if len(lines) > len(records):
      raise ConfigError(
        "--out",
        f"{self.path} has {len(lines)} lines, more than {source} has prompts ({len(records)}); "
        "choose another --out",
      )
    for i, line in enumerate(lines):
      try:
        got = json.loads(line)
      except json.JSONDecodeError:
        got = None
      record, line_no = records[i]
      # Lines written before "finish_reason" existed have "completion" alone.
      want = _without(record, *REPLY_FIELDS)
      if not (
        isinstance(got, dict) and "completion" in got and _without(got, *REPLY_FIELDS) == want
      ):
        raise ConfigError(
          "--out",
          f"{self.path} line {i + 1} is not the reply to {source} line {line_no}; "
          "choose another --out",
        )
    tail = data[len(whole) :].decode("utf-8", errors="replace")
    if tail:
      # What a kill can leave: the first part of the line due here.
      due = ""  # the start of the reply line due here (the record, then "completion")
      if len(lines) < len(records):
        due = json.dumps(_without(records[len(lines)][0], *REPLY_FIELDS))[:-1]
        due += ', "completion": '
      if not due or not (due.startswith(tail) or tail.startswith(due)):
        raise ConfigError(
          "--out", f"{self.path} ends in a line that is no reply of this run; choose another --out"
        )
    self.whole_bytes = len(whole)  # the cut line goes once every check has passed (start)
    return len(lines)

  def _read_settings(self) -> dict | None:
    try:
      with open(self.settings_path, encoding="utf-8") as f:
        saved = json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:
      raise ConfigError("--out", f"{self.settings_path} cannot be read ({e})") from e
    if not isinstance(saved, dict):
      raise ConfigError("--out", f"{self.settings_path} is not a settings record")
    return saved

  def _compare(self, saved: dict, now: dict) -> None:
    differ = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if differ:
      was = ", ".join(f"{k} {saved.get(k)!r} (now {now.get(k)!r})" for k in differ)
      raise ConfigError(
        "--out", f"{self.path} was written with other settings: {was}; choose another --out"
      )

  def check_step(self, step: int) -> None:
    """A checkpoint at ``step`` may continue the file (called before its weights are read)."""
    if self.saved is not None and self.saved.get("step") != step:
      was = self.saved.get("step")
      pinned = os.path.join(self.settings.get("checkpoint", "RUN/checkpoints"), str(was))
      raise ConfigError(
        "--out",
        f"{self.path} holds replies of step {was}, the checkpoint is at step {step} now; "
        f"pass --checkpoint {pinned} to continue it, or choose another --out",
      )

  def start(self, step: int) -> None:
    """Once the model of ``step`` (checked with :meth:`check_step`) is loaded: removes a cut
    line and records the settings."""
    os.ftruncate(self.fd, self.whole_bytes)  # a line a kill cut short
    self.settings["step"] = step
    if self.saved is None:  # this run's settings, for the runs that continue the file
      tmp = self.settings_path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(self.settings, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.settings_path)
      self.saved = self.settings

  def write(self, records: list[dict]) -> None:
    """Appends one batch's records (each with its ``"completion"``) and syncs them."""
    data = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    view = memoryview(data)
    while view:
      view = view[os.write(self.fd, view) :]
    os.fsync(self.fd)

  def close(self) -> None:
    os.close(self.fd)  # releases the lock
