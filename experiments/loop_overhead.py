"""The trainer's host time per step: what ``train`` does between two train steps besides
the step itself (the next batch, the learning rate, the metrics record, the checks).

The trainer waits for each step's metrics before it starts the next, so on a GPU this host
time is device idle time, every step. Here the train step is replaced by a stand-in that
returns the first (real) step's outputs again, so the loop's own time is what is left;
the figure is the median time between two stand-in calls over ``--steps`` steps of
``galore-jax train`` on the bundled corpus (no evaluation or checkpoint in between).

    python experiments/loop_overhead.py --steps 300

Run old and new code in separate processes to compare (this machine's speed drifts).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


def measure(steps: int, batch_size: int, seq_len: int, progress: bool) -> dict:
  import jax
  import numpy as np

  from galore_jax import train, trainer

  real = trainer.cached_train_step
  calls: list[float] = []

  def stand_in(run, hooks, log, **kw):
    step_fn, first = real(run, hooks, log, **kw), []

    def step(params, opt_state, batch):
      calls.append(time.perf_counter())
      if not first:
        first.append(jax.block_until_ready(step_fn(params, opt_state, batch)))
      return first[0]

    return step

  trainer.cached_train_step = stand_in
  try:
    with tempfile.TemporaryDirectory() as out:
      cfg = train.TrainConfig(
        out=out,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        eval_every=10**9,  # evaluation and saving only after the last step
        save_every=10**9,
        progress=progress,
      )
      train.train(cfg, log=lambda *_: None)
  finally:
    trainer.cached_train_step = real
  gaps = np.diff(calls[5:]) * 1e3  # after the first steps (compiling, warming up)
  return {
    "steps": steps,
    "batch": f"{batch_size} x {seq_len}",
    "host_ms_per_step_median": round(float(np.median(gaps)), 3),
    "host_ms_per_step_p90": round(float(np.percentile(gaps, 90)), 3),
    "backend": jax.default_backend(),
  }


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--seq-len", type=int, default=256)
  ap.add_argument("--progress", action="store_true", help="with the progress bar or lines")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  result = measure(args.steps, args.batch_size, args.seq_len, args.progress)
  print(json.dumps(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
