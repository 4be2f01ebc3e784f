"""The optax contract: every public transform through optax's combinators.

In the spirit of optax's ``contrib/_common_test.py``: each public transform (GaLore around
three inner optimizers, ``galore_adamw``, ``galore_adafactor``, ``adafactor_hf``, the 8-bit
Adams, ``scale_by_adam_hf`` and both weight decays) is run through jit,
``jax.eval_shape(init)``, ``optax.masked``,
``optax.multi_transform`` with two groups of different hyperparameters (different ranks for
GaLore), ``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.inject_hyperparams`` with a
value changed mid-run, float32 and bfloat16 parameters, and ``nnx.Optimizer``. Every check is
numeric: the combinator's result is compared with the transform applied by hand.

Shapes are tiny (8 x 12) and runs are 2-3 steps, so the file runs in seconds.
"""

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import galore_jax
from galore_jax import adam8bit

_RNG = np.random.default_rng(0)
F32_PARAMS = {
  "w": jnp.asarray(_RNG.standard_normal((8, 12)), jnp.float32),
  "v": jnp.asarray(_RNG.standard_normal((12, 8)), jnp.float32),
  "b": jnp.asarray(_RNG.standard_normal((12,)), jnp.float32),
}
# Gradients of steps 0-3, drawn once with numpy: drawing them with jax.random inside each
# test's program would put the threefry rounds in every compilation.
_ALL_GRADS = {
  k: jnp.asarray(_RNG.standard_normal((4,) + p.shape), jnp.float32) for k, p in F32_PARAMS.items()
}


def _grads(step, params=F32_PARAMS):
  """Gradient number ``step`` (may be traced) for the leaves of ``params``; a leaf's value
  does not depend on which other leaves are present, so sub-trees see the same gradients."""
  return {k: _ALL_GRADS[k][step].astype(p.dtype) for k, p in params.items()}


def _sub(tree, keys):
  return {k: tree[k] for k in keys}


@dataclasses.dataclass(frozen=True)
class Case:
  """One public transform: its factory, arguments, and what the combinators vary."""

  name: str
  make: Callable[..., optax.GradientTransformation]
  kwargs: dict
  groups: tuple[dict, dict]  # two parameter groups for multi_transform
  inject: dict  # hyperparameters changed mid-run under inject_hyperparams
  static: tuple[str, ...] = ()

  def build(self, **overrides) -> optax.GradientTransformation:
    return self.make(**{**self.kwargs, **overrides})


def _galore(inner_name, inner):
  return Case(
    f"galore[{inner_name}]",
    galore_jax.galore,
    {"inner": inner, "rank": 2, "update_proj_gap": 2},
    ({"rank": 2}, {"rank": 3}),
    {"scale": 0.5},
    galore_jax.STATIC_ARGS,
  )


_TINY_8BIT = {"min_8bit_size": 0, "block_size": 16}  # so the tiny leaves really are 8-bit

