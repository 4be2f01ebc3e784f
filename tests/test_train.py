"""The training loop (galore_jax.trainer, galore_jax.train): resume exactness, sharding,
accumulation, faults, progress lines, the learning rate the step takes, the two refresh
programs."""

import dataclasses
import functools
import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from small_run import SMALL, quiet, small_config, write_tiny_hf_model

from galore_jax import (
  checkpoint,
  cli,
  config,
  data,
  distributed,
  metrics,
  sft,
  steps,
  train,
  trainer,
)
from galore_jax import model as model_lib

_SESSION_START = time.perf_counter()


# Runs of SMALL that train on the same lr schedule (--steps 6; --stop-after ends them
# earlier) share one compiled train step through the session's compile cache, and the
# single-device trajectory below is computed once for every test that compares with it.
@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """6 steps of SMALL on one device, uninterrupted (the summary of ``train.train``)."""
  return train.train(small_config(tmp_path_factory.mktemp("straight"), "run", steps=6), log=quiet)


def test_resume_continues_exactly(tmp_path, straight_run):
  # Through --resume auto, a requeued job's one command: its first start finds the outputs
  # of a start killed before its first checkpoint (replaced), its second a checkpoint.
  straight = straight_run
  killed = tmp_path / "split"
  (killed / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)  # killed saving
  (killed / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 99.0}) + "\n")
  logged = []
  first = train.train(
    small_config(tmp_path, "split", steps=6, stop_after=3, resume="auto"), log=logged.append
  )
  assert first["step"] == 3 and first["start_step"] == 0
  assert any(str(line).startswith("--resume auto: no checkpoint in ") for line in logged)
  assert straight["step_compilations"] == 1  # no recompilation after the first step
  assert checkpoint.latest_step(str(tmp_path / "split")) == 3
  second = train.train(small_config(tmp_path, "split", steps=6, resume="auto"), log=quiet)
  assert second["start_step"] == 3 and second["step"] == 6
  np.testing.assert_allclose(first["losses"] + second["losses"], straight["losses"], rtol=1e-6)
  # One metrics file holds both halves.
  steps = [r["step"] for r in metrics.read_metrics(str(tmp_path / "split")) if "loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6]


def _out_of_memory_at(monkeypatch, call: int, *, consumed: bool = False) -> None:
  """The train step's ``call``-th call fails as XLA's allocator does on a full GPU; with
  ``consumed``, after deleting its (donated) inputs, as a step that failed may have."""
  real = trainer.cached_train_step

  def patched(run, hooks, log):
    step_fn, calls = real(run, hooks, log), []

    def step(params, opt_state, batch, lr):
      calls.append(1)
      if len(calls) == call:
        if consumed:
          for x in jax.tree.leaves((params, opt_state)):
            x.delete()
        raise jax.errors.JaxRuntimeError(
          "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.00GiB.\nmore lines"
        )
      return step_fn(params, opt_state, batch, lr)

    return step

  monkeypatch.setattr(trainer, "cached_train_step", patched)


def test_out_of_memory_saves_the_last_step_and_is_one_line(
  tmp_path, straight_run, monkeypatch, capsys
):
  # A GPU that fills up mid-run (another process, fragmentation) ended the run with XLA's
  # traceback, losing the steps since the last checkpoint. The state of the last whole
  # step is still on the device: it is saved, and the resume continues exactly.
  _out_of_memory_at(monkeypatch, 4)
  with pytest.raises(trainer.OutOfMemory) as e:
    train.train(small_config(tmp_path, "oom", steps=6), log=quiet)
  assert str(e.value).startswith(
    "the device ran out of memory in step 4 (RESOURCE_EXHAUSTED: Out of memory while trying "
    f"to allocate 12.00GiB.); step 3 is saved in {tmp_path / 'oom' / 'checkpoints'}/3. "
    "--remat full (which a resume may add) lowers the peak"
  ), e.value
  monkeypatch.undo()
  resumed = train.train(small_config(tmp_path, "oom", steps=6, resume=True), log=quiet)
  assert resumed["start_step"] == 3
  np.testing.assert_allclose(resumed["losses"], straight_run["losses"][3:], rtol=1e-6)

  # A failed step that consumed its inputs: nothing to save; the newest checkpoint is named.
  _out_of_memory_at(monkeypatch, 3, consumed=True)
  with pytest.raises(trainer.OutOfMemory, match=r"in step 3 .*; the newest checkpoint is .*/2\."):
    train.train(small_config(tmp_path, "gone", steps=6, save_every=2), log=quiet)
  assert checkpoint.latest_step(str(tmp_path / "gone")) == 2

  # A run whose callbacks may replace the state before each step keeps none to save.
  identity = trainer.Hooks(before_step=[lambda step, p, o, writer: (p, o)])
  monkeypatch.undo()
  _out_of_memory_at(monkeypatch, 3)
  with pytest.raises(trainer.OutOfMemory, match=r"in step 3 .*; no checkpoint was saved in "):
    train.train(small_config(tmp_path, "hooked", steps=6), log=quiet, hooks=identity)

  # ... and one whose save fails too (a full disk): both said, the newest checkpoint once.
  def no_room(mngr, step, *_):
    raise checkpoint.CheckpointWriteError(f"checkpoint {step} could not be written (full)")

  monkeypatch.undo()
  monkeypatch.setattr(checkpoint, "save", no_room)
  _out_of_memory_at(monkeypatch, 2)
  with pytest.raises(trainer.OutOfMemory) as e:
    train.train(small_config(tmp_path, "full", steps=6), log=quiet)
  said = str(e.value)
  assert "; step 1 could not be saved: checkpoint 1 could not be written (full); no " in said
  assert said.count("no checkpoint was saved in") == 1, said

  # From the CLI, in the first step: one line, exit 1, with what to shrink.
  monkeypatch.undo()
  _out_of_memory_at(monkeypatch, 1)
  small = f"--model {SMALL['model']} --batch-size 8 --seq-len 32 --rank 16 --update-proj-gap 2"
  small += " --eval-every 1000"
  code = cli.main(["train", "--out", str(tmp_path / "first"), "--steps", "6", *small.split()])
  err = capsys.readouterr().err.strip()
  assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert err.startswith(
    "galore-jax: error: the device ran out of memory in step 1 (RESOURCE_EXHAUSTED: Out of "
    "memory while trying to allocate 12.00GiB.); no checkpoint was saved in "
  ), err
  assert "`galore-jax plan` with the same flags predicts the peak" in err

  # eval, sample and export: one line too.
  monkeypatch.undo()

  def full(*_, **__):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 3 GiB")

  monkeypatch.setattr(trainer, "init_state", full)  # placing the weights, before step 1
  code = cli.main(["train", "--out", str(tmp_path / "init"), "--steps", "6", *small.split()])
  err = capsys.readouterr().err.strip()
  assert code == 1 and err == (
    "galore-jax: error: the device ran out of memory (RESOURCE_EXHAUSTED: Out of memory "
    "allocating 3 GiB); `galore-jax plan` with the same flags predicts the peak and what "
    "would shrink it"
  )
  monkeypatch.setattr(trainer, "evaluate", full)
  code = cli.main(["eval", "--checkpoint", str(tmp_path / "oom")])
  err = capsys.readouterr().err.strip()
  assert code == 1 and err == (
    "galore-jax: error: the device ran out of memory (RESOURCE_EXHAUSTED: Out of memory "
    "allocating 3 GiB); a smaller --batch-size, or --mesh fsdp=N over several devices, lowers "
    "the peak"
  )


def test_an_out_of_memory_message_gives_the_gpu_pool_and_how_to_grow_it(monkeypatch):
  from galore_jax import errors

  class Gpu:
    platform = "gpu"

    def memory_stats(self):
      return {"bytes_limit": 18_000_000_000, "bytes_in_use": 5}

    def __str__(self):
      return "cuda:0"

  for name in metrics.MEMORY_FRACTION_VARS:
    monkeypatch.delenv(name, raising=False)
  assert metrics.memory_pool([Gpu()]) == (
    "JAX's memory pool on cuda:0 holds 18.00 GB (by default 75% of the GPU; "
    "XLA_PYTHON_CLIENT_MEM_FRACTION=.95 gives it 95%, with nothing else on the GPU)"
  )
  monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", ".9")  # the user's own choice: not advised
  assert metrics.memory_pool([Gpu()]) == "JAX's memory pool on cuda:0 holds 18.00 GB"
  assert metrics.memory_pool(jax.devices("cpu")) == ""  # no pool to speak of
  assert errors.is_out_of_memory(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: x"))
  assert not errors.is_out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: RESOURCE_EXHAUSTED"))


def test_a_run_warns_at_its_start_when_its_checkpoints_will_not_fit(tmp_path, monkeypatch):
  # A save that does not fit fails with a warning and training goes on; a run left alone
  # would save nothing for hours. Its start now compares the free space with the
  # checkpoints it will write (about the state's bytes each, --keep-checkpoints at once,
  # plus the one being written).
  free = {"bytes": 10**12}
  monkeypatch.setattr(
    trainer.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=free["bytes"])
  )
  note = lambda **kw: trainer.checkpoint_room_note(str(tmp_path / "run" / "checkpoints"), **kw)
  assert note(state_bytes=10**9, keep=3, existing=0, saves=100) is None
  free["bytes"] = 3 * 10**9  # 4 at once: 3 kept, one being written
  assert note(state_bytes=10**9, keep=3, existing=0, saves=100) == (
    f"galore-jax: warning: {tmp_path} has 3.00 GB free; this run's checkpoints take about "
    "1.00 GB each, 4 at once (4.00 GB: --keep-checkpoints 3, and one more while the next is "
    "written): make room or lower --keep-checkpoints, or the later saves fail"
  )
  assert note(state_bytes=10**9, keep=3, existing=0, saves=3) is None  # a short run: 3
  assert note(state_bytes=10**9, keep=3, existing=3, saves=9) is None  # resumed: 1 more
  assert note(state_bytes=10**9, keep=3, existing=0, saves=0) is None
  free["bytes"] = 5 * 10**8
  assert note(state_bytes=10**9, keep=3, existing=3, saves=1).startswith(
    f"galore-jax: warning: {tmp_path} has 0.50 GB free, less than one checkpoint of this run "
    "(about 1.00 GB): saves fail until there is room"
  )
  free["bytes"] = 10**5  # less than the SMALL run's state (3.5 MB)
  logged = []
  train.train(small_config(tmp_path, "full", steps=6, stop_after=1), log=logged.append)
  assert [str(x) for x in logged if "less than one checkpoint" in str(x)]


def test_a_run_whose_saves_take_much_of_its_time_says_so_once(tmp_path, monkeypatch):
  # Saves are synchronous: a 7B checkpoint (some 19 GB) every 100 steps of 0.4 s would
  # take most of the run. The first save that costs over 10% names a --save-every for 5%.
  real = checkpoint.save

  def slow(*args, **kwargs):
    time.sleep(0.5)
    return real(*args, **kwargs)

  monkeypatch.setattr(checkpoint, "save", slow)
  logged = []
  train.train(small_config(tmp_path, "slow", steps=6, save_every=2), log=logged.append)
  notes = [str(x) for x in logged if "to write" in str(x)]
  assert len(notes) == 1, logged  # once: not at step 6 again
  assert re.fullmatch(
    r"galore-jax: note: checkpoint 4 took \d+\.\d s to write, \d+% of the run's time at "
    r"--save-every 2 \(\S+ s/step\); --save-every [125]0* would make it 5%",
    notes[0],
  ), notes[0]
  saves = [r for r in metrics.read_metrics(str(tmp_path / "slow")) if "save_s" in r]
  assert [r["step"] for r in saves] == [2, 4, 6] and all(r["save_s"] >= 0.5 for r in saves)
  assert [trainer._round_up(x) for x in (0.3, 1, 1.5, 3, 7, 11, 4900)] == [1, 1, 2, 5, 10, 20, 5000]


def test_a_time_limit_stops_with_a_checkpoint_and_the_resume_continues_exactly(
  tmp_path, straight_run
):
  # A batch job's wall-clock limit: the run stops with a checkpoint while another step and
  # its save still fit (here, at once: the first step's compile alone takes longer).
  logged = []
  first = train.train(small_config(tmp_path, "timed", steps=6, time_limit="1s"), log=logged.append)
  assert first["step"] == 1 and checkpoint.latest_step(str(tmp_path / "timed")) == 1
  assert (
    "stopped at the time limit (--time-limit) after step 1 of 6; checkpoint saved in "
    f"{tmp_path / 'timed' / 'checkpoints'}/1; continue with --resume"
  ) in logged
  rest = train.train(small_config(tmp_path, "timed", steps=6, resume=True), log=quiet)
  np.testing.assert_allclose(first["losses"] + rest["losses"], straight_run["losses"], rtol=1e-6)

  # The limit counts from `started`: the CLI passes its process's start, so the imports and
  # the wait for a job's other processes count (they happen before train is called).
  ago = time.perf_counter() - 3599.5
  late = trainer.train(
    small_config(tmp_path, "late", steps=6, time_limit="1h"), log=quiet, started=ago
  )
  assert late["step"] == 1 and checkpoint.latest_step(str(tmp_path / "late")) == 1
  age = time.perf_counter() - trainer.process_start()
  assert 0.1 < age < time.perf_counter() - _SESSION_START + 300, age  # this process's age


def test_train_runs_in_a_thread_other_than_the_main_one(tmp_path, straight_run):
  # A library caller's worker thread (a web app, an orchestrator): Python allows signal
  # handlers only in the main thread, and train() installing them raised ValueError there
  # before anything ran.
  import threading

  assert threading.current_thread() is threading.main_thread()
  before = signal.getsignal(signal.SIGINT)
  done = {}

  def work():
    try:
      done["summary"] = train.train(small_config(tmp_path, "thread", steps=6), log=quiet)
    except BaseException as e:  # reported below, with the test's own assertion
      done["error"] = e

  worker = threading.Thread(target=work)
  worker.start()
  worker.join(timeout=300)
  assert "error" not in done, done.get("error")
  np.testing.assert_allclose(done["summary"]["losses"], straight_run["losses"], rtol=1e-6)
  assert signal.getsignal(signal.SIGINT) is before  # the main thread's handler untouched


def test_a_resume_notes_that_the_data_files_changed(tmp_path):
  # The same --data whose files changed (one edited here) gives other batches from the
  # resumed step on: check_compatible cannot refuse what it cannot see, so the checkpoint
  # keeps a digest of the files and the resume says so; unchanged files say nothing.
  docs = tmp_path / "docs.jsonl"
  texts = [f"document {i}: " + "some words here " * 30 for i in range(200)]
  docs.write_text(
    "".join(
      json.dumps({"text": t, "q": f"what is {i} ?", "a": f" {i}"}) + "\n"
      for i, t in enumerate(texts)
    )
  )
  cfg = small_config(tmp_path, "fp", data=str(docs), steps=6, stop_after=2, save_every=2)
  train.train(cfg, log=quiet)
  logged = []
  train.train(dataclasses.replace(cfg, resume=True), log=logged.append)  # to step 4
  assert not [line for line in logged if "--data" in str(line)]
  docs.write_text(docs.read_text().replace("document 7:", "document seven:"))
  logged.clear()
  train.train(dataclasses.replace(cfg, stop_after=1, resume=True), log=logged.append)
  assert [str(line) for line in logged if "--data" in str(line)] == [
    "galore-jax: note: the files of --data changed since checkpoint 4 (added, removed or "
    "edited, or --columns reads them otherwise): the batches from here on are not the ones "
    "its run would have read"
  ]
  # The same files read as other records (--columns): their form changed too.
  logged.clear()
  columns = dict(columns="prompt=q,completion=a", stop_after=None, resume=True)
  train.train(dataclasses.replace(cfg, **columns), log=logged.append)
  said = [str(line) for line in logged if "--data" in str(line)]
  assert len(said) == 2 and "or --columns reads them otherwise" in said[0], said
  assert said[1] == (
    "galore-jax: note: --data is read as prompt/completion records, where the run before "
    "step 5 read it as text: its examples and loss are not the same across it"
  )


def test_a_run_names_the_files_of_its_data_directory_it_does_not_read(tmp_path):
  (tmp_path / "data").mkdir()
  texts = [f"document {i}: " + "some words here " * 30 for i in range(200)]
  (tmp_path / "data" / "docs.jsonl").write_text(
    "".join(json.dumps({"text": t}) + "\n" for t in texts)
  )
  (tmp_path / "data" / "notes.md").write_text("# notes\n\nnot read from a directory\n")
  logged = []
  train.train(
    small_config(tmp_path, "dir", data=str(tmp_path / "data"), steps=6, stop_after=1),
    log=logged.append,
  )
  assert [line for line in logged if "not reading" in str(line)] == [
    f"galore-jax: note: --data {tmp_path / 'data'}: not reading its 1 other file (notes.md); "
    f"a glob names other files to read (e.g. '{tmp_path / 'data'}/**/*.md'; markdown is read "
    "as plain text)"
  ]


def test_mesh_matches_single_device_and_resumes_on_another_mesh(tmp_path, straight_run):
  assert jax.device_count() >= 8, "conftest sets 8 host devices"
  # 3 steps: projector refreshes at counts 0 and 2.
  cfg = small_config(tmp_path, "mesh", steps=6, stop_after=3, mesh="data=2,fsdp=4")
  sharded = train.train(cfg, log=quiet)
  assert len(sharded["losses"]) == 3
  np.testing.assert_allclose(sharded["losses"], straight_run["losses"][:3], rtol=1e-4, atol=1e-4)
  # The sharded checkpoint resumed on one device (another mesh: orbax restores onto the new
  # run's shardings) follows the same trajectory. Its step is straight_run's, compiled.
  resumed = train.train(small_config(tmp_path, "mesh", steps=6, resume=True), log=quiet)
  assert resumed["start_step"] == 3 and resumed["step"] == 6
  np.testing.assert_allclose(resumed["losses"], straight_run["losses"][3:], rtol=1e-4, atol=1e-4)


def test_mesh_shards_params_and_projectors(tmp_path):
  run = train.setup(small_config(tmp_path, "m", mesh="data=2,fsdp=4"), vocab_size=8192)
  specs = [s.spec for s in jax.tree.leaves(run.opt_sharding)]
  assert any("fsdp" in tuple(s) for s in specs)
  galore_state = run.abstract_opt[0]
  proj = galore_state.projectors["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert "fsdp" in tuple(proj.sharding.spec)


def test_sharded_8bit_update_gathers_neither_its_codes_nor_the_logits(tmp_path, monkeypatch):
  # Under FSDP the trainer updates 8-bit leaves unchunked, with the gradient resharded to the
  # codes' block rows (config.adam8bit_layout). Each control brings back what that avoids:
  # chunks (dynamic slices of the sharded code rows) make XLA all-gather the leaf's whole
  # int8 / uint8 codes; no sharding constraint lets XLA compute the LM head's gradient in
  # block-row layout from all-gathered logits. The chunk size is shrunk so that the toy
  # model's embedding and head are chunked on one device; they have more block rows (512)
  # than columns (256), so fsdp shards the rows, as in real models.
  from galore_jax import adam8bit

  monkeypatch.setattr(adam8bit, "CHUNK_SIZE", 2**14)
  vocab = 2048
  small = dict(hidden_size=64, intermediate_size=128, num_heads=2, num_layers=1, vocab_size=vocab)
  model_cfg = model_lib.get_config("llama_tiny", **small)
  plain = adam8bit.scale_by_adam8bit

  def gathers(**forced):
    monkeypatch.setattr(adam8bit, "scale_by_adam8bit", lambda **kw: plain(**{**kw, **forced}))
    cfg = small_config(tmp_path, "m", optimizer="galore_adamw8bit", rank=8, mesh="fsdp=8")
    run = train.setup(cfg, vocab, model_cfg=model_cfg)
    step = train.compile_train_step(run)
    batch = train.abstract_batch(run)
    hlo = (
      step.lower(run.abstract_params, run.abstract_opt, batch, train.LR_SPEC).compile().as_text()
    )
    lines = [line for line in hlo.splitlines() if " all-gather(" in line]
    codes = [x for x in lines if "= s8[" in x or "= u8[" in x]
    logits = [x for x in lines if f"[{cfg.batch_size},{cfg.seq_len},{vocab}]" in x]
    return codes, logits

  assert gathers() == ([], [])
  codes, _ = gathers(chunk_size=adam8bit.CHUNK_SIZE, rows_sharding=None)
  assert codes
  _, logits = gathers(rows_sharding=None)
  assert logits


def test_grad_accumulation_equals_large_batch(tmp_path, straight_run):
  # The whole-gradient accumulation (--no-lowrank-accum): refresh steps included. The
  # low-rank one is tested step by step in tests/test_layerwise.py. The large batch:
  # straight_run's first 2 steps (SMALL's batch of 8).
  assert SMALL["batch_size"] == 8
  kw = dict(steps=6, stop_after=2, batch_size=4, grad_accum=2, lowrank_accum=False)
  acc = train.train(small_config(tmp_path, "acc", **kw), log=quiet)
  assert len(acc["losses"]) == 2
  np.testing.assert_allclose(acc["losses"], straight_run["losses"][:2], rtol=2e-5)


def test_grad_accumulation_step_choice():
  # GaLore accumulates in low rank inside the per-layer step; full-rank Adam, clipping and
  # --no-lowrank-accum accumulate the whole gradient in the whole-gradient step.
  model_cfg = train.model_config(train.TrainConfig(**SMALL), 512)
  uses = lambda **kw: steps.uses_layerwise_step(
    train.TrainConfig(**{**SMALL, "grad_accum": 4, **kw}), model_cfg
  )
  assert uses() and uses(optimizer="galore_adamw8bit")
  assert not uses(optimizer="adamw")
  assert not uses(lowrank_accum=False)
  assert not uses(grad_clip=1.0)
  assert not uses(per_layer_updates=False)


@pytest.fixture(scope="module")
def jitted_steps(tmp_path_factory):
  """``get(optimizer, remat)``: the run (SMALL, weight decay 0.1) and its jitted
  whole-gradient and per-layer steps, built once per module: the tests that call them
  on batches of the same shape (``_batch``) share their compilations."""
  built = {}

  def get(optimizer="galore_adamw", remat="none"):
    if (optimizer, remat) not in built:
      tmp = tmp_path_factory.mktemp("steps")
      # The exact SVD: its refresh does not depend on how the leaves are batched, so the
      # two steps agree to rounding. (The subspace method's first refresh starts from a
      # pseudo-random matrix drawn per leaf of the tree it updates, which differs between
      # the two steps; test_optimizer.py checks its batched refresh against per-leaf ones.)
      cfg = small_config(tmp, "lw", optimizer=optimizer, remat=remat, weight_decay=0.1, svd="exact")
      run = train.setup(cfg, vocab_size=8192)
      whole = jax.jit(train.make_train_step(run.graphdef, run.tx))
      layerwise = jax.jit(train.make_layerwise_step(run.graphdef, run.tx, remat=remat))
      built[optimizer, remat] = run, whole, layerwise
    return built[optimizer, remat]

  return get


@pytest.mark.parametrize("layerwise", [False, True])
def test_nonfinite_step_is_skipped(jitted_steps, layerwise):
  run, whole, per_layer = jitted_steps()
  params, opt_state = train.init_state(run)
  params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(jnp.nan)
  before = jax.tree.map(np.asarray, (params, opt_state))
  step = per_layer if layerwise else whole
  batch = _batch(jax.random.key(0))
  new_params, new_opt, m = step(params, opt_state, batch)
  assert int(m["skipped"]) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((new_params, new_opt)), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_a_mesh_that_leaves_accelerators_idle_says_so():
  # The default mesh is one device: on a machine of 8 GPUs the run names the other 7.
  gpus = [types.SimpleNamespace(platform="gpu")] * 8
  note = trainer.idle_devices_note(1, gpus)
  assert note == (
    "galore-jax: note: the run uses 1 of 8 devices; --mesh data=8 (or fsdp=8, which also "
    "shards the weights and optimizer state) uses all of them"
  )
  assert trainer.idle_devices_note(8, gpus) is None  # --mesh data=2,fsdp=4
  assert trainer.idle_devices_note(1, [types.SimpleNamespace(platform="cpu")] * 8) is None
  assert trainer.idle_devices_note(1, jax.devices()) is None  # these tests' 8 CPU devices


def test_a_run_names_its_devices_and_a_cpu_fallback_beside_a_gpu(monkeypatch):
  # JAX falls back to the CPU, with one log line, where its CUDA backend is missing or
  # cannot start: a run meant for the GPU went on unnoticed (its first line named no device).
  gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")
  assert trainer.describe_devices([gpu] * 8) == "8 x NVIDIA H200"
  assert trainer.describe_devices(jax.devices()[:2]) == "2 x cpu"
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  note = trainer.cpu_fallback_note(jax.devices(), gpu_present=True)
  assert note.startswith("galore-jax: warning: training on the CPU, but this machine has an ")
  assert trainer.cpu_fallback_note(jax.devices(), gpu_present=False) is None
  assert trainer.cpu_fallback_note([gpu], gpu_present=True) is None
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the CPU was asked for
  assert trainer.cpu_fallback_note(jax.devices(), gpu_present=True) is None


def test_progress_without_a_terminal_is_plain_lines(tmp_path, monkeypatch, capsys):
  # A batch job's log file (stderr is not a terminal here, under pytest): no tqdm bar, which
  # would redraw itself into one line, but a line for the first and last steps, at most one
  # per PROGRESS_LINE_S between them, and one per evaluation.
  monkeypatch.setattr(trainer, "PROGRESS_LINE_S", 1e9)
  monkeypatch.setattr(metrics, "device_memory", lambda devices: {"peak_bytes": 3 << 30})
  cfg = small_config(tmp_path, "lines", steps=6, stop_after=4, eval_every=2, progress=True)
  logged = []
  train.train(cfg, log=logged.append)
  assert "\r" not in capsys.readouterr().err
  progress = [line for line in logged if line.startswith("step ")]
  assert [line.split(":")[0] for line in progress] == ["step 1/6", "step 2", "step 4/6", "step 4"]
  # The start line names the optimizer and the peak rate it resolved (--lr unset here).
  assert [line for line in logged if line.startswith(f"model {SMALL['model']}: ")][0].count(
    "; optimizer galore_adamw rank 16, peak lr 0.01; "
  ) == 1
  assert re.fullmatch(
    r"step 1/6: loss \d+\.\d{4}, lr \S+, [\d,]+ tokens/s, \S+ s/step, peak 3\.00 GiB",
    progress[0],
  )
  assert progress[1].startswith("step 2: eval loss ")
  # Between the two ends, one line per PROGRESS_LINE_S: every step when it is 0.
  monkeypatch.setattr(trainer, "PROGRESS_LINE_S", 0.0)
  logged.clear()
  train.train(dataclasses.replace(cfg, out=str(tmp_path / "every")), log=logged.append)
  assert [line.split(":")[0] for line in logged if "/6:" in line] == [
    f"step {i}/6" for i in range(1, 5)
  ]


def test_first_tokenization_of_a_large_source_shows_progress(tmp_path, monkeypatch, capsys):
  # Eight C4 shards take minutes to tokenize on first use: load_data says so on stderr (a
  # line at once, then one per PROGRESS_LINE_S); sources under DATA_PROGRESS_MIN_BYTES, and
  # later starts (the token cache), are silent.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(trainer, "PROGRESS_LINE_S", 1e9)
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(300)))
  cfg = small_config(tmp_path, "p", data=str(docs))
  monkeypatch.setattr(trainer, "DATA_PROGRESS_MIN_BYTES", docs.stat().st_size + 1)
  trainer.load_data(cfg)
  assert capsys.readouterr().err == ""
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache2"))
  monkeypatch.setattr(trainer, "DATA_PROGRESS_MIN_BYTES", docs.stat().st_size)
  trainer.load_data(cfg)
  assert re.fullmatch(
    r"tokenising --data \(once: cached for later starts\): 0\.00/0\.00 GB, 0 s\n",
    capsys.readouterr().err,
  )
  trainer.load_data(cfg)
  assert capsys.readouterr().err == ""


