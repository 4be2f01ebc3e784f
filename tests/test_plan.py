"""galore_jax.plan, the ``galore-jax plan`` command and experiments/memory_table.py.

Small configurations only; the two compile tests use a 2-layer, 128-wide model.
"""

import json

import jax
import pytest

from galore_jax import cli, plan, train
from galore_jax import model as model_lib
from galore_jax import optimizer as galore

SMALL = ["--model", "llama_tiny", "--vocab-size", "512", "--batch-size", "2", "--seq-len", "32"]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "num_layers": 2}


def _cli_json(capsys, *flags):
  assert cli.main(["plan", *SMALL, "--no-compile", "--json", *flags]) == 0
  return json.loads(capsys.readouterr().out)


def _cfg(**kw):
  base = dict(
    model="llama_tiny",
    optimizer="galore_adamw8bit",
    rank=32,
    batch_size=2,
    seq_len=32,
    param_dtype="bfloat16",
    dtype="bfloat16",
  )
  return train.TrainConfig(**(base | kw))


def test_json_fields(capsys):
  r = _cli_json(capsys, "--optimizer", "galore_adamw8bit", "--rank", "32")
  for key in (
    "weights_bytes",
    "optimizer_bytes",
    "peak_bytes",
    "fits",
    "optimizer_breakdown",
    "gradients_at_peak_bytes",
    "activation_bytes",
    "gpu_memory_bytes",
    "analytic",
    "peak_source",
  ):
    assert key in r, key
  assert r["config"]["param_dtype"] == r["config"]["dtype"] == "bfloat16"  # plan's defaults
  assert r["peak_source"] == "analytic"
  opt = r["optimizer_breakdown"]
  assert opt["projector_bytes"] > 0 and opt["moment_bytes"] > 0
  assert sum(opt.values()) == r["optimizer_bytes"]
  assert r["peak_bytes"] > r["weights_bytes"] + r["optimizer_bytes"] + r["gradients_at_peak_bytes"]


def test_weights_are_param_count_times_two_in_bf16():
  r = plan.plan(_cfg(), vocab_size=512, compile=False)
  mc = model_lib.get_config("llama_tiny", vocab_size=512)
  assert r["params"] == model_lib.param_count(mc)
  assert r["weights_bytes"] == 2 * model_lib.param_count(mc)
  r32 = plan.plan(_cfg(param_dtype="float32", dtype="float32"), vocab_size=512, compile=False)
  assert r32["weights_bytes"] == 4 * model_lib.param_count(mc)


@pytest.mark.parametrize("optimizer", train.OPTIMIZERS)
def test_optimizer_bytes_match_eval_shape_of_init(optimizer):
  cfg = _cfg(optimizer=optimizer)
  r = plan.plan(cfg, vocab_size=512, compile=False, suggest=False)
  mc = model_lib.get_config(
    "llama_tiny", vocab_size=512, param_dtype=jax.numpy.bfloat16, dtype=jax.numpy.bfloat16
  )
  _, params = train.abstract_model(mc)
  expected = galore.state_bytes(jax.eval_shape(train.build_optimizer(cfg).init, params))
  assert r["optimizer_bytes"] == expected
  assert (r["optimizer_breakdown"]["projector_bytes"] > 0) == optimizer.startswith("galore")


def test_fits_flips_with_gpu_memory(capsys):
  big = _cli_json(capsys, "--gpu-memory", "80GB")
  assert big["fits"] and big["gpu_memory_bytes"] == 80 * 10**9 and "suggestions" not in big
  small = _cli_json(capsys, "--gpu-memory", "1MB")
  assert not small["fits"] and small["headroom_bytes"] < 0
  assert small["peak_bytes"] == big["peak_bytes"]
  gib = _cli_json(capsys, "--gpu-memory", "2GiB")
  assert gib["gpu_memory_bytes"] == 2 * 2**30
  # A peak between JAX's default pool (75% of the GPU) and the GPU: it fits only with a
  # larger XLA_PYTHON_CLIENT_MEM_FRACTION, which the plan gives (5 points above its share).
  assert big["jax_memory_fraction"] is None and small["jax_memory_fraction"] is None
  tight = _cli_json(capsys, "--gpu-memory", f"{int(big['peak_bytes'] / 0.84)}B")
  assert tight["fits"] and tight["jax_memory_fraction"] == 0.9
  assert (
    cli.main(["plan", *SMALL, "--no-compile", "--gpu-memory", f"{int(big['peak_bytes'] / 0.84)}B"])
    == 0
  )
  assert capsys.readouterr().out.strip().splitlines()[-1] == (
    "  note: that is 84% of the GPU, and JAX takes 75% of it by default: run with "
    "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 (with nothing else on the GPU)"
  )
  from galore_jax import memory_plan

  assert (
    memory_plan.memory_fraction(99, 100) == 0.95 and memory_plan.memory_fraction(76, 100) == 0.85
  )


