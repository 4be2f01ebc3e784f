"""Which parameters GaLore projects, and on which side: the paper's choices as public helpers.

The paper (and galore-torch's LLaMA scripts) project the attention and MLP weight matrices
only; embeddings, the LM head, norms and biases get plain Adam. :func:`llama_targets` is that
mask, found by parameter path. :func:`reference_side_axes` is a ``matrix_axes`` function that
makes a Flax ``(in, out)`` kernel choose the projection side a torch ``(out, in)`` weight
would. Both are pure functions of the tree (no jax import needed to build the mask).
"""

from __future__ import annotations

from typing import Any

import jax

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Module names of the matrices GaLore projects: attention (q, k, v, o) and MLP (gate, up, down)."""

# Last path component of a weight matrix: Flax stores `kernel` as (in, out), torch and Hugging
# Face checkpoints store `weight` as (out, in).
_FLAX_KERNEL = "kernel"
_TORCH_WEIGHT = "weight"


def path_names(path) -> list[str]:
  """A key path as a list of names; dotted keys (``"model.layers.0.q_proj.weight"``) are split."""
  path = tuple(path)
  # `nnx.state(model)` trees hold `nnx.Variable`s, which flatten to one more key, `.value`.
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  names: list[str] = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        value = getattr(key, attr)
        break
    else:
      value = str(key)
    names.extend(str(value).split("."))
  return names


def is_target(path, targets=LLAMA_TARGETS) -> bool:
  """Whether the leaf at key ``path`` is a matrix GaLore projects (see :func:`llama_targets`)."""
  names = path_names(path)
  return (
    bool(names) and names[-1] in (_FLAX_KERNEL, _TORCH_WEIGHT) and any(t in names for t in targets)
  )


def llama_targets(params: Any, targets=LLAMA_TARGETS) -> Any:
  """The paper's GaLore mask: ``True`` for the attention and MLP weight matrices.

  A leaf is selected when its path ends in ``kernel`` (Flax) or ``weight`` (torch / Hugging
  Face) and one of its components is a name in ``targets`` (default :data:`LLAMA_TARGETS`).
  Works on this package's LLaMA (``['layers'][0]['attn']['q_proj']['kernel']``), on nested
  Hugging Face-style trees and on flat dicts with dotted names
  (``"model.layers.0.self_attn.q_proj.weight"``); biases (``q_proj.bias``), norms, the
  embedding and the LM head are not selected. Pass it as ``mask=`` to :func:`galore_jax.galore`
  (it is evaluated on the tree the transform sees), or call it to get the bool tree.
  """

  def select(path, _):
    return is_target(path, targets)

  return jax.tree_util.tree_map_with_path(select, params)


def reference_side_axes(path, leaf) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
  """``matrix_axes`` projecting each weight on the side galore-torch would ("like the reference").

  galore-torch's default ``proj_type="std"`` projects the smaller dimension of the torch
  ``(out, in)`` weight, and for a square weight the input side. A Flax kernel is stored
  transposed, ``(in, out)``: for non-square kernels "the smaller dimension" is the same
  subspace either way, but a square kernel would be projected on its output side. For a
  square Flax kernel (path ending in ``kernel``; leading axes are batch axes, e.g. layers
  stacked for a scan) this returns the transposed view ``(out, in)``; for everything else,
  torch-layout ``weight`` leaves included, ``None`` (the default view). Use it as
  ``galore(..., matrix_axes=galore_jax.reference_side_axes)``.
  """
  names = path_names(path)
  shape = tuple(leaf.shape)
  if names and names[-1] == _FLAX_KERNEL and len(shape) >= 2 and shape[-1] == shape[-2]:
    return (len(shape) - 1,), (len(shape) - 2,)
  return None