def test_evaluate_dispatches_ahead_and_reads_in_order():
  # Batch i+EVAL_AHEAD is dispatched before batch i's loss is read (the device is not left
  # idle while the host places a batch), never further ahead; the sum is in batch order.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  run = types.SimpleNamespace(mesh=mesh, cfg=types.SimpleNamespace(batch_size=1))
  losses = [2.0, 0.5, 1.0, 4.0, 3.0]
  batches = [
    {k: np.full((1, 4), i, dt) for k, dt in (("inputs", np.int32), ("targets", np.int32))}
    | {"mask": np.ones((1, 4), np.float32)}
    for i in range(len(losses))
  ]
  dispatched, read = [], []

  def eval_fn(params, batch):
    i = int(batch["inputs"][0, 0, 0])
    dispatched.append(i)
    return jnp.float32(losses[i] * 4), jnp.float32(4)

  loss, ppl = trainer.evaluate(
    run, None, batches, eval_fn, progress=lambda n: read.append((n, len(dispatched)))
  )
  ahead = trainer.EVAL_AHEAD
  assert ahead >= 1 and dispatched == list(range(5))
  assert read == [(n, min(n + ahead, 5)) for n in range(1, 6)]
  assert loss == pytest.approx(sum(losses) / 5) and ppl == pytest.approx(math.exp(loss))


