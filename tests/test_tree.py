"""galore_jax.tree: sizes of pytrees, concrete and abstract."""

import jax
import jax.numpy as jnp
import numpy as np

from galore_jax import tree


def test_sizes_of_mixed_tree():
  t = {
    "a": jnp.zeros((3, 4), jnp.float32),
    "b": (jnp.zeros(5, jnp.bfloat16), None, 2.0),
    "c": np.zeros((2,), np.int8),
  }
  assert tree.tree_size(t) == 12 + 5 + 2
  assert tree.tree_bytes(t) == 48 + 10 + 2
  # eval_shape turns every leaf, the Python float too, into a ShapeDtypeStruct.
  abstract = jax.eval_shape(lambda: t)
  assert tree.tree_bytes(abstract) == 60 + 4 and tree.tree_size(abstract) == 19 + 1
