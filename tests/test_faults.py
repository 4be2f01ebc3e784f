"""Runs that cannot lose work (issue #12): locking, divergence, signals, exit codes, paths.

Cost on 2 CPU cores: one shared tiny run (module fixture) and in-process CLI calls; real
processes only where the guarantee is about processes (the lock, Ctrl-C at start-up).
The SIGTERM-at-a-save-step test is ``test_train.py::test_sigterm_at_a_save_step...``.
"""

import contextlib
import dataclasses
import errno
import fcntl
import gc
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from small_run import SMALL

from galore_jax import checkpoint, cli, data, metrics, train

# small_run.SMALL as CLI flags: the train step of test_train.py's runs, whose compiled
# program the session's caches keep.
SMALL_ARGS = [
  "--model", SMALL["model"], "--batch-size", "8", "--seq-len", "32", "--rank", "16",
  "--update-proj-gap", "2", "--eval-every", "1000", "--eval-batches", "2", "--no-progress",
]  # fmt: skip


def _quiet(*_):
  pass


def _cli(capsys, *args) -> tuple[int, str, str]:
  code = cli.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return code, out, err.strip()


def _one_line_error(err: str, flag: str) -> None:
  assert err.startswith(f"galore-jax: error: {flag}:"), err
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err


# --------------------------------------------------------------------------------------
# One run for several tests: a .txt file with one sentence per line and no blank line
# (item 8), passed as relative --data / --tokenizer paths (item 6), stopped after step 3,
# its checkpoint 3 lost as in a crash, and resumed to step 4 (item 7).


def _sentences(n: int) -> str:
  words = "the a of and to in is was it that he she her his had with for not be".split()
  return "".join(
    " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8 + i % 5)).capitalize() + ".\n"
    for i in range(n)
  )


@pytest.fixture(scope="module")
def lines_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("lines")
  (root / "corpus").mkdir()
  (root / "corpus" / "lines.txt").write_text(_sentences(4000))
  shutil.copy(data.BUILTIN_TOKENIZER, root / "tok.model")
  # Steps 1..4 of 6 (test_train.py's schedule), evaluated at step 4.
  cfg = train.TrainConfig(
    out="run",
    data="corpus/lines.txt",
    tokenizer="tok.model",
    steps=6,
    **(SMALL | {"eval_every": 4}),
  )
  with contextlib.chdir(root):
    train.train(dataclasses.replace(cfg, save_every=2, stop_after=3), log=_quiet)
    shutil.rmtree("run/checkpoints/3")  # as a crash would: the metrics reach step 3
    summary = train.train(dataclasses.replace(cfg, resume=True, stop_after=2), log=_quiet)
  return root, summary


def test_txt_without_blank_lines_is_cut_into_documents(lines_run):
  root, _ = lines_run
  docs = data.path_documents(str(root / "corpus" / "lines.txt"), "train")
  assert len(docs) > 50 and all(len(d) >= data.DOC_MIN_CHARS for d in docs)


def test_resume_drops_replayed_metrics(lines_run):
  root, summary = lines_run
  assert summary["start_step"] == 2 and summary["step"] == 4
  steps = [r["step"] for r in metrics.read_metrics(str(root / "run")) if "loss" in r]
  assert steps == [1, 2, 3, 4]


def _tensorboard_view(tb_dir: Path, tag: str) -> list[int]:
  """Steps of ``tag`` as TensorBoard shows them: event files in order, and a SessionLog
  START at step s (a writer's ``purge_step``) hides every earlier event at step >= s."""
  from tensorboardX.proto import event_pb2

  steps: list[int] = []
  for path in sorted(tb_dir.glob("events*")):
    raw, pos = path.read_bytes(), 0
    while pos < len(raw):  # TFRecord framing: length, its crc, the record, its crc
      n = int.from_bytes(raw[pos : pos + 8], "little")
      event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + n])
      pos += 12 + n + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        steps = [s for s in steps if s < event.step]
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


def test_resume_hides_replayed_tensorboard_steps(lines_run):
  """The crashed session logged step 3, the resumed one replays it: TensorBoard shows it once."""
  root, _ = lines_run
  assert _tensorboard_view(root / "run" / "tb", "loss") == [1, 2, 3, 4]


def test_tensorboard_is_not_fsynced_at_every_step(tmp_path, monkeypatch):
  """tensorboardX's flush fsyncs: once per record it was a synchronous disk flush between
  two train steps. Events are flushed every TENSORBOARD_FLUSH_S seconds and at close, and
  every step is in the file after it."""
  real, synced = os.fsync, []
  monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
  writer = metrics.MetricsWriter(str(tmp_path))
  before = len(synced)  # the new event file's header
  for step in range(1, 51):
    writer.write({"step": step, "loss": 1.0 / step})
  assert len(synced) == before
  writer.close()
  assert len(synced) == before + 1
  assert _tensorboard_view(tmp_path / "tb", "loss") == list(range(1, 51))
  monkeypatch.setattr(metrics, "TENSORBOARD_FLUSH_S", 0.0)  # then every record is flushed
  writer = metrics.MetricsWriter(str(tmp_path / "each"))
  before = len(synced)
  writer.write({"step": 1, "loss": 1.0})
  assert len(synced) == before + 1
  writer.close()


