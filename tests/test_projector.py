"""Projector math: bases, signs, projection round trips, randomized accuracy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galore_jax import projector as proj


def _low_rank_plus_noise(key, shape, rank, noise=1e-3):
  k1, k2, k3 = jax.random.split(key, 3)
  *batch, m, n = shape
  a = jax.random.normal(k1, (*batch, m, rank))
  b = jax.random.normal(k2, (*batch, rank, n))
  s = 2.0 ** -jnp.arange(rank, dtype=jnp.float32)
  return (a * s) @ b + noise * jax.random.normal(k3, shape)


@pytest.mark.parametrize(
  "proj_type,m,n,side",
  [
    ("std", 8, 4, "right"),
    ("std", 4, 8, "left"),
    ("std", 6, 6, "right"),
    ("reverse_std", 8, 4, "left"),
    ("reverse_std", 4, 8, "right"),
    ("reverse_std", 6, 6, "left"),
    ("left", 8, 4, "left"),
    ("right", 4, 8, "right"),
    ("full", 4, 8, "full"),
  ],
)
def test_resolve_side_follows_reference(proj_type, m, n, side):
  assert proj.resolve_side(proj_type, m, n) == side


def test_resolve_side_rejects_unknown():
  with pytest.raises(ValueError, match="proj_type"):
    proj.resolve_side("diagonal", 4, 4)


def test_canonical_signs_make_largest_entry_positive():
  x = jax.random.normal(jax.random.key(0), (3, 10, 4))
  c = proj.canonicalize_signs(x, axis=-2)
  idx = jnp.argmax(jnp.abs(c), axis=-2)
  peaks = jnp.take_along_axis(c, idx[:, None, :], axis=-2)
  assert bool(jnp.all(peaks > 0))
  chex.assert_trees_all_close(jnp.abs(c), jnp.abs(x))
  # Idempotent and sign-invariant: -x gives the same canonical vectors.
  chex.assert_trees_all_close(proj.canonicalize_signs(-x, axis=-2), c)


@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (3, 16, 10)])
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_exact_basis_is_orthonormal_and_spans_top_subspace(shape, side):
  g = _low_rank_plus_noise(jax.random.key(1), shape, rank=4)
  basis = proj.exact_basis(g, side, 4)
  for b, vec_axis in (
    [(basis, -2 if side == "left" else -1)] if side != "full" else [(basis[0], -2), (basis[1], -1)]
  ):
    gram = (jnp.swapaxes(b, -1, -2) @ b) if vec_axis == -2 else (b @ jnp.swapaxes(b, -1, -2))
    chex.assert_trees_all_close(gram, jnp.broadcast_to(jnp.eye(4), gram.shape), atol=1e-5)
  # g is (nearly) rank 4, so projecting and back loses only the noise.
  back = proj.project_back(proj.project(g, basis, side), basis, side)
  assert float(jnp.max(jnp.abs(back - g))) < 2e-2


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_project_shapes_and_dtype(side):
  g = jnp.ones((2, 12, 7), jnp.bfloat16)
  basis = proj.safe_basis((2,), side, 12, 7, 3, jnp.bfloat16)
  r = proj.project(g, basis, side)
  assert r.shape == (2,) + proj.low_rank_shape(side, 12, 7, 3)
  assert r.dtype == jnp.bfloat16
  assert proj.project_back(r, basis, side).shape == g.shape


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_change_of_basis_equals_round_trip(side):
  key_a, key_b, key_r = jax.random.split(jax.random.key(2), 3)
  old = proj.exact_basis(jax.random.normal(key_a, (10, 8)), side, 3)
  new = proj.exact_basis(jax.random.normal(key_b, (10, 8)), side, 3)
  r = jax.random.normal(key_r, proj.low_rank_shape(side, 10, 8, 3))
  expected = proj.project(proj.project_back(r, old, side), new, side)
  chex.assert_trees_all_close(proj.change_of_basis(r, old, new, side), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_randomized_basis_matches_exact_subspace(shape):
  g = _low_rank_plus_noise(jax.random.key(3), shape, rank=16, noise=1e-4)
  exact = proj.exact_basis(g, "left", 8)
  approx = proj.randomized_basis(g, "left", 8, jax.random.key(4))
  # Cosines of the principal angles between the two subspaces.
  cosines = jnp.linalg.svd(exact.T @ approx, compute_uv=False)
  assert float(jnp.min(cosines)) > 0.999
  # With a clear spectral gap the vectors themselves agree, signs included.
  np.testing.assert_allclose(np.asarray(approx), np.asarray(exact), atol=1e-2)


def test_safe_basis_is_orthonormal_identity_slice():
  b = proj.safe_basis((2,), "right", 6, 5, 3, jnp.float32)
  chex.assert_shape(b, (2, 3, 5))
  chex.assert_trees_all_close(b[0] @ b[0].T, jnp.eye(3))


def _conditioned(key, batch, n, r, cond):
  """A batch of n x r matrices with singular values log-spaced from 1 to 1 / cond."""
  k1, k2 = jax.random.split(key)
  u, _ = jnp.linalg.qr(jax.random.normal(k1, (batch, n, r)))
  v, _ = jnp.linalg.qr(jax.random.normal(k2, (batch, r, r)))
  s = jnp.logspace(0.0, -np.log10(cond), r)
  return (u * s) @ jnp.swapaxes(v, -1, -2)


def _orthogonality(q):
  q = np.asarray(q, np.float64)
  return np.abs(np.swapaxes(q, -1, -2) @ q - np.eye(q.shape[-1])).max()


@pytest.mark.parametrize("cond,cholesky_qr2_ok", [(1e2, True), (1e5, False), (1e9, False)])
def test_orthonormalize_is_orthonormal_on_ill_conditioned_inputs(cond, cholesky_qr2_ok):
  x = _conditioned(jax.random.key(0), 2, 300, 32, cond).astype(jnp.float32)
  # Which path runs: CholeskyQR2 alone, or the Householder QR fallback.
  assert bool(jnp.all(proj._cholesky_qr2(x)[1])) == cholesky_qr2_ok
  q = proj.orthonormalize(x)
  assert _orthogonality(q) < 1e-5
  # Same columns space, same Gram-Schmidt order and signs as a QR with a positive diagonal.
  xn = np.asarray(x, np.float64)
  resid = xn - np.asarray(q, np.float64) @ (np.swapaxes(np.asarray(q, np.float64), -1, -2) @ xn)
  assert np.linalg.norm(resid) < 1e-5 * np.linalg.norm(xn)
  ref, r = np.linalg.qr(xn)
  ref = ref * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
  # Directions whose singular values sit below float32 precision are not determined.
  well = (np.logspace(0.0, -np.log10(cond), 32) > 1e-3).sum()
  np.testing.assert_allclose(
    np.asarray(q)[..., : min(well, 4)], ref[..., : min(well, 4)], atol=1e-3
  )


def test_orthonormalize_handles_zero_and_nonfinite_matrices():
  good = jax.random.normal(jax.random.key(1), (40, 6))
  x = jnp.stack([jnp.zeros((40, 6)), good, good.at[3, 2].set(jnp.nan)])
  q = proj.orthonormalize(x)
  assert bool(jnp.all(jnp.isfinite(q)))
  for i in range(3):
    assert _orthogonality(q[i]) < 1e-5
  # The healthy member is unaffected by its neighbours' fallback.
  chex.assert_trees_all_close(q[1], proj.orthonormalize(good), atol=1e-6)


def _numpy_orth(x):
  q, r = np.linalg.qr(np.asarray(x, np.float64))
  return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


@pytest.mark.parametrize(
  "side,shape", [("right", (40, 24)), ("left", (24, 40)), ("left", (2, 30, 50))]
)
def test_subspace_basis_is_one_power_step_from_the_previous_basis(side, shape):
  g = _low_rank_plus_noise(jax.random.key(2), shape, rank=6, noise=0.3)
  r = 4
  m, n = shape[-2:]
  d = n if side == "right" else m
  start = jnp.asarray(_numpy_orth(jax.random.normal(jax.random.key(3), shape[:-2] + (d, r))))
  previous = jnp.swapaxes(start, -1, -2) if side == "right" else start
  got = proj.subspace_basis(g, side, previous, iters=1)
  a = np.asarray(g, np.float64)
  a = a if side == "right" else np.swapaxes(a, -1, -2)
  delta = np.finfo(np.float32).eps * np.sum(a**2, axis=(-2, -1))[..., None, None]
  x = np.swapaxes(a, -1, -2) @ (a @ np.asarray(start)) + delta * np.asarray(start)
  want = _numpy_orth(x)
  want = np.swapaxes(want, -1, -2) if side == "right" else want
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
  # A different start gives a different basis: the warm start is what is used.
  other = proj.subspace_basis(g, side, jnp.flip(previous, axis=-1 if side == "right" else -2))
  assert np.abs(np.asarray(other) - np.asarray(got)).max() > 1e-2


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_subspace_iteration_converges_to_the_exact_subspace(side):
  g = _low_rank_plus_noise(jax.random.key(4), (3, 48, 32), rank=8)
  exact = proj.exact_basis(g, side, 4)
  basis = proj.safe_basis((3,), side, 48, 32, 4, jnp.float32)
  basis = proj.subspace_basis(g, side, basis, iters=12)
  for b, e in zip(jax.tree.leaves(basis), jax.tree.leaves(exact), strict=True):
    a, c = (
      (b, e) if b.shape[-2] > b.shape[-1] else (jnp.swapaxes(b, -1, -2), jnp.swapaxes(e, -1, -2))
    )
    assert _orthogonality(a) < 1e-5
    cosines = jnp.linalg.svd(jnp.swapaxes(c, -1, -2) @ a, compute_uv=False)
    assert float(jnp.min(cosines)) > 0.999


def test_randomized_basis_takes_a_given_test_matrix():
  g = _low_rank_plus_noise(jax.random.key(5), (2, 30, 20), rank=5)
  shape = proj.test_matrix_shape((2,), "right", 30, 20, 4, 3)
  assert shape == (2, 20, 7)
  omega = jax.random.normal(jax.random.key(6), shape)
  a = proj.randomized_basis(g, "right", 4, test_matrix=omega, oversample=3)
  b = proj.randomized_basis(g, "right", 4, jax.random.key(6), oversample=3)
  chex.assert_trees_all_close(a, b, atol=1e-6)
  assert a.shape == (2, 4, 20)
