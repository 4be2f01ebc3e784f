"""Start-up of runs that differ from a first run only in the learning-rate schedule.

The train step takes its learning rate as an argument (README: "The learning rate is an
argument of the step"), so ``--steps``, ``--lr``, ``--warmup``, ``--schedule`` and
``--min-lr-ratio`` are not part of the compiled program: an lr sweep, or a resume that
extends a run, loads the first run's step from the traced-step cache and JAX's
compilation cache. This script runs ``galore-jax train`` three times in fresh processes
that share one new cache directory: a first start, then two starts with other schedule
settings. It prints each start's ``startup_s`` (process start to the end of the first step)
and ``compile_s`` from its ``metrics.jsonl``, whether it loaded the step from the step
cache, and the later starts' start-up over the first's, measured in this one run.

    python experiments/schedule_restart.py
    python experiments/schedule_restart.py --model llama_tiny --batch-size 2 --seq-len 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# The first start, then two starts whose settings differ from it only in the schedule.
STARTS = {
  "first": ["--steps", "3"],
  "other_lr": ["--steps", "6", "--stop-after", "3", "--lr", "0.005", "--warmup", "1"],
  "other_schedule": [
    "--steps", "20", "--stop-after", "3", "--schedule", "linear", "--min-lr-ratio", "0.5",
  ],
}  # fmt: skip


def measure(model: str, batch_size: int, seq_len: int, workdir: Path) -> dict:
  cache = workdir / "compile-cache"
  common = [
    "--model", model, "--batch-size", str(batch_size), "--seq-len", str(seq_len),
    "--eval-every", "1000", "--save-every", "1000", "--no-progress",
    "--compile-cache", str(cache),
  ]  # fmt: skip
  out: dict = {"model": model, "batch": f"{batch_size} x {seq_len}", "starts": {}}
  for name, flags in STARTS.items():
    run = workdir / name
    cmd = [sys.executable, "-m", "galore_jax.cli", "train", *common, "--out", str(run), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
      raise SystemExit(f"{name}: exit {done.returncode}\n{done.stdout}{done.stderr}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "startup_s" in r)
    out["starts"][name] = {
      "flags": " ".join(flags),
      "startup_s": round(first["startup_s"], 2),
      "compile_s": round(first["compile_s"], 2),
      "from_step_cache": "traced program from the step cache" in done.stdout + done.stderr,
    }
  base = out["starts"]["first"]["startup_s"]
  for name, start in out["starts"].items():
    if name != "first":
      start["startup_over_first"] = round(start["startup_s"] / base, 3)
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="llama_60m")
  p.add_argument("--batch-size", type=int, default=2)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--workdir", default=None, help="where the runs and the cache go (default: temp)")
  args = p.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="schedule_restart_") as tmp:
    workdir = Path(args.workdir or tmp)
    result = measure(args.model, args.batch_size, args.seq_len, workdir)
  for name, start in result["starts"].items():
    print(
      f"{name:>15}: startup {start['startup_s']:6.2f} s, compile {start['compile_s']:6.2f} s, "
      f"step cache {'yes' if start['from_step_cache'] else 'no '}  ({start['flags']})"
    )
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
