"""experiments/gpu_bench.py: its CPU smoke run (subprocess per case), JSON and helpers.

The GPU numbers themselves need a GPU; this checks that the harness runs end to end
at toy size and reports every field and ratio the GPU run is read for.
"""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "gpu_bench.py"
HAVE_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def bench(load_experiment):
  return load_experiment("gpu_bench")


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
  path = tmp_path_factory.mktemp("gpu_bench") / "gpu_bench.json"
  returned = bench.main(
    [
      "--cpu-smoke",
      "--refresh-cost",
      "--optimizers",
      "galore_adamw",
      "--quiet",
      "--json",
      str(path),
      "--time-budget",
      "300",
      "--profile-steps",
      "1",
      "--profile-refresh",
      "--refresh-reps",
      "2",
      # A GPU's default, forced: the GaLore case runs the trainer's two programs.
      "--refresh-programs",
      "two",
    ]
  )
  return returned, json.loads(path.read_text())


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------------------
# Helpers (no subprocess).


def test_quiet_counts_skip_every_refresh(bench):
  sync = bench.quiet_counts([0], 4, start=1)
  assert [next(sync) for _ in range(6)] == [1, 2, 3, 5, 6, 7]
  stag = bench.quiet_counts([0, 1, 3], 4, start=4)
  assert [next(stag) for _ in range(3)] == [6, 10, 14]
  assert list(bench.quiet_counts([0, 1, 2, 3], 4)) == []  # every phase refreshes a leaf


def test_stagger_groups_count_phases_by_shape(bench):
  leaves = [
    {"offset": o, "m": m, "n": n, "side": "right", "rank": 2}
    for o, (m, n) in enumerate([(8, 8), (8, 16), (8, 8), (8, 16), (16, 8)])
  ]
  leaves.append({"offset": 4, "m": 8, "n": 8, "side": "right", "rank": 2})  # shares phase 4
  groups = bench.stagger_groups(leaves, 10)
  by_sig = {json.dumps(g["signature"]): g for g in groups}
  assert sum(g["phases"] for g in groups) == 5
  assert by_sig[json.dumps([[8, 8, "right", 2]])]["phases"] == 2
  assert by_sig[json.dumps([[8, 8, "right", 2], [16, 8, "right", 2]])]["phase"] == 4


def test_amortised_share(bench):
  # 0.2 s of refresh excess every 200 steps of 0.1 s: 1% of training time
  assert bench.amortised_share(0.1, 0.2, 200) == pytest.approx(0.01)
  assert bench.amortised_share(None, 2.0, 200) is None


def test_gpu_checks_script_is_valid_bash():
  import subprocess

  script = _SCRIPT.with_name("gpu_checks.sh")
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  text = script.read_text()
  assert "gpu_memory_check.py" in text and "gpu_bench.py --refresh-cost" in text


# ---------------------------------------------------------------------------
# The smoke run.


def test_smoke_jax_fields(smoke):
  returned, data = smoke
  assert returned["summary"] == data["summary"]
  assert _positive(data["peak_flops"]["peak_flops"])
  model = data["summary"]["models"]["bench_smoke"]
  jx = model["jax/galore_adamw"]
  assert jx["status"] == "ok"
  for key in (
    "step_s",
    "tokens_per_s",
    "loop_step_s",
    "refresh_s",
    "refresh_predicted_s",
    "mfu",
    "compile_s",
  ):
    assert _positive(jx[key]), key
  assert jx["tokens_per_s"] == pytest.approx(data["summary"]["tokens_per_step"] / jx["step_s"])
  # CPU: no device memory statistics; the keys are there, null.
  assert "peak_bytes" in jx and "peak_bytes_steady" in jx
  raw = data["results"]["bench_smoke/jax/galore_adamw"]
  assert raw["skipped_steps"] == 0 and math.isfinite(raw["loss_last"])
  assert len(raw["step_times_s"]) == 2
  # Two programs: the plain one compiled first (compile_s is its), the refresh one when the
  # first refresh step needed it.
  assert set(raw["programs"]) == {"not_due", "due"}
  assert all(_positive(t["compile_s"]) for t in raw["programs"].values())
  assert raw["compile_s"] == pytest.approx(sum(raw["programs"]["not_due"].values()))
  assert set(model["ratios"]) >= {"tokens_per_s", "peak_memory", "refresh_s", "same_param_count"}


