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

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("exact", "randomized", "subspace")

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


# --- Matmul-only orthonormalisation ------------------------------------------------------------
#
# On a GPU, jnp.linalg.svd and jnp.linalg.qr of a matrix with a side over 1024 run cuSOLVER
# one matrix at a time (gesvd / geqrf); Cholesky QR needs a Gram matrix (a matmul), the
# Cholesky factor of an r x r matrix and a triangular solve (a matmul-like trsm), all of which
# batch. Its orthogonality error grows like eps * cond(X)^2, so it is done twice (CholeskyQR2,
# Yamamoto et al. 2015); inputs too ill-conditioned for that fall back to Householder QR.


def _gram(x_BxNxR: jax.Array) -> jax.Array:
  return jnp.einsum("...nr,...ns->...rs", x_BxNxR, x_BxNxR, precision=jax.lax.Precision.HIGHEST)


def _cholesky_qr_pass(x_BxNxR: jax.Array, shift: jax.Array | float = 0.0):
  """One CholeskyQR pass: ``X = Q R`` with ``R = chol(X^T X + shift I)^T``; also the Gram."""
  gram = _gram(x_BxNxR)
  r = gram.shape[-1]
  factor = jnp.linalg.cholesky(gram + shift * jnp.eye(r, dtype=gram.dtype))
  # Q = X L^{-T}: solve Q L^T = X.
  q = jax.lax.linalg.triangular_solve(
    factor, x_BxNxR, left_side=False, lower=True, transpose_a=True
  )
  return q, gram


