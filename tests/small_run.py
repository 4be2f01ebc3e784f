"""The small training configuration (``TrainConfig`` fields) that the training tests share:
runs with the same shapes and settings compile the same train step (the schedule's settings,
``--steps``, ``--lr``, ``--warmup``..., are not part of it: the step takes its rate as an
argument), which the session's JAX cache (conftest) and the step cache then serve to every
test that uses it."""

# The model of SMALL: llama_tiny's family at 2 layers of width 64 (vocabulary: the bundled
# tokenizer's 8192 pieces). The training tests check behaviour (resumes, shardings, skipped
# steps, files), not llama_tiny's numbers, and a warm 6-step run of this model takes about
# half the time (3.6 s against 6.8 s, measured on 2 cores). conftest registers it in the
# test process; a subprocess does not know it (those tests name llama_tiny, or --init-from
# a TINY_HF directory).
TEST_MODEL = "llama_test"
TEST_MODEL_SHAPE = dict(hidden_size=64, intermediate_size=176, num_heads=4, num_layers=2)


def register_test_model() -> None:
  from galore_jax import model as model_lib

  model_lib.CONFIGS.setdefault(TEST_MODEL, model_lib.get_config("llama_tiny", **TEST_MODEL_SHAPE))


SMALL = dict(
  model=TEST_MODEL,
  batch_size=8,
  seq_len=32,
  eval_every=1000,
  eval_batches=2,
  save_every=1000,
  progress=False,
  rank=16,
  update_proj_gap=2,
)

# A LLaMA smaller than llama_tiny (2 layers of width 64) for tests whose subprocesses only
# need some model: compiling its step is most of their time, and this step compiles faster.
TINY_HF = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_layers=2)


def write_tiny_hf_model(path, **overrides) -> str:
  """A Hugging Face directory of ``TINY_HF`` (fields replaced by ``overrides``; config.json,
  safetensors, the bundled tokenizer) at ``path``, for ``--init-from``."""
  from flax import nnx

  from galore_jax import data, hf
  from galore_jax import model as model_lib

  sp = data.load_tokenizer()
  config = model_lib.LlamaConfig(vocab_size=sp.get_piece_size(), **{**TINY_HF, **overrides})
  params = nnx.to_pure_dict(nnx.state(model_lib.Llama(config, rngs=nnx.Rngs(0)), nnx.Param))
  hf.save_pretrained(path, config, params, tokenizer=sp)
  return str(path)


def small_config(tmp_path, name, **kw):
  """``SMALL`` (fields replaced by ``kw``) as a ``TrainConfig`` writing to ``tmp_path/name``."""
  from galore_jax import train

  return train.TrainConfig(out=str(tmp_path / name), **{**SMALL, **kw})


def quiet(*_):
  """A ``log`` that prints nothing."""
