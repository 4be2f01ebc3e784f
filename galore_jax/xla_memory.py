"""XLA memory: a compiled executable's memory analysis, and a replay of its buffer live ranges.

``compile_and_replay`` compiles a lowered computation with ``xla_dump_to`` set; XLA then
writes the optimised HLO text, its buffer assignment and the buffers' live ranges.
``replay_live_ranges`` reads those three files back (``parse_hlo`` for the HLO text) and sums the
sizes of the buffers alive at each point of the schedule: the raw peak (within a few
percent of ``memory_analysis()``'s) and a corrected peak without the buffers that exist
only because the CPU backend runs bf16 / f16 dots in float32 (``cpu_artifacts``), with
what is alive at that peak, by category (``category``).

The dump is XLA's debugging text, not a stable format: a parse that fails raises
``FileNotFoundError`` / ``IndexError`` / ``ValueError``, which ``compile_and_replay``
reports as ``replay_error`` instead of a peak. ``tests/data/xla_tiny`` holds a small dump
of this format, with the figures it must give.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import tempfile
import time
from typing import Any

import jax
import numpy as np


def compiled_memory(compiled) -> dict[str, int]:
  """A compiled executable's ``memory_analysis()`` in bytes, with its peak: arguments
  + outputs - outputs aliased to (donated) arguments + temporaries."""
  ma = compiled.memory_analysis()
  out = {
    "argument_bytes": int(ma.argument_size_in_bytes),
    "output_bytes": int(ma.output_size_in_bytes),
    "alias_bytes": int(ma.alias_size_in_bytes),
    "temp_bytes": int(ma.temp_size_in_bytes),
  }
  out["peak_bytes"] = (
    out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  )
  return out


@dataclasses.dataclass
class Instr:
  name: str
  computation: str
  dtype: str  # element type of a non-tuple result ("" for tuples)
  shape: tuple[int, ...]
  opcode: str
  operands: list[str]
  calls: list[str]
  op_name: str | None
  param_index: int | None = None
  frame: int | None = None
  is_root: bool = False


_INSTR = re.compile(r"^\s*(?P<root>ROOT\s+)?%(?P<name>[^\s=]+) = (?P<rest>.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[^\s(]+) \(.*\{\s*$")
_ARRAY = re.compile(r"^(?P<dt>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")


def _matching(s: str, start: int) -> int:
  depth = 0
  for i in range(start, len(s)):
    if s[i] == "(":
      depth += 1
    elif s[i] == ")":
      depth -= 1
      if depth == 0:
        return i
  return len(s) - 1


def parse_hlo(text: str) -> dict[str, Instr]:
  instrs: dict[str, Instr] = {}
  comp = ""
  for line in text.splitlines():
    h = _HEADER.match(line)
    if h:
      comp = h.group("name")
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    rest = m.group("rest")
    if rest.startswith("("):
      end = _matching(rest, 0)
      dtype, shape, rest = "", (), rest[end + 1 :].lstrip()
    else:
      a = _ARRAY.match(rest)
      if not a:
        continue
      dtype = a.group("dt")
      shape = tuple(int(d) for d in a.group("dims").split(",") if d)
      rest = rest[rest.index(" ") + 1 :] if " " in rest else ""
    om = re.match(r"([\w\-]+)\(", rest)
    if not om:
      continue
    opcode = om.group(1)
    close = _matching(rest, om.end() - 1)
    operands = re.findall(r"%([^\s,()]+)", rest[om.end() - 1 : close + 1])
    attrs = rest[close + 1 :]
    calls = re.findall(r"(?:calls|to_apply|body|condition)=%([^\s,}]+)", attrs)
    for group in re.findall(r"branch_computations=\{([^}]*)\}", attrs):
      calls += re.findall(r"%([^\s,}]+)", group)
    nm = re.search(r'op_name="([^"]*)"', attrs)
    pm = re.match(r"parameter\((\d+)\)", rest) if opcode == "parameter" else None
    fm = re.search(r"stack_frame_id=(\d+)", attrs)
    instrs[m.group("name")] = Instr(
      m.group("name"),
      comp,
      dtype,
      shape,
      opcode,
      operands,
      calls,
      nm.group(1) if nm else None,
      int(pm.group(1)) if pm else None,
      int(fm.group(1)) if fm else None,
      bool(m.group("root")),
    )
  return instrs


_NARROW_FLOATS = ("bf16", "f16")


def cpu_artifacts(instrs: dict[str, Instr]) -> dict[str, float]:
  """Instruction name -> the fraction of its buffer a GPU would also allocate, for the
  buffers that exist only because the CPU backend runs bf16/f16 dots in float32."""
  by_comp: dict[str, list[Instr]] = {}
  users: dict[str, list[Instr]] = {}
  for ins in instrs.values():
    by_comp.setdefault(ins.computation, []).append(ins)
    for o in ins.operands:
      users.setdefault(o, []).append(ins)

  def inserted(ins: Instr) -> bool:
    # XLA's own converts carry no metadata or the metadata of the dot they serve; one
    # the program asked for is named after jax's convert_element_type.
    return ins.op_name is None or not ins.op_name.endswith("convert_element_type")

  def inserted_upcast(ins: Instr) -> bool:
    src = instrs.get(ins.operands[0]) if ins.operands else None
    return (
      ins.opcode == "convert"
      and inserted(ins)
      and ins.dtype == "f32"
      and src is not None
      and src.dtype in _NARROW_FLOATS
    )

  def inserted_narrowing(ins: Instr) -> bool:
    src = instrs.get(ins.operands[0]) if ins.operands else None
    return (
      ins.opcode == "convert"
      and inserted(ins)
      and ins.dtype in _NARROW_FLOATS
      and src is not None
      and src.dtype == "f32"
    )

  def feeds_dot(name: str) -> bool:
    for u in users.get(name, []):
      if u.opcode == "dot" or (
        u.opcode == "fusion" and any(i.opcode == "dot" for c in u.calls for i in by_comp.get(c, []))
      ):
        continue
      return False
    return bool(users.get(name))

  def contains_dot(ins: Instr) -> bool:
    return ins.opcode == "dot" or (
      ins.opcode == "fusion"
      and any(i.opcode == "dot" for c in ins.calls for i in by_comp.get(c, []))
    )

  def only_narrowed(name: str) -> bool:
    us = users.get(name, [])
    if not us:
      return False
    for u in us:
      if inserted_narrowing(u):
        continue
      if u.opcode == "fusion":
        body = [i for c in u.calls for i in by_comp.get(c, [])]
        params = [i for i in body if i.opcode == "parameter"]
        idx = [k for k, o in enumerate(u.operands) if o == name]
        ok = True
        for k in idx:
          pname = next((i.name for i in params if i.param_index == k), None)
          inner = [i for i in body if pname in i.operands] if pname else []
          if not inner or not all(inserted_narrowing(i) for i in inner):
            ok = False
        if ok:
          continue
      return False
    return True

  out: dict[str, float] = {}
  for ins in instrs.values():
    if ins.dtype != "f32":
      continue
    if inserted_upcast(ins) and feeds_dot(ins.name):
      out[ins.name] = 0.0
    elif ins.opcode == "fusion" and feeds_dot(ins.name):
      # A fusion whose result is upcast (below any layout ops) for a dot: a GPU would keep
      # the 16-bit value instead, and nothing at all if it is just an existing parameter.
      body = {i.name: i for c in ins.calls for i in by_comp.get(c, [])}
      node = next((i for i in body.values() if i.is_root), None)
      layout = False
      while node is not None and node.opcode in ("copy", "transpose", "bitcast", "reshape"):
        layout |= node.opcode in ("copy", "transpose")
        node = body.get(node.operands[0]) if node.operands else None
      if node is not None and inserted_upcast(node):
        src = body.get(node.operands[0])
        free = src is not None and src.opcode == "parameter" and not layout
        out[ins.name] = 0.0 if free else 0.5
    elif contains_dot(ins) and only_narrowed(ins.name):
      out[ins.name] = 0.5
  return out


def stack_files(hlo: str) -> dict[int, set[str]]:
  """stack_frame_id -> the source files on that stack (from the HLO text's tables)."""

  def table(title):
    m = re.search(rf"^{title}\n(.*?)(?:\n\n|\Z)", hlo, re.S | re.M)
    return m.group(1).splitlines() if m else []

  files = {int(a): b.strip('"') for a, b in (ln.split(" ", 1) for ln in table("FileNames"))}
  locs = {}
  for ln in table("FileLocations"):
    m = re.match(r"(\d+) \{file_name_id=(\d+)", ln)
    if m:
      locs[int(m.group(1))] = int(m.group(2))
  frames = {}
  for ln in table("StackFrames"):
    m = re.match(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", ln)
    if m:
      frames[int(m.group(1))] = (int(m.group(2)), int(m.group(3)))
  out: dict[int, set[str]] = {}
  for fid in frames:
    seen, cur = set(), fid
    while cur in frames and cur not in seen:
      seen.add(cur)
      loc, parent = frames[cur]
      out.setdefault(fid, set()).add(files.get(locs.get(loc, -1), ""))
      cur = parent
  return out


_OPTIMIZER_FILES = (
  "galore_jax/optimizer.py",
  "galore_jax/adam8bit.py",
  "galore_jax/projector.py",
  "optax/_src/transform.py",
  "optax/_src/update.py",
  "optax/transforms/",
)


def category(
  name: str,
  ins: Instr | None,
  instrs: dict[str, Instr],
  frames: dict[int, set[str]] | None = None,
) -> str:
  op = (ins.op_name if ins else None) or ""
  # An SPMD-partitioned module names its parameters param.N; their op_name keeps the path.
  arg = op if ins is not None and ins.opcode == "parameter" else ""
  if name.startswith("params") or arg.startswith("params"):
    return "weights"
  if name.startswith("opt_state") or arg.startswith("opt_state"):
    return "optimizer state"
  if name.startswith("batch") or arg.startswith("batch"):
    return "batch"
  if "transpose(" in op:
    return "backward (gradients, cotangents)"
  if "jvp(" in op:
    return "forward (activations)"
  files = (frames or {}).get(ins.frame, set()) if ins is not None else set()
  if "/cond/" in op or any(f.endswith(o) or o in f for f in files for o in _OPTIMIZER_FILES):
    return "optimizer update"
  if ins is not None and ins.opcode in ("copy", "fusion") and ins.op_name is None:
    body = [i for i in instrs.values() if i.computation in ins.calls] if ins.calls else [ins]
    if body and all(i.opcode in ("parameter", "copy", "bitcast", "transpose") for i in body):
      return "layout copies (XLA)"
  if op:
    return "step body (gradient scaling, metrics)"
  return "other"


_TOP_N = 12


def replay_live_ranges(dump_dir: str) -> dict[str, Any]:
  """Replays XLA's buffer live ranges: raw peak, and the peak without the CPU-only buffers."""

  def read(pattern):
    files = sorted(glob.glob(os.path.join(dump_dir, pattern)))
    if not files:
      raise FileNotFoundError(f"XLA dump {pattern} not found in {dump_dir}")
    # Several modules may be dumped (small helper jits); the step is the largest one.
    return max((open(f).read() for f in files), key=len)

  hlo = read("*after_optimizations.txt")
  live = read("*after_optimizations-live-range.txt")
  assignment = read("*after_optimizations-buffer-assignment.txt")
  # value -> (allocation, offset, size). Values of one allocation at the same offset whose
  # live ranges overlap are the same buffer (aliases: cond / tuple results, in-place ops).
  where: dict[str, tuple[int, int, int]] = {}
  alloc = -1
  for line in assignment.splitlines():
    a = re.match(r"allocation (\d+):", line)
    if a:
      alloc = int(a.group(1))
      continue
    m = re.match(r"\s*value: <\d+ (\S+?)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\)", line)
    if m:
      name = m.group(1) if "{" in m.group(1) else m.group(1) + "{}"
      where[name] = (alloc, int(m.group(3)), int(m.group(2)))
  section = live.split("BufferLiveRange:")[1].split("Live ranges at")[0]
  ranges = [
    (m.group(1), int(m.group(2)), int(m.group(3)))
    for m in re.finditer(r"^\s*(\S+):(\d+)-(\d+)\s*$", section, re.M)
  ]
  instrs = parse_hlo(hlo)
  artifacts = cpu_artifacts(instrs)
  frames = stack_files(hlo)

  slots: dict[tuple[int, int], list[list[Any]]] = {}
  for name, s, e in sorted(ranges, key=lambda r: r[1]):
    if name not in where:
      continue
    alloc_id, offset, size = where[name]
    base = name.split("{")[0]
    kept = int(size * artifacts.get(base, 1.0)) if name.endswith("{}") else size
    group = slots.setdefault((alloc_id, offset), [])
    if group and group[-1][2] >= s:  # overlaps the previous buffer here: an alias of it
      last = group[-1]
      last[2] = max(last[2], e)
      if size > last[3]:
        last[0], last[3], last[4] = name, size, kept
    else:
      group.append([name, s, e, size, kept])
  entries = [tuple(b) for group in slots.values() for b in group]
  end = max(e for _, _, e, _, _ in entries) + 2
  raw = np.zeros(end + 1, np.int64)
  fixed = np.zeros(end + 1, np.int64)
  for _, s, e, size, kept in entries:
    raw[s] += size
    raw[e + 1] -= size
    fixed[s] += kept
    fixed[e + 1] -= kept
  raw_t, fixed_t = np.cumsum(raw), np.cumsum(fixed)
  at = int(np.argmax(fixed_t))
  breakdown: dict[str, int] = {}
  removed_at_peak = 0
  top = []
  for name, s, e, size, kept in entries:
    if s <= at <= e:
      base = name.split("{")[0]
      cat = category(base, instrs.get(base), instrs, frames)
      breakdown[cat] = breakdown.get(cat, 0) + kept
      removed_at_peak += size - kept
      top.append((kept, name, cat))
  top.sort(reverse=True)
  return {
    "replayed_cpu_peak_bytes": int(raw_t.max()),
    "corrected_peak_bytes": int(fixed_t.max()),
    "cpu_only_bytes_at_corrected_peak": int(removed_at_peak),
    "cpu_only_buffers": len(artifacts),
    "live_at_corrected_peak": dict(sorted(breakdown.items(), key=lambda kv: -kv[1])),
    "corrected_peak_position": f"{at}/{end - 2}",
    "largest_live_at_corrected_peak": [
      {"buffer": n, "category": c, "bytes": int(k)} for k, n, c in top[:_TOP_N]
    ],
  }


def _compile_with_dump(lowered, dump_dir: str):
  """Compiles with ``xla_dump_to``, bypassing JAX's persistent compilation cache: a cache
  hit loads the executable without compiling it, so XLA would write no dump."""
  from galore_jax import compile_cache

  with compile_cache.bypassed():
    return lowered.compile({"xla_dump_to": dump_dir})


def compile_and_replay(
  lowered, *, replay: bool = True, keep_dump: str | None = None
) -> dict[str, Any]:
  """Compiles ``lowered`` (a ``jax.stages.Lowered``) and returns the backend, the compile
  seconds, :func:`compiled_memory` and, with ``replay``, the :func:`replay_live_ranges` figures (or
  ``replay_error`` if the dump cannot be read). The dump goes to a temporary directory
  that is removed afterwards, or to ``keep_dump``, which is kept. With ``replay`` the
  compile never comes from (nor goes to) the persistent compilation cache."""
  dump_dir = (keep_dump or tempfile.mkdtemp(prefix="galore_plan_")) if replay else None
  try:
    t0 = time.perf_counter()
    compiled = _compile_with_dump(lowered, dump_dir) if replay else lowered.compile()
    out = {
      "backend": jax.default_backend(),
      "compile_seconds": round(time.perf_counter() - t0, 1),
      **compiled_memory(compiled),
    }
    if replay:
      try:
        out.update(replay_live_ranges(dump_dir))
      except (FileNotFoundError, IndexError, ValueError) as e:  # dump format changed
        out["replay_error"] = str(e)
    return out
  finally:
    if dump_dir and not keep_dump:
      shutil.rmtree(dump_dir, ignore_errors=True)
