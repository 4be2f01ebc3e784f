"""Tests for galore_jax.sft's instruction-data pipeline: records read as a stream, tokenized
in batches, cached and mapped (masking, chat templates and sampling: test_hf.py)."""

from __future__ import annotations

import json
import random
import re
import warnings

import numpy as np
import pytest

from galore_jax import data, hf, sft
from galore_jax.data import sources


def _records(n, seed=0):
  rng = random.Random(seed)
  words = "the of and a to in is you that it he was for on are as with his".split()
  say = lambda k: " ".join(rng.choice(words) for _ in range(k))
  return [
    {
      "prompt": f"question {i}: {say(rng.randint(2, 30))} ?",
      "completion": f" {say(rng.randint(1, 60))}",
    }
    for i in range(n)
  ]


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _batches(src, split="train", seq_len=48):
  cfg = data.DataConfig(source=str(src), seq_len=seq_len, batch_size=4)
  if split == "train":
    ds = data.make_dataset(cfg, "train")
    return [ds.batch(s) for s in range(ds.steps_per_epoch + 2)]
  return list(data.eval_batches(cfg))


def _same(a, b):
  return len(a) == len(b) and all(
    x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    for x, y in zip(a, b, strict=True)
  )


def test_examples_are_tokenized_in_batches_and_equal_tokenizing_at_once(tmp_path, monkeypatch):
  # A large instruction set is read as a stream and tokenized TOKENIZE_BATCH_CHARS at a
  # time into compact arrays (it was parsed and tokenized whole, ~13 GB per GB of JSON
  # lines, at every start); the examples equal tokenize_examples over the whole split.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(sources, "TOKENIZE_BATCH_CHARS", 3000)
  records = _records(600)
  src = _write(tmp_path / "sft.jsonl", records)
  sp = data.load_tokenizer()
  calls = []
  tokenize = sft.tokenize_examples
  monkeypatch.setattr(
    sft, "tokenize_examples", lambda recs, tok: calls.append(len(recs)) or tokenize(recs, tok)
  )
  for split in ("train", "validation"):
    ex = sft.cached_examples(str(src), split, sp, [src], ["k"])
    want = tokenize([(r, "") for r, _ in sft.split_records([(r, "") for r in records], split)], sp)
    assert len(ex) == len(want) > 0 and ex.tokens.dtype == np.uint16
    for i in (0, len(want) // 2, len(want) - 1):
      s, e = ex.starts[i], ex.starts[i + 1]
      np.testing.assert_array_equal(ex.tokens[s:e], want[i][0])
      np.testing.assert_array_equal(ex.trained[s:e], want[i][1])
  assert len(calls) > 10 and max(calls) < 100, calls  # batches, not the whole file at once


def test_all_examples_are_both_splits_in_turn(tmp_path, monkeypatch):
  # eval --split all of an instruction set: every example, the training split's first (one
  # per row, to see the order).
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  src = _write(tmp_path / "sft.jsonl", _records(300))
  cfg = data.DataConfig(source=str(src), seq_len=48, batch_size=4, packing=False)
  parts = [list(data.eval_batches(cfg, None, split=s)) for s in ("all", "validation")]
  train = data.make_dataset(cfg, "train")
  n_val = sum(int(b["mask"].any(axis=1).sum()) for b in parts[1])
  assert sum(int(b["mask"].any(axis=1).sum()) for b in parts[0]) == train.num_examples + n_val
  n_train = train.num_examples
  last = parts[0][(n_train + n_val - 1) // 4]  # the validation split's examples come last
  np.testing.assert_array_equal(
    last["inputs"][(n_train + n_val - 1) % 4], parts[1][-1]["inputs"][(n_val - 1) % 4]
  )


def _trained_part(b, r, at):
  """Row r's inputs, targets and mask at positions ``at``, up to the last trained target
  (what the loss reads: a packed row may end on an example's EOS as a target only)."""
  keep = at[: int(np.flatnonzero(b["mask"][r, at]).max(initial=-1)) + 1]
  return tuple(tuple(b[k][r, keep].tolist()) for k in ("inputs", "targets", "mask"))


def _segments_of(batches):
  """What the loss reads of each example in packed batches, cut out by segment id."""
  return [
    _trained_part(b, r, np.flatnonzero(b["segments"][r] == k))
    for b in batches
    for r in range(len(b["inputs"]))
    for k in range(1, int(b["segments"][r].max()) + 1)
  ]


def _rows_of(batches):
  """What the loss reads of each example in one-per-row batches (rows with a mask)."""
  L = batches[0]["inputs"].shape[1]
  return [
    _trained_part(b, r, np.arange(L))
    for b in batches
    for r in range(len(b["inputs"]))
    if b["mask"][r].any()
  ]


def test_packed_rows_hold_each_example_as_a_row_of_its_own_does(tmp_path, monkeypatch):
  # By default instruction examples are packed several to a row (--no-packing: one per row):
  # every example of the split once, with the tokens and trained targets it has alone, in
  # fewer rows; no target crosses into the next example. An epoch of training reads each
  # example once.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  recs = _records(400, seed=3) + [{"prompt": "q", "completion": " long" * 300}]  # > a row
  src = _write(tmp_path / "sft.jsonl", recs)
  cfg = data.DataConfig(source=str(src), seq_len=256, batch_size=4)
  one = data.DataConfig(source=str(src), seq_len=256, batch_size=4, packing=False)
  for split in ("validation", "all"):
    packed, alone = list(data.eval_batches(cfg, split=split)), data.eval_batches(one, split=split)
    assert all(b["segments"].shape == b["inputs"].shape for b in packed)
    assert "segments" not in alone[0]
    trained = [x for x in _segments_of(packed) if x[0]]  # (examples that train something)
    assert sorted(trained) == sorted(_rows_of(alone))
    assert len(packed) < len(alone) / 2 if split == "all" else len(packed) <= len(alone)
  ds, ds_one = data.make_dataset(cfg, "train"), data.make_dataset(one, "train")
  assert ds.num_documents == ds_one.num_examples > 2 * ds.num_examples
  epoch = [ds.batch(s) for s in range(ds.steps_per_epoch)]
  seen = _segments_of(epoch)
  assert len(set(seen)) == len(seen) > 0.9 * ds.num_documents  # (the dropped last batch)
  for b in epoch:  # a target is trained only within its own example
    seg = b["segments"]
    crossing = np.zeros_like(seg, bool)
    crossing[:, :-1] = seg[:, 1:] != seg[:, :-1]
    assert not (b["mask"][crossing]).any() and not b["mask"][seg == 0].any()


def test_pack_rows_fills_rows_close_to_the_fewest_possible():
  rng = np.random.default_rng(0)
  lengths = np.clip(rng.lognormal(4.5, 0.8, 5000).astype(int), 2, 900)
  rows = sft.pack_rows(lengths, 257)
  assert sorted(rows.members) == list(range(5000))
  for i in range(len(rows)):
    members = rows.members[rows.starts[i] : rows.starts[i + 1]]
    assert list(members) == sorted(members)  # in the split's order within a row
    fill = np.minimum(lengths[members], 257).sum()
    assert fill <= 257 and (len(members) == 1 or lengths[members].max() < 257)
  fewest = int(np.ceil(np.minimum(lengths, 257).sum() / 257))
  assert fewest <= len(rows) <= 1.01 * fewest
  again = sft.pack_rows(lengths, 257)
  assert np.array_equal(again.members, rows.members) and np.array_equal(again.starts, rows.starts)


def test_a_packed_row_never_trains_a_target_across_examples():
  # With no BOS and an empty prompt an example's first token is trained; in a packed row
  # it follows the example before, whose last token must not be trained to predict it.
  lengths = np.array([3, 4, 2])
  tokens = np.arange(10, 19, dtype=np.uint16)
  ex = sft._Examples(tokens, np.ones(9, bool), np.array([0, 3, 7, 9]), np.zeros((3, 2), np.int64))
  rows = sft.pack_rows(lengths, 10)
  assert len(rows) == 1
  b = sft._ExampleBatch(ex, 1, 9, pad=0, rows=rows)([0])
  np.testing.assert_array_equal(b["inputs"][0], [10, 11, 12, 13, 14, 15, 16, 17, 18])
  np.testing.assert_array_equal(b["segments"][0], [1, 1, 1, 2, 2, 2, 2, 3, 3])
  np.testing.assert_array_equal(b["mask"][0], [1, 1, 0, 1, 1, 1, 0, 1, 0])


def test_read_chat_template_takes_a_preset_a_jinja_file_or_a_tokenizer_config(
  tmp_path, monkeypatch
):
  chatml = sft.read_chat_template("chatml")
  assert chatml == sft.CHAT_TEMPLATES["chatml"]
  (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
  assert sft.read_chat_template(str(tmp_path / "chat_template.jinja")).startswith("{{ messages")
  config = tmp_path / "tokenizer_config.json"
  config.write_text(json.dumps({"chat_template": "{{ 'one' }}"}))
  assert sft.read_chat_template(str(config)) == "{{ 'one' }}"
  config.write_text(json.dumps({"chat_template": [{"name": "default", "template": "{{ 2 }}"}]}))
  assert sft.read_chat_template(str(config)) == "{{ 2 }}"
  for text, says in [
    (json.dumps({"eos_token": "</s>"}), 'no "chat_template" string'),
    ("{% if x %}", "not a Jinja template"),
  ]:
    bad = tmp_path / ("bad.json" if text.startswith('{"') else "bad.jinja")
    bad.write_text(text)
    with pytest.raises(ValueError, match=says):
      sft.read_chat_template(str(bad))
  with pytest.raises(ValueError, match="no such file, and not a preset \\(chatml\\)"):
    sft.read_chat_template("chatmI")
  # A file named as a preset, in the working directory: neither is taken for the other.
  (tmp_path / "chatml").write_text("{{ 'mine' }}")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="^chatml: both a preset and a file in this directory; "):
    sft.read_chat_template("chatml")
  assert sft.read_chat_template("./chatml") == "{{ 'mine' }}"
  # A library caller's TrainConfig holds the text: a preset's name there is refused, not
  # rendered as the word "chatml" for every conversation.
  from galore_jax import config

  config.validate(config.TrainConfig(chat_template=chatml))
  with pytest.raises(config.ConfigError, match="--chat-template: 'chatml' is no Jinja template"):
    config.validate(config.TrainConfig(chat_template="chatml"))


def test_chatml_on_a_sentencepiece_tokenizer_trains_the_reply_and_its_eos():
  # The bundled SentencePiece model has no chat template and reads "</s>" as characters:
  # the preset's EOS after a reply becomes the EOS id (the last trained token), the newline
  # before the next turn is not trained, and a prompt ends where training's reply began.
  tok = data.load_tokenizer(None, sft.read_chat_template("chatml"))
  turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
  rec = {"messages": [*turns, {"role": "user", "content": "bye"}, turns[1]]}
  ((toks, trained),) = sft.tokenize_examples([(rec, "x")], tok)
  eos = np.flatnonzero(toks == tok.eos_id())
  assert len(eos) == 2 and trained[eos].all() and toks[-1] == tok.eos_id()
  assert not trained[eos[0] + 1]  # the newline that opens the next turn
  assert tok.decode(toks[trained].tolist()).count("<|im_end|>") == 2
  head = sft.prompt_ids(tok, turns[:1], "chat")
  np.testing.assert_array_equal(head, toks[: len(head)])
  assert trained[len(head)] and not trained[len(head) - 1]
  assert sft.reply_end_ids(tok, "chat") == {tok.eos_id()}


@pytest.mark.parametrize("markers", [False, True])
def test_a_sentencepiece_chat_is_tokenized_as_transformers_tokenizes_its_export(
  tmp_path, load_experiment, markers
):
  # transformers' tokenizer of the exported tokenizer.model (what vLLM and generate() see)
  # encodes the rendered conversation whole: training's tokens, cut into turns, and the
  # prompt of `sample` must be its ids. A model's own turn markers as control pieces
  # (Mistral's [INST]; here ChatML's), which SentencePiece reads as characters, are one
  # token each, the end of a turn ends a sampled reply, and preview names them. Before, only
  # BOS and EOS were mapped, and each turn's text got SentencePiece's word-start marker
  # (a reply "yes" after "assistant\n" trained as "▁yes").
  pytest.importorskip("transformers")
  from transformers import AutoTokenizer

  chatml = sft.read_chat_template("chatml")
  if markers:
    import sentencepiece as spm

    options = load_experiment("train_tokenizer").TRAINING_OPTIONS
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(data.builtin_documents("validation")),
      model_prefix=str(tmp_path / "chat"),
      **{**options, "vocab_size": 700},
      control_symbols=["<|im_start|>", "<|im_end|>", "<|im_end|>!"],  # one the prefix of one
    )
    tok = data.load_tokenizer(tmp_path / "chat.model", chatml)
  else:
    tok = data.load_tokenizer(None, chatml)
  (tmp_path / "export").mkdir()
  hf.save_tokenizer(tok, tmp_path / "export", chatml)
  exported = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
  rng = random.Random(0)
  words = "hi yes no the cat sat . , ! ? 12 3.5 I We hello\n don't  two".split(" ")
  say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
  for _ in range(40):
    messages = [{"role": "system", "content": say()}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
      messages += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
    ((toks, trained),) = sft.tokenize_examples([({"messages": messages}, "x")], tok)
    want = exported.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert toks.tolist() == want["input_ids"], messages
    prompt = exported.apply_chat_template(
      messages[:-1], tokenize=True, return_dict=True, add_generation_prompt=True
    )
    assert sft.prompt_ids(tok, messages[:-1], "chat") == prompt["input_ids"]
    assert trained[len(prompt["input_ids"])] and not trained[len(prompt["input_ids"]) - 1]
  if not markers:
    assert sft.reply_end_ids(tok, "chat") == {tok.eos_id()}
    return
  start, end = tok.piece_to_id("<|im_start|>"), tok.piece_to_id("<|im_end|>")
  assert tok.is_control(end) and tok.encode("<|im_end|>") != [end]  # read as characters
  assert list(toks).count(start) == list(toks).count(end) == len(messages)
  assert sft.reply_end_ids(tok, "chat") == {tok.eos_id(), end}
  shown = sft.show_example(tok, toks, trained, 512, "x")
  assert shown.count("<|im_end|>") == len(messages) and "<|im_end|>!" not in shown
  ((ids, _),) = sft._encode_rendered(tok, [[("a<|im_end|>!b", False)]])
  assert tok.piece_to_id("<|im_end|>!") in ids and end not in ids


# ChatML with the reply in transformers' {% generation %} block (its assistant-token mask);
# the second template's generation prompt ends in a space, which a byte-level BPE merges
# with the reply's first word (" hi": a token that overlaps the reply, so is trained).
_MASKED_TEMPLATES = (
  "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
  "{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
  "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
  "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
  "{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}"
  "{{ '<|im_start|>assistant\\n' }}{% endif %}",
  "{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' %}"
  "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
  "{% else %}{{ m['content'] + '\\n' }}{% endif %}{% endfor %}"
  "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
)


@pytest.mark.parametrize("pre", ["byte_level", "metaspace_first", "metaspace_always"])
def test_a_tokenizer_json_chat_is_tokenized_as_transformers_tokenizes_it(tmp_path, pre):
  # transformers encodes a rendered conversation whole, and marks the tokens that overlap
  # the {% generation %} text (return_assistant_tokens_mask): training's tokens and mask,
  # and sample's prompt, must be its. Before, each turn was encoded alone: a Metaspace
  # tokenizer (Llama 2's tokenizer.json) gave each turn's text its word-start marker (all 40
  # conversations differed, 23 of 40 sample prompts).
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  inner = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  byte_level = pre == "byte_level"
  inner.pre_tokenizer = (
    tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    if byte_level
    else tokenizers.pre_tokenizers.Metaspace(prepend_scheme=pre.split("_")[1])
  )
  inner.decoder = tokenizers.decoders.ByteLevel() if byte_level else tokenizers.decoders.Metaspace()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
    show_progress=False,
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
  )
  inner.train_from_iterator(list(data.builtin_documents("validation"))[:200], trainer)
  inner.save(str(tmp_path / "tokenizer.json"))
  rng = random.Random(0)
  words = "hi yes no the cat sat . , ! ? 12 3.5 I We hello\n don't  two".split(" ")
  say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
  spans = 0
  for template in _MASKED_TEMPLATES:
    (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": template})
    )
    tok = data.load_tokenizer(tmp_path / "tokenizer.json")
    auto = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<s>", eos_token="<|im_end|>"
    )
    auto.chat_template = template
    for _ in range(40):
      messages = [{"role": "system", "content": say()}] if rng.random() < 0.3 else []
      for _ in range(rng.randint(1, 3)):
        messages += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
      ((toks, trained),) = sft.tokenize_examples([({"messages": messages}, "x")], tok)
      want = auto.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
      )
      assert toks.tolist() == want["input_ids"], messages
      assert trained.tolist() == [bool(m) for m in want["assistant_masks"]], messages
      prompt = auto.apply_chat_template(
        messages[:-1], tokenize=True, return_dict=True, add_generation_prompt=True
      )["input_ids"]
      assert sft.prompt_ids(tok, messages[:-1], "chat") == prompt
      spans += toks.tolist()[: len(prompt)] != prompt  # a token spans the reply's start
  assert spans > 0  # the second template's rule was exercised


