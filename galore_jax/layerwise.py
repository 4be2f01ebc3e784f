"""The train step with per-layer updates, the stage protocol it reads a model through, and the
partial-tree helpers it alone uses."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from galore_jax import model as model_lib
from galore_jax import optimizer as galore
from galore_jax import steps


@dataclasses.dataclass(frozen=True)
class Stage:
  """One piece of the forward pass whose weights are updated together, right after its pullback.

  Attributes:
    fn: ``fn(module, x) -> y``. ``module`` is the submodule at ``module`` (below), rebuilt
      from the parameters with this stage's weights as the differentiated inputs; ``x`` is
      the previous stage's output (the token ids ``(B, L)`` for the embedding stage), one
      array; ``y`` one array (the logits ``(B, L, V)`` for the head stage).
    keys: the children of ``module`` (attribute names; indices for a list) whose weights
      this stage owns. Every parameter must be owned by exactly one stage.
    module: path from the model to the module ``fn`` receives: attribute names and list
      indices, e.g. ``("layers", 3)``; ``()`` is the model itself.
    takes_segments: ``fn(module, x, segments)`` gets a packed batch's segment ids
      (``batch["segments"]``, (B, L); None for a batch without them) as its third argument:
      the attention stages of a model that keeps packed examples apart. A packed batch
      through stages none of which takes them is refused (its examples would attend to
      each other).
  """

  fn: Callable[..., jax.Array]
  keys: tuple
  module: tuple = ()
  takes_segments: bool = False


@dataclasses.dataclass(frozen=True)
class Stages:
  """A decoder seen as stages (:func:`make_layerwise_step`): embedding, blocks, head.

  Attributes:
    embed: token ids ``(B, L)`` -> hidden states.
    blocks: each block's stages in forward order (one stage, or e.g. its attention and MLP
      halves); a block is the unit that ``remat="full"`` recomputes.
    head: hidden states -> float logits ``(B, L, V)``; the loss is the summed token
      cross-entropy (:func:`galore_jax.steps.summed_cross_entropy`).
  """

  embed: Stage
  blocks: Sequence[Sequence[Stage]]
  head: Stage


StagesArg = Stages | Callable[[Any], Stages] | None


def model_stages(model, stages: StagesArg = None) -> Stages:
  """``stages`` resolved for ``model``: a :class:`Stages`, ``stages(model)``, or (``None``)
  ``model.layerwise_stages()``."""
  if isinstance(stages, Stages):
    return stages
  if stages is not None:
    return stages(model)
  if not hasattr(model, "layerwise_stages"):
    raise TypeError(
      f"{type(model).__name__} has no layerwise_stages(); pass "
      "make_layerwise_step(..., stages=Stages(...)) or a function of the model returning one"
    )
  return model.layerwise_stages()


def _replace_at(tree: dict, path: tuple, value) -> dict:
  """Copy of nested dict ``tree`` with ``tree[path[0]][path[1]]... = value`` (no array copies)."""
  if not path:
    return value
  return {**tree, path[0]: _replace_at(tree[path[0]], path[1:], value)}


def _get_at(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _module_at(module, path: tuple):
  for key in path:
    module = module[key] if isinstance(key, int) else getattr(module, key)
  return module


def _key(entry):
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  raise TypeError(f"unsupported pytree path entry {entry!r}")


def _leaf_paths(tree, prefix: tuple = ()) -> list[tuple]:
  return [
    prefix + tuple(_key(k) for k in keypath)
    for keypath, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def _projected_shapes(opt_state, params) -> dict[tuple, tuple]:
  """Path -> a key shared by GaLore-projected weights that can refresh as one batch:
  matrix shape up to a transpose, batch shape, rank, dtype. Read from the state's
  projectors: the matrix view is the projector's, whichever side it projects."""
  out: dict[tuple, tuple] = {}
  paths = _leaf_paths(params)
  leaves = jax.tree.leaves(params)
  bases: list[Any] = [None] * len(paths)
  for state in galore.galore_states(opt_state):
    flat = jax.tree.structure(params).flatten_up_to(state.projectors)
    for i, basis in enumerate(flat):
      if basis is not None and not isinstance(basis, optax.MaskedNode):
        bases[i] = basis
  for path, leaf, basis in zip(paths, leaves, bases, strict=True):
    if basis is None or isinstance(basis, tuple) or leaf.ndim < 2:
      continue  # not projected, or "full" (two factors): updated alone
    *batch, a, b = basis.shape
    rank = min(a, b)
    d = max(a, b)
    other = leaf.size // max(1, math.prod(batch) * d)
    out[path] = (tuple(batch), tuple(sorted((d, other))), rank, str(leaf.dtype))
  return out


