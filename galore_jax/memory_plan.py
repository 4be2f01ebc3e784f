"""Memory planner: will a training configuration fit on a GPU, and what to shrink if not.

Nothing here allocates the model. Parameter and optimizer-state shapes come
from ``jax.eval_shape``; the step itself is lowered and compiled on
``jax.ShapeDtypeStruct`` inputs, jitted as ``train.compile_train_step`` jits it
(parameters and optimizer state donated), and XLA's own buffer assignment says
what is live when.

Two estimates are produced:

* **analytic** (seconds): weights + optimizer state (both exact, from
  ``eval_shape``) + gradients in the param dtype (all of them: the train step
  materialises the whole gradient pytree before the update; one decoder block's
  with ``per_layer_updates``) + activations (the residuals JAX saves for the
  backward pass, counted on the traced 1- and 2-layer model and extrapolated) +
  the loss's float32 d(logits) + the temporaries of the optimizer update of
  the largest unprojected leaf (compiled on its own) or of one SVD refresh.
  It assumes each update's temporaries exist for one leaf at a time.
* **xla** (minutes at 7B on a CPU): the compiled step's ``memory_analysis()``,
  and a replay of the live ranges of its buffer assignment (a dump XLA writes
  to a temporary directory; ``galore_jax.xla_memory``). The replay reproduces XLA's
  peak to within a few percent and says what is alive at the peak (weights, optimizer state,
  forward activations, backward values, optimizer-update temporaries, layout
  copies XLA inserted, ...).

Compiling on the CPU distorts a bf16 figure: the CPU backend has no bf16
matmul, so it inserts ``convert`` ops that make float32 copies of bf16 dot
operands (every weight, alive from the forward to the backward pass) and
produces float32 dot results that it narrows afterwards. A GPU runs those
dots in bf16. The planner finds these compiler-inserted converts in the
optimised HLO (no source metadata, 16-bit float to float32, feeding a dot; or
a float32 dot result consumed only by such narrowing converts), replays the
live ranges with those buffers removed (or halved where the GPU would keep
the 16-bit value) and reports that as the prediction. Everything else about
the CPU schedule (which operations run when) is kept; a GPU compile may
schedule differently.

The step planned is the one ``train.compile_train_step`` would run: the
per-layer step (``train.make_layerwise_step``: each decoder block updated
right after its gradient, so one block's gradient is alive at a time; with
``--grad-accum`` > 1 and GaLore it also holds float32 accumulators, ``r x n`` per
projected matrix) unless ``--grad-clip``, ``--no-per-layer-updates``, or
``--grad-accum`` > 1 without GaLore or with ``--no-lowrank-accum`` asks for the
whole-gradient step.

``build()`` gives the configuration's ``AbstractRun`` (shapes only); ``plan()`` returns a
JSON-serialisable dict; ``format_plan()`` renders it. ``galore_jax.plan`` is this module's
former name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from galore_jax import config, steps, targets, trainer, xla_memory
from galore_jax import model as model_lib
from galore_jax import optimizer as galore
from galore_jax.tree import tree_bytes, tree_size

GB = 1e9
GIB = 2**30
DEFAULT_VOCAB = 32000  # the paper's T5 tokenizer
DEFAULT_GPU_MEMORY = "24GB"

_UNITS = {
  "": GB,
  "b": 1,
  "kb": 1e3,
  "mb": 1e6,
  "gb": 1e9,
  "tb": 1e12,
  "kib": 2**10,
  "mib": 2**20,
  "gib": 2**30,
  "tib": 2**40,
}


def parse_bytes(text: str, flag: str = "--gpu-memory") -> int:
  """``"24GB"`` -> 24e9, ``"24GiB"`` -> 24 * 2**30, a bare number means GB."""
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
  if not m or m.group(2).lower() not in _UNITS:
    raise config.ConfigError(flag, f"expected a size such as 24GB, 24GiB or 80000MB, got {text!r}")
  value = float(m.group(1)) * _UNITS[m.group(2).lower()]
  if value <= 0:
    raise config.ConfigError(flag, f"must be > 0, got {text!r}")
  return int(value)


def fmt_bytes(n: float) -> str:
  return f"{n / GB:.2f} GB" if abs(n) >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _path_names(path) -> list[str]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
  return out


# ---------------------------------------------------------------------------
# The configuration being planned.


@dataclasses.dataclass(frozen=True)
class AbstractRun:
  """The training state of one configuration, shapes only: abstract model, optimizer and
  optimizer state (``jax.ShapeDtypeStruct`` leaves, no arrays). Formerly ``Planned``."""

  cfg: config.TrainConfig
  model_cfg: model_lib.LlamaConfig
  graphdef: Any
  params: Any
  tx: Any
  opt_state: Any


Planned = AbstractRun  # its former name


def build(
  cfg: config.TrainConfig, vocab_size: int = DEFAULT_VOCAB, overrides: dict | None = None
) -> AbstractRun:
  """Validates ``cfg`` and builds abstract params / optimizer state (``eval_shape``)."""
  config.validate(cfg)
  if vocab_size < 2:
    raise config.ConfigError("--vocab-size", f"must be >= 2, got {vocab_size}")
  try:
    model_cfg = model_lib.get_config(
      cfg.model,
      vocab_size=vocab_size,
      param_dtype=config.DTYPES[cfg.param_dtype],
      dtype=config.DTYPES[cfg.dtype],
      remat=cfg.remat,
      **(overrides or {}),
    )
  except (ValueError, TypeError) as e:
    raise config.ConfigError("--model", str(e)) from e
  smallest = min(model_cfg.hidden_size, model_cfg.intermediate_size)
  if cfg.is_galore and cfg.rank > smallest:
    raise config.ConfigError(
      "--rank", f"{cfg.rank} is larger than the smallest projected matrix dimension ({smallest})"
    )
  graphdef, params = _abstract_model(model_cfg, cfg.seed)
  tx = config.build_optimizer(cfg)
  opt_state = jax.eval_shape(tx.init, params)
  return AbstractRun(cfg, model_cfg, graphdef, params, tx, opt_state)


@functools.lru_cache(maxsize=32)
def _abstract_model(model_cfg: model_lib.LlamaConfig, seed: int = 0):
  return trainer.abstract_model(model_cfg, seed)


def optimizer_breakdown(opt_state) -> dict[str, int]:
  """Bytes of the optimizer state: GaLore projectors vs moments (8-bit codes and scales
  included) vs the rest (step counters)."""
  out = {"projector_bytes": 0, "moment_bytes": 0, "other_bytes": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    nbytes = tree_bytes(leaf)
    names = _path_names(path)
    if "projectors" in names:
      out["projector_bytes"] += nbytes
    elif "mu" in names or "nu" in names:
      out["moment_bytes"] += nbytes
    else:
      out["other_bytes"] += nbytes
  return out


def _batch_spec(cfg: config.TrainConfig):
  shape = (cfg.grad_accum, cfg.batch_size, cfg.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("inputs", "targets", "mask")}


# ---------------------------------------------------------------------------
# Analytic estimate.


@functools.lru_cache(maxsize=256)
def _residual_bytes(model_cfg, batch: int, seq_len: int, layers: int) -> int:
  """Bytes JAX saves for the backward pass of a ``layers``-deep copy of the model
  (values computed in the forward pass; the weights themselves are not counted)."""
  from jax._src.ad_checkpoint import saved_residuals  # no public equivalent that returns them

  mc = dataclasses.replace(model_cfg, num_layers=layers)
  graphdef, params = _abstract_model(mc)
  spec = {
    k: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32) for k in ("inputs", "targets", "mask")
  }
  res = saved_residuals(lambda p, b: steps.token_loss(graphdef, p, b)[0], params, spec)
  return tree_bytes([a for a, why in res if "from the argument" not in why])


def activation_bytes(model_cfg, batch: int, seq_len: int) -> dict[str, int]:
  """Saved activations of the full model, from the traced residuals of 1- and 2-layer copies
  (blocks are identical, so the count is exactly linear in depth).

  With remat, the saved set shrinks to what the policy keeps, and the backward
  pass additionally holds one block's full residuals while it recomputes it.
  """
  one = _residual_bytes(model_cfg, batch, seq_len, 1)
  two = _residual_bytes(model_cfg, batch, seq_len, 2)
  per_block = two - one
  saved = one + (model_cfg.num_layers - 1) * per_block
  recompute = 0
  if model_cfg.remat != "none":
    plain = dataclasses.replace(model_cfg, remat="none")
    recompute = _residual_bytes(plain, batch, seq_len, 2) - _residual_bytes(
      plain, batch, seq_len, 1
    )
  return {
    "saved_bytes": saved,
    "per_block_bytes": per_block,
    "recompute_bytes": recompute,
    "total_bytes": saved + recompute,
  }


def _largest_unprojected_leaf(p: AbstractRun):
  mask = (
    targets.llama_targets(p.params) if p.cfg.is_galore else jax.tree.map(lambda _: False, p.params)
  )
  best = None
  for (path, leaf), projected in zip(
    jax.tree_util.tree_flatten_with_path(p.params)[0], jax.tree.leaves(mask), strict=True
  ):
    if not projected and (best is None or leaf.size > best[1].size):
      best = (path, leaf)
  return best


def update_transient_bytes(p: AbstractRun) -> int:
  """Temporaries of the optimizer update for the largest leaf that is not projected.

  Compiles ``tx.update`` on a one-leaf tree of that leaf's shape (seconds, no
  allocation). That leaf has no matmul in its update, so the CPU figure has no
  bf16-dot distortion.
  """
  best = _largest_unprojected_leaf(p)
  if best is None:
    return 0
  _, leaf = best
  return _update_transient(p.cfg, tuple(leaf.shape), jnp.dtype(leaf.dtype).name)


@functools.lru_cache(maxsize=64)
def _update_transient(cfg: config.TrainConfig, shape: tuple[int, ...], dtype: str) -> int:
  tx = config.build_optimizer(cfg)
  one = {"leaf": jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))}
  state = jax.eval_shape(tx.init, one)

  def upd(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(lambda a, u: a + u.astype(a.dtype), params, updates), state

  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    compiled = jax.jit(upd, donate_argnums=(0, 1)).lower(one, state, one).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def svd_transient_bytes(p: AbstractRun) -> int:
  """Float32 workspace of one projector refresh of the largest projected matrix:
  the float32 copy of the gradient, U, S and Vh of a thin SVD."""
  if not p.cfg.is_galore:
    return 0
  best = 0
  mask = jax.tree.leaves(targets.llama_targets(p.params))
  for leaf, projected in zip(jax.tree.leaves(p.params), mask, strict=True):
    if projected:
      m, n = leaf.shape[-2], leaf.shape[-1]
      k = min(m, n)
      best = max(best, 4 * (m * n + m * k + k + k * n))
  return best


def _head_weight(p: AbstractRun):
  """The LM head's weight: the embedding table itself when the model is tied."""
  return p.params["embed"] if p.model_cfg.tie_embeddings else p.params["lm_head"]


