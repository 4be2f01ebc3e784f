"""``galore-jax``: train, eval and sample from the command line.

Bad flag values end in one line, ``galore-jax: error: --flag: why``, and exit
code 2 (argparse's convention), never in a traceback. A diverged run exits 1; SIGINT
and SIGTERM exit 130 and 143 (128 + the signal, as a shell reports a killed process).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import warnings
from typing import NamedTuple

EXIT_USAGE = 2


def _add_train_flags(p: argparse.ArgumentParser) -> None:
  """``train``'s flags, in groups (``--help`` lists some fifty)."""
  from galore_jax.config import (
    DTYPES,
    FINETUNE_LR,
    LR_SCHEDULES,
    MOMENT_POLICIES,
    OPTIMIZERS,
    REFRESH_PROGRAMS,
    REFRESH_SCHEDULES,
    REMAT_MODES,
    SVD_METHODS,
    TrainConfig,
  )

  d = TrainConfig()
  g = p.add_argument_group("model and optimizer")
  g.add_argument(
    "--model", default=None, help=f"llama_tiny, llama_60m, ..., llama_13b (default {d.model})"
  )
  g.add_argument(
    "--init-from",
    default=None,
    metavar="DIR|ORG/NAME",
    help="Hugging Face model directory (config.json + safetensors) or Hub id (fetched into "
    "the Hugging Face cache) to fine-tune; instead of --model; its tokenizer is the default",
  )
  g.add_argument(
    "--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="(default %(default)s)"
  )
  g.add_argument("--rank", type=int, default=d.rank, help="GaLore rank (default %(default)s)")
  g.add_argument(
    "--update-proj-gap",
    type=int,
    default=d.update_proj_gap,
    help="steps between projector refreshes, T (default %(default)s)",
  )
  g.add_argument(
    "--galore-scale", type=float, default=d.galore_scale, help="alpha (default %(default)s)"
  )
  g.add_argument(
    "--svd",
    default=d.svd,
    choices=SVD_METHODS,
    help="how a refresh finds the projector: subspace (the default: warm-started block power "
    "iteration, matmuls and small factorisations, no SVD), exact (the reference's SVD) or "
    "randomized",
  )
  g.add_argument(
    "--subspace-iters",
    type=int,
    default=d.subspace_iters,
    help="block power rounds per refresh with --svd subspace (default %(default)s)",
  )
  g.add_argument(
    "--refresh-schedule",
    default=d.refresh_schedule,
    choices=REFRESH_SCHEDULES,
    help="synchronous (default: every matrix at steps 0, T, 2T, ...) or staggered over the T steps",
  )
  g.add_argument(
    "--refresh-programs",
    default=d.refresh_programs,
    choices=REFRESH_PROGRAMS,
    help="the train step as one program that decides on the device whether GaLore "
    "refreshes, or two (with and without a refresh) picked per step on the host; auto "
    "(default): two on GPUs, where the one program waits on the host for each refresh "
    "branch's predicate on every step, one elsewhere",
  )
  g.add_argument(
    "--moment-policy",
    default=d.moment_policy,
    choices=MOMENT_POLICIES,
    help="Adam's moments at a projector refresh: keep (the reference's, default), reproject "
    "(the first moment rotated into the new basis; galore_adamw) or reset",
  )
  g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default %(default)s)")
  g.add_argument(
    "--grad-clip", type=float, default=d.grad_clip, help="global norm; 0 = off (the default)"
  )
  g.add_argument(
    "--adafactor-beta1",
    type=float,
    default=d.adafactor_beta1,
    help="first-moment coefficient of --optimizer adafactor / galore_adafactor (default 0: "
    "none, the reference's)",
  )

  g = p.add_argument_group("steps, batches and learning rate")
  g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
  g.add_argument(
    "--batch-size",
    type=int,
    default=d.batch_size,
    help="sequences per micro-batch (default %(default)s)",
  )
  g.add_argument(
    "--seq-len", type=int, default=d.seq_len, help="tokens per sequence (default %(default)s)"
  )
  g.add_argument(
    "--grad-accum",
    type=int,
    default=d.grad_accum,
    help="micro-batches per optimizer step (default %(default)s)",
  )
  g.add_argument(
    "--lr",
    type=float,
    default=None,
    help="peak learning rate (default 0.01 for GaLore, 1e-3 for AdamW; with --init-from, "
    f"{FINETUNE_LR:g}, a fine-tuning rate)",
  )
  g.add_argument("--warmup", type=int, default=None, help="warmup steps (default 10%%)")
  g.add_argument(
    "--schedule",
    default=d.schedule,
    choices=LR_SCHEDULES,
    help="after warmup: cosine (default, the paper's) or linear decay to --min-lr-ratio of the "
    "peak, or the peak held",
  )
  g.add_argument(
    "--min-lr-ratio",
    type=float,
    default=d.min_lr_ratio,
    help="final learning rate over the peak (default %(default)s)",
  )
  g.add_argument(
    "--seed", type=int, default=d.seed, help="initialisation and data order (default %(default)s)"
  )

  g = p.add_argument_group("data and evaluation")
  g.add_argument(
    "--data",
    default=d.data,
    metavar="SOURCE",
    help="builtin (the default: the bundled corpus) | PATH (a .txt / .md / .jsonl / .json "
    "file, .gz / .xz / .zst ok, or .parquet with a text column; a directory (its .txt / "
    ".jsonl / .json / .parquet files) or a glob; JSON or Parquet records of "
    "prompt/completion, messages, ShareGPT conversations or Alpaca instruction/input/output "
    "train on the replies) | tfds:NAME (e.g. tfds:c4/en) | "
    "hf://datasets/ORG/NAME[@REV]/PATH (a Hugging Face dataset's files, fetched into its "
    "cache)",
  )
  g.add_argument(
    "--columns",
    default=None,
    metavar="FIELD=COLUMN,...",
    help="read record fields from JSON keys / Parquet columns of other names, e.g. "
    "input=context,output=response (databricks-dolly-15k as Alpaca records), "
    "prompt=question,completion=answer, text=content; fields: text, prompt, completion, "
    "messages, conversations, instruction, input, output (also for --eval-data; none: a "
    "resumed run's back to the fields' own names)",
  )
  g.add_argument(
    "--eval-data",
    default=None,
    metavar="SOURCE",
    help="a held-out source (as --data) to evaluate on during training, all of it (up to "
    "--eval-batches batches); default (or none, to turn back a resumed run's): the "
    "documents held out of --data",
  )
  g.add_argument(
    "--tokenizer",
    default=None,
    metavar="PATH",
    help="SentencePiece .model, tokenizer.json, a model directory or Hub id (default: "
    "--init-from's, else bundled)",
  )
  g.add_argument(
    "--chat-template",
    default=None,
    metavar="FILE|chatml|none",
    help='the chat template "messages" records are rendered with, in place of the '
    "tokenizer's (a base model's has none): a chat_template.jinja or tokenizer_config.json, "
    "or chatml (ChatML's turns); kept in the run for eval, sample and export",
  )
  g.add_argument(
    "--packing",
    action=argparse.BooleanOptionalAction,
    default=d.packing,
    help="text: documents packed into rows one after another, or (--no-packing) each "
    "truncated / padded to a row (the paper's C4 setup); instruction records: examples "
    "packed several to a row, kept apart in attention, or one per row (default: packed)",
  )
  g.add_argument(
    "--document-mask",
    action=argparse.BooleanOptionalAction,
    default=d.document_mask,
    help="packed text: each document attends only to itself, not to the documents before "
    "it in its row (the paper, and by default here, lets them attend across)",
  )
  g.add_argument(
    "--eval-every",
    type=int,
    default=d.eval_every,
    help="steps between evaluations (default %(default)s)",
  )
  g.add_argument(
    "--eval-batches",
    type=int,
    default=d.eval_batches,
    help="validation batches per evaluation (default %(default)s)",
  )

  g = p.add_argument_group("run directory and checkpoints")
  g.add_argument(
    "--out",
    default=d.out,
    metavar="DIR",
    help="run directory (default: runs/<model>_<optimizer>_<timestamp>)",
  )
  g.add_argument(
    "--resume",
    nargs="?",
    const=True,
    default=False,
    choices=["auto"],
    help="continue the run in --out, with its own flags unless given here; --resume auto: "
    "continue it if it has a checkpoint, else start (what a requeued job runs every time)",
  )
  g.add_argument(
    "--overwrite",
    action="store_true",
    help="delete the checkpoints, metrics and TensorBoard events in --out and start over",
  )
  g.add_argument(
    "--stop-after",
    type=int,
    default=None,
    help="stop (saving a checkpoint) after this many steps in this invocation",
  )
  g.add_argument(
    "--time-limit",
    default=None,
    metavar="DURATION",
    help="stop with a checkpoint before this much time has passed since the start, e.g. "
    "23h50m or 23:50:00 for a batch job of 24 hours (the next job continues with --resume)",
  )
  g.add_argument(
    "--save-every",
    type=int,
    default=d.save_every,
    help="steps between checkpoints (default %(default)s; the last step is always saved)",
  )
  g.add_argument(
    "--keep-checkpoints",
    type=int,
    default=d.keep_checkpoints,
    help="newest checkpoints kept (default %(default)s); older ones are deleted",
  )
  g.add_argument(
    "--max-nonfinite",
    type=int,
    default=d.max_nonfinite,
    help="consecutive non-finite (skipped) steps that stop the run (default %(default)s)",
  )

  g = p.add_argument_group("devices, dtypes and memory")
  g.add_argument(
    "--mesh",
    default=None,
    help="data=N,fsdp=M: batches over both axes, weights and optimizer state sharded over "
    "fsdp (default: one device)",
  )
  g.add_argument(
    "--param-dtype",
    default=d.param_dtype,
    choices=tuple(DTYPES),
    help="weights (default %(default)s; bfloat16 with no float32 copy, as the paper's 7B)",
  )
  g.add_argument(
    "--dtype", default=d.dtype, choices=tuple(DTYPES), help="compute (default %(default)s)"
  )
  g.add_argument(
    "--remat",
    default=d.remat,
    choices=REMAT_MODES,
    help="recompute activations in the backward pass: none (default), full, or save_matmuls",
  )
  _add_memory_flags(g)
  _add_compile_cache_flag(g)

  g = p.add_argument_group("what the run reports")
  g.add_argument(
    "--peak-tflops",
    type=float,
    default=None,
    help="per-device peak TFLOP/s for the mfu metric (default: the bf16 datasheet peak of an "
    "H100, H200, A100 or RTX 4090; none otherwise)",
  )
  g.add_argument(
    "--profile-steps",
    default=None,
    metavar="A:B",
    help="write a jax.profiler trace of steps A+1..B into --out/tb (TensorBoard's profile tab)",
  )
  g.add_argument(
    "--wandb",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="also log to Weights & Biases (pip install 'galore-jax[wandb]'; offline without "
    "network or API key; project $WANDB_PROJECT, default galore-jax)",
  )
  g.add_argument(
    "--no-progress",
    dest="progress",
    action="store_false",
    help="no progress bar (in a terminal) or progress lines (in a log file)",
  )
  from galore_jax import distributed  # multi-process hook: --coordinator, --num-processes, ...

  distributed.add_flags(p)