def test_suggestions_when_it_does_not_fit(capsys):
  r = _cli_json(capsys, "--optimizer", "adamw", "--gpu-memory", "10MB", "--no-per-layer-updates")
  assert not r["fits"]
  changes = {s["change"] for s in r["suggestions"]}
  assert any("8-bit" in c for c in changes) and any("GaLore" in c for c in changes)
  assert any("remat" in c for c in changes) and any("per-layer" in c for c in changes)
  adafactor = next(s for s in r["suggestions"] if s["change"].startswith("Adafactor"))
  assert adafactor["flags"] == {"optimizer": "adafactor"}
  assert all(s["peak_bytes"] > 0 for s in r["suggestions"])
  assert min(s["peak_bytes"] for s in r["suggestions"]) < r["peak_bytes"]
  # Re-planning with a suggestion reproduces its figure.
  eight = next(s for s in r["suggestions"] if "8-bit" in s["change"])
  again = _cli_json(
    capsys,
    "--optimizer",
    eight["flags"]["optimizer"],
    "--gpu-memory",
    "10MB",
    "--no-per-layer-updates",
  )
  assert again["peak_bytes"] == eight["peak_bytes"]
  # A clipped run is told it can keep per-layer updates by clipping in the step.
  r = _cli_json(capsys, "--optimizer", "adamw", "--gpu-memory", "10MB", "--grad-clip", "1")
  assert not r["per_layer_updates"]
  per = next(s for s in r["suggestions"] if s["flags"].get("per_layer_clip"))
  assert "--per-layer-clip" in per["change"] and per["peak_bytes"] < r["peak_bytes"]
  again = _cli_json(capsys, "--optimizer", "adamw", "--grad-clip", "1", "--per-layer-clip")
  assert again["per_layer_updates"] and again["peak_bytes"] == per["peak_bytes"]


def test_text_output(capsys):
  assert cli.main(["plan", *SMALL, "--no-compile", "--gpu-memory", "1MB"]) == 0
  out = capsys.readouterr().out
  assert "DOES NOT FIT" in out and "to shrink it" in out and "projectors" in out


def test_per_layer_updates_are_planned_by_default():
  # Short sequences: activations small next to the gradient (per-layer updates overlap the
  # update's temporaries with the activations, so with large activations they gain little).
  cfg = _cfg(batch_size=1, seq_len=16)
  per = plan.plan(cfg, vocab_size=512, compile=False)
  assert per["per_layer_updates"]
  assert per["gradients_at_peak_bytes"] == per["analytic"]["largest_layer_gradient_bytes"]
  # --per-layer-clip: clipped in the step, at the per-layer step's memory.
  clip_cfg = _cfg(batch_size=1, seq_len=16, grad_clip=1.0, per_layer_clip=True)
  clipped = plan.plan(clip_cfg, vocab_size=512, compile=False)
  assert clipped["per_layer_updates"] and clipped["peak_bytes"] == per["peak_bytes"]
  for whole_cfg in [
    _cfg(batch_size=1, seq_len=16, per_layer_updates=False),
    _cfg(batch_size=1, seq_len=16, grad_clip=1.0),  # clipping needs the whole gradient
  ]:
    whole = plan.plan(whole_cfg, vocab_size=512, compile=False)
    assert not whole["per_layer_updates"]
    assert per["gradients_at_peak_bytes"] < whole["gradients_at_peak_bytes"]
    assert per["peak_bytes"] < whole["peak_bytes"]


def test_tied_model_is_planned_with_the_step_the_trainer_runs():
  """A tied embedding takes the whole-gradient step in the trainer
  (steps.select_train_step); the planner must plan that step, not the per-layer one."""
  cfg = _cfg(batch_size=1, seq_len=16)
  tied = plan.plan(cfg, vocab_size=512, compile=False, overrides={"tie_embeddings": True})
  assert not tied["per_layer_updates"]


