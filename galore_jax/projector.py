"""Projector math for GaLore: subspace bases, projection and back-projection.

Everything here works on a batch of matrices ``x_...xMxN`` (any number of
leading batch axes), so weights stacked for a scan over layers get one
projector per slice. The optimizer wrapper in ``optimizer.py`` decides *when* to
call these functions; this module only says *how*.

Sides (Zhao et al. 2024, Sec. 4; reference ``GaLoreProjector``):

* ``"right"``: ``P`` is ``r x N`` (top right singular vectors, rows of ``Vh``);
  ``R = G P^T`` (``M x r``), back: ``R P``.
* ``"left"``: ``P`` is ``M x r`` (top left singular vectors, columns of ``U``);
  ``R = P^T G`` (``r x N``), back: ``P R``.
* ``"full"``: both, ``R = U^T G Vh^T`` (``r x r``), back: ``U R Vh``.

``proj_type`` maps to a side per matrix shape (:func:`resolve_side`); ``"std"``
projects the smaller dimension so the stored orthonormal matrix is the small
one and the low-rank moments are ``r x max(M, N)``.

Sign convention: singular vectors are only defined up to sign, and LAPACK
builds disagree (torch and JAX already differ on tall matrices). Because Adam's
moments persist across projector refreshes, a flipped sign changes the whole
trajectory, so every new basis is canonicalised: each singular vector is
flipped so that its largest-magnitude entry is positive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("exact", "randomized")

Basis = jax.Array | tuple[jax.Array, jax.Array]


def resolve_side(proj_type: str, m: int, n: int) -> str:
  """The side a ``proj_type`` projects for an ``m x n`` matrix, as the reference does."""
  if proj_type == "std":
    return "right" if m >= n else "left"
  if proj_type == "reverse_std":
    return "left" if m >= n else "right"
  if proj_type in ("left", "right", "full"):
    return proj_type
  raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def basis_shapes(side: str, m: int, n: int, rank: int) -> tuple[tuple[int, int], ...]:
  """Matrix shapes of the stored basis (one entry, two for ``"full"``)."""
  return {"left": ((m, rank),), "right": ((rank, n),), "full": ((m, rank), (rank, n))}[side]


def low_rank_shape(side: str, m: int, n: int, rank: int) -> tuple[int, int]:
  """Matrix shape of a projected gradient (and of the inner optimizer's moments)."""
  return {"left": (rank, n), "right": (m, rank), "full": (rank, rank)}[side]


def canonicalize_signs(vectors: jax.Array, axis: int) -> jax.Array:
  """Flips each vector so that its largest-magnitude entry is positive.

  Args:
    vectors: a batch of bases; the vectors run along ``axis`` (``-2`` for the
      columns of ``U``, ``-1`` for the rows of ``Vh``).
    axis: the axis along which each singular vector's entries lie.
  """
  idx = jnp.argmax(jnp.abs(vectors), axis=axis, keepdims=True)
  peak = jnp.take_along_axis(vectors, idx, axis=axis)
  return vectors * jnp.where(peak < 0, -1.0, 1.0).astype(vectors.dtype)


def _select(u: jax.Array, vh: jax.Array, side: str, rank: int) -> Basis:
  u = canonicalize_signs(u[..., :, :rank], axis=-2)
  vh = canonicalize_signs(vh[..., :rank, :], axis=-1)
  return {"left": u, "right": vh, "full": (u, vh)}[side]


def exact_basis(g: jax.Array, side: str, rank: int) -> Basis:
  """Top-``rank`` singular vectors of ``g`` (batch of ``M x N``) by a full SVD in float32."""
  u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
  return _select(u, vh, side, rank)


def randomized_basis(
  g: jax.Array,
  side: str,
  rank: int,
  key: jax.Array,
  *,
  oversample: int = 8,
  power_iters: int = 2,
) -> Basis:
  """Top-``rank`` singular vectors of ``g`` by a randomized range finder.

  Halko, Martinsson & Tropp (2011), Alg. 4.4 + 5.1: sketch the column space
  with a Gaussian test matrix of ``k = rank + oversample`` columns, sharpen it
  with ``power_iters`` subspace iterations (re-orthonormalised by QR each time,
  which keeps them stable in float32), then take an exact SVD of the small
  ``k x N`` matrix ``Q^T G``. Cost ``O(MNk(2q + 2))`` instead of the exact
  SVD's ``O(MN min(M, N))``. The matrix is oriented tall first, so the one
  exact SVD left is of a ``k x min(M, N)`` matrix.
  """
  a = g.astype(jnp.float32)
  transposed = a.shape[-2] < a.shape[-1]
  if transposed:  # sketch the longer side's range: (N x M) with N > M
    a = jnp.swapaxes(a, -1, -2)
  n = a.shape[-1]
  k = min(rank + oversample, n)
  omega = jax.random.normal(key, a.shape[:-2] + (n, k), jnp.float32)
  q, _ = jnp.linalg.qr(a @ omega)
  at = jnp.swapaxes(a, -1, -2)
  for _ in range(power_iters):
    q, _ = jnp.linalg.qr(at @ q)
    q, _ = jnp.linalg.qr(a @ q)
  ub, _, vh = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ a, full_matrices=False)
  u = q @ ub
  if transposed:  # a = g^T, so g = vh^T s u^T
    u, vh = jnp.swapaxes(vh, -1, -2), jnp.swapaxes(u, -1, -2)
  return _select(u, vh, side, rank)


