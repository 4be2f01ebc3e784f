"""The command line (galore_jax.cli): flags and their one-line errors, the commands end
to end, resumes that take or refuse a run's flags, checkpoints that cannot be read."""

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import time

import jax
import numpy as np
import pytest
from small_run import SMALL, quiet

from galore_jax import (
  checkpoint,
  cli,
  config,
  data,
  sft,
  train,
  trainer,
)


def _cli(*args):
  return cli.main(list(args))


class _Started(Exception):
  pass


def test_the_cli_counts_the_time_limit_from_its_process_start(tmp_path, monkeypatch):
  def fake_train(cfg, *, started=None, **kw):
    raise _Started(started)

  monkeypatch.setattr(trainer, "train", fake_train)
  before = time.perf_counter()
  with pytest.raises(_Started) as e:
    cli.main(["train", "--steps", "1", "--out", str(tmp_path / "r"), "--time-limit", "1h"])
  assert e.value.args[0] == pytest.approx(trainer.process_start(), abs=0.05)
  assert e.value.args[0] < before  # not the call's own time


def test_the_loss_trend_compares_windows_that_do_not_overlap():
  assert cli.loss_trend([5.0] * 4 + [3.0] * 4) == "loss 5.000 (first 4) -> 3.000 (last 4)"
  assert cli.loss_trend([9.0, 1.0]) == "loss 9.000 (first 1) -> 1.000 (last 1)"
  assert cli.loss_trend([7.0]) == "loss 7.000 (1 step)"
  long = [8.0] * 10 + [0.0] * 30 + [2.0] * 10
  assert cli.loss_trend(long) == "loss 8.000 (first 10) -> 2.000 (last 10)"


