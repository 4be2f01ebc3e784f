"""The train step with per-layer updates, and the partial-tree helpers it alone uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from galore_jax import model as model_lib
from galore_jax import optimizer as galore
from galore_jax import steps


def _replace_at(tree: dict, path: tuple, value) -> dict:
  """Copy of nested dict ``tree`` with ``tree[path[0]][path[1]]... = value`` (no array copies)."""
  if not path:
    return value
  return {**tree, path[0]: _replace_at(tree[path[0]], path[1:], value)}


def _get_at(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def make_layerwise_step(graphdef, tx: optax.GradientTransformation, *, remat: str = "none"):
  """Train step with per-layer updates: each weight is updated as soon as its gradient exists.

  Same signature and result as :func:`galore_jax.steps.make_train_step` (``batch`` with one
  micro-batch), computed differently. The forward pass keeps one ``jax.vjp``
  per stage: the embedding, the attention half and the MLP half of each
  decoder block, and final norm + LM head + loss. The backward pass walks them
  in reverse; right after a stage's pullback it updates the stage's weights
  one at a time, each by the optimizer on that weight alone (``MaskedNode``
  everywhere else, :func:`galore_jax.optimizer.restrict_state`).
  ``optimization_barrier``s chain each update to the next one and to the
  cotangent flowing into the previous stage, so XLA can neither postpone an
  update nor run several at once: at most one half-block's gradient and one
  weight's update temporaries are alive, never the model's gradient. The
  optimizer and its state are unchanged (same numbers as the whole-tree
  update, refresh phases and random keys included).

  Non-finite values: if the loss is not finite nothing changes (``skipped``
  is 1), as in :func:`galore_jax.steps.make_train_step`. If the loss is finite but a weight's
  gradient is not, that weight keeps its value and optimizer state and the
  others are updated; ``nonfinite_grads`` counts such weights. Whole-tree
  reductions (global-norm clipping) and micro-batch accumulation need every
  gradient before the first update, so the trainer uses
  :func:`galore_jax.steps.make_train_step` for them.
  """

  def step(params, opt_state, batch):
    if batch["inputs"].shape[0] != 1:
      raise ValueError("per-layer updates need grad_accum == 1")
    micro = jax.tree.map(lambda x: x[0], batch)
    model = nnx.merge(graphdef, params)
    model_gd = nnx.graphdef(model)
    block_gds = [nnx.graphdef(block) for block in model.layers]

    def half_block(i, method):
      def run(half_params, x_BxLxD):
        block = nnx.merge(block_gds[i], {**params["layers"][i], **half_params})
        return getattr(block, method)(x_BxLxD)

      return run

    def after(d_BxLxD, tree):
      """``tree`` made data-dependent on the cotangent ``d`` (``+ 0 * d[0]``; XLA does not
      fold that for floats), so what is computed from it waits for the backward pass."""
      zero = jnp.ravel(d_BxLxD)[0] * 0
      return jax.tree.map(lambda x: x + zero.astype(x.dtype), tree)

    def forward_block(i, x_BxLxD):
      """Block ``i``'s output and the pullbacks of its MLP and attention halves.

      With ``remat="full"`` only the block's input is kept: the MLP pullback
      recomputes the block from it and leaves the attention half's pullback for
      the next stage. The input and the block's vector weights (norm scales)
      are made to depend on the incoming cotangent (:func:`after`): XLA would
      otherwise run every block's recomputation, or broadcasts of its norm
      scales, at the start of the backward pass and hold them all at once (the
      CPU backend does, optimization barriers notwithstanding).
      """
      attn = {k: params["layers"][i][k] for k in model_lib.DecoderBlock.ATTENTION}
      mlp = {k: params["layers"][i][k] for k in model_lib.DecoderBlock.MLP}
      run_attn = half_block(i, "attention_residual")
      run_mlp = half_block(i, "mlp_residual")
      if remat != "full":
        h_BxLxD, attn_pullback = jax.vjp(model_lib.checkpointed(run_attn, remat), attn, x_BxLxD)
        y_BxLxD, mlp_pullback = jax.vjp(model_lib.checkpointed(run_mlp, remat), mlp, h_BxLxD)
        return y_BxLxD, mlp_pullback, attn_pullback
      saved = {}
      vectors_later = lambda d, tree: {
        k: jax.tree.map(lambda w, d=d: after(d, w) if w.ndim < 2 else w, v) for k, v in tree.items()
      }

      def mlp_pullback(d_BxLxD):
        x_later = after(d_BxLxD, x_BxLxD)
        h_BxLxD, saved["attn"] = jax.vjp(run_attn, vectors_later(d_BxLxD, attn), x_later)
        return jax.vjp(run_mlp, vectors_later(d_BxLxD, mlp), h_BxLxD)[1](d_BxLxD)

      return run_mlp(mlp, run_attn(attn, x_BxLxD)), mlp_pullback, lambda d: saved["attn"](d)

    def head_loss(head_params, x_BxLxD):
      logits_BxLxV = nnx.merge(model_gd, {**params, **head_params}).head(x_BxLxD)
      return steps.summed_cross_entropy(logits_BxLxV, micro)

    # Forward, keeping each stage's pullback: (path prefix of its weights, pullback).
    embed = lambda p: model_lib.embed_lookup(p["embedding"], micro["inputs"], model.config.dtype)
    x_BxLxD, embed_pullback = jax.vjp(embed, params["embed"])
    stages = [(("embed",), lambda d: (embed_pullback(d)[0], None))]
    for i in range(len(block_gds)):
      x_BxLxD, mlp_pullback, attn_pullback = forward_block(i, x_BxLxD)
      stages += [(("layers", i), attn_pullback), (("layers", i), mlp_pullback)]
    head = {k: params[k] for k in ("final_norm", "lm_head")}
    loss_sum, pullback = jax.vjp(head_loss, head, x_BxLxD)
    stages.append(((), pullback))
    count = jnp.sum(micro["mask"].astype(jnp.float32))
    denom = jnp.maximum(count, 1.0)
    loss = loss_sum / denom
    loss_ok = jnp.isfinite(loss)

    placeholders = jax.tree.map(lambda _: optax.MaskedNode(), params)
    no_leaves = jax.tree.map(lambda _: False, params)
    new_params, new_state = params, opt_state
    sq_norm = jnp.zeros([], jnp.float32)
    nonfinite = jnp.zeros([], jnp.int32)

    def update_weight(path, g):
      """Optimizer step for the one weight at ``path``: its new value and state part."""
      nonlocal sq_norm, nonfinite
      p = _get_at(params, path)
      g = g.astype(p.dtype)
      g_sq = jnp.sum(jnp.square(g.astype(jnp.float32)))
      ok = loss_ok & jnp.isfinite(g_sq)
      sq_norm += g_sq
      nonfinite += (loss_ok & ~ok).astype(jnp.int32)
      keep = _replace_at(no_leaves, path, True)

      def apply(operands):
        g, old_part, p = operands
        updates, part = tx.update(
          _replace_at(placeholders, path, g), old_part, _replace_at(placeholders, path, p)
        )
        return optax.apply_updates(p, _get_at(updates, path)), part

      # A cond, not a where: the skipped branch needs no second copy of the weight's
      # state, so the 8-bit update can overwrite the stored codes in place.
      old_part = galore.restrict_state(tx, opt_state, keep)
      new_p, part = jax.lax.cond(ok, apply, lambda ops: (ops[2], ops[1]), (g, old_part, p))
      return new_p, part, keep

    # Backward: after each stage's pullback, update its weights one after another.
    d_BxLxD = (1.0 / denom).astype(loss_sum.dtype)
    for prefix, stage_pullback in reversed(stages):
      grads, d_BxLxD = stage_pullback(d_BxLxD)
      leaves = [
        (prefix + tuple(k.key for k in keypath), g)
        for keypath, g in jax.tree_util.tree_flatten_with_path(grads)[0]
      ]
      for k, (path, g) in enumerate(leaves):
        new_p, part, keep = update_weight(path, g)
        rest = [g for _, g in leaves[k + 1 :]]
        d_BxLxD, rest, new_p, part = jax.lax.optimization_barrier((d_BxLxD, rest, new_p, part))
        leaves[k + 1 :] = [(q, g) for (q, _), g in zip(leaves[k + 1 :], rest, strict=True)]
        new_params = _replace_at(new_params, path, new_p)
        new_state = galore.merge_state(tx, new_state, part, keep)

    # Step counters advance once, unless the whole step was skipped: an update of no
    # leaves at all advances only them.
    old_counts = galore.restrict_state(tx, opt_state, no_leaves)
    _, counts = tx.update(placeholders, old_counts, placeholders)
    counts = jax.tree.map(lambda new, old: jnp.where(loss_ok, new, old), counts, old_counts)
    new_state = galore.merge_state(tx, new_state, counts, no_leaves)
    return (
      new_params,
      new_state,
      {
        "loss": loss,
        "grad_norm": jnp.sqrt(sq_norm),
        "skipped": (~loss_ok).astype(jnp.int32),
        "nonfinite_grads": nonfinite,
        "tokens": count,
      },
    )

  return step