def _block_gradient_bytes(p: AbstractRun) -> int:
  """Largest gradient the per-layer step holds at once: one stage's, i.e. the attention or
  MLP half of a decoder block, or the embedding, or final norm + LM head."""
  layers = p.params["layers"]
  blocks = layers.values() if isinstance(layers, dict) else layers
  halves = (model_lib.DecoderBlock.ATTENTION, model_lib.DecoderBlock.MLP)
  sizes = [sum(tree_bytes(b[k]) for k in keys) for b in blocks for keys in halves]
  sizes.append(tree_bytes(p.params["embed"]))
  sizes.append(tree_bytes(p.params["final_norm"]) + tree_bytes(_head_weight(p)))
  return max(sizes)


def accumulator_bytes(p: AbstractRun) -> int:
  """Bytes of the per-layer step's gradient accumulators with GaLore's low-rank accumulation
  (:func:`galore_jax.steps.lowrank_accumulation`; else 0): float32, the projected (``r x n``)
  shape for each projected leaf, the full shape for every other leaf."""
  if not (steps.lowrank_accumulation(p.cfg) and steps.uses_layerwise_step(p.cfg, p.model_cfg)):
    return 0
  projections = galore.leaf_projections(
    p.opt_state, p.params, matrix_axes=targets.reference_side_axes
  )
  sizes = [
    math.prod(q.low_rank_shape) if q is not None else leaf.size
    for q, leaf in zip(projections, jax.tree.leaves(p.params), strict=True)
  ]
  return 4 * sum(sizes)


