"""Multi-process (multi-host) training on JAX's own distributed runtime.

One process per host (or per GPU), all running the same ``galore-jax train`` command;
``jax.distributed.initialize`` joins them into one job whose global ``Mesh`` spans
every process's devices. What only shows with more than one process lives here:

* joining the job (:func:`initialize`): explicit ``--coordinator/--num-processes/
  --process-id``, or JAX's own cluster detection (SLURM, Open MPI, Cloud TPU / GKE);
  on CPU the cross-process collectives are gloo's (TCP);
* who writes what: process 0 alone writes metrics, TensorBoard, the progress bar and
  the log lines (:func:`is_primary`), and holds the run directory's lock
  (:func:`locked_run_dir`); every process takes part in checkpoint save and restore
  (orbax's multi-process protocol: each writes its own shards);
* data: each process builds only its own rows of every global batch
  (:class:`RowShard`), taken from the same shuffled index list as a single-process
  run, so a run's trajectory does not depend on how many processes share it;
* failure: a process that dies ends the others in bounded time. JAX's coordination
  service aborts the survivors when a peer's heartbeat stops (``--heartbeat-timeout``)
  or a collective loses its peer; a process that fails with an error exits at once
  without the graceful shutdown (:func:`exit_now`), which would otherwise wait for
  peers that are blocked in the next collective.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

# JAX's defaults: a lost peer is declared dead after this many seconds without heartbeat.
HEARTBEAT_TIMEOUT_S = 100
INIT_TIMEOUT_S = 300
# The run-directory barrier and the other start-up barriers: a peer that has not arrived
# after this long is not coming (a failed start-up elsewhere ends the job instead).
BARRIER_TIMEOUT_S = 600
MODES = ("auto", "on", "off")

# Environment variables that name the size of a multi-process job under the launchers whose
# layout jax.distributed.initialize() detects by itself (SLURM, Open MPI).
_JOB_SIZE_ENV = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


class DistributedError(ValueError):
  """A bad multi-process flag; ``flag`` names it (the CLI turns it into a ConfigError)."""

  def __init__(self, flag: str, message: str):
    super().__init__(f"{flag}: {message}")
    self.flag, self.message = flag, message


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins a job (the ``train`` flags).

  ``mode``: ``auto`` (default) joins when the explicit flags are given, or when the
  environment describes a job of more than one process (SLURM with several tasks, Open
  MPI's ``mpirun -n N``); ``on`` always calls ``jax.distributed.initialize()`` (its own
  detection, e.g. a Cloud TPU pod or GKE); ``off`` never joins (one process).
  """

  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  mode: str = "auto"
  heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S
  init_timeout: int = INIT_TIMEOUT_S

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))


def validate(launch: Launch) -> None:
  """Checks the flags without touching the network; raises DistributedError."""
  if launch.mode not in MODES:
    raise DistributedError("--distributed", f"must be one of {', '.join(MODES)}")
  if launch.explicit:
    if launch.mode == "off":
      raise DistributedError("--distributed", "off cannot be combined with --coordinator")
    missing = [
      flag
      for flag, v in (
        ("--coordinator", launch.coordinator),
        ("--num-processes", launch.num_processes),
        ("--process-id", launch.process_id),
      )
      if v is None
    ]
    if missing:
      raise DistributedError(
        missing[0],
        "--coordinator, --num-processes and --process-id go together "
        f"(missing {', '.join(missing)})",
      )
    host, sep, port = launch.coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise DistributedError(
        "--coordinator", f"expected HOST:PORT (process 0's address), got {launch.coordinator!r}"
      )
    if launch.num_processes < 1:
      raise DistributedError("--num-processes", f"must be >= 1, got {launch.num_processes}")
    if not 0 <= launch.process_id < launch.num_processes:
      raise DistributedError(
        "--process-id", f"must be in [0, {launch.num_processes}), got {launch.process_id}"
      )
  for flag, value in (
    ("--heartbeat-timeout", launch.heartbeat_timeout),
    ("--init-timeout", launch.init_timeout),
  ):
    if value < 1:
      raise DistributedError(flag, f"must be >= 1 second, got {value}")


