"""Multi-process training with real processes: two ``galore-jax train`` processes on
127.0.0.1 (2 CPU devices each, gloo collectives), checked against one process with 4.

The runs are shared between the tests (module fixtures): a single-process reference of
10 steps; a two-process run stopped after 5 steps, then resumed with two processes and
stopped past step 10 by a SIGTERM to one of them; a two-process resume of the single-process
run's step-5 checkpoint whose second process is killed past step 10. Every start of a
two-process job costs about 10 s of CPU on a 2-core machine, so each start checks as much
as it can.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from small_run import write_tiny_hf_model

import galore_jax
from galore_jax import checkpoint, cli, data, distributed, metrics, train

ROOT = Path(galore_jax.__file__).resolve().parents[1]
# GaLore over a data=2, fsdp=2 mesh (4 devices in one process, or 2 x 2) on a LLaMA smaller
# than llama_tiny (small_run.TINY_HF, given as --init-from): compiling the step is most of
# each process's time.
# Every run stops early (--stop-after, or a kill); the later runs load the first ones'
# compilations from the session's cache.
RUN = dict(
  optimizer="galore_adamw",
  steps=1000,
  warmup=1,
  lr=0.002,
  batch_size=4,
  seq_len=32,
  rank=16,
  update_proj_gap=4,  # refreshes at steps 0, 4 and 8: one before and one after the resume
  eval_every=5,
  eval_batches=1,
  save_every=5,
  mesh="data=2,fsdp=2",
)
WAIT_S = 420  # one two-process run, compiling, on a loaded 2-core machine
KILL_BOUND_S = 60  # a survivor must be gone this long after its peer was killed


def _flags(**kw) -> list[str]:
  out = []
  for k, v in {**RUN, **kw}.items():
    out += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
  return out + ["--no-progress"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _other_xla_flags() -> str:
  """The session's XLA_FLAGS (conftest: -O0) without its device count."""
  return re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)  # the session's compile cache and XLA flags (conftest) are shared
  env.update(
    XLA_FLAGS=f"{_other_xla_flags()} --xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    PYTHONUNBUFFERED="1",
  )
  return env


class Job:
  """``n`` processes of one ``galore-jax`` job (``train`` unless ``command`` says); killed on
  exit if still running."""

  def __init__(
    self,
    tmp: Path,
    name: str,
    args: list[str],
    n: int = 2,
    command: str = "train",
    cwds: list[Path] | None = None,
    extra: list[list[str]] | None = None,
  ):
    port = _free_port()
    self.logs = [tmp / f"{name}.{i}.log" for i in range(n)]
    self.procs = []
    for i in range(n):
      cmd = [sys.executable, "-m", "galore_jax.cli", command, *args]
      cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n)]
      cmd += ["--process-id", str(i), "--init-timeout", "120", *(extra[i] if extra else [])]
      with open(self.logs[i], "w") as log:
        self.procs.append(
          subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(2),
            cwd=cwds[i] if cwds else tmp,
            text=True,
          )
        )

  def output(self, i: int) -> str:
    return self.logs[i].read_text()

  def wait(self, timeout: float = WAIT_S) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
      for p in self.procs:
        p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
      self.kill()
    return [p.returncode for p in self.procs]

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)


def _losses(out: Path, key: str = "loss") -> dict[int, float]:
  return {r["step"]: r[key] for r in metrics.read_metrics(str(out)) if key in r}


def _restore_numpy(step_dir: Path, item: str):
  """A checkpoint item as numpy arrays, whatever devices or processes saved it."""
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(step_dir / item)
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(step_dir / item, args=ocp.args.PyTreeRestore(restore_args=args))


def _assert_same_state(a: Path, b: Path, step: int) -> None:
  # Gloo's cross-process sums round differently from XLA's in-process ones: parameters agree
  # to ~5e-6 after 10 steps; GaLore's projectors (singular vectors) move ~10x more, and the
  # two-process jobs' two programs round differently from the reference's one program (on
  # jax 0.12, entries of a projector's last vector, the least determined, differed by 1.3e-4).
  for item, tol in (("params", 1e-5), ("opt_state", 3e-4)):
    ta = _restore_numpy(a / "checkpoints" / str(step), item)
    tb = _restore_numpy(b / "checkpoints" / str(step), item)
    assert jax.tree.structure(ta) == jax.tree.structure(tb)
    for (path, x), y in zip(
      jax.tree_util.tree_leaves_with_path(ta), jax.tree.leaves(tb), strict=True
    ):
      np.testing.assert_allclose(
        np.asarray(y, np.float64),
        np.asarray(x, np.float64),
        rtol=tol,
        atol=tol,
        err_msg=f"{item}{jax.tree_util.keystr(path)} at step {step}",
      )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
  return write_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "model")


