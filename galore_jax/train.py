"""Pretraining loop: one jit-compiled, sharded train step and the host loop around it.

The state is three pytrees, ``params`` (a plain dict of the Flax NNX model's
parameters), ``opt_state`` and ``step``; the model's graph definition is static
and merged back inside the step (``nnx.merge``), so the step is a pure function
compiled once. The same code runs on one device and on a ``data x fsdp``
``jax.sharding.Mesh``: batches are split over both axes, parameters and every
optimizer-state array (GaLore projectors included) over ``fsdp``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import shutil
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from galore_jax import adam8bit, checkpoint, distributed, metrics, projector, rundir, targets
from galore_jax import model as model_lib
from galore_jax import optimizer as galore

OPTIMIZERS = ("adamw", "galore_adamw", "adamw8bit", "galore_adamw8bit")
SVD_METHODS = projector.SVD_METHODS
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
  """A bad flag value; ``flag`` names it for the CLI's one-line error."""

  def __init__(self, flag: str, message: str):
    super().__init__(f"{flag}: {message}")
    self.flag = flag


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run depends on. Defaults: the main job (llama_tiny, GaLore, bundled corpus)."""

  model: str = "llama_tiny"
  # A Hugging Face model directory to start from: its config.json replaces --model, its
  # weights replace the random init, its tokenizer is the default one (galore_jax.hf).
  init_from: str | None = None
  optimizer: str = "galore_adamw"
  rank: int = 64
  update_proj_gap: int = 50  # paper: 200 over 10K+ steps; 50 refreshes the main job 3 times
  galore_scale: float = 0.25
  svd: str = "exact"
  subspace_iters: int = 2  # block power rounds per refresh with svd="subspace"
  refresh_schedule: str = "synchronous"
  lr: float | None = None  # None: 0.01 for GaLore (paper), 1e-3 for full-rank Adam
  warmup: int | None = None  # None: 10% of steps (paper)
  min_lr_ratio: float = 0.1
  steps: int = 150
  batch_size: int = 8
  seq_len: int = 128
  grad_accum: int = 1
  grad_clip: float = 0.0  # 0: off (the paper clips nothing at <= 1B)
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-6
  data: str = "builtin"
  tokenizer: str | None = None
  packing: bool = True
  eval_every: int = 50
  eval_batches: int = 16
  save_every: int = 100
  log_every: int = 1
  seed: int = 0
  out: str | None = None  # None: runs/<model>_<optimizer>_<timestamp>
  resume: bool = False
  stop_after: int | None = None  # stop (with a checkpoint) after this many steps in this run
  mesh: str | None = None  # "data=N,fsdp=M"
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"
  # Update each layer as soon as its gradient exists (needs grad_accum 1, no clipping).
  per_layer_updates: bool = True
  projector_dtype: str | None = None  # None: the param dtype (reference)
  max_nonfinite: int = 20  # consecutive skipped steps before the run stops with an error
  keep_checkpoints: int = checkpoint.KEEP_CHECKPOINTS  # newest checkpoints kept by rotation
  overwrite: bool = False  # start over in an --out that holds a previous run's outputs
  progress: bool = True
  peak_tflops: float | None = None  # per device, for mfu; None: known GPUs' datasheet peak
  profile_steps: str | None = None  # "A:B": a jax.profiler trace of steps A+1..B
  wandb: bool = False  # also log to Weights & Biases (the `wandb` extra)

  @property
  def is_galore(self) -> bool:
    return self.optimizer.startswith("galore")

  @property
  def peak_lr(self) -> float:
    if self.lr is not None:
      return self.lr
    return 0.01 if self.is_galore else 1e-3

  @property
  def warmup_steps(self) -> int:
    return self.warmup if self.warmup is not None else self.steps // 10


# ---------------------------------------------------------------------------
# Validation: every bad value is a ConfigError naming its flag.


def parse_mesh(spec: str | None) -> tuple[int, int]:
  """``"data=2,fsdp=4"`` -> (2, 4); ``None`` -> (1, 1)."""
  if not spec:
    return 1, 1
  sizes = {"data": 1, "fsdp": 1}
  for part in spec.split(","):
    name, _, value = part.partition("=")
    if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
      raise ConfigError("--mesh", f"expected data=N,fsdp=M with N, M >= 1, got {spec!r}")
    sizes[name.strip()] = int(value)
  return sizes["data"], sizes["fsdp"]


def parse_profile_steps(spec: str | None, steps: int) -> tuple[int, int] | None:
  """``"A:B"`` -> (A, B): trace the updates after step A up to step B (0 <= A < B <= steps)."""
  if spec is None:
    return None
  a, sep, b = spec.partition(":")
  if not sep or not a.strip().isdigit() or not b.strip().isdigit():
    raise ConfigError("--profile-steps", f"expected A:B with whole numbers A < B, got {spec!r}")
  a_i, b_i = int(a), int(b)
  if not a_i < b_i:
    raise ConfigError("--profile-steps", f"A must be less than B, got {spec!r}")
  if b_i > steps:
    raise ConfigError("--profile-steps", f"B must be <= --steps {steps}, got {spec!r}")
  return a_i, b_i


def base_model_config(cfg: TrainConfig, hf_config: dict | None = None) -> model_lib.LlamaConfig:
  """The architecture: ``--init-from``'s config.json (or ``hf_config``, the copy a
  checkpoint keeps of it), else the named ``--model``."""
  if not cfg.init_from:
    return model_lib.get_config(cfg.model)
  from galore_jax import hf

  try:
    if hf_config is not None:
      return hf.config_from_dict(hf_config, where=f"{cfg.init_from}/config.json")
    return hf.read_config(cfg.init_from)
  except (OSError, ValueError) as e:
    raise ConfigError("--init-from", str(e)) from e


def model_config(
  cfg: TrainConfig, vocab_size: int, hf_config: dict | None = None
) -> model_lib.LlamaConfig:
  try:
    base = base_model_config(cfg, hf_config)
    if cfg.init_from:  # the checkpoint's vocabulary; the tokenizer may use fewer ids
      if vocab_size > base.vocab_size:
        raise ConfigError(
          "--tokenizer",
          f"vocabulary of {vocab_size} is larger than the model's {base.vocab_size} "
          f"({cfg.init_from})",
        )
      vocab_size = base.vocab_size
    return dataclasses.replace(
      base,
      vocab_size=vocab_size,
      param_dtype=DTYPES[cfg.param_dtype],
      dtype=DTYPES[cfg.dtype],
      remat=cfg.remat,
    )
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError("--model", str(e)) from e


def validate(cfg: TrainConfig) -> None:
  """Checks flags that need no data or devices; raises ConfigError."""
  if cfg.model not in model_lib.CONFIGS and not cfg.init_from:
    raise ConfigError(
      "--model", f"unknown model {cfg.model!r}; choose from {', '.join(model_lib.CONFIGS)}"
    )
  if cfg.optimizer not in OPTIMIZERS:
    raise ConfigError(
      "--optimizer", f"unknown optimizer {cfg.optimizer!r}; choose from {', '.join(OPTIMIZERS)}"
    )
  mc = base_model_config(cfg)
  for flag, value in [
    ("--steps", cfg.steps),
    ("--batch-size", cfg.batch_size),
    ("--seq-len", cfg.seq_len),
    ("--grad-accum", cfg.grad_accum),
    ("--update-proj-gap", cfg.update_proj_gap),
    ("--rank", cfg.rank),
    ("--eval-every", cfg.eval_every),
    ("--eval-batches", cfg.eval_batches),
    ("--save-every", cfg.save_every),
    ("--keep-checkpoints", cfg.keep_checkpoints),
    ("--max-nonfinite", cfg.max_nonfinite),
  ]:
    if value < 1:
      raise ConfigError(flag, f"must be >= 1, got {value}")
  if cfg.seq_len > mc.max_seq_len:
    raise ConfigError(
      "--seq-len", f"{cfg.seq_len} exceeds {cfg.model}'s maximum sequence length {mc.max_seq_len}"
    )
  smallest = min(mc.hidden_size, mc.intermediate_size)
  if cfg.is_galore and cfg.rank > smallest:
    raise ConfigError(
      "--rank",
      f"{cfg.rank} is larger than the smallest projected matrix "
      f"dimension of {cfg.model} ({smallest})",
    )
  # NaN compares false with everything: `not x > 0` rejects it, `x < 0` would not.
  for flag, value, low, strict in [
    ("--lr", cfg.lr, 0.0, True),
    ("--galore-scale", cfg.galore_scale, 0.0, True),
    ("--grad-clip", cfg.grad_clip, 0.0, False),
    ("--weight-decay", cfg.weight_decay, 0.0, False),
  ]:
    if value is None:
      continue
    if not math.isfinite(value) or not (value > low if strict else value >= low):
      raise ConfigError(
        flag, f"must be a finite number {'>' if strict else '>='} {low:g}, got {value}"
      )
  if cfg.warmup is not None and not 0 <= cfg.warmup <= cfg.steps:
    raise ConfigError("--warmup", f"must be in [0, --steps], got {cfg.warmup}")
  if cfg.svd not in SVD_METHODS:
    raise ConfigError("--svd", f"must be one of {', '.join(SVD_METHODS)}, got {cfg.svd!r}")
  if cfg.subspace_iters < 1:
    raise ConfigError("--subspace-iters", f"must be >= 1, got {cfg.subspace_iters}")
  if cfg.refresh_schedule not in galore.REFRESH_SCHEDULES:
    raise ConfigError("--refresh-schedule", f"must be one of {galore.REFRESH_SCHEDULES}")
  if cfg.param_dtype not in DTYPES or cfg.dtype not in DTYPES:
    raise ConfigError("--param-dtype", f"dtypes must be one of {', '.join(DTYPES)}")
  if cfg.projector_dtype is not None and cfg.projector_dtype not in DTYPES:
    raise ConfigError("--projector-dtype", f"must be one of {', '.join(DTYPES)}")
  if cfg.remat not in ("none", "full", "save_matmuls"):
    raise ConfigError("--remat", f"must be none, full or save_matmuls, got {cfg.remat!r}")
  if cfg.resume and cfg.overwrite:
    raise ConfigError("--overwrite", "cannot be combined with --resume")
  parse_profile_steps(cfg.profile_steps, cfg.steps)
  if cfg.wandb:
    try:
      import wandb  # noqa: F401
    except ImportError:
      raise ConfigError(
        "--wandb", "needs the wandb package: pip install 'galore-jax[wandb]'"
      ) from None
  if cfg.peak_tflops is not None and not (math.isfinite(cfg.peak_tflops) and cfg.peak_tflops > 0):
    raise ConfigError("--peak-tflops", f"must be a finite number > 0, got {cfg.peak_tflops}")
  if cfg.stop_after is not None and cfg.stop_after < 1:
    raise ConfigError("--stop-after", f"must be >= 1, got {cfg.stop_after}")
  data_n, fsdp_n = parse_mesh(cfg.mesh)
  if data_n * fsdp_n > jax.device_count():
    raise ConfigError("--mesh", f"needs {data_n * fsdp_n} devices, {jax.device_count()} available")
  if problem := distributed.mesh_problem(data_n * fsdp_n):  # multi-process hook
    raise ConfigError("--mesh", problem)
  if cfg.batch_size % (data_n * fsdp_n):
    raise ConfigError(
      "--batch-size",
      f"{cfg.batch_size} is not divisible by the {data_n * fsdp_n} devices of --mesh {cfg.mesh}",
    )


# ---------------------------------------------------------------------------
# Optimizer.


# The paper's mask and the reference's projection side are public (galore_jax.targets); these
# names stay for the callers that use them (plan.py, experiments/).
galore_mask = targets.llama_targets
torch_side_axes = targets.reference_side_axes


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to ``min_lr_ratio`` of the peak (reference)."""
  peak = cfg.peak_lr
  if cfg.warmup_steps >= cfg.steps:
    return optax.linear_schedule(0.0, peak, cfg.steps)
  return optax.warmup_cosine_decay_schedule(
    0.0, peak, cfg.warmup_steps, cfg.steps, end_value=peak * cfg.min_lr_ratio
  )