def add_flags(p) -> None:
  """The flags of a multi-process job (``train``, ``eval``; an ``argparse`` parser)."""
  g = p.add_argument_group(
    "multi-process (one process per host or GPU; see the README's Multi-host section)"
  )
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address")
  g.add_argument(
    "--num-processes", type=int, default=None, metavar="N", help="processes in the job"
  )
  g.add_argument("--process-id", type=int, default=None, metavar="I", help="0 .. N-1")
  g.add_argument(
    "--distributed",
    default="auto",
    choices=MODES,
    help="auto (default): join a job when the flags above are given or SLURM / Open MPI "
    "started more than one task; on: always call jax.distributed.initialize() (its own "
    "detection, e.g. Cloud TPU); off: one process",
  )
  g.add_argument(
    "--heartbeat-timeout",
    type=int,
    default=HEARTBEAT_TIMEOUT_S,
    metavar="S",
    help="a process silent this long is declared dead and the job ends (default %(default)s)",
  )
  g.add_argument(
    "--init-timeout",
    type=int,
    default=INIT_TIMEOUT_S,
    metavar="S",
    help="how long to wait for every process to join (default %(default)s)",
  )


def launch_from_args(args) -> Launch:
  return Launch(
    coordinator=args.coordinator,
    num_processes=args.num_processes,
    process_id=args.process_id,
    mode=args.distributed,
    heartbeat_timeout=args.heartbeat_timeout,
    init_timeout=args.init_timeout,
  )


def job_size_from_env(environ=os.environ) -> int | None:
  """The number of processes a SLURM / Open MPI launcher started, if it says."""
  for name in _JOB_SIZE_ENV:
    value = environ.get(name, "").strip()
    if value.isdigit():
      return int(value)
  return None


def wants_init(launch: Launch, environ=os.environ) -> bool:
  """Whether :func:`initialize` joins a job (see :class:`Launch`)."""
  if launch.mode == "off":
    return False
  if launch.explicit or launch.mode == "on":
    return True
  # auto: a single-task allocation (salloc, sbatch -n 1) stays a plain single-process run;
  # joining it would only start a coordinator on a port other runs on the node may share.
  return (job_size_from_env(environ) or 1) > 1


def _use_gloo_on_cpu() -> None:
  """Cross-process collectives on CPU need an implementation (gloo, over TCP). Set before
  the first backend starts; GPUs and TPUs ignore it."""
  with contextlib.suppress(AttributeError, ValueError, KeyError):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(launch: Launch) -> bool:
  """Joins the job ``launch`` describes (before any JAX computation); returns whether it did.

  Blocks until every process has joined (``--init-timeout``). Raises DistributedError for
  bad flags; JAX's own errors (an unreachable coordinator, a timeout) propagate.
  """
  validate(launch)
  if not wants_init(launch):
    return False
  if jax.distributed.is_initialized():
    return True
  _use_gloo_on_cpu()
  kwargs: dict[str, Any] = {
    "initialization_timeout": launch.init_timeout,
    "heartbeat_timeout_seconds": launch.heartbeat_timeout,
  }
  if launch.explicit:
    kwargs.update(
      coordinator_address=launch.coordinator,
      num_processes=launch.num_processes,
      process_id=launch.process_id,
    )
  jax.distributed.initialize(**kwargs)
  return True


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def is_primary() -> bool:
  """Process 0: the one that writes metrics, TensorBoard, progress and log lines."""
  return jax.process_index() == 0


def joined_as_another_process() -> bool:
  """Whether this process joined a job (``jax.distributed.initialize``) as a process other
  than 0. Unlike :func:`is_primary` it starts no backend: a warning shown before the first
  computation (or in a command that needs none) must not claim the accelerators."""
  from jax._src import distributed as jax_distributed

  state = jax_distributed.global_state
  return state.client is not None and state.process_id != 0


