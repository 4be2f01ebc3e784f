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
  the largest unprojected leaf (compiled on its own) or of the largest projector refresh
  (one matrix, or the batch of matrices refreshed together: ``svd_transient_bytes``).
  It assumes each update's temporaries exist for one leaf (or refresh batch) at a time.
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
projected matrix; ``--grad-clip`` with ``--per-layer-clip`` runs forward and backward
twice, the first time for the global norm, which costs time, not memory) unless
``--grad-clip`` without ``--per-layer-clip``, ``--no-per-layer-updates``, or
``--grad-accum`` > 1 without GaLore or with ``--no-lowrank-accum`` asks for the
whole-gradient step.

**Sharded configurations** (``--mesh data=D,fsdp=F``, as ``galore-jax train`` takes it):
every figure is *per device*. Assumed, following ``galore_jax.sharding`` (the trainer's
shardings): each parameter and optimizer-state leaf (GaLore projectors, moments, 8-bit
codes and scales) costs its bytes / F on a device when ``sharding.fsdp_spec`` shards it
(its largest axis that F divides), else its full bytes (replicated; ``data`` shards no
state). Gradients follow the parameters' sharding. Activations and the loss's d(logits)
are those of the per-device micro-batch ``batch_size / (D * F)``. The update temporaries
are those of the largest unprojected leaf's local shard; an SVD refresh is counted whole
(XLA does not partition an SVD: the gradient is gathered to every device). With F > 1 the
largest sharded weight is added twice, whole: the FSDP all-gather that materialises it for
its matmuls, and its gradient as the backward pass computes it on the device's rows, before
the reduce-scatter that shards it (one weight at a time, as FSDP schedules it; XLA's CPU
schedule gathers several weights at once, so the compiled CPU figure is higher at scale).
The compiled estimate lowers the trainer's own jitted step (``trainer.compile_train_step``:
the same in/out shardings) on D * F devices; ``memory_analysis()`` of an SPMD program is
per device. With fewer devices than the mesh needs, the plan is analytic only and says so
(``xla_skipped``); the CLI gives the CPU backend enough host devices
(``--xla_force_host_platform_device_count``).

``build()`` gives the configuration's ``AbstractRun`` (shapes only); ``plan()`` returns a
JSON-serialisable dict; ``format_plan()`` renders it. ``galore_jax.plan`` is this module's
former name.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from galore_jax import config, hub, sharding, steps, targets, trainer, xla_memory
from galore_jax import model as model_lib
from galore_jax import optimizer as galore
from galore_jax.metrics import JAX_DEFAULT_FRACTION
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


def mesh_shape(cfg: config.TrainConfig) -> tuple[int, int]:
  """``(data, fsdp)`` of ``cfg.mesh``; the batch must split evenly over its devices, as the
  trainer requires (``config.validate``), but no devices are needed to plan it."""
  data_n, fsdp_n = config.parse_mesh(cfg.mesh)
  if cfg.batch_size % (data_n * fsdp_n):
    raise config.ConfigError(
      "--batch-size",
      f"{cfg.batch_size} is not divisible by the {data_n * fsdp_n} devices of --mesh {cfg.mesh}",
    )
  return data_n, fsdp_n


def build(
  cfg: config.TrainConfig, vocab_size: int = DEFAULT_VOCAB, overrides: dict | None = None
) -> AbstractRun:
  """Validates ``cfg`` and builds abstract params / optimizer state (``eval_shape``)."""
  # The mesh is checked without its devices: a plan for 8 GPUs runs on a laptop.
  config.validate(dataclasses.replace(cfg, mesh=None))
  mesh_shape(cfg)
  model_cfg = planned_model(cfg, vocab_size, overrides)
  smallest = min(model_cfg.hidden_size, model_cfg.intermediate_size)
  if cfg.is_galore and cfg.rank > smallest:
    raise config.ConfigError(
      "--rank", f"{cfg.rank} is larger than the smallest projected matrix dimension ({smallest})"
    )
  graphdef, params = _abstract_model(model_cfg, cfg.seed)
  tx = config.build_optimizer(cfg)
  opt_state = jax.eval_shape(tx.init, params)
  return AbstractRun(cfg, model_cfg, graphdef, params, tx, opt_state)


