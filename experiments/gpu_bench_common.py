"""Helpers the benchmark's parent (``experiments/gpu_bench.py``) and its workers share.

The refresh schedule (which GaLore counts refresh which leaves), the amortised-cost
arithmetic, the guarded timing of refresh steps and the atomic JSON writes the workers
report through; and, for the GPU checks that run ``train`` itself, synthetic data and an
optional TensorBoard (the GPU image has no grain, tensorflow-datasets or, maybe,
tensorboardX). Standard library at import: every process imports it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any


def median(xs):
  """Median of the values that are not None; None if there are none (nothing measured)."""
  xs = [x for x in xs if x is not None]
  return statistics.median(xs) if xs else None


def ratio(a, b):
  """``a / b``, or None when either is missing or ``b`` is 0."""
  return a / b if a is not None and b not in (None, 0) else None


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Atomic write, so that a killed worker leaves its last complete record."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
  os.replace(tmp, path)


def quiet_counts(offsets: list[int], period: int, start: int = 1):
  """Yields GaLore counts >= ``start`` on which no leaf refreshes (none if every phase is used).

  A leaf with phase ``o`` refreshes at count 0 and at ``o, o + T, ...``
  (``galore_jax.optimizer.galore``); synchronous refresh is every phase 0.
  """
  used = {o % period for o in offsets}
  if len(used) >= period:
    return
  c = max(start, 1)
  while True:
    if c % period not in used:
      yield c
    c += 1


def stagger_groups(leaves: list[dict], period: int) -> list[dict]:
  """Groups a staggered schedule's phases by the shapes of the leaves refreshing at them.

  ``leaves``: one ``{"offset", "m", "n", "side", "rank"}`` per projected leaf. Returns
  one group per distinct multiset of shapes: ``{"signature", "phases", "phase"}`` where
  ``phase`` is the representative to time and ``phases`` how many phases of the period
  share the signature. Phases where no leaf refreshes are left out (they cost nothing).
  """
  by_phase: dict[int, list] = {}
  for leaf in leaves:
    key = (leaf["m"], leaf["n"], leaf["side"], leaf["rank"])
    by_phase.setdefault(leaf["offset"] % period, []).append(key)
  groups: dict[tuple, dict] = {}
  for phase in sorted(by_phase):
    sig = tuple(sorted(by_phase[phase]))
    g = groups.setdefault(sig, {"signature": [list(s) for s in sig], "phases": 0, "phase": phase})
    g["phases"] += 1
  return list(groups.values())


def amortised_share(step_s, excess_s_per_period, period):
  """Refresh cost per step, as a share of a plain step: ``excess / T / step_s``."""
  if step_s in (None, 0) or excess_s_per_period is None:
    return None
  return excess_s_per_period / period / step_s


def refresh_reps(
  step_once, reps: int, kill_at: float, predicted_s: float | None, res: dict, save
) -> list[float]:
  """Times ``step_once(k)`` for k = 1..reps while each is predicted to end before ``kill_at``."""
  times: list[float] = []
  for k in range(1, reps + 1):
    guess = times[-1] if times else predicted_s
    if guess is not None and time.time() + 1.5 * guess + 10 > kill_at:
      if not times:
        res["refresh_skipped"] = (
          f"predicted {guess:.1f} s, {kill_at - time.time():.0f} s left in this case's time"
        )
      break
    times.append(step_once(k))
    res.update(refresh_times_s=times, refresh_s=median(times))
    save()
  return times


def synthetic_data(batch_size: int, seq_len: int, batches: int = 64, seed: int = 0):
  """``(tokenizer, training stream, evaluation batches)`` for ``trainer.Hooks.data``: the
  bundled tokenizer and uniformly random tokens, without grain or tensorflow-datasets. The
  stream repeats ``batches`` fixed batches, so a resume reads the ones a straight run would."""
  import types

  import numpy as np
  import sentencepiece as spm

  import galore_jax

  tok = Path(galore_jax.__file__).parent / "data" / "tokenizer.model"
  sp = spm.SentencePieceProcessor(model_file=str(tok))
  rng = np.random.default_rng(seed)

  def batch(rows):
    ids = rng.integers(0, sp.get_piece_size(), (rows, seq_len + 1), dtype=np.int32)
    mask = np.ones((rows, seq_len), np.float32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": mask}

  fixed = [batch(batch_size) for _ in range(batches)]

  def iterate(start):
    for s in range(start, 10**9):
      yield fixed[s % len(fixed)]

  stream = types.SimpleNamespace(iterate=iterate, num_tokens=None, fingerprint=None)
  return sp, stream, [batch(batch_size)]


def tensorboard_optional() -> None:
  """Where tensorboardX is missing, ``train`` writes metrics.jsonl only (no event file)."""
  try:
    import tensorboardX  # noqa: F401
  except ImportError:
    from galore_jax import metrics

    class _NoTensorBoard:
      def __init__(self, *_):
        pass

      def scalars(self, *_):
        pass

      def close(self):
        pass

    metrics._TensorBoard = _NoTensorBoard
