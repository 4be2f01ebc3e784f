"""Seconds to trace and to lower the trainer's train step, and the lowered module's size, on
abstract inputs (no weights are allocated; nothing is compiled). Each run is one fresh
process's figure: alternate old and new code in separate runs to compare (this machine's
speed drifts).

    python experiments/trace_time.py --model llama_7b --optimizer galore_adamw8bit
    python experiments/trace_time.py --model llama_7b --optimizer adamw --layers 8,16,32

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

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


def measure(model: str, optimizer: str, rank: int, layers: int | None, vocab: int) -> dict:
  from galore_jax import config, trainer

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
    traced = trainer.compile_train_step(run).trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
  return {
    "model": model,
    "optimizer": optimizer,
    "layers": model_cfg.num_layers,
    "trace_s": round(t1 - t0, 2),
    "lower_s": round(t2 - t1, 2),
    "lowered_lines": len(lowered.as_text().splitlines()),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="llama_7b")
  p.add_argument("--optimizer", default="galore_adamw8bit")
  p.add_argument("--rank", type=int, default=1024)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument(
    "--layers", default=None, help="comma-separated layer counts (default: the model's)"
  )
  args = p.parse_args(argv)
  counts = [int(x) for x in args.layers.split(",")] if args.layers else [None]
  for layers in counts:
    print(
      json.dumps(measure(args.model, args.optimizer, args.rank, layers, args.vocab)), flush=True
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
