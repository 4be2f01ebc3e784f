"""experiments/bench_optimizer.py: the smoke run, its JSON, and the helpers it relies on."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax


@pytest.fixture(scope="module")
def bench(load_experiment):
  return load_experiment("bench_optimizer")


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
  path = tmp_path_factory.mktemp("bench") / "bench.json"
  returned = bench.main(["--smoke", "--quiet", "--json", str(path)])
  return returned, json.loads(path.read_text())


def _kernel(m, n):
  return {"kernel": jax.ShapeDtypeStruct((m, n), jnp.float32)}


def _toy_params():
  return {
    "embed": {"embedding": jax.ShapeDtypeStruct((50, 8), jnp.float32)},
    "layers": {
      0: {
        "attn": {"q_proj": _kernel(8, 8)},
        "attn_norm": {"scale": jax.ShapeDtypeStruct((8,), jnp.float32)},
        "mlp": {"up_proj": _kernel(8, 20), "down_proj": _kernel(20, 8)},
      }
    },
  }


def test_smoke_json_fields_and_state_bytes(smoke):
  returned, data = smoke
  assert data["smoke"] is True and data["reps"] == 1
  assert set(data["models"]) == {"smoke"}
  res = data["models"]["smoke"]
  assert {"rank", "gap", "params", "targets", "memory", "time", "targets_check"} <= set(res)
  assert res["targets"] == 7  # q, k, v, o, gate, up, down of the one smoke layer

  mem = res["memory"]
  opt = mem["optimizers"]
  assert set(opt) == {"optax.adamw", "optax.contrib.galore", "galore_jax", "galore_jax reverse_std"}
  for row in opt.values():
    assert row["bytes"] == row["array_bytes"] + row["scalar_bytes"]
  # The state-bytes equality: arrays exactly the formula, only scalar counters on top.
  assert mem["galore_jax_equals_formula"] is True
  assert opt["galore_jax"]["array_bytes"] == mem["formula_bytes"]
  assert 0 < mem["galore_jax_minus_formula"] == opt["galore_jax"]["scalar_bytes"] <= 64
  # optax.contrib.galore keeps the projector on the long side (moments r x min(m, n)).
  assert mem["optax_galore_equals_its_formula"] is True
  assert opt["galore_jax reverse_std"]["array_bytes"] == mem["formula_bytes_optax_side"]
  assert opt["optax.adamw"]["array_bytes"] == 2 * mem["param_bytes"]

  cases = {(c["label"], c["kind"]): c for c in res["time"]["cases"]}
  for key in [
    ("optax.contrib.galore", "plain"),
    ("optax.contrib.galore", "refresh"),
    ("galore_jax exact", "plain"),
    ("galore_jax exact", "refresh"),
    ("galore_jax randomized", "plain"),
    ("galore_jax randomized", "refresh"),
    ("galore_jax staggered (exact)", "plain"),
    ("galore_jax staggered (exact)", "peak"),
    ("galore_jax staggered+randomized", "peak"),
    ("galore_jax subspace", "plain"),
    ("galore_jax subspace", "refresh"),
    ("galore_jax staggered+subspace", "peak"),
    ("galore_jax reverse_std (optax's side)", "plain"),
  ]:
    c = cases[key]
    assert c["median_s"] > 0 and c["reps"] == 1 and len(c["samples_s"]) == 1
    assert math.isfinite(c["ratio_vs_optax"])
  assert cases[("optax.contrib.galore", "plain")]["ratio_vs_optax"] == 1.0
  assert cases[("galore_jax exact", "refresh")]["count"] == res["gap"]
  assert cases[("galore_jax exact", "refresh")]["amortised_s"] > 0
  assert cases[("galore_jax staggered (exact)", "peak")]["amortised_derived"] is True

  noise = res["time"]["noise"]
  assert len(noise["same_program_paired_ratios"]) == 2 and noise["max_deviation"] >= 0
  assert (
    res["time"]["staggered"]["peak_count"]
    == cases[("galore_jax staggered (exact)", "peak")]["count"]
  )

  checks = res["targets_check"]
  assert set(checks) == {
    "state_bytes_equal_formula",
    "plain_step_ratio_vs_optax",
    "randomized_over_exact_refresh",
    "subspace_excess_over_exact_excess",
  }
  assert all(isinstance(v["pass"], bool) for v in checks.values())
  assert checks["state_bytes_equal_formula"]["pass"] is True
  assert "accuracy" not in data  # off by default with --smoke
  assert returned["models"]["smoke"]["memory"] == data["models"]["smoke"]["memory"]


def test_formula_bytes_by_hand(bench):
  params = _toy_params()
  r = 4
  expected = (
    2 * 4 * 50 * 8  # embedding: full Adam
    + 2 * 4 * 8  # norm scale: full Adam
    + 4 * (2 * r * 8 + r * 8)  # q 8x8
    + 2 * 4 * (2 * r * 20 + r * 8)  # up 8x20, down 20x8
  )
  assert bench.formula_bytes(params, r) == expected
  optax_side = 2 * 4 * 50 * 8 + 2 * 4 * 8 + 4 * (r * 8 + 2 * r * 8) + 2 * 4 * (r * 20 + 2 * r * 8)
  assert bench.formula_bytes(params, r, projector_side="max") == optax_side
  # Rank above the short side is clipped, as both transforms do.
  assert bench.formula_bytes(params, 100) == (
    2 * 4 * 50 * 8 + 2 * 4 * 8 + 4 * 3 * 8 * 8 + 2 * 4 * (2 * 8 * 20 + 8 * 8)
  )


def test_masks_select_exactly_the_targets(bench):
  params = _toy_params()
  mask = bench.target_mask(params)
  assert mask["embed"]["embedding"] is False
  assert mask["layers"][0]["attn_norm"]["scale"] is False
  assert mask["layers"][0]["attn"]["q_proj"]["kernel"] is True
  dn = bench.optax_dimension_numbers(params)
  assert dn["embed"]["embedding"] is None
  assert isinstance(
    dn["layers"][0]["mlp"]["up_proj"]["kernel"], optax.contrib.GaLoreDimensionNumbers
  )
  # Both libraries' states hold exactly the formula's arrays for this tree.
  opts = bench.make_optimizers(params, rank=4, gap=5)
  gj = jax.eval_shape(opts["galore_jax"].init, params)
  ox = jax.eval_shape(opts["optax.contrib.galore"].init, params)
  assert bench._array_bytes(gj)[0] == bench.formula_bytes(params, 4)
  assert bench._array_bytes(ox)[0] == bench.formula_bytes(params, 4, projector_side="max")


def test_with_count_sets_the_refresh_clock(bench):
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _toy_params())
  opts = bench.make_optimizers(params, rank=4, gap=5)
  for name in ("galore_jax", "optax.contrib.galore"):
    state = bench.with_count(opts[name].init(params), 7)
    found = [
      s
      for s in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, (galore_jax.GaLoreState, optax.contrib.GaLoreState))
      )
      if isinstance(s, (galore_jax.GaLoreState, optax.contrib.GaLoreState))
    ]
    assert len(found) == 1 and int(found[0].count) == 7
  with pytest.raises(ValueError, match="one GaLore state"):
    bench.with_count(opts["optax.adamw"].init(params), 3)


def test_staggered_peak_count_refreshes_the_named_leaves(bench):
  """The phases the script derives agree with what the transform actually does."""
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _toy_params())
  gap = 6
  info = bench.staggered_counts(params, gap)
  # Leaves in flatten order: embedding, q (8x8), attn_norm, down (20x8), up (8x20); the
  # targets' phases floor(k * 6 / 5) are 1, 3, 4; down and up cost the same, down is first.
  assert info["max_leaves_per_step"] == 1 and info["quiet_count"] == 2
  assert len(info["peak_leaves"]) == 1 and "down_proj" in info["peak_leaves"][0]
  assert info["peak_count"] == 3
  tx = bench.make_optimizers(params, rank=4, gap=gap)["galore_jax staggered"]
  grads = bench.random_grads(params)
  state = bench.with_count(tx.init(params), info["peak_count"])
  _, new = jax.jit(tx.update)(grads, state, params)
  before, after = state[0].projectors["layers"][0], new[0].projectors["layers"][0]
  changed = {
    name
    for part, name in (("attn", "q_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
    if not np.array_equal(before[part][name]["kernel"], after[part][name]["kernel"])
  }
  assert changed == {"down_proj"}


def test_subspace_agreement_on_a_matrix_with_a_spectral_gap(bench):
  k1, k2 = jax.random.split(jax.random.key(0))
  u, _ = jnp.linalg.qr(jax.random.normal(k1, (40, 12)))
  v, _ = jnp.linalg.qr(jax.random.normal(k2, (30, 12)))
  s = jnp.concatenate([jnp.linspace(10.0, 5.0, 6), jnp.full((6,), 0.01)])
  for g in (u @ jnp.diag(s) @ v.T, (u @ jnp.diag(s) @ v.T).T):
    res = jax.jit(
      lambda g: bench.subspace_agreement(g, 6, jax.random.key(1), power_iters_sweep=(0, 2)),
      compiler_options=bench.SMOKE_COMPILER_OPTIONS,
    )(g)
    for q in ("q0", "q2"):
      assert float(res[q]["mean_cos"]) == pytest.approx(1.0, abs=1e-4)
      assert float(res[q]["min_cos"]) == pytest.approx(1.0, abs=1e-3)
      assert float(res[q]["energy_ratio"]) == pytest.approx(1.0, abs=1e-5)
    assert float(res["exact_energy"] / res["total_energy"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_accuracy_on_a_real_gradient(bench):
  import galore_jax.model as M

  cfg = M.get_config("llama_tiny", **(bench.SMOKE_ACCURACY["config"] | {"num_layers": 1}))
  acc = bench.measure_accuracy(cfg, rank=8, seq_len=16, batch_size=2, power_iters_sweep=(2,))
  assert math.isfinite(acc["loss"])
  assert len(acc["matrices"]) == 7 * cfg.num_layers
  for row in acc["matrices"]:
    assert 0.0 < row["q2"]["min_cos"] <= row["q2"]["mean_cos"] <= 1.0 + 1e-5
    assert 0.9 < row["q2"]["energy_ratio"] <= 1.0 + 1e-5
