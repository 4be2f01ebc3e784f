"""Measured peak memory of the real train step next to the planner's prediction (issue #4).

For each configuration this runs, in a fresh subprocess whose JAX memory pool is
capped (``XLA_PYTHON_CLIENT_MEM_FRACTION`` = cap / device memory, preallocation
off, as a 24 GB card would be):

1. the trainer's step (``train.compile_train_step``; with ``--compile-cache``, as the
   CLI runs it, through the traced-step cache: ``train.cached_train_step``) lowered and
   compiled once for this backend; its ``memory_analysis()`` (arguments + outputs -
   aliased + temp) is the compiler's own prediction for this device. The same executable is then
   run, so the 7B step is traced and compiled once (the CPU planner's figure,
   ``galore-jax plan``, is compiled on the development machine and compared in
   the README);
2. the model and optimizer state initialised on the device (``train.init_state``)
   and ``--steps`` train steps on random tokens, timed after the first
   (device-synchronised), then ``device.memory_stats()["peak_bytes_in_use"]``
   (the init's own peak is recorded separately, before the first step). The first
   step (count 0) refreshes every projector (with ``--svd subspace``, the default,
   that first refresh is the randomized one);
3. after those figures are written, one more step with the GaLore count set to
   ``T``: the refresh every later period pays (with ``--svd subspace`` the
   warm-started power step), timed, and the peak after it.

An out-of-memory error is a result ("OOM"), not a crash of the script. Defaults
are the issue's two targets: ``llama_7b`` and ``llama_1b`` with 8-bit GaLore,
bf16, token batch 1 x 256, under 24 GB. ``--cpu-smoke`` runs the same harness
on ``llama_tiny`` on the CPU (the cap is then not enforced: the CPU backend has
no pool; the peak comes from the live-buffer count instead).

    python experiments/gpu_memory_check.py --json $OUT/memory_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the GPU image has galore_jax only as this checkout
  sys.path.insert(0, str(REPO))

CASES = {
  # name: (model, rank, batch, remat)
  "llama_7b": ("llama_7b", 1024, 1, "full"),
  "llama_7b_16x256": ("llama_7b", 1024, 16, "full"),
  "llama_1b": ("llama_1b", 512, 1, "full"),
  "llama_7b_no_remat": ("llama_7b", 1024, 1, "none"),
}


def run_case(
  model: str,
  rank: int,
  batch: int,
  remat: str,
  steps: int,
  seq_len: int,
  vocab: int,
  svd: str = "subspace",
  compile_cache: str | None = None,
  first_step_only: bool = False,
  optimizer: str = "galore_adamw8bit",
  per_layer_clip: bool = False,
  refresh_programs: str = "auto",
):
  """In the capped child process: plan, then train ``steps`` steps; returns a dict.

  With ``compile_cache`` JAX's persistent compilation cache is on in that directory (as
  the CLI's default); ``first_step_only`` stops after the first step (a second start's
  measurement: seconds from the parent's spawn to the first step's result).
  ``per_layer_clip``: ``--grad-clip 1 --per-layer-clip`` (the clip's second backward pass).
  ``refresh_programs``: the trainer's ``--refresh-programs``.
  """
  import jax

  if compile_cache:
    from galore_jax import compile_cache as cache

    cache.enable(compile_cache)
  import jax.numpy as jnp
  import numpy as np

  from galore_jax import optimizer as galore
  from galore_jax import plan, train

  cfg = train.TrainConfig(
    model=model,
    optimizer=optimizer,
    rank=rank,
    batch_size=batch,
    seq_len=seq_len,
    remat=remat,
    param_dtype="bfloat16",
    dtype="bfloat16",
    steps=max(steps, 10),
    update_proj_gap=200,
    svd=svd,
    refresh_programs=refresh_programs,
    progress=False,
    grad_clip=1.0 if per_layer_clip else 0.0,
    per_layer_clip=per_layer_clip,
  )
  out: dict = {
    "model": model,
    "optimizer": optimizer,
    "per_layer_clip": per_layer_clip,
    "rank": rank,
    "batch": batch,
    "seq_len": seq_len,
    "remat": remat,
    "svd": svd,
  }
  device = jax.devices()[0]
  run = train.setup(cfg, vocab_size=vocab)
  rng = np.random.default_rng(0)

  def random_batch():
    tokens = rng.integers(0, vocab, size=(1, batch, seq_len + 1), dtype=np.int32)
    return {
      "inputs": jnp.asarray(tokens[..., :-1]),
      "targets": jnp.asarray(tokens[..., 1:]),
      "mask": jnp.ones((1, batch, seq_len), jnp.float32),
    }

  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), random_batch())
  args = (run.abstract_params, run.abstract_opt, spec, train.LR_SPEC)
  lr = np.float32(cfg.peak_lr)  # (the steps' rate: not part of the programs measured)
  # The trainer's programs: on a GPU with GaLore's synchronous schedule one for refresh
  # steps and one without refresh code (train.refresh_programs), each compiled when first
  # needed, as the trainer does. With the compilation cache, as the CLI: through the
  # traced-step cache, so a second start neither traces nor compiles (its lower_seconds:
  # deserializing).
  split = train.refresh_programs(cfg) == 2
  programs = train.cached_train_step(run) if compile_cache and split else None  # builds none
  compiled: dict = {}

  def program(name: str):
    """The compiled program ``name`` ("scheduled", "due", "not_due"), built on first use."""
    if name not in compiled:
      t0 = time.perf_counter()
      if programs is not None:
        step_fn = programs.program(name, args)
      elif compile_cache:
        step_fn = train.cached_train_step(run, args=args)
      else:
        step_fn = train.compile_train_step(run, name)
      lowered = step_fn.lower(*args)
      t1 = time.perf_counter()
      compiled[name] = lowered.compile()
      out.setdefault("programs", {})[name] = {
        "lower_seconds": round(t1 - t0, 1),
        "compile_seconds": round(time.perf_counter() - t1, 1),
      }
    return compiled[name]

  def for_count(count: int):
    if not split:
      return program("scheduled")
    return program(train.RefreshPrograms.name_for(count, cfg.update_proj_gap))

  # The first program: a resume's first step (count 1, below) does not refresh; with two
  # programs a fresh start also begins with the plain one here, so that the steady figures
  # (and the plain program's compile time) are safe before the refresh program compiles;
  # its first refresh (count 0) is timed last. With one program, a fresh start steps from
  # count 0 as the trainer does. Each plan is the compiler's prediction for that program.
  first = 1 if first_step_only or split else 0
  step = for_count(first)
  name = next(iter(compiled))
  memory = plan.compiled_memory(step)
  out.update(
    lower_seconds=out["programs"][name]["lower_seconds"],
    compile_seconds=out["programs"][name]["compile_seconds"],
    planned_peak_bytes=memory["peak_bytes"],
    planned_temp_bytes=memory["temp_bytes"],
    planned_program=name,
    planned_source=f"memory_analysis ({jax.default_backend()})",
    weights_bytes=galore.state_bytes(run.abstract_params),
    optimizer_bytes=galore.state_bytes(run.abstract_opt),
  )
  print("PROGRESS " + json.dumps(out), flush=True)
  params, opt_state = train.init_state(run)
  jax.block_until_ready((params, opt_state))
  after_init = device.memory_stats() or {}
  out.update(
    init_bytes_in_use=after_init.get("bytes_in_use"),
    init_peak_bytes=after_init.get("peak_bytes_in_use"),
  )
  times = []
  spawned = float(os.environ.get("GPU_MEMORY_CHECK_SPAWN", "nan"))
  if first:
    # A second start stands for a resume, whose first step is a plain one (or a warm
    # refresh at a multiple of T), not count 0's first refresh from a random start (its
    # Rayleigh-Ritz eigh: 12 s of the 7B first step on an H200).
    opt_state = galore.with_galore_count(opt_state, 1)
    jax.block_until_ready(opt_state)
  for i in range(1 if first_step_only else steps):
    batch_arrays = random_batch()
    step = for_count(first + i)  # (the steps are not skipped: counts advance by one)
    out.setdefault("first_step_start_since_spawn_s", round(time.time() - spawned, 1))
    t = time.perf_counter()
    params, opt_state, m = step(params, opt_state, batch_arrays, lr)
    jax.block_until_ready((params, opt_state, m))
    times.append(time.perf_counter() - t)
    out.setdefault("losses", []).append(float(m["loss"]))
    out.setdefault("first_step_since_spawn_s", round(time.time() - spawned, 1))
  stats = device.memory_stats() or {}
  out.update(
    backend=jax.default_backend(),
    device=str(device.device_kind),
    first_step_seconds=round(times[0], 3),
    seconds_per_step=round(float(np.median(times[1:])), 3) if len(times) > 1 else None,
    peak_bytes_in_use=stats.get("peak_bytes_in_use"),
    bytes_limit=stats.get("bytes_limit"),
  )
  print("PROGRESS " + json.dumps(out), flush=True)
  if first_step_only:
    return out
  if split:  # the refresh program: its compile time and plan, before it runs
    memory = plan.compiled_memory(for_count(0))
    out.update(planned_peak_bytes_refresh=memory["peak_bytes"])
    print("PROGRESS " + json.dumps(out), flush=True)
  # A later period's refresh (count = T), after the steady figures are safe.
  opt_state = galore.with_galore_count(opt_state, cfg.update_proj_gap)
  step = for_count(cfg.update_proj_gap)
  t = time.perf_counter()
  params, opt_state, m = step(params, opt_state, random_batch(), lr)
  jax.block_until_ready((params, opt_state, m))
  stats = device.memory_stats() or {}
  out.update(
    refresh_step_seconds=round(time.perf_counter() - t, 3),
    refresh_loss=float(m["loss"]),
    peak_bytes_after_refresh=stats.get("peak_bytes_in_use"),
  )
  if split:  # a fresh run's first step: the first refresh (count 0), from a random start
    print("PROGRESS " + json.dumps(out), flush=True)
    opt_state = galore.with_galore_count(opt_state, 0)
    t = time.perf_counter()
    params, opt_state, m = for_count(0)(params, opt_state, random_batch(), lr)
    jax.block_until_ready((params, opt_state, m))
    out.update(first_refresh_seconds=round(time.perf_counter() - t, 3))
  return out


def child(args) -> int:
  try:
    result = run_case(
      args.model,
      args.rank,
      args.batch,
      args.remat,
      args.steps,
      args.seq_len,
      args.vocab_size,
      args.svd,
      args.compile_cache,
      args.first_step_only,
      args.optimizer,
      args.per_layer_clip,
      args.refresh_programs,
    )
  except Exception as e:  # noqa: BLE001 - reported, including out-of-memory
    text = f"{type(e).__name__}: {e}"
    result = {
      "model": args.model,
      "error": ("OOM: " if "RESOURCE_EXHAUSTED" in text else "") + text[:2000],
    }
  print("RESULT " + json.dumps(result), flush=True)
  return 0


def device_memory() -> int | None:
  """Total memory of GPU 0 in bytes (nvidia-smi), or None without a GPU."""
  try:
    text = subprocess.run(
      ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
      capture_output=True,
      text=True,
      timeout=30,
      check=True,
    ).stdout
    return int(text.split()[0]) * 2**20
  except (OSError, subprocess.SubprocessError, ValueError, IndexError):
    return None


def parent(args) -> int:
  total = device_memory()
  cap = int(float(args.cap_gb) * 1e9)
  names = args.cases.split(",")
  if args.cpu_smoke:
    names = ["smoke"]
  results = []
  deadline = time.monotonic() + args.budget if args.budget else None
  for name in names:
    if args.cpu_smoke:
      model, rank, batch, remat = "llama_tiny", 32, 1, "none"
    elif name in CASES:
      model, rank, batch, remat = CASES[name]
    else:
      raise SystemExit(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if total:
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(cap / total, 0.95):.4f}"
    cmd = [
      sys.executable,
      __file__,
      "--child",
      "--model", model,
      "--rank", str(rank),
      "--batch", str(batch),
      "--remat", remat,
      "--steps", str(args.steps),
      "--seq-len", str(args.seq_len),
      "--vocab-size", str(args.vocab_size if not args.cpu_smoke else 512),
      "--svd", args.svd,
      "--optimizer", args.optimizer,
      "--refresh-programs", args.refresh_programs,
    ]  # fmt: skip
    if args.per_layer_clip:
      cmd.append("--per-layer-clip")
    if args.compile_cache:
      cmd += ["--compile-cache", args.compile_cache]
    # A second start of the same configuration: the cache the first run filled.
    runs = [(name, cmd)]
    if args.second_start and args.compile_cache:
      runs.append((name + ":second_start", cmd + ["--first-step-only"]))
    for label, run_cmd in runs:
      timeout = args.timeout
      if deadline is not None:
        timeout = min(timeout, int(deadline - time.monotonic()))
        if timeout < 20:
          results.append({"case": label, "model": model, "error": "skipped: --budget spent"})
          print(format_row(results[-1]), flush=True)
          continue
      t = time.perf_counter()
      env["GPU_MEMORY_CHECK_SPAWN"] = repr(time.time())
      try:
        proc = subprocess.run(run_cmd, env=env, capture_output=True, text=True, timeout=timeout)
        result = _child_result(proc.stdout, proc.stderr)
      except subprocess.TimeoutExpired as e:
        result = _child_result(e.stdout, None)
        result["error"] = f"timeout after {timeout} s"
      result.update(case=label, wall_seconds=round(time.perf_counter() - t, 1), cap_bytes=cap)
      results.append(result)
      print(format_row(result), flush=True)
      if args.json:  # after every run: an outer timeout keeps what was measured
        with open(args.json, "w") as f:
          doc = {"device_memory_bytes": total, "cap_bytes": cap, "results": results}
          json.dump(doc, f, indent=1)
  return 0


def _child_result(stdout, stderr) -> dict:
  """The child's RESULT line, else its last PROGRESS line (what it got to), else stderr."""
  if isinstance(stdout, bytes):
    stdout = stdout.decode(errors="replace")
  lines = (stdout or "").splitlines()
  for tag in ("RESULT ", "PROGRESS "):
    found = [ln for ln in lines if ln.startswith(tag)]
    if found:
      result = json.loads(found[-1][len(tag) :])
      if tag == "PROGRESS ":
        result["error"] = "no result: " + (stderr or "")[-1500:]
      return result
  return {"error": (stderr or "no output")[-2000:]}


def format_row(r: dict) -> str:
  gb = lambda b: f"{b / 1e9:.2f} GB" if isinstance(b, int | float) else "n/a"
  if "error" in r:
    got = f" (compiled: planned {gb(r['planned_peak_bytes'])})" if "planned_peak_bytes" in r else ""
    return f"{r['case']:<24} ERROR{got} {r['error'][:300]}"
  clip = " --per-layer-clip" if r.get("per_layer_clip") else ""
  return (
    f"{r['case']:<24} {r.get('optimizer')}{clip}: planned {gb(r['planned_peak_bytes'])} "
    f"({r['planned_source']}), "
    f"measured peak_bytes_in_use {gb(r['peak_bytes_in_use'])} (limit {gb(r['bytes_limit'])}; "
    f"after init {gb(r['init_peak_bytes'])}), {r['seconds_per_step']} s/step, "
    f"lower {r.get('lower_seconds')} s + compile {r['compile_seconds']} s, first step "
    f"started {r.get('first_step_start_since_spawn_s')} s and done "
    f"{r.get('first_step_since_spawn_s')} s after spawn ({r.get('first_step_seconds')} s), "
    f"losses {[round(x, 3) for x in r['losses']]}"
    + (
      f"; refresh step (count T, svd {r.get('svd')}) {r['refresh_step_seconds']} s, "
      f"peak after it {gb(r['peak_bytes_after_refresh'])}"
      if "refresh_step_seconds" in r
      else ""
    )
    + (
      f"; the refresh program (lower {r['programs']['due']['lower_seconds']} s + compile "
      f"{r['programs']['due']['compile_seconds']} s) planned {gb(r['planned_peak_bytes_refresh'])}"
      if "planned_peak_bytes_refresh" in r
      else ""
    )
    + (
      f"; first refresh (count 0) {r['first_refresh_seconds']} s"
      if "first_refresh_seconds" in r
      else ""
    )
  )


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--cases", default="llama_7b,llama_1b", help=", ".join(CASES))
  ap.add_argument("--cap-gb", default="24", help="memory cap in GB (the paper's RTX 4090)")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--seq-len", type=int, default=256)
  ap.add_argument("--vocab-size", type=int, default=32000)
  ap.add_argument("--timeout", type=int, default=400, help="seconds per case at most")
  ap.add_argument("--budget", type=int, default=0, help="seconds for all cases (0: no bound)")
  ap.add_argument("--json", default=None)
  ap.add_argument("--svd", default="subspace", choices=("exact", "randomized", "subspace"))
  ap.add_argument(
    "--optimizer",
    default="galore_adamw8bit",
    help="the trainer's --optimizer (default: 8-bit GaLore, the paper's 24 GB setup)",
  )
  ap.add_argument(
    "--refresh-programs",
    default="auto",
    choices=("auto", "one", "two"),
    help="the trainer's --refresh-programs (auto: two programs on a GPU, one elsewhere)",
  )
  ap.add_argument(
    "--per-layer-clip",
    action="store_true",
    help="train with --grad-clip 1 --per-layer-clip (a second backward pass per step)",
  )
  ap.add_argument(
    "--compile-cache",
    default=None,
    help="JAX persistent compilation cache directory for the runs (default: off)",
  )
  ap.add_argument(
    "--second-start",
    action="store_true",
    help="with --compile-cache: start each case again up to its first step (issue #16)",
  )
  ap.add_argument("--cpu-smoke", action="store_true")
  ap.add_argument("--first-step-only", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--model", help=argparse.SUPPRESS)
  ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
  ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  ap.add_argument("--remat", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  from galore_jax.config import OPTIMIZERS  # imports jax; initialises no device

  if args.optimizer not in OPTIMIZERS:
    ap.error(f"--optimizer: unknown {args.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
  return child(args) if args.child else parent(args)


if __name__ == "__main__":
  sys.exit(main())