def test_tensorboard_is_written_without_importing_torch(tmp_path):
  """tensorboardX's package imports torch where it is installed (3.3 s of a run's start);
  the writer imports it with torch hidden, writes the same events, and torch imports as usual
  afterwards. A fresh process: this one has torch loaded by other tests."""
  pytest.importorskip("torch")
  code = (
    "import sys\n"
    "from galore_jax import metrics\n"
    f"w = metrics.MetricsWriter({str(tmp_path)!r})\n"
    "w.write({'step': 1, 'loss': 2.0}); w.close()\n"
    "print('torch' in sys.modules)\n"
    "import torch, tensorboardX\n"
    "print(torch.ones(2).sum().item())\n"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["False", "2.0"]
  assert _tensorboard_view(tmp_path / "tb", "loss") == [1]
  # torch already loaded (as here): the writer works the same.
  writer = metrics.MetricsWriter(str(tmp_path / "again"))
  writer.write({"step": 1, "loss": 2.0})
  writer.close()
  assert _tensorboard_view(tmp_path / "again" / "tb", "loss") == [1]


def test_paths_are_stored_absolute_and_eval_works_elsewhere(
  lines_run, tmp_path, capsys, monkeypatch
):
  root, _ = lines_run
  _, meta = checkpoint.read_meta(str(root / "run"))
  assert meta["train_config"]["data"] == str(root / "corpus" / "lines.txt")
  assert meta["train_config"]["tokenizer"] == str(root / "tok.model")
  monkeypatch.chdir(tmp_path)
  code, out, err = _cli(capsys, "eval", "--checkpoint", root / "run", "--json")
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  # The run's own --eval-batches (2) by default: the figure train reported.
  assert result["step"] == 4 and result["batches"] == 2
  code, out, err = _cli(
    capsys, "eval", "--checkpoint", root / "run", "--eval-batches", "all", "--batch-size", "2"
  )
  assert code == 0, err
  assert "batches of 2 x 32" in out and "(2 batches" not in out, out


def test_eval_of_another_file_reads_all_of_it(lines_run, tmp_path, capsys, monkeypatch):
  # `eval --data held_out.txt`: the user's own held-out set, which the run never saw, is
  # evaluated whole (it used to be its 1 in 100 documents held out by hash, silently:
  # 2 of 500 records). The run's own data, named by another path, stays its validation
  # split: the other documents were trained on.
  root, _ = lines_run
  run = root / "run"
  (tmp_path / "held_out.txt").write_text(_sentences(4000)[::-1])
  n_docs = len(data.path_documents(str(tmp_path / "held_out.txt"), "train")) + len(
    data.path_documents(str(tmp_path / "held_out.txt"), "validation")
  )
  flags = ["--batch-size", "2", "--no-packing", "--json"]
  code, out, err = _cli(
    capsys, "eval", "--checkpoint", run, "--data", tmp_path / "held_out.txt", *flags
  )
  assert code == 0, err
  got = json.loads(out)
  assert got["split"] == "all" and got["batches"] == math.ceil(n_docs / 2)  # every document
  code, out, err = _cli(
    capsys, "eval", "--checkpoint", run, "--data", tmp_path / "held_out.txt", "--split",
    "validation", *flags,
  )  # fmt: skip
  assert code == 0, err
  assert json.loads(out)["split"] == "validation" and json.loads(out)["batches"] < got["batches"]
  monkeypatch.chdir(root)
  code, out, err = _cli(capsys, "eval", "--checkpoint", run, "--data", "./corpus/../corpus", *flags)
  assert code == 0, err
  assert json.loads(out)["split"] == "validation"  # the training data: held-out documents only
  code, out, err = _cli(
    capsys, "eval", "--checkpoint", run, "--data", "tfds:c4/en", "--split", "all"
  )
  assert code == 2 and "a TFDS source has its own held-out split" in err, err


def test_eval_data_is_a_held_out_set_evaluated_during_training_and_by_eval(
  lines_run, tmp_path, capsys
):
  # train --eval-data FILE evaluates on FILE (the first --eval-batches batches of all of
  # it), not on the documents held out of --data; eval of the run then defaults to FILE.
  root, _ = lines_run
  held = tmp_path / "held_out.txt"
  held.write_text(_sentences(3000)[::-1])
  cfg = train.TrainConfig(
    out=str(tmp_path / "run"),
    data=str(root / "corpus" / "lines.txt"),
    tokenizer=str(root / "tok.model"),
    eval_data=str(held),
    steps=6,
    stop_after=2,
    **(SMALL | {"eval_every": 2}),
  )
  train.train(cfg, log=_quiet)
  (record,) = [r for r in metrics.read_metrics(cfg.out) if "eval_loss" in r]
  flags = ["--eval-batches", "2", "--json"]
  code, out, err = _cli(capsys, "eval", "--checkpoint", cfg.out, *flags)
  assert code == 0, err
  ours = json.loads(out)
  assert ours["split"] == "all" and ours["batches"] == record["eval_batches"] == 2
  assert abs(ours["eval_loss"] - record["eval_loss"]) < 1e-5
  code, out, err = _cli(capsys, "eval", "--checkpoint", cfg.out, "--data", cfg.data, *flags)
  assert code == 0 and json.loads(out)["split"] == "validation", err
  assert abs(json.loads(out)["eval_loss"] - record["eval_loss"]) > 1e-3  # another set
  # A resume (a library call) that left out --eval-data says that the evaluation set changes.
  logged = []
  train.train(
    dataclasses.replace(cfg, eval_data=None, resume=True, stop_after=1), log=logged.append
  )
  assert (
    "galore-jax: note: evaluating on the documents held out of --data, where the run before "
    f"step 2 evaluated on --eval-data {held}: its eval losses are not comparable across it"
  ) in logged
  missing = dataclasses.replace(cfg, out=str(tmp_path / "run2"), eval_data=str(tmp_path / "no"))
  with pytest.raises(train.ConfigError, match=f"^--eval-data: '{tmp_path / 'no'}'"):
    train.train(missing, log=_quiet)
  assert not (tmp_path / "run2").exists()


def test_eval_records_name_their_batch_count(lines_run):
  root, summary = lines_run
  evals = [r for r in metrics.read_metrics(str(root / "run")) if "eval_loss" in r]
  assert evals and all(r["eval_batches"] == 2 for r in evals)
  assert summary["eval_batches"] == 2


def _no_weights_read(monkeypatch):
  """A bad flag must fail before the weights are read: for a 7B model that takes minutes."""

  def restore(*_, **__):
    raise AssertionError("the weights were read before the flags were checked")

  monkeypatch.setattr(checkpoint, "restore", restore)


def test_sample_flags_are_named(lines_run, capsys, monkeypatch, tmp_path):
  run = lines_run[0] / "run"
  files = {
    "bad_json": '{"prompt": "It is"}\n{"prompt": "It\n',
    "no_prompt": '{"text": "It is"}\n',
    "blank": "\n\n",
    "too_long": '{"prompt": "It is"}\n' + json.dumps({"prompt": "It is " * 1000}) + "\n",
    "talk": json.dumps({"messages": [{"role": "user", "content": "It is"}]}) + "\n",
  }
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  prompts = lambda name: ["--prompts", tmp_path / name]
  with monkeypatch.context() as m:
    _no_weights_read(m)
    for args, flag, says in [
      (prompts("missing"), "--prompts", "No such file"),
      (prompts("bad_json"), "--prompts", "line 2: not JSON"),
      (prompts("no_prompt"), "--prompts", 'line 1: expected {"prompt": "..."}'),
      (prompts("blank"), "--prompts", "holds no prompt"),
      (prompts("too_long"), "--prompts", "line 2: prompt has"),
      (prompts("too_long") + ["--batch-size", "0"], "--batch-size", ">= 1"),
      (prompts("talk"), "--prompts", 'talk line 1: a list of "messages" is a chat'),
      # The corpus tokenizer has no chat template: the tokenizer's fault, not the record's.
      (prompts("talk") + ["--format", "chat"], "--format", "no chat template"),
    ]:
      code, _, err = _cli(capsys, "sample", "--checkpoint", run, *args)
      assert code == 2 and says in err, err
      _one_line_error(err, flag)
    for args, flag in [
      (["--max-new-tokens", "0"], "--max-new-tokens"),
      (["--top-k", "0"], "--top-k"),
      (["--top-k", "100000"], "--top-k"),
      (["--temperature", "nan"], "--temperature"),
      (["--temperature", "-1"], "--temperature"),
      (["--top-p", "0"], "--top-p"),
      (["--top-p", "nan"], "--top-p"),
      (["--format", "chat"], "--format"),  # the corpus tokenizer has no chat template
      (["--prompt", "It is " * 1000], "--prompt"),  # longer than max_seq_len (1024)
    ]:
      code, _, err = _cli(capsys, "sample", "--checkpoint", run, "--prompt", "It is", *args)
      assert code == 2
      _one_line_error(err, flag)
  code, out, err = _cli(
    capsys, "sample", "--checkpoint", run, "--prompt", "", "--max-new-tokens", "3"
  )
  assert code == 0, err  # an empty prompt starts a new document


def test_a_prompts_file_is_split_at_newlines_only(tmp_path):
  # json.dumps(..., ensure_ascii=False) leaves U+2028 and U+0085 unescaped in a string;
  # str.splitlines would cut such a record in two ("not JSON"). CR LF ends a line too, and
  # line numbers are an editor's.
  f = tmp_path / "prompts.jsonl"
  records = [{"prompt": "a\u2028b"}, {"prompt": "c\u0085d"}]
  text = "\r\n\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n"
  f.write_bytes(text.encode())
  got = cli._read_prompts(str(f))
  assert [(p.prompt, p.line) for p in got] == [("a\u2028b", 1), ("c\u0085d", 3)]


def test_a_reply_the_context_cut_short_is_noted(lines_run, capsys, tmp_path):
  # llama_tiny's context is 1024 tokens: a 1000-token prompt leaves room for 24 of the 40
  # tokens asked for. The reply is not made to look like one that ended by itself.
  root, _ = lines_run
  run, long = root / "run", " ".join(["word"] * 1000)
  args = ["--max-new-tokens", "40", "--temperature", "0", "--tokenizer", root / "tok.model"]
  code, out, err = _cli(capsys, "sample", "--checkpoint", run, "--prompt", long, *args)
  assert code == 0 and out.startswith(long), err
  assert err.startswith("galore-jax: note: the reply stopped after ") and len(err.splitlines()) == 1
  assert "at the model's context of 1024 tokens" in err and "--max-new-tokens 40" in err
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": "The"}) + "\n" + json.dumps({"prompt": long}) + "\n")
  code, out, err = _cli(capsys, "sample", "--checkpoint", run, "--prompts", prompts, *args)
  assert code == 0 and len(out.splitlines()) == 2, err
  first, second = map(json.loads, out.splitlines())
  assert second["finish_reason"] == "context" and first["finish_reason"] in ("length", "stop")
  assert err == (
    f"galore-jax: note: 1 reply (line 2 of {prompts}) stopped at the model's context of 1024 "
    "tokens (prompt and reply), before --max-new-tokens 40"
  )


def test_sample_out_resumes_where_a_killed_run_stopped(lines_run, capsys, monkeypatch, tmp_path):
  """sample --prompts --out: a run stopped after two batches, its last line cut short, and
  run again, writes the file one uninterrupted run writes. A file of other prompts, other
  flags or another step, or one another process writes, is an error before any weight is
  read, and the file is left as it was."""
  from galore_jax import sample

  run = lines_run[0] / "run"
  prompts = tmp_path / "p.jsonl"
  texts = ["It is", "The king", "", "She had", "And so", "Of the", "He was"]
  # Other fields come back with the reply; a record's own "completion" (a reference
  # answer) is replaced, and the reply's comes last (the line a kill cuts below is this one).
  records = [{"id": i, "prompt": t} for i, t in enumerate(texts)]
  records[4]["completion"] = "a reference"
  prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
  flags = ["--prompts", prompts, "--batch-size", "2", "--max-new-tokens", "4", "--seed", "5"]
  sample_to = lambda out, *more: _cli(
    capsys, "sample", "--checkpoint", run, *flags, "--out", out, *more
  )
  whole = tmp_path / "whole.jsonl"
  assert sample_to(whole)[0] == 0
  want = whole.read_text()
  got = [json.loads(line) for line in want.splitlines()]
  assert [(r["id"], r["prompt"]) for r in got] == list(enumerate(texts))
  assert list(got[4]) == ["id", "prompt", "completion", "finish_reason"]
  assert got[4]["completion"] != "a reference"

  part = tmp_path / "part.jsonl"
  batches, generate_batch = [], sample.generate_batch

  def killed_after_two(*a, **k):
    if len(batches) == 2:
      raise KeyboardInterrupt
    batches.append(k["first_index"])
    return generate_batch(*a, **k)

  with monkeypatch.context() as m:
    m.setattr(sample, "generate_batch", killed_after_two)
    assert sample_to(part)[0] == 130
  assert part.read_text() == "".join(want.splitlines(keepends=True)[:4])
  with part.open("a") as f:  # a kill mid-write: the next line cut short
    f.write(want.splitlines()[4][:25])
  cut = part.read_text()
  with monkeypatch.context() as m:
    _no_weights_read(m)
    for more, says in [
      (["--seed", "6"], "seed 5 (now 6)"),
      (["--max-new-tokens", "5"], "max_new_tokens 4 (now 5)"),
      (
        ["--checkpoint", run / "checkpoints" / "2"],
        "holds replies of step 4, the checkpoint is at step 2",
      ),
    ]:
      code, _, err = sample_to(part, *more)
      assert code == 2 and says in err, err
      _one_line_error(err, "--out")
    with part.open() as held:  # another process writing it
      fcntl.flock(held, fcntl.LOCK_EX)
      code, _, err = sample_to(part)
      assert code == 2 and "is being written by another galore-jax sample" in err
    prompts.write_text(prompts.read_text().replace("The king", "The queen"))
    code, _, err = sample_to(part)
    assert code == 2 and f"line 2 is not the reply to {prompts} line 2" in err, err
    prompts.write_text(prompts.read_text().replace("The queen", "The king"))
  assert part.read_text() == cut
  code, out, err = sample_to(part)
  assert code == 0, err
  assert part.read_text() == want and "7 replies" in out and "3 new" in out
  with monkeypatch.context() as m:  # nothing left to do: no weights read
    _no_weights_read(m)
    code, out, _ = sample_to(part)
    assert code == 0 and "has a reply to each of the 7 prompts" in out
  code, _, err = _cli(capsys, "sample", "--checkpoint", run, "--prompt", "It", "--out", part)
  assert code == 2
  _one_line_error(err, "--out")


def test_reply_file_settings_bind_only_a_file_with_replies(tmp_path):
  """A settings record next to an empty REPLIES (a run killed while loading its model) does
  not bind the next run's flags; once the file holds replies, it does."""
  from galore_jax import replies
  from galore_jax.config import ConfigError

  out, records = tmp_path / "r.jsonl", [({"prompt": "It is"}, 1), ({"prompt": "He"}, 2)]
  (tmp_path / "r.jsonl.settings.json").write_text(json.dumps({"seed": 1, "step": 4}))
  out.write_text("")
  reply_file = replies.ReplyFile(str(out), records, {"seed": 2}, "p.jsonl")
  assert reply_file.kept == 0
  reply_file.start(step=6)  # records this run's settings
  reply_file.write([{"prompt": "It is", "completion": " a"}])
  reply_file.close()
  assert json.loads((tmp_path / "r.jsonl.settings.json").read_text()) == {"seed": 2, "step": 6}
  with pytest.raises(ConfigError, match=r"seed 2 \(now 3\)"):
    replies.ReplyFile(str(out), records, {"seed": 3}, "p.jsonl")
  reply_file = replies.ReplyFile(str(out), records, {"seed": 2}, "p.jsonl")
  assert reply_file.kept == 1
  with pytest.raises(ConfigError, match="holds replies of step 6, the checkpoint is at step 7"):
    reply_file.check_step(7)
  # The line above has "completion" alone (as before "finish_reason"); both kinds are kept.
  reply_file.start(step=6)
  reply_file.write([{"prompt": "He", "completion": " b", "finish_reason": "length"}])
  reply_file.close()
  assert replies.ReplyFile(str(out), records, {"seed": 2}, "p.jsonl").kept == 2


# The failed write's echoes (orbax's other futures failing on a closed loop) must not
# reach the user (checkpoint._hide_failed_io_echoes), even after train() has returned.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_checkpoint_that_cannot_be_written_does_not_end_the_run(tmp_path, monkeypatch, capsys):
  """A save that fails (a full disk; here the file size limit, RLIMIT_FSIZE, makes the
  array writes fail inside orbax as ENOSPC would) is one warning line, and training goes on:
  the state is in memory, the next save step writes it, and rotation (--keep-checkpoints)
  still prunes the older checkpoints. A failed last save is a one-line error, exit 1,
  naming the newest checkpoint. No partial directory is left either way."""
  save, failing = checkpoint.save, set()

  def save_or_fail(mngr, step, params, opt_state, meta):
    if step not in failing:
      return save(mngr, step, params, opt_state, meta)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limit[1]))  # below the arrays
    try:
      save(mngr, step, params, opt_state, meta)
    finally:
      resource.setrlimit(resource.RLIMIT_FSIZE, limit)
      signal.signal(signal.SIGXFSZ, xfsz)

  monkeypatch.setattr(checkpoint, "save", save_or_fail)
  # --steps 6, as lines_run: the compiled step is shared (tests/small_run.py).
  common = dict(SMALL, out=str(tmp_path / "run"), save_every=2, keep_checkpoints=1, steps=6)
  failing.add(4)
  logged = []
  summary = train.train(train.TrainConfig(**common), log=logged.append)
  assert summary["step"] == 6
  warned = [line for line in logged if "warning" in line]
  assert len(warned) == 1, logged
  assert warned[0].startswith("galore-jax: warning: checkpoint 4 could not be written in ")
  assert "(File too large)" in warned[0]
  assert "training goes on, and step 6 saves again" in warned[0]
  assert warned[0].endswith(f"the newest checkpoint is {tmp_path / 'run'}/checkpoints/2")
  # Step 6 saved and pruned 2 (the manager was renewed: the failed one had lost count of
  # the checkpoints); the failed step left no partial directory.
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["6"]
  assert "Traceback" not in capsys.readouterr().err

  failing.add(6)  # a run's last save cannot wait
  args = ["train", "--out", tmp_path / "run2", "--steps", "6", "--save-every", "2"]
  args += ["--keep-checkpoints", "1", "--batch-size", "8", "--seq-len", "32", "--rank", "16"]
  args += ["--update-proj-gap", "2", "--eval-every", "1000", "--eval-batches", "2", "--no-progress"]
  code, _, err = _cli(capsys, *args, "--model", SMALL["model"])
  assert code == 1
  assert err.startswith("galore-jax: error: checkpoint 6 could not be written in ")
  assert err.endswith("the newest checkpoint is " + str(tmp_path / "run2") + "/checkpoints/2")
  assert len(err.splitlines()) == 1 and "Traceback" not in err
  assert sorted(os.listdir(tmp_path / "run2" / "checkpoints")) == ["2"]
  # The failed saves' unrun write coroutines go now, not as a warning in a later test.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    gc.collect()