def primary_log(log):
  """``log`` on process 0, a no-op elsewhere (one copy of each line per job)."""
  return log if is_primary() else (lambda *args, **kwargs: None)


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
  """Waits until every process reaches ``name`` (no-op with one process)."""
  if not is_multiprocess():
    return
  from jax._src import distributed as jax_distributed  # the runtime's own barrier

  client = jax_distributed.global_state.client
  if client is None:  # a multi-process backend without JAX's client (a TPU pod without init)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(f"galore_jax:{name}", timeout_in_ms=int(timeout_s * 1000))


# ---------------------------------------------------------------------------------------
# The run directory.


@contextlib.contextmanager
def locked_run_dir(out: str) -> Iterator[bool]:
  """:func:`galore_jax.rundir.locked` for a job: process 0 holds the lock for all of it.

  Every process of one job uses the same ``--out`` (a shared file system across hosts),
  so a per-process lock would refuse the job's own second process. Process 0 takes the
  lock (refusing a second *job*), then all meet at a barrier: nobody reads or writes the
  directory before the lock is held. If process 0 cannot take it, it exits with the
  error and the others end when it is gone. Yields whether this call created ``out``
  (always False off process 0: only process 0 removes what a failed start created).
  """
  from galore_jax import rundir

  if not is_multiprocess():
    with rundir.locked(out) as created:
      yield created
    return
  if is_primary():
    with rundir.locked(out) as created:
      barrier("run_dir_locked")
      yield created
  else:
    barrier("run_dir_locked")
    yield False


class NullWriter:
  """What processes other than 0 get instead of a MetricsWriter: writes nothing."""

  def __init__(self, out_dir: str):
    self.path = os.path.join(out_dir, "metrics.jsonl")

  def write(self, record: dict[str, Any]) -> None:
    del record

  def close(self) -> None:
    pass


# ---------------------------------------------------------------------------------------
# Data: each process builds only its own rows of the global batch.


