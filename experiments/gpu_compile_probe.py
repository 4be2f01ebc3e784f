"""Where the GaLore train step's GPU compile time goes: the same step compiled under
several refresh methods and XLA flag sets, each in a fresh process.

Per variant (``svd`` and extra ``XLA_FLAGS``): lowering and compile seconds of the
trainer's step (``llama_1b`` by default, bf16, 16 x 256, rank 512, the trainer's own
per-layer step), then, if it compiled in time, the median of ``--steps`` plain steps and
one refresh step at count ``T`` (the refresh every later period pays). Results go to
``--json`` after every variant, so a timeout keeps what was measured.

    python experiments/gpu_compile_probe.py --json $OUT/compile_probe.json \\
        --log $OUT/compile_probe.log \\
        --variants "exact|,subspace|--xla_gpu_autotune_level=0,subspace:nofallback|"

``--log`` keeps every variant's stderr, timed-out ones included, under a header line: where
XLA says what it spent the time on. A variant whose flags include
``--xla_gpu_print_compilation_stats`` runs with ``TF_CPP_MIN_LOG_LEVEL=0``, so XLA's per-pass
compile statistics reach that log (the H200 run of 2026-11-28 timed out compiling the subspace
step without saying where: 96.6 s with autotuning off, against 41.5 s for exact).

A variant is ``svd[:patch]|xla flags``; the patch ``nofallback`` replaces
``projector.orthonormalize`` by CholeskyQR2 alone (what its fallback branches cost), and
``weightwise`` makes the per-layer step update (and refresh) one weight at a time even where
the trainer refreshes a stage's same-shaped weights together (``steps.refreshes_together``).
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
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
  sys.path.append(HERE)


def child(args) -> dict:
  import numpy as np
  from gpu_bench_jax import _import_trainer, _JaxCase, _train_config

  train, model_lib, galore, _ = _import_trainer()
  out: dict = {"svd": args.svd, "xla_flags": os.environ.get("XLA_FLAGS", ""), "patch": args.patch}
  if args.patch == "nofallback":  # CholeskyQR2 alone: what the fallback branches cost to compile
    import jax.numpy as jnp

    from galore_jax import projector

    def cholesky_qr2_only(x):
      x = x.astype(jnp.float32)
      norms = jnp.linalg.norm(x, axis=-2, keepdims=True)
      return projector._cholesky_qr2(x / jnp.where(norms > 0, norms, 1.0))[0]

    projector.orthonormalize = cholesky_qr2_only
  elif args.patch == "weightwise":  # one refresh program per weight, not per unit
    from galore_jax import steps

    steps.refreshes_together = lambda cfg: False
  elif args.patch:
    raise ValueError(f"unknown patch {args.patch!r} (nofallback, weightwise)")
  # The bench's own case (gpu_bench_jax): trainer setup, random tokens, timed lowering and
  # compile, steps at chosen GaLore counts.
  spec = dict(
    model=args.model,
    rank=args.rank,
    update_proj_gap=200,
    galore_scale=0.25,
    lr=0.01,
    batch_size=args.batch,
    seq_len=args.seq_len,
    dtype="bfloat16",
    vocab_size=32000,
  )
  cfg = _train_config(spec, train, optimizer=args.optimizer, svd=args.svd)

  def progress(lower_s=None, compile_s=None, lowered_ops=None, programs=None, **_):
    if lowered_ops is not None:
      out["lowered_ops"] = lowered_ops
    if programs is not None:  # two programs (a GPU's default): each one's times
      out["programs"] = {k: {n: round(v, 1) for n, v in t.items()} for k, t in programs.items()}
    if lower_s is not None:  # the case's compile_s counts from the start of lowering
      out.update(lower_s=round(lower_s, 1), compile_s=round(compile_s - lower_s, 1))
      print("PROGRESS " + json.dumps(out), flush=True)

  case = _JaxCase(spec, cfg, train, model_lib, galore, progress=progress, count_ops=True)
  from galore_jax import xla_memory

  # XLA's plan for the compiled step (refresh included): what refreshing together costs.
  # (On a GPU the trainer's step is two programs: the refresh one, compiled here.)
  memory = xla_memory.compiled_memory(case.program(0))
  out.update(temp_bytes=memory["temp_bytes"], planned_peak_bytes=memory["peak_bytes"])
  print("PROGRESS " + json.dumps(out), flush=True)
  if args.compile_only:
    return out
  timed = case.timed_step
  out["first_refresh_s"] = round(timed(0), 3)  # the first refresh (count 0)
  times = [timed(1 + i) for i in range(args.steps + 2)][2:]
  out["step_s"] = round(float(np.median(times)), 5)
  print("PROGRESS " + json.dumps(out), flush=True)
  refresh = [timed(200 * k) for k in (1, 2)]
  out["refresh_s"] = [round(x, 4) for x in refresh]
  out["refresh_over_step"] = round(min(refresh) / out["step_s"], 3)
  return out


def parent(args) -> int:
  results = []
  deadline = time.monotonic() + args.budget
  if args.log:
    Path(args.log).write_text("")
  for spec in args.variants.split(","):
    svd, _, flags = spec.partition("|")
    svd, _, patch = svd.partition(":")
    left = int(deadline - time.monotonic())
    if left < 30:
      results.append({"svd": svd, "xla_flags": flags, "error": "skipped: budget spent"})
      continue
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    if "print_compilation_stats" in flags:  # XLA prints them as INFO log lines
      env["TF_CPP_MIN_LOG_LEVEL"] = "0"
    cmd = [sys.executable, __file__, "--child", "--svd", svd, "--model", args.model]
    cmd += ["--rank", str(args.rank), "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    cmd += ["--optimizer", args.optimizer, "--steps", str(args.steps), "--patch", patch]
    cmd += ["--compile-only"] if args.compile_only else []
    t = time.perf_counter()
    try:
      proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=min(args.timeout, left)
      )
      stdout, err, log = proc.stdout, proc.stderr, proc.stderr
    except subprocess.TimeoutExpired as e:
      text = lambda x: x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
      stdout, log = text(e.stdout), text(e.stderr)
      err = f"timeout after {min(args.timeout, left)} s"
    if args.log:
      with open(args.log, "a") as f:
        f.write(f"==== variant {spec!r}: {' '.join(cmd[2:])}\n{log or ''}\n")
    lines = [ln for ln in (stdout or "").splitlines() if ln.startswith(("RESULT ", "PROGRESS "))]
    res = json.loads(lines[-1].split(" ", 1)[1]) if lines else {"svd": svd, "xla_flags": flags}
    if not lines or not lines[-1].startswith("RESULT "):
      res["error"] = (err or "")[-1500:]
    res["wall_s"] = round(time.perf_counter() - t, 1)
    results.append(res)
    print(json.dumps(res), flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"model": args.model, "results": results}, f, indent=1)
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variants", default="exact|,subspace|")
  p.add_argument("--model", default="llama_1b")
  p.add_argument("--optimizer", default="galore_adamw")
  p.add_argument("--rank", type=int, default=512)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--timeout", type=int, default=150, help="seconds per variant")
  p.add_argument("--budget", type=int, default=400, help="seconds for all variants")
  p.add_argument("--json", default=None)
  p.add_argument("--log", default=None, help="append each variant's stderr here")
  p.add_argument("--compile-only", action="store_true", help="no steps, only lower + compile")
  p.add_argument("--child", action="store_true")
  p.add_argument("--svd", default="subspace")
  p.add_argument("--patch", default="", help="nofallback or weightwise (see above)")
  args = p.parse_args(argv)
  if args.child:
    try:
      res = child(args)
    except Exception as e:  # noqa: BLE001 - reported to the parent
      print(json.dumps({"error": f"{type(e).__name__}: {e}"[:1500]}), file=sys.stderr)
      return 1
    print("RESULT " + json.dumps(res), flush=True)
    return 0
  return parent(args)


if __name__ == "__main__":
  sys.exit(main())
