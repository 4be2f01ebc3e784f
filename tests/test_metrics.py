"""What a run reports about itself (galore_jax.metrics): metrics.jsonl, TensorBoard and W&B
records, speed, utilisation and device memory."""

import dataclasses
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from small_run import SMALL, quiet, small_config

from galore_jax import (
  cli,
  metrics,
  train,
  trainer,
)
from galore_jax import model as model_lib


def _tensorboard_tags(tb_dir) -> set[str]:
  """Scalar tags in the TensorBoard event files of ``tb_dir`` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  tags = set()
  for name in os.listdir(tb_dir):
    if not name.startswith("events"):
      continue
    raw = (Path(tb_dir) / name).read_bytes()
    pos = 0
    while pos < len(raw):
      n = int.from_bytes(raw[pos : pos + 8], "little")
      event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + n])
      tags |= {v.tag for v in event.summary.value}
      pos += 12 + n + 4
  return tags


class _FakeWandb:
  """Stands in for the ``wandb`` module: records ``init`` arguments and logged scalars."""

  def __init__(self):
    self.inits, self.logged, self.finished = [], [], 0

  def init(self, **kw):
    self.inits.append(kw)
    return self

  def log(self, data, step):
    self.logged.append((step, data))

  def finish(self):
    self.finished += 1


def test_outputs_metrics_tensorboard_eval(tmp_path, monkeypatch, capsys):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  monkeypatch.setenv("WANDB_MODE", "offline")
  cfg = small_config(
    tmp_path,
    "run",
    steps=6,
    stop_after=4,  # the compiled step of test_train.py's straight_run
    eval_every=2,
    peak_tflops=50.0,
    profile_steps="1:3",
    wandb=True,
  )
  evaluate, slept = trainer.evaluate, []

  def slow_first_evaluate(*a, **k):  # step_s must not include evaluation
    if not slept:
      slept.append(time.sleep(2.5))
    return evaluate(*a, **k)

  monkeypatch.setattr(trainer, "evaluate", slow_first_evaluate)
  # As a GPU reports it (CPU devices report no memory: test_peak_tflops_defaults_and_...).
  gpu_memory = {"peak_bytes": 3 << 30, "bytes_in_use": 1 << 30}
  monkeypatch.setattr(metrics, "device_memory", lambda devices: dict(gpu_memory))
  monkeypatch.setattr(trainer, "_is_terminal", lambda stream: True)  # a bar, as in a terminal
  began = time.time()
  out = train.train(dataclasses.replace(cfg, progress=True), log=quiet)
  bar = capsys.readouterr().err
  assert "tok_s=" in bar and "mem=3.00GiB" in bar
  records = metrics.read_metrics(out["out"])
  train_recs = [r for r in records if "loss" in r]
  eval_recs = [r for r in records if "eval_loss" in r]
  assert {"step", "loss", "lr", "tokens_per_s"} <= set(train_recs[0])
  assert [r["step"] for r in eval_recs] == [2, 4]
  assert eval_recs[-1]["eval_ppl"] == pytest.approx(np.exp(eval_recs[-1]["eval_loss"]))
  tb = os.path.join(out["out"], "tb")
  assert any(f.startswith("events") for f in os.listdir(tb))
  assert out["eval_ppl"] == pytest.approx(eval_recs[-1]["eval_ppl"])
  # Speed, utilisation and memory per logged step.
  n_params = model_lib.param_count(model_lib.get_config(SMALL["model"], vocab_size=8192))
  assert train_recs[2]["step_s"] < 2.5  # the step after the (slowed) evaluation at step 2
  for r in train_recs:
    assert r["step_s"] > 0 and 0 <= r["wait_s"] <= r["step_s"]
    assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_s"])
    assert r["mfu"] == pytest.approx(6 * n_params * r["tokens_per_s"] / 50e12)
    assert r["peak_bytes"] == 3 << 30 and r["bytes_in_use"] == 1 << 30
  # One compile record per start, written when the first step ends.
  (rec,) = [r for r in records if "compile_s" in r]
  assert rec["step"] == 1 and 0 < rec["compile_s"] <= rec["startup_s"]
  assert rec["compile_s"] < train_recs[0]["step_s"] + rec["startup_s"]
  assert {"step_s", "wait_s", "tokens_per_s", "mfu", "compile_s", "startup_s", "loss"} <= (
    _tensorboard_tags(tb)
  )
  # Each record's wall time (when it was written), in the file only.
  stamps = [r["time"] for r in records]
  assert began < stamps[0] and stamps == sorted(stamps) and stamps[-1] <= time.time()
  assert "time" not in _tensorboard_tags(tb)
  # --profile-steps 1:3: a jax.profiler trace of steps 2..3, where TensorBoard looks.
  traces = list((tmp_path / "run" / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert list(traces[0].parent.glob("*.trace.json.gz"))  # Chrome trace, for Perfetto
  # --wandb: the same scalars, offline here, the run's configuration attached.
  (init,) = fake.inits
  assert init["mode"] == "offline" and init["config"]["model"] == SMALL["model"]
  assert init["dir"] == str(tmp_path / "run" / "wandb") and fake.finished == 1
  logged = [(step, d) for step, d in fake.logged if "loss" in d]
  assert [step for step, _ in logged] == [1, 2, 3, 4]
  assert logged[0][1]["mfu"] == train_recs[0]["mfu"] and logged[0][1]["peak_bytes"] == 3 << 30
  assert "time" not in logged[0][1]


def test_peak_tflops_defaults_and_device_memory():
  assert metrics.default_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert metrics.default_peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert metrics.default_peak_tflops("NVIDIA H200") == 989.0
  assert metrics.default_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert metrics.default_peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
  assert metrics.default_peak_tflops(jax.devices()[0].device_kind) is None  # cpu
  assert metrics.mfu(10, 100.0, None, 1) is None

  class Gpu:
    def __init__(self, peak, used):
      self.stats = {"peak_bytes_in_use": peak, "bytes_in_use": used, "bytes_limit": 1 << 40}

    def memory_stats(self):
      return self.stats

  assert metrics.device_memory([Gpu(5, 3), Gpu(7, 2)]) == {"peak_bytes": 7, "bytes_in_use": 3}
  assert metrics.device_memory(jax.devices()[:1]) == {"peak_bytes": None, "bytes_in_use": None}


def test_wandb_is_offline_without_network_or_api_key(tmp_path, monkeypatch):
  monkeypatch.delenv("WANDB_MODE", raising=False)
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
  assert metrics.wandb_mode() == "offline"
  monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
  monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:1")  # nothing listens on :443
  assert metrics.wandb_mode() == "offline"
  monkeypatch.setenv("WANDB_MODE", "disabled")
  assert metrics.wandb_mode() == "disabled"


def test_wandb_run_dir_is_a_run_output_and_its_id_is_kept(tmp_path, capsys, monkeypatch):
  (tmp_path / "old" / "wandb").mkdir(parents=True)
  assert cli.main(["train", "--out", str(tmp_path / "old"), "--steps", "2"]) == 2
  assert "wandb" in capsys.readouterr().err
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  monkeypatch.setenv("WANDB_MODE", "offline")
  for _ in range(2):  # a resume continues the same W&B run
    metrics.start_wandb(str(tmp_path / "new"), {"model": "llama_tiny"})
  assert fake.inits[0]["id"] == fake.inits[1]["id"] and fake.inits[1]["resume"] == "allow"
  writer = metrics.MetricsWriter(str(tmp_path / "new"), tensorboard=False, wandb_config={})
  writer.write({"step": 1, "loss": 2.0, "mfu": None, "peak_bytes": None})
  writer.close()
  assert fake.logged == [(1, {"loss": 2.0})]  # nulls are left out, as in TensorBoard
  assert metrics.read_metrics(str(tmp_path / "new"))[0]["mfu"] is None
