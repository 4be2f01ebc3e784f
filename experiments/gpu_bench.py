"""End-to-end training-step benchmark on one GPU: galore_jax vs the galore-torch reference.

For each model (``--models``, default llama_60m, llama_350m, llama_1b) at sequence
length 256 and one batch size (``--batch-size``, default 16 sequences), pure bf16
(parameters, optimizer state and compute in bf16 on both sides):

* **galore_jax**: the trainer's own jit-compiled step (``galore_jax.train.setup`` /
  ``init_state`` / ``compile_train_step``) with ``adamw``, ``galore_adamw`` and
  ``galore_adamw8bit``; GaLore rank 128 / 256 / 512 for 60m / 350m / 1b, ``T = 200``,
  scale 0.25, exact SVD, synchronous refresh (the trainer's defaults but for T).
* **reference**: ``galore_torch.GaLoreAdamW`` (galore-torch 1.0, ``adamw.py`` loaded
  without its package ``__init__``, which needs bitsandbytes) driving Hugging Face
  ``LlamaForCausalLM`` with the same shape (vocab 32000, RMS eps 1e-6, untied head, no
  biases), the GaLore group being the q, k, v, o, gate, up and down weights, same rank,
  T and scale, lr 0.01: the setup of the paper's ``torchrun_main.py``.

Both sides train on random tokens (no data files); every step is timed with a device
synchronisation (``jax.block_until_ready`` / ``torch.cuda.synchronize``). Per case:

* ``step_s``: median of the per-step times after warm-up, at step counts where no
  projector refreshes; ``tokens_per_s = batch * seq_len / step_s``. ``loop_step_s`` is
  the mean of a further run of steps synchronised only at its end (dispatch overlapped).
* ``refresh_s``: a step on which every projector refreshes (SVD of every projected
  gradient). In JAX the GaLore ``count`` is written into the optimizer state before a
  step (``count = k T``); in torch every parameter's ``state["step"]`` is set to ``k T``.
  Both start from step 1 with a valid basis (JAX: the optimizer's initial basis; torch:
  projectors set before the first step, which the reference would otherwise create with
  an SVD each), so the plain steps are timed first. Before the refresh step, one SVD
  (exact or randomized, as configured) per distinct weight shape is timed
  (``svd_probe``); ``refresh_predicted_s = step_s + sum over weights``. A refresh step
  predicted to run past the case's time is skipped (``refresh_skipped``) and, in the
  refresh-cost table, replaced by the prediction (``estimated``). ``galore_adamw8bit``
  does the same SVDs as ``galore_adamw``: its refresh is timed only in the smoke run.
* ``peak_bytes``: peak device memory of the whole run, each case in its own subprocess
  (JAX: ``memory_stats()['peak_bytes_in_use']``, which includes initialisation; torch:
  ``torch.cuda.max_memory_allocated()`` after the bf16 model is built; XLA's GEMM
  autotuning scratch, if any, counts on the JAX side). ``peak_bytes_steady`` leaves the
  refresh steps out. On CPU these are null.
* Learning rate: peak 0.01 on both sides; JAX uses the trainer's schedule (linear
  warm-up over 1000 steps, so the few timed steps stay finite: a non-finite step is
  skipped and would look fast; ``skipped_steps`` is reported), torch the constant lr
  ``GaLoreAdamW`` is given. The work per step does not depend on it.
* ``mfu = 6 * params * tokens_per_s / peak_flops``, ``params`` being every parameter
  (embeddings and LM head included; attention's ``L^2`` term left out), ``peak_flops``
  the median rate of an ``8192^3`` bf16 matmul measured on the same card in JAX.

Ratios per model: galore_jax ``galore_adamw`` tokens/s over the reference's, and its
peak memory over the reference's.

``--refresh-cost`` adds, for ``--refresh-models`` (default llama_1b), the cost of the
projector refresh amortised over ``T``, as a share of training time, for exact and
randomized SVD, synchronous and staggered:

* synchronous: ``share = (refresh_s - step_s) / T / step_s``; the exact-SVD numbers are
  the bench's ``galore_adamw`` case of the same model, the others are measured here.
* staggered (leaf ``k`` of ``L`` refreshes at phase ``floor(k T / L)``): a period does
  the same SVD work as a synchronous one, spread so that a step refreshes about
  ``L / T`` leaves (at most one when ``L <= T``). The phases are read from the
  optimizer's own plan; phases whose refreshing leaves have the same shapes cost the
  same, so one step per distinct set of shapes is timed (``count = kT + phase``, 3
  times, each after a plain step at a free phase: the excess ``t(phase) - step_s`` is
  the median of the paired differences) and the amortised share is
  ``sum over phases of excess(phase) / T / step_s``. The
  slowest of them gives ``worst_step_share = (max t - step_s) / step_s``, the spike a
  synchronous schedule would put on one step. ``--stagger-period`` also times every
  step of one period, as a check of the estimate (``T`` steps: slow at 1b).
  The target: amortised share <= 2% at llama_1b with randomized SVD + staggered.

``--cpu-smoke`` runs the same harness on CPU at toy size (llama_tiny's layout with 1
layer, width 32, vocab 512; batch 2, seq 32, rank 8, T 16, float32, 2 timed steps, torch
on one thread, ``--stagger-period`` on) so CI tests its logic.

The JSON (``--json``, default ``$OUT/gpu_bench.json`` when ``$OUT`` is set) holds every
case's numbers; a table is printed last. Each case runs in a fresh subprocess of this
script (``--worker``), with a per-case timeout; ``--time-budget`` bounds the whole run
(cases not started in time are recorded as skipped, in priority order: GaLore vs
reference and the refresh cost for the first of ``--models``, then GaLore vs
reference for the others, then adamw and galore_adamw8bit).

galore-torch on the GPU image: it is not installed there and nothing can be fetched,
so carry its wheel. Here: ``pip download galore-torch==1.0 --no-deps -d runs/wheels/``
(``runs/`` is git-ignored; carry ``runs/wheels``); there, either pass
``--galore-torch runs/wheels/galore_torch-1.0-py3-none-any.whl`` (a wheel is imported
in place, no install needed), or a directory holding ``galore_torch/adamw.py``
(an unpacked wheel or source checkout), or ``pip install --no-deps <wheel>`` first.
Without ``--galore-torch`` the script uses an installed galore_torch, else the first
``wheels/galore_torch-*.whl`` or ``runs/wheels/galore_torch-*.whl`` of the repository.

The data pipeline (``galore_jax.data``) needs grain and sentencepiece at import time;
the GPU image has no grain. The workers read no data: if importing ``galore_jax.train``
fails on one of those modules, they register an empty stand-in ``galore_jax.data`` and
import it again (``data_module_stubbed`` in the JSON says which module was missing).

Usage:
  python experiments/gpu_bench.py --refresh-cost                       # the GPU run
  python experiments/gpu_bench.py --models llama_60m --batch-size 8
  python experiments/gpu_bench.py --cpu-smoke --json /tmp/gpu_bench.json
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the GPU image has galore_jax only as this checkout
  sys.path.insert(0, str(REPO))

MODELS = ("llama_60m", "llama_350m", "llama_1b")
JAX_OPTIMIZERS = ("adamw", "galore_adamw", "galore_adamw8bit")
RANKS = {
  "llama_tiny": 64,
  "llama_60m": 128,
  "llama_130m": 256,
  "llama_350m": 256,
  "llama_1b": 512,
  "llama_7b": 1024,
}
GALORE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Subspace first: issue #11's targets; the exact variant is the bench's own GaLore case.
REFRESH_VARIANTS = (
  "subspace:synchronous",
  "subspace:staggered",
  "exact:synchronous",
  "randomized:staggered",
)
SUBSPACE_REFRESH_MAX = 1.25
TARGET_SHARE = 0.02
SMOKE_MODEL = "bench_smoke"
# A toy model for --cpu-smoke: llama_tiny's layout at a size that compiles in seconds.
SMOKE_OVERRIDES = {
  "hidden_size": 32,
  "intermediate_size": 64,
  "num_heads": 2,
  "num_layers": 1,
  "max_seq_len": 64,
}
GIB = 2.0**30


# ---------------------------------------------------------------------------
# Small helpers shared by the parent and the workers.


def _median(xs):
  xs = [x for x in xs if x is not None]
  return statistics.median(xs) if xs else None


def _ratio(a, b):
  return a / b if a is not None and b not in (None, 0) else None


def _write_json(path: str | os.PathLike, obj: Any) -> None:
  """Atomic write, so that a killed worker leaves its last complete record."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
  os.replace(tmp, path)