def _check_owners(spec: Stages, params) -> None:
  """Every parameter owned by exactly one stage (else it would never, or twice, be updated)."""
  owned: list[tuple] = []
  for stage in [spec.embed, *(s for block in spec.blocks for s in block), spec.head]:
    sub = _get_at(params, stage.module)
    for k in stage.keys:
      owned += _leaf_paths(sub[k], stage.module + (k,))
  everything = _leaf_paths(params)
  missing = sorted(set(everything) - set(owned), key=str)
  twice = sorted({p for p in owned if owned.count(p) > 1}, key=str)
  if missing or twice:
    raise ValueError(
      "layerwise stages must own every parameter exactly once; "
      f"owned by none: {missing[:5]}, by several: {twice[:5]}"
    )


def make_layerwise_step(
  graphdef,
  tx: optax.GradientTransformation,
  *,
  remat: str = "none",
  stages: StagesArg = None,
  proj_type: str = "std",
  matrix_axes: galore.MatrixAxesFn | None = None,
  accum_dtype: Any = jnp.float32,
  refresh_together: bool = False,
  clip_norm: float = 0.0,
):
  """Train step with per-layer updates: each weight is updated as soon as its gradient exists.

  Same signature and result as :func:`galore_jax.steps.make_train_step`, computed
  differently. The model is read as :class:`Stages` (``stages``; default the model's own
  ``layerwise_stages()``, which :class:`galore_jax.model.Llama` has: the embedding, the
  attention half and the MLP half of each decoder block, final norm + LM head). For your own
  Flax NNX decoder, give its stages, e.g. a GPT-2 with ``wte``/``wpe``, ``blocks``, ``ln_f``::

    Stages(
      embed=Stage(lambda m, t: m.wte(t) + m.wpe(jnp.arange(t.shape[1])), ("wte", "wpe")),
      blocks=[[Stage(lambda b, x: b(x), ("ln1", "attn", "ln2", "mlp"), ("blocks", i))]
              for i in range(n_layers)],
      head=Stage(lambda m, x: m.lm_head(m.ln_f(x)), ("ln_f", "lm_head")),
    )

  (or a method ``layerwise_stages()`` returning it). A weight shared by two stages (a tied
  embedding) cannot be updated after either, so such models need the whole-gradient step.

  The forward pass keeps one ``jax.vjp`` per stage. The backward pass walks them in reverse;
  right after a stage's pullback it updates the stage's weights one at a time, each by the
  optimizer on that weight alone (``MaskedNode`` everywhere else,
  :func:`galore_jax.optimizer.restrict_state`). With ``refresh_together`` the unit of
  update is instead a stage's GaLore-projected weights whose matrices have one shape up to
  a transpose (a block's q, k, v, o; its gate, up and down; every other weight alone), so
  that their projectors refresh as one batched computation: the step then holds one
  refresh program per unit instead of per weight (48 instead of 168 at ``llama_1b``; the
  GPU compile time of the iterative refreshes grew with that count), for the price of the
  unit's stacked gradient on refresh steps. The trainer turns it on for one device only:
  on a CPU mesh a batched decomposition can hang
  (:func:`galore_jax.config.batched_lapack_hangs`), and sharded units are untested on GPUs.
  ``optimization_barrier``s chain each unit's update to the next one and to the cotangent
  flowing into the previous stage, so XLA can neither postpone an update nor run several at
  once: at most one stage's gradient and one unit's update temporaries are alive, never the
  model's gradient. The optimizer and its state are
  unchanged (same numbers as the whole-tree update, refresh phases and random keys
  included). ``remat``: ``"none"`` / ``"save_matmuls"`` wrap each block stage in
  :func:`galore_jax.model.checkpointed`; ``"full"`` keeps only each block's input and
  recomputes the block in the pullback of its last stage.

  Gradient accumulation (``batch`` with ``N > 1`` micro-batches) in low rank: micro-batches
  ``1 .. N-1`` run forward and backward and add, per leaf GaLore projects, ``project(g_k)``
  with the leaf's current projector (:func:`galore_jax.optimizer.leaf_projections`; give
  ``proj_type`` and ``matrix_axes`` as the transform was given them) to an ``accum_dtype``
  accumulator of the low-rank shape (``r x n``), and the whole ``g_k`` for every other leaf.
  The last micro-batch runs the per-layer update with ``g_N + project_back(acc)`` for each
  leaf, which GaLore projects to exactly ``sum_k project(g_k)`` (``P`` is orthonormal):
  between refreshes the step equals the large-batch step. On a leaf's refresh step the new
  projector is computed from that gradient, i.e. from the last micro-batch's whole gradient
  plus the other micro-batches' parts in the old subspace, not from the large batch's
  gradient (which would need a full-size accumulator, the memory this avoids). Gradients are
  of the summed token loss divided by the total token count, as in
  :func:`galore_jax.steps.mean_token_gradient`; ``grad_norm`` is the norm of what the
  optimizer is handed.

  Non-finite values: if the loss is not finite nothing changes (``skipped`` is 1), as in
  :func:`galore_jax.steps.make_train_step`. If the loss is finite but a weight's gradient is
  not, that weight (with ``refresh_together``: its whole unit) keeps its value and optimizer
  state and the others are updated; ``nonfinite_grads`` counts the weights with a
  non-finite gradient.

  Global-norm clipping (``clip_norm`` > 0; ``tx`` must not clip itself, it would see one
  weight at a time) needs the norm of the whole gradient before the first update. The step
  then runs forward and backward twice. The first backward pass only sums the squares of
  each stage's gradient as it appears (no update; nothing is kept). The second forward starts
  from hidden states made to depend on that norm (``+ 0 * norm``), and its backward pass
  updates as above, each gradient scaled as ``optax.clip_by_global_norm`` scales it. The
  second forward is needed: reusing the first one's pullbacks, XLA hoists the scalar loss
  cotangent out of the weight-gradient dots, merges the two passes' dots and keeps every
  gradient alive between them. Memory stays that of the per-layer step, for about twice
  its compute. A non-finite gradient anywhere skips the whole step, as in the whole-gradient
  step; ``grad_norm`` is the norm before clipping. One micro-batch only.
  """
  if clip_norm < 0 or not math.isfinite(clip_norm):
    raise ValueError(f"clip_norm must be a finite number >= 0, got {clip_norm}")

  def forward(params, micro, spec: Stages, model, after_value=None):
    """Summed loss and ``[(path prefix of the stage's weights, pullback d -> (grads, d))]``.

    ``after_value``: the embedding's output is made to depend on it (``after``), so that
    nothing downstream can be merged with another forward pass over the same inputs."""

    def runner(stage):
      module = _module_at(model, stage.module)
      gd, sub = nnx.graphdef(module), _get_at(params, stage.module)
      extra = (micro.get("segments"),) if stage.takes_segments else ()

      def run(weights, x):
        return stage.fn(nnx.merge(gd, {**sub, **weights}), x, *extra)

      return run, {k: sub[k] for k in stage.keys}

    def after(d, tree):
      """``tree`` made data-dependent on the cotangent ``d`` (``+ 0 * d[0]``; XLA does not
      fold that for floats), so what is computed from it waits for the backward pass."""
      zero = jnp.ravel(d)[0] * 0
      return jax.tree.map(lambda x: x + zero.astype(x.dtype), tree)

    def forward_block(block, x):
      """The block's output and its stages' pullbacks, in forward order.

      With ``remat="full"`` only the block's input is kept: the last stage's pullback
      recomputes the block from it and leaves the earlier stages' pullbacks for the next
      ones. The input and the block's vector weights (norm scales) are made to depend on the
      incoming cotangent (``after``): XLA would otherwise run every block's recomputation, or
      broadcasts of its norm scales, at the start of the backward pass and hold them all at
      once (the CPU backend does, optimization barriers notwithstanding).
      """
      runs = [runner(stage) for stage in block]
      pullbacks = []
      if remat != "full":
        for run, weights in runs:
          x, pullback = jax.vjp(model_lib.checkpointed(run, remat), weights, x)
          pullbacks.append(pullback)
        return x, pullbacks
      saved = {}
      vectors_later = lambda d, tree: {
        k: jax.tree.map(lambda w, d=d: after(d, w) if w.ndim < 2 else w, v) for k, v in tree.items()
      }
      x_in = x

      def last_pullback(d):
        h = after(d, x_in)
        for j, (run, weights) in enumerate(runs[:-1]):
          h, saved[j] = jax.vjp(run, vectors_later(d, weights), h)
        run, weights = runs[-1]
        return jax.vjp(run, vectors_later(d, weights), h)[1](d)

      for run, weights in runs:
        x = run(weights, x)
      pullbacks = [lambda d, j=j: saved[j](d) for j in range(len(runs) - 1)]
      return x, pullbacks + [last_pullback]

    run, weights = runner(spec.embed)
    embed = lambda w: run(w, micro["inputs"])
    if after_value is not None:
      embed = lambda w: after(after_value, run(w, micro["inputs"]))
    x, embed_pullback = jax.vjp(embed, weights)
    stage_list = [(spec.embed.module, lambda d: (embed_pullback(d)[0], None))]
    for block in spec.blocks:
      x, pullbacks = forward_block(block, x)
      stage_list += [(s.module, p) for s, p in zip(block, pullbacks, strict=True)]
    run_head, head_weights = runner(spec.head)
    head_loss = lambda w, x: steps.summed_cross_entropy(run_head(w, x), micro)
    loss_sum, head_pullback = jax.vjp(head_loss, head_weights, x)
    stage_list.append((spec.head.module, head_pullback))
    return loss_sum, stage_list

  def backward(stage_list, d, visit, commit, units=None):
    """Walks the stages in reverse. For each unit of a stage's weights (default: each weight
    alone; ``units(paths)`` gives lists of indices into ``paths``): ``out = visit(paths,
    gs)``, then ``commit(paths, out)``; a barrier orders each ``out`` before the next unit's
    gradients and the cotangent flowing on."""
    for prefix, stage_pullback in reversed(stage_list):
      grads, d = stage_pullback(d)
      leaves = [
        (prefix + tuple(_key(k) for k in keypath), g)
        for keypath, g in jax.tree_util.tree_flatten_with_path(grads)[0]
      ]
      paths = [path for path, _ in leaves]
      groups = units(paths) if units else [[i] for i in range(len(paths))]
      done: set[int] = set()
      for unit in groups:
        out = visit([paths[i] for i in unit], [leaves[i][1] for i in unit])
        done.update(unit)
        rest = [i for i in range(len(leaves)) if i not in done]
        d, later, out = jax.lax.optimization_barrier((d, [leaves[i][1] for i in rest], out))
        for i, g in zip(rest, later, strict=True):
          leaves[i] = (leaves[i][0], g)
        commit([paths[i] for i in unit], out)

  def accumulate(params, opt_state, batch, spec, model, denom):
    """Summed loss over ``batch``'s micro-batches and the per-leaf accumulators (by path) of
    their gradients / ``denom``: low-rank for projected leaves, whole for the others."""
    projections = galore.leaf_projections(
      opt_state, params, proj_type=proj_type, matrix_axes=matrix_axes
    )
    paths = _leaf_paths(params)
    by_path = dict(zip(paths, projections, strict=True))
    shapes = {
      p: (q.low_rank_shape if q is not None else _get_at(params, p).shape)
      for p, q in by_path.items()
    }
    zeros = {p: jnp.zeros(s, accum_dtype) for p, s in shapes.items()}

    def body(carry, micro):
      acc, loss_prev = carry
      loss_sum, stage_list = forward(params, micro, spec, model)
      acc = dict(acc)

      def visit(paths, gs):
        (path,), (g,) = paths, gs
        g = g.astype(accum_dtype)
        q = by_path[path]
        return acc[path] + (g if q is None else q.project(g).astype(accum_dtype))

      def commit(paths, out):
        acc[paths[0]] = out

      backward(stage_list, (1.0 / denom).astype(loss_sum.dtype), visit, commit)
      return (acc, loss_prev + loss_sum), None

    (acc, loss_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros([], jnp.float32)), batch)
    return loss_sum, acc, by_path

  def step(params, opt_state, batch):
    n_micro = batch["inputs"].shape[0]
    if clip_norm and n_micro > 1:
      raise ValueError(
        "clip_norm with several micro-batches: the low-rank accumulators hold no whole "
        "gradient to take the norm of; use galore_jax.steps.make_train_step"
      )
    model = nnx.merge(graphdef, params)
    spec = model_stages(model, stages)
    _check_owners(spec, params)
    if "segments" in batch and not any(s.takes_segments for b in spec.blocks for s in b):
      raise ValueError(
        "a packed batch (with 'segments') through layerwise stages none of which takes "
        "segment ids (Stage.takes_segments): its examples would attend to each other"
      )
    count = jnp.sum(batch["mask"].astype(jnp.float32))
    denom = jnp.maximum(count, 1.0)
    earlier_loss, acc, by_path = jnp.zeros([], jnp.float32), None, None
    if n_micro > 1:
      earlier = jax.tree.map(lambda x: x[:-1], batch)
      earlier_loss, acc, by_path = accumulate(params, opt_state, earlier, spec, model, denom)
    micro = jax.tree.map(lambda x: x[-1], batch)
    loss_sum, stage_list = forward(params, micro, spec, model)
    loss = (earlier_loss + loss_sum) / denom
    loss_ok = jnp.isfinite(loss)

    placeholders = jax.tree.map(lambda _: optax.MaskedNode(), params)
    no_leaves = jax.tree.map(lambda _: False, params)
    shapes = _projected_shapes(opt_state, params)

    def refresh_units(paths):
      """A stage's weights in update units: the projected ones whose matrices have the same
      shape up to a transpose (and dtype) together, so that GaLore refreshes their
      projectors as one batch and the step holds one refresh program per unit, not per
      weight; every other weight alone."""
      units: dict[Any, list[int]] = {}
      for i, path in enumerate(paths):
        units.setdefault(shapes.get(path) or ("alone", i), []).append(i)
      return list(units.values())

    new_params, new_state = params, opt_state
    sq_norm = jnp.zeros([], jnp.float32)
    nonfinite = jnp.zeros([], jnp.int32)
    d_loss = (1.0 / denom).astype(loss_sum.dtype)
    step_ok = loss_ok  # whether the step changes anything
    if clip_norm:
      # First backward pass: the global norm. Each stage's gradient is reduced to its squares
      # right after its pullback and dropped.
      def visit_norm(paths, gs):
        # In the weight's dtype first, as the second pass (and the whole-gradient step) sees it.
        as_stored = [g.astype(_get_at(params, p).dtype) for p, g in zip(paths, gs, strict=True)]
        return [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in as_stored]

      def commit_norm(paths, out):
        nonlocal sq_norm, nonfinite
        for g_sq in out:
          sq_norm += g_sq
          nonfinite += (loss_ok & ~jnp.isfinite(g_sq)).astype(jnp.int32)

      backward(stage_list, d_loss, visit_norm, commit_norm)
      global_norm = jnp.sqrt(sq_norm)
      step_ok = loss_ok & jnp.isfinite(global_norm)
      # Second forward, chained to the norm (see the docstring for why not the first one's).
      global_norm = jax.lax.optimization_barrier(global_norm)
      _, stage_list = forward(params, micro, spec, model, after_value=global_norm)

    def at(tree, paths, values):
      for path, value in zip(paths, values, strict=True):
        tree = _replace_at(tree, path, value)
      return tree

    def update_unit(paths, gs):
      """Optimizer step for the weights at ``paths``, together: their new values and state
      part."""
      nonlocal sq_norm, nonfinite
      ps = [_get_at(params, path) for path in paths]
      oks = []
      for k, (path, g) in enumerate(zip(paths, gs, strict=True)):
        if acc is not None:
          # The accumulator made to depend on this gradient (as ``after`` does): else XLA
          # back-projects every leaf's accumulator at once, early, a full-size gradient's
          # worth.
          q, a = by_path[path], acc.pop(path)
          a = a + (jnp.ravel(g)[0] * 0).astype(a.dtype)
          earlier = a if q is None else q.project_back(a)
          g = g.astype(earlier.dtype) + earlier
        g = g.astype(ps[k].dtype)
        if clip_norm:  # as optax.clip_by_global_norm: g * clip / |g| above the threshold
          norm = global_norm.astype(g.dtype)
          g = jnp.where(global_norm < clip_norm, g, (g / norm) * clip_norm)
        gs[k] = g
        g_sq = jnp.sum(jnp.square(g.astype(jnp.float32)))
        oks.append(step_ok & jnp.isfinite(g_sq))
        if not clip_norm:  # else measured by the first pass, before clipping
          sq_norm += g_sq
          nonfinite += (loss_ok & ~oks[-1]).astype(jnp.int32)
      ok = functools.reduce(jnp.logical_and, oks)
      keep = at(no_leaves, paths, [True] * len(paths))

      def apply(operands):
        gs, old_part, ps = operands
        updates, part = tx.update(
          at(placeholders, paths, gs), old_part, at(placeholders, paths, ps)
        )
        new = [
          optax.apply_updates(p, _get_at(updates, path)) for p, path in zip(ps, paths, strict=True)
        ]
        return new, part

      # A cond, not a where: the skipped branch needs no second copy of the weights' state,
      # so the 8-bit update can overwrite the stored codes in place.
      old_part = galore.restrict_state(tx, opt_state, keep)
      return jax.lax.cond(ok, apply, lambda ops: (ops[2], ops[1]), (list(gs), old_part, ps))

    def commit(paths, out):
      nonlocal new_params, new_state
      new_ps, part = out
      new_params = at(new_params, paths, new_ps)
      new_state = galore.merge_state(tx, new_state, part, at(no_leaves, paths, [True] * len(paths)))

    # Backward: after each stage's pullback, update its weights unit after unit.
    units = refresh_units if refresh_together else None
    backward(stage_list, d_loss, update_unit, commit, units=units)

    # Step counters advance once, unless the whole step was skipped: an update of no
    # leaves at all advances only them.
    old_counts = galore.restrict_state(tx, opt_state, no_leaves)
    _, counts = tx.update(placeholders, old_counts, placeholders)
    counts = jax.tree.map(lambda new, old: jnp.where(step_ok, new, old), counts, old_counts)
    new_state = galore.merge_state(tx, new_state, counts, no_leaves)
    return (
      new_params,
      new_state,
      {
        "loss": loss,
        "grad_norm": jnp.sqrt(sq_norm),
        "skipped": (~step_ok).astype(jnp.int32),
        "nonfinite_grads": nonfinite,
        "tokens": count,
      },
    )

  return step