def test_smoke_torch_reference_and_ratios(smoke):
  _, data = smoke
  ref = data["summary"]["models"]["bench_smoke"]["torch/galore_adamw"]
  if not HAVE_TORCH:
    assert ref["status"] == "unavailable"
    pytest.skip("torch is not installed: the reference case reports itself unavailable")
  raw = data["results"]["bench_smoke/torch/galore_adamw"]
  if raw.get("status") == "error" and "galore_torch not found" in raw.get("error", ""):
    pytest.skip("galore-torch is not installed")
  assert ref["status"] == "ok", raw.get("traceback")
  assert _positive(ref["step_s"]) and _positive(ref["refresh_s"])
  assert raw["galore_params"] == 7 and not raw["nonfinite_loss"]
  ratios = data["summary"]["models"]["bench_smoke"]["ratios"]
  assert _positive(ratios["tokens_per_s"])
  assert ratios["same_param_count"] is True


def test_smoke_refresh_cost(smoke):
  _, data = smoke
  rep = data["refresh_cost"]["models"]["bench_smoke"]
  variants = rep["variants"]
  measured = {"exact:synchronous", "subspace:synchronous", "randomized:staggered"}
  # Not run, predicted from the GaLore case's per-shape probe of the same card and run.
  assert set(variants) == measured | {"randomized:synchronous"}
  assert variants["exact:synchronous"]["source"] == "bench_smoke/jax/galore_adamw"
  for name, v in variants.items():
    assert v["status"] == ("ok" if name in measured else "predicted"), (name, v.get("traceback"))
    assert isinstance(v["amortised_share"], float) and _positive(v["step_s"]), name
  guess = variants["randomized:synchronous"]
  probe = data["results"]["bench_smoke/jax/galore_adamw"]["svd_probe_other"]["randomized"]
  assert guess["estimated"] and guess["worst_step_s"] == pytest.approx(
    guess["step_s"] + probe["sum_over_leaves_s"]
  )
  stag = variants["randomized:staggered"]
  assert stag["leaves"] == 7 and stag["phases_with_refresh"] == 7  # 7 kernels, T = 16
  assert len(stag["period"]["step_times_s"]) == data["refresh_cost"]["update_proj_gap"]
  assert _positive(stag["svd_probe"]["sum_over_leaves_s"])
  assert isinstance(rep["target_met"], bool)
  assert isinstance(rep["subspace_target_met"], bool) and _positive(
    rep["subspace_refresh_over_step"]
  )


def test_refresh_reps_skip_a_refresh_predicted_past_the_case_time(bench):
  import time

  calls, res = [], {}
  out = bench._refresh_reps(
    lambda k: calls.append(k) or 0.01, 2, time.time() + 50, 100.0, res, lambda: None
  )
  assert out == [] and calls == [] and "predicted 100.0 s" in res["refresh_skipped"]
  res = {}
  out = bench._refresh_reps(
    lambda k: calls.append(k) or 0.01, 2, time.time() + 50, 0.01, res, lambda: None
  )
  assert calls == [1, 2] and res["refresh_s"] == pytest.approx(0.01)


