"""Low-rank reparametrisations of the LLaMA projections: the baselines of GaLore's Table 2.

Every attention / MLP kernel that GaLore would project (``galore_jax.targets.is_target``;
Flax layout ``W`` of shape ``(in, out) = (m, n)``) is trained through rank-``r``
factors ``A`` (m x r) and ``B`` (r x n):

* ``mode="lowrank"`` -- low-rank factorised training from scratch, ``W = A B``.
  No full-rank ``W`` exists; both factors are random at init, scaled so that
  the entries of ``A B`` have the dense init's standard deviation.
* ``mode="lora"`` -- LoRA pretraining, ``W = W0 + s A B`` with ``W0`` frozen at
  its random init and ``s = alpha / r``. ``B = 0`` at init, so the model starts
  as the dense one.
* ReLoRA is ``lora`` plus, every few steps, :func:`merge` (``W0 <- W0 + s A B``,
  then ``A`` redrawn and ``B = 0``: the function is unchanged) and
  :func:`reset_factor_moments` (the optimizer moments of ``A`` and ``B`` are
  zeroed, because they describe factors that no longer exist).

Embeddings, norms and the LM head stay dense and trainable in every mode, as
GaLore leaves them to plain Adam.

Parameters are two pytrees. ``trainable`` is the dense parameter dict with each
target kernel replaced by a :class:`Factors` node; ``frozen`` is a flat dict
``"layers/0/attn/q_proj/kernel" -> W0`` (empty for ``lowrank``).
:func:`materialize` rebuilds the dense dict that the unchanged
``model.Llama`` consumes, so the baselines share the model code with AdamW
and GaLore; gradients reach ``A`` and ``B`` through that product.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from galore_jax import targets
from galore_jax import tree as tree_lib

MODES = ("lowrank", "lora")


class Factors(NamedTuple):
  """Rank-r factors of one (m, n) kernel: ``a`` is (m, r), ``b`` is (r, n)."""

  a: jax.Array
  b: jax.Array


@dataclasses.dataclass(frozen=True)
class Spec:
  """How the target kernels are factored.

  ``scale`` multiplies ``A B``: ``alpha / rank`` for LoRA (the LoRA paper's
  convention; GaLore's Table 2 uses alpha 32), 1 for ``lowrank``.
  """

  mode: str
  rank: int
  alpha: float = 32.0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"unknown low-rank mode {self.mode!r}; choose from {MODES}")
    if self.rank < 1:
      raise ValueError(f"rank must be >= 1, got {self.rank}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.mode == "lora" else 1.0


def path_key(path) -> str:
  """``(DictKey('layers'), DictKey(0), ...)`` -> ``"layers/0/..."``."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


# The target test is GaLore's own (galore_jax.targets), so the baselines factor exactly the
# matrices GaLore projects.
is_target = targets.is_target


def _is_factors(x) -> bool:
  return isinstance(x, Factors)


def _lora_a(key, m: int, r: int, dtype) -> jax.Array:
  """LoRA's down factor, N(0, 1/m): ``x A`` keeps the scale of ``x``."""
  return (jax.random.normal(key, (m, r), jnp.float32) / math.sqrt(m)).astype(dtype)


def init(dense_params, spec: Spec, key: jax.Array, *, init_std: float = 0.02):
  """(trainable, frozen) from a dense parameter dict (the model's own init).

  ``lowrank``: ``A, B ~ N(0, sigma^2)`` with ``sigma^2 = init_std / sqrt(r)``,
  so each entry of ``A B`` (a sum of r products) has variance ``init_std^2``,
  the dense kernel's. ``lora``: ``W0`` is the dense kernel, ``A ~ N(0, 1/m)``,
  ``B = 0``. Each kernel draws from its own key (``fold_in`` of its index).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(dense_params)
  leaves, frozen = [], {}
  for i, (path, w) in enumerate(flat):
    if not is_target(path):
      leaves.append(w)
      continue
    m, n = w.shape
    if spec.rank > min(m, n):
      raise ValueError(f"rank {spec.rank} exceeds the smaller side of {path_key(path)} {w.shape}")
    ka, kb = jax.random.split(jax.random.fold_in(key, i))
    if spec.mode == "lowrank":
      sigma = math.sqrt(init_std / math.sqrt(spec.rank))
      a = (sigma * jax.random.normal(ka, (m, spec.rank), jnp.float32)).astype(w.dtype)
      b = (sigma * jax.random.normal(kb, (spec.rank, n), jnp.float32)).astype(w.dtype)
    else:
      a = _lora_a(ka, m, spec.rank, w.dtype)
      b = jnp.zeros((spec.rank, n), w.dtype)
      frozen[path_key(path)] = w
    leaves.append(Factors(a, b))
  return jax.tree_util.tree_unflatten(treedef, leaves), frozen


def _product(f: Factors) -> jax.Array:
  """``A B`` accumulated in float32 whatever the parameter dtype."""
  return jnp.matmul(f.a, f.b, preferred_element_type=jnp.float32)


def materialize(trainable, frozen: dict[str, jax.Array], spec: Spec):
  """The dense parameter dict: ``W = W0 + s A B`` (LoRA) or ``W = A B`` (lowrank)."""

  def dense(path, leaf):
    if not _is_factors(leaf):
      return leaf
    delta = spec.scale * _product(leaf)
    w0 = frozen.get(path_key(path))
    if w0 is None:
      return delta.astype(leaf.a.dtype)
    return (w0.astype(jnp.float32) + delta).astype(w0.dtype)

  return jax.tree_util.tree_map_with_path(dense, trainable, is_leaf=_is_factors)


def merge(trainable, frozen: dict[str, jax.Array], spec: Spec, key: jax.Array):
  """ReLoRA's merge: ``W0 <- W0 + s A B``, ``A`` redrawn, ``B = 0``; the function is unchanged.

  Returns new (trainable, frozen). ``B = 0`` makes the new ``s A B`` vanish, so
  :func:`materialize` gives the same dense weights before and after (up to
  the rounding of one addition in the parameter dtype).
  """
  if spec.mode != "lora":
    raise ValueError("merge needs a frozen base weight (mode 'lora')")
  flat, treedef = jax.tree_util.tree_flatten_with_path(trainable, is_leaf=_is_factors)
  leaves, new_frozen = [], dict(frozen)
  for i, (path, leaf) in enumerate(flat):
    if not _is_factors(leaf):
      leaves.append(leaf)
      continue
    name = path_key(path)
    w0 = frozen[name]
    new_frozen[name] = (w0.astype(jnp.float32) + spec.scale * _product(leaf)).astype(w0.dtype)
    m, r = leaf.a.shape
    a = _lora_a(jax.random.fold_in(key, i), m, r, leaf.a.dtype)
    leaves.append(Factors(a, jnp.zeros_like(leaf.b)))
  return jax.tree_util.tree_unflatten(treedef, leaves), new_frozen


def reset_factor_moments(opt_state):
  """Zeroes every :class:`Factors` node inside an optimizer state; the rest is kept.

  Adam's moments mirror the parameter tree, so the factors' first and second
  moments are exactly the ``Factors`` nodes of the state; step counters (and
  the dense parameters' moments) are untouched.
  """
  return jax.tree.map(
    lambda x: jax.tree.map(jnp.zeros_like, x) if _is_factors(x) else x,
    opt_state,
    is_leaf=_is_factors,
  )


def count(tree) -> int:
  """Number of array elements in a pytree (works on ``jax.eval_shape`` output)."""
  return tree_lib.tree_size(tree)


def factor_count(trainable) -> int:
  """Elements held in :class:`Factors` nodes (``r (m + n)`` per target kernel)."""
  nodes = jax.tree.leaves(trainable, is_leaf=_is_factors)
  return sum(count(f) for f in nodes if _is_factors(f))


def describe(spec: Spec | None) -> dict[str, Any]:
  """JSON-ready description of a spec (``None``: dense)."""
  if spec is None:
    return {"mode": "dense"}
  return {"mode": spec.mode, "rank": spec.rank, "alpha": spec.alpha, "scale": spec.scale}
