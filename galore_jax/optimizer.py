"""GaLore as an optax ``GradientTransformation`` that wraps an inner optimizer.

Zhao, Zhang, Chen, Wang, Anandkumar & Tian, "GaLore: Memory-Efficient LLM
Training by Gradient Low-Rank Projection", ICML 2024 (arXiv 2403.03507).

For each selected weight ``W`` (an ``M x N`` matrix, or a batch of them) with
gradient ``G_t`` the transform keeps an orthonormal basis ``P`` of rank ``r``
and computes

    P      <- top-r singular vectors of G_t           when the leaf refreshes
    R_t     = project(G_t, P)                           (r x N, M x r or r x r)
    N_t     = inner(R_t)                                (e.g. Adam on R's shape)
    update  = scale * project_back(N_t, P)              (M x N)

so the inner optimizer's state lives in the ``r``-dimensional subspace:
``M r + 2 N r`` numbers for Adam on a wide matrix instead of ``2 M N``.

Why a wrapper and not a member of ``optax.chain``: ``chain`` initialises every
member on the full parameter shapes, so an Adam placed after a projection
would still allocate full-size moments. Here the inner optimizer is
initialised on the low-rank shapes, so its state really is small.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_jax import projector as proj
from galore_jax import tree as tree_lib

MOMENT_POLICIES = ("keep", "reproject", "reset")
REFRESH_SCHEDULES = ("synchronous", "staggered")
INNER_PARAMS = ("low_rank", "full")  # what galore() hands its inner optimizer as params
# Who decides which updates refresh (galore(refresh=)): the update itself, or its caller.
REFRESH_DECISIONS = ("scheduled", "due", "not_due")


def refresh_due(count, update_proj_gap, offset: int = 0):
  """Whether a leaf of refresh phase ``offset`` refreshes at update ``count`` (the count
  before it is incremented): at 0 and at ``offset, offset + T, ...``.

  Works on Python ints (a caller deciding on the host, ``galore(refresh="due")``) and on
  traced arrays (the transform itself) alike."""
  return (count == 0) | ((count >= offset) & ((count - offset) % update_proj_gap == 0))


# (path, leaf) -> (row_axes, col_axes) or None for the default (last two axes).
MatrixAxesFn = Callable[[tuple, jax.Array], "tuple[tuple[int, ...], tuple[int, ...]] | None"]


class GaLoreState(NamedTuple):
  """State of :func:`galore`; a plain pytree.

  Attributes:
    count: number of updates applied so far (int32 scalar); leaves refresh
      their projector when ``count`` (before the increment) hits their cadence.
    projectors: the parameter tree's structure with, at each projected leaf,
      its basis (one array, or a ``(U, Vh)`` pair for ``proj_type="full"``),
      and ``None`` at every leaf that is not projected.
    inner_state: the inner optimizer's state, initialised on the low-rank
      shapes.
  """

  count: jax.Array
  projectors: Any
  inner_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class _LeafLayout:
  """How :func:`galore` lays out one projected leaf: matrix view, side, rank, refresh phase.

  All of it follows from the leaf's shape and :func:`galore`'s static arguments.
  """

  path: str
  shape: tuple[int, ...]
  perm: tuple[int, ...]  # transposes the leaf to batch + row + col axes
  batch_shape: tuple[int, ...]
  row_shape: tuple[int, ...]
  col_shape: tuple[int, ...]
  side: str
  rank: int
  offset: int  # refresh phase in [0, update_proj_gap)

  @property
  def m(self) -> int:
    return math.prod(self.row_shape)

  @property
  def n(self) -> int:
    return math.prod(self.col_shape)

  def to_matrices(self, x: jax.Array) -> jax.Array:
    return jnp.transpose(x, self.perm).reshape(self.batch_shape + (self.m, self.n))

  def from_matrices(self, x: jax.Array) -> jax.Array:
    x = x.reshape(self.batch_shape + self.row_shape + self.col_shape)
    return jnp.transpose(x, _inverse(self.perm))

  def low_rank_shape(self) -> tuple[int, ...]:
    return self.batch_shape + proj.low_rank_shape(self.side, self.m, self.n, self.rank)


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
  inv = [0] * len(perm)
  for i, p in enumerate(perm):
    inv[p] = i
  return tuple(inv)


def _normalize_axes(axes, ndim: int, what: str, path: str) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  out = tuple(a % ndim if -ndim <= a < ndim else None for a in axes)
  if not axes or None in out:
    raise ValueError(f"matrix_axes for leaf {path}: {what} {axes} invalid for ndim {ndim}")
  return out


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def leaf_layouts(
  params,
  mask_tree,
  *,
  rank,
  proj_type,
  matrix_axes,
  update_proj_gap,
  refresh_schedule,
  warn_clipped=True,
) -> list[_LeafLayout | None]:
  """One layout per leaf of ``params`` (flatten order); ``None`` for leaves GaLore skips.

  The arguments are :func:`galore`'s (``mask_tree`` resolved to a tree of bools). Public so
  that tools can read the refresh schedule (``offset``) and matrix shapes (``m``, ``n``,
  ``side``, ``rank``) the transform uses, e.g. ``experiments/gpu_bench.py``.

  ``optax.MaskedNode`` placeholders count as leaves (and get ``None``), so a
  leaf's index, and with it its refresh phase and random key, is the same
  whether the whole tree or only part of it is updated (per-layer updates).

  ``warn_clipped``: one warning naming the leaves whose rank is clipped to their smaller
  dimension (:func:`galore` warns when it creates the state, not on every update).
  """
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_masked)
  selected = treedef.flatten_up_to(mask_tree)
  num_leaves = len(leaves_with_path)
  layouts: list[_LeafLayout | None] = []
  clipped: dict[tuple, list[str]] = {}  # (shape, rank used) -> leaf names
  for index, ((path, leaf), use) in enumerate(zip(leaves_with_path, selected, strict=True)):
    name = jax.tree_util.keystr(path)
    if _is_masked(leaf) or _is_masked(use) or not use:
      layouts.append(None)
      continue
    shape = tuple(leaf.shape)
    spec = matrix_axes(path, leaf) if matrix_axes is not None else None
    if spec is None:
      if len(shape) < 2:
        raise ValueError(
          f"galore mask selects leaf {name} of shape {shape}; projected leaves need "
          "ndim >= 2 (exclude it from `mask`)"
        )
      rows, cols = (len(shape) - 2,), (len(shape) - 1,)
    else:
      rows = _normalize_axes(spec[0], len(shape), "row axes", name)
      cols = _normalize_axes(spec[1], len(shape), "col axes", name)
      if set(rows) & set(cols):
        raise ValueError(f"matrix_axes for leaf {name}: row and col axes overlap")
    batch = tuple(a for a in range(len(shape)) if a not in rows and a not in cols)
    m = math.prod(shape[a] for a in rows)
    n = math.prod(shape[a] for a in cols)
    side = proj.resolve_side(proj_type, m, n)
    r = rank
    if rank > min(m, n):
      # Rank above the matrix's own rank: keep every singular direction.
      r = min(m, n)
      clipped.setdefault((shape, r), []).append(name)
    layouts.append(
      _LeafLayout(
        name,
        shape,
        batch + rows + cols,
        tuple(shape[a] for a in batch),
        tuple(shape[a] for a in rows),
        tuple(shape[a] for a in cols),
        side,
        r,
        (index * update_proj_gap) // num_leaves if refresh_schedule == "staggered" else 0,
      )
    )
  if clipped and warn_clipped:
    # One warning for all leaves: a GQA model has two narrow k/v kernels per layer.
    groups = "; ".join(
      f"{len(names)} x {shape} (e.g. {names[0]}) clipped to {r}"
      for (shape, r), names in clipped.items()
    )
    warnings.warn(f"galore rank {rank} > min dimension of: {groups}", stacklevel=4)
  return layouts


# Upper bound on the elements of one stacked refresh batch: stacking copies the gradients, and
# the copy counts towards the step's peak memory (inside the refresh branch), so very large
# groups (the whole-gradient step at 7B) are split. Per-layer updates see a few leaves at once.
_REFRESH_GROUP_ELEMENTS = 2**28


@dataclasses.dataclass(frozen=True)
class _RefreshGroup:
  """Projected leaves whose bases are computed together: same matrix shape, side, rank, phase.

  With ``orient``, a ``"left"`` leaf (``m x n``, basis ``m x r``) joins the ``"right"``
  leaves of shape ``n x m`` as its transpose (``transposed``): its basis is the transpose of
  theirs (``r x m``). ``side``, ``m`` and ``n`` are then the group's (right-side) view.
  """

  leaf_indices: tuple[int, ...]
  sizes: tuple[int, ...]  # matrices per leaf (the product of its batch axes)
  side: str
  m: int
  n: int
  rank: int
  offset: int
  transposed: tuple[bool, ...] = ()


def _refresh_groups(
  layouts, g_mats, old_bases, orient: bool = False, max_elements: int | None = None
) -> list[_RefreshGroup]:
  """Batches of leaves that refresh together, in flatten order of their first leaf.

  ``orient`` (the iterative methods) also batches left-side leaves with right-side leaves of
  the transposed shape (e.g. a model's up and down projections): fewer, larger batches, and
  fewer refresh programs in the compiled step (one per group, in every layer of a per-layer
  step). The exact SVD keeps each side apart: its results stay those of the reference.
  """
  buckets: dict[tuple, list[int]] = {}
  for i, layout in enumerate(layouts):
    if layout is None:
      continue
    flip = orient and layout.side == "left"
    side, m, n = ("right", layout.n, layout.m) if flip else (layout.side, layout.m, layout.n)
    basis_dtypes = tuple(str(b.dtype) for b in jax.tree.leaves(old_bases[i]))
    key = (side, m, n, layout.rank, layout.offset, str(g_mats[i].dtype), basis_dtypes)
    buckets.setdefault(key, []).append(i)
  groups = []
  for (side, m, n, rank, offset, *_), indices in buckets.items():
    chunk: list[int] = []
    for i in indices + [None]:
      size = None if i is None else math.prod(layouts[i].batch_shape)
      full = chunk and (
        i is None
        or (sum(math.prod(layouts[j].batch_shape) for j in chunk) + size) * m * n
        > (_REFRESH_GROUP_ELEMENTS if max_elements is None else max_elements)
      )
      if full:
        sizes = tuple(math.prod(layouts[j].batch_shape) for j in chunk)
        flips = tuple(layouts[j].side != side for j in chunk)
        groups.append(_RefreshGroup(tuple(chunk), sizes, side, m, n, rank, offset, flips))
        chunk = []
      if i is not None:
        chunk.append(i)
  return sorted(groups, key=lambda grp: grp.leaf_indices[0])


class _ParamsSlot:
  """Stand-in for the parameter tree, to find where an inner state keeps per-parameter trees."""


jax.tree_util.register_pytree_node(_ParamsSlot, lambda _: ((), None), lambda *_: _ParamsSlot())


def _map_param_trees(inner, fn, state, *others):
  """Applies ``fn(path, subtree, *other_subtrees)`` to each per-parameter tree of ``state``.

  An inner optimizer's state holds copies of the parameter tree (Adam's ``mu``
  and ``nu``) next to scalars (``count``). Initialising it on a childless
  placeholder shows where those copies are, whatever the inner optimizer is.
  """
  try:
    slots = inner.init(_ParamsSlot())
  except Exception as e:  # noqa: BLE001 - re-raised with context
    raise ValueError(
      "this needs an optimizer whose init only maps over the parameter tree "
      f"(as optax's transforms do); {type(e).__name__}: {e}"
    ) from e
  is_slot = lambda x: isinstance(x, _ParamsSlot)

  def visit(path, slot, value, *rest):
    return fn(path, value, *rest) if is_slot(slot) else value

  return jax.tree_util.tree_map_with_path(visit, slots, state, *others, is_leaf=is_slot)


def restrict_state(tx: optax.GradientTransformation, state, keep):
  """``state`` with every per-parameter entry outside ``keep`` replaced by ``optax.MaskedNode``.

  ``keep`` is a tree of bools with the parameters' structure. Together with
  the updates and params masked the same way, the result can be passed to
  ``tx.update`` to update only the kept leaves: GaLore, Adam, 8-bit Adam and
  optax's element-wise transforms treat ``MaskedNode`` as an absent leaf.
  Scalars such as step counts are kept. Transforms that reduce over the
  whole tree (``clip_by_global_norm``) must not be updated this way.
  """
  treedef = jax.tree.structure(keep)
  flags = treedef.flatten_up_to(keep)

  def restrict(path, tree):
    del path
    parts = treedef.flatten_up_to(tree)
    kept = [p if k else optax.MaskedNode() for p, k in zip(parts, flags, strict=True)]
    return treedef.unflatten(kept)

  return _map_param_trees(tx, restrict, state)


def merge_state(tx: optax.GradientTransformation, state, part, keep):
  """Writes the kept leaves of ``part`` (from :func:`restrict_state`) back into ``state``.

  Scalars (step counts) are taken from ``part``: updating any part of the
  tree advances them exactly as a whole-tree update does.
  """
  treedef = jax.tree.structure(keep)
  flags = treedef.flatten_up_to(keep)

  def merge(path, new, old):
    del path
    news, olds = treedef.flatten_up_to(new), treedef.flatten_up_to(old)
    return treedef.unflatten([n if k else o for n, o, k in zip(news, olds, flags, strict=True)])

  return _map_param_trees(tx, merge, part, state)


def _is_first_moment(path) -> bool:
  last = path[-1] if path else None
  return isinstance(last, jax.tree_util.GetAttrKey) and last.name == "mu"


STATIC_ARGS = (
  "rank",
  "update_proj_gap",
  "mask",
  "matrix_axes",
  "oversample",
  "power_iters",
  "subspace_iters",
  "subspace_first_iters",
  "projector_dtype",
  "seed",
  "refresh_batch_elements",
)
"""Arguments of :func:`galore` and :func:`galore_adamw` to keep out of ``optax.inject_hyperparams``:
``optax.inject_hyperparams(galore_adamw, static_args=STATIC_ARGS)``.

