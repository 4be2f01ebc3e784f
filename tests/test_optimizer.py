"""The GaLore optax transform: state, cadence, policies, faults, jit."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax
from galore_jax import projector as proj
from galore_jax.optimizer import galore, merge_state, restrict_state, scale_by_adam_hf

PARAMS = {
  "tall": jnp.zeros((24, 8)),
  "wide": jnp.zeros((8, 24)),
  "square": jnp.zeros((12, 12)),
  "stacked": jnp.zeros((3, 10, 16)),
  "bias": jnp.zeros((8,)),
}


def _grads(key, params=PARAMS):
  keys = jax.random.split(key, len(jax.tree.leaves(params)))
  return jax.tree.unflatten(
    jax.tree.structure(params),
    [
      jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(keys, jax.tree.leaves(params), strict=True)
    ],
  )


def _run(tx, steps, params=PARAMS, seed=0):
  """Runs `steps` jit-compiled updates; returns the states after each step."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    updates, state = tx.update(_grads(key, params), state, params)
    return optax.apply_updates(params, updates), state

  states = []
  for t in range(steps):
    params, state = step(params, state, jax.random.key(seed * 1000 + t))
    states.append(state)
  return params, states, step


def test_state_shapes_tall_wide_square_stacked():
  state = galore(scale_by_adam_hf(), rank=4).init(PARAMS)
  chex.assert_shape(state.projectors["tall"], (4, 8))  # m >= n: P = Vh[:r]
  chex.assert_shape(state.projectors["wide"], (8, 4))  # m < n: P = U[:, :r]
  chex.assert_shape(state.projectors["square"], (4, 12))  # square: right, as reference
  chex.assert_shape(state.projectors["stacked"], (3, 10, 4))
  assert state.projectors["bias"] is None
  mu = state.inner_state.mu
  chex.assert_shape(
    [mu["tall"], mu["wide"], mu["square"], mu["stacked"], mu["bias"]],
    [(24, 4), (4, 24), (12, 4), (3, 4, 16), (8,)],
  )


def test_state_bytes_follow_reference_formula():
  params = {"w": jnp.zeros((64, 32)), "v": jnp.zeros((32, 96))}
  state = jax.eval_shape(galore(scale_by_adam_hf(), rank=8).init, params)
  # 2 moments r x max(m, n) + projector r x min(m, n) per matrix, float32; + Adam count.
  expected = sum(4 * (2 * 8 * max(s) + 8 * min(s)) for s in [(64, 32), (32, 96)])
  assert galore_jax.state_bytes(state) == expected + 4 + 4  # galore count + adam count


def test_projectors_orthonormal_after_refresh():
  _, states, _ = _run(galore(scale_by_adam_hf(), rank=4, update_proj_gap=2), 3)
  for name, p in states[-1].projectors.items():
    if p is None:
      continue
    gram = jnp.swapaxes(p, -1, -2) @ p if name == "wide" or name == "stacked" else p @ p.T
    chex.assert_trees_all_close(gram, jnp.broadcast_to(jnp.eye(4), gram.shape), atol=1e-5)


def _changes(states, name):
  """Steps (0-based) at which a leaf's projector changed."""
  prev, out = None, []
  for t, s in enumerate(states):
    p = np.asarray(s.projectors[name])
    if prev is None or not np.array_equal(p, prev):
      out.append(t)
    prev = p
  return out


def test_refresh_cadence_synchronous():
  _, states, step = _run(galore(scale_by_adam_hf(), rank=4, update_proj_gap=3), 10)
  for name in ("tall", "wide", "square", "stacked"):
    assert _changes(states, name) == [0, 3, 6, 9], name
  assert step._cache_size() == 1  # no recompilation from step to step
  assert int(states[-1].count) == 10


