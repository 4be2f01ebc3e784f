"""galore_jax.xla_memory on a saved XLA dump (tests/data/xla_tiny, from its generate.py).

The step: params bf16[16,32] and opt_state f32[16,32] (both donated), batch bf16[8,16];
a bf16 matmul that the CPU widens to float32, a momentum update written in place
into opt_state's buffer, and a loss. The expected figures are worked out by hand from
the dump's buffer assignment and live ranges (in the comments below).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from galore_jax import xla_memory

DUMP = Path(__file__).resolve().parent / "data" / "xla_tiny"


@pytest.fixture(scope="module")
def hlo():
  (path,) = DUMP.glob("*after_optimizations.txt")
  return path.read_text()


def test_parse_hlo_on_the_saved_dump(hlo):
  instrs = xla_memory.parse_hlo(hlo)
  assert len(instrs) == 45  # every "%name = ..." line of every computation
  p = instrs["params.1"]
  assert (p.computation, p.opcode, p.dtype, p.shape) == ("main.2", "parameter", "bf16", (16, 32))
  assert (p.param_index, p.op_name, p.is_root) == (0, "params", False)
  dot = instrs["ynn_fusion"]
  assert (dot.opcode, dot.dtype, dot.shape) == ("fusion", "f32", (8, 32))
  assert dot.operands == ["wrapped_convert", "wrapped_convert.1"]
  assert dot.calls == ["fused_computation"]
  assert (dot.op_name, dot.frame) == ("jit(step)/dot_general", 6)
  assert instrs["dot_general.0"].computation == "fused_computation"
  assert instrs["dot_general.0"].is_root
  assert instrs["reduce_sum.0"].calls == ["region_0.1"]  # to_apply=
  out = instrs["tuple"]
  assert (out.dtype, out.shape, out.is_root) == ("", (), True)
  assert out.operands == [
    "subtract_convert_fusion",
    "multiply_add_fusion",
    "multiply_reduce_fusion",
  ]


def test_parse_hlo_tuples_and_branches():
  text = """\
