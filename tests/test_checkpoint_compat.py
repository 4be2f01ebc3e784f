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
  cfg = train.TrainConfig(
    out=str(tmp_path / "run"), tokenizer=str(V1 / "tok.model"), resume=True, **expected["config"]
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