def test_refresh_cadence_staggered():
  gap = 8
  _, states, _ = _run(
    galore(scale_by_adam_hf(), rank=4, update_proj_gap=gap, refresh_schedule="staggered"), 20
  )
  # Phases count every leaf in flatten (sorted-key) order, "bias" (index 0) included.
  names = ("square", "stacked", "tall", "wide")
  offsets = [k * gap // 5 for k in range(1, 5)]
  for name, off in zip(names, offsets, strict=True):
    expected = sorted({0} | {t for t in range(20) if t >= off and (t - off) % gap == 0})
    assert _changes(states, name) == expected, name
  per_step = [sum(t in _changes(states, n) for n in names) for t in range(1, 20)]
  assert max(per_step) == 1  # after step 0 no step refreshes more than one leaf


def test_mixed_pytree_and_bias_gets_plain_adam():
  tx = galore(scale_by_adam_hf(), rank=4)
  g = _grads(jax.random.key(0))
  updates, _ = tx.update(g, tx.init(PARAMS), PARAMS)
  plain, _ = scale_by_adam_hf().update(g["bias"], scale_by_adam_hf().init(g["bias"]))
  chex.assert_trees_all_close(updates["bias"], plain)
  chex.assert_trees_all_equal_shapes(updates, PARAMS)


def test_bf16_params():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
  new, states, _ = _run(galore(scale_by_adam_hf(), rank=4, update_proj_gap=2), 3, params)
  chex.assert_trees_all_equal_dtypes(new, params)
  assert states[-1].projectors["tall"].dtype == jnp.bfloat16  # reference: gradient dtype
  assert states[-1].inner_state.mu["tall"].dtype == jnp.bfloat16
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))


def test_projector_dtype_option():
  state = galore(scale_by_adam_hf(), rank=4, projector_dtype=jnp.bfloat16).init(PARAMS)
  assert state.projectors["tall"].dtype == jnp.bfloat16
  assert state.inner_state.mu["tall"].dtype == jnp.float32


def test_stacked_leaf_equals_independent_slices():
  stacked = {"w": jnp.zeros((3, 10, 16))}
  slices = {f"w{i}": jnp.zeros((10, 16)) for i in range(3)}
  tx = galore(scale_by_adam_hf(), rank=4, update_proj_gap=2)
  s_stacked, s_slices = tx.init(stacked), tx.init(slices)
  for t in range(5):
    g = jax.random.normal(jax.random.key(t), (3, 10, 16))
    u_stacked, s_stacked = tx.update({"w": g}, s_stacked)
    u_slices, s_slices = tx.update({f"w{i}": g[i] for i in range(3)}, s_slices)
    for i in range(3):
      chex.assert_trees_all_close(u_stacked["w"][i], u_slices[f"w{i}"], atol=1e-6)


def test_matrix_axes_for_head_split_kernel():
  params = {"q": jnp.zeros((16, 4, 6))}  # (embed, heads, head_dim)
  flat = {"q": jnp.zeros((16, 24))}
  axes = lambda path, leaf: ((0,), (1, 2))
  tx3 = galore(scale_by_adam_hf(), rank=4, matrix_axes=axes)
  tx2 = galore(scale_by_adam_hf(), rank=4)
  s3, s2 = tx3.init(params), tx2.init(flat)
  chex.assert_shape(s3.projectors["q"], (16, 4))  # the (16 x 24) matrix, left side
  g = jax.random.normal(jax.random.key(0), (16, 4, 6))
  u3, _ = tx3.update({"q": g}, s3)
  u2, _ = tx2.update({"q": g.reshape(16, 24)}, s2)
  chex.assert_trees_all_close(u3["q"].reshape(16, 24), u2["q"], atol=1e-6)


def test_matrix_axes_transposed_view_matches_torch_layout():
  """((1,), (0,)) makes a Flax (in, out) kernel project as torch's (out, in) weight does."""
  k = jax.random.normal(jax.random.key(0), (12, 12))
  tx_view = galore(scale_by_adam_hf(), rank=4, matrix_axes=lambda p, x: ((1,), (0,)))
  tx_plain = galore(scale_by_adam_hf(), rank=4)
  u_view, _ = tx_view.update({"k": k}, tx_view.init({"k": k}))
  u_torch, _ = tx_plain.update({"k": k.T}, tx_plain.init({"k": k.T}))
  chex.assert_trees_all_close(u_view["k"], u_torch["k"].T, atol=1e-6)