def analytic(p: AbstractRun) -> dict[str, Any]:
  cfg, mc = p.cfg, p.model_cfg
  per_layer_updates = steps.uses_layerwise_step(cfg, mc)
  weights = tree_bytes(p.params)
  optimizer = tree_bytes(p.opt_state)
  n_params = tree_size(p.params)
  acts = activation_bytes(mc, cfg.batch_size, cfg.seq_len)
  full_grad = weights  # gradients are cast to the param dtype
  if cfg.grad_accum > 1:
    full_grad += 4 * n_params  # float32 accumulator of the scan over micro-batches
  accum = accumulator_bytes(p)  # the per-layer step's low-rank accumulators instead
  block_grad = _block_gradient_bytes(p)
  loss_transient = 4 * cfg.batch_size * cfg.seq_len * mc.vocab_size  # float32 d(logits)
  update = update_transient_bytes(p)
  svd = svd_transient_bytes(p)
  update_phase = max(update, svd)
  head_grad = tree_bytes(_head_weight(p))
  if per_layer_updates:
    grads_at_peak = block_grad + accum
    dynamic = acts["total_bytes"] + loss_transient + block_grad + accum + update_phase
  else:
    grads_at_peak = full_grad
    dynamic = max(acts["total_bytes"] + loss_transient + head_grad, full_grad + update_phase)
  return {
    "weights_bytes": weights,
    "optimizer_bytes": optimizer,
    "gradient_bytes": full_grad,
    "gradients_at_peak_bytes": grads_at_peak,
    "largest_layer_gradient_bytes": block_grad,
    "accumulator_bytes": accum,
    "activation_bytes": acts["total_bytes"],
    "activations": acts,
    "loss_transient_bytes": loss_transient,
    "update_transient_bytes": update,
    "svd_transient_bytes": svd,
    "peak_bytes": weights + optimizer + dynamic,
    "per_layer_updates": per_layer_updates,
  }


