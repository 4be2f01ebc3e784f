"""Hugging Face checkpoints in and out (``galore_jax.hf``), fine-tuning data (``galore_jax.sft``).

Every model is a tiny random one built here with transformers and saved with its own
``save_pretrained`` (offline, nothing downloaded): transformers is the independent
reference for the logits, the file layout and the loss of an exported model.
"""

import dataclasses
import inspect
import json
import os
import random
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from galore_jax import cli, data, hf, sample, sft, train, trainer
from galore_jax import model as M
from galore_jax.config import TrainConfig

pytestmark = pytest.mark.reference

torch = pytest.importorskip("torch", reason="needs the reference extra")
transformers = pytest.importorskip("transformers", reason="needs the reference extra")
tokenizers = pytest.importorskip("tokenizers")
safetensors = pytest.importorskip("safetensors")

WORDS = (
  "the a cat dog sat ran on under mat tree red blue big small and then it was one two three "
  "four five six seven eight nine ten add plus is answer what why how sun moon star sky"
).split()
CHAT_TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
  "{% else %}Bot: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
  "{% if add_generation_prompt %}Bot:{% endif %}"
)


def _sentences(n, seed=0):
  rng = random.Random(seed)
  return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  """A 200-id BPE tokenizer.json (tokenizers library) with BOS / EOS and a chat template."""
  d = tmp_path_factory.mktemp("tok")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  tok.decoder = tokenizers.decoders.Metaspace()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
  )
  tok.train_from_iterator(_sentences(500), trainer)
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(
    json.dumps(
      {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
      }
    )
  )
  return d


def _llama_config(arch="llama", *, kv=4, tie=False, theta=10000.0, llama3=None, vocab=256):
  """A transformers config across 4.x (rope_theta / rope_scaling) and 5.x (rope_parameters)."""
  cls = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}.get(
    arch, transformers.LlamaConfig
  )
  kwargs = dict(
    vocab_size=vocab,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=kv,
    num_hidden_layers=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=tie,
    initializer_range=0.05,  # logits of order 1, so 1e-5 parity is a real check
    bos_token_id=1,
    eos_token_id=2,
  )
  if arch == "mistral":
    kwargs["sliding_window"] = None
  rope = {"rope_type": "default"}
  if llama3:
    rope = {"rope_type": "llama3", **llama3}
  if "rope_parameters" in inspect.signature(cls.__init__).parameters:
    kwargs["rope_parameters"] = {**rope, "rope_theta": theta}
  else:
    kwargs["rope_theta"] = theta
    kwargs["rope_scaling"] = rope if llama3 else None
  return cls(**kwargs)


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
LLAMA3["original_max_position_embeddings"] = 16  # short, so scaling matters at 48 positions
CASES = {
  "gqa": dict(kv=2),
  "tied": dict(tie=True),
  "llama3_rope": dict(kv=2, theta=500000.0, llama3=LLAMA3),
  "mistral": dict(arch="mistral", kv=2),
  # Qwen2.5's small models: grouped-query attention, tied table, theta 1e6, q/k/v biases.
  "qwen2": dict(arch="qwen2", kv=2, tie=True, theta=1e6),
}


def _save_hf(path, seed=0, **kw):
  torch.manual_seed(seed)
  config = _llama_config(**kw)
  cls = {"mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}.get(
    kw.get("arch"), transformers.LlamaForCausalLM
  )
  model = cls(config).eval()
  with torch.no_grad():  # transformers zeroes biases at init; real ones are not zero
    for name, p in model.named_parameters():
      if name.endswith(".bias"):
        p.normal_(0.0, 0.5)
  model.save_pretrained(path)
  return model


def _logits(config, params, tokens):
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: M.Llama(config, rngs=nnx.Rngs(0))), nnx.Param)
  return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens)))


TOKENS = np.random.RandomState(0).randint(0, 256, (2, 48))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {name: (root / name, _save_hf(root / name, **kw)) for name, kw in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_logit_parity_with_transformers(hf_models, case):
  path, ref = hf_models[case]
  config, params = hf.load_pretrained(path)
  ours = _logits(config, params, TOKENS)
  with torch.no_grad():
    theirs = ref(torch.tensor(TOKENS)).logits.numpy()
  err = np.abs(ours - theirs).max()
  assert np.abs(theirs).max() > 0.5  # not a vacuous comparison of near-zero logits
  assert err <= 1e-5, (case, err)
  if case == "llama3_rope":  # the scaling is really applied: without it the logits differ
    plain = _logits(dataclasses.replace(config, rope_scaling=None), params, TOKENS)
    assert np.abs(plain - theirs).max() > 1e-3
  if case == "tied":
    assert "lm_head" not in params and config.tie_embeddings
  if case in ("gqa", "llama3_rope", "mistral", "qwen2"):
    assert params["layers"][0]["attn"]["k_proj"]["kernel"].shape == (64, 32)
  if case == "qwen2":  # the biases are really applied: without them the logits differ
    assert config.qkv_bias and params["layers"][1]["attn"]["k_proj"]["bias"].shape == (32,)
    assert "bias" not in params["layers"][0]["attn"]["o_proj"]
    zero = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if p[-1].key == "bias" else x, params
    )
    assert np.abs(_logits(config, zero, TOKENS) - theirs).max() > 1e-2
  else:
    assert not config.qkv_bias


def _tensors(path):
  files = hf.weight_files(path)
  out = {}
  for name, file in files.items():
    with safetensors.safe_open(str(file), "numpy") as f:
      out[name] = f.get_tensor(name)
  return out