def quiet_counts(offsets: list[int], period: int, start: int = 1):
  """Yields GaLore counts >= ``start`` on which no leaf refreshes (none if every phase is used).

  A leaf with phase ``o`` refreshes at count 0 and at ``o, o + T, ...``
  (``galore_jax.optimizer.galore``); synchronous refresh is every phase 0.
  """
  used = {o % period for o in offsets}
  if len(used) >= period:
    return
  c = max(start, 1)
  while True:
    if c % period not in used:
      yield c
    c += 1


def stagger_groups(leaves: list[dict], period: int) -> list[dict]:
  """Groups a staggered schedule's phases by the shapes of the leaves refreshing at them.

  ``leaves``: one ``{"offset", "m", "n", "side", "rank"}`` per projected leaf. Returns
  one group per distinct multiset of shapes: ``{"signature", "phases", "phase"}`` where
  ``phase`` is the representative to time and ``phases`` how many phases of the period
  share the signature. Phases where no leaf refreshes are left out (they cost nothing).
  """
  by_phase: dict[int, list] = {}
  for leaf in leaves:
    key = (leaf["m"], leaf["n"], leaf["side"], leaf["rank"])
    by_phase.setdefault(leaf["offset"] % period, []).append(key)
  groups: dict[tuple, dict] = {}
  for phase in sorted(by_phase):
    sig = tuple(sorted(by_phase[phase]))
    g = groups.setdefault(sig, {"signature": [list(s) for s in sig], "phases": 0, "phase": phase})
    g["phases"] += 1
  return list(groups.values())


def amortised_share(step_s, excess_s_per_period, period):
  """Refresh cost per step, as a share of a plain step: ``excess / T / step_s``."""
  if step_s in (None, 0) or excess_s_per_period is None:
    return None
  return excess_s_per_period / period / step_s


# ---------------------------------------------------------------------------
# Workers (each runs in its own process: peak device memory per case).


def _import_trainer():
  """``galore_jax.train``, with a stand-in ``galore_jax.data`` if its imports are missing.

  Returns ``(train, model_lib, galore, stubbed)``. The data pipeline needs grain and
  sentencepiece, which the GPU image may lack (it has no grain); the workers read no
  data. The trainer imports ``galore_jax.data`` lazily now; a version that imports it
  at module level gets an empty stand-in module instead of failing.
  """
  try:
    from galore_jax import train

    stubbed = False
  except ModuleNotFoundError as e:
    if e.name not in ("grain", "sentencepiece", "tensorflow_datasets"):
      raise
    for mod in ("galore_jax.train", "galore_jax.data"):
      sys.modules.pop(mod, None)
    stub = types.ModuleType("galore_jax.data")
    stub.__doc__ = f"gpu_bench stand-in: the benchmark reads no data ({e.name} is missing)"
    sys.modules["galore_jax.data"] = stub
    import galore_jax

    galore_jax.data = stub
    from galore_jax import train

    stubbed = e.name
  from galore_jax import model as model_lib
  from galore_jax import optimizer as galore

  return train, model_lib, galore, stubbed


def _jax_memory():
  import jax

  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - some backends raise instead of returning None
    stats = None
  if not stats:
    return None
  return {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def _register_model(spec, model_lib):
  if spec.get("model_overrides"):
    model_lib.CONFIGS[spec["model"]] = model_lib.get_config(
      spec.get("base_model", "llama_tiny"), **spec["model_overrides"]
    )


def _train_config(spec, train, **kw):
  fields = dict(
    model=spec["model"],
    optimizer=spec.get("optimizer", "galore_adamw"),
    rank=spec["rank"],
    update_proj_gap=spec["update_proj_gap"],
    galore_scale=spec["galore_scale"],
    lr=spec["lr"],
    # A long run's schedule: lr ramps up from 0 over 1000 steps, so the few steps
    # timed here stay far from divergence (a non-finite step is skipped, which would
    # make it look fast). The work per step does not depend on the lr.
    steps=1_000_000,
    warmup=1000,
    batch_size=spec["batch_size"],
    seq_len=spec["seq_len"],
    param_dtype=spec["dtype"],
    dtype=spec["dtype"],
    progress=False,
    seed=0,
  )
  fields.update(kw)
  cfg = train.TrainConfig(**fields)
  train.validate(cfg)
  return cfg


class _JaxCase:
  """One compiled trainer step with its state, stepped at chosen GaLore counts."""

  def __init__(self, spec, cfg, train, model_lib, galore, progress=None):
    """``progress(**numbers)`` is called after init and after compilation, so a case
    killed by its timeout still reports how far it got (GPU compiles take minutes)."""
    import jax
    import numpy as np

    progress = progress or (lambda **kw: None)

    self.jax, self.galore, self.cfg = jax, galore, cfg
    self.run = train.setup(cfg, spec["vocab_size"])
    self.n_params = model_lib.param_count(self.run.model_cfg)
    t = time.perf_counter()
    self.params, self.opt_state = train.init_state(self.run)
    jax.block_until_ready((self.params, self.opt_state))
    self.init_s = time.perf_counter() - t
    from galore_jax.tree import tree_bytes

    self.state_bytes = {
      "params": tree_bytes(self.params),
      "opt_state": tree_bytes(self.opt_state),
    }
    progress(init_s=self.init_s, state_bytes=self.state_bytes)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, spec["vocab_size"], (cfg.batch_size, cfg.seq_len + 1), dtype=np.int32)
    host = {
      "inputs": toks[:, :-1],
      "targets": toks[:, 1:],
      "mask": np.ones((cfg.batch_size, cfg.seq_len), np.float32),
    }
    self.batch = train.device_batch(self.run, host, 1)
    step = train.compile_train_step(self.run)
    t = time.perf_counter()
    lowered = step.lower(self.params, self.opt_state, self.batch)
    lower_s = time.perf_counter() - t
    self.step = lowered.compile()
    self.compile_s = time.perf_counter() - t
    progress(lower_s=lower_s, compile_s=self.compile_s)
    self.skipped = 0
    self.losses: list[float] = []

  def set_count(self, value: int) -> None:
    self.opt_state = self.galore.with_galore_count(self.opt_state, value)

  def timed_step(self, count: int | None = None) -> float:
    """One step (at GaLore ``count`` if given), synchronised; returns seconds."""
    if count is not None and self.cfg.is_galore:
      self.set_count(count)
      self.jax.block_until_ready(self.opt_state)
    t = time.perf_counter()
    self.params, self.opt_state, m = self.step(self.params, self.opt_state, self.batch)
    self.jax.block_until_ready((self.params, self.opt_state, m))
    dt = time.perf_counter() - t
    self._record(m)
    return dt

  def loop(self, n: int, start_count: int | None) -> float:
    """``n`` consecutive steps synchronised only at the end; mean seconds per step."""
    if start_count is not None and self.cfg.is_galore:
      self.set_count(start_count)
      self.jax.block_until_ready(self.opt_state)
    ms = []
    t = time.perf_counter()
    for _ in range(n):
      self.params, self.opt_state, m = self.step(self.params, self.opt_state, self.batch)
      ms.append(m)
    self.jax.block_until_ready((self.params, self.opt_state, ms))
    dt = (time.perf_counter() - t) / max(n, 1)
    for m in ms:
      self._record(m)
    return dt

  def _record(self, m) -> None:
    m = self.jax.device_get(m)
    self.skipped += int(m["skipped"])
    self.losses.append(float(m["loss"]))

  def plans(self, train, schedule: str):
    """The optimizer's per-leaf plan (shapes, refresh phases) for ``schedule``."""
    params = self.run.abstract_params
    plans = self.galore.leaf_layouts(
      params,
      train.galore_mask(params),
      rank=self.cfg.rank,
      proj_type="std",
      matrix_axes=train.torch_side_axes,
      update_proj_gap=self.cfg.update_proj_gap,
      refresh_schedule=schedule,
    )
    return [
      {"offset": p.offset, "m": p.m, "n": p.n, "side": p.side, "rank": p.rank, "path": p.path}
      for p in plans
      if p is not None
    ]


