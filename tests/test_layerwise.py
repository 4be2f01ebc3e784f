"""Per-layer updates through the stage protocol on a second architecture (a tiny GPT-2), and
low-rank gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import galore_jax
from galore_jax import layerwise, projector, steps
from galore_jax import optimizer as galore

D, HEADS, VOCAB, SEQ, LAYERS = 16, 2, 32, 8, 2


class GPTBlock(nnx.Module):
  """GPT-2's pre-LayerNorm block: causal attention, GELU MLP, biases."""

  def __init__(self, rngs):
    self.ln1, self.ln2 = nnx.LayerNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
    # No bias on qkv: a key bias has a zero gradient (softmax is shift-invariant), and Adam
    # would turn its rounding noise into full-size, order-dependent updates.
    self.qkv = nnx.Linear(D, 3 * D, use_bias=False, rngs=rngs)
    self.proj = nnx.Linear(D, D, rngs=rngs)
    self.fc, self.fc_out = nnx.Linear(D, 4 * D, rngs=rngs), nnx.Linear(4 * D, D, rngs=rngs)

  def attention(self, x):
    b, n, _ = x.shape
    q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(b, n, 3 * HEADS, D // HEADS), 3, axis=2)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, n, D)
    return x + self.proj(out)

  def mlp(self, x):
    return x + self.fc_out(jax.nn.gelu(self.fc(self.ln2(x))))

  def __call__(self, x):
    return self.mlp(self.attention(x))


class GPT(nnx.Module):
  def __init__(self, rngs):
    self.wte, self.wpe = nnx.Embed(VOCAB, D, rngs=rngs), nnx.Embed(SEQ, D, rngs=rngs)
    self.blocks = nnx.List([GPTBlock(rngs) for _ in range(LAYERS)])
    self.ln_f = nnx.LayerNorm(D, rngs=rngs)
    self.lm_head = nnx.Linear(D, VOCAB, use_bias=False, rngs=rngs)

  def embed(self, tokens):
    return self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))

  def head(self, x):
    return self.lm_head(self.ln_f(x))

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def gpt_stages(model):
  """What a user writes: block 0 as one stage, block 1 as attention and MLP halves."""
  S = layerwise.Stage
  whole = ("ln1", "qkv", "proj", "ln2", "fc", "fc_out")
  return layerwise.Stages(
    embed=S(lambda m, t: m.embed(t), ("wte", "wpe")),
    blocks=[
      [S(lambda b, x: b(x), whole, ("blocks", 0))],
      [
        S(lambda b, x: b.attention(x), ("ln1", "qkv", "proj"), ("blocks", 1)),
        S(lambda b, x: b.mlp(x), ("ln2", "fc", "fc_out"), ("blocks", 1)),
      ],
    ],
    head=S(lambda m, x: m.head(x), ("ln_f", "lm_head")),
  )


def block_kernels(params):
  # GaLore on the blocks' matrices: qkv (16, 48) and fc (16, 64) project on the left,
  # proj (16, 16) and fc_out (64, 16) on the right (proj_type "std").
  return jax.tree_util.tree_map_with_path(
    lambda path, x: x.ndim == 2 and "blocks" in jax.tree_util.keystr(path), params
  )


def make_tx(gap=2):
  return galore_jax.galore_adamw(
    1e-2, rank=2, update_proj_gap=gap, weight_decay=0.1, mask=block_kernels
  )