``inject_hyperparams`` stores every number it is given in the optimizer state and rebuilds the
transform from those (traced) values at each update, and treats every callable as a schedule.
Without ``static_args`` GaLore copes: the rank is read when the state is created and then from
the stored projectors, and the refresh gap, iteration counts and seed work traced. Naming them
is needed to create the state under ``jit`` / ``jax.eval_shape``, for
``refresh_schedule="staggered"`` and ``svd="randomized"``, and for a callable ``mask``,
``matrix_axes`` or ``projector_dtype``. Everything else (``learning_rate``, ``scale``, ``b1``,
``b2``, ``eps``, ``weight_decay``) can be injected and changed mid-run.
"""


def _int_arg(name: str, value, minimum: int | None) -> int | None:
  """``value`` as a Python int (concrete 0-d arrays too); ``None`` if it is a traced array.

  ``optax.inject_hyperparams`` without ``static_args`` hands integers over as arrays: concrete
  when the state is created, traced inside a jit-compiled update.
  """
  if hasattr(value, "dtype") and not isinstance(value, bool):
    if isinstance(value, jax.core.Tracer):
      return None
    if jnp.ndim(value) == 0 and jnp.issubdtype(value.dtype, jnp.integer):
      value = int(value)
  if not isinstance(value, int) or isinstance(value, bool):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return value


def _int_or_traced(name: str, value, minimum: int | None):
  """A Python int, or the traced array itself (for values only used in arithmetic / loops)."""
  concrete = _int_arg(name, value, minimum)
  return value if concrete is None else concrete


_NEEDS_STATIC = (
  "optax.inject_hyperparams turns numbers into arrays: pass static_args=galore_jax.STATIC_ARGS"
)


def _stored_rank(side: str, basis) -> int:
  first = jax.tree.leaves(basis)[0]  # (.., m, r) on the left and for "full"'s U; (.., r, n)
  return first.shape[-1] if side in ("left", "full") else first.shape[-2]


def _default_mask(params):
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def galore(
  inner: optax.GradientTransformation,
  *,
  rank: int,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  proj_type: str = "std",
  mask: Any = None,
  matrix_axes: MatrixAxesFn | None = None,
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
  inner_params: str = "low_rank",
  refresh: str = "scheduled",
) -> optax.GradientTransformation:
  r"""Gradient Low-Rank Projection around an inner optimizer (Zhao et al., 2024).

  For a selected leaf with gradient :math:`G_t \in \mathbb{R}^{M \times N}`:

  .. math::
    P &\leftarrow \mathrm{top}_r\,\mathrm{SVD}(G_t) \quad
        \text{if } t \equiv o \pmod T \text{ or } t = 0 \\
    R_t &= \mathrm{project}(G_t, P), \qquad
    N_t = \mathrm{inner}(R_t), \qquad
    \Delta_t = \alpha\,\mathrm{project\_back}(N_t, P)

  with :math:`t` the update count before it is incremented, :math:`T` =
  ``update_proj_gap``, :math:`\alpha` = ``scale`` and :math:`o` the leaf's
  refresh offset (0 unless ``refresh_schedule="staggered"``). Leaves that
  ``mask`` does not select go through ``inner`` at full shape, unprojected, so
  one transform serves a whole model. The inner optimizer is initialised on
  the low-rank shapes, so its moments really are low-rank.

  Args:
    inner: any optax transformation, applied in the low-rank space. It
      receives ``params`` expressed in the same low-rank coordinates
      (``project(W, P)``), so shape-aware inner transforms work; decay the
      full weight *outside* the wrapper (``optax.add_decayed_weights`` after
      it), as :func:`galore_adamw` does. ``inner_params="full"`` hands it the
      parameters unprojected instead, for an inner rule that only reads a
      statistic of each whole weight, such as Adafactor's relative step size
      ``max(eps, RMS(W))`` (:func:`galore_jax.galore_adafactor`); an inner
      that combines params element-wise with its updates must not get them.
    rank: target rank ``r``. A leaf whose matrix has ``min(M, N) < r`` uses
      rank ``min(M, N)`` (a warning says so): every direction is kept and the
      transform is the inner optimizer in a rotated basis.
    update_proj_gap: ``T``, steps between projector refreshes of one leaf.
    scale: ``alpha``, multiplies the back-projected update.
    proj_type: ``"std"`` (reference default: project the smaller dimension;
      ``M >= N`` keeps ``P = Vh[:r]``, else ``U[:, :r]``), ``"reverse_std"``
      (the other one), ``"left"``, ``"right"`` or ``"full"`` (both sides,
      ``r x r`` core). Applied to the matrix view given by ``matrix_axes``.
    mask: pytree of bools (or a callable returning one) choosing the leaves to
      project. Default: every leaf with ``ndim >= 2``. The transform also works
      inside ``optax.masked`` and ``optax.multi_transform`` (parameter groups,
      e.g. one ``galore`` per rank): leaves of other groups arrive as
      ``optax.MaskedNode`` and are kept as absent leaves. Under
      ``optax.inject_hyperparams`` pass ``static_args=STATIC_ARGS``.
    matrix_axes: optional ``fn(path, leaf) -> (row_axes, col_axes)`` naming
      which axes form the matrix (several axes are flattened into one, e.g.
      ``((0,), (1, 2))`` for a kernel stored as ``(embed, heads, head_dim)``);
      the remaining axes are batch axes with one projector per slice. Return
      ``None`` for the default: the last two axes are the matrix and leading
      axes (e.g. layers stacked for a scan) are batch axes. To reproduce a
      torch ``(out, in)`` weight's choice for a Flax ``(in, out)`` kernel, use
      ``((1,), (0,))``.
    svd: how a refresh finds the top-``r`` subspace. ``"exact"``: float32 SVD, as
      the reference. ``"randomized"``: a fresh randomized range finder each refresh
      (``oversample`` extra columns, ``power_iters`` power steps, Rayleigh-Ritz on the
      small sketch; no SVD). ``"subspace"``: ``subspace_iters`` rounds of block power
      iteration warm-started from the leaf's current basis
      (:func:`galore_jax.projector.subspace_basis`): two matmuls with the gradient and
      a Cholesky-based orthonormalisation per round (Householder QR only if that is
      ill-conditioned), no SVD; the first refresh (count 0), which has no basis to start
      from, starts from a pseudo-random matrix (:func:`galore_jax.projector.hashed_uniform`),
      runs ``subspace_first_iters`` rounds and rotates the result onto Ritz vectors (an
      ``r x r`` eigh, this once). Leaves with the same matrix
      shape, side, rank and refresh phase are refreshed together as one batched
      computation in every mode.
    subspace_iters: rounds per refresh for ``svd="subspace"`` (default 2: on
      ``llama_tiny`` pretraining, rank 64, T 200, one round kept at least 0.983 of the
      exact top-r gradient energy on every kernel at every refresh, two rounds 0.994;
      ``experiments/refresh_energy.py``).
    subspace_first_iters: rounds of the first refresh for ``svd="subspace"`` (default
      4: on ``llama_tiny``'s gradients at initialisation, rank 64, 1/2/3/4/8 rounds from
      a random start capture at least 0.986/0.997/0.9985/0.9992/0.9997 of the exact
      top-r energy on every kernel).
    refresh_schedule: ``"synchronous"`` refreshes every leaf at counts ``0, T,
      2T, ...`` (reference). ``"staggered"`` gives leaf ``k`` of the ``L``
      leaves of the tree (flatten order, projected or not) the phase
      ``o = floor(k T / L)``: it refreshes at 0 and at ``o, o + T, ...``, so
      each leaf still refreshes every ``T`` steps but no single step pays for
      all SVDs. Counting every leaf, not only projected ones, keeps a leaf's
      phase fixed when only part of the tree is updated at a time.
    moment_policy: what the inner state does when a leaf's basis changes.
      ``"keep"`` (reference): moments stay as they are, now read in the new
      basis. ``"reproject"``: the first moment ``mu`` (any state field named
      ``mu``) is rotated into the new basis, ``mu <- project(project_back(mu,
      P_old), P_new)`` (right side: ``mu P_old P_new^T``; left side:
      ``P_new^T P_old mu``), which keeps the part of the old momentum that lies
      in the new subspace; other per-parameter fields (``nu``) are kept, as a
      second moment has no linear change of basis. ``"reset"``: every
      per-parameter field of the inner state for that leaf is re-initialised.
    projector_dtype: dtype to store projectors in; default the leaf's dtype
      (the reference keeps them in the gradient dtype, so bf16 in pure-bf16
      training). The SVD is always computed in float32.
    seed: seed of the random matrices of ``svd="randomized"`` and of the first
      ``svd="subspace"`` refresh (derived per leaf and step, so no key lives in the
      state).
    refresh_batch_elements: upper bound on the elements of one stacked refresh batch
      (default ``2**28``; the stacked copy counts towards the refresh step's peak). ``1``
      refreshes every leaf on its own. The trainer passes ``1`` on a CPU mesh of several
      devices (:func:`galore_jax.config.batched_lapack_hangs`): there a batched
      decomposition can hang the step.
    refresh: who decides which updates refresh. ``"scheduled"`` (default): the update
      does, from the count, on the device: one ``lax.cond`` per refresh group. On a GPU
      each such branch that holds a decomposition runs from the host, which first copies
      the predicate back and waits for it, on every step, refreshing or not (96 host
      round trips per ``llama_1b`` per-layer step, measured in a profile on an H200).
      ``"due"`` and ``"not_due"`` (``refresh_schedule="synchronous"`` only) move that
      decision to the caller: the caller promises that this update's count is, or is not,
      one of :func:`refresh_due`'s, and the update refreshes every leaf without a branch,
      or holds no refresh code at all. Compile one step with each and pick one per step
      on the host from the state's count (:func:`galore_count`), as the trainer does on
      GPUs (``--refresh-programs``). Both have the state of ``"scheduled"``, and on the
      counts they promise the same updates; a broken promise is not detected (the update
      is then that of another schedule).

  Faults: if a refresh sees a non-finite or all-zero gradient, or the SVD returns
  non-finite values (non-convergence), the leaf keeps its previous projector;
  before its first successful refresh that is the initial basis (the first
  ``r`` coordinate axes). The update itself is still computed from the given
  gradient, so a non-finite gradient gives a non-finite update and inner
  state; wrap the optimizer in ``optax.apply_if_finite`` to skip such steps
  (the trainer does). The reference instead stores the NaN projector and
  trains on zeros until the next refresh.

  Returns:
    An ``optax.GradientTransformation`` with :class:`GaLoreState`.
  """
  # Under `optax.inject_hyperparams` (without static_args) the integers below arrive as
  # arrays, traced in a jit-compiled update. Those that are only used in arithmetic or as
  # loop counts (refresh gap, iterations, seed) work traced; the rank fixes shapes, so it is
  # read when the state is created (concrete then) and afterwards from the stored projectors.
  rank = _int_arg("rank", rank, 1)
  gap = _int_arg("update_proj_gap", update_proj_gap, 1)
  update_proj_gap = update_proj_gap if gap is None else gap
  if gap is None and refresh_schedule == "staggered":
    raise ValueError(
      f"update_proj_gap is traced; refresh_schedule='staggered' needs it static ({_NEEDS_STATIC})"
    )
  if proj_type not in proj.PROJ_TYPES:
    raise ValueError(f"proj_type must be one of {proj.PROJ_TYPES}, got {proj_type!r}")
  if svd not in proj.SVD_METHODS:
    raise ValueError(f"svd must be one of {proj.SVD_METHODS}, got {svd!r}")
  if refresh_schedule not in REFRESH_SCHEDULES:
    raise ValueError(
      f"refresh_schedule must be one of {REFRESH_SCHEDULES}, got {refresh_schedule!r}"
    )
  if moment_policy not in MOMENT_POLICIES:
    raise ValueError(f"moment_policy must be one of {MOMENT_POLICIES}, got {moment_policy!r}")
  if inner_params not in INNER_PARAMS:
    raise ValueError(f"inner_params must be one of {INNER_PARAMS}, got {inner_params!r}")
  if refresh not in REFRESH_DECISIONS:
    raise ValueError(f"refresh must be one of {REFRESH_DECISIONS}, got {refresh!r}")
  if refresh != "scheduled" and refresh_schedule != "synchronous":
    raise ValueError(
      f"refresh={refresh!r} needs refresh_schedule='synchronous': a staggered schedule "
      "refreshes different leaves at different counts, so no one promise covers an update"
    )
  over = _int_arg("oversample", oversample, 0)
  if over is None and svd == "randomized":
    raise ValueError(f"oversample is traced; svd='randomized' needs it static ({_NEEDS_STATIC})")
  oversample = oversample if over is None else over
  power_iters = _int_or_traced("power_iters", power_iters, 0)
  subspace_iters = _int_or_traced("subspace_iters", subspace_iters, 1)
  subspace_first_iters = _int_or_traced("subspace_first_iters", subspace_first_iters, 1)
  seed = _int_or_traced("seed", seed, None)

  def layouts_for(tree, bases=None, warn_clipped=False) -> list[_LeafLayout | None]:
    mask_tree = _default_mask(tree) if mask is None else (mask(tree) if callable(mask) else mask)
    if rank is None and bases is None:
      raise ValueError(
        "rank is a traced array when the optimizer state is created; it fixes the state's "
        f"shapes, so create the state outside jit / eval_shape, or {_NEEDS_STATIC}"
      )
    layouts = leaf_layouts(
      tree,
      mask_tree,
      rank=1 if rank is None else rank,
      proj_type=proj_type,
      matrix_axes=matrix_axes,
      update_proj_gap=update_proj_gap,
      refresh_schedule=refresh_schedule,
      warn_clipped=warn_clipped,
    )
    if rank is None:
      # Traced rank: each leaf keeps the rank its projector was created with.
      layouts = [
        p if p is None else dataclasses.replace(p, rank=_stored_rank(p.side, b))
        for p, b in zip(
          layouts, jax.tree.structure(tree, is_leaf=_is_masked).flatten_up_to(bases), strict=True
        )
      ]
    return layouts

  def low_rank_zeros(leaf, layout):
    if _is_masked(leaf):
      return leaf
    if layout is None:
      return jnp.zeros_like(leaf)
    return jnp.zeros(layout.low_rank_shape(), leaf.dtype)

  def init_fn(params):
    # `optax.masked` / `optax.multi_transform` hand over the tree with `MaskedNode` at the
    # leaves of other groups. They are leaves here, as in `leaf_layouts` and `update_fn`, so
    # the layouts line up with the leaves, and each one stays a `MaskedNode` in the inner state.
    leaves, treedef = jax.tree.flatten(params, is_leaf=_is_masked)
    layouts = layouts_for(params, warn_clipped=True)
    projectors = [
      None
      if layout is None
      else proj.safe_basis(
        layout.batch_shape,
        layout.side,
        layout.m,
        layout.n,
        layout.rank,
        projector_dtype or leaf.dtype,
      )
      for leaf, layout in zip(leaves, layouts, strict=True)
    ]
    inner_params = treedef.unflatten(
      [low_rank_zeros(x, p) for x, p in zip(leaves, layouts, strict=True)]
    )
    return GaLoreState(
      count=jnp.zeros([], jnp.int32),
      projectors=treedef.unflatten(projectors),
      inner_state=inner.init(inner_params),
    )

  def fresh_bases(g_BxMxN, old, group: _RefreshGroup, count):
    """New bases for a group's stacked matrices (not yet checked for faults)."""
    side, r = group.side, group.rank
    if svd == "exact":
      return proj.exact_basis(g_BxMxN, side, r)

    def per_leaf_random(salt, shape):
      # One stream per matrix (leaf index, place in the leaf), so a leaf's draw does not
      # depend on what it is batched with; one small hash program for the whole group.
      streams = [
        (i, k) for i, b in zip(group.leaf_indices, group.sizes, strict=True) for k in range(b)
      ]
      return proj.hashed_uniform(seed, streams, salt, shape)

    def randomized():
      omega = per_leaf_random(
        count, proj.test_matrix_shape((), side, group.m, group.n, r, oversample)
      )
      return proj.randomized_basis(g_BxMxN, side, r, power_iters=power_iters, test_matrix=omega)

    if svd == "randomized":
      return randomized()

    # Subspace iteration from the current basis. The very first refresh (count 0) has no
    # basis worth starting from (the initial one is the first r coordinate axes), so it
    # starts from a pseudo-random matrix, one per leaf, and runs more rounds. One loop serves
    # both, so the orthonormalisation is compiled once per group.
    def random_start():
      shapes = proj.basis_shapes(side, group.m, group.n, r)
      mats = [per_leaf_random(j, shape) for j, shape in enumerate(shapes)]
      return mats[0] if side != "full" else tuple(mats)

    first = count == 0
    start = jax.lax.cond(
      first, random_start, lambda: jax.tree.map(lambda x: x.astype(jnp.float32), old)
    )
    iters = jnp.where(first, subspace_first_iters, subspace_iters)
    basis = proj.subspace_basis(g_BxMxN, side, start, iters=iters)

    # The first basis is a random rotation within the top subspace; Adam is not rotation
    # invariant, so it is turned onto singular vectors (Rayleigh-Ritz, an r x r eigh, once).
    # Later rounds keep that order: each is a step of orthogonal iteration from it.
    def ritz(basis):
      vectors = (
        basis if side == "left" else jnp.swapaxes(basis[-1] if side == "full" else basis, -1, -2)
      )
      return proj.rayleigh_ritz(g_BxMxN, side, vectors)

    return jax.lax.cond(first, ritz, lambda b: b, basis)

  def refresh_group(group: _RefreshGroup, g_leaves, old_leaves, count):
    """Bases of every leaf in ``group`` after this step, and whether each changed.

    The leaves' matrices are stacked and decomposed together (one batched matmul /
    Cholesky / SVD instead of one traced program per leaf). Stacking happens inside the
    ``lax.cond``, so steps without a refresh neither pay for nor hold the stacked copy.
    """
    flips = group.transposed or (False,) * len(group.leaf_indices)

    def compute(_):
      def stack(xs):
        # Transposed members enter in the group's orientation (gradient and basis alike).
        xs = [jnp.swapaxes(x, -1, -2) if t else x for x, t in zip(xs, flips, strict=True)]
        return jnp.concatenate([x.reshape((-1,) + x.shape[-2:]) for x in xs])

      g = stack(g_leaves)
      old = jax.tree.map(lambda *xs: stack(xs), *old_leaves)
      # A leaf keeps its basis if any of its matrices is non-finite or zero, or if the new
      # basis is not finite: LAPACK's SVD can loop forever on NaN input, so such matrices
      # are decomposed as zeros and the result discarded.
      usable = jnp.all(jnp.isfinite(g), axis=(-2, -1)) & jnp.any(g != 0, axis=(-2, -1))
      fresh = fresh_bases(jnp.where(usable[:, None, None], g, 0), old, group, count)
      ok = usable
      for f in jax.tree.leaves(fresh):
        ok &= jnp.all(jnp.isfinite(f), axis=(-2, -1))
      ends = list(itertools.accumulate(group.sizes))
      leaf_ok = jnp.stack([jnp.all(ok[e - b : e]) for b, e in zip(group.sizes, ends, strict=True)])
      per_matrix_ok = jnp.repeat(leaf_ok, jnp.asarray(group.sizes), total_repeat_length=g.shape[0])
      new = jax.tree.map(
        lambda f, o: jnp.where(per_matrix_ok[:, None, None], f.astype(o.dtype), o), fresh, old
      )
      outs = []
      for j, (b, e) in enumerate(zip(group.sizes, ends, strict=True)):

        def unstack(x, ref, lo=e - b, hi=e, flip=flips[j]):
          x = x[lo:hi]
          x = jnp.swapaxes(x, -1, -2) if flip else x
          return x.reshape(ref.shape)

        outs.append(jax.tree.map(unstack, new, old_leaves[j]))
      return outs, leaf_ok

    def keep(_):
      return list(old_leaves), jnp.zeros(len(group.sizes), bool)

    if refresh == "due":  # the caller's promise: no branch, no host round trip on a GPU
      return compute(None)
    # lax.cond runs only the taken branch, so steps without a refresh pay nothing.
    due = refresh_due(count, update_proj_gap, group.offset)
    return jax.lax.cond(due, compute, keep, None)

  def update_fn(updates, state, params=None):
    leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_masked)
    layouts = layouts_for(updates, state.projectors)
    old_bases = treedef.flatten_up_to(state.projectors)
    param_leaves = None if params is None else treedef.flatten_up_to(params)
    count = state.count

    g_mats = [
      None if layout is None else layout.to_matrices(g)
      for g, layout in zip(leaves, layouts, strict=True)
    ]
    bases = list(old_bases)
    changed = [jnp.asarray(False)] * len(leaves)
    # The named scopes label the HLO ops (``metadata.op_name``), so a profile attributes
    # device time to GaLore's stages (experiments/profile_breakdown.py).
    with jax.named_scope("galore_refresh"):
      groups = _refresh_groups(
        layouts, g_mats, old_bases, orient=svd != "exact", max_elements=refresh_batch_elements
      )
      for group in groups if refresh != "not_due" else ():
        new, flags = refresh_group(
          group,
          [g_mats[i] for i in group.leaf_indices],
          [old_bases[i] for i in group.leaf_indices],
          count,
        )
        for j, i in enumerate(group.leaf_indices):
          bases[i], changed[i] = new[j], flags[j]

    low_rank, low_rank_params = [], []
    with jax.named_scope("galore_project"):
      for i, (g, layout) in enumerate(zip(leaves, layouts, strict=True)):
        if layout is None:
          low_rank.append(g)
          low_rank_params.append(None if param_leaves is None else param_leaves[i])
          continue
        low_rank.append(proj.project(g_mats[i], bases[i], layout.side))
        if inner_params == "full":
          low_rank_params.append(None if param_leaves is None else param_leaves[i])
        elif param_leaves is not None:
          p_mats = layout.to_matrices(param_leaves[i]).astype(g.dtype)
          low_rank_params.append(proj.project(p_mats, bases[i], layout.side))

    inner_state = state.inner_state
    if moment_policy != "keep":
      with jax.named_scope("galore_moments"):
        inner_state = _adjust_moments(inner_state, treedef, layouts, old_bases, bases, changed)

    params_for_inner = None if params is None else treedef.unflatten(low_rank_params)
    with jax.named_scope("galore_inner"):
      low_rank_updates, inner_state = inner.update(
        treedef.unflatten(low_rank), inner_state, params_for_inner
      )

    out = []
    with jax.named_scope("galore_project_back"):
      for u, layout, basis, g in zip(
        treedef.flatten_up_to(low_rank_updates), layouts, bases, leaves, strict=True
      ):
        if layout is None:
          out.append(u)
        else:
          full = proj.project_back(u, basis, layout.side) * scale
          out.append(layout.from_matrices(full).astype(g.dtype))
    new_state = GaLoreState(
      count=optax.safe_int32_increment(count),
      projectors=treedef.unflatten(bases),
      inner_state=inner_state,
    )
    return treedef.unflatten(out), new_state

  def _adjust_moments(inner_state, treedef, layouts, old_bases, bases, changed):
    def per_leaf(path, tree):
      if moment_policy == "reproject" and not _is_first_moment(path):
        return tree
      subtrees = treedef.flatten_up_to(tree)
      out = []
      for sub, layout, old, new, flag in zip(
        subtrees, layouts, old_bases, bases, changed, strict=True
      ):
        if layout is None:
          out.append(sub)
        elif moment_policy == "reset":
          out.append(jax.tree.map(lambda x, f=flag: jnp.where(f, jnp.zeros_like(x), x), sub))
        else:
          if not isinstance(sub, jax.Array) or sub.shape != layout.low_rank_shape():
            raise ValueError(
              f"moment_policy='reproject' needs the inner first moment of {layout.path} as a "
              f"plain array of shape {layout.low_rank_shape()}, got {type(sub).__name__}"
            )
          rotated = proj.change_of_basis(sub, old, new, layout.side)
          out.append(jnp.where(flag, rotated, sub))
      return treedef.unflatten(out)

    return _map_param_trees(inner, per_leaf, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdamHFState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam_hf(
  *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6
) -> optax.GradientTransformation:
  r"""Adam with ``eps`` added before bias correction, as Hugging Face's / galore-torch's AdamW.

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
    u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t} + \epsilon}

  This equals ``optax.scale_by_adam`` with an effective ``eps / sqrt(1 - b2^t)``;
  it is what makes :func:`galore_adamw` reproduce the reference's numbers.
  Moments take the dtype of the updates they are initialised on.
  """

  def init_fn(params):
    # Two trees of zeros, not one twice: a state whose leaves share buffers cannot be
    # donated to a jitted step ("Attempt to donate the same buffer twice").
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return ScaleByAdamHFState(jnp.zeros([], jnp.int32), zeros(), zeros())

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    mu = jax.tree.map(lambda m, g: (b1 * m + (1 - b1) * g).astype(m.dtype), state.mu, updates)
    nu = jax.tree.map(
      lambda v, g: (b2 * v + (1 - b2) * jnp.square(g)).astype(v.dtype), state.nu, updates
    )
    t = count.astype(jnp.float32)
    step = jnp.sqrt(1 - b2**t) / (1 - b1**t)
    out = jax.tree.map(
      lambda m, v: (step * m.astype(jnp.float32) / (jnp.sqrt(v.astype(jnp.float32)) + eps)).astype(
        m.dtype
      ),
      mu,
      nu,
    )
    return out, ScaleByAdamHFState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def _decay_updated(u, p, lr, weight_decay):
  return (u - lr * weight_decay * (p + u)).astype(u.dtype)


def _is_static_zero(x) -> bool:
  # A Python 0 skips the decay; an array (e.g. injected by `optax.inject_hyperparams`) may
  # change mid-run, so it is always applied.
  return isinstance(x, (int, float)) and x == 0


def decay_updated_weights(
  learning_rate: optax.ScalarOrSchedule, weight_decay: float, mask: Any = None
) -> optax.GradientTransformation:
  r"""Decoupled weight decay applied to the *updated* weight, as galore-torch's AdamW does.

  Placed after the learning-rate scaling: with ``u`` the incoming (already
  lr-scaled, negative) update, the result is ``u - lr_t * wd * (p + u)``, i.e.
  ``p <- (p + u)(1 - lr_t wd)``. ``optax.add_decayed_weights`` decays the old
  weight instead; the two differ by ``lr^2 wd |u|``.

  This transform reads ``learning_rate`` itself, a second copy next to the one that scaled
  ``u``: a learning rate injected into or changed in that other transform does not reach the
  decay. :func:`scale_and_decay_updated_weights` does both with one read and is what
  :func:`galore_adamw` uses; this one is kept for chains (and checkpoints) built around it.
  """
  if _is_static_zero(weight_decay):
    return optax.identity()

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("weight decay needs params; pass them to update()")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    out = jax.tree.map(lambda u, p: _decay_updated(u, p, lr, weight_decay), updates, params)
    return out, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


def scale_and_decay_updated_weights(
  learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0, mask: Any = None
) -> optax.GradientTransformation:
  r"""``optax.scale_by_learning_rate`` then :func:`decay_updated_weights`, reading the lr once.

  With ``n`` the incoming update: ``u = -lr_t n``, then ``u - lr_t wd (p + u)`` on the
  leaves ``mask`` selects (default all), i.e. ``p <- (p - lr_t n)(1 - lr_t wd)``.

  Why one transform and not two: the decay must use the learning rate that scaled the update.
  As two members of a chain each holds its own copy (and its own schedule count), so a rate
  injected with ``optax.inject_hyperparams`` into one of them, or changed in its state
  mid-run, never reaches the other. Here the schedule is evaluated once per step and that
  value is used for both, so ``optax.inject_hyperparams(scale_and_decay_updated_weights)``
  (or ``inject_hyperparams(galore_adamw)``) changes the step and the decay together. The state
  (one count) does not depend on ``weight_decay``, so injecting it keeps the state's shape.

  Args:
    learning_rate: a fixed learning rate or a schedule of the update count.
    weight_decay: decay coefficient, applied to the updated weight.
    mask: pytree of bools (or a callable returning one) selecting the leaves to decay; the
      learning rate scales every leaf.
  """

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_masked)
    out = [u if _is_masked(u) else jnp.asarray(-lr, dtype=u.dtype) * u for u in leaves]
    if not _is_static_zero(weight_decay):
      if params is None:
        raise ValueError("weight decay needs params; pass them to update()")
      param_leaves = treedef.flatten_up_to(params)
      if mask is None:
        flags = [True] * len(leaves)
      else:
        flags = treedef.flatten_up_to(mask(params) if callable(mask) else mask)
      out = [
        u if _is_masked(u) or _is_masked(f) or not f else _decay_updated(u, p, lr, weight_decay)
        for u, p, f in zip(out, param_leaves, flags, strict=True)
      ]
    count = optax.safe_int32_increment(state.count)
    return treedef.unflatten(out), optax.ScaleByScheduleState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)


