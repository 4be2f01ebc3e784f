"""experiments/loop_overhead.py: the trainer's host time per step, with a stand-in step."""

import json

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
