"""Loading a model for ``eval`` / ``sample`` / ``export`` (a run's checkpoint, or a Hugging
Face model directory as it is before any training), and sampling from it."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from galore_jax import checkpoint, distributed
from galore_jax.config import DTYPES, ConfigError, TrainConfig, check_mesh
from galore_jax.trainer import Run, run_tokenizer, setup, tokenizer_hash


def load_for_inference(
  path: str,
  *,
  tokenizer: str | None = None,
  mesh: str | None = None,
  dtype: str | None = None,
  param_dtype: str | None = None,
  before_restore: Callable[[Run, Any, int], None] | None = None,
):
  """Model graph, params, tokenizer and step of the latest checkpoint under ``path``, or of
  the step ``path`` names (``RUN/checkpoints/35``), restored onto ``mesh`` (``data=N,fsdp=M``;
  default one device), whatever mesh or number of processes saved it.

  ``dtype`` is the compute dtype (default: the run's). A run's weights load in the dtype
  they were trained in; ``param_dtype`` may only name it. A Hugging Face model directory
  (``config.json`` and safetensors) loads as ``train --init-from`` would start from it, at
  step 0, its weights in ``param_dtype`` (default float32): the model before fine-tuning.

  ``before_restore(run, tokenizer, step)`` runs once the run's configuration and the step
  to read are known and before any weight is read, so that a bad flag fails in a second,
  not after loading a large model. It may run more than once (a pruned checkpoint is read
  again).

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


def kept_generation_config(
  path: str, step: int, tokenizer: str | None = None
) -> dict[str, Any] | None:
  """The ``generation_config.json`` the model at ``path`` came with: a Hugging Face
  directory's own, or the one a run kept from its ``--init-from`` directory (step
  ``step``'s metadata); None if there is none. With another ``tokenizer`` (``--tokenizer``)
  its token ids are dropped: they would mean other tokens."""
  from galore_jax import hf

  if os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
    gen = hf.read_generation_config(path)
  else:
    gen = checkpoint.read_meta(path, step)[1].get("hf_generation_config")
  if tokenizer is not None and gen is not None:
    gen = {k: v for k, v in gen.items() if not k.endswith("token_id")}
  return gen


def data_format(meta: dict[str, Any] | None) -> str:
  """The form of the ``--data`` a run trained on (``"text"``, ``"prompt"``, ``"chat"``,
  ``"alpaca"``), as the checkpoint metadata ``meta`` (:func:`run_meta`) recorded it: how
  ``sample`` lays out a prompt and ``export`` a chat template. ``"text"`` for a Hugging
  Face model directory (``meta`` None), or a run saved before runs recorded it."""
  return "text" if meta is None else meta.get("data_format", "text")


def run_meta(path: str, step: int) -> dict[str, Any] | None:
  """The metadata of checkpoint ``step`` of the run at ``path``; None for a Hugging Face
  model directory."""
  if os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
    return None
  return checkpoint.read_meta(path, step)[1]


def last_eval(path: str, step: int) -> tuple[int, float] | None:
  """``(step, loss)`` of the last evaluation the run at ``path`` logged up to ``step``
  (its ``metrics.jsonl``), or None."""
  from galore_jax import metrics

  try:
    records = metrics.read_metrics(_run_dir(path))
  except (OSError, ValueError):
    return None
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r and r["step"] <= step]
  return evals[-1] if evals else None


def stop_ids(generation: dict[str, Any] | None) -> set[int]:
  """The ``eos_token_id`` (one id or a list) of a generation config, as a set."""
  eos = (generation or {}).get("eos_token_id")
  return {eos} if isinstance(eos, int) else {i for i in eos or [] if isinstance(i, int)}


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
    before_restore(run, sp, 0)
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
  note = distributed.primary_log(functools.partial(print, file=sys.stderr))
  cfg = dataclasses.replace(
    cfg,
    mesh=mesh,
    # A Hub id the run recorded: its snapshot in this machine's cache; a tokenizer that is
    # gone: the run's own copy.
    tokenizer=tokenizer or run_tokenizer(cfg.tokenizer, _run_dir(path), note),
    dtype=dtype or cfg.dtype,
  )
  from galore_jax import data

  try:
    sp = data.load_tokenizer(cfg.tokenizer, cfg.chat_template)
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
    before_restore(run, sp, step)
  params = checkpoint.restore(path, step, {"params": run.abstract_params})["params"]
  return run, params, sp, step