def planned_model(
  cfg: config.TrainConfig, vocab_size: int = DEFAULT_VOCAB, overrides: dict | None = None
) -> model_lib.LlamaConfig:
  """The architecture a plan is for: ``--init-from``'s ``config.json`` (its own vocabulary;
  no weights are read) or the named ``--model`` with ``vocab_size``."""
  if vocab_size < 2:
    raise config.ConfigError("--vocab-size", f"must be >= 2, got {vocab_size}")
  base = config.base_model_config(cfg)  # a ConfigError naming --init-from if unreadable
  if not cfg.init_from:
    base = dataclasses.replace(base, vocab_size=vocab_size)
  try:
    return dataclasses.replace(
      base,
      param_dtype=config.DTYPES[cfg.param_dtype],
      dtype=config.DTYPES[cfg.dtype],
      remat=cfg.remat,
      **(overrides or {}),
    )
  except (ValueError, TypeError) as e:
    raise config.ConfigError("--model", str(e)) from e


@functools.lru_cache(maxsize=32)
def _abstract_model(model_cfg: model_lib.LlamaConfig, seed: int = 0):
  return trainer.abstract_model(model_cfg, seed)


def _shard_shape(shape: tuple[int, ...], fsdp: int) -> tuple[int, ...]:
  """One device's block of an array of ``shape`` under ``sharding.fsdp_spec``."""
  spec = tuple(sharding.fsdp_spec(shape, fsdp))
  spec += (None,) * (len(shape) - len(spec))
  return tuple(d // fsdp if s == "fsdp" else d for d, s in zip(shape, spec, strict=True))


def device_bytes(tree, fsdp: int = 1, itemsize: int | None = None) -> int:
  """Bytes of ``tree``'s arrays on one device when sharded as the trainer shards params and
  optimizer state over ``fsdp`` devices (``itemsize``: as if every leaf had that many bytes
  per element). ``fsdp=1``: ``tree_bytes``."""
  total = 0
  for x in jax.tree.leaves(tree):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      size = itemsize or jnp.dtype(x.dtype).itemsize
      total += math.prod(_shard_shape(tuple(x.shape), fsdp)) * size
  return total


def optimizer_breakdown(opt_state, fsdp: int = 1) -> dict[str, int]:
  """Bytes of the optimizer state (on one device of an ``fsdp``-way sharding): GaLore
  projectors vs moments (8-bit codes and scales included) vs the rest (step counters)."""
  out = {"projector_bytes": 0, "moment_bytes": 0, "other_bytes": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    nbytes = device_bytes(leaf, fsdp)
    names = _path_names(path)
    if "projectors" in names:
      out["projector_bytes"] += nbytes
    elif {"mu", "nu", "v_row", "v_col", "v"} & set(names):  # Adam's / Adafactor's moments
      out["moment_bytes"] += nbytes
    else:
      out["other_bytes"] += nbytes
  return out


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


def _largest_unprojected_leaf(p: AbstractRun, fsdp: int = 1):
  """(path, local shape, dtype) of the unprojected leaf with the largest block on a device."""
  mask = (
    targets.llama_targets(p.params) if p.cfg.is_galore else jax.tree.map(lambda _: False, p.params)
  )
  best = None
  for (path, leaf), projected in zip(
    jax.tree_util.tree_flatten_with_path(p.params)[0], jax.tree.leaves(mask), strict=True
  ):
    shape = _shard_shape(tuple(leaf.shape), fsdp)
    if not projected and (best is None or math.prod(shape) > math.prod(best[1])):
      best = (path, shape, leaf.dtype)
  return best


def update_transient_bytes(p: AbstractRun) -> int:
  """Temporaries of the optimizer update for the largest leaf that is not projected (its
  block on one device, with a mesh).

  Compiles ``tx.update`` on a one-leaf tree of that shape (seconds, no
  allocation). That leaf has no matmul in its update, so the CPU figure has no
  bf16-dot distortion.
  """
  best = _largest_unprojected_leaf(p, mesh_shape(p.cfg)[1])
  if best is None:
    return 0
  _, shape, dtype = best
  return _update_transient(p.cfg, shape, jnp.dtype(dtype).name)


@functools.lru_cache(maxsize=64)
def _update_transient(cfg: config.TrainConfig, shape: tuple[int, ...], dtype: str) -> int:
  # One cache entry per optimizer and fsdp size (under FSDP, 8-bit leaves are not chunked:
  # config.adam8bit_layout); one device compiles the block's update.
  fsdp = mesh_shape(cfg)[1]
  cfg = dataclasses.replace(cfg, mesh=None if fsdp == 1 else f"fsdp={fsdp}")
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
  """Float32 workspace of the largest projector refresh (an upper bound with staggered
  refresh, which splits batches by phase).

  A refresh decomposes a stacked batch of matrices: one matrix in the per-layer step; a
  stage's same-shaped ones when it refreshes them together (:func:`steps.refreshes_together`);
  in the whole-gradient step every leaf of one shape, up to GaLore's batch limit (as on a
  GPU, the plan's target: on a CPU mesh the trainer refreshes one leaf at a time,
  :func:`config.batched_lapack_hangs`, so this overestimates there). Per matrix
  ``m x n``: its float32 copy, plus the exact SVD's ``U``, ``S`` and ``Vh``
  (``k = min(m, n)``), or the iterative methods' iterates: ``G V`` (``max(m, n) x r``) and
  about three ``k x r`` bases.
  """
  cfg = p.cfg
  if not cfg.is_galore:
    return 0
  iterative = cfg.svd != "exact"

  def per_matrix(shape) -> int:
    m, n = shape
    k = min(m, n)
    extra = (max(m, n) + 3 * k) * min(cfg.rank, k) if iterative else m * k + k + k * n
    return 4 * (m * n + extra)

  def key(leaf):  # iterative methods batch a shape with its transpose (optimizer.py)
    shape = tuple(leaf.shape[-2:])
    return tuple(sorted(shape)) if iterative else shape

  def projected(tree) -> list:
    mask = jax.tree.leaves(targets.llama_targets(tree))
    return [leaf for leaf, hit in zip(jax.tree.leaves(tree), mask, strict=True) if hit]

  matrices = projected(p.params)
  if not matrices:
    return 0
  if steps.uses_layerwise_step(cfg, p.model_cfg):
    if not steps.refreshes_together(cfg):
      return max(per_matrix(key(leaf)) for leaf in matrices)
    units = [collections.Counter(key(leaf) for leaf in projected(h)) for h in _block_halves(p)]
    return max(count * per_matrix(shape) for unit in units for shape, count in unit.items())
  counts = collections.Counter(key(leaf) for leaf in matrices)
  limit = galore._REFRESH_GROUP_ELEMENTS
  return max(
    max(1, min(count, limit // math.prod(shape))) * per_matrix(shape)
    for shape, count in counts.items()
  )


def _head_weight(p: AbstractRun):
  """The LM head's weight: the embedding table itself when the model is tied."""
  return p.params["embed"] if p.model_cfg.tie_embeddings else p.params["lm_head"]


def _block_halves(p: AbstractRun) -> list[dict]:
  """The per-layer step's block stages: each decoder block's attention and MLP halves, as
  parameter subtrees (``Llama.layerwise_stages``)."""
  layers = p.params["layers"]
  blocks = layers.values() if isinstance(layers, dict) else layers
  halves = (model_lib.DecoderBlock.ATTENTION, model_lib.DecoderBlock.MLP)
  return [{k: block[k] for k in keys} for block in blocks for keys in halves]


def _block_gradient_bytes(p: AbstractRun, fsdp: int = 1) -> int:
  """Largest gradient the per-layer step holds at once (per device over ``fsdp``): one
  stage's, i.e. the attention or MLP half of a decoder block, or the embedding, or final
  norm + LM head."""
  nbytes = functools.partial(device_bytes, fsdp=fsdp)
  sizes = [nbytes(half) for half in _block_halves(p)]
  sizes.append(nbytes(p.params["embed"]))
  sizes.append(nbytes(p.params["final_norm"]) + nbytes(_head_weight(p)))
  return max(sizes)


def accumulator_bytes(p: AbstractRun, fsdp: int = 1) -> int:
  """Bytes of the per-layer step's gradient accumulators with GaLore's low-rank accumulation
  (:func:`galore_jax.steps.lowrank_accumulation`; else 0): float32, the projected (``r x n``)
  shape for each projected leaf, the full shape for every other leaf; per device with
  ``fsdp``, assumed sharded as an array of that shape would be (``sharding.fsdp_spec``)."""
  if not (steps.lowrank_accumulation(p.cfg) and steps.uses_layerwise_step(p.cfg, p.model_cfg)):
    return 0
  projections = galore.leaf_projections(
    p.opt_state, p.params, matrix_axes=targets.reference_side_axes
  )
  sizes = [
    math.prod(_shard_shape(tuple(q.low_rank_shape if q is not None else leaf.shape), fsdp))
    for q, leaf in zip(projections, jax.tree.leaves(p.params), strict=True)
  ]
  return 4 * sum(sizes)


def fsdp_gather_bytes(p: AbstractRun) -> int:
  """The FSDP all-gather transient: the largest weight that ``fsdp`` shards, whole (XLA
  gathers it onto every device for its matmul). 0 without an ``fsdp`` axis. Its gradient is
  as large before the reduce-scatter that shards it (``analytic`` counts both)."""
  fsdp = mesh_shape(p.cfg)[1]
  sharded = [
    tree_bytes(x)
    for x in jax.tree.leaves(p.params)
    if _shard_shape(tuple(x.shape), fsdp) != tuple(x.shape)
  ]
  return max(sharded, default=0)


def analytic(p: AbstractRun) -> dict[str, Any]:
  """The analytic estimate, per device with a mesh (module docstring)."""
  cfg, mc = p.cfg, p.model_cfg
  per_layer_updates = steps.uses_layerwise_step(cfg, mc)
  data_n, fsdp_n = mesh_shape(cfg)
  nbytes = functools.partial(device_bytes, fsdp=fsdp_n)  # one device's block of each leaf
  batch = cfg.batch_size // (data_n * fsdp_n)  # the per-device micro-batch
  weights = nbytes(p.params)
  optimizer = nbytes(p.opt_state)
  acts = activation_bytes(mc, batch, cfg.seq_len)
  full_grad = weights  # gradients are cast to the param dtype
  if cfg.grad_accum > 1:
    full_grad += nbytes(p.params, itemsize=4)  # float32 accumulator of the micro-batch scan
  accum = accumulator_bytes(p, fsdp_n)  # the per-layer step's low-rank accumulators instead
  block_grad = _block_gradient_bytes(p, fsdp_n)
  loss_transient = 4 * batch * cfg.seq_len * mc.vocab_size  # float32 d(logits)
  update = update_transient_bytes(p)
  svd = svd_transient_bytes(p)
  update_phase = max(update, svd)
  head_grad = nbytes(_head_weight(p))
  gather = fsdp_gather_bytes(p)
  fsdp_transient = 2 * gather  # the gathered weight + its gradient before the reduce-scatter
  if per_layer_updates:
    grads_at_peak = block_grad + accum
    dynamic = (
      acts["total_bytes"] + loss_transient + block_grad + accum + update_phase + fsdp_transient
    )
  else:
    grads_at_peak = full_grad
    dynamic = max(
      acts["total_bytes"] + loss_transient + head_grad + fsdp_transient, full_grad + update_phase
    )
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
    "fsdp_gather_bytes": gather,
    "fsdp_transient_bytes": fsdp_transient,
    "per_device_batch": batch,
    "peak_bytes": weights + optimizer + dynamic,
    "per_layer_updates": per_layer_updates,
  }


def compile_estimate(
  p: AbstractRun, *, replay: bool = True, keep_dump: str | None = None, step_fn=None
) -> dict[str, Any]:
  """Lowers and compiles the real train step on abstract inputs, jitted by
  ``trainer.compile_train_step`` (its in/out shardings over ``cfg.mesh``, which needs that
  many devices; params and optimizer state donated); returns XLA's memory analysis (per
  device), timings and the replayed peaks (:func:`galore_jax.xla_memory.compile_and_replay`).

  ``step_fn(params, opt_state, batch, lr)`` replaces the trainer's step (experiments; jitted
  with the inputs' shardings).
  """
  # The trainer's own optimizer (not p.tx): on a mesh its 8-bit update is sharded
  # (config.adam8bit_layout), which needs the mesh that setup builds.
  run = trainer.setup(p.cfg, p.model_cfg.vocab_size, model_cfg=p.model_cfg)
  if step_fn is None:
    jitted = trainer.compile_train_step(run)
  else:
    jitted = jax.jit(step_fn, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    lowered = jitted.lower(
      run.abstract_params, run.abstract_opt, trainer.abstract_batch(run), trainer.LR_SPEC
    )
  lower_seconds = round(time.perf_counter() - t0, 1)
  out = xla_memory.compile_and_replay(lowered, replay=replay, keep_dump=keep_dump)
  return {"backend": out.pop("backend"), "lower_seconds": lower_seconds, **out}


# ---------------------------------------------------------------------------
# The plan.


def _fits(peak: int, gpu: int) -> bool:
  return peak <= gpu


def memory_fraction(peak: int, gpu: int) -> float | None:
  """The XLA_PYTHON_CLIENT_MEM_FRACTION a peak that fits the device but not JAX's default
  pool needs: its share of the device plus 5 points (the estimate's error, measured at 7B:
  20.12 GB planned, 20.31 GB on the device), in steps of .05, at most .95. None where the
  default pool holds it, or the device does not."""
  share = peak / gpu
  if share <= JAX_DEFAULT_FRACTION or share > 1:
    return None
  return min(0.95, math.ceil(round((share + 0.05) * 20, 6)) / 20)


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
  mc = planned_model(cfg, vocab_size, overrides)
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
  if not cfg.is_adafactor:  # another optimizer, so said in the label
    cands.append(
      (
        "Adafactor (factored second moment, no first moment)",
        {"optimizer": "galore_adafactor" if cfg.is_galore else "adafactor"},
      )
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
    change: dict[str, Any] = {"per_layer_updates": True}
    how = [] if cfg.per_layer_updates else ["drop --no-per-layer-updates"]
    if cfg.grad_clip > 0:  # clipped in the step: one micro-batch, twice the compute
      change["per_layer_clip"] = True
      how.append("--per-layer-clip, about 2x the compute")
    if cfg.grad_accum > 1 and cfg.is_galore and cfg.grad_clip == 0:
      change["lowrank_accum"] = True
      how.append("drop --no-lowrank-accum")
    elif cfg.grad_accum > 1:
      change.update(batch_size=cfg.batch_size * cfg.grad_accum, grad_accum=1)
      how.append(f"batch {cfg.batch_size * cfg.grad_accum} without accumulation")
    cands.append((f"per-layer weight updates ({'; '.join(how)})", change))
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
  data_n, fsdp_n = mesh_shape(cfg)
  devices = data_n * fsdp_n
  per_layer_updates = steps.uses_layerwise_step(cfg, p.model_cfg)
  opt = optimizer_breakdown(p.opt_state, fsdp_n)
  an = analytic(p)
  n_params = tree_size(p.params)
  result: dict[str, Any] = {
    "config": {
      "model": hub.describe(cfg.init_from) if cfg.init_from else cfg.model,
      "optimizer": cfg.optimizer,
      "rank": cfg.rank if cfg.is_galore else None,
      "batch_size": cfg.batch_size,
      "seq_len": cfg.seq_len,
      "grad_accum": cfg.grad_accum,
      "param_dtype": cfg.param_dtype,
      "dtype": cfg.dtype,
      "remat": cfg.remat,
      "vocab_size": p.model_cfg.vocab_size,
      "mesh": cfg.mesh,
      **({"overrides": overrides} if overrides else {}),
    },
    # Every byte figure below is one device's (the whole run's without a mesh).
    "mesh": {"data": data_n, "fsdp": fsdp_n, "devices": devices},
    "per_device": True,
    "params": n_params,
    "total_weights_bytes": tree_bytes(p.params),
    "total_optimizer_bytes": tree_bytes(p.opt_state),
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
  if compile and jax.device_count() < devices:
    result["xla_skipped"] = (
      f"--mesh {cfg.mesh} needs {devices} devices, {jax.device_count()} "
      f"{jax.default_backend()} device(s) available: analytic estimate only"
    )
    compile = False
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
  result["jax_memory_fraction"] = memory_fraction(result["peak_bytes"], gpu)
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


def _mesh_lines(r: dict[str, Any]) -> list[str]:
  m = r.get("mesh")
  if not m or m["devices"] == 1:
    return []
  return [
    f"  mesh data={m['data']},fsdp={m['fsdp']} ({m['devices']} devices): figures are PER DEVICE"
    f" (whole model: weights {fmt_bytes(r['total_weights_bytes'])}, optimizer state "
    f"{fmt_bytes(r['total_optimizer_bytes'])}; per-device micro-batch "
    f"{r['analytic']['per_device_batch']})"
  ]


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
    *_mesh_lines(r),
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
    *(
      [
        f"  FSDP transients         {fmt_bytes(an['fsdp_transient_bytes'])}  (the largest "
        "sharded weight gathered whole + its gradient before the reduce-scatter)"
      ]
      if an.get("fsdp_gather_bytes")
      else []
    ),
    f"  update temporaries      {fmt_bytes(an['update_transient_bytes'])} (largest "
    f"unprojected leaf); projector refresh {fmt_bytes(an['svd_transient_bytes'])}",
    f"  analytic peak           {fmt_bytes(an['peak_bytes'])}  (weights + optimizer + "
    + (
      "activations + d(logits) + one stage's gradient + update temporaries"
      + (" + FSDP transients)" if an.get("fsdp_gather_bytes") else ")")
      if per_layer
      else "max(activations + d(logits)"
      + (" + FSDP transients" if an.get("fsdp_gather_bytes") else "")
      + ", whole gradient + update temporaries))"
    ),
  ]
  if r.get("xla_skipped"):
    lines.append(f"  XLA: not compiled ({r['xla_skipped']})")
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
  label = "predicted peak" + (" per device" if r.get("mesh", {}).get("devices", 1) > 1 else "")
  lines.append(
    f"  {label:<23} {fmt_bytes(r['peak_bytes'])} "
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
  if fraction := r.get("jax_memory_fraction"):
    lines.append(
      f"  note: that is {r['peak_bytes'] / r['gpu_memory_bytes']:.0%} of the GPU, and JAX takes "
      f"{JAX_DEFAULT_FRACTION:.0%} of it by default: run with "
      f"XLA_PYTHON_CLIENT_MEM_FRACTION={fraction:.2f} (with nothing else on the GPU)"
    )
  return "\n".join(lines)