def test_cli_end_to_end_eval_and_sample(tmp_path, capsys, monkeypatch):
  out = str(tmp_path / "cli")
  assert (
    _cli(
      "train",
      "--out",
      out,
      "--steps",
      "500",  # test_train.py's SIGTERM run: the same compiled step
      "--stop-after",
      "3",
      "--batch-size",
      "2",
      "--seq-len",
      "32",
      "--rank",
      "16",
      "--no-progress",
      "--eval-every",
      "3",
      "--eval-batches",
      "2",
      # The matmul-only refresh end to end (issue #11): refreshes at steps 1 and 3.
      "--svd",
      "subspace",
      "--update-proj-gap",
      "2",
    )
    == 0
  )
  text = capsys.readouterr().out
  assert "final validation loss" in text and "perplexity" in text
  assert checkpoint.read_meta(out)[1]["compat"]["svd"] == "subspace"
  # eval's progress: in a log file, lines on stderr (every batch but the last when
  # PROGRESS_LINE_S is 0), so that stdout is the JSON result alone; in a terminal, a bar.
  monkeypatch.setattr(trainer, "PROGRESS_LINE_S", 0.0)
  assert _cli("eval", "--checkpoint", out, "--eval-batches", "2", "--json") == 0
  captured = capsys.readouterr()
  result = json.loads(captured.out)
  assert result["step"] == 3 and result["eval_ppl"] > 1
  assert re.fullmatch(r"eval: 1/2 batches, \d+ s\n", captured.err), captured.err
  monkeypatch.setattr(trainer, "_is_terminal", lambda stream: True)
  assert _cli("eval", "--checkpoint", out, "--eval-batches", "2", "--json") == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out) == result, captured.out
  assert "eval:" in captured.err and "| 1/2 [" in captured.err, captured.err
  monkeypatch.undo()
  assert (
    _cli("sample", "--checkpoint", out, "--prompt", "It is a truth", "--max-new-tokens", "5") == 0
  )
  assert capsys.readouterr().out.startswith("It is a truth")
  # The same checkpoint loaded onto a mesh (weights sharded over fsdp): the same numbers.
  assert _cli("eval", "--checkpoint", out, "--eval-batches", "2", "--json", "--mesh", "fsdp=2") == 0
  sharded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert sharded["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-5)
  greedy = ["sample", "--checkpoint", out, "--prompt", "It is", "--temperature", "0"]
  assert _cli(*greedy, "--max-new-tokens", "6") == 0
  want = capsys.readouterr().out
  assert _cli(*greedy, "--max-new-tokens", "6", "--mesh", "data=1,fsdp=2") == 0
  assert capsys.readouterr().out == want
  # A file of prompts, two per batch (the last batch filled up with a copy): a JSON line per
  # prompt with its reply alone, the greedy reply --prompt gives.
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["It is", "", "KING."]))
  batched = [*greedy[:3], "--prompts", str(prompts), *greedy[5:], "--batch-size", "2"]
  assert _cli(*batched, "--max-new-tokens", "6") == 0
  replies = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["prompt"] for r in replies] == ["It is", "", "KING."]
  assert want == "It is" + replies[0]["completion"] + "\n"
  # Its reader gone (`| head`): the first batch's line meets a closed pipe, and sampling
  # stops there with 128 + SIGPIPE, not a traceback.
  from galore_jax import sample

  batches, generate_batch = [], sample.generate_batch
  monkeypatch.setattr(
    sample, "generate_batch", lambda *a, **k: batches.append(1) or generate_batch(*a, **k)
  )
  read_end, write_end = os.pipe()
  os.close(read_end)
  with open(write_end, "w", buffering=1) as closed, contextlib.redirect_stdout(closed):
    code = _cli(*batched, "--max-new-tokens", "6", "--batch-size", "1")
  assert code == 128 + signal.SIGPIPE and len(batches) == 1
  # A mesh this machine lacks, or one the batch does not divide: one line naming the flag.
  for args, flag in (
    (["--mesh", "data=3,fsdp=5"], "--mesh"),
    (["--mesh", "fsdp=4"], "--batch-size"),
  ):
    assert _cli("eval", "--checkpoint", out, "--batch-size", "2", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("galore-jax: error: " + flag) and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
  "args,flag",
  [
    (["--model", "llama_huge"], "--model"),
    (["--rank", "4096"], "--rank"),
    (["--data", "/nonexistent/corpus.txt"], "--data"),
    (["--seq-len", "100000"], "--seq-len"),
    (["--mesh", "data=3,fsdp=5"], "--mesh"),
    (["--tokenizer", "/nonexistent/tok.model"], "--tokenizer"),
    (["--resume", "auto", "--overwrite"], "--overwrite"),
    (["--columns", "body=content"], "--columns"),
    (["--moment-policy", "reproject", "--optimizer", "galore_adamw8bit"], "--moment-policy"),
    (["--moment-policy", "reset", "--optimizer", "adamw"], "--moment-policy"),
    (["--refresh-programs", "two", "--refresh-schedule", "staggered"], "--refresh-programs"),
    (["--columns", "text=content"], "--columns"),  # the bundled corpus has no columns
  ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, args, flag):
  assert _cli("train", "--out", str(tmp_path / "bad"), "--no-progress", *args) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("galore-jax: error: " + flag), err
  assert len(err.splitlines()) == 1
  assert err.count(flag + ":") + err.count(flag + " ") == 1, err  # named once, not "--data: --data"


def test_cli_empty_data_file(tmp_path, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  assert _cli("train", "--out", str(tmp_path / "e"), "--data", str(empty)) == 2
  assert capsys.readouterr().err.startswith("galore-jax: error: --data")


def test_cli_unknown_optimizer_exit_2(capsys):
  with pytest.raises(SystemExit) as e:
    _cli("train", "--optimizer", "sgd")
  assert e.value.code == 2
  with pytest.raises(SystemExit) as e:  # --resume takes nothing or "auto"
    _cli("train", "--resume", "always")
  assert e.value.code == 2 and "invalid choice: 'always'" in capsys.readouterr().err


def test_cli_version_is_one_line_naming_the_libraries(capsys, monkeypatch):
  import galore_jax

  monkeypatch.setenv("COLUMNS", "40")  # argparse would wrap it at the terminal's width
  with pytest.raises(SystemExit) as e:
    _cli("--version")
  out = capsys.readouterr().out
  assert e.value.code == 0 and out.count("\n") == 1
  assert out.startswith(f"galore-jax {galore_jax.__version__} (jax {jax.__version__}, jaxlib ")
  assert "flax " in out and "optax " in out and "orbax-checkpoint " in out
  from importlib import metadata

  assert metadata.version("galore-jax") == galore_jax.__version__  # pyproject.toml's


def test_every_flag_has_help_and_trains_are_in_groups():
  # Some fifty flags: `train --help` lists them by topic, each with what it does.
  sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
  train_parser = sub.choices["train"]
  groups = {g.title: g._group_actions for g in train_parser._action_groups}
  assert [a.dest for a in groups["options"]] == ["help"]
  assert "model and optimizer" in groups and "data and evaluation" in groups
  assert len(train_parser._actions) > 45
  for name, command in sub.choices.items():  # every command's flags say what they do
    bare = [a.dest for a in command._actions if a.dest != "help" and not a.help]
    assert not bare, (name, bare)


# Flags that resume `finished_run` with its own configuration (SMALL, 2 -> 6 steps).
RESUME_ARGS = [
  "--resume",
  "--steps",
  "6",
  "--batch-size",
  "8",
  "--seq-len",
  "32",
  "--rank",
  "16",
  "--update-proj-gap",
  "2",
  "--no-progress",
  "--model",
  SMALL["model"],
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A run directory of SMALL with its checkpoint at step 2 (of 6: the step of test_train.py's
  straight_run)."""
  out = tmp_path_factory.mktemp("done") / "run"
  train.train(train.TrainConfig(out=str(out), steps=6, stop_after=2, **SMALL), log=quiet)
  return out


def test_a_changed_optimizer_setting_batch_shape_or_data_is_refused_before_the_data_loads(
  finished_run, tmp_path, monkeypatch
):
  # The optimizer's settings, the batch shape and the data order come from the
  # configuration and the data's first record, so a resume that changes one is refused at
  # once, not after the data load (minutes for a large source).
  def no_load(*args, **kwargs):
    raise AssertionError("the data was loaded before the refusal")

  monkeypatch.setattr(trainer, "load_data", no_load)
  run = train.TrainConfig(out=str(finished_run), steps=6, resume=True, **SMALL)
  other = "exact" if run.svd != "exact" else "subspace"
  with pytest.raises(config.ConfigError, match="^--svd: checkpoint .* was saved with svd="):
    train.train(dataclasses.replace(run, svd=other), log=quiet)
  with pytest.raises(config.ConfigError, match="^--rank: "):
    train.train(dataclasses.replace(run, rank=run.rank * 2), log=quiet)
  with pytest.raises(
    config.ConfigError,
    match="^--batch-size: .* trained with --batch-size 8, this run has --batch-size 16: a ",
  ):
    train.train(dataclasses.replace(run, batch_size=run.batch_size * 2), log=quiet)
  with pytest.raises(config.ConfigError, match="^--seed: "):
    train.train(dataclasses.replace(run, seed=run.seed + 1), log=quiet)
  other = tmp_path / "other.txt"
  other.write_text("Another text than the bundled corpus. " * 100)
  with pytest.raises(
    config.ConfigError,
    match="^--data: .* trained with --data builtin, this run has --data /.*other.txt: a ",
  ):
    train.train(dataclasses.replace(run, data=str(other)), log=quiet)
  with pytest.raises(
    config.ConfigError,
    match="^--packing: .* trained with --packing, this run has --no-packing: a resume must",
  ):
    train.train(dataclasses.replace(run, packing=False), log=quiet)
  # The same run resumed as it was gets past the check, to the data load.
  with pytest.raises(AssertionError, match="the data was loaded"):
    train.train(run, log=quiet)


def test_existing_run_without_resume_is_refused(finished_run, capsys):
  assert _cli("train", "--out", str(finished_run), "--steps", "2") == 2
  assert "--resume" in capsys.readouterr().err


def test_resume_with_other_optimizer_is_refused(finished_run, capsys):
  assert _cli("train", "--out", str(finished_run), *RESUME_ARGS, "--optimizer", "adamw") == 2
  assert capsys.readouterr().err.startswith("galore-jax: error: --optimizer")


def test_a_resume_that_changes_the_runs_course_says_so(finished_run, tmp_path, capsys):
  import shutil

  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  # The same flags as the first run, all of them (one step, 2 -> 3): no note.
  same = [*RESUME_ARGS, "--eval-every", "1000", "--eval-batches", "2", "--save-every", "1000"]
  assert _cli("train", "--out", str(out), *same, "--stop-after", "1") == 0
  assert "note:" not in capsys.readouterr().out
  # --steps 2: the checkpoint (step 3) is past it, nothing is left to train.
  flags = [*RESUME_ARGS[:2], "2", *RESUME_ARGS[3:], "--lr", "0.02"]
  assert _cli("train", "--out", str(out), *flags) == 0
  assert (
    "galore-jax: note: resuming at step 3 with changed --steps 2 (was 6), --lr 0.02 (was 0.01)"
    in capsys.readouterr().out
  )


def test_a_resume_takes_the_flags_it_is_not_given_from_the_run(finished_run, tmp_path, capsys):
  # `train --resume --out RUN` is the whole command: every flag not given takes the run's
  # value. Before, each took its default: a resume that forgot --rank or --model failed,
  # and one that forgot --eval-every, --save-every or --lr silently changed the run.
  import shutil

  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  assert _cli("train", "--resume", "--out", str(out), "--stop-after", "1", "--no-progress") == 0
  said = capsys.readouterr().out
  assert (
    "galore-jax: note: resuming with the run's own flags (checkpoint 2): "
    f"--model {SMALL['model']}, --rank 16, --update-proj-gap 2, --steps 6, --seq-len 32, "
    "--eval-every 1000, --eval-batches 2, "
    "--save-every 1000; a flag given here overrides its value"
  ) in said, said
  assert "changed" not in said  # nothing about the course changed
  record = checkpoint.saved_train_config(str(out))
  assert record[0] == 3 and record[1]["rank"] == 16 and record[1]["eval_every"] == 1000
  # Flags given override (a course flag is noted as changed; a state flag is refused).
  assert _cli("train", "--resume", "--out", str(out), "--stop-after", "1", "--lr", "0.02") == 0
  assert "with changed --lr 0.02 (was 0.01)" in capsys.readouterr().out
  assert _cli("train", "--resume", "--out", str(out), "--rank", "8") == 2
  assert "galore-jax: error: --rank: checkpoint" in capsys.readouterr().err
  # --resume auto without a checkpoint: a start with the flags as given.
  fresh = tmp_path / "fresh"
  flags = ["--resume", "auto", "--out", str(fresh), "--steps", "6", "--stop-after", "1"]
  flags += ["--model", SMALL["model"]]
  assert _cli("train", *flags, "--rank", "16", "--seq-len", "32", "--update-proj-gap", "2") == 0
  assert "run's own flags" not in capsys.readouterr().out


def test_a_run_reads_its_data_through_its_columns_on_resume_and_eval(tmp_path, capsys):
  """--columns is one of the run's flags: a resume and eval read the files through it (as
  GSM8K's question / answer records here), and the model line says how they were read."""
  rows = [
    {"question": f"what is {a} and {b} ?", "answer": f" {a + b}"}
    for a in range(20)
    for b in range(10)
  ]
  (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = str(tmp_path / "run")
  small = ["--steps", "6", "--batch-size", "8", "--seq-len", "32", "--rank", "16"]
  small += ["--update-proj-gap", "2", "--eval-every", "1000", "--eval-batches", "2"]
  small += ["--model", SMALL["model"]]
  columns = ["--columns", "prompt=question,completion=answer"]
  args = ["train", "--data", str(tmp_path / "qa.jsonl"), *small, "--no-progress", "--out", out]
  assert _cli(*args, *columns, "--stop-after", "3") == 0
  said = capsys.readouterr().out
  assert re.search(
    r"\(prompt/completion records, loss on the replies only; 19\d examples packed into "
    r"\d+ rows \((2|3)\.\d per row\)\)",
    said,
  ), said
  assert _cli("train", "--resume", "--out", out, "--no-progress") == 0
  said = capsys.readouterr().out
  assert "--columns prompt=question,completion=answer" in said and "steps 3..6" in said, said
  assert _cli("eval", "--checkpoint", out, "--json") == 0
  packed = json.loads(capsys.readouterr().out)
  assert packed["step"] == 6
  # Every held-out example, packed or one per row: the same loss.
  assert _cli("eval", "--checkpoint", out, "--json", "--eval-batches", "all") == 0
  packed = json.loads(capsys.readouterr().out)
  assert _cli("eval", "--checkpoint", out, "--json", "--eval-batches", "all", "--no-packing") == 0
  one_per_row = json.loads(capsys.readouterr().out)
  assert one_per_row["batches"] >= packed["batches"]
  assert one_per_row["eval_loss"] == pytest.approx(packed["eval_loss"], rel=1e-5)
  # preview --checkpoint: the run's data, columns, tokenizer and --seq-len 32.
  assert _cli("preview", "--checkpoint", out, "--examples", "1") == 0
  said = capsys.readouterr().out
  assert said.startswith(f"--data {tmp_path / 'qa.jsonl'}: prompt/completion records;"), said
  assert "qa.jsonl:1: " in said and "<s>what is 0 and 0 ?[[" in said and "</s>]]" in said
  # export: a chat template that gives transformers the ids a prompt had in training (the
  # bundled SentencePiece model, which transformers reads with its own Metaspace rules).
  assert _cli("export", "--checkpoint", out, "--out", str(tmp_path / "hf")) == 0
  assert "its chat template lays one user message out" in capsys.readouterr().out
  try:
    import transformers
  except ImportError:  # the reference extra
    return
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  q = "what is 7 and 3 ?"
  text = auto.apply_chat_template(
    [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
  )
  ids = auto(text, add_special_tokens=False)["input_ids"]
  assert ids == sft.prompt_ids(data.load_tokenizer(), q, "prompt"), (text, ids)
  # Without the mapping the records are not text: one line naming what they hold.
  assert _cli("eval", "--checkpoint", out, "--columns", "none") == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("galore-jax: error: --data: ") and len(err.splitlines()) == 1
  assert err.endswith("(its fields: question, answer; --columns text=FIELD reads another)")


def test_a_chat_template_for_a_tokenizer_without_one_stays_with_the_run(tmp_path, capsys):
  """--chat-template gives "messages" records a template where the tokenizer has none (the
  bundled SentencePiece model, as a base model's): the run keeps its text, so a resume, eval,
  sample, preview and export use it without the flag."""
  chats = [
    {"messages": [{"role": "user", "content": f"what is {a} and {b} ?"},
                  {"role": "assistant", "content": f"{a + b}"}]}
    for a in range(20) for b in range(10)
  ]  # fmt: skip
  data_file = tmp_path / "chat.jsonl"
  data_file.write_text("".join(json.dumps(r) + "\n" for r in chats))
  out = str(tmp_path / "run")
  # --steps 6 throughout, each stop by --stop-after: the resumes continue the same schedule.
  small = ["--steps", "6", "--batch-size", "8", "--seq-len", "64", "--rank", "16"]
  small += ["--eval-every", "1000", "--eval-batches", "1", "--no-progress"]
  small += ["--model", SMALL["model"]]
  args = ["train", "--data", str(data_file), *small, "--out", out]
  assert _cli(*args) == 2
  assert "--chat-template chatml uses ChatML's" in capsys.readouterr().err
  assert _cli(*args, "--chat-template", str(tmp_path / "missing.jinja")) == 2
  assert "--chat-template: " in capsys.readouterr().err
  (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
  assert _cli(*args, "--chat-template", str(tmp_path / "bad.jinja")) == 2
  assert "not a Jinja template" in capsys.readouterr().err
  assert _cli(*args, "--chat-template", "chatml", "--stop-after", "2") == 0
  assert "(chat records in the chat template, loss on the replies" in capsys.readouterr().out
  assert _cli("train", "--resume", "--out", out, "--stop-after", "2", "--no-progress") == 0
  said = capsys.readouterr().out
  assert "--chat-template (the run's, " in said and "steps 2..4" in said, said
  assert "template is not the one" not in said
  assert _cli("eval", "--checkpoint", out, "--json") == 0
  assert json.loads(capsys.readouterr().out)["step"] == 4
  assert _cli("preview", "--checkpoint", out, "--examples", "1") == 0
  assert "<|im_start|>assistant\n[[" in capsys.readouterr().out
  # The reply's tail is <|im_end|> and the EOS id (not "</s>" spelt out): sampling stops.
  tok = data.load_tokenizer(None, sft.read_chat_template("chatml"))
  ((toks, trained),) = sft.tokenize_examples([(chats[0], "x")], tok)
  assert toks[-1] == tok.eos_id() and trained[-1] and "</" not in tok.decode(toks.tolist())
  assert (
    _cli("sample", "--checkpoint", out, "--prompt", "what is 1 and 2 ?", "--max-new-tokens", "3")
    == 0
  )
  assert "--format chat" in capsys.readouterr().err
  assert _cli("export", "--checkpoint", out, "--out", str(tmp_path / "hf")) == 0
  assert "the run's --chat-template" in capsys.readouterr().out
  saved = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
  assert saved["chat_template"] == sft.CHAT_TEMPLATES["chatml"]
  # Another template on resume is noted (its examples change); none for text data.
  (tmp_path / "t.jinja").write_text(sft.CHAT_TEMPLATES["chatml"].replace("im_", "turn_"))
  resume = ["train", "--resume", "--out", out, "--stop-after", "1", "--no-progress"]
  assert _cli(*resume, "--chat-template", str(tmp_path / "t.jinja")) == 0
  assert "the chat template is not the one the run used" in capsys.readouterr().out


def test_document_mask_trains_evaluates_and_is_noted_when_a_resume_changes_it(tmp_path, capsys):
  docs = tmp_path / "docs.jsonl"
  rng = np.random.default_rng(0)
  words = "the of and to a in that it was her his she he you not be".split()
  docs.write_text(
    "".join(json.dumps({"text": " ".join(rng.choice(words, 20))}) + "\n" for _ in range(2000))
  )
  out = str(tmp_path / "run")
  args = ["train", "--data", str(docs), "--steps", "3", "--batch-size", "4", "--seq-len", "64"]
  args += ["--rank", "8", "--eval-every", "1000", "--eval-batches", "1", "--no-progress"]
  args += ["--model", SMALL["model"]]
  assert _cli(*args, "--document-mask", "--no-packing", "--out", out) == 2
  assert "--document-mask: keeps packed documents apart" in capsys.readouterr().err
  # (--chat-template on text data: unused, and said to be.)
  masked = ["--document-mask", "--chat-template", "chatml", "--stop-after", "2"]
  assert _cli(*args, *masked, "--out", out) == 0
  assert '--chat-template renders "messages" records; --data holds text' in capsys.readouterr().out
  assert _cli("eval", "--checkpoint", out, "--json") == 0  # the run's: with segments
  assert json.loads(capsys.readouterr().out)["step"] == 2
  assert _cli("train", "--resume", "--out", out, "--no-document-mask", "--no-progress") == 0
  assert "--no-document-mask (was --document-mask)" in capsys.readouterr().out


def test_none_turns_a_resumed_runs_source_flags_back():
  # --eval-data none / --columns none: a resume's way back to the defaults (a run's value
  # is otherwise taken for every flag not given).
  args = cli.build_parser().parse_args(["train", "--columns", "none", "--eval-data", "none"])
  cfg = cli._train_config(args)
  assert cfg.columns is None and cfg.eval_data is None


def test_a_resume_names_the_switches_it_takes_from_the_run(tmp_path):
  # Switches a resume takes from the run have both forms, to be turned back (a resume on
  # a machine without wandb: --no-wandb).
  step = tmp_path / "run" / "checkpoints" / "5" / "meta"
  step.mkdir(parents=True)
  saved = dataclasses.asdict(train.TrainConfig(out=str(tmp_path / "run"), init_from="/m"))
  saved.update(per_layer_updates=False, wandb=True, mesh="data=2", stop_after=3)
  (step / "metadata").write_text(json.dumps({"train_config": saved}))

  def resume(*flags):
    argv = ["train", "--resume", "--out", str(tmp_path / "run"), *flags]
    args = cli.build_parser().parse_args(argv)
    return cli._with_the_runs_flags(cli._train_config(args), cli._given_train_flags(argv))

  cfg, note = resume()
  assert note == (
    "galore-jax: note: resuming with the run's own flags (checkpoint 5): --init-from /m, "
    "--mesh data=2, --no-per-layer-updates, --wandb; a flag given here overrides its value"
  )
  assert cfg.stop_after is None and cfg.resume is True  # the invocation's own
  saved.update(eval_data="/held_out.jsonl")
  (step / "metadata").write_text(json.dumps({"train_config": saved}))
  cfg, note = resume("--no-wandb", "--per-layer-updates", "--model", "llama_60m")
  assert cfg.eval_data == "/held_out.jsonl"
  assert not cfg.wandb and cfg.per_layer_updates and cfg.init_from is None
  assert cfg.model == "llama_60m" and note.endswith(
    ": --eval-data /held_out.jsonl, --mesh data=2; a flag given here overrides its value"
  )
  assert resume("--eval-data", "none")[0].eval_data is None  # back to the held-out documents


def test_a_run_of_the_exact_svd_resumes_with_it_after_the_default_changed(tmp_path):
  # Runs saved before the trainer's default became --svd subspace refreshed with the exact
  # SVD, as their train_config records: a resume without --svd keeps it and says so.
  assert train.TrainConfig().svd == "subspace"
  step = tmp_path / "run" / "checkpoints" / "5" / "meta"
  step.mkdir(parents=True)
  saved = dataclasses.asdict(train.TrainConfig(out=str(tmp_path / "run"), svd="exact"))
  (step / "metadata").write_text(json.dumps({"train_config": saved}))
  argv = ["train", "--resume", "--out", str(tmp_path / "run")]
  args = cli.build_parser().parse_args(argv)
  cfg, note = cli._with_the_runs_flags(cli._train_config(args), cli._given_train_flags(argv))
  assert cfg.svd == "exact" and "--svd exact" in note


def test_tokenizer_mismatch_is_refused(finished_run, tmp_path, capsys):
  import sentencepiece as spm

  from galore_jax import data

  prefix = tmp_path / "other"
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(data.builtin_documents("validation")),
    model_prefix=str(prefix),
    vocab_size=300,
    model_type="bpe",
    minloglevel=2,
  )
  assert _cli("eval", "--checkpoint", str(finished_run), "--tokenizer", f"{prefix}.model") == 2
  assert capsys.readouterr().err.startswith("galore-jax: error: --tokenizer")


def test_corrupt_checkpoint_is_a_clear_error(finished_run, tmp_path, capsys):
  import shutil

  broken = tmp_path / "broken"
  shutil.copytree(finished_run, broken)
  step_dir = broken / "checkpoints" / "2" / "params"
  for root, _, files in os.walk(step_dir):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "r+b") as fh:
        fh.truncate(max(0, os.path.getsize(p) // 3))
  code = _cli("train", "--out", str(broken), *RESUME_ARGS)
  err = capsys.readouterr().err
  assert code == 2, err
  assert "galore-jax: error:" in err and "Traceback" not in err
  assert "TensorStore" not in err and len(err.strip().splitlines()) == 1, err
  # With an older checkpoint, the error names it and the way to resume from it (a requeued
  # job's `--resume auto` would otherwise fail the same way on every start).
  shutil.copytree(finished_run / "checkpoints" / "2", broken / "checkpoints" / "1")
  assert _cli("train", "--out", str(broken), *RESUME_ARGS) == 2
  err = capsys.readouterr().err.strip()
  ckpts = broken / "checkpoints"
  assert err.endswith(
    f"the checkpoint before it is {ckpts}/1: move {ckpts}/2 aside to resume from it, or pass "
    "it to --checkpoint"
  ), err
  shutil.move(ckpts / "2", broken / "2.corrupt")
  assert _cli("train", "--out", str(broken), *RESUME_ARGS, "--stop-after", "1") == 0
  assert "resumed from " + str(ckpts) + "/1" in capsys.readouterr().out


def test_a_checkpoint_pruned_while_read_is_not_called_corrupt(
  finished_run, tmp_path, capsys, monkeypatch
):
  # eval of a run that is still training: the run may prune the checkpoint eval is reading
  # (--keep-checkpoints). eval reads the latest one again; if that keeps failing, the error
  # says what happened instead of calling the checkpoint corrupt.
  import shutil

  import orbax.checkpoint as ocp

  def run_with_steps(name):  # checkpoints 2..5 (copies of step 2)
    run = tmp_path / name
    shutil.copytree(finished_run, run)
    for step in (3, 4, 5):
      shutil.copytree(run / "checkpoints" / "2", run / "checkpoints" / str(step))
    return run

  real, calls = ocp.CheckpointManager.restore, []

  def pruned(self, step, *args, **kwargs):
    calls.append(step)
    shutil.rmtree(os.path.join(str(self.directory), str(step)))
    raise FileNotFoundError(f"{self.directory}/{step}/meta")

  with monkeypatch.context() as m:  # every read pruned: three tries, then one line
    m.setattr(ocp.CheckpointManager, "restore", pruned)
    run = run_with_steps("always")
    assert _cli("eval", "--checkpoint", str(run)) == 2
  err = capsys.readouterr().err.strip()
  assert "was removed while it was being read" in err and "corrupt" not in err, err
  assert len(err.splitlines()) == 1 and calls == [5, 4, 3]
  # Pruned once, as when the run saves a newer checkpoint: the (new) latest one is read.
  calls.clear()

  def pruned_once(self, step, *args, **kwargs):
    if not calls:
      return pruned(self, step)
    calls.append(step)
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", pruned_once)
  run = run_with_steps("once")
  assert _cli("eval", "--checkpoint", str(run), "--json") == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
  # A step the user named is not swapped for another.
  calls.clear()
  assert _cli("eval", "--checkpoint", str(run / "checkpoints" / "3")) == 2
  assert "checkpoints/3 was removed" in capsys.readouterr().err and calls == [3]


def test_a_read_error_without_a_message_is_still_one_line(finished_run, capsys, monkeypatch):
  # The report takes the first line of orbax's error; one with an empty message (an OSError()
  # from a storage layer) must not turn that into an IndexError and a traceback.
  import orbax.checkpoint as ocp

  def fail(*args, **kwargs):
    raise OSError()

  monkeypatch.setattr(ocp.CheckpointManager, "restore", fail)
  assert _cli("eval", "--checkpoint", str(finished_run)) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("galore-jax: error:") and err.endswith("OSError: OSError"), err
  assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
  "args,why",
  [
    (["--profile-steps", "3"], "expected A:B"),
    (["--profile-steps", "3:2"], "less than"),
    (["--profile-steps", "2:2"], "less than"),
    (["--profile-steps=-1:2"], "expected A:B"),
    (["--profile-steps", "1:9"], "--steps 5"),
    (["--peak-tflops", "0"], "> 0"),
    (["--peak-tflops", "nan"], "> 0"),
  ],
)
def test_cli_bad_observability_flags_are_one_line_exit_2(tmp_path, capsys, args, why):
  assert _cli("train", "--out", str(tmp_path / "bad"), "--steps", "5", *args) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"galore-jax: error: {args[0].split('=')[0]}: ") and why in err, err
  assert len(err.splitlines()) == 1
  assert not (tmp_path / "bad").exists()


def test_cli_compile_cache_that_is_a_file_is_one_line_exit_2(tmp_path, capsys):
  afile = tmp_path / "file"
  afile.write_text("")
  assert _cli("plan", "--no-compile", "--compile-cache", str(afile)) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("galore-jax: error: --compile-cache: ") and len(err.splitlines()) == 1
  assert "is not a directory" in err


def test_cli_wandb_without_the_package_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  assert _cli("train", "--out", str(tmp_path / "w"), "--wandb") == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("galore-jax: error: --wandb: ") and "galore-jax[wandb]" in err
  assert len(err.splitlines()) == 1 and not (tmp_path / "w").exists()