@dataclasses.dataclass
class Runs:
  reference: Path  # single process, 10 steps
  out: Path  # two processes: steps 1..5 (first), then 6.. until the SIGTERM (second)
  first: Job
  second: Job
  after_five: dict[int, float]  # the losses `out` held after the first job
  second_codes: list[int]


def _wait_for_step(job: Job, out: Path, above: int) -> int:
  """Waits until process 0 has recorded a step after ``above`` (both still running)."""
  deadline = time.monotonic() + WAIT_S
  while time.monotonic() < deadline and all(p.poll() is None for p in job.procs):
    done = _losses(out) if (out / "metrics.jsonl").exists() else {}
    if done and max(done) > above:
      return max(done)
    time.sleep(0.2)
  raise AssertionError(f"no step after {above}:\n" + job.output(0) + job.output(1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> Runs:
  """The single-process reference (4 of this session's CPU devices, in this process) and
  the two-process runs: 5 steps (``--stop-after 5``), then ``--resume``, which runs on
  (``--steps 1000``) until process 1 alone gets SIGTERM once step 10 is recorded: the
  comparisons use steps 1..10, the signal tests what follows. The first two-process job
  runs while the reference trains here (one compilation each, in parallel).
  """
  tmp = tmp_path_factory.mktemp("mh")
  single, out = tmp / "single", tmp / "two"
  # Both jobs run one command, --resume auto (a requeued job's): it starts, then continues.
  # The first start finds what a start killed before its first save left (process 0 deletes
  # it, the others wait; test_only_process_zero_writes_outputs_and_reports counts records).
  (out / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
  (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 99.0}) + "\n")
  # The two-process jobs compile the step as two programs, GPUs' default (the trainer reads
  # the replicated count from its local copy), the reference as one: the same trajectory.
  auto = dict(init_from=tiny_model, resume="auto", refresh_programs="two")
  first = Job(tmp, "first", ["--out", str(out), *_flags(stop_after=5, **auto)])
  try:
    cfg = train.TrainConfig(
      out=str(single), progress=False, init_from=tiny_model, stop_after=10, **RUN
    )
    train.train(cfg, log=lambda *_: None)
  finally:
    codes = first.wait()
  assert codes == [0, 0], first.output(0) + first.output(1)
  after_five = _losses(out)
  second = Job(tmp, "resume", ["--out", str(out), *_flags(**auto)])
  try:
    # A preemption notice that reaches one host first. Step 10 and its checkpoint are
    # complete when it is recorded; the signal lands at a later step or a save.
    _wait_for_step(second, out, 9)
    second.procs[1].send_signal(signal.SIGTERM)
  finally:
    codes = second.wait()
  return Runs(single, out, first, second, after_five, codes)


def test_two_processes_match_one_process_and_resume_exactly(runs):
  reference, out = runs.reference, runs.out
  want = _losses(reference)
  assert sorted(want) == list(range(1, 11))
  # Steps 1..5 by the first job, 6..10 (and on) by the resumed one; the same trajectory as
  # the single-process run (the same global batches, the same state).
  assert sorted(runs.after_five) == [1, 2, 3, 4, 5]
  got = _losses(out)
  assert sorted(got)[:10] == list(range(1, 11))
  np.testing.assert_allclose([got[s] for s in range(1, 11)], [want[s] for s in range(1, 11)], 1e-5)
  # Evaluation (each process passes its rows of the validation batch) at steps 5 and 10.
  got_eval, want_eval = _losses(out, "eval_loss"), _losses(reference, "eval_loss")
  assert sorted(want_eval) == [5, 10] and sorted(s for s in got_eval if s <= 10) == [5, 10]
  np.testing.assert_allclose([got_eval[5], got_eval[10]], [want_eval[5], want_eval[10]], 1e-5)
  _assert_same_state(reference, out, 5)  # what the resume started from
  _assert_same_state(reference, out, 10)
  assert "--resume auto: no checkpoint in " in runs.first.output(0)
  assert "resumed from" in runs.second.output(0)
  # Two programs: the first job began with the refresh one (count 0); the resume (count 5)
  # with the other, compiling the refresh one at count 8.
  assert "compiling the program for steps without a refresh" in runs.first.output(0)
  assert "compiling the program for steps with a projector refresh" in runs.second.output(0)


def test_only_process_zero_writes_outputs_and_reports(runs):
  out = runs.out
  # One record per step (process 1 wrote none; the killed start's stray record went), one
  # TensorBoard event file per start.
  steps = [r["step"] for r in metrics.read_metrics(str(out)) if "loss" in r]
  assert steps == list(range(1, checkpoint.latest_step(str(out)) + 1))
  assert not (out / "checkpoints" / "5.orbax-checkpoint-tmp-1").exists()
  assert len(list((out / "tb").glob("events.*"))) == 2
  for job in (runs.first, runs.second):
    assert "M params" in job.output(0) and "M params" not in job.output(1)
  # The end-of-run summary: the first job ends normally (the second by the signal).
  assert "trained steps" in runs.first.output(0)
  assert "trained steps" not in runs.first.output(1)
  # Both processes wrote their shards of each checkpoint (orbax's multi-process save).
  names = {p.name for p in (out / "checkpoints" / "10" / "params").iterdir()}
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= names, names


def test_sigterm_to_one_process_stops_all(runs):
  # SIGTERM to process 1 alone: both processes stop after the same step, save it together
  # and exit 143.
  out, job = runs.out, runs.second
  assert runs.second_codes == [143, 143], job.output(0) + job.output(1)
  step = checkpoint.latest_step(str(out))
  assert step is not None and step >= 10
  assert f"interrupted by SIGTERM at step {step}" in job.output(0)
  assert f"interrupted by SIGTERM at step {step}" in job.output(1)
  assert sorted(_losses(out)) == list(range(1, step + 1))


def test_a_time_limit_one_process_reaches_stops_all_after_the_same_step(tmp_path, tiny_model, runs):
  # A batch job's wall-clock limit (--time-limit): process 1 alone is given one here (the
  # processes of a real job start at slightly different times), and both stop after the
  # same step, save it together and exit 0. (`runs`: the step is compiled in the cache.)
  out = tmp_path / "timed"
  job = Job(
    tmp_path,
    "timed",
    ["--out", str(out), *_flags(init_from=tiny_model)],
    extra=[[], ["--time-limit", "1s"]],
  )
  codes = job.wait()
  assert codes == [0, 0], job.output(0) + job.output(1)
  step = checkpoint.latest_step(str(out))
  assert step is not None and step < RUN["steps"]
  assert f"stopped at the time limit (--time-limit) after step {step} of " in job.output(0)
  assert sorted(_losses(out)) == list(range(1, step + 1))


def _copy_up_to(run: Path, dst: Path, step: int) -> Path:
  """A copy of ``run`` whose newest checkpoint is ``step`` (as if it had stopped there)."""
  shutil.copytree(run, dst)
  for d in (dst / "checkpoints").iterdir():
    if d.name.isdigit() and int(d.name) > step:
      shutil.rmtree(d)
  assert checkpoint.latest_step(str(dst)) == step
  return dst


def _assert_continues(run: Path, reference: Path) -> None:
  got, want = _losses(run), _losses(reference)
  assert sorted(got)[:10] == list(range(1, 11))  # the old records after step 5 were dropped
  np.testing.assert_allclose([got[s] for s in range(6, 11)], [want[s] for s in range(6, 11)], 1e-5)
  _assert_same_state(reference, run, 10)


def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path, tiny_model, runs):
  # Fewer machines after losing one: the two-process job's step-5 checkpoint, resumed by one
  # process on the same mesh (its 4 devices local), continues the uninterrupted run.
  out = _copy_up_to(runs.out, tmp_path / "one", 5)
  cfg = train.TrainConfig(
    out=str(out), progress=False, init_from=tiny_model, stop_after=5, resume=True, **RUN
  )
  train.train(cfg, log=lambda *_: None)
  _assert_continues(out, runs.reference)


