"""galore_jax/steps.py: step selection and the parametrised whole-gradient step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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
