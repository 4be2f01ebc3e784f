"""The trainer: run setup, resume checks and the host loop around the jit-compiled step.

The state is three pytrees, ``params`` (a plain dict of the Flax NNX model's
parameters), ``opt_state`` and ``step``; the model's graph definition is static
and merged back inside the step (``nnx.merge``), so the step is a pure function
compiled once. The same code runs on one device and on a ``data x fsdp``
``jax.sharding.Mesh``: batches are split over both axes, parameters and every
optimizer-state array (GaLore projectors included) over ``fsdp``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import gc
import hashlib
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from galore_jax import checkpoint, distributed, errors, hub, metrics, rundir, sharding, steps
from galore_jax import model as model_lib
from galore_jax.config import (
  ConfigError,
  TrainConfig,
  absolute_source,
  build_optimizer,
  lr_schedule,
  model_config,
  parse_duration,
  parse_profile_steps,
  resume_changes,
  validate,
)
from galore_jax.tree import tree_bytes

# ---------------------------------------------------------------------------
# Hooks: what a caller may change without copying the loop.


@dataclasses.dataclass(frozen=True)
class Parametrization:
  """Trains a tree other than the model's dense params (the low-rank baselines of Table 2).

  The run's params are ``{"trainable": ..., "frozen": ...}`` = ``split(dense)``; the step
  differentiates ``materialize(trainable, frozen) -> dense`` and the optimizer updates the
  trainable part alone. Both are traced (``split`` once, from the dense init).
  """

  split: Callable[[Any], dict[str, Any]]
  materialize: Callable[[Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class Hooks:
  """Ways to change a run through :func:`train` (all optional; defaults: ``galore-jax train``).

  * ``model_cfg``: the architecture (default :func:`galore_jax.config.model_config`).
  * ``data``: ``(tokenizer, training dataset, validation batches)`` already loaded (default
    :func:`load_data`).
  * ``tx``: the optimizer (default :func:`galore_jax.config.build_optimizer`).
  * ``parametrization``: see :class:`Parametrization`.
  * ``init_params(run) -> dense params`` in ``run.dense_sharding`` (default
    :func:`galore_jax.model.init_params`, or ``--init-from``'s weights).
  * ``evaluate(run, params, eval_fn) -> (loss, ppl)``: the validation (default: the run's
    ``--eval-batches`` through :func:`evaluate`).
  * ``save(step, params, opt_state, meta)``: writes a checkpoint (default
    :func:`galore_jax.checkpoint.save`); ``meta`` adds entries to the checkpoint metadata.
  * ``before_step``: callbacks ``(step, params, opt_state, writer) -> (params, opt_state)``
    run before the update that follows ``step`` (ReLoRA's merge and reset); ``writer`` is the
    run's :class:`galore_jax.metrics.MetricsWriter`, for records of their own.
  * ``after_step``: callbacks ``(step, metrics)`` after each step's records.
  * ``lr_at(step)``: the learning rate of the update after ``step`` (default: the config's
    schedule, :func:`galore_jax.config.lr_schedule`). The run's own optimizer steps at this
    rate (the train step takes it as an argument) and ``metrics.jsonl`` records it; a
    caller's ``tx`` keeps its own schedule, and this is then only what is recorded.
  """

  model_cfg: model_lib.LlamaConfig | None = None
  data: tuple[Any, Any, list] | None = None
  tx: optax.GradientTransformation | None = None
  parametrization: Parametrization | None = None
  init_params: Callable[[Any], Any] | None = None
  evaluate: Callable[[Any, Any, Callable], tuple[float, float]] | None = None
  save: Callable[[int, Any, Any, dict], None] | None = None
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  before_step: Sequence[Callable[[int, Any, Any, Any], tuple[Any, Any]]] = ()
  after_step: Sequence[Callable[[int, dict], None]] = ()
  lr_at: Callable[[int], float] | None = None


NO_HOOKS = Hooks()
# Progress without a terminal (a batch job's log file, `train > log.txt`): a tqdm bar there
# is one line redrawn at every step, so the trainer prints a plain line instead, for the
# first and last steps and at most every PROGRESS_LINE_S seconds between, and one per
# evaluation.
PROGRESS_LINE_S = 30.0


def _is_terminal(stream) -> bool:
  try:
    return stream is not None and stream.isatty()
  except (AttributeError, ValueError):  # a replaced or closed stream
    return False


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
  parametrization: Parametrization | None = None
  dense_sharding: Any = None  # the model's dense params (= param_sharding without one)
  # Whether ``tx`` is the config's optimizer (build_optimizer), which the train step then
  # builds at its ``lr`` argument; a caller's own ``tx`` keeps its schedule.
  own_optimizer: bool = True


def abstract_model(model_cfg: model_lib.LlamaConfig, seed: int = 0):
  """Graph definition and ShapeDtypeStruct params, allocating nothing."""
  abstract = nnx.eval_shape(lambda: model_lib.Llama(model_cfg, rngs=nnx.Rngs(seed)))
  graphdef, state = nnx.split(abstract, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def setup(
  cfg: TrainConfig,
  vocab_size: int,
  hf_config: dict | None = None,
  *,
  tx: optax.GradientTransformation | None = None,
  parametrization: Parametrization | None = None,
  model_cfg: model_lib.LlamaConfig | None = None,
) -> Run:
  """Model graph, optimizer, mesh and shardings of a run; allocates nothing."""
  if model_cfg is None:
    model_cfg = model_config(cfg, vocab_size, hf_config)
  mesh = sharding.make_mesh(cfg)
  graphdef, dense_params = abstract_model(model_cfg, cfg.seed)
  own_optimizer = tx is None
  if tx is None:
    tx = build_optimizer(cfg, mesh, clip_in_step=steps.clips_in_step(cfg, model_cfg))
  if parametrization is None:
    abstract_params = dense_params
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
  else:
    abstract_params = jax.eval_shape(parametrization.split, dense_params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params["trainable"])
  param_sh = sharding.shardings_for(abstract_params, mesh)
  opt_sh = sharding.shardings_for(abstract_opt, mesh)
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
    parametrization,
    sharding.shardings_for(dense_params, mesh),
    own_optimizer,
  )


def init_state(run: Run, init_params: Callable[[Run], Any] | None = None):
  """Fresh params and optimizer state, created directly in their shardings.

  The params come part by part (``model.init_params``: one compiled block
  initialiser for every layer, so compile time does not grow with depth), or from
  ``--init-from``'s safetensors, read tensor by tensor into their shardings, or from
  ``init_params(run)``; a :class:`Parametrization` then splits them.
  """
  if init_params is not None:
    params = init_params(run)
  elif run.cfg.init_from:
    from galore_jax import hf

    try:
      params = hf.load_pretrained(
        run.cfg.init_from, config=run.model_cfg, shardings=run.dense_sharding
      )[1]
    except (OSError, ValueError) as e:
      raise ConfigError("--init-from", str(e)) from e
  else:
    params = model_lib.init_params(run.model_cfg, run.cfg.seed, run.dense_sharding)
  if run.parametrization is None:
    return params, jax.jit(run.tx.init, out_shardings=run.opt_sharding)(params)
  params = jax.jit(run.parametrization.split, out_shardings=run.param_sharding)(params)
  return params, jax.jit(run.tx.init, out_shardings=run.opt_sharding)(params["trainable"])


def _gc_paused(fn: Callable) -> Callable:
  """``fn`` with Python's cyclic garbage collector paused while it runs, i.e. while JAX
  traces it. Tracing a large step allocates millions of objects that stay alive until it
  ends, and the collector rescans all of them, over and over: tracing the ``llama_7b``
  8-bit GaLore step took 13-15 s paused against 17-23 s running (2-core CPU, the
  README's figures). What it would have freed is freed when it resumes."""

  @functools.wraps(fn)
  def traced(*args):
    was_enabled = gc.isenabled()
    gc.disable()
    try:
      return fn(*args)
    finally:
      if was_enabled:
        gc.enable()

  return traced


def _on_host(schedule: optax.Schedule, chunk: int = 4096) -> Callable[[int], float]:
  """``schedule(step)`` as a float, read from a table of ``chunk`` steps that one compiled
  call on the host's CPU device (where JAX has one) fills when the loop first asks for a
  step in it. The loop reads each step's rate (the step's argument) while the step before
  may still run: on a GPU the schedule's jnp operations run eagerly would be a dozen
  kernel launches and a device-to-host copy queued behind that step, and on the CPU
  backend any computation, even the compiled call, waits for it (its one device runs
  programs in order), so the host would block there every step and the steps could not
  overlap."""
  fill = jax.jit(lambda base: jax.vmap(schedule)(base + jnp.arange(chunk)))
  try:
    cpu = jax.local_devices(backend="cpu")[0]  # this process's (not a job's device 0)
  except RuntimeError:  # JAX_PLATFORMS without cpu
    cpu = None
  table: dict[int, np.ndarray] = {}

  def at(step: int) -> float:
    base = step - step % chunk
    if base not in table:
      with jax.default_device(cpu) if cpu is not None else contextlib.nullcontext():
        table.clear()
        table[base] = np.asarray(fill(base))
    return float(table[base][step - base])

  return at


# The learning rate the trainer's step takes (its fourth argument), for lowering without one.
LR_SPEC = jax.ShapeDtypeStruct((), np.float32)


def _train_step(run: Run, refresh: str = "scheduled"):
  """The run's train step ``step(params, opt_state, batch, lr) -> (params, opt_state,
  metrics)``, not yet jitted, and its in/out shardings.

  ``lr`` (a float32 scalar) is the rate of this update: the step builds the run's own
  optimizer at it (``build_optimizer(lr=)``), so the schedule's settings are not part of
  the program. With a caller's ``tx`` (:class:`Hooks`), ``lr`` is unused. ``refresh``: the
  program of :func:`refresh_programs`' pair (``"due"`` / ``"not_due"``), with the run's
  optimizer built that way (``galore(refresh=)``); ``"scheduled"``: the run's own."""
  if refresh != "scheduled" and not run.own_optimizer:
    raise ValueError("the refresh programs are built from the config's optimizer, not a tx")
  clip_in_step = steps.clips_in_step(run.cfg, run.model_cfg)

  def step(params, opt_state, batch, lr):
    tx = run.tx
    if run.own_optimizer:
      tx = build_optimizer(run.cfg, run.mesh, clip_in_step=clip_in_step, refresh=refresh, lr=lr)
    if run.parametrization is None:
      inner = steps.select_train_step(run.graphdef, tx, run.cfg, run.model_cfg)
    else:
      inner = steps.make_train_step(run.graphdef, tx, materialize=run.parametrization.materialize)
    return inner(params, opt_state, batch)

  replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
  in_shardings = (
    run.param_sharding, run.opt_sharding, sharding.batch_sharding(run.mesh), replicated
  )  # fmt: skip
  return _gc_paused(step), in_shardings, (run.param_sharding, run.opt_sharding, None)


def refresh_programs(cfg: TrainConfig, backend: str | None = None) -> int:
  """How many programs the trainer compiles its step into (``--refresh-programs``): 2, one
  holding GaLore's projector refresh and one without it, picked per step on the host
  (:class:`RefreshPrograms`), or 1, which decides on the device.

  Two only for GaLore's synchronous schedule (a staggered one refreshes some leaf at most
  counts). ``"auto"`` takes two on GPUs (``backend``, default JAX's): there the one
  program runs each refresh group's ``lax.cond`` from the host, copying its predicate back
  and waiting for it on every step, refreshing or not; in an H200 profile of the
  ``llama_1b`` per-layer step the host sat in 96 such branches a step, 107 of its 121 ms
  (the README's "GPU benchmark"). A CPU runs branches on the host anyway, so one program
  there saves the second compilation.
  """
  if not (cfg.is_galore and cfg.refresh_schedule == "synchronous"):
    return 1
  if cfg.refresh_programs == "auto":
    return 2 if (backend or jax.default_backend()) == "gpu" else 1
  return 2 if cfg.refresh_programs == "two" else 1


class RefreshPrograms:
  """The train step as two programs, called like one: ``step(params, opt_state, batch, lr)``.

  Each call runs the program for steps with a projector refresh (``galore(refresh="due")``)
  where :func:`galore_jax.refresh_due` says one is due at the optimizer's count
  (:func:`galore_jax.galore_count`), else the one without refresh code (``"not_due"``).
  Going by the count, not by counting steps, keeps the choice right after skipped steps
  (which do not advance it), callbacks that replace the state, and resumes.

  Reading the count waits for the step that wrote it, so a call reads it only where it
  must. A state this object's last call returned has the count that call started from, or
  one more (a skipped step leaves it), so the counts a call may start from form a range
  that grows by one a call from the last read. Where no count of it is due (or every one
  is), the program is known without reading; else the call reads the count, which waits
  for the step before. A caller that dispatches the next step before the last one ends
  (the trainer, :func:`_train_loop`) thus waits about once per refresh interval. A state
  from anywhere else (a restore, a callback's) is read.

  Each program is built (traced, or loaded from the step cache, and compiled) when first
  needed: a resume between refreshes compiles only the smaller one until the next refresh.
  """

  NAMES = {"due": "with a projector refresh", "not_due": "without a refresh"}

  def __init__(self, builders: dict[str, Callable], update_proj_gap: int, log=print):
    self._builders, self._gap, self._log = builders, update_proj_gap, log
    self._programs: dict[str, Callable] = {}
    self.built_last_call = False  # the last call compiled (or loaded) a program
    # The count leaf the last call returned, and the range of counts that call started from.
    self._last: tuple[Any, tuple[int, int]] | None = None
    self.count_reads = 0  # calls that read the count (waiting for the step before)

  @staticmethod
  def name_for(count: int, update_proj_gap: int) -> str:
    """The program a step at GaLore ``count`` runs: ``"due"`` or ``"not_due"``."""
    from galore_jax import optimizer as galore

    return "due" if galore.refresh_due(count, update_proj_gap) else "not_due"

  def program(self, name: str, example: tuple, say: str | None = None) -> Callable:
    """The ``"due"`` or ``"not_due"`` program for ``example``'s shapes (``(params,
    opt_state, batch, lr)``, arrays or ``jax.ShapeDtypeStruct``s), built at the first
    request; ``say``: the log line's ending when it is built then (None: no line)."""
    if name not in self._programs:
      if say is not None:
        self._log(f"train step: compiling the program for steps {self.NAMES[name]}{say}")
      self._programs[name] = self._builders[name](example)
    return self._programs[name]

  def _choose(self, count_leaf) -> tuple[str, tuple[int, int]]:
    """The program for a state whose count is ``count_leaf``, and the range of counts it
    may hold (one count where it was read)."""
    if self._last is not None and count_leaf is self._last[0]:  # the last call's output
      lo, hi = self._last[1][0], self._last[1][1] + 1
      gap = self._gap
      any_due = lo == 0 or hi // gap * gap >= lo
      every_due = gap == 1 or (lo == hi and any_due)
      if not any_due or every_due:
        return ("due" if any_due else "not_due"), (lo, hi)
    count = count_leaf
    if isinstance(count, jax.Array) and not count.is_fully_addressable:  # several processes
      count = count.addressable_shards[0].data  # (replicated: every copy is the count)
    count = int(jax.device_get(count))
    self.count_reads += 1
    return self.name_for(count, self._gap), (count, count)

  def __call__(self, params, opt_state, batch, lr):
    from galore_jax import optimizer as galore

    name, counts = self._choose(galore.galore_count(opt_state))
    new = name not in self._programs
    # (The first program's compilation is the start-up's, said there.)
    step = self.program(name, (params, opt_state, batch, lr), say="" if self._programs else None)
    self.built_last_call = new
    params, opt_state, m = step(params, opt_state, batch, lr)
    self._last = (galore.galore_count(opt_state), counts)
    return params, opt_state, m

  def build_all(self, params, opt_state, batch, lr) -> None:
    """Builds and compiles the program not yet built (without running it), for a run that
    must not meet a compilation mid-way: under ``--time-limit`` the margin for the next
    step is the recent steps' time, and a resume between refreshes would otherwise compile
    the refresh program (minutes at 7B on a GPU) at its first refresh."""
    args = (params, opt_state, batch, lr)
    for name in self.NAMES:
      if name not in self._programs:
        say = " (now: a --time-limit run compiles nothing mid-way)"
        self.program(name, args, say=say).lower(*args).compile()

  def _cache_size(self) -> int:
    """Compilations so far, as on a ``jax.jit`` function (the summary's step_compilations)."""
    return sum(p._cache_size() for p in self._programs.values())


def compile_train_step(run: Run, refresh: str = "scheduled"):
  """The run's train step ``step(params, opt_state, batch, lr)`` (:func:`_train_step`),
  jitted (params and state donated); ``refresh``: one program of :class:`RefreshPrograms`'
  pair (``"due"`` / ``"not_due"``) instead of the one program."""
  step, in_shardings, out_shardings = _train_step(run, refresh)
  return jax.jit(
    step, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=(0, 1)
  )


# Fields of TrainConfig that the traced step never reads, left out of the step cache's key
# so that a resume (or a new run directory) with the same flags loads the entry. Every other
# field is in the key, whether the step reads it or not: a field the step starts to read
# must not be added here.
_NOT_IN_STEP = (
  "out", "resume", "stop_after", "overwrite", "progress", "eval_data", "chat_template",
  "refresh_programs",  # (each program's key names it: "refresh")
  # The schedule's: the step takes its rate as an argument (_train_step).
  "steps", "lr", "warmup", "schedule", "min_lr_ratio",
)  # fmt: skip


def cached_train_step(
  run: Run, hooks: Hooks | None = None, log=print, *, args: tuple | None = None
) -> Callable:
  """The run's train step through the traced-step cache
  (:func:`galore_jax.compile_cache.exported_train_step`): a second start of the same
  configuration neither traces nor compiles it. Built at its first call, which gives the
  batch's shapes, or at once for ``args`` (``(params, opt_state, batch, lr)``, arrays or
  ``jax.ShapeDtypeStruct``s; the result then also has ``lower(...)``, as a jitted step).
  The plain :func:`compile_train_step` when the cache's key cannot name the step: a
  caller's own optimizer or parametrization (:class:`Hooks`). Where :func:`refresh_programs`
  says two, a :class:`RefreshPrograms` (``args`` unused: its programs are built per need,
  or by :meth:`RefreshPrograms.program`)."""
  from galore_jax import compile_cache

  if hooks is not None and (hooks.tx is not None or hooks.parametrization is not None):
    return compile_train_step(run)
  key = {
    "train_config": {k: v for k, v in dataclasses.asdict(run.cfg).items() if k not in _NOT_IN_STEP},
    "model_config": model_lib.config_record(run.model_cfg),
  }

  def builder(refresh: str) -> Callable:
    step, in_shardings, out_shardings = _train_step(run, refresh)
    named = key if refresh == "scheduled" else {**key, "refresh": refresh}
    return lambda example: compile_cache.exported_train_step(
      step, example, in_shardings=in_shardings, out_shardings=out_shardings, key=named, log=log
    )

  if refresh_programs(run.cfg) == 2:
    return RefreshPrograms(
      {name: builder(name) for name in RefreshPrograms.NAMES}, run.cfg.update_proj_gap, log
    )
  build = builder("scheduled")
  if args is not None:
    return build(args)
  built: list[Callable] = []

  def first_call(params, opt_state, batch, lr):
    if not built:
      built.append(build((params, opt_state, batch, lr)))
    return built[0](params, opt_state, batch, lr)

  first_call._cache_size = lambda: built[0]._cache_size() if built else 0
  return first_call


def device_batch(run: Run, batch: dict[str, np.ndarray], grad_accum: int, *, local=False):
  """Host batch (grad_accum * B, L) -> global device arrays (grad_accum, B, L) on the run's
  mesh (:func:`galore_jax.sharding.shard_batch`). ``local``: ``batch`` holds only this
  process's rows (the training stream of a multi-process run, :func:`load_data`)."""
  return sharding.shard_batch(
    run.mesh, batch, grad_accum, local_rows_of=run.cfg.batch_size if local else None
  )


def abstract_batch(run: Run) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes, dtypes and shardings of the batch :func:`device_batch` gives the run's step
  (``(grad_accum, B, L)``; int32 tokens, float32 mask, and int32 segment ids where the run's
  ``--data`` is instruction records packed into rows), to lower it without data."""
  from galore_jax import sft

  shape = (run.cfg.grad_accum, run.cfg.batch_size, run.cfg.seq_len)
  sh = sharding.batch_sharding(run.mesh)
  dtypes = {"inputs": np.int32, "targets": np.int32, "mask": np.float32}
  if sft.packs_examples(run.cfg.data, run.cfg.columns, run.cfg.packing) or (
    run.cfg.document_mask and run.cfg.packing
  ):
    dtypes["segments"] = np.int32
  return {k: jax.ShapeDtypeStruct(shape, dt, sharding=sh) for k, dt in dtypes.items()}


def tokenizer_hash(sp) -> str:
  return hashlib.sha256(sp.serialized_model_proto()).hexdigest()[:16]


def optimizer_compat(cfg: TrainConfig) -> dict[str, Any]:
  """The ``compat`` entries of the optimizer's settings: the configuration alone gives them,
  so a resume that changes one is refused before the data is loaded."""
  return {
    "optimizer": cfg.optimizer,
    "rank": cfg.rank if cfg.is_galore else None,
    "update_proj_gap": cfg.update_proj_gap if cfg.is_galore else None,
    "svd": cfg.svd if cfg.is_galore else None,
    "refresh_schedule": cfg.refresh_schedule if cfg.is_galore else None,
    "projector_dtype": cfg.projector_dtype if cfg.is_galore else None,
    "grad_clip": cfg.grad_clip > 0,
    "weight_decay": cfg.weight_decay > 0,
    # With a first moment the state holds one more array per weight.
    "adafactor_beta1": cfg.adafactor_beta1 > 0 if cfg.is_adafactor else None,
  }


def run_meta(
  cfg: TrainConfig, run: Run, sp, hf_config: dict | None = None, data_format: str = "text"
) -> dict[str, Any]:
  """Checkpoint metadata; the ``compat`` part and the data order must match for a resume.
  ``hf_config``: ``--init-from``'s config.json as kept before (None: read from the
  directory); ``data_format``: the form the data was read in (``sample`` lays a prompt out
  the same way by default)."""
  return {
    "compat": {
      # The tokenizer first: another vocabulary also changes the model's shapes.
      "vocab_size": run.model_cfg.vocab_size,
      "tokenizer_sha": tokenizer_hash(sp),
      "model": cfg.model,
      "model_config": {
        k: v for k, v in model_lib.config_record(run.model_cfg).items() if k not in _NOT_IN_STATE
      },
      **optimizer_compat(cfg),
    },
    # peak_lr: the rate --lr unset stood for, so that a resume under other defaults names it.
    # A Hugging Face cache path as ORG/NAME@COMMIT: another cache (or machine) finds it too.
    "train_config": {
      **dataclasses.asdict(cfg),
      "init_from": hub.pinned(cfg.init_from),
      "tokenizer": hub.pinned(cfg.tokenizer),
      "data": hub.pinned(cfg.data),
      "eval_data": hub.pinned(cfg.eval_data),
      "peak_lr": cfg.peak_lr,
    },
    **({"hf_config": hf_config or _init_config(cfg)} if cfg.init_from else {}),
    **({"hf_generation_config": gen} if (gen := _init_generation_config(cfg)) else {}),
    "data_position": data_position(cfg, data_format),
    "data_format": data_format,
  }


def data_position(cfg: TrainConfig, data_format: str) -> dict[str, Any]:
  """The data order a checkpoint records (``data_position``), for data read in
  ``data_format`` (``"text"``, or the form of instruction records, whose rows are part of
  it since examples are packed)."""
  position = {
    "seed": cfg.seed,
    "source": hub.pinned(cfg.data),
    "batch_size": cfg.batch_size,
    "grad_accum": cfg.grad_accum,
    "seq_len": cfg.seq_len,
    "packing": cfg.packing,
  }
  if data_format != "text":
    position["example_rows"] = "packed" if cfg.packing else "one per row"
  return position


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
  "adafactor_beta1": "--adafactor-beta1",
  "vocab_size": "--tokenizer",
  "tokenizer_sha": "--tokenizer",
}


def _init_config(cfg: TrainConfig) -> dict:
  """``--init-from``'s config.json, kept in the checkpoint so eval / export / resume do not
  need the directory any more."""
  from galore_jax import hf

  return hf.read_config_dict(cfg.init_from)


def _init_generation_config(cfg: TrainConfig) -> dict | None:
  """``--init-from``'s generation_config.json (sampling defaults, stop ids), kept for
  ``export`` when the run uses the directory's own tokenizer: with another, its token ids
  would mean other tokens."""
  from galore_jax import hf

  if not cfg.init_from or cfg.tokenizer is None:
    return None
  if os.path.dirname(os.path.abspath(cfg.tokenizer)) != os.path.abspath(cfg.init_from):
    return None
  return hf.read_generation_config(cfg.init_from)


# Compared as on / off: their values may change on resume (config.resume_changes).
_ON_OFF = ("grad_clip", "weight_decay", "adafactor_beta1")


def saved_data_format(saved: dict[str, Any], form: str) -> str:
  """The data's form a checkpoint's metadata ``saved`` recorded, for a run that reads its
  data as ``form`` now. Not recorded (saved before runs recorded it): ``form`` itself,
  except that Alpaca records were then read as text."""
  return saved.get("data_format", "text" if form == "alpaca" else form)


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
  """A resume must rebuild the same state and continue the same data order."""
  _check_compat_entries(saved, current, where)
  _check_data_position(saved, current, where)


# The data order's parts that the configuration alone gives, whatever the data.
_CONFIG_DATA_POSITION = ("seed", "batch_size", "grad_accum", "seq_len")


def check_config_compatible(
  saved: dict[str, Any], cfg: TrainConfig, where: str, data_format: str | None = None
) -> None:
  """The parts of :func:`check_compatible` that come before the data is loaded (minutes for
  a large source): the optimizer's settings, and the data order, whole where the form the
  data will be read in is given (``data_format``, from its first record:
  :func:`galore_jax.sft.source_format`), else its batch shape and seed (a caller's own
  data). The rest waits for the tokenizer and model."""
  current = {"compat": optimizer_compat(cfg), "train_config": dataclasses.asdict(cfg)}
  _check_compat_entries(saved, current, where)
  if data_format is not None:
    position = data_position(cfg, data_format)
    _check_data_position(saved, {"data_position": position, "data_format": data_format}, where)
    return
  pos_a = saved.get("data_position", {})
  position = {k: getattr(cfg, k) for k in _CONFIG_DATA_POSITION}
  changed = [k for k in _CONFIG_DATA_POSITION if pos_a.get(k) != position[k]]
  if changed:
    _refuse_data_order(pos_a, position, changed, where)


def _refuse_data_order(
  pos_a: dict[str, Any], pos_b: dict[str, Any], changed: list[str], where: str
) -> None:
  """The error for a resume whose data order (``pos_b``) differs from its checkpoint's
  (``pos_a``) in ``changed``: the first one's flag, with both values."""
  flags = {"source": "--data", "example_rows": "--packing"}
  flag = lambda key: flags.get(key, "--" + key.replace("_", "-"))

  def value(key: str, position: dict[str, Any]) -> str:
    v = position.get(key)
    if key == "packing":
      return "--packing" if v else "--no-packing"
    return f"{flag(key)} {v}"

  first, others = changed[0], [flag(k) for k in changed[1:]]
  raise ConfigError(
    flag(first),
    f"checkpoint {where} was trained with {value(first, pos_a)}, this run has "
    f"{value(first, pos_b)}"
    + (f" ({', '.join(others)} changed too)" if others else "")
    + ": a resume must continue the checkpoint's data order (a new --out starts another run)",
  )


def _check_compat_entries(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
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
      if key in _ON_OFF and isinstance(b[key], bool):  # the values, not True / False
        was = saved.get("train_config", {}).get(key, 0.0)
        now = current["train_config"][key]
        raise ConfigError(
          _COMPAT_FLAGS[key],
          f"checkpoint {where} was saved with {_COMPAT_FLAGS[key]} {was:g}, this run has "
          f"{now:g}: turning it {'on' if b[key] else 'off'} changes the optimizer's state or "
          "step (its value may change)",
        )
      raise ConfigError(
        _COMPAT_FLAGS[key],
        f"checkpoint {where} was saved with {key}={a.get(key)!r}, this run has {b[key]!r}",
      )


def _check_data_position(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
  pos_a, pos_b = dict(saved.get("data_position", {})), current["data_position"]
  if "source" in pos_a:  # older runs stored a relative --data as typed
    pos_a["source"] = absolute_source(pos_a["source"])
  was_form = saved_data_format(saved, current.get("data_format", "text"))
  if "example_rows" in pos_b and was_form == "text":  # rows of text before (noted)
    pos_b = {k: v for k, v in pos_b.items() if k != "example_rows"}
  elif "example_rows" in pos_b:
    # Instruction examples: their rows are the data order ("packing" said nothing of them
    # before they were packed, when every version saved them one per row).
    pos_a.setdefault("example_rows", "one per row")
    pos_b = {k: v for k, v in pos_b.items() if k != "packing"}
  changed = sorted(k for k in pos_b if pos_a.get(k) != pos_b[k])
  if changed == ["example_rows"]:
    recorded = "example_rows" in saved.get("data_position", {})
    why = "" if recorded else " (as versions before packing them did)"
    raise ConfigError(
      "--no-packing" if pos_a["example_rows"] == "one per row" else "--packing",
      f"checkpoint {where} had its instruction examples {pos_a['example_rows']}{why}; this run "
      f"has them {pos_b['example_rows']}, which would not continue its data order",
    )
  if changed:
    _refuse_data_order(pos_a, pos_b, changed, where)


# ---------------------------------------------------------------------------
# Evaluation.


# Validation batches dispatched ahead of the one whose loss the host reads back: the device
# computes while the host places the next batch, and at most this many queued batches
# hold device memory (dispatching the whole validation set at once would hold all of it).
EVAL_AHEAD = 2


def evaluate(
  run: Run, params, batches, eval_fn, *, progress: Callable[[int], None] | None = None
) -> tuple[float, float]:
  """Mean token loss over ``batches`` and its perplexity. ``progress(done)`` is called as
  each batch's loss is read back (in order; the sum is the same as one batch at a time)."""
  total, count, done = 0.0, 0.0, 0
  pending: collections.deque = collections.deque()

  def read_one():
    nonlocal total, count, done
    loss_sum, n = pending.popleft()
    total += float(loss_sum)
    count += float(n)
    done += 1
    if progress is not None:
      progress(done)

  for b in batches:
    pending.append(eval_fn(params, device_batch(run, b, 1)))
    if len(pending) > EVAL_AHEAD:
      read_one()
  while pending:
    read_one()
  loss = total / max(count, 1.0)
  return loss, math.exp(min(loss, 50.0))


@contextlib.contextmanager
def host_progress(desc: str, describe: Callable[[int, int], str], *, first_line=False, **bar):
  """``progress(done, total)`` for a long task on the host: a tqdm bar in a terminal (``bar``:
  its options; gone when done, since a result line follows); else, for a log file, a line
  ``{desc}: {describe(done, total)}, {seconds} s`` on stderr at most every
  ``PROGRESS_LINE_S`` seconds (and at the first call with ``first_line``), so that stdout
  keeps only results (``--json`` stays parseable)."""
  if _is_terminal(sys.stderr):
    from tqdm import tqdm

    shown = None

    def update(done: int, total: int) -> None:
      nonlocal shown
      if shown is None:
        shown = tqdm(total=total, initial=done, desc=desc, leave=False, **bar)
      else:
        shown.update(done - shown.n)

    try:
      yield update
    finally:
      if shown is not None:
        shown.close()
    return
  start = time.monotonic()
  last = -math.inf if first_line else start

  def line(done: int, total: int) -> None:
    nonlocal last
    now = time.monotonic()
    if done < total and now - last >= PROGRESS_LINE_S:
      last = now
      print(f"{desc}: {describe(done, total)}, {now - start:.0f} s", file=sys.stderr, flush=True)

  yield line


@contextlib.contextmanager
def eval_progress(total: int):
  """``eval``'s progress over ``total`` batches (:func:`host_progress`), as ``progress(done)``
  for :func:`evaluate`."""
  with host_progress("eval", lambda done, n: f"{done}/{n} batches", unit="batch") as progress:
    yield lambda done: progress(done, total)


# A path source read for the first time (the token cache then holds it) shows its progress
# from this size on: C4's JSON-lines shards take minutes to tokenize.
DATA_PROGRESS_MIN_BYTES = 64 << 20


@contextlib.contextmanager
def data_progress(stop_point: Callable[[], None] = lambda: None, flag: str = "--data"):
  """``progress(done, total)`` (bytes) for ``data.make_dataset`` / ``eval_batches``: shown by
  process 0 only, and only for sources of at least ``DATA_PROGRESS_MIN_BYTES``; each call
  first calls ``stop_point()``. ``flag``: the source's, as the line names it."""
  gb = lambda n: f"{n / 1e9:.2f}"
  with host_progress(
    f"tokenising {flag} (once: cached for later starts)",
    lambda done, total: f"{gb(done)}/{gb(total)} GB",
    first_line=True,
    unit="B",
    unit_scale=True,
  ) as progress:
    primary = distributed.is_primary()

    def report(done, total):
      stop_point()
      if primary and total >= DATA_PROGRESS_MIN_BYTES:
        progress(done, total)

    yield report


def compile_eval_step(run: Run):
  step = steps.make_eval_step(run.graphdef)
  if run.parametrization is not None:
    dense = lambda p: run.parametrization.materialize(p["trainable"], p["frozen"])
  else:
    dense = lambda p: p
  return jax.jit(
    lambda p, b: step(dense(p), jax.tree.map(lambda x: x[0], b)),
    in_shardings=(run.param_sharding, sharding.batch_sharding(run.mesh)),
  )


# ---------------------------------------------------------------------------
# The loop.


class _Signals:
  """Turns SIGINT / SIGTERM into a flag checked between steps (then save and exit).

  The first signal says on stderr what will happen. It stops the run at once while the
  data are being loaded (:meth:`loading`: tokenizing a large source, or waiting for
  another process that tokenizes it, can take minutes, and nothing is saved then); else
  it is a flag, checked before the first step and after each step. A second signal stops
  waiting for the current step (``KeyboardInterrupt``), except while a checkpoint is
  being written (:meth:`saving`): it then waits for the save, so that a checkpoint is
  never cut short by the user's own Ctrl-C.

  Off the main thread (:func:`train` called from a worker thread of the caller's) Python
  allows no signal handlers: none are installed, and the process's own handling applies.
  """

  def __init__(self):
    self.received: int | None = None
    self.training = False  # set when the first step begins: a signal then saves a step
    self.late = False  # a job's processes agree on signals a step late (LateAgreement)
    self._old = {}
    self._saving = False
    self._loading = False

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self  # signal.signal would raise ValueError there
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._old[sig] = signal.signal(sig, self._handle)
    # The handler's KeyboardInterrupt can land where Python ignores exceptions (a gc
    # callback): no traceback for it. The signal is recorded: the data load's next stop
    # point raises it again, and the loop stops after the current step.
    errors.hide_ignored_interrupts(KeyboardInterrupt)
    return self

  def _handle(self, signum, frame):
    del frame
    if self._loading:
      self.received = self.received or signum
      raise KeyboardInterrupt
    if self.received is None:
      self.received = signum
      self._say(signum)
    elif not self._saving:  # a second signal: stop waiting
      raise KeyboardInterrupt

  def _say(self, signum: int) -> None:
    if not distributed.is_primary():  # one line per job
      return
    name = signal.Signals(signum).name
    if self.training:
      which = "the next step (with the job's other processes)" if self.late else "the current step"
      what = f"stopping after {which}, which is saved; send it again to stop without saving"
    else:
      what = "stopping before the first step; send it again to stop at once"
    try:  # os.write: a print here could re-enter one the signal interrupted
      fd = sys.stderr.fileno()
      lead = "\n" if os.isatty(fd) else ""  # off a progress bar's line
      os.write(fd, f"{lead}galore-jax: {name}: {what}\n".encode())
    except (OSError, ValueError, AttributeError):  # no stderr, or a closed one
      pass

  @contextlib.contextmanager
  def loading(self):
    """A signal stops the run at once: raised by the handler, and again by :meth:`stop_point`
    (which the data progress calls between tokenizer batches) where Python ignored it."""
    self._loading = True
    try:
      yield
    finally:
      self._loading = False

  def stop_point(self) -> None:
    if self._loading and self.received is not None:
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


# What a process past --time-limit asks the others for (distributed.agree_signal), beside
# the numbers of the signals.
TIME_UP = -1


class OutOfMemory(RuntimeError):
  """The device ran out of memory during the run; the message says what was saved and what
  to change. The CLI exits 1."""


class TrainingDiverged(RuntimeError):
  pass


def data_config(cfg: TrainConfig, batch_size: int):
  """The data pipeline's config for ``cfg`` at ``batch_size`` sequences per batch."""
  from galore_jax import data  # lazy: grain is not needed to build or benchmark a step

  return data.DataConfig(
    source=cfg.data,
    seq_len=cfg.seq_len,
    batch_size=batch_size,
    packing=cfg.packing,
    seed=cfg.seed,
    tokenizer=cfg.tokenizer,
    columns=cfg.columns,
    chat_template=cfg.chat_template,
    document_mask=cfg.document_mask,
  )


def _round_up(x: float) -> int:
  """The smallest of 1, 2, 5, 10, 20, 50, ... at or above ``x``."""
  power = 1
  while True:
    for digit in (1, 2, 5):
      if digit * power >= x:
        return digit * power
    power *= 10


def describe_devices(devices) -> str:
  """``8 x NVIDIA H200``, ``1 x cpu``: what the run trains on, on its first line."""
  kinds = collections.Counter(d.device_kind for d in devices)
  return ", ".join(f"{n} x {kind}" for kind, n in kinds.items())


def cpu_fallback_note(devices, gpu_present: bool | None = None) -> str | None:
  """A warning when the run trains on the CPU of a machine with an NVIDIA GPU: JAX falls
  back to the CPU, with one log line, where its CUDA backend is missing (a jaxlib without
  it) or cannot start (another process holding the GPU's memory), and a run meant for the
  GPU would go on a thousand times slower. Not where the CPU was asked for
  (``JAX_PLATFORMS=cpu``)."""
  if any(d.platform != "cpu" for d in devices):
    return None
  if "cpu" in os.environ.get("JAX_PLATFORMS", "").lower().split(","):
    return None
  if gpu_present is None:
    gpu_present = os.path.exists("/dev/nvidiactl")
  if not gpu_present:
    return None
  return (
    "galore-jax: warning: training on the CPU, but this machine has an NVIDIA GPU: JAX could "
    "not use it (see its warning above: a jax without CUDA, which pip install -U "
    "'jax[cuda12]' (this package's [cuda] extra) adds; or the GPU's memory held by another "
    "process). JAX_PLATFORMS=cpu says the CPU is meant"
  )


def _instruction_note(data_format: str, train_ds=None) -> str:
  """What the model line says of instruction data (nothing for text): which records, that
  the loss is on the replies alone, and how the examples fill the rows, so a user sees how
  their file was read."""
  if data_format == "text":  # (sft imports the data pipeline: grain, which a GPU image may lack)
    return ""
  from galore_jax.sft import FORM_NAMES

  if data_format not in FORM_NAMES:
    return ""
  rows = ""
  n_ex, n_rows = getattr(train_ds, "num_documents", None), getattr(train_ds, "num_examples", 0)
  packed = getattr(getattr(train_ds, "config", None), "packing", None)
  if n_ex and n_rows and packed is not None:
    rows = (
      f"; {n_ex} examples packed into {n_rows} rows ({n_ex / n_rows:.1f} per row)"
      if packed
      else f"; {n_ex} examples, one per row"
    )
  return f" ({FORM_NAMES[data_format]}, loss on the replies only{rows})"


def idle_devices_note(used: int, devices) -> str | None:
  """A note when the mesh leaves accelerators idle: the default mesh is one device, so a
  machine of 8 GPUs would train on 1 unnoticed. CPU devices are not counted (several
  exist only where XLA_FLAGS asks for them, as the tests do); a job of several processes
  already needs a mesh over all of its devices."""
  n = sum(d.platform != "cpu" for d in devices)
  if n <= used:
    return None
  return (
    f"galore-jax: note: the run uses {used} of {n} devices; --mesh data={n} (or fsdp={n}, "
    "which also shards the weights and optimizer state) uses all of them"
  )


def load_data(cfg: TrainConfig, *, stop_point: Callable[[], None] = lambda: None):
  """Tokenizer, training stream and fixed validation batches; bad --data is a ConfigError.
  ``stop_point()`` is called as the files are read (and may raise to stop)."""
  from galore_jax import data

  try:
    sp = data.load_tokenizer(cfg.tokenizer, cfg.chat_template)
  except (OSError, RuntimeError, ValueError) as e:
    raise ConfigError("--tokenizer", str(e)) from e
  if sp.eos_id() < 0:
    raise ConfigError("--tokenizer", "the tokenizer has no EOS piece; documents need a separator")
  # Multi-process: this process's rows of each global batch only (galore_jax.distributed).
  shard = distributed.batch_shard(
    sharding.batch_sharding(sharding.make_mesh(cfg)), cfg.batch_size, cfg.seq_len
  )
  try:
    with data_progress(stop_point) as progress:  # the first split read tokenizes both
      train_ds = data.make_dataset(
        data_config(cfg, cfg.batch_size * cfg.grad_accum), "train", shard=shard, progress=progress
      )
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError("--data", str(e)) from e
  # Held: every evaluation during training reads the same few batches again. --eval-data:
  # a held-out set of the user's own (all of a path source); else the documents held out
  # of --data.
  val_cfg = data_config(cfg, cfg.batch_size)
  if cfg.eval_data:
    val_cfg = dataclasses.replace(val_cfg, source=cfg.eval_data)
  try:
    with data_progress(stop_point, "--eval-data" if cfg.eval_data else "--data") as progress:
      val = list(
        data.eval_batches(
          val_cfg,
          cfg.eval_batches,
          progress=progress,
          split=data.held_out_split(cfg.eval_data) if cfg.eval_data else "validation",
        )
      )
  except (FileNotFoundError, ValueError) as e:
    if not cfg.eval_data:
      raise ConfigError("--data", str(e)) from e
    message = str(e).removeprefix("--data ")  # the data layer names the source as --data
    raise ConfigError("--eval-data", message) from e
  return sp, train_ds, val


def checkpoint_room_note(
  ckpt_dir: str, state_bytes: int, *, keep: int, existing: int, saves: int
) -> str | None:
  """A warning, at the start of a run, when the free space of the checkpoints' file system
  cannot hold what the run will write: ``saves`` checkpoints of about ``state_bytes`` each
  (the weights and optimizer state), of which ``keep`` are kept and one more exists while
  the next is written, beside the ``existing`` ones. A save that does not fit fails with a
  warning and training goes on, but a run left alone (a 7B run's checkpoint is 19 GB)
  would then save nothing for hours."""
  if saves < 1:
    return None
  at_once = max(1, min(keep + 1, existing + saves) - existing)
  probe = ckpt_dir
  while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
    probe = os.path.dirname(probe)
  try:
    free = shutil.disk_usage(probe).free
  except OSError:
    return None
  if free >= at_once * state_bytes:
    return None
  gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
  if free < state_bytes:
    return (
      f"galore-jax: warning: {probe} has {gb(free)} free, less than one checkpoint of this run "
      f"(about {gb(state_bytes)}): saves fail until there is room (training goes on, and each "
      "save step tries again)"
    )
  return (
    f"galore-jax: warning: {probe} has {gb(free)} free; this run's checkpoints take about "
    f"{gb(state_bytes)} each, {at_once} at once ({gb(at_once * state_bytes)}: "
    f"--keep-checkpoints {keep}, and one more while the next is written): make room or lower "
    "--keep-checkpoints, or the later saves fail"
  )


def _local_paths(cfg: TrainConfig, log) -> tuple[TrainConfig, dict | None]:
  """``--init-from``, ``--tokenizer``, ``--data`` and ``--eval-data`` as local paths:
  Hugging Face Hub ids (``hf://datasets/...`` for data) fetched, or found in the Hugging
  Face cache, as the snapshot directories or files the run then records
  (:mod:`galore_jax.hub`).

  A resume whose ``--init-from`` or tokenizer can no longer be read (a directory deleted, a
  scratch file system purged, a cache emptied on a machine without network) goes on with
  what the run kept of them: the ``config.json`` in its checkpoint, returned as the second
  value (None otherwise), and the tokenizer's copy (:func:`run_tokenizer`). The weights are
  the checkpoint's anyway."""
  cfg = dataclasses.replace(
    cfg,
    data=hub.local_data(cfg.data, flag="--data", log=log),
    eval_data=hub.local_data(cfg.eval_data, flag="--eval-data", log=log),
  )
  # A resume of a run that has a checkpoint (a directory listing, not its metadata).
  ckpt_dir = os.path.join(cfg.out, "checkpoints") if cfg.out else None
  resuming = bool(cfg.resume and ckpt_dir and checkpoint.finished_steps(ckpt_dir))
  hf_config = None
  if cfg.init_from:
    kept = checkpoint.saved_record(cfg.out, "hf_config") if resuming else None
    try:
      init = hub.local_dir(cfg.init_from, flag="--init-from", log=log)
      if kept and not os.path.isdir(os.path.expanduser(init)):
        raise ConfigError("--init-from", f"{init}: no such directory")
      cfg = dataclasses.replace(cfg, init_from=init)
    except ConfigError as e:
      if kept is None:
        raise
      step, hf_config = kept
      log(
        f"galore-jax: note: --init-from {str(e).removeprefix('--init-from: ')}; the run goes "
        f"on with the config.json that its checkpoint {step} kept (its weights are the "
        "checkpoint's)"
      )
  if cfg.tokenizer:
    if resuming:
      tokenizer = run_tokenizer(cfg.tokenizer, cfg.out, log)
    else:
      tokenizer = hub.local_dir(cfg.tokenizer, flag="--tokenizer", need="tokenizer", log=log)
    cfg = dataclasses.replace(cfg, tokenizer=tokenizer)
  return cfg, hf_config


# RUN/tokenizer/: the run's copy of its tokenizer's files (keep_tokenizer).
TOKENIZER_COPY = "tokenizer"


def keep_tokenizer(cfg: TrainConfig, sp, log) -> None:
  """Copies the files of the run's ``--tokenizer`` (not the bundled one, which the package
  holds) into ``RUN/tokenizer/``, once, so that the run can be resumed, evaluated and
  exported after they are gone (:func:`run_tokenizer`). The copy is written whole or not
  at all (a rename) and must load as the same tokenizer; a copy that fails only warns."""
  dest = os.path.join(cfg.out, TOKENIZER_COPY)
  if not cfg.tokenizer or not distributed.is_primary() or os.path.isdir(dest):
    return
  from galore_jax import data, hf  # (data imports grain, which a GPU image may lack)

  source = Path(cfg.tokenizer)
  if source.is_dir():
    source = hf.find_tokenizer(source)
  if hasattr(sp, "files"):  # a tokenizer.json, with the files beside it that it reads
    files = {"tokenizer.json": source, **{f.name: f for f in sp.files()[1:]}}
    if (source.parent / hf.CONFIG_FILE).is_file():  # special ids may come from it
      files[hf.CONFIG_FILE] = source.parent / hf.CONFIG_FILE
  else:
    files = {"tokenizer.model": source}
  partial = tempfile.mkdtemp(prefix=f".{TOKENIZER_COPY}.partial-", dir=cfg.out)
  try:
    os.chmod(partial, hf.umask_mode(0o777))  # as the run's other directories, not 0700
    for name, file in files.items():
      shutil.copyfile(file, os.path.join(partial, name))
    if tokenizer_hash(data.load_tokenizer(partial)) != tokenizer_hash(sp):
      raise ValueError("the copy loads as another tokenizer")
    os.rename(partial, dest)
  except (OSError, ValueError) as e:
    log(f"galore-jax: warning: could not keep a copy of the tokenizer in {dest} ({e})")
  finally:
    shutil.rmtree(partial, ignore_errors=True)


def run_tokenizer(recorded: str | None, out: str, log=None) -> str | None:
  """The tokenizer a run recorded, as a local path (a Hub id found or fetched); where that
  can no longer be read, the copy the run kept in ``RUN/tokenizer/`` (:func:`keep_tokenizer`),
  with one note. Either way the checkpoint's tokenizer hash is checked after."""
  copy = os.path.abspath(os.path.join(out, TOKENIZER_COPY))
  try:
    path = hub.local_dir(recorded, flag="--tokenizer", need="tokenizer", log=log)
    if not path or os.path.exists(os.path.expanduser(path)) or not os.path.isdir(copy):
      return path
    why = "no such file"
  except ConfigError as e:
    if not os.path.isdir(copy):
      raise
    why = str(e).removeprefix("--tokenizer: ")
  if log is not None:
    log(
      f"galore-jax: note: the run's tokenizer {recorded} cannot be read ({why}); using the copy "
      f"the run kept in {copy}"
    )
  return copy


def default_out(cfg: TrainConfig) -> str:
  """``runs/<model>_<optimizer>_<timestamp>``; the model is ``--init-from``'s directory name
  when there is one (its config.json, not ``--model``, is the architecture)."""
  model = hub.model_name(cfg.init_from) if cfg.init_from else cfg.model
  return os.path.join("runs", f"{model}_{cfg.optimizer}_{time.strftime('%Y%m%d-%H%M%S')}")


# What a previous run leaves in --out; a new run (no --resume) refuses to mix with it.
_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tb", metrics.WANDB_DIR, TOKENIZER_COPY)


def _check_out(cfg: TrainConfig, ckpt_dir: str) -> int | None:
  """The latest checkpoint step to resume from (None: a fresh start); refuses to mix
  runs. With ``--overwrite`` a previous run's outputs are deleted (under the lock), and
  with ``--resume auto`` those of a run that saved no checkpoint (killed while it compiled
  or before its first save: its metrics are of steps that were never kept)."""
  existing = checkpoint.latest_step(ckpt_dir)
  auto = cfg.resume == "auto"
  if cfg.resume and not auto:
    if existing is None:
      raise ConfigError("--resume", f"no checkpoint to resume from in {ckpt_dir}")
    return existing
  if auto and existing is not None:
    return existing
  found = [n for n in _RUN_OUTPUTS if os.path.exists(os.path.join(cfg.out, n))]
  if found and (cfg.overwrite or auto):
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


def process_start() -> float:
  """The ``time.perf_counter()`` reading at which this process started (Linux's
  ``/proc/self/stat``, to 10 ms); now where that cannot be read. A batch job's time limit
  counts from about then: interpreter start, imports and joining a job included."""
  try:
    with open("/proc/self/stat") as f:
      ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    with open("/proc/uptime") as f:
      age = float(f.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return time.perf_counter()
  return time.perf_counter() - max(age, 0.0)


def train(
  cfg: TrainConfig, *, log=print, hooks: Hooks = NO_HOOKS, started: float | None = None
) -> dict[str, Any]:
  """Runs (or resumes) training; returns a summary with the final losses and paths.

  ``hooks`` (:class:`Hooks`) change the optimizer, the trained tree, the evaluation, the
  checkpoint writes and add per-step callbacks; the loop itself is the same for every run.

  ``started``: the ``time.perf_counter()`` reading ``--time-limit`` counts from (default:
  this call). The CLI passes :func:`process_start`, so that a job's imports and the wait
  for its other processes count against its limit too.

  The run directory is locked for the whole call (:func:`galore_jax.rundir.locked`);
  SIGINT / SIGTERM raise :class:`TrainingInterrupted` after saving (or, before the
  first step, after removing a run directory this call created). Called from a thread
  other than the main one, it installs no signal handlers (Python allows none there).

  In a multi-process job (:mod:`galore_jax.distributed`) every process calls this with the
  same ``cfg``; process 0 holds the lock, writes the metrics and logs; the others only train
  and save their checkpoint shards.
  """
  if cfg.out is None and distributed.is_multiprocess():  # a per-process timestamp would differ
    raise ConfigError("--out", "a multi-process run needs --out (the same for every process)")
  if not distributed.is_primary():  # one copy of each line per job
    log = distributed.primary_log(log)
  cfg, kept_hf_config = _local_paths(cfg, log)
  if cfg.out is None:
    if cfg.resume:
      raise ConfigError("--out", "--resume needs the --out directory of the run to continue")
    cfg = dataclasses.replace(cfg, out=default_out(cfg))
  if not cfg.out.strip():
    raise ConfigError("--out", "must name a directory, got ''")
  validate(cfg, kept_hf_config)
  # Absolute paths: eval, sample and --resume may run from another directory.
  cfg = dataclasses.replace(
    cfg,
    data=absolute_source(cfg.data),
    eval_data=absolute_source(cfg.eval_data) if cfg.eval_data else None,
    tokenizer=os.path.abspath(os.path.expanduser(cfg.tokenizer)) if cfg.tokenizer else None,
  )
  if cfg.init_from and not hub.is_hub_id(cfg.init_from):  # (one kept unresolved: above)
    # Absolute: a resume may run from another directory.
    cfg = dataclasses.replace(cfg, init_from=os.path.abspath(os.path.expanduser(cfg.init_from)))
  if cfg.init_from and cfg.tokenizer is None:  # the model's own tokenizer, if it has one
    from galore_jax import hf

    found = hf.find_tokenizer(cfg.init_from)
    if found is None:
      raise ConfigError(
        "--tokenizer", f"{cfg.init_from} has no tokenizer.json or tokenizer.model; name one"
      )
    # Not resolved: the Hugging Face cache links each file to a blob without its name.
    cfg = dataclasses.replace(cfg, tokenizer=os.path.abspath(found))
  with _Signals() as signals, contextlib.ExitStack() as stack:
    try:
      # Multi-process: process 0 holds the lock for the job (galore_jax.distributed).
      created = stack.enter_context(distributed.locked_run_dir(cfg.out))
    except rundir.RunDirError as e:
      raise ConfigError("--out", str(e)) from None
    try:
      return _train(cfg, signals, log, hooks, kept_hf_config, started)
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


def _train(
  cfg: TrainConfig,
  signals: _Signals,
  log,
  hooks: Hooks,
  hf_config: dict | None,
  started: float | None,
) -> dict[str, Any]:
  t_start = time.perf_counter()
  with metrics.CompileTimer() as compile_timer:  # until the first step ends (below)
    return _train_loop(
      cfg,
      signals,
      log,
      t_start,
      compile_timer,
      hooks,
      hf_config,
      t_start if started is None else started,
    )


def _train_loop(
  cfg: TrainConfig,
  signals,
  log,
  t_start: float,
  compile_timer,
  hooks: Hooks,
  hf_config,
  limit_start: float,
) -> dict[str, Any]:
  """``hf_config``: ``--init-from``'s config.json as a checkpoint kept it, for a resume
  whose directory is gone (:func:`_local_paths`); None reads the directory.
  ``limit_start``: the clock reading ``--time-limit`` counts from (:func:`train`)."""
  ckpt_dir = os.path.join(cfg.out, "checkpoints")
  existing = _check_out(cfg, ckpt_dir)
  distributed.barrier("out_checked")  # multi-process: all checked before anyone writes
  if cfg.resume == "auto":  # from here on, a resume or a fresh start like any other
    cfg = dataclasses.replace(cfg, resume=existing is not None)
    if existing is None:
      log(f"--resume auto: no checkpoint in {ckpt_dir}; starting at step 0")

  def startup_check():
    if signals.received is not None:
      raise TrainingInterrupted(
        signals.received, None, "before the first step; nothing was written"
      )

  if cfg.resume:  # (_check_out found its checkpoint)
    # A changed optimizer setting, batch shape or data source is refused now, not after
    # minutes of loading data (one record of it tells the form the load will find).
    start, saved = checkpoint.read_meta(ckpt_dir, existing)
    expected_format = None
    if hooks.data is None:
      from galore_jax import sft  # (imports the data pipeline, as the load does)

      expected_format = sft.source_format(cfg.data, cfg.columns)
    check_config_compatible(saved, cfg, f"{ckpt_dir}/{start}", expected_format)
  if hooks.data is None:
    startup_check()  # a signal that came before: not minutes of tokenizing first
    try:
      with signals.loading():  # a signal stops tokenizing at once (nothing to save yet)
        sp, train_ds, val_batches = load_data(cfg, stop_point=signals.stop_point)
    except KeyboardInterrupt:
      raise TrainingInterrupted(
        signals.received or signal.SIGINT, None, "while loading the data; nothing was written"
      ) from None
  else:
    sp, train_ds, val_batches = hooks.data
  startup_check()
  run = setup(
    cfg,
    sp.get_piece_size(),
    hf_config,
    tx=hooks.tx,
    parametrization=hooks.parametrization,
    model_cfg=hooks.model_cfg,
  )
  data_format = getattr(train_ds, "data_format", "text")
  meta = {**run_meta(cfg, run, sp, hf_config, data_format), **hooks.meta}
  if fingerprint := getattr(train_ds, "fingerprint", None):
    meta["data_fingerprint"] = fingerprint

  if cfg.resume:  # start, saved: read before the data load (checked again: the data's own)
    check_compatible(saved, meta, f"{ckpt_dir}/{start}")
    if changes := resume_changes(saved.get("train_config", {}), cfg, start):
      log(f"galore-jax: note: {changes}")
    was_eval = saved.get("train_config", {}).get("eval_data")
    if was_eval != hub.pinned(cfg.eval_data):  # a resume that changed (or left out) it
      held = lambda source: (
        f"--eval-data {source}" if source else "the documents held out of --data"
      )
      log(
        f"galore-jax: note: evaluating on {held(cfg.eval_data)}, where the run before step "
        f"{start} evaluated on {held(was_eval)}: its eval losses are not comparable across it"
      )
    was = saved.get("data_fingerprint")  # None: saved by an older version, or custom data
    if was and fingerprint and was != fingerprint:  # the same --data, other files
      log(
        f"galore-jax: note: the files of --data changed since checkpoint {start} (added, "
        "removed or edited, or --columns reads them otherwise): the batches from here on "
        "are not the ones its run would have read"
      )
    was_form = saved_data_format(saved, data_format)
    if was_form != data_format:
      from galore_jax.sft import FORM_NAMES

      read_as = lambda f: FORM_NAMES.get(f, "text")
      log(
        f"galore-jax: note: --data is read as {read_as(data_format)}, where the run before step "
        f"{start} read it as {read_as(was_form)}: its examples and loss are not the same "
        "across it"
      )
    was_template = saved.get("train_config", {}).get("chat_template")
    if data_format == "chat" and was_template != cfg.chat_template:
      log(
        f"galore-jax: note: the chat template is not the one the run used before step {start} "
        "(--chat-template, or the tokenizer's own): its examples are laid out otherwise from "
        "here on"
      )
    if "hf_generation_config" in saved:  # as the run began, even if the directory is gone
      meta["hf_generation_config"] = saved["hf_generation_config"]
    restored = checkpoint.restore(
      ckpt_dir, start, {"params": run.abstract_params, "opt_state": run.abstract_opt}
    )
    params, opt_state = restored["params"], restored["opt_state"]
    log(f"resumed from {ckpt_dir}/{start}")
  else:
    params, opt_state = init_state(run, hooks.init_params)
    start = 0
  if start >= cfg.steps:
    log(f"checkpoint is at step {start} >= --steps {cfg.steps}; nothing to train")

  n_params = sum(x.size for x in jax.tree.leaves(params))
  log(
    f"model {hub.describe(cfg.init_from) if cfg.init_from else cfg.model}: "
    f"{n_params / 1e6:.2f}M params, "
    f"vocab {run.model_cfg.vocab_size}; "
    f"optimizer {cfg.optimizer}"
    + (f" rank {cfg.rank}" if cfg.is_galore else "")
    + f", peak lr {cfg.peak_lr:g}"
    + f"; {train_ds.num_tokens or 'streamed'} training tokens"
    + _instruction_note(data_format, train_ds)
    + f"; mesh {dict(run.mesh.shape)} "
    f"on {describe_devices(run.mesh.devices.flat)}"
  )
  if cfg.document_mask and data_format != "text":
    log(
      "galore-jax: note: --document-mask keeps packed text documents apart; instruction "
      "examples are kept apart whenever they are packed, so it changes nothing here"
    )
  if cfg.chat_template and data_format != "chat":
    from galore_jax.sft import FORM_NAMES

    log(
      'galore-jax: note: --chat-template renders "messages" records; --data holds '
      f"{FORM_NAMES.get(meta['data_format'], 'text')}, which it leaves as they are"
    )
  if note := idle_devices_note(run.mesh.size, jax.devices()):
    log(note)
  if note := cpu_fallback_note(jax.devices()):
    log(note)
  if hooks.data is None:  # files a directory source holds but does not read
    from galore_jax import data

    for flag, source in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
      if note := data.unread_note(source, flag):
        log(note)

  end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
  if distributed.is_primary() and hooks.save is None:
    saves = (
      end // cfg.save_every - start // cfg.save_every + (end > start and end % cfg.save_every > 0)
    )
    if note := checkpoint_room_note(
      ckpt_dir,
      tree_bytes((run.abstract_params, run.abstract_opt)),
      keep=cfg.keep_checkpoints,
      existing=len(checkpoint.finished_steps(ckpt_dir)),
      saves=saves,
    ):
      log(note)

  startup_check()
  if cfg.resume and distributed.is_primary():  # replayed steps' old records go (process 0's)
    dropped = metrics.drop_after(cfg.out, start)
    if dropped:
      log(f"dropped {dropped} metrics records after step {start} (replayed now)")
  step_fn = cached_train_step(run, hooks, log)
  eval_fn = compile_eval_step(run)
  lr_at = hooks.lr_at or _on_host(lr_schedule(cfg))
  eval_count = {"eval_batches": len(val_batches)} if hooks.evaluate is None else {}
  write_checkpoint = hooks.save or (lambda at, p, o, m: checkpoint.save(mngr, at, p, o, m))
  mngr = checkpoint.manager(ckpt_dir, keep=cfg.keep_checkpoints)
  try:
    writer = (  # multi-process: process 0 writes metrics and TensorBoard
      metrics.MetricsWriter(
        cfg.out,
        wandb_config=meta["train_config"] if cfg.wandb else None,
        purge_step=start + 1 if cfg.resume else None,
        warn=lambda text: log(f"galore-jax: warning: {text}"),
      )
      if distributed.is_primary()
      else distributed.NullWriter(cfg.out)
    )
  except metrics.WandbError as e:
    mngr.close()
    raise ConfigError("--wandb", str(e)) from e
  keep_tokenizer(cfg, sp, log)  # with the run's first outputs (a refused rerun names them)
  tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
  devices = list(run.mesh.devices.flat)
  local_devices = [d for d in devices if d.process_index == jax.process_index()]
  peak_tflops = cfg.peak_tflops or metrics.default_peak_tflops(devices[0].device_kind)
  profile = parse_profile_steps(cfg.profile_steps, cfg.steps)
  profiling = False
  losses: list[float] = []
  last_eval: tuple[float, float] | None = None
  consecutive_bad = 0
  step = start
  # Every checkpoint follows a healthy step (save() below), so the newest one on disk is
  # where a diverged or interrupted run can go back to.
  saved_at = start if cfg.resume else None

  def save(at, *, last: bool = False) -> bool:
    """Saves unless the current streak of non-finite steps is non-zero (returns False).

    Skipped updates leave the state of the streak's start; a checkpoint from inside the
    streak would only push good ones out of rotation (``--keep-checkpoints``).

    A checkpoint that cannot be written (a full disk) is reported, and training goes on
    (returns False): the state is still in memory, and the next save step tries again,
    perhaps after the user has made room. The ``last`` save of a run, or any in a
    multi-process job (whose saves are collective), raises ``CheckpointWriteError`` instead.
    """
    nonlocal saved_at, mngr, last_save_s
    if consecutive_bad:
      return False
    if saved_at != at:  # a signal at a save step: already on disk
      with signals.saving():  # a second signal waits for the save
        t_save = time.perf_counter()
        try:
          write_checkpoint(at, params, opt_state, meta)
        except checkpoint.CheckpointWriteError as e:
          if not distributed.is_multiprocess():
            mngr = checkpoint.recover(mngr, at, cfg.keep_checkpoints)  # its partial files go
          if last or distributed.is_multiprocess():
            raise checkpoint.CheckpointWriteError(f"{e}; {newest_checkpoint()}") from e
          retry = min(at - at % cfg.save_every + cfg.save_every, end)
          log(
            f"galore-jax: warning: {e}; training goes on, and step {retry} saves again; "
            f"{newest_checkpoint()}"
          )
          return False
      saved_at = at
      took = last_save_s = time.perf_counter() - t_save
      writer.write({"step": at, "save_s": took})
      if not last and (note := save_cost_note(at, took)):
        log(note)
    return True

  step_times: collections.deque[float] = collections.deque(maxlen=100)  # this session's
  advised = False
  last_save_s = last_eval_s = 0.0
  time_limit = parse_duration(cfg.time_limit)

  # The steps whose end evaluates or saves: the loop's body, the time limit's margin and
  # whether the next step may start before a step's metrics are read all ask these.
  def evaluates(at: int) -> bool:
    return at % cfg.eval_every == 0 or at == cfg.steps

  def saves(at: int) -> bool:
    return at % cfg.save_every == 0 or at == end

  def out_of_time(step_s: float, after: int, *, running: int = 0) -> bool:
    """Whether another step after step ``after`` and its save might not end within
    ``--time-limit``: the time left is less than the longest of the recent steps (refresh
    steps included) plus the last save's duration, and the last evaluation's where the next
    step evaluates. ``running``: how many steps up to ``after`` may not have ended yet
    (each counts as one step more)."""
    if time_limit is None:
      return False
    longest = max(step_times, default=step_s)
    margin = longest * (1 + running) + last_save_s
    if evaluates(after + 1):
      margin += last_eval_s
    return time.perf_counter() - limit_start + margin >= time_limit

  def save_cost_note(at: int, took: float) -> str | None:
    """Once a run: a note when writing checkpoints takes more than 10% of its time (saves
    are synchronous; a 7B checkpoint is some 19 GB, at --save-every 100 of 0.4 s steps),
    with the --save-every that would make it 5%."""
    nonlocal advised
    if advised or len(step_times) < 3:
      return None
    step_s = float(np.median(step_times))
    share = took / (took + cfg.save_every * step_s)
    if share <= 0.1:
      return None
    advised = True
    return (
      f"galore-jax: note: checkpoint {at} took {took:.1f} s to write, {share:.0%} of the "
      f"run's time at --save-every {cfg.save_every} ({step_s:.3g} s/step); --save-every "
      f"{_round_up(took * 19 / step_s)} would make it 5%"
    )

  def out_of_memory(e: RuntimeError) -> str:
    """The message of an out-of-memory error, after saving the last whole step where its
    arrays are intact: a step that failed may have consumed its donated inputs (then the
    newest checkpoint is named), and one after callbacks that replace the state keeps none
    (``kept``). A job of several processes saves collectively, which one process cannot do
    alone."""
    where = newest_checkpoint()
    arrays = [x for x in jax.tree.leaves(kept) if isinstance(x, jax.Array)]
    if (
      kept is not None
      and step > start
      and not distributed.is_multiprocess()
      and not any(x.is_deleted() for x in arrays)
    ):
      try:
        if save(step, last=True):
          where = f"step {step} is saved in {ckpt_dir}/{step}"
      except Exception as w:  # noqa: BLE001 - a full disk, or the device again: say so
        named = isinstance(w, checkpoint.CheckpointWriteError)  # it names the newest one
        where = f"step {step} could not be saved: {errors.first_line(w, 400)}" + (
          "" if named else f"; {where}"
        )
    if step == start:  # nothing trained yet: any flag may change
      hints = [
        f"{errors.PLAN_HINT} (a smaller --batch-size with a larger --grad-accum, --remat full,"
        " 8-bit states, bfloat16 weights)"
      ]
    else:  # a resume keeps the batch shape
      hints = ["--remat full (which a resume may add) lowers the peak"] * (cfg.remat != "full")
    if pool := metrics.memory_pool(local_devices):
      hints.append(pool)
    said = f"the device ran out of memory in {doing} ({errors.first_line(e)}); {where}"
    return said + (f". {'; '.join(hints)}" if hints else "")

  def newest_checkpoint() -> str:
    if saved_at is None:
      return f"no checkpoint was saved in {ckpt_dir}"
    return f"the newest checkpoint is {ckpt_dir}/{saved_at}"

  show = cfg.progress and distributed.is_primary()
  lines = show and not _is_terminal(sys.stderr)  # else a bar
  bar = None
  if show and not lines:
    from tqdm import tqdm  # lazy: library users may not want a progress bar

    bar = tqdm(
      total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
    )
  last_line = -math.inf  # when `lines` last printed one
  last_read = -math.inf  # when the last step's metrics were read (it had ended)
  step_s = 0.0  # the time of the last step whose metrics were read

  def finish(at: int, m, t_started: float, built: bool, lr_used: float):
    """Reads step ``at``'s metrics, waiting for it to end, and records them; returns them
    on the host. Raises TrainingDiverged after ``--max-nonfinite`` bad steps in a row."""
    nonlocal consecutive_bad, last_read, step_s, last_line
    t_wait = time.perf_counter()
    m = jax.device_get(m)  # the step ran (an error of its outputs is raised here)
    now = time.perf_counter()
    # With steps overlapping, the loop waits here for the device; near 0 means the device
    # had finished and was waiting for the host (data, logging, a slow disk) instead.
    wait_s = now - t_wait
    # From when the device could start it: its dispatch, or the end of the step before
    # where it was dispatched while that one ran (then this is the device's step rate).
    step_s = max(now - max(t_started, last_read), 1e-9)
    last_read = now
    if at > start + 1 and not built:  # compiled (or loaded) none
      step_times.append(step_s)
    tps = tokens_per_step / step_s
    memory = metrics.device_memory(local_devices)
    bad = int(m["skipped"]) or int(m.get("nonfinite_grads", 0))
    consecutive_bad = consecutive_bad + 1 if bad else 0
    loss = float(m["loss"])
    losses.append(loss)
    if at % cfg.log_every == 0 or at == end:
      writer.write(
        {
          "step": at,
          "loss": loss,
          "lr": lr_used,
          "step_s": step_s,
          "wait_s": wait_s,
          "tokens_per_s": tps,
          "mfu": metrics.mfu(n_params, tps, peak_tflops, len(devices)),
          **memory,
          "grad_norm": float(m["grad_norm"]),
          "skipped": int(m["skipped"]),
          **({"nonfinite_grads": int(m["nonfinite_grads"])} if m.get("nonfinite_grads") else {}),
        }
      )
    mem = memory["peak_bytes"]
    if bar is not None:
      bar.update(1)
      bar.set_postfix(
        loss=f"{loss:.3f}",
        tok_s=f"{tps:,.0f}",
        **({"mem": f"{mem / 2**30:.2f}GiB"} if mem is not None else {}),
      )
    elif lines and (now - last_line >= PROGRESS_LINE_S or at in (start + 1, end)):
      last_line = now
      log(
        f"step {at}/{cfg.steps}: loss {loss:.4f}, lr {lr_used:.3g}, {tps:,.0f} tokens/s, "
        f"{step_s:.3g} s/step" + (f", peak {mem / 2**30:.2f} GiB" if mem is not None else "")
      )
    if consecutive_bad >= cfg.max_nonfinite:
      raise TrainingDiverged(
        f"{consecutive_bad} consecutive steps with non-finite loss or gradients (steps "
        f"{at - consecutive_bad + 1}..{at}, not saved); {newest_checkpoint()}. "
        "Lower --lr or enable --grad-clip."
      )
    return m

  # A step may start before the last one's metrics are read: the device then runs the
  # steps back to back, and the host's time between them (reading and recording metrics,
  # the next batch, the progress bar, dispatching the step) overlaps the next step instead
  # of idling the device. Not with callbacks (they see each step's state and metrics). A job
  # of several processes then agrees on stop signals one step late (LateAgreement), so
  # that no step waits for the one in flight; else it agrees after every step.
  overlap = not (hooks.before_step or hooks.after_step)
  late = distributed.late_agreement() if overlap else None
  agreed = None  # what the processes agreed on (late) during this step
  unread = None  # the last step's (at, metrics, t_started, built, lr), not yet read
  # The state at `step` (a whole step's outputs, before the next step's callbacks), and
  # what the loop is doing: an out-of-memory error names it and saves this state.
  kept, doing = (params, opt_state), f"step {start + 1}"
  try:
    batches = train_ds.iterate(start)
    ahead = None  # the next step's batch, on the device
    while step < end:
      if step == start:
        startup_check()
        signals.training, signals.late = True, late is not None
      # Callbacks may replace the state (ReLoRA's merge): holding the old one through the
      # step would cost a copy of it, and saving the new one as `step` would run them twice.
      kept = (params, opt_state) if not hooks.before_step else None
      doing = f"step {step + 1}"
      if profile is not None and not profiling and profile[0] <= step < profile[1]:
        jax.profiler.start_trace(os.path.join(cfg.out, "tb"))
        profiling = True
      t_step = time.perf_counter()  # the step and its batch; not evaluation or saving
      for callback in hooks.before_step:
        params, opt_state = callback(step, params, opt_state, writer)
      if ahead is None:
        ahead = device_batch(run, next(batches), cfg.grad_accum, local=True)
      lr_used = float(lr_at(step))
      params, opt_state, m = step_fn(params, opt_state, ahead, np.float32(lr_used))
      built = getattr(step_fn, "built_last_call", False)
      # While the device runs the step, the host puts the next step's batch on the device:
      # the device then does not wait for it between the steps.
      ahead = (
        device_batch(run, next(batches), cfg.grad_accum, local=True) if step + 1 < end else None
      )
      if unread is not None:  # the step before, read now that this one is queued
        pending, unread = unread, None
        doing = f"step {step}"
        finish(*pending)
        doing = f"step {step + 1}"
      at = step + 1
      if late is not None:
        # Step `at` is in flight and step at + 1 will be, whatever is agreed now: a request
        # made now stops the job after step at + 1, so the time limit looks one step further.
        agreed = late.exchange(
          signals.received
          or (TIME_UP if at + 1 < end and out_of_time(step_s, at + 1, running=2) else None)
        )
      if overlap and not (
        at == start + 1  # its records time the compilation
        or evaluates(at)
        or saves(at)
        or (profiling and at >= profile[1])
        or signals.received is not None
        or agreed is not None
        or out_of_time(step_s, at, running=1)
      ):  # nothing below needs this step's state or metrics now
        unread = (at, m, t_step, built, lr_used)
        kept, step = (params, opt_state), at
        continue
      m = finish(at, m, t_step, built, lr_used)
      kept, step = (params, opt_state), at
      doing = f"the end of step {step}"  # its records, evaluation, checkpoint, callbacks
      if profiling and step >= profile[1]:
        jax.block_until_ready((params, opt_state))
        jax.profiler.stop_trace()
        profiling = False
        where = f"profile of steps {profile[0] + 1}..{step}: {os.path.join(cfg.out, 'tb')}"
        if bar is not None:
          bar.write(where)
        else:
          log(where)
      if step == start + 1:  # after the step's own record: line 1 stays step 1's
        if time_limit is not None and ahead is not None and hasattr(step_fn, "build_all"):
          step_fn.build_all(params, opt_state, ahead, np.float32(lr_at(step)))
        compile_timer.stop()
        writer.write(
          {
            "step": step,
            "compile_s": compile_timer.seconds,
            "startup_s": last_read - t_start,
          }
        )
      if evaluates(step):
        doing, t_eval = f"the evaluation at step {step}", time.perf_counter()
        if hooks.evaluate is None:
          last_eval = evaluate(run, params, val_batches, eval_fn)
        else:  # the hook's own batches: their number is not the run's --eval-batches
          last_eval = hooks.evaluate(run, params, eval_fn)
        doing, last_eval_s = f"the end of step {step}", time.perf_counter() - t_eval
        writer.write(
          {"step": step, "eval_loss": last_eval[0], "eval_ppl": last_eval[1], **eval_count}
        )
        if bar is not None or lines:
          (bar.write if bar is not None else log)(
            f"step {step}: eval loss {last_eval[0]:.4f}, ppl {last_eval[1]:.2f}"
            + (f" ({len(val_batches)} batches)" if eval_count else "")
          )
      if saves(step):
        save(step, last=step == end)
      for callback in hooks.after_step:
        callback(step, m)
      # Multi-process: a signal to any process stops all after the same step (saving is
      # collective), and so does the first process past --time-limit.
      if late is not None:
        stop = agreed
      else:
        ask = signals.received or (TIME_UP if step < end and out_of_time(step_s, step) else None)
        stop = distributed.agree_signal(ask)
      if stop is not None:
        try:
          saved = save(step, last=True)
        except checkpoint.CheckpointWriteError as e:
          if stop == TIME_UP:
            raise
          raise TrainingInterrupted(stop, step, f"not saved: {e}") from None
        if saved:
          why = f"checkpoint saved in {ckpt_dir}/{step}; continue with --resume"
        else:
          why = (
            f"not saved (the last {consecutive_bad} steps were not finite); " + newest_checkpoint()
          )
        if stop != TIME_UP:
          raise TrainingInterrupted(stop, step, why)
        log(f"stopped at the time limit (--time-limit) after step {step} of {cfg.steps}; {why}")
        break
  except RuntimeError as e:
    if not errors.is_out_of_memory(e):
      raise
    if unread is not None:  # the next step failed to start: whether this one ended well
      pending, unread = unread, None
      try:
        finish(*pending)
      except Exception:  # noqa: BLE001 - it failed too (or diverged): nothing to save
        kept = None
    if kept is not None:
      params, opt_state = kept
    raise OutOfMemory(out_of_memory(e)) from e
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
    summary.update(eval_loss=last_eval[0], eval_ppl=last_eval[1], **eval_count)
  return summary