@dataclasses.dataclass
class Grown:
  out: Path  # the single-process run's step-5 checkpoint, resumed by two processes
  job: Job
  code: int | None  # process 0's exit code, None if it outlived KILL_BOUND_S
  waited_s: float  # from the kill to process 0's exit


@pytest.fixture(scope="module")
def grown(tmp_path_factory, tiny_model, runs) -> Grown:
  """The single-process run's step-5 checkpoint resumed by a two-process job (one more job
  start serves both tests below): once step 10 is recorded (its checkpoint complete),
  process 1 is killed, a lost node. Process 0 must then end by itself: it notices when
  process 1's heartbeats stop, which a short --heartbeat-timeout keeps short."""
  tmp = tmp_path_factory.mktemp("grow")
  out = _copy_up_to(runs.reference, tmp / "two", 5)
  args = ["--out", str(out), *_flags(init_from=tiny_model, resume=True)]
  job = Job(tmp, "grow", [*args, "--heartbeat-timeout", "8"])
  try:
    _wait_for_step(job, out, 10)
    job.procs[1].send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    try:
      code = job.procs[0].wait(timeout=KILL_BOUND_S)
    except subprocess.TimeoutExpired:
      code = None
    return Grown(out, job, code, time.monotonic() - t_kill)
  finally:
    job.kill()