def build_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  sched = lr_schedule(cfg)
  if cfg.optimizer.endswith("8bit"):
    inner = adam8bit.scale_by_adam8bit(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  else:
    inner = galore.scale_by_adam_hf(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.is_galore:
    core = galore.galore(
      inner,
      rank=cfg.rank,
      update_proj_gap=cfg.update_proj_gap,
      scale=cfg.galore_scale,
      mask=galore_mask,
      matrix_axes=torch_side_axes,
      svd=cfg.svd,
      subspace_iters=cfg.subspace_iters,
      refresh_schedule=cfg.refresh_schedule,
      projector_dtype=DTYPES[cfg.projector_dtype] if cfg.projector_dtype else None,
      seed=cfg.seed,
    )
  else:
    core = inner
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts += [
    core,
    optax.scale_by_learning_rate(sched),
    galore.decay_updated_weights(sched, cfg.weight_decay),
  ]
  return optax.chain(*parts)


# ---------------------------------------------------------------------------
# Sharding.


def make_mesh(cfg: TrainConfig) -> Mesh:
  data_n, fsdp_n = parse_mesh(cfg.mesh)
  devices = np.asarray(jax.devices()[: data_n * fsdp_n]).reshape(data_n, fsdp_n)
  return Mesh(devices, ("data", "fsdp"))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Shards the largest axis that ``fsdp`` divides; replicates what cannot be split."""
  if fsdp == 1 or not shape:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0 and shape[axis] >= fsdp:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def shardings_for(tree, mesh: Mesh):
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  # (grad_accum, batch, seq): micro-batches are split over every device.
  return NamedSharding(mesh, P(None, ("data", "fsdp"), None))


# ---------------------------------------------------------------------------
# The step.


def _summed_cross_entropy(logits_BxLxV, batch) -> jax.Array:
  """Cross-entropy summed over the unmasked targets of ``batch``."""
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
  return jnp.sum(ce_BxL * batch["mask"].astype(jnp.float32))


def _token_loss(graphdef, params, batch) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy over unmasked targets, and the number of them."""
  logits_BxLxV = nnx.merge(graphdef, params)(batch["inputs"])
  return _summed_cross_entropy(logits_BxLxV, batch), jnp.sum(batch["mask"].astype(jnp.float32))


def mean_token_gradient(graphdef, params, batch):
  """Mean token loss, token count and gradient over the micro-batches of ``batch``.

  ``batch`` arrays are (grad_accum, micro_batch, seq). Gradients of the summed
  token loss are accumulated (float32) over micro-batches and divided by the
  total token count, so accumulation gives the gradient of one large batch.
  Gradients are returned in the params' dtypes.
  """
  grad_fn = jax.value_and_grad(lambda p, b: _token_loss(graphdef, p, b), has_aux=True)
  if batch["inputs"].shape[0] == 1:
    (loss_sum, count), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
  else:

    def body(carry, micro):
      (loss_i, count_i), g = grad_fn(params, micro)
      acc_l, acc_c, acc_g = carry
      return (acc_l + loss_i, acc_c + count_i, jax.tree.map(jnp.add, acc_g, g)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss_sum, count, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), batch)
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
  return loss_sum / denom, count, grads


def make_train_step(graphdef, tx: optax.GradientTransformation):
  """``step(params, opt_state, batch) -> (params, opt_state, metrics)``; not yet jitted.

  ``batch`` arrays are (grad_accum, micro_batch, seq). Gradients of the summed
  token loss are accumulated over micro-batches and divided by the total
  token count, so accumulation gives the same update as one large batch.
  A step whose loss or gradient is not finite changes nothing (``skipped`` is
  1 in its metrics); the host loop stops the run after too many in a row.
  """

  def step(params, opt_state, batch):
    loss, count, grads = mean_token_gradient(graphdef, params, batch)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(args):
      params, opt_state = args
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    # cond, not where: a skipped step neither computes nor stores a second state.
    params, opt_state = jax.lax.cond(finite, apply, lambda args: args, (params, opt_state))
    return (
      params,
      opt_state,
      {
        "loss": loss,
        "grad_norm": grad_norm,
        "skipped": (~finite).astype(jnp.int32),
        "tokens": count,
      },
    )

  return step


def _replace_at(tree: dict, path: tuple, value) -> dict:
  """Copy of nested dict ``tree`` with ``tree[path[0]][path[1]]... = value`` (no array copies)."""
  if not path:
    return value
  return {**tree, path[0]: _replace_at(tree[path[0]], path[1:], value)}


def _get_at(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def make_layerwise_step(graphdef, tx: optax.GradientTransformation, *, remat: str = "none"):
  """Train step with per-layer updates: each weight is updated as soon as its gradient exists.

  Same signature and result as :func:`make_train_step` (``batch`` with one
  micro-batch), computed differently. The forward pass keeps one ``jax.vjp``
  per stage: the embedding, the attention half and the MLP half of each
  decoder block, and final norm + LM head + loss. The backward pass walks them
  in reverse; right after a stage's pullback it updates the stage's weights
  one at a time, each by the optimizer on that weight alone (``MaskedNode``
  everywhere else, :func:`galore_jax.optimizer.restrict_state`).
  ``optimization_barrier``s chain each update to the next one and to the
  cotangent flowing into the previous stage, so XLA can neither postpone an
  update nor run several at once: at most one half-block's gradient and one
  weight's update temporaries are alive, never the model's gradient. The
  optimizer and its state are unchanged (same numbers as the whole-tree
  update, refresh phases and random keys included).

  Non-finite values: if the loss is not finite nothing changes (``skipped``
  is 1), as in :func:`make_train_step`. If the loss is finite but a weight's
  gradient is not, that weight keeps its value and optimizer state and the
  others are updated; ``nonfinite_grads`` counts such weights. Whole-tree
  reductions (global-norm clipping) and micro-batch accumulation need every
  gradient before the first update, so the trainer uses
  :func:`make_train_step` for them.
  """

  def step(params, opt_state, batch):
    if batch["inputs"].shape[0] != 1:
      raise ValueError("per-layer updates need grad_accum == 1")
    micro = jax.tree.map(lambda x: x[0], batch)
    model = nnx.merge(graphdef, params)
    model_gd = nnx.graphdef(model)
    block_gds = [nnx.graphdef(block) for block in model.layers]

    def half_block(i, method):
      def run(half_params, x_BxLxD):
        block = nnx.merge(block_gds[i], {**params["layers"][i], **half_params})
        return getattr(block, method)(x_BxLxD)

      return run

    def after(d_BxLxD, tree):
      """``tree`` made data-dependent on the cotangent ``d`` (``+ 0 * d[0]``; XLA does not
      fold that for floats), so what is computed from it waits for the backward pass."""
      zero = jnp.ravel(d_BxLxD)[0] * 0
      return jax.tree.map(lambda x: x + zero.astype(x.dtype), tree)

    def forward_block(i, x_BxLxD):
      """Block ``i``'s output and the pullbacks of its MLP and attention halves.

      With ``remat="full"`` only the block's input is kept: the MLP pullback
      recomputes the block from it and leaves the attention half's pullback for
      the next stage. The input and the block's vector weights (norm scales)
      are made to depend on the incoming cotangent (:func:`after`): XLA would
      otherwise run every block's recomputation, or broadcasts of its norm
      scales, at the start of the backward pass and hold them all at once (the
      CPU backend does, optimization barriers notwithstanding).
      """
      attn = {k: params["layers"][i][k] for k in model_lib.DecoderBlock.ATTENTION}
      mlp = {k: params["layers"][i][k] for k in model_lib.DecoderBlock.MLP}
      run_attn = half_block(i, "attention_residual")
      run_mlp = half_block(i, "mlp_residual")
      if remat != "full":
        h_BxLxD, attn_pullback = jax.vjp(model_lib.checkpointed(run_attn, remat), attn, x_BxLxD)
        y_BxLxD, mlp_pullback = jax.vjp(model_lib.checkpointed(run_mlp, remat), mlp, h_BxLxD)
        return y_BxLxD, mlp_pullback, attn_pullback
      saved = {}
      vectors_later = lambda d, tree: {
        k: jax.tree.map(lambda w, d=d: after(d, w) if w.ndim < 2 else w, v) for k, v in tree.items()
      }

      def mlp_pullback(d_BxLxD):
        x_later = after(d_BxLxD, x_BxLxD)
        h_BxLxD, saved["attn"] = jax.vjp(run_attn, vectors_later(d_BxLxD, attn), x_later)
        return jax.vjp(run_mlp, vectors_later(d_BxLxD, mlp), h_BxLxD)[1](d_BxLxD)

      return run_mlp(mlp, run_attn(attn, x_BxLxD)), mlp_pullback, lambda d: saved["attn"](d)

    def head_loss(head_params, x_BxLxD):
      logits_BxLxV = nnx.merge(model_gd, {**params, **head_params}).head(x_BxLxD)
      return _summed_cross_entropy(logits_BxLxV, micro)

    # Forward, keeping each stage's pullback: (path prefix of its weights, pullback).
    embed = lambda p: model_lib.embed_lookup(p["embedding"], micro["inputs"], model.config.dtype)
    x_BxLxD, embed_pullback = jax.vjp(embed, params["embed"])
    stages = [(("embed",), lambda d: (embed_pullback(d)[0], None))]
    for i in range(len(block_gds)):
      x_BxLxD, mlp_pullback, attn_pullback = forward_block(i, x_BxLxD)
      stages += [(("layers", i), attn_pullback), (("layers", i), mlp_pullback)]
    head = {k: params[k] for k in ("final_norm", "lm_head")}
    loss_sum, pullback = jax.vjp(head_loss, head, x_BxLxD)
    stages.append(((), pullback))
    count = jnp.sum(micro["mask"].astype(jnp.float32))
    denom = jnp.maximum(count, 1.0)
    loss = loss_sum / denom
    loss_ok = jnp.isfinite(loss)

    placeholders = jax.tree.map(lambda _: optax.MaskedNode(), params)
    no_leaves = jax.tree.map(lambda _: False, params)
    new_params, new_state = params, opt_state
    sq_norm = jnp.zeros([], jnp.float32)
    nonfinite = jnp.zeros([], jnp.int32)

    def update_weight(path, g):
      """Optimizer step for the one weight at ``path``: its new value and state part."""
      nonlocal sq_norm, nonfinite
      p = _get_at(params, path)
      g = g.astype(p.dtype)
      g_sq = jnp.sum(jnp.square(g.astype(jnp.float32)))
      ok = loss_ok & jnp.isfinite(g_sq)
      sq_norm += g_sq
      nonfinite += (loss_ok & ~ok).astype(jnp.int32)
      keep = _replace_at(no_leaves, path, True)

      def apply(operands):
        g, old_part, p = operands
        updates, part = tx.update(
          _replace_at(placeholders, path, g), old_part, _replace_at(placeholders, path, p)
        )
        return optax.apply_updates(p, _get_at(updates, path)), part

      # A cond, not a where: the skipped branch needs no second copy of the weight's
      # state, so the 8-bit update can overwrite the stored codes in place.
      old_part = galore.restrict_state(tx, opt_state, keep)
      new_p, part = jax.lax.cond(ok, apply, lambda ops: (ops[2], ops[1]), (g, old_part, p))
      return new_p, part, keep

    # Backward: after each stage's pullback, update its weights one after another.
    d_BxLxD = (1.0 / denom).astype(loss_sum.dtype)
    for prefix, stage_pullback in reversed(stages):
      grads, d_BxLxD = stage_pullback(d_BxLxD)
      leaves = [
        (prefix + tuple(k.key for k in keypath), g)
        for keypath, g in jax.tree_util.tree_flatten_with_path(grads)[0]
      ]
      for k, (path, g) in enumerate(leaves):
        new_p, part, keep = update_weight(path, g)
        rest = [g for _, g in leaves[k + 1 :]]
        d_BxLxD, rest, new_p, part = jax.lax.optimization_barrier((d_BxLxD, rest, new_p, part))
        leaves[k + 1 :] = [(q, g) for (q, _), g in zip(leaves[k + 1 :], rest, strict=True)]
        new_params = _replace_at(new_params, path, new_p)
        new_state = galore.merge_state(tx, new_state, part, keep)

    # Step counters advance once, unless the whole step was skipped: an update of no
    # leaves at all advances only them.
    old_counts = galore.restrict_state(tx, opt_state, no_leaves)
    _, counts = tx.update(placeholders, old_counts, placeholders)
    counts = jax.tree.map(lambda new, old: jnp.where(loss_ok, new, old), counts, old_counts)
    new_state = galore.merge_state(tx, new_state, counts, no_leaves)
    return (
      new_params,
      new_state,
      {
        "loss": loss,
        "grad_norm": jnp.sqrt(sq_norm),
        "skipped": (~loss_ok).astype(jnp.int32),
        "nonfinite_grads": nonfinite,
        "tokens": count,
      },
    )

  return step


def per_layer_updates(cfg: TrainConfig) -> bool:
  """Whether the run uses :func:`make_layerwise_step` (else :func:`make_train_step`)."""
  return cfg.per_layer_updates and cfg.grad_accum == 1 and cfg.grad_clip == 0


def make_eval_step(graphdef):
  return lambda params, batch: _token_loss(graphdef, params, batch)


# ---------------------------------------------------------------------------
# Run setup.


@dataclasses.dataclass
class Run:
  """What the loop, ``eval`` and ``sample`` need: model graph, shardings, compiled steps."""

  cfg: TrainConfig
  model_cfg: model_lib.LlamaConfig
  graphdef: Any
  mesh: Mesh
  tx: optax.GradientTransformation
  param_sharding: Any
  opt_sharding: Any
  abstract_params: Any
  abstract_opt: Any


def abstract_model(model_cfg: model_lib.LlamaConfig, seed: int = 0):
  """Graph definition and ShapeDtypeStruct params, allocating nothing."""
  abstract = nnx.eval_shape(lambda: model_lib.Llama(model_cfg, rngs=nnx.Rngs(seed)))
  graphdef, state = nnx.split(abstract, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def setup(cfg: TrainConfig, vocab_size: int, hf_config: dict | None = None) -> Run:
  model_cfg = model_config(cfg, vocab_size, hf_config)
  mesh = make_mesh(cfg)
  graphdef, abstract_params = abstract_model(model_cfg, cfg.seed)
  tx = build_optimizer(cfg)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  param_sh = shardings_for(abstract_params, mesh)
  opt_sh = shardings_for(abstract_opt, mesh)
  with_sh = lambda tree, sh: jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh
  )
  return Run(
    cfg,
    model_cfg,
    graphdef,
    mesh,
    tx,
    param_sh,
    opt_sh,
    with_sh(abstract_params, param_sh),
    with_sh(abstract_opt, opt_sh),
  )


def init_state(run: Run):
  """Fresh params and optimizer state, created directly in their shardings.

  The params come part by part (``model.init_params``: one compiled block
  initialiser for every layer, so compile time does not grow with depth), or from
  ``--init-from``'s safetensors, read tensor by tensor into their shardings.
  """
  if run.cfg.init_from:
    from galore_jax import hf

    try:
      params = hf.load_pretrained(
        run.cfg.init_from, config=run.model_cfg, shardings=run.param_sharding
      )[1]
    except (OSError, ValueError) as e:
      raise ConfigError("--init-from", str(e)) from e
  else:
    params = model_lib.init_params(run.model_cfg, run.cfg.seed, run.param_sharding)
  return params, jax.jit(run.tx.init, out_shardings=run.opt_sharding)(params)


def compile_train_step(run: Run):
  # A tied embedding gets gradient from two stages (lookup and head), so it cannot be
  # updated right after one of them: tied models take the whole-gradient step.
  if per_layer_updates(run.cfg) and not run.model_cfg.tie_embeddings:
    step = make_layerwise_step(run.graphdef, run.tx, remat=run.cfg.remat)
  else:
    step = make_train_step(run.graphdef, run.tx)
  return jax.jit(
    step,
    in_shardings=(run.param_sharding, run.opt_sharding, batch_sharding(run.mesh)),
    out_shardings=(run.param_sharding, run.opt_sharding, None),
    donate_argnums=(0, 1),
  )


def device_batch(run: Run, batch: dict[str, np.ndarray], grad_accum: int, *, local=False):
  """Host batch (grad_accum * B, L) -> global device arrays (grad_accum, B, L).

  On several processes ``make_array_from_process_local_data`` assembles the global
  array from each process's rows: ``local``: ``batch`` holds only this process's rows
  (the training stream, :func:`load_data`); else it is a whole global batch and each
  process passes its own rows.
  """
  micro = run.cfg.batch_size if local else None
  return distributed.global_batch(batch_sharding(run.mesh), batch, grad_accum, micro)


def process_rows(x: np.ndarray) -> np.ndarray:
  """This process's share of a global batch (axis 1), for multi-host runs."""
  n, i = jax.process_count(), jax.process_index()
  if n == 1:
    return x
  per = x.shape[1] // n
  return x[:, i * per : (i + 1) * per]


def tokenizer_hash(sp) -> str:
  return hashlib.sha256(sp.serialized_model_proto()).hexdigest()[:16]


def run_meta(cfg: TrainConfig, run: Run, sp) -> dict[str, Any]:
  """Checkpoint metadata; the ``compat`` part must match for a resume."""
  return {
    "compat": {
      # The tokenizer first: another vocabulary also changes the model's shapes.
      "vocab_size": run.model_cfg.vocab_size,
      "tokenizer_sha": tokenizer_hash(sp),
      "model": cfg.model,
      "model_config": {
        k: v for k, v in model_lib.config_record(run.model_cfg).items() if k not in _NOT_IN_STATE
      },
      "optimizer": cfg.optimizer,
      "rank": cfg.rank if cfg.is_galore else None,
      "update_proj_gap": cfg.update_proj_gap if cfg.is_galore else None,
      "svd": cfg.svd if cfg.is_galore else None,
      "refresh_schedule": cfg.refresh_schedule if cfg.is_galore else None,
      "projector_dtype": cfg.projector_dtype if cfg.is_galore else None,
      "grad_clip": cfg.grad_clip > 0,
      "weight_decay": cfg.weight_decay > 0,
    },
    "train_config": {k: v for k, v in dataclasses.asdict(cfg).items()},
    **({"hf_config": _init_config(cfg)} if cfg.init_from else {}),
    "data_position": {
      "seed": cfg.seed,
      "source": cfg.data,
      "batch_size": cfg.batch_size,
      "grad_accum": cfg.grad_accum,
      "seq_len": cfg.seq_len,
      "packing": cfg.packing,
    },
  }


# Model settings that change no saved array (compute dtype, rematerialisation) may differ
# on resume; the vocabulary is compared as the tokenizer's.
_NOT_IN_STATE = ("dtype", "remat", "vocab_size")
_MODEL_CONFIG_FLAGS = {"param_dtype": "--param-dtype"}

_COMPAT_FLAGS = {
  "model": "--model",
  "model_config": "--model",
  "optimizer": "--optimizer",
  "rank": "--rank",
  "update_proj_gap": "--update-proj-gap",
  "svd": "--svd",
  "refresh_schedule": "--refresh-schedule",
  "projector_dtype": "--projector-dtype",
  "grad_clip": "--grad-clip",
  "weight_decay": "--weight-decay",
  "vocab_size": "--tokenizer",
  "tokenizer_sha": "--tokenizer",
}


def _init_config(cfg: TrainConfig) -> dict:
  """``--init-from``'s config.json, kept in the checkpoint so eval / export / resume do not
  need the directory any more."""
  from galore_jax import hf

  return hf.read_config_dict(cfg.init_from)


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
  """A resume must rebuild the same state and continue the same data order."""
  a, b = saved.get("compat", {}), current["compat"]
  for key in b:
    if key == "model_config" and a.get("model") == b["model"]:
      # One field at a time, naming its flag (not the whole dict); fields a newer
      # version stopped comparing (_NOT_IN_STATE) are ignored.
      old = a.get(key) or {}
      for field, value in b[key].items():
        if old.get(field) != value:
          raise ConfigError(
            _MODEL_CONFIG_FLAGS.get(field, "--model"),
            f"checkpoint {where} was saved with {field}={old.get(field)}, this run has {value}",
          )
      continue
    if a.get(key) != b[key]:
      raise ConfigError(
        _COMPAT_FLAGS[key],
        f"checkpoint {where} was saved with {key}={a.get(key)!r}, this run has {b[key]!r}",
      )
  pos_a, pos_b = dict(saved.get("data_position", {})), current["data_position"]
  if "source" in pos_a:  # older runs stored a relative --data as typed
    pos_a["source"] = absolute_source(pos_a["source"])
  changed = sorted(k for k in pos_b if pos_a.get(k) != pos_b[k])
  if changed:
    flag = {"source": "--data"}.get(changed[0], "--" + changed[0].replace("_", "-"))
    raise ConfigError(
      flag,
      f"checkpoint {where} was trained on data {pos_a}; resuming with "
      f"a different {', '.join(changed)} would not continue its data order",
    )


# ---------------------------------------------------------------------------
# Evaluation.


def evaluate(run: Run, params, batches, eval_fn) -> tuple[float, float]:
  total, count = 0.0, 0.0
  for b in batches:
    loss_sum, n = eval_fn(params, device_batch(run, b, 1))
    total += float(loss_sum)
    count += float(n)
  loss = total / max(count, 1.0)
  return loss, math.exp(min(loss, 50.0))


def compile_eval_step(run: Run):
  step = make_eval_step(run.graphdef)
  return jax.jit(
    lambda p, b: step(p, jax.tree.map(lambda x: x[0], b)),
    in_shardings=(run.param_sharding, batch_sharding(run.mesh)),
  )


# ---------------------------------------------------------------------------
# The loop.


class _Signals:
  """Turns SIGINT / SIGTERM into a flag checked between steps (then save and exit).

  A second signal stops waiting for the current step (``KeyboardInterrupt``), except
  while a checkpoint is being written (:meth:`saving`): it then waits for the save,
  so that a checkpoint is never cut short by the user's own Ctrl-C.
  """

  def __init__(self):
    self.received: int | None = None
    self._old = {}
    self._saving = False

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is None:
      self.received = signum
    elif not self._saving:  # a second signal: stop waiting
      raise KeyboardInterrupt

  @contextlib.contextmanager
  def saving(self):
    self._saving = True
    try:
      yield
    finally:
      self._saving = False

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class TrainingInterrupted(Exception):
  """Stopped by SIGINT / SIGTERM; the CLI exits with ``128 + signum`` (130 / 143)."""

  def __init__(self, signum: int, step: int | None, message: str):
    at = "" if step is None else f" at step {step}"
    super().__init__(f"interrupted by {signal.Signals(signum).name}{at}; {message}")
    self.signum, self.step = signum, step


class TrainingDiverged(RuntimeError):
  pass


def _data_config(cfg: TrainConfig, batch_size: int):
  from galore_jax import data  # lazy: grain is not needed to build or benchmark a step

  return data.DataConfig(
    source=cfg.data,
    seq_len=cfg.seq_len,
    batch_size=batch_size,
    packing=cfg.packing,
    seed=cfg.seed,
    tokenizer=cfg.tokenizer,
  )


def load_data(cfg: TrainConfig):
  """Tokenizer, training stream and fixed validation batches; bad --data is a ConfigError."""
  from galore_jax import data

  try:
    sp = data.load_tokenizer(cfg.tokenizer)
  except (OSError, RuntimeError, ValueError) as e:
    raise ConfigError("--tokenizer", str(e)) from e
  if sp.eos_id() < 0:
    raise ConfigError("--tokenizer", "the tokenizer has no EOS piece; documents need a separator")
  # Multi-process: this process's rows of each global batch only (galore_jax.distributed).
  shard = distributed.batch_shard(batch_sharding(make_mesh(cfg)), cfg.batch_size, cfg.seq_len)
  try:
    train_ds = data.make_dataset(
      _data_config(cfg, cfg.batch_size * cfg.grad_accum), "train", shard=shard
    )
    val = data.eval_batches(_data_config(cfg, cfg.batch_size), cfg.eval_batches)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError("--data", str(e)) from e
  return sp, train_ds, val


def default_out(cfg: TrainConfig) -> str:
  return os.path.join("runs", f"{cfg.model}_{cfg.optimizer}_{time.strftime('%Y%m%d-%H%M%S')}")


def absolute_source(source: str) -> str:
  """``--data`` as stored in a run: paths made absolute (``eval`` may run elsewhere)."""
  if not source.strip() or source.strip() == "builtin" or source.startswith("tfds:"):
    return source  # (an empty one is refused by the data pipeline)
  return os.path.abspath(os.path.expanduser(source))


# What a previous run leaves in --out; a new run (no --resume) refuses to mix with it.
_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tb", metrics.WANDB_DIR)


def _check_out(cfg: TrainConfig, ckpt_dir: str) -> int | None:
  """The latest checkpoint step to resume from (None: a fresh start); refuses to mix
  runs. With ``--overwrite`` a previous run's outputs are deleted (under the lock)."""
  existing = checkpoint.latest_step(ckpt_dir)
  if cfg.resume:
    if existing is None:
      raise ConfigError("--resume", f"no checkpoint to resume from in {ckpt_dir}")
    return existing
  found = [n for n in _RUN_OUTPUTS if os.path.exists(os.path.join(cfg.out, n))]
  if found and cfg.overwrite:
    for name in found if distributed.is_primary() else ():  # one process deletes
      path = os.path.join(cfg.out, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  elif existing is not None:
    raise ConfigError(
      "--out",
      f"{cfg.out} already holds checkpoints (step {existing}); "
      "pass --resume to continue it, --overwrite to start over, or choose another --out",
    )
  elif found:
    raise ConfigError(
      "--out",
      f"{cfg.out} already holds a run's outputs ({', '.join(found)}) but no checkpoint; "
      "pass --overwrite to start over or choose another --out",
    )
  return None


def train(cfg: TrainConfig, *, log=print) -> dict[str, Any]:
  """Runs (or resumes) training; returns a summary with the final losses and paths.

  The run directory is locked for the whole call (:func:`galore_jax.rundir.locked`);
  SIGINT / SIGTERM raise :class:`TrainingInterrupted` after saving (or, before the
  first step, after removing a run directory this call created).
  """
  if cfg.out is None and distributed.is_multiprocess():  # a per-process timestamp would differ
    raise ConfigError("--out", "a multi-process run needs --out (the same for every process)")
  if not distributed.is_primary():  # one copy of each line per job
    log = distributed.primary_log(log)
  if cfg.out is None:
    if cfg.resume:
      raise ConfigError("--out", "--resume needs the --out directory of the run to continue")
    cfg = dataclasses.replace(cfg, out=default_out(cfg))
  if not cfg.out.strip():
    raise ConfigError("--out", "must name a directory, got ''")
  validate(cfg)
  # Absolute paths: eval, sample and --resume may run from another directory.
  cfg = dataclasses.replace(
    cfg,
    data=absolute_source(cfg.data),
    tokenizer=os.path.abspath(os.path.expanduser(cfg.tokenizer)) if cfg.tokenizer else None,
  )
  if cfg.init_from:  # absolute: a resume may run from another directory
    cfg = dataclasses.replace(cfg, init_from=os.path.abspath(os.path.expanduser(cfg.init_from)))
  if cfg.init_from and cfg.tokenizer is None:  # the model's own tokenizer, if it has one
    from galore_jax import hf

    found = hf.find_tokenizer(cfg.init_from)
    if found is None:
      raise ConfigError(
        "--tokenizer", f"{cfg.init_from} has no tokenizer.json or tokenizer.model; name one"
      )
    cfg = dataclasses.replace(cfg, tokenizer=str(found.resolve()))
  with _Signals() as signals, contextlib.ExitStack() as stack:
    try:
      # Multi-process: process 0 holds the lock for the job (galore_jax.distributed).
      created = stack.enter_context(distributed.locked_run_dir(cfg.out))
    except rundir.RunDirError as e:
      raise ConfigError("--out", str(e)) from None
    try:
      return _train(cfg, signals, log)
    except KeyboardInterrupt:  # a second signal before the first step ended
      if created:
        shutil.rmtree(cfg.out, ignore_errors=True)
      raise TrainingInterrupted(
        signals.received or signal.SIGINT, None, "stopped during start-up"
      ) from None
    except TrainingInterrupted as e:
      if e.step is None and created:  # interrupted before the first step: leave no trace
        shutil.rmtree(cfg.out, ignore_errors=True)
      raise
    except (ConfigError, checkpoint.CheckpointError):  # refused before writing anything
      if created:
        shutil.rmtree(cfg.out, ignore_errors=True)
      raise


def _train(cfg: TrainConfig, signals: _Signals, log) -> dict[str, Any]:
  t_start = time.perf_counter()
  with metrics.CompileTimer() as compile_timer:  # until the first step ends (below)
    return _train_loop(cfg, signals, log, t_start, compile_timer)


def _train_loop(cfg: TrainConfig, signals, log, t_start: float, compile_timer) -> dict[str, Any]:
  ckpt_dir = os.path.join(cfg.out, "checkpoints")
  existing = _check_out(cfg, ckpt_dir)
  distributed.barrier("out_checked")  # multi-process: all checked before anyone writes

  def startup_check():
    if signals.received is not None:
      raise TrainingInterrupted(
        signals.received, None, "before the first step; nothing was written"
      )

  sp, train_ds, val_batches = load_data(cfg)
  startup_check()
  run = setup(cfg, sp.get_piece_size())
  meta = run_meta(cfg, run, sp)

  if cfg.resume:
    start, saved = checkpoint.read_meta(ckpt_dir, existing)
    check_compatible(saved, meta, f"{ckpt_dir}/{start}")
    restored = checkpoint.restore(
      ckpt_dir, start, {"params": run.abstract_params, "opt_state": run.abstract_opt}
    )
    params, opt_state = restored["params"], restored["opt_state"]
    log(f"resumed from {ckpt_dir}/{start}")
  else:
    params, opt_state = init_state(run)
    start = 0
  if start >= cfg.steps:
    log(f"checkpoint is at step {start} >= --steps {cfg.steps}; nothing to train")

  n_params = sum(x.size for x in jax.tree.leaves(params))
  log(
    f"model {cfg.init_from or cfg.model}: {n_params / 1e6:.2f}M params, "
    f"vocab {run.model_cfg.vocab_size}; "
    f"optimizer {cfg.optimizer}"
    + (f" rank {cfg.rank}" if cfg.is_galore else "")
    + f"; {train_ds.num_tokens or 'streamed'} training tokens; mesh {dict(run.mesh.shape)}"
  )

  startup_check()
  if cfg.resume and distributed.is_primary():  # replayed steps' old records go (process 0's)
    dropped = metrics.drop_after(cfg.out, start)
    if dropped:
      log(f"dropped {dropped} metrics records after step {start} (replayed now)")
  step_fn = compile_train_step(run)
  eval_fn = compile_eval_step(run)
  sched = lr_schedule(cfg)
  mngr = checkpoint.manager(ckpt_dir, keep=cfg.keep_checkpoints)
  try:  # multi-process: process 0 writes metrics and TensorBoard
    writer = (
      metrics.MetricsWriter(cfg.out, wandb_config=meta["train_config"] if cfg.wandb else None)
      if distributed.is_primary()
      else distributed.NullWriter(cfg.out)
    )
  except metrics.WandbError as e:
    mngr.close()
    raise ConfigError("--wandb", str(e)) from e
  tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
  devices = list(run.mesh.devices.flat)
  local_devices = [d for d in devices if d.process_index == jax.process_index()]
  peak_tflops = cfg.peak_tflops or metrics.default_peak_tflops(devices[0].device_kind)
  profile = parse_profile_steps(cfg.profile_steps, cfg.steps)
  profiling = False
  end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
  losses: list[float] = []
  last_eval: tuple[float, float] | None = None
  consecutive_bad = 0
  step = start
  # Every checkpoint follows a healthy step (save() below), so the newest one on disk is
  # where a diverged or interrupted run can go back to.
  saved_at = start if cfg.resume else None

  def save(at) -> bool:
    """Saves unless the current streak of non-finite steps is non-zero (returns False).

    Skipped updates leave the state of the streak's start; a checkpoint from inside the
    streak would only push good ones out of rotation (``--keep-checkpoints``).
    """
    nonlocal saved_at
    if consecutive_bad:
      return False
    if saved_at != at:  # a signal at a save step: already on disk
      with signals.saving():  # a second signal waits for the save
        checkpoint.save(mngr, at, params, opt_state, meta)
      saved_at = at
    return True

  def newest_checkpoint() -> str:
    if saved_at is None:
      return f"no checkpoint was saved in {ckpt_dir}"
    return f"the newest checkpoint is {ckpt_dir}/{saved_at}"

  bar = None
  if cfg.progress and distributed.is_primary():
    from tqdm import tqdm  # lazy: library users may not want a progress bar

    bar = tqdm(
      total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
    )
  try:
    batches = train_ds.iterate(start)
    while step < end:
      if step == start:
        startup_check()
      if profile is not None and not profiling and profile[0] <= step < profile[1]:
        jax.profiler.start_trace(os.path.join(cfg.out, "tb"))
        profiling = True
      t_step = time.perf_counter()  # the step and its batch; not evaluation or saving
      batch = device_batch(run, next(batches), cfg.grad_accum, local=True)
      params, opt_state, m = step_fn(params, opt_state, batch)
      m = jax.device_get(m)
      lr_used = float(sched(step))
      step += 1
      now = time.perf_counter()
      step_s = max(now - t_step, 1e-9)
      tps = tokens_per_step / step_s
      if profiling and step >= profile[1]:
        jax.block_until_ready((params, opt_state))
        jax.profiler.stop_trace()
        profiling = False
        where = f"profile of steps {profile[0] + 1}..{step}: {os.path.join(cfg.out, 'tb')}"
        if bar is not None:
          bar.write(where)
        else:
          log(where)
      memory = metrics.device_memory(local_devices)
      bad = int(m["skipped"]) or int(m.get("nonfinite_grads", 0))
      consecutive_bad = consecutive_bad + 1 if bad else 0
      loss = float(m["loss"])
      losses.append(loss)
      if step % cfg.log_every == 0 or step == end:
        writer.write(
          {
            "step": step,
            "loss": loss,
            "lr": lr_used,
            "step_s": step_s,
            "tokens_per_s": tps,
            "mfu": metrics.mfu(n_params, tps, peak_tflops, len(devices)),
            **memory,
            "grad_norm": float(m["grad_norm"]),
            "skipped": int(m["skipped"]),
            **({"nonfinite_grads": int(m["nonfinite_grads"])} if m.get("nonfinite_grads") else {}),
          }
        )
      if step == start + 1:  # after the step's own record: line 1 stays step 1's
        compile_timer.stop()
        writer.write(
          {
            "step": step,
            "compile_s": compile_timer.seconds,
            "startup_s": now - t_start,
          }
        )
      if bar is not None:
        bar.update(1)
        mem = memory["peak_bytes"]
        bar.set_postfix(
          loss=f"{loss:.3f}",
          tok_s=f"{tps:,.0f}",
          **({"mem": f"{mem / 2**30:.2f}GiB"} if mem is not None else {}),
        )
      if consecutive_bad >= cfg.max_nonfinite:
        raise TrainingDiverged(
          f"{consecutive_bad} consecutive steps with non-finite loss or gradients (steps "
          f"{step - consecutive_bad + 1}..{step}, not saved); {newest_checkpoint()}. "
          "Lower --lr or enable --grad-clip."
        )
      if step % cfg.eval_every == 0 or step == cfg.steps:
        last_eval = evaluate(run, params, val_batches, eval_fn)
        writer.write(
          {
            "step": step,
            "eval_loss": last_eval[0],
            "eval_ppl": last_eval[1],
            "eval_batches": len(val_batches),
          }
        )
        if bar is not None:
          bar.write(
            f"step {step}: eval loss {last_eval[0]:.4f}, ppl {last_eval[1]:.2f} "
            f"({len(val_batches)} batches)"
          )
      if step % cfg.save_every == 0 or step == end:
        save(step)
      # Multi-process: a signal to any process stops all after this step (saving is collective).
      if (stop := distributed.agree_signal(signals.received)) is not None:
        if save(step):
          why = f"checkpoint saved in {ckpt_dir}/{step}; continue with --resume"
        else:
          why = (
            f"not saved (the last {consecutive_bad} steps were not finite); " + newest_checkpoint()
          )
        raise TrainingInterrupted(stop, step, why)
  except KeyboardInterrupt:  # a second signal, during a step
    if step == start:
      raise  # before the first step ended: train() cleans up
    raise TrainingInterrupted(
      signals.received or signal.SIGINT,
      step,
      f"stopped during step {step + 1}; {newest_checkpoint()}; continue with --resume",
    ) from None
  finally:
    if profiling:
      jax.profiler.stop_trace()
    if bar is not None:
      bar.close()
    writer.close()
    mngr.close()

  if consecutive_bad:
    raise TrainingDiverged(
      f"the last {consecutive_bad} steps (to step {step}) had non-finite loss or gradients "
      f"and were not saved; {newest_checkpoint()}. Lower --lr or enable --grad-clip."
    )
  if last_eval is not None and not math.isfinite(last_eval[0]):
    raise TrainingDiverged(
      f"the final validation loss is not finite ({last_eval[0]}); {newest_checkpoint()}"
    )
  summary = {
    "out": os.path.abspath(cfg.out),
    "start_step": start,
    "step": step,
    "losses": losses,
    "metrics": os.path.abspath(writer.path),
    "checkpoints": os.path.abspath(ckpt_dir),
    # Compiled variants of the train step: 1 unless something forced a retrace.
    "step_compilations": getattr(step_fn, "_cache_size", lambda: None)(),
  }
  if last_eval is not None:
    summary.update(eval_loss=last_eval[0], eval_ppl=last_eval[1], eval_batches=len(val_batches))
  return summary


# ---------------------------------------------------------------------------
# Loading a trained model (eval / sample).


def load_for_inference(path: str, *, tokenizer: str | None = None, mesh: str | None = None):
  """Model graph, params and tokenizer of the latest checkpoint under ``path``, or of the
  step ``path`` names (``RUN/checkpoints/35``)."""
  step, meta = checkpoint.read_meta(path)
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
  eos_id: int | None = None,
) -> list[int]:
  """Autoregressive sampling on a fixed-length buffer (one compilation, no KV cache).

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
  out = []
  for pos in range(len(prompt_ids), max_len):
    tok = int(next_token(params, jnp.asarray(buf), pos, jax.random.fold_in(key, pos)))
    if eos_id is not None and tok == eos_id:
      break
    buf[0, pos] = tok
    out.append(tok)
  return out