def setup(gap=2):
  graphdef, state = nnx.split(GPT(nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(state)
  tx = make_tx(gap)
  return graphdef, params, tx, tx.init(params)


def batch(seed, micro=1, rows=2):
  tokens = jax.random.randint(jax.random.key(seed), (micro, rows, SEQ + 1), 0, VOCAB)
  mask = (jax.random.uniform(jax.random.key(seed + 100), (micro, rows, SEQ)) > 0.2).astype(
    jnp.float32
  )
  return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "mask": mask}


def assert_close(a, b, rtol=1e-5, atol=1e-5):
  # atol: Adam (lr 1e-2) turns the rounding of a near-cancelling gradient entry (the
  # embedding's scatter-add, summed in another order) into a visible update difference.
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_user_model_layerwise_step_equals_whole_gradient_step(remat):
  # 3 steps with refreshes at counts 0 and 2: per-layer updates of a model that is not this
  # package's LLaMA give the whole-gradient step's numbers.
  graphdef, params, tx, opt = setup()
  whole = jax.jit(steps.make_train_step(graphdef, tx))
  per_layer = jax.jit(layerwise.make_layerwise_step(graphdef, tx, remat=remat, stages=gpt_stages))
  state_w = state_l = (params, opt)
  for t in range(3):
    *state_w, m_w = whole(*state_w, batch(t))
    *state_l, m_l = per_layer(*state_l, batch(t))
    np.testing.assert_allclose(m_l["loss"], m_w["loss"], rtol=1e-6)
  assert int(state_l[1][0].count) == 3
  assert_close(state_l, state_w)


def test_stages_must_own_every_parameter():
  graphdef, params, tx, opt = setup()

  def missing_fc_out(model):
    s = gpt_stages(model)
    first = layerwise.Stage(s.blocks[0][0].fn, ("ln1", "qkv", "proj", "ln2", "fc"), ("blocks", 0))
    return layerwise.Stages(s.embed, [[first], s.blocks[1]], s.head)

  step = layerwise.make_layerwise_step(graphdef, tx, stages=missing_fc_out)
  with pytest.raises(ValueError, match=r"owned by none: \[\('blocks', 0, 'fc_out', 'bias'\)"):
    jax.eval_shape(step, params, opt, batch(0))
  with pytest.raises(TypeError, match="layerwise_stages"):
    jax.eval_shape(layerwise.make_layerwise_step(graphdef, tx), params, opt, batch(0))


N_MICRO = 4


def test_a_packed_batch_needs_a_stage_that_takes_segment_ids():
  # gpt_stages' attention cannot keep packed examples apart: refused, not run unmasked.
  graphdef, params, tx, opt = setup()
  b = {**batch(0), "segments": jnp.ones((1, 2, SEQ), jnp.int32)}
  step = layerwise.make_layerwise_step(graphdef, tx, stages=gpt_stages)
  with pytest.raises(ValueError, match="takes segment ids"):
    jax.eval_shape(step, params, opt, b)


def handed_gradient(graphdef, params, opt_state, b):
  """The documented gradient the accumulated step hands ``tx.update``, computed directly:
  per projected leaf ``g_N + P P^T sum_{k<N} g_k`` (left side) or ``g_N + sum_{k<N} g_k P^T
  P`` (right side), every other leaf the sum of all micro-batches; all / total tokens."""
  denom = jnp.maximum(jnp.sum(b["mask"]), 1.0)
  grads = [
    jax.grad(lambda p, k=k: steps.token_loss(graphdef, p, jax.tree.map(lambda x: x[k], b))[0])(
      params
    )
    for k in range(b["inputs"].shape[0])
  ]
  earlier = jax.tree.map(lambda *gs: sum(gs) / denom, *grads[:-1])
  last = jax.tree.map(lambda g: g / denom, grads[-1])

  def combine(g_n, g_early, basis):
    if basis is None:
      return g_n + g_early
    if g_n.shape[0] < g_n.shape[1]:  # left: basis (m, r)
      return g_n + basis @ (basis.T @ g_early)
    return g_n + (g_early @ basis.T) @ basis  # right: basis (r, n)

  projectors = opt_state[0].projectors
  return jax.tree.map(combine, last, earlier, projectors, is_leaf=lambda x: x is None)


def test_lowrank_accumulation_equals_large_batch_between_refreshes():
  # Refreshes at counts 0 and 3 (gap 3). Counts 1 and 2: N micro-batches accumulated in low
  # rank give the large-batch step. Count 3 (refresh): the projector comes from the gradient
  # handed to the optimizer, g_N + back_project(acc), as documented (not the large batch's).
  graphdef, params, tx, opt = setup(gap=3)
  whole = jax.jit(steps.make_train_step(graphdef, tx))
  accum = jax.jit(layerwise.make_layerwise_step(graphdef, tx, stages=gpt_stages))
  state = whole(params, opt, batch(0, N_MICRO))[:2]
  for t in (1, 2):
    *large, m_w = whole(*state, batch(t, N_MICRO))
    *acc, m_a = accum(*state, batch(t, N_MICRO))
    np.testing.assert_allclose(m_a["loss"], m_w["loss"], rtol=1e-6)
    assert float(m_a["tokens"]) == float(m_w["tokens"])
    assert_close(acc, large)
    state = large
  assert int(state[1][0].count) == 3
  b = batch(3, N_MICRO)
  params, opt = state

  @jax.jit
  def reference(params, opt, b):
    updates, opt = tx.update(handed_gradient(graphdef, params, opt, b), opt, params)
    return optax.apply_updates(params, updates), opt

  want = reference(params, opt, b)
  got = accum(params, opt, b)[:2]
  assert_close(got, want)
  # ... which is not the large-batch refresh.
  large = whole(params, opt, b)[0]
  kernel = lambda p: np.asarray(p["blocks"][0]["fc"]["kernel"])
  assert np.abs(kernel(large) - kernel(got[0])).max() > 1e-4


@pytest.mark.parametrize("proj_type", projector.PROJ_TYPES)
def test_leaf_projections_are_the_transforms_maps(proj_type):
  # With an identity inner optimizer and scale 1, a non-refresh update is
  # project_back(project(g)): leaf_projections must reproduce it, matrix_axes included.
  key = iter(jax.random.split(jax.random.key(0), 16))
  params = {
    "wide": jax.random.normal(next(key), (3, 5, 9)),  # batch axis 3
    "sq": {"kernel": jax.random.normal(next(key), (6, 6))},  # viewed as (out, in)
    "vec": jax.random.normal(next(key), (4,)),
  }
  kw = dict(proj_type=proj_type, matrix_axes=galore_jax.reference_side_axes)
  tx = galore.galore(optax.identity(), rank=2, update_proj_gap=10, scale=1.0, **kw)
  noise = lambda: jax.tree.map(lambda p: jax.random.normal(next(key), p.shape), params)
  _, state = tx.update(noise(), tx.init(params), params)  # count 0: bases from an SVD
  g = noise()
  updates, _ = tx.update(g, state, params)
  projections = galore.leaf_projections(state, params, **kw)
  assert [q is None for q in projections] == [False, True, False]  # sq, vec, wide
  for q, g_leaf, u in zip(projections, jax.tree.leaves(g), jax.tree.leaves(updates), strict=True):
    if q is None:
      continue
    low = q.project(g_leaf)
    assert low.shape == q.low_rank_shape
    np.testing.assert_allclose(q.project_back(low), u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(q.project(q.project_back(low)), low, rtol=1e-5, atol=1e-5)
  if proj_type in ("left", "right"):
    other = {"left": "right", "right": "left"}[proj_type]
    with pytest.raises(ValueError, match="differ from the transform's"):
      galore.leaf_projections(state, params, proj_type=other)