def galore_adamw(
  learning_rate: optax.ScalarOrSchedule,
  *,
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  proj_type: str = "std",
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  weight_decay: float = 0.0,
  mask: Any = None,
  inner: optax.GradientTransformation | None = None,
  matrix_axes: MatrixAxesFn | None = None,
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
  """The reference ``GaLoreAdamW`` (galore-torch 1.0) as one optax transformation.

  Projected leaves (``mask``, default every leaf with ``ndim >= 2``) get
  Adam in the rank-``rank`` subspace, their update scaled by ``scale``; every
  other leaf gets plain Adam with the same learning rate and no scale, as the
  reference's second parameter group does. Adam adds ``eps`` before bias
  correction (:func:`scale_by_adam_hf`) and weight decay multiplies the
  updated weight (:func:`scale_and_decay_updated_weights`), both as the reference does,
  so its numbers are reproduced exactly (see ``tests/test_reference_parity.py``).
  Defaults are the reference's and the paper's (eps 1e-6, alpha 0.25, T 200).

  ``inner`` replaces the float32 Adam (e.g. :func:`galore_jax.scale_by_adam8bit`; ``b1``,
  ``b2``, ``eps`` then do nothing); the arguments after it are :func:`galore`'s. They are
  spelled out (no ``**kwargs``) so that ``optax.inject_hyperparams(galore_adamw,
  static_args=galore_jax.STATIC_ARGS)(learning_rate=...)`` can bind them; the learning rate
  it injects reaches both the step and the weight decay.
  """
  inner = inner if inner is not None else scale_by_adam_hf(b1=b1, b2=b2, eps=eps)
  return optax.chain(
    galore(
      inner,
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
    ),
    scale_and_decay_updated_weights(learning_rate, weight_decay),
  )


scale_by_galore = galore
"""Alias of :func:`galore` under optax's naming: the transform applies no learning rate."""


def state_bytes(state) -> int:
  """Bytes held by the arrays of an optimizer state (works on ``jax.eval_shape`` output)."""
  return tree_lib.tree_bytes(state)


def _state_types(state_types) -> tuple[type, ...]:
  return (GaLoreState,) if state_types is None else tuple(state_types)


def galore_states(opt_state, *, state_types=None) -> list[GaLoreState]:
  """Every :class:`GaLoreState` inside ``opt_state``, in flatten order.

  Searches the whole pytree, so the state may sit inside any optax wrapper: ``chain``'s
  tuple (:func:`galore_adamw`), ``masked`` / ``multi_transform`` (one per parameter group),
  ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``. ``state_types`` replaces the
  types looked for (e.g. ``(GaLoreState, optax.contrib.GaLoreState)``: any NamedTuple with a
  ``count`` field).
  """
  types = _state_types(state_types)
  is_state = lambda x: isinstance(x, types)
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]