def test_a_full_disk_keeps_metrics_in_memory_until_there_is_room(tmp_path, monkeypatch):
  """metrics.jsonl: records that cannot be written (ENOSPC; also a short write) are kept in
  order and written once there is room, with one warning when writes stop and one when
  they resume; TensorBoard stops at its first failed write, with one warning. Output to a
  full disk (`train > log.txt`) is dropped instead of ending the command."""
  real_write, state = os.write, {"full": False, "short": False}

  def write(fd, data):
    if fd == writer._fd and state["full"]:
      raise OSError(errno.ENOSPC, "No space left on device")
    if fd == writer._fd and state["short"]:
      state["short"] = False
      return real_write(fd, bytes(data[:7]))
    return real_write(fd, data)

  warned = []
  writer = metrics.MetricsWriter(str(tmp_path), warn=warned.append)
  monkeypatch.setattr(metrics.os, "write", write)
  writer.write({"step": 1, "loss": 1.0})
  state["short"] = True
  writer.write({"step": 2, "loss": 2.0})
  state["full"] = True
  writer.write({"step": 3, "loss": 3.0})
  writer.write({"step": 4, "loss": 4.0})
  assert len(warned) == 1 and "cannot be written (No space left on device)" in warned[0]
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2]

  def tb_full(*_):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(writer._tb, "scalars", tb_full)
  monkeypatch.setattr(writer._tb, "close", tb_full)  # it flushes, and fails, again
  state["full"] = False
  writer.write({"step": 5, "loss": 5.0})
  assert "is written again" in warned[1]
  assert warned[2].startswith("TensorBoard events stop at step 5 (No space left on device)")
  writer.write({"step": 6, "loss": 6.0})  # TensorBoard is not tried again
  assert len(warned) == 3
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
  state["full"] = True
  writer.write({"step": 7, "loss": 7.0})
  writer.close()
  assert warned[-1].endswith(f"bytes of records could not be written to {writer.path}")

  class Full:
    def write(self, text):
      raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
      raise OSError(errno.EDQUOT, "Disk quota exceeded")

  guard = cli._StreamGuard(Full())
  assert guard.write("step 5\n") == 7
  guard.flush()

  class Broken(Full):
    def flush(self):
      raise OSError(errno.EIO, "Input/output error")

  with pytest.raises(OSError, match="Input/output error"):  # other errors are not hidden
    cli._StreamGuard(Broken()).flush()