def test_custom_mask_pytree_and_callable():
  mask = {"tall": True, "wide": False, "square": False, "stacked": False, "bias": False}
  for m in (mask, lambda p: mask):
    state = galore(scale_by_adam_hf(), rank=4, mask=m).init(PARAMS)
    assert state.projectors["wide"] is None
    chex.assert_shape(state.inner_state.mu["wide"], (8, 24))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(rank=0), "rank"),
    (dict(rank=4, update_proj_gap=0), "update_proj_gap"),
    (dict(rank=4, proj_type="diag"), "proj_type"),
    (dict(rank=4, svd="qr"), "svd"),
    (dict(rank=4, moment_policy="zero"), "moment_policy"),
    (dict(rank=4, refresh_schedule="random"), "refresh_schedule"),
  ],
)
def test_invalid_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    galore(scale_by_adam_hf(), **kwargs)


def test_masked_vector_leaf_is_an_error_naming_the_leaf():
  tx = galore(scale_by_adam_hf(), rank=4, mask=jax.tree.map(lambda _: True, PARAMS))
  with pytest.raises(ValueError, match=r"\['bias'\].*ndim >= 2"):
    tx.init(PARAMS)


def test_rank_above_min_dimension_is_clipped_and_lossless():
  params = {"w": jnp.zeros((10, 6))}
  with pytest.warns(UserWarning, match=r"clipped to 6"):
    tx = galore(optax.identity(), rank=32, scale=1.0)
    state = tx.init(params)
  chex.assert_shape(state.projectors["w"], (6, 6))
  g = {"w": jax.random.normal(jax.random.key(0), (10, 6))}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    updates, _ = tx.update(g, state)
  # A full-rank orthonormal basis: projecting and back is the identity.
  chex.assert_trees_all_close(updates["w"], g["w"], atol=1e-5)


def test_clipped_ranks_are_one_warning_at_init_and_none_per_update():
  """A GQA model clips rank on two kernels per layer: one warning, not one per leaf (the
  trainer's per-layer update called the transform once per stage and warned each time)."""
  params = {f"k{i}": jnp.zeros((12, 4)) for i in range(6)} | {"q": jnp.zeros((12, 12))}
  tx = galore(optax.identity(), rank=8)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state = tx.init(params)
    tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  texts = [str(w.message) for w in caught if "galore rank" in str(w.message)]
  assert len(texts) == 1, texts
  assert "6 x (12, 4)" in texts[0] and "clipped to 4" in texts[0] and "(12, 12)" not in texts[0]


def test_identity_inner_is_projection_times_scale():
  g = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
  tx = galore(optax.identity(), rank=3, scale=0.5)
  updates, state = tx.update(g, tx.init(g))
  p = state.projectors["w"]
  chex.assert_trees_all_close(updates["w"], 0.5 * g["w"] @ p.T @ p, atol=1e-6)
  chex.assert_trees_all_close(p, proj.exact_basis(g["w"], "right", 3))


@pytest.mark.parametrize("svd", ["exact", "randomized", "subspace"])
def test_nonfinite_gradient_keeps_previous_projector(svd):
  tx = galore(scale_by_adam_hf(), rank=4, update_proj_gap=2, svd=svd)
  params = {"w": jnp.zeros((16, 8))}
  state = tx.init(params)
  initial = state.projectors["w"]
  bad = {"w": jnp.full((16, 8), jnp.nan)}
  _, state = tx.update(bad, state)  # first refresh fails: the safe initial basis stays
  chex.assert_trees_all_equal(state.projectors["w"], initial)
  assert bool(jnp.all(jnp.isfinite(state.projectors["w"])))
  good = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
  _, state = tx.update(good, state)  # count 1: no refresh
  _, state = tx.update(good, state)  # count 2: refresh succeeds
  p_good = state.projectors["w"]
  assert not np.array_equal(np.asarray(p_good), np.asarray(initial))
  _, state = tx.update(good, state)
  inf = {"w": good["w"].at[0, 0].set(jnp.inf)}
  _, state = tx.update(inf, state)  # count 4: refresh on a non-finite gradient
  chex.assert_trees_all_equal(state.projectors["w"], p_good)


