"""Tests of galore_jax.sample.generate: cached decoding against recomputing the sequence.

Loading checkpoints for ``eval`` / ``sample`` is tested end to end in test_train.py and
test_faults.py (bad flags fail before any weight is read).
"""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from galore_jax import data, sample
from galore_jax import model as M

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
  cut = sample.generate(run, params, long, max_new_tokens=10, temperature=0)
  assert len(cut) == 4
  # Why each reply ended (--prompts records it; the CLI notes a context cut on stderr).
  cfg = run.model_cfg
  assert sample.finish_reason(long, cut, 10, cfg) == "context"
  assert sample.finish_reason(long, cut, 4, cfg) == "length"  # --max-new-tokens came first
  assert sample.finish_reason(prompt, free, 12, cfg) == "length"
  assert sample.finish_reason(prompt, got, 12, cfg) == "stop"
  # A stop id drawn at the last place is not the context's doing.
  assert cut[-1] not in cut[:-1], cut  # (so that it stops the reply there)
  last = sample.generate(run, params, long, max_new_tokens=10, temperature=0, eos_id=cut[-1])
  assert last == cut[:-1] and sample.finish_reason(long, last, 10, cfg) == "stop"


def test_sampling_is_a_function_of_the_seed(tiny):
  run, params = tiny
  draw = lambda seed: sample.generate(run, params, [5, 6], max_new_tokens=10, seed=seed, top_k=20)
  first = draw(1)
  compiled = sample._prefill._cache_size(), sample._step._cache_size()
  assert draw(1) == first != draw(2)
  assert all(0 <= t < VOCAB for t in draw(3))
  # Calls with the same model and settings reuse the compiled prompt and step programs.
  assert (sample._prefill._cache_size(), sample._step._cache_size()) == compiled


def test_a_batch_of_prompts_gives_each_prompt_its_own_reply(tiny):
  """Prompts of different lengths in one batch: greedy replies equal one-at-a-time ones (so
  padding and per-row positions change nothing), a row that meets a stop id ends while the
  others go on, and a seeded reply depends on its index, not on how the list is batched."""
  run, params = tiny
  prompts = [[3, 14, 15, 92, 65], [7], [8, 9, 10, 11, 12, 13, 14, 15, 16]]
  alone = [sample.generate(run, params, p, max_new_tokens=8, temperature=0) for p in prompts]
  assert sample.generate_batch(run, params, prompts, max_new_tokens=8, temperature=0) == alone
  stop = alone[0][2]
  assert stop not in alone[1] + alone[2][:1]  # rows 1 and 2 do not stop at the same place
  stopped = sample.generate_batch(
    run, params, prompts, max_new_tokens=8, temperature=0, eos_id=stop
  )
  assert stopped == [r[: r.index(stop)] if stop in r else r for r in alone]
  assert len(stopped[0]) == 2 and len(stopped[1]) == 8

  kw = dict(max_new_tokens=8, seed=3, top_k=20)
  whole = sample.generate_batch(run, params, prompts, **kw)
  parts = sample.generate_batch(run, params, prompts[:2], **kw) + sample.generate_batch(
    run, params, prompts[2:], first_index=2, **kw
  )
  assert parts == whole
  assert whole[0] == sample.generate(run, params, prompts[0], **kw)
  # Index 1's draws differ from index 0's for the same prompt.
  again = sample.generate_batch(run, params, [prompts[0], prompts[0]], **kw)
  assert again[0] == whole[0] != again[1]


def test_a_reply_is_the_text_it_adds_to_its_prompt():
  """SentencePiece drops a leading space at the start of a text: the reply's own decoding
  would glue "universally" to "acknowledged"."""
  tok = data.load_tokenizer()
  ids = tok.encode("It is a truth universally acknowledged, that a single man")
  cut = len(tok.encode("It is a truth universally"))
  assert tok.decode(ids[:cut]) == "It is a truth universally"
  assert sample.reply_text(tok, ids[:cut], ids[cut:]) == " acknowledged, that a single man"
  assert not tok.decode(ids[cut:]).startswith(" ")  # what the reply's own decoding gives
  assert sample.reply_text(tok, [tok.eos_id()], ids) == tok.decode(ids)  # an empty prompt