@pytest.mark.parametrize("case", ["gqa", "tied", "llama3_rope", "qwen2"])
def test_round_trip_is_bit_exact(hf_models, tmp_path, case):
  path, _ = hf_models[case]
  config, params = hf.load_pretrained(path)
  out = tmp_path / "exported"
  hf.save_pretrained(out, config, params, dtype="float32")
  a, b = _tensors(path), _tensors(out)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype == np.float32
    assert np.array_equal(a[name].view(np.uint32), b[name].view(np.uint32)), name
  assert hf.read_config(out) == hf.read_config(path)
  if case == "qwen2":  # written back as Qwen2, which transformers runs with our logits
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
      theirs = back(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(_logits(config, params, TOKENS) - theirs).max() <= 1e-5


def test_sharded_files_load(hf_models, tmp_path):
  path, ref = hf_models["llama3_rope"]
  config, params = hf.load_pretrained(path)

  # Our sharded export: several files and an index; we and transformers read it back.
  sharded = tmp_path / "sharded"
  hf.save_pretrained(sharded, config, params, max_shard_bytes=40_000)
  index = json.loads((sharded / hf.INDEX_FILE).read_text())
  # Every file with config.json's mode (the umask's), the weights too (safetensors: 0600).
  modes = {f.stat().st_mode & 0o777 for f in sharded.iterdir()}
  assert modes == {(sharded / hf.CONFIG_FILE).stat().st_mode & 0o777}, modes
  assert len(set(index["weight_map"].values())) > 2
  _, again = hf.load_pretrained(sharded)
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), params, again))
  back = transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()
  with torch.no_grad():
    diff = (back(torch.tensor(TOKENS)).logits - ref(torch.tensor(TOKENS)).logits).abs().max()
  assert float(diff) == 0.0

  # transformers' own sharded layout loads too, straight into an fsdp sharding and bf16.
  theirs = tmp_path / "theirs"
  ref.save_pretrained(theirs, max_shard_size="40KB")
  assert (theirs / hf.INDEX_FILE).is_file()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2), ("data", "fsdp"))
  abstract = hf.abstract_params(config)
  shardings = train.shardings_for(abstract, mesh)
  _, split = hf.load_pretrained(theirs, shardings=shardings, param_dtype=jnp.bfloat16)
  q = split["layers"][1]["attn"]["q_proj"]["kernel"]
  assert (
    q.dtype == jnp.bfloat16
    and q.sharding.spec == shardings["layers"][1]["attn"]["q_proj"]["kernel"].spec
  )
  assert len(q.sharding.device_set) == 2
  want = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16)), params)
  assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, np.asarray(y)), want, split))


def _one_line_error(fn, exc=ValueError):
  with pytest.raises(exc) as info:
    fn()
  msg = str(info.value)
  assert "\n" not in msg and msg
  return msg


