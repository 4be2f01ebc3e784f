"""The compile caches (galore_jax.compile_cache). The traced-step cache (exported_train_step,
through the trainer): a second start of one configuration loads the exported step instead of
tracing it, with the same numbers; a damaged entry, a failing export or a changed key fall
back or miss. JAX's persistent compilation cache (--compile-cache): on by default, and a
second start of a process compiles nothing new."""

import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from small_run import SMALL, write_tiny_hf_model

from galore_jax import cli, compile_cache, metrics, steps, train

# test_train.py's runs of SMALL (--steps 6): the compilations are shared through the
# session's JAX cache (the exported step is the same program there).
TINY = {**SMALL, "steps": 6}


@pytest.fixture
def step_cache(tmp_path, monkeypatch):
  """A fresh step-cache directory (JAX's compilation cache stays the session's, so the
  compilations themselves are shared) and a counter of train-step traces."""
  directory = tmp_path / "steps"
  monkeypatch.setattr(compile_cache, "steps_dir", lambda: directory)
  traces = []
  select = steps.select_train_step

  def counting(*args, **kwargs):
    step = select(*args, **kwargs)

    def traced(*a):
      traces.append(1)  # Python runs only while JAX traces the step
      return step(*a)

    return traced

  monkeypatch.setattr(steps, "select_train_step", counting)
  return traces, directory


def _run(tmp_path, name, log=None, **kw):
  cfg = train.TrainConfig(out=str(tmp_path / name), **{**TINY, **kw})
  lines = []
  summary = train.train(cfg, log=log or lines.append)
  return summary, lines


def test_second_start_loads_the_step_without_tracing_it(tmp_path, step_cache):
  traces, directory = step_cache
  first, _ = _run(tmp_path, "a", stop_after=3)
  assert len(traces) == 1 and len(list(directory.glob("*.exported"))) == 1
  # Another run directory with the same flags, stopped after one step (--out and
  # --stop-after are not part of the key), then resumed (nor is --resume).
  stopped, lines = _run(tmp_path, "b", stop_after=1)
  assert len(traces) == 1, "the second start traced the step again"
  assert any("traced program from the step cache" in line for line in lines)
  resumed, _ = _run(tmp_path, "b", resume=True, stop_after=2)
  assert len(traces) == 1
  np.testing.assert_array_equal(stopped["losses"] + resumed["losses"], first["losses"])
  assert resumed["step_compilations"] == 1


def test_every_setting_the_step_may_read_is_in_the_key(tmp_path, monkeypatch):
  keys = []

  def record(step, args, *, key, **_):
    keys.append(key)

  monkeypatch.setattr(compile_cache, "exported_train_step", record)

  def key(**kw):
    cfg = train.TrainConfig(out=str(tmp_path / kw.pop("out", "a")), **{**TINY, **kw})
    run = train.setup(cfg, vocab_size=8192)
    train.cached_train_step(run, args=(run.abstract_params, run.abstract_opt, None, None))
    return keys[-1]

  base = key()
  assert key(out="b", resume=True, stop_after=2, progress=True) == base
  # The schedule's settings: the step takes its rate as an argument.
  assert key(steps=9, lr=0.02, warmup=3, schedule="linear", min_lr_ratio=0.5) == base
  for change in ({"rank": 8}, {"weight_decay": 0.1}, {"seed": 1}, {"eval_every": 5}):
    assert key(**change) != base, change
  assert key(model="llama_60m") != base


def test_runs_that_differ_in_their_schedule_share_the_step_at_their_own_rates(tmp_path, step_cache):
  # An lr sweep, or a resume that extends the run: one traced (and compiled) step, which
  # must still train each run at its own rate: the same numbers as that run's step traced
  # for it alone (the plain jit, with the step cache off).
  traces, directory = step_cache
  base, _ = _run(tmp_path, "a", stop_after=3)
  swept, lines = _run(tmp_path, "b", stop_after=3, steps=12, lr=0.02, warmup=2)
  assert len(traces) == 1, "a schedule setting made a new program"
  assert any("traced program from the step cache" in line for line in lines)
  assert swept["losses"][0] == base["losses"][0] and swept["losses"][2] != base["losses"][2]
  rates = [r["lr"] for r in metrics.read_metrics(str(tmp_path / "b")) if "lr" in r]
  np.testing.assert_allclose(rates, [0.0, 0.01, 0.02], rtol=1e-6)  # what it stepped with
  with pytest.MonkeyPatch.context() as off:
    off.setattr(compile_cache, "steps_dir", lambda: None)
    alone, _ = _run(tmp_path, "c", stop_after=3, steps=12, lr=0.02, warmup=2)
  assert len(traces) == 2
  np.testing.assert_array_equal(swept["losses"], alone["losses"])


