"""Fault drills against the installed ``galore-jax`` CLI (issue #12); prints a Markdown table.

Each drill is what an operator or a scheduler does to a run: SIGKILL mid-run and
resume, SIGTERM on a save step (preemption) and resume, a requeued job's ``--resume auto``
killed before and after its first checkpoint, a second process on the same
``--out``, a diverging learning rate, Ctrl-C during start-up, and SIGKILL of ``sample
--prompts --out`` mid-way, run again. Columns: the exit
code of each attempt, the checkpoint step a resume continued from, and whether
``metrics.jsonl`` holds exactly one training record per step done.

  python experiments/fault_drill.py [--workdir DIR] [--steps 12]

Tiny configuration (llama_tiny, 2 x 32 tokens per step): about 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time

TINY = [
  "--batch-size", "2", "--seq-len", "32", "--rank", "16", "--update-proj-gap", "2",
  "--eval-every", "1000", "--eval-batches", "2", "--no-progress",
]  # fmt: skip


def cli() -> list[str]:
  """The console script of this interpreter's install (not a pyenv shim: a shell
  script in between would swallow the signals sent to it)."""
  script = os.path.join(sysconfig.get_path("scripts"), "galore-jax")
  if os.path.exists(script):
    return [script]
  found = shutil.which("galore-jax")
  if found is None:
    sys.exit("galore-jax is not installed (pip install -e .)")
  return [found]


def start(args: list[str]) -> subprocess.Popen:
  return subprocess.Popen(cli() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(cli() + args, capture_output=True, text=True)


def exit_code(returncode: int) -> int:
  """As a shell reports it: a process killed by signal N exits 128 + N."""
  return 128 - returncode if returncode < 0 else returncode


def train_records(out: str) -> list[int]:
  path = os.path.join(out, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r["step"] for r in map(json.loads, f) if "loss" in r]


def wait_for_records(out: str, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while len(train_records(out)) < n and proc.poll() is None and time.time() < deadline:
    time.sleep(0.1)


def resumed_from(stdout: str) -> str:
  m = re.search(r"resumed from \S+/(\d+)", stdout)
  return m.group(1) if m else "-"


def metrics_ok(out: str, steps: int) -> str:
  got = train_records(out)
  return "yes" if got == list(range(1, steps + 1)) else f"no ({len(got)} records)"


def last_line(text: str) -> str:
  lines = [ln for ln in text.strip().splitlines() if ln.strip()]
  return lines[-1] if lines else ""


def drill_kill(work: str, steps: int, sig: signal.Signals, save_every: int) -> list[tuple]:
  out = os.path.join(work, f"{sig.name.lower()}_run")
  args = ["train", "--out", out, "--steps", str(steps), "--save-every", str(save_every), *TINY]
  proc = start(args)
  wait_for_records(out, steps // 2, proc)
  proc.send_signal(sig)
  _, err = proc.communicate()
  done = len(train_records(out))
  note = last_line(err) or f"killed with {done} metrics records, no message"
  rows = [
    (sig.name, f"train, {sig.name} after step ~{done}", exit_code(proc.returncode), "-", note)
  ]
  res = run(args + ["--resume"])
  rows.append(
    (sig.name, "train --resume", res.returncode, resumed_from(res.stdout), metrics_ok(out, steps))
  )
  return rows


def checkpoints(out: str) -> str:
  ckpt_dir = os.path.join(out, "checkpoints")
  steps = (
    sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []
  )
  return f"checkpoints {steps}"


def drill_requeue(work: str, steps: int) -> list[tuple]:
  """A scheduler that requeues a job runs its one command again: ``--resume auto``, killed
  before its first checkpoint, then after one, then left to finish."""
  out = os.path.join(work, "requeued_run")
  half = steps // 2
  args = ["train", "--out", out, "--steps", str(steps), "--save-every", str(half), *TINY]
  args += ["--resume", "auto"]
  rows = []
  for until, what in ((1, "before the first checkpoint"), (half + 1, f"after step {half}")):
    proc = start(args)
    wait_for_records(out, until, proc)
    proc.kill()
    out_text, _ = proc.communicate()
    rows.append(
      (
        "requeue",
        f"train --resume auto, SIGKILL {what} (step ~{len(train_records(out))})",
        exit_code(proc.returncode),
        resumed_from(out_text),
        checkpoints(out),
      )
    )
  res = run(args)
  rows.append(
    (
      "requeue",
      "the same command",
      res.returncode,
      resumed_from(res.stdout),
      metrics_ok(out, steps),
    )
  )
  return rows


def drill_concurrent(work: str, steps: int) -> list[tuple]:
  out = os.path.join(work, "shared_run")
  args = ["train", "--out", out, "--steps", str(steps), "--save-every", "2", *TINY]
  first = start(args)
  wait_for_records(out, 1, first)
  second = run(args + ["--seed", "1"])
  first.communicate()
  return [
    ("concurrent", "second train, same --out", second.returncode, "-", last_line(second.stderr)),
    ("concurrent", "first train", first.returncode, "-", metrics_ok(out, steps)),
  ]


def drill_divergence(work: str) -> list[tuple]:
  out = os.path.join(work, "diverged_run")
  res = run(["train", "--out", out, "--lr", "1e9", "--steps", "6", "--save-every", "1", *TINY])
  named = re.search(r"(\S+/checkpoints/(\d+))", res.stderr)
  rows = [("divergence", "train --lr 1e9", res.returncode, "-", last_line(res.stderr))]
  if named:
    ev = run(["eval", "--checkpoint", named.group(1), "--json"])
    loss = json.loads(last_line(ev.stdout))["eval_loss"] if ev.returncode == 0 else math.nan
    rows.append(
      (
        "divergence",
        f"eval of the named checkpoint {named.group(2)}",
        ev.returncode,
        named.group(2),
        f"eval loss {loss:.3f} (finite: {math.isfinite(loss)})",
      )
    )
  return rows


def drill_startup(work: str) -> list[tuple]:
  out = os.path.join(work, "interrupted_at_start")
  proc = start(["train", "--out", out, *TINY])
  deadline = time.time() + 120
  while not os.path.exists(out) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate()
  left = "nothing left" if not os.path.exists(out) else f"left {sorted(os.listdir(out))}"
  return [("Ctrl-C at start-up", "train", exit_code(proc.returncode), "-", left)]


def drill_sample(work: str, run_dir: str) -> list[tuple]:
  """sample --prompts --out: SIGKILL after a few replies, run again; the file must equal an
  uninterrupted run's."""
  prompts = os.path.join(work, "prompts.jsonl")
  with open(prompts, "w") as f:
    for i in range(24):
      f.write(json.dumps({"prompt": f"It was the {i}th day of"}) + "\n")
  base = ["sample", "--checkpoint", run_dir, "--prompts", prompts, "--batch-size", "1"]
  base += ["--max-new-tokens", "24"]
  whole, part = os.path.join(work, "replies_whole.jsonl"), os.path.join(work, "replies.jsonl")
  run([*base, "--out", whole])
  proc = start([*base, "--out", part])
  deadline = time.time() + 300
  lines = lambda: open(part).read().count("\n") if os.path.exists(part) else 0
  while lines() < 6 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  done = lines()
  again = run([*base, "--out", part])
  with open(whole) as a, open(part) as b:
    same = a.read() == b.read()
  return [
    (
      "SIGKILL",
      f"sample --out, killed after {done} of 24 replies",
      exit_code(proc.returncode),
      "-",
      "-",
    ),
    (
      "SIGKILL",
      "sample --out, run again",
      again.returncode,
      "-",
      f"file == uninterrupted run's: {same}",
    ),
  ]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default=None, help="default: a temporary directory")
  ap.add_argument("--steps", type=int, default=12)
  args = ap.parse_args()
  work = args.workdir or tempfile.mkdtemp(prefix="galore_fault_drill_")
  os.makedirs(work, exist_ok=True)
  rows = []
  rows += drill_kill(work, args.steps, signal.SIGKILL, save_every=3)
  rows += drill_kill(work, args.steps, signal.SIGTERM, save_every=1)
  rows += drill_requeue(work, args.steps)
  rows += drill_concurrent(work, args.steps)
  rows += drill_divergence(work)
  rows += drill_startup(work)
  rows += drill_sample(work, os.path.join(work, "sigkill_run"))
  print(f"steps per run: {args.steps}; runs in {work}; CLI {cli()[0]}\n")
  print(
    "| drill | attempt | exit code | checkpoint step resumed | metrics records == steps / note |"
  )
  print("|---|---|---|---|---|")
  for row in rows:
    cells = [str(c).replace("|", "/").replace(work + "/", "") for c in row]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
