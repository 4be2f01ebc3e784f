"""experiments/reproduce_table2.py: the optimizer shared with the trainer, the sweep's
bookkeeping and a smoke run of the script (the parametrisations: tests/test_lowrank.py)."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galore_jax import checkpoint, metrics

# The end-to-end run: every method but GaLore at rank r (the same code as GaLore at d/2, one
# more compilation), and two lrs for AdamW.
SMOKE_METHODS = "adamw,galore_d2,lowrank,lora,relora"


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """XLA's optimisation passes dominate these tiny runs on a 2-core CPU; the numbers compared
  here are all computed under the same setting, so skip them for this module."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def t2(load_experiment):
  return load_experiment("reproduce_table2")


# ---------------------------------------------------------------- the lr of each step


def test_relora_lr_rewarms_after_each_merge(t2):
  scale = dataclasses.replace(t2.smoke_scale(), steps=(100,))
  relora = t2.RunSpec(scale, scale.models[0], "relora", 1e-2)
  lora = t2.RunSpec(scale, scale.models[0], "lora", 1e-2)
  assert relora.relora_every == 25 and relora.relora_rewarm == 1
  scale = dataclasses.replace(scale, steps=(1000,))
  relora = t2.RunSpec(scale, scale.models[0], "relora", 1e-2)
  lora = t2.RunSpec(scale, scale.models[0], "lora", 1e-2)
  assert relora.relora_every == 250 and relora.relora_rewarm == 10
  a, b = t2.lr_values(relora), t2.lr_values(lora)
  np.testing.assert_array_equal(a[:250], b[:250])  # first cycle: the global warm-up only
  np.testing.assert_allclose(a[250], b[250] / 10, rtol=1e-6)  # restarts low ...
  np.testing.assert_allclose(a[259:500], b[259:500], rtol=1e-6)  # ... and is back after 10 steps
  assert a[500] < 0.2 * b[500] and a[750] < 0.2 * b[750]
  assert b.max() == pytest.approx(1e-2, rel=1e-6) and b[-1] == pytest.approx(1e-3, rel=1e-2)


def test_a_run_steps_with_the_trainers_optimizer_at_the_rewarmed_rates(t2, tmp_path, monkeypatch):
  # What train_run gives the trainer for a ReLoRA run long enough to re-warm over 10 steps:
  # no optimizer of its own (the trainer's, which steps at lr_at's rate: test_train.py),
  # and lr_values' rates, re-warm-up included. (The smoke run's ReLoRA re-warms in 1 step.)
  scale = dataclasses.replace(t2.smoke_scale(), steps=(1000,))
  rs = t2.RunSpec(scale, scale.models[0], "relora", 1e-2)
  given = {}

  class Given(Exception):
    pass

  def train(cfg, log, hooks):
    given["hooks"] = hooks
    raise Given

  monkeypatch.setattr(t2.trainer, "train", train)
  ctx = t2.ModelContext(scale, scale.models[0], {})
  progress = t2.Progress([rs], True, {rs.model.name: 1.0})
  with pytest.raises(Given):
    t2.train_run(ctx, rs, tmp_path / "run", progress, [])
  hooks = given["hooks"]
  assert hooks.tx is None and hooks.parametrization is not None
  rates = np.array([hooks.lr_at(step) for step in range(rs.steps)])
  np.testing.assert_array_equal(rates, t2.lr_values(rs))
  assert rates[250] < rates[249] / 5 and rates[259] == pytest.approx(rates[249], rel=0.05)


def test_bf16_memory_accounting(t2):
  tree = {
    "w": jax.ShapeDtypeStruct((10, 10), jnp.float32),
    "count": jax.ShapeDtypeStruct((), jnp.int32),
  }
  assert t2.bf16_bytes(tree) == 200 + 4


# ---------------------------------------------------------------- the script end to end


@pytest.fixture(scope="module")
def smoke(t2, tmp_path_factory):
  out = tmp_path_factory.mktemp("table2")
  rc = t2.main(["--scale", "smoke", "--out", str(out), "--methods", SMOKE_METHODS, "--quiet"])
  assert rc == 0
  return out


def _results(out):
  return json.loads((out / "results.json").read_text())