def test_failed_svd_keeps_previous_projector(monkeypatch):
  def failing_svd(g, side, rank):
    good = proj.canonicalize_signs(jnp.eye(g.shape[-1])[:rank], axis=-1)
    return good * jnp.nan

  tx = galore(optax.identity(), rank=4)
  g = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
  state = tx.init(g)
  monkeypatch.setattr(proj, "exact_basis", failing_svd)
  updates, state = tx.update(g, state)
  chex.assert_trees_all_equal(state.projectors["w"], jnp.eye(4, 8))
  assert bool(jnp.all(jnp.isfinite(updates["w"])))


def test_apply_if_finite_skips_nonfinite_steps_cleanly():
  tx = optax.apply_if_finite(galore_jax.galore_adamw(1e-2, rank=4), max_consecutive_errors=5)
  params = {"w": jnp.ones((16, 8))}
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.full((16, 8), jnp.nan)}, state, params)
  chex.assert_trees_all_equal(updates["w"], jnp.zeros((16, 8)))
  updates, state = tx.update({"w": jnp.ones((16, 8))}, state, params)
  assert bool(jnp.all(jnp.isfinite(updates["w"])))


def _inner_mu(state):
  return state.inner_state.mu["w"]


@pytest.mark.parametrize("side_shape", [(16, 8), (8, 16)])
def test_moment_policy_reset_and_reproject(side_shape):
  b1 = 0.9
  params = {"w": jnp.zeros(side_shape)}
  g0 = {"w": jax.random.normal(jax.random.key(0), side_shape)}
  g1 = {"w": jax.random.normal(jax.random.key(1), side_shape)}
  side = proj.resolve_side("std", *side_shape)
  results = {}
  for policy in ("keep", "reset", "reproject"):
    tx = galore(scale_by_adam_hf(b1=b1), rank=3, update_proj_gap=1, moment_policy=policy)
    state = tx.init(params)
    _, s0 = tx.update(g0, state)
    _, s1 = tx.update(g1, s0)
    results[policy] = (s0, s1)
  s0, s1 = results["keep"]
  p0, p1 = s0.projectors["w"], s1.projectors["w"]
  r1 = proj.project(g1["w"], p1, side)
  chex.assert_trees_all_close(_inner_mu(s1), b1 * _inner_mu(s0) + (1 - b1) * r1, atol=1e-6)
  chex.assert_trees_all_close(_inner_mu(results["reset"][1]), (1 - b1) * r1, atol=1e-6)
  rotated = proj.change_of_basis(_inner_mu(s0), p0, p1, side)
  chex.assert_trees_all_close(
    _inner_mu(results["reproject"][1]), b1 * rotated + (1 - b1) * r1, atol=1e-6
  )
  # The second moment is kept by reproject (no linear change of basis for it).
  chex.assert_trees_all_close(
    results["reproject"][1].inner_state.nu["w"], s1.inner_state.nu["w"], atol=1e-6
  )


def test_randomized_svd_trains_like_exact():
  # A fixed low-rank-dominated gradient field: both SVDs find the same subspace.
  target = {
    "w": jax.random.normal(jax.random.key(5), (32, 4))
    @ jax.random.normal(jax.random.key(6), (4, 48))
  }

  def loss(p):
    return 0.5 * jnp.sum((p["w"] - target["w"]) ** 2)

  finals = {}
  for method in ("exact", "randomized", "subspace"):
    tx = galore_jax.galore_adamw(0.1, rank=4, update_proj_gap=10, svd=method, scale=1.0)
    p = {"w": jnp.zeros((32, 48))}
    s = tx.init(p)
    step = jax.jit(lambda p, s, tx=tx: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(60):
      u, s = step(p, s)
      p = optax.apply_updates(p, u)
    finals[method] = float(loss(p))
  assert finals["exact"] < 0.2 * float(loss({"w": jnp.zeros((32, 48))}))
  assert finals["randomized"] == pytest.approx(finals["exact"], rel=0.01)
  assert finals["subspace"] == pytest.approx(finals["exact"], rel=0.01)


def test_composed_chain_matches_galore_adamw_structure():
  sched = optax.constant_schedule(1e-2)
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    galore(optax.scale_by_adam(), rank=4, update_proj_gap=200, scale=0.25),
    optax.add_decayed_weights(0.0),
    optax.scale_by_learning_rate(sched),
  )
  state = tx.init(PARAMS)
  chex.assert_shape(state[1].inner_state.mu["tall"], (24, 4))
  updates, _ = tx.update(_grads(jax.random.key(0)), state, PARAMS)
  chex.assert_trees_all_equal_shapes(updates, PARAMS)