CASES = [
  _galore("adam_hf", galore_jax.scale_by_adam_hf()),
  _galore("factored_rms", optax.scale_by_factored_rms(min_dim_size_to_factor=2)),
  _galore("adam8bit", galore_jax.scale_by_adam8bit(**_TINY_8BIT)),
  Case(
    "galore_adamw",
    galore_jax.galore_adamw,
    {"learning_rate": 0.01, "rank": 2, "update_proj_gap": 2, "weight_decay": 0.1},
    ({"rank": 2}, {"rank": 3}),
    {"learning_rate": 0.03},
    galore_jax.STATIC_ARGS,
  ),
  Case(
    "galore_adafactor",
    galore_jax.galore_adafactor,
    {"rank": 2, "update_proj_gap": 2, "beta1": 0.9, "weight_decay": 0.1},
    ({"rank": 2}, {"rank": 3}),
    {"weight_decay": 0.3},
    galore_jax.STATIC_ARGS,
  ),
  Case(
    "adafactor_hf",
    galore_jax.adafactor_hf,
    {"beta1": 0.9, "weight_decay": 0.1},
    ({"beta1": 0.9}, {"beta1": 0.8}),
    {"clip_threshold": 0.5},
  ),
  Case(
    "adamw8bit",
    galore_jax.adamw8bit,
    {"learning_rate": 0.01, "weight_decay": 0.1, **_TINY_8BIT},
    ({"learning_rate": 0.01}, {"learning_rate": 0.02}),
    {"learning_rate": 0.03},
    galore_jax.ADAM8BIT_STATIC_ARGS,
  ),
  Case(
    "scale_by_adam8bit",
    galore_jax.scale_by_adam8bit,
    dict(_TINY_8BIT),
    ({"b1": 0.9}, {"b1": 0.8}),
    {"b1": 0.5},
    galore_jax.ADAM8BIT_STATIC_ARGS,
  ),
  Case(
    "scale_by_adam_hf", galore_jax.scale_by_adam_hf, {}, ({"b1": 0.9}, {"b1": 0.8}), {"b1": 0.5}
  ),
  Case(
    "decay_updated_weights",
    galore_jax.decay_updated_weights,
    {"learning_rate": 0.01, "weight_decay": 0.1},
    ({"weight_decay": 0.1}, {"weight_decay": 0.2}),
    {"learning_rate": 0.03},
  ),
  Case(
    "scale_and_decay_updated_weights",
    galore_jax.scale_and_decay_updated_weights,
    {"learning_rate": 0.01, "weight_decay": 0.1},
    ({"weight_decay": 0.1}, {"weight_decay": 0.2}),
    {"learning_rate": 0.03},
  ),
]
by_name = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)


def _close(a, b, atol=1e-6):
  chex.assert_trees_all_close(a, b, atol=atol, rtol=1e-5)


def _jit(fn):
  """``jax.jit`` with XLA's cheapest CPU compilation.

  Each test puts all of its runs in one program, so it pays one compilation; on these shapes
  compiling is nearly all of a test's time (running is microseconds), and LLVM's optimisation
  passes are most of compiling. The numbers do not depend on them.
  """
  return jax.jit(fn, compiler_options=_FAST_COMPILE)


_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _steps(tx, n, params=F32_PARAMS, state=None, first=0):
  """``n`` updates of ``tx`` from ``state`` (params held fixed, so runs are easy to compare).

  Traceable; several steps are a ``lax.scan``, so the program holds one copy of the update.
  Returns the list of updates and the final state.
  """
  state = tx.init(params) if state is None else state
  if n == 1:
    u, state = tx.update(_grads(first, params), state, params)
    return [u], state

  def body(state, t):
    u, state = tx.update(_grads(t, params), state, params)
    return state, u

  state, stacked = jax.lax.scan(body, state, first + jnp.arange(n))
  return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)], state


@by_name
def test_jit_eval_shape_and_dtypes(case):
  tx = case.build()
  trees = {
    name: jax.tree.map(lambda p, d=dtype: p.astype(d), F32_PARAMS)
    for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16))
  }
  runs = _jit(lambda: {d: _steps(tx, 2, params) for d, params in trees.items()})()
  for name, params in trees.items():
    updates, state = runs[name]
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(tx.init, params), state)
    for u in updates:
      chex.assert_trees_all_equal_dtypes(u, params)
      chex.assert_tree_all_finite(u)


@by_name
def test_masked_and_multi_transform_two_groups(case):
  """``optax.masked``, and ``optax.multi_transform`` with the transform in two groups
  (GaLore: ranks 2 and 3) next to a third optimizer, equal the transform on each sub-tree."""
  mask = {"w": True, "v": False, "b": True}

  def run():
    (masked,), _ = _steps(optax.masked(case.build(), mask), 1)
    (masked_alone,), _ = _steps(case.build(), 1, _sub(F32_PARAMS, ["w", "b"]))
    multi = optax.multi_transform(
      {"a": case.build(**case.groups[0]), "b": case.build(**case.groups[1]), "c": optax.sgd(0.1)},
      {"w": "a", "v": "b", "b": "c"},
    )
    together, _ = _steps(multi, 2)
    alone = [
      _steps(case.build(**case.groups[i]), 2, _sub(F32_PARAMS, [k]))[0]
      for i, k in [(0, "w"), (1, "v")]
    ]
    return masked, masked_alone, together, alone

  masked, masked_alone, together, (alone_w, alone_v) = _jit(run)()
  _close(_sub(masked, ["w", "b"]), masked_alone)
  _close(masked["v"], _grads(0)["v"])  # masked-out leaves pass through
  _close([u["w"] for u in together], [a["w"] for a in alone_w])
  _close([u["v"] for u in together], [a["v"] for a in alone_v])
  _close(together[-1]["b"], -0.1 * _grads(1)["b"])


