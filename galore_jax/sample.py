"""Loading a trained model from its checkpoint, and sampling from it (``eval`` / ``sample``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from galore_jax import checkpoint, distributed
from galore_jax.config import ConfigError, TrainConfig, check_mesh
from galore_jax.trainer import Run, setup, tokenizer_hash


def load_for_inference(path: str, *, tokenizer: str | None = None, mesh: str | None = None):
  """Model graph, params and tokenizer of the latest checkpoint under ``path``, or of the
  step ``path`` names (``RUN/checkpoints/35``), restored onto ``mesh`` (``data=N,fsdp=M``;
  default one device), whatever mesh or number of processes saved it.

  The latest checkpoint of a run that is still training may be pruned while it is read
  (``--keep-checkpoints``); it is then read again, up to 3 times: by then the run has saved a
  newer one. A step named in ``path`` is not replaced by another. In a multi-process job
  process 0 chooses the step.
  """
  check_mesh(mesh)
  if distributed.is_multiprocess():
    # Every process must restore the same checkpoint, but a run still saving can give two
    # processes different latest steps: process 0 picks it. No second try (the processes
    # would not agree on it either): a failed read ends the job.
    step = checkpoint.step_in_path(path)
    if step is None:
      latest = checkpoint.latest_step(path)
      step = distributed.agree_int(-1 if latest is None else latest)
    return _load(path, tokenizer, mesh, None if step < 0 else step)
  for attempt in range(3):
    try:
      return _load(path, tokenizer, mesh)
    except checkpoint.CheckpointPruned:
      if checkpoint.step_in_path(path) is not None or attempt == 2:
        raise


def _load(path: str, tokenizer: str | None, mesh: str | None, step: int | None = None):
  step, meta = checkpoint.read_meta(path, step)
  saved = meta.get("train_config", {})
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  cfg = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
  cfg = dataclasses.replace(cfg, mesh=mesh, tokenizer=tokenizer or cfg.tokenizer)
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
  params = checkpoint.restore(path, step, {"params": run.abstract_params})["params"]
  return run, params, sp, step


def generate(
  run: Run,
  params,
  prompt_ids: list[int],
  *,
  max_new_tokens: int,
  temperature: float = 0.8,
  top_k: int = 40,
  seed: int = 0,
  eos_id: int | set[int] | None = None,
) -> list[int]:
  """Autoregressive sampling on a fixed-length buffer (one compilation, no KV cache).
  Stops before ``eos_id`` (one id or a set of them).

  The model is causal, so logits at position ``t`` ignore the padding after it;
  recomputing the prefix each token is fine at the sizes this is used for.
  """
  max_len = min(run.model_cfg.max_seq_len, len(prompt_ids) + max_new_tokens)
  if len(prompt_ids) >= max_len:
    raise ValueError(
      f"prompt has {len(prompt_ids)} tokens; the model takes at most {run.model_cfg.max_seq_len}"
    )

  @jax.jit
  def next_token(params, buf, pos, key):
    logits = nnx.merge(run.graphdef, params)(buf)[0, pos - 1]
    if temperature <= 0:
      return jnp.argmax(logits).astype(jnp.int32)
    top, idx = jax.lax.top_k(logits / temperature, top_k)
    return idx[jax.random.categorical(key, top)].astype(jnp.int32)

  buf = np.zeros((1, max_len), np.int32)
  buf[0, : len(prompt_ids)] = prompt_ids
  key = jax.random.key(seed)
  stops = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
  out = []
  for pos in range(len(prompt_ids), max_len):
    tok = int(next_token(params, jnp.asarray(buf), pos, jax.random.fold_in(key, pos)))
    if tok in stops:
      break
    buf[0, pos] = tok
    out.append(tok)
  return out