def test_a_reply_characters_no_token_covers_are_passed_over(tmp_path):
  # A normalizer that drops characters ("x" here) leaves them without a token: a reply's
  # trained tokens are those of its other characters, and a reply of dropped characters
  # alone trains nothing without ending the marking of the replies after it (transformers
  # stops marking there).
  tokenizers = pytest.importorskip("tokenizers")
  inner = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  inner.normalizer = tokenizers.normalizers.Replace("x", "")
  inner.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  inner.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
    show_progress=False,
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  inner.train_from_iterator(["user assistant hi there yes no"] * 20, trainer)
  inner.save(str(tmp_path / "tokenizer.json"))
  template = (  # the separator before a turn: a reply's piece is its content alone
    "{% for m in messages %}{% if not loop.first %}|{% endif %}{{ m['role'] + ':' }}"
    "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}|assistant:{% endif %}"
  )
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"eos_token": "</s>", "chat_template": template})
  )
  tok = data.load_tokenizer(tmp_path / "tokenizer.json")
  turns = ["xhix", "xx", "yes"]
  messages = [m for t in turns for m in ({"role": "user", "content": "no"},
                                         {"role": "assistant", "content": t})]  # fmt: skip
  ((toks, trained),) = sft.tokenize_examples([({"messages": messages}, "x")], tok)
  assert tok.decode(toks[trained].tolist()) == "hiyes"
  whole = "user:no|assistant:hi|user:no|assistant:|user:no|assistant:yes"
  assert tok.decode(toks.tolist()) == whole