def _time_normal(
  case: _JaxCase, counts, warmup: int, steps: int, loop_steps: int, period: int, loop_ok: bool
):
  for _ in range(warmup):
    case.timed_step(next(counts))
  times = [case.timed_step(next(counts)) for _ in range(steps)]
  loop_s = None
  if loop_steps and loop_ok:
    # consecutive counts: start after the last multiple of T so none falls inside.
    start = next(counts)
    while any((start + i) % period == 0 for i in range(loop_steps)):
      start = next(counts)
    loop_s = case.loop(loop_steps, start)
  return times, loop_s


def _jax_svd_probe(leaves: list[dict], svd: str, dtype, seed: int = 0) -> dict:
  """Seconds of one projector computation per distinct leaf shape, and their sum over leaves.

  A refresh step cannot be interrupted once dispatched, and an exact SVD of a large
  matrix can take long on a GPU; the probe predicts the step's cost so that a refresh
  that would not finish in the time left is skipped (and predicted) instead.
  """
  import jax
  import jax.numpy as jnp

  from galore_jax import projector as proj

  per_shape: dict[tuple, float] = {}
  for leaf in leaves:
    key = (leaf["m"], leaf["n"], leaf["side"], leaf["rank"])
    if key in per_shape:
      continue
    m, n, side, rank = key
    g = jax.random.normal(jax.random.key(seed), (m, n), jnp.float32).astype(dtype)
    if svd == "exact":
      f = jax.jit(lambda g, side=side, rank=rank: proj.exact_basis(g, side, rank))
    elif svd == "subspace":  # one warm-started power step from a valid basis
      start = proj.safe_basis((), side, m, n, rank, dtype)
      f = jax.jit(lambda g, side=side, start=start: proj.subspace_basis(g, side, start))
    else:
      f = jax.jit(
        lambda g, side=side, rank=rank: proj.randomized_basis(g, side, rank, jax.random.key(1))
      )
    jax.block_until_ready(f(g))  # compiles
    t = time.perf_counter()
    jax.block_until_ready(f(g))
    per_shape[key] = time.perf_counter() - t
  total = sum(per_shape[(x["m"], x["n"], x["side"], x["rank"])] for x in leaves)
  return {
    "per_shape_s": {"x".join(map(str, k)): v for k, v in per_shape.items()},
    "sum_over_leaves_s": total,
  }


def _safe_probe(leaves_fn, svd: str, dtype) -> dict:
  """``_jax_svd_probe``, or ``{"error": ...}``: a failed probe leaves the refresh unguarded."""
  try:
    return _jax_svd_probe(leaves_fn(), svd, dtype)
  except Exception as e:  # noqa: BLE001 - e.g. the optimizer's private plan API changed
    return {"error": f"{type(e).__name__}: {e}", "sum_over_leaves_s": None}


def _refresh_reps(
  step_once, reps: int, kill_at: float, predicted_s: float | None, res: dict, save
) -> list[float]:
  """Times ``step_once(k)`` for k = 1..reps while each is predicted to end before ``kill_at``."""
  times: list[float] = []
  for k in range(1, reps + 1):
    guess = times[-1] if times else predicted_s
    if guess is not None and time.time() + 1.5 * guess + 10 > kill_at:
      if not times:
        res["refresh_skipped"] = (
          f"predicted {guess:.1f} s, {kill_at - time.time():.0f} s left in this case's time"
        )
      break
    times.append(step_once(k))
    res.update(refresh_times_s=times, refresh_s=_median(times))
    save()
  return times


def _jax_env() -> dict:
  """What every JAX worker records about the software and device it measured on."""
  import jax

  return {
    "jax_version": jax.__version__,
    "backend": jax.default_backend(),
    "device": jax.devices()[0].device_kind,
  }


def _progress(res: dict, save):
  """A ``_JaxCase`` progress callback: record the numbers and write the result file."""

  def report(**numbers):
    res.update(numbers)
    save()

  return report


def worker_jax(spec, res, save):

  train, model_lib, galore, stubbed = _import_trainer()
  res.update(
    **_jax_env(),
    data_module_stubbed=stubbed,
  )
  _register_model(spec, model_lib)
  cfg = _train_config(spec, train, optimizer=spec["optimizer"])
  case = _JaxCase(spec, cfg, train, model_lib, galore, progress=_progress(res, save))
  res.update(
    n_params=case.n_params,
    init_s=case.init_s,
    compile_s=case.compile_s,
    state_bytes=case.state_bytes,
    memory_after_init=_jax_memory(),
  )
  save()
  T = cfg.update_proj_gap
  counts = quiet_counts([0], T, start=1)
  times, loop_s = _time_normal(
    case, counts, spec["warmup"], spec["steps"], spec["loop_steps"], T, loop_ok=True
  )
  mem = _jax_memory()
  res.update(
    step_times_s=times,
    step_s=_median(times),
    loop_step_s=loop_s,
    peak_bytes_steady=mem and mem["peak_bytes_in_use"],
  )
  save()
  if cfg.is_galore and spec["refresh_reps"] > 0:
    probe = _safe_probe(
      lambda: case.plans(train, "synchronous"), cfg.svd, case.run.model_cfg.param_dtype
    )
    res["svd_probe"] = probe
    res["refresh_predicted_s"] = (
      None if probe["sum_over_leaves_s"] is None else res["step_s"] + probe["sum_over_leaves_s"]
    )
    save()
    _refresh_reps(
      lambda k: case.timed_step(k * T),
      spec["refresh_reps"],
      spec["kill_at"],
      res["refresh_predicted_s"],
      res,
      save,
    )
  mem = _jax_memory()
  res.update(
    peak_bytes=mem and mem["peak_bytes_in_use"],
    memory_end=mem,
    skipped_steps=case.skipped,
    loss_first=case.losses[0],
    loss_last=case.losses[-1],
  )