def test_the_train_step_is_traced_with_the_garbage_collector_paused(monkeypatch):
  # Tracing a large step with the collector running rescans every object the trace has
  # made so far, again and again (trainer._gc_paused; llama_7b figures in the README).
  seen = []

  def select_train_step(graphdef, tx, cfg, model_cfg):
    def step(params, opt_state, batch):
      seen.append(gc.isenabled())
      return params, opt_state, {}

    return step

  monkeypatch.setattr(steps, "select_train_step", select_train_step)
  run = trainer.setup(config.TrainConfig(), 8192)
  args = (run.abstract_params, run.abstract_opt, trainer.abstract_batch(run), trainer.LR_SPEC)
  assert gc.isenabled()
  trainer.compile_train_step(run).trace(*args)
  assert seen == [False] and gc.isenabled()  # and running again after the trace
  gc.disable()  # a caller's own choice is left as it was
  try:
    trainer.compile_train_step(run).trace(*args)
    assert seen == [False, False] and not gc.isenabled()
  finally:
    gc.enable()


def test_a_resume_names_the_rate_a_fine_tune_ran_at_under_other_defaults(tmp_path):
  # A checkpoint records the rate --lr unset stood for.
  plain = small_config(tmp_path, "lr", lr=None)
  run = train.setup(plain, vocab_size=8192)
  saved = trainer.run_meta(plain, run, data.load_tokenizer(None))["train_config"]
  assert saved["lr"] is None and saved["peak_lr"] == 0.01
  assert config.resume_changes(saved, plain, 50) is None
  cfg = train.TrainConfig(init_from="hf_model", steps=100)
  # Saved by this version (with the rate --lr unset stood for): nothing changed.
  assert config.resume_changes({**dataclasses.asdict(cfg), "peak_lr": cfg.peak_lr}, cfg, 50) is None
  # Saved before the fine-tuning default (no peak_lr: it ran at pretraining's 0.01). The
  # resume takes this version's default, and says so rather than changing the rate silently.
  line = config.resume_changes(dataclasses.asdict(cfg), cfg, 50)
  assert "--lr 2e-05 (was 0.01)" in line and "the first run's schedule: 0.00" in line