def test_export_is_all_or_nothing(lines_run, capsys, monkeypatch, tmp_path):
  """--out is a whole model or nothing: written beside it and renamed into place. A failed,
  interrupted or terminated export leaves neither --out nor its partial directory; another
  export that fills --out meanwhile is not mixed into, and this one's work is kept."""
  from galore_jax import hf

  run = lines_run[0] / "run"
  out = tmp_path / "models" / "m"
  leftovers = lambda: sorted(p.name for p in (tmp_path / "models").iterdir())
  save = hf.save_pretrained

  def failing(error):
    def write(path, *a, **k):
      (Path(path) / "model.safetensors").write_bytes(b"half a model")
      raise error

    return write

  with monkeypatch.context() as m:
    import safetensors
    import safetensors.numpy

    def disk_full(tensors, filename, metadata=None):  # as safetensors reports ENOSPC
      Path(filename).write_bytes(b"half a model")
      raise safetensors.SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
      )

    m.setattr(safetensors.numpy, "save_file", disk_full)
    code, _, err = _cli(capsys, "export", "--checkpoint", run, "--out", out)
    assert code == 2 and "No space left on device" in err
    assert f"--out: {out}/model.safetensors: " in err  # not the partial directory's name
    _one_line_error(err, "--out")
    assert leftovers() == []
  with monkeypatch.context() as m:
    m.setattr(hf, "save_pretrained", failing(KeyboardInterrupt()))
    assert _cli(capsys, "export", "--checkpoint", run, "--out", out)[0] == 130
    assert leftovers() == []

    def terminated(path, *a, **k):
      (Path(path) / "model.safetensors").write_bytes(b"half a model")
      os.kill(os.getpid(), signal.SIGTERM)

    m.setattr(hf, "save_pretrained", terminated)
    with pytest.raises(SystemExit) as stop:
      cli.main(["export", "--checkpoint", str(run), "--out", str(out)])
    assert stop.value.code == 143 and leftovers() == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back

    def raced(path, *a, **k):  # a second export fills --out first
      files = save(path, *a, **k)
      out.mkdir()
      (out / "config.json").write_text("{}")
      return files

    m.setattr(hf, "save_pretrained", raced)
    code, _, err = _cli(capsys, "export", "--checkpoint", run, "--out", out)
    assert code == 2 and "appeared while exporting" in err
    _one_line_error(err, "--out")
    assert (out / "config.json").read_text() == "{}" and len(leftovers()) == 2
    kept = Path(err.rsplit(" ", 1)[1])  # "... this export is complete in DIR"
    assert kept.name.startswith("m.partial-") and (kept / "model.safetensors").is_file()
    shutil.rmtree(kept)
    shutil.rmtree(out)

  # An empty --out is filled; its mode is the umask's, not mkdtemp's 0700.
  out.mkdir()
  code, stdout, err = _cli(capsys, "export", "--checkpoint", run, "--out", out)
  assert code == 0, err
  assert (out / "model.safetensors").is_file() and leftovers() == ["m"]
  umask = os.umask(0)
  os.umask(umask)
  assert out.stat().st_mode & 0o777 == 0o777 & ~umask
  # So are its files': safetensors' own 0600 is a model no other user (a vLLM server) reads.
  assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {
    f.name: 0o666 & ~umask for f in out.iterdir()
  }
  # A file named --out fails before any weight is read.
  with monkeypatch.context() as m:
    _no_weights_read(m)
    (tmp_path / "file").write_text("x")
    code, _, err = _cli(capsys, "export", "--checkpoint", run, "--out", tmp_path / "file")
    assert code == 2 and "is not a directory" in err
    _one_line_error(err, "--out")