def test_a_damaged_entry_is_traced_again_and_replaced(tmp_path, step_cache):
  traces, directory = step_cache
  first, _ = _run(tmp_path, "a", stop_after=2)
  (entry,) = directory.glob("*.exported")
  entry.write_bytes(entry.read_bytes()[:100])  # e.g. a disk that filled up mid-write
  second, lines = _run(tmp_path, "b", stop_after=2)
  assert len(traces) == 2
  assert any("unreadable step-cache entry" in line for line in lines)
  np.testing.assert_array_equal(first["losses"], second["losses"])
  third, lines = _run(tmp_path, "c", stop_after=1)
  assert len(traces) == 2 and any("from the step cache" in line for line in lines)


def test_a_failing_export_falls_back_to_the_plain_jit(tmp_path, step_cache, monkeypatch):
  from jax import export

  traces, directory = step_cache

  def broken(*a, **k):
    raise NotImplementedError("no export for this\nsecond line")

  monkeypatch.setattr(export, "export", broken)
  summary, lines = _run(tmp_path, "a", stop_after=2)
  assert summary["step"] == 2 and summary["step_compilations"] == 1
  (line,) = [x for x in lines if "step cache" in x]
  assert line == "train step: step cache not used (NotImplementedError: no export for this)"
  assert not list(directory.glob("*.exported"))


def test_the_key_names_sources_and_shapes_and_the_cache_follows_jax_s(tmp_path, monkeypatch):
  x = jax.ShapeDtypeStruct((2, 3), np.float32)
  tree = jax.tree.structure((x,))
  key = compile_cache._step_key({"a": 1}, [x], tree)
  assert key == compile_cache._step_key({"a": 1}, [x], tree)
  assert key != compile_cache._step_key({"a": 2}, [x], tree)
  y = jax.ShapeDtypeStruct((2, 4), np.float32)
  assert key != compile_cache._step_key({"a": 1}, [y], tree)
  # The rate as the trainer passes it and as a lowering without one names it: one entry.
  rate = jax.tree.structure((train.LR_SPEC,))
  named = compile_cache._step_key({"a": 1}, [train.LR_SPEC], rate)
  assert named == compile_cache._step_key({"a": 1}, [np.float32(1e-3)], rate)
  assert named != compile_cache._step_key({"a": 1}, [np.float64(1e-3)], rate)
  monkeypatch.setattr(compile_cache, "source_digest", lambda: "edited")
  assert key != compile_cache._step_key({"a": 1}, [x], tree)

  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
  try:
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    jax.config.update("jax_enable_compilation_cache", True)
    assert compile_cache.steps_dir() == tmp_path / "jax" / "galore-jax-steps"
    jax.config.update("jax_compilation_cache_dir", "gs://bucket/cache")  # not local
    assert compile_cache.steps_dir() is None
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    jax.config.update("jax_enable_compilation_cache", False)  # --compile-cache none
    assert compile_cache.steps_dir() is None
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_enable_compilation_cache", before[1])


def test_the_exported_step_is_the_same_program(tmp_path, step_cache):
  # Lowered and compiled ahead of time (as experiments/gpu_memory_check.py does) on a
  # 8-device mesh: XLA plans the same memory as for the plain jit, donation included, and
  # the compiled step takes and returns the same pytrees with the same numbers.
  from galore_jax import model as model_lib
  from galore_jax import xla_memory

  cfg = train.TrainConfig(out=str(tmp_path / "m"), mesh="data=2,fsdp=4", **TINY)
  # One narrow layer (two compilations of its own, no test shares them): every kind of
  # sharded leaf, at a fraction of llama_tiny's compile time.
  small = dict(hidden_size=32, intermediate_size=64, num_heads=2, num_layers=1, vocab_size=256)
  run = train.setup(cfg, vocab_size=256, model_cfg=model_lib.get_config("llama_tiny", **small))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (cfg.batch_size, cfg.seq_len + 1), dtype=np.int32)
  host = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "mask": np.ones((cfg.batch_size, cfg.seq_len), np.float32),
  }
  batch = train.device_batch(run, host, 1)
  args = (run.abstract_params, run.abstract_opt, batch, train.LR_SPEC)
  exported = train.cached_train_step(run, args=args).lower(*args).compile()
  plain = train.compile_train_step(run).lower(*args).compile()
  assert xla_memory.compiled_memory(exported) == xla_memory.compiled_memory(plain)
  out = []
  for step in (exported, plain):
    params, opt_state = train.init_state(run)
    out.append(step(params, opt_state, batch, np.float32(1e-3)))
  chex.assert_trees_all_equal(out[0], out[1])
  same = jax.tree.map(lambda a, b: a.sharding == b.sharding, out[0][:2], out[1][:2])
  assert all(jax.tree.leaves(same))


