"""Tests of galore_jax.sample.generate: cached decoding against recomputing the sequence.

Loading checkpoints for ``eval`` / ``sample`` is tested end to end in test_train.py and
test_faults.py (bad flags fail before any weight is read).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from galore_jax import model as M
from galore_jax import sample

VOCAB = 97


@pytest.fixture(scope="module")
def tiny():
  """A random 2-layer model with grouped-query attention, as the ``run`` generate reads."""
  cfg = M.get_config(
    "llama_tiny",
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=176,
    num_heads=4,
    num_kv_heads=2,
    num_layers=2,
    max_seq_len=32,
    init_std=0.5,  # sharp logits: greedy choices differ from position to position
  )
  graphdef, params = nnx.split(M.Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  return types.SimpleNamespace(graphdef=graphdef, model_cfg=cfg), params


def _recomputed_greedy(run, params, prompt, n):
  """The reference: every token from the whole sequence so far, through one padded buffer
  (the model is causal, so the padding after a position does not change its logits)."""
  forward = jax.jit(lambda p, buf: nnx.merge(run.graphdef, p)(buf))
  buf = np.zeros((1, len(prompt) + n), np.int32)
  buf[0, : len(prompt)] = prompt
  for pos in range(len(prompt), len(prompt) + n):
    buf[0, pos] = int(jnp.argmax(forward(params, jnp.asarray(buf))[0, pos - 1]))
  return buf[0, len(prompt) :].tolist()


def test_greedy_decoding_through_the_cache_equals_recomputing_the_sequence(tiny):
  run, params = tiny
  prompt = [3, 14, 15, 92, 65]
  want = _recomputed_greedy(run, params, prompt, 12)
  assert len(set(want)) > 3  # the steps really differ
  assert sample.generate(run, params, prompt, max_new_tokens=12, temperature=0) == want
  # A one-token prompt (text sampling's empty prompt is one EOS id).
  assert sample.generate(run, params, [7], max_new_tokens=6, temperature=0) == (
    _recomputed_greedy(run, params, [7], 6)
  )


def test_generation_stops_at_a_stop_id_and_at_max_seq_len(tiny):
  run, params = tiny
  prompt = [3, 14, 15, 92, 65]
  free = sample.generate(run, params, prompt, max_new_tokens=12, temperature=0)
  stop = free[4]
  got = sample.generate(run, params, prompt, max_new_tokens=12, temperature=0, eos_id={stop, -1})
  assert got == free[: free.index(stop)]
  assert sample.generate(run, params, prompt, max_new_tokens=12, temperature=0, eos_id=stop) == got
  # 28 prompt tokens leave 4 places in a model of max_seq_len 32.
  long = list(range(1, 29))
  assert len(sample.generate(run, params, long, max_new_tokens=10, temperature=0)) == 4


def test_sampling_is_a_function_of_the_seed(tiny):
  run, params = tiny
  draw = lambda seed: sample.generate(run, params, [5, 6], max_new_tokens=10, seed=seed, top_k=20)
  first = draw(1)
  compiled = sample._prefill._cache_size(), sample._step._cache_size()
  assert draw(1) == first != draw(2)
  assert all(0 <= t < VOCAB for t in draw(3))
  # Calls with the same model and settings reuse the compiled prompt and step programs.
  assert (sample._prefill._cache_size(), sample._step._cache_size()) == compiled


def test_nucleus_sampling(tiny):
  """top_p keeps the fewest most likely tokens whose probability reaches it: a tiny top_p is
  greedy, 1.0 is plain top-k sampling, and in between only nucleus tokens are drawn."""
  run, params = tiny
  prompt = [5, 6]
  draw = lambda **kw: sample.generate(run, params, prompt, max_new_tokens=8, seed=4, **kw)
  assert draw(top_p=1e-6) == sample.generate(run, params, prompt, max_new_tokens=8, temperature=0)
  assert draw(top_p=1.0) == draw()
  # The first token at top_p 0.5 (temperature 3: a wide distribution) is always within the
  # nucleus of the prompt's distribution, and not always the same token.
  logits = nnx.merge(run.graphdef, params)(jnp.asarray([prompt]))[0, -1] / 3.0
  prob = np.sort(np.asarray(jax.nn.softmax(logits)))[::-1]
  order = np.argsort(-np.asarray(logits))
  nucleus = set(order[: int(np.searchsorted(np.cumsum(prob), 0.5)) + 1].tolist())
  firsts = {
    sample.generate(
      run, params, prompt, max_new_tokens=1, seed=s, temperature=3.0, top_k=VOCAB, top_p=0.5
    )[0]
    for s in range(12)
  }
  assert firsts <= nucleus and len(firsts) > 1, (firsts, nucleus)
  assert len(nucleus) < VOCAB // 4  # a real restriction
  with pytest.raises(ValueError, match="top_p"):
    draw(top_p=0.0)


def test_bad_prompts_are_errors(tiny):
  run, params = tiny
  with pytest.raises(ValueError, match="prompt is empty"):
    sample.generate(run, params, [], max_new_tokens=3)
  with pytest.raises(ValueError, match="at most 32"):
    sample.generate(run, params, list(range(32)), max_new_tokens=3)