def test_inner_receives_low_rank_params():
  seen = {}

  def spy_update(updates, state, params=None):
    seen["params"] = params
    return updates, state

  spy = optax.GradientTransformation(lambda p: optax.EmptyState(), spy_update)
  params = {"w": jax.random.normal(jax.random.key(0), (16, 8)), "b": jnp.ones((8,))}
  tx = galore(spy, rank=3)
  _, state = tx.update(_grads(jax.random.key(1), params), tx.init(params), params)
  p = state.projectors["w"]
  chex.assert_trees_all_close(seen["params"]["w"], params["w"] @ p.T, atol=1e-6)
  chex.assert_trees_all_equal(seen["params"]["b"], params["b"])


@pytest.mark.parametrize("svd", ["exact", "randomized", "subspace"])
def test_updating_the_tree_in_parts_equals_one_update(svd):
  # Per-layer updates: each part of the tree updated on its own (MaskedNode elsewhere,
  # restrict_state / merge_state) gives the whole-tree update, refresh phases and keys included.
  tx = optax.chain(
    galore(scale_by_adam_hf(), rank=4, update_proj_gap=3, svd=svd, refresh_schedule="staggered"),
    optax.scale_by_learning_rate(0.01),
  )
  parts = [{"bias", "tall"}, {"wide"}, {"square", "stacked"}]

  @jax.jit
  def in_parts(g, state):
    new_state, updates = state, {}
    for names in parts:
      keep = {k: k in names for k in PARAMS}
      mask = lambda tree, keep=keep: {
        k: v if keep[k] else optax.MaskedNode() for k, v in tree.items()
      }
      u, part = tx.update(mask(g), restrict_state(tx, state, keep), mask(PARAMS))
      updates.update({k: v for k, v in u.items() if keep[k]})
      new_state = merge_state(tx, new_state, part, keep)
    return updates, new_state

  whole = jax.jit(lambda g, state: tx.update(g, state, PARAMS))
  state_whole = state_parts = tx.init(PARAMS)
  for t in range(7):
    g = _grads(jax.random.key(t))
    u_whole, state_whole = whole(g, state_whole)
    u_parts, state_parts = in_parts(g, state_parts)
    chex.assert_trees_all_close(u_parts, u_whole, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(state_parts, state_whole, rtol=1e-6, atol=1e-7)


# Three leaves of one shape (one of them a stack of two matrices), one of another shape.
SAME_SHAPES = {
  "a": jnp.zeros((24, 8)),
  "b": jnp.zeros((24, 8)),
  "c": jnp.zeros((2, 24, 8)),
  "d": jnp.zeros((8, 24)),  # left side: the transpose of a, b, c's shape
}


def _top_level_conds(tx, grads, state):
  jaxpr = jax.make_jaxpr(tx.update)(grads, state).jaxpr
  return sum(e.primitive.name == "cond" for e in jaxpr.eqns)


@pytest.mark.parametrize("svd", ["exact", "randomized", "subspace"])
def test_batched_refresh_equals_per_leaf_refresh(svd):
  grads = [_grads(jax.random.key(t), SAME_SHAPES) for t in range(5)]
  # One leaf's gradient is non-finite at a refresh: that leaf alone keeps its basis.
  grads[2] = {**grads[2], "b": grads[2]["b"].at[0, 0].set(jnp.nan)}

  def run(**kw):
    # A new transform each time: jit and make_jaxpr cache traces by function.
    tx = galore(scale_by_adam_hf(), rank=3, update_proj_gap=2, svd=svd, **kw)
    state, outs = tx.init(SAME_SHAPES), []
    for g in grads:
      u, state = jax.jit(tx.update)(g, state)
      outs.append((u, state.projectors))
    return outs, _top_level_conds(tx, grads[0], tx.init(SAME_SHAPES))

  batched, conds_batched = run()
  per_leaf, conds_per_leaf = run(refresh_batch_elements=1)  # every leaf on its own
  # The iterative methods batch d (8 x 20, left) with a, b, c (24 x 8, right) as its transpose.
  assert (conds_batched, conds_per_leaf) == ((2, 4) if svd == "exact" else (1, 4))
  for (u_b, p_b), (u_l, p_l) in zip(batched, per_leaf, strict=True):
    chex.assert_trees_all_close(p_b, p_l, atol=1e-5)
    for k in SAME_SHAPES:
      if k != "b":  # b's updates are NaN after step 2 in both
        chex.assert_trees_all_close(u_b[k], u_l[k], atol=1e-5)
  # The bad refresh (count 2) kept b's basis and changed the others'.
  chex.assert_trees_all_equal(batched[2][1]["b"], batched[1][1]["b"])
  assert np.abs(np.asarray(batched[2][1]["a"]) - np.asarray(batched[1][1]["a"])).max() > 1e-3


def test_subspace_refresh_starts_from_the_current_projector():
  tx = galore(optax.identity(), rank=3, update_proj_gap=2, svd="subspace", subspace_iters=1)
  g = {"w": jax.random.normal(jax.random.key(0), (24, 8))}
  state = tx.init(g)
  _, state = tx.update(g, state)  # count 0: the randomized first refresh
  _, state = tx.update(g, state)  # count 1: no refresh
  start = proj.orthonormalize(jax.random.normal(jax.random.key(1), (8, 3))).T
  state = state._replace(projectors={"w": start})
  _, state = tx.update(g, state)  # count 2: one power step from `start`
  want = proj.subspace_basis(g["w"], "right", start, iters=1)
  chex.assert_trees_all_close(state.projectors["w"], want, atol=1e-6)
  fresh = proj.randomized_basis(g["w"], "right", 3, jax.random.key(2))
  assert np.abs(np.asarray(want) - np.asarray(fresh)).max() > 1e-2


def test_all_zero_gradient_keeps_previous_projector():
  tx = galore(optax.identity(), rank=3, update_proj_gap=1, svd="subspace")
  g = {"w": jax.random.normal(jax.random.key(0), (24, 8))}
  _, state = tx.update(g, tx.init(g))
  before = state.projectors["w"]
  _, state = tx.update({"w": jnp.zeros((24, 8))}, state)
  chex.assert_trees_all_equal(state.projectors["w"], before)


def _wrapped(rank=2):
  """GaLore inside each optax state wrapper the helpers must see through."""
  adam = scale_by_adam_hf()
  return {
    "chain": galore_jax.galore_adamw(1e-2, rank=rank),
    "inject_hyperparams": optax.inject_hyperparams(
      galore_jax.galore_adamw, static_args=galore_jax.STATIC_ARGS
    )(learning_rate=1e-2, rank=rank),
    "multi_transform": optax.multi_transform(
      {"a": galore(adam, rank=rank), "b": galore(adam, rank=rank + 1)},
      {"tall": "a", "wide": "b", "square": "a", "stacked": "b", "bias": "a"},
    ),
    "masked_in_multisteps": optax.MultiSteps(
      optax.masked(galore(adam, rank=rank), {k: k != "bias" for k in PARAMS}), 2
    ),
    "apply_if_finite": optax.apply_if_finite(galore_jax.galore_adamw(1e-2, rank=rank), 3),
  }


@pytest.mark.parametrize(
  "name",
  ["chain", "inject_hyperparams", "multi_transform", "masked_in_multisteps", "apply_if_finite"],
)
def test_with_galore_count_sets_only_the_galore_clocks(name):
  state = _wrapped()[name].init(PARAMS)
  found = galore_jax.galore_states(state)
  assert len(found) == (2 if name == "multi_transform" else 1)
  assert all(isinstance(s, galore_jax.GaLoreState) for s in found)
  new = galore_jax.with_galore_count(state, 7)
  assert jax.tree.structure(new) == jax.tree.structure(state)
  assert [int(s.count) for s in galore_jax.galore_states(new)] == [7] * len(found)
  assert all(s.count.dtype == jnp.int32 for s in galore_jax.galore_states(new))
  # Every other leaf (Adam's count, the wrappers' counters, moments, bases) is unchanged.
  changed = [
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new), strict=True)
  ]
  assert sum(changed) == len(found)


