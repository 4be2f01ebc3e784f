"""Memory planner: will a training configuration fit on a GPU, and what to shrink if not.

Nothing here allocates the model. Parameter and optimizer-state shapes come
from ``jax.eval_shape``; the step itself is lowered and compiled on
``jax.ShapeDtypeStruct`` inputs, jitted as ``train.compile_train_step`` jits it
(parameters and optimizer state donated), and XLA's own buffer assignment says
what is live when.

Two estimates are produced:

* **analytic** (seconds): weights + optimizer state (both exact, from
  ``eval_shape``) + gradients in the param dtype (all of them: the train step
  materialises the whole gradient pytree before the update; one decoder block's
  with ``per_layer_updates``) + activations (the residuals JAX saves for the
  backward pass, counted on the traced 1- and 2-layer model and extrapolated) +
  the loss's float32 d(logits) + the temporaries of the optimizer update of
  the largest unprojected leaf (compiled on its own) or of one SVD refresh.
  It assumes each update's temporaries exist for one leaf at a time.
* **xla** (minutes at 7B on a CPU): the compiled step's ``memory_analysis()``,
  and a replay of the live ranges of its buffer assignment (a dump XLA writes
  to a temporary directory). The replay reproduces XLA's peak to within a
  few percent and says what is alive at the peak (weights, optimizer state,
  forward activations, backward values, optimizer-update temporaries, layout
  copies XLA inserted, ...).

Compiling on the CPU distorts a bf16 figure: the CPU backend has no bf16
matmul, so it inserts ``convert`` ops that make float32 copies of bf16 dot
operands (every weight, alive from the forward to the backward pass) and
produces float32 dot results that it narrows afterwards. A GPU runs those
dots in bf16. The planner finds these compiler-inserted converts in the
optimised HLO (no source metadata, 16-bit float to float32, feeding a dot; or
a float32 dot result consumed only by such narrowing converts), replays the
live ranges with those buffers removed (or halved where the GPU would keep
the 16-bit value) and reports that as the prediction. Everything else about
the CPU schedule (which operations run when) is kept; a GPU compile may
schedule differently.

The step planned is the one ``train.compile_train_step`` would run: the
per-layer step (``train.make_layerwise_step``: each decoder block updated
right after its gradient, so one block's gradient is alive at a time) unless
``--grad-accum`` > 1, ``--grad-clip`` or ``--no-per-layer-updates`` asks for
the whole-gradient step.

``plan()`` returns a JSON-serialisable dict; ``format_plan()`` renders it.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from galore_jax import model as model_lib
from galore_jax import train
from galore_jax.tree import tree_bytes

GB = 1e9
GIB = 2**30
DEFAULT_VOCAB = 32000  # the paper's T5 tokenizer
DEFAULT_GPU_MEMORY = "24GB"

_UNITS = {
  "": GB,
  "b": 1,
  "kb": 1e3,
  "mb": 1e6,
  "gb": 1e9,
  "tb": 1e12,
  "kib": 2**10,
  "mib": 2**20,
  "gib": 2**30,
  "tib": 2**40,
}


def parse_bytes(text: str, flag: str = "--gpu-memory") -> int:
  """``"24GB"`` -> 24e9, ``"24GiB"`` -> 24 * 2**30, a bare number means GB."""
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
  if not m or m.group(2).lower() not in _UNITS:
    raise train.ConfigError(flag, f"expected a size such as 24GB, 24GiB or 80000MB, got {text!r}")
  value = float(m.group(1)) * _UNITS[m.group(2).lower()]
  if value <= 0:
    raise train.ConfigError(flag, f"must be > 0, got {text!r}")
  return int(value)


def fmt_bytes(n: float) -> str:
  return f"{n / GB:.2f} GB" if abs(n) >= 0.1 * GB else f"{n / 1e6:.1f} MB"


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


def _path_names(path) -> list[str]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
  return out


# ---------------------------------------------------------------------------
# The configuration being planned.


@dataclasses.dataclass(frozen=True)
class Planned:
  """Abstract model, optimizer and state of one configuration (no arrays)."""

  cfg: train.TrainConfig
  model_cfg: model_lib.LlamaConfig
  graphdef: Any
  params: Any
  tx: Any
  opt_state: Any


def build(
  cfg: train.TrainConfig, vocab_size: int = DEFAULT_VOCAB, overrides: dict | None = None
) -> Planned:
  """Validates ``cfg`` and builds abstract params / optimizer state (``eval_shape``)."""
  train.validate(cfg)
  if vocab_size < 2:
    raise train.ConfigError("--vocab-size", f"must be >= 2, got {vocab_size}")
  try:
    model_cfg = model_lib.get_config(
      cfg.model,
      vocab_size=vocab_size,
      param_dtype=train.DTYPES[cfg.param_dtype],
      dtype=train.DTYPES[cfg.dtype],
      remat=cfg.remat,
      **(overrides or {}),
    )
  except (ValueError, TypeError) as e:
    raise train.ConfigError("--model", str(e)) from e
  smallest = min(model_cfg.hidden_size, model_cfg.intermediate_size)
  if cfg.is_galore and cfg.rank > smallest:
    raise train.ConfigError(
      "--rank", f"{cfg.rank} is larger than the smallest projected matrix dimension ({smallest})"
    )
  graphdef, params = _abstract_model(model_cfg, cfg.seed)
  tx = train.build_optimizer(cfg)
  opt_state = jax.eval_shape(tx.init, params)
  return Planned(cfg, model_cfg, graphdef, params, tx, opt_state)


@functools.lru_cache(maxsize=32)
def _abstract_model(model_cfg: model_lib.LlamaConfig, seed: int = 0):
  return train.abstract_model(model_cfg, seed)


def optimizer_breakdown(opt_state) -> dict[str, int]:
  """Bytes of the optimizer state: GaLore projectors vs moments (8-bit codes and scales
  included) vs the rest (step counters)."""
  out = {"projector_bytes": 0, "moment_bytes": 0, "other_bytes": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    nbytes = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
    names = _path_names(path)
    if "projectors" in names:
      out["projector_bytes"] += nbytes
    elif "mu" in names or "nu" in names:
      out["moment_bytes"] += nbytes
    else:
      out["other_bytes"] += nbytes
  return out


def _batch_spec(cfg: train.TrainConfig):
  shape = (cfg.grad_accum, cfg.batch_size, cfg.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("inputs", "targets", "mask")}


# ---------------------------------------------------------------------------
# Analytic estimate.


@functools.lru_cache(maxsize=256)
def _residual_bytes(model_cfg, batch: int, seq_len: int, layers: int) -> int:
  """Bytes JAX saves for the backward pass of a ``layers``-deep copy of the model
  (values computed in the forward pass; the weights themselves are not counted)."""
  from jax._src.ad_checkpoint import saved_residuals  # no public equivalent that returns them

  mc = dataclasses.replace(model_cfg, num_layers=layers)
  graphdef, params = _abstract_model(mc)
  spec = {
    k: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32) for k in ("inputs", "targets", "mask")
  }
  res = saved_residuals(lambda p, b: train._token_loss(graphdef, p, b)[0], params, spec)
  return sum(
    a.size * jnp.dtype(a.dtype).itemsize for a, why in res if "from the argument" not in why
  )


def activation_bytes(model_cfg, batch: int, seq_len: int) -> dict[str, int]:
  """Saved activations of the full model, from the traced residuals of 1- and 2-layer copies
  (blocks are identical, so the count is exactly linear in depth).

  With remat, the saved set shrinks to what the policy keeps, and the backward
  pass additionally holds one block's full residuals while it recomputes it.
  """
  one = _residual_bytes(model_cfg, batch, seq_len, 1)
  two = _residual_bytes(model_cfg, batch, seq_len, 2)
  per_block = two - one
  saved = one + (model_cfg.num_layers - 1) * per_block
  recompute = 0
  if model_cfg.remat != "none":
    plain = dataclasses.replace(model_cfg, remat="none")
    recompute = _residual_bytes(plain, batch, seq_len, 2) - _residual_bytes(
      plain, batch, seq_len, 1
    )
  return {
    "saved_bytes": saved,
    "per_block_bytes": per_block,
    "recompute_bytes": recompute,
    "total_bytes": saved + recompute,
  }


def _largest_unprojected_leaf(p: Planned):
  mask = train.galore_mask(p.params) if p.cfg.is_galore else jax.tree.map(lambda _: False, p.params)
  best = None
  for (path, leaf), projected in zip(
    jax.tree_util.tree_flatten_with_path(p.params)[0], jax.tree.leaves(mask), strict=True
  ):
    if not projected and (best is None or leaf.size > best[1].size):
      best = (path, leaf)
  return best


def update_transient_bytes(p: Planned) -> int:
  """Temporaries of the optimizer update for the largest leaf that is not projected.

  Compiles ``tx.update`` on a one-leaf tree of that leaf's shape (seconds, no
  allocation). That leaf has no matmul in its update, so the CPU figure has no
  bf16-dot distortion.
  """
  best = _largest_unprojected_leaf(p)
  if best is None:
    return 0
  _, leaf = best
  return _update_transient(p.cfg, tuple(leaf.shape), jnp.dtype(leaf.dtype).name)


@functools.lru_cache(maxsize=64)
def _update_transient(cfg: train.TrainConfig, shape: tuple[int, ...], dtype: str) -> int:
  tx = train.build_optimizer(cfg)
  one = {"leaf": jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))}
  state = jax.eval_shape(tx.init, one)

  def upd(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(lambda a, u: a + u.astype(a.dtype), params, updates), state

  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    compiled = jax.jit(upd, donate_argnums=(0, 1)).lower(one, state, one).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def svd_transient_bytes(p: Planned) -> int:
  """Float32 workspace of one projector refresh of the largest projected matrix:
  the float32 copy of the gradient, U, S and Vh of a thin SVD."""
  if not p.cfg.is_galore:
    return 0
  best = 0
  mask = jax.tree.leaves(train.galore_mask(p.params))
  for leaf, projected in zip(jax.tree.leaves(p.params), mask, strict=True):
    if projected:
      m, n = leaf.shape[-2], leaf.shape[-1]
      k = min(m, n)
      best = max(best, 4 * (m * n + m * k + k + k * n))
  return best


def _block_gradient_bytes(p: Planned) -> int:
  """Largest gradient the per-layer step holds at once: one stage's, i.e. the attention or
  MLP half of a decoder block, or the embedding, or final norm + LM head."""
  layers = p.params["layers"]
  blocks = layers.values() if isinstance(layers, dict) else layers
  halves = (model_lib.DecoderBlock.ATTENTION, model_lib.DecoderBlock.MLP)
  sizes = [sum(tree_bytes(b[k]) for k in keys) for b in blocks for keys in halves]
  sizes.append(tree_bytes(p.params["embed"]))
  sizes.append(tree_bytes(p.params["final_norm"]) + tree_bytes(p.params["lm_head"]))
  return max(sizes)


def analytic(p: Planned) -> dict[str, Any]:
  cfg, mc = p.cfg, p.model_cfg
  per_layer_updates = train.per_layer_updates(cfg)
  weights = tree_bytes(p.params)
  optimizer = tree_bytes(p.opt_state)
  n_params = sum(x.size for x in jax.tree.leaves(p.params))
  acts = activation_bytes(mc, cfg.batch_size, cfg.seq_len)
  full_grad = weights  # gradients are cast to the param dtype
  if cfg.grad_accum > 1:
    full_grad += 4 * n_params  # float32 accumulator of the scan over micro-batches
  block_grad = _block_gradient_bytes(p)
  loss_transient = 4 * cfg.batch_size * cfg.seq_len * mc.vocab_size  # float32 d(logits)
  update = update_transient_bytes(p)
  svd = svd_transient_bytes(p)
  update_phase = max(update, svd)
  head_grad = tree_bytes(p.params["lm_head"])
  if per_layer_updates:
    grads_at_peak = block_grad
    dynamic = acts["total_bytes"] + loss_transient + block_grad + update_phase
  else:
    grads_at_peak = full_grad
    dynamic = max(acts["total_bytes"] + loss_transient + head_grad, full_grad + update_phase)
  return {
    "weights_bytes": weights,
    "optimizer_bytes": optimizer,
    "gradient_bytes": full_grad,
    "gradients_at_peak_bytes": grads_at_peak,
    "largest_layer_gradient_bytes": block_grad,
    "activation_bytes": acts["total_bytes"],
    "activations": acts,
    "loss_transient_bytes": loss_transient,
    "update_transient_bytes": update,
    "svd_transient_bytes": svd,
    "peak_bytes": weights + optimizer + dynamic,
    "per_layer_updates": per_layer_updates,
  }


# ---------------------------------------------------------------------------
# XLA: compile the real step and replay its buffer live ranges.


@dataclasses.dataclass
class _Instr:
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


def _parse_hlo(text: str) -> dict[str, _Instr]:
  instrs: dict[str, _Instr] = {}
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
    instrs[m.group("name")] = _Instr(
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
_LAYOUT_OPS = {"parameter", "convert", "bitcast", "copy", "transpose", "reshape"}


def _cpu_artifacts(instrs: dict[str, _Instr]) -> dict[str, float]:
  """Instruction name -> the fraction of its buffer a GPU would also allocate, for the
  buffers that exist only because the CPU backend runs bf16/f16 dots in float32."""
  by_comp: dict[str, list[_Instr]] = {}
  users: dict[str, list[_Instr]] = {}
  for ins in instrs.values():
    by_comp.setdefault(ins.computation, []).append(ins)
    for o in ins.operands:
      users.setdefault(o, []).append(ins)

  def inserted(ins: _Instr) -> bool:
    # XLA's own converts carry no metadata or the metadata of the dot they serve; one
    # the program asked for is named after jax's convert_element_type.
    return ins.op_name is None or not ins.op_name.endswith("convert_element_type")

  def inserted_upcast(ins: _Instr) -> bool:
    src = instrs.get(ins.operands[0]) if ins.operands else None
    return (
      ins.opcode == "convert"
      and inserted(ins)
      and ins.dtype == "f32"
      and src is not None
      and src.dtype in _NARROW_FLOATS
    )

  def inserted_narrowing(ins: _Instr) -> bool:
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

  def contains_dot(ins: _Instr) -> bool:
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


def _stack_files(hlo: str) -> dict[int, set[str]]:
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


def _category(
  name: str,
  ins: _Instr | None,
  instrs: dict[str, _Instr],
  frames: dict[int, set[str]] | None = None,
) -> str:
  if name.startswith("params"):
    return "weights"
  if name.startswith("opt_state"):
    return "optimizer state"
  if name.startswith("batch"):
    return "batch"
  op = (ins.op_name if ins else None) or ""
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


def _replay(dump_dir: str) -> dict[str, Any]:
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
  instrs = _parse_hlo(hlo)
  artifacts = _cpu_artifacts(instrs)
  frames = _stack_files(hlo)

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
      cat = _category(base, instrs.get(base), instrs, frames)
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


def compile_estimate(
  p: Planned, *, replay: bool = True, keep_dump: str | None = None, step_fn=None
) -> dict[str, Any]:
  """Lowers and compiles the real train step (donating params and optimizer state) on
  abstract inputs; returns XLA's memory analysis, timings and the replayed peaks.

  ``step_fn`` replaces the trainer's step (experiments).
  """
  if step_fn is None:
    step_fn = (
      train.make_layerwise_step(p.graphdef, p.tx, remat=p.cfg.remat)
      if train.per_layer_updates(p.cfg)
      else train.make_train_step(p.graphdef, p.tx)
    )
  step = step_fn
  jitted = jax.jit(step, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    lowered = jitted.lower(p.params, p.opt_state, _batch_spec(p.cfg))
  t1 = time.perf_counter()
  dump_dir = (keep_dump or tempfile.mkdtemp(prefix="galore_plan_")) if replay else None
  try:
    options = {"xla_dump_to": dump_dir} if replay else None
    compiled = lowered.compile(options) if options else lowered.compile()
    t2 = time.perf_counter()
    out = {
      "backend": jax.default_backend(),
      "lower_seconds": round(t1 - t0, 1),
      "compile_seconds": round(t2 - t1, 1),
      **compiled_memory(compiled),
    }
    if replay:
      try:
        out.update(_replay(dump_dir))
      except (FileNotFoundError, IndexError, ValueError) as e:  # dump format changed
        out["replay_error"] = str(e)
    return out
  finally:
    if dump_dir and not keep_dump:
      shutil.rmtree(dump_dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# The plan.


def _fits(peak: int, gpu: int) -> bool:
  return peak <= gpu


def suggestions(
  cfg: train.TrainConfig,
  *,
  vocab_size: int,
  overrides: dict | None,
  gpu_memory: int,
  scale: float | None = None,
) -> list[dict[str, Any]]:
  """Re-plans with one change at a time (analytically: compiling each would take minutes
  at 7B). ``scale`` (compiled peak / analytic peak of the unchanged configuration) turns
  each analytic figure into ``peak_bytes``, the one ``fits`` is judged on."""
  cands: list[tuple[str, dict[str, Any]]] = []
  mc = model_lib.get_config(cfg.model, **(overrides or {}))
  galore_rank = min(1024, mc.hidden_size // 4)
  if not cfg.optimizer.endswith("8bit"):
    cands.append(("8-bit optimizer states", {"optimizer": cfg.optimizer + "8bit"}))
  if not cfg.is_galore:
    cands.append(
      (f"GaLore rank {galore_rank}", {"optimizer": "galore_" + cfg.optimizer, "rank": galore_rank})
    )
    if not cfg.optimizer.endswith("8bit"):
      cands.append(
        (f"8-bit GaLore rank {galore_rank}", {"optimizer": "galore_adamw8bit", "rank": galore_rank})
      )
  if cfg.is_galore and cfg.rank >= 32:
    cands.append((f"rank {cfg.rank // 2}", {"rank": cfg.rank // 2}))
  if cfg.remat == "none":
    cands.append(("activation checkpointing (--remat full)", {"remat": "full"}))
  if cfg.batch_size > 1:
    half = cfg.batch_size // 2
    accum = cfg.grad_accum * cfg.batch_size // half
    cands.append((f"batch {half} x grad-accum {accum}", {"batch_size": half, "grad_accum": accum}))
  if cfg.param_dtype == "float32" or cfg.dtype == "float32":
    cands.append(("bf16 weights and compute", {"param_dtype": "bfloat16", "dtype": "bfloat16"}))
  if not train.per_layer_updates(cfg):
    change = {"per_layer_updates": True, "grad_clip": 0.0}
    label = "per-layer weight updates (drop --no-per-layer-updates / --grad-clip"
    if cfg.grad_accum > 1:
      change.update(batch_size=cfg.batch_size * cfg.grad_accum, grad_accum=1)
      label += f", batch {cfg.batch_size * cfg.grad_accum} without accumulation"
    cands.append((label + ")", change))
  out = []
  for label, change in cands:
    try:
      new = dataclasses.replace(cfg, **change)
      peak = analytic(build(new, vocab_size, overrides))["peak_bytes"]
    except train.ConfigError:
      continue
    entry = {
      "change": label,
      "flags": change,
      "analytic_peak_bytes": int(peak),
      "peak_bytes": int(peak * scale) if scale else int(peak),
      "basis": f"analytic x {scale:.2f}" if scale else "analytic",
    }
    entry["fits"] = _fits(entry["peak_bytes"], gpu_memory)
    out.append(entry)
  out.sort(key=lambda s: s["peak_bytes"])
  return out


def plan(
  cfg: train.TrainConfig,
  *,
  vocab_size: int = DEFAULT_VOCAB,
  gpu_memory: int | str = DEFAULT_GPU_MEMORY,
  compile: bool = True,
  overrides: dict | None = None,
  suggest: bool = True,
) -> dict[str, Any]:
  """Memory plan of ``cfg``; see the module docstring for what each figure means."""
  gpu = parse_bytes(gpu_memory) if isinstance(gpu_memory, str) else int(gpu_memory)
  if gpu <= 0:
    raise train.ConfigError("--gpu-memory", f"must be > 0, got {gpu_memory!r}")
  p = build(cfg, vocab_size, overrides)
  per_layer_updates = train.per_layer_updates(cfg)
  opt = optimizer_breakdown(p.opt_state)
  an = analytic(p)
  n_params = sum(x.size for x in jax.tree.leaves(p.params))
  result: dict[str, Any] = {
    "config": {
      "model": cfg.model,
      "optimizer": cfg.optimizer,
      "rank": cfg.rank if cfg.is_galore else None,
      "batch_size": cfg.batch_size,
      "seq_len": cfg.seq_len,
      "grad_accum": cfg.grad_accum,
      "param_dtype": cfg.param_dtype,
      "dtype": cfg.dtype,
      "remat": cfg.remat,
      "vocab_size": vocab_size,
      **({"overrides": overrides} if overrides else {}),
    },
    "params": n_params,
    "weights_bytes": an["weights_bytes"],
    "optimizer_bytes": an["optimizer_bytes"],
    "optimizer_breakdown": opt,
    "gradient_bytes": an["gradient_bytes"],
    "gradients_at_peak_bytes": an["gradients_at_peak_bytes"],
    "activation_bytes": an["activation_bytes"],
    "analytic": an,
    "per_layer_updates": per_layer_updates,
  }
  if compile:
    xla = compile_estimate(p)
    xla["step"] = "train.make_layerwise_step" if per_layer_updates else "train.make_train_step"
    result["xla"] = xla
    result["peak_bytes"] = xla.get("corrected_peak_bytes", xla["peak_bytes"])
    result["peak_source"] = (
      "xla_corrected" if "corrected_peak_bytes" in xla else f"xla_{xla['backend']}"
    )
    if xla["backend"] != "cpu" and "corrected_peak_bytes" in xla:
      # Off the CPU, nothing needs correcting: the compiled figure is the prediction.
      result["peak_bytes"] = xla["peak_bytes"]
      result["peak_source"] = f"xla_{xla['backend']}"
  else:
    result["peak_bytes"] = an["peak_bytes"]
    result["peak_source"] = "analytic"
  result["gpu_memory_bytes"] = gpu
  result["fits"] = _fits(result["peak_bytes"], gpu)
  result["headroom_bytes"] = gpu - result["peak_bytes"]
  if suggest and not result["fits"]:
    scale = result["peak_bytes"] / an["peak_bytes"] if result["peak_source"] != "analytic" else None
    result["suggestions"] = suggestions(
      cfg,
      vocab_size=vocab_size,
      overrides=overrides,
      gpu_memory=gpu,
      scale=scale,
    )
  return result


def format_plan(r: dict[str, Any]) -> str:
  c, an, opt = r["config"], r["analytic"], r["optimizer_breakdown"]
  per_layer = r["per_layer_updates"]
  lines = [
    f"{c['model']} ({r['params'] / 1e6:.1f}M params, vocab {c['vocab_size']}), "
    f"{c['optimizer']}"
    + (f" rank {c['rank']}" if c["rank"] else "")
    + f", batch {c['batch_size']} x {c['seq_len']}"
    + (f" x accum {c['grad_accum']}" if c["grad_accum"] > 1 else "")
    + f", params {c['param_dtype']}, compute {c['dtype']}, remat {c['remat']}"
    + (", per-layer updates" if per_layer else ", whole-gradient step"),
    f"  weights                 {fmt_bytes(r['weights_bytes'])}",
    f"  optimizer state         {fmt_bytes(r['optimizer_bytes'])}"
    f"  (moments {fmt_bytes(opt['moment_bytes'])}, projectors "
    f"{fmt_bytes(opt['projector_bytes'])}, other {opt['other_bytes']} B)",
    f"  gradients at peak       {fmt_bytes(r['gradients_at_peak_bytes'])}"
    + (
      "  (one stage: half a block, or the embedding / head)"
      if per_layer
      else "  (all of them: this step computes the whole gradient, then updates)"
    ),
    f"  activations             {fmt_bytes(r['activation_bytes'])}  (saved residuals"
    + (", + one block recomputed)" if c["remat"] != "none" else ")"),
    f"  loss d(logits) f32      {fmt_bytes(an['loss_transient_bytes'])}",
    f"  update temporaries      {fmt_bytes(an['update_transient_bytes'])} (largest "
    f"unprojected leaf); SVD refresh {fmt_bytes(an['svd_transient_bytes'])}",
    f"  analytic peak           {fmt_bytes(an['peak_bytes'])}  (weights + optimizer + "
    + (
      "activations + d(logits) + one stage's gradient + update temporaries)"
      if per_layer
      else "max(activations + d(logits), whole gradient + update temporaries))"
    ),
  ]
  x = r.get("xla")
  if x:
    lines.append(
      f"  XLA ({x['backend']}), {x.get('step', 'step')}: lower {x['lower_seconds']} s, "
      f"compile {x['compile_seconds']} s; arguments {fmt_bytes(x['argument_bytes'])}, "
      f"temp {fmt_bytes(x['temp_bytes'])} -> peak {fmt_bytes(x['peak_bytes'])}"
    )
    if "corrected_peak_bytes" in x:
      live = ", ".join(
        f"{k} {fmt_bytes(v)}"
        for k, v in x["live_at_corrected_peak"].items()
        if v >= 0.005 * x["corrected_peak_bytes"]
      )
      lines += [
        f"  XLA peak without the CPU's f32 copies for bf16 dots: "
        f"{fmt_bytes(x['corrected_peak_bytes'])} (replayed CPU peak "
        f"{fmt_bytes(x['replayed_cpu_peak_bytes'])}; {x['cpu_only_buffers']} "
        "compiler-inserted buffers discounted)",
        f"    live then: {live}",
      ]
    elif "replay_error" in x:
      lines.append(f"  (live-range replay failed: {x['replay_error']})")
  verdict = "FITS" if r["fits"] else "DOES NOT FIT"
  lines.append(
    f"  predicted peak          {fmt_bytes(r['peak_bytes'])} "
    f"({r['peak_bytes'] / GIB:.2f} GiB, {r['peak_source']}) vs "
    f"{fmt_bytes(r['gpu_memory_bytes'])}: {verdict} (headroom {fmt_bytes(r['headroom_bytes'])})"
  )
  if r.get("suggestions"):
    basis = r["suggestions"][0]["basis"]
    lines.append(
      f"  to shrink it, one change at a time ({basis}"
      + (
        ": analytic re-plans scaled by this configuration's compiled/analytic ratio"
        if basis != "analytic"
        else ""
      )
      + "):"
    )
    for s in r["suggestions"]:
      extra = f" (analytic {fmt_bytes(s['analytic_peak_bytes'])})" if basis != "analytic" else ""
      lines.append(
        f"    {s['change']:<58} -> {fmt_bytes(s['peak_bytes'])}{extra}"
        f"{'  fits' if s['fits'] else ''}"
      )
  lines.append(
    "  note: JAX preallocates 75% of GPU memory by default; set "
    "XLA_PYTHON_CLIENT_MEM_FRACTION=.95 to use more of it."
  )
  return "\n".join(lines)
