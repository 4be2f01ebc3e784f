"""Pytree sizes, defined once for the package (cf. ``optax.tree``).

Both work on concrete arrays and on ``jax.eval_shape`` output (``ShapeDtypeStruct``);
leaves without a shape and dtype (``None``, Python scalars in a state) count as zero.
"""

from __future__ import annotations

import math

import jax
import numpy as np


def _arrays(tree):
  return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")]


def tree_size(tree) -> int:
  """Number of array elements in ``tree``."""
  return sum(math.prod(x.shape) for x in _arrays(tree))


def tree_bytes(tree) -> int:
  """Bytes held by the arrays of ``tree``."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in _arrays(tree))
