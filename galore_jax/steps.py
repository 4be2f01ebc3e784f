"""The loss and the whole-gradient train and eval steps (pure functions, not yet jitted).

A step is ``step(params, opt_state, batch) -> (params, opt_state, metrics)`` with ``batch``
arrays of shape (grad_accum, micro_batch, seq); :func:`select_train_step` chooses between
:func:`make_train_step` and the per-layer step (:mod:`galore_jax.layerwise`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from galore_jax import model as model_lib
from galore_jax import targets
from galore_jax.config import TrainConfig, parse_mesh


def summed_cross_entropy(logits_BxLxV, batch) -> jax.Array:
  """Cross-entropy summed over the unmasked targets of ``batch``."""
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
  return jnp.sum(ce_BxL * batch["mask"].astype(jnp.float32))


def token_loss(graphdef, params, batch) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy over unmasked targets, and the number of them. A packed batch of
  instruction examples also has ``segments`` (:meth:`galore_jax.model.Llama.__call__`)."""
  model = nnx.merge(graphdef, params)
  if "segments" in batch:
    logits_BxLxV = model(batch["inputs"], batch["segments"])
  else:
    logits_BxLxV = model(batch["inputs"])
  return summed_cross_entropy(logits_BxLxV, batch), jnp.sum(batch["mask"].astype(jnp.float32))


def mean_token_gradient(graphdef, params, batch):
  """Mean token loss, token count and gradient over the micro-batches of ``batch``.

  ``batch`` arrays are (grad_accum, micro_batch, seq). Gradients of the summed
  token loss are accumulated (float32) over micro-batches and divided by the
  total token count, so accumulation gives the gradient of one large batch.
  Gradients are returned in the params' dtypes.
  """
  grad_fn = jax.value_and_grad(lambda p, b: token_loss(graphdef, p, b), has_aux=True)
  if batch["inputs"].shape[0] == 1:
    (loss_sum, count), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
  else:

    def body(carry, micro):
      (loss_i, count_i), g = grad_fn(params, micro)
      acc_l, acc_c, acc_g = carry
      return (acc_l + loss_i, acc_c + count_i, jax.tree.map(jnp.add, acc_g, g)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss_sum, count, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), batch)
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
  return loss_sum / denom, count, grads


def make_train_step(graphdef, tx: optax.GradientTransformation, *, materialize=None):
  """``step(params, opt_state, batch) -> (params, opt_state, metrics)``; not yet jitted.

  ``batch`` arrays are (grad_accum, micro_batch, seq). Gradients of the summed
  token loss are accumulated over micro-batches and divided by the total
  token count, so accumulation gives the same update as one large batch.
  A step whose loss or gradient is not finite changes nothing (``skipped`` is
  1 in its metrics); the host loop stops the run after too many in a row.

  ``materialize(trainable, frozen) -> dense``: ``params`` is then
  ``{"trainable": ..., "frozen": ...}``; the loss sees the dense weights, gradients are
  pulled back through ``materialize`` to the trainable tree, which alone ``tx`` updates
  (the low-rank baselines of ``experiments/reproduce_table2.py``).
  """

  def gradient(params, batch):
    if materialize is None:
      return mean_token_gradient(graphdef, params, batch)
    trainable, frozen = params["trainable"], params["frozen"]
    dense, pullback = jax.vjp(lambda t: materialize(t, frozen), trainable)
    loss, count, dense_grads = mean_token_gradient(graphdef, dense, batch)
    (grads,) = pullback(dense_grads)
    return loss, count, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)

  def step(params, opt_state, batch):
    loss, count, grads = gradient(params, batch)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    trained = params if materialize is None else params["trainable"]

    def apply(args):
      trained, opt_state = args
      updates, opt_state = tx.update(grads, opt_state, trained)
      return optax.apply_updates(trained, updates), opt_state

    # cond, not where: a skipped step neither computes nor stores a second state.
    trained, opt_state = jax.lax.cond(finite, apply, lambda args: args, (trained, opt_state))
    return (
      trained if materialize is None else {**params, "trainable": trained},
      opt_state,
      {
        "loss": loss,
        "grad_norm": grad_norm,
        "skipped": (~finite).astype(jnp.int32),
        "tokens": count,
      },
    )

  return step