def test_compile_cache_flag_on_train_eval_sample_plan():
  parser = cli.build_parser()
  for argv in (
    ["train"],
    ["eval", "--checkpoint", "r"],
    ["sample", "--checkpoint", "r", "--prompt", ""],
    ["plan"],
  ):
    assert parser.parse_args(argv).compile_cache is None
    assert parser.parse_args([*argv, "--compile-cache", "none"]).compile_cache == "none"


def test_compile_cache_keeps_jax_dir_and_caches_short_compiles(monkeypatch):
  names = ("jax_persistent_cache_min_compile_time_secs", "jax_enable_compilation_cache")
  names += ("jax_persistent_cache_min_entry_size_bytes",)
  before = {n: getattr(jax.config, n) for n in names}
  monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
  try:
    given = jax.config.jax_compilation_cache_dir  # conftest's JAX_COMPILATION_CACHE_DIR
    assert given and compile_cache.enable(None) == given
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
  finally:
    for n, v in before.items():
      jax.config.update(n, v)


def test_compiles_bypass_the_persistent_cache_and_leave_it_on(tmp_path):
  # A hit would time loading the executable. The conftest's cache is on in this process.
  assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
  cache = pathlib.Path(jax.config.jax_compilation_cache_dir)
  # Programs of this test's own (its directory's inode in them), cached however short
  # their compile.
  shortest = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  f = lambda x, k: jax.jit(lambda x: jax.numpy.sin(x) * k + tmp_path.stat().st_ino).lower(x)
  try:
    before = set(cache.iterdir())
    with compile_cache.bypassed():
      assert not jax.config.jax_enable_compilation_cache
      f(jax.numpy.ones((7, 3)), 3.25).compile()
    assert jax.config.jax_enable_compilation_cache and set(cache.iterdir()) == before
    f(jax.numpy.ones((7, 3)), 4.25).compile()  # and the cache is in use again after it
    assert len(set(cache.iterdir()) - before) == 1
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", shortest)


def test_compile_cache_default_dir_and_none(monkeypatch, tmp_path):
  monkeypatch.delenv("GALORE_JAX_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.default_dir() == str(tmp_path / "xdg" / "galore_jax" / "jax-cache")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compile_cache.default_dir() == str(tmp_path / "home" / ".cache/galore_jax/jax-cache")
  before = jax.config.jax_enable_compilation_cache
  try:
    assert compile_cache.enable("none") is None
    assert jax.config.jax_enable_compilation_cache is False
  finally:
    jax.config.update("jax_enable_compilation_cache", before)


def test_second_start_compiles_nothing_new(tmp_path):
  # A fresh process each time, with the default cache directory (GALORE_JAX_CACHE_DIR) and
  # the thresholds the CLI sets (JAX's defaults cache no CPU compilation under 1 s). The
  # model: a Hugging Face directory (a subprocess does not know SMALL's test model).
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
  }
  env["GALORE_JAX_CACHE_DIR"] = str(tmp_path / "home")
  cache = tmp_path / "home" / "jax-cache"
  # `python -m galore_jax`, the command where the galore-jax script is not on PATH
  model = write_tiny_hf_model(tmp_path / "model")
  cmd = [sys.executable, "-m", "galore_jax", "eval", "--checkpoint", model]
  cmd += ["--eval-batches", "1"]
  first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr
  entries = sorted(os.listdir(cache))
  assert entries, "the first start wrote nothing to the cache"
  second = subprocess.run(
    cmd, env={**env, "JAX_LOG_COMPILES": "1"}, capture_output=True, text=True, timeout=300
  )
  assert second.returncode == 0, second.stderr
  assert sorted(os.listdir(cache)) == entries
  assert "Persistent compilation cache hit" in second.stderr
  assert second.stdout == first.stdout
