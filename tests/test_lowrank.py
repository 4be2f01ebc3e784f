"""galore_jax/lowrank.py: the low-rank and LoRA parametrisations of Table 2's baselines."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galore_jax import lowrank, targets, train
from galore_jax import model as model_lib


def _dense(key, d=16, f=24):
  """A two-projection parameter dict shaped like the model's (one target per kind)."""
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "embed": {"embedding": jax.random.normal(k1, (32, d))},
    "layers": {
      0: {
        "attn": {"q_proj": {"kernel": 0.02 * jax.random.normal(k2, (d, d))}},
        "mlp": {"up_proj": {"kernel": 0.02 * jax.random.normal(k3, (d, f))}},
        "mlp_norm": {"scale": jnp.ones((d,))},
      }
    },
  }


def _apply(params, x_BxD):
  """A stand-in network that uses every kernel: the function the merge must preserve."""
  layer = params["layers"][0]
  h_BxD = x_BxD @ layer["attn"]["q_proj"]["kernel"]
  return jnp.tanh(h_BxD) @ layer["mlp"]["up_proj"]["kernel"]


def test_lora_at_init_is_the_frozen_dense_model():
  dense = _dense(jax.random.key(0))
  spec = lowrank.Spec("lora", rank=4, alpha=32.0)
  trainable, frozen = lowrank.init(dense, spec, jax.random.key(1))
  assert sorted(frozen) == ["layers/0/attn/q_proj/kernel", "layers/0/mlp/up_proj/kernel"]
  q = trainable["layers"][0]["attn"]["q_proj"]["kernel"]
  assert isinstance(q, lowrank.Factors) and q.a.shape == (16, 4) and q.b.shape == (4, 16)
  assert not np.any(np.asarray(q.b))  # B = 0: LoRA starts as the frozen model
  assert np.std(np.asarray(q.a)) > 0
  # Exactly the dense weights, and non-target leaves are the same arrays.
  chex.assert_trees_all_equal(lowrank.materialize(trainable, frozen, spec), dense)
  assert spec.scale == 8.0  # alpha / r


def test_lora_gradient_reaches_only_b_at_init_and_changes_the_function():
  dense = _dense(jax.random.key(0))
  spec = lowrank.Spec("lora", rank=4)
  trainable, frozen = lowrank.init(dense, spec, jax.random.key(1))
  x_BxD = jax.random.normal(jax.random.key(2), (5, 16))
  loss = lambda t: jnp.sum(_apply(lowrank.materialize(t, frozen, spec), x_BxD) ** 2)
  g = jax.grad(loss)(trainable)["layers"][0]["attn"]["q_proj"]["kernel"]
  assert not np.any(np.asarray(g.a))  # dL/dA = s W-grad B^T = 0 while B = 0
  assert np.any(np.asarray(g.b))


def test_merge_preserves_the_function_and_restarts_the_factors():
  dense = _dense(jax.random.key(0))
  spec = lowrank.Spec("lora", rank=4)
  trainable, frozen = lowrank.init(dense, spec, jax.random.key(1))
  # Pretend training moved both factors.
  trainable = jax.tree.map(
    lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape), trainable
  )
  x_BxD = jax.random.normal(jax.random.key(2), (5, 16))
  before = _apply(lowrank.materialize(trainable, frozen, spec), x_BxD)
  merged, new_frozen = lowrank.merge(trainable, frozen, spec, jax.random.key(4))
  after = _apply(lowrank.materialize(merged, new_frozen, spec), x_BxD)
  np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
  q_old = trainable["layers"][0]["attn"]["q_proj"]["kernel"]
  q_new = merged["layers"][0]["attn"]["q_proj"]["kernel"]
  assert not np.any(np.asarray(q_new.b))
  assert not np.allclose(q_new.a, q_old.a)  # A is redrawn
  name = "layers/0/attn/q_proj/kernel"
  np.testing.assert_allclose(
    new_frozen[name], frozen[name] + spec.scale * q_old.a @ q_old.b, rtol=1e-5, atol=1e-6
  )
  # The embedding (not factored) is untouched.
  chex.assert_trees_all_equal(merged["embed"], trainable["embed"])


