"""The galore-torch reference (``galore_torch.GaLoreAdamW``), loaded for tests and benchmarks.

galore-torch 1.0's package ``__init__`` imports its 8-bit optimizer, which needs
bitsandbytes; :func:`load_galore_torch` imports ``galore_torch.adamw`` and
``galore_torch.galore_projector`` without it. Used by ``tests/test_reference_parity.py``
(through the ``load_experiment`` fixture) and ``experiments/gpu_bench_torch.py``.

This file imports only the standard library: torch is imported by galore_torch itself, when
:func:`load_galore_torch` is called, so the benchmark's parent process and a machine without
torch can import it.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where a carried wheel is looked for (``pip download galore-torch==1.0 --no-deps -d ...``).
WHEEL_PATTERNS = ("wheels/galore_torch-*.whl", "runs/wheels/galore_torch-*.whl")


def load_galore_torch(path: str | None = None):
  """``(AdamW, GaLoreProjector, location)`` of galore_torch, without its ``__init__``.

  ``path``: a ``.whl`` (imported in place), or a directory holding ``galore_torch/``,
  or the ``galore_torch`` directory itself; None: an installed galore_torch.
  Raises ``FileNotFoundError`` for a ``path`` that is neither, ``ModuleNotFoundError``
  when galore_torch is not found.
  """
  if path:
    p = os.path.abspath(path)
    if os.path.isdir(p) and os.path.basename(p.rstrip("/")) == "galore_torch":
      p = os.path.dirname(p.rstrip("/"))
    if not (p.endswith(".whl") or os.path.isdir(os.path.join(p, "galore_torch"))):
      raise FileNotFoundError(
        f"--galore-torch {path}: expected a galore_torch wheel or a "
        "directory containing galore_torch/adamw.py"
      )
    sys.path.insert(0, p)
  spec = importlib.util.find_spec("galore_torch")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
      "galore_torch not found: `pip download galore-torch==1.0 --no-deps -d runs/wheels/` "
      "and pass --galore-torch runs/wheels/galore_torch-1.0-py3-none-any.whl",
      name="galore_torch",
    )
  if "galore_torch" not in sys.modules:
    # An empty package in place of the real one, so that its __init__ never runs.
    pkg = types.ModuleType("galore_torch")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["galore_torch"] = pkg
  adamw = importlib.import_module("galore_torch.adamw")
  projector = importlib.import_module("galore_torch.galore_projector")
  return adamw.AdamW, projector.GaLoreProjector, list(spec.submodule_search_locations)[0]


def find_galore_torch(explicit: str | None = None) -> str | None:
  """The galore_torch to load: ``explicit``, ``$GALORE_TORCH``, None for an installed one,
  else the newest wheel under the repository's ``wheels/`` or ``runs/wheels/`` (or None)."""
  if explicit:
    return explicit
  if os.environ.get("GALORE_TORCH"):
    return os.environ["GALORE_TORCH"]
  if importlib.util.find_spec("galore_torch") is not None:
    return None  # installed
  for pattern in WHEEL_PATTERNS:
    hits = sorted(glob.glob(str(REPO / pattern)))
    if hits:
      return hits[-1]
  return None
