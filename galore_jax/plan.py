"""Former home of the memory planner, kept so ``from galore_jax import plan`` still works.

The planner is :mod:`galore_jax.memory_plan`; the XLA HLO parsing and live-range replay it
uses are :mod:`galore_jax.xla_memory`. ``Planned`` is now ``AbstractRun``. Every old name
resolves here: the public ones below, the private ones through ``__getattr__``.
"""

from __future__ import annotations

from galore_jax import memory_plan, xla_memory
from galore_jax.memory_plan import (  # noqa: F401
  DEFAULT_GPU_MEMORY,
  DEFAULT_VOCAB,
  GB,
  GIB,
  AbstractRun,
  Planned,
  activation_bytes,
  analytic,
  build,
  compile_estimate,
  fmt_bytes,
  format_plan,
  optimizer_breakdown,
  parse_bytes,
  plan,
  suggestions,
  svd_transient_bytes,
  update_transient_bytes,
)
from galore_jax.xla_memory import compiled_memory  # noqa: F401

# Private names that moved to xla_memory and became public there.
_RENAMED = {
  "_Instr": "Instr",
  "_parse_hlo": "parse_hlo",
  "_cpu_artifacts": "cpu_artifacts",
  "_stack_files": "stack_files",
  "_category": "category",
  "_replay": "replay_live_ranges",
}


def __getattr__(name: str):
  if name in _RENAMED:
    return getattr(xla_memory, _RENAMED[name])
  for module in (memory_plan, xla_memory):
    if hasattr(module, name):
      return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