def _run_dir(path: str) -> str:
  """The run directory of a checkpoint path (``RUN``, ``RUN/checkpoints`` or a step's)."""
  ckpt_dir = checkpoint.checkpoint_dir(path)
  return os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints" else ckpt_dir


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


# A batch's prompts are right-padded to a multiple of this many tokens, so that prompts of
# nearby lengths share the compiled prefill and step programs.
PROMPT_BUCKET = 64


# Module-level with static settings: a second generate() with the same model and settings
# reuses the compiled programs (one per batch and cache shape; prompts are padded to a
# multiple of PROMPT_BUCKET tokens, so few shapes occur).
@functools.partial(
  jax.jit, static_argnames=("graphdef", "max_len", "temperature", "top_k", "top_p")
)
def _prefill(
  params, prompts_BxP, length_B, keys_B, *, graphdef, max_len, temperature, top_k, top_p
):
  model = nnx.merge(graphdef, params)
  b = prompts_BxP.shape[0]
  # Each row's padding is written to its cache, but the row's own tokens overwrite it before
  # any query can see it (Llama.decode masks cache rows past each row's position).
  logits_BxV, caches = model.decode(
    prompts_BxP, model.init_cache(b, max_len), 0, logits_at=length_B - 1
  )
  return _pick_rows(logits_BxV, keys_B, length_B, temperature, top_k, top_p), caches


@functools.partial(
  jax.jit, static_argnames=("graphdef", "temperature", "top_k", "top_p"), donate_argnames="caches"
)
def _step(params, tok_B, caches, pos_B, keys_B, *, graphdef, temperature, top_k, top_p):
  logits_Bx1xV, caches = nnx.merge(graphdef, params).decode(tok_B[:, None], caches, pos_B)
  return _pick_rows(logits_Bx1xV[:, 0], keys_B, pos_B + 1, temperature, top_k, top_p), caches