@pytest.mark.parametrize(
  "optimizer", ["adamw", "galore_adamw", "galore_adamw8bit", "galore_adafactor"]
)
def test_the_optimizer_at_a_step_s_rate_is_the_one_with_the_schedule_compiled_in(optimizer):
  # The trainer's step builds the optimizer at its lr argument (build_optimizer(lr=)), the
  # host giving the schedule's rate of each step: the same updates and states as the
  # schedule read from the state's counts, through warm-up, weight decay (which reads the
  # rate too), Adafactor's own use of the rate and GaLore's refreshes.
  cfg = train.TrainConfig(
    optimizer=optimizer, steps=8, warmup=2, lr=0.01, weight_decay=0.1, rank=4,
    update_proj_gap=2, svd="exact",
  )  # fmt: skip
  small = dict(hidden_size=32, intermediate_size=64, num_heads=2, num_layers=1, vocab_size=64)
  _, abstract = trainer.abstract_model(model_lib.get_config("llama_tiny", **small))
  rng = np.random.default_rng(0)
  draw = lambda: jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), abstract)
  scheduled = config.build_optimizer(cfg)
  with_schedule = jax.jit(scheduled.update)
  at_rate = jax.jit(lambda g, s, p, lr: config.build_optimizer(cfg, lr=lr).update(g, s, p))
  sched = config.lr_schedule(cfg)
  params = draw()
  state_a = state_b = scheduled.init(params)
  for k in range(5):  # warm-up (rates 0, 0.005), the peak, decay; refreshes at 0, 2, 4
    grads = draw()
    updates_a, state_a = with_schedule(grads, state_a, params)
    doubled, _ = at_rate(grads, state_b, params, np.float32(2 * sched(k)))
    updates_b, state_b = at_rate(grads, state_b, params, np.float32(sched(k)))
    chex.assert_trees_all_close(updates_b, updates_a, rtol=1e-6, atol=1e-9)
    if k:  # the argument is the rate used (rate 0 at k = 0: no update either way)
      assert not np.allclose(doubled["lm_head"]["kernel"], updates_a["lm_head"]["kernel"])
    chex.assert_trees_all_close(state_b, state_a, rtol=1e-6, atol=1e-9)
    params = optax.apply_updates(params, updates_a)


def test_a_caller_s_lr_at_is_the_rate_the_run_s_own_optimizer_steps_at(tmp_path):
  # Hooks.lr_at gives the step its rate (and is what metrics.jsonl records): at 0 nothing
  # moves. (Before the rate was an argument of the step, it was only what was recorded.)
  seen = {}

  def keep(step, params, opt_state, writer):
    seen[step] = jax.tree.map(np.asarray, params)
    return params, opt_state

  hooks = trainer.Hooks(lr_at=lambda step: 0.0, before_step=[keep])
  train.train(small_config(tmp_path, "still", steps=6, stop_after=3), log=quiet, hooks=hooks)
  chex.assert_trees_all_equal(seen[2], seen[0])
  rates = [r["lr"] for r in metrics.read_metrics(str(tmp_path / "still")) if "lr" in r]
  assert rates == [0.0, 0.0, 0.0]


def test_turning_an_on_off_flag_on_or_off_at_resume_is_refused_naming_its_values():
  def meta(**kw):
    cfg = train.TrainConfig(optimizer="galore_adafactor", **kw)
    compat = {
      "weight_decay": cfg.weight_decay > 0,
      "adafactor_beta1": cfg.adafactor_beta1 > 0,
    }
    return {"compat": compat, "train_config": dataclasses.asdict(cfg), "data_position": {}}

  trainer.check_compatible(meta(weight_decay=0.1), meta(weight_decay=0.2), "C")  # a value
  with pytest.raises(config.ConfigError) as e:
    trainer.check_compatible(meta(adafactor_beta1=0.9), meta(), "C")
  assert str(e.value) == (
    "--adafactor-beta1: checkpoint C was saved with --adafactor-beta1 0.9, this run has 0: "
    "turning it off changes the optimizer's state or step (its value may change)"
  )
  with pytest.raises(config.ConfigError, match="--weight-decay 0, this run has 0.1: turning it on"):
    trainer.check_compatible(meta(), meta(weight_decay=0.1), "C")


def test_a_checkpoint_of_examples_one_per_row_resumes_only_that_way(tmp_path):
  # Versions before instruction examples were packed laid them out one per row, whatever
  # their recorded --packing said: their checkpoints continue one per row (a packed resume
  # would read other batches), and a text run's checkpoint read as records now is the form
  # change the resume notes, not refused.
  def meta(form, rows=None, packing=True):
    position = {"seed": 0, "packing": packing, **({"example_rows": rows} if rows else {})}
    return {"compat": {}, "data_position": position, **({"data_format": form} if form else {})}

  old = meta("prompt")
  for saved in (old, meta(None)):  # with the form recorded, and before it was (no record)
    trainer.check_compatible(saved, meta("prompt", "one per row", packing=False), "C")
    with pytest.raises(config.ConfigError) as e:
      trainer.check_compatible(saved, meta("prompt", "packed"), "C")
    assert str(e.value) == (
      "--no-packing: checkpoint C had its instruction examples one per row (as versions "
      "before packing them did); this run has them packed, which would not continue its "
      "data order"
    )
  trainer.check_compatible(meta("prompt", "packed"), meta("prompt", "packed"), "C")
  with pytest.raises(config.ConfigError, match="^--packing: .* examples packed; this run has"):
    trainer.check_compatible(meta("prompt", "packed"), meta("prompt", "one per row", False), "C")
  trainer.check_compatible(meta("text"), meta("prompt", "packed"), "C")
  trainer.check_compatible(meta(None), meta("alpaca", "packed"), "C")  # Alpaca was text then
  # The CLI resumes such a run with --no-packing, the one flag it takes from no record.
  step = tmp_path / "run" / "checkpoints" / "5" / "meta"
  step.mkdir(parents=True)
  record = {"train_config": dataclasses.asdict(train.TrainConfig(out=str(tmp_path / "run")))}

  def resume(saved, *flags):
    (step / "metadata").write_text(json.dumps({**record, **saved}))
    argv = ["train", "--resume", "--out", str(tmp_path / "run"), *flags]
    args = cli.build_parser().parse_args(argv)
    return cli._with_the_runs_flags(cli._train_config(args), cli._given_train_flags(argv))

  cfg, note = resume(old)
  assert not cfg.packing and note == (
    "galore-jax: note: resuming with the run's own flags (checkpoint 5): --no-packing; a flag "
    "given here overrides its value"
  )
  assert resume(old, "--packing")[0].packing  # (which check_compatible then refuses)
  assert resume(meta("prompt", "packed"))[0].packing and resume(meta("text"))[0].packing


