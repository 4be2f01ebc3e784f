"""JAX's persistent compilation cache, on by default for the CLI's commands.

A second start of the same configuration (a ``--resume``, an ``eval`` of the same
model) loads its compiled executables from disk instead of compiling them again. The
cache lives next to the token caches, in ``~/.cache/galore_jax/jax-cache`` (the
``galore_jax`` directory is ``$GALORE_JAX_CACHE_DIR`` or ``$XDG_CACHE_HOME/galore_jax``
when those are set); ``--compile-cache DIR`` puts it elsewhere and
``--compile-cache none`` turns it off. A cache directory that JAX was already given
(``JAX_COMPILATION_CACHE_DIR``) is kept when the flag is not passed.

Inside that directory, ``galore-jax-steps/`` keeps the trainer's train step exported
(:func:`exported_train_step`), so that a second start does not trace and lower it either.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from galore_jax.errors import first_line

NONE = "none"


def default_dir() -> str:
  """``jax-cache`` in galore-jax's cache directory (:func:`galore_jax.data.cache_dir`, next
  to the token caches): ``$GALORE_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/galore_jax``, else
  ``~/.cache/galore_jax``."""
  from galore_jax import data

  return str(data.cache_dir() / "jax-cache")


def directory(spec: str | None) -> str | None:
  """The directory ``--compile-cache spec`` names (None: the default, or the user's
  JAX_COMPILATION_CACHE_DIR; ``"none"``: off, returns None)."""
  import jax

  if spec is not None and spec.strip().lower() == NONE:
    return None
  if spec is None and jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir  # JAX_COMPILATION_CACHE_DIR: the user's choice
  if spec is not None and not spec.strip():
    raise ValueError("expected a directory or 'none', got ''")
  return os.path.abspath(os.path.expanduser(spec if spec is not None else default_dir()))


def enable(spec: str | None) -> str | None:
  """Points JAX's persistent cache at ``spec`` (None: the default; ``"none"``: off) and
  returns the directory used (None when off). Must run before the first compilation.

  Raises ``ValueError`` with a one-line reason if the directory cannot be created.
  """
  import jax

  path = directory(spec)
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
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


@contextlib.contextmanager
def bypassed():
  """JAX's persistent compilation cache off inside the block, so that a compilation there is
  a real one (a hit would load the executable: no XLA dump, no compile time to measure), and
  back on after it where it was on. JAX decides once per process whether the cache is in
  use, so that decision is reset both ways."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  if not jax.config.jax_enable_compilation_cache:
    yield
    return
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()


# ---------------------------------------------------------------------------
# The traced-step cache: JAX's cache above keys a compilation by the lowered program, so a
# second start still traces and lowers the train step first (16-17 s for the llama_7b 8-bit
# step on this project's CPU, 31 s on an H200 host: most of a resume's start-up once the
# compilation is cached). The exported (serialized, lowered) step skips that.

STEPS_DIR = "galore-jax-steps"


def steps_dir() -> Path | None:
  """Where exported train steps are kept: a ``galore-jax-steps`` directory inside JAX's
  persistent cache directory (JAX's cache only looks at its own ``*-cache`` files there);
  None when that cache is off, which turns this one off too, or is not a local directory
  (JAX also takes e.g. ``gs://`` URLs)."""
  import jax

  where = jax.config.jax_compilation_cache_dir
  if not jax.config.jax_enable_compilation_cache or not where or "://" in str(where):
    return None
  return Path(where) / STEPS_DIR


@functools.cache
def source_digest() -> str:
  """SHA-256 of the galore_jax package's Python sources: an edited checkout (an editable
  install) never loads a step traced from other code."""
  h = hashlib.sha256()
  root = Path(__file__).resolve().parent
  for path in sorted(root.rglob("*.py")):
    h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
  return h.hexdigest()


