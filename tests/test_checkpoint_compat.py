"""Checkpoints written by an earlier version (tests/data/ckpt_v1, made by its make.py with
the code before galore_jax/train.py was split) still restore and continue training."""

import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np

from galore_jax import checkpoint, train
from galore_jax import model as model_lib

V1 = Path(__file__).parent / "data" / "ckpt_v1"


def test_v1_checkpoint_restores_and_continues(tmp_path, monkeypatch):
  expected = json.loads((V1 / "expected.json").read_text())
  monkeypatch.setitem(
    model_lib.CONFIGS,
    expected["config"]["model"],
    model_lib.LlamaConfig(**expected["model_config"]),
  )
  shutil.copytree(V1 / "run", tmp_path / "run")
  # The v1 run refreshed with the exact SVD, then the trainer's default; a library resume
  # names it (the CLI takes it from the checkpoint; a different one is refused).
  cfg = train.TrainConfig(
    out=str(tmp_path / "run"),
    tokenizer=str(V1 / "tok.model"),
    resume=True,
    **{"svd": "exact", **expected["config"]},
  )

  step, _ = checkpoint.read_meta(cfg.out)
  assert step == 2
  run = train.setup(cfg, 128)
  params = checkpoint.restore(cfg.out, step, {"params": run.abstract_params})["params"]
  saved = np.load(V1 / "params_step2.npz")
  flat = {
    "/".join(str(k.key) for k in path): np.asarray(v)
    for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  assert sorted(flat) == sorted(saved.files)
  for name, value in flat.items():
    np.testing.assert_array_equal(value, saved[name], err_msg=name)

  summary = train.train(cfg, log=lambda *_: None)
  assert summary["start_step"] == 2 and summary["step"] == 3
  assert checkpoint.latest_step(cfg.out) == 3
  (loss,) = summary["losses"]
  assert math.isfinite(loss)
  # Step 3 of the old run trained straight through: optimizer state (GaLore projectors,
  # Adam moments, counters) came back as it was saved.
  np.testing.assert_allclose(loss, expected["losses"][2], rtol=1e-5)


def test_a_save_removes_partial_directories_of_earlier_steps(tmp_path):
  """What a killed process or a failed save leaves (orbax's uncommitted
  ``N.orbax-checkpoint-tmp...``) goes at the next save of a later step, not before; and
  ``recover`` after a failed save removes that step's own."""
  mngr = checkpoint.manager(str(tmp_path), keep=None)
  tree = {"w": np.arange(6.0, dtype=np.float32)}
  for name in ("3.orbax-checkpoint-tmp", "4.orbax-checkpoint-tmp-1234", "9.orbax-checkpoint-tmp"):
    (tmp_path / name / "params").mkdir(parents=True)
  checkpoint.save(mngr, 5, tree, tree, {})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["5", "9.orbax-checkpoint-tmp"]
  mngr = checkpoint.recover(mngr, 9, keep=None)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["5"]
  assert mngr.all_steps() == [5]
  mngr.close()


def test_a_corrupt_checkpoints_read_is_one_error_and_its_echoes_are_dropped(tmp_path):
  """Restoring a corrupt checkpoint raises one CheckpointError, which names the checkpoint
  before it; orbax's other reads then fail into an event loop the failed restore closed,
  and those echoes (up to hundreds of "Event loop is closed" tracebacks, at random, on the
  way out of `train --resume`) are dropped as a failed save's are. In a fresh process: the
  filter is installed once per process, and a save in this one has installed it."""
  import subprocess
  import sys

  mngr = checkpoint.manager(str(tmp_path), keep=None)
  tree = {"w": np.arange(4096.0, dtype=np.float32)}
  for step in (1, 2):
    checkpoint.save(mngr, step, tree, tree, {})
  mngr.close()
  for f in (tmp_path / "2" / "params").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:10])
  script = f"""
import sys, types, jax, numpy as np
from galore_jax import checkpoint
want = {{"params": {{"w": jax.ShapeDtypeStruct((4096,), np.float32)}}}}
try:
  checkpoint.restore({str(tmp_path)!r}, 2, want)
except checkpoint.CheckpointError as e:
  print(e)
echo = RuntimeError("Event loop is closed")
sys.unraisablehook(types.SimpleNamespace(
  exc_type=RuntimeError, exc_value=echo, exc_traceback=None, err_msg=None, object=None
))
print("restored", float(checkpoint.restore({str(tmp_path)!r}, 1, want)["params"]["w"].sum()))
"""
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
  error, restored = proc.stdout.strip().splitlines()
  assert error.startswith(f"checkpoint {tmp_path}/2 could not be restored"), error
  assert error.endswith(
    f"the checkpoint before it is {tmp_path}/1: move {tmp_path}/2 aside "
    "to resume from it, or pass it to --checkpoint"
  ), error
  assert "TensorStore" not in error and restored == f"restored {float(np.arange(4096).sum())}"