def _add_compile_cache_flag(p) -> None:  # a parser or an argument group
  p.add_argument(
    "--compile-cache",
    default=None,
    metavar="DIR|none",
    help="JAX's persistent compilation cache (default: jax-cache in $GALORE_JAX_CACHE_DIR, "
    "else $XDG_CACHE_HOME/galore_jax, else ~/.cache/galore_jax); 'none' turns it off",
  )


def _add_memory_flags(p) -> None:  # a parser or an argument group
  from galore_jax.config import DTYPES

  p.add_argument(
    "--projector-dtype",
    default=None,
    choices=tuple(DTYPES),
    help="dtype of GaLore's projectors (default: the param dtype, as the reference)",
  )
  # Both forms of each switch: a resume takes the run's value unless told otherwise.
  p.add_argument(
    "--per-layer-updates",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="update each layer as soon as its gradient exists; --no-per-layer-updates: after "
    "the whole gradient exists (the step used anyway with --grad-clip without "
    "--per-layer-clip, or --grad-accum > 1 without GaLore's low-rank accumulation)",
  )
  p.add_argument(
    "--per-layer-clip",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="with --grad-clip, keep per-layer updates: the step takes the global norm in a "
    "first forward and backward pass (per-layer memory, about twice the step's compute; "
    "one micro-batch)",
  )
  p.add_argument(
    "--lowrank-accum",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="with GaLore and --grad-accum > 1, accumulate projected gradients; "
    "--no-lowrank-accum: the whole float32 gradient (the large-batch step exactly, refresh "
    "steps included)",
  )


def _train_config(args):
  """The TrainConfig of ``train`` / ``plan`` flags (``--model`` unset: the default model)."""
  from galore_jax.config import ConfigError, TrainConfig

  if args.model is not None and args.init_from:
    # Silently training another architecture than the one named is worse than an error.
    raise ConfigError(
      "--model", f"{args.model} and --init-from both name the architecture; give one of them"
    )
  fields = {f.name for f in dataclasses.fields(TrainConfig)} - (
    {"model"} if args.model is None else set()
  )
  values = {k: v for k, v in vars(args).items() if k in fields}
  for name in ("eval_data", "columns"):  # a resume's way back to the default
    if values.get(name) == "none":
      values[name] = None
  if "chat_template" in values:
    values["chat_template"] = _chat_template_flag(values["chat_template"])
  return TrainConfig(**values)


# Flags that belong to one invocation: a resume does not take them from the run.
_PER_INVOCATION = (
  "resume", "overwrite", "stop_after", "out", "progress", "profile_steps", "time_limit",
  "refresh_programs",  # how the step is compiled, not what it computes: per machine
)  # fmt: skip


def _given_train_flags(argv: list[str]) -> set[str]:
  """The ``train`` flags (their dests) that ``argv`` gives, as opposed to their defaults."""
  probe = build_parser()
  commands = next(a for a in probe._actions if isinstance(a, argparse._SubParsersAction))
  train = commands.choices["train"]
  for action in train._actions:  # (set_defaults would store them as values)
    action.default = argparse.SUPPRESS
  return set(vars(probe.parse_args(argv))) - {"command", "fn"}


def _examples_one_per_row(meta: dict) -> bool:
  """Whether a checkpoint's metadata is of instruction data that a version before examples
  were packed laid out one per row (its record of the data's form, but not of the rows):
  its resume continues that way."""
  from galore_jax.sft import FORM_NAMES

  position = meta.get("data_position")
  return (
    meta.get("data_format") in FORM_NAMES
    and isinstance(position, dict)
    and "example_rows" not in position
  )


def _with_the_runs_flags(cfg, given: set[str] | None):
  """``train --resume``: every flag the command line does not give takes the value the run
  was started with (its newest checkpoint's ``train_config``), so ``--resume --out RUN`` is
  the whole command; the flags given override. Returns ``(cfg, note or None)``. A start of
  ``--resume auto`` (no checkpoint yet) keeps the flags as given."""
  from galore_jax import checkpoint
  from galore_jax.config import TrainConfig

  if not cfg.resume or given is None or not cfg.out:  # (no --out: the trainer says so)
    return cfg, None
  found = checkpoint.saved_meta(cfg.out, "train_config")
  if found is None:
    return cfg, None
  step, meta = found
  saved = meta["train_config"]
  if _examples_one_per_row(meta):  # (its train_config says packing, for text)
    saved = {**saved, "packing": False}
  skip = set(_PER_INVOCATION) | given
  if given & {"model", "init_from"}:  # the architecture named here, one way or the other
    skip |= {"model", "init_from"}
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  taken = {k: v for k, v in saved.items() if k in fields and k not in skip}
  restored = {k: v for k, v in taken.items() if v != getattr(cfg, k)}
  cfg = dataclasses.replace(cfg, **taken)
  if not restored:
    return cfg, None

  def flag(name: str, value) -> str:  # a switch by its form: --wandb, --no-packing
    name = name.replace("_", "-")
    if isinstance(value, bool):
      return f"--{name}" if value else f"--no-{name}"
    if name == "chat-template" and value:  # its text, not worth a screen
      return f"--{name} (the run's, {len(value)} characters)"
    return f"--{name} {value}"

  said = ", ".join(flag(k, v) for k, v in restored.items())
  return cfg, (
    f"galore-jax: note: resuming with the run's own flags (checkpoint {step}): {said}; a flag "
    "given here overrides its value"
  )