def safe_basis(batch_shape: tuple[int, ...], side: str, m: int, n: int, rank: int, dtype) -> Basis:
  """A valid orthonormal basis that needs no gradient: the first ``rank`` axes.

  Used as the initial projector (so a first refresh that fails, e.g. on a
  non-finite gradient, still leaves a well-defined projector) and never as a
  substitute for a successful SVD.
  """
  mats = [jnp.eye(a, b, dtype=dtype) for a, b in basis_shapes(side, m, n, rank)]
  mats = [jnp.broadcast_to(x, batch_shape + x.shape) for x in mats]
  return mats[0] if side != "full" else (mats[0], mats[1])


def _t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _compute_dtype(x: jax.Array, basis: Basis):
  leaves = basis if isinstance(basis, tuple) else (basis,)
  return jnp.result_type(x.dtype, *(b.dtype for b in leaves))


def project(g: jax.Array, basis: Basis, side: str) -> jax.Array:
  """Low-rank coordinates of ``g`` in ``basis``; result in ``g``'s dtype."""
  dt = _compute_dtype(g, basis)
  x = g.astype(dt)
  if side == "right":
    out = x @ _t(basis.astype(dt))
  elif side == "left":
    out = _t(basis.astype(dt)) @ x
  else:
    u, vh = basis
    out = _t(u.astype(dt)) @ x @ _t(vh.astype(dt))
  return out.astype(g.dtype)


def project_back(r: jax.Array, basis: Basis, side: str) -> jax.Array:
  """Maps low-rank coordinates back to the full matrix (no scale applied)."""
  dt = _compute_dtype(r, basis)
  x = r.astype(dt)
  if side == "right":
    return x @ basis.astype(dt)
  if side == "left":
    return basis.astype(dt) @ x
  u, vh = basis
  return u.astype(dt) @ x @ vh.astype(dt)


def change_of_basis(r: jax.Array, old: Basis, new: Basis, side: str) -> jax.Array:
  """Re-expresses low-rank coordinates from ``old`` into ``new``: ``project(project_back(r))``.

  Done with the small ``r x r`` overlap matrix instead of materialising the
  full matrix: right side ``r (P_old P_new^T)``, left side ``(P_new^T P_old) r``.
  The part of ``r`` orthogonal to the new subspace is dropped.
  """
  dt = jnp.result_type(r.dtype, jnp.float32)
  x = r.astype(dt)
  if side == "right":
    out = x @ (old.astype(dt) @ _t(new.astype(dt)))
  elif side == "left":
    out = (_t(new.astype(dt)) @ old.astype(dt)) @ x
  else:
    (u_old, vh_old), (u_new, vh_new) = old, new
    out = (
      (_t(u_new.astype(dt)) @ u_old.astype(dt)) @ x @ (vh_old.astype(dt) @ _t(vh_new.astype(dt)))
    )
  return out.astype(r.dtype)
