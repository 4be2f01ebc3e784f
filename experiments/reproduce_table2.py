"""Reproduce the shape of GaLore's Table 2: full-rank Adam vs GaLore vs low-rank baselines.

The paper (Zhao et al., ICML 2024, Table 2) pretrains LLaMA 60M..1B on C4 and
reports validation perplexity and the memory of weights + optimizer states
(BF16) for full-rank Adam, GaLore, low-rank factorised training, LoRA and
ReLoRA. This script runs the same comparison with this package's model,
data pipeline and optimizers:

    python experiments/reproduce_table2.py                       # --scale cpu, ~40 min, 2 cores
    python experiments/reproduce_table2.py --scale paper --data tfds:c4/en --tokenizer t5.model

Methods (each with its own learning-rate sweep; the best final validation
perplexity per method and model is reported):

==============  =====================================================  ==================
method          what is trained                                        peak lr grid
==============  =====================================================  ==================
adamw           every weight, full-rank AdamW                          3e-3, 1e-3, 3e-4
galore          GaLore AdamW, rank r (d/4; the paper's rank at paper   3e-2, 1e-2, 3e-3
                scale), alpha 0.25
galore_d2       GaLore AdamW, rank d/2, alpha 0.25                     3e-2, 1e-2, 3e-3
lowrank         W = B A from scratch (rank r), no full-rank W          3e-3, 1e-3, 3e-4
lora            W = W0 + (32 / r) B A, W0 frozen at its random init    3e-3, 1e-3, 3e-4
relora          lora + merge and optimizer reset every steps/4 steps   3e-3, 1e-3, 3e-4
                (no full-rank warm-up), lr re-warmed after each reset
==============  =====================================================  ==================

The grids are the issue's (the paper tuned every method over {1e-2, 5e-3,
1e-3, 5e-4, 1e-4}); the factorised baselines train with Adam and get the
Adam-family grid. (A first CPU sweep gave them the grid half a decade higher,
{1e-2, 3e-3, 1e-3}: all three were best at its lowest point, so they use
Adam's.) A best lr at the edge of the lrs tried is marked in the table
(``*``); ``--extend-edges N`` adds, up to N times, the next half-decade point
past such an edge and reruns only that (``--lrs method=...`` replaces a grid).
In every method embeddings, norms
and the LM head are dense and trained by Adam at the method's lr (as GaLore
does); ranks of the factorised baselines equal GaLore's main rank r, as in the
paper. Schedule: 10% linear warm-up, cosine to 10% of the peak; no weight
decay, no clipping (the paper's settings up to 1B).

Every method, size and lr sees the same model init (seed), the same batches
in the same order (``galore_jax.data`` with the same seed) and the same token
budget; every run is a ``galore-jax train`` run (``galore_jax.trainer.train``: its
whole-gradient step, loop, checkpoints, metrics and non-finite handling), which differs
between methods only through the trainer's hooks: how the dense weights are produced
(``trainer.Parametrization`` with ``lowrank.materialize``; none for AdamW / GaLore),
ReLoRA's merges (a per-step callback) and the learning rate of each step
(``trainer.Hooks.lr_at``: the trainer's schedule, times ReLoRA's re-warm-up after each
merge). The optimizer is the one ``galore-jax train`` builds
(``galore_jax.config.build_optimizer``) for every method, and the trainer's step takes
the rate as an argument, so the compiled step is the same for every lr of a method.

Scales:

* ``--scale cpu`` (default): ``llama_tiny`` (d 256, 4 layers, 7.4M parameters
  with the bundled 8192-piece tokenizer) and ``llama_13m`` (d 384, 4 layers,
  6 heads, 13.4M), on the bundled corpus. Measured on this project's 2-core
  CPU, a step of 4 x 64 tokens costs 0.27 CPU-seconds (``llama_tiny``) and
  0.45-0.50 (``llama_13m``), and XLA spreads it over both cores, so the 36
  runs (2 sizes x 6 methods x 3 lrs) fit in about 40 minutes with 240 steps
  of 4 x 64 tokens each (61K tokens per run). Small batches, because at this
  budget more updates help more than less noise: 280 steps of 4 x 64 reached
  perplexity 399 with AdamW where 140 steps of 8 x 64 reached 503 (same
  tokens). GaLore refreshes its projectors every T = 40 steps (6 refreshes;
  the paper's T = 200 of 10K steps refreshes 50 times); ReLoRA merges at
  steps 60, 120 and 180. Validation: 32 batches of 8 x 64 tokens (16K tokens)
  evenly spread over the held-out chapters and scenes, the same for every
  run.
* ``--scale paper``: LLaMA 60M / 130M / 350M / 1B, ranks 128 / 256 / 256 / 512
  (d/2: 256 / 384 / 512 / 1024), batch 512 x 256 tokens, 10K / 20K / 60K / 100K
  steps (1.3B / 2.6B / 7.9B / 13.1B tokens; the paper counts 1.1B / 2.2B /
  6.4B / 13.1B), T = 200, pure bf16, documents truncated / padded to 256
  (``--no-packing``), on ``--data tfds:c4/en`` or C4 JSON files with the T5
  tokenizer (``--tokenizer``). ``--models`` / ``--methods`` select a subset;
  ``--micro-batch`` sets the accumulation; ``--mesh data=N`` shards batches.
* ``--scale smoke``: a 1-layer, d 32 model for 6 steps (the tests run it).

Outputs in ``--out`` (default ``runs/table2_<scale>``): one run directory per
(model, method, lr) -- ``metrics.jsonl`` and TensorBoard events like a
``galore-jax train`` run, ``config.json``, and ``result.json`` written last,
when the run is finished. Rerunning the command skips finished runs; a run
interrupted (Ctrl-C) restarts (or, with ``--save-every``, resumes from its
checkpoint), and the finished ones are kept. The report goes to ``--report``
(default: ``--out``): ``table2.md`` (validation perplexity and memory per
method, the sweep, the settings), ``curves.png`` (training loss, one panel per
model, one line per method at its best lr) and ``results.json`` (every run's
numbers). Memory is weights + optimizer state, counted from the real state
shapes (``jax.eval_shape`` of each method's init, GaLore projectors included)
at 2 bytes per element, as the paper's BF16 figures.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from galore_jax import checkpoint, config, data, lowrank, metrics, trainer
from galore_jax import model as model_lib

METHODS = ("adamw", "galore", "galore_d2", "lowrank", "lora", "relora")
LABELS = {
  "adamw": "Full-rank AdamW",
  "galore": "GaLore (rank r)",
  "galore_d2": "GaLore (rank d/2)",
  "lowrank": "Low-rank factorised (W = BA)",
  "lora": "LoRA (alpha 32)",
  "relora": "ReLoRA",
}
PAPER_ROW = {"adamw": "Full-rank Adam", "galore": "GaLore", "lowrank": "Low-rank factorised"}
PAPER_ROW.update(lora="LoRA", relora="ReLoRA")
COLORS = {
  "adamw": "#1f77b4",
  "galore": "#2ca02c",
  "galore_d2": "#17becf",
  "lowrank": "#d62728",
  "lora": "#ff7f0e",
  "relora": "#9467bd",
}
ADAM_GRID = (3e-3, 1e-3, 3e-4)
GALORE_GRID = (3e-2, 1e-2, 3e-3)
# The factorised baselines train with Adam: the Adam-family grid (see the module docstring).
LR_GRIDS = {
  "adamw": ADAM_GRID,
  "galore": GALORE_GRID,
  "galore_d2": GALORE_GRID,
  "lowrank": ADAM_GRID,
  "lora": ADAM_GRID,
  "relora": ADAM_GRID,
}
# Paper Table 2: (perplexity, memory G) per method at 60M / 130M / 350M / 1B.
PAPER_TABLE = {
  "adamw": [(34.06, 0.36), (25.08, 0.76), (18.80, 2.06), (15.56, 7.80)],
  "galore": [(34.88, 0.24), (25.36, 0.52), (18.95, 1.22), (15.64, 4.38)],
  "lowrank": [(78.18, 0.26), (45.51, 0.54), (37.41, 1.08), (142.53, 3.57)],
  "lora": [(34.99, 0.36), (33.92, 0.80), (25.58, 1.76), (19.21, 6.17)],
  "relora": [(37.04, 0.36), (29.37, 0.80), (29.08, 1.76), (18.33, 6.17)],
}
LORA_ALPHA = 32.0
MAX_CURVE_POINTS = 1000


# ---------------------------------------------------------------------------
# What to run.


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model size: a base config from ``model.CONFIGS`` with overrides, and its ranks."""

  name: str
  base: str
  rank: int  # GaLore's main rank, also the factorised baselines' rank
  rank_d2: int
  overrides: tuple[tuple[str, int], ...] = ()

  def config(self, vocab_size: int, param_dtype: str, dtype: str) -> model_lib.LlamaConfig:
    return model_lib.get_config(
      self.base,
      vocab_size=vocab_size,
      param_dtype=config.DTYPES[param_dtype],
      dtype=config.DTYPES[dtype],
      **dict(self.overrides),
    )