def worker_refresh(spec, res, save):
  """Refresh cost of several (svd, schedule) variants of the GaLore step, one model."""

  train, model_lib, galore, stubbed = _import_trainer()
  res.update(
    **_jax_env(),
    data_module_stubbed=stubbed,
    variants={},
  )
  _register_model(spec, model_lib)
  sync_step: dict[str, float] = {}
  for variant in spec["variants"]:
    svd, schedule = variant.split(":")
    out: dict[str, Any] = {"svd": svd, "schedule": schedule}
    res["variants"][variant] = out
    if time.time() + 20 > spec["kill_at"]:
      out["status"] = "skipped (time budget)"
      save()
      continue
    try:
      cfg = _train_config(spec, train, optimizer="galore_adamw", svd=svd, refresh_schedule=schedule)
      case = _JaxCase(spec, cfg, train, model_lib, galore, progress=_progress(out, save))
      T = cfg.update_proj_gap
      out.update(compile_s=case.compile_s, n_params=case.n_params)
      leaves = case.plans(train, schedule)
      offsets = [leaf["offset"] for leaf in leaves]
      counts = quiet_counts(offsets, T, start=T + 1)
      try:
        first = next(counts)
      except StopIteration:
        first = None
      if first is not None:
        counts = quiet_counts(offsets, T, start=first)
        times, _ = _time_normal(case, counts, spec["warmup"], spec["steps"], 0, T, False)
        out["step_s"] = _median(times)
        out["step_s_source"] = "measured at counts where no leaf refreshes"
      else:
        for _ in range(spec["warmup"]):
          case.timed_step(T)  # compiles nothing new; warms the refresh path
        out["step_s"] = sync_step.get(svd)
        out["step_s_source"] = (
          f"every count refreshes a leaf (L={len(leaves)} >= T={T}): "
          f"the {svd}:synchronous variant's plain step"
        )
      if schedule == "synchronous":
        sync_step[svd] = out["step_s"]
        probe = _safe_probe(lambda v=leaves: v, svd, case.run.model_cfg.param_dtype)
        out["svd_probe"] = probe
        out["refresh_predicted_s"] = (
          None
          if probe["sum_over_leaves_s"] is None
          else (out["step_s"] or 0.0) + probe["sum_over_leaves_s"]
        )
        refresh = _refresh_reps(
          lambda k, c=case, t=T: c.timed_step(k * t),
          spec["refresh_reps"],
          spec["kill_at"],
          out["refresh_predicted_s"],
          out,
          save,
        )
        out["refresh_s"] = _median(refresh)
        worst = out["refresh_s"]
        if worst is None:  # skipped: too slow for the time left; use the probe's prediction
          worst, out["estimated"] = out["refresh_predicted_s"], True
        excess = None if worst is None or out["step_s"] is None else worst - out["step_s"]
        out["excess_per_period_s"] = excess
        out["amortised_share"] = amortised_share(out["step_s"], excess, T)
        out["worst_step_s"] = worst
        out["worst_step_share"] = _ratio(excess, out["step_s"])
      else:
        groups = stagger_groups(leaves, T)
        excess_total = 0.0
        # Each timed refresh step is paired with a plain step just before it (when the
        # schedule leaves a phase free): the excess is the median paired difference,
        # which cancels drift in the machine's speed between the two measurements.
        quiet = quiet_counts(offsets, T, start=T + 1) if first is not None else None
        for g in groups:
          reps, plain = [], []
          for k in range(1, max(3, spec["refresh_reps"]) + 1):
            if quiet is not None:
              c = next(quiet)
              plain.append(case.timed_step(c))
            reps.append(case.timed_step(k * T + g["phase"]))
          g["step_times_s"] = reps
          g["step_s"] = _median(reps)
          if plain:
            g["plain_times_s"] = plain
            g["excess_s"] = _median([a - b for a, b in zip(reps, plain, strict=True)])
          else:
            g["excess_s"] = None if out["step_s"] is None else g["step_s"] - out["step_s"]
          if g["excess_s"] is not None:
            excess_total += g["phases"] * g["excess_s"]
          save()
        out["groups"] = groups
        out["leaves"] = len(leaves)
        out["phases_with_refresh"] = sum(g["phases"] for g in groups)
        worst = max((g["step_s"] for g in groups), default=None)
        out["worst_step_s"] = worst
        out["worst_step_share"] = (
          None if worst is None or not out["step_s"] else (worst - out["step_s"]) / out["step_s"]
        )
        out["excess_per_period_s"] = excess_total if out["step_s"] is not None else None
        out["amortised_share"] = amortised_share(out["step_s"], out["excess_per_period_s"], T)
        probe = _safe_probe(lambda v=leaves: v, svd, case.run.model_cfg.param_dtype)
        out["svd_probe"] = probe
        out["probe_amortised_share"] = amortised_share(out["step_s"], probe["sum_over_leaves_s"], T)
        if spec.get("stagger_period"):
          per = [case.timed_step(T + c) for c in range(T)]
          out["period"] = {
            "step_times_s": per,
            "max_s": max(per),
            "total_s": sum(per),
            "amortised_share": amortised_share(
              out["step_s"], None if out["step_s"] is None else sum(per) - T * out["step_s"], T
            ),
          }
      out.update(skipped_steps=case.skipped, status="ok")
      case = None  # frees this variant's device buffers before the next compiles
    except Exception as e:  # noqa: BLE001 - recorded, next variant still runs
      out.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    save()


def worker_peak(spec, res, save):
  import jax
  import jax.numpy as jnp

  n, dtype = spec["n"], jnp.dtype(spec["dtype"])
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: a @ b)
  for _ in range(3):
    f(a, b).block_until_ready()
  times = []
  for _ in range(spec["reps"]):
    t = time.perf_counter()
    for _ in range(spec["inner"]):
      out = f(a, b)
    out.block_until_ready()
    times.append((time.perf_counter() - t) / spec["inner"])
  res.update(
    **_jax_env(),
    n=n,
    dtype=str(dtype),
    times_s=times,
    peak_flops=2.0 * n**3 / statistics.median(times),
  )


