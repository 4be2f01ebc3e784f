"""Tests of the LLaMA decoder in galore_jax.model (CPU, tiny sizes)."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals
from small_run import TEST_MODEL

from galore_jax import model as M

VOCAB = 97  # deliberately odd: catches V/D mix-ups in shapes.


def _tiny(**overrides):
  """A 2-layer, 64-wide model: compiles in about a second on CPU."""
  base = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=176,
    num_heads=4,
    num_layers=2,
    max_seq_len=32,
  )
  base.update(overrides)
  return M.get_config("llama_tiny", **base)


def _tokens(batch=2, seq=16, seed=0, vocab=VOCAB):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab, dtype=jnp.int32)


def _flat_params(model):
  return {path: v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _loss(model, tokens_BxL):
  """Next-token cross-entropy; returns the logits as aux."""
  logits_BxLxV = model(tokens_BxL)
  logp = jax.nn.log_softmax(logits_BxLxV[:, :-1], axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1))
  return loss, logits_BxLxV


# XLA's CPU backend optimisations cost ~2x compile time and buy nothing at these
# sizes; set per function so that other test files are unaffected.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
def _fwd_bwd_jit(graphdef, params, tokens_BxL):
  def loss_fn(p):
    return _loss(nnx.merge(graphdef, p), tokens_BxL)

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, logits, grads


def _fwd_bwd(model, tokens_BxL):
  """(loss, logits, param grads); compiled once per model config and shape."""
  graphdef, params = nnx.split(model, nnx.Param)
  return _fwd_bwd_jit(graphdef, params, tokens_BxL)


@functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
def _forward_jit(graphdef, params, tokens_BxL):
  return nnx.merge(graphdef, params)(tokens_BxL)


def _forward(model, tokens_BxL):
  """model(tokens) compiled once per config and shape (eager op-by-op is slower on CPU)."""
  graphdef, params = nnx.split(model, nnx.Param)
  return _forward_jit(graphdef, params, tokens_BxL)


@functools.cache
def _graphdef(config):
  return nnx.graphdef(nnx.eval_shape(lambda: M.Llama(config, rngs=nnx.Rngs(0))))


@functools.cache
def _init_fn(config):
  @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
  def init(key):
    return nnx.state(M.Llama(config, rngs=nnx.Rngs(key)), nnx.Param)

  return init


def _model(config=None, seed=0):
  """A fresh Llama (its own Variables) without an eager, op-by-op init.

  remat / max_seq_len do not change the parameters, so every variant of a
  config shares one compiled initialiser (and gets identical weights per seed).
  """
  config = config or _tiny()
  params_config = dataclasses.replace(config, remat="none", max_seq_len=32)
  params = _init_fn(params_config)(jax.random.key(seed))
  return nnx.merge(_graphdef(config), params)


def _export_hf(model):
  """Our params as a Hugging Face-named numpy state dict (the inverse of load_hf_weights)."""
  sd = {
    "model.embed_tokens.weight": np.asarray(model.embed.embedding[...]),
    "model.norm.weight": np.asarray(model.final_norm.scale[...]),
    "lm_head.weight": np.asarray(model.lm_head.kernel[...]).T,
  }
  for i, block in enumerate(model.layers):
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      sd[f"model.layers.{i}.self_attn.{name}.weight"] = np.asarray(
        getattr(block.attn, name).kernel[...]
      ).T
    for name in ("gate_proj", "up_proj", "down_proj"):
      sd[f"model.layers.{i}.mlp.{name}.weight"] = np.asarray(getattr(block.mlp, name).kernel[...]).T
    sd[f"model.layers.{i}.input_layernorm.weight"] = np.asarray(block.attn_norm.scale[...])
    sd[f"model.layers.{i}.post_attention_layernorm.weight"] = np.asarray(block.mlp_norm.scale[...])
  return sd


# ---------------------------------------------------------------- configs


def test_named_configs_match_the_paper_table():
  expected = {
    "llama_tiny": (256, 688, 4, 4),
    "llama_60m": (512, 1376, 8, 8),
    "llama_130m": (768, 2048, 12, 12),
    "llama_350m": (1024, 2736, 16, 24),
    "llama_1b": (2048, 5461, 32, 24),
    "llama_7b": (4096, 11008, 32, 32),
    "llama_13b": (5120, 13824, 40, 40),  # LLaMA-13B's shape (not in the paper's table)
  }
  assert set(M.CONFIGS) - {TEST_MODEL} == set(expected)  # (the session's: conftest)
  for name, (d, f, h, n) in expected.items():
    c = M.get_config(name)
    assert (c.hidden_size, c.intermediate_size, c.num_heads, c.num_layers) == (d, f, h, n)
    assert c.vocab_size == 32000 and c.rms_eps == 1e-6 and c.rope_base == 10000.0
    assert c.init_std == 0.02
    assert c.head_dim == d // h
  assert M.param_count(M.get_config("llama_13b")) == 13_015_864_320  # LLaMA-13B's count


def test_get_config_overrides_and_unknown_name():
  c = M.get_config("llama_60m", vocab_size=32100, remat="full")
  assert c.vocab_size == 32100 and c.remat == "full" and c.hidden_size == 512
  assert M.CONFIGS["llama_60m"].vocab_size == 32000  # the registry is not mutated
  with pytest.raises(ValueError, match="unknown model 'llama_3b'; choose from"):
    M.get_config("llama_3b")


def test_config_validation():
  with pytest.raises(ValueError, match="remat"):
    M.get_config("llama_tiny", remat="some")
  with pytest.raises(ValueError, match="divisible"):
    M.get_config("llama_tiny", num_heads=3)
  with pytest.raises(ValueError, match="attention_impl"):
    M.get_config("llama_tiny", attention_impl="flash")


# ------------------------------------------------------------ param counts


# (params, GaLore-targeted) in millions, from the paper's table (REFERENCE.md).
PAPER_COUNTS = {
  "llama_60m": (58.1, 25.3),
  "llama_130m": (134.1, 84.9),
  "llama_350m": (368.0, 302.4),
  "llama_1b": (1339.1, 1207.9),
  "llama_7b": (6738.4, 6476.0),
}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_param_count_matches_paper(name):
  cfg = M.get_config(name)
  total_m, target_m = PAPER_COUNTS[name]
  assert round(M.param_count(cfg) / 1e6, 1) == total_m
  assert round(M.galore_target_count(cfg) / 1e6, 1) == target_m


@pytest.mark.parametrize("name", ["llama_tiny", "llama_60m", "qwen2_like"])
def test_param_count_matches_abstract_model(name):
  """The analytic count equals the shapes of a model built abstractly (no memory)."""
  if name == "qwen2_like":  # grouped-query attention, tied table, q/k/v biases
    cfg = M.get_config("llama_tiny", num_kv_heads=2, tie_embeddings=True, qkv_bias=True)
  else:
    cfg = M.get_config(name)
  abstract = nnx.eval_shape(lambda: M.Llama(cfg, rngs=nnx.Rngs(0)))
  params = _flat_params(abstract)
  assert sum(int(np.prod(v.shape)) for v in params.values()) == M.param_count(cfg)
  targets = sum(
    int(np.prod(v.shape))
    for path, v in params.items()
    if any(t in path for t in M.GALORE_TARGETS) and "bias" not in path  # kernels only
  )
  assert targets == M.galore_target_count(cfg)


def test_param_count_matches_real_tiny_model():
  cfg = _tiny()
  model = _model(cfg)
  params = _flat_params(model)
  assert sum(v.size for v in params.values()) == M.param_count(cfg)
  targets = sum(v.size for path, v in params.items() if any(t in path for t in M.GALORE_TARGETS))
  assert targets == M.galore_target_count(cfg)


# -------------------------------------------------------- structure / init


def test_param_paths_shapes_and_init():
  cfg = _tiny()
  model = _model(cfg)
  params = _flat_params(model)
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  expected_shapes = {
    ("embed", "embedding"): (v, d),
    ("final_norm", "scale"): (d,),
    ("lm_head", "kernel"): (d, v),
  }
  for i in range(cfg.num_layers):
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      expected_shapes[("layers", i, "attn", name, "kernel")] = (d, d)
    expected_shapes[("layers", i, "mlp", "gate_proj", "kernel")] = (d, f)  # (in, out)
    expected_shapes[("layers", i, "mlp", "up_proj", "kernel")] = (d, f)
    expected_shapes[("layers", i, "mlp", "down_proj", "kernel")] = (f, d)
    expected_shapes[("layers", i, "attn_norm", "scale")] = (d,)
    expected_shapes[("layers", i, "mlp_norm", "scale")] = (d,)
  assert {p: tuple(x.shape) for p, x in params.items()} == expected_shapes
  assert M.GALORE_TARGETS == (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
  )

  for path, x in params.items():
    chex.assert_type(x, jnp.float32)
    if path[-1] == "scale":
      np.testing.assert_array_equal(x, 1.0)
    else:  # every matrix, the embedding included, is N(0, 0.02)
      assert abs(float(jnp.mean(x))) < 0.004, path
      assert 0.017 < float(jnp.std(x)) < 0.023, path


def test_init_params_matches_the_module_and_compiles_once_per_part(caplog):
  """init_params: the module's tree, shapes, dtypes and init distribution; four
  compiled initialisers (embedding, block, norm, head) at any depth."""

  def compiles(cfg):
    caplog.clear()
    with caplog.at_level("WARNING"), jax.log_compiles():
      params = M.init_params(cfg, seed=3)
    return params, sum("Compiling jit(init)" in r.getMessage() for r in caplog.records)

  cfg = _tiny(param_dtype=jnp.bfloat16)
  params, n_shallow = compiles(cfg)
  _, n_deep = compiles(dataclasses.replace(cfg, num_layers=5))
  assert n_shallow == n_deep == 4

  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: M.Llama(cfg, rngs=nnx.Rngs(0)))))
  chex.assert_trees_all_equal_shapes_and_dtypes(params, abstract)
  flat = {path: x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  for path, x in flat.items():
    x = np.asarray(x, np.float32)
    if path[-1].key == "scale":
      np.testing.assert_array_equal(x, 1.0)
    else:
      assert abs(float(x.mean())) < 0.004 and 0.017 < float(x.std()) < 0.023, path
  # Each part has its own key: layers differ, and the same seed gives the same values.
  q = lambda p, i: np.asarray(p["layers"][i]["attn"]["q_proj"]["kernel"], np.float32)
  assert not np.allclose(q(params, 0), q(params, 1))
  chex.assert_trees_all_equal(params, M.init_params(cfg, seed=3))
  assert not np.allclose(q(params, 0), q(M.init_params(cfg, seed=4), 0))


# ---------------------------------------------------------------- forward


def test_output_shape_and_dtype():
  model = _model()
  logits = _forward(model, _tokens())
  chex.assert_shape(logits, (2, 16, VOCAB))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  # Any batch / length up to max_seq_len (shape only: traced, not compiled).
  out = jax.eval_shape(lambda t: model(t), jax.ShapeDtypeStruct((3, 32), jnp.int32))
  assert out.shape == (3, 32, VOCAB) and out.dtype == jnp.float32


def test_causality():
  model = _model()
  tokens = _tokens()
  j = 9
  changed = tokens.at[:, j].set((tokens[:, j] + 1) % VOCAB)
  a, b = _forward(model, tokens), _forward(model, changed)
  np.testing.assert_array_equal(a[:, :j], b[:, :j])  # the past does not see the future
  assert float(jnp.max(jnp.abs(a[:, j:] - b[:, j:]))) > 1e-4  # the change is visible later


def test_position_matters():
  """RoPE is applied: the same token and prefix pattern at another position differs."""
  model = _model()
  tokens = jnp.tile(jnp.array([5, 7], jnp.int32), (2, 8))  # (2, 16): 5 7 5 7 ...
  logits = _forward(model, tokens)
  assert float(jnp.max(jnp.abs(logits[0, 2] - logits[0, 10]))) > 1e-5


@functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
def _packed_jit(graphdef, params, tokens_BxL, segments_BxL):
  return nnx.merge(graphdef, params)(tokens_BxL, segments_BxL)


@pytest.mark.parametrize(
  "overrides",
  [{}, dict(num_kv_heads=2, remat="full"), dict(remat="save_matmuls", attention_impl="cudnn")],
  ids=["mha", "gqa-remat-full", "save-matmuls-cudnn-asked"],
)
def test_a_packed_row_gives_each_example_its_own_logits(overrides):
  """Examples packed into one row (``segments``) get the logits each gets alone in a row:
  no example sees another (a mask on top of the causal one), and each one's rotary
  positions start from 0. Without the segments the later examples' logits differ.
  (``attention_impl="cudnn"`` on a CPU: the request is refused and must not fall back
  to unmasked attention; it raises, as a user who asked for cuDNN expects.)"""
  config = _tiny(**overrides)
  if config.attention_impl == "cudnn":
    model = _model(config)
    segments = jnp.ones((1, 8), jnp.int32)
    with pytest.raises((ValueError, RuntimeError, NotImplementedError, TypeError)):
      _packed_jit(*nnx.split(model, nnx.Param), _tokens(1, 8), segments)
    config = dataclasses.replace(config, attention_impl="auto")
  model = _model(config)
  graphdef, params = nnx.split(model, nnx.Param)
  lengths = (5, 9, 3)  # then 7 padding tokens
  seq = 24
  examples = [_tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
  row = jnp.concatenate([*examples, jnp.zeros(seq - sum(lengths), jnp.int32)])[None]
  segments = jnp.concatenate(
    [jnp.full(n, i + 1, jnp.int32) for i, n in enumerate(lengths)]
    + [jnp.zeros(seq - sum(lengths), jnp.int32)]
  )[None]
  np.testing.assert_array_equal(
    M.segment_positions(segments)[0], [*range(5), *range(9), *range(3), *range(7)]
  )
  packed = _packed_jit(graphdef, params, row, segments)[0]
  unmasked = _forward(model, row)[0]
  start = 0
  for i, (ex, n) in enumerate(zip(examples, lengths, strict=True)):
    alone = _forward(model, ex[None])[0]
    np.testing.assert_allclose(packed[start : start + n], alone, rtol=2e-5, atol=2e-5)
    if i:  # the unpacked row lets it see the examples before it
      assert float(jnp.max(jnp.abs(unmasked[start : start + n] - alone))) > 1e-3
    start += n
  with pytest.raises(ValueError, match="segments"):
    model(row, segments[:, :-1])


def test_a_document_masked_row_gives_each_document_its_logits_from_its_eos():
  # --document-mask: packed text's documents get segments that begin at the EOS before
  # each (data.Rows.document_eos); a document's logits are those of EOS + document alone,
  # as `sample --prompt ""` starts one. Without the mask they see the document before.
  from galore_jax.data import batching

  model = _model()
  graphdef, params = nnx.split(model, nnx.Param)
  eos = 2
  a, b = (_tokens(1, n, seed=20 + n, vocab=VOCAB - 3)[0] + 3 for n in (5, 6))  # no EOS
  row = np.concatenate([a, [eos], b, [eos], [7, 8, 9]]).astype(np.int32)  # 15 + 1 target
  rows = batching.Rows(1, 15, pad=0)
  rows.document_eos = eos
  batch = rows.finish(row[None], np.ones((1, 15), np.float32))
  np.testing.assert_array_equal(batch["segments"][0], [1] * 5 + [2] * 7 + [3] * 3)
  masked = _packed_jit(graphdef, params, jnp.asarray(batch["inputs"]), batch["segments"])[0]
  alone = _forward(model, jnp.asarray(row[5:12])[None])[0]  # EOS + b
  np.testing.assert_allclose(masked[5:12], alone, rtol=2e-5, atol=2e-5)
  unmasked = _forward(model, jnp.asarray(batch["inputs"]))[0]
  assert float(jnp.max(jnp.abs(unmasked[5:12] - alone))) > 1e-3


@functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
def _decode_jit(graphdef, params, tokens_BxT, caches, pos, logits_at=None):
  return nnx.merge(graphdef, params).decode(tokens_BxT, caches, pos, logits_at=logits_at)


@pytest.mark.parametrize(
  "overrides",
  [{}, dict(num_kv_heads=2, rope_scaling=(8.0, 1.0, 4.0, 8), tie_embeddings=True)],
  ids=["mha", "gqa-llama3rope-tied"],
)
def test_decode_with_a_cache_gives_the_forward_logits(overrides):
  """A prompt, then one token at a time through the key / value cache, gives the logits of
  the whole sequence at once. The cache starts full of noise: rows not yet written must be
  masked out, not merely zero. Then rows at different places, as a batch of prompts of
  different lengths decodes."""
  model = _model(_tiny(**overrides))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = _tokens(batch=2, seq=12)
  want = _forward(model, tokens)
  noise = [
    M.KVCache(*(jax.random.normal(jax.random.key(i), c.keys.shape, c.keys.dtype) for i in (0, 1)))
    for c in model.init_cache(2, 16)
  ]
  prompt = 5
  got, caches = _decode_jit(graphdef, params, tokens[:, :prompt], noise, 0)
  chex.assert_trees_all_close(got, want[:, :prompt], atol=1e-5)
  for pos in range(prompt, 12):
    got, caches = _decode_jit(graphdef, params, tokens[:, pos : pos + 1], caches, jnp.int32(pos))
    chex.assert_trees_all_close(got[:, 0], want[:, pos], atol=1e-5)
  # Row 0 has a 3-token prompt, row 1 a 6-token one: row 0's prefill is padded with other
  # tokens, whose cache rows its own next tokens overwrite before they can be seen.
  length_B, rows = jnp.array([3, 6], jnp.int32), jnp.arange(2)
  padded = tokens[:, :6].at[0, 3:].set(jnp.array([1, 2, 3]))
  last_BxV, caches = _decode_jit(graphdef, params, padded, noise, 0, length_B - 1)
  chex.assert_trees_all_close(last_BxV, want[rows, length_B - 1], atol=1e-5)
  for i in range(4):
    pos_B = length_B + i
    got, caches = _decode_jit(graphdef, params, tokens[rows, pos_B][:, None], caches, pos_B)
    chex.assert_trees_all_close(got[:, 0], want[rows, pos_B], atol=1e-5)
  with pytest.raises(ValueError, match="max_len 33 exceeds max_seq_len 32"):
    model.init_cache(1, 33)


def test_too_long_sequence_is_an_error():
  model = _model(_tiny(max_seq_len=8))
  forward_shape = lambda seq: jax.eval_shape(
    lambda t: model(t), jax.ShapeDtypeStruct((2, seq), jnp.int32)
  )
  forward_shape(8)  # exactly max_seq_len is fine
  with pytest.raises(ValueError, match=r"seq_len 9.*max_seq_len 8"):
    forward_shape(9)


def test_bf16_params():
  cfg16 = _tiny(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  abstract16 = nnx.eval_shape(lambda: M.Llama(cfg16, rngs=nnx.Rngs(0)))
  for path, x in _flat_params(abstract16).items():
    assert x.dtype == jnp.bfloat16, path  # initialised directly in bf16, no f32 copy
  # Same weights (rounded to bf16) in both; then the logits agree to bf16 accuracy.
  m32 = _model()
  m16 = nnx.merge(
    nnx.graphdef(abstract16),
    jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(m32, nnx.Param)),
  )
  tokens = _tokens()
  l32 = _forward(m32, tokens)
  loss16, l16, grads16 = _fwd_bwd(m16, tokens)
  chex.assert_type(l16, jnp.float32)
  chex.assert_tree_all_finite((l16, loss16, grads16))
  assert float(jnp.max(jnp.abs(l16 - l32))) < 0.02 * float(jnp.max(jnp.abs(l32))) + 0.01
  for g in jax.tree.leaves(grads16):
    chex.assert_type(g, jnp.bfloat16)


def test_remat_modes_give_same_logits_and_grads():
  tokens = _tokens()
  base_loss, base_logits, base_grads = _fwd_bwd(_model(), tokens)
  for mode in ("full", "save_matmuls"):
    loss, logits, grads = _fwd_bwd(_model(_tiny(remat=mode)), tokens)
    np.testing.assert_allclose(logits, base_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, base_loss, rtol=1e-5)
    chex.assert_trees_all_close(grads, base_grads, rtol=1e-4, atol=1e-6)


def _saved_matmul_outputs(remat, capsys):
  """How many matmul results the backward pass keeps from the forward pass (traced only)."""
  graphdef, state = nnx.split(_model(_tiny(remat=remat)))
  capsys.readouterr()
  print_saved_residuals(lambda s, t: jnp.mean(nnx.merge(graphdef, s)(t)), state, _tokens())
  return capsys.readouterr().out.count("output of dot_general")


def test_remat_policies_change_what_is_saved(capsys):
  none = _saved_matmul_outputs("none", capsys)
  full = _saved_matmul_outputs("full", capsys)
  save_matmuls = _saved_matmul_outputs("save_matmuls", capsys)
  assert full == 0  # everything inside a block is recomputed
  # q, k, v, o, gate, up per layer at least (down feeds the residual sum, saved anyway)
  assert save_matmuls >= 6 * _tiny().num_layers
  assert none > 0  # without remat some matmul results are needed by the backward pass


def test_remat_works_when_model_is_captured_by_jax_transforms():
  """Tracing a closure over the model (jax.jit / make_jaxpr, not nnx.jit) works with remat."""
  model = _model(_tiny(remat="full"))
  jaxpr = jax.make_jaxpr(lambda t: model(t))(_tokens())
  names = {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}
  assert any("remat" in n or "checkpoint" in n for n in names), names


def test_per_layer_gradients_are_nonzero():
  model = _model()
  _, _, grads = _fwd_bwd(model, _tokens())
  for path, g in nnx.to_flat_state(grads):
    assert float(jnp.max(jnp.abs(g))) > 0, path


# ---------------------------------------------------------- HF weight loading


def test_load_hf_weights_round_trip():
  src = _model(seed=1)
  dst = _model(seed=2)
  tokens = _tokens()
  assert float(jnp.max(jnp.abs(_forward(src, tokens) - _forward(dst, tokens)))) > 1e-3
  sd = _export_hf(src)
  sd["model.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # buffers are ignored
  M.load_hf_weights(dst, sd)
  np.testing.assert_array_equal(_forward(src, tokens), _forward(dst, tokens))


def test_load_hf_weights_errors_leave_model_untouched():
  model = _model()
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  good = _export_hf(_model(seed=3))

  missing = dict(good)
  del missing["model.layers.1.mlp.down_proj.weight"]
  with pytest.raises(ValueError, match="missing keys.*layers.1.mlp.down_proj"):
    M.load_hf_weights(model, missing)

  no_head = dict(good)
  del no_head["lm_head.weight"]
  with pytest.raises(ValueError, match="tied"):
    M.load_hf_weights(model, no_head)

  bad_shape = dict(good)
  bad_shape["model.layers.0.mlp.gate_proj.weight"] = good["model.layers.0.mlp.gate_proj.weight"].T
  with pytest.raises(ValueError, match="shape mismatch.*gate_proj"):
    M.load_hf_weights(model, bad_shape)

  extra = dict(good)
  extra["model.layers.2.self_attn.q_proj.weight"] = good["model.layers.0.self_attn.q_proj.weight"]
  with pytest.raises(ValueError, match="unexpected keys"):
    M.load_hf_weights(model, extra)

  chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.state(model, nnx.Param)), before)