def test_reset_zeroes_the_factor_moments_only():
  dense = _dense(jax.random.key(0))
  spec = lowrank.Spec("lora", rank=4)
  trainable, frozen = lowrank.init(dense, spec, jax.random.key(1))
  tx = train.build_optimizer(train.TrainConfig(optimizer="adamw", steps=10, warmup=0))
  state = tx.init(trainable)
  grads = jax.tree.map(jnp.ones_like, trainable)
  _, state = tx.update(grads, state, trainable)
  reset = lowrank.reset_factor_moments(state)
  flat_old = jax.tree_util.tree_flatten_with_path(state)[0]
  flat_new = jax.tree_util.tree_flatten_with_path(reset)[0]
  zeroed = kept = 0
  for (path, old), (_, new) in zip(flat_old, flat_new, strict=True):
    in_factors = any(getattr(k, "name", None) in ("a", "b") for k in path)
    if in_factors:
      assert not np.any(np.asarray(new)), jax.tree_util.keystr(path)
      zeroed += 1
    else:
      np.testing.assert_array_equal(new, old)  # counters and the dense leaves' moments
      kept += 1
  assert zeroed == 8  # (mu, nu) x (q, up) x (a, b)
  assert kept >= 5  # Adam's count, mu / nu of the embedding and the norm
  with pytest.raises(ValueError, match="mode 'lora'"):
    lowrank.merge(trainable, frozen, lowrank.Spec("lowrank", 4), jax.random.key(0))


def test_lowrank_factors_replace_the_kernels():
  dense = _dense(jax.random.key(0), d=64, f=96)
  spec = lowrank.Spec("lowrank", rank=8)
  trainable, frozen = lowrank.init(dense, spec, jax.random.key(1), init_std=0.02)
  assert frozen == {}
  # r (m + n) per kernel instead of m n: (64 + 64) * 8 + (64 + 96) * 8.
  assert lowrank.factor_count(trainable) == 8 * (64 + 64) + 8 * (64 + 96)
  assert lowrank.count(trainable) == 32 * 64 + 64 + 8 * (128 + 160)
  w = lowrank.materialize(trainable, frozen, spec)["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert w.shape == (64, 96)
  assert np.linalg.matrix_rank(np.asarray(w)) == 8
  assert 0.015 < float(jnp.std(w)) < 0.025  # the dense init's scale (0.02)
  with pytest.raises(ValueError, match="exceeds"):
    lowrank.init(dense, lowrank.Spec("lowrank", 65), jax.random.key(1))


_TARGET_NAMES = ("layers/0/attn/q_proj/kernel", "layers/0/mlp/up_proj/kernel")


def test_is_target_is_galores_mask():
  # The baselines factor exactly the matrices GaLore projects, on the model's real tree.
  _, params = train.abstract_model(model_lib.get_config("llama_tiny", vocab_size=64))
  chosen = {
    lowrank.path_key(path)
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    if lowrank.is_target(path)
  }
  mask = jax.tree_util.tree_flatten_with_path(targets.llama_targets(params))[0]
  assert chosen == {lowrank.path_key(path) for path, m in mask if m}
  assert len(chosen) == 7 * 4  # q, k, v, o, gate, up, down in each of 4 layers
  assert "embed/embedding" not in chosen and "lm_head/kernel" not in chosen


@pytest.mark.parametrize("mode", ["lowrank", "lora"])
def test_init_and_materialize_shapes(mode):
  dense = _dense(jax.random.key(0), d=16, f=24)
  spec = lowrank.Spec(mode, rank=3)
  trainable, frozen = lowrank.init(dense, spec, jax.random.key(1))
  up = trainable["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert up.a.shape == (16, 3) and up.b.shape == (3, 24)
  assert sorted(frozen) == ([] if mode == "lowrank" else sorted(_TARGET_NAMES))
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert shapes(lowrank.materialize(trainable, frozen, spec)) == shapes(dense)
  assert lowrank.factor_count(trainable) == 3 * (16 + 16) + 3 * (16 + 24)


def test_merge_keeps_shapes_and_frozen_names():
  dense = _dense(jax.random.key(0))
  spec = lowrank.Spec("lora", rank=2)
  trainable, frozen = lowrank.init(dense, spec, jax.random.key(1))
  merged, new_frozen = lowrank.merge(trainable, frozen, spec, jax.random.key(2))
  shapes = lambda t: jax.tree.map(lambda x: x.shape, t)
  assert shapes(merged) == shapes(trainable) and shapes(new_frozen) == shapes(frozen)


def test_spec_validation_and_description():
  with pytest.raises(ValueError, match="unknown low-rank mode"):
    lowrank.Spec("dora", 4)
  with pytest.raises(ValueError, match="rank must be >= 1"):
    lowrank.Spec("lora", 0)
  assert lowrank.Spec("lowrank", 4).scale == 1.0
  assert lowrank.describe(None) == {"mode": "dense"}
  assert lowrank.describe(lowrank.Spec("lora", 4, 32.0)) == {
    "mode": "lora",
    "rank": 4,
    "alpha": 32.0,
    "scale": 8.0,
  }