@dataclasses.dataclass(frozen=True)
class Scale:
  """Everything shared by the runs of one sweep (the token budget, data and schedule)."""

  name: str
  models: tuple[ModelSpec, ...]
  steps: tuple[int, ...]  # per model
  batch_size: int  # micro-batch sequences
  grad_accum: int
  seq_len: int
  data: str
  packing: bool
  update_proj_gap: int
  eval_batch_size: int
  eval_batches: int
  spread_eval: bool  # evenly spaced validation batches (False: the first ones)
  eval_every: int  # 0: only at the end
  param_dtype: str = "float32"
  dtype: str = "float32"
  tokenizer: str | None = None
  save_every: int = 0  # 0: no mid-run checkpoints
  seed: int = 0
  mesh: str | None = None
  lr_grids: tuple[tuple[str, tuple[float, ...]], ...] = tuple(LR_GRIDS.items())

  def grid(self, method: str) -> tuple[float, ...]:
    return dict(self.lr_grids)[method]

  def steps_for(self, model: ModelSpec) -> int:
    return self.steps[self.models.index(model)]


def _tiny_like(name: str, hidden: int, intermediate: int, heads: int, layers: int, rank: int):
  over = (
    ("hidden_size", hidden),
    ("intermediate_size", intermediate),
    ("num_heads", heads),
    ("num_layers", layers),
  )
  return ModelSpec(name, "llama_tiny", rank, hidden // 2, over)


def cpu_scale() -> Scale:
  return Scale(
    name="cpu",
    models=(
      ModelSpec("llama_tiny", "llama_tiny", 64, 128),
      _tiny_like("llama_13m", 384, 1024, 6, 4, rank=96),
    ),
    steps=(240, 240),
    batch_size=4,
    grad_accum=1,
    seq_len=64,
    data="builtin",
    packing=True,
    update_proj_gap=40,
    eval_batch_size=8,
    eval_batches=32,
    spread_eval=True,
    eval_every=0,
  )


def paper_scale() -> Scale:
  return Scale(
    name="paper",
    models=(
      ModelSpec("llama_60m", "llama_60m", 128, 256),
      ModelSpec("llama_130m", "llama_130m", 256, 384),
      ModelSpec("llama_350m", "llama_350m", 256, 512),
      ModelSpec("llama_1b", "llama_1b", 512, 1024),
    ),
    steps=(10_000, 20_000, 60_000, 100_000),
    batch_size=64,
    grad_accum=8,  # 512 sequences per step
    seq_len=256,
    data="tfds:c4/en",
    packing=False,
    update_proj_gap=200,
    eval_batch_size=64,
    eval_batches=610,  # ~10M token positions
    spread_eval=False,
    eval_every=1000,
    param_dtype="bfloat16",
    dtype="bfloat16",
    save_every=1000,
  )


def smoke_scale() -> Scale:
  grids = dict(LR_GRIDS)
  grids = {m: g[:1] for m, g in grids.items()}
  grids["adamw"] = (3e-3, 1e-3)  # two points: exercises the best-of-sweep selection
  return Scale(
    name="smoke",
    models=(_tiny_like("llama_micro", 32, 64, 2, 1, rank=8),),
    steps=(6,),
    batch_size=2,
    grad_accum=1,
    seq_len=16,
    data="builtin",
    packing=True,
    update_proj_gap=2,
    eval_batch_size=2,
    eval_batches=2,
    spread_eval=True,
    eval_every=3,
    lr_grids=tuple(grids.items()),
  )


SCALES = {"cpu": cpu_scale, "paper": paper_scale, "smoke": smoke_scale}


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run: a model, a method and a peak lr within a scale."""

  scale: Scale
  model: ModelSpec
  method: str
  lr: float

  @property
  def name(self) -> str:
    return f"{self.model.name}/{self.method}_lr{self.lr:g}"

  @property
  def steps(self) -> int:
    return self.scale.steps_for(self.model)

  @property
  def rank(self) -> int | None:
    if self.method == "adamw":
      return None
    return self.model.rank_d2 if self.method == "galore_d2" else self.model.rank

  @property
  def lowrank_spec(self) -> lowrank.Spec | None:
    if self.method == "lowrank":
      return lowrank.Spec("lowrank", self.model.rank)
    if self.method in ("lora", "relora"):
      return lowrank.Spec("lora", self.model.rank, LORA_ALPHA)
    return None

  @property
  def relora_every(self) -> int | None:
    return max(1, self.steps // 4) if self.method == "relora" else None

  @property
  def relora_rewarm(self) -> int | None:
    # ReLoRA re-warms the lr after each reset for a short span (4% of a cycle).
    return max(1, round(0.04 * self.relora_every)) if self.method == "relora" else None

  def train_config(self) -> config.TrainConfig:
    """The ``galore-jax train`` configuration of this run (optimizer, schedule, data)."""
    s = self.scale
    return config.TrainConfig(
      model=self.model.base,
      optimizer="galore_adamw" if self.method.startswith("galore") else "adamw",
      rank=self.rank or 1,
      update_proj_gap=s.update_proj_gap,
      galore_scale=0.25,
      svd="exact",  # the paper's refresh (the trainer's default is subspace)
      lr=self.lr,
      steps=self.steps,
      batch_size=s.batch_size,
      seq_len=s.seq_len,
      grad_accum=s.grad_accum,
      weight_decay=0.0,
      data=s.data,
      tokenizer=s.tokenizer,
      packing=s.packing,
      seed=s.seed,
      mesh=s.mesh,
      param_dtype=s.param_dtype,
      dtype=s.dtype,
      progress=False,
    )

  def describe(self, vocab_size: int) -> dict[str, Any]:
    """Everything the run's numbers depend on (a finished run is reused only if this matches)."""
    cfg = self.train_config()
    mc = self.model.config(vocab_size, self.scale.param_dtype, self.scale.dtype)
    return {
      "name": self.name,
      "model": self.model.name,
      "model_config": {
        k: str(v) if not isinstance(v, int | float | str) else v
        for k, v in dataclasses.asdict(mc).items()
      },
      "method": self.method,
      "lr": self.lr,
      "rank": self.rank,
      "lowrank": lowrank.describe(self.lowrank_spec),
      "relora_every": self.relora_every,
      "relora_rewarm": self.relora_rewarm,
      "optimizer": cfg.optimizer,
      "galore_scale": cfg.galore_scale if cfg.is_galore else None,
      "update_proj_gap": cfg.update_proj_gap if cfg.is_galore else None,
      "steps": cfg.steps,
      "warmup_steps": cfg.warmup_steps,
      "min_lr_ratio": cfg.min_lr_ratio,
      "batch_size": cfg.batch_size,
      "grad_accum": cfg.grad_accum,
      "seq_len": cfg.seq_len,
      "tokens_per_step": cfg.batch_size * cfg.grad_accum * cfg.seq_len,
      "b1": cfg.b1,
      "b2": cfg.b2,
      "eps": cfg.eps,
      "weight_decay": cfg.weight_decay,
      "data": cfg.data,
      "tokenizer": cfg.tokenizer,
      "packing": cfg.packing,
      "seed": cfg.seed,
      "eval_batches": self.scale.eval_batches,
      "eval_batch_size": self.scale.eval_batch_size,
      "spread_eval": self.scale.spread_eval,
      "param_dtype": self.scale.param_dtype,
      "dtype": self.scale.dtype,
    }


def plan_runs(scale: Scale, models: list[ModelSpec], methods: list[str]) -> list[RunSpec]:
  return [
    RunSpec(scale, m, method, lr) for m in models for method in methods for lr in scale.grid(method)
  ]


# ---------------------------------------------------------------------------
# What differs between methods: the learning rate of each step and the parametrisation.


def lr_values(rs: RunSpec) -> np.ndarray:
  """Peak-scaled lr of every step: the trainer's schedule, times ReLoRA's re-warm-up."""
  sched = config.lr_schedule(rs.train_config())
  lrs = np.asarray(jax.vmap(sched)(jnp.arange(rs.steps)), np.float64)
  if rs.method == "relora":
    t = np.arange(rs.steps)
    since = t % rs.relora_every
    ramp = np.minimum(1.0, (since + 1) / rs.relora_rewarm)
    lrs = np.where(t >= rs.relora_every, lrs * ramp, lrs)  # the first cycle has the global warm-up
  return lrs.astype(np.float32)


def parametrization(rs: RunSpec, init_std: float) -> trainer.Parametrization | None:
  """How the run's trained tree makes the dense weights (None: AdamW and GaLore train them)."""
  spec = rs.lowrank_spec
  if spec is None:
    return None
  key = jax.random.fold_in(jax.random.key(rs.scale.seed), 1)

  def split(dense):
    trainable, frozen = lowrank.init(dense, spec, key, init_std=init_std)
    return {"trainable": trainable, "frozen": frozen}

  return trainer.Parametrization(
    split=split, materialize=lambda trainable, frozen: lowrank.materialize(trainable, frozen, spec)
  )


def relora_merges(rs: RunSpec):
  """ReLoRA's per-step callback: every ``relora_every`` steps, merge the factors into the
  frozen weights, redraw them and zero their optimizer moments (a ``relora_merge`` record)."""
  spec, key = rs.lowrank_spec, jax.random.fold_in(jax.random.key(rs.scale.seed), 2)
  jitted = {}

  def merge(params, key):
    trainable, frozen = lowrank.merge(params["trainable"], params["frozen"], spec, key)
    return {"trainable": trainable, "frozen": frozen}

  def callback(step, params, opt_state, writer):
    if not step or step % rs.relora_every:
      return params, opt_state
    if not jitted:  # outputs keep the shardings the step expects
      same = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
      jitted["merge"] = jax.jit(merge, out_shardings=same(params), donate_argnums=0)
      jitted["reset"] = jax.jit(
        lowrank.reset_factor_moments, out_shardings=same(opt_state), donate_argnums=0
      )
    cycle = step // rs.relora_every
    params = jitted["merge"](params, jax.random.fold_in(key, cycle))
    opt_state = jitted["reset"](opt_state)
    writer.write({"step": step, "relora_merge": cycle})
    return params, opt_state

  return callback


def bf16_bytes(tree) -> int:
  """Bytes at 2 per floating-point element (the paper's BF16 accounting); integers as stored."""
  total = 0
  for x in jax.tree.leaves(tree):
    n = math.prod(x.shape)
    total += 2 * n if jnp.issubdtype(x.dtype, jnp.floating) else n * jnp.dtype(x.dtype).itemsize
  return total


# ---------------------------------------------------------------------------
# Per-model context: data, model graph, compiled functions (shared by its runs).


class ModelContext:
  """What the runs of one model share: tokenizer, batches, model config, the dense init."""

  def __init__(self, scale: Scale, model: ModelSpec, datasets: dict):
    self.scale, self.model = scale, model
    key = (scale.data, scale.seq_len, scale.batch_size * scale.grad_accum, scale.tokenizer)
    if key not in datasets:
      datasets[key] = load_data(scale)
    self.sp, self.train_ds, self.val_batches = datasets[key]
    self.vocab_size = self.sp.get_piece_size()
    self.model_cfg = model.config(self.vocab_size, scale.param_dtype, scale.dtype)
    m = self.model_cfg
    for r in (model.rank, model.rank_d2):
      if r > min(m.hidden_size, m.intermediate_size):
        raise ValueError(f"rank {r} exceeds the smallest kernel side of {model.name}")
    self.dense_abstract = trainer.abstract_model(self.model_cfg, scale.seed)[1]
    self._dense = None

  @property
  def n_params(self) -> int:
    return model_lib.param_count(self.model_cfg)

  def dense_params(self):
    """The model's initial dense parameters (seed ``scale.seed``) as host arrays, made once.

    Every method starts from these (LoRA freezes them, low-rank replaces the
    projections by factors), so all runs of a model share one init.
    """
    if self._dense is None:
      model_cfg, seed = self.model_cfg, self.scale.seed

      def init():
        model = model_lib.Llama(model_cfg, rngs=nnx.Rngs(seed))
        return nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])

      self._dense = jax.device_get(jax.jit(init)())
    return self._dense

  def memory(self, rs: RunSpec) -> dict[str, int]:
    """Weights and optimizer state of the run's method in BF16 bytes, from the real shapes."""
    tx = config.build_optimizer(rs.train_config())
    param = parametrization(rs, self.model_cfg.init_std)
    split = param.split if param else lambda dense: {"trainable": dense, "frozen": {}}
    params = jax.eval_shape(split, self.dense_abstract)
    trainable, frozen = params["trainable"], params["frozen"]
    opt_state = jax.eval_shape(tx.init, trainable)
    return {
      "weights_bytes": bf16_bytes(trainable) + bf16_bytes(frozen),
      "optimizer_bytes": bf16_bytes(opt_state),
      "trainable_params": lowrank.count(trainable),
      "frozen_params": lowrank.count(frozen),
      "factor_params": lowrank.factor_count(trainable),
    }