# The inner optimizer of GaLore does not change how the outer wrappers below treat it (the
# inner variants are covered above, where their state layout matters): these run on
# galore[adam_hf] and galore_adamw for GaLore, to keep the file fast. The Adafactors' state is
# per-parameter trees and a count, as Adam's (their per-layer update: test_adafactor.py).
OUTER_CASES = [
  c
  for c in CASES
  if c.name not in ("galore[factored_rms]", "galore[adam8bit]", "galore_adafactor", "adafactor_hf")
]
by_outer_name = pytest.mark.parametrize("case", OUTER_CASES, ids=lambda c: c.name)


@by_outer_name
def test_multi_steps_and_apply_if_finite(case):
  """MultiSteps(k=2) equals one step on the mean gradient; apply_if_finite skips a NaN step
  (zero update, inner state untouched) and the next step continues from the kept state."""

  def run():
    tx = optax.MultiSteps(case.build(), every_k_schedule=2)
    (first, second), _ = _steps(tx, 2)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, _grads(0), _grads(1))
    inner = case.build()
    want_multi, _ = inner.update(mean, inner.init(F32_PARAMS), F32_PARAMS)

    tx = optax.apply_if_finite(case.build(), max_consecutive_errors=3)
    _, state = _steps(tx, 1)
    kept = state.inner_state
    bad = dict(_grads(1), w=_grads(1)["w"].at[0, 0].set(jnp.nan))
    skipped, state = tx.update(bad, state, F32_PARAMS)
    skipped_state = state
    (after,), _ = _steps(tx, 1, state=state, first=2)
    (want_after,), _ = _steps(case.build(), 1, state=kept, first=2)
    return (first, second, want_multi), (skipped, skipped_state, kept, after, want_after)

  (first, second, want_multi), finite = _jit(run)()
  chex.assert_trees_all_equal(first, jax.tree.map(jnp.zeros_like, first))
  _close(second, want_multi, atol=1e-5)  # the mean is accumulated differently
  skipped, state, kept, after, want_after = finite
  chex.assert_trees_all_equal(skipped, jax.tree.map(jnp.zeros_like, skipped))
  chex.assert_trees_all_equal(state.inner_state, kept)
  assert int(state.notfinite_count) == 1
  _close(after, want_after)


@by_name
def test_inject_hyperparams_change_reaches_the_update(case):
  def run():
    tx = optax.inject_hyperparams(case.make, static_args=case.static)(**case.kwargs)
    _, state = _steps(tx, 1)
    for k, v in case.inject.items():
      state.hyperparams[k] = jnp.asarray(v, state.hyperparams[k].dtype)
    (changed,), _ = _steps(tx, 1, state=state, first=1)
    (want,), _ = _steps(case.build(**case.inject), 1, state=state.inner_state, first=1)
    (unchanged,), _ = _steps(case.build(), 1, state=state.inner_state, first=1)
    return changed, want, unchanged

  changed, want, unchanged = _jit(run)()
  _close(changed, want)
  assert not np.allclose(changed["w"], unchanged["w"], atol=1e-6)


