"""Adafactor as galore-torch's ``GaLoreAdafactor`` computes it, and GaLore around it.

Adafactor (Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
Cost", ICML 2018) keeps, for a matrix, one running mean of the squared gradient per row
and one per column instead of Adam's full second moment. galore-torch 1.0 ships it as its
third optimizer, ``GaLoreAdafactor``: fairseq's / Hugging Face's Adafactor with the GaLore
projection around its step. This module reproduces that optimizer's numbers
(``tests/test_reference_parity.py``).

Why not ``galore(optax.adafactor(...))``. optax's Adafactor is the same family but not
these numbers: it factors only matrices with both sides >= 128 and over the two largest
axes, has no relative step size ``min(1e-2, 1/sqrt(t))``, decays ``wd * W`` without the
learning rate, and scales by the RMS of the parameters it is handed, which inside
:func:`galore_jax.galore` are the projected ones. The reference scales by the RMS of the
whole weight, and applies the learning rate *before* the first-moment average, so the
scale cannot be moved outside the low-rank step: :func:`galore_adafactor` hands its inner
step the unprojected weights (``galore(..., inner_params="full")``).

Per leaf with gradient ``G`` (projected to ``R`` by GaLore for a selected matrix), at step
``t = 1, 2, ...``::

    rho_t = min(1e-2, 1/sqrt(t))    (relative_step; 1e-6 t instead of 1e-2 with warmup_init)
            or learning_rate(t - 1)
    lr_t  = rho_t * max(eps2, RMS(W))   (scale_parameter; else rho_t)
    b2_t  = 1 - t^decay_rate            (decay_rate = -0.8)
    matrix (last two axes):  r = b2_t r + (1 - b2_t) mean_col(R^2 + eps1)
                             c = b2_t c + (1 - b2_t) mean_row(R^2 + eps1)
                             U = R / sqrt(r c^T / mean(r))
    otherwise:               v = b2_t v + (1 - b2_t) (R^2 + eps1);  U = R / sqrt(v)
    U = lr_t U / max(1, RMS(U) / clip_threshold)
    U = m = beta1 m + (1 - beta1) U     (only with beta1)
    W <- W - wd lr_t W - scale * project_back(U)      (scale and projection: GaLore leaves)

RMS is over the whole leaf. The running means are float32 whatever the parameter dtype, as
the reference keeps them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_jax import optimizer as galore_lib


class ScaleByAdafactorHFState(NamedTuple):
  count: jax.Array  # steps done: the reference's ``state["step"]``
  v_row: optax.Updates  # matrices: mean over the last axis of R^2 + eps1; else shape (1,)
  v_col: optax.Updates  # matrices: mean over the second-to-last axis; else shape (1,)
  v: optax.Updates  # other leaves: the full running mean; matrices: shape (1,)
  mu: optax.Updates | None  # the first moment with beta1, else None


def _rms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def _check(learning_rate, relative_step: bool, warmup_init: bool) -> None:
  if learning_rate is not None and relative_step:
    raise ValueError("learning_rate and relative_step=True exclude each other (as the reference)")
  if learning_rate is None and not relative_step:
    raise ValueError("give a learning_rate, or keep relative_step=True")
  if warmup_init and not relative_step:
    raise ValueError("warmup_init=True needs relative_step=True")


def _step_size(count, learning_rate, relative_step: bool, warmup_init: bool) -> jax.Array:
  """``rho_t`` for the step that makes the count ``count`` (1 at the first step)."""
  t = count.astype(jnp.float32)
  if relative_step:
    cap = 1e-6 * t if warmup_init else 1e-2
    return jnp.minimum(cap, jax.lax.rsqrt(t))
  lr = learning_rate(count - 1) if callable(learning_rate) else learning_rate
  return jnp.asarray(lr, jnp.float32)


def _param_scale(param, scale_parameter: bool, eps2: float) -> jax.Array:
  if not scale_parameter:
    return jnp.ones([], jnp.float32)
  return jnp.maximum(eps2, _rms(param))


def scale_by_adafactor_hf(
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  eps: tuple[float, float] = (1e-30, 1e-3),
  clip_threshold: float = 1.0,
  decay_rate: float = -0.8,
  beta1: float | None = None,
  scale_parameter: bool = True,
  relative_step: bool = True,
  warmup_init: bool = False,
) -> optax.GradientTransformation:
  r"""Hugging Face's / fairseq's Adafactor step, learning rate included, without the sign
  and without weight decay: the ``U`` of this module's docstring, to be *subtracted*.

  Unlike optax's ``scale_by_*`` transforms it applies the step size: the reference averages
  the first moment of rate-scaled updates, so the rate cannot come after it in a chain.
  Every leaf with ``ndim >= 2`` is factored over its last two axes; with ``scale_parameter``
  ``params`` must be passed (for ``max(eps[1], RMS(W))``). Inside
  :func:`galore_jax.galore`, use ``inner_params="full"`` so that ``W`` is the whole weight,
  as in the reference. Defaults are the reference's (``transformers.Adafactor``,
  ``galore_torch.GaLoreAdafactor``).
  """
  _check(learning_rate, relative_step, warmup_init)
  eps1, eps2 = eps
  one = lambda: jnp.zeros((1,), jnp.float32)

  def init_fn(params):
    def row(p):
      return jnp.zeros(p.shape[:-1], jnp.float32) if p.ndim >= 2 else one()

    def col(p):
      return jnp.zeros(p.shape[:-2] + p.shape[-1:], jnp.float32) if p.ndim >= 2 else one()

    def full(p):
      return one() if p.ndim >= 2 else jnp.zeros(p.shape, jnp.float32)

    return ScaleByAdafactorHFState(
      count=jnp.zeros([], jnp.int32),
      v_row=jax.tree.map(row, params),
      v_col=jax.tree.map(col, params),
      v=jax.tree.map(full, params),
      mu=None if beta1 is None else jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
    )

  def update_fn(updates, state, params=None):
    if params is None and scale_parameter:
      raise ValueError("Adafactor's parameter scale needs params; pass them to update()")
    count = optax.safe_int32_increment(state.count)
    rho = _step_size(count, learning_rate, relative_step, warmup_init)
    beta2t = 1.0 - count.astype(jnp.float32) ** decay_rate

    def leaf(g, p, r, c, v, m):
      g32 = g.astype(jnp.float32)
      sq = jnp.square(g32) + eps1
      if g.ndim >= 2:
        r = beta2t * r + (1 - beta2t) * jnp.mean(sq, axis=-1)
        c = beta2t * c + (1 - beta2t) * jnp.mean(sq, axis=-2)
        r_factor = jax.lax.rsqrt(r / jnp.mean(r, axis=-1, keepdims=True))
        u = r_factor[..., :, None] * jax.lax.rsqrt(c)[..., None, :] * g32
      else:
        v = beta2t * v + (1 - beta2t) * sq
        u = jax.lax.rsqrt(v) * g32
      u = u / jnp.maximum(_rms(u) / clip_threshold, 1.0)
      u = u * (rho * _param_scale(p, scale_parameter, eps2))
      if beta1 is not None:
        m = beta1 * m + (1 - beta1) * u
        u = m
      return u.astype(g.dtype), r, c, v, m

    is_masked = lambda x: isinstance(x, optax.MaskedNode)
    leaves, treedef = jax.tree.flatten(updates, is_leaf=is_masked)
    fields = [
      [None] * len(leaves) if tree is None else treedef.flatten_up_to(tree)
      for tree in (params, state.v_row, state.v_col, state.v, state.mu)
    ]
    out = [
      (g,) * 5 if is_masked(g) else leaf(g, *parts)
      for g, *parts in zip(leaves, *fields, strict=True)
    ]
    pick = lambda k: treedef.unflatten([o[k] for o in out])
    new_mu = pick(4) if beta1 is not None else state.mu
    return pick(0), ScaleByAdafactorHFState(count, pick(1), pick(2), pick(3), new_mu)

  return optax.GradientTransformation(init_fn, update_fn)


def descend_and_decay_adafactor(
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  weight_decay: float = 0.0,
  eps2: float = 1e-3,
  scale_parameter: bool = True,
  relative_step: bool = True,
  warmup_init: bool = False,
) -> optax.GradientTransformation:
  """The last member of :func:`galore_adafactor`'s chain: ``-U - wd lr_t W``.

  The reference decays the weight *before* the update, by the step's own ``lr_t`` (relative
  step size times ``max(eps2, RMS(W))``), which it recomputes here from its own count and
  ``params``; build it with its step through :func:`step_and_descent`.
  """
  _check(learning_rate, relative_step, warmup_init)

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    count = optax.safe_int32_increment(state.count)
    if galore_lib._is_static_zero(weight_decay):  # an injected (array) decay is applied
      return jax.tree.map(lambda u: -u, updates), optax.ScaleByScheduleState(count)
    if params is None:
      raise ValueError("weight decay needs params; pass them to update()")
    rho = _step_size(count, learning_rate, relative_step, warmup_init)

    def leaf(u, p):
      lr = rho * _param_scale(p, scale_parameter, eps2)
      return (-u - weight_decay * lr * p.astype(jnp.float32)).astype(u.dtype)

    return jax.tree.map(leaf, updates, params), optax.ScaleByScheduleState(count)

  return optax.GradientTransformation(init_fn, update_fn)


def step_and_descent(
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  eps: tuple[float, float] = (1e-30, 1e-3),
  clip_threshold: float = 1.0,
  decay_rate: float = -0.8,
  beta1: float | None = None,
  weight_decay: float = 0.0,
  scale_parameter: bool = True,
  relative_step: bool = True,
  warmup_init: bool = False,
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """:func:`scale_by_adafactor_hf` and the :func:`descend_and_decay_adafactor` that matches
  it: the two halves of one Adafactor, built from one set of arguments (the descent
  recomputes the step's rate, so they must agree). GaLore goes around the first."""
  step = scale_by_adafactor_hf(
    learning_rate,
    eps=eps,
    clip_threshold=clip_threshold,
    decay_rate=decay_rate,
    beta1=beta1,
    scale_parameter=scale_parameter,
    relative_step=relative_step,
    warmup_init=warmup_init,
  )
  descent = descend_and_decay_adafactor(
    learning_rate,
    weight_decay=weight_decay,
    eps2=eps[1],
    scale_parameter=scale_parameter,
    relative_step=relative_step,
    warmup_init=warmup_init,
  )
  return step, descent


def adafactor_hf(
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  eps: tuple[float, float] = (1e-30, 1e-3),
  clip_threshold: float = 1.0,
  decay_rate: float = -0.8,
  beta1: float | None = None,
  weight_decay: float = 0.0,
  scale_parameter: bool = True,
  relative_step: bool = True,
  warmup_init: bool = False,
) -> optax.GradientTransformation:
  """``transformers.Adafactor`` (galore-torch's ``Adafactor`` without a GaLore group) as one
  optax transformation; the defaults are its own (relative step size, no first moment)."""
  return optax.chain(
    *step_and_descent(
      learning_rate,
      eps=eps,
      clip_threshold=clip_threshold,
      decay_rate=decay_rate,
      beta1=beta1,
      weight_decay=weight_decay,
      scale_parameter=scale_parameter,
      relative_step=relative_step,
      warmup_init=warmup_init,
    )
  )


def galore_adafactor(
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  proj_type: str = "std",
  eps: tuple[float, float] = (1e-30, 1e-3),
  clip_threshold: float = 1.0,
  decay_rate: float = -0.8,
  beta1: float | None = None,
  weight_decay: float = 0.0,
  scale_parameter: bool = True,
  relative_step: bool = True,
  warmup_init: bool = False,
  mask: Any = None,
  matrix_axes: galore_lib.MatrixAxesFn | None = None,
  svd: str = "exact",
  oversample: int = 8,
  power_iters: int = 2,
  subspace_iters: int = 2,
  subspace_first_iters: int = 4,
  refresh_schedule: str = "synchronous",
  moment_policy: str = "keep",
  projector_dtype: Any = None,
  seed: int = 0,
  refresh_batch_elements: int | None = None,
  refresh: str = "scheduled",
) -> optax.GradientTransformation:
  """The reference ``GaLoreAdafactor`` (galore-torch 1.0) as one optax transformation.

  Leaves ``mask`` selects (default every leaf with ``ndim >= 2``) get Adafactor on their
  rank-``rank`` projection, the step scaled by ``scale`` on its way back; the others get
  plain Adafactor, as the reference's group without ``rank`` does. The math is in this
  module's docstring; ``learning_rate=None`` with ``relative_step=True`` (the reference's
  default) takes the step size ``min(1e-2, 1/sqrt(t)) * max(eps[1], RMS(W))``. The arguments
  after ``warmup_init`` are :func:`galore_jax.galore`'s.

  The factored second moment keeps the state small: a projected ``m x n`` weight holds
  ``r + max(m, n)`` float32 running means (``proj_type="std"``), where GaLore-Adam holds
  ``2 r max(m, n)`` moments; ``beta1`` adds one low-rank ``r x max(m, n)`` first moment.
  (Without ``beta1``, plain Adafactor's state is smaller still: GaLore adds its projectors.)
  Under ``optax.inject_hyperparams`` pass ``static_args=galore_jax.STATIC_ARGS``.
  """
  step, descent = step_and_descent(
    learning_rate,
    eps=eps,
    clip_threshold=clip_threshold,
    decay_rate=decay_rate,
    beta1=beta1,
    weight_decay=weight_decay,
    scale_parameter=scale_parameter,
    relative_step=relative_step,
    warmup_init=warmup_init,
  )
  return optax.chain(
    galore_lib.galore(
      step,
      rank=rank,
      update_proj_gap=update_proj_gap,
      scale=scale,
      proj_type=proj_type,
      mask=mask,
      matrix_axes=matrix_axes,
      svd=svd,
      oversample=oversample,
      power_iters=power_iters,
      subspace_iters=subspace_iters,
      subspace_first_iters=subspace_first_iters,
      refresh_schedule=refresh_schedule,
      moment_policy=moment_policy,
      projector_dtype=projector_dtype,
      seed=seed,
      refresh_batch_elements=refresh_batch_elements,
      refresh=refresh,
      inner_params="full",  # the step size reads RMS of the whole weight, as the reference
    ),
    descent,
  )
