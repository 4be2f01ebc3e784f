"""Run metrics: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard.

Training records carry ``step``, ``loss``, ``lr``, ``step_s``, ``wait_s`` (the part of
``step_s`` the loop waited for the device), ``tokens_per_s``, ``mfu``, ``peak_bytes``,
``bytes_in_use`` (and ``grad_norm``, ``skipped``);
evaluation records carry ``step``, ``eval_loss`` and ``eval_ppl``; each start writes
one record with ``compile_s`` and ``startup_s``. ``step`` counts optimizer updates done
when the record was written, so a record with ``step: 1`` describes the first update.
A value the backend does not report (device memory on CPU, MFU without a known peak)
is ``null``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from galore_jax.errors import first_line


class MetricsWriter:
  """Appends records to ``<out>/metrics.jsonl`` and TensorBoard events under ``<out>/tb``;
  with ``wandb_config`` (the run's configuration) also to Weights & Biases.

  Appending (never truncating) keeps the history of a resumed run in one file.
  ``purge_step``: the first step a resumed run replays (TensorBoard then shows each step once).

  A full disk does not end the run here: a record that cannot be written is kept in memory
  and written, after the ones before it, by a later ``write`` once there is room (one
  ``warn`` when the writes stop, one when they resume); TensorBoard, a mirror, stops at its
  first failed write (one ``warn``).
  """

  def __init__(
    self,
    out_dir: str,
    *,
    tensorboard: bool = True,
    wandb_config: dict[str, Any] | None = None,
    purge_step: int | None = None,
    warn: Callable[[str], Any] | None = None,
  ):
    os.makedirs(out_dir, exist_ok=True)
    self._warn = warn or (lambda text: print(f"galore-jax: warning: {text}", file=sys.stderr))
    # W&B first: if it cannot start, nothing else has been written.
    self._wandb = start_wandb(out_dir, wandb_config) if wandb_config is not None else None
    self.path = os.path.join(out_dir, "metrics.jsonl")
    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    self._pending = b""  # bytes not yet on disk, in order (a full disk)
    self._failing = False
    self._tb = _TensorBoard(os.path.join(out_dir, "tb"), purge_step) if tensorboard else None

  def write(self, record: dict[str, Any]) -> None:
    """Appends ``record`` (it needs a ``step``), stamped with ``time`` (Unix seconds) unless
    it has one: when it was written (a step's record: as the step ended), for a log read
    after the run. The stamp is not a TensorBoard or W&B scalar (both keep their own)."""
    clean = {k: _jsonable(v) for k, v in record.items()}
    clean.setdefault("time", round(time.time(), 3))
    self._pending += (json.dumps(clean) + "\n").encode()
    self._write_pending()
    scalars = {
      k: v
      for k, v in clean.items()
      if k not in ("step", "time") and isinstance(v, int | float) and v is not None
    }
    if self._tb is not None:
      try:
        self._tb.scalars(int(clean["step"]), scalars)
      except OSError as e:
        self._warn(
          f"TensorBoard events stop at step {clean['step']} ({e.strerror or e}); "
          f"{self.path} keeps every record"
        )
        with contextlib.suppress(OSError):  # its close flushes again
          self._tb.close()
        self._tb = None
    if self._wandb is not None:
      self._wandb.log(scalars, step=int(clean["step"]))

  def _write_pending(self) -> bool:
    failing = self._failing
    while self._pending:
      try:
        done = os.write(self._fd, self._pending)
      except OSError as e:
        if not failing:
          self._warn(
            f"{self.path} cannot be written ({e.strerror or e}); its records are kept in "
            "memory and written when there is room"
          )
        self._failing = True
        return False
      self._pending = self._pending[done:]  # a short write: the rest goes next
    if failing:
      self._warn(f"{self.path} is written again, the records kept meanwhile included")
    self._failing = False
    return True

  def close(self) -> None:
    if not self._write_pending():
      self._warn(f"{len(self._pending)} bytes of records could not be written to {self.path}")
    os.close(self._fd)
    if self._tb is not None:
      with contextlib.suppress(OSError):
        self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


# How often TensorBoard's event file is flushed to disk. tensorboardX's flush also fsyncs:
# once a step, that was a synchronous disk flush between two train steps (0.35 ms of the
# trainer's 2.2 ms per-step host time on this project's CPU; more on a network file system).
TENSORBOARD_FLUSH_S = 10.0


def _import_tensorboardx() -> None:
  """Imports tensorboardX without importing torch.

  tensorboardX's package ``__init__`` imports its ``SummaryWriter``, which imports torch
  where torch is installed, only to accept torch tensors. That was 3.3 s of the 7.5 s a
  ``galore-jax train`` process spent importing on this project's CPU (``python -X
  importtime``), on every start where torch is installed (the GPU image, most ML
  environments). This module writes floats through tensorboardX's event writer, so torch is
  hidden while tensorboardX is first imported: ``sys.modules["torch"] = None`` makes
  ``import torch`` raise ImportError, which tensorboardX handles. Nothing in a run imports
  torch meanwhile (another thread's ``import torch`` in that window would fail). Where torch
  is already loaded, or tensorboardX is, this changes nothing.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    import tensorboardX  # noqa: F401

    return
  sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    import tensorboardX  # noqa: F401
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]


class _TensorBoard:
  """TensorBoard scalars in tensorboardX's event files, written synchronously, so that a
  failed write (a full disk) raises OSError here. (tensorboardX's ``SummaryWriter`` writes
  from a thread that such an error ends, after which its bounded queue blocks the run.)
  Events reach the file through its buffer, and the file is flushed (and fsynced) at most
  every :data:`TENSORBOARD_FLUSH_S` seconds and when closed: a killed run's TensorBoard
  view can lack its last seconds, which ``metrics.jsonl`` (written at every record) has."""

  def __init__(self, logdir: str, purge_step: int | None):
    _import_tensorboardx()  # lazy: only runs that log
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    os.makedirs(logdir, exist_ok=True)
    self._events = EventsWriter(os.path.join(logdir, "events"))
    if purge_step is not None:
      # A resume: TensorBoard hides the earlier sessions' events from purge_step on, the
      # steps this session replays (as drop_after does for metrics.jsonl).
      start = SessionLog(status=SessionLog.START)
      self._events.write_event(Event(step=purge_step, wall_time=time.time(), session_log=start))
    self._events.flush()
    self._flushed = time.monotonic()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.summary import scalar

    for key, value in values.items():
      self._events.write_event(Event(step=step, wall_time=time.time(), summary=scalar(key, value)))
    if time.monotonic() - self._flushed >= TENSORBOARD_FLUSH_S:
      self._events.flush()
      self._flushed = time.monotonic()

  def close(self) -> None:
    self._events.close()


class WandbError(RuntimeError):
  """W&B could not start a run (a one-line reason)."""


WANDB_DIR = "wandb"  # in the run directory: W&B's files and the run's id (a resume continues it)


def wandb_mode() -> str:
  """``$WANDB_MODE`` if set; else ``online`` when an API key is configured and the W&B
  server answers within 3 s, else ``offline`` (``wandb sync`` uploads the run later)."""
  import netrc
  import socket
  from urllib.parse import urlparse

  if os.environ.get("WANDB_MODE"):
    return os.environ["WANDB_MODE"]
  host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
  key = os.environ.get("WANDB_API_KEY")
  if not key:
    with contextlib.suppress(OSError, netrc.NetrcParseError):
      key = (netrc.netrc().authenticators(host) or (None, None, None))[2]
  if not key:
    return "offline"
  try:
    socket.create_connection((host, 443), timeout=3).close()
  except OSError:
    return "offline"
  return "online"


def start_wandb(out_dir: str, config: dict[str, Any]):
  """A W&B run for ``out_dir`` (project ``$WANDB_PROJECT``, default ``galore-jax``); a
  resumed run directory continues the W&B run it started."""
  import wandb  # lazy: an optional extra (pip install 'galore-jax[wandb]')

  run_dir = os.path.join(out_dir, WANDB_DIR)
  created = not os.path.exists(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  id_file = os.path.join(run_dir, "run-id")
  if os.path.exists(id_file):
    with open(id_file, encoding="ascii") as f:
      run_id = f.read().strip()
  else:
    run_id = os.urandom(6).hex()
    with open(id_file, "w", encoding="ascii") as f:
      f.write(run_id + "\n")
  try:
    return wandb.init(
      project=os.environ.get("WANDB_PROJECT", "galore-jax"),
      name=os.path.basename(os.path.abspath(out_dir)),
      id=run_id,
      resume="allow",
      dir=run_dir,
      config=config,
      mode=wandb_mode(),
    )
  except Exception as e:  # noqa: BLE001 - wandb's errors (auth, network, usage) vary
    if created:
      shutil.rmtree(run_dir, ignore_errors=True)
    raise WandbError(f"wandb.init failed: {first_line(e, 1000)}") from e


# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s per device, matched
# against ``jax.Device.device_kind`` in this order (first match wins).
PEAK_TFLOPS = (
  ("h100 pcie", 756.0),
  ("h100", 989.0),
  ("h200", 989.0),
  ("a100", 312.0),
  ("rtx 4090", 165.2),
)


def default_peak_tflops(device_kind: str) -> float | None:
  """The datasheet peak for a known accelerator (H100, H200, A100, RTX 4090), else None."""
  kind = device_kind.lower()
  for name, tflops in PEAK_TFLOPS:
    if name in kind:
      return tflops
  return None


def mfu(n_params: int, tokens_per_s: float, peak_tflops: float | None, n_devices: int):
  """Model FLOPs utilisation: 6 FLOPs per parameter per token (forward 2, backward 4)
  over the devices' peak; None without a peak."""
  if not peak_tflops:
    return None
  return 6.0 * n_params * tokens_per_s / (peak_tflops * 1e12 * n_devices)


def _memory_stats(device) -> dict:
  """``Device.memory_stats()`` where the backend reports them (GPUs and TPUs), else {}."""
  try:
    return device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - a backend without the query
    return {}


def device_memory(devices) -> dict[str, int | None]:
  """``peak_bytes`` and ``bytes_in_use``, the largest over ``devices``, where the backend
  reports them (``Device.memory_stats()``: GPUs and TPUs; None on CPU)."""
  out: dict[str, int | None] = {"peak_bytes": None, "bytes_in_use": None}
  for d in devices:
    stats = _memory_stats(d)
    for key, name in (("peak_bytes", "peak_bytes_in_use"), ("bytes_in_use", "bytes_in_use")):
      if name in stats:
        out[key] = max(out[key] or 0, int(stats[name]))
  return out


# The environment variables that size JAX's GPU memory pool (the second is the newer name of
# the first; JAX refuses both at once), and the share of the GPU it takes without them.
MEMORY_FRACTION_VARS = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION")
JAX_DEFAULT_FRACTION = 0.75


def memory_pool(devices) -> str:
  """What bounds the devices' memory, for an out-of-memory message: the size of JAX's pool
  where the backend reports it (GPUs: by default a fixed share of the device, 75 %), and
  how to give it more when no fraction was set. Empty where nothing is known (CPU)."""
  limits = [
    (int(stats["bytes_limit"]), d)
    for d in devices
    if (stats := _memory_stats(d)).get("bytes_limit")
  ]
  if not limits:
    return ""
  limit, device = min(limits, key=lambda x: x[0])
  said = f"JAX's memory pool on {device} holds {limit / 1e9:.2f} GB"
  if device.platform == "gpu" and not any(os.environ.get(v) for v in MEMORY_FRACTION_VARS):
    said += (
      f" (by default {JAX_DEFAULT_FRACTION:.0%} of the GPU; XLA_PYTHON_CLIENT_MEM_FRACTION=.95"
      " gives it 95%, with nothing else on the GPU)"
    )
  return said


# JAX's monitoring events of a compilation: tracing, lowering to StableHLO, XLA compiling
# (or loading from the persistent cache).
COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)


class CompileTimer:
  """Seconds spent compiling while it listens (``with CompileTimer() as t: ...; t.seconds``)."""

  def __init__(self):
    self.seconds = 0.0
    self._listening = False

  def _listen(self, event: str, duration: float, **_) -> None:
    if self._listening and event in COMPILE_EVENTS:
      self.seconds += duration

  def __enter__(self) -> CompileTimer:
    import jax

    self._listening = True
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def stop(self) -> None:
    """Stops counting (idempotent)."""
    import jax

    if self._listening:
      self._listening = False
      with contextlib.suppress(AttributeError, ValueError, AssertionError):
        jax.monitoring.unregister_event_duration_listener(self._listen)

  def __exit__(self, *exc) -> None:
    self.stop()


def _jsonable(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
  return v


def read_metrics(out_dir: str) -> list[dict[str, Any]]:
  """All records of a run directory, in the order they were written."""
  with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def drop_after(out_dir: str, step: int) -> int:
  """Removes the records of steps after ``step`` (a resumed run replays them); returns
  how many were dropped. The file is rewritten atomically (a temporary file, then
  ``os.replace``), so a crash leaves either the old or the new file, never a mix."""
  path = os.path.join(out_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  keep = []
  for line in lines:
    try:
      if int(json.loads(line)["step"]) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      pass  # a record cut short by a crash mid-write: dropped with the replayed ones
  if len(keep) == len(lines):
    return 0
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(keep)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return len(lines) - len(keep)
