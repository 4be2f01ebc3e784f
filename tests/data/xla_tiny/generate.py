"""Writes the XLA dump next to this file (tests/test_xla_memory.py reads it back).

    python tests/data/xla_tiny/generate.py

A tiny step compiled on the CPU exactly as the planner compiles the train step
(``xla_memory.compile_and_replay``: parameters and optimizer state donated,
``xla_dump_to``); only the three files the replay reads are kept. Its bf16 matmul is
what the CPU backend widens to float32. Regenerating with another XLA version changes
the files, and then the figures the test expects. Source paths in the HLO text are
written relative to the repository.
"""

import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

HERE = Path(__file__).resolve().parent
KEEP = ("after_optimizations.txt", "-live-range.txt", "-buffer-assignment.txt")


def step(params, opt_state, batch):
  h = jnp.tanh(batch @ params)
  loss = jnp.sum(h.astype(jnp.float32) ** 2)
  momentum = 0.9 * opt_state + params.astype(jnp.float32)
  return params - (0.1 * momentum).astype(params.dtype), momentum, loss


def main() -> int:
  jax.config.update("jax_enable_compilation_cache", False)  # a cache hit writes no dump
  sys.path.insert(0, str(HERE.parents[2]))
  from galore_jax import xla_memory

  args = (
    jax.ShapeDtypeStruct((16, 32), jnp.bfloat16),
    jax.ShapeDtypeStruct((16, 32), jnp.float32),
    jax.ShapeDtypeStruct((8, 16), jnp.bfloat16),
  )
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(*args)
  with tempfile.TemporaryDirectory() as tmp:
    out = xla_memory.compile_and_replay(lowered, keep_dump=tmp)
    for old in HERE.glob("*.txt"):
      old.unlink()
    for f in sorted(Path(tmp).iterdir()):
      if f.name.endswith(KEEP):  # source paths relative to the repository
        text = f.read_text().replace(f'"{HERE.parents[2]}/', '"')
        (HERE / f.name).write_text(text)
  print({k: v for k, v in out.items() if k.endswith("bytes") or k == "cpu_only_buffers"})
  return 0


if __name__ == "__main__":
  sys.exit(main())