def test_a_one_process_checkpoint_resumes_in_two_processes(grown, runs):
  # And the other way: the single-process run's step-5 checkpoint, resumed by a two-process
  # job, which restores each process's shards of it.
  out = grown.out
  assert f"resumed from {out / 'checkpoints'}/5" in grown.job.output(0)
  _assert_continues(out, runs.reference)


def test_a_killed_process_ends_the_job(grown):
  # Process 0 ends non-zero within a bounded time instead of waiting forever in its next
  # collective.
  assert grown.code is not None, (
    f"process 0 still running {KILL_BOUND_S} s after process 1 was killed"
  )
  assert grown.code != 0 and grown.waited_s < KILL_BOUND_S, grown.job.output(0)
  # A collective that lost its peer: one line that says so and where to resume from, not
  # a traceback. (Waiting at one of orbax's barriers instead, the process is ended by
  # JAX's coordination service when the heartbeats stop, with JAX's own message.)
  text, out = grown.job.output(0), grown.out
  if "Terminating process because the JAX distributed service" not in text:
    assert "galore-jax: error: lost another process of the job (" in text, text
    assert f"newest checkpoint is {out / 'checkpoints'}/" in text and "--resume" in text
    assert "Traceback" not in text, text


def test_eval_joins_a_job_and_reports_once(tmp_path, runs):
  # `galore-jax eval` of the two-process run, by a two-process job on its mesh: each
  # process restores its shards and passes its rows of the validation batch; process 0
  # prints the loss the run's own evaluation recorded at step 10. "The latest checkpoint" is
  # the one process 0 sees: process 1 sees a newer one (a run still saving, looked at a
  # moment later; here other weights, step 5's, named 20), which must not be mixed in.
  run = _copy_up_to(runs.out, tmp_path / "run", 10)
  ahead = tmp_path / "ahead"  # process 1 runs here: `run` is its relative --checkpoint
  ahead.mkdir()
  shutil.copytree(run, ahead / "run")
  shutil.copytree(runs.reference / "checkpoints" / "5", ahead / "run" / "checkpoints" / "20")
  args = ["--checkpoint", "run", "--mesh", RUN["mesh"], "--json"]
  job = Job(tmp_path, "eval", args, command="eval", cwds=[tmp_path, ahead])
  assert job.wait() == [0, 0], job.output(0) + job.output(1)
  result = json.loads(job.output(0).strip().splitlines()[-1])
  assert result["step"] == 10 and result["batches"] == RUN["eval_batches"]
  assert result["eval_loss"] == pytest.approx(_losses(runs.out, "eval_loss")[10], rel=1e-5)
  assert "eval_loss" not in job.output(1)


def test_resume_hint_reads_finished_checkpoints_from_the_directory(tmp_path):
  # What a survivor prints after losing a peer: read without orbax (whose lookup would wait
  # for the lost process at a barrier); an unfinished save's directory does not count.
  from galore_jax import cli

  assert cli._resume_hint(str(tmp_path)).startswith("no checkpoint was saved in ")
  for name in ("3", "10", "12.orbax-checkpoint-tmp-1700000000"):
    (tmp_path / "checkpoints" / name).mkdir(parents=True)
  hint = cli._resume_hint(str(tmp_path))
  assert hint == (
    f"the newest checkpoint is {tmp_path / 'checkpoints'}/10; start every process with --resume"
  )


# ---------------------------------------------------------------------------------------
# Per-process data, in this process: the shards of real batches.


