"""The JAX side of ``experiments/gpu_bench.py``: its ``jax``, ``refresh`` and ``peak`` workers.

Each runs in its own subprocess (``gpu_bench.py --worker SPEC``), so that peak device
memory is per case: the trainer's compiled step timed at chosen GaLore counts
(``worker_jax``), the refresh cost of (svd, schedule) variants (``worker_refresh``) and
the measured bf16 matmul peak (``worker_peak``). What they measure and how is in
``gpu_bench.py``'s docstring. jax and galore_jax are imported inside the workers: the
parent imports this module without initialising a device.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
import types
from typing import Any

from gpu_bench_common import (
  amortised_share,
  median,
  quiet_counts,
  ratio,
  refresh_reps,
  stagger_groups,
)

# Third-party modules the data pipeline (``galore_jax.data``) imports and the GPU image may
# lack; the workers read no data.
DATA_DEPS = ("grain", "sentencepiece", "tensorflow_datasets")
DATA_MODULE = "galore_jax.data"


def _import_trainer():
  """``galore_jax.train``, with a stand-in ``galore_jax.data`` if its imports are missing.

  Returns ``(train, model_lib, galore, stubbed)``. The data pipeline needs grain and
  sentencepiece, which the GPU image may lack (it has no grain); the workers read no
  data. The trainer imports ``galore_jax.data`` lazily now; a version that imports it
  at module level gets an empty stand-in module instead of failing. The stand-in goes in by
  module name, so it serves ``galore_jax/data.py`` and a ``galore_jax/data/`` package alike.
  """
  before = set(sys.modules)
  try:
    from galore_jax import train

    stubbed = False
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] not in DATA_DEPS:
      raise
    # Forget what the failed import loaded (the trainer, or the modules it is split into) and
    # the data module with any submodules, so that the retry imports them against the stub.
    for mod in list(sys.modules):
      new = mod.startswith("galore_jax.") and mod not in before
      if new or mod == DATA_MODULE or mod.startswith(DATA_MODULE + "."):
        sys.modules.pop(mod, None)
    stub = types.ModuleType(DATA_MODULE)
    stub.__doc__ = f"gpu_bench stand-in: the benchmark reads no data ({e.name} is missing)"
    sys.modules[DATA_MODULE] = stub
    import galore_jax

    setattr(galore_jax, DATA_MODULE.rpartition(".")[2], stub)
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
  synchronous = fields.get("refresh_schedule", "synchronous") == "synchronous"
  if spec.get("refresh_programs") and fields["optimizer"].startswith("galore_") and synchronous:
    fields["refresh_programs"] = spec["refresh_programs"]  # (what the GaLore cases can take)
  cfg = train.TrainConfig(**fields)
  train.validate(cfg)
  return cfg


def lowered_op_counts(text: str) -> dict[str, int]:
  """Size of a lowered (StableHLO) program: lines, and the ops whose number grows with the
  refresh programs a train step holds (matmuls, loops, linear-algebra custom calls)."""
  return {
    "lines": text.count("\n"),
    "dot_general": text.count("stablehlo.dot_general"),
    "while": text.count("stablehlo.while"),
    "case": text.count("stablehlo.case") + text.count("stablehlo.if"),
    "custom_call": text.count("stablehlo.custom_call"),
  }


class _JaxCase:
  """One compiled trainer step with its state, stepped at chosen GaLore counts."""

  def __init__(self, spec, cfg, train, model_lib, galore, progress=None, count_ops=False):
    """``progress(**numbers)`` is called after init and after compilation, so a case
    killed by its timeout still reports how far it got (GPU compiles take minutes).
    ``count_ops``: also report the lowered step's size (:func:`lowered_op_counts`) before
    compiling it."""
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
    self.lr = np.float32(cfg.peak_lr)  # the steps' rate (an argument of the trainer's step)
    # The trainer's programs: on a GPU with GaLore's synchronous schedule, one for refresh
    # steps and one without refresh code (train.refresh_programs). The plain one is compiled
    # here, so that the steady figures come first; the refresh one when a step first needs
    # it (its lowering and compile times are then added to the report's "programs").
    self.split = train.refresh_programs(cfg) == 2
    self._train, self._progress, self._count_ops = train, progress, count_ops
    self.programs: dict = {}
    self.program_times: dict = {}
    self.lowered_ops: dict = {}
    self.step = self._compile("not_due" if self.split else "scheduled")  # steady steps
    self.compile_s = sum(self.program_times[next(iter(self.programs))].values())
    self.last_program = self.step
    self.skipped = 0
    self.losses: list[float] = []

  def set_count(self, value: int) -> None:
    self.opt_state = self.galore.with_galore_count(self.opt_state, value)

  def _compile(self, name: str):
    """Lowers and compiles the trainer's program ``name`` ("scheduled", "due", "not_due")
    for this case's arguments; reports its times (and, with ``count_ops``, its size)."""
    step = self._train.compile_train_step(self.run, name)
    t = time.perf_counter()
    lowered = step.lower(self.params, self.opt_state, self.batch, self.lr)
    lower_s = time.perf_counter() - t
    if self._count_ops:
      self.lowered_ops[name] = lowered_op_counts(lowered.as_text())
      self._progress(lowered_ops=self.lowered_ops if self.split else self.lowered_ops[name])
    t = time.perf_counter()
    self.programs[name] = lowered.compile()
    self.program_times[name] = {"lower_s": lower_s, "compile_s": time.perf_counter() - t}
    first = self.program_times[next(iter(self.program_times))]
    self._progress(
      lower_s=first["lower_s"],
      compile_s=first["lower_s"] + first["compile_s"],  # lowering + compiling, no first call
      **({"programs": self.program_times} if self.split else {}),
    )
    return self.programs[name]

  def program(self, count: int | None):
    """The program the trainer would run at GaLore ``count`` (None: the state's own)."""
    if not self.split:
      return self.programs["scheduled"]
    if count is None:
      count = int(self.jax.device_get(self.galore.galore_count(self.opt_state)))
    name = self._train.RefreshPrograms.name_for(count, self.cfg.update_proj_gap)
    self.last_program = self.programs.get(name) or self._compile(name)
    return self.last_program

  def timed_step(self, count: int | None = None) -> float:
    """One step (at GaLore ``count`` if given), synchronised; returns seconds."""
    if count is not None and self.cfg.is_galore:
      self.set_count(count)
      self.jax.block_until_ready(self.opt_state)
    step = self.program(count)
    t = time.perf_counter()
    self.params, self.opt_state, m = step(self.params, self.opt_state, self.batch, self.lr)
    self.jax.block_until_ready((self.params, self.opt_state, m))
    dt = time.perf_counter() - t
    self._record(m)
    return dt

  def loop(self, n: int, start_count: int | None) -> float:
    """``n`` consecutive steps synchronised only at the end; mean seconds per step."""
    if start_count is not None and self.cfg.is_galore:
      self.set_count(start_count)
      self.jax.block_until_ready(self.opt_state)
    # The callers start past the last refresh count, so one program serves every step (no
    # per-step read of the count, which would synchronise the loop).
    step = self.program(start_count)
    ms = []
    t = time.perf_counter()
    for _ in range(n):
      self.params, self.opt_state, m = step(self.params, self.opt_state, self.batch, self.lr)
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

  def layouts(self, train, schedule: str):
    """The optimizer's per-leaf layouts (shapes, refresh phases) for ``schedule``."""
    params = self.run.abstract_params
    layouts = self.galore.leaf_layouts(
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
      for p in layouts
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


def _profile(
  case: _JaxCase, counts, steps: int, out_path: str | None, write_hlo: bool = True
) -> dict:
  """A ``jax.profiler`` trace of ``steps`` steps at ``counts``, broken down by stage and kind
  (``profile_breakdown.py``); the trace is copied to ``out_path`` when given, with the
  compiled HLO beside it unless ``write_hlo`` is False (a second trace of the same step)."""
  import glob
  import os
  import shutil
  import tempfile

  import jax
  import profile_breakdown

  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        case.timed_step(next(counts))
    found = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
      return {"error": f"no perfetto trace in {d}"}
    hlo = case.last_program.as_text()  # megabytes at llama_1b: rendered once
    result = profile_breakdown.breakdown(profile_breakdown.load_trace(found[0]), hlo, steps)
    if out_path:
      import gzip

      shutil.copyfile(found[0], out_path)
      result["trace_file"] = os.path.basename(out_path)
    if out_path and write_hlo:
      hlo_path = out_path.replace("trace_", "hlo_").replace(".json.gz", ".txt.gz")
      with gzip.open(hlo_path, "wt") as f:
        f.write(hlo)
      result["hlo_file"] = os.path.basename(hlo_path)
  return result


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
    elif svd == "exact_jacobi":  # the SVD alone by cuSOLVER's Jacobi gesvdj
      f = jax.jit(
        lambda g: jax.lax.linalg.svd(
          g.astype(jnp.float32),
          full_matrices=False,
          algorithm=jax.lax.linalg.SvdAlgorithm.JACOBI,
        )
      )
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
  except Exception as e:  # noqa: BLE001 - e.g. optimizer.leaf_layouts changed
    return {"error": f"{type(e).__name__}: {e}", "sum_over_leaves_s": None}


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
  extra = {"svd": spec["svd"]} if spec.get("svd") else {}
  cfg = _train_config(spec, train, optimizer=spec["optimizer"], **extra)
  res["svd"] = cfg.svd if cfg.is_galore else None
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
    step_s=median(times),
    loop_step_s=loop_s,
    peak_bytes_steady=mem and mem["peak_bytes_in_use"],
  )
  save()
  if spec.get("profile_steps"):
    try:
      res["profile"] = _profile(case, counts, spec["profile_steps"], spec.get("profile_out"))
    except Exception as e:  # noqa: BLE001 - the timings above stand without it
      res["profile"] = {"error": f"{type(e).__name__}: {e}"}
    save()
  leaves = lambda: case.layouts(train, "synchronous")  # noqa: E731
  if cfg.is_galore:
    # What a refresh would cost with the other methods, on the same card in the same run
    # (one decomposition per distinct shape, summed over the leaves).
    res["svd_probe_other"] = {
      svd: _safe_probe(leaves, svd, case.run.model_cfg.param_dtype)
      for svd in spec.get("probe_svds", ())
      if svd != cfg.svd
    }
    save()
  if cfg.is_galore and spec["refresh_reps"] > 0:
    probe = _safe_probe(leaves, cfg.svd, case.run.model_cfg.param_dtype)
    res["svd_probe"] = probe
    res["refresh_predicted_s"] = (
      None if probe["sum_over_leaves_s"] is None else res["step_s"] + probe["sum_over_leaves_s"]
    )
    save()
    refresh_reps(
      lambda k: case.timed_step(k * T),
      spec["refresh_reps"],
      spec["kill_at"],
      res["refresh_predicted_s"],
      res,
      save,
    )
    if spec.get("profile_refresh") and res.get("refresh_times_s"):
      # Where a refresh step's time goes (the decompositions, their triangular solves, the
      # host round trips of the refresh's branches), after the timed ones have warmed it.
      at = (len(res["refresh_times_s"]) + 1) * T
      try:
        out = spec.get("profile_out")
        res["refresh_profile"] = _profile(
          case,
          iter([at]),
          1,
          out and out.replace(".json.gz", "_refresh.json.gz"),
          # (the steady trace's HLO is this one's, unless the refresh is its own program)
          write_hlo=not spec.get("profile_steps") or case.split,
        )
      except Exception as e:  # noqa: BLE001 - the timings above stand without it
        res["refresh_profile"] = {"error": f"{type(e).__name__}: {e}"}
      save()
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
      leaves = case.layouts(train, schedule)
      offsets = [leaf["offset"] for leaf in leaves]
      counts = quiet_counts(offsets, T, start=T + 1)
      try:
        first = next(counts)
      except StopIteration:
        first = None
      if first is not None:
        counts = quiet_counts(offsets, T, start=first)
        times, _ = _time_normal(case, counts, spec["warmup"], spec["steps"], 0, T, False)
        out["step_s"] = median(times)
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
        refresh = refresh_reps(
          lambda k, c=case, t=T: c.timed_step(k * t),
          spec["refresh_reps"],
          spec["kill_at"],
          out["refresh_predicted_s"],
          out,
          save,
        )
        out["refresh_s"] = median(refresh)
        worst = out["refresh_s"]
        if worst is None:  # skipped: too slow for the time left; use the probe's prediction
          worst, out["estimated"] = out["refresh_predicted_s"], True
        excess = None if worst is None or out["step_s"] is None else worst - out["step_s"]
        out["excess_per_period_s"] = excess
        out["amortised_share"] = amortised_share(out["step_s"], excess, T)
        out["worst_step_s"] = worst
        out["worst_step_share"] = ratio(excess, out["step_s"])
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
          g["step_s"] = median(reps)
          if plain:
            g["plain_times_s"] = plain
            g["excess_s"] = median([a - b for a, b in zip(reps, plain, strict=True)])
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