def test_eval_flags_are_named(lines_run, capsys, monkeypatch):
  run = lines_run[0] / "run"
  _no_weights_read(monkeypatch)
  for args, flag in [
    (["--batch-size", "-2"], "--batch-size"),
    (["--eval-batches", "0"], "--eval-batches"),
    (["--eval-batches", "some"], "--eval-batches"),
    (["--batch-size", "3", "--mesh", "fsdp=2"], "--batch-size"),  # rows split over devices
    (["--data", str(lines_run[0] / "missing.txt")], "--data"),
    (["--param-dtype", "bfloat16"], "--param-dtype"),  # a run's weights load as trained
  ]:
    code, _, err = _cli(capsys, "eval", "--checkpoint", run, *args)
    assert code == 2
    _one_line_error(err, flag)


# --------------------------------------------------------------------------------------
# Bad flags: one line, exit 2, before anything is loaded or written.


@pytest.mark.parametrize(
  "args,flag",
  [
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--galore-scale", "nan"], "--galore-scale"),
    (["--galore-scale", "-1"], "--galore-scale"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--grad-clip", "inf"], "--grad-clip"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--eval-batches", "0"], "--eval-batches"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--max-nonfinite", "0"], "--max-nonfinite"),
    (["--resume", "--overwrite"], "--overwrite"),
  ],
)
def test_bad_flags_are_refused(tmp_path, capsys, args, flag):
  code, _, err = _cli(capsys, "train", "--out", tmp_path / "r", *args)
  assert code == 2
  _one_line_error(err, flag)
  assert not (tmp_path / "r").exists()


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
  (tmp_path / "f").write_text("not a directory")
  for out in (tmp_path / "f", tmp_path / "f" / "run"):
    code, _, err = _cli(capsys, "train", "--out", out, *SMALL_ARGS)
    assert code == 2
    _one_line_error(err, "--out")


