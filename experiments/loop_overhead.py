"""The trainer's host time per step: what ``train`` does between two train steps besides
the step itself (the next batch, the learning rate, the metrics record, the checks).

The trainer starts a step before it reads the last one's metrics, so on a GPU this host
time overlaps the device's step wherever it is shorter than the step. Here the train step
is replaced by a stand-in that returns the first (real) step's outputs again, so the loop's
own time is what is left; the figure is the median time between two stand-in calls over
``--steps`` steps of ``galore-jax train`` on the bundled corpus (no evaluation or
checkpoint in between). ``--real-step`` keeps the real step: the figure is then the time
per step, loop and step together.

    python experiments/loop_overhead.py --steps 300
    python experiments/loop_overhead.py --steps 500 --batch-size 2 --seq-len 32 --real-step
    python experiments/loop_overhead.py --real-step --compare-wait --synthetic-data \
        --steps 60 -- --model llama_1b --dtype bfloat16 --param-dtype bfloat16 --rank 512

The last is the GPU check ``train1b`` (``gpu_checks.sh``): the trainer's own step rate at
``llama_1b``, overlapping the next step as it does now and waiting for each step as it did
(a callback after every step makes it wait), measured in one process.

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
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # gpu_bench_common, when this file is imported by path
  sys.path.append(HERE)


def train_config(flags: list[str], **fixed):
  """The TrainConfig of ``galore-jax train`` ``flags`` (its own parser), then ``fixed``."""
  import dataclasses

  from galore_jax import cli

  return dataclasses.replace(
    cli._train_config(cli.build_parser().parse_args(["train", *flags])), **fixed
  )


def measure(
  steps: int,
  batch_size: int,
  seq_len: int,
  progress: bool,
  real_step: bool = False,
  train_flags: tuple[str, ...] = (),
  wait_each_step: bool = False,
  synthetic_data: bool = False,
) -> dict:
  """``wait_each_step``: a callback after every step, with which the trainer reads each
  step's metrics before it starts the next (as it did for every run before this round).
  ``synthetic_data``: random tokens instead of ``--data`` (no grain needed)."""
  import jax
  import numpy as np

  from galore_jax import metrics, trainer

  real = trainer.cached_train_step
  calls: list[float] = []

  def stand_in(run, hooks, log, **kw):
    step_fn, first = real(run, hooks, log, **kw), []

    def step(params, opt_state, batch, lr):
      calls.append(time.perf_counter())
      if real_step:
        return step_fn(params, opt_state, batch, lr)
      if not first:
        first.append(jax.block_until_ready(step_fn(params, opt_state, batch, lr)))
      return first[0]

    return step

  data = None
  if synthetic_data:
    import gpu_bench_common

    gpu_bench_common.tensorboard_optional()
    data = gpu_bench_common.synthetic_data(batch_size, seq_len)
  hooks = trainer.Hooks(
    data=data,
    # No evaluation (its compilation) or checkpoint (gigabytes at 1B) after the last step.
    evaluate=lambda run, params, eval_fn: (0.0, 1.0),
    save=lambda *_: None,
    after_step=[lambda step, m: None] if wait_each_step else [],
  )
  trainer.cached_train_step = stand_in
  try:
    with tempfile.TemporaryDirectory() as out:
      cfg = train_config(
        list(train_flags),
        out=out,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        eval_every=10**9,
        save_every=10**9,
        progress=progress,
      )
      trainer.train(cfg, log=lambda *_: None, hooks=hooks)
      records = [r for r in metrics.read_metrics(out) if "loss" in r]
  finally:
    trainer.cached_train_step = real
  gaps = np.diff(calls[5:]) * 1e3  # after the first steps (compiling, warming up)
  name = "ms_per_step" if real_step else "host_ms_per_step"
  return {
    "steps": steps,
    "batch": f"{batch_size} x {seq_len}",
    "train_flags": " ".join(train_flags),
    "loop": "waits for each step" if wait_each_step else "overlaps the next step",
    "step": "real" if real_step else "stand-in",
    f"{name}_median": round(float(np.median(gaps)), 3),
    f"{name}_p90": round(float(np.percentile(gaps, 90)), 3),
    # The trainer's own record of the same steps (metrics.jsonl's step_s).
    "trainer_step_s_median": round(float(np.median([r["step_s"] for r in records[5:]])), 6),
    "skipped_steps": sum(r["skipped"] for r in records),
    "backend": jax.default_backend(),
  }


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--seq-len", type=int, default=256)
  ap.add_argument("--progress", action="store_true", help="with the progress bar or lines")
  ap.add_argument(
    "--real-step",
    action="store_true",
    help="keep the real train step: the figure is then the time per step, loop and step",
  )
  ap.add_argument(
    "--compare-wait",
    action="store_true",
    help="with --real-step: also run with the trainer reading each step's metrics before it "
    "starts the next (a callback after every step), and report the ratio",
  )
  ap.add_argument(
    "--synthetic-data",
    action="store_true",
    help="random tokens and the bundled tokenizer (no grain or tensorflow-datasets: the GPU image)",
  )
  ap.add_argument("--json", default=None)
  ap.add_argument("train_flags", nargs="*", help="after --: flags of galore-jax train")
  args = ap.parse_args(argv)
  if args.compare_wait and not args.real_step:
    ap.error("--compare-wait measures real steps: add --real-step")
  run = lambda wait: measure(
    args.steps,
    args.batch_size,
    args.seq_len,
    args.progress,
    args.real_step,
    tuple(args.train_flags),
    wait_each_step=wait,
    synthetic_data=args.synthetic_data,
  )
  if not args.compare_wait:
    result = run(False)
  else:
    from galore_jax import compile_cache

    with tempfile.TemporaryDirectory() as cache:
      compile_cache.enable(cache)  # the second run loads what the first compiled
      overlapped = run(False)
      if args.json:  # the first half, should the second not finish
        Path(args.json).write_text(json.dumps({"overlapped": overlapped}, indent=1) + "\n")
      waiting = run(True)
    result = {
      "overlapped": overlapped,
      "waiting": waiting,
      "waiting_over_overlapped": round(
        waiting["ms_per_step_median"] / overlapped["ms_per_step_median"], 4
      ),
    }
  print(json.dumps(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