def load_galore_torch(path: str | None):
  """``(AdamW, GaLoreProjector, location)`` of galore_torch, without its ``__init__``.

  The package ``__init__`` imports the 8-bit optimizer, which needs bitsandbytes.

  ``path``: a ``.whl`` (imported in place), or a directory holding ``galore_torch/``,
  or the ``galore_torch`` directory itself; None: an installed galore_torch.
  """
  if path:
    p = os.path.abspath(path)
    if os.path.isdir(p) and os.path.basename(p.rstrip("/")) == "galore_torch":
      p = os.path.dirname(p.rstrip("/"))
    if not (p.endswith(".whl") or os.path.isdir(os.path.join(p, "galore_torch"))):
      raise FileNotFoundError(
        f"--galore-torch {path}: expected a galore_torch wheel or a "
        "directory containing galore_torch/adamw.py"
      )
    sys.path.insert(0, p)
  spec = importlib.util.find_spec("galore_torch")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
      "galore_torch not found: `pip download galore-torch==1.0 --no-deps -d runs/wheels/` "
      "and pass --galore-torch runs/wheels/galore_torch-1.0-py3-none-any.whl"
    )
  if "galore_torch" not in sys.modules:
    pkg = types.ModuleType("galore_torch")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["galore_torch"] = pkg
  adamw = importlib.import_module("galore_torch.adamw")
  projector = importlib.import_module("galore_torch.galore_projector")
  return adamw.AdamW, projector.GaLoreProjector, list(spec.submodule_search_locations)[0]


def _hf_config(transformers, spec):
  import inspect

  mc = spec["model_shape"]
  kwargs = dict(
    vocab_size=spec["vocab_size"],
    hidden_size=mc["hidden_size"],
    intermediate_size=mc["intermediate_size"],
    num_hidden_layers=mc["num_layers"],
    num_attention_heads=mc["num_heads"],
    num_key_value_heads=mc["num_heads"],
    max_position_embeddings=mc["max_seq_len"],
    rms_norm_eps=mc["rms_eps"],
    hidden_act="silu",
    initializer_range=0.02,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    use_cache=False,
  )
  params = inspect.signature(transformers.LlamaConfig.__init__).parameters
  if "rope_parameters" in params:  # transformers 5.x
    kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": mc["rope_base"]}
  else:
    kwargs["rope_theta"] = mc["rope_base"]
  return transformers.LlamaConfig(**kwargs)


def worker_torch(spec, res, save):
  try:
    import torch
    import transformers
  except ImportError as e:
    res.update(status="unavailable", error=f"{type(e).__name__}: {e}")
    return
  adamw_cls, projector_cls, origin = load_galore_torch(spec.get("galore_torch"))
  import torch.nn.functional as F

  cuda = torch.cuda.is_available() and spec["device"] != "cpu"
  dev = torch.device("cuda" if cuda else "cpu")
  dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]
  if spec.get("torch_threads"):
    torch.set_num_threads(spec["torch_threads"])
  torch.manual_seed(0)
  res.update(
    torch_threads=torch.get_num_threads(),
    torch_version=torch.__version__,
    transformers_version=transformers.__version__,
    galore_torch=origin,
    backend=dev.type,
    device=torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
  )
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  config = _hf_config(transformers, spec)
  t = time.perf_counter()
  with dev:
    model = transformers.LlamaForCausalLM(config)
  model.to(dtype)
  model.train()
  sync()
  res["init_s"] = time.perf_counter() - t
  res["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
  res["n_params"] = sum(p.numel() for p in model.parameters())
  galore_params = [
    m.weight
    for name, m in model.named_modules()
    if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in GALORE_TARGETS
  ]
  ids = {id(p) for p in galore_params}
  regular = [p for p in model.parameters() if id(p) not in ids]
  T = spec["update_proj_gap"]
  opt = adamw_cls(
    [
      {"params": regular},
      {
        "params": galore_params,
        "rank": spec["rank"],
        "update_proj_gap": T,
        "scale": spec["galore_scale"],
        "proj_type": "std",
      },
    ],
    lr=spec["lr"],
    weight_decay=0.0,
    no_deprecation_warning=True,
  )
  res["galore_params"] = len(galore_params)
  g = torch.Generator().manual_seed(0)
  toks = torch.randint(
    0, spec["vocab_size"], (spec["batch_size"], spec["seq_len"] + 1), generator=g
  ).to(dev)
  inputs, targets = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()
  vocab = spec["vocab_size"]
  losses = []

  def fwd_bwd():
    logits = model(input_ids=inputs, use_cache=False).logits
    loss = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))
    loss.backward()
    return loss

  def step():
    loss = fwd_bwd()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  def timed():
    sync()
    t = time.perf_counter()
    loss = step()
    sync()
    dt = time.perf_counter() - t
    losses.append(float(loss))
    return dt

  # Kernels, cuBLAS handles and the allocator warm up on two passes without an update.
  for _ in range(2):
    fwd_bwd()
    model.zero_grad(set_to_none=True)
  sync()
  # The reference computes its projectors on its first step (an SVD per GaLore weight).
  # As on the JAX side (count 1, initial basis), start from step 1 with a valid basis,
  # so the plain steps are timed first and the refresh (possibly slow) comes last.
  for w in galore_params:
    st = opt.state[w]
    st["step"] = 1
    pr = projector_cls(spec["rank"], update_proj_gap=T, scale=spec["galore_scale"], proj_type="std")
    m, n = w.shape
    r = min(spec["rank"], m, n)
    # "std": m >= n projects on the right (rank x n), else on the left (m x rank).
    pr.ortho_matrix = (
      torch.eye(r, n, dtype=w.dtype, device=w.device)
      if m >= n
      else torch.eye(m, r, dtype=w.dtype, device=w.device)
    )
    st["projector"] = pr
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  for _ in range(spec["warmup"]):
    timed()
  times = [timed() for _ in range(spec["steps"])]
  loop_s = None
  if spec["loop_steps"]:
    sync()
    t = time.perf_counter()
    for _ in range(spec["loop_steps"]):
      loss = step()
    sync()
    loop_s = (time.perf_counter() - t) / spec["loop_steps"]
    losses.append(float(loss))
  steady = torch.cuda.max_memory_allocated() if cuda else None
  res.update(
    step_times_s=times, step_s=_median(times), loop_step_s=loop_s, peak_bytes_steady=steady
  )
  save()
  if spec["refresh_reps"] > 0:
    shapes: dict[tuple, float] = {}
    for w in galore_params:
      if tuple(w.shape) not in shapes:
        a = torch.randn(*w.shape, device=dev, dtype=torch.float32)
        torch.linalg.svd(a, full_matrices=False)  # the reference's call (float32)
        sync()
        t = time.perf_counter()
        torch.linalg.svd(a, full_matrices=False)
        sync()
        shapes[tuple(w.shape)] = time.perf_counter() - t
    total = sum(shapes[tuple(w.shape)] for w in galore_params)
    res["svd_probe"] = {
      "per_shape_s": {"x".join(map(str, k)): v for k, v in shapes.items()},
      "sum_over_leaves_s": total,
    }
    res["refresh_predicted_s"] = res["step_s"] + total
    save()

    def refresh_step(k):
      for st in opt.state.values():
        if "step" in st:
          st["step"] = k * T  # the projector refreshes when step % T == 0
      return timed()

    _refresh_reps(
      refresh_step, spec["refresh_reps"], spec["kill_at"], res["refresh_predicted_s"], res, save
    )
  peak = torch.cuda.max_memory_allocated() if cuda else None
  res.update(
    peak_bytes=peak,
    loss_first=losses[0],
    loss_last=losses[-1],
    nonfinite_loss=any(not math.isfinite(x) for x in losses),
  )