def _step_key(key: dict, leaves: list, in_tree) -> str:
  from importlib import metadata

  import jax
  import jaxlib
  import numpy as np

  def version(name: str) -> str:
    try:
      return metadata.version(name)
    except metadata.PackageNotFoundError:
      return "-"

  def dtype(x) -> str:  # arrays and ShapeDtypeStructs have one; a Python scalar does not
    return str(x.dtype if hasattr(x, "dtype") else np.result_type(x))

  avals = [(np.shape(x), dtype(x), str(getattr(x, "sharding", None))) for x in leaves]
  record = {
    "key": key,
    "source": source_digest(),
    "versions": {
      "python": sys.version,
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      **{n: version(n) for n in ("flax", "optax", "numpy", "ml_dtypes")},
    },
    "devices": sorted({d.device_kind for d in jax.devices()}) + [jax.device_count()],
    "platform": jax.default_backend(),
    # Flags that change what tracing produces.
    "jax_config": {
      n: str(getattr(jax.config, n, None))
      for n in (
        "jax_enable_x64",
        "jax_default_matmul_precision",
        "jax_numpy_rank_promotion",
        "jax_default_prng_impl",
        "jax_threefry_partitionable",
        "jax_use_shardy_partitioner",
      )
    },
    "in_tree": str(in_tree),
    "avals": avals,
  }
  return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def exported_train_step(
  step: Callable,
  args: tuple,
  *,
  in_shardings: tuple,
  out_shardings: tuple,
  key: dict,
  log: Callable[[str], None] = print,
) -> Callable:
  """``jax.jit(step, in_shardings, out_shardings, donate_argnums=(0, 1))`` for ``args``'
  shapes, traced at most once per ``key`` on this machine.

  ``step(params, opt_state, *inputs) -> (params, opt_state, metrics)`` (the trainer's:
  ``inputs`` = batch and learning rate) with ``metrics`` a dict of arrays; ``key``
  (JSON-able) must name everything the traced program depends on
  besides the galore_jax sources, the library versions, the devices and the arguments'
  shapes, dtypes and shardings, which the cache adds itself.

  The first start exports the step (``jax.export``: trace, lower, serialize) into
  :func:`steps_dir`; a later start with the same key deserializes it (milliseconds, no
  tracing) and JAX's persistent cache supplies its compilation. Both starts run the
  deserialized program, so both compile (or load) the same module. An entry that cannot
  be read logs one line and is exported again (replaced); an export that fails (a JAX
  that cannot export this step, a full disk) logs one line and the plain ``jax.jit`` runs.
  Off (the plain ``jax.jit``) when JAX's persistent cache is off or the job has more than
  one process.
  """
  import jax

  jitted = jax.jit(
    step, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=(0, 1)
  )
  directory = steps_dir()
  if directory is None or jax.process_count() > 1:
    return jitted
  try:
    from jax import export
  except ImportError:  # a JAX without jax.export
    return jitted

  leaves, in_tree = jax.tree.flatten(args)
  state_tree = jax.tree.structure(args[:2])
  path = directory / f"{_step_key(key, leaves, in_tree)}.exported"

  def flat_shardings(trees, shardings) -> list:
    out = []
    for tree, sh in zip(trees, shardings, strict=True):
      if isinstance(sh, jax.sharding.Sharding):
        out += [sh] * len(jax.tree.leaves(tree))
      else:
        out += jax.tree.structure(tree).flatten_up_to(sh)
    return out

  def flat_step(*xs):
    # Flat leaves in and out: exported calls serialize only string-keyed containers, and
    # the params dict has the layer indices as keys.
    params, opt_state, m = step(*jax.tree.unflatten(in_tree, xs))
    return jax.tree.leaves((params, opt_state)), m

  def load():
    return export.deserialize(bytearray(path.read_bytes()))

  exported = None
  if path.exists():
    try:
      exported = load()
      log(f"train step: traced program from the step cache ({path})")
    except Exception as e:  # noqa: BLE001 - a damaged entry: trace again and replace it
      log(f"train step: unreadable step-cache entry {path} ({type(e).__name__}); tracing again")
      exported = None
  if exported is None:
    try:
      flat_jit = jax.jit(
        flat_step,
        in_shardings=tuple(flat_shardings(args, in_shardings)),
        out_shardings=(flat_shardings(args[:2], out_shardings[:2]), out_shardings[2]),
      )
      blob = export.export(
        flat_jit,
        platforms=[export.default_export_platform()],
        # A local cache for this jaxlib (the key has its version), not an archive: the
        # custom calls (LAPACK, cuSOLVER, cuDNN) need no cross-version stability.
        disabled_checks=[export.DisabledSafetyCheck.custom_call("ALL")],
      )(*leaves).serialize()
      directory.mkdir(parents=True, exist_ok=True)
      tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
      try:
        tmp.write_bytes(blob)
        os.replace(tmp, path)  # atomic: a concurrent start reads the old entry or this one
      finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk, Ctrl-C) leaves no part
      exported = export.deserialize(blob)  # the bytes just written, not read back
    except Exception as e:  # noqa: BLE001 - the plain jit always works
      log(f"train step: step cache not used ({type(e).__name__}: {first_line(e)})")
      return jitted

  return ExportedStep(exported, state_tree)


class ExportedStep:
  """A train step run through its (deserialized) exported program: called, lowered and
  compiled like the ``jax.jit`` step it stands for, with ``(params, opt_state, *inputs)``
  in and ``(params, opt_state, metrics)`` out (the program itself takes flat leaves)."""

  def __init__(self, exported, state_tree):
    import jax

    self._state_tree = state_tree
    # The state's leaves come first; donated, as the plain step donates params and state.
    self._call = jax.jit(exported.call, donate_argnums=tuple(range(state_tree.num_leaves)))

  def _out(self, flat_out):
    import jax

    new_state, m = flat_out
    params, opt_state = jax.tree.unflatten(self._state_tree, new_state)
    return params, opt_state, m

  def __call__(self, *args):
    import jax

    return self._out(self._call(*jax.tree.leaves(args)))

  def lower(self, *args) -> _Stage:
    import jax

    return _Stage(self._call.lower(*jax.tree.leaves(args)), self._out)

  def _cache_size(self) -> int:
    """Compilations so far, as on a ``jax.jit`` function (the summary's step_compilations)."""
    return self._call._cache_size()


class _Stage:
  """A lowered or compiled :class:`ExportedStep`: ``compile()`` and calls take and return
  pytrees; everything else (``memory_analysis``, ``as_text``) is JAX's own."""

  def __init__(self, stage, out):
    self._stage, self._out = stage, out

  def compile(self) -> _Stage:
    return _Stage(self._stage.compile(), self._out)

  def __call__(self, *args):
    import jax

    return self._out(self._stage(*jax.tree.leaves(args)))

  def __getattr__(self, name):
    return getattr(self._stage, name)
