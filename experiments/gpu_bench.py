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
  optimizer's own layout; phases whose refreshing leaves have the same shapes cost the
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

Files: this one is the entry point (options, job list, subprocesses, summary and tables);
the workers are ``gpu_bench_jax.py`` (``jax``, ``refresh``, ``peak``) and
``gpu_bench_torch.py`` (``torch``); ``gpu_bench_common.py`` holds the schedule and timing
helpers both sides use; ``torch_reference.py`` loads galore-torch.

Usage:
  python experiments/gpu_bench.py --refresh-cost                       # the GPU run
  python experiments/gpu_bench.py --models llama_60m --batch-size 8
  python experiments/gpu_bench.py --cpu-smoke --json /tmp/gpu_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the GPU image has galore_jax only as this checkout
  sys.path.insert(0, str(REPO))
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # the worker modules next to this file, when it is imported by path
  sys.path.append(HERE)

import gpu_bench_common as common  # noqa: E402
import gpu_bench_jax  # noqa: E402
import gpu_bench_torch  # noqa: E402
import torch_reference  # noqa: E402

ratio, write_json = common.ratio, common.write_json
# Defined in this file before it was split (the tests use them from here).
quiet_counts, stagger_groups = common.quiet_counts, common.stagger_groups
amortised_share, _refresh_reps = common.amortised_share, common.refresh_reps
find_galore_torch = torch_reference.find_galore_torch
load_galore_torch = torch_reference.load_galore_torch
GALORE_TARGETS = gpu_bench_torch.GALORE_TARGETS
worker_jax, worker_refresh = gpu_bench_jax.worker_jax, gpu_bench_jax.worker_refresh
worker_peak, worker_torch = gpu_bench_jax.worker_peak, gpu_bench_torch.worker_torch

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
# Worker side: ``gpu_bench.py --worker SPEC`` runs one job (its own process: peak device
# memory per case) and writes its result file as it goes.

WORKERS = {"jax": worker_jax, "torch": worker_torch, "peak": worker_peak, "refresh": worker_refresh}


def worker_main(spec_path: str) -> int:
  spec = json.loads(Path(spec_path).read_text())
  res: dict[str, Any] = {"status": "running", "started": time.time()}
  save = lambda: write_json(spec["out"], res)
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
    refresh_programs=args.refresh_programs,
  )
  out_dir = os.path.dirname(os.path.abspath(args.json)) if args.json else None
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
      job = dict(b, kind="jax", optimizer=opt, name=f"{model}/jax/{opt}", svd=args.svd)
      job["probe_svds"] = args.probe_svds
      first_model = model == models[0] or smoke
      if args.profile_steps and first_model:
        job["profile_steps"] = args.profile_steps
      if args.profile_refresh and first_model and opt == "galore_adamw":
        job["profile_refresh"] = True
      if (args.profile_steps or args.profile_refresh) and first_model:
        if out_dir and opt == "galore_adamw":  # the device tool brings back 8 files at most
          job["profile_out"] = os.path.join(out_dir, f"trace_{model}_{opt}.json.gz")
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
      own = f"{args.svd}:synchronous"
      if reuse and own in variants:
        variants.remove(own)  # the bench's galore_adamw case is that variant
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
  write_json(spec_path, spec)
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
      tps = ratio(tokens, step_s)
      n = res.get("n_params")
      m[impl] = {
        "status": res.get("status"),
        "step_s": step_s,
        "tokens_per_s": tps,
        "loop_step_s": res.get("loop_step_s"),
        "loop_tokens_per_s": ratio(tokens, res.get("loop_step_s")),
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
      "tokens_per_s": ratio(jx.get("tokens_per_s"), ref.get("tokens_per_s")),
      "loop_tokens_per_s": ratio(jx.get("loop_tokens_per_s"), ref.get("loop_tokens_per_s")),
      "peak_memory": ratio(jx.get("peak_bytes"), ref.get("peak_bytes")),
      "peak_memory_steady": ratio(jx.get("peak_bytes_steady"), ref.get("peak_bytes_steady")),
      "refresh_s": ratio(jx.get("refresh_s"), ref.get("refresh_s")),
      "same_param_count": (
        None
        if None in (jx.get("n_params"), ref.get("n_params"))
        else jx["n_params"] == ref["n_params"]
      ),
    }
    out["models"][model] = m
  return out