def _pick_rows(logits_BxV, keys_B, pos_B, temperature, top_k, top_p):
  """Each row's token for position ``pos_B[b]``, drawn with ``fold_in(keys_B[b], pos_B[b])``."""
  keys_B = jax.vmap(jax.random.fold_in)(keys_B, pos_B)
  pick = functools.partial(_pick, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.vmap(pick)(logits_BxV, keys_B)


def reply_text(tok, prompt_ids: list[int], reply_ids: list[int], head: str | None = None) -> str:
  """The text ``reply_ids`` adds after ``prompt_ids``. Decoding the reply alone loses what
  depends on the text before it (SentencePiece drops the space a word's piece starts with
  at the start of a text), so this is the decoded whole less the decoded prompt (``head``,
  if the caller has it already)."""
  head = tok.decode(list(prompt_ids)) if head is None else head
  whole = tok.decode(list(prompt_ids) + list(reply_ids))
  return whole[len(head) :] if whole.startswith(head) else tok.decode(list(reply_ids))


class ReplyStream:
  """Prints a reply as it is drawn (``generate(on_token=stream)``): after each token, the
  text :func:`reply_text` gives, less its last ``HOLD`` characters, beyond what is already
  printed; :meth:`close` prints the rest. The held characters are those a decoding may still
  change as tokens follow: a character whose bytes are split over byte-fallback tokens (up
  to 4 replacement characters), and Hugging Face's clean-up of a space before punctuation or
  a contraction (" ." -> ".", " n't" -> "n't"). So the printed whole is the reply's text."""

  HOLD = 8

  def __init__(self, tok, prompt_ids: list[int], write: Callable[[str], Any]):
    self.tok, self.prompt_ids, self.write = tok, list(prompt_ids), write
    self.head = tok.decode(self.prompt_ids)  # decoded once, not per token
    self.ids: list[int] = []
    self.shown = ""

  def __call__(self, _row: int, token: int) -> None:
    self.ids.append(token)
    text = reply_text(self.tok, self.prompt_ids, self.ids, self.head)
    self._show(text[: max(len(text) - self.HOLD, 0)])

  def close(self) -> str:
    """Prints what is left and returns the whole reply's text."""
    text = reply_text(self.tok, self.prompt_ids, self.ids, self.head)
    self._show(text)
    return text

  def _show(self, text: str) -> None:
    if len(text) > len(self.shown) and text.startswith(self.shown):
      self.write(text[len(self.shown) :])
      self.shown = text


def check_prompt(prompt_ids: list[int], model_cfg) -> None:
  """A prompt :func:`generate` can continue: at least one token, and room for one more
  within the model's ``max_seq_len``; raises ValueError."""
  if not prompt_ids:
    raise ValueError("the prompt is empty; pass at least one token")
  if len(prompt_ids) >= model_cfg.max_seq_len:
    raise ValueError(
      f"prompt has {len(prompt_ids)} tokens; the model's context is {model_cfg.max_seq_len}, "
      f"so at most {model_cfg.max_seq_len - 1} leave room for a reply"
    )


def finish_reason(prompt_ids: list[int], reply: list[int], max_new_tokens: int, model_cfg) -> str:
  """Why :func:`generate_batch` ended ``reply``: ``"length"`` (``max_new_tokens`` reached),
  ``"context"`` (the model's ``max_seq_len`` reached first) or ``"stop"`` (a stop id, which
  the reply leaves out; one drawn at the last place leaves the reply a token shorter than
  the context)."""
  if len(reply) >= max_new_tokens:
    return "length"
  if len(prompt_ids) + len(reply) >= model_cfg.max_seq_len:
    return "context"
  return "stop"


def generate(run: Run, params, prompt_ids: list[int], **kwargs) -> list[int]:
  """One prompt's reply: :func:`generate_batch` of ``[prompt_ids]``, with the same keywords."""
  return generate_batch(run, params, [prompt_ids], **kwargs)[0]


def generate_batch(
  run: Run,
  params,
  prompts: list[list[int]],
  *,
  max_new_tokens: int,
  temperature: float = 0.8,
  top_k: int = 40,
  top_p: float = 1.0,
  seed: int = 0,
  first_index: int = 0,
  eos_id: int | set[int] | None = None,
  on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
  """Autoregressive sampling of a batch of prompts through a key / value cache
  (``Llama.decode``): the prompts in one call (right-padded to a multiple of
  ``PROMPT_BUCKET`` tokens), then one token for every row per call, so each new token costs
  one token's forward pass. A row stops before ``eos_id`` (one id or a set of them), after
  ``max_new_tokens``, or at the model's ``max_seq_len``; the batch runs until every row has
  stopped. The one-token step donates the cache buffers, so it updates them in place.

  Prompt ``i`` of the batch has index ``first_index + i`` and draws the token at position
  ``t`` with key ``fold_in(fold_in(key(seed), index), t)``: a reply is a function of the
  seed, its index and its prompt, whatever else is in the batch or how a list of prompts is
  cut into batches.

  ``on_token(row, token)`` is called for every token a reply keeps, as soon as it is drawn
  (to stream a reply).
  """
  if not prompts:
    raise ValueError("no prompts")
  for ids in prompts:
    check_prompt(ids, run.model_cfg)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  max_seq = run.model_cfg.max_seq_len
  length_B = np.array([len(ids) for ids in prompts], np.int32)
  width = min(-(-int(length_B.max()) // PROMPT_BUCKET) * PROMPT_BUCKET, max_seq)
  prompts_BxP = np.zeros((len(prompts), width), np.int32)
  for row, ids in zip(prompts_BxP, prompts, strict=True):
    row[: len(ids)] = ids
  # Row b's last token goes at end_B[b] - 1; the cache holds the longest row.
  end_B = np.minimum(length_B + max_new_tokens, max_seq)
  max_len = min(width + max_new_tokens, max_seq)
  static = dict(
    graphdef=run.graphdef, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)
  )
  base = jax.random.key(seed)
  keys_B = jax.vmap(lambda i: jax.random.fold_in(base, i))(
    first_index + jnp.arange(len(prompts), dtype=jnp.int32)
  )
  tok_B, caches = _prefill(
    params, jnp.asarray(prompts_BxP), jnp.asarray(length_B), keys_B, max_len=max_len, **static
  )
  stops = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
  out: list[list[int]] = [[] for _ in prompts]
  pos_B = length_B.copy()  # where each row's newest token goes
  live_B = np.ones(len(prompts), bool)
  while True:
    for b, t in enumerate(np.asarray(tok_B).tolist()):
      if not live_B[b]:
        continue
      if t in stops:
        live_B[b] = False
        continue
      out[b].append(t)
      if on_token is not None:
        on_token(b, t)
      live_B[b] = pos_B[b] + 1 < end_B[b]
    if not live_B.any():
      return out
    # A stopped row still runs (the batch has one shape); it stays at its last place, which
    # it may overwrite, and its tokens are dropped.
    tok_B, caches = _step(params, tok_B, caches, jnp.asarray(pos_B), keys_B, **static)
    pos_B += live_B
