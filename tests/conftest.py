"""Test setup, applied before the first jax import.

- 8 host CPU devices, for the sharding tests.
- Single-threaded OpenBLAS (galore_jax/__init__.py: oversubscribed, CPU SVDs get 100x slower).
- A persistent compilation cache shared by the session and its subprocesses: many tests
  compile the same train step, and on a 2-core machine compilation dominates their time.
  The CLI keeps a cache directory JAX was given, so no test (in-process or a subprocess)
  writes the user's default one (~/.cache/galore_jax/jax-cache).
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="galore_jax_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
