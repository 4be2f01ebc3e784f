"""Loading a model for ``eval`` / ``sample`` / ``export`` (a run's checkpoint, or a Hugging
Face model directory as it is before any training), and sampling from it."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from galore_jax import checkpoint, distributed
from galore_jax.config import DTYPES, ConfigError, TrainConfig, check_mesh
from galore_jax.trainer import Run, setup, tokenizer_hash


def load_for_inference(
  path: str,
  *,
  tokenizer: str | None = None,
  mesh: str | None = None,
  dtype: str | None = None,
  param_dtype: str | None = None,
  before_restore: Callable[[Run, Any], None] | None = None,
):
  """Model graph, params, tokenizer and step of the latest checkpoint under ``path``, or of
  the step ``path`` names (``RUN/checkpoints/35``), restored onto ``mesh`` (``data=N,fsdp=M``;
  default one device), whatever mesh or number of processes saved it.

  ``dtype`` is the compute dtype (default: the run's). A run's weights load in the dtype
  they were trained in; ``param_dtype`` may only name it. A Hugging Face model directory
  (``config.json`` and safetensors) loads as ``train --init-from`` would start from it, at
  step 0, its weights in ``param_dtype`` (default float32): the model before fine-tuning.

  ``before_restore(run, tokenizer)`` runs once the run's configuration is known and before
  any weight is read, so that a bad flag fails in a second, not after loading a large model.
  It may run more than once (a pruned checkpoint is read again).

  The latest checkpoint of a run that is still training may be pruned while it is read
  (``--keep-checkpoints``); it is then read again, up to 3 times: by then the run has saved a
  newer one. A step named in ``path`` is not replaced by another. In a multi-process job
  process 0 chooses the step.
  """
  check_mesh(mesh)
  for flag, value in (("--dtype", dtype), ("--param-dtype", param_dtype)):
    if value is not None and value not in DTYPES:
      raise ConfigError(flag, f"expected one of {', '.join(DTYPES)}, got {value!r}")
  if os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
    return _load_hugging_face(path, tokenizer, mesh, dtype, param_dtype, before_restore)
  load = functools.partial(
    _load,
    path,
    tokenizer,
    mesh,
    dtype=dtype,
    param_dtype=param_dtype,
    before_restore=before_restore,
  )
  if distributed.is_multiprocess():
    # Every process must restore the same checkpoint, but a run still saving can give two
    # processes different latest steps: process 0 picks it. No second try (the processes
    # would not agree on it either): a failed read ends the job.
    step = checkpoint.step_in_path(path)
    if step is None:
      latest = checkpoint.latest_step(path)
      step = distributed.agree_int(-1 if latest is None else latest)
    return load(step=None if step < 0 else step)
  for attempt in range(3):
    try:
      return load()
    except checkpoint.CheckpointPruned:
      if checkpoint.step_in_path(path) is not None or attempt == 2:
        raise


def _load_hugging_face(path, tokenizer, mesh, dtype, param_dtype, before_restore):
  from galore_jax import data, hf

  path = os.path.abspath(os.path.expanduser(path))
  tokenizer = tokenizer or hf.find_tokenizer(path)
  if tokenizer is None:
    raise ConfigError("--tokenizer", f"{path} has no tokenizer.json or tokenizer.model; name one")
  try:
    sp = data.load_tokenizer(str(tokenizer))
  except (OSError, ValueError) as e:
    raise ConfigError("--tokenizer", str(e)) from e
  try:
    hf_config = hf.read_config_dict(path)
  except (OSError, ValueError) as e:
    raise ConfigError("--checkpoint", str(e)) from e
  cfg = TrainConfig(
    init_from=path,
    tokenizer=str(tokenizer),
    mesh=mesh,
    optimizer="adamw",
    param_dtype=param_dtype or "float32",
    dtype=dtype or "float32",
  )
  try:
    run = setup(cfg, sp.get_piece_size(), hf_config)
  except ConfigError as e:
    if e.flag != "--model":  # a config.json the model cannot reproduce: the directory's fault
      raise
    raise ConfigError("--checkpoint", str(e).removeprefix("--model: ")) from e
  if before_restore is not None:
    before_restore(run, sp)
  try:
    params = hf.load_pretrained(path, config=run.model_cfg, shardings=run.dense_sharding)[1]
  except (OSError, ValueError) as e:
    raise ConfigError("--checkpoint", str(e)) from e
  return run, params, sp, 0


def _load(path, tokenizer, mesh, *, dtype, param_dtype, before_restore, step=None):
  step, meta = checkpoint.read_meta(path, step)
  saved = meta.get("train_config", {})
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  cfg = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
  if param_dtype is not None and param_dtype != cfg.param_dtype:
    raise ConfigError(
      "--param-dtype",
      f"the run's weights are {cfg.param_dtype} (its --param-dtype); they load as trained",
    )
  cfg = dataclasses.replace(
    cfg, mesh=mesh, tokenizer=tokenizer or cfg.tokenizer, dtype=dtype or cfg.dtype
  )
  from galore_jax import data

  try:
    sp = data.load_tokenizer(cfg.tokenizer)
  except (OSError, ValueError) as e:
    if tokenizer is None:  # the user passed none: say where the path came from
      raise ConfigError(
        "--tokenizer",
        f"the run's tokenizer {cfg.tokenizer!r} (from its checkpoint) is missing; pass --tokenizer",
      ) from e
    raise ConfigError("--tokenizer", str(e)) from e
  want = meta["compat"]
  # An --init-from model may have more embedding rows than its tokenizer has ids.
  vocab_ok = sp.get_piece_size() == want["vocab_size"] or (
    cfg.init_from and sp.get_piece_size() < want["vocab_size"]
  )
  if not vocab_ok or tokenizer_hash(sp) != want["tokenizer_sha"]:
    raise ConfigError(
      "--tokenizer",
      f"tokenizer has vocabulary {sp.get_piece_size()} "
      f"(hash {tokenizer_hash(sp)}), the checkpoint was trained with "
      f"{want['vocab_size']} (hash {want['tokenizer_sha']})",
    )
  run = setup(cfg, sp.get_piece_size(), meta.get("hf_config"))
  if before_restore is not None:
    before_restore(run, sp)
  params = checkpoint.restore(path, step, {"params": run.abstract_params})["params"]
  return run, params, sp, step


def _pick(logits_V, key, temperature: float, top_k: int, top_p: float):
  """The next token: greedy at temperature 0, else drawn from the softmax restricted to the
  ``top_k`` most likely tokens and, of those, to the fewest whose probability reaches
  ``top_p`` (nucleus sampling, Holtzman et al. 2020; 1.0 keeps all ``top_k``)."""
  if temperature <= 0:
    return jnp.argmax(logits_V).astype(jnp.int32)
  top_K, idx_K = jax.lax.top_k(logits_V / temperature, top_k)  # sorted, most likely first
  if top_p < 1.0:
    prob_K = jax.nn.softmax(top_K)
    # Keep token i if the tokens before it hold less than top_p: the first is always kept.
    before_K = jnp.cumsum(prob_K) - prob_K
    top_K = jnp.where(before_K < top_p, top_K, -jnp.inf)
  return idx_K[jax.random.categorical(key, top_K)].astype(jnp.int32)


# Module-level with static settings: a second generate() with the same model and settings
# reuses the compiled programs (the prompt's per prompt length and cache length).
@functools.partial(
  jax.jit, static_argnames=("graphdef", "max_len", "temperature", "top_k", "top_p")
)
def _prefill(params, prompt_1xP, key, *, graphdef, max_len, temperature, top_k, top_p):
  model = nnx.merge(graphdef, params)
  logits_1xPxV, caches = model.decode(prompt_1xP, model.init_cache(1, max_len), 0)
  return _pick(logits_1xPxV[0, -1], key, temperature, top_k, top_p), caches


@functools.partial(
  jax.jit, static_argnames=("graphdef", "temperature", "top_k", "top_p"), donate_argnames="caches"
)
def _step(params, tok, caches, pos, key, *, graphdef, temperature, top_k, top_p):
  logits_1x1xV, caches = nnx.merge(graphdef, params).decode(tok[None, None], caches, pos)
  return _pick(logits_1x1xV[0, 0], key, temperature, top_k, top_p), caches


def check_prompt(prompt_ids: list[int], model_cfg) -> None:
  """A prompt :func:`generate` can continue: at least one token, and room for one more
  within the model's ``max_seq_len``; raises ValueError."""
  if not prompt_ids:
    raise ValueError("the prompt is empty; pass at least one token")
  if len(prompt_ids) >= model_cfg.max_seq_len:
    raise ValueError(
      f"prompt has {len(prompt_ids)} tokens; the model takes at most {model_cfg.max_seq_len}"
    )


def generate(
  run: Run,
  params,
  prompt_ids: list[int],
  *,
  max_new_tokens: int,
  temperature: float = 0.8,
  top_k: int = 40,
  top_p: float = 1.0,
  seed: int = 0,
  eos_id: int | set[int] | None = None,
) -> list[int]:
  """Autoregressive sampling with a key / value cache (``Llama.decode``): the prompt in one
  call, then one token per call, so each new token costs one token's forward pass. Stops
  before ``eos_id`` (one id or a set of them), or at the model's ``max_seq_len``.

  The one-token step donates the cache buffers, so it updates them in place. Token ``t`` is
  drawn with key ``fold_in(key(seed), t)``: a reply is a function of the seed alone.
  """
  check_prompt(prompt_ids, run.model_cfg)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  max_len = min(run.model_cfg.max_seq_len, len(prompt_ids) + max_new_tokens)
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  static = dict(
    graphdef=run.graphdef, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)
  )
  key = jax.random.key(seed)
  pos = len(prompt_ids)  # where the token being chosen goes
  prompt_1xP = jnp.asarray([prompt_ids], jnp.int32)
  tok, caches = _prefill(
    params, prompt_1xP, jax.random.fold_in(key, pos), max_len=max_len, **static
  )
  stops = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
  out = []
  while True:
    t = int(tok)
    if t in stops:
      break
    out.append(t)
    if pos + 1 >= max_len:
      break
    tok, caches = _step(
      params, tok, caches, jnp.int32(pos), jax.random.fold_in(key, pos + 1), **static
    )
    pos += 1
  return out