def galore_count(opt_state) -> jax.Array:
  """The refresh clock of ``opt_state``: the ``count`` of its first :func:`galore_states`
  entry (one transform's state, or several that advance together, as the trainer's).

  Raises ``ValueError`` if ``opt_state`` holds no GaLore state."""
  states = galore_states(opt_state)
  if not states:
    raise ValueError("the optimizer state holds no GaLoreState")
  return states[0].count


def with_galore_count(opt_state, count, *, state_types=None):
  """``opt_state`` with the ``count`` of every :func:`galore_states` entry set to ``count``.

  ``count`` is the refresh clock (a leaf refreshes when it reaches the leaf's phase modulo
  ``update_proj_gap``), so benchmarks set it to time a refresh step or a plain one without
  running ``T`` steps. The new count keeps the old one's dtype and, for a concrete array, its
  sharding, so a compiled step takes the state as before. The inner optimizer's own counters
  (Adam's bias correction) and the wrappers' (``inject_hyperparams``) are left alone.
  """
  types = _state_types(state_types)
  is_state = lambda x: isinstance(x, types)

  def set_count(x):
    if not is_state(x):
      return x
    new = jnp.asarray(count, jnp.result_type(x.count))
    if isinstance(x.count, jax.Array) and not isinstance(x.count, jax.core.Tracer):
      new = jax.device_put(new, x.count.sharding)
    return x._replace(count=new)

  return jax.tree.map(set_count, opt_state, is_leaf=is_state)