@pytest.mark.parametrize("form", ["prompt", "alpaca"])
def test_a_sentencepiece_completion_is_tokenized_as_transformers_tokenizes_the_export(
  tmp_path, form
):
  # The export's chat template renders [BOS] prompt completion EOS, which transformers'
  # tokenizer of the exported tokenizer.model encodes whole: the completion goes on from
  # the prompt without a word-start marker of its own. Before, each completion was encoded
  # alone, with one: " ten" trained as "▁", "▁ten" and "ten" as "▁ten" (4 of these 4 differed).
  pytest.importorskip("transformers")
  from transformers import AutoTokenizer

  tok = data.load_tokenizer()
  hf.save_tokenizer(tok, tmp_path, sft.export_chat_template(form, tok))
  exported = AutoTokenizer.from_pretrained(str(tmp_path))
  for q, c in [
    ("what is 7 ?", " ten"),
    ("what is 7 ?", "ten"),
    ("Hi.", " hi\nbye"),
    ("x", "  two"),
  ]:
    rec = {"prompt": q, "completion": c} if form == "prompt" else {"instruction": q, "output": c}
    ((toks, trained),) = sft.tokenize_examples([(rec, "x")], tok)
    turns = [{"role": "user", "content": q}, {"role": "assistant", "content": c}]
    want = exported.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"]
    assert toks.tolist() == want, (c, [tok.id_to_piece(i) for i in toks[-6:]])
    prompt = exported.apply_chat_template(turns[:1], tokenize=True, return_dict=True)
    assert sft.prompt_ids(tok, q, form) == prompt["input_ids"] == toks[: (~trained).sum()].tolist()


