"""Adafactor as the reference computes it (galore_jax.adafactor); GaLoreAdafactor's parity
with galore-torch is in test_reference_parity.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tx_run import run_updates

import galore_jax
from galore_jax import adafactor


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"learning_rate": 1e-3}, "learning_rate and relative_step=True"),
    ({"relative_step": False}, "give a learning_rate"),
    ({"learning_rate": 1e-3, "relative_step": False, "warmup_init": True}, "warmup_init"),
  ],
)
def test_arguments_that_exclude_each_other_are_refused(kwargs, match):
  for make in (galore_jax.scale_by_adafactor_hf, galore_jax.adafactor_hf):
    with pytest.raises(ValueError, match=match):
      make(**kwargs)
  with pytest.raises(ValueError, match=match):
    galore_jax.galore_adafactor(rank=2, **kwargs)
  with pytest.raises(ValueError, match="inner_params must be one of"):
    galore_jax.galore(optax.identity(), rank=2, inner_params="projected")


def test_state_is_factored_on_the_low_rank_shape():
  params = {"tall": jnp.ones((64, 32)), "wide": jnp.ones((32, 64)), "b": jnp.ones((32,))}
  state = galore_jax.galore_adafactor(rank=4).init(params)
  inner = state[0].inner_state
  # std side: tall keeps R = G P^T (64 x 4), wide R = P^T G (4 x 64): r + max(m, n) means.
  assert inner.v_row["tall"].shape == (64,) and inner.v_col["tall"].shape == (4,)
  assert inner.v_row["wide"].shape == (4,) and inner.v_col["wide"].shape == (64,)
  assert inner.v["b"].shape == (32,) and inner.mu is None
  with_b1 = galore_jax.galore_adafactor(rank=4, beta1=0.9).init(params)[0].inner_state
  assert with_b1.mu["tall"].shape == (64, 4) and with_b1.mu["wide"].shape == (4, 64)


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {"beta1": 0.9, "weight_decay": 0.1},
    {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "clip_threshold": 0.5},
  ],
  ids=["defaults", "beta1_decay", "fixed_lr"],
)
def test_adafactor_hf_matches_transformers_adafactor(kwargs):
  """Against transformers' own Adafactor (the code galore-torch copied), in float64, on a
  matrix, a stack of matrices (factored over its last two axes, RMS over the whole tensor)
  and a vector."""
  torch = pytest.importorskip("torch", reason="needs the reference extra")
  optimization = pytest.importorskip("transformers.optimization", reason="needs transformers")
  rng = np.random.default_rng(0)
  shapes = {"w": (12, 8), "stack": (3, 6, 10), "b": (8,)}
  init = {k: rng.normal(size=s) * 0.2 for k, s in shapes.items()}
  grads = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(6)]

  tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
  opt = optimization.Adafactor(list(tparams.values()), **kwargs)
  for g in grads:
    for k, p in tparams.items():
      p.grad = torch.tensor(g[k])
    opt.step()

  kwargs = dict(kwargs)
  tx = galore_jax.adafactor_hf(kwargs.pop("lr", None), **kwargs)
  as_jax = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  params, _ = run_updates(tx, as_jax(init), [as_jax(g) for g in grads])
  for k in shapes:
    want = tparams[k].detach().numpy()
    change = np.max(np.abs(want - init[k]))
    assert change > 1e-3, k
    assert np.max(np.abs(np.asarray(params[k], np.float64) - want)) <= 1e-4 * change + 1e-7, k


def test_relative_step_size():
  step = lambda t, warmup: float(adafactor._step_size(jnp.asarray(t), None, True, warmup))
  assert step(1, False) == pytest.approx(1e-2) and step(10_000, False) == pytest.approx(1e-2)
  assert step(40_000, False) == pytest.approx(5e-3)  # 1 / sqrt(t) once below 1e-2
  assert step(5, True) == pytest.approx(5e-6)  # warmup_init: 1e-6 t


def test_moment_policies():
  """``reproject`` rotates the first moment (beta1) at a refresh and is a no-op without one;
  ``reset`` zeroes every running mean of a refreshed leaf."""
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)}
  grads = [{"w": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)} for _ in range(3)]
  make = lambda **kw: galore_jax.galore_adafactor(rank=3, update_proj_gap=2, **kw)
  keep, _ = run_updates(make(), params, grads)
  no_first_moment, _ = run_updates(make(moment_policy="reproject"), params, grads)
  np.testing.assert_array_equal(keep["w"], no_first_moment["w"])
  kept, _ = run_updates(make(beta1=0.9), params, grads)
  rotated, _ = run_updates(make(beta1=0.9, moment_policy="reproject"), params, grads)
  assert not np.allclose(kept["w"], rotated["w"])  # the refresh at count 2 rotated mu
  _, state = run_updates(make(moment_policy="reset"), params, grads)
  # Reset at the count-2 refresh, then step t = 3 alone: v_row = (1 - b2_3) mean(R^2 + eps1)
  # with b2_3 = 1 - 3^-0.8 and R = G P^T in the new basis.
  basis = state[0].projectors["w"]
  low_rank = grads[2]["w"] @ basis.T
  want = 3.0**-0.8 * jnp.mean(low_rank**2 + 1e-30, axis=-1)
  np.testing.assert_allclose(state[0].inner_state.v_row["w"], want, rtol=1e-5)


def test_inner_gets_the_whole_weight_only_with_inner_params_full():
  seen = {}

  def spy(mode):
    def update(u, state, params=None):
      seen[mode] = params["w"].shape
      return u, state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

  params = {"w": jnp.ones((16, 12))}
  for mode in ("low_rank", "full"):
    tx = galore_jax.galore(spy(mode), rank=3, inner_params=mode)
    tx.update({"w": jnp.ones((16, 12))}, tx.init(params), params)
  assert seen == {"low_rank": (16, 3), "full": (16, 12)}
  assert adafactor.scale_by_adafactor_hf is galore_jax.scale_by_adafactor_hf


def test_the_trainers_galore_adafactor_and_its_per_layer_update():
  """``--optimizer galore_adafactor`` is ``galore_adafactor`` as torchrun_main builds it (the
  schedule's rate, no relative step size or parameter scale), and updating one weight at a
  time through ``restrict_state`` (the per-layer step) gives the whole-tree update."""
  from galore_jax import config, model, optimizer, train

  cfg = config.TrainConfig(
    optimizer="galore_adafactor", rank=4, weight_decay=0.1, steps=10, svd="exact"
  )  # the reference's refresh, as the library factory's default
  _, shapes = train.abstract_model(model.get_config("llama_tiny", vocab_size=64, num_layers=2))
  rng = np.random.default_rng(2)
  draw = lambda: jax.tree.map(
    lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.05, jnp.float32), shapes
  )
  params, grads = draw(), draw()
  tx = config.build_optimizer(cfg)
  want = galore_jax.galore_adafactor(
    config.lr_schedule(cfg),
    relative_step=False,
    scale_parameter=False,
    weight_decay=0.1,
    rank=4,
    update_proj_gap=cfg.update_proj_gap,
    scale=cfg.galore_scale,
    mask=galore_jax.llama_targets,
    matrix_axes=galore_jax.reference_side_axes,
  )
  state = tx.init(params)
  _, state = jax.jit(tx.update)(grads, state, params)  # step 1: the rate is 0 in warmup
  updates, _ = jax.jit(tx.update)(grads, state, params)
  ref_state = want.init(params)
  _, ref_state = jax.jit(want.update)(grads, ref_state, params)
  expected, _ = jax.jit(want.update)(grads, ref_state, params)
  np.testing.assert_allclose(
    np.asarray(updates["layers"][0]["attn"]["q_proj"]["kernel"]),
    np.asarray(expected["layers"][0]["attn"]["q_proj"]["kernel"]),
    rtol=1e-5,
    atol=1e-9,
  )
  assert float(jnp.max(jnp.abs(updates["embed"]["embedding"]))) > 0

  # One weight alone, the others optax.MaskedNode, as the per-layer step updates them.
  keep = jax.tree.map(lambda _: False, params)
  keep["layers"][1]["mlp"]["down_proj"]["kernel"] = True
  masked = lambda tree: jax.tree.map(lambda x, k: x if k else optax.MaskedNode(), tree, keep)
  part = optimizer.restrict_state(tx, state, keep)
  alone, _ = jax.jit(tx.update)(masked(grads), part, masked(params))
  np.testing.assert_allclose(
    np.asarray(alone["layers"][1]["mlp"]["down_proj"]["kernel"]),
    np.asarray(updates["layers"][1]["mlp"]["down_proj"]["kernel"]),
    rtol=1e-5,
    atol=1e-9,
  )


def test_adafactor_beta1_flag():
  from galore_jax import config

  for bad, why in [
    ({"adafactor_beta1": 1.0}, r"must be in \[0, 1\)"),
    ({"adafactor_beta1": float("nan")}, r"must be in \[0, 1\)"),
    ({"adafactor_beta1": 0.9, "optimizer": "galore_adamw"}, "applies to --optimizer adafactor"),
  ]:
    with pytest.raises(config.ConfigError, match=f"--adafactor-beta1: {why}"):
      config.validate(config.TrainConfig(**{"optimizer": "galore_adafactor", **bad}))
  params = {"w": jax.ShapeDtypeStruct((16, 12), jnp.float32)}
  for beta1, has_mu in [(0.0, False), (0.9, True)]:
    cfg = config.TrainConfig(optimizer="adafactor", adafactor_beta1=beta1)
    state = jax.eval_shape(config.build_optimizer(cfg).init, params)
    assert (state[0].mu is not None) == has_mu