def load_data(scale: Scale):
  """Tokenizer, training stream (the trainer's) and the fixed validation batches."""
  try:
    return _load_data(scale)
  except (FileNotFoundError, OSError, ValueError, ImportError) as e:
    raise SetupError(f"--data {scale.data!r} / --tokenizer {scale.tokenizer!r}: {e}") from e


class SetupError(RuntimeError):
  pass


def _load_data(scale: Scale):
  sp = data.load_tokenizer(scale.tokenizer)
  cfg = data.DataConfig(
    source=scale.data,
    seq_len=scale.seq_len,
    batch_size=scale.batch_size * scale.grad_accum,
    packing=scale.packing,
    seed=scale.seed,
    tokenizer=scale.tokenizer,
  )
  train_ds = data.make_dataset(cfg, "train")
  eval_cfg = dataclasses.replace(cfg, batch_size=scale.eval_batch_size)
  if scale.spread_eval:
    every = data.eval_batches(eval_cfg, None)
    n = min(scale.eval_batches, len(every))
    # Evenly spaced batches cover the whole held-out split (chapters and scenes in order).
    idx = np.unique(np.linspace(0, len(every) - 1, n).round().astype(int))
    val = [every[i] for i in idx]
  else:
    val = data.eval_batches(eval_cfg, scale.eval_batches)
  return sp, train_ds, val