def test_with_galore_count_moves_the_refresh_clock_and_keeps_sharding():
  tx = galore(scale_by_adam_hf(), rank=4, update_proj_gap=10)
  _, states, step = _run(tx, 1)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = states[-1]._replace(count=jax.device_put(states[-1].count, replicated))
  for count, refreshes in ((10, True), (3, False)):
    at = galore_jax.with_galore_count(state, count)
    assert at.count.sharding == replicated
    _, after = step(PARAMS, at, jax.random.key(5))
    moved = not np.array_equal(after.projectors["tall"], state.projectors["tall"])
    assert moved == refreshes, count
    assert int(after.count) == count + 1
  traced = jax.jit(lambda s: galore_jax.with_galore_count(s, 4))(state)
  assert int(traced.count) == 4


@pytest.mark.parametrize("svd", ["exact", "subspace"])
def test_refresh_decided_by_the_caller_gives_the_scheduled_updates(svd):
  """galore(refresh="due" / "not_due"), picked per update on the host with refresh_due, as
  the trainer's two programs do, gives the scheduled transform's updates and states; the
  "not_due" update holds no refresh code (no branch, no decomposition)."""
  make = lambda refresh: galore(
    scale_by_adam_hf(), rank=4, update_proj_gap=3, svd=svd, refresh=refresh
  )
  scheduled, due, not_due = make("scheduled"), make("due"), make("not_due")
  step = lambda tx: jax.jit(lambda g, s, p: tx.update(g, s, p))
  plain, refreshing, neither = step(scheduled), step(due), step(not_due)
  s_ref = s_split = scheduled.init(PARAMS)
  chex.assert_trees_all_equal_shapes_and_dtypes(s_ref, due.init(PARAMS), not_due.init(PARAMS))
  for t in range(8):  # refreshes at 0, 3, 6
    g = _grads(jax.random.key(t))
    u_ref, s_ref = plain(g, s_ref, PARAMS)
    count = int(galore_jax.galore_count(s_split))
    assert count == t
    u, s_split = (refreshing if galore_jax.refresh_due(count, 3) else neither)(g, s_split, PARAMS)
    chex.assert_trees_all_close(u, u_ref, atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_close(s_split, s_ref, atol=1e-6, rtol=1e-5)
  lowered = lambda f: f.lower(_grads(jax.random.key(0)), s_ref, PARAMS).as_text()
  assert "stablehlo.case" not in lowered(neither) and "custom_call" not in lowered(neither)
  assert "stablehlo.case" in lowered(plain)
  # "due" refreshes without the per-group branch: only the method's own branches remain.
  assert lowered(refreshing).count("stablehlo.case") < lowered(plain).count("stablehlo.case")


def test_refresh_decision_arguments_are_checked():
  with pytest.raises(ValueError, match="refresh must be one of"):
    galore(scale_by_adam_hf(), rank=4, refresh="sometimes")
  with pytest.raises(ValueError, match="needs refresh_schedule='synchronous'"):
    galore(scale_by_adam_hf(), rank=4, refresh="due", refresh_schedule="staggered")
  with pytest.raises(ValueError, match="no GaLoreState"):
    galore_jax.galore_count(scale_by_adam_hf().init(PARAMS))
  assert [galore_jax.refresh_due(c, 5, 2) for c in range(9)] == [
    True, False, True, False, False, False, False, True, False
  ]  # fmt: skip