def _synchronous_row(svd, status, source, step_s, worst_s, T, estimated, **extra) -> dict:
  """A synchronous refresh variant read off the bench's GaLore case (its plain step time)."""
  excess = worst_s - step_s
  return {
    "svd": svd,
    "schedule": "synchronous",
    "status": status,
    "source": source,
    "step_s": step_s,
    **extra,
    "worst_step_s": worst_s,
    "estimated": estimated,
    "excess_per_period_s": excess,
    "amortised_share": amortised_share(step_s, excess, T),
    "worst_step_share": ratio(excess, step_s),
  }


def refresh_report(results: dict[str, dict], args) -> dict:
  T = args.update_proj_gap
  report: dict[str, Any] = {"update_proj_gap": T, "target_share": TARGET_SHARE, "models": {}}
  for model in [SMOKE_MODEL] if args.cpu_smoke else args.refresh_models:
    rows: dict[str, Any] = {}
    bench = results.get(f"{model}/jax/galore_adamw") or {}
    worst = bench.get("refresh_s") or bench.get("refresh_predicted_s")
    step_s, source = bench.get("step_s"), f"{model}/jax/galore_adamw"
    own = f"{args.svd}:synchronous"
    if own in args.refresh_variants and worst and step_s:
      rows[own] = _synchronous_row(
        args.svd,
        bench.get("status"),
        source,
        step_s,
        worst,
        T,
        bench.get("refresh_s") is None,
        refresh_s=bench.get("refresh_s"),
      )
    rows.update(results.get(f"{model}/refresh", {}).get("variants", {}))
    # Variants not run: synchronous refresh predicted from the probes (one decomposition per
    # shape, summed over leaves) in the bench's GaLore case, same card, same run.
    for svd, probe in (bench.get("svd_probe_other") or {}).items():
      key = f"{svd}:synchronous"
      total = probe.get("sum_over_leaves_s")
      if key in rows or total is None or not step_s:
        continue
      rows[key] = _synchronous_row(
        svd, "predicted", source + " svd_probe_other", step_s, step_s + total, T, True
      )
    target = rows.get("randomized:staggered", {}).get("amortised_share")
    sub = rows.get("subspace:synchronous", {})
    sub_ratio = ratio(sub.get("worst_step_s"), sub.get("step_s"))
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
  p.add_argument(
    "--svd",
    default="exact",
    choices=("exact", "randomized", "subspace"),
    help="refresh method of the GaLore cases (their refresh step; the refresh-cost table "
    "takes that case as the svd:synchronous variant)",
  )
  p.add_argument(
    "--refresh-programs",
    default="auto",
    choices=("auto", "one", "two"),
    help="the trainer's --refresh-programs for the GaLore cases (auto: two programs on a "
    "GPU, with and without the refresh, one elsewhere; the steady steps run the second)",
  )
  p.add_argument(
    "--probe-svds",
    type=csv,
    default=["exact", "randomized", "subspace"],
    help="also time one decomposition per distinct shape with these methods (GaLore cases; "
    "also exact_jacobi: the SVD alone by the Jacobi method, GPU only, not by default: its "
    "time on large matrices is unknown and the probes share the case's time budget)",
  )
  p.add_argument(
    "--profile-steps",
    type=int,
    default=0,
    help="trace this many plain steps of the first model's cases with jax.profiler and break "
    "the device time down by stage (experiments/profile_breakdown.py); 0: off",
  )
  p.add_argument(
    "--profile-refresh",
    action="store_true",
    help="also trace one refresh step of the first model's GaLore case, after the timed "
    "ones (its breakdown: refresh_profile; the trace: trace_MODEL_galore_adamw_refresh)",
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
    write_json(args.json, report)
  # The workers' files are in the report now; only a log written there (no --json) stays.
  for entry in Path(workdir).iterdir():
    if str(entry) == log_path:
      continue
    if entry.is_dir():
      shutil.rmtree(entry)
    else:
      entry.unlink()
  if not os.listdir(workdir):
    os.rmdir(workdir)
  print(format_tables(summary, refresh, results, args), flush=True)
  if args.json:
    print(f"wrote {args.json} (worker log {log_path})", flush=True)
  return report


if __name__ == "__main__":
  main()
