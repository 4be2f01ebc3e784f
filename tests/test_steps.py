"""galore_jax/steps.py: step selection and the parametrised whole-gradient step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galore_jax import config, layerwise, steps, trainer
from galore_jax import model as model_lib

MICRO = model_lib.LlamaConfig(
  vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_layers=1
)
CFG = config.TrainConfig(optimizer="adamw", steps=4, warmup=0, per_layer_updates=True)


def _batch(key):
  tokens = jax.random.randint(key, (1, 2, 9), 0, MICRO.vocab_size)
  return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "mask": jnp.ones((1, 2, 8))}


def test_select_train_step_follows_the_config_and_the_tie():
  graphdef, _ = trainer.abstract_model(MICRO)
  tx = config.build_optimizer(CFG)
  pick = lambda cfg, mc: steps.select_train_step(graphdef, tx, cfg, mc).__qualname__
  layerwise_name = layerwise.make_layerwise_step(graphdef, tx).__qualname__
  whole_name = steps.make_train_step(graphdef, tx).__qualname__
  assert pick(CFG, MICRO) == layerwise_name
  assert pick(dataclasses.replace(CFG, grad_accum=2), MICRO) == whole_name
  assert pick(dataclasses.replace(CFG, grad_clip=1.0), MICRO) == whole_name
  clip_in_step = dataclasses.replace(CFG, grad_clip=1.0, per_layer_clip=True)
  assert pick(clip_in_step, MICRO) == layerwise_name
  assert pick(CFG, dataclasses.replace(MICRO, tie_embeddings=True)) == whole_name
  assert steps.uses_layerwise_step(CFG, MICRO)
  assert not steps.uses_layerwise_step(CFG, dataclasses.replace(MICRO, tie_embeddings=True))


def test_identity_parametrization_is_the_plain_step():
  # The Table 2 baselines train through `materialize`; with the identity it must be the
  # trainer's own step, number for number, and leave the frozen part alone.
  graphdef, _ = trainer.abstract_model(MICRO)
  params = model_lib.init_params(MICRO, 0)
  tx = config.build_optimizer(CFG)
  plain = jax.jit(steps.make_train_step(graphdef, tx))
  wrapped = jax.jit(steps.make_train_step(graphdef, tx, materialize=lambda t, f: t))
  frozen = {"w0": jnp.ones((3,))}
  state_p = (params, tx.init(params))
  state_w = ({"trainable": params, "frozen": frozen}, tx.init(params))
  for t in range(2):
    batch = _batch(jax.random.key(t))
    *state_p, m_p = plain(*state_p, batch)
    *state_w, m_w = wrapped(*state_w, batch)
    assert float(m_w["loss"]) == float(m_p["loss"])
  trained = jax.tree.leaves(state_w[0]["trainable"])
  for a, b in zip(jax.tree.leaves(state_p[0]), trained, strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(state_w[0]["frozen"]["w0"], frozen["w0"])


def test_per_layer_step_clips_by_the_global_norm(poison_stage_gradients):
  """--grad-clip keeps per-layer updates: the step takes the global norm in a first forward
  and backward pass, then updates each weight with its gradient clipped as
  optax.clip_by_global_norm clips the whole gradient. Same numbers as the whole-gradient
  step (GaLore with weight decay, refreshes at counts 0 and 2); a non-finite gradient skips
  the whole step, as there."""
  cfg = dataclasses.replace(
    CFG,
    optimizer="galore_adamw",
    rank=4,
    update_proj_gap=2,
    weight_decay=0.1,
    grad_clip=0.05,
    per_layer_clip=True,
  )
  assert steps.per_layer_updates(cfg) and steps.clips_in_step(cfg, MICRO)
  assert not steps.clips_in_step(cfg, dataclasses.replace(MICRO, tie_embeddings=True))
  assert not steps.per_layer_updates(dataclasses.replace(cfg, per_layer_clip=False))
  for bad in [{"grad_accum": 2}, {"grad_clip": 0.0}, {"per_layer_updates": False}]:
    with pytest.raises(config.ConfigError, match="--per-layer-clip"):
      config.validate(dataclasses.replace(cfg, **bad))
  graphdef, _ = trainer.abstract_model(MICRO)
  params = model_lib.init_params(MICRO, 0)
  tx_whole = config.build_optimizer(cfg)
  tx_step = config.build_optimizer(cfg, clip_in_step=True)
  assert jax.tree.structure(tx_whole.init(params)) == jax.tree.structure(tx_step.init(params))
  whole = jax.jit(steps.make_train_step(graphdef, tx_whole))
  clipped = jax.jit(steps.select_train_step(graphdef, tx_step, cfg, MICRO))
  unclipped = jax.jit(layerwise.make_layerwise_step(graphdef, tx_step))
  s_w = s_c = s_u = (params, tx_whole.init(params))
  for t in range(3):
    batch = _batch(jax.random.key(t))
    *s_w, m_w = whole(*s_w, batch)
    *s_c, m_c = clipped(*s_c, batch)
    *s_u, _ = unclipped(*s_u, batch)
    assert float(m_c["grad_norm"]) > 2 * cfg.grad_clip  # the clip acts every step
    np.testing.assert_allclose(m_c["grad_norm"], m_w["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(m_c["loss"], m_w["loss"], rtol=1e-6)
    assert int(m_c["skipped"]) == 0
  flat = lambda s: np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(s)])
  # The tolerance of test_train's per-layer == whole-gradient test (summation order differs;
  # the count-2 refresh's SVD amplifies it in a few projector entries).
  np.testing.assert_allclose(flat(s_c), flat(s_w), rtol=2e-3, atol=2e-5)
  assert np.abs(flat(s_u[0]) - flat(s_w[0])).max() > 1e-3  # unclipped is another trajectory

  # Every forward (the step traces two): the attention half, then the poisoned MLP half.
  poison_stage_gradients(lambda n: n % 2 == 0)
  poisoned = jax.jit(steps.select_train_step(graphdef, tx_step, cfg, MICRO))
  new_params, new_opt, m = poisoned(*s_c, _batch(jax.random.key(9)))
  assert int(m["skipped"]) == 1 and np.isfinite(float(m["loss"]))
  mlp_stage = [params["layers"][0][k] for k in model_lib.DecoderBlock.MLP]  # norm + MLP
  assert int(m["nonfinite_grads"]) == len(jax.tree.leaves(mlp_stage))
  for a, b in zip(jax.tree.leaves(s_c), jax.tree.leaves((new_params, new_opt)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