ENTRY %main (p: (f32[2], s32[])) -> f32[2] {
  %p = (f32[2]{0}, s32[]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=1
  %c = (f32[2]{0}, (s32[], f32[2]{0})) conditional(%i, %p, %p), branch_computations={%b0, %b1}
  ROOT %r = f32[2]{0} get-tuple-element(%c), index=0, metadata={op_name="jit(f)/cond/x"}
}
"""
  instrs = xla_memory.parse_hlo(text)
  assert list(instrs) == ["p", "i", "c", "r"]
  assert instrs["p"].dtype == "" and instrs["p"].param_index == 0
  assert instrs["c"].opcode == "conditional" and instrs["c"].operands == ["i", "p", "p"]
  assert instrs["c"].calls == ["b0", "b1"]
  assert instrs["r"].is_root and instrs["r"].op_name == "jit(f)/cond/x"
  assert xla_memory.category("r", instrs["r"], instrs) == "optimizer update"


def test_cpu_artifacts_on_the_saved_dump(hlo):
  # The two float32 copies of the bf16 dot operands would not exist on a GPU; the
  # float32 dot result, only narrowed back to bf16, would be half its size.
  artifacts = xla_memory.cpu_artifacts(xla_memory.parse_hlo(hlo))
  assert artifacts == {"wrapped_convert": 0.0, "wrapped_convert.1": 0.0, "ynn_fusion": 0.5}


def test_stack_files(hlo):
  frames = xla_memory.stack_files(hlo)
  assert frames == {i: {"tests/data/xla_tiny/generate.py"} for i in range(1, 12)}
  text = """\
FileNames
1 "galore_jax/optimizer.py"
2 "train.py"

FileLocations
1 {file_name_id=1 function_name_id=1 line=3}
2 {file_name_id=2 function_name_id=2 line=9}

StackFrames
1 {file_location_id=2 parent_frame_id=1}
2 {file_location_id=1 parent_frame_id=1}
"""
  assert xla_memory.stack_files(text) == {
    1: {"train.py"},
    2: {"galore_jax/optimizer.py", "train.py"},
  }


def test_replay_on_the_saved_dump():
  r = xla_memory.replay_live_ranges(str(DUMP))
  # Live bytes per schedule position 0..11: opt_state 2048 (0-11: multiply_add_fusion is
  # written in place into it, an alias at the same allocation and offset), params 1024
  # (0-3), batch 256 (0-11), copy 1024 (3-8), wrapped_convert 512 (4-7), wrapped_convert.1
  # 2048 (5-7), ynn_fusion 1024 (7-9), subtract_convert_fusion 1024 (8-11), ...
  # At 7: 2048 + 256 + 1024 + 512 + 2048 + 1024 = 6912, the raw peak (as XLA reports).
  assert r["replayed_cpu_peak_bytes"] == 6912
  assert r["cpu_only_buffers"] == 3
  # Without the CPU-only buffers (the f32 operand copies 0, the f32 dot result 512), the
  # peak moves to 8: opt_state 2048 + batch 256 + copy 1024 + subtract_convert_fusion 1024
  # + ynn_fusion 512.
  assert r["corrected_peak_bytes"] == 4864
  assert r["corrected_peak_position"] == "8/11"
  assert r["cpu_only_bytes_at_corrected_peak"] == 512
  assert r["live_at_corrected_peak"] == {
    "optimizer state": 2048,
    "layout copies (XLA)": 1024,
    "other": 1024,
    "step body (gradient scaling, metrics)": 512,
    "batch": 256,
  }
  top = [(b["buffer"], b["bytes"]) for b in r["largest_live_at_corrected_peak"]]
  assert top == [
    ("opt_state.1{}", 2048),
    ("subtract_convert_fusion{}", 1024),
    ("copy{}", 1024),
    ("ynn_fusion{}", 512),
    ("batch.1{}", 256),
  ]


def test_replay_needs_the_dump(tmp_path):
  with pytest.raises(FileNotFoundError):
    xla_memory.replay_live_ranges(str(tmp_path))


def test_compile_and_replay_matches_memory_analysis(tmp_path):
  """A live compile (a fresh function: a persistent-cache hit would write no dump)."""

  def f(w, x):
    return w * 2.0, jnp.sum(jnp.tanh(x @ w))

  args = (jax.ShapeDtypeStruct((64, 64), jnp.float32), jax.ShapeDtypeStruct((8, 64), jnp.float32))
  lowered = jax.jit(f, donate_argnums=(0,)).lower(*args)
  out = xla_memory.compile_and_replay(lowered, keep_dump=str(tmp_path))
  assert list(tmp_path.glob("*after_optimizations-live-range.txt"))
  assert out["argument_bytes"] == 4 * (64 * 64 + 8 * 64)
  assert out["peak_bytes"] == (
    out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  )
  assert "replay_error" not in out, out.get("replay_error")
  assert abs(out["replayed_cpu_peak_bytes"] - out["peak_bytes"]) <= 0.05 * out["peak_bytes"]
  assert out["cpu_only_buffers"] == 0  # float32: nothing to correct


def test_replay_survives_a_persistent_cache_hit():
  """A persistent-cache hit loads the executable without compiling it, so XLA writes no
  dump: the second plan of a configuration lost its replay (and its CPU correction)."""
  if not jax.config.jax_enable_compilation_cache or not jax.config.jax_compilation_cache_dir:
    pytest.skip("needs the persistent compilation cache (tests/conftest.py sets one)")

  def g(w, x):
    return jnp.cos(x @ w).sum(), w + 1.0

  args = (jax.ShapeDtypeStruct((32, 48), jnp.float32), jax.ShapeDtypeStruct((4, 32), jnp.float32))
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache even this one
  try:
    first, second = (xla_memory.compile_and_replay(jax.jit(g).lower(*args)) for _ in range(2))
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
  assert "replay_error" not in second, second["replay_error"]
  assert second["replayed_cpu_peak_bytes"] == first["replayed_cpu_peak_bytes"] > 0
  assert jax.config.jax_enable_compilation_cache  # left as it was
