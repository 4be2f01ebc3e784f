"""``run_updates(tx, params, grads)``: an optax transformation applied to a list of gradient
trees in turn, one jitted step each, as the optimizer tests (and the parity tests against
the reference, which skip themselves without torch) run it."""

import jax
import jax.numpy as jnp
import optax


def run_updates(tx, params, grads):
  """Returns the parameters and optimizer state after ``tx`` has applied each tree of
  ``grads`` in turn, starting from ``params`` (numpy or jax arrays, dtypes kept)."""
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  for g in grads:
    params, state = step(params, state, jax.tree.map(jnp.asarray, g))
  return params, state