def test_conversations_compile_their_template_once_and_are_encoded_in_one_call(monkeypatch):
  # Compiled per rendering (about 9 ms each, a conversation rendering 2 times per reply plus
  # one) and encoded a piece per call, 5 MB of ChatML conversations took 68 s to tokenize;
  # 1.5 s now (python experiments/data_load.py --mb 5 --chat).
  import jinja2

  compiles = []
  compile_ = jinja2.Environment.compile
  monkeypatch.setattr(
    jinja2.Environment,
    "compile",
    lambda self, *a, **k: compiles.append(1) or compile_(self, *a, **k),
  )
  sft._compiled_chat_template.cache_clear()
  sp = data.load_tokenizer(None, sft.read_chat_template("chatml"))

  class Counting:  # the tokenizer, counting its encode calls
    calls = 0

    def __getattr__(self, name):
      return getattr(sp, name)

    def encode(self, texts):
      Counting.calls += 1
      return sp.encode(texts)

  turn = lambda i: [
    {"role": "user", "content": f"question {i} ?"},
    {"role": "assistant", "content": f"answer {i} and more"},
  ]
  records = [({"messages": turn(i) + turn(i + 1)}, f"chat:{i}") for i in range(40)]
  together = sft.tokenize_examples(records, Counting())
  assert len(compiles) == 1 and Counting.calls == 1, (len(compiles), Counting.calls)
  for i in (0, 17, 39):  # as each record tokenized alone
    ((toks, trained),) = sft.tokenize_examples(records[i : i + 1], sp)
    np.testing.assert_array_equal(together[i][0], toks)
    np.testing.assert_array_equal(together[i][1], trained)
    assert 0 < trained.sum() < len(trained)