@dataclasses.dataclass(frozen=True)
class LeafProjection:
  """How GaLore projects one leaf with the basis it holds now (:func:`leaf_projections`).

  ``project`` and ``project_back`` are the transform's own maps (:mod:`galore_jax.projector`
  on the leaf's matrix view), without ``scale``; ``project(project_back(r)) == r`` since the
  basis is orthonormal.
  """

  layout: _LeafLayout
  basis: Any

  @property
  def low_rank_shape(self) -> tuple[int, ...]:
    return self.layout.low_rank_shape()

  def project(self, g: jax.Array) -> jax.Array:
    """The leaf-shaped ``g`` in the low-rank coordinates GaLore hands its inner optimizer."""
    return proj.project(self.layout.to_matrices(g), self.basis, self.layout.side)

  def project_back(self, r: jax.Array) -> jax.Array:
    """Low-rank coordinates back to the leaf's shape."""
    return self.layout.from_matrices(proj.project_back(r, self.basis, self.layout.side))


def leaf_projections(
  opt_state, params, *, proj_type: str = "std", matrix_axes: MatrixAxesFn | None = None
) -> list[LeafProjection | None]:
  """Per leaf of ``params`` (flatten order), its current GaLore projection, or ``None``.

  Which leaves are projected, at which rank and with which basis is read from the
  :class:`GaLoreState` s in ``opt_state`` (:func:`galore_states`: any optax wrapper, several
  parameter groups); ``proj_type`` and ``matrix_axes`` are not in the state, so pass the
  transform's (the trainer's: ``"std"``, :func:`galore_jax.targets.reference_side_axes`). A
  basis whose shape does not fit the matrix view they give raises ``ValueError``. Works on
  abstract states (``jax.eval_shape``) too.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_masked)
  bases: list[Any] = [None] * len(leaves)
  for state in galore_states(opt_state):
    for i, basis in enumerate(treedef.flatten_up_to(state.projectors)):
      if basis is not None and not _is_masked(basis):
        bases[i] = basis
  layouts = leaf_layouts(
    params,
    treedef.unflatten([b is not None for b in bases]),
    rank=1,
    proj_type=proj_type,
    matrix_axes=matrix_axes,
    update_proj_gap=1,
    refresh_schedule="synchronous",
    warn_clipped=False,
  )
  out: list[LeafProjection | None] = []
  for layout, basis in zip(layouts, bases, strict=True):
    if layout is None:
      out.append(None)
      continue
    layout = dataclasses.replace(layout, rank=_stored_rank(layout.side, basis))
    want = [
      layout.batch_shape + s
      for s in proj.basis_shapes(layout.side, layout.m, layout.n, layout.rank)
    ]
    have = [tuple(b.shape) for b in jax.tree.leaves(basis)]
    if have != want:
      raise ValueError(
        f"the projector of {layout.path} has shape {have}, not {want}: proj_type / "
        "matrix_axes differ from the transform's"
      )
    out.append(LeafProjection(layout, basis))
  return out