def test_metrics_without_checkpoint_are_refused_or_overwritten(tmp_path, capsys):
  out = tmp_path / "stale"
  out.mkdir()
  (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
  code, _, err = _cli(capsys, "train", "--out", out, *SMALL_ARGS)
  assert code == 2
  _one_line_error(err, "--out")
  assert "--overwrite" in err
  cfg = train.TrainConfig(out=str(out), overwrite=True)
  assert train._check_out(cfg, str(out / "checkpoints")) is None
  assert not (out / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------
# Resume compatibility: the right flag is named; remat / dtype do not block a resume.


@pytest.fixture(scope="module")
def no_eos_tokenizer(tmp_path_factory):
  import sentencepiece as spm

  prefix = tmp_path_factory.mktemp("tok") / "noeos"
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(data.builtin_documents("validation")[:200]),
    model_prefix=str(prefix),
    vocab_size=300,
    model_type="bpe",
    eos_id=-1,
    minloglevel=2,
  )
  return f"{prefix}.model"


def test_resume_compatibility_names_the_flag(tmp_path, no_eos_tokenizer):
  sp = data.load_tokenizer()
  base = train.TrainConfig(out=str(tmp_path / "c"), **SMALL)

  def meta(cfg, tok=sp):
    return train.run_meta(cfg, train.setup(cfg, tok.get_piece_size()), tok)

  saved = meta(base)
  # Compute dtype and rematerialisation change no saved array: a resume may change them.
  train.check_compatible(
    saved, meta(dataclasses.replace(base, remat="full", dtype="bfloat16")), "c"
  )
  with pytest.raises(train.ConfigError) as e:
    train.check_compatible(saved, meta(dataclasses.replace(base, param_dtype="bfloat16")), "c")
  assert e.value.flag == "--param-dtype" and len(str(e.value)) < 200
  with pytest.raises(train.ConfigError) as e:
    train.check_compatible(saved, meta(base, data.load_tokenizer(no_eos_tokenizer)), "c")
  assert e.value.flag == "--tokenizer"


def test_tokenizer_without_eos_is_blamed_on_tokenizer(tmp_path, capsys, no_eos_tokenizer):
  code, _, err = _cli(
    capsys, "train", "--out", tmp_path / "r", "--tokenizer", no_eos_tokenizer, *SMALL_ARGS
  )
  assert code == 2
  _one_line_error(err, "--tokenizer")


# --------------------------------------------------------------------------------------
# Divergence: no checkpoint inside a non-finite streak, rotation keeps the last good one,
# the error names it and it evaluates to a finite loss; a short diverged run exits 1.


def test_divergence_keeps_and_names_the_last_good_checkpoint(tmp_path, capsys):
  out = tmp_path / "div"
  code, _, err = _cli(
    capsys, "train", "--out", out, "--lr", "1e9", "--steps", "6", "--save-every", "1",
    "--keep-checkpoints", "1", *SMALL_ARGS,
  )  # fmt: skip
  # Step 1's update (lr 1e9) breaks the weights: steps 2..6 have non-finite gradients,
  # fewer than --max-nonfinite (20), so the run ends in the streak: exit 1, not 0.
  assert code == 1, err
  assert err.startswith("galore-jax: error: training diverged") and len(err.splitlines()) == 1
  assert f"{out / 'checkpoints'}/1" in err or "checkpoints/1" in err, err
  assert sorted(os.listdir(out / "checkpoints")) == ["1"]
  code, got, err = _cli(capsys, "eval", "--checkpoint", out / "checkpoints" / "1", "--json")
  assert code == 0, err
  result = json.loads(got.strip().splitlines()[-1])
  assert result["step"] == 1 and math.isfinite(result["eval_loss"])


# --------------------------------------------------------------------------------------
# Signals and the lock, with real processes.


def test_second_signal_waits_for_a_save():
  with train._Signals() as signals:
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.received == signal.SIGTERM
    with signals.saving():
      os.kill(os.getpid(), signal.SIGTERM)  # during a save: waits for it
      time.sleep(0.01)
    with pytest.raises(KeyboardInterrupt):  # outside a save: stops waiting for the step
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.01)