WORKERS = {"jax": worker_jax, "torch": worker_torch, "peak": worker_peak, "refresh": worker_refresh}


def worker_main(spec_path: str) -> int:
  spec = json.loads(Path(spec_path).read_text())
  res: dict[str, Any] = {"status": "running", "started": time.time()}
  save = lambda: _write_json(spec["out"], res)
  save()
  try:
    WORKERS[spec["kind"]](spec, res, save)
    if res.get("status") == "running":
      res["status"] = "ok"
  except Exception as e:  # noqa: BLE001 - the parent reports it
    res.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
  res["worker_s"] = time.time() - res["started"]
  save()
  return 0 if res["status"] in ("ok", "unavailable") else 1


# ---------------------------------------------------------------------------
# Parent: job list, subprocesses, report.


def _model_shape(name: str, overrides: dict | None) -> dict:
  """The fields the torch worker needs, without importing jax in the parent."""
  from galore_jax import model as model_lib  # imports jax, initialises no device

  mc = model_lib.get_config("llama_tiny" if overrides else name, **(overrides or {}))
  return {
    "hidden_size": mc.hidden_size,
    "intermediate_size": mc.intermediate_size,
    "num_heads": mc.num_heads,
    "num_layers": mc.num_layers,
    "max_seq_len": mc.max_seq_len,
    "rms_eps": mc.rms_eps,
    "rope_base": mc.rope_base,
  }


def find_galore_torch(explicit: str | None) -> str | None:
  if explicit:
    return explicit
  if os.environ.get("GALORE_TORCH"):
    return os.environ["GALORE_TORCH"]
  if importlib.util.find_spec("galore_torch") is not None:
    return None  # installed
  for pattern in ("wheels/galore_torch-*.whl", "runs/wheels/galore_torch-*.whl"):
    hits = sorted(glob.glob(str(REPO / pattern)))
    if hits:
      return hits[-1]
  return None


def build_jobs(args) -> list[dict]:
  smoke = args.cpu_smoke
  models = [SMOKE_MODEL] if smoke else args.models
  common = dict(
    batch_size=args.batch_size,
    seq_len=args.seq_len,
    vocab_size=args.vocab_size,
    update_proj_gap=args.update_proj_gap,
    galore_scale=args.galore_scale,
    lr=args.lr,
    dtype=args.dtype,
    warmup=args.warmup,
    steps=args.steps,
    loop_steps=args.loop_steps,
    refresh_reps=args.refresh_reps,
  )
  overrides = SMOKE_OVERRIDES if smoke else None

  def base(model):
    rank = args.rank or RANKS.get(model, 128)
    d = dict(common, model=model, rank=rank)
    if overrides:
      d.update(model_overrides=overrides, base_model="llama_tiny")
    return d

  peak = {
    "kind": "peak",
    "name": "peak_flops",
    "n": args.peak_n,
    "reps": args.peak_reps,
    "inner": args.peak_inner,
    "dtype": args.dtype,
  }
  first, refresh, rest = [], [], []
  for model in models:
    b = base(model)
    for opt in args.optimizers:
      job = dict(b, kind="jax", optimizer=opt, name=f"{model}/jax/{opt}")
      if opt == "galore_adamw8bit" and not smoke:
        job["refresh_reps"] = 0  # the same SVDs as galore_adamw's refresh
      (first if opt == "galore_adamw" else rest).append(job)
    if not args.skip_torch:
      first.append(
        dict(
          b,
          kind="torch",
          name=f"{model}/torch/galore_adamw",
          galore_torch=args.galore_torch,
          device="cpu" if smoke else "auto",
          torch_threads=1 if smoke else None,
          dtype="float32" if smoke else args.torch_dtype or args.dtype,
          model_shape=_model_shape(model, overrides),
        )
      )
  if args.refresh_cost:
    for model in [SMOKE_MODEL] if smoke else args.refresh_models:
      variants = list(args.refresh_variants)
      if smoke:  # CI time: one staggered variant exercises the staggered code path
        variants = [v for v in variants if v != "subspace:staggered"]
      reuse = "galore_adamw" in args.optimizers and model in models
      if reuse and "exact:synchronous" in variants:
        variants.remove("exact:synchronous")  # the bench's galore_adamw case is that variant
      # synchronous first: a staggered variant may need its plain step time.
      variants.sort(key=lambda v: v.split(":")[1] != "synchronous")
      if variants:
        refresh.append(
          dict(
            base(model),
            kind="refresh",
            name=f"{model}/refresh",
            variants=variants,
            stagger_period=args.stagger_period,
            refresh_reps=max(args.refresh_reps, 2),
          )
        )
  # The first model's GaLore pair and refresh cost come first (the targets are
  # at llama_1b, so the GPU run passes --models llama_1b,...), then the other pairs.
  lead = [j for j in first if j["model"] == models[0]]
  lead_refresh = [j for j in refresh if j["model"] == models[0]]
  return (
    [peak]
    + lead
    + lead_refresh
    + [j for j in first if j not in lead]
    + [j for j in refresh if j not in lead_refresh]
    + rest
  )