def test_the_moment_policy_reaches_the_optimizer_and_may_change_on_resume():
  """--moment-policy reproject rotates Adam's first moment at a refresh (keep leaves it, reset
  zeroes it); the policy changes no state shape, so a resume may change it (and says so)."""
  params = {"layers": [{"attn": {"q_proj": {"kernel": jnp.ones((8, 8))}}}]}
  grads = [
    jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(i), p.shape), params)
    for i in range(3)
  ]

  def first_moment(policy):
    cfg = train.TrainConfig(rank=2, update_proj_gap=2, moment_policy=policy, lr=0.01)
    tx = config.build_optimizer(cfg)
    state = tx.init(params)
    moments = []
    for g in grads:  # counts 0, 1, 2: a refresh at 0 and at 2
      _, state = tx.update(g, state, params)
      (galore_state,) = [s for s in jax.tree.leaves(state, is_leaf=_is_galore) if _is_galore(s)]
      moments.append(galore_state.inner_state.mu["layers"][0]["attn"]["q_proj"]["kernel"])
    return moments

  keep, reproject, reset = (first_moment(p) for p in ("keep", "reproject", "reset"))
  for a, b in zip(keep[:2], reproject[:2], strict=True):  # the same until the basis changes
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(keep[2], reproject[2])
  # The step-2 moment is b1 * (the old one: kept, rotated, or zero) + (1 - b1) * P_new g,
  # with the same new projector under every policy (it comes from g alone).
  b1 = train.TrainConfig().b1
  np.testing.assert_allclose(keep[2] - b1 * keep[1], reset[2], atol=1e-6)
  rotated = np.linalg.norm(reproject[2] - reset[2]) / b1
  # A rotation into a rank-2 subspace keeps part of the old moment: less than all of it.
  assert 1e-3 < rotated < np.linalg.norm(keep[1]) - 1e-3, (rotated, np.linalg.norm(keep[1]))
  saved = dataclasses.asdict(train.TrainConfig())
  line = config.resume_changes(saved, train.TrainConfig(moment_policy="reproject"), 10)
  assert "--moment-policy reproject (was keep)" in line


def _is_galore(x):
  return type(x).__name__ == "GaLoreState"


