"""Run metrics: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard.

Training records carry ``step``, ``loss``, ``lr``, ``tokens_per_s`` (and
``grad_norm``, ``skipped``); evaluation records carry ``step``, ``eval_loss``
and ``eval_ppl``. ``step`` counts optimizer updates done when the record was
written, so a record with ``step: 1`` describes the first update.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


class MetricsWriter:
  """Appends records to ``<out>/metrics.jsonl`` and TensorBoard events under ``<out>/tb``.

  Appending (never truncating) keeps the history of a resumed run in one file.
  """

  def __init__(self, out_dir: str, *, tensorboard: bool = True):
    os.makedirs(out_dir, exist_ok=True)
    self.path = os.path.join(out_dir, "metrics.jsonl")
    self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # lazy: only runs that log need it

      self._tb = SummaryWriter(os.path.join(out_dir, "tb"))

  def write(self, record: dict[str, Any]) -> None:
    clean = {k: _jsonable(v) for k, v in record.items()}
    self._file.write(json.dumps(clean) + "\n")
    self._file.flush()
    if self._tb is not None:
      step = int(clean["step"])
      for key, value in clean.items():
        if key != "step" and isinstance(value, int | float) and value is not None:
          self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _jsonable(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
  return v


def read_metrics(out_dir: str) -> list[dict[str, Any]]:
  """All records of a run directory, in the order they were written."""
  with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def drop_after(out_dir: str, step: int) -> int:
  """Removes the records of steps after ``step`` (a resumed run replays them); returns
  how many were dropped. The file is rewritten atomically (a temporary file, then
  ``os.replace``), so a crash leaves either the old or the new file, never a mix."""
  path = os.path.join(out_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  keep = []
  for line in lines:
    try:
      if int(json.loads(line)["step"]) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      pass  # a record cut short by a crash mid-write: dropped with the replayed ones
  if len(keep) == len(lines):
    return 0
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(keep)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return len(lines) - len(keep)