def compile_estimate(
  p: AbstractRun, *, replay: bool = True, keep_dump: str | None = None, step_fn=None
) -> dict[str, Any]:
  """Lowers and compiles the real train step (donating params and optimizer state) on
  abstract inputs; returns XLA's memory analysis, timings and the replayed peaks
  (:func:`galore_jax.xla_memory.compile_and_replay`).

  ``step_fn`` replaces the trainer's step (experiments).
  """
  if step_fn is None:
    step_fn = steps.select_train_step(p.graphdef, p.tx, p.cfg, p.model_cfg)
  jitted = jax.jit(step_fn, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    lowered = jitted.lower(p.params, p.opt_state, _batch_spec(p.cfg))
  lower_seconds = round(time.perf_counter() - t0, 1)
  out = xla_memory.compile_and_replay(lowered, replay=replay, keep_dump=keep_dump)
  return {"backend": out.pop("backend"), "lower_seconds": lower_seconds, **out}


# ---------------------------------------------------------------------------
# The plan.


def _fits(peak: int, gpu: int) -> bool:
  return peak <= gpu


def suggestions(
  cfg: config.TrainConfig,
  *,
  vocab_size: int,
  overrides: dict | None,
  gpu_memory: int,
  scale: float | None = None,
) -> list[dict[str, Any]]:
  """Re-plans with one change at a time (analytically: compiling each would take minutes
  at 7B). ``scale`` (compiled peak / analytic peak of the unchanged configuration) turns
  each analytic figure into ``peak_bytes``, the one ``fits`` is judged on."""
  cands: list[tuple[str, dict[str, Any]]] = []
  mc = model_lib.get_config(cfg.model, **(overrides or {}))
  galore_rank = min(1024, mc.hidden_size // 4)
  if not cfg.optimizer.endswith("8bit"):
    cands.append(("8-bit optimizer states", {"optimizer": cfg.optimizer + "8bit"}))
  if not cfg.is_galore:
    cands.append(
      (f"GaLore rank {galore_rank}", {"optimizer": "galore_" + cfg.optimizer, "rank": galore_rank})
    )
    if not cfg.optimizer.endswith("8bit"):
      cands.append(
        (f"8-bit GaLore rank {galore_rank}", {"optimizer": "galore_adamw8bit", "rank": galore_rank})
      )
  if cfg.is_galore and cfg.rank >= 32:
    cands.append((f"rank {cfg.rank // 2}", {"rank": cfg.rank // 2}))
  if cfg.remat == "none":
    cands.append(("activation checkpointing (--remat full)", {"remat": "full"}))
  if cfg.batch_size > 1:
    half = cfg.batch_size // 2
    accum = cfg.grad_accum * cfg.batch_size // half
    cands.append((f"batch {half} x grad-accum {accum}", {"batch_size": half, "grad_accum": accum}))
  if cfg.param_dtype == "float32" or cfg.dtype == "float32":
    cands.append(("bf16 weights and compute", {"param_dtype": "bfloat16", "dtype": "bfloat16"}))
  if not steps.per_layer_updates(cfg):
    change = {"per_layer_updates": True, "grad_clip": 0.0}
    label = "per-layer weight updates (drop --no-per-layer-updates / --grad-clip"
    if cfg.grad_accum > 1 and cfg.is_galore:
      change["lowrank_accum"] = True
      label += " / --no-lowrank-accum"
    elif cfg.grad_accum > 1:
      change.update(batch_size=cfg.batch_size * cfg.grad_accum, grad_accum=1)
      label += f", batch {cfg.batch_size * cfg.grad_accum} without accumulation"
    cands.append((label + ")", change))
  out = []
  for label, change in cands:
    try:
      new = dataclasses.replace(cfg, **change)
      peak = analytic(build(new, vocab_size, overrides))["peak_bytes"]
    except config.ConfigError:
      continue
    entry = {
      "change": label,
      "flags": change,
      "analytic_peak_bytes": int(peak),
      "peak_bytes": int(peak * scale) if scale else int(peak),
      "basis": f"analytic x {scale:.2f}" if scale else "analytic",
    }
    entry["fits"] = _fits(entry["peak_bytes"], gpu_memory)
    out.append(entry)
  out.sort(key=lambda s: s["peak_bytes"])
  return out


def plan(
  cfg: config.TrainConfig,
  *,
  vocab_size: int = DEFAULT_VOCAB,
  gpu_memory: int | str = DEFAULT_GPU_MEMORY,
  compile: bool = True,
  overrides: dict | None = None,
  suggest: bool = True,
) -> dict[str, Any]:
  """Memory plan of ``cfg``; see the module docstring for what each figure means."""
  gpu = parse_bytes(gpu_memory) if isinstance(gpu_memory, str) else int(gpu_memory)
  if gpu <= 0:
    raise config.ConfigError("--gpu-memory", f"must be > 0, got {gpu_memory!r}")
  p = build(cfg, vocab_size, overrides)
  per_layer_updates = steps.uses_layerwise_step(cfg, p.model_cfg)
  opt = optimizer_breakdown(p.opt_state)
  an = analytic(p)
  n_params = tree_size(p.params)
  result: dict[str, Any] = {
    "config": {
      "model": cfg.model,
      "optimizer": cfg.optimizer,
      "rank": cfg.rank if cfg.is_galore else None,
      "batch_size": cfg.batch_size,
      "seq_len": cfg.seq_len,
      "grad_accum": cfg.grad_accum,
      "param_dtype": cfg.param_dtype,
      "dtype": cfg.dtype,
      "remat": cfg.remat,
      "vocab_size": vocab_size,
      **({"overrides": overrides} if overrides else {}),
    },
    "params": n_params,
    "weights_bytes": an["weights_bytes"],
    "optimizer_bytes": an["optimizer_bytes"],
    "optimizer_breakdown": opt,
    "gradient_bytes": an["gradient_bytes"],
    "gradients_at_peak_bytes": an["gradients_at_peak_bytes"],
    "accumulator_bytes": an["accumulator_bytes"],
    "activation_bytes": an["activation_bytes"],
    "analytic": an,
    "per_layer_updates": per_layer_updates,
  }
  if compile:
    xla = compile_estimate(p)
    xla["step"] = "train.make_layerwise_step" if per_layer_updates else "train.make_train_step"
    result["xla"] = xla
    result["peak_bytes"] = xla.get("corrected_peak_bytes", xla["peak_bytes"])
    result["peak_source"] = (
      "xla_corrected" if "corrected_peak_bytes" in xla else f"xla_{xla['backend']}"
    )
    if xla["backend"] != "cpu" and "corrected_peak_bytes" in xla:
      # Off the CPU, nothing needs correcting: the compiled figure is the prediction.
      result["peak_bytes"] = xla["peak_bytes"]
      result["peak_source"] = f"xla_{xla['backend']}"
  else:
    result["peak_bytes"] = an["peak_bytes"]
    result["peak_source"] = "analytic"
  result["gpu_memory_bytes"] = gpu
  result["fits"] = _fits(result["peak_bytes"], gpu)
  result["headroom_bytes"] = gpu - result["peak_bytes"]
  if suggest and not result["fits"]:
    scale = result["peak_bytes"] / an["peak_bytes"] if result["peak_source"] != "analytic" else None
    result["suggestions"] = suggestions(
      cfg,
      vocab_size=vocab_size,
      overrides=overrides,
      gpu_memory=gpu,
      scale=scale,
    )
  return result


def format_plan(r: dict[str, Any]) -> str:
  c, an, opt = r["config"], r["analytic"], r["optimizer_breakdown"]
  per_layer = r["per_layer_updates"]
  lines = [
    f"{c['model']} ({r['params'] / 1e6:.1f}M params, vocab {c['vocab_size']}), "
    f"{c['optimizer']}"
    + (f" rank {c['rank']}" if c["rank"] else "")
    + f", batch {c['batch_size']} x {c['seq_len']}"
    + (f" x accum {c['grad_accum']}" if c["grad_accum"] > 1 else "")
    + f", params {c['param_dtype']}, compute {c['dtype']}, remat {c['remat']}"
    + (", per-layer updates" if per_layer else ", whole-gradient step"),
    f"  weights                 {fmt_bytes(r['weights_bytes'])}",
    f"  optimizer state         {fmt_bytes(r['optimizer_bytes'])}"
    f"  (moments {fmt_bytes(opt['moment_bytes'])}, projectors "
    f"{fmt_bytes(opt['projector_bytes'])}, other {opt['other_bytes']} B)",
    f"  gradients at peak       {fmt_bytes(r['gradients_at_peak_bytes'])}"
    + (
      "  (one stage: half a block, or the embedding / head"
      + (
        f"; + {fmt_bytes(r['accumulator_bytes'])} f32 micro-batch accumulators, low-rank "
        "for projected matrices)"
        if r["accumulator_bytes"]
        else ")"
      )
      if per_layer
      else "  (all of them: this step computes the whole gradient, then updates)"
    ),
    f"  activations             {fmt_bytes(r['activation_bytes'])}  (saved residuals"
    + (", + one block recomputed)" if c["remat"] != "none" else ")"),
    f"  loss d(logits) f32      {fmt_bytes(an['loss_transient_bytes'])}",
    f"  update temporaries      {fmt_bytes(an['update_transient_bytes'])} (largest "
    f"unprojected leaf); SVD refresh {fmt_bytes(an['svd_transient_bytes'])}",
    f"  analytic peak           {fmt_bytes(an['peak_bytes'])}  (weights + optimizer + "
    + (
      "activations + d(logits) + one stage's gradient + update temporaries)"
      if per_layer
      else "max(activations + d(logits), whole gradient + update temporaries))"
    ),
  ]
  x = r.get("xla")
  if x:
    lines.append(
      f"  XLA ({x['backend']}), {x.get('step', 'step')}: lower {x['lower_seconds']} s, "
      f"compile {x['compile_seconds']} s; arguments {fmt_bytes(x['argument_bytes'])}, "
      f"temp {fmt_bytes(x['temp_bytes'])} -> peak {fmt_bytes(x['peak_bytes'])}"
    )
    if "corrected_peak_bytes" in x:
      live = ", ".join(
        f"{k} {fmt_bytes(v)}"
        for k, v in x["live_at_corrected_peak"].items()
        if v >= 0.005 * x["corrected_peak_bytes"]
      )
      lines += [
        f"  XLA peak without the CPU's f32 copies for bf16 dots: "
        f"{fmt_bytes(x['corrected_peak_bytes'])} (replayed CPU peak "
        f"{fmt_bytes(x['replayed_cpu_peak_bytes'])}; {x['cpu_only_buffers']} "
        "compiler-inserted buffers discounted)",
        f"    live then: {live}",
      ]
    elif "replay_error" in x:
      lines.append(f"  (live-range replay failed: {x['replay_error']})")
  verdict = "FITS" if r["fits"] else "DOES NOT FIT"
  lines.append(
    f"  predicted peak          {fmt_bytes(r['peak_bytes'])} "
    f"({r['peak_bytes'] / GIB:.2f} GiB, {r['peak_source']}) vs "
    f"{fmt_bytes(r['gpu_memory_bytes'])}: {verdict} (headroom {fmt_bytes(r['headroom_bytes'])})"
  )
  if r.get("suggestions"):
    basis = r["suggestions"][0]["basis"]
    lines.append(
      f"  to shrink it, one change at a time ({basis}"
      + (
        ": analytic re-plans scaled by this configuration's compiled/analytic ratio"
        if basis != "analytic"
        else ""
      )
      + "):"
    )
    for s in r["suggestions"]:
      extra = f" (analytic {fmt_bytes(s['analytic_peak_bytes'])})" if basis != "analytic" else ""
      lines.append(
        f"    {s['change']:<58} -> {fmt_bytes(s['peak_bytes'])}{extra}"
        f"{'  fits' if s['fits'] else ''}"
      )
  lines.append(
    "  note: JAX preallocates 75% of GPU memory by default; set "
    "XLA_PYTHON_CLIENT_MEM_FRACTION=.95 to use more of it."
  )
  return "\n".join(lines)