def _per_matrix(ok: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.where(ok[..., None, None], a, b)


def _orthogonality_error(gram: jax.Array) -> jax.Array:
  eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
  return jnp.max(jnp.abs(gram - eye), axis=(-2, -1))


def _finite(q: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(q), axis=(-2, -1))


def _cholesky_qr2(x_BxNxR: jax.Array):
  """Two CholeskyQR passes; ``ok`` per matrix: finite, and the first pass was near-orthogonal."""
  q1, _ = _cholesky_qr_pass(x_BxNxR)
  q2, gram2 = _cholesky_qr_pass(q1)
  return q2, _finite(q2) & (_orthogonality_error(gram2) < 0.5)


def _householder_qr(x_BxNxR: jax.Array) -> jax.Array:
  q, r = jnp.linalg.qr(x_BxNxR)
  d = jnp.diagonal(r, axis1=-2, axis2=-1)
  return q * jnp.where(d < 0, -1.0, 1.0)[..., None, :]


def orthonormalize(x_BxNxR: jax.Array) -> jax.Array:
  """Orthonormal columns spanning those of ``x`` (a batch of tall ``N x R``), in float32.

  Equal to the ``Q`` of a QR decomposition whose ``R`` has a positive diagonal (Gram-Schmidt
  order and signs: column ``j`` of ``Q`` has a positive inner product with column ``j`` of
  ``x``), computed with matmuls and ``R x R`` factorisations only:

  1. CholeskyQR2: two CholeskyQR passes on ``x`` with unit-norm columns (scaling columns does
     not change ``Q`` but keeps the Gram matrix in range). The second pass's Gram matrix is
     the first ``Q``'s orthogonality defect; if it is under 0.5 the result is orthonormal to
     a few float32 ulps.
  2. Otherwise (``cond(x)`` beyond about ``eps^-1/2``, or a non-finite or all-zero input):
     Householder QR with the same sign convention (non-finite matrices are replaced by zeros
     first, which LAPACK / cuSOLVER handle).

  The fallback is one ``lax.cond`` on the whole batch, so well-conditioned inputs (the
  normal case for a warm-started subspace iteration) pay for step 1 only. It is kept to one
  branch on purpose: this function sits inside every refresh group's loop, and each extra
  branch is compiled once per group (a shifted CholeskyQR3 tier between the two cost about
  a third of the subspace refresh's compile time on CPU and was dropped).
  """
  x = x_BxNxR.astype(jnp.float32)
  norms = jnp.linalg.norm(x, axis=-2, keepdims=True)
  x = x / jnp.where(norms > 0, norms, 1.0)

  def repair(args):
    q, ok = args
    return _per_matrix(ok, q, _householder_qr(_per_matrix(_finite(x), x, 0.0)))

  q, ok = _cholesky_qr2(x)
  return jax.lax.cond(jnp.all(ok), lambda args: args[0], repair, (q, ok))


# --- Randomized and warm-started subspace iteration --------------------------------------------


def _oriented(g: jax.Array, side: str) -> jax.Array:
  """``g`` in float32, transposed so that the wanted vectors are its right singular vectors.

  ``"right"`` and ``"full"`` want ``V`` (right); ``"left"`` wants ``U``, the right singular
  vectors of ``g^T``.
  """
  a = g.astype(jnp.float32)
  return _t(a) if side == "left" else a


def _normal_operator(a: jax.Array, v: jax.Array) -> jax.Array:
  """``A^T A V``, the block power step for right singular vectors."""
  return _t(a) @ (a @ v)


def _from_right_vectors(g: jax.Array, v: jax.Array, side: str) -> Basis:
  """The basis of ``side`` from right singular vectors ``v`` (``d x r``) of ``_oriented(g)``."""
  if side == "left":
    return v  # U of g, M x r
  if side == "right":
    return _t(v)  # Vh rows, r x N
  u = orthonormalize(g.astype(jnp.float32) @ v)  # A v_j = s_j u_j
  return (u, _t(v))


def _mix32(h: jax.Array) -> jax.Array:
  """A 32-bit integer finaliser (xor-shift-multiply rounds): every input bit reaches every
  output bit, so consecutive counters give unrelated outputs."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def hashed_uniform(
  seed, streams: Sequence[tuple[int, int]], salt, shape: tuple[int, int]
) -> jax.Array:
  """Pseudo-random ``(len(streams),) + shape`` float32 matrices, entries uniform in [-1, 1).

  Entry ``(b, i, j)`` is a counter-based hash of ``(seed, streams[b], salt, i, j)``, a stream
  being a pair of non-negative ints (GaLore's: leaf index, matrix within the leaf), so a
  matrix depends only on its own stream (a leaf's draw does not depend on what it is
  batched with), ``seed`` and ``salt`` may be traced, and the whole batch is one small
  elementwise program. That matters here: the draw sits in every refresh group of the
  compiled train step, and a ``jax.random.normal`` per leaf (threefry, expanded per call)
  cost about a third of the subspace refresh's compile time. A range finder's test matrix or
  a power iteration's start only has to be generic, not Gaussian: on ``llama_tiny`` the first
  subspace refresh from this start kept at least 0.9991 of the exact top-r energy per
  kernel, against 0.9992 from a Gaussian one (``experiments/refresh_energy.py``).
  """
  ids = np.asarray(streams, np.int64).reshape(-1, 2) % 2**32
  first = jnp.asarray(ids[:, 0].astype(np.uint32))[:, None, None]
  second = jnp.asarray(ids[:, 1].astype(np.uint32))[:, None, None]
  h = _mix32(jnp.asarray(seed).astype(jnp.uint32) ^ jnp.uint32(0x9E3779B9))
  h = _mix32(h + first * jnp.uint32(0x85EBCA6B))
  h = _mix32(h + second * jnp.uint32(0x61C88647))
  h = _mix32(h + jnp.asarray(salt).astype(jnp.uint32) * jnp.uint32(0xC2B2AE35))
  rows = jax.lax.broadcasted_iota(jnp.uint32, (1,) + shape, 1)
  cols = jax.lax.broadcasted_iota(jnp.uint32, (1,) + shape, 2)
  h = _mix32(h + rows * jnp.uint32(0x27D4EB2F))
  h = _mix32(h + cols * jnp.uint32(0x165667B1))
  # The top 24 bits, as a float32 in [0, 2), shifted to [-1, 1).
  return (h >> 8).astype(jnp.float32) * (2.0**-23) - 1.0


def test_matrix_shape(
  batch_shape: tuple[int, ...], side: str, m: int, n: int, rank: int, oversample: int
) -> tuple[int, ...]:
  """Shape of the test matrix :func:`randomized_basis` uses for a batch of ``m x n``."""
  d = m if side == "left" else n
  return batch_shape + (d, min(rank + oversample, d))


def randomized_basis(
  g: jax.Array,
  side: str,
  rank: int,
  key: jax.Array | None = None,
  *,
  oversample: int = 8,
  power_iters: int = 2,
  test_matrix: jax.Array | None = None,
) -> Basis:
  """Top-``rank`` singular vectors of ``g`` by a randomized range finder, without an SVD.

  Halko, Martinsson & Tropp (2011), Alg. 4.4 + 5.3, on the side that is projected: a
  Gaussian test matrix of ``k = rank + oversample`` columns, ``power_iters + 1`` block
  power steps ``Q <- orth(A^T A Q)``, each orthonormalised by :func:`orthonormalize`
  (matmuls and ``k x k`` Cholesky factors, no Householder QR of the large matrix), then a
  Rayleigh-Ritz step: the eigenvectors of the ``k x k`` matrix ``(A Q)^T (A Q)`` rotate
  ``Q`` onto approximate singular vectors, sorted, of which the top ``rank`` are kept. The
  only dense decomposition is that small symmetric eigenproblem. Cost ``O(M N k (2q + 3))``
  against the exact SVD's ``O(M N min(M, N))``. Signs are canonicalised as for the exact
  SVD (each draw starts afresh, so there is no earlier basis to stay close to).

  The test matrix is drawn from ``key``, or given as ``test_matrix`` (shape
  :func:`test_matrix_shape`), e.g. to draw each member of a batch from its own key.
  """
  a = _oriented(g, side)
  if test_matrix is None:
    shape = test_matrix_shape(g.shape[:-2], side, *g.shape[-2:], rank, oversample)
    test_matrix = jax.random.normal(key, shape, jnp.float32)
  # A loop, not unrolled: the orthonormalisation (with its fallbacks) is compiled once.
  q = jax.lax.fori_loop(
    0, power_iters + 1, lambda _, q: orthonormalize(_normal_operator(a, q)), test_matrix
  )
  return rayleigh_ritz(g, side, q, rank)


def rayleigh_ritz(g: jax.Array, side: str, vectors: jax.Array, rank: int | None = None) -> Basis:
  """Rotates orthonormal columns onto ``g``'s approximate singular vectors, largest first.

  ``vectors`` (``d x k``, the projected side's space, columns orthonormal) span a subspace;
  the eigenvectors ``W`` of the ``k x k`` matrix ``(A Q)^T (A Q)`` turn ``Q`` into the
  singular vectors of ``A`` restricted to it (Ritz vectors), sorted by Ritz value; the
  top ``rank`` (default all ``k``) are kept and their signs canonicalised like the exact
  SVD's. This matters for GaLore: Adam normalises each coordinate of the low-rank
  gradient on its own, so a basis rotated within the right subspace still trains
  differently from the singular vectors. The only decomposition is the small symmetric
  eigenproblem.
  """
  a = _oriented(g, side)
  b = a @ vectors
  _, w = jnp.linalg.eigh(
    jnp.einsum("...mk,...ml->...kl", b, b, precision=jax.lax.Precision.HIGHEST)
  )
  w = w[..., :, ::-1]  # eigh sorts ascending
  v = vectors @ (w if rank is None else w[..., :, :rank])
  basis = _from_right_vectors(g, canonicalize_signs(v, axis=-2), side)
  if side == "full":
    return (canonicalize_signs(basis[0], axis=-2), basis[1])
  return basis


def subspace_basis(
  g: jax.Array, side: str, previous: Basis, *, iters: int | jax.Array = 1
) -> Basis:
  """The top-``r`` subspace of ``g`` by block power iteration warm-started at ``previous``.

  Orthogonal (subspace) iteration, ``V <- orth(A^T A V + delta V)`` for ``iters`` rounds,
  started from the leaf's current basis; ``A`` is ``g`` oriented so that the projected side
  holds its right singular vectors. Gradients change slowly between refreshes, so the
  current basis is already close to the new top subspace and one round (two matmuls with
  ``g`` and one :func:`orthonormalize`) tracks it (LDAdam, Robert et al. 2024, arXiv
  2410.16103, use one such step per update; GaLore 2, Su et al. 2025, arXiv 2504.20437,
  and Q-GaLore, Zhang et al. 2024, arXiv 2407.08296, report that successive GaLore
  subspaces largely agree). Because Gram-Schmidt keeps column order, repeated refreshes are
  also steps of the classical orthogonal iteration, which orders the columns by singular
  value. ``previous`` need not be orthonormal (a Gaussian start works: the first round
  orthonormalises), and ``iters`` may be a traced integer (the rounds are a loop).

  ``delta = eps ||A||_F^2`` keeps the old direction where ``g`` has no energy (a
  rank-deficient gradient), so null-space columns stay put instead of becoming rounding
  noise; directions with energy are unaffected (``delta`` is below any ``s_j^2`` that
  carries more than ``eps`` of the gradient's energy).

  Signs are *not* re-canonicalised: ``orthonormalize`` returns each column with a positive
  inner product with the column it came from, i.e. with the same orientation as the
  previous basis vector, so Adam's moments, which persist across refreshes, keep meaning
  the same direction. (A largest-entry rule can flip a slowly rotating vector whenever two
  entries of opposite sign trade places.)

  ``full`` alternates the two sides: ``U <- orth(A V)``, ``V <- orth(A^T U)``.
  """
  a = g.astype(jnp.float32)
  delta = jnp.finfo(jnp.float32).eps * jnp.sum(jnp.square(a), axis=(-2, -1))[..., None, None]
  if side == "full":
    root = jnp.sqrt(delta)

    def both(_, uv):
      u, v = uv
      u = orthonormalize(a @ v + root * u)
      return u, orthonormalize(_t(a) @ u + root * v)

    u, vh = previous
    u, v = jax.lax.fori_loop(0, iters, both, (u.astype(jnp.float32), _t(vh).astype(jnp.float32)))
    return (u, _t(v))
  a = _oriented(g, side)
  v = (previous if side == "left" else _t(previous)).astype(jnp.float32)
  v = jax.lax.fori_loop(
    0, iters, lambda _, v: orthonormalize(_normal_operator(a, v) + delta * v), v
  )
  return v if side == "left" else _t(v)


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
