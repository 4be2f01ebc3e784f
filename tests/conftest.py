"""Test setup, applied before the first jax import.

- 8 host CPU devices, for the sharding tests.
- XLA's CPU backend compiling at LLVM optimisation level 0: compiling dominates most tests
  (tiny models, a few steps each), and -O0 cut the time of four of the slowest test files
  from 193 s to 124 s on 2 cores. It changes the machine code, not the HLO programs or their
  buffers (``memory_analysis``); results may differ from an optimised build in the last
  bits (unfused multiply-adds, other vector math), as on another CPU, which every
  comparison's tolerance allows (exact comparisons are between runs of this session).
- Single-threaded OpenBLAS (galore_jax/__init__.py: oversubscribed, CPU SVDs get 100x slower).
- A persistent compilation cache shared by the session and its subprocesses: many tests
  compile the same train step, and on a 2-core machine compilation dominates their time.
  The CLI keeps a cache directory JAX was given, so no test (in-process or a subprocess)
  writes the user's default one (~/.cache/galore_jax/jax-cache).
- A token cache (GALORE_JAX_CACHE_DIR) of the session's own, removed at its end.
- The training tests' small model (``small_run.TEST_MODEL``) among the named models.
"""

import os
import shutil
import tempfile

os.environ.setdefault(
  "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Created here only if not given (xdist workers inherit the controller's); removed at the
# end of the session that created it (pytest_unconfigure).
_OWN_COMPILE_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_COMPILE_CACHE = tempfile.mkdtemp(prefix="galore_jax_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_COMPILE_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The token caches too: tests tokenize files of their temporary directories, whose cache
# entries (new keys every run) would otherwise pile up in the developer's ~/.cache.
_OWN_DATA_CACHE = None
if "GALORE_JAX_CACHE_DIR" not in os.environ:
  _OWN_DATA_CACHE = tempfile.mkdtemp(prefix="galore_jax_cache_")
  os.environ["GALORE_JAX_CACHE_DIR"] = _OWN_DATA_CACHE

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from small_run import register_test_model  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
register_test_model()  # small_run.SMALL's model, for this process's runs


def pytest_unconfigure(config):
  for own in (_OWN_COMPILE_CACHE, _OWN_DATA_CACHE):  # tens of MB per run otherwise left
    if own is not None:
      shutil.rmtree(own, ignore_errors=True)


@pytest.fixture(scope="session")
def load_experiment():
  """``load_experiment("gpu_bench")`` imports ``experiments/gpu_bench.py`` once per session.

  The module is registered in ``sys.modules`` under its name, as a script run directly would
  be, so its dataclasses and pickled objects resolve.
  """
  loaded = {}

  def load(name: str):
    if name not in loaded:
      spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
      module = importlib.util.module_from_spec(spec)
      sys.modules[name] = module
      spec.loader.exec_module(module)
      loaded[name] = module
    return loaded[name]

  yield load
  for name in loaded:
    sys.modules.pop(name, None)


@pytest.fixture
def poison_stage_gradients(monkeypatch):
  """``poison_stage_gradients(hit, where=None)``: the weight gradients of some checkpointed
  stages become NaN while the loss stays finite (``galore_jax.model.checkpointed`` patched).

  ``hit(n)`` picks the stages by the 1-based number of their ``checkpointed`` call, one per
  half block in trace order (a step that traces the forward twice counts on); ``where(path)``
  picks the leaves of a hit stage's gradient (default: all of them).
  """
  import jax
  import jax.numpy as jnp

  from galore_jax import model

  real, calls = model.checkpointed, []

  def install(hit, where=None):
    def poisoned(fn, remat):
      calls.append(fn)
      if not hit(len(calls)):
        return real(fn, remat)

      @jax.custom_vjp
      def f(p, x):
        return fn(p, x)

      def bwd(pullback, dy):
        dp, dx = pullback(dy)
        nan = lambda path, g: g * jnp.nan if where is None or where(path) else g
        return jax.tree_util.tree_map_with_path(nan, dp), dx

      f.defvjp(lambda p, x: jax.vjp(fn, p, x), bwd)
      return f

    monkeypatch.setattr(model, "checkpointed", poisoned)

  return install
