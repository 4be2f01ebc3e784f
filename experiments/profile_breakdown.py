"""Where a train step's device time goes, from a ``jax.profiler`` trace and the compiled HLO.

``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes ``perfetto_trace.json.gz``:
Chrome trace events, among them one per kernel the GPU ran (process ``/device:GPU:N``),
each naming the HLO instruction it belongs to (``args.hlo_op``). The compiled step's HLO
text (``compiled.as_text()``) gives every instruction's ``metadata.op_name``: JAX's name
stack, which holds the model's module path, ``transpose(jvp(...))`` for the backward
pass, and the optimizer's named scopes (``galore_refresh``, ``galore_project``,
``galore_moments``, ``galore_inner``, ``galore_project_back``; see
``galore_jax/optimizer.py``). Joining the two attributes device time to stages:

* ``stage``: forward, backward, each GaLore scope, other (loss, the inner optimizer of
  unprojected leaves, gradient clipping, ...);
* ``kind``: matmul (cuBLAS / CUTLASS kernels), copy/transpose, other (fusions, reductions);
* the ``top`` kernels by time.

Times are per step (the trace's total over ``steps``). Kernels overlap only across
streams; the totals add busy time per kernel, not wall time.

    python experiments/profile_breakdown.py TRACE.json.gz HLO.txt --steps 3
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys

# GaLore's named scopes, most specific first ("galore_project_back" contains "galore_project").
GALORE_SCOPES = (
  "galore_refresh",
  "galore_project_back",
  "galore_project",
  "galore_moments",
  "galore_inner",
)
_MATMUL = re.compile(r"gemm|xmma|cutlass|nvjet|cublas|wgmma|matmul|dot", re.IGNORECASE)
_COPY = re.compile(r"copy|transpose|memcpy|memset", re.IGNORECASE)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"")


_DEDUP = re.compile(r'deduplicated_name="([^"]*)"')


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its ``metadata.op_name`` (JAX's name stack)."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


def kernel_op_names(hlo_text: str) -> dict[str, str]:
  """Kernel name -> ``op_name``, for events whose ``hlo_op`` is not an instruction.

  XLA's GPU runtime records the kernels it replays from a CUDA graph (a command buffer)
  under the command buffer's name (``hlo_op: command_buffer_N``), which is not in the HLO
  text. A fusion's kernel is named after the fusion with ``.`` written ``_``
  (``gemm_fusion_dot.196`` runs as ``gemm_fusion_dot_196``), or after the instruction it was
  deduplicated with, so those kernels can still be placed. Library kernels (cuBLAS
  ``nvjet_*``, cuDNN) carry no such name and stay unattributed.
  """
  out: dict[str, str] = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    out.setdefault(m.group(1).replace(".", "_"), m.group(2))
    d = _DEDUP.search(line)
    if d:
      out.setdefault(d.group(1).replace(".", "_"), m.group(2))
  return out


def stage(op_name: str | None) -> str:
  """The step stage an instruction's name stack belongs to."""
  if not op_name:
    return "unattributed"
  for scope in GALORE_SCOPES:
    if scope in op_name:
      return scope
  if "transpose(" in op_name:
    return "backward"
  if "jvp(" in op_name or "vjp(" in op_name:
    return "forward"
  return "other"


def kind(kernel: str, instr: str) -> str:
  """matmul, copy or other, from the kernel's and the instruction's names."""
  if _MATMUL.search(kernel) or instr.startswith(("dot", "cublas", "custom-call", "gemm")):
    return "matmul"
  if _COPY.search(kernel) or instr.startswith(("copy", "transpose")):
    return "copy"
  return "other"


def device_events(trace: dict | list) -> list[dict]:
  """Complete events on accelerator processes (``/device:...``, not ``/host:...``)."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  device_pids = {
    e["pid"]
    for e in events
    if e.get("ph") == "M"
    and e.get("name") == "process_name"
    and str(e.get("args", {}).get("name", "")).startswith("/device:")
  }
  return [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids]


def breakdown(trace: dict | list, hlo_text: str, steps: int, top: int = 25) -> dict:
  """Device seconds per step by stage, by kind, and the ``top`` kernels."""
  names = op_names(hlo_text)
  by_kernel_name = kernel_op_names(hlo_text)
  by_stage: dict[str, float] = collections.Counter()
  by_kind: dict[str, float] = collections.Counter()
  by_both: dict[str, float] = collections.Counter()
  by_kernel: dict[str, float] = collections.Counter()
  instr_of: dict[str, str] = {}
  events = device_events(trace)
  for e in events:
    dur = float(e.get("dur", 0.0)) * 1e-6 / steps  # trace times are microseconds
    args = e.get("args", {}) or {}
    instr = str(args.get("hlo_op") or args.get("long_name") or "")
    kernel = str(e.get("name", ""))
    st = stage(names.get(instr) or by_kernel_name.get(kernel))
    kd = kind(kernel, instr)
    by_stage[st] += dur
    by_kind[kd] += dur
    by_both[f"{st}/{kd}"] += dur
    by_kernel[kernel] += dur
    instr_of.setdefault(kernel, instr)
  total = sum(by_stage.values())
  rnd = lambda d: {k: round(v, 6) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
  return {
    "steps": steps,
    "device_events": len(events),
    "device_s_per_step": round(total, 6),
    "by_stage_s": rnd(by_stage),
    "by_kind_s": rnd(by_kind),
    "by_stage_kind_s": rnd(by_both),
    "top_kernels": [
      {"kernel": k[:160], "hlo_op": instr_of[k], "s_per_step": round(v, 6)}
      for k, v in by_kernel.most_common(top)
    ],
    "hlo_instructions_with_op_name": len(names),
  }


def load_trace(path: str) -> dict | list:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return json.load(f)


def format_breakdown(b: dict) -> str:
  total = b["device_s_per_step"] or 1.0
  per_step = b["device_s_per_step"] * 1e3
  lines = [f"device time per step: {per_step:.2f} ms ({b['device_events']} events)"]
  for title, key in (("stage", "by_stage_s"), ("kind", "by_kind_s")):
    lines.append(f"  by {title}:")
    for k, v in b[key].items():
      lines.append(f"    {k:<24} {v * 1e3:9.3f} ms  {100 * v / total:5.1f} %")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("trace")
  p.add_argument("hlo")
  p.add_argument("--steps", type=int, default=1)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  opener = gzip.open if args.hlo.endswith(".gz") else open
  with opener(args.hlo, "rt") as f:
    b = breakdown(load_trace(args.trace), f.read(), args.steps)
  print(format_breakdown(b))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(b, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