def test_plan_for_a_hugging_face_directory(tmp_path, capsys):
  """plan --init-from DIR plans DIR's architecture from its config.json alone (no weights):
  here a Qwen2-style one (GQA, q/k/v biases), with its own vocabulary."""
  from galore_jax import hf

  arch = model_lib.get_config("llama_tiny", vocab_size=300, num_kv_heads=2, qkv_bias=True)
  (tmp_path / "config.json").write_text(json.dumps(hf.config_to_dict(arch)))
  flags = ["--batch-size", "2", "--seq-len", "32", "--no-compile", "--json"]
  flags += ["--optimizer", "galore_adamw8bit", "--rank", "32"]
  assert cli.main(["plan", "--init-from", str(tmp_path), *flags]) == 0
  r = json.loads(capsys.readouterr().out)
  no_bias = model_lib.get_config("llama_tiny", vocab_size=300, num_kv_heads=2)
  assert r["params"] == model_lib.param_count(arch) > model_lib.param_count(no_bias)
  assert r["config"]["vocab_size"] == 300 and r["config"]["model"] == str(tmp_path)
  # The same architecture named through overrides plans to the same bytes.
  same = plan.plan(
    _cfg(),
    vocab_size=300,
    compile=False,
    overrides={"num_kv_heads": 2, "qkv_bias": True},
  )
  assert r["peak_bytes"] == same["peak_bytes"] and r["optimizer_bytes"] == same["optimizer_bytes"]
  for extra, flag in [
    (["--init-from", str(tmp_path), "--vocab-size", "512"], "--vocab-size"),
    (["--init-from", str(tmp_path / "nowhere")], "--init-from"),
    (["--init-from", str(tmp_path), "--rank", "1000"], "--rank"),
  ]:
    assert cli.main(["plan", *flags, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"galore-jax: error: {flag}:") and "\n" not in err, err


@pytest.mark.parametrize(
  "flags, flag",
  [
    (["--gpu-memory", "lots"], "--gpu-memory"),
    (["--gpu-memory", "0GB"], "--gpu-memory"),
    (["--batch-size", "0"], "--batch-size"),
    (["--rank", "100000", "--optimizer", "galore_adamw"], "--rank"),
    (["--model", "llama_3t"], "--model"),
    (["--vocab-size", "0"], "--vocab-size"),
    (["--seq-len", "100000"], "--seq-len"),
  ],
)
def test_bad_flags_exit_2(capsys, flags, flag):
  assert cli.main(["plan", *SMALL, "--no-compile", *flags]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"galore-jax: error: {flag}:") and "\n" not in err


def test_argparse_choice_errors_exit_2():
  with pytest.raises(SystemExit) as e:
    cli.main(["plan", "--optimizer", "sgd"])
  assert e.value.code == 2


def test_parse_bytes():
  assert plan.parse_bytes("24GB") == 24 * 10**9
  assert plan.parse_bytes("24 GiB") == 24 * 2**30
  assert plan.parse_bytes("24") == 24 * 10**9
  assert plan.parse_bytes("80000MB") == 80 * 10**9
  with pytest.raises(train.ConfigError):
    plan.parse_bytes("24 bananas")


def _compiled(**kw):
  kw = {"per_layer_updates": False, **kw}
  cfg = _cfg(optimizer="galore_adamw", rank=16, batch_size=1, seq_len=16, **kw)
  return plan.plan(cfg, vocab_size=128, overrides=TINY, suggest=False)


@pytest.fixture(scope="module")
def compiled_bf16():
  return _compiled()


def test_compiled_estimate_and_cpu_correction(compiled_bf16):
  """XLA's figure is replayed faithfully; bf16 loses only the CPU-only f32 dot copies."""
  bf16 = compiled_bf16
  x = bf16["xla"]
  for key in (
    "argument_bytes",
    "output_bytes",
    "alias_bytes",
    "temp_bytes",
    "compile_seconds",
    "corrected_peak_bytes",
    "live_at_corrected_peak",
  ):
    assert key in x, key
  batch = 3 * 1 * 16 * 4 + 4  # inputs, targets, mask: int32 (1, 1, 16); the float32 rate
  assert x["argument_bytes"] == bf16["weights_bytes"] + bf16["optimizer_bytes"] + batch
  assert abs(x["replayed_cpu_peak_bytes"] - x["peak_bytes"]) < 0.05 * x["peak_bytes"]
  assert x["cpu_only_buffers"] > 0
  assert x["corrected_peak_bytes"] < x["replayed_cpu_peak_bytes"]
  assert bf16["peak_source"] == "xla_corrected"
  assert bf16["peak_bytes"] == x["corrected_peak_bytes"]
  # The whole gradient is alive at the peak of the train step (its update waits for all of it).
  assert x["corrected_peak_bytes"] >= (
    bf16["weights_bytes"] + bf16["optimizer_bytes"] + bf16["gradient_bytes"]
  )
  # float32 has nothing to correct.
  f32 = _compiled(param_dtype="float32", dtype="float32")
  assert f32["xla"]["cpu_only_buffers"] == 0
  assert f32["xla"]["corrected_peak_bytes"] == f32["xla"]["replayed_cpu_peak_bytes"]


def test_layerwise_step_frees_gradients_early(compiled_bf16):
  """The trainer's default step updates each weight as its gradient arrives: its compiled
  peak is below the whole-gradient step's by more than the whole gradient."""
  whole = compiled_bf16
  per_layer = _compiled(per_layer_updates=True)
  assert per_layer["xla"]["step"] == "train.make_layerwise_step"
  assert per_layer["peak_bytes"] + whole["gradient_bytes"] < whole["peak_bytes"]


def test_lowrank_accumulation_is_planned_and_compiled():
  """--grad-accum with GaLore keeps the per-layer step. Its compiled peak grows by at most its
  float32 accumulators (low-rank for projected matrices), well under the whole gradient's
  float32 copy that the whole-gradient step accumulates into."""
  # The exact SVD refreshes one matrix at a time. (With the default subspace method a
  # stage's unit refreshes together, and on jax 0.12 XLA then scheduled the accumulating
  # step below the plain one, 1.23 MB against 1.27 MB, so the bound has nothing to check.)
  f32 = dict(param_dtype="float32", dtype="float32", per_layer_updates=True, svd="exact")
  one, acc = _compiled(**f32), _compiled(grad_accum=4, **f32)
  assert acc["per_layer_updates"] and acc["xla"]["step"] == "train.make_layerwise_step"
  accum = acc["accumulator_bytes"]
  assert one["accumulator_bytes"] == 0 and 0 < accum < 0.4 * 4 * acc["params"]
  assert acc["analytic"]["peak_bytes"] - one["analytic"]["peak_bytes"] == accum
  batch = 3 * 3 * 16 * 4  # three more int32 (1, 16) micro-batches
  assert 0 < acc["peak_bytes"] - one["peak_bytes"] <= accum + batch


def test_memory_table_runs(capsys, load_experiment):
  module = load_experiment("memory_table")
  assert module.main(["--models", "llama_60m"]) == 0
  out = capsys.readouterr().out
  assert "llama_60m" in out and "GiB" in out
  rows = module.rows({"llama_60m"})
  assert {r["optimizer"] for r in rows} == {"adamw", "galore_adamw"}
  full = next(r for r in rows if r["optimizer"] == "adamw")
  # Pure bf16 Adam: weights + two bf16 moments = 6 bytes per parameter (+ step counters).
  assert abs(full["total_bytes"] - 6 * full["weights_bytes"] / 2) < 64


def test_refresh_workspace_counts_the_matrices_refreshed_together():
  # llama_60m: 8 blocks of q, k, v, o (512 x 512) and gate, up (512 x 1376), down (1376 x
  # 512). Float32 workspace per m x n matrix: its copy plus U, S, Vh (exact) or the
  # iterates, G V (max x r) and three k x r bases (iterative methods).
  m, n, r, k = 512, 1376, 128, 512
  exact = 4 * (m * n + m * k + k + k * n)
  iterative = 4 * (m * n + (n + 3 * k) * r)
  transient = lambda **kw: plan.svd_transient_bytes(
    plan.build(_cfg(**{"model": "llama_60m", "optimizer": "galore_adamw", "rank": r, **kw}))
  )
  assert transient(svd="exact") == exact  # per-layer step: one matrix at a time
  assert transient() == 3 * iterative  # the default subspace: a stage's gate, up, down together
  # Whole-gradient step: every leaf of one shape; the exact SVD keeps gate/up (16) apart
  # from down (8), the iterative methods batch all 24 (a shape with its transpose).
  assert transient(per_layer_updates=False, svd="exact") == 16 * exact
  assert transient(per_layer_updates=False, svd="subspace") == 24 * iterative
  assert transient(optimizer="adamw") == 0
