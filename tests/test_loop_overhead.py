"""experiments/loop_overhead.py: the trainer's host time per step, with a stand-in step."""

import json
import subprocess
import sys
from pathlib import Path

from galore_jax import trainer


def test_reports_the_loops_time_per_step_and_restores_the_trainer(load_experiment, capsys):
  loop_overhead = load_experiment("loop_overhead")
  real = trainer.cached_train_step
  args = ["--steps", "12", "--batch-size", "8", "--seq-len", "32"]
  assert loop_overhead.main(args) == 0
  result = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert result["steps"] == 12 and result["batch"] == "8 x 32"
  assert 0 < result["host_ms_per_step_median"] <= result["host_ms_per_step_p90"]
  assert trainer.cached_train_step is real  # the stand-in is gone after the run


def test_the_gpu_check_runs_without_grain_tensorflow_datasets_or_tensorboard(tmp_path):
  # gpu_checks.sh's train1b: the real step, two programs, synthetic tokens, both loops, in a
  # process where the GPU image's missing packages cannot be imported (train must not
  # import the data pipeline for data it is handed).
  blocker = (
    "import runpy, sys\n"
    "class Missing:\n"
    "  def find_spec(self, name, path=None, target=None):\n"
    "    if name.split('.')[0] in ('grain', 'tensorflow_datasets', 'tensorboardX'):\n"
    "      raise ModuleNotFoundError(name)\n"
    "sys.meta_path.insert(0, Missing())\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
  )
  script = Path(__file__).resolve().parents[1] / "experiments" / "loop_overhead.py"
  out = tmp_path / "train1b.json"
  args = "--steps 8 --batch-size 2 --seq-len 32 --real-step --compare-wait --synthetic-data"
  train = "--rank 16 --update-proj-gap 3 --refresh-programs two"
  done = subprocess.run(
    [
      sys.executable,
      "-c",
      blocker,
      str(script),
      *args.split(),
      "--json",
      str(out),
      "--",
      *train.split(),
    ],  # fmt: skip
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(out.read_text())
  for loop in ("overlapped", "waiting"):
    assert result[loop]["step"] == "real" and result[loop]["skipped_steps"] == 0
    assert 0 < result[loop]["ms_per_step_median"] <= result[loop]["ms_per_step_p90"]
  assert result["overlapped"]["loop"] == "overlaps the next step"
  assert result["waiting"]["loop"] == "waits for each step"
  assert result["waiting_over_overlapped"] > 0
