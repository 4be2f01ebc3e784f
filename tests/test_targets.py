"""The paper's GaLore targets and the reference's projection side, as public helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import galore_jax
from galore_jax import model as model_lib


def _selected(mask):
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return sorted(jax.tree_util.keystr(p) for p, v in flat if v)


def test_llama_targets_on_hugging_face_flat_names():
  names = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
  ]
  mask = galore_jax.llama_targets({n: np.zeros((2, 2)) for n in names})
  assert {n for n, v in mask.items() if v} == {
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
  }


def test_llama_targets_on_this_packages_llama_and_nnx_state():
  cfg = model_lib.LlamaConfig(
    vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2
  )
  model = nnx.eval_shape(lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  selected = _selected(galore_jax.llama_targets(state))
  assert len(selected) == 7 * 2
  assert all("kernel" in s and "embed" not in s and "lm_head" not in s for s in selected)
  assert model_lib.GALORE_TARGETS == galore_jax.LLAMA_TARGETS


def test_reference_side_axes_transposes_square_flax_kernels_only():
  key = jax.tree_util.DictKey
  axes = galore_jax.reference_side_axes
  assert axes((key("q_proj"), key("kernel")), jnp.zeros((8, 8))) == ((1,), (0,))
  assert axes((key("q_proj"), key("kernel")), jnp.zeros((3, 8, 8))) == ((2,), (1,))
  assert axes((key("up_proj"), key("kernel")), jnp.zeros((8, 16))) is None
  assert axes((key("q_proj.weight"),), jnp.zeros((8, 8))) is None  # torch layout already


def test_reference_side_axes_projects_a_square_kernel_like_torch():
  """On a square kernel the transposed view keeps torch's (input-side) basis."""
  g = jax.random.normal(jax.random.key(0), (12, 12))
  tx = galore_jax.galore(
    optax.identity(),
    rank=3,
    mask=galore_jax.llama_targets,
    matrix_axes=galore_jax.reference_side_axes,
  )
  params = {"q_proj": {"kernel": jnp.zeros((12, 12))}}
  _, state = tx.update({"q_proj": {"kernel": g}}, tx.init(params))
  basis = state.projectors["q_proj"]["kernel"]
  # torch's weight is g.T (out, in); "std" on a square weight keeps Vh[:r] of g.T, i.e. the
  # top left singular vectors of g: the input side of the Flax kernel.
  u = np.linalg.svd(np.asarray(g))[0][:, :3]
  np.testing.assert_allclose(np.abs(np.asarray(basis) @ u), np.eye(3), atol=1e-4)