def test_galore_targets_only_attention_and_mlp_kernels(tmp_path):
  run = train.setup(small_config(tmp_path, "mask"), vocab_size=8192)
  mask = train.galore_mask(run.abstract_params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  selected = sorted(k for k, v in flat.items() if v)
  assert len(selected) == 7 * run.model_cfg.num_layers
  assert not flat["['embed']['embedding']"] and not flat["['lm_head']['kernel']"]
  # Square q kernel: projected on the input side as torch's (out, in) weight would be.
  d, f = run.model_cfg.hidden_size, run.model_cfg.intermediate_size
  proj = run.abstract_opt[0].projectors["layers"][0]["attn"]["q_proj"]["kernel"]
  assert proj.shape == (16, d)
  up = run.abstract_opt[0].projectors["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert d < f and up.shape == (d, 16)  # (in=d, out=f) kernel: the d side, as torch


def test_sigterm_at_a_save_step_saves_once_and_exits_143(tmp_path):
  # --save-every 1: the signal always lands on a step that is saved anyway (it used to
  # save it twice: StepAlreadyExistsError, a traceback and exit 1). Meanwhile stdout is closed.
  out = tmp_path / "sig"
  cmd = [
    sys.executable,
    "-m",
    "galore_jax.cli",
    "train",
    "--out",
    str(out),
    "--steps",
    "500",
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--rank",
    "16",
    "--no-progress",
    "--eval-every",
    "1000",
    "--save-every",
    "1",
    # As test_cli.py's end-to-end test, so the two share one compiled step.
    "--svd",
    "subspace",
    "--update-proj-gap",
    "2",
  ]
  # Its stdout is a pipe nobody reads (`| head` after the first lines): every print meets a
  # closed pipe (unbuffered), and training must go on regardless (cli._StreamGuard).
  read_end, write_end = os.pipe()
  os.close(read_end)
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(cmd, stdout=write_end, stderr=subprocess.PIPE, text=True, env=env)
  os.close(write_end)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    mfile = out / "metrics.jsonl"
    if mfile.exists() and mfile.read_text().count('"loss"') >= 2:  # two steps done
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err
  assert "checkpoint saved" in err and "Traceback" not in err
  said, last = err.strip().splitlines()  # what the signal does, when it comes; how it ended
  assert said == (
    "galore-jax: SIGTERM: stopping after the current step, which is saved; "
    "send it again to stop without saving"
  )
  assert last.startswith("galore-jax: interrupted by SIGTERM at step")
  step = checkpoint.latest_step(str(out))
  assert step is not None and step >= 2
  _, meta = checkpoint.read_meta(str(out))
  assert meta["step"] == step
  records = [r["step"] for r in metrics.read_metrics(str(out)) if "loss" in r]
  assert records == list(range(1, step + 1))

  # (With text data it is unused, and says so: test_document_mask_trains_evaluates...)


def test_diverging_run_stops_with_clear_error(tmp_path, monkeypatch):
  # Every step's loss is NaN: each is skipped, and after `max_nonfinite` of them in a row the
  # run stops with an error instead of idling through the remaining steps.
  real_loss = steps.summed_cross_entropy
  monkeypatch.setattr(steps, "summed_cross_entropy", lambda *a: real_loss(*a) * jnp.nan)
  cfg = small_config(tmp_path, "diverge", steps=40, max_nonfinite=3)
  with pytest.raises(train.TrainingDiverged, match="3 consecutive steps"):
    train.train(cfg, log=quiet)
  records = [r for r in metrics.read_metrics(cfg.out) if "loss" in r]
  assert [r["skipped"] for r in records] == [1, 1, 1]


def _batch(key, batch=4, seq=32, vocab=8192):
  tokens = jax.random.randint(key, (1, batch, seq + 1), 0, vocab)
  return {
    "inputs": tokens[..., :-1],
    "targets": tokens[..., 1:],
    "mask": jnp.ones((1, batch, seq), jnp.float32),
  }


# AdamW alone is not a case of its own: GaLore's embedding, norms and head are updated
# by its inner AdamW, through the same partial-tree path (suite time on 2 CPU cores).
@pytest.mark.parametrize(
  "optimizer,remat", [("galore_adamw", "none"), ("galore_adamw8bit", "full")]
)
def test_layerwise_step_equals_whole_gradient_step(jitted_steps, optimizer, remat):
  # Per-layer updates change when each weight is updated, not the numbers: 4 steps
  # (projector refreshes at counts 0 and 2) agree with the whole-gradient step.
  run, whole, layerwise = jitted_steps(optimizer, remat)
  state_w = state_l = train.init_state(run)
  for t in range(4):
    batch = _batch(jax.random.key(t))
    *state_w, m_w = whole(*state_w, batch)
    *state_l, m_l = layerwise(*state_l, batch)
    np.testing.assert_allclose(m_l["loss"], m_w["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_l["grad_norm"], m_w["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(state_w), jax.tree.leaves(state_l), strict=True):
    if jnp.issubdtype(a.dtype, jnp.integer):  # counts, and 8-bit codes: rounding flips only
      assert np.mean(np.asarray(a) != np.asarray(b)) < 1e-2
    elif optimizer.endswith("8bit"):  # float rounding can flip a code: rare, small moves
      diff = np.abs(np.asarray(b, np.float32) - np.asarray(a, np.float32))
      assert np.mean(diff > 2e-5 + 2e-3 * np.abs(np.asarray(a))) < 1e-4 and diff.max() < 1e-3
    else:
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-3, atol=2e-5)


def test_packed_examples_train_as_they_do_one_per_row(jitted_steps):
  # Instruction examples packed several to a row (sft.pack_rows, the batch's "segments")
  # give the loss, token count, gradient norm and update of the same examples one per row,
  # in the whole-gradient and the per-layer step: packing saves padding, nothing else.

  run, whole, layerwise = jitted_steps()
  rng = np.random.default_rng(0)
  lengths = rng.integers(4, 25, size=8)
  tokens = rng.integers(3, 8192, size=int(lengths.sum())).astype(np.uint16)
  starts = np.concatenate([[0], np.cumsum(lengths)])
  trained = np.zeros(len(tokens), bool)
  for s, n in zip(starts[:-1], lengths, strict=True):
    trained[s + rng.integers(1, n - 1) : s + n] = True  # a prompt, then the trained reply
  ex = sft._Examples(tokens, trained, starts, np.zeros((8, 2), np.int64))
  rows = sft.pack_rows(lengths, 33)
  assert len(rows) <= 6
  one_per_row = sft._ExampleBatch(ex, 8, 32, pad=0)(np.arange(8))
  packed = sft._ExampleBatch(ex, 8, 32, pad=0, rows=rows)(np.arange(len(rows)))
  assert packed["mask"].sum() == one_per_row["mask"].sum() == trained.sum()
  add_axis = lambda b: jax.tree.map(lambda x: jnp.asarray(x)[None], b)
  out = {}
  for name, step, b in (
    ("one per row", whole, one_per_row),
    ("packed", whole, packed),
    ("packed, per layer", layerwise, packed),
  ):
    params, opt_state = train.init_state(run)
    out[name] = step(params, opt_state, add_axis(b))
  ref_params, _, ref = out["one per row"]
  for name in ("packed", "packed, per layer"):
    params, _, m = out[name]
    assert int(m["tokens"]) == int(ref["tokens"])
    np.testing.assert_allclose(m["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], ref["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params), strict=True):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-3, atol=2e-5)


def test_plan_lowers_the_step_a_packed_instruction_run_takes(tmp_path):
  # `plan` lowers the step without data: for packed instruction records it takes segment ids
  # (the attention mask is in the program it measures), read from the first record alone.
  qa = tmp_path / "qa.jsonl"
  qa.write_text(
    "".join(json.dumps({"prompt": f"{i} ?", "completion": " ok"}) + "\n" for i in range(9))
  )
  run = train.setup(small_config(tmp_path, "plan", data=str(qa)), vocab_size=8192)
  batch = trainer.abstract_batch(run)
  assert batch["segments"].shape == batch["inputs"].shape and batch["segments"].dtype == np.int32
  train.compile_train_step(run).lower(run.abstract_params, run.abstract_opt, batch, train.LR_SPEC)
  assert "segments" not in trainer.abstract_batch(train.setup(small_config(tmp_path, "t"), 8192))
  unpacked = train.setup(small_config(tmp_path, "u", data=str(qa), packing=False), 8192)
  assert "segments" not in trainer.abstract_batch(unpacked)
  masked = train.setup(small_config(tmp_path, "d", document_mask=True), 8192)  # packed text, masked
  assert "segments" in trainer.abstract_batch(masked)


def test_instruction_examples_laid_out_otherwise_are_refused_before_the_data_loads(tmp_path):
  # The form of --data (its first record) tells, before the load, whether its examples'
  # rows are part of the data order: a resume of a packed instruction run with --no-packing
  # is refused there; text data has no rows of examples.
  qa = tmp_path / "qa.jsonl"
  qa.write_text(
    "".join(json.dumps({"prompt": f"{i} ?", "completion": " ok"}) + "\n" for i in range(9))
  )
  text = tmp_path / "text.txt"
  text.write_text("plain text\n")
  assert sft.source_format(str(qa), None) == "prompt"
  assert [sft.source_format(s, None) for s in (str(text), "builtin", "tfds:c4")] == ["text"] * 3
  assert sft.source_format(str(tmp_path / "missing.jsonl"), None) == "text"  # the load says
  cfg = small_config(tmp_path, "sft", data=str(qa))
  saved = {
    "compat": trainer.optimizer_compat(cfg),
    "data_position": trainer.data_position(cfg, "prompt"),
    "data_format": "prompt",
  }
  assert saved["data_position"]["example_rows"] == "packed"
  trainer.check_config_compatible(saved, cfg, "C", "prompt")
  with pytest.raises(config.ConfigError, match="^--packing: checkpoint C had its instruction"):
    trainer.check_config_compatible(saved, dataclasses.replace(cfg, packing=False), "C", "prompt")
  # Without the data's form (a caller's own data): its batch shape and seed only.
  trainer.check_config_compatible(saved, dataclasses.replace(cfg, packing=False), "C")


def test_layerwise_step_skips_only_weights_with_a_bad_gradient(tmp_path, poison_stage_gradients):
  # A finite loss whose layer-1 gradients are NaN: layer 1 keeps its weights and optimizer
  # state, every other weight is updated, the step counts once.
  poison_stage_gradients(lambda n: n in (3, 4))  # one stage per half block: layer 1 is 3, 4
  run = train.setup(small_config(tmp_path, "poison", warmup=0), vocab_size=8192)  # lr > 0 at step 0
  params, opt_state = train.init_state(run)
  before = jax.tree.map(np.asarray, (params, opt_state))
  step = jax.jit(train.make_layerwise_step(run.graphdef, run.tx))
  new_params, new_opt, m = step(params, opt_state, _batch(jax.random.key(0)))
  assert int(m["skipped"]) == 0
  assert int(m["nonfinite_grads"]) == len(jax.tree.leaves(params["layers"][1]))
  assert int(new_opt[0].count) == 1
  chex_equal = lambda a, b: all(
    np.array_equal(x, np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )
  assert chex_equal(before[0]["layers"][1], new_params["layers"][1])
  inner_mu = lambda s: s[0].inner_state.mu["layers"]
  assert chex_equal(inner_mu(before[1])[1], inner_mu(new_opt)[1])
  assert not chex_equal(before[0]["layers"][0], new_params["layers"][0])
  assert not chex_equal(before[0]["lm_head"], new_params["lm_head"])
  assert not chex_equal(before[0]["embed"], new_params["embed"])


def test_layerwise_step_refreshing_a_stage_together_equals_whole_gradient_step(tmp_path):
  # refresh_together (the trainer's choice for svd="subspace" on one device): a stage's
  # same-shaped projected weights (q, k, v, o; gate and up with the transposed down) update
  # as one unit, so their projectors refresh as one batch: one power-iteration loop per unit,
  # 2 per layer instead of 7, and the numbers of the whole-gradient step over 3 steps with
  # refreshes at counts 0 and 2.
  run = train.setup(small_config(tmp_path, "together", svd="subspace"), vocab_size=8192)
  fn = train.make_layerwise_step(run.graphdef, run.tx, refresh_together=True)
  lowered = jax.jit(fn).lower(run.abstract_params, run.abstract_opt, _batch(jax.random.key(0)))
  assert lowered.as_text().count("stablehlo.while") == 2 * run.model_cfg.num_layers
  together, whole = lowered.compile(), jax.jit(train.make_train_step(run.graphdef, run.tx))
  state_w = state_l = train.init_state(run)
  for t in range(3):
    batch = _batch(jax.random.key(t))
    *state_w, m_w = whole(*state_w, batch)
    *state_l, m_l = together(*state_l, batch)
    np.testing.assert_allclose(m_l["loss"], m_w["loss"], rtol=1e-5)
  # Within 1e-3 of each leaf's own scale: a batched matmul sums in another order, and the
  # power iteration carries that into the projectors of nearly equal singular values
  # (3e-5 in entries of size 0.25 seen, differing from run to run and between jax versions).
  for a, b in zip(jax.tree.leaves(state_w), jax.tree.leaves(state_l), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=2e-3, atol=1e-3 * np.abs(a).max() + 1e-7)


def test_batched_lapack_hangs_only_on_a_cpu_mesh():
  # The trainer refreshes each leaf on its own there (build_optimizer), and batches them
  # on one device and on GPU meshes.
  assert jax.default_backend() == "cpu"
  hangs = lambda **kw: config.batched_lapack_hangs(train.TrainConfig(**{**SMALL, **kw}))
  assert hangs(mesh="data=2") and hangs(mesh="data=1,fsdp=4")
  assert not hangs() and not hangs(mesh="data=1,fsdp=1")


def test_refreshing_together_is_chosen_for_iterative_refreshes_on_one_device():
  cfg = lambda **kw: train.TrainConfig(**{**SMALL, **kw})
  assert steps.refreshes_together(cfg())  # the trainer's default, subspace
  assert steps.refreshes_together(cfg(svd="randomized", optimizer="galore_adamw8bit"))
  assert not steps.refreshes_together(cfg(svd="exact"))  # cuSOLVER runs one matrix at a time
  assert not steps.refreshes_together(cfg(svd="subspace", mesh="data=2"))
  assert not steps.refreshes_together(cfg(svd="subspace", optimizer="adamw"))


def test_refresh_together_skips_the_unit_of_a_bad_gradient(tmp_path, poison_stage_gradients):
  # Only layer 1's q_proj gets a NaN gradient (the loss is finite): with refresh_together its
  # whole unit (q, k, v, o) keeps its values, the rest is updated (one weight at a time, only
  # q_proj would be kept: test_layerwise_step_skips_only_weights_with_a_bad_gradient).
  poison_stage_gradients(  # layer 1's attention half is the third stage
    lambda n: n == 3, where=lambda path: "q_proj" in jax.tree_util.keystr(path)
  )
  run = train.setup(small_config(tmp_path, "poison", warmup=0), vocab_size=8192)  # lr > 0 at step 0
  params, opt_state = train.init_state(run)
  before = jax.tree.map(np.asarray, params["layers"][1])
  step = train.make_layerwise_step(run.graphdef, run.tx, refresh_together=True)
  new_params, _, m = jax.jit(step)(params, opt_state, _batch(jax.random.key(0)))
  assert int(m["skipped"]) == 0 and int(m["nonfinite_grads"]) == 1
  attn = new_params["layers"][1]["attn"]
  kept = {
    name for name in attn if np.array_equal(before["attn"][name]["kernel"], attn[name]["kernel"])
  }
  assert kept == {"q_proj", "k_proj", "v_proj", "o_proj"}
  mlp = new_params["layers"][1]["mlp"]["up_proj"]["kernel"]
  assert not np.array_equal(before["mlp"]["up_proj"]["kernel"], mlp)


def test_layerwise_step_keeps_one_layers_gradient_alive(tmp_path):
  # memory_analysis of the compiled per-layer steps (8-bit GaLore, remat, a small vocabulary
  # so the decoder blocks dominate; float32 since the CPU widens bf16 dots): their
  # temporaries hold a few blocks' gradients at most, where the whole gradient is over 3
  # blocks (3 layers of llama_tiny, the embedding and the head: fewer layers, less to
  # compile). The whole-gradient step's temporaries, which hold all of it, are compared with
  # the per-layer step's in test_plan.py. The refresh is the exact SVD, one op where the
  # subspace iteration is many: the gradients' memory is the same, the compile 40 % shorter.
  cfg = small_config(
    tmp_path,
    "mem",
    optimizer="galore_adamw8bit",
    remat="full",
    batch_size=1,
    seq_len=8,
    svd="exact",
  )
  model_cfg = model_lib.get_config("llama_tiny", num_layers=3, vocab_size=256)
  run = train.setup(cfg, vocab_size=256, model_cfg=model_cfg)
  params, opt = run.abstract_params, run.abstract_opt
  batch = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(jax.random.key(0), 1, 8, 256)
  )
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  block = nbytes(params["layers"][0])
  assert nbytes(params) > 3 * block
  temp = {}
  for name, fn in [
    ("layerwise", train.make_layerwise_step(run.graphdef, run.tx, remat="full")),
    # --per-layer-clip: a second forward and backward pass, not a second gradient's memory (with
    # the first pass's pullbacks reused, XLA kept 4.9 blocks' worth: the passes merged).
    ("clipped", train.make_layerwise_step(run.graphdef, run.tx, remat="full", clip_norm=1.0)),
  ]:
    compiled = jax.jit(fn, donate_argnums=(0, 1)).lower(params, opt, batch).compile()
    temp[name] = compiled.memory_analysis().temp_size_in_bytes
  # Measured: 1.40 blocks each (the whole-gradient step: 8.9).
  assert temp["layerwise"] < 2 * block, (temp, block)
  assert temp["clipped"] < 1.2 * temp["layerwise"], (temp, block)


def test_galore_whole_gradient_step_runs_on_a_mesh(tmp_path):
  # Batched SVDs hung this step at its first refresh on a CPU mesh (every intra-op worker
  # blocked in jaxlib's LAPACK batch map: config.batched_lapack_hangs); there the trainer
  # refreshes each leaf on its own. A subprocess with a timeout, so that a hang fails the
  # test instead of hanging CI.
  out = tmp_path / "wg"
  # llama_tiny's width (jaxlib runs a batch of smaller matrices inline: no hang to see) with
  # 2 of its 4 layers, which still stack.
  wide = dict(hidden_size=256, intermediate_size=688)
  model = write_tiny_hf_model(tmp_path / "model", **wide)
  cmd = [sys.executable, "-m", "galore_jax.cli", "train", "--out", str(out), "--init-from", model]
  cmd += ["--mesh", "data=2,fsdp=2", "--no-per-layer-updates", "--steps", "2"]
  cmd += ["--batch-size", "4", "--seq-len", "32", "--rank", "16", "--update-proj-gap", "1"]
  cmd += ["--eval-every", "1000", "--eval-batches", "1", "--no-progress"]
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ["XLA_FLAGS"])
  env = dict(os.environ, XLA_FLAGS=flags + " --xla_force_host_platform_device_count=4")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  losses = [r["loss"] for r in metrics.read_metrics(str(out)) if "loss" in r]
  assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_a_run_keeps_a_copy_of_its_tokenizer(tmp_path, monkeypatch):
  """RUN/tokenizer/ holds every file the tokenizer reads (here its EOS id comes from the
  model's config.json beside it), loads as the same tokenizer, is written once, and a
  copy that fails only warns and leaves nothing behind."""
  tokenizers = pytest.importorskip("tokenizers")
  model = tmp_path / "model"
  model.mkdir()
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  special = ["<unk>", "<stop_here>"]
  bpe = tokenizers.trainers.BpeTrainer(vocab_size=80, special_tokens=special, show_progress=False)
  tok.train_from_iterator(["the cat sat on the mat", "a dog ran"] * 20, bpe)
  tok.save(str(model / "tokenizer.json"))
  (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
  (model / "config.json").write_text(json.dumps({"eos_token_id": 1}))
  sp = data.load_tokenizer(model)
  assert sp.eos_id() == 1
  run = tmp_path / "run"
  run.mkdir()
  cfg = config.TrainConfig(tokenizer=str(model / "tokenizer.json"), out=str(run))
  said = []
  trainer.keep_tokenizer(cfg, sp, said.append)
  assert sorted(os.listdir(run / "tokenizer")) == [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
  ]
  copy = data.load_tokenizer(run / "tokenizer")
  assert trainer.tokenizer_hash(copy) == trainer.tokenizer_hash(sp) and copy.eos_id() == 1
  assert copy.chat_template == "{{ messages }}" and said == []
  (model / "tokenizer_config.json").write_text("{}")  # kept once: not copied again
  trainer.keep_tokenizer(cfg, data.load_tokenizer(model), said.append)
  assert data.load_tokenizer(run / "tokenizer").chat_template == "{{ messages }}"

  # The bundled tokenizer is the package's: nothing to keep. A failed copy warns.
  trainer.keep_tokenizer(dataclasses.replace(cfg, tokenizer=None, out=str(tmp_path)), sp, print)
  assert not (tmp_path / "tokenizer").exists()

  def full(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(trainer.shutil, "copyfile", full)
  other = tmp_path / "other"
  other.mkdir()
  trainer.keep_tokenizer(dataclasses.replace(cfg, out=str(other)), sp, said.append)
  assert os.listdir(other) == [] and len(said) == 1
  assert said[0].startswith("galore-jax: warning: could not keep a copy of the tokenizer in ")
  assert "No space left on device" in said[0]


def test_two_refresh_programs_train_as_one_and_follow_the_count(tmp_path, monkeypatch):
  # --refresh-programs two (GPUs' default): steps with a projector refresh run one program,
  # the others a program without refresh code, chosen from the optimizer's count. The
  # second step's batch makes the loss NaN: that step is skipped and does not advance the
  # count, so refreshes (T = 2) come at steps 1, 4, 6, not 1, 3, 5; a choice by step number
  # would refresh at the wrong steps and train differently.
  real = trainer.device_batch
  calls = []

  def poisoned(run, batch, grad_accum, local=False):
    out = real(run, batch, grad_accum, local=local)
    if not local:  # an evaluation batch
      return out
    calls.append(1)
    return {**out, "mask": out["mask"] * jnp.nan} if len(calls) % 6 == 2 else out

  monkeypatch.setattr(trainer, "device_batch", poisoned)
  logged = []
  cfg = lambda name, programs: small_config(tmp_path, name, steps=6, refresh_programs=programs)
  one = train.train(cfg("one", "one"), log=quiet)
  two = train.train(cfg("two", "two"), log=logged.append)
  assert one["step_compilations"] == 1 and two["step_compilations"] == 2
  assert "train step: compiling the program for steps without a refresh" in logged
  skipped = [r["skipped"] for r in metrics.read_metrics(cfg("two", "two").out) if "loss" in r]
  assert skipped == [0, 1, 0, 0, 0, 0]
  assert np.isnan(one["losses"][1]) and np.isnan(two["losses"][1])
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)


def test_a_time_limited_resume_compiles_both_programs_at_its_start(tmp_path):
  # With two programs, a resume between refreshes compiles the refresh program at its next
  # refresh, a pause --time-limit's margin (the recent steps' time) would not foresee. A
  # --time-limit run compiles it right after its first step instead.
  cfg = lambda **kw: small_config(tmp_path, "limited", steps=6, refresh_programs="two", **kw)
  train.train(cfg(stop_after=3), log=quiet)  # counts 0..2; the resume starts at 3 (T = 2)
  logged = []
  done = train.train(cfg(resume=True, time_limit="1h"), log=logged.append)
  assert done["step"] == 6 and done["step_compilations"] == 2
  at_start = "train step: compiling the program for steps with a projector refresh (now: "
  assert sum(str(line).startswith(at_start) for line in logged) == 1
  assert "train step: compiling the program for steps with a projector refresh" not in logged


@pytest.mark.parametrize("gap", [1, 2, 7])
def test_refresh_programs_follow_the_count_reading_it_only_where_it_decides(gap):
  # A state the last call returned holds that call's count or one more (a skipped step),
  # so the program is known without reading the count (which waits for the step before)
  # unless the range of counts it may hold has a due count and one that is not.
  from galore_jax.optimizer import GaLoreState

  ran = []

  def build(name):
    def program(params, opt_state, skip, lr):  # a step, skipped or not, recording its name
      ran.append(name)
      return params, opt_state._replace(count=opt_state.count + (0 if skip else 1)), {}

    return lambda example: program

  programs = trainer.RefreshPrograms({n: build(n) for n in trainer.RefreshPrograms.NAMES}, gap)
  state = GaLoreState(count=jnp.zeros([], jnp.int32), projectors=None, inner_state=None)
  rng = np.random.default_rng(gap)
  count, expected = 0, []
  for _ in range(70):
    skip = bool(rng.random() < 0.2)
    expected.append(trainer.RefreshPrograms.name_for(count, gap))
    _, state, _ = programs(None, state, skip, None)
    count += not skip
  assert ran == expected
  refreshes = expected.count("due")
  if gap == 1:  # every count is due: only the first call reads
    assert programs.count_reads == 1
  else:  # a few reads around each refresh (the due count, the next), none between
    assert programs.count_reads <= 3 * refreshes + 1
    assert gap == 2 or programs.count_reads < 70 // 2
  # A state from elsewhere (a restore, a callback's) is read, whatever its count.
  reads = programs.count_reads
  programs(None, state._replace(count=jnp.asarray(count)), False, None)
  assert programs.count_reads == reads + 1 and ran[-1] == programs.name_for(count, gap)


def test_a_step_starts_before_the_last_ones_metrics_are_read(tmp_path, straight_run, monkeypatch):
  # The device runs the steps back to back: step k + 1 is dispatched before step k's
  # metrics are read (reading waits for the step), except where the loop needs a step's
  # metrics or state at once: the first step (its records time the compilation) and the
  # last (evaluation, checkpoint). The run and its records are the same.
  events = []
  real_step, real_get = trainer.cached_train_step, jax.device_get

  def dispatching(run, hooks, log, **kw):
    step_fn = real_step(run, hooks, log, **kw)

    def step(*args):
      events.append("dispatch")
      return step_fn(*args)

    return step

  def get(x):
    if isinstance(x, dict) and "skipped" in x:  # a step's metrics
      events.append("read")
    return real_get(x)

  monkeypatch.setattr(trainer, "cached_train_step", dispatching)
  monkeypatch.setattr(jax, "device_get", get)
  done = train.train(small_config(tmp_path, "overlap", steps=6), log=quiet)
  monkeypatch.undo()
  d, r = "dispatch", "read"
  assert events == [d, r, d, d, r, d, r, d, r, d, r, r]
  np.testing.assert_allclose(done["losses"], straight_run["losses"], rtol=1e-6)
  records = [r for r in metrics.read_metrics(done["out"]) if "loss" in r]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 for r in records)
  # The last step, read at once after the one before, is timed as a whole step (it was near
  # 0 while the loop blocked on the CPU backend: the learning rate test below).
  assert records[-1]["step_s"] > 0.3 * np.median([r["step_s"] for r in records[1:]])