# ---------------------------------------------------------------------------
# One run.


def _write_json(path: Path, obj) -> None:
  """Atomic: a reader sees the old file or the whole new one."""
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
  os.replace(tmp, path)


def _downsample(
  values: list[float], limit: int = MAX_CURVE_POINTS
) -> tuple[list[int], list[float]]:
  """(steps, values): at most ``limit`` points, each the mean of a contiguous bin of steps."""
  n = len(values)
  if n <= limit:
    return list(range(1, n + 1)), [round(float(v), 5) for v in values]
  edges = np.linspace(0, n, limit + 1).astype(int)
  steps, out = [], []
  for a, b in zip(edges[:-1], edges[1:], strict=True):
    steps.append(int(b))
    out.append(round(float(np.mean(values[a:b])), 5))
  return steps, out


def _curves(run_dir: Path) -> tuple[list[float], list[dict]]:
  """Training losses (one per step) and eval records, the last record of each step winning
  (a resumed run may have logged a step twice)."""
  train_by_step, eval_by_step = {}, {}
  for r in metrics.read_metrics(str(run_dir)):
    if "loss" in r:
      train_by_step[r["step"]] = r["loss"]
    if "eval_loss" in r:
      eval_by_step[r["step"]] = {"step": r["step"], "loss": r["eval_loss"], "ppl": r["eval_ppl"]}
  losses = [train_by_step[s] for s in sorted(train_by_step)]
  return [float("nan") if v is None else v for v in losses], [
    eval_by_step[s] for s in sorted(eval_by_step)
  ]


class Progress:
  """Prints "run k/N name ... ETA" lines; estimates from the runs finished in this session."""

  def __init__(self, runs: list[RunSpec], quiet: bool, cost: dict[str, float]):
    self.runs, self.quiet, self.cost = runs, quiet, cost
    self.seconds: dict[str, list[float]] = {}
    self.t0 = time.perf_counter()

  def log(self, msg: str) -> None:
    if not self.quiet:
      print(msg, flush=True)

  def record(self, rs: RunSpec, seconds: float) -> None:
    self.seconds.setdefault(rs.model.name, []).append(seconds / rs.steps)

  def _per_step(self, rs: RunSpec) -> float | None:
    own = self.seconds.get(rs.model.name)
    if own:
      return float(np.mean(own))
    others = [np.mean(v) / self.cost[m] for m, v in self.seconds.items()]
    return float(np.mean(others)) * self.cost[rs.model.name] if others else None

  def eta(self, remaining: list[RunSpec], current: tuple[RunSpec, int, float] | None = None):
    """Seconds left: the remaining runs at the measured seconds per step (per model, or scaled
    by the models' FLOPs per token), plus the rest of the current run at its own rate."""
    total = 0.0
    if current is not None:
      rs, done, elapsed = current
      if done:
        total += elapsed / done * (rs.steps - done)
      elif (p := self._per_step(rs)) is not None:
        total += p * rs.steps
      else:
        return None
    for rs in remaining:
      p = self._per_step(rs)
      if p is None:
        return None
      total += p * rs.steps
    return total


