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