@dataclasses.dataclass(frozen=True)
class RowShard:
  """Rows ``[lo, hi)`` of every micro-batch of ``micro_batch`` rows: one process's part.

  A host batch of ``grad_accum * micro_batch`` rows is ``grad_accum`` micro-batches one
  after another (the trainer reshapes it to ``(grad_accum, micro_batch, ...)`` and splits
  axis 1 over the devices), so a process's rows are the same slice of each micro-batch.
  """

  lo: int
  hi: int
  micro_batch: int

  def __post_init__(self):
    if not 0 <= self.lo < self.hi <= self.micro_batch:
      raise ValueError(f"bad row shard [{self.lo}, {self.hi}) of {self.micro_batch} rows")

  @property
  def rows(self) -> int:
    return self.hi - self.lo

  def local_rows(self, global_rows: int) -> int:
    """Rows of this shard in a host batch of ``global_rows`` (a multiple of micro_batch)."""
    return (global_rows // self.micro_batch) * self.rows

  def take(self, x: np.ndarray) -> np.ndarray:
    """This shard's rows (axis 0) of a host batch, or of its example-index list."""
    x = np.asarray(x)
    if x.shape[0] % self.micro_batch:
      raise ValueError(f"{x.shape[0]} rows are not whole micro-batches of {self.micro_batch}")
    tail = x.shape[1:]
    accum = x.shape[0] // self.micro_batch
    return x.reshape((accum, self.micro_batch) + tail)[:, self.lo : self.hi].reshape((-1,) + tail)


def process_row_range(sharding, global_shape: tuple[int, ...], axis: int = 1) -> tuple[int, int]:
  """The contiguous range of ``axis`` indices this process's devices hold under ``sharding``.

  ``jax.make_array_from_process_local_data`` takes a process's rows as one contiguous
  block; a mesh whose device order gives a process scattered rows is refused.
  """
  spans = set()
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    start, stop, _ = index[axis].indices(global_shape[axis])
    spans.add((start, stop))
  if not spans:
    raise ValueError(f"process {jax.process_index()} holds no device of the mesh")
  lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
  if sum(e - s for s, e in spans) != hi - lo:
    raise ValueError(
      f"process {jax.process_index()}'s batch rows are not contiguous ({sorted(spans)}); "
      "order the mesh's devices by process"
    )
  return lo, hi


def batch_shard(sharding, micro_batch: int, seq_len: int = 1) -> RowShard | None:
  """This process's :class:`RowShard` of a ``(grad_accum, micro_batch, seq)`` batch sharded
  by ``sharding``; None with one process (it builds whole batches)."""
  if not is_multiprocess():
    return None
  lo, hi = process_row_range(sharding, (1, micro_batch, seq_len))
  return RowShard(lo, hi, micro_batch)


def local_batches(make_batch, per_batch: int, shard: RowShard | None):
  """The data pipeline's map (example indices -> batch) for one process's rows.

  Where a batch is one row per example (windows of the packed stream, documents,
  instruction examples, unpacked TFDS records) only this process's examples are read
  and assembled; where rows depend on the whole group (TFDS packing: a group of
  records packed together), the group is assembled and the other rows dropped.
  """
  if shard is None:
    return make_batch
  from galore_jax import data

  row_wise = (
    isinstance(make_batch, data.Rows)
    and not getattr(make_batch, "pack", False)
    and per_batch == make_batch.batch_size
  )
  if row_wise:
    local = copy.copy(make_batch)
    local.batch_size = shard.local_rows(per_batch)
    return lambda idx: local(shard.take(np.asarray(idx).reshape(-1)))
  return lambda idx: {k: shard.take(v) for k, v in make_batch(idx).items()}


def global_batch(sharding, batch: dict[str, np.ndarray], grad_accum: int, micro_batch=None):
  """Host batch -> global ``(grad_accum, micro_batch, seq)`` arrays under ``sharding``.

  ``micro_batch``: the global micro-batch size when ``batch`` holds only this process's
  rows (its :class:`RowShard`); None when ``batch`` is a whole global batch, of which
  this process passes its own rows.
  """
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    v = v.reshape((grad_accum, -1) + v.shape[1:])
    rows = v.shape[1] if micro_batch is None else micro_batch
    global_shape = (grad_accum, rows) + v.shape[2:]
    if is_multiprocess():
      lo, hi = process_row_range(sharding, global_shape)
      if micro_batch is None:
        v = v[:, lo:hi]
      elif v.shape[1] != hi - lo:
        raise ValueError(f"{k}: {v.shape[1]} local rows, this process holds {hi - lo}")
    out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
  return out


# ---------------------------------------------------------------------------------------
# Agreement and failure.


def agree_int(value: int) -> int:
  """Process 0's ``value``, known to all (the value itself with one process)."""
  if not is_multiprocess():
    return value
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def agree_signal(received: int | None) -> int | None:
  """A stop signal any process received, known to all (or None).

  SIGTERM reaches the processes of a job at slightly different times; every process must
  still stop after the same step, since saving is collective. One small all-gather per
  step (multi-process only).
  """
  if not is_multiprocess():
    return received
  from jax.experimental import multihost_utils

  got = multihost_utils.process_allgather(np.int32(received or 0))
  return _agreed(received, got)


def _agreed(own: int | None, gathered) -> int | None:
  """What the processes agree on from every process's request (``gathered``, 0 for none):
  this process's own if it made one (its message names what it received), else the first
  process's that did."""
  nonzero = [int(s) for s in np.asarray(gathered).reshape(-1) if s]
  return own if own else (nonzero[0] if nonzero else None)


class LateAgreement:
  """:func:`agree_signal` one step late, so that a job of several processes can run its
  steps back to back as one process does (the trainer's overlapped loop).

  :func:`agree_signal` reads its all-gather at once: the host waits for the device's queue
  to drain, the step in flight included, after every step. Here each call starts the
  gather of this process's request (queued behind the step the loop just dispatched, ahead
  of the next) and returns what the previous call's gather came to, which is ready once
  the step before has ended. Every process calls once per step, in the same order (the
  gathers are collectives), and reads the same agreed value on the same call, so all
  still stop after the same step: the one after the step a request was made in.
  """

  def __init__(self) -> None:
    self._pending: tuple[int | None, jax.Array] | None = None

  def exchange(self, received: int | None) -> int | None:
    """Starts agreeing on ``received`` (a signal number, a negative request such as the
    trainer's time limit, or None) and returns the previous call's agreement: the
    process's own request if it made one, else the first process's that did (or None)."""
    agreed = None
    if self._pending is not None:
      own, gathered = self._pending
      agreed = _agreed(own, gathered.addressable_data(0))
    sharding = _process_sharding()
    local = np.full((1,), received or 0, np.int32)
    rows = jax.make_array_from_process_local_data(sharding, local, (jax.process_count(),))
    gathered = _replicator(sharding)(rows)  # dispatched; read by the next call
    self._pending = (received, gathered)
    return agreed


def late_agreement() -> LateAgreement | None:
  """A :class:`LateAgreement` in a job of several processes; None with one."""
  return LateAgreement() if is_multiprocess() else None


@functools.cache
def _process_sharding() -> jax.sharding.NamedSharding:
  """One row per process over all the job's devices (each row on its process's devices)."""
  by_process = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  devices = np.asarray(by_process).reshape(jax.process_count(), jax.local_device_count())
  mesh = jax.sharding.Mesh(devices, ("processes", "local"))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("processes"))