@pytest.mark.parametrize(
  "packing,records", [(True, False), (False, False), (True, True)], ids=["packed", "one", "sft"]
)
def test_process_shards_are_disjoint_and_make_the_global_batch(
  packing, records, tmp_path, monkeypatch
):
  micro, accum = 4, 2  # two micro-batches per step, as with --grad-accum 2
  source = "builtin"
  if records:  # instruction examples packed into rows, with their segment ids
    monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
    source = str(tmp_path / "qa.jsonl")
    Path(source).write_text(
      "".join(
        json.dumps({"prompt": f"what is {i} and {i % 7} ?", "completion": f" {i + i % 7}"}) + "\n"
        for i in range(300)
      )
    )
  config = data.DataConfig(
    source=source, seq_len=32, batch_size=micro * accum, packing=packing, seed=3
  )
  full = data.make_dataset(config)
  shards = [distributed.RowShard(0, 1, micro), distributed.RowShard(1, 4, micro)]
  parts = [data.make_dataset(config, shard=s) for s in shards]
  for step in (0, 1, full.steps_per_epoch):  # the last one: the second epoch's first
    want = full.batch(step)
    got = [p.batch(step) for p in parts]
    assert ("segments" in want) == records
    for k, v in want.items():
      assert [g[k].shape[0] for g in got] == [accum * 1, accum * 3]
      # Micro-batch by micro-batch, process 0's rows then process 1's: the global batch.
      joined = np.concatenate([g[k].reshape(accum, -1, *v.shape[1:]) for g in got], axis=1).reshape(
        v.shape
      )
      np.testing.assert_array_equal(joined, v, err_msg=f"{k} at step {step}")
    rows = [{r.tobytes() for r in g["inputs"]} for g in got]
    assert not rows[0] & rows[1]


def test_row_shard_of_a_group_built_batch_is_cut_after_assembly():
  # Batches whose rows depend on the whole group (TFDS packing) are built whole, then cut.
  calls = []

  def make(idx):
    calls.append(np.asarray(idx).copy())
    return {"inputs": np.arange(12).reshape(6, 2) + 100 * int(np.sum(idx))}

  shard = distributed.RowShard(1, 2, 3)
  got = distributed.local_batches(make, 5, shard)(np.arange(5))
  np.testing.assert_array_equal(got["inputs"], make(np.arange(5))["inputs"][[1, 4]])
  assert len(calls[0]) == 5  # the whole group was read


def test_row_shard_rejects_bad_ranges():
  for lo, hi in ((2, 2), (-1, 1), (0, 5)):
    with pytest.raises(ValueError):
      distributed.RowShard(lo, hi, 4)


# ---------------------------------------------------------------------------------------
# Flags and the decision to join a job (no network).


@pytest.mark.parametrize(
  "args, flag",
  [
    (["--coordinator", "127.0.0.1:1234"], "--num-processes"),
    (["--num-processes", "2", "--process-id", "0"], "--coordinator"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "--coordinator"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id"),
    (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"], "--num-processes"),
    (
      ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "0", "--distributed", "off"],
      "--distributed",
    ),
    (["--heartbeat-timeout", "0"], "--heartbeat-timeout"),
  ],
)
def test_bad_multiprocess_flags_are_one_line_exit_2(tmp_path, capsys, args, flag):
  assert cli.main(["train", "--out", str(tmp_path / "r"), *args]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"galore-jax: error: {flag}:") and len(err.splitlines()) == 1, err
  assert not (tmp_path / "r").exists()
  assert not jax.distributed.is_initialized()


def test_auto_joins_only_a_job_of_several_processes():
  auto = distributed.Launch()
  assert not distributed.wants_init(auto, {})
  assert not distributed.wants_init(auto, {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"})
  assert distributed.wants_init(auto, {"SLURM_NTASKS": "4"})
  assert distributed.wants_init(auto, {"OMPI_COMM_WORLD_SIZE": "2"})
  assert not distributed.wants_init(distributed.Launch(mode="off"), {"SLURM_NTASKS": "4"})
  assert distributed.wants_init(distributed.Launch(mode="on"), {})
  explicit = distributed.Launch(coordinator="h:1", num_processes=1, process_id=0)
  assert distributed.wants_init(explicit, {})


def test_single_process_helpers_are_the_identity():
  assert distributed.is_primary() and not distributed.is_multiprocess()
  assert distributed.agree_signal(None) is None
  assert distributed.agree_signal(signal.SIGTERM) == signal.SIGTERM
  assert distributed.mesh_problem(1) is None
  mesh = train.make_mesh(train.TrainConfig(mesh="data=2,fsdp=2"))
  assert distributed.batch_shard(train.batch_sharding(mesh), 4) is None
  assert distributed.process_row_range(train.batch_sharding(mesh), (1, 8, 3)) == (0, 8)
