"""Hugging Face checkpoints in and out: ``config.json`` + safetensors <-> (LlamaConfig, params).

* :func:`read_config` turns a ``config.json`` into a :class:`~galore_jax.model.LlamaConfig`,
  refusing (``ValueError`` naming the field) anything this model cannot reproduce:
  biases, another activation, a head size that is not ``hidden / heads``, a RoPE type
  other than the default and Llama-3's, quantised weights, a sliding window shorter than
  the sequence, unknown fields. ``LlamaForCausalLM`` loads; ``MistralForCausalLM`` too, as
  it is the same network (its sliding window caps ``max_seq_len``, so attention never
  reaches past it); ``Qwen2ForCausalLM`` (Qwen2, Qwen2.5) as the same network with biases
  on the q, k and v projections (``LlamaConfig.qkv_bias``). An exported Qwen2 model is
  written back as ``Qwen2ForCausalLM``.
* :func:`load_pretrained` reads ``model.safetensors`` or a sharded
  ``model.safetensors.index.json`` straight into the target dtype and sharding.
* :func:`save_pretrained` writes a directory ``transformers.AutoModelForCausalLM`` loads.
* :func:`load_tokenizer` reads ``tokenizer.json`` (the ``tokenizers`` library) or a
  SentencePiece ``tokenizer.model`` and gives it the interface the data pipeline uses.

``transformers`` is never imported here: the formats are read with ``safetensors`` and
``tokenizers``, which is all a user of this package needs installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from galore_jax import model as model_lib
from galore_jax.errors import first_line

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")

ARCHITECTURES = {
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "mistral",
  "Qwen2ForCausalLM": "qwen2",
}
"""Architectures :func:`read_config` accepts, with their ``model_type``."""

# config.json fields that do not change the forward pass: bookkeeping, generation
# defaults, initialisation, the torch tensor-parallel split (numerically the same network).
_INERT_FIELDS = {
  "_name_or_path",
  "architectures",
  "model_type",
  "transformers_version",
  "torch_dtype",
  "dtype",
  "use_cache",
  "initializer_range",
  "bos_token_id",
  "eos_token_id",
  "pad_token_id",
  "sep_token_id",
  "decoder_start_token_id",
  "pretraining_tp",
  "output_attentions",
  "output_hidden_states",
  "return_dict",
  "torchscript",
  "use_bfloat16",
  "tf_legacy_loss",
  "pruned_heads",
  "chunk_size_feed_forward",
  "is_decoder",
  "is_encoder_decoder",
  "add_cross_attention",
  "tie_encoder_decoder",
  "cross_attention_hidden_size",
  "finetuning_task",
  "id2label",
  "label2id",
  "problem_type",
  "tokenizer_class",
  "prefix",
  "task_specific_params",
  "max_length",
  "min_length",
  "do_sample",
  "early_stopping",
  "num_beams",
  "num_beam_groups",
  "diversity_penalty",
  "temperature",
  "top_k",
  "top_p",
  "typical_p",
  "repetition_penalty",
  "length_penalty",
  "no_repeat_ngram_size",
  "encoder_no_repeat_ngram_size",
  "bad_words_ids",
  "num_return_sequences",
  "output_scores",
  "return_dict_in_generate",
  "forced_bos_token_id",
  "forced_eos_token_id",
  "remove_invalid_values",
  "exponential_decay_length_penalty",
  "suppress_tokens",
  "begin_suppress_tokens",
  "_attn_implementation",
  "_attn_implementation_autoset",
  "is_llama_config",  # SmolLM's configs
  "max_sequence_length",  # LLaMA-1 conversions: a duplicate of max_position_embeddings
}
_MODEL_FIELDS = {
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_attention_heads",
  "num_hidden_layers",
  "num_key_value_heads",
  "max_position_embeddings",
  "rms_norm_eps",
  "tie_word_embeddings",
  "hidden_act",
  "head_dim",
  "attention_bias",
  "mlp_bias",
  "attention_dropout",
  "rope_theta",
  "rope_scaling",
  "rope_parameters",
  "sliding_window",
  "use_sliding_window",  # Qwen2: whether sliding_window applies at all
  "max_window_layers",  # Qwen2: the layers from this index on use the window
  "layer_types",  # transformers 5: "full_attention" / "sliding_attention" per layer
  "rope_interleaved",
}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class CheckpointFormatError(ValueError):
  """A Hugging Face directory this package cannot read exactly; the message names the field
  or file."""


# ---------------------------------------------------------------------------
# config.json


def _rope(cfg: dict[str, Any]) -> tuple[float, tuple | None]:
  """(rope_theta, llama3 scaling tuple or None) from either config.json convention:
  ``rope_theta`` + ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5)."""
  params = cfg.get("rope_parameters")
  field = "rope_parameters"
  if params is None:
    params, field = cfg.get("rope_scaling"), "rope_scaling"
    theta = cfg.get("rope_theta", 10000.0)
  else:
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
  if params is None:
    return float(theta), None
  if not isinstance(params, dict):
    raise CheckpointFormatError(f"config.json: {field} must be an object, got {params!r}")
  kind = params.get("rope_type", params.get("type", "default"))
  extra = set(params) - {"rope_type", "type", "rope_theta"}
  if kind == "default":
    if extra:
      raise CheckpointFormatError(
        f"config.json: {field}.{sorted(extra)[0]} is not supported with rope_type 'default'"
      )
    return float(theta), None
  if kind != "llama3":
    raise CheckpointFormatError(
      f"config.json: {field}.rope_type {kind!r} is not supported (only 'default' and 'llama3')"
    )
  unknown = extra - set(_LLAMA3_KEYS)
  if unknown:
    raise CheckpointFormatError(f"config.json: {field}.{sorted(unknown)[0]} is not supported")
  missing = [k for k in _LLAMA3_KEYS if k not in params]
  if missing:
    raise CheckpointFormatError(f"config.json: {field} of type llama3 lacks {missing[0]}")
  f, lo, hi, orig = (params[k] for k in _LLAMA3_KEYS)
  if not hi > lo:
    raise CheckpointFormatError(f"config.json: {field}: high_freq_factor must exceed low")
  return float(theta), (float(f), float(lo), float(hi), int(orig))


def config_from_dict(cfg: dict[str, Any], *, where: str = "config.json") -> model_lib.LlamaConfig:
  """A ``config.json`` dict -> LlamaConfig; anything the model cannot reproduce raises
  :class:`CheckpointFormatError` naming the field."""

  def bad(field: str, why: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{where}: {field}: {why}")

  archs = cfg.get("architectures") or []
  model_type = cfg.get("model_type")
  for arch in archs:
    if arch not in ARCHITECTURES:
      raise bad("architectures", f"{arch} is not supported (supported: {', '.join(ARCHITECTURES)})")
  if model_type not in ARCHITECTURES.values():
    supported = ", ".join(ARCHITECTURES.values())
    raise bad("model_type", f"{model_type!r} is not supported (supported: {supported})")
  qwen2 = model_type == "qwen2"
  unknown = sorted(set(cfg) - _INERT_FIELDS - _MODEL_FIELDS)
  if unknown:
    raise bad(unknown[0], "field not supported by galore_jax's LLaMA (it would change the model)")
  for field in ("vocab_size", "hidden_size", "intermediate_size"):
    if not isinstance(cfg.get(field), int):
      raise bad(field, "missing or not an integer")
  for field in ("num_attention_heads", "num_hidden_layers"):
    if not isinstance(cfg.get(field), int):
      raise bad(field, "missing or not an integer")
  if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
    raise bad("hidden_act", f"{cfg['hidden_act']!r} is not supported (SwiGLU needs silu)")
  for field in ("attention_bias", "mlp_bias"):
    if cfg.get(field, False):  # Llama's attention_bias also puts one on o_proj
      raise bad(field, "biases are not supported (only Qwen2's on q, k and v)")
  if cfg.get("attention_dropout", 0.0):
    raise bad("attention_dropout", "dropout is not supported")
  if cfg.get("rope_interleaved", False):
    raise bad("rope_interleaved", "only the rotate_half RoPE layout of transformers' LLaMA")
  heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
  if hidden % heads:
    raise bad("num_attention_heads", f"{heads} does not divide hidden_size {hidden}")
  head_dim = cfg.get("head_dim")
  if head_dim is not None and head_dim != hidden // heads:
    raise bad("head_dim", f"{head_dim} != hidden_size / num_attention_heads ({hidden // heads})")
  kv = cfg.get("num_key_value_heads") or heads
  if not isinstance(kv, int) or heads % kv:
    raise bad("num_key_value_heads", f"{kv} does not divide num_attention_heads {heads}")
  max_len = cfg.get("max_position_embeddings", 2048)
  window = cfg.get("sliding_window")
  slides = _some_layer_slides(cfg, qwen2, bad)  # validates layer_types in any case
  if window is not None and not slides:
    window = None  # e.g. Qwen2.5's sliding_window 32768 with use_sliding_window false
  if window is not None:
    if not isinstance(window, int) or window < 1:
      raise bad("sliding_window", f"must be null or a positive integer, got {window!r}")
    # Within the window, attention is plain causal attention; capping the sequence at the
    # window makes every layer, sliding or not, exactly the model's.
    max_len = min(max_len, window)
  tie = cfg.get("tie_word_embeddings", False)
  if not isinstance(tie, bool):
    raise bad("tie_word_embeddings", f"must be true or false, got {tie!r}")
  try:
    theta, scaling = _rope(cfg)
  except CheckpointFormatError as e:
    raise CheckpointFormatError(str(e).replace("config.json", where, 1)) from None
  try:
    return model_lib.LlamaConfig(
      vocab_size=cfg["vocab_size"],
      hidden_size=hidden,
      intermediate_size=cfg["intermediate_size"],
      num_heads=heads,
      num_layers=cfg["num_hidden_layers"],
      max_seq_len=int(max_len),
      rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      rope_base=theta,
      init_std=float(cfg.get("initializer_range", 0.02)),
      num_kv_heads=None if kv == heads else kv,
      tie_embeddings=tie,
      rope_scaling=scaling,
      qkv_bias=qwen2,
    )
  except ValueError as e:
    raise CheckpointFormatError(f"{where}: {e}") from e


def _some_layer_slides(cfg: dict[str, Any], qwen2: bool, bad) -> bool:
  """Whether ``sliding_window`` applies to any layer. Mistral's (and a Llama config's)
  applies to every layer. Qwen2's applies only with ``use_sliding_window``, to the layers
  ``layer_types`` marks ``sliding_attention`` (transformers 5) or else to those from
  ``max_window_layers`` on. Unsure means yes: a needless cap only shortens sequences."""
  layers = cfg["num_hidden_layers"]
  kinds = cfg.get("layer_types")
  if kinds is not None:
    if not isinstance(kinds, list) or len(kinds) != layers:
      raise bad("layer_types", f"must list one kind per layer ({layers}), got {kinds!r}")
    unknown = set(map(str, kinds)) - {"full_attention", "sliding_attention"}
    if unknown:
      raise bad("layer_types", f"{sorted(unknown)[0]!r} is not supported")
  if not qwen2:
    return True
  use = cfg.get("use_sliding_window", False)
  if not isinstance(use, bool):
    raise bad("use_sliding_window", f"must be true or false, got {use!r}")
  if not use:
    return False
  if kinds is not None:
    return "sliding_attention" in kinds
  first = cfg.get("max_window_layers", 0)
  if not isinstance(first, int):
    raise bad("max_window_layers", f"must be an integer, got {first!r}")
  return first < layers


GENERATION_CONFIG_FILE = "generation_config.json"


def read_generation_config(path: str | os.PathLike) -> dict[str, Any] | None:
  """The parsed ``generation_config.json`` of a model directory (sampling defaults and stop
  ids for transformers' ``generate`` and vLLM), or None if it has none or it is not a JSON
  object (it only carries defaults: training does not need it)."""
  file = Path(path).expanduser() / GENERATION_CONFIG_FILE
  try:
    gen = json.loads(file.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return None
  return gen if isinstance(gen, dict) else None


def generation_config(tok, stop_ids: set[int], base: dict[str, Any] | None) -> dict[str, Any]:
  """``generation_config.json`` for an export: ``base`` (the starting model's, if the run
  kept it) with the token ids of the run's tokenizer. ``eos_token_id`` lists every id that
  ends a reply: the tokenizer's EOS, ``stop_ids`` (a chat template's turn-closing token)
  and the base's own, so a chat fine-tune stops in transformers and vLLM where it was
  trained to stop."""
  gen = {k: v for k, v in (base or {}).items() if k != "transformers_version"}
  ids = _token_ids(tok)
  base_eos = gen.get("eos_token_id")
  base_eos = [base_eos] if isinstance(base_eos, int) else list(base_eos or [])
  eos = [i for i in [ids["eos_token_id"], *sorted(stop_ids), *base_eos] if i is not None]
  eos = list(dict.fromkeys(eos))  # unique, in order
  for field in ("bos_token_id", "pad_token_id"):
    if ids[field] is not None:
      gen[field] = ids[field]
  if eos:
    gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
  return gen


def read_config_dict(path: str | os.PathLike) -> dict[str, Any]:
  """The parsed ``config.json`` of a Hugging Face model directory."""
  file = Path(path).expanduser() / CONFIG_FILE
  if not Path(path).expanduser().is_dir():
    raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face model directory)")
  if not file.is_file():
    raise FileNotFoundError(f"{file}: missing (expected a Hugging Face model directory)")
  try:
    cfg = json.loads(file.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointFormatError(f"{file}: not valid JSON ({e})") from e
  if not isinstance(cfg, dict):
    raise CheckpointFormatError(f"{file}: expected a JSON object")
  return cfg


def read_config(path: str | os.PathLike) -> model_lib.LlamaConfig:
  """LlamaConfig of the Hugging Face model directory ``path`` (see :func:`config_from_dict`)."""
  return config_from_dict(read_config_dict(path), where=str(Path(path) / CONFIG_FILE))


def config_to_dict(config: model_lib.LlamaConfig, *, dtype: str = "float32") -> dict[str, Any]:
  """``config.json`` of ``LlamaForCausalLM`` for ``config`` (``Qwen2ForCausalLM`` with
  ``qkv_bias``).

  RoPE is written the transformers-4 way (``rope_theta`` + ``rope_scaling``), which
  transformers 5, vLLM and llama.cpp's converter all read.
  """
  out: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": config.vocab_size,
    "hidden_size": config.hidden_size,
    "intermediate_size": config.intermediate_size,
    "num_attention_heads": config.num_heads,
    "num_key_value_heads": config.kv_heads,
    "num_hidden_layers": config.num_layers,
    "head_dim": config.head_dim,
    "max_position_embeddings": config.max_seq_len,
    "rms_norm_eps": config.rms_eps,
    "rope_theta": config.rope_base,
    "rope_scaling": None,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": config.tie_embeddings,
    "initializer_range": config.init_std,
    "torch_dtype": dtype,
    "use_cache": True,
  }
  if config.qkv_bias:
    # Only Qwen2 has biases on q, k and v alone (Llama's attention_bias adds one to o_proj).
    for field in ("attention_bias", "mlp_bias", "head_dim"):
      del out[field]
    out.update(
      architectures=["Qwen2ForCausalLM"],
      model_type="qwen2",
      use_sliding_window=False,
      sliding_window=None,
      max_window_layers=config.num_layers,
    )
  if config.rope_scaling is not None:
    out["rope_scaling"] = {
      "rope_type": "llama3",
      **dict(zip(_LLAMA3_KEYS, config.rope_scaling, strict=True)),
    }
  return out


# ---------------------------------------------------------------------------
# Weights.


def _hf_keys(config: model_lib.LlamaConfig) -> dict[tuple, tuple[str, bool]]:
  """Our parameter path -> (HF tensor name, whether torch stores it transposed)."""
  return {path: (key, t) for key, (path, t) in model_lib.hf_mapping(config).items()}


def _path_of(keypath) -> tuple:
  return tuple(k.key for k in keypath)


def abstract_params(config: model_lib.LlamaConfig) -> dict:
  abstract = nnx.eval_shape(lambda: model_lib.Llama(config, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def weight_files(path: str | os.PathLike) -> dict[str, Path]:
  """HF tensor name -> the safetensors file holding it (sharded or single-file layout).

  A missing shard, or an index that is not JSON, raises naming the file.
  """
  root = Path(path).expanduser()
  index = root / INDEX_FILE
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointFormatError(f"{index}: not a safetensors index ({e!r})") from e
    files = {name: root / file for name, file in weight_map.items()}
    for file in sorted(set(files.values())):
      if not file.is_file():
        raise FileNotFoundError(f"{file}: shard listed in {INDEX_FILE} is missing")
    return files
  single = root / SINGLE_FILE
  if single.is_file():
    from safetensors import safe_open

    with _opened(single, safe_open) as f:
      return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
  others = sorted(p.name for p in root.glob("*.bin")) if root.is_dir() else []
  hint = f" (found {others[0]}: only safetensors are read; convert it)" if others else ""
  raise FileNotFoundError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


class _opened:
  """``safe_open`` whose header errors become one line naming the file."""

  def __init__(self, file: Path, safe_open):
    self.file, self.safe_open = file, safe_open

  def __enter__(self):
    try:
      self.handle = self.safe_open(str(self.file), framework="numpy")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: same meaning to the user
      raise CheckpointFormatError(
        f"{self.file}: corrupt or truncated safetensors file ({first_line(e, 1000)})"
      ) from e
    return self.handle.__enter__()

  def __exit__(self, *exc):
    return self.handle.__exit__(*exc)


def load_pretrained(
  path: str | os.PathLike,
  *,
  config: model_lib.LlamaConfig | None = None,
  param_dtype: Any = jnp.float32,
  dtype: Any = None,
  shardings: Any = None,
) -> tuple[model_lib.LlamaConfig, dict]:
  """LlamaConfig and parameters (the pure dict of ``Llama``) of a Hugging Face directory.

  ``config``: the config to load into (default :func:`read_config` with ``param_dtype``
  and ``dtype``, the compute dtype, defaulting to ``param_dtype``); its shapes must match
  the directory's. ``shardings``: a pytree of shardings shaped like the params (the
  trainer's); default: the first device.

  Memory: the model is never in host memory twice, not even once outside the devices.
  ``safetensors`` memory-maps each file; each parameter is created by
  ``jax.make_array_from_callback`` on its target sharding, whose callback reads, through
  ``safe_open(...).get_slice``, only the rows and columns of one device's shard (in
  torch's (out, in) layout, the mirrored slice of Flax's (in, out)), then transposes and
  casts it in one copy. So the host holds at most one device-shard of one tensor, in the
  file's dtype and in the target dtype, while it is handed to its device; the mapped file
  pages belong to the OS page cache. Nothing is read twice or converted after loading.
  """
  from safetensors import safe_open

  root = Path(path).expanduser()
  if config is None:
    dtype = param_dtype if dtype is None else dtype
    config = dataclasses.replace(read_config(root), param_dtype=param_dtype, dtype=dtype)
  files = weight_files(root)
  by_path = _hf_keys(config)
  expected = {key for key, _ in by_path.values()}
  missing = sorted(expected - set(files))
  if missing:
    hint = ""
    if missing == ["lm_head.weight"]:
      hint = " (config.json says tie_word_embeddings false)"
    raise CheckpointFormatError(f"{root}: tensor {missing[0]} is missing{hint}")
  ignorable = {"lm_head.weight"} if config.tie_embeddings else set()  # tied: may be saved too
  unexpected = sorted(
    k for k in set(files) - expected - ignorable if not k.endswith("rotary_emb.inv_freq")
  )
  if unexpected:
    raise CheckpointFormatError(
      f"{files[unexpected[0]]}: tensor {unexpected[0]} has no place in this model "
      "(another architecture, or a config.json that does not match the weights)"
    )

  abstract = abstract_params(config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shard_leaves = [device] * len(leaves)
  else:
    shard_leaves = jax.tree.leaves(shardings)
  handles: dict[Path, Any] = {}
  out = []
  try:
    for (keypath, leaf), sharding in zip(leaves, shard_leaves, strict=True):
      key, transpose = by_path[_path_of(keypath)]
      file = files[key]
      if file not in handles:
        ctx = _opened(file, safe_open)
        handles[file] = (ctx, ctx.__enter__())
      tensor = handles[file][1].get_slice(key)
      out.append(_read_param(tensor, key, file, leaf, transpose, sharding))
  finally:
    for ctx, _ in handles.values():
      ctx.__exit__(None, None, None)
  return config, jax.tree_util.tree_unflatten(treedef, out)


def _read_param(tensor, key: str, file: Path, leaf, transpose: bool, sharding) -> jax.Array:
  shape = tuple(tensor.get_shape())
  want = tuple(leaf.shape[::-1]) if transpose else tuple(leaf.shape)
  if shape != want:
    raise CheckpointFormatError(
      f"{file}: tensor {key} has shape {list(shape)}, config.json implies {list(want)}"
    )
  target = np.dtype(leaf.dtype)

  def read(index: tuple[slice, ...]) -> np.ndarray:
    # index is in our layout; torch stores (out, in), so read the mirrored slice.
    try:
      part = tensor[tuple(index[::-1]) if transpose else tuple(index)]
    except Exception as e:  # noqa: BLE001 - a short read inside the data section
      raise CheckpointFormatError(f"{file}: cannot read tensor {key} ({e})") from e
    # One copy: transpose and cast in the same pass.
    return np.ascontiguousarray(np.asarray(part).T if transpose else part, dtype=target)

  return jax.make_array_from_callback(tuple(leaf.shape), sharding, read)


def save_pretrained(
  path: str | os.PathLike,
  config: model_lib.LlamaConfig,
  params: dict,
  *,
  dtype: str | None = None,
  tokenizer: Any = None,
  generation: dict[str, Any] | None = None,
  max_shard_bytes: int = MAX_SHARD_BYTES,
  chat_template: str | None = None,
) -> list[str]:
  """Writes ``config.json`` + safetensors (+ the tokenizer's files) under ``path``.

  ``dtype``: ``"float32"`` or ``"bfloat16"`` (default: the params' dtype). Above
  ``max_shard_bytes`` the weights are split into ``model-0000k-of-0000n.safetensors``
  with ``model.safetensors.index.json``, as transformers does. Each parameter is
  gathered to the host one at a time; a shard is written when it is full, so the host
  holds at most one shard (5 GB by default). ``tokenizer``: what :func:`load_tokenizer`
  or ``data.load_tokenizer`` returned; its files are copied and its special tokens go
  into ``config.json``. ``generation``: written as ``generation_config.json``
  (:func:`generation_config`). ``chat_template``: the tokenizer's, replaced
  (:func:`save_tokenizer`). Returns the files written.
  """
  from safetensors.numpy import save_file

  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  if dtype is None:
    dtype = np.dtype(leaves[0][1].dtype).name
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
  target = np.dtype(jnp.bfloat16 if dtype == "bfloat16" else np.float32)
  by_path = _hf_keys(config)
  entries = []  # (HF name, leaf, transpose), in our tree order
  for keypath, leaf in leaves:
    p = _path_of(keypath)
    if p not in by_path:
      raise ValueError(f"parameter {'.'.join(map(str, p))} does not belong to this config")
    key, transpose = by_path[p]
    entries.append((key, leaf, transpose))
  if len(entries) != len(by_path):
    raise ValueError(f"params have {len(entries)} tensors, the config needs {len(by_path)}")

  # Shard plan from shapes alone, so file names (k-of-n) are known before writing.
  shards: list[list[int]] = [[]]
  size = 0
  for i, (_, leaf, _) in enumerate(entries):
    nbytes = math.prod(leaf.shape) * target.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(i)
    size += nbytes
  n = len(shards)
  names = (
    [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
  )
  root = Path(path).expanduser()
  root.mkdir(parents=True, exist_ok=True)
  written = []
  weight_map = {}
  total = 0
  for name, members in zip(names, shards, strict=True):
    tensors = {}
    for i in members:
      key, leaf, transpose = entries[i]
      host = np.asarray(jax.device_get(leaf))
      host = host.T if transpose else host
      tensors[key] = np.ascontiguousarray(host.astype(target, copy=False))
      weight_map[key] = name
      total += tensors[key].nbytes
    try:
      save_file(tensors, str(root / name), metadata={"format": "pt"})
    except Exception as e:  # safetensors reports a failed write (a full disk) as its own error
      if isinstance(e, OSError) or "I/O error" not in str(e):
        raise
      raise OSError(f"{root / name}: {e}") from e
    # safetensors >= 0.8 writes through a temporary file that it renames into place, so its
    # files are 0600 whatever the umask (safetensors/safetensors#782): a model that another
    # user or a container's user (a vLLM server) cannot read.
    os.chmod(root / name, umask_mode(0o666))
    written.append(str(root / name))
    del tensors
  if n > 1:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    written.append(str(root / INDEX_FILE))
  cfg = config_to_dict(config, dtype=dtype)
  if tokenizer is not None:
    cfg.update(_token_ids(tokenizer))
    written += save_tokenizer(tokenizer, root, chat_template)
  (root / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
  written.append(str(root / CONFIG_FILE))
  if generation is not None:
    (root / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
    written.append(str(root / GENERATION_CONFIG_FILE))
  return written


def umask_mode(mode: int) -> int:
  """``mode`` as the process umask lets ``open`` or ``mkdir`` create it (0o644 from 0o666
  under the usual umask 022), for files and directories that a library creates 0600 / 0700."""
  umask = os.umask(0)
  os.umask(umask)
  return mode & ~umask


# ---------------------------------------------------------------------------
# Tokenizers.


def _token_ids(tok) -> dict[str, Any]:
  ids = {}
  for field, fn in (
    ("bos_token_id", "bos_id"),
    ("eos_token_id", "eos_id"),
    ("pad_token_id", "pad_id"),
  ):
    value = getattr(tok, fn)()
    ids[field] = value if value >= 0 else None
  return ids


def _token_text(value: Any) -> str | None:
  """A special token in tokenizer_config.json: a string or ``{"content": ...}``."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


class HFTokenizer:
  """A ``tokenizer.json`` (Hugging Face ``tokenizers``) with the SentencePiece-processor
  methods the data pipeline calls (``encode``, ``decode``, ``get_piece_size``, ``eos_id``,
  ``pad_id``, ``bos_id``, ``serialized_model_proto``).

  Special tokens come from ``tokenizer_config.json`` next to the file (``bos_token``,
  ``eos_token``, ``pad_token``), else from ``config.json``'s ids, else from the usual
  names (``</s>``, ``<|endoftext|>``, ``<|end_of_text|>``, ``<eos>``). ``"bos_token":
  null`` means the model takes no BOS (Qwen2's tokenizers; its ``config.json`` still names
  one, which transformers never adds), so none is placed. Text is encoded
  without the tokenizer's own special tokens: the pipeline places EOS (and BOS for
  instruction data) itself.
  """

  _EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
  _BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")

  def __init__(self, file: str | os.PathLike):
    from tokenizers import Tokenizer

    self.file = Path(file).expanduser()
    try:
      self.tok = Tokenizer.from_file(str(self.file))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
      raise ValueError(f"{self.file}: not a tokenizers JSON file ({e})") from e
    folder = self.file.parent
    tcfg: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
      tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    mcfg: dict[str, Any] = {}
    if (folder / CONFIG_FILE).is_file():
      mcfg = json.loads((folder / CONFIG_FILE).read_text())
    self.config = tcfg
    self.chat_template = tcfg.get("chat_template")
    if self.chat_template is None and (folder / "chat_template.jinja").is_file():
      self.chat_template = (folder / "chat_template.jinja").read_text()  # transformers 5
    self._eos = self._special(tcfg.get("eos_token"), mcfg.get("eos_token_id"), self._EOS_NAMES)
    self._bos = self._special(tcfg.get("bos_token"), mcfg.get("bos_token_id"), self._BOS_NAMES)
    if "bos_token" in tcfg and tcfg["bos_token"] is None:
      self._bos = -1
    self._pad = self._special(tcfg.get("pad_token"), mcfg.get("pad_token_id"), ())
    specials = json.dumps([self._bos, self._eos, self._pad]).encode()
    self._proto = self.file.read_bytes() + b"\0" + specials

  def _special(self, text: Any, model_id: Any, names: Sequence[str]) -> int:
    text = _token_text(text)
    if text is not None and self.tok.token_to_id(text) is not None:
      return self.tok.token_to_id(text)
    if isinstance(model_id, list):
      model_id = model_id[0] if model_id else None
    if isinstance(model_id, int) and 0 <= model_id < self.get_piece_size():
      return model_id
    for name in names:
      if self.tok.token_to_id(name) is not None:
        return self.tok.token_to_id(name)
    return -1

  def encode(self, text, num_threads: int | None = None):
    del num_threads  # tokenizers parallelises batches itself
    if isinstance(text, str):
      return self.tok.encode(text, add_special_tokens=False).ids
    return [e.ids for e in self.tok.encode_batch(list(text), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=True)

  def get_piece_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self.tok.id_to_token(int(i))

  def eos_id(self) -> int:
    return self._eos

  def bos_id(self) -> int:
    return self._bos

  def pad_id(self) -> int:
    return self._pad

  def serialized_model_proto(self) -> bytes:
    """Bytes that identify the tokenizer (its JSON and special ids): hashes key caches and
    checkpoints."""
    return self._proto

  def files(self) -> list[Path]:
    folder = self.file.parent
    names = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
    extra = [folder / n for n in names]
    return [self.file] + [f for f in extra if f.is_file()]


def find_tokenizer(path: str | os.PathLike) -> Path | None:
  """``tokenizer.json`` or else ``tokenizer.model`` in a model directory, or None."""
  root = Path(path).expanduser()
  for name in ("tokenizer.json", "tokenizer.model"):
    if (root / name).is_file():
      return root / name
  return None


def load_tokenizer(path: str | os.PathLike):
  """A model directory (its tokenizer.json, else tokenizer.model), a ``tokenizer.json`` or a
  SentencePiece model -> a tokenizer with the SentencePiece interface."""
  p = Path(path).expanduser()
  if p.is_dir():
    found = find_tokenizer(p)
    if found is None:
      raise FileNotFoundError(f"{p}: no tokenizer.json or tokenizer.model in the directory")
    p = found
  if not p.is_file():
    raise FileNotFoundError(f"tokenizer not found: {str(p)!r}")
  if p.suffix == ".json":
    return HFTokenizer(p)
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor()
  sp.Load(str(p))
  return sp


def tokenizer_sha(tok) -> str:
  return hashlib.sha256(tok.serialized_model_proto()).hexdigest()


def model_card(
  run: dict[str, Any],
  step: int,
  *,
  name: str = "model",
  form: str = "text",
  eval_loss: tuple[int, float] | None = None,
  chat_template: str | None = None,
  bos_token: str = "",
) -> str:
  """``README.md`` of an exported run, the model card the Hub shows: YAML metadata
  (``huggingface_hub.ModelCardData``: the base model and datasets where the run read them
  from the Hub, ``library_name``, tags) and what was trained how, from the checkpoint's
  ``train_config`` (``run``) at ``step``; ``name``: its title (the export's directory
  name); ``eval_loss``: ``(step, loss)`` of the run's
  last evaluation; ``form``: its data's form (``galore_jax.sft``), with ``chat_template``,
  the exported one, shown on an example message."""
  import huggingface_hub

  from galore_jax import __version__, hub, sft

  base = hub.repo_id(run.get("init_from"))
  datasets = [d for d in map(hub.repo_id, (run.get("data"), run.get("eval_data"))) if d]
  meta = huggingface_hub.ModelCardData(
    base_model=base,
    datasets=list(dict.fromkeys(datasets)) or None,
    library_name="transformers",
    pipeline_tag="text-generation",
    tags=["galore", "galore-jax"],
  )
  if base:
    origin = f"Fine-tuned from [{base}](https://huggingface.co/{base})"
  elif run.get("init_from"):
    origin = f"Fine-tuned from `{os.path.basename(os.path.normpath(run['init_from']))}`"
  else:
    origin = f"Trained from a random initialisation (`{run.get('model')}`)"
  galore = run.get("optimizer", "").startswith("galore")
  how = (
    f"with GaLore (gradient low-rank projection, Zhao et al., ICML 2024): every weight is "
    f"trained, the optimizer state of the attention and MLP matrices kept in rank-{run['rank']} "
    "projections"
    if galore
    else f"with {run.get('optimizer')}"
  )
  rows = [
    ("steps", f"{step} of {run.get('steps')}"),
    (
      "tokens per step",
      f"{run.get('batch_size')} x {run.get('grad_accum', 1)} x "
      f"{run.get('seq_len')} (sequences x accumulation x length)",
    ),
    ("optimizer", run.get("optimizer")),
  ]
  if galore:
    rows.append(
      (
        "GaLore",
        f"rank {run['rank']}, projectors refreshed every {run.get('update_proj_gap')} "
        f"steps (`{run.get('svd')}`), scale {run.get('galore_scale')}",
      )
    )
  rows += [
    (
      "learning rate",
      f"{run.get('peak_lr', run.get('lr'))}, {run.get('schedule', 'cosine')} schedule",
    ),
    ("weight decay", run.get("weight_decay")),
    (
      "data",
      f"`{run.get('data')}`" + (f" ({sft.FORM_NAMES[form]})" if form in sft.FORM_NAMES else ""),
    ),
    ("weights / compute dtype", f"{run.get('param_dtype')} / {run.get('dtype')}"),
  ]
  if eval_loss is not None:
    rows.append(("validation loss", f"{eval_loss[1]:.4f} at step {eval_loss[0]}"))
  lines = [
    f"# {name}",
    "",
    f"{origin} {how}, by galore-jax {__version__} (JAX).",
    "",
    "| | |",
    "| --- | --- |",
    *(f"| {k} | {v} |" for k, v in rows),
    "",
  ]
  if form in sft.FORM_NAMES:
    lines += ["## Prompt format", ""]
    if chat_template is not None:

      def shown(content: str, **variables) -> list[str]:  # a user message, as rendered
        text = sft.render_chat(
          chat_template,
          [{"role": "user", "content": content}],
          add_generation_prompt=True,
          bos_token=bos_token,
          eos_token="",
          **variables,
        )
        return ["", "```", text, "```", ""]

      lines += [
        f"Trained on {sft.FORM_NAMES[form]}. The chat template in `tokenizer_config.json` "
        "lays one user message out as training did (`apply_chat_template(messages, "
        "add_generation_prompt=True)`; vLLM's chat endpoint uses it too):",
        *shown("<your message>"),
      ]
      if form == "alpaca":
        given = sft.ALPACA_INPUT_VARIABLE
        lines += [
          f"An Alpaca input goes in the template variable `{given}` "
          f"(`apply_chat_template(messages, {given}=...)`; vLLM: `chat_template_kwargs`):",
          *shown("<your instruction>", **{given: "<its input>"}),
        ]
    else:
      lines += [f"Trained on {sft.FORM_NAMES[form]}, which this directory's tokenizer keeps.", ""]
  return f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines)


def save_tokenizer(tok, root: Path, chat_template: str | None = None) -> list[str]:
  """Copies a tokenizer's files into ``root`` in the layout transformers' AutoTokenizer
  reads. A SentencePiece model becomes ``tokenizer.model`` with a LlamaTokenizer config
  that adds no BOS / EOS (this package's pretraining placed neither at the start).
  ``chat_template``: set in ``tokenizer_config.json`` (and in a copied ``chat_template.jinja``,
  which transformers 5 reads first) in place of the tokenizer's own."""
  written = _save_tokenizer_files(tok, root)
  if chat_template is not None:
    config_file = root / "tokenizer_config.json"
    cfg = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**cfg, "chat_template": chat_template}, indent=2) + "\n")
    if (root / "chat_template.jinja").is_file():
      (root / "chat_template.jinja").write_text(chat_template)
  return written


def _save_tokenizer_files(tok, root: Path) -> list[str]:
  written = []
  if isinstance(tok, HFTokenizer):
    for f in tok.files():
      if f.resolve() != (root / f.name).resolve():
        shutil.copyfile(f, root / f.name)
      written.append(str(root / f.name))
    if not (root / "tokenizer_config.json").is_file():
      cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
      for field, i in (
        ("bos_token", tok.bos_id()),
        ("eos_token", tok.eos_id()),
        ("pad_token", tok.pad_id()),
      ):
        if i >= 0:
          cfg[field] = tok.id_to_piece(i)
      (root / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
      written.append(str(root / "tokenizer_config.json"))
    return written
  (root / "tokenizer.model").write_bytes(tok.serialized_model_proto())
  cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False}
  for field, i in (
    ("bos_token", tok.bos_id()),
    ("eos_token", tok.eos_id()),
    ("unk_token", tok.unk_id()),
    ("pad_token", tok.pad_id()),
  ):
    if i >= 0:
      cfg[field] = tok.id_to_piece(i)
  (root / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
  return written + [str(root / "tokenizer.model"), str(root / "tokenizer_config.json")]
