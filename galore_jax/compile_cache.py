"""JAX's persistent compilation cache, on by default for the CLI's commands.

A second start of the same configuration (a ``--resume``, an ``eval`` of the same
model) loads its compiled executables from disk instead of compiling them again. The
cache lives next to the token caches, in ``~/.cache/galore_jax/jax-cache`` (the
``galore_jax`` directory is ``$GALORE_JAX_CACHE_DIR`` or ``$XDG_CACHE_HOME/galore_jax``
when those are set); ``--compile-cache DIR`` puts it elsewhere and
``--compile-cache none`` turns it off. A cache directory that JAX was already given
(``JAX_COMPILATION_CACHE_DIR``) is kept when the flag is not passed.
"""

from __future__ import annotations

import contextlib
import os

NONE = "none"


def default_dir() -> str:
  """``jax-cache`` in galore-jax's cache directory (:func:`galore_jax.data.cache_dir`, next
  to the token caches): ``$GALORE_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/galore_jax``, else
  ``~/.cache/galore_jax``."""
  from galore_jax import data

  return str(data.cache_dir() / "jax-cache")


def enable(spec: str | None) -> str | None:
  """Points JAX's persistent cache at ``spec`` (None: the default; ``"none"``: off) and
  returns the directory used (None when off). Must run before the first compilation.

  Raises ``ValueError`` with a one-line reason if the directory cannot be created.
  """
  import jax

  if spec is not None and spec.strip().lower() == NONE:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if spec is None and jax.config.jax_compilation_cache_dir:
    path = jax.config.jax_compilation_cache_dir  # JAX_COMPILATION_CACHE_DIR: the user's choice
  else:
    if spec is not None and not spec.strip():
      raise ValueError("expected a directory or 'none', got ''")
    path = os.path.abspath(os.path.expanduser(spec if spec is not None else default_dir()))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{path} is not a directory")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f"cannot create {path} ({e.strerror})") from e
  if not os.access(path, os.W_OK | os.X_OK):
    raise ValueError(f"{path} is not writable")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_enable_compilation_cache", True)
  # JAX's defaults cache only compilations over 1 s: most of a CPU run's, and the many
  # small ones of a GPU start-up, would be compiled again every time.
  # (A jax without one of these settings keeps its default: the cache still works.)
  for name, value in (
    ("jax_persistent_cache_min_compile_time_secs", 0.0),
    ("jax_persistent_cache_min_entry_size_bytes", -1),
  ):
    if name.upper() not in os.environ:
      with contextlib.suppress(AttributeError):
        jax.config.update(name, value)
  return path