@functools.cache
def _replicator(sharding: jax.sharding.NamedSharding):
  """The all-gather of an array sharded by ``sharding``: a copy on every device."""
  return jax.jit(lambda x: x, out_shardings=sharding.update(spec=jax.sharding.PartitionSpec()))


def mesh_problem(mesh_devices: int) -> str | None:
  """Why a ``--mesh`` of ``mesh_devices`` cannot run on this job (None: it can)."""
  if not is_multiprocess() or mesh_devices == jax.device_count():
    return None
  return (
    f"a job of {jax.process_count()} processes needs a mesh over all its "
    f"{jax.device_count()} devices ({jax.local_device_count()} per process), got "
    f"{mesh_devices}; e.g. --mesh data={jax.process_count()},fsdp={jax.local_device_count()}"
  )


# Words of the runtime errors a collective raises when another process of the job is gone:
# gloo on CPU ("Connection closed by peer"), NCCL on GPUs, the coordination service.
_LOST_PROCESS_WORDS = (
  "closed by peer",
  "connection reset",
  "gloo",
  "nccl",
  "heartbeat",
  "coordination service",
  "remote process",
)


def lost_process(error: BaseException) -> bool:
  """Whether ``error`` is a collective of a multi-process job failing because another
  process ended (killed, crashed, its node lost) while this one waited for it."""
  if not (jax.distributed.is_initialized() and jax.process_count() > 1):
    return False
  if not isinstance(error, jax.errors.JaxRuntimeError):
    return False
  text = str(error).lower()
  return any(word in text for word in _LOST_PROCESS_WORDS)


def end_job_on_failure(code: int, *, traceback: bool = False) -> None:
  """In a multi-process job, a failed process (``code`` != 0) ends at once
  (:func:`exit_now`), printing the current exception's traceback first if asked;
  otherwise returns."""
  if not code or not jax.distributed.is_initialized() or jax.process_count() < 2:
    return
  if traceback:
    import traceback as tb

    tb.print_exc()
  exit_now(code)


def exit_now(code: int) -> None:
  """Ends a process of a multi-process job at once with ``code``.

  A graceful exit waits at JAX's shutdown barrier for the other processes, which may be
  blocked in a collective this process will never join: they would wait for the shutdown
  timeout (minutes). Exiting without it closes this process's connections, and the
  coordination service ends the others within seconds.
  """
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  os._exit(code)