def test_smoke_writes_table_plot_json_and_run_dirs(t2, smoke):
  summary = _results(smoke)
  names = [r["run"]["name"] for r in summary["runs"]]
  assert names == summary["planned_runs"] and len(names) == 6
  assert all(r["status"] == "ok" and math.isfinite(r["eval_ppl"]) for r in summary["runs"])
  # The best AdamW run is the lower-perplexity one of its two lrs.
  adamw = [r for r in summary["runs"] if r["run"]["method"] == "adamw"]
  best = min(adamw, key=lambda r: r["eval_loss"])
  assert summary["best"]["llama_micro"]["adamw"] == best["run"]["name"]
  assert set(summary["best"]["llama_micro"]) == set(SMOKE_METHODS.split(","))
  table = (smoke / "table2.md").read_text()
  for label in ("Full-rank AdamW", "GaLore (rank d/2)", "Low-rank", "LoRA (", "ReLoRA"):
    assert label in table
  assert f"{best['eval_ppl']:.2f}" in table
  png = (smoke / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  # Every run is a normal run directory: metrics.jsonl (+ TensorBoard) and its config.
  relora = next(r for r in summary["runs"] if r["run"]["method"] == "relora")
  run_dir = smoke / "llama_micro" / f"relora_lr{relora['run']['lr']:g}"
  records = metrics.read_metrics(str(run_dir))
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
  assert [r["relora_merge"] for r in records if "relora_merge" in r] == [1, 2, 3, 4, 5]
  assert list((run_dir / "tb").iterdir())
  assert json.loads((run_dir / "config.json").read_text())["method"] == "relora"
  # Same data, init and token budget for every method: all but low-rank start from the dense
  # model (LoRA's B = 0), so their first-step losses are identical; equal token counts.
  first = {r["run"]["method"]: r["train_loss"][0] for r in summary["runs"]}
  assert len({v for k, v in first.items() if k != "lowrank"}) == 1
  assert first["lowrank"] != first["adamw"]
  assert len({r["tokens"] for r in summary["runs"]}) == 1


def test_smoke_memory_ranks_the_methods_like_the_paper(smoke):
  best = _results(smoke)["runs"]
  mem = {r["run"]["method"]: r["weights_bytes"] + r["optimizer_bytes"] for r in best}
  opt = {r["run"]["method"]: r["optimizer_bytes"] for r in best}
  weights = {r["run"]["method"]: r["weights_bytes"] for r in best}
  assert opt["galore_d2"] < opt["adamw"]
  assert opt["lowrank"] == opt["lora"] == opt["relora"] < opt["adamw"]  # Adam on the factors
  assert weights["lowrank"] < weights["adamw"] < weights["lora"] == weights["relora"]
  assert mem["galore_d2"] < mem["adamw"] and mem["lowrank"] < mem["lora"]


def test_rerun_skips_finished_runs_and_redoes_only_unfinished_ones(t2, smoke, capsys):
  victim = smoke / "llama_micro" / "adamw_lr0.001"
  old = json.loads((victim / "result.json").read_text())
  (victim / "result.json").unlink()  # as if interrupted before it finished
  rc = t2.main(["--scale", "smoke", "--out", str(smoke), "--methods", SMOKE_METHODS])
  assert rc == 0
  out = capsys.readouterr().out
  assert out.count("finished before, skipped") == 5
  assert "run 2/6 llama_micro/adamw_lr0.001 ... ETA" in out
  new = json.loads((victim / "result.json").read_text())
  assert new["eval_loss"] == pytest.approx(old["eval_loss"], rel=1e-6)  # deterministic
  # A finished run of another configuration is an error, never silently mixed in.
  rc = t2.main(["--scale", "smoke", "--out", str(smoke), "--methods", "adamw", "--steps", "4"])
  assert rc == 2
  assert "different configuration (differs in " in capsys.readouterr().err


def test_edge_extension_continues_the_half_decade_grid(t2):
  assert [t2.next_lr(x, up=False) for x in (3e-3, 1e-3, 3e-4)] == [1e-3, 3e-4, 1e-4]
  assert [t2.next_lr(x, up=True) for x in (3e-3, 1e-2, 3e-2)] == [1e-2, 3e-2, 1e-1]
  scale = t2.smoke_scale()
  runs = t2.plan_runs(scale, list(scale.models), ["adamw", "lowrank"])

  def result(rs, loss):
    return {
      "run": {"name": rs.name, "model": rs.model.name, "method": rs.method, "lr": rs.lr},
      "eval_loss": loss,
    }

  # AdamW's best is its lowest lr (an edge): one lower lr is added. lowrank has one lr only.
  results = [result(runs[0], 5.0), result(runs[1], 4.0), result(runs[2], 6.0)]
  extra = t2.edge_extensions(runs, results)
  assert [(rs.method, rs.lr) for rs in extra] == [("adamw", 3e-4)]
  results[0]["eval_loss"] = 3.0  # now the highest lr is best: extend upwards
  assert [rs.lr for rs in t2.edge_extensions(runs, results)] == [1e-2]


def test_interrupted_run_resumes_from_its_checkpoint(t2, tmp_path, monkeypatch):
  """With --save-every, a run stopped mid-way continues from its checkpoint and ends with the
  losses of an uninterrupted run (ReLoRA: factors, frozen weights and merges included)."""
  scale = dataclasses.replace(t2.smoke_scale(), eval_every=0)
  model = scale.models[0]
  ctx = t2.ModelContext(scale, model, {})
  straight_rs = t2.RunSpec(scale, model, "relora", 3e-3)
  progress = t2.Progress([straight_rs], True, {model.name: 1.0})
  straight = t2.train_run(ctx, straight_rs, tmp_path / "straight", progress, [])
  rs = dataclasses.replace(straight_rs, scale=dataclasses.replace(scale, save_every=4))

  real_iterate = ctx.train_ds.iterate

  def interrupted(start):
    for i, batch in enumerate(real_iterate(start)):
      if i == 5:
        raise KeyboardInterrupt  # Ctrl-C after 5 steps; the last checkpoint is step 4
      yield batch

  split = tmp_path / "split"
  monkeypatch.setattr(ctx.train_ds, "iterate", interrupted)
  with pytest.raises(KeyboardInterrupt):
    t2.train_run(ctx, rs, split, progress, [])
  assert not (split / "result.json").exists()
  assert checkpoint.latest_step(str(split / "checkpoints")) == 4
  monkeypatch.setattr(ctx.train_ds, "iterate", real_iterate)
  resumed = t2.train_run(ctx, rs, split, progress, [])
  np.testing.assert_allclose(resumed["train_loss"], straight["train_loss"], rtol=1e-6)
  assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-6)
  assert not (split / "checkpoints").exists()  # a finished run keeps its result, not its state
