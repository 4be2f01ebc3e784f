"""XLA's per-device temporaries of the 8-bit update under FSDP (README: "8-bit states under FSDP").

Compiles the trainer's per-layer step (``train.compile_train_step``, abstract inputs, no
allocation) on a mesh of host CPU devices and prints, per variant, XLA's temp bytes and the
largest all-gathers of the compiled program:

  trainer      what ``galore-jax train`` runs: 8-bit leaves unchunked, gradient and block
               rows constrained to the FSDP shardings (``config.adam8bit_layout``)
  chunked      the one-device layout on the mesh: chunks of ``adam8bit.CHUNK_SIZE``
               elements, no constraint (XLA all-gathers the sharded code arrays)
  unchunked    no chunks, no constraint (XLA may all-gather the logits for the LM head)
  float32      float32 GaLore (or AdamW) on the same mesh, for comparison

Usage (each compile takes 10-60 s on a 2-core CPU):
  python experiments/fsdp_8bit_memory.py --model llama_130m --mesh fsdp=8 --dtype bfloat16
  python experiments/fsdp_8bit_memory.py --model llama_60m --mesh data=2,fsdp=4 --dtype float32
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

VARIANTS = ("trainer", "chunked", "unchunked", "float32")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="llama_130m")
  p.add_argument("--mesh", default="fsdp=8")
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument(
    "--optimizer", default="galore_adamw8bit", choices=["galore_adamw8bit", "adamw8bit"]
  )
  p.add_argument("--rank", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--variants", default=",".join(VARIANTS))
  args = p.parse_args(argv)
  variants = [v for v in args.variants.split(",") if v]
  if unknown := set(variants) - set(VARIANTS):
    p.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

  from galore_jax import cli, config

  devices = config.parse_mesh(args.mesh)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  cli._host_devices(devices[0] * devices[1])  # as `galore-jax plan --mesh` asks for them

  import numpy as np

  from galore_jax import adam8bit, train, xla_memory

  plain = adam8bit.scale_by_adam8bit
  forced = {
    "trainer": {},
    "chunked": {"chunk_size": adam8bit.CHUNK_SIZE, "rows_sharding": None},
    "unchunked": {"chunk_size": None, "rows_sharding": None},
  }
  print(
    f"{args.model}, {args.optimizer}, mesh {args.mesh}, {args.dtype}, rank {args.rank}, "
    f"{args.batch_size} x {args.seq_len} tokens, --remat full; per device"
  )
  for variant in variants:
    optimizer = args.optimizer
    if variant == "float32":
      optimizer = optimizer.removesuffix("8bit")
    else:
      adam8bit.scale_by_adam8bit = lambda _f=forced[variant], **kw: plain(**{**kw, **_f})
    cfg = train.TrainConfig(
      model=args.model,
      optimizer=optimizer,
      rank=args.rank,
      svd="exact",  # as the README's figures were taken (the trainer's default is subspace)
      mesh=args.mesh,
      batch_size=args.batch_size,
      seq_len=args.seq_len,
      param_dtype=args.dtype,
      dtype=args.dtype,
      remat="full",
      progress=False,
      out=os.devnull,
    )
    run = train.setup(cfg, vocab_size=32000)
    batch = train.abstract_batch(run)
    compiled = (
      train.compile_train_step(run)
      .lower(run.abstract_params, run.abstract_opt, batch, train.LR_SPEC)
      .compile()
    )
    adam8bit.scale_by_adam8bit = plain
    gathers = collections.Counter(
      re.findall(r"= (\w+\[[\d,]*\])[^ ]* all-gather\(", compiled.as_text())
    )
    size = lambda s: int(np.prod([int(d) for d in s[s.index("[") + 1 : -1].split(",") if d]))
    largest = sorted(gathers, key=size, reverse=True)[:4]
    temp = xla_memory.compiled_memory(compiled)["temp_bytes"]
    shown = ", ".join(f"{g} x{gathers[g]}" for g in largest)
    print(f"  {variant:<10} temp {temp / 1e6:8.1f} MB   largest all-gathers: {shown}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