def test_smoke_profile(smoke):
  """--profile-steps: a trace of plain steps, joined with the compiled HLO's op names (a
  CPU trace has no device events, so the breakdown is empty there; the GPU's is not)."""
  _, data = smoke
  res = data["results"]["bench_smoke/jax/galore_adamw"]
  prof = res["profile"]
  assert "error" not in prof, prof
  assert prof["steps"] == 1 and prof["hlo_instructions_with_op_name"] > 100
  assert res["svd"] == "exact" and set(res["svd_probe_other"]) == {"randomized", "subspace"}
  out = Path(data["meta"]["args"]["json"]).parent
  assert (out / prof["trace_file"]).stat().st_size > 0
  assert (out / prof["hlo_file"]).stat().st_size > 0
  # --profile-refresh: one more refresh step traced after the timed ones, beside the
  # steady step's trace, with its own program's HLO (two programs; one would be written once)
  assert len(res["refresh_times_s"]) == 2, res["refresh_times_s"]
  refresh = res["refresh_profile"]
  assert "error" not in refresh and refresh["steps"] == 1, refresh
  assert (out / refresh["trace_file"]).stat().st_size > 0
  assert refresh["hlo_file"] == prof["hlo_file"].replace(".txt.gz", "_refresh.txt.gz")
  assert refresh["hlo_instructions_with_op_name"] > prof["hlo_instructions_with_op_name"]


def test_compile_probe_runs_and_its_weightwise_patch_refreshes_one_weight_at_a_time(
  load_experiment, tmp_path
):
  # experiments/gpu_compile_probe.py at toy size (CPU), in its own process: the "weightwise"
  # patch gives the per-layer step one refresh loop per weight (7 per layer) where the
  # trainer's subspace step has one per unit (2 per layer: tests/test_train.py), the
  # comparison the GPU run makes.
  from galore_jax.model import CONFIGS

  probe = load_experiment("gpu_compile_probe")
  path = tmp_path / "probe.json"
  args = ["--model", "llama_tiny", "--rank", "8", "--batch", "1", "--seq-len", "8"]
  log = tmp_path / "probe.log"
  args += ["--compile-only", "--variants", "subspace:weightwise|", "--json", str(path)]
  assert probe.main([*args, "--log", str(log)]) == 0
  (r,) = json.loads(path.read_text())["results"]
  assert "error" not in r, r
  assert log.read_text().startswith("==== variant 'subspace:weightwise|': --child --svd subspace")
  assert r["compile_s"] > 0 and r["lower_s"] > 0 and r["temp_bytes"] > 0
  assert r["lowered_ops"]["while"] == 7 * CONFIGS["llama_tiny"].num_layers


def test_jacobi_svd_probe_reports_why_it_cannot_run_on_cpu(load_experiment):
  # --probe-svds exact_jacobi (GPU only): on CPU the probe says why and predicts nothing,
  # so the bench goes on without it.
  import jax.numpy as jnp

  bench_jax = load_experiment("gpu_bench_jax")
  leaves = lambda: [{"m": 16, "n": 8, "side": "right", "rank": 2}]
  probe = bench_jax._safe_probe(leaves, "exact_jacobi", jnp.float32)
  assert "not implemented on CPU" in probe["error"] and probe["sum_over_leaves_s"] is None
  assert bench_jax._safe_probe(leaves, "exact", jnp.float32)["sum_over_leaves_s"] > 0


def test_oom_check_saves_the_step_before_an_injected_out_of_memory(
  load_experiment, tmp_path, monkeypatch
):
  # experiments/gpu_oom_check.py's logic on the CPU (the error injected as in
  # test_train.py); on a GPU it fills a small pool instead, to see whether XLA's runtime
  # leaves a failed step's donated inputs intact for the save.
  monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
  check = load_experiment("gpu_oom_check")
  out = tmp_path / "oom.json"
  flags = ["--cpu-smoke", "--seq-len", "32", "--out", str(tmp_path / "run"), "--json", str(out)]
  assert check.main(flags) == 0
  result = json.loads(out.read_text())
  assert result["out_of_memory"].startswith(
    "the device ran out of memory in step 4 (RESOURCE_EXHAUSTED: injected (--cpu-smoke)); "
    f"step 3 is saved in {tmp_path / 'run' / 'checkpoints'}/3."
  )
  assert result["saved_step"] and result["resumed"] == {"start_step": 3, "step": 6}