_HOLD_LOCK = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("rundir", sys.argv[1])
rundir = importlib.util.module_from_spec(spec); spec.loader.exec_module(rundir)
with rundir.locked(sys.argv[2]):
  print("locked", flush=True)
  time.sleep(120)
"""


def test_second_process_on_a_run_directory_is_refused(tmp_path, capsys):
  out = tmp_path / "run"
  rundir_py = os.path.join(os.path.dirname(train.__file__), "rundir.py")
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLD_LOCK, rundir_py, str(out)], stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = sorted(os.listdir(out))
    code, _, err = _cli(capsys, "train", "--out", out, *SMALL_ARGS)
    assert code == 2
    _one_line_error(err, "--out")
    assert f"process {holder.pid}" in err
    assert sorted(os.listdir(out)) == before == [".lock"]  # the second one touched nothing
  finally:
    holder.kill()  # SIGKILL: the kernel drops the lock with the process
    holder.wait()
  with train.rundir.locked(str(out)) as created:  # no stale lock
    assert not created


def test_ctrl_c_during_start_up_exits_130_and_writes_nothing(tmp_path):
  # After the data are loaded (the model line), before the first step: the first signal
  # says what it does, and the run stops at the next check.
  out = tmp_path / "new"
  cmd = [sys.executable, "-m", "galore_jax.cli", "train", "--out", str(out), *SMALL_ARGS]
  cmd += ["--model", "llama_tiny"]  # (the session's test model is not registered there)
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  try:
    for line in proc.stdout:
      if line.startswith("model "):
        break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 130, err
  lines = err.strip().splitlines()
  assert "Traceback" not in err and lines[-1].startswith("galore-jax: interrupted by SIGINT")
  assert "galore-jax: SIGINT: stopping before the first step" in err
  assert not out.exists()


def test_ctrl_c_while_the_data_load_stops_at_once(tmp_path, monkeypatch):
  # Tokenizing a large source (or waiting for the process that tokenizes it) takes minutes
  # and saves nothing: the first Ctrl-C stops it at once. Here the CLI waits for this test,
  # which holds the build lock of its source's cache entry.
  src = tmp_path / "lines.txt"
  src.write_text(_sentences(500))
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  from galore_jax.data import sources

  class Found(Exception):
    pass

  def where(path, say_waiting=False):  # the data layer's own entry for this source
    raise Found(path)

  with monkeypatch.context() as m:
    m.setattr(sources, "_building", where)
    with pytest.raises(Found) as found:
      data.make_dataset(data.DataConfig(source=str(src), seq_len=32, batch_size=8), "train")
  lock = sources.lock_path(found.value.args[0])
  lock.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(lock, os.O_RDONLY | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX)
  out = tmp_path / "run"
  cmd = [sys.executable, "-m", "galore_jax.cli", "train", "--data", str(src), "--out", str(out)]
  proc = subprocess.Popen(
    [*cmd, *SMALL_ARGS, "--model", "llama_tiny"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    for line in proc.stderr:
      if "waiting for another process" in line:
        break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)  # not when this test lets go of the lock
  finally:
    proc.kill()
    os.close(fd)
  assert proc.returncode == 130, err
  assert err.strip() == (
    "galore-jax: interrupted by SIGINT; while loading the data; nothing was written"
  )
  assert not out.exists()


def test_a_signal_raised_where_python_ignores_it_still_stops_the_data_load(
  tmp_path, monkeypatch, capfd
):
  # The handler's KeyboardInterrupt lands where Python ignores exceptions when the signal
  # arrives in a gc callback (jax has one; tokenizing runs the gc often): the next progress
  # call (between tokenizer batches) stops the load, and no traceback is printed.
  calls = []
  # (Python's own handler, or SIG_IGN in a process a shell started in the background.)
  before = signal.getsignal(signal.SIGINT)

  def make_dataset(config, split, *, shard=None, progress=None):
    def ring(phase, info):
      gc.callbacks.remove(ring)
      os.kill(os.getpid(), signal.SIGINT)  # the handler runs here: inside the callback

    gc.callbacks.append(ring)
    gc.collect()
    for i in range(100):  # the batches of a large source
      progress(i, 100)
      calls.append(i)
    raise AssertionError("the load went on after the signal")

  monkeypatch.setattr(data, "make_dataset", make_dataset)
  cfg = train.TrainConfig(out=str(tmp_path / "run"), steps=6, **SMALL)
  with pytest.raises(train.TrainingInterrupted, match="while loading the data") as stop:
    train.train(cfg, log=_quiet)
  assert stop.value.signum == signal.SIGINT and calls == []
  assert "Traceback" not in capfd.readouterr().err
  assert not (tmp_path / "run").exists()
  assert signal.getsignal(signal.SIGINT) is before  # put back


def test_eval_stops_at_a_signal_python_ignored(lines_run, monkeypatch, capfd):
  # As for train's data load: eval's handler raises where the signal lands, which may be a
  # gc callback (then only reported); the next progress call (data load, evaluation,
  # sample's next batch) raises it again, and no traceback is printed.
  calls = []

  def eval_batches(config, max_batches=None, *, progress=None, split="validation"):
    def ring(phase, info):
      gc.callbacks.remove(ring)
      os.kill(os.getpid(), signal.SIGINT)  # the handler runs here: inside the callback

    gc.callbacks.append(ring)
    gc.collect()
    for i in range(100):
      progress(i, 100)
      calls.append(i)
    raise AssertionError("the load went on after the signal")

  monkeypatch.setattr(data, "eval_batches", eval_batches)
  code = cli.main(["eval", "--checkpoint", str(lines_run[0] / "run")])
  err = capfd.readouterr().err
  assert code == 130 and calls == [], err
  assert err.strip() == "galore-jax: interrupted by SIGINT; nothing was written"