def per_layer_updates(cfg: TrainConfig) -> bool:
  """Whether ``cfg`` asks for per-layer updates and allows them: no clipping (or clipping in
  the step, ``--per-layer-clip``, with one micro-batch), and one micro-batch or GaLore's
  low-rank accumulation (:func:`lowrank_accumulation`); :func:`select_train_step` also needs
  an untied model."""
  return (
    cfg.per_layer_updates
    and (cfg.grad_clip == 0 or (cfg.per_layer_clip and cfg.grad_accum == 1))
    and (cfg.grad_accum == 1 or lowrank_accumulation(cfg))
  )


def lowrank_accumulation(cfg: TrainConfig) -> bool:
  """Whether micro-batches are accumulated in GaLore's low-rank space by the per-layer step
  (``--grad-accum`` > 1 with a GaLore optimizer, unless ``--no-lowrank-accum``) instead of as
  a float32 copy of the whole gradient (:func:`mean_token_gradient`)."""
  return cfg.grad_accum > 1 and cfg.is_galore and cfg.lowrank_accum


def make_eval_step(graphdef):
  """``eval(params, micro_batch) -> (summed loss, token count)``."""
  return lambda params, batch: token_loss(graphdef, params, batch)


def uses_layerwise_step(cfg: TrainConfig, model_cfg: model_lib.LlamaConfig) -> bool:
  """Whether :func:`select_train_step` picks the per-layer step for this run (the planner
  asks the same question)."""
  return per_layer_updates(cfg) and not model_cfg.tie_embeddings


def clips_in_step(cfg: TrainConfig, model_cfg: model_lib.LlamaConfig) -> bool:
  """Whether the step, not the optimizer, clips by the global norm: the per-layer step takes
  the norm in a first backward pass (``make_layerwise_step(clip_norm=)``), so
  ``config.build_optimizer(clip_in_step=True)`` puts an identity where
  ``optax.clip_by_global_norm`` would see one weight at a time."""
  return cfg.grad_clip > 0 and uses_layerwise_step(cfg, model_cfg)


def refreshes_together(cfg: TrainConfig) -> bool:
  """Whether the per-layer step updates a stage's same-shaped GaLore weights as one unit, so
  that their projectors refresh as one batch (``make_layerwise_step(refresh_together=)``).

  Only for the iterative refreshes (``--svd subspace`` / ``randomized``), whose compile time
  grows with the number of refresh programs in the step; an exact SVD runs one matrix at a
  time on a GPU anyway, so stacking would only cost memory. Only on one device: on a CPU
  mesh a batched decomposition can hang (:func:`galore_jax.config.batched_lapack_hangs`),
  and a GPU mesh was not available to test units with sharded weights.
  """
  return cfg.is_galore and cfg.svd != "exact" and math.prod(parse_mesh(cfg.mesh)) == 1


def select_train_step(
  graphdef, tx: optax.GradientTransformation, cfg: TrainConfig, model_cfg: model_lib.LlamaConfig
):
  """The step the trainer runs for ``cfg``: per-layer updates
  (:func:`galore_jax.layerwise.make_layerwise_step`) where :func:`per_layer_updates` allows
  them and the model is untied, else :func:`make_train_step`; not yet jitted. With
  ``--grad-accum`` > 1 the per-layer step accumulates in GaLore's low rank
  (:func:`lowrank_accumulation`); with ``--grad-clip`` it clips itself (:func:`clips_in_step`:
  ``tx`` must then come from ``config.build_optimizer(cfg, clip_in_step=True)``).

  A tied embedding gets gradient from two stages (lookup and head), so it cannot be updated
  right after one of them: tied models take the whole-gradient step.
  """
  if uses_layerwise_step(cfg, model_cfg):
    from galore_jax import layerwise  # imports this module for the loss

    # proj_type and matrix_axes as config.build_optimizer gives them to galore(): the
    # low-rank accumulation reads each leaf's projector with them.
    return layerwise.make_layerwise_step(
      graphdef,
      tx,
      remat=cfg.remat,
      matrix_axes=targets.reference_side_axes,
      refresh_together=refreshes_together(cfg),
      clip_norm=cfg.grad_clip,
    )
  return make_train_step(graphdef, tx)