def test_an_error_read_after_the_next_step_started_names_its_step(tmp_path, monkeypatch):
  # An error of a step's outputs is raised where its metrics are read, which is after the
  # next step has started (and consumed the step's donated state): the message names the
  # step that failed, and the newest checkpoint, since nothing whole is left to save.
  real_get, reads = jax.device_get, []

  def get(x):
    if isinstance(x, dict) and "skipped" in x:
      reads.append(1)
      if len(reads) == 3:  # step 3's, read after step 4 was dispatched
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory (injected)")
    return real_get(x)

  monkeypatch.setattr(jax, "device_get", get)
  with pytest.raises(trainer.OutOfMemory, match=r"in step 3 .*; the newest checkpoint is .*/2\."):
    train.train(small_config(tmp_path, "late", steps=6, save_every=2), log=quiet)


def test_wait_s_tells_a_host_bound_run(tmp_path, monkeypatch):
  # A slow input (1 s a batch, far longer than the step, even on a loaded machine): with
  # steps overlapping the device finishes each step before the host asks, so the loop
  # hardly waits (wait_s) while step_s is the host's pace. step_s divides the run's wall
  # time between the steps, each second once (a step's time from its dispatch would count
  # the overlap twice); where the host sets the pace, a batch read for the next step is in
  # the step before's time.
  real = trainer.device_batch

  def slow(run, batch, grad_accum, local=False):
    if local:
      time.sleep(1.0)
    return real(run, batch, grad_accum, local=local)

  monkeypatch.setattr(trainer, "device_batch", slow)
  done = train.train(small_config(tmp_path, "slow", steps=6), log=quiet)
  records = [r for r in metrics.read_metrics(done["out"]) if "loss" in r]
  for r in records[1:4]:  # steps 2..4, each read after the next step's batch
    assert r["step_s"] > 0.9 and r["wait_s"] < 0.1 * r["step_s"], records
  wall = records[-1]["time"] - records[0]["time"]  # from step 1's end to step 6's
  assert sum(r["step_s"] for r in records[1:]) == pytest.approx(wall, abs=0.05)


