"""Packed instruction examples: how much of an epoch they save, and at what cost per step.

Builds an instruction set in Stanford Alpaca's form from the bundled corpus (the instruction
is a passage's opening words, 5-40 of them, the output the words that follow, log-normal
in length with a median of 60 words and a cap of 600, about Alpaca's own mix), written to
``<out>/alpaca_like.jsonl``, or reads ``--data``. Then, for each ``--seq-len``, packed
(the default) against one example per row (``--no-packing``), in one process:

* rows in an epoch of the training split, and the share of their tokens that is padding;
* seconds per step of the trainer's jitted step on the same model, optimizer and batch
  shape (median of ``--steps`` timed steps after two untimed ones; compile excluded), and
  from them the time of one epoch: rows / batch size x seconds per step;
* XLA's temporary memory for the compiled step (``memory_analysis``): what the attention
  mask of a packed batch adds;
* the validation loss of the same weights over every held-out example, packed and one per
  row: packing keeps examples apart, so the two must agree to float rounding.

Packing changes which examples share a batch, not what each contributes.

    python experiments/sft_packing.py --out /tmp/packing --seq-len 256 512 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from galore_jax import data, train, trainer  # noqa: E402


def alpaca_like(path: Path, n: int, seed: int = 0) -> Path:
  """``n`` Alpaca-form records cut from the bundled corpus's training documents."""
  words = " ".join(data.builtin_documents("train")).split()
  rng = np.random.default_rng(seed)
  with path.open("w") as f:
    for _ in range(n):
      k = int(rng.integers(5, 41))
      m = int(min(600, max(3, rng.lognormal(np.log(60), 0.9))))
      at = int(rng.integers(0, len(words) - k - m))
      record = {
        "instruction": " ".join(words[at : at + k]),
        "input": "",
        "output": " ".join(words[at + k : at + k + m]),
      }
      f.write(json.dumps(record) + "\n")
  return path


def padding_share(ds, batches: int) -> float:
  """Share of the padding in the first ``batches`` batches' input tokens."""
  pad = tot = 0
  for i in range(min(batches, ds.steps_per_epoch)):
    b = ds.batch(i)
    if "segments" in b:
      pad += int((b["segments"] == 0).sum())
    else:
      pad += int((b["inputs"] == ds.pad_id).sum())
    tot += b["inputs"].size
  return pad / tot


def measure(cfg: train.TrainConfig, steps: int) -> dict:
  ds = data.make_dataset(trainer.data_config(cfg, cfg.batch_size), "train")
  run = train.setup(cfg, ds.vocab_size)
  params, opt_state = train.init_state(run)
  step = trainer.compile_train_step(run)
  first = trainer.device_batch(run, ds.batch(0), 1)
  lr = np.float32(cfg.peak_lr)  # (the step's rate: not part of what is measured)
  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, first, lr).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  times = []
  for i in range(steps + 2):
    batch = trainer.device_batch(run, ds.batch(i), 1)
    t0 = time.perf_counter()
    params, opt_state, m = compiled(params, opt_state, batch, lr)
    float(m["loss"])
    if i >= 2:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  return {
    "examples": ds.num_documents,
    "rows": ds.num_examples,
    "padding": padding_share(ds, 20),
    "step_s": step_s,
    "epoch_s": ds.steps_per_epoch * step_s,
    "compile_s": compile_s,
    "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
    "run": run,
    "params": params,
  }


def eval_loss(cfg: train.TrainConfig, run, params) -> tuple[float, int]:
  batches = data.eval_batches(trainer.data_config(cfg, cfg.batch_size))
  loss, _ = trainer.evaluate(run, params, batches, trainer.compile_eval_step(run))
  return loss, len(batches)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="directory for the generated data")
  p.add_argument("--data", default=None, help="an instruction file set instead of the generated")
  p.add_argument("--records", type=int, default=5000, help="generated records (default 5000)")
  p.add_argument("--model", default="llama_tiny")
  p.add_argument("--seq-len", type=int, nargs="+", default=[256, 512])
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--steps", type=int, default=10, help="timed steps per case (default 10)")
  args = p.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  source = args.data or str(alpaca_like(out / "alpaca_like.jsonl", args.records))
  results = []
  for seq_len in args.seq_len:
    base = train.TrainConfig(
      model=args.model,
      data=source,
      seq_len=seq_len,
      batch_size=args.batch_size,
      optimizer="galore_adamw",
      rank=64,
      svd="exact",  # as the README's figures were taken (the trainer's default is subspace)
      steps=1000,
      out=str(out / "unused"),
    )
    cases = {}
    for packing in (True, False):
      cfg = dataclasses.replace(base, packing=packing)
      cases[packing] = measure(cfg, args.steps)
      cases[packing]["eval"] = eval_loss(cfg, cases[packing]["run"], cases[True]["params"])
    packed, one = cases[True], cases[False]
    row = {
      "seq_len": seq_len,
      "examples": packed["examples"],
      "rows_packed": packed["rows"],
      "rows_one_per_row": one["rows"],
      "padding_packed": round(packed["padding"], 4),
      "padding_one_per_row": round(one["padding"], 4),
      "step_s_packed": round(packed["step_s"], 4),
      "step_s_one_per_row": round(one["step_s"], 4),
      "step_time_ratio": round(packed["step_s"] / one["step_s"], 3),
      "epoch_time_ratio": round(packed["epoch_s"] / one["epoch_s"], 3),
      "temp_bytes_packed": packed["temp_bytes"],
      "temp_bytes_one_per_row": one["temp_bytes"],
      "eval_loss_packed": packed["eval"][0],
      "eval_loss_one_per_row": one["eval"][0],
      "eval_batches": [packed["eval"][1], one["eval"][1]],
    }
    results.append(row)
    print(json.dumps(row), flush=True)
  for r in results:
    print(
      f"seq_len {r['seq_len']}: {r['examples']} examples in {r['rows_packed']} packed rows vs "
      f"{r['rows_one_per_row']} (padding {100 * r['padding_packed']:.1f} % vs "
      f"{100 * r['padding_one_per_row']:.1f} %); step time x{r['step_time_ratio']}, epoch "
      f"time x{r['epoch_time_ratio']}; XLA temp {r['temp_bytes_packed'] / 2**20:.1f} vs "
      f"{r['temp_bytes_one_per_row'] / 2**20:.1f} MiB; eval loss {r['eval_loss_packed']:.6f} "
      f"vs {r['eval_loss_one_per_row']:.6f}"
    )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