def _resume_hint(out: str) -> str:
  """Where a failed multi-process run can be resumed from. Read from the directory itself:
  orbax's own lookup would wait at a barrier for the processes that are gone."""
  from galore_jax import checkpoint

  ckpt_dir = checkpoint.checkpoint_dir(out)
  steps = checkpoint.finished_steps(ckpt_dir)
  if not steps:
    return f"no checkpoint was saved in {ckpt_dir}"
  return f"the newest checkpoint is {ckpt_dir}/{steps[0]}; start every process with --resume"


def _join_job(args) -> None:
  """Multi-process hook of ``train`` and ``eval``: join the job the flags (or the launcher's
  environment) describe, before anything starts JAX's backends."""
  from galore_jax import config, distributed

  try:
    distributed.initialize(distributed.launch_from_args(args))
  except distributed.DistributedError as e:
    raise config.ConfigError(e.flag, e.message) from None


def loss_trend(losses: list[float]) -> str:
  """Mean loss of the first and of the last steps of a run, in windows of up to 10 steps
  that never overlap (a run of 8 steps compares its first 4 with its last 4)."""
  n = min(10, len(losses) // 2)
  if n == 0:
    return f"loss {losses[0]:.3f} (1 step)"
  head, tail = sum(losses[:n]) / n, sum(losses[-n:]) / n
  return f"loss {head:.3f} (first {n}) -> {tail:.3f} (last {n})"


def _cmd_train(args) -> int:
  from galore_jax import distributed, trainer
  from galore_jax.errors import first_line

  cfg, restored = _with_the_runs_flags(_train_config(args), getattr(args, "given", None))
  _join_job(args)
  if restored and distributed.is_primary():
    print(restored)
  try:
    summary = trainer.train(cfg, started=trainer.process_start())  # --time-limit's clock
  except trainer.TrainingInterrupted as e:
    print(f"galore-jax: {e}", file=sys.stderr)
    return 128 + e.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
  except Exception as e:
    if not distributed.lost_process(e):
      raise
    first = first_line(e)
    hint = _resume_hint(cfg.out)
    print(f"galore-jax: error: lost another process of the job ({first}); {hint}", file=sys.stderr)
    return 1
  if not distributed.is_primary():  # multi-process: process 0 reports
    return 0
  if summary["losses"]:
    span = f"{summary['start_step']}..{summary['step']}"
    print(f"trained steps {span}: {loss_trend(summary['losses'])}")
  if "eval_ppl" in summary:
    print(
      f"final validation loss {summary['eval_loss']:.4f}, perplexity {summary['eval_ppl']:.2f} "
      f"({summary['eval_batches']} batches of {cfg.batch_size} x {cfg.seq_len})"
    )
  print(f"metrics: {summary['metrics']}  (TensorBoard: {os.path.join(summary['out'], 'tb')})")
  print(f"checkpoints: {summary['checkpoints']}")
  return 0


def _add_inference_dtype_flags(p) -> None:
  from galore_jax.config import DTYPES

  p.add_argument(
    "--dtype", default=None, choices=tuple(DTYPES), help="compute dtype (default: the run's)"
  )
  p.add_argument(
    "--param-dtype",
    default=None,
    choices=tuple(DTYPES),
    help="weights of a Hugging Face directory (default float32; a run's load as trained)",
  )


def _local_hub_args(args, **needs: str) -> None:
  """The flags named (``checkpoint="model"``, ``data="data"``, ...) that give a Hugging
  Face Hub id or ``hf://datasets/...`` files (:mod:`galore_jax.hub`) become the cache
  directory or files holding what they read, fetched if they are not there yet; each says
  so in one line."""
  from galore_jax import distributed, hub

  say = distributed.primary_log(functools.partial(print, file=sys.stderr))
  for name, need in needs.items():
    value = getattr(args, name)
    if value:
      flag = "--" + name.replace("_", "-")
      if need == "data":
        setattr(args, name, hub.local_data(value, flag=flag, log=say))
      else:
        setattr(args, name, hub.local_dir(value, flag=flag, need=need, log=say))


def _load_for_inference(args, before_restore):
  """``eval`` / ``sample``: the model ``--checkpoint`` names, with their shared flags;
  ``before_restore(run, tokenizer, step)`` checks the others before any weight is read."""
  from galore_jax import sample

  return sample.load_for_inference(
    args.checkpoint,
    tokenizer=args.tokenizer,
    mesh=args.mesh,
    dtype=args.dtype,
    param_dtype=args.param_dtype,
    before_restore=before_restore,
  )


def _cmd_eval(args) -> int:
  from galore_jax import data, distributed, hub, trainer
  from galore_jax.config import ConfigError, absolute_source, check_mesh, check_seq_len

  for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
    if value is not None and value < 1:
      raise ConfigError(flag, f"must be >= 1, got {value}")
  n_batches = _eval_batches_flag(args.eval_batches)
  _join_job(args)
  _local_hub_args(args, checkpoint="model", tokenizer="tokenizer", data="data")
  prepared = {}

  def check_flags_and_read_data(run, _tok, _step):  # before the weights: a bad flag fails
    # Default: what the run evaluated on (its --eval-data, all of it; else its held-out part).
    # A Hugging Face dataset's files it recorded: in this machine's cache.
    held_out = hub.local_data(getattr(run.cfg, "eval_data", None), flag="--eval-data")
    run_data = hub.local_data(run.cfg.data, flag="--data")
    cfg = dataclasses.replace(
      run.cfg,
      data=absolute_source(args.data) if args.data else held_out or run_data,
      batch_size=args.batch_size or run.cfg.batch_size,
      seq_len=args.seq_len or run.cfg.seq_len,
      packing=run.cfg.packing if args.packing is None else args.packing,
      columns=_columns_flag(args.columns, getattr(run.cfg, "columns", None)),
    )
    check_seq_len(cfg.seq_len, cfg.init_from or cfg.model, run.model_cfg.max_seq_len)
    check_mesh(args.mesh, cfg.batch_size)
    split = args.split or (
      data.held_out_split(held_out)
      if not args.data and held_out
      else _default_eval_split(cfg.data, run_data)
    )
    if (note := data.unread_note(cfg.data)) and distributed.is_primary():
      print(note, file=sys.stderr)
    if n_batches != "run":
      n = n_batches
    else:  # the count train reported for its validation split; a held-out set whole
      n = run.cfg.eval_batches if split == "validation" else None
    try:
      with trainer.data_progress(_stop_point) as progress:
        batches = data.eval_batches(
          trainer.data_config(cfg, cfg.batch_size), n, progress=progress, split=split
        )
      batches[0]  # built when read (streamed during eval): the first one fails here
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError("--data", str(e)) from e
    prepared.update(cfg=cfg, batches=batches, split=split)

  run, params, _, step = _load_for_inference(args, check_flags_and_read_data)
  cfg, batches, split = prepared["cfg"], prepared["batches"], prepared["split"]
  # Every process reads the whole validation set and places its rows of each batch (as
  # train's evaluation does); the loss comes back replicated, and process 0 reports it.
  eval_fn = trainer.compile_eval_step(run)
  primary = distributed.is_primary()  # only process 0 shows progress
  with trainer.eval_progress(len(batches)) if primary else contextlib.nullcontext() as progress:

    def done(n: int) -> None:
      _stop_point()
      if progress is not None:
        progress(n)

    loss, ppl = trainer.evaluate(run, params, batches, eval_fn, progress=done)
  if not primary:
    return 0
  result = {
    "step": step,
    "eval_loss": loss,
    "eval_ppl": ppl,
    "batches": len(batches),
    "split": split,
  }
  what = "validation loss" if split == "validation" else f"loss on all of {cfg.data}"
  print(
    json.dumps(result)
    if args.json
    else f"step {step}: {what} {loss:.4f}, perplexity {ppl:.2f} "
    f"({len(batches)} batches of {cfg.batch_size} x {cfg.seq_len})"
  )
  return 0


def _default_eval_split(source: str, trained_on: str) -> str:
  """``eval --split``'s default: ``all`` for a path source other than the run's training
  data (the user's own held-out set, which the run never saw), else ``validation`` (the
  documents the run held out of its own data, or the validation split of the bundled
  corpus or a TFDS dataset)."""
  from galore_jax import data
  from galore_jax.data import sources

  if data.held_out_split(source) == "validation" or source == trained_on:
    return "validation"

  def files(s: str) -> set:
    return {p.resolve() for p in sources._resolve_paths(s)}

  try:
    same = files(source) == files(trained_on)
  except (OSError, ValueError):  # the run's data is gone (or not a path): another source
    same = False
  return "validation" if same else "all"


class _Prompt(NamedTuple):
  """One prompt of ``sample``: its JSON record (other fields, such as an id, come back
  with the reply), what to continue (a string, or a list of chat messages), and its line
  in the ``--prompts`` file (None for ``--prompt``)."""

  record: dict
  prompt: str | list
  line: int | None


def _read_prompts(path: str) -> list[_Prompt]:
  """``sample --prompts``: the JSON lines of ``path``, each ``{"prompt": str}``, (for
  ``--format chat``) ``{"messages": [...]}``, a conversation for the assistant to go on, or
  (for ``--format alpaca``) ``{"instruction": str, "input": str}``; other fields are kept."""
  from galore_jax.config import ConfigError

  try:
    # Split at "\n" only: str.splitlines also breaks at U+2028, U+0085 and others, which a
    # JSON string may hold unescaped (json.dumps(..., ensure_ascii=False) writes them so).
    with open(os.path.expanduser(path), encoding="utf-8", newline="") as f:
      lines = f.read().split("\n")
  except OSError as e:
    raise ConfigError("--prompts", f"{path}: {e.strerror or e}") from e
  except UnicodeDecodeError as e:
    raise ConfigError("--prompts", f"{path}: not UTF-8 text ({e.reason})") from e
  records = []
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError("--prompts", f"{path} line {i}: not JSON ({e.msg})") from e
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
      records.append(_Prompt(record, record["prompt"], i))
    elif isinstance(record, dict) and isinstance(record.get("messages"), list):
      records.append(_Prompt(record, record["messages"], i))
    elif isinstance(record, dict) and isinstance(record.get("instruction"), str):
      records.append(_Prompt(record, {k: record.get(k) for k in ("instruction", "input")}, i))
    else:
      raise ConfigError(
        "--prompts",
        f'{path} line {i}: expected {{"prompt": "..."}}, {{"messages": [...]}} or '
        '{"instruction": "..."}',
      )
  if not records:
    raise ConfigError("--prompts", f"{path} holds no prompt")
  return records


def _chat_template_flag(given: str | None, recorded: str | None = None) -> str | None:
  """``--chat-template`` as the template's text (the run keeps the text, not a path that may
  go): a file's or a preset's (``sft.read_chat_template``), else the run's (``recorded``);
  ``none``: the tokenizer's own. A bad one is a ``--chat-template`` error here."""
  from galore_jax.config import ConfigError

  if given is None or given == "none":
    return recorded if given is None else None
  from galore_jax.sft import read_chat_template  # (the data pipeline: only when named)

  try:
    return read_chat_template(given)
  except (OSError, ValueError) as e:
    raise ConfigError("--chat-template", str(e)) from e


def _columns_flag(given: str | None, recorded: str | None) -> str | None:
  """``eval`` / ``preview --columns``: as given, else the run's (``recorded``); ``none``: the
  fields' own names. A malformed mapping is a ``--columns`` error here."""
  from galore_jax import data
  from galore_jax.config import ConfigError

  spec = recorded if given is None else given
  spec = None if spec == "none" else spec
  try:
    data.parse_columns(spec)
  except ValueError as e:
    raise ConfigError("--columns", str(e)) from e
  return spec


def _eval_batches_flag(value: str | None) -> int | str | None:
  """``--eval-batches``: None -> the run's own count ("run"), ``all`` -> None, else N >= 1."""
  if value is None:
    return "run"
  if value == "all":
    return None
  if not value.isdigit() or int(value) < 1:
    from galore_jax.config import ConfigError

    raise ConfigError("--eval-batches", f"expected a number >= 1 or 'all', got {value!r}")
  return int(value)


def _cmd_sample(args) -> int:
  from galore_jax.config import ConfigError

  if args.max_new_tokens < 1:
    raise ConfigError("--max-new-tokens", f"must be >= 1, got {args.max_new_tokens}")
  if not 0 < args.top_p <= 1:  # NaN fails too
    raise ConfigError("--top-p", f"must be in (0, 1], got {args.top_p}")
  if not (math.isfinite(args.temperature) and args.temperature >= 0):
    raise ConfigError(
      "--temperature", f"must be a finite number >= 0 (0: greedy), got {args.temperature}"
    )
  if args.batch_size < 1:
    raise ConfigError("--batch-size", f"must be >= 1, got {args.batch_size}")
  if args.out is not None and args.prompts is None:
    raise ConfigError("--out", "needs --prompts (a --prompt reply streams to the terminal)")
  _local_hub_args(args, checkpoint="model", tokenizer="tokenizer")

  records = (
    [_Prompt({"prompt": args.prompt}, args.prompt, None)]
    if args.prompts is None
    else _read_prompts(args.prompts)
  )
  reply_file = None
  if args.out is not None:
    reply_file = _open_reply_file(args, records)
    if reply_file.kept == len(records):
      reply_file.close()
      print(f"{args.out} has a reply to each of the {len(records)} prompts of {args.prompts}")
      return 0
  try:
    return _sample(args, records, reply_file)
  finally:
    if reply_file is not None:
      reply_file.close()


def _open_reply_file(args, records):
  """``sample --out``: the replies file, locked, checked against the prompts and flags."""
  from galore_jax import checkpoint, replies

  settings = {
    # The run, not one step's folder: a pinned step (RUN/checkpoints/N) continues a file
    # the run's latest step began.
    "checkpoint": os.path.realpath(checkpoint.checkpoint_dir(os.path.expanduser(args.checkpoint))),
    "tokenizer": args.tokenizer and os.path.realpath(os.path.expanduser(args.tokenizer)),
    "format": args.format,
    "max_new_tokens": args.max_new_tokens,
    "temperature": args.temperature,
    "top_k": args.top_k,
    "top_p": args.top_p,
    "seed": args.seed,
    "dtype": args.dtype,
    "param_dtype": args.param_dtype,
  }
  return replies.ReplyFile(args.out, [(r.record, r.line) for r in records], settings, args.prompts)


def _trained_format(path: str, step: int, tok) -> str:
  """``sample``'s default ``--format``: the form of the run's ``--data`` as its checkpoint
  recorded it (``"text"`` for a Hugging Face model directory, or a run saved before runs
  recorded it), with a note when it is not text, or when it is a Hugging Face directory's
  whose tokenizer ``tok`` has a chat template (an instruct model's, or an export of a
  fine-tuned run, whose template lays a message out as its training did)."""
  from galore_jax import distributed, sample

  meta = sample.run_meta(path, step)
  form = sample.data_format(meta)
  log = distributed.primary_log(functools.partial(print, file=sys.stderr))
  if form != "text":
    log(f"galore-jax: note: --format {form}: the form of the run's --data")
  elif meta is None and getattr(tok, "chat_template", None):
    log(
      "galore-jax: note: --format text: the prompt is continued as plain text; this model's "
      "tokenizer has a chat template, which --format chat lays a user message out in"
    )
  return form


def _sample(args, records, reply_file) -> int:
  from galore_jax import sample, sft
  from galore_jax.config import ConfigError

  prompts: list[list[int]] = []

  def check_flags(run, sp, step):  # before the weights: a bad flag fails at once
    if reply_file is not None:  # a run that has saved a newer step since the file began
      reply_file.check_step(step)
    if not 1 <= args.top_k <= sp.get_piece_size():
      raise ConfigError(
        "--top-k", f"must be in [1, {sp.get_piece_size()}] (the vocabulary), got {args.top_k}"
      )
    if args.format is None:
      args.format = _trained_format(args.checkpoint, step, sp)
    flag = "--prompt" if args.prompts is None else "--prompts"
    prompts.clear()  # a retried read calls again
    for _, prompt, line in records:
      where = "--prompt" if line is None else f"{args.prompts} line {line}"
      try:
        ids = sft.prompt_ids(sp, prompt, args.format, where)
      except ValueError as e:
        # A record's fault (its messages) names the record; the tokenizer's, --format.
        own = line is not None and str(e).startswith(where)
        raise ConfigError(flag if own else "--format", str(e)) from e
      try:
        sample.check_prompt(ids, run.model_cfg)
      except ValueError as e:
        raise ConfigError(flag, ("" if line is None else f"{where}: ") + str(e)) from e
      prompts.append(ids)

  run, params, sp, step = _load_for_inference(args, check_flags)
  if reply_file is not None:
    reply_file.start(step)
  kept = sample.kept_generation_config(args.checkpoint, step, args.tokenizer)
  stops = sft.reply_end_ids(sp, args.format) | sample.stop_ids(kept)
  settings = dict(
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    seed=args.seed,
    eos_id=stops,
  )
  if args.prompts is None:
    # The reply streams out as it is drawn. A chat or Alpaca reply alone: the prompt would
    # come back inside the template's markup.
    write = lambda text: print(text, end="", flush=True)
    if args.format in ("text", "prompt"):
      write(args.prompt)
    stream = sample.ReplyStream(sp, prompts[0], write)
    reply = sample.generate(run, params, prompts[0], on_token=stream, **settings)
    stream.close()
    print()
    if sample.finish_reason(prompts[0], reply, args.max_new_tokens, run.model_cfg) == "context":
      _note_context_cuts(args, run, [len(reply)])
    return 0
  n = args.batch_size
  first = 0 if reply_file is None else reply_file.kept
  todo = len(prompts) - first
  bar = None
  if reply_file is not None:
    from tqdm import tqdm

    bar = tqdm(total=len(prompts), initial=first, unit="prompt", desc="sample", disable=None)
  from galore_jax.replies import REPLY_FIELDS

  cut: list[int] = []  # --prompts lines whose reply the model's context cut short
  for start in range(first, len(prompts), n):
    _stop_point()  # (the replies so far are written)
    batch = prompts[start : start + n]
    # The last batch is filled up with copies, so that every batch runs the same programs.
    filled = batch + [batch[-1]] * (n - len(batch)) if todo > n else batch
    replies = sample.generate_batch(run, params, filled, first_index=start, **settings)
    done = []
    for i, reply in enumerate(replies[: len(batch)]):
      why = sample.finish_reason(prompts[start + i], reply, args.max_new_tokens, run.model_cfg)
      if why == "context":
        cut.append(records[start + i].line)
      completion = sample.reply_text(sp, prompts[start + i], reply)
      # The reply's fields last, replacing those the record may hold (a reference answer).
      rest = {k: v for k, v in records[start + i].record.items() if k not in REPLY_FIELDS}
      done.append({**rest, "completion": completion, "finish_reason": why})
    if reply_file is not None:
      reply_file.write(done)
      bar.update(len(done))
      continue
    for record in done:
      print(json.dumps(record), flush=True)
    if _reader_gone():  # nobody reads the replies any more (`| head`)
      return 128 + signal.SIGPIPE
  if bar is not None:
    bar.close()
    print(f"{len(prompts)} replies in {args.out} ({todo} new, step {step})")
  if cut:
    _note_context_cuts(args, run, cut)
  return 0


def _note_context_cuts(args, run, cut: list[int]) -> None:
  """A reply shorter than --max-new-tokens because the prompt and reply filled the model's
  context is said on stderr, not left to look like a reply that ended by itself. ``cut``:
  the reply's length (--prompt) or the --prompts lines cut."""
  context = run.model_cfg.max_seq_len
  if args.prompts is None:
    what = f"the reply stopped after {cut[0]} tokens"
  else:
    lines = ", ".join(map(str, cut[:5])) + (", ..." if len(cut) > 5 else "")
    what = f"{len(cut)} {'reply' if len(cut) == 1 else 'replies'} (line {lines} of {args.prompts})"
    what += " stopped"
  print(
    f"galore-jax: note: {what} at the model's context of {context} tokens (prompt and reply), "
    f"before --max-new-tokens {args.max_new_tokens}",
    file=sys.stderr,
  )


def _exit_on_sigterm(signum, _frame):
  raise SystemExit(128 + signum)


def _cmd_export(args) -> int:
  from galore_jax import hf, sample
  from galore_jax.config import ConfigError

  # A symlink's target is where the model goes (rename would replace the link itself).
  out = os.path.realpath(os.path.expanduser(args.out))
  if os.path.lexists(out) and not os.path.isdir(out):
    raise ConfigError("--out", f"{args.out} exists and is not a directory")
  if os.path.isdir(out) and os.listdir(out):
    raise ConfigError("--out", f"{args.out} exists and is not empty")
  _local_hub_args(args, checkpoint="model", tokenizer="tokenizer")
  from galore_jax import sft

  run, params, sp, step = sample.load_for_inference(args.checkpoint, tokenizer=args.tokenizer)
  base = sample.kept_generation_config(args.checkpoint, step, args.tokenizer)
  # A run fine-tuned on prompt/completion or Alpaca records: a chat template that lays a
  # user message out as its examples did, for transformers' apply_chat_template and vLLM.
  meta = sample.run_meta(args.checkpoint, step)  # None: a Hugging Face directory
  form = sample.data_format(meta)
  template = sft.export_chat_template(form, sp)
  # A chat run's --chat-template (the tokenizer has another, or none): written with it.
  own = form == "chat" and getattr(run.cfg, "chat_template", None)
  if own:
    template = run.cfg.chat_template
  chat = (template is None or own) and getattr(sp, "chat_template", None)
  generation = hf.generation_config(sp, sft.reply_end_ids(sp, "chat") if chat else set(), base)
  # Written into a sibling directory and renamed into place when complete, so that --out
  # is never a partial model (a killed or failed export), nor a mix of two exports.
  try:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f"{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    os.chmod(partial, hf.umask_mode(0o777))  # mkdtemp's 0700 is no model directory's mode
  except OSError as e:
    raise ConfigError("--out", str(e)) from e
  # SIGTERM ends the export as Ctrl-C does, through the clean-up below (exit 143).
  previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
  try:
    files = hf.save_pretrained(
      partial,
      run.model_cfg,
      params,
      dtype=args.dtype,
      tokenizer=sp,
      generation=generation,
      chat_template=template,
    )
    if meta is not None:  # the model card the Hub shows: what was trained how
      card = hf.model_card(
        meta.get("train_config", {}),
        step,
        name=os.path.basename(out),
        form=form,
        eval_loss=sample.last_eval(args.checkpoint, step),
        chat_template=template if template is not None else getattr(sp, "chat_template", None),
        bos_token=sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else "",
      )
      with open(os.path.join(partial, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
      files.append(os.path.join(partial, "README.md"))
  except BaseException as e:
    shutil.rmtree(partial, ignore_errors=True)
    if isinstance(e, OSError):  # a full disk: named in --out's terms (the partial is gone)
      raise ConfigError("--out", str(e).replace(partial, out)) from e
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)
  try:
    os.rename(partial, out)  # atomic; onto an empty directory too, never a non-empty one
  except OSError as e:
    raise ConfigError(
      "--out",
      f"{out} appeared while exporting and is not empty ({e.strerror}); this export is "
      f"complete in {partial}",
    ) from e
  print(f"exported step {step} to {out} ({len(files)} files)")
  if own:
    print("its chat template is the run's --chat-template, which its chat records were laid out in")
  elif template is not None:
    said = (
      f"its chat template lays one user message out as the run's {sft.FORM_NAMES[form]} "
      "(replacing the tokenizer's own): transformers' apply_chat_template and vLLM's chat "
      "endpoint prompt the model as it was trained"
    )
    if form == "alpaca":
      given = sft.ALPACA_INPUT_VARIABLE
      said += (
        f"; an Alpaca input is its variable {given!r} (transformers: "
        f"apply_chat_template(messages, {given}=TEXT); vLLM: chat_template_kwargs)"
      )
    print(said)
  return 0


_HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def _host_devices(n: int) -> None:
  """Asks XLA's CPU backend for ``n`` devices, unless ``XLA_FLAGS`` already says how many.

  ``plan --mesh`` compiles the sharded step on as many devices as the mesh has; on a CPU
  they can be had for the asking, if asked before JAX creates its backend (nothing in
  ``galore-jax`` creates it before the command runs). The flag concerns the host platform
  only: a GPU or TPU backend is unaffected, and one with too few devices gets the
  analytic plan (``memory_plan.plan``'s ``xla_skipped``).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if _HOST_DEVICES_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_HOST_DEVICES_FLAG}={n}".strip()


def _cmd_plan(args) -> int:
  from galore_jax import plan
  from galore_jax.config import ConfigError, parse_mesh

  data_n, fsdp_n = parse_mesh(args.mesh)
  if args.compile and data_n * fsdp_n > 1:
    _host_devices(data_n * fsdp_n)
  if args.init_from and args.vocab_size is not None:
    raise ConfigError("--vocab-size", "the vocabulary is --init-from's (its config.json)")
  _local_hub_args(args, init_from="config")
  cfg = _train_config(args)
  result = plan.plan(
    cfg,
    vocab_size=plan.DEFAULT_VOCAB if args.vocab_size is None else args.vocab_size,
    gpu_memory=plan.parse_bytes(args.gpu_memory, "--gpu-memory"),
    compile=args.compile,
  )
  print(json.dumps(result) if args.json else plan.format_plan(result))
  return 0


def _cmd_preview(args) -> int:
  """``galore-jax preview``: the first records of ``--data`` (or a run's data) as the examples
  training makes of them, the trained pieces marked, before a run spends its time on them."""
  import itertools

  from galore_jax import checkpoint, data, hub, sft, trainer
  from galore_jax.config import ConfigError, TrainConfig
  from galore_jax.data import sources

  for flag, value in (("--examples", args.examples), ("--seq-len", args.seq_len)):
    if value is not None and value < 1:
      raise ConfigError(flag, f"must be >= 1, got {value}")
  say = functools.partial(print, file=sys.stderr)
  run = {}
  if args.checkpoint:
    found = checkpoint.saved_train_config(os.path.expanduser(args.checkpoint))
    if found is None:
      raise ConfigError("--checkpoint", f"{args.checkpoint}: not a run with a checkpoint")
    run = found[1]
  columns = data.parse_columns(_columns_flag(args.columns, run.get("columns")))
  seq_len = args.seq_len or run.get("seq_len") or TrainConfig().seq_len
  if args.tokenizer:
    tokenizer = hub.local_dir(args.tokenizer, flag="--tokenizer", need="tokenizer", log=say)
  elif run.get("tokenizer"):  # the run's, or the copy it kept
    tokenizer = trainer.run_tokenizer(run["tokenizer"], os.path.expanduser(args.checkpoint), say)
  elif args.init_from:  # a fine-tune's default tokenizer: the model's own
    tokenizer = hub.local_dir(args.init_from, flag="--init-from", need="tokenizer", log=say)
  else:
    tokenizer = None  # the bundled one
  template = _chat_template_flag(args.chat_template, run.get("chat_template"))
  try:
    tok = data.load_tokenizer(tokenizer, template)
  except (OSError, ValueError) as e:
    raise ConfigError("--tokenizer", str(e)) from e
  source = hub.local_data(args.data or run.get("data") or "builtin", flag="--data", log=say)
  if source.startswith("tfds:"):
    raise ConfigError("--data", f"{source}: preview reads files and the bundled corpus")
  form = None
  try:
    if source.strip() == "builtin":
      docs = data.builtin_documents("train")
      items = ((d, f"the bundled corpus, document {i}") for i, d in enumerate(docs))
    else:
      files = sources._resolve_paths(source)
      sources.check_columns_read(files, columns)
      form = sft.instruction_format(files, columns)
      if form:
        items = sources.read_files(files, lambda f, at: data.records(f, at, columns))
      else:  # documents, named by their file
        items = ((d, str(f)) for f in files for d in sources._file_documents(f, None, columns))
    items = list(itertools.islice(items, args.examples))
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError("--data", str(e)) from e
  if form:
    print(f"--data {source}: {sft.FORM_NAMES[form]}; the loss is on the [[marked]] tokens")
  else:
    print(
      f"--data {source}: text, every token trained (documents packed into rows of "
      "--seq-len + 1 tokens, or one per row with --no-packing)"
    )
  for record, where in items:
    print()
    if not form:  # packed: no row cuts a document, so its start is enough to show
      shown = record[:_PREVIEW_CHARS] + ("..." if len(record) > _PREVIEW_CHARS else "")
      print(f"{where}: {len(tok.encode(record)) + 1} tokens (with EOS)\n{shown}")
      continue
    try:
      ((toks, trained),) = sft.tokenize_examples([(record, where)], tok)
    except ValueError as e:
      raise ConfigError("--data", str(e)) from e
    print(sft.show_example(tok, toks, trained, seq_len, where))
  return 0


_PREVIEW_CHARS = 500  # of a text document


def _count(n: int, noun: str) -> str:
  return f"{n} {noun if n == 1 else noun[:-1] + 'ies' if noun.endswith('y') else noun + 's'}"


def _cmd_cache(args) -> int:
  import time

  from galore_jax import cache, compile_cache
  from galore_jax.config import ConfigError
  from galore_jax.memory_plan import fmt_bytes

  try:
    compile_dir = compile_cache.directory(args.compile_cache_dir)
  except ValueError as e:
    raise ConfigError("--compile-cache", str(e)) from e
  entries, hashes = cache.token_entries(), {}
  stale = {e: cache.stale_reason(e, hashes) for e in entries}
  stale_entries = [e for e in entries if stale[e]]
  tokens_dir = cache.sources.cache_dir() / "tokens"
  if args.remove in ("stale", "tokens", "all"):
    if args.remove == "stale":
      chosen = stale_entries
    else:
      chosen = cache.token_entries(locks=True)
      cache.clear_hash_records()
    kept = {e: why for e in chosen if (why := cache.remove_token_entry(e))}
    gone = [e for e in chosen if e not in kept]
    print(
      f"token cache {tokens_dir}: removed {_count(sum(e.readable for e in gone), 'entry')}, "
      f"{fmt_bytes(sum(e.size for e in gone))}"
    )
    for e, why in kept.items():
      print(f"  kept {e.describe()}: {why}")
  if args.remove in ("compile", "all") and compile_dir is not None:
    removed = cache.clear_compile_cache(compile_dir)
    print(
      f"compilation cache {compile_dir}: removed {removed.files} files, {fmt_bytes(removed.size)}"
    )
  if args.remove is not None:
    return 0

  print(
    f"token cache {tokens_dir}: {_count(len(entries), 'entry')}, "
    f"{fmt_bytes(sum(e.size for e in entries))}"
    + (
      f"; {len(stale_entries)} stale, {fmt_bytes(sum(e.size for e in stale_entries))}"
      if stale_entries
      else ""
    )
  )
  for e in entries:
    used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used)) if e.used else ""
    why = f"  [stale: {stale[e]}]" if stale[e] else ""
    print(f"  {used:16}  {fmt_bytes(e.size):>9}  {e.describe()}{why}")
  if compile_dir is not None:
    usage = cache.compile_cache_usage(compile_dir)
    print(f"compilation cache {compile_dir}: {usage.files} files, {fmt_bytes(usage.size)}")
  print(
    "galore-jax cache --remove stale removes the stale entries; "
    "--remove tokens, compile or all empties a cache"
  )
  return 0


def _versions() -> str:
  """This package's version and those of the libraries a bug report needs (read from the
  installed distributions: importing jax here would slow every --help)."""
  from importlib import metadata

  import galore_jax

  found = []
  for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
    try:
      found.append(f"{dist} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
      found.append(f"{dist} not installed")
  python = ".".join(map(str, sys.version_info[:3]))
  return f"galore-jax {galore_jax.__version__} ({', '.join(found)}; Python {python})"


def build_parser() -> argparse.ArgumentParser:
  from galore_jax.config import DTYPES, OPTIMIZERS, REMAT_MODES, SVD_METHODS, TrainConfig

  parser = argparse.ArgumentParser(
    prog="galore-jax",
    description="GaLore pretraining of LLaMA-style models in JAX.",
    formatter_class=argparse.RawDescriptionHelpFormatter,  # --version on one line
  )
  parser.add_argument("--version", action="version", version=_versions())
  sub = parser.add_subparsers(dest="command")
  p = sub.add_parser(
    "train", help="pretrain a model (default: llama_tiny + GaLore on the bundled corpus)"
  )
  _add_train_flags(p)
  p.set_defaults(fn=_cmd_train)

  p = sub.add_parser(
    "eval", help="perplexity of a checkpoint on its validation split, or on a held-out --data"
  )
  p.add_argument(
    "--checkpoint",
    required=True,
    help="run directory, its checkpoints/ or checkpoints/STEP, or a Hugging Face model "
    "directory or Hub id (the model before training)",
  )
  p.add_argument(
    "--data",
    default=None,
    help="default: what the run evaluated on (its --eval-data, else the documents it held "
    "out of its training data)",
  )
  p.add_argument(
    "--split",
    choices=("validation", "all"),
    default=None,
    help="validation: the documents held out from training (1 in 100 by hash for a path "
    "source); all: every document of --data. Default: all for a path source other than "
    "the run's training data (a held-out set of your own), else validation",
  )
  p.add_argument(
    "--columns",
    default=None,
    metavar="FIELD=COLUMN,...|none",
    help="as for train (default: the run's; none: the fields' own names)",
  )
  p.add_argument("--tokenizer", default=None, metavar="PATH", help="default: the run's")
  p.add_argument("--batch-size", type=int, default=None, help="default: the run's")
  p.add_argument("--seq-len", type=int, default=None, help="default: the run's")
  _add_inference_dtype_flags(p)
  p.add_argument(
    "--eval-batches",
    default=None,
    help="N or 'all' (default: the run's --eval-batches, the count train reported, for the "
    "validation split; all batches with --split all)",
  )
  p.add_argument(
    "--packing",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="--no-packing: one document (or instruction example) per row, from its first "
    "token (default: as the run trained; the loss of instruction examples is the same "
    "either way)",
  )
  p.add_argument("--json", action="store_true", help="print the result as one JSON line")
  p.add_argument(
    "--mesh",
    default=None,
    help="data=N,fsdp=M: evaluate on N*M devices, weights sharded over fsdp (default: one "
    "device; in a multi-process job, a mesh over all its devices)",
  )
  _add_compile_cache_flag(p)
  from galore_jax import distributed

  distributed.add_flags(p)
  p.set_defaults(fn=_cmd_eval)

  p = sub.add_parser(
    "export", help="write a checkpoint as a Hugging Face model directory (safetensors)"
  )
  p.add_argument("--checkpoint", required=True, help="run directory or its checkpoints/")
  p.add_argument("--out", required=True, help="directory to create")
  p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: the params' dtype")
  p.add_argument("--tokenizer", default=None, help="default: the run's")
  p.set_defaults(fn=_cmd_export)

  p = sub.add_parser("sample", help="generate text from a checkpoint")
  p.add_argument(
    "--checkpoint", required=True, help="as for eval (a run, a step, or a Hugging Face model)"
  )
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--prompt", help="'' starts a new document")
  which.add_argument(
    "--prompts",
    metavar="FILE",
    help='JSON lines {"prompt": "..."} (or {"messages": [...]}, a conversation, with --format '
    'chat; {"instruction", "input"} with --format alpaca), sampled --batch-size at a time; '
    'prints each record with its "completion" (the reply alone) and "finish_reason" (stop, '
    "length or context) as each batch ends",
  )
  p.add_argument(
    "--batch-size", type=int, default=8, help="prompts decoded together with --prompts (default 8)"
  )
  p.add_argument(
    "--out",
    metavar="REPLIES",
    help="with --prompts: append the replies to this JSON-lines file, synced per batch; a "
    "run killed mid-way continues where the file ends when run again with the same flags",
  )
  p.add_argument(
    "--format",
    choices=("text", "prompt", "chat", "alpaca"),
    help="lay the prompt out as training laid out its data: text (pretraining), prompt "
    "([BOS] prompt, as {prompt, completion} records), chat (a user turn, or a --prompts "
    "conversation, in the run's --chat-template or the tokenizer's; prints the reply), alpaca (an "
    "instruction, or --prompts {instruction, input}, in the Alpaca prompt). Default: the "
    "form of the run's --data (text for a Hugging Face model or a run older than this)",
  )
  p.add_argument(
    "--max-new-tokens", type=int, default=64, help="tokens per reply (default %(default)s)"
  )
  p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default %(default)s)")
  p.add_argument(
    "--top-k", type=int, default=40, help="sample among the k likeliest (default %(default)s)"
  )
  p.add_argument(
    "--top-p", type=float, default=1.0, help="nucleus sampling within the top-k (1: off)"
  )
  p.add_argument("--seed", type=int, default=0, help="of the sampling (default %(default)s)")
  _add_inference_dtype_flags(p)
  p.add_argument("--tokenizer", default=None, metavar="PATH", help="default: the run's")
  p.add_argument(
    "--mesh", default=None, help="data=N,fsdp=M: weights sharded over fsdp (default: one device)"
  )
  _add_compile_cache_flag(p)
  p.set_defaults(fn=_cmd_sample)

  d = TrainConfig()
  p = sub.add_parser(
    "plan",
    help="predict peak GPU memory of a configuration without "
    "allocating it (and what to shrink if it does not fit)",
  )
  p.add_argument(
    "--model", default=None, help=f"llama_tiny, llama_60m, ..., llama_13b (default {d.model})"
  )
  p.add_argument(
    "--init-from",
    default=None,
    metavar="DIR|ORG/NAME",
    help="plan for a Hugging Face model directory's or Hub id's architecture (its "
    "config.json; no weights are read or fetched) instead of --model",
  )
  p.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="as for train")
  p.add_argument(
    "--adafactor-beta1",
    type=float,
    default=d.adafactor_beta1,
    help="as for train: Adafactor's first moment (0: none)",
  )
  p.add_argument("--rank", type=int, default=d.rank, help="GaLore rank")
  p.add_argument("--svd", default=d.svd, choices=SVD_METHODS, help="as for train")
  p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch")
  p.add_argument("--seq-len", type=int, default=d.seq_len, help="as for train")
  p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="as for train")
  p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="global norm; 0 = off")
  p.add_argument(
    "--param-dtype",
    default="bfloat16",
    choices=tuple(DTYPES),
    help="default bfloat16: the paper trains pure bf16",
  )
  p.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES), help="compute dtype")
  p.add_argument("--remat", default=d.remat, choices=REMAT_MODES, help="as for train")
  p.add_argument(
    "--vocab-size",
    type=int,
    default=None,
    help="default 32000 (the paper's T5 tokenizer); no tokenizer is loaded",
  )
  p.add_argument("--gpu-memory", default="24GB", help="e.g. 24GB, 24GiB, 80000MB (per device)")
  p.add_argument(
    "--data",
    default=d.data,
    metavar="SOURCE",
    help="as for train: local instruction records (read: the first one) are planned with the "
    "attention mask of packed examples; other data plans as text",
  )
  p.add_argument("--columns", default=None, metavar="FIELD=COLUMN,...", help="as for train")
  p.add_argument(
    "--packing", action=argparse.BooleanOptionalAction, default=d.packing, help="as for train"
  )
  p.add_argument(
    "--document-mask",
    action=argparse.BooleanOptionalAction,
    default=d.document_mask,
    help="as for train (planned with its attention mask)",
  )
  p.add_argument(
    "--mesh",
    default=None,
    help="data=N,fsdp=M as for train: plan one device of that mesh (params and optimizer "
    "state sharded over fsdp, each micro-batch over all N*M devices)",
  )
  p.add_argument(
    "--no-compile",
    dest="compile",
    action="store_false",
    help="analytic estimate only (compiling llama_7b on a CPU takes minutes)",
  )
  _add_memory_flags(p)
  p.add_argument("--json", action="store_true", help="print one JSON object")
  _add_compile_cache_flag(p)
  p.set_defaults(fn=_cmd_plan)

  p = sub.add_parser(
    "preview",
    help="show the first records of --data as the examples training makes of them: the "
    "text, the tokens, what the loss is taken on and what --seq-len cuts off",
  )
  p.add_argument(
    "--data", default=None, metavar="SOURCE", help="as for train (default: --checkpoint's)"
  )
  p.add_argument(
    "--columns",
    default=None,
    metavar="FIELD=COLUMN,...|none",
    help="as for train (default: --checkpoint's)",
  )
  p.add_argument(
    "--tokenizer",
    default=None,
    metavar="PATH",
    help="as for train (default: --checkpoint's or --init-from's)",
  )
  p.add_argument(
    "--init-from",
    default=None,
    metavar="DIR|ORG/NAME",
    help="a model directory or Hub id: its tokenizer",
  )
  p.add_argument(
    "--checkpoint",
    default=None,
    metavar="RUN",
    help="a run: its --data, --columns, tokenizer, --chat-template and --seq-len",
  )
  p.add_argument(
    "--chat-template",
    default=None,
    metavar="FILE|chatml|none",
    help="as for train (default: --checkpoint's, else the tokenizer's)",
  )
  p.add_argument(
    "--seq-len", type=int, default=None, help="as for train (default: the run's, else 128)"
  )
  p.add_argument("--examples", type=int, default=3, help="how many (default %(default)s)")
  p.set_defaults(fn=_cmd_preview)

  p = sub.add_parser(
    "cache",
    help="list the token and compilation caches (size, what each token entry holds, which "
    "are stale) or remove them",
  )
  p.add_argument(
    "--remove",
    choices=("stale", "tokens", "compile", "all"),
    default=None,
    help="stale: token entries whose source files were deleted or edited since (no run "
    "reads them again); tokens / compile / all: every entry of that cache. Entries being "
    "built are kept",
  )
  p.add_argument(
    "--compile-cache",
    dest="compile_cache_dir",
    default=None,
    metavar="DIR|none",
    help="the compilation cache to look at (default: the one train uses)",
  )
  p.set_defaults(fn=_cmd_cache)
  return parser


class _Interrupted(BaseException):
  """SIGINT / SIGTERM outside the training loop (imports, start-up, eval, sample)."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


def main(argv: list[str] | None = None) -> int:
  # Multi-process hook: a failed process of a job exits at once (galore_jax.distributed).
  try:
    code = _main_with_signals(argv)
  except BaseException:
    _end_job_on_failure(1, traceback=True)
    raise
  _end_job_on_failure(code)
  return code


def _end_job_on_failure(code: int, traceback: bool = False) -> None:
  dist = sys.modules.get("galore_jax.distributed")  # not imported: no job was joined
  if dist is not None:
    dist.end_job_on_failure(code, traceback=traceback)


# The signals this command received (:func:`_main_with_signals`).
_RECEIVED: list[int] = []


def _stop_point() -> None:
  """Raises a signal's ``_Interrupted`` again if Python ignored it: a handler's exception
  raised inside a gc callback (jax has one, and tokenizing or decoding runs the collector
  often) is only reported, not propagated. Called between batches of eval's data load,
  its evaluation and sample's generation."""
  if _RECEIVED:
    raise _Interrupted(_RECEIVED[0])


def _main_with_signals(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  # Until train() installs its own handlers (which save and exit), a signal ends the
  # command with one line and 128 + signum; nothing is being written then.
  received = _RECEIVED
  received.clear()
  armed = False

  def interrupt(signum, frame):
    del frame
    received.append(signum)
    if armed:
      raise _Interrupted(signum)

  from galore_jax.errors import hide_ignored_interrupts

  hide_ignored_interrupts(_Interrupted)  # one that Python ignored: _stop_point raises it again
  old = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    # The heavy imports (jax) with signals only recorded: an exception raised inside a C
    # extension's initialisation aborts the interpreter (nanobind: std::terminate).
    import galore_jax.train  # noqa: F401

    armed = True
    if received:
      raise _Interrupted(received[0])
    return _main(argv)
  except BaseException as e:
    if not received and not isinstance(e, KeyboardInterrupt):
      raise
    signum = received[0] if received else signal.SIGINT
    name = signal.Signals(signum).name
    print(f"galore-jax: interrupted by {name}; nothing was written", file=sys.stderr)
    return 128 + signum
  finally:
    for sig, handler in old.items():
      signal.signal(sig, handler)


class _StreamGuard:
  """``sys.stdout`` / ``sys.stderr`` of a command, kept from ending it.

  * A reader that goes away (``| head``, a killed ``tee``): Python ignores SIGPIPE, so a
    print to a closed pipe raises BrokenPipeError, which in ``train`` would end the run at
    its next log line and lose the steps since its last checkpoint. The first closed-pipe
    write points the descriptor at os.devnull (so the interpreter's last flush succeeds too)
    and sets ``reader_gone``: training goes on (everything it prints is also in
    metrics.jsonl), and ``sample --prompts`` stops after the batch in hand.
  * A full disk under a redirected log (``train > log.txt``): what cannot be written is
    dropped, and the run goes on (metrics.jsonl keeps its records until there is room)."""

  _FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

  def __init__(self, stream):
    self._stream = stream
    self.reader_gone = False

  def write(self, text: str) -> int:
    try:
      return self._stream.write(text)
    except BrokenPipeError:
      self._divert()
    except OSError as e:
      if e.errno not in self._FULL:
        raise
    return len(text)

  def flush(self) -> None:
    try:
      self._stream.flush()
    except BrokenPipeError:
      self._divert()
    except OSError as e:
      if e.errno not in self._FULL:
        raise

  def _divert(self) -> None:
    self.reader_gone = True
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, self._stream.fileno())
    os.close(devnull)

  def __getattr__(self, name):
    return getattr(self._stream, name)


def _reader_gone() -> bool:
  return getattr(sys.stdout, "reader_gone", False)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _one_line_warnings(show):
  """``warnings.showwarning`` that prints this package's warnings as its other messages
  are, ``galore-jax: warning: ...`` (Python's format adds the library file, line and
  source line), on process 0 of a job only (every process reads the same data and would
  say the same); other packages' warnings go to ``show``."""

  def show_warning(message, category, filename, lineno, file=None, line=None):
    if os.path.abspath(str(filename)).startswith(_PACKAGE_DIR + os.sep):
      from galore_jax import distributed

      if not distributed.joined_as_another_process():
        print(f"galore-jax: warning: {message}", file=sys.stderr if file is None else file)
    else:
      show(message, category, filename, lineno, file, line)

  return show_warning


def _main(argv: list[str]) -> int:
  stdout, stderr = sys.stdout, sys.stderr
  sys.stdout, sys.stderr = _StreamGuard(stdout), _StreamGuard(stderr)
  try:
    with warnings.catch_warnings():
      warnings.showwarning = _one_line_warnings(warnings.showwarning)
      return _run_command(argv)
  finally:
    sys.stdout, sys.stderr = stdout, stderr


def _run_command(argv: list[str]) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return EXIT_USAGE
  if args.command == "train":  # --resume takes the others from the run
    args.given = _given_train_flags(argv)

  from galore_jax import errors
  from galore_jax.checkpoint import CheckpointError, CheckpointWriteError
  from galore_jax.config import ConfigError
  from galore_jax.trainer import OutOfMemory, TrainingDiverged

  try:
    if hasattr(args, "compile_cache"):  # before the first compilation
      from galore_jax import compile_cache

      try:
        compile_cache.enable(args.compile_cache)
      except ValueError as e:
        raise ConfigError("--compile-cache", str(e)) from e
    return args.fn(args)
  except ConfigError as e:
    print(f"galore-jax: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except CheckpointError as e:
    print(f"galore-jax: error: --checkpoint/--resume: {e}", file=sys.stderr)
    return EXIT_USAGE
  except TrainingDiverged as e:
    print(f"galore-jax: error: training diverged: {e}", file=sys.stderr)
    return 1
  except (CheckpointWriteError, OutOfMemory) as e:
    print(f"galore-jax: error: {e}", file=sys.stderr)
    return 1
  except RuntimeError as e:  # eval, sample, export: XLA's error is a long traceback
    if not errors.is_out_of_memory(e):
      raise
    import jax

    from galore_jax import metrics

    hint = (
      errors.PLAN_HINT
      if args.command == "train"  # out of memory before its first step: placing the state
      else "a smaller --batch-size, or --mesh fsdp=N over several devices, lowers the peak"
    )
    pool = metrics.memory_pool(jax.local_devices())
    print(
      f"galore-jax: error: the device ran out of memory ({errors.first_line(e)}); {hint}"
      + (f"; {pool}" if pool else ""),
      file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
  sys.exit(main())
