"""The run configuration (galore_jax.config): durations, learning-rate schedules and their
defaults, the changes a resume names."""

import dataclasses

import pytest

from galore_jax import (
  config,
  train,
)


def test_time_limits_are_durations_with_units():
  seconds = {"23h50m": 85800, "90m": 5400, "1d": 86400, "1.5h": 5400, "45s": 45}
  seconds |= {"23:50:00": 85800, "10:00": 600, "1-00:00:00": 86400, "2h30m15s": 9015}
  for spec, want in seconds.items():
    assert config.parse_duration(spec) == want, spec
  for bad in ("90", "", "h", "5m3h", "1:2:3:4", "x-1:00", "0s"):
    with pytest.raises(config.ConfigError, match="^--time-limit: "):
      config.parse_duration(bad)


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
  cfg = train.TrainConfig(steps=100, lr=0.01)
  sched = train.lr_schedule(cfg)
  assert float(sched(0)) == 0.0
  assert float(sched(10)) == pytest.approx(0.01)
  assert float(sched(100)) == pytest.approx(0.001)
  assert train.TrainConfig(optimizer="adamw").peak_lr == 1e-3


def test_a_fine_tune_defaults_to_a_fine_tuning_rate():
  # --init-from without --lr: not pretraining's 0.01 / 1e-3, which would overwrite what the
  # model learned; an explicit --lr still wins.
  for optimizer in ("galore_adamw", "adamw", "galore_adamw8bit"):
    cfg = train.TrainConfig(init_from="hf_model", optimizer=optimizer)
    assert cfg.peak_lr == config.FINETUNE_LR == 2e-5
    assert dataclasses.replace(cfg, lr=1e-4).peak_lr == 1e-4
  assert train.TrainConfig().peak_lr == 0.01


@pytest.mark.parametrize(
  "schedule, at_55, at_100", [("linear", 0.0055, 0.001), ("constant", 0.01, 0.01)]
)
def test_lr_schedules_after_warmup(schedule, at_55, at_100):
  cfg = train.TrainConfig(steps=100, lr=0.01, schedule=schedule)
  sched = train.lr_schedule(cfg)
  assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.005)
  assert float(sched(10)) == pytest.approx(0.01)
  assert float(sched(55)) == pytest.approx(at_55) and float(sched(100)) == pytest.approx(at_100)
  no_warmup = train.lr_schedule(dataclasses.replace(cfg, warmup=0, min_lr_ratio=0.0))
  assert float(no_warmup(0)) == pytest.approx(0.01)
  assert float(no_warmup(100)) == pytest.approx(0.0 if schedule == "linear" else 0.01)
  cosine = train.lr_schedule(dataclasses.replace(cfg, schedule="cosine", min_lr_ratio=0.5))
  assert float(cosine(100)) == pytest.approx(0.005)


def test_resume_changes_name_each_changed_flag_and_the_next_rate():
  saved = dataclasses.asdict(train.TrainConfig(steps=100, lr=None, svd="subspace"))
  same = train.TrainConfig(steps=100, lr=0.01, svd="subspace")  # the default rate, spelled out
  assert config.resume_changes(saved, same, 50) is None
  line = config.resume_changes(
    saved, dataclasses.replace(same, steps=200, subspace_iters=3, schedule="constant"), 50
  )
  assert line.startswith("resuming at step 50 with changed --steps 200 (was 100), ")
  assert "--warmup 20 (was 10)" in line and "--schedule constant (was cosine)" in line
  assert "--subspace-iters 3 (was 2)" in line
  assert line.endswith("the next step's learning rate is 0.01 (the first run's schedule: 0.006281)")
  # A checkpoint of a version without --schedule ran the default (cosine), whatever this run's.
  del saved["schedule"]
  assert "--schedule linear (was cosine)" in config.resume_changes(
    saved, dataclasses.replace(same, schedule="linear"), 50
  )