def test_bad_checkpoints_give_one_line_errors(hf_models, tmp_path):
  import shutil

  src, _ = hf_models["gqa"]
  blob = (src / hf.SINGLE_FILE).read_bytes()

  def variant(name, data=None, config=None):
    d = tmp_path / name
    shutil.copytree(src, d)
    if data is not None:
      (d / hf.SINGLE_FILE).write_bytes(data)
    if config is not None:
      cfg = json.loads((d / "config.json").read_text())
      cfg.update(config)
      (d / "config.json").write_text(json.dumps(cfg))
    return d

  d = variant("truncated", blob[: len(blob) // 2])
  assert "model.safetensors" in _one_line_error(lambda: hf.load_pretrained(d))
  d = variant("corrupt", b"\x20\0\0\0\0\0\0\0" + b"{this is not a header}" + blob[40:])
  assert "corrupt or truncated" in _one_line_error(lambda: hf.load_pretrained(d))

  d = tmp_path / "shards"
  config, params = hf.load_pretrained(src)
  hf.save_pretrained(d, config, params, max_shard_bytes=40_000)
  shards = sorted(set(json.loads((d / hf.INDEX_FILE).read_text())["weight_map"].values()))
  assert len(shards) > 2
  (d / shards[1]).unlink()
  msg = _one_line_error(lambda: hf.load_pretrained(d), FileNotFoundError)
  assert shards[1] in msg and "missing" in msg

  for field, change in [
    ("architectures", {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}),
    ("attention_bias", {"attention_bias": True}),
    (
      "rope_scaling",
      {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None},
    ),
    ("head_dim", {"head_dim": 32}),
    ("unknown_field", {"unknown_field": 1}),
    ("quantization_config", {"quantization_config": {"quant_method": "gptq"}}),
  ]:
    d = variant(field, config=change)
    assert field in _one_line_error(lambda d=d: hf.load_pretrained(d)), field
  # A Llama directory labelled Qwen2 lacks the biases; Qwen2 weights labelled Llama have
  # tensors the model has no place for.
  d = variant("as_qwen2", config={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})
  assert "_proj.bias is missing" in _one_line_error(lambda: hf.load_pretrained(d))
  q = tmp_path / "qwen_as_llama"
  shutil.copytree(hf_models["qwen2"][0], q)
  cfg = json.loads((q / "config.json").read_text())
  (q / "config.json").write_text(
    json.dumps({**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama"})
  )
  assert "has no place" in _one_line_error(lambda: hf.load_pretrained(q))

  # The CLI: galore-jax: error: --init-from: why, exit code 2, no traceback.
  d = variant("cli", config={"mlp_bias": True})
  import contextlib
  import io

  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = cli.main(["train", "--init-from", str(d), "--out", str(tmp_path / "run")])
  lines = err.getvalue().strip().splitlines()
  assert code == 2 and len(lines) == 1 and lines[0].startswith("galore-jax: error: --init-from:")
  assert "mlp_bias" in lines[0]


@pytest.mark.parametrize(
  "command,flags,flag,why",
  [
    # --init-from's config.json is the architecture: another one named beside it is an error,
    # not silently ignored.
    ("train", ["--model", "llama_60m"], "--model", "both name the architecture"),
    ("plan", ["--model", "llama_60m", "--no-compile"], "--model", "both name the architecture"),
    # Messages name the model trained: the directory, not the default --model.
    ("train", ["--rank", "100000"], "--rank", "dimension of {d} (64)"),
    ("train", ["--seq-len", "100000"], "--seq-len", "exceeds {d}'s maximum sequence length"),
  ],
)
def test_init_from_flags_are_checked_against_its_directory(
  hf_models, tmp_path, capsys, command, flags, flag, why
):
  d = str(hf_models["gqa"][0])
  out = ["--out", str(tmp_path / "run")] if command == "train" else []
  assert cli.main([command, "--init-from", d, *out, *flags]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"galore-jax: error: {flag}: ") and len(err.splitlines()) == 1, err
  assert why.format(d=d) in err and "llama_tiny" not in err, err
  assert not (tmp_path / "run").exists()


def test_default_run_directory_is_named_after_the_init_from_model(tmp_path):
  cfg = TrainConfig(init_from=str(tmp_path / "Llama-3.2-1B") + "/", optimizer="galore_adamw")
  assert trainer.default_out(cfg).startswith(os.path.join("runs", "Llama-3.2-1B_galore_adamw_"))
  assert trainer.default_out(TrainConfig()).startswith(os.path.join("runs", "llama_tiny_galore"))


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _arith(n, seed=0):
  rng = random.Random(seed)
  num = lambda k: WORDS[17 + k]  # one .. ten
  out = []
  for _ in range(n):
    a, b = rng.randint(1, 4), rng.randint(1, 5)
    out.append({"prompt": f"what is {num(a)} add {num(b)} ?", "completion": f" {num(a + b)}"})
  return out


def test_a_null_bos_token_places_no_bos(tok_dir, tmp_path):
  """Qwen2's tokenizer_config.json says "bos_token": null while its config.json names a
  bos_token_id that transformers never adds: instruction examples then start with the
  prompt, as the model saw them."""
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
  (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
  assert hf.load_tokenizer(tmp_path).bos_id() == 1  # "<s>" in tokenizer_config.json
  tcfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({**tcfg, "bos_token": None}))
  tok = hf.load_tokenizer(tmp_path)
  assert tok.bos_id() == -1 and tok.eos_id() == 2
  rec = {"prompt": "what is one add two ?", "completion": " three"}
  ((toks, trained),) = sft.tokenize_examples([(rec, "rec")], tok)
  assert toks.tolist() == tok.encode(rec["prompt"]) + tok.encode(rec["completion"]) + [2]
  assert trained.sum() == len(tok.encode(" three")) + 1


def test_replies_cut_off_by_seq_len_are_reported(tok_dir, tmp_path):
  """An example whose reply starts beyond the row's seq_len + 1 tokens trains nothing: a
  warning counts them, and a split of nothing else is an error, not a loss of 0."""
  long = " ".join(_sentences(6, seed=3))  # far more than 16 tokens
  short = [{"prompt": f"what is {w} ?", "completion": " three"} for w in WORDS[:20]]
  cut = [{"prompt": f"{w} {long}", "completion": " big"} for w in WORDS[:20]]
  tokfile = str(tok_dir / "tokenizer.json")

  def dataset(records, name):
    f = _write_jsonl(tmp_path / name, records)
    return data.make_dataset(
      data.DataConfig(source=str(f), seq_len=16, batch_size=2, tokenizer=tokfile), "train"
    )

  with pytest.warns(UserWarning, match=r"\b(19|20) of (39|40) train example\(s\) have no trained"):
    dataset(short + cut, "mixed.jsonl")
  with pytest.raises(ValueError, match="nothing to learn from; raise --seq-len"):
    dataset(cut, "cut.jsonl")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    dataset(short, "short.jsonl")


def test_prompt_tokens_get_no_gradient(tok_dir, tmp_path):
  tok = data.load_tokenizer(str(tok_dir / "tokenizer.json"))
  recs = [{"prompt": "what is one add two ?", "completion": " three and then the sun"}] * 3
  recs += [{"prompt": s, "completion": " it was big"} for s in _sentences(40, seed=1)]
  f = _write_jsonl(tmp_path / "sft.jsonl", recs)
  cfg = data.DataConfig(
    source=str(f),
    seq_len=24,
    batch_size=4,
    tokenizer=str(tok_dir / "tokenizer.json"),
    packing=False,  # one example per row, to read each row's mask (packed: test_sft.py)
  )
  ds = data.make_dataset(cfg, "train")
  batch = ds.batch(0)

  # The mask: 0 on every target inside [BOS] + prompt, 1 on the completion and its EOS.
  for row in range(4):
    inputs, mask = batch["inputs"][row], batch["mask"][row]
    assert inputs[0] == tok.bos_id()
    n_trained = int(mask.sum())
    first = int(np.argmax(mask))
    assert n_trained > 0 and mask[first : first + n_trained].all() and mask[:first].sum() == 0
    assert batch["targets"][row][first + n_trained - 1] == tok.eos_id()

  # The gradient: changing the prompt's targets changes neither loss nor gradient, and
  # the logits at prompt positions get exactly zero gradient.
  config = M.LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=4, num_layers=1
  )
  params = M.init_params(config, seed=0)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: M.Llama(config, rngs=nnx.Rngs(0))), nnx.Param)
  stacked = {k: v[None] for k, v in batch.items()}
  scrambled = dict(stacked, targets=np.where(stacked["mask"] > 0, stacked["targets"], 7))

  @jax.jit
  def both(params, a, b):
    logits = nnx.merge(graphdef, params)(a["inputs"][0])
    d_logits = jax.grad(lambda lg: train._summed_cross_entropy(lg, jax.tree.map(lambda x: x[0], a)))
    return (
      train.mean_token_gradient(graphdef, params, a),
      train.mean_token_gradient(graphdef, params, b),
      d_logits(logits),
    )

  (loss, count, grads), (loss2, _, grads2), g = jax.device_get(both(params, stacked, scrambled))
  assert float(count) == float(batch["mask"].sum())
  assert float(loss) == float(loss2)
  assert jax.tree.all(jax.tree.map(np.array_equal, grads, grads2))
  prompt = batch["mask"] == 0
  assert np.abs(g[prompt]).max() == 0.0
  assert (np.abs(g[~prompt]).max(axis=-1) > 0).all()


def test_chat_messages_train_on_assistant_turns(tok_dir, tmp_path):
  tok = data.load_tokenizer(str(tok_dir))
  conv = {
    "messages": [
      {"role": "user", "content": "what is two add two ?"},
      {"role": "assistant", "content": "four"},
      {"role": "user", "content": "and one add one ?"},
      {"role": "assistant", "content": "two"},
    ]
  }
  ((toks, trained),) = sft.tokenize_examples([(conv, "rec")], tok)
  text = tok.decode(toks[trained].tolist())
  assert text.replace(" ", "") == "fourtwo"  # both answers, each with its EOS (skipped here)
  assert (toks[trained] == tok.eos_id()).sum() == 2
  assert toks[0] == tok.bos_id() and not trained[0]
  with pytest.raises(ValueError, match="chat template"):
    sft.tokenize_examples([(conv, "rec")], data.load_tokenizer(None))


def test_cached_chat_examples_follow_the_chat_template(tok_dir, tmp_path, monkeypatch):
  # The token cache of a chat set is keyed by the template too: the same tokenizer.json
  # with another template renders (and caches) the conversations anew.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  convs = [
    {"messages": [{"role": "user", "content": s}, {"role": "assistant", "content": "yes"}]}
    for s in _sentences(60, seed=4)
  ]
  f = _write_jsonl(tmp_path / "chat.jsonl", convs)
  other = tmp_path / "tok"
  other.mkdir()
  (other / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
  tcfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
  tcfg["chat_template"] = CHAT_TEMPLATE.replace("User: ", "Q: ")
  (other / "tokenizer_config.json").write_text(json.dumps(tcfg))

  def first_row(tok):
    cfg = data.DataConfig(source=str(f), seq_len=32, batch_size=2, tokenizer=str(tok))
    return list(data.eval_batches(cfg, 1))[0]["inputs"][0]

  rows = [first_row(tok) for tok in (tok_dir, other, tok_dir)]  # the last from the cache
  np.testing.assert_array_equal(rows[0], rows[2])
  assert not np.array_equal(rows[0], rows[1])  # "Q: ..." rendered, not the cached "User: ..."
  tok = data.load_tokenizer(str(other))
  val = sft.split_records([(c, "") for c in convs], "validation")
  ((want, _),) = sft.tokenize_examples(val[:1], tok)
  np.testing.assert_array_equal(rows[1][: len(want)], want[:32])


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained_run(request, tok_dir, tmp_path_factory):
  """train --init-from (GaLore, per-layer updates) -> export, on instruction data; a Llama 3
  and an (untied) Qwen2 checkpoint, whose q/k/v biases train as plain Adam leaves."""
  root = tmp_path_factory.mktemp("e2e")
  init = root / "init"
  # 256 embedding rows for a 200-id tokenizer: a checkpoint may pad its vocabulary.
  if request.param == "qwen2":
    _save_hf(init, seed=1, arch="qwen2", kv=2, theta=1e6)
  else:
    _save_hf(init, seed=1, kv=2, theta=500000.0, llama3=LLAMA3)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (init / name).write_bytes((tok_dir / name).read_bytes())
  # Sampling defaults and a second stop id, as a released model's generation_config.json has.
  gen = json.loads((init / "generation_config.json").read_text())
  (init / "generation_config.json").write_text(
    json.dumps({**gen, "temperature": 0.6, "top_p": 0.9, "do_sample": True, "eos_token_id": [2, 7]})
  )
  sft_file = _write_jsonl(root / "sft.jsonl", _arith(300))
  docs = [" ".join(_sentences(4, seed=i)) for i in range(700)]  # longer than one window
  held = _write_jsonl(root / "held.jsonl", [{"text": d} for d in docs])
  run = root / "run"
  args = ["train", "--init-from", str(init), "--data", str(sft_file), "--steps", "4"]
  args += ["--batch-size", "4", "--seq-len", "32", "--rank", "8", "--update-proj-gap", "2"]
  args += ["--lr", "0.01", "--eval-every", "4", "--eval-batches", "1", "--save-every", "4"]
  args += ["--out", str(run), "--no-progress"]
  assert cli.main(args) == 0
  out = root / "exported"
  assert cli.main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
  if request.param == "qwen2":  # the biases were trained, not only carried
    before = hf.load_pretrained(init)[1]["layers"][0]["attn"]["q_proj"]["bias"]
    after = hf.load_pretrained(out)[1]["layers"][0]["attn"]["q_proj"]["bias"]
    assert not np.allclose(before, after)
  return dict(arch=request.param, init=init, run=run, out=out, sft=sft_file, held=held)


def _hf_loss(model, batch):
  """transformers' summed loss and token count on ``batch``. A packed batch goes in as
  transformers takes packed sequences: each example's position ids from 0, and a 4D
  additive attention mask that lets a token see only the earlier ones of its example."""
  kw = {}
  if "segments" in batch:
    seg = torch.tensor(batch["segments"], dtype=torch.long)
    L = seg.shape[1]
    seen = (seg[:, :, None] == seg[:, None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
    kw["attention_mask"] = torch.where(seen, 0.0, torch.finfo(torch.float32).min)[:, None]
    kw["position_ids"] = torch.tensor(np.asarray(M.segment_positions(batch["segments"])))
  with torch.no_grad():
    logits = model(torch.tensor(batch["inputs"], dtype=torch.long), **kw).logits.double()
  logp = torch.log_softmax(logits, -1)
  nll = -logp.gather(-1, torch.tensor(batch["targets"], dtype=torch.long)[..., None])[..., 0]
  mask = torch.tensor(batch["mask"], dtype=torch.float64)
  return float((nll * mask).sum()), float(mask.sum())


def test_init_from_export_matches_transformers(trained_run, capsys):
  r = trained_run
  tokfile = str(r["init"] / "tokenizer.json")
  # Training started from the checkpoint's weights: step 1's loss is transformers' loss
  # of the initial model on the same batch (of packed examples: transformers given their
  # positions and a mask that keeps them apart, as it takes packed sequences).
  init_model = transformers.AutoModelForCausalLM.from_pretrained(r["init"], dtype=torch.float32)
  first = data.make_dataset(
    data.DataConfig(source=str(r["sft"]), seq_len=32, batch_size=4, tokenizer=tokfile)
  ).batch(0)
  s, n = _hf_loss(init_model.eval(), first)
  metrics = [json.loads(x) for x in (r["run"] / "metrics.jsonl").read_text().splitlines()]
  assert abs(metrics[0]["loss"] - s / n) < 1e-4, (metrics[0]["loss"], s / n)

  # The export is a transformers model whose loss equals galore-jax eval's on the same
  # windows (eval --data FILE --no-packing, all of FILE; the windows rebuilt here by the
  # data module).
  capsys.readouterr()
  args = ["eval", "--checkpoint", str(r["run"]), "--data", str(r["held"]), "--no-packing"]
  args += ["--eval-batches", "2"]
  assert cli.main([*args, "--json"]) == 0
  ours = json.loads(capsys.readouterr().out)
  exported = transformers.AutoModelForCausalLM.from_pretrained(r["out"], dtype=torch.float32)
  windows = data.eval_batches(
    data.DataConfig(
      source=str(r["held"]), seq_len=32, batch_size=4, packing=False, tokenizer=tokfile
    ),
    2,
    split="all",  # eval of a file the run did not train on: all of it
  )
  sums = [_hf_loss(exported.eval(), b) for b in windows]
  theirs = sum(s for s, _ in sums) / sum(n for _, n in sums)
  assert len(windows) == ours["batches"] == 2 and sum(n for _, n in sums) > 64
  assert ours["split"] == "all"
  assert abs(ours["eval_loss"] - theirs) <= 1e-3, (ours["eval_loss"], theirs)
  print(f"eval loss: galore-jax {ours['eval_loss']:.7f}, transformers {theirs:.7f}")

  # Training changed the weights, and the export carries the run's tokenizer.
  a, b = _tensors(r["init"]), _tensors(r["out"])
  assert not np.array_equal(
    a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"]
  )
  cfg = json.loads((r["out"] / "config.json").read_text())
  assert cfg["eos_token_id"] == 2 and cfg["vocab_size"] == 256
  ids = lambda t: t("the cat sat", add_special_tokens=False)["input_ids"]
  ours_ids = data.load_tokenizer(tokfile).encode("the cat sat")
  assert ids(transformers.PreTrainedTokenizerFast.from_pretrained(r["out"])) == ours_ids
  # AutoTokenizer reads the export as it reads the checkpoint we started from. (For a
  # qwen2 model_type transformers 5 picks its Qwen2 tokenizer class whatever the files say,
  # which re-tokenises this test's Metaspace vocabulary differently, in both directories.)
  auto = ids(transformers.AutoTokenizer.from_pretrained(r["out"]))
  assert auto == ids(transformers.AutoTokenizer.from_pretrained(r["init"]))
  assert auto == ours_ids or cfg["model_type"] == "qwen2"
  # The starting model's generation_config.json survives training: transformers' generate
  # (and vLLM) get its sampling defaults, and EOS with its other stop ids.
  gen = transformers.GenerationConfig.from_pretrained(r["out"])
  assert (gen.temperature, gen.top_p, gen.do_sample) == (0.6, 0.9, True)
  assert gen.eos_token_id == [2, 7] and gen.bos_token_id == 1
  # It is read from the checkpoint: the directory's file may be gone by then.
  moved = r["init"] / "generation_config.moved"
  (r["init"] / "generation_config.json").rename(moved)
  try:
    again = r["out"].parent / "exported_again"
    assert cli.main(["export", "--checkpoint", str(r["run"]), "--out", str(again)]) == 0
  finally:
    moved.rename(r["init"] / "generation_config.json")
  assert transformers.GenerationConfig.from_pretrained(again).to_dict() == gen.to_dict()
  # Export refuses to overwrite.
  assert cli.main(["export", "--checkpoint", str(r["run"]), "--out", str(r["out"])]) == 2

  # The run trained on prompt/completion records: the export's chat template (in place of the
  # base's) gives transformers the ids a prompt had in training, [BOS] prompt, then the
  # reply and EOS. (Not checked for qwen2: transformers 5 tokenises with its own class, above.)
  q, messages = "what is one add two ?", [{"role": "user", "content": "what is one add two ?"}]
  auto_tok = transformers.AutoTokenizer.from_pretrained(r["out"])
  text = auto_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  ours = sft.prompt_ids(data.load_tokenizer(tokfile), q, "prompt")
  assert (
    auto_tok(text, add_special_tokens=False)["input_ids"] == ours or cfg["model_type"] == "qwen2"
  )
  reply = [*messages, {"role": "assistant", "content": " three"}]
  assert auto_tok.apply_chat_template(reply, tokenize=False) == text + " three</s>"
  # Its model card: what was trained how, and that prompt format (no Hub base: a local one).
  import huggingface_hub

  card = huggingface_hub.ModelCard.load(r["out"] / "README.md")
  assert card.data.base_model is None and "galore" in card.data.tags
  assert "Fine-tuned from `init` with GaLore" in card.text
  assert "| GaLore | rank 8, projectors refreshed every 2 steps (`subspace`)" in card.text
  last_eval = [m for m in metrics if "eval_loss" in m][-1]
  assert f"| validation loss | {last_eval['eval_loss']:.4f} at step 4 |" in card.text
  assert "prompt/completion records" in card.text


def test_generation_config_lists_every_stop_id(tok_dir):
  """EOS first, then a chat template's turn-closing token (Qwen's <|im_end|> is not its
  tokenizer's EOS), then the base model's own; the base's sampling defaults are kept."""
  tok = hf.load_tokenizer(tok_dir / "tokenizer.json")
  base = {"eos_token_id": [7, 2], "top_k": 5, "transformers_version": "4.0"}
  gen = hf.generation_config(tok, {9}, base)
  assert gen == {"top_k": 5, "bos_token_id": 1, "eos_token_id": [2, 9, 7]}
  assert hf.generation_config(tok, {2}, None) == {"bos_token_id": 1, "eos_token_id": 2}


def _check_inference_dtypes(r, args, loss32, capsys):
  """eval in bfloat16 (weights and compute) of a Hugging Face directory, and in a bfloat16
  compute dtype of a float32 run: close to float32, not equal."""
  assert cli.main([*args, "--param-dtype", "bfloat16", "--dtype", "bfloat16"]) == 0
  half = json.loads(capsys.readouterr().out)["eval_loss"]
  assert 0 < abs(half - loss32) < 2e-2, (half, loss32)
  _, params16, _, _ = sample.load_for_inference(str(r["init"]), param_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
  # A run's compute dtype may change too (its weights load as trained: float32 here).
  run_args = ["eval", "--checkpoint", str(r["run"]), "--eval-batches", "1", "--json"]
  assert cli.main(run_args) == 0 and cli.main([*run_args, "--dtype", "bfloat16"]) == 0
  full, half = (json.loads(x)["eval_loss"] for x in capsys.readouterr().out.splitlines())
  assert 0 < abs(half - full) < 2e-2, (half, full)


def test_eval_and_sample_read_a_hugging_face_directory(trained_run, tmp_path, capsys, monkeypatch):
  """The model before fine-tuning, straight from its directory: eval's loss is transformers'
  on the same windows, and greedy sampling (through our key / value cache) is transformers'
  greedy generate."""
  r = trained_run
  tokfile = str(r["init"] / "tokenizer.json")
  args = ["eval", "--checkpoint", str(r["init"]), "--data", str(r["held"]), "--no-packing"]
  args += ["--eval-batches", "2", "--batch-size", "4", "--seq-len", "32", "--json"]
  assert cli.main(args) == 0
  ours = json.loads(capsys.readouterr().out)
  model = transformers.AutoModelForCausalLM.from_pretrained(r["init"], dtype=torch.float32).eval()
  windows = data.eval_batches(
    data.DataConfig(
      source=str(r["held"]), seq_len=32, batch_size=4, packing=False, tokenizer=tokfile
    ),
    2,
    split="all",  # eval of a file the run did not train on: all of it
  )
  sums = [_hf_loss(model, b) for b in windows]
  theirs = sum(s for s, _ in sums) / sum(n for _, n in sums)
  assert ours["step"] == 0 and ours["batches"] == 2 and ours["split"] == "all"
  assert abs(ours["eval_loss"] - theirs) <= 1e-4, (ours["eval_loss"], theirs)
  # In bfloat16, weights and compute (how a 7B model fits a 24 GB card): close, not equal.
  # (Once: the dtype does not depend on the architecture.)
  if r["arch"] == "llama":
    _check_inference_dtypes(r, args, ours["eval_loss"], capsys)

  run, params, tok, step = sample.load_for_inference(str(r["init"]))
  prompt = tok.encode("what is one add two ?")
  with torch.no_grad():
    out = model.generate(
      torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_id()
    )[0, len(prompt) :].tolist()
  # transformers stops at any id of the directory's generation_config.json ([2, 7]), and so
  # does our sample.
  stops = sample.stop_ids(sample.kept_generation_config(str(r["init"]), 0))
  assert stops == {2, 7}
  want = next((out[:i] for i, t in enumerate(out) if t in stops), out)
  got = sample.generate(run, params, prompt, max_new_tokens=12, temperature=0, eos_id=stops)
  assert got == want and len(want) > 2, (got, out)
  calls, generate_batch = [], sample.generate_batch
  monkeypatch.setattr(
    sample, "generate_batch", lambda *a, **k: calls.append(k["eos_id"]) or generate_batch(*a, **k)
  )
  chat = ["sample", "--checkpoint", str(r["init"]), "--prompt", "hi", "--format", "chat"]
  assert cli.main(chat) == 0 and calls == [{2, 7}]

  capsys.readouterr()  # the chat reply, and transformers' loading bars
  # Bad flags name themselves; a directory without a tokenizer asks for one.
  for extra, flag in ((["--seq-len", "100000"], "--seq-len"), (["--seq-len", "0"], "--seq-len")):
    assert cli.main(["eval", "--checkpoint", str(r["init"]), *extra]) == 2
    assert capsys.readouterr().err.startswith(f"galore-jax: error: {flag}:")
  bare = tmp_path / "bare"
  bare.mkdir()
  for f in r["init"].iterdir():
    if not f.name.startswith("tokenizer"):
      (bare / f.name).symlink_to(f)
  assert cli.main(["eval", "--checkpoint", str(bare)]) == 2
  assert "has no tokenizer.json or tokenizer.model" in capsys.readouterr().err


def test_sample_lays_the_prompt_out_as_training_did(trained_run, tmp_path, capsys):
  """sample --format prompt / chat feed the model what its fine-tuning examples held before
  the trained reply: [BOS] prompt, or the chat template's generation prompt."""
  tokfile = trained_run["init"] / "tokenizer.json"
  tok = data.load_tokenizer(str(tokfile))
  q = "what is one add two ?"
  assert sft.prompt_ids(tok, q, "prompt") == [tok.bos_id(), *tok.encode(q)]
  chat = sft.render_chat(
    CHAT_TEMPLATE,
    [{"role": "user", "content": q}],
    add_generation_prompt=True,
    bos_token="<s>",
    eos_token="</s>",
  )
  assert chat == f"<s>User: {q}\nBot:"
  assert sft.prompt_ids(tok, q, "chat") == tok.encode(chat) and tok.encode(chat)[0] == 1
  assert sft.prompt_ids(tok, q, "text") == tok.encode(q)

  # A conversation: the head of its own training example up to the last reply, each piece
  # tokenized as training did (the earlier reply on its own).
  talk = [{"role": "user", "content": q}, {"role": "assistant", "content": "three ."}]
  talk += [{"role": "user", "content": "and two add two ?"}]
  ((toks, trained),) = sft.tokenize_examples(
    [({"messages": [*talk, {"role": "assistant", "content": "four ."}]}, "x")], tok
  )
  last = len(trained) - int(np.argmax(~trained[::-1]))  # where the last trained run starts
  assert trained[:last].any() and trained[last:].all()  # the earlier reply was trained too
  assert sft.prompt_ids(tok, talk, "chat") == toks[:last].tolist()
  assert sft.prompt_ids(tok, talk[:1], "chat") == sft.prompt_ids(tok, q, "chat")
  for bad, fmt, says in (
    (talk[:2], "chat", "must end with a turn the assistant replies to"),
    ([], "chat", "must end with a turn"),
    ([{"content": q}], "chat", '"messages" must be a list of {"role", "content"}'),
    (talk, "prompt", "is a chat; use --format chat"),
  ):
    with pytest.raises(ValueError, match="^p.jsonl line 3: ") as e:
      sft.prompt_ids(tok, bad, fmt, "p.jsonl line 3")
    assert says in str(e.value)

  run = str(trained_run["run"])
  flags = ["--max-new-tokens", "3", "--temperature", "0"]
  assert cli.main(["sample", "--checkpoint", run, "--prompt", q, "--format", "prompt", *flags]) == 0
  prompt_reply = capsys.readouterr().out
  assert prompt_reply.startswith(q)
  # Without --format: the form of the run's --data as its checkpoint recorded it
  # (prompt/completion records here), with a note; a Hugging Face directory's is text.
  assert (
    json.loads(next(trained_run["run"].glob("checkpoints/*/meta/metadata")).read_text())[
      "data_format"
    ]
    == "prompt"
  )
  assert cli.main(["sample", "--checkpoint", run, "--prompt", q, *flags]) == 0
  out, err = capsys.readouterr()
  assert out == prompt_reply and "note: --format prompt: the form of the run's --data" in err
  # A Hugging Face directory: text, with a note where its tokenizer has a chat template.
  assert cli.main(["sample", "--checkpoint", str(trained_run["init"]), "--prompt", q, *flags]) == 0
  err = capsys.readouterr().err
  assert "note: --format text: the prompt is continued as plain text; this model's " in err
  assert "--format chat lays a user message out in" in err
  assert cli.main(["sample", "--checkpoint", run, "--prompt", q, "--format", "chat", *flags]) == 0
  chat_reply = capsys.readouterr().out
  assert "User:" not in chat_reply  # the reply alone
  # --prompts mixes one-turn prompts and conversations; each record comes back with its
  # reply, a one-turn conversation's the same as its prompt's.
  records = [{"prompt": q}, {"messages": talk}, {"messages": talk[:1]}]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  prompts = ["sample", "--checkpoint", run, "--prompts", str(tmp_path / "p.jsonl"), *flags]
  assert cli.main([*prompts, "--format", "chat"]) == 0
  got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  reply_fields = ("completion", "finish_reason")
  assert [{k: v for k, v in r.items() if k not in reply_fields} for r in got] == records
  assert {r["finish_reason"] for r in got} <= {"stop", "length"}
  assert got[0]["completion"] == got[2]["completion"] == chat_reply.removesuffix("\n")
  # Alpaca records: an instruction and its input, laid out in the Alpaca prompt.
  alpaca = tmp_path / "alpaca.jsonl"
  alpaca.write_text(json.dumps({"instruction": "add one and two .", "input": "be brief"}) + "\n")
  args = ["sample", "--checkpoint", run, "--prompts", str(alpaca), *flags, "--format", "alpaca"]
  assert cli.main(args) == 0
  (got,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert got["instruction"] == "add one and two ." and got["finish_reason"] in ("stop", "length")
  assert cli.main([*args[:-1], "prompt"]) == 2  # an instruction is not a prompt
  assert "use --format alpaca" in capsys.readouterr().err
  # A conversation is a chat: with another format, one line naming the record.
  assert cli.main([*prompts, "--format", "prompt"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"galore-jax: error: --prompts: {tmp_path / 'p.jsonl'} line 2: ")
  assert err.endswith("use --format chat")
  # The same tokenizer without its tokenizer_config.json has no chat template: one line.
  bare = tmp_path / "bare"
  bare.mkdir()
  (bare / "tokenizer.json").write_bytes(tokfile.read_bytes())
  args = ["sample", "--checkpoint", run, "--prompt", q, "--format", "chat", *flags]
  assert cli.main([*args, "--tokenizer", str(bare / "tokenizer.json")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("galore-jax: error: --format: chat: the tokenizer has no chat template")
  # A Hugging Face directory sampled through it: text, and no note.
  init = ["sample", "--checkpoint", str(trained_run["init"]), "--prompt", q, *flags]
  assert cli.main([*init, "--tokenizer", str(bare / "tokenizer.json")]) == 0
  assert "--format" not in capsys.readouterr().err


def test_a_chat_reply_ends_at_the_templates_end_of_turn_token(tok_dir, tmp_path):
  """A template that closes assistant turns with its own special token (Qwen's <|im_end|>,
  not the base tokenizer's EOS): sampling a chat reply stops there too."""
  tok = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
  tok.add_special_tokens(["<|end|>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  template = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
  )
  tcfg = {"bos_token": None, "eos_token": "</s>", "chat_template": template}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(tcfg))
  hft = hf.load_tokenizer(tmp_path)
  end = tok.token_to_id("<|end|>")
  assert sft.reply_end_ids(hft, "chat") == {hft.eos_id(), end}
  assert sft.reply_end_ids(hft, "prompt") == sft.reply_end_ids(hft, "text") == {hft.eos_id()}
  # generate stops before any id of the set (here: whatever it would emit first).
  config = M.LlamaConfig(
    vocab_size=256, hidden_size=32, intermediate_size=64, num_heads=2, num_layers=1
  )
  params = M.init_params(config, seed=0)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: M.Llama(config, rngs=nnx.Rngs(0))), nnx.Param)
  run = type("R", (), {"model_cfg": config, "graphdef": graphdef})()
  free = sample.generate(run, params, [5, 6], max_new_tokens=4, temperature=0)
  assert (
    sample.generate(run, params, [5, 6], max_new_tokens=4, temperature=0, eos_id={free[0]}) == []
  )
  assert sample.generate(run, params, [5, 6], max_new_tokens=4, temperature=0, eos_id=free[0]) == []


def test_default_config_record_is_unchanged():
  """Checkpoints saved before the Hugging Face fields existed still match on resume."""
  record = M.config_record(M.get_config("llama_tiny"))
  assert not {"num_kv_heads", "tie_embeddings", "rope_scaling", "qkv_bias"} & set(record)
  assert M.config_record(M.get_config("llama_tiny", num_kv_heads=2))["num_kv_heads"] == "2"
  assert os.path.basename(hf.__file__) == "hf.py"


def test_tied_model_trains_with_the_whole_gradient_step(hf_models, tok_dir, tmp_path, capsys):
  """A tied table gets gradient from the lookup and the head: per-layer updates cannot apply,
  the trainer takes the whole-gradient step. No tokenizer in the directory: --tokenizer
  must name one (here a tokenizer.json)."""
  path, _ = hf_models["tied"]
  corpus = _write_jsonl(tmp_path / "c.jsonl", [{"text": s} for s in _sentences(300)])
  args = ["train", "--init-from", str(path), "--data", str(corpus), "--optimizer", "adamw"]
  args += ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"]
  args += ["--out", str(tmp_path / "run"), "--no-progress"]
  assert cli.main(args) == 2
  assert "--tokenizer" in capsys.readouterr().err
  tokfile = str(tok_dir / "tokenizer.json")
  cfg = cli._train_config(cli.build_parser().parse_args([*args, "--tokenizer", tokfile]))
  summary = train.train(cfg, log=lambda *a: None)
  assert summary["step"] == 2 and np.isfinite(summary["losses"]).all()
  run, params, _, _ = train.load_for_inference(str(tmp_path / "run"))
  assert run.model_cfg.tie_embeddings and "lm_head" not in params
  assert not train.per_layer_updates(cfg) or run.model_cfg.tie_embeddings


def test_config_spellings_and_sliding_window(hf_models):
  """transformers 4's rope_theta / rope_scaling (what export writes) and 5's rope_parameters
  read alike; a Mistral sliding window caps the sequence length, so attention never
  reaches past it."""
  cfg = hf.read_config_dict(hf_models["llama3_rope"][0])
  v4 = hf.config_to_dict(hf.config_from_dict(cfg))
  assert "rope_parameters" not in v4 and v4["rope_scaling"]["rope_type"] == "llama3"
  assert hf.config_from_dict(v4) == hf.config_from_dict(cfg)
  mistral = hf.read_config_dict(hf_models["mistral"][0])
  assert hf.config_from_dict({**mistral, "sliding_window": 128}).max_seq_len == 128
  with pytest.raises(ValueError, match="sliding_window"):
    hf.config_from_dict({**mistral, "sliding_window": 0})
  # Qwen2's window applies only with use_sliding_window, to the layers that slide:
  # Qwen2.5's released configs say 32768 with use_sliding_window false (no cap).
  qwen = hf.read_config_dict(hf_models["qwen2"][0])
  legacy = {k: v for k, v in qwen.items() if k != "layer_types"}
  legacy.update(sliding_window=128, use_sliding_window=False, max_window_layers=2)
  assert hf.config_from_dict(legacy).max_seq_len == 256
  assert hf.config_from_dict({**legacy, "use_sliding_window": True}).max_seq_len == 256
  assert (
    hf.config_from_dict({**legacy, "use_sliding_window": True, "max_window_layers": 1}).max_seq_len
    == 128
  )
  kinds = {"use_sliding_window": True, "layer_types": ["full_attention", "sliding_attention"]}
  assert hf.config_from_dict({**legacy, **kinds}).max_seq_len == 128
  assert hf.config_from_dict({**legacy, **kinds, "use_sliding_window": False}).max_seq_len == 256
  for field, bad in [
    ("layer_types", ["full_attention"]),
    ("layer_types", ["full_attention", "chunked"]),
    ("use_sliding_window", "yes"),
  ]:
    with pytest.raises(ValueError, match=field):
      hf.config_from_dict({**legacy, "use_sliding_window": True, field: bad})
  with pytest.raises(ValueError, match="layer_types"):  # checked without a window too
    hf.config_from_dict({**mistral, "sliding_window": None, "layer_types": ["chunked"] * 2})
