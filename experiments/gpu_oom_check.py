"""Out of device memory in the middle of a run, on a real GPU: what `train` saves.

`galore_jax.trainer` saves the last whole step when the device runs out of memory, if that
step's arrays are still intact; a failed step may have consumed its donated inputs, and
whether XLA's GPU runtime does so is what this measures (CPU tests inject the error).

A run of `--model` (default llama_130m, bf16) under a small memory pool
(XLA_PYTHON_CLIENT_MEM_FRACTION, `--fraction`) fills the pool before step `--at + 1`
(a `Hooks.after_step` callback allocates what the pool has left after step `--at`:
callbacks before a step may replace the state, and train then saves none), so that step's
temporaries cannot be allocated. Reported in `--json`: the error's message, whether step
`--at` was saved, and whether the same run then resumes from it to `--steps`.

Synthetic tokens and the bundled tokenizer, no grain or tensorflow-datasets (the GPU image
has neither); TensorBoard is skipped where tensorboardX is missing.

  python experiments/gpu_oom_check.py --json /tmp/oom.json            # on a GPU
  python experiments/gpu_oom_check.py --cpu-smoke --json /tmp/oom.json   # the logic, on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the GPU image has galore_jax only as this checkout
  sys.path.insert(0, str(REPO))
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # gpu_bench_common, when this file is imported by path
  sys.path.append(HERE)

import gpu_bench_common as common  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="llama_130m")
  p.add_argument("--fraction", type=float, default=0.10, help="of the GPU for JAX's pool")
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--at", type=int, default=3, help="fill the pool after this step")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--out", default=None, help="run directory (default: a temporary one)")
  p.add_argument("--json", default=None)
  p.add_argument(
    "--cpu-smoke",
    action="store_true",
    help="llama_tiny on the CPU, the error injected as the CPU tests do",
  )
  return p.parse_args(argv)


def write(path, result):
  print(json.dumps(result, indent=1))
  if path:
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.cpu_smoke:
    os.environ["JAX_PLATFORMS"] = "cpu"
  else:  # a small pool: cheap to fill
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{args.fraction:.3f}")
  import jax
  import jax.numpy as jnp

  from galore_jax import trainer
  from galore_jax.config import TrainConfig

  common.tensorboard_optional()

  result = {"backend": jax.default_backend(), "device": str(jax.devices()[0])}
  out = args.out or tempfile.mkdtemp(prefix="gpu_oom_")
  shutil.rmtree(out, ignore_errors=True)
  # The same batches on resume.
  sp, train_ds, val = common.synthetic_data(args.batch_size, args.seq_len, batches=args.steps)
  model = "llama_tiny" if args.cpu_smoke else args.model
  dtype = "float32" if args.cpu_smoke else "bfloat16"
  cfg = TrainConfig(
    model=model,
    steps=args.steps,
    batch_size=args.batch_size,
    seq_len=args.seq_len,
    rank=16 if args.cpu_smoke else 128,
    update_proj_gap=2,
    svd="exact" if args.cpu_smoke else "subspace",  # smoke: the tests' cached step
    param_dtype=dtype,
    dtype=dtype,
    save_every=1000,
    eval_every=1000,
    eval_batches=1,
    progress=False,
    out=out,
  )
  hog = []

  def fill_the_pool(step, metrics):
    """Holds what the pool has left, in chunks of 256 MB down to 1 MB (a fragmented pool
    has no single free block of its whole room), so that the next step cannot allocate."""
    if step == args.at and not hog and not args.cpu_smoke:
      stats = jax.local_devices()[0].memory_stats() or {}
      result["pool_bytes"] = stats.get("bytes_limit")
      result["in_use_bytes"] = stats.get("bytes_in_use")
      for chunk in (1 << 28, 1 << 24, 1 << 20):
        while True:
          try:
            hog.append(jnp.zeros((chunk // 4,), jnp.float32).block_until_ready())
          except Exception:  # noqa: BLE001 - the pool is full at this size
            break
      result["filled_bytes"] = sum(x.nbytes for x in hog)

  patched = None
  if args.cpu_smoke:  # no pool to fill: the step fails as XLA's allocator does
    patched = trainer.cached_train_step

    def failing(run, hooks, log):
      step_fn, calls = patched(run, hooks, log), []

      def step(params, opt_state, b, lr):
        calls.append(1)
        if len(calls) == args.at + 1:
          raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: injected (--cpu-smoke)")
        return step_fn(params, opt_state, b, lr)

      return step

    trainer.cached_train_step = failing
  hooks = trainer.Hooks(data=(sp, train_ds, val), after_step=[fill_the_pool])
  t0 = time.perf_counter()
  try:
    trainer.train(cfg, log=print, hooks=hooks)
    result["out_of_memory"] = None  # the pool did not run out
  except trainer.OutOfMemory as e:
    result["out_of_memory"] = str(e)
  except Exception as e:  # noqa: BLE001 - recorded: what a user would have seen
    result["other_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
  result["first_run_s"] = round(time.perf_counter() - t0, 1)
  result["saved_step"] = os.path.isdir(os.path.join(out, "checkpoints", str(args.at)))
  write(args.json, result)
  hog.clear()
  if patched is not None:
    trainer.cached_train_step = patched

  if result["saved_step"]:  # the saved step resumes to the end
    t0 = time.perf_counter()
    try:
      summary = trainer.train(
        TrainConfig(**{**cfg.__dict__, "resume": True}),
        log=print,
        hooks=trainer.Hooks(data=(sp, train_ds, val)),
      )
      result["resumed"] = {"start_step": summary["start_step"], "step": summary["step"]}
    except Exception as e:  # noqa: BLE001
      result["resumed"] = f"{type(e).__name__}: {str(e)[:2000]}"
    result["resume_s"] = round(time.perf_counter() - t0, 1)
  write(args.json, result)
  if not args.out:
    shutil.rmtree(out, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