def test_a_streamed_reply_prints_the_reply_text():
  """Byte-fallback pieces (the corpus tokenizer spells "ï", "é", "—" and CJK in bytes) and a
  decoder that cleans up a space before a full stop change a decoding's last characters as
  tokens follow: the stream holds them back, writes as it goes, and its whole is the text."""
  tok = data.load_tokenizer()
  prompt = tok.encode("It is")
  reply = tok.encode("a naïve café — 日本, truly")

  def stream(tok, hold=sample.ReplyStream.HOLD):
    writes = []
    s = sample.ReplyStream(tok, prompt, writes.append)
    s.HOLD = hold
    for t in reply[:-1]:
      s(0, t)
    early = len(writes)
    s(0, reply[-1])
    return writes, s.close(), early

  writes, text, early = stream(tok)
  assert "".join(writes) == text == " a naïve café — 日本, truly"
  assert early > 3  # streaming: most of it was out before the last token
  # Without the hold, "caf\ufffd" is printed and "café" can no longer follow it.
  assert "".join(stream(tok, hold=0)[0]) != text

  class CleaningTok:  # Hugging Face's clean_up_tokenization_spaces: " ." -> "."
    def decode(self, ids):
      return " ".join(str(i) for i in ids).replace(" 0", "0")

  prompt, reply = [5], [7, 0, 8, 0, 0, 9]
  writes, text, _ = stream(CleaningTok())
  assert "".join(writes) == text == " 70 800 9"


@pytest.mark.parametrize("top_p,kept", [(0.5, {1, 3}), (0.75, {1, 3, 4}), (1.0, {0, 1, 2, 3, 4})])
def test_nucleus_keeps_the_fewest_likeliest_tokens_that_reach_top_p(top_p, kept):
  """Probabilities 0.4 (id 1), 0.3 (3), 0.15 (4), 0.1 (0), 0.05 (2): top_p 0.5 needs ids 1 and
  3, 0.75 adds 4, 1.0 is plain sampling. 400 draws see every kept id and no other."""
  logits_V = jnp.log(jnp.array([0.1, 0.4, 0.05, 0.3, 0.15]))
  keys = jax.random.split(jax.random.key(0), 400)
  draws = jax.vmap(lambda k: sample._pick(logits_V, k, 1.0, 5, top_p))(keys)
  assert set(np.asarray(draws).tolist()) == kept


def test_generate_passes_top_p_through(tiny):
  run, params = tiny
  prompt = [3, 14, 15, 92, 65]  # the greedy test's programs are reused
  greedy = sample.generate(run, params, prompt, max_new_tokens=12, temperature=0)
  assert sample.generate(run, params, prompt, max_new_tokens=12, top_p=1e-6) == greedy
  with pytest.raises(ValueError, match="top_p"):
    sample.generate(run, params, prompt, max_new_tokens=12, top_p=0.0)


def test_bad_prompts_are_errors(tiny):
  run, params = tiny
  with pytest.raises(ValueError, match="prompt is empty"):
    sample.generate(run, params, [], max_new_tokens=3)
  with pytest.raises(ValueError, match="context is 32, so at most 31 leave room"):
    sample.generate(run, params, list(range(32)), max_new_tokens=3)


def test_bench_sample_measures_every_case_on_the_same_replies(load_experiment, tmp_path):
  """experiments/bench_sample.py: its cached cases (one at a time, and batches of 2 over 3
  prompts, the last filled up) give the uncached baseline's greedy replies in float32."""
  bench = load_experiment("bench_sample")
  path = tmp_path / "sample.json"
  args = ["--model", "llama_tiny", "--vocab", str(VOCAB), "--prompts", "3"]
  assert bench.main([*args, "--batch-size", "2", "--new-tokens", "5", "--json", str(path)]) == 0
  got = json.loads(path.read_text())
  assert set(got["cases"]) == {"recompute", "cached_b1", "cached_b2"}
  for name in ("cached_b1", "cached_b2"):
    assert got["cases"][name]["same_as_recompute"] == 3
    assert got["cases"][name]["tokens_per_s"] > 0
  assert set(got["ratios"]) == {"cached_b2/cached_b1", "cached_b1/recompute"}