def test_a_job_of_several_processes_agrees_on_signals_a_step_late(
  tmp_path, straight_run, monkeypatch, capfd
):
  # A job of several processes runs its steps back to back too: its agreement on stop
  # signals (a collective, distributed.LateAgreement) is dispatched behind each step and
  # read a step later, once the step before has ended, never waiting for the one in
  # flight. Every process exchanges once a step, whatever it received, and a signal stops
  # them all after the step after the one it came in (here: the one of step 3, after 4).
  # The real collective, over the one process here; two processes: test_multihost.py.
  events = []
  real_step, real_get = trainer.cached_train_step, jax.device_get

  class Recording(distributed.LateAgreement):
    def exchange(self, received):
      events.append("agree")
      return super().exchange(received)

  def dispatching(run, hooks, log, **kw):
    step_fn = real_step(run, hooks, log, **kw)

    def step(*args):
      if events.count("dispatch") == 2:  # during step 3, as the host dispatches it
        os.kill(os.getpid(), signal.SIGTERM)
      events.append("dispatch")
      return step_fn(*args)

    return step

  def get(x):
    if isinstance(x, dict) and "skipped" in x:
      events.append("read")
    return real_get(x)

  monkeypatch.setattr(distributed, "late_agreement", Recording)
  monkeypatch.setattr(trainer, "cached_train_step", dispatching)
  monkeypatch.setattr(jax, "device_get", get)
  with pytest.raises(trainer.TrainingInterrupted, match="SIGTERM at step 4; checkpoint saved"):
    train.train(small_config(tmp_path, "late", steps=6), log=quiet)
  monkeypatch.undo()
  d, a, r = "dispatch", "agree", "read"
  assert events == [d, a, r, d, a, d, r, a, r, d, a, r]
  out = str(tmp_path / "late")
  assert checkpoint.latest_step(out) == 4
  assert "SIGTERM: stopping after the next step (with the job's other processes)" in (
    capfd.readouterr().err
  )
  losses = [r["loss"] for r in metrics.read_metrics(out) if "loss" in r]
  np.testing.assert_allclose(losses, straight_run["losses"][:4], rtol=1e-6)


@pytest.mark.parametrize("processes", ["one", "several"])
def test_the_time_limit_counts_the_steps_already_under_way(tmp_path, monkeypatch, processes):
  # --time-limit with overlapping steps: when the loop decides, one step is in flight (and
  # in a job of several processes, whose agreement is read a step late, the next one will
  # be), so the margin counts them. A virtual clock makes it exact: the host takes no time,
  # the device runs each step in 1 s after the one before, and a save takes 0.5 s. With a
  # 4 s limit, step 3 and its save end at 3.5 s; step 4's would end at 4.5 s. A margin of
  # one step fewer runs step 4 past the limit.
  clock = [0.0]  # seconds since the limit started
  ends = []  # when each dispatched step ends on the device, oldest first
  real_step, real_get, real_save = trainer.cached_train_step, jax.device_get, checkpoint.save

  def dispatching(run, hooks, log, **kw):
    step_fn = real_step(run, hooks, log, **kw)

    def step(*args):
      ends.append(max([clock[0], *ends[-1:]]) + 1.0)
      return step_fn(*args)

    return step

  def get(x):
    if isinstance(x, dict) and "skipped" in x:  # reading a step's metrics waits for it
      clock[0] = max(clock[0], ends.pop(0))
    return real_get(x)

  def save(*args, **kw):
    clock[0] += 0.5
    return real_save(*args, **kw)

  virtual = types.SimpleNamespace(
    perf_counter=lambda: clock[0], monotonic=time.monotonic, strftime=time.strftime
  )
  monkeypatch.setattr(trainer, "time", virtual)
  monkeypatch.setattr(trainer, "cached_train_step", dispatching)
  monkeypatch.setattr(jax, "device_get", get)
  monkeypatch.setattr(checkpoint, "save", save)
  if processes == "several":
    monkeypatch.setattr(distributed, "late_agreement", distributed.LateAgreement)
  cfg = small_config(tmp_path, "timed", steps=6, save_every=100, eval_every=100, time_limit="4s")
  done = trainer.train(cfg, log=quiet, started=0.0)
  assert done["step"] == 3 and clock[0] == 3.5
  assert checkpoint.latest_step(cfg.out) == 3


def test_the_learning_rate_is_read_without_waiting_for_the_step_in_flight():
  # The loop reads each step's learning rate while the step before runs. On the CPU
  # backend one device runs programs in order, so a compiled call per step waited for the
  # step in flight: the loop blocked there, its steps could not overlap, and a step read at
  # once (an evaluation's, the last) was timed at almost nothing (the main job's last line
  # said 1,353,982 tokens/s). A table of steps, filled once per chunk, waits for nothing.
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100)
  at = trainer._on_host(schedule, chunk=64)
  assert at(0) == 0.0  # fills steps 0..63
  x = jnp.full((1500, 1500), 1e-3, jnp.float32)
  slow = jax.jit(lambda a: functools.reduce(lambda b, _: jnp.tanh(b @ a), range(6), a))(x)
  got = [at(s) for s in range(1, 64)]
  assert not slow.is_ready()  # the reads above did not wait for it
  slow.block_until_ready()
  got += [at(s) for s in range(64, 130)]  # the next chunks
  want = [float(jax.jit(schedule)(s)) for s in range(1, 130)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
