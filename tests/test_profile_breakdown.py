"""experiments/profile_breakdown.py: device time by stage and kind, from a trace and HLO."""

import gzip
import json

import pytest

HLO = """
HloModule jit_step
  %dot.1 = f32[8,8] dot(f32[8,8] %a, f32[8,8] %b), metadata={op_name="jit(s)/jvp(Llama)/q/dot"}
  %fusion.2 = f32[8,8] fusion(%dot.1), kind=kLoop, metadata={op_name="jit(s)/transpose(jvp(L))/mul"}
  %custom-call.3 = f32[8,4] custom-call(%g), metadata={op_name="jit(s)/galore_project_back/dot"}
  %fusion.4 = f32[4,8] fusion(%g), metadata={op_name="jit(step)/galore_project/dot_general"}
  %copy.5 = f32[8,8] copy(%x), metadata={op_name="jit(step)/galore_refresh/while/body/transpose"}
  ROOT %tuple.6 = (f32[8,8]) tuple(%copy.5)
"""


def _trace():
  ev = [
    {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
    {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
    # host events are not device time
    {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 1000, "name": "PjitFunction(step)"},
  ]
  kernels = [
    ("sm90_xmma_gemm_bf16", "dot.1", 400),
    ("loop_multiply_fusion", "fusion.2", 100),
    ("nvjet_tst_128x64", "custom-call.3", 50),
    ("triton_gemm_fusion", "fusion.4", 30),
    ("copy_transpose", "copy.5", 20),
    ("mystery_kernel", "not.in.hlo", 10),
  ]
  for step in range(2):
    for name, op, dur in kernels:
      ev.append(
        {"ph": "X", "pid": 2, "tid": 7, "ts": step * 1000, "dur": dur, "name": name,
         "args": {"hlo_op": op, "hlo_module": "jit_step"}}
      )  # fmt: skip
  return {"traceEvents": ev}


@pytest.fixture(scope="module")
def pb(load_experiment):
  return load_experiment("profile_breakdown")


def test_breakdown_attributes_device_time(pb):
  b = pb.breakdown(_trace(), HLO, steps=2)
  assert b["device_events"] == 12  # host events left out
  assert b["device_s_per_step"] == pytest.approx(610e-6)
  assert b["by_stage_s"] == pytest.approx(
    {
      "forward": 400e-6,
      "backward": 100e-6,
      "galore_project_back": 50e-6,  # not counted as galore_project
      "galore_project": 30e-6,
      "galore_refresh": 20e-6,
      "unattributed": 10e-6,
    }
  )
  assert b["by_kind_s"] == pytest.approx({"matmul": 480e-6, "other": 110e-6, "copy": 20e-6})
  assert b["top_kernels"][0] == {
    "kernel": "sm90_xmma_gemm_bf16",
    "hlo_op": "dot.1",
    "s_per_step": pytest.approx(400e-6),
  }
  assert "forward" in pb.format_breakdown(b)


def test_cli_reads_gzipped_trace(pb, tmp_path):
  trace, hlo = tmp_path / "t.json.gz", tmp_path / "h.txt"
  with gzip.open(trace, "wt") as f:
    json.dump(_trace(), f)
  hlo.write_text(HLO)
  out = tmp_path / "b.json"
  assert pb.main([str(trace), str(hlo), "--steps", "2", "--json", str(out)]) == 0
  assert json.loads(out.read_text())["by_stage_s"]["forward"] == pytest.approx(400e-6)


def test_kernels_replayed_from_a_command_buffer_are_placed_by_their_fusion_name(pb, tmp_path):
  """On a GPU, kernels run inside a CUDA graph carry the command buffer's name as their
  ``hlo_op`` (not in the HLO text); a fusion's kernel is named after the fusion (``.`` as
  ``_``) or after the fusion it was deduplicated with. Library kernels stay unattributed."""
  hlo = """
  %gemm_fusion_dot.196 = bf16[8,8] fusion(%a), metadata={op_name="jit(s)/transpose(jvp())/dot"}
  %gemm_fusion_dot_general.4 = bf16[4,8] fusion(%g), metadata={op_name="jit(step)/cond/branch_1_fun/galore_project/dot_general" deduplicated_name="gemm_fusion_dot_general.2"}
"""  # noqa: E501
  ev = [{"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
  for name, dur in (
    ("gemm_fusion_dot_196", 300),
    ("gemm_fusion_dot_general_2", 40),  # the deduplicated kernel
    ("nvjet_sm90_tst_128x128", 60),
  ):
    ev.append(
      {"ph": "X", "pid": 2, "tid": 7, "ts": 0, "dur": dur, "name": name,
       "args": {"hlo_op": "command_buffer_1"}}
    )  # fmt: skip
  b = pb.breakdown({"traceEvents": ev}, hlo, steps=1)
  assert b["by_stage_s"] == pytest.approx(
    {"backward": 300e-6, "galore_project": 40e-6, "unattributed": 60e-6}
  )
  # the CLI reads the gzipped HLO text gpu_bench.py writes
  trace, hlo_gz = tmp_path / "t.json", tmp_path / "h.txt.gz"
  trace.write_text(json.dumps({"traceEvents": ev}))
  with gzip.open(hlo_gz, "wt") as f:
    f.write(hlo)
  out = tmp_path / "b.json"
  assert pb.main([str(trace), str(hlo_gz), "--json", str(out)]) == 0
  assert json.loads(out.read_text())["by_stage_s"]["backward"] == pytest.approx(300e-6)
