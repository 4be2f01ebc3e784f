"""Seconds to trace and to lower the trainer's train step, and the lowered module's size, on
abstract inputs (no weights are allocated), and with ``--compile`` the seconds XLA takes to
compile it for this process's backend. Each run is one fresh process's figure: alternate
old and new code in separate runs to compare (this machine's speed drifts).

    python experiments/trace_time.py --model llama_7b --optimizer galore_adamw8bit
    python experiments/trace_time.py --model llama_7b --optimizer adamw --layers 8,16,32
    python experiments/trace_time.py --model llama_1b --rank 512 --layers 2,6 --compile

With several ``--layers`` counts and ``--compile``, a last line gives the seconds each layer
adds (least squares over the counts) and what that predicts at the model's own depth: the
part of the compile time that grows with the unrolled blocks (what compiling one block for
all of them, e.g. a scan over stacked layers, would save). ``--refresh due`` / ``not_due``
measures one of the two programs the trainer compiles on a GPU (``trainer.refresh_programs``).
JAX's persistent compilation cache is bypassed, so every compile is a real one.

Defaults: rank 1024, 1 x 256 tokens, remat full, bfloat16, svd subspace (the 24 GB setup).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


def measure(
  model: str,
  optimizer: str,
  rank: int,
  layers: int | None,
  vocab: int,
  with_compile: bool = False,
  refresh: str = "scheduled",
) -> dict:
  from galore_jax import compile_cache, config, trainer

  cfg = config.TrainConfig(
    model=model,
    optimizer=optimizer,
    rank=rank,
    batch_size=1,
    seq_len=256,
    remat="full",
    svd="subspace",
    param_dtype="bfloat16",
    dtype="bfloat16",
  )
  model_cfg = config.model_config(cfg, vocab)
  if layers is not None:
    model_cfg = dataclasses.replace(model_cfg, num_layers=layers)
  run = trainer.setup(cfg, vocab, model_cfg=model_cfg)
  args = (run.abstract_params, run.abstract_opt, trainer.abstract_batch(run), trainer.LR_SPEC)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    t0 = time.perf_counter()
    traced = trainer.compile_train_step(run, refresh).trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    if with_compile:
      with compile_cache.bypassed():
        lowered.compile()
    t3 = time.perf_counter()
  row = {
    "model": model,
    "optimizer": optimizer,
    "refresh": refresh,
    "layers": model_cfg.num_layers,
    "trace_s": round(t1 - t0, 2),
    "lower_s": round(t2 - t1, 2),
    "lowered_lines": len(lowered.as_text().splitlines()),
  }
  if with_compile:
    row["compile_s"] = round(t3 - t2, 2)
    row["backend"] = jax.default_backend()
  return row


def per_layer(rows: list[dict], model_layers: int) -> dict:
  """Seconds each layer adds to tracing, lowering and compiling (least-squares slopes over
  the rows' layer counts), and the compile time they predict at ``model_layers``."""
  x = np.array([r["layers"] for r in rows], float)
  out: dict = {"layers_measured": [r["layers"] for r in rows], "model_layers": model_layers}
  for key in ("trace_s", "lower_s", "compile_s"):
    slope, intercept = np.polyfit(x, [r[key] for r in rows], 1)
    out[f"{key}_per_layer"] = round(float(slope), 3)
    out[f"{key}_fixed"] = round(float(intercept), 2)
  out["compile_s_predicted"] = round(
    out["compile_s_fixed"] + out["compile_s_per_layer"] * model_layers, 1
  )
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="llama_7b")
  p.add_argument("--optimizer", default="galore_adamw8bit")
  p.add_argument("--rank", type=int, default=1024)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument(
    "--layers", default=None, help="comma-separated layer counts (default: the model's)"
  )
  p.add_argument("--compile", action="store_true", help="also compile the lowered step")
  p.add_argument("--refresh", default="scheduled", choices=("scheduled", "due", "not_due"))
  args = p.parse_args(argv)
  counts = [int(x) for x in args.layers.split(",")] if args.layers else [None]
  if args.compile:  # the backend's one-time start-up, out of the first count's figure
    jax.jit(lambda x: x + 1).lower(1.0).compile()
  rows = []
  for layers in counts:
    rows.append(
      measure(args.model, args.optimizer, args.rank, layers, args.vocab, args.compile, args.refresh)
    )
    print(json.dumps(rows[-1]), flush=True)
  if args.compile and len(set(counts)) > 1 and None not in counts:
    from galore_jax import model as model_lib

    print(json.dumps(per_layer(rows, model_lib.get_config(args.model).num_layers)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