# A tool-calling template in the style of Qwen2.5's: tool definitions and a call's arguments
# through tojson, the reply in transformers' {% generation %} block, and {% break %}.
TOOL_TEMPLATE = (
  "{%- if tools %}{{ '<|im_start|>system\\nTools:\\n' }}{% for t in tools %}{{ t | tojson }}"
  "{{ '\\n' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
  "{%- for m in messages %}{%- if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
  "{% generation %}{% if m.content %}{{ m.content }}{% endif %}{% for c in m.tool_calls or [] %}"
  "{{ '<tool_call>' }}{{ c.function | tojson }}{{ '</tool_call>' }}{% endfor %}"
  "{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
  "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}"
  "{%- if loop.index >= 9 %}{% break %}{% endif %}{%- endfor %}"
  "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_tool_calls_render_as_transformers_renders_them(tmp_path):
  # Jinja's own tojson sorts keys and escapes <, >, & and ' (so the model would learn calls
  # written unlike those transformers and vLLM show it), and {% generation %} / {% break %}
  # were syntax errors.
  chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
  tools = [{"type": "function", "function": {"name": "weather", "parameters": {"where": "str"}}}]
  call = {"function": {"name": "weather", "arguments": {"where": "Orléans <FR> & 'co'"}}}
  messages = [
    {"role": "user", "content": "Weather in Orléans?"},
    {"role": "assistant", "content": None, "tool_calls": [call]},
    {"role": "tool", "content": "12 C"},
    {"role": "assistant", "content": "12 degrees."},
  ] + [{"role": "user", "content": f"again {i}"} for i in range(8)]
  got = {}
  for gen, msgs in ((False, messages), (True, messages[:3])):
    (want,), _ = chat_template_utils.render_jinja_template(
      [msgs], tools=tools, chat_template=TOOL_TEMPLATE, add_generation_prompt=gen
    )
    got[gen] = sft.render_chat(TOOL_TEMPLATE, msgs, add_generation_prompt=gen, tools=tools)
    assert got[gen] == want, (got[gen], want)
  assert "\"Orléans <FR> & 'co'\"" in got[True]
  assert '{"type": "function", "function"' in got[True]
  assert "again 4" in got[False] and "again 5" not in got[False]  # (the break)
  # A record's "tools" reach the template; the replies (the call, then the answer) are
  # what is trained.
  path = tmp_path / "chat_template.jinja"
  path.write_text(TOOL_TEMPLATE)
  tok = data.load_tokenizer(None, sft.read_chat_template(str(path)))
  ((toks, trained),) = sft.tokenize_examples(
    [({"messages": messages[:4], "tools": tools}, "")], tok
  )
  text = tok.decode(toks.tolist())
  assert text.startswith("<|im_start|>system\nTools:") and "weather" in text
  replies = tok.decode(toks[trained].tolist())
  assert replies.count("<|im_end|>") == 2 and "12 degrees." in replies
  assert "<tool_call>" in replies and "Weather in" not in replies
  with pytest.raises(ValueError, match='x:3: "tools" must be a list of objects'):
    sft.tokenize_examples([({"messages": messages[:4], "tools": "weather"}, "x:3")], tok)
  # A template that cannot render a record (ChatML's preset adds a call's null content to a
  # string) is an error naming the record, not a traceback from inside the template.
  chatml = data.load_tokenizer(None, sft.read_chat_template("chatml"))
  with pytest.raises(ValueError, match=r"^x:4: the chat template cannot render this record \(Ty"):
    sft.tokenize_examples([({"messages": messages[:4]}, "x:4")], chatml)


def test_a_second_start_reads_the_cached_examples(tmp_path, monkeypatch):
  # Every start (a resume too) used to parse and tokenize the whole set again, twice (once
  # per split). Train's pass caches both splits; later starts map them and tokenize nothing.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  src = _write(tmp_path / "sft.jsonl", _records(400, seed=1))
  first = _batches(src), _batches(src, "validation")
  monkeypatch.setattr(sft, "tokenize_examples", lambda *a: pytest.fail("tokenized again"))
  monkeypatch.setattr(sources, "read_files", lambda *a: pytest.fail("file read again"))
  again = _batches(src), _batches(src, "validation")
  assert _same(first[0], again[0]) and _same(first[1], again[1])
  ex = sft.cached_examples(str(src), "train", data.load_tokenizer(), [src], _key(src))
  assert isinstance(ex.tokens, np.memmap) and isinstance(ex.trained, np.memmap)


def _key(src):
  sp = data.load_tokenizer()
  return ["paths", data.DATA_FORMAT_VERSION, f"{src.resolve()}:{sources._sha256_file(src)}",
          sources._tokenizer_hash(sp)]  # fmt: skip


def test_the_seq_len_warning_is_given_at_every_start(tmp_path, monkeypatch):
  # The examples whose reply starts past a row are counted for each run's --seq-len from
  # what the cache keeps, not only when the set is tokenized.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  long = " ".join(["word"] * 80)
  recs = [{"prompt": f"{i} {long}", "completion": " yes"} for i in range(30)] + _records(30)
  src = _write(tmp_path / "sft.jsonl", recs)
  for _ in range(2):
    with pytest.warns(UserWarning, match=r"\b(29|30) of \d+ train example\(s\) have no trained"):
      _batches(src, seq_len=48)
  with pytest.raises(ValueError, match="nothing to learn from"):
    _batches(_write(tmp_path / "cut.jsonl", recs[:30]), seq_len=48)


def test_conversations_with_no_assistant_turn_are_told_apart_from_cut_replies(
  tmp_path, monkeypatch
):
  # Replies under a role other than "assistant" ("model", as Gemma's template writes it)
  # train nothing at any length; the message said "raise --seq-len" and gave the shortest
  # prompt of all examples (48 tokens, against --seq-len 128) as if it were theirs.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  template = sft.read_chat_template("chatml")
  chat = lambda user, role: {
    "messages": [{"role": "user", "content": user}, {"role": role, "content": "it is."}]
  }
  cfg = lambda src: data.DataConfig(
    source=str(src), seq_len=48, batch_size=4, chat_template=template
  )
  src = _write(tmp_path / "model.jsonl", [chat(f"what is {i} ?", "model") for i in range(60)])
  with pytest.raises(ValueError) as e:
    data.make_dataset(cfg(src), "train")
  said = str(e.value)
  assert re.search(r"(\d+) of \1 train example\(s\) have no trained token at all", said), said
  assert said.endswith("nothing to learn from; check the roles of the conversations")
  assert "--seq-len" not in said
  # Mixed with replies past the row: each kind said once, the cut ones with where their
  # earliest reply starts.
  long = [chat(f"{i} " + " ".join(["word"] * (40 + i)), "assistant") for i in range(20)]
  short = [chat(f"what is {i} ?", "assistant") for i in range(40)]
  src = _write(tmp_path / "mixed.jsonl", long + short + [chat("hi", "model")] * 20)
  with pytest.warns(UserWarning) as got:
    data.make_dataset(cfg(src), "train")
  said = [str(w.message) for w in got if "have no trained token" in str(w.message)]
  assert len(said) == 2 and "no trained token at all" in said[1], said
  tok = data.load_tokenizer(None, template)
  starts = [int(np.argmax(m)) for _, m in sft.tokenize_examples([(r, "") for r in long], tok)]
  at = re.search(r"\(the earliest reply among them starts at token (\d+)\)", said[0])
  assert at and int(at[1]) in starts and int(at[1]) > 48, (said, starts)  # (a cut one's)


def test_split_fallback_takes_the_example_out_of_tokenized_batches(tmp_path, monkeypatch):
  # No record hashes to 0 mod 100: the one with the smallest hash moves to validation after
  # the train builder has tokenized it (one record per batch here).
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(sources, "TOKENIZE_BATCH_CHARS", 1)
  recs = [r for r in _records(80, seed=2) if data.doc_hash(json.dumps(r, sort_keys=True)) % 100]
  src = _write(tmp_path / "five.jsonl", recs[:5])
  sp = data.load_tokenizer()
  for split in ("validation", "train"):
    want = sft.tokenize_examples(sft.split_records([(r, "") for r in recs[:5]], split), sp)
    ex = sft.cached_examples(str(src), split, sp, [src], ["f"])
    assert len(ex) == len(want)
    np.testing.assert_array_equal(ex.tokens, np.concatenate([t for t, _ in want]))
    np.testing.assert_array_equal(ex.trained, np.concatenate([m for _, m in want]))


def test_the_cli_prints_the_packages_warnings_as_one_line(monkeypatch, capsys):
  # The seq_len warning above reached CLI users as Python's format: a library path, a
  # line number and a source line of galore_jax. The CLI prints its own warnings as it
  # prints its notes; other packages' warnings keep Python's format.
  from galore_jax import cli

  def command(argv):
    here = sft.__file__
    warnings.warn_explicit("3 of 9 train example(s) have no trained token", UserWarning, here, 1)
    warnings.warn_explicit("from elsewhere", UserWarning, "/elsewhere/lib.py", 7)
    return 0

  monkeypatch.setattr(cli, "_run_command", command)
  with pytest.warns(UserWarning, match="from elsewhere"):  # to the default (here pytest's)
    assert cli._main([]) == 0
  err = capsys.readouterr().err
  assert "galore-jax: warning: 3 of 9 train example(s) have no trained token\n" in err
  assert "sft.py" not in err and "galore-jax: warning: from elsewhere" not in err
  # In a job, process 0 alone says it (every process reads the same data).
  from galore_jax import distributed

  assert not distributed.joined_as_another_process()  # a test process joins no job
  monkeypatch.setattr(distributed, "joined_as_another_process", lambda: True)
  with pytest.warns(UserWarning, match="from elsewhere"):
    assert cli._main([]) == 0
  assert "galore-jax: warning" not in capsys.readouterr().err


def test_parquet_rows_are_instruction_records_as_json_lines_are(tmp_path, monkeypatch):
  """A Hub dataset's Parquet file (prompt/completion columns, or ``messages`` as a list of
  structs) gives the records, and so the batches, of the same data as JSON lines; columns
  the records do not use are not read into them; a text Parquet file stays text."""
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  records = _records(300)
  src = _write(tmp_path / "sft.jsonl", records)
  table = [{"id": i, "score": 0.5, **r} for i, r in enumerate(records)]
  pq.write_table(pa.Table.from_pylist(table), tmp_path / "sft.parquet")
  assert sft.instruction_format([tmp_path / "sft.parquet"]) == "prompt"
  assert [r for r, _ in data.records(tmp_path / "sft.parquet")] == records
  for split in ("train", "validation"):
    assert _same(_batches(tmp_path / "sft.parquet", split), _batches(src, split))

  chats = [
    {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": c}]}
    for r, c in zip(records, ["yes", "no", "maybe"] * 100, strict=True)
  ]
  pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chat.parquet")
  rows = list(data.records(tmp_path / "chat.parquet"))
  assert [r for r, _ in rows] == chats and rows[7][1] == f"{tmp_path / 'chat.parquet'} [row 7]"
  assert sft.instruction_format([tmp_path / "chat.parquet"]) == "chat"

  pq.write_table(pa.Table.from_pylist([{"text": "a b c", "id": 1}]), tmp_path / "text.parquet")
  assert sft.instruction_format([tmp_path / "text.parquet"]) is None


def _alpaca(n, seed=0):
  rng = random.Random(seed)
  words = "the of and a to in is you that it he was for on are as with his".split()
  say = lambda k: " ".join(rng.choice(words) for _ in range(k))
  return [
    {"instruction": f"task {i}: {say(4)}", "input": say(3) if i % 3 else "", "output": say(5)}
    for i in range(n)
  ]


def test_alpaca_records_train_on_the_output_after_the_alpaca_prompt(tmp_path, monkeypatch):
  """Stanford Alpaca's {"instruction", "input", "output"} (tatsu-lab/alpaca and the many sets
  in its form) trains as the Alpaca project laid it out: its prompt (the short one without
  an input) untrained, the output and EOS trained; sample's --format alpaca is the same head.
  From Parquet only its columns are read (tatsu-lab/alpaca's "text" holds the example again),
  so the batches equal the JSON file's."""
  sp = data.load_tokenizer()
  with_input = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\none two\n\n### Response:\n"
  )
  without = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
  )
  recs = [
    {"instruction": "Add the numbers.", "input": "one two", "output": "three"},
    {"instruction": "Say hi.", "input": "", "output": "hi there"},
    {"instruction": "Say hi.", "output": "hi there", "text": "ignored"},  # no input: the same
  ]
  # sample --format alpaca asks with the instruction, or the instruction and its input.
  asks = [{"instruction": "Add the numbers.", "input": "one two"}, "Say hi.", "Say hi."]
  got = sft.tokenize_examples([(r, "rec") for r in recs], sp)
  for (toks, trained), prompt, rec, ask in zip(
    got, [with_input, without, without], recs, asks, strict=True
  ):
    # The output goes on from the prompt, as the whole text is encoded.
    head, whole = [sp.bos_id(), *sp.encode(prompt)], sp.encode(prompt + rec["output"])
    assert toks.tolist() == [sp.bos_id(), *whole, sp.eos_id()]
    assert trained.tolist() == [False] * len(head) + [True] * (len(whole) + 2 - len(head))
    assert sft.prompt_ids(sp, ask, "alpaca") == head  # the example's untrained head
  for bad, says in [
    ({"instruction": 3, "output": "x"}, '"instruction" and "input" must be strings'),
    ({"instruction": "x", "input": ["y"], "output": "x"}, '"instruction" and "input" must be'),
    ({"instruction": "x", "output": None}, '"output" must be a string'),
  ]:
    with pytest.raises(ValueError, match="^rec 4: ") as e:
      sft.tokenize_examples([(bad, "rec 4")], sp)
    assert says in str(e.value)
  with pytest.raises(ValueError, match="use --format alpaca"):
    sft.prompt_ids(sp, {"instruction": "x"}, "prompt")

  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  records = _alpaca(300)
  src = tmp_path / "alpaca_data.json"  # Alpaca's own file is one JSON array
  src.write_text(json.dumps(records))
  table = [{**r, "text": r["instruction"] + r["output"], "id": i} for i, r in enumerate(records)]
  pq.write_table(pa.Table.from_pylist(table), tmp_path / "alpaca.parquet")
  assert [r for r, _ in data.records(tmp_path / "alpaca.parquet")] == records
  assert sft.instruction_format([tmp_path / "alpaca.parquet"]) == "alpaca"
  for split in ("train", "validation"):
    # (seq_len 96: the Alpaca prompt alone is 62 tokens of the bundled tokenizer.)
    parquet = _batches(tmp_path / "alpaca.parquet", split, seq_len=96)
    assert _same(parquet, _batches(src, split, seq_len=96))
    assert any(b["mask"].any() for b in parquet)
  cfg = data.DataConfig(source=str(src), seq_len=96, batch_size=4)
  assert data.make_dataset(cfg).data_format == "alpaca"
  # A prompt/completion set that also has an "input" column reads as before: its records
  # (so its split) do not change.
  pc = [{**r, "input": "x"} for r in _records(5)]
  pq.write_table(pa.Table.from_pylist(pc), tmp_path / "pc.parquet")
  assert [r for r, _ in data.records(tmp_path / "pc.parquet")] == _records(5)
  assert sft.instruction_format([tmp_path / "pc.parquet"]) == "prompt"