def _fmt_time(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "--:--"
  s = int(round(seconds))
  return (
    f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
  )


def run_dir_for(out: Path, rs: RunSpec) -> Path:
  return out / rs.model.name / rs.name.split("/", 1)[1]


def load_result(run_dir: Path) -> dict | None:
  path = run_dir / "result.json"
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    return None  # a torn write cannot happen (atomic), but a hand-edited file can


class ConfigMismatch(RuntimeError):
  pass


def _check_same(saved: dict, current: dict, where: Path) -> None:
  diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  if diff:
    raise ConfigMismatch(
      f"{where} holds a finished run with a different configuration "
      f"(differs in {', '.join(diff)}); use another --out or delete that directory"
    )


def train_run(
  ctx: ModelContext, rs: RunSpec, run_dir: Path, progress: Progress, remaining: list[RunSpec]
) -> dict:
  """Trains one run to the end with the trainer (``galore_jax.trainer.train``) and writes its
  ``result.json``; returns the result.

  The run's method enters through the trainer's hooks: the learning rate of each step
  (:func:`lr_values`, ReLoRA's re-warm-up included), the low-rank parametrisation, ReLoRA's
  merges (a per-step callback), this model's shared dense init, data and validation
  batches. The optimizer is the trainer's own.
  """
  desc = rs.describe(ctx.vocab_size)
  t_start = time.perf_counter()
  ckpt = run_dir / "checkpoints"
  latest = checkpoint.latest_step(str(ckpt)) if ckpt.is_dir() else None
  resume = latest is not None and checkpoint.read_meta(str(ckpt), latest)[1].get("run") == desc
  if resume:
    progress.log(f"  resuming {rs.name} from its checkpoint at step {latest}")
  elif run_dir.exists():
    shutil.rmtree(run_dir)  # an unfinished run without a usable checkpoint starts over
  run_dir.mkdir(parents=True, exist_ok=True)
  _write_json(run_dir / "config.json", desc)
  cfg = dataclasses.replace(
    rs.train_config(),
    out=str(run_dir),
    resume=resume,
    # The same step for every method: the whole gradient, pulled back through the
    # parametrisation (per-layer updates would only change when weights are updated).
    per_layer_updates=False,
    eval_every=rs.scale.eval_every or rs.steps,
    save_every=rs.scale.save_every or rs.steps,
  )
  lrs = lr_values(rs)
  report_every = max(1, rs.steps // 10)
  timing = {"start": latest if resume else 0, "t0": time.perf_counter()}

  def report(step, m):
    if step % report_every == 0 or step == rs.steps:
      done, elapsed = step - timing["start"], time.perf_counter() - timing["t0"]
      eta = progress.eta(remaining, (rs, done, elapsed))
      progress.log(
        f"  step {step}/{rs.steps} loss {float(m['loss']):.3f} "
        f"({done / max(elapsed, 1e-9):.2f} steps/s)  ETA {_fmt_time(eta)}"
      )

  hooks = trainer.Hooks(
    model_cfg=ctx.model_cfg,
    data=(ctx.sp, ctx.train_ds, ctx.val_batches),
    parametrization=parametrization(rs, ctx.model_cfg.init_std),
    init_params=lambda run: jax.device_put(ctx.dense_params(), run.dense_sharding),
    meta={"run": desc},
    before_step=[relora_merges(rs)] if rs.method == "relora" else [],
    after_step=[report],
    lr_at=lambda step: float(lrs[step]),
  )
  status = "ok"
  try:
    trainer.train(cfg, log=lambda *_: None, hooks=hooks)
  except trainer.TrainingDiverged as e:
    status = "diverged"
    progress.log(f"  {rs.name}: diverged: {e}")
  except trainer.TrainingInterrupted as e:
    raise KeyboardInterrupt(str(e)) from e  # the sweep stops; finished runs are kept
  wall = time.perf_counter() - t_start
  losses, evals = _curves(run_dir)
  step = len(losses)
  tokens_per_step = desc["tokens_per_step"]
  curve_steps, curve = _downsample(losses)
  final = evals[-1] if evals and evals[-1]["step"] == step and status == "ok" else None
  result = {
    "run": desc,
    "status": status,
    "steps_done": step,
    "tokens": step * tokens_per_step,
    "eval_loss": final["loss"] if final else None,
    "eval_ppl": final["ppl"] if final else None,
    "final_train_loss": float(np.mean(losses[-max(1, len(losses) // 20) :])) if losses else None,
    "evals": evals,
    "wall_s": wall,
    "params": ctx.n_params,
    **ctx.memory(rs),
    "curve_steps": curve_steps,
    "train_loss": curve,
  }
  if ckpt.is_dir():
    shutil.rmtree(ckpt)  # finished: the result is what is kept
  _write_json(run_dir / "result.json", result)
  return result


# ---------------------------------------------------------------------------
# The sweep.


def flops_per_token(mc: model_lib.LlamaConfig) -> float:
  """6 x (matmul weights touched per token): the projections and the LM head."""
  return 6.0 * (model_lib.galore_target_count(mc) + mc.vocab_size * mc.hidden_size)


def sweep(
  scale: Scale, runs: list[RunSpec], out: Path, *, quiet: bool = False, on_model_done=None
) -> list[dict]:
  """Trains every run without a finished result in ``out``; returns all results in plan order.

  ``on_model_done(results)`` is called after the last run of each model (a partial report).
  """
  cost = {
    m.name: flops_per_token(m.config(8192, scale.param_dtype, scale.dtype)) for m in scale.models
  }
  progress = Progress(runs, quiet, cost)
  datasets: dict = {}
  contexts: dict[str, ModelContext] = {}
  results = []
  for k, rs in enumerate(runs, 1):
    run_dir = run_dir_for(out, rs)
    if rs.model.name not in contexts:
      contexts = {rs.model.name: ModelContext(scale, rs.model, datasets)}  # one model in memory
    ctx = contexts[rs.model.name]
    desc = rs.describe(ctx.vocab_size)
    done = load_result(run_dir)
    if done is not None:
      _check_same(done["run"], desc, run_dir)
      progress.log(f"run {k}/{len(runs)} {rs.name}: finished before, skipped")
      results.append(done)
      continue
    eta = progress.eta(runs[k - 1 :])
    progress.log(f"run {k}/{len(runs)} {rs.name} ... ETA {_fmt_time(eta)}")
    result = train_run(ctx, rs, run_dir, progress, runs[k:])
    progress.record(rs, result["wall_s"])
    ppl = result["eval_ppl"]
    progress.log(
      f"  done in {result['wall_s']:.0f} s: validation perplexity "
      + (f"{ppl:.2f}" if ppl is not None else f"- ({result['status']})")
    )
    results.append(result)
    if on_model_done is not None and (k == len(runs) or runs[k].model != rs.model):
      on_model_done(results)
  return results


def collect(runs: list[RunSpec], out: Path) -> list[dict]:
  """Finished results of the planned runs (for ``--report-only``)."""
  return [r for rs in runs if (r := load_result(run_dir_for(out, rs))) is not None]


# ---------------------------------------------------------------------------
# Report.


def best_runs(results: list[dict]) -> dict[str, dict[str, dict]]:
  """model -> method -> the finished run with the lowest validation loss."""
  best: dict[str, dict[str, dict]] = {}
  for r in results:
    if r["eval_loss"] is None:
      continue
    model, method = r["run"]["model"], r["run"]["method"]
    cur = best.setdefault(model, {}).get(method)
    if cur is None or r["eval_loss"] < cur["eval_loss"]:
      best[model][method] = r
  return best


def _fmt_bytes(n: int) -> str:
  return f"{n / 2**30:.2f}G" if n >= 2**30 else f"{n / 2**20:.1f}M"


def tried_lrs(runs: list[RunSpec], model: str, method: str) -> list[float]:
  return sorted({rs.lr for rs in runs if rs.model.name == model and rs.method == method})


def _at_edge(r: dict, runs: list[RunSpec]) -> bool:
  grid = tried_lrs(runs, r["run"]["model"], r["run"]["method"])
  return len(grid) > 1 and r["run"]["lr"] in (grid[0], grid[-1])


def next_lr(lr: float, up: bool) -> float:
  """The next point of the half-decade grid ..., 1e-3, 3e-3, 1e-2, ... above or below ``lr``."""
  exp = math.floor(math.log10(lr) + 1e-9)
  mant = lr / 10**exp
  if up:
    return float(f"{3 if mant < 2 else 1}e{exp if mant < 2 else exp + 1}")
  return float(f"{1 if mant >= 2 else 3}e{exp if mant >= 2 else exp - 1}")


def edge_extensions(runs: list[RunSpec], results: list[dict]) -> list[RunSpec]:
  """One more lr past the edge for every (model, method) whose best finished run is at an
  edge of the lrs tried, in the direction of that edge (``--extend-edges``)."""
  extra = []
  for model, by_method in best_runs(results).items():
    for method, r in by_method.items():
      grid = tried_lrs(runs, model, method)
      if len(grid) < 2 or not _at_edge(r, runs):
        continue
      rs = next(x for x in runs if x.model.name == model and x.method == method)
      lr = next_lr(r["run"]["lr"], up=r["run"]["lr"] == grid[-1])
      extra.append(dataclasses.replace(rs, lr=lr))
  return extra


def expectations(best: dict[str, dict[str, dict]]) -> dict[str, dict[str, Any]]:
  """Per model: GaLore d/2 vs AdamW (within 3%?) and whether low-rank is the worst method."""
  out = {}
  for model, by_method in best.items():
    e: dict[str, Any] = {}
    if "adamw" in by_method and "galore_d2" in by_method:
      rel = by_method["galore_d2"]["eval_ppl"] / by_method["adamw"]["eval_ppl"] - 1
      e["galore_d2_vs_adamw_pct"] = 100 * rel
      e["galore_d2_within_3pct"] = bool(rel <= 0.03)
    if "adamw" in by_method and "galore" in by_method:
      rel = by_method["galore"]["eval_ppl"] / by_method["adamw"]["eval_ppl"] - 1
      e["galore_r_vs_adamw_pct"] = 100 * rel
    if "lowrank" in by_method and len(by_method) > 1:
      worst = max(by_method, key=lambda m: by_method[m]["eval_ppl"])
      e["worst_method"] = worst
      e["lowrank_worst"] = worst == "lowrank"
    out[model] = e
  return out


def markdown(scale: Scale, runs: list[RunSpec], results: list[dict], info: dict) -> str:
  best = best_runs(results)
  by_name = {r["run"]["name"]: r for r in results}
  models = [m for m in scale.models if any(rs.model == m for rs in runs)]
  methods = [m for m in METHODS if any(rs.method == m for rs in runs)]
  lines = [f"# Table 2 reproduction (`--scale {scale.name}`)", ""]
  lines += [
    "Validation perplexity (memory of weights + optimizer states, BF16: 2 bytes per "
    "element of the real state shapes; M = MiB, G = GiB). Best peak lr per method; "
    "`*` marks a best lr at the edge of its grid.",
    "",
  ]
  head = ["Method"]
  for m in models:
    r0 = next((r for r in results if r["run"]["model"] == m.name), None)
    size = f"{r0['params'] / 1e6:.1f}M" if r0 else "?"
    head.append(f"{m.name} ({size}, r = {m.rank}, d/2 = {m.rank_d2})")
  lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for method in methods:
    row = [LABELS[method]]
    for m in models:
      r = best.get(m.name, {}).get(method)
      if r is None:
        planned = [rs for rs in runs if rs.model == m and rs.method == method]
        got = [by_name[rs.name] for rs in planned if rs.name in by_name]
        row.append("diverged" if got and len(got) == len(planned) else "-")
        continue
      edge = "*" if _at_edge(r, runs) else ""
      mem = _fmt_bytes(r["weights_bytes"] + r["optimizer_bytes"])
      row.append(f"{r['eval_ppl']:.2f} ({mem}) @ {r['run']['lr']:g}{edge}")
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  exp = expectations(best)
  for m in models:
    e = exp.get(m.name, {})
    parts = []
    if "galore_d2_vs_adamw_pct" in e:
      parts.append(
        f"GaLore d/2 vs AdamW {e['galore_d2_vs_adamw_pct']:+.1f}% "
        f"({'within' if e['galore_d2_within_3pct'] else 'NOT within'} 3%)"
      )
    if "galore_r_vs_adamw_pct" in e:
      parts.append(f"GaLore r vs AdamW {e['galore_r_vs_adamw_pct']:+.1f}%")
    if "worst_method" in e:
      parts.append(
        "low-rank factorised is the worst"
        if e["lowrank_worst"]
        else f"worst is {LABELS[e['worst_method']]}, not low-rank"
      )
    if parts:
      lines.append(f"- {m.name}: " + "; ".join(parts) + ".")
  lines += ["", "Memory breakdown at the best lr (weights / optimizer state, BF16):", ""]
  lines += ["| Method | " + " | ".join(m.name for m in models) + " |"]
  lines += ["|" + " --- |" * (len(models) + 1)]
  for method in methods:
    row = [LABELS[method]]
    for m in models:
      r = next(
        (x for x in results if x["run"]["model"] == m.name and x["run"]["method"] == method), None
      )
      row.append(
        f"{_fmt_bytes(r['weights_bytes'])} / {_fmt_bytes(r['optimizer_bytes'])}" if r else "-"
      )
    lines.append("| " + " | ".join(row) + " |")
  lines += ["", "## Learning-rate sweep (validation perplexity)", ""]
  for m in models:
    lines += [f"{m.name}:", "", "| Method | " + " | ".join(["lr -> ppl"]) + " |", "| --- | --- |"]
    for method in methods:
      cells = []
      for rs in runs:
        if rs.model != m or rs.method != method:
          continue
        r = by_name.get(rs.name)
        if r is None:
          cells.append(f"{rs.lr:g}: -")
          continue
        val = f"{r['eval_ppl']:.2f}" if r["eval_ppl"] is not None else r["status"]
        is_best = best.get(m.name, {}).get(method) is r
        cells.append(f"{rs.lr:g}: **{val}**" if is_best else f"{rs.lr:g}: {val}")
      lines.append(f"| {LABELS[method]} | " + ", ".join(cells) + " |")
    lines.append("")
  s = scale
  tokens = s.batch_size * s.grad_accum * s.seq_len
  lines += [
    "## Settings",
    "",
    f"- Data `{s.data}` ({'packed' if s.packing else 'truncated / padded'} sequences of "
    f"{s.seq_len}), tokenizer {s.tokenizer or 'bundled (8192 pieces)'}, seed {s.seed}; "
    f"validation: {s.eval_batches} batches of {s.eval_batch_size} x {s.seq_len} "
    f"({'evenly spread over' if s.spread_eval else 'the first batches of'} the held-out split).",
    f"- {', '.join(f'{m.name}: {st} steps' for m, st in zip(s.models, s.steps, strict=True))}"
    f" of {s.batch_size * s.grad_accum} x {s.seq_len} = {tokens} tokens "
    f"({', '.join(f'{st * tokens / 1e6:.2f}M' for st in s.steps)} tokens per run).",
    "- Peak lr 10% linear warm-up, cosine to 10%; Adam b1 0.9, b2 0.999, eps 1e-6 "
    "(added before bias correction, as the reference); no weight decay or clipping; "
    f"params {s.param_dtype}, compute {s.dtype}.",
    f"- GaLore: alpha 0.25, T = {s.update_proj_gap}, exact SVD, q/k/v/o/gate/up/down "
    "projected; factorised baselines at rank r on the same kernels, LoRA / ReLoRA alpha 32; "
    "ReLoRA merges and zeroes the factors' moments every steps/4 steps, lr re-warmed over 4% "
    "of a cycle.",
    "- Peak lrs tried: "
    + "; ".join(
      f"{m.name} {method} {', '.join(f'{x:g}' for x in tried_lrs(runs, m.name, method))}"
      for m in models
      for method in methods
    )
    + ".",
  ]
  if info:
    lines.append(
      f"- Wall time: {info['wall_s'] / 60:.1f} min this invocation "
      f"({info['runs_trained']} runs trained; sum of run times {info['sum_run_wall_s'] / 60:.1f} "
      f"min) on {info['machine']}."
    )
  if scale.name == "paper":
    lines += ["", "Paper Table 2 (perplexity (memory G)) for comparison:", ""]
    lines += ["| Method | 60M | 130M | 350M | 1B |", "| --- | --- | --- | --- | --- |"]
    for method, vals in PAPER_TABLE.items():
      lines.append(f"| {PAPER_ROW[method]} | " + " | ".join(f"{p} ({g}G)" for p, g in vals) + " |")
  return "\n".join(lines) + "\n"


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing moving average (the first points average what exists so far)."""
  c = np.cumsum(np.insert(values, 0, 0.0))
  idx = np.arange(1, len(values) + 1)
  lo = np.maximum(0, idx - window)
  return (c[idx] - c[lo]) / (idx - lo)


def plot(scale: Scale, runs: list[RunSpec], results: list[dict], path: Path) -> None:
  """Training loss against tokens, one panel per model, one line per method at its best lr."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  best = best_runs(results)
  models = [m for m in scale.models if m.name in best]
  if not models:
    return
  fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.4), squeeze=False)
  for ax, m in zip(axes[0], models, strict=True):
    lows, highs = [], []
    total = max(r["tokens"] for r in best[m.name].values())
    unit, unit_name = next(
      (u, n) for u, n in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if total >= 2 * u or u == 1
    )
    for method in METHODS:
      r = best[m.name].get(method)
      if r is None:
        continue
      steps = np.asarray(r["curve_steps"], float)
      loss = np.asarray(r["train_loss"], float)
      window = max(1, len(loss) // 20)
      smooth = _smooth(loss, window)
      tokens = steps * r["run"]["tokens_per_step"] / unit
      label = f"{LABELS[method]} @ {r['run']['lr']:g}: ppl {r['eval_ppl']:.1f}"
      ax.plot(tokens, smooth, color=COLORS[method], label=label, lw=1.6)
      lows.append(np.nanmin(smooth))
      highs.append(smooth[min(len(smooth) - 1, len(smooth) // 5)])
    if lows:
      # Show the part where methods separate: from the best loss to the losses at 20% of training.
      lo, hi = min(lows), max(highs)
      ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    r0 = next(iter(best[m.name].values()))
    ax.set_title(f"{m.name} ({r0['params'] / 1e6:.1f}M params)")
    ax.set_xlabel(f"training tokens ({unit_name})" if unit_name else "training tokens")
    ax.set_ylabel(f"training loss (moving average, {window} steps)")
    ax.grid(alpha=0.3)
    ax.legend(
      fontsize=7.5, title="method @ best lr: validation ppl", title_fontsize=7.5, loc="upper right"
    )
  fig.suptitle(f"GaLore Table 2 reproduction, --scale {scale.name} (same data, init, tokens)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(
  scale: Scale, runs: list[RunSpec], results: list[dict], report: Path, info: dict
) -> dict[str, Path]:
  report.mkdir(parents=True, exist_ok=True)
  paths = {
    "table": report / "table2.md",
    "plot": report / "curves.png",
    "json": report / "results.json",
  }
  paths["table"].write_text(markdown(scale, runs, results, info))
  plot(scale, runs, results, paths["plot"])
  best = best_runs(results)
  summary = {
    "scale": scale.name,
    "planned_runs": [rs.name for rs in runs],
    "finished_runs": len(results),
    "best": {m: {k: v["run"]["name"] for k, v in d.items()} for m, d in best.items()},
    "table": {
      m: {
        k: {
          "lr": v["run"]["lr"],
          "eval_ppl": v["eval_ppl"],
          "memory_bytes_bf16": v["weights_bytes"] + v["optimizer_bytes"],
        }
        for k, v in d.items()
      }
      for m, d in best.items()
    },
    "expectations": expectations(best),
    "info": info,
    "runs": results,
  }
  _write_json(paths["json"], summary)
  return paths


# ---------------------------------------------------------------------------
# Command line.


def _parse_lrs(specs: list[str]) -> dict[str, tuple[float, ...]]:
  out = {}
  for spec in specs:
    method, _, values = spec.partition("=")
    if method not in METHODS or not values:
      raise SystemExit(f"--lrs: expected METHOD=lr1,lr2 with METHOD in {METHODS}, got {spec!r}")
    out[method] = tuple(float(v) for v in values.split(","))
  return out


def build_scale(args) -> Scale:
  scale = SCALES[args.scale]()
  changes: dict[str, Any] = {}
  if args.models:
    names = args.models.split(",")
    known = {m.name: (m, st) for m, st in zip(scale.models, scale.steps, strict=True)}
    unknown = [n for n in names if n not in known]
    if unknown:
      raise SystemExit(f"--models: unknown {unknown}; this scale has {list(known)}")
    changes["models"] = tuple(known[n][0] for n in names)
    changes["steps"] = tuple(known[n][1] for n in names)
  if args.steps:
    changes["steps"] = (args.steps,) * len(changes.get("models", scale.models))
  for field in ("data", "tokenizer", "mesh", "seed", "save_every"):
    value = getattr(args, field)
    if value is not None:
      changes[field] = value
  if args.micro_batch:
    total = scale.batch_size * scale.grad_accum
    if total % args.micro_batch:
      raise SystemExit(f"--micro-batch {args.micro_batch} does not divide the batch {total}")
    changes.update(batch_size=args.micro_batch, grad_accum=total // args.micro_batch)
    changes.setdefault("eval_batch_size", args.micro_batch)
  if args.ranks:
    ranks = {}
    for spec in args.ranks:
      name, _, values = spec.partition("=")
      try:
        r, r2 = (int(v) for v in values.split(","))
      except ValueError:
        raise SystemExit(f"--ranks: expected MODEL=r,r_d2, got {spec!r}") from None
      ranks[name] = (r, r2)
    models = changes.get("models", scale.models)
    unknown = sorted(set(ranks) - {m.name for m in models})
    if unknown:
      raise SystemExit(f"--ranks: unknown models {unknown}")
    changes["models"] = tuple(
      dataclasses.replace(m, rank=ranks[m.name][0], rank_d2=ranks[m.name][1])
      if m.name in ranks
      else m
      for m in models
    )
  if args.lrs:
    grids = dict(scale.lr_grids)
    grids.update(_parse_lrs(args.lrs))
    changes["lr_grids"] = tuple(grids.items())
  scale = dataclasses.replace(scale, **changes)
  if scale.name == "paper" and scale.tokenizer is None:
    raise SystemExit(
      "--scale paper needs --tokenizer: the paper's T5 SentencePiece model (32000 pieces)"
    )
  return scale


def _info(t0: float, trained: int, results: list[dict]) -> dict[str, Any]:
  cpu = os.times()
  return {
    "wall_s": time.perf_counter() - t0,
    # CPU seconds of this process: on a shared machine, cpu_s / cores estimates the wall time
    # the same work takes on a dedicated one (XLA keeps both cores busy in the big matmuls).
    "cpu_s": cpu.user + cpu.system,
    "runs_trained": trained,
    "sum_run_wall_s": sum(r["wall_s"] for r in results),
    "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, jax {jax.__version__} "
    f"({jax.default_backend()}: {jax.devices()[0].device_kind})",
  }


def _ordered(scale: Scale, runs: list[RunSpec]) -> list[RunSpec]:
  """Plan order: by model, then method, then lr from high to low (extensions join their group)."""
  return sorted(
    runs, key=lambda rs: (scale.models.index(rs.model), METHODS.index(rs.method), -rs.lr)
  )


def discover(scale: Scale, runs: list[RunSpec], out: Path) -> list[RunSpec]:
  """Finished runs in ``out`` of the planned models and methods at lrs outside the plan (earlier
  ``--extend-edges`` or ``--lrs``) whose configuration matches this scale's."""
  planned = {rs.name for rs in runs}
  vocab = data.load_tokenizer(scale.tokenizer).get_piece_size()
  extra = []
  for model in {rs.model for rs in runs}:
    for method in {rs.method for rs in runs if rs.model == model}:
      for path in sorted((out / model.name).glob(f"{method}_lr*/result.json")):
        r = load_result(path.parent)
        if r is None or r["run"].get("method") != method:
          continue
        rs = RunSpec(scale, model, method, float(r["run"]["lr"]))
        if rs.name not in planned and r["run"] == rs.describe(vocab):
          extra.append(rs)
  return extra


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--scale", choices=tuple(SCALES), default="cpu")
  ap.add_argument("--out", default=None, help="run directories (default runs/table2_<scale>)")
  ap.add_argument("--report", default=None, help="table / PNG / JSON directory (default --out)")
  ap.add_argument("--models", default=None, help="comma-separated subset of the scale's models")
  ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
  ap.add_argument("--lrs", action="append", default=[], help="METHOD=lr1,lr2 (replaces a grid)")
  ap.add_argument(
    "--ranks",
    action="append",
    default=[],
    help="MODEL=r,r_d2: the main rank and the 'd/2' rank of a model (diagnostics)",
  )
  ap.add_argument(
    "--extend-edges",
    type=int,
    default=0,
    help="rounds of adding one lr past a best lr at the edge of the lrs tried (default 0)",
  )
  ap.add_argument("--steps", type=int, default=None, help="override the steps of every model")
  ap.add_argument("--data", default=None, help="builtin | PATH | tfds:NAME")
  ap.add_argument("--tokenizer", default=None, help="SentencePiece model")
  ap.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch")
  ap.add_argument("--mesh", default=None, help="data=N,fsdp=M (as galore-jax train)")
  ap.add_argument("--seed", type=int, default=None)
  ap.add_argument("--save-every", type=int, default=None, help="mid-run checkpoints (0: none)")
  ap.add_argument("--report-only", action="store_true", help="report the finished runs, train none")
  ap.add_argument("--quiet", action="store_true")
  args = ap.parse_args(argv)

  methods = args.methods.split(",")
  bad = [m for m in methods if m not in METHODS]
  if bad:
    raise SystemExit(f"--methods: unknown {bad}; choose from {METHODS}")
  scale = build_scale(args)
  out = Path(args.out or f"runs/table2_{scale.name}")
  report = Path(args.report) if args.report else out
  t0 = time.perf_counter()
  plan = {"runs": plan_runs(scale, list(scale.models), methods)}
  before: set[str] = set()
  trained = lambda res: sum(r["run"]["name"] not in before for r in res)
  # The report is rewritten after each model, so a long sweep shows its results as it goes.
  partial = lambda res: write_report(scale, plan["runs"], res, report, _info(t0, trained(res), res))
  try:
    plan["runs"] = _ordered(scale, plan["runs"] + discover(scale, plan["runs"], out))
    before.update(rs.name for rs in plan["runs"] if load_result(run_dir_for(out, rs)))
    if args.report_only:
      results = collect(plan["runs"], out)
    else:
      results = sweep(scale, plan["runs"], out, quiet=args.quiet, on_model_done=partial)
      for _ in range(args.extend_edges):
        names = {rs.name for rs in plan["runs"]}
        extra = [rs for rs in edge_extensions(plan["runs"], results) if rs.name not in names]
        if not extra:
          break
        if not args.quiet:
          print(f"best lr at a grid edge: adding {', '.join(rs.name for rs in extra)}")
        plan["runs"] = _ordered(scale, plan["runs"] + extra)
        results = sweep(scale, plan["runs"], out, quiet=args.quiet, on_model_done=partial)
  except KeyboardInterrupt:
    done = len(collect(plan["runs"], out))
    print(
      f"\ninterrupted: {done}/{len(plan['runs'])} runs finished and kept in {out}; "
      "rerun the same command to continue",
      file=sys.stderr,
    )
    return 130
  except (ConfigMismatch, SetupError) as e:
    print(f"reproduce_table2: error: {e}", file=sys.stderr)
    return 2
  paths = partial(results)
  if not args.quiet:
    print(paths["table"].read_text())
    print(f"table: {paths['table']}\nplot: {paths['plot']}\nresults: {paths['json']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