def test_injected_learning_rate_reaches_the_weight_decay():
  """galore_adamw's step and decay both use the injected lr: u = -lr n - lr wd (p - lr n)."""
  lr, wd = 0.05, 0.3
  kwargs = {"rank": 2, "update_proj_gap": 2}

  def run():
    tx = optax.inject_hyperparams(galore_jax.galore_adamw, static_args=galore_jax.STATIC_ARGS)(
      learning_rate=0.01, weight_decay=wd, **kwargs
    )
    _, state = _steps(tx, 1)
    state.hyperparams["learning_rate"] = jnp.asarray(lr)
    (got,), _ = _steps(tx, 1, state=state, first=1)
    # The direction n: the same transform with lr 1 and no decay, from the same state.
    plain = galore_jax.galore_adamw(1.0, weight_decay=0.0, **kwargs)
    (neg_n,), _ = _steps(plain, 1, state=state.inner_state, first=1)
    return got, neg_n

  got, neg_n = _jit(run)()
  want = jax.tree.map(lambda m, p: lr * m - lr * wd * (p + lr * m), neg_n, F32_PARAMS)
  _close(got, want)


def test_plain_inject_hyperparams_of_galore_adamw():
  """Without static_args the integers arrive as arrays: the rank is read when the state is
  created and from the projectors afterwards; an lr change still reaches the update."""
  kwargs = {"rank": 2, "update_proj_gap": 2, "weight_decay": 0.1}
  tx = optax.inject_hyperparams(galore_jax.galore_adamw)(learning_rate=0.01, **kwargs)
  state = tx.init(F32_PARAMS)
  assert state.inner_state[0].projectors["w"].shape == (8, 2)

  def run(state):
    _, state = _steps(tx, 1, state=state)
    state.hyperparams["learning_rate"] = jnp.asarray(0.03)
    (changed,), _ = _steps(tx, 1, state=state, first=1)
    (want,), _ = _steps(
      galore_jax.galore_adamw(0.03, **kwargs), 1, state=state.inner_state, first=1
    )
    return changed, want

  changed, want = _jit(run)(state)
  _close(changed, want)
  # Creating the state needs the rank's value: a traced one is refused, naming the fix.
  with pytest.raises(ValueError, match=r"rank .*static_args=galore_jax.STATIC_ARGS"):
    jax.eval_shape(tx.init, F32_PARAMS)


@pytest.mark.parametrize(
  "kwargs, name",
  [({"refresh_schedule": "staggered"}, "update_proj_gap"), ({"svd": "randomized"}, "oversample")],
)
def test_traced_structural_argument_is_refused_where_it_must_be_static(kwargs, name):
  def build(value):
    galore_jax.galore(optax.identity(), rank=2, **{name: value}, **kwargs)
    return value

  with pytest.raises(ValueError, match=rf"{name} is traced.*static_args=galore_jax.STATIC_ARGS"):
    jax.eval_shape(build, jnp.asarray(4))


class _TwoLayer(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(8, 12, rngs=rngs)
    self.down = nnx.Linear(12, 8, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.relu(self.up(x)))


@by_outer_name
def test_nnx_optimizer(case):
  model = _TwoLayer(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(5), (4, 8))
  tx = case.build()
  graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))

  @_jit
  def step(state):
    model, opt = nnx.merge(graphdef, state)
    params = nnx.state(model, nnx.Param)
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    updates, _ = tx.update(grads, tx.init(params), params)
    want = optax.apply_updates(params, updates)
    opt.update(model, grads)
    return want, nnx.state(model, nnx.Param)

  want, got = step(state)
  _close(got, want)


def test_scale_by_galore_is_galore():
  assert galore_jax.scale_by_galore is galore_jax.galore


def test_exports_are_the_8bit_transforms():
  assert galore_jax.scale_by_adam8bit is adam8bit.scale_by_adam8bit
  assert galore_jax.adamw8bit is adam8bit.adamw8bit
  assert set(galore_jax.__all__) <= set(dir(galore_jax))


@by_name
def test_an_eagerly_created_state_can_be_donated(case):
  """``tx.init(params)`` outside jit, then a step that donates the state (the usual loop):
  no two leaves of the state may share a buffer, or the step fails with "Attempt to donate
  the same buffer twice" (scale_by_adam_hf once gave mu and nu one tree of zeros)."""
  tx = case.build()
  state = tx.init(F32_PARAMS)
  arrays = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
  assert len({x.unsafe_buffer_pointer() for x in arrays}) == len(arrays)
  step = jax.jit(lambda s: tx.update(_grads(0), s, F32_PARAMS), donate_argnums=0)
  _, state = step(state)
  jax.block_until_ready(state)