def run_job(job: dict, *, timeout: float, deadline: float, env: dict, log, workdir: str):
  out = os.path.join(workdir, job["name"].replace("/", "__") + ".json")
  spec = dict(job, deadline=deadline, kill_at=time.time() + timeout, out=out)
  spec_path = spec["out"] + ".spec"
  _write_json(spec_path, spec)
  log.write(f"\n===== {job['name']} (timeout {timeout:.0f} s) =====\n")
  log.flush()
  t = time.time()
  proc = subprocess.Popen(
    [sys.executable, str(Path(__file__).resolve()), "--worker", spec_path],
    stdout=log,
    stderr=subprocess.STDOUT,
    env=env,
    cwd=str(REPO),
    start_new_session=True,
  )
  timed_out = False

  def kill():
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # the worker we started, and its children
    except ProcessLookupError:
      pass
    proc.wait()

  try:
    proc.wait(timeout=max(timeout, 1))
  except subprocess.TimeoutExpired:
    timed_out = True
    kill()
  except BaseException as e:  # SIGTERM (_Terminated) or Ctrl-C: leave no worker behind
    kill()
    try:
      e.partial = json.loads(Path(spec["out"]).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
      e.partial = {}
    raise
  try:
    res = json.loads(Path(spec["out"]).read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    res = {"status": "error", "error": "worker wrote no result"}
  if timed_out:
    res["status"] = "timeout"
    res["error"] = f"killed after {timeout:.0f} s; numbers above are those written before"
  elif proc.returncode != 0 and res.get("status") in ("running", None):
    res["status"] = "error"
    res.setdefault("error", f"worker exited with {proc.returncode}")
  res["wall_s"] = time.time() - t
  res["job"] = {k: v for k, v in job.items() if k not in ("model_shape",)}
  return res


class _Terminated(Exception):
  """SIGTERM (e.g. an outer ``timeout``): stop, keep what was measured, write the report."""


def _on_sigterm(signum, frame):
  del frame
  raise _Terminated(f"signal {signum}")


def summarize(results: dict[str, dict], args) -> dict:
  tokens = args.batch_size * args.seq_len
  peak = results.get("peak_flops", {}).get("peak_flops")
  out: dict[str, Any] = {"tokens_per_step": tokens, "peak_flops": peak, "models": {}}
  models = [SMOKE_MODEL] if args.cpu_smoke else args.models
  for model in models:
    m: dict[str, Any] = {}
    for name, res in results.items():
      if not name.startswith(model + "/") or name.endswith("/refresh"):
        continue
      impl = name.split("/", 1)[1]
      step_s = res.get("step_s")
      tps = _ratio(tokens, step_s)
      n = res.get("n_params")
      m[impl] = {
        "status": res.get("status"),
        "step_s": step_s,
        "tokens_per_s": tps,
        "loop_step_s": res.get("loop_step_s"),
        "loop_tokens_per_s": _ratio(tokens, res.get("loop_step_s")),
        "refresh_s": res.get("refresh_s"),
        "refresh_predicted_s": res.get("refresh_predicted_s"),
        "peak_bytes": res.get("peak_bytes"),
        "peak_bytes_steady": res.get("peak_bytes_steady"),
        "n_params": n,
        "compile_s": res.get("compile_s"),
        "mfu": None if None in (n, tps, peak) else 6.0 * n * tps / peak,
      }
    jx, ref = m.get("jax/galore_adamw", {}), m.get("torch/galore_adamw", {})
    m["ratios"] = {
      "tokens_per_s": _ratio(jx.get("tokens_per_s"), ref.get("tokens_per_s")),
      "loop_tokens_per_s": _ratio(jx.get("loop_tokens_per_s"), ref.get("loop_tokens_per_s")),
      "peak_memory": _ratio(jx.get("peak_bytes"), ref.get("peak_bytes")),
      "peak_memory_steady": _ratio(jx.get("peak_bytes_steady"), ref.get("peak_bytes_steady")),
      "refresh_s": _ratio(jx.get("refresh_s"), ref.get("refresh_s")),
      "same_param_count": (
        None
        if None in (jx.get("n_params"), ref.get("n_params"))
        else jx["n_params"] == ref["n_params"]
      ),
    }
    out["models"][model] = m
  return out


def refresh_report(results: dict[str, dict], args) -> dict:
  T = args.update_proj_gap
  report: dict[str, Any] = {"update_proj_gap": T, "target_share": TARGET_SHARE, "models": {}}
  for model in [SMOKE_MODEL] if args.cpu_smoke else args.refresh_models:
    rows: dict[str, Any] = {}
    bench = results.get(f"{model}/jax/galore_adamw") or {}
    worst = bench.get("refresh_s") or bench.get("refresh_predicted_s")
    if "exact:synchronous" in args.refresh_variants and worst and bench.get("step_s"):
      excess = worst - bench["step_s"]
      rows["exact:synchronous"] = {
        "svd": "exact",
        "schedule": "synchronous",
        "status": bench.get("status"),
        "source": f"{model}/jax/galore_adamw",
        "step_s": bench["step_s"],
        "refresh_s": bench.get("refresh_s"),
        "worst_step_s": worst,
        "estimated": bench.get("refresh_s") is None,
        "excess_per_period_s": excess,
        "amortised_share": amortised_share(bench["step_s"], excess, T),
        "worst_step_share": _ratio(excess, bench["step_s"]),
      }
    rows.update(results.get(f"{model}/refresh", {}).get("variants", {}))
    target = rows.get("randomized:staggered", {}).get("amortised_share")
    sub = rows.get("subspace:synchronous", {})
    sub_ratio = _ratio(sub.get("worst_step_s"), sub.get("step_s"))
    report["models"][model] = {
      "variants": rows,
      "target_met": None if target is None else target <= TARGET_SHARE,
      # Issue #11: a synchronous subspace refresh step <= 1.25 x a plain step.
      "subspace_refresh_over_step": sub_ratio,
      "subspace_target_met": None if sub_ratio is None else sub_ratio <= SUBSPACE_REFRESH_MAX,
    }
  return report


def _fmt(x, spec="{:.4g}", none="-"):
  return none if x is None else spec.format(x)


def _pct(x):
  return "-" if x is None else f"{100 * x:.2f}%"


def format_tables(summary: dict, refresh: dict | None, results: dict, args) -> str:
  lines = []
  peak = summary["peak_flops"]
  pk = results.get("peak_flops", {})
  lines.append(
    f"device: {pk.get('device', '?')} ({pk.get('backend', '?')}); measured "
    f"{pk.get('dtype', args.dtype)} matmul peak {_fmt(peak and peak / 1e12, '{:.1f}')} "
    f"TFLOP/s (n={pk.get('n')}); batch {args.batch_size} x seq {args.seq_len} = "
    f"{summary['tokens_per_step']} tokens/step, T={args.update_proj_gap}"
  )
  hdr = (
    f"{'model':<12} {'case':<24} {'status':<8} {'s/step':>9} {'tok/s':>10} "
    f"{'loop tok/s':>10} {'refresh s':>9} {'peak GiB':>8} {'MFU':>6} {'compile':>7}"
  )
  lines += [hdr, "-" * len(hdr)]
  for model, m in summary["models"].items():
    for impl, r in m.items():
      if impl == "ratios":
        continue
      lines.append(
        f"{model:<12} {impl:<24} {str(r['status'])[:8]:<8} {_fmt(r['step_s'], '{:.5f}'):>9} "
        f"{_fmt(r['tokens_per_s'], '{:.0f}'):>10} {_fmt(r['loop_tokens_per_s'], '{:.0f}'):>10} "
        f"{_fmt(r['refresh_s'], '{:.3f}'):>9} "
        f"{_fmt(r['peak_bytes'] and r['peak_bytes'] / GIB, '{:.2f}'):>8} "
        f"{_fmt(r['mfu'] and 100 * r['mfu'], '{:.1f}%'):>6} "
        f"{_fmt(r['compile_s'], '{:.1f}'):>7}"
      )
    q = m["ratios"]
    x = lambda v: _fmt(v, "x{:.2f}")
    lines.append(
      f"{model:<12} {'jax/torch galore ratios':<24} tokens/s {x(q['tokens_per_s'])} "
      f"(loop {x(q['loop_tokens_per_s'])}), peak memory {x(q['peak_memory'])} "
      f"(steady {x(q['peak_memory_steady'])}), refresh step {x(q['refresh_s'])}, "
      f"same #params: {q['same_param_count']}"
    )
  if refresh:
    lines.append("")
    lines.append(
      f"projector refresh cost, amortised over T={refresh['update_proj_gap']} "
      f"(share of a plain step; target <= {100 * refresh['target_share']:.0f}% "
      "for randomized + staggered)"
    )
    hdr = (
      f"{'model':<12} {'variant':<24} {'status':<8} {'step s':>9} {'worst s':>9} "
      f"{'amortised':>9} {'worst step':>10}"
    )
    lines += [hdr, "-" * len(hdr)]
    for model, rep in refresh["models"].items():
      order = lambda kv: (kv[0].split(":")[1] != "synchronous", kv[0].split(":")[0] != "exact")
      for variant, r in sorted(rep["variants"].items(), key=order):
        lines.append(
          f"{model:<12} {variant + (' (est.)' if r.get('estimated') else ''):<24} "
          f"{str(r.get('status'))[:8]:<8} "
          f"{_fmt(r.get('step_s'), '{:.5f}'):>9} {_fmt(r.get('worst_step_s'), '{:.5f}'):>9} "
          f"{_pct(r.get('amortised_share')):>9} {_pct(r.get('worst_step_share')):>10}"
        )
      tm = rep["target_met"]
      verdict = "-" if tm is None else ("PASS" if tm else "FAIL")
      lines.append(
        f"{model:<12} target (randomized:staggered amortised <= "
        f"{100 * TARGET_SHARE:.0f}%): {verdict}"
      )
  bad = [
    f"{n}: {r.get('status')} {r.get('error', '')}"
    for n, r in results.items()
    if r.get("status") not in ("ok",)
  ]
  if bad:
    lines.append("")
    lines += ["not ok: " + b for b in bad]
  return "\n".join(lines)


def parse_args(argv):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  csv = lambda s: [x for x in s.split(",") if x]
  p.add_argument("--models", type=csv, default=list(MODELS))
  p.add_argument("--optimizers", type=csv, default=list(JAX_OPTIMIZERS))
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--vocab-size", type=int, default=32000)
  p.add_argument("--rank", type=int, default=None, help="default: 128/256/512 for 60m/350m/1b")
  p.add_argument("--update-proj-gap", type=int, default=200)
  p.add_argument("--galore-scale", type=float, default=0.25)
  p.add_argument("--lr", type=float, default=0.01)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--torch-dtype", default=None, choices=("bfloat16", "float32"))
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--steps", type=int, default=10, help="timed steps, each synchronised")
  p.add_argument(
    "--loop-steps",
    type=int,
    default=10,
    help="further steps synchronised only at the end (0: none)",
  )
  p.add_argument(
    "--refresh-reps",
    type=int,
    default=1,
    help="refresh steps timed per case (more only while time allows)",
  )
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument(
    "--galore-torch",
    default=None,
    help="galore_torch wheel or directory (see the module docstring)",
  )
  p.add_argument("--refresh-cost", action="store_true")
  p.add_argument("--refresh-models", type=csv, default=["llama_1b"])
  p.add_argument("--refresh-variants", type=csv, default=list(REFRESH_VARIANTS))
  p.add_argument(
    "--stagger-period", action="store_true", help="also time every step of one staggered period"
  )
  p.add_argument("--peak-n", type=int, default=8192)
  p.add_argument("--peak-reps", type=int, default=5)
  p.add_argument("--peak-inner", type=int, default=10)
  p.add_argument("--time-budget", type=float, default=470.0, help="seconds for the whole run")
  p.add_argument("--job-timeout", type=float, default=240.0, help="seconds per case at most")
  p.add_argument(
    "--min-job-s",
    type=float,
    default=25.0,
    help="a case is not started with less time than this left",
  )
  p.add_argument("--cpu-smoke", action="store_true")
  p.add_argument("--json", default=None)
  p.add_argument("--log", default=None, help="worker output; default next to --json")
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.cpu_smoke:
    args.batch_size, args.seq_len, args.vocab_size = 2, 32, 512
    args.rank = args.rank or 8
    args.update_proj_gap = 16
    args.dtype, args.torch_dtype = "float32", "float32"
    args.warmup, args.steps, args.loop_steps = 1, 2, 2
    args.peak_n, args.peak_reps, args.peak_inner = 256, 3, 2
    args.min_job_s = 0.0
    args.stagger_period = True
  for v in args.refresh_variants:
    svd, _, sched = v.partition(":")
    if svd not in ("exact", "randomized", "subspace") or sched not in ("synchronous", "staggered"):
      p.error(f"--refresh-variants: {v!r} is not svd:schedule")
  if args.json is None and os.environ.get("OUT"):
    args.json = os.path.join(os.environ["OUT"], "gpu_bench.json")
  args.galore_torch = find_galore_torch(args.galore_torch)
  return args


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["--worker"]:
    sys.exit(worker_main(argv[1]))
  args = parse_args(argv)
  t0 = time.time()
  deadline = t0 + args.time_budget
  say = (
    (lambda *a: None)
    if args.quiet
    else (lambda msg: print(f"[{time.time() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True))
  )
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
    [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
  )
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  if args.cpu_smoke:
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
  jobs = build_jobs(args)
  workdir = tempfile.mkdtemp(prefix="gpu_bench_")
  log_path = args.log or (
    os.path.splitext(args.json)[0] + ".log" if args.json else os.path.join(workdir, "gpu_bench.log")
  )
  Path(log_path).parent.mkdir(parents=True, exist_ok=True)
  results: dict[str, dict] = {}
  skip = lambda job, why: {
    "status": "skipped",
    "error": why,
    "job": {k: v for k, v in job.items() if k != "model_shape"},
  }
  old_handler = None
  if threading.current_thread() is threading.main_thread():
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    with open(log_path, "w") as log:
      for i, job in enumerate(jobs):
        left = deadline - time.time()
        if left < max(args.min_job_s, 1.0):
          results[job["name"]] = skip(job, "time budget spent")
          say(f"{job['name']}: skipped (time budget)")
          continue
        try:
          res = run_job(
            job,
            timeout=min(args.job_timeout, left),
            deadline=deadline,
            env=env,
            log=log,
            workdir=workdir,
          )
        except _Terminated as e:
          partial = getattr(e, "partial", {})
          if partial:  # the numbers the killed worker had written
            partial.update(
              status="terminated",
              error=f"terminated ({e})",
              job={k: v for k, v in job.items() if k != "model_shape"},
            )
            results[job["name"]] = partial
          for rest in jobs[i + 1 if partial else i :]:
            results[rest["name"]] = skip(rest, f"terminated ({e})")
          say(f"terminated ({e}): writing what was measured")
          break
        results[job["name"]] = res
        brief = ", ".join(
          f"{k} {res[k]:.4g}"
          for k in ("compile_s", "step_s", "refresh_s", "peak_flops")
          if res.get(k) is not None
        )
        say(
          f"{job['name']}: {res.get('status')} ({res['wall_s']:.1f} s) {brief} "
          f"{res.get('error', '')}".rstrip()
        )
  finally:
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)
  summary = summarize(results, args)
  refresh = refresh_report(results, args) if args.refresh_cost else None
  report = {
    "meta": {
      "argv": argv,
      "args": {k: v for k, v in vars(args).items() if k != "worker"},
      "elapsed_s": time.time() - t0,
      "python": sys.version.split()[0],
      "host": platform.node(),
      "log": os.path.abspath(log_path),
      "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
      "notes": {
        "jax_lr": "trainer schedule, warmup 0 -> lr over 1000 steps (timing only)",
        "torch_lr": "constant lr as GaLoreAdamW is given it",
        "mfu": "6 * all params * tokens/s / measured matmul peak",
        "peak_bytes": "JAX: whole process incl. init; torch: after model build",
      },
    },
    "peak_flops": results.get("peak_flops"),
    "summary": summary,
    "refresh_cost": refresh,
    "results": results,
  }
  if args.json:
    _write_json(args.json, report)
  print(format_tables(summary, refresh, results, args), flush=True)
  if args.json:
    print(f"wrote {args.json} (worker log {log_path})", flush=True)
  return report


if __name__ == "__main__":
  main()
