"""galore-jax: GaLore (Gradient Low-Rank Projection, Zhao et al., ICML 2024) in JAX."""

import os as _os

# On CPU, XLA runs LAPACK (the projector SVDs) inside its own thread pool; a
# multi-threaded OpenBLAS on top oversubscribes the cores, and on a 2-core
# machine one 256 x 256 SVD went from 13 ms to 1.4 s (a 28-SVD refresh step from
# 0.5 s to 83 s). Takes effect only if numpy/scipy were not imported first;
# set OPENBLAS_NUM_THREADS yourself to override.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


# Public name -> the module that defines it (or (module, its name there)); imported on first
# access (PEP 562, see below).
_EXPORTS = {
  "GaLoreState": "optimizer",
  "STATIC_ARGS": "optimizer",
  "decay_updated_weights": "optimizer",
  "galore": "optimizer",
  "galore_adamw": "optimizer",
  "galore_count": "optimizer",
  "galore_states": "optimizer",
  "LeafProjection": "optimizer",
  "leaf_projections": "optimizer",
  "refresh_due": "optimizer",
  "scale_and_decay_updated_weights": "optimizer",
  "scale_by_adam_hf": "optimizer",
  "scale_by_galore": "optimizer",
  "state_bytes": "optimizer",
  "with_galore_count": "optimizer",
  "adafactor_hf": "adafactor",
  "galore_adafactor": "adafactor",
  "scale_by_adafactor_hf": "adafactor",
  "ADAM8BIT_STATIC_ARGS": ("adam8bit", "STATIC_ARGS"),
  "adamw8bit": "adam8bit",
  "scale_by_adam8bit": "adam8bit",
  "LLAMA_TARGETS": "targets",
  "llama_targets": "targets",
  "reference_side_axes": "targets",
  "Stage": "layerwise",
  "Stages": "layerwise",
  "make_layerwise_step": "layerwise",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
  # Lazy (PEP 562): `import galore_jax.cli` must not import jax, so that the CLI installs
  # its SIGINT / SIGTERM handlers within milliseconds of starting (a Ctrl-C that lands
  # inside jax's C-extension imports can crash the interpreter instead of exiting 130).
  where = _EXPORTS.get(name)
  if where is not None:
    import importlib

    module, attr = where if isinstance(where, tuple) else (where, name)
    return getattr(importlib.import_module(f"galore_jax.{module}"), attr)
  raise AttributeError(f"module 'galore_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