def test_columns_read_a_datasets_own_names_as_instruction_records(tmp_path, monkeypatch):
  """--columns input=context,output=response reads databricks-dolly-15k's records as Alpaca
  records, from JSON lines and Parquet alike (the same batches as the Alpaca file); a
  column missing from a record is an error naming the record and the mapping."""
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  columns = {"input": "context", "output": "response"}
  alpaca = _alpaca(300)
  dolly = [
    {"instruction": r["instruction"], "context": r["input"], "response": r["output"]}
    for r in alpaca
  ]
  (tmp_path / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dolly))
  # (Parquet rows are read as the fields they give; a JSON record keeps its other keys.)
  table = [{**r, "category": "open_qa"} for r in dolly]
  pq.write_table(pa.Table.from_pylist(table), tmp_path / "dolly.parquet")
  (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
  parquet = [r for r, _ in data.records(tmp_path / "dolly.parquet", columns=columns)]
  assert parquet == alpaca  # only the fields read ("category" is not)
  for f in ("dolly.jsonl", "dolly.parquet"):
    assert sft.instruction_format([tmp_path / f]) is None  # text, without the mapping
    assert sft.instruction_format([tmp_path / f], columns) == "alpaca"

  def batches(src, spec=None):
    cfg = data.DataConfig(source=str(src), seq_len=96, batch_size=4, columns=spec)
    return [data.make_dataset(cfg).batch(s) for s in range(3)] + list(data.eval_batches(cfg))

  want = batches(tmp_path / "alpaca.jsonl")
  for f in ("dolly.jsonl", "dolly.parquet"):
    assert _same(batches(tmp_path / f, "input=context,output=response"), want)

  (tmp_path / "short.jsonl").write_text(json.dumps({"instruction": "x", "context": ""}) + "\n")
  with pytest.raises(ValueError, match=re.escape('short.jsonl:1: no "response" (--columns output')):
    list(data.records(tmp_path / "short.jsonl", columns=columns))


def _chat_tokenizer(root):
  """A small tokenizer.json whose tokenizer_config.json has a chat template."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  special = ["<unk>", "<s>", "</s>"]
  bpe = tokenizers.trainers.BpeTrainer(vocab_size=90, special_tokens=special, show_progress=False)
  tok.train_from_iterator(["what is two add two ? four and one add one two be brief"] * 9, bpe)
  tok.save(str(root / "tokenizer.json"))
  template = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
  )
  config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}
  (root / "tokenizer_config.json").write_text(json.dumps(config))
  return root / "tokenizer.json"


def test_sharegpt_conversations_are_read_as_messages(tmp_path):
  """ShareGPT's {"conversations": [{"from", "value"}]} (many Hub datasets) tokenizes as the
  same chat in "messages" form, in JSON lines and in Parquet; unknown speakers and
  malformed turns are errors naming the record."""
  tok = data.load_tokenizer(_chat_tokenizer(tmp_path))
  turns = [("system", "be brief"), ("user", "what is two add two ?"), ("assistant", "four")]
  messages = {"messages": [{"role": r, "content": c} for r, c in turns]}
  speakers = {"system": "system", "user": "human", "assistant": "gpt"}
  sharegpt = {"conversations": [{"from": speakers[r], "value": c} for r, c in turns]}
  (want,), (got,) = (sft.tokenize_examples([(r, "rec")], tok) for r in (messages, sharegpt))
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  assert want[1].any() and not want[1].all()

  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  pq.write_table(pa.Table.from_pylist([sharegpt, sharegpt]), tmp_path / "chat.parquet")
  assert sft.instruction_format([tmp_path / "chat.parquet"]) == "chat"
  assert [r for r, _ in data.records(tmp_path / "chat.parquet")] == [sharegpt, sharegpt]

  for bad, why in [
    ({"conversations": [{"from": "bot", "value": "x"}]}, "the speaker 'bot'; expected one of"),
    ({"conversations": [{"from": "gpt"}]}, 'must be a list of {"from", "value"} objects'),
  ]:
    with pytest.raises(ValueError, match="^rec 7: ") as e:
      sft.tokenize_examples([(bad, "rec 7")], tok)
    assert why in str(e.value)


def test_preview_shows_what_training_takes_the_loss_on(tmp_path, capsys):
  """galore-jax preview: the first records as examples, the trained tokens in [[ ]] (special
  tokens by name), and what --seq-len cuts off, in the form and through the --columns a run
  would read; bad flags are one line naming the flag."""
  from galore_jax import cli

  dolly = [
    {"instruction": "Say hi.", "context": "", "response": "hi there"},
    {"instruction": "Add.", "context": "one two " * 40, "response": "three"},
  ]
  (tmp_path / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dolly))
  args = ["preview", "--data", str(tmp_path / "dolly.jsonl"), "--seq-len", "80"]
  assert cli.main([*args, "--columns", "input=context,output=response"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(
    f"--data {tmp_path / 'dolly.jsonl'}: Alpaca records in the Alpaca prompt; "
    "the loss is on the [[marked]] tokens\n\n"
  )
  sp = data.load_tokenizer()
  n = len(sp.encode(sft.alpaca_prompt("Say hi."))) + len(sp.encode("hi there")) + 2
  assert f"dolly.jsonl:1: {n} tokens, {len(sp.encode('hi there')) + 1} trained\n<s>Below" in out
  assert out.count("### Response:\n[[hi there</s>]]") == 1
  assert "dolly.jsonl:2: " in out and "so the last" in out and "this example trains nothing" in out
  # Without the mapping the records are text: the text reader's error, one line.
  assert cli.main(args) == 2
  assert "--columns text=FIELD reads another" in capsys.readouterr().err

  # A chat: the template's text, the assistant's turn (and its EOS) marked.
  tokfile = _chat_tokenizer(tmp_path)
  chat = {"messages": [{"role": "user", "content": "two add two ?"}]}
  chat["messages"].append({"role": "assistant", "content": "four"})
  (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
  assert (
    cli.main(["preview", "--data", str(tmp_path / "chat.jsonl"), "--tokenizer", str(tokfile)]) == 0
  )
  out = capsys.readouterr().out
  assert "chat records in the chat template" in out
  assert "[[" in out and out.rstrip().endswith("</s>]]"), out
  for bad, flag in [(["--examples", "0"], "--examples"), (["--columns", "x"], "--columns")]:
    assert cli.main(["preview", *bad]) == 2
    assert capsys.readouterr().err.startswith(f"galore-jax: error: {flag}: ")


@pytest.mark.parametrize(
  "pre,after_bos",
  [("byte_level", ""), ("metaspace_first", " "), ("metaspace_always", "")],
)
def test_the_export_chat_template_tokenizes_as_training_did(tmp_path, pre, after_bos):
  """export's chat template for prompt/completion and Alpaca runs: rendered (as transformers
  renders it) and tokenized whole, it gives the ids training gave the prompt, [BOS] and the
  prompt tokenized alone, for a byte-level BPE (Llama 3, Qwen2) and for Metaspace tokenizers,
  whose text after a special token may lack the word-start marker."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = {
    "byte_level": tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False),
    "metaspace_first": tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first"),
    "metaspace_always": tokenizers.pre_tokenizers.Metaspace(prepend_scheme="always"),
  }[pre]
  tok.decoder = (
    tokenizers.decoders.ByteLevel() if pre == "byte_level" else tokenizers.decoders.Metaspace()
  )
  bpe = tokenizers.trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<unk>", "<s>", "</s>"],
    show_progress=False,
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet() if pre == "byte_level" else [],
  )
  text = sft.ALPACA_PROMPT.format(instruction="Say hi to the world.") + "hi there"
  given = sft.ALPACA_PROMPT_WITH_INPUT.format(instruction="Say hi to the world.", input="Be brief.")
  tok.train_from_iterator([text, given, "Below is an instruction."] * 20, bpe)
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
  )
  tok = data.load_tokenizer(tmp_path / "tokenizer.json")
  assert sft._after_bos(tok) == after_bos
  inner = tok.tok
  for form in ("prompt", "alpaca"):
    template = sft.export_chat_template(form, tok)
    user = [{"role": "user", "content": "Say hi to the world."}]
    rendered = sft.render_chat(
      template, user, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
    )
    ids = inner.encode(rendered, add_special_tokens=False).ids
    assert ids == sft.prompt_ids(tok, "Say hi to the world.", form), (form, rendered)
    reply = [*user, {"role": "assistant", "content": "hi there"}]
    full = sft.render_chat(
      template, reply, add_generation_prompt=False, bos_token="<s>", eos_token="</s>"
    )
    assert full == rendered + "hi there</s>"
    # Training's reply goes on from the prompt, as the rendered example encodes whole (a
    # Metaspace tokenizer gave a reply encoded alone a word-start marker: "hi" as "▁hi").
    for said in ("yes sir", " yes sir"):  # (no piece of this tokenizer spans the boundary)
      rec = {"prompt": "Say hi to the world.", "completion": said}
      if form == "alpaca":
        rec = {"instruction": "Say hi to the world.", "output": said}
      ((toks, _),) = sft.tokenize_examples([(rec, "x")], tok)
      example = [*user, {"role": "assistant", "content": said}]
      whole = sft.render_chat(
        template, example, add_generation_prompt=False, bos_token="<s>", eos_token="</s>"
      )
      assert inner.encode(whole, add_special_tokens=False).ids == toks.tolist(), (form, said)
    with pytest.raises(ValueError, match="give one user message"):
      sft.render_chat(
        template, reply[1:], add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
      )
    # An Alpaca record's input: the template variable (apply_chat_template's keyword, vLLM's
    # chat_template_kwargs); an empty one is no input, as in training.
    for given in ("Be brief.", ""):
      rendered = sft.render_chat(
        template, user, add_generation_prompt=True, bos_token="<s>", eos_token="</s>",
        **{sft.ALPACA_INPUT_VARIABLE: given},
      )  # fmt: skip
      ids = inner.encode(rendered, add_special_tokens=False).ids
      ask = {"instruction": "Say hi to the world.", "input": given} if form == "alpaca" else None
      assert ids == sft.prompt_ids(tok, ask or "Say hi to the world.", form), (form, rendered)
  # transformers passes apply_chat_template's keywords to the template as the variable.
  transformers = pytest.importorskip("transformers")
  auto = transformers.PreTrainedTokenizerFast(
    tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<s>", eos_token="</s>"
  )
  auto.chat_template = sft.export_chat_template("alpaca", tok)
  given = {sft.ALPACA_INPUT_VARIABLE: "Be brief."}
  text = auto.apply_chat_template(user, add_generation_prompt=True, tokenize=False, **given)
  assert text == sft.render_chat(
    auto.chat_template, user, add_generation_prompt=True, bos_token="<s>", eos_token="", **given
  )
  assert "### Input:\nBe brief.\n\n### Response:\n" in text
  # The export's model card shows both layouts, and where the input goes.
  run = {"model": "llama_tiny", "optimizer": "adamw", "data": "alpaca.jsonl", "steps": 4}
  card = hf.model_card(run, 4, form="alpaca", chat_template=auto.chat_template, bos_token="<s>")
  assert "### Instruction:\n<your message>\n\n### Response:" in card
  assert "### Instruction:\n<your instruction>\n\n### Input:\n<its input>\n\n" in card
  assert f"template variable `{sft.ALPACA_INPUT_VARIABLE}`" in card
  assert (
    sft.export_chat_template("chat", tok) is None and sft.export_chat_template("text", tok) is None
  )
