"""Parity of galore_jax.model.Llama with Hugging Face's LlamaForCausalLM.

A small random HF model is built with torch, its state dict is loaded with
``load_hf_weights`` and the logits are compared. Agreement checks the parts a
shape test cannot: RoPE layout (rotate_half), RMSNorm placement and eps, the
SwiGLU order (silu on gate, not up), the (out, in) -> (in, out) transposes and
the causal mask.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from galore_jax import model as M

pytestmark = pytest.mark.reference

torch = pytest.importorskip(
  "torch", reason="torch is not installed (pip install 'galore-jax[reference]')"
)
transformers = pytest.importorskip(
  "transformers", reason="transformers is not installed (pip install 'galore-jax[reference]')"
)

HIDDEN, INTERMEDIATE, HEADS, LAYERS, VOCAB = 64, 176, 4, 2, 128
ROPE_THETA, EPS = 10000.0, 1e-6


def _hf_config():
  """transformers.LlamaConfig across 4.x (``rope_theta``) and 5.x (``rope_parameters``)."""
  kwargs = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_attention_heads=HEADS,
    num_key_value_heads=HEADS,
    num_hidden_layers=LAYERS,
    max_position_embeddings=64,
    rms_norm_eps=EPS,
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
  )
  params = inspect.signature(transformers.LlamaConfig.__init__).parameters
  if "rope_parameters" in params:
    kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": ROPE_THETA}
  else:
    kwargs["rope_theta"] = ROPE_THETA
    kwargs["rope_scaling"] = None
  config = transformers.LlamaConfig(**kwargs)
  # Whichever field this version keeps, it must say plain RoPE at base 10000.
  rope = getattr(config, "rope_parameters", None) or {}
  theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
  assert theta == ROPE_THETA, (rope, getattr(config, "rope_theta", None))
  assert rope.get("rope_type", "default") == "default"
  assert (
    not getattr(config, "rope_scaling", None)
    or config.rope_scaling.get("rope_type", "default") == "default"
  )
  assert not config.tie_word_embeddings
  # Eager softmax attention: the plain reference, whatever the installed default.
  config._attn_implementation = "eager"
  return config


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(_hf_config()).to(torch.float32).eval()
  # HF initialises norms to ones; randomise them so that a scale that was
  # dropped or swapped between the two norms of a block shows up.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  return model


def _state_dict_numpy(model):
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _our_model():
  config = M.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_heads=HEADS,
    num_layers=LAYERS,
    max_seq_len=64,
    rms_eps=EPS,
    rope_base=ROPE_THETA,
  )
  return M.Llama(config, rngs=nnx.Rngs(0))


def test_logits_match_hugging_face(hf_model):
  ours = _our_model()
  M.load_hf_weights(ours, _state_dict_numpy(hf_model))

  tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 48), dtype=np.int64)
  with torch.no_grad():
    expected = hf_model(torch.from_numpy(tokens)).logits.numpy()
  # Full float32 matmuls, so the bound also holds on GPUs that default to TF32.
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda t: ours(t))(jnp.asarray(tokens, dtype=jnp.int32))

  assert got.shape == expected.shape == (2, 48, VOCAB)
  assert got.dtype == jnp.float32
  err = float(np.max(np.abs(np.asarray(got) - expected)))
  assert err <= 1e-4, f"max abs logit error {err:.3g} vs transformers"
  # The comparison is not vacuous: the logits vary over positions and vocab.
  assert float(np.std(expected)) > 1e-2


def test_hf_weights_are_transposed_kernels(hf_model):
  ours = _our_model()
  sd = _state_dict_numpy(hf_model)
  M.load_hf_weights(ours, sd)
  np.testing.assert_array_equal(
    ours.layers[1].attn.q_proj.kernel[...], sd["model.layers.1.self_attn.q_proj.weight"].T
  )
  np.testing.assert_array_equal(
    ours.layers[0].mlp.down_proj.kernel[...], sd["model.layers.0.mlp.down_proj.weight"].T
  )
  np.testing.assert_array_equal(ours.embed.embedding[...], sd["model.embed_tokens.weight"])
  np.testing.assert_array_equal(ours.lm_head.kernel[...], sd["lm_head.weight"].T)
  np.testing.assert_array_equal(
    ours.layers[1].mlp_norm.scale[...], sd["model.layers.1.post_attention_layernorm.weight"]
  )
