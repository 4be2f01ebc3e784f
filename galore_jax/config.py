"""What a run is: :class:`TrainConfig`, its validation, and what it derives (model, schedule,
optimizer).

Every bad value is a :class:`ConfigError` naming its flag; the choice constants here are the
ones the CLI offers. The optimizer factory lives here too: like the model config, it is a pure
function of the configuration, and the trainer, the memory planner and the experiments all
build their optimizer from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
import optax

from galore_jax import adafactor, adam8bit, checkpoint, distributed, projector, targets
from galore_jax import model as model_lib
from galore_jax import optimizer as galore

OPTIMIZERS = (
  "adamw",
  "galore_adamw",
  "adamw8bit",
  "galore_adamw8bit",
  "adafactor",
  "galore_adafactor",
)
SVD_METHODS = projector.SVD_METHODS
REFRESH_SCHEDULES = galore.REFRESH_SCHEDULES
REFRESH_PROGRAMS = ("auto", "one", "two")
MOMENT_POLICIES = galore.MOMENT_POLICIES
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_MODES = ("none", "full", "save_matmuls")
LR_SCHEDULES = ("cosine", "linear", "constant")


class ConfigError(ValueError):
  """A bad flag value; ``flag`` names it for the CLI's one-line error."""

  def __init__(self, flag: str, message: str):
    # Data errors already name the flag (``--data 'x': ...``): name it once.
    message = message.removeprefix(f"{flag} ")
    super().__init__(f"{flag}: {message}")
    self.flag = flag


# --lr unset, starting from a Hugging Face model (--init-from): a full fine-tune's usual rate
# (Stanford Alpaca's, Llama 2's SFT), not pretraining's from scratch. Adam moves each entry
# by about lr per step whatever the gradient's scale: at 0.01 (GaLore's weights 0.0025) a
# step is a large part of an entry of a model initialised at std 0.02, and a pretrained
# model soon loses what it learned (the README's fine-tuning section has a measurement).
FINETUNE_LR = 2e-5


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run depends on. Defaults: the main job (llama_tiny, GaLore, bundled corpus)."""

  model: str = "llama_tiny"
  # A Hugging Face model directory to start from: its config.json replaces --model, its
  # weights replace the random init, its tokenizer is the default one (galore_jax.hf).
  init_from: str | None = None
  optimizer: str = "galore_adamw"
  rank: int = 64
  update_proj_gap: int = 50  # paper: 200 over 10K+ steps; 50 refreshes the main job 3 times
  galore_scale: float = 0.25
  # The trainer refreshes by warm-started subspace iteration: on an H200 one llama_1b
  # refresh costs 0.69 s against 55 s for the exact SVD (README, "GPU benchmark"), and its
  # training curve matches exact's within 0.5 %. galore_adamw's own default stays exact.
  svd: str = "subspace"
  subspace_iters: int = 2  # block power rounds per refresh with svd="subspace"
  refresh_schedule: str = "synchronous"
  # The train step as one program that decides on the device whether GaLore refreshes, or
  # two (with and without a refresh) picked per step on the host from the optimizer's
  # count: "auto" takes two on GPUs, where each refresh branch of the one program is a
  # host round trip on every step, and one elsewhere (trainer.refresh_programs).
  refresh_programs: str = "auto"
  # What Adam's moments do when a projector changes: keep (the reference), reproject (the
  # first moment rotated into the new basis) or reset.
  moment_policy: str = "keep"
  lr: float | None = None  # None: 0.01 for GaLore (paper), 1e-3 for Adam; init_from: FINETUNE_LR
  warmup: int | None = None  # None: 10% of steps (paper)
  schedule: str = "cosine"  # after warmup: cosine or linear decay to min_lr_ratio, or constant
  min_lr_ratio: float = 0.1  # the final rate over the peak (reference: 0.1)
  steps: int = 150
  batch_size: int = 8
  seq_len: int = 128
  grad_accum: int = 1
  grad_clip: float = 0.0  # 0: off (the paper clips nothing at <= 1B)
  weight_decay: float = 0.0
  b1: float = 0.9
  # Adafactor's first moment (--optimizer adafactor / galore_adafactor); 0: none, as the
  # reference's torchrun_main by default.
  adafactor_beta1: float = 0.0
  b2: float = 0.999
  eps: float = 1e-6
  data: str = "builtin"
  # "FIELD=COLUMN,...": record fields read from columns of other names (data.parse_columns)
  columns: str | None = None
  # A held-out source evaluated whole during training (None: the documents held out of data).
  eval_data: str | None = None
  tokenizer: str | None = None
  # A chat template (its Jinja text) for "messages" records, in place of the tokenizer's
  # (sft.read_chat_template: --chat-template FILE or a preset name).
  chat_template: str | None = None
  packing: bool = True
  # Packed text: each document attends only to itself (data.DataConfig.document_mask).
  document_mask: bool = False
  eval_every: int = 50
  eval_batches: int = 16
  save_every: int = 100
  log_every: int = 1
  seed: int = 0
  out: str | None = None  # None: runs/<model>_<optimizer>_<timestamp>
  # True: continue the run in --out; "auto": continue it if it has a checkpoint, else start
  # (over the outputs of a run that saved none): a requeued job's one command.
  resume: bool | str = False
  stop_after: int | None = None  # stop (with a checkpoint) after this many steps in this run
  mesh: str | None = None  # "data=N,fsdp=M"
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"
  # Update each layer as soon as its gradient exists (needs no clipping unless
  # per_layer_clip, and grad_accum 1 or lowrank_accum).
  per_layer_updates: bool = True
  # With grad_clip: keep per-layer updates, taking the global norm in a first forward and
  # backward pass (per-layer memory, about twice the step's compute).
  per_layer_clip: bool = False
  # With GaLore and grad_accum > 1: accumulate projected (r x n) gradients in the per-layer
  # step instead of a float32 copy of the whole gradient.
  lowrank_accum: bool = True
  projector_dtype: str | None = None  # None: the param dtype (reference)
  max_nonfinite: int = 20  # consecutive skipped steps before the run stops with an error
  keep_checkpoints: int = checkpoint.KEEP_CHECKPOINTS  # newest checkpoints kept by rotation
  overwrite: bool = False  # start over in an --out that holds a previous run's outputs
  progress: bool = True
  peak_tflops: float | None = None  # per device, for mfu; None: known GPUs' datasheet peak
  profile_steps: str | None = None  # "A:B": a jax.profiler trace of steps A+1..B
  # "23h50m" or "23:50:00": stop with a checkpoint before this much time has passed (a
  # batch job's wall-clock limit); measured from train()'s `started` (the CLI: the process's
  # start).
  time_limit: str | None = None
  wandb: bool = False  # also log to Weights & Biases (the `wandb` extra)

  @property
  def is_galore(self) -> bool:
    return self.optimizer.startswith("galore")

  @property
  def is_adafactor(self) -> bool:
    return self.optimizer.endswith("adafactor")

  @property
  def peak_lr(self) -> float:
    if self.lr is not None:
      return self.lr
    return FINETUNE_LR if self.init_from else self.pretraining_lr

  @property
  def pretraining_lr(self) -> float:
    """``--lr`` unset, from scratch: the paper's 0.01 for GaLore, 1e-3 for full-rank Adam."""
    return 0.01 if self.is_galore else 1e-3

  @property
  def warmup_steps(self) -> int:
    return self.warmup if self.warmup is not None else self.steps // 10


# ---------------------------------------------------------------------------
# Validation: every bad value is a ConfigError naming its flag.


def parse_mesh(spec: str | None) -> tuple[int, int]:
  """``"data=2,fsdp=4"`` -> (2, 4); ``None`` -> (1, 1)."""
  if not spec:
    return 1, 1
  sizes = {"data": 1, "fsdp": 1}
  for part in spec.split(","):
    name, _, value = part.partition("=")
    if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
      raise ConfigError("--mesh", f"expected data=N,fsdp=M with N, M >= 1, got {spec!r}")
    sizes[name.strip()] = int(value)
  return sizes["data"], sizes["fsdp"]


def parse_profile_steps(spec: str | None, steps: int) -> tuple[int, int] | None:
  """``"A:B"`` -> (A, B): trace the updates after step A up to step B (0 <= A < B <= steps)."""
  if spec is None:
    return None
  a, sep, b = spec.partition(":")
  if not sep or not a.strip().isdigit() or not b.strip().isdigit():
    raise ConfigError("--profile-steps", f"expected A:B with whole numbers A < B, got {spec!r}")
  a_i, b_i = int(a), int(b)
  if not a_i < b_i:
    raise ConfigError("--profile-steps", f"A must be less than B, got {spec!r}")
  if b_i > steps:
    raise ConfigError("--profile-steps", f"B must be <= --steps {steps}, got {spec!r}")
  return a_i, b_i


_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(spec: str | None) -> float | None:
  """``--time-limit``: ``"23h50m"``, ``"90m"``, ``"1d"``, ``"45s"`` (units d, h, m, s, in
  that order) or SLURM's ``"HH:MM:SS"`` / ``"D-HH:MM:SS"`` -> seconds. A bare number is
  refused: minutes or seconds would be a guess."""
  if spec is None:
    return None
  text = spec.strip().lower()
  why = f"expected a duration such as 23h50m, 90m or 23:50:00, got {spec!r}"
  if ":" in text:
    days, _, clock = text.rpartition("-")
    parts = clock.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
      raise ConfigError("--time-limit", why)
    if days and not days.isdigit():
      raise ConfigError("--time-limit", why)
    h, m, sec = ([0] * (3 - len(parts))) + [int(p) for p in parts]
    seconds = (int(days or 0) * 24 + h) * 3600 + m * 60 + sec
  else:
    found = re.fullmatch(
      r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?"
      r"(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?",
      text,
    )
    if not text or found is None:
      raise ConfigError("--time-limit", why)
    amounts = zip(found.groups(), "dhms", strict=True)
    seconds = sum(float(v or 0) * _DURATION_UNITS[unit] for v, unit in amounts)
  if not seconds > 0:
    raise ConfigError("--time-limit", f"must be more than 0, got {spec!r}")
  return float(seconds)


def base_model_config(cfg: TrainConfig, hf_config: dict | None = None) -> model_lib.LlamaConfig:
  """The architecture: ``--init-from``'s config.json (or ``hf_config``, the copy a
  checkpoint keeps of it), else the named ``--model``."""
  if not cfg.init_from:
    return model_lib.get_config(cfg.model)
  from galore_jax import hf

  try:
    if hf_config is not None:
      return hf.config_from_dict(hf_config, where=f"{cfg.init_from}/config.json")
    return hf.read_config(cfg.init_from)
  except (OSError, ValueError) as e:
    raise ConfigError("--init-from", str(e)) from e


def model_config(
  cfg: TrainConfig, vocab_size: int, hf_config: dict | None = None
) -> model_lib.LlamaConfig:
  try:
    base = base_model_config(cfg, hf_config)
    if cfg.init_from:  # the checkpoint's vocabulary; the tokenizer may use fewer ids
      if vocab_size > base.vocab_size:
        raise ConfigError(
          "--tokenizer",
          f"vocabulary of {vocab_size} is larger than the model's {base.vocab_size} "
          f"({cfg.init_from})",
        )
      vocab_size = base.vocab_size
    return dataclasses.replace(
      base,
      vocab_size=vocab_size,
      param_dtype=DTYPES[cfg.param_dtype],
      dtype=DTYPES[cfg.dtype],
      remat=cfg.remat,
    )
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError("--model", str(e)) from e


def validate(cfg: TrainConfig, hf_config: dict | None = None) -> None:
  """Checks flags that need no data or devices; raises ConfigError. ``hf_config``:
  ``--init-from``'s config.json as a checkpoint kept it (None: read from the directory)."""
  if cfg.model not in model_lib.CONFIGS and not cfg.init_from:
    raise ConfigError(
      "--model", f"unknown model {cfg.model!r}; choose from {', '.join(model_lib.CONFIGS)}"
    )
  if cfg.optimizer not in OPTIMIZERS:
    raise ConfigError(
      "--optimizer", f"unknown optimizer {cfg.optimizer!r}; choose from {', '.join(OPTIMIZERS)}"
    )
  mc = base_model_config(cfg, hf_config)
  name = cfg.init_from or cfg.model  # the architecture the messages below speak of
  for flag, value in [
    ("--steps", cfg.steps),
    ("--batch-size", cfg.batch_size),
    ("--seq-len", cfg.seq_len),
    ("--grad-accum", cfg.grad_accum),
    ("--update-proj-gap", cfg.update_proj_gap),
    ("--rank", cfg.rank),
    ("--eval-every", cfg.eval_every),
    ("--eval-batches", cfg.eval_batches),
    ("--save-every", cfg.save_every),
    ("--keep-checkpoints", cfg.keep_checkpoints),
    ("--max-nonfinite", cfg.max_nonfinite),
  ]:
    if value < 1:
      raise ConfigError(flag, f"must be >= 1, got {value}")
  check_seq_len(cfg.seq_len, name, mc.max_seq_len)
  smallest = min(mc.hidden_size, mc.intermediate_size)
  if cfg.is_galore and cfg.rank > smallest:
    raise ConfigError(
      "--rank",
      f"{cfg.rank} is larger than the smallest projected matrix dimension of {name} ({smallest})",
    )
  # NaN compares false with everything: `not x > 0` rejects it, `x < 0` would not.
  for flag, value, low, strict in [
    ("--lr", cfg.lr, 0.0, True),
    ("--galore-scale", cfg.galore_scale, 0.0, True),
    ("--grad-clip", cfg.grad_clip, 0.0, False),
    ("--weight-decay", cfg.weight_decay, 0.0, False),
  ]:
    if value is None:
      continue
    if not math.isfinite(value) or not (value > low if strict else value >= low):
      raise ConfigError(
        flag, f"must be a finite number {'>' if strict else '>='} {low:g}, got {value}"
      )
  if not 0.0 <= cfg.adafactor_beta1 < 1.0:  # (NaN fails both comparisons)
    raise ConfigError("--adafactor-beta1", f"must be in [0, 1), got {cfg.adafactor_beta1}")
  if cfg.adafactor_beta1 and not cfg.is_adafactor:
    raise ConfigError(
      "--adafactor-beta1",
      f"applies to --optimizer adafactor or galore_adafactor, not {cfg.optimizer}",
    )
  if cfg.warmup is not None and not 0 <= cfg.warmup <= cfg.steps:
    raise ConfigError("--warmup", f"must be in [0, --steps], got {cfg.warmup}")
  if cfg.schedule not in LR_SCHEDULES:
    raise ConfigError(
      "--schedule", f"must be one of {', '.join(LR_SCHEDULES)}, got {cfg.schedule!r}"
    )
  if not 0.0 <= cfg.min_lr_ratio <= 1.0:  # (NaN fails both comparisons)
    raise ConfigError("--min-lr-ratio", f"must be in [0, 1], got {cfg.min_lr_ratio}")
  if cfg.columns:
    from galore_jax.data import sources  # lazy: only a run that names columns needs it

    if not sources.is_path_source(cfg.data):
      raise ConfigError("--columns", f"names columns of files; --data {cfg.data} has none")
    try:
      sources.parse_columns(cfg.columns)
    except ValueError as e:
      raise ConfigError("--columns", str(e)) from e
  if cfg.document_mask and not cfg.packing:
    raise ConfigError(
      "--document-mask", "keeps packed documents apart; with --no-packing a row holds one"
    )
  if cfg.chat_template is not None and not ("{{" in cfg.chat_template or "{%" in cfg.chat_template):
    # A preset's name or a path where the template's text belongs (a library caller's
    # TrainConfig) would render every conversation as that word.
    raise ConfigError(
      "--chat-template",
      f"{cfg.chat_template[:60]!r} is no Jinja template's text (a preset or a file? "
      "galore_jax.sft.read_chat_template reads either)",
    )
  if cfg.svd not in SVD_METHODS:
    raise ConfigError("--svd", f"must be one of {', '.join(SVD_METHODS)}, got {cfg.svd!r}")
  if cfg.subspace_iters < 1:
    raise ConfigError("--subspace-iters", f"must be >= 1, got {cfg.subspace_iters}")
  if cfg.refresh_schedule not in REFRESH_SCHEDULES:
    raise ConfigError("--refresh-schedule", f"must be one of {REFRESH_SCHEDULES}")
  if cfg.refresh_programs not in REFRESH_PROGRAMS:
    raise ConfigError(
      "--refresh-programs",
      f"must be one of {', '.join(REFRESH_PROGRAMS)}, got {cfg.refresh_programs!r}",
    )
  if cfg.refresh_programs == "two" and not (
    cfg.is_galore and cfg.refresh_schedule == "synchronous"
  ):
    raise ConfigError(
      "--refresh-programs",
      "two needs a GaLore optimizer with --refresh-schedule synchronous (a staggered "
      "schedule refreshes some weight at most steps; other optimizers have no refresh)",
    )
  if cfg.moment_policy not in MOMENT_POLICIES:
    raise ConfigError(
      "--moment-policy", f"must be one of {', '.join(MOMENT_POLICIES)}, got {cfg.moment_policy!r}"
    )
  if cfg.moment_policy != "keep" and not cfg.is_galore:
    raise ConfigError("--moment-policy", f"applies to GaLore optimizers, not {cfg.optimizer}")
  if cfg.moment_policy == "reproject" and cfg.optimizer != "galore_adamw":
    # 8-bit Adam stores its first moment quantized (no linear change of basis); Adafactor
    # has none unless --adafactor-beta1.
    raise ConfigError(
      "--moment-policy",
      f"reproject rotates Adam's float32 first moment: --optimizer galore_adamw, not "
      f"{cfg.optimizer}",
    )
  if cfg.param_dtype not in DTYPES or cfg.dtype not in DTYPES:
    raise ConfigError("--param-dtype", f"dtypes must be one of {', '.join(DTYPES)}")
  if cfg.projector_dtype is not None and cfg.projector_dtype not in DTYPES:
    raise ConfigError("--projector-dtype", f"must be one of {', '.join(DTYPES)}")
  if cfg.remat not in REMAT_MODES:
    raise ConfigError("--remat", f"must be none, full or save_matmuls, got {cfg.remat!r}")
  if cfg.per_layer_clip and not (cfg.grad_clip > 0 and cfg.per_layer_updates):
    raise ConfigError("--per-layer-clip", "needs --grad-clip > 0 and per-layer updates")
  if cfg.per_layer_clip and cfg.grad_accum > 1:
    raise ConfigError(
      "--per-layer-clip",
      "takes one micro-batch (the low-rank accumulators have no norm of "
      "the whole gradient); use --grad-accum 1",
    )
  if cfg.resume not in (False, True, "auto"):
    raise ConfigError("--resume", f"takes nothing or auto, got {cfg.resume!r}")
  if cfg.resume and cfg.overwrite:
    raise ConfigError("--overwrite", "cannot be combined with --resume")
  parse_profile_steps(cfg.profile_steps, cfg.steps)
  parse_duration(cfg.time_limit)
  if cfg.wandb:
    try:
      import wandb  # noqa: F401
    except ImportError:
      raise ConfigError(
        "--wandb", "needs the wandb package: pip install 'galore-jax[wandb]'"
      ) from None
  if cfg.peak_tflops is not None and not (math.isfinite(cfg.peak_tflops) and cfg.peak_tflops > 0):
    raise ConfigError("--peak-tflops", f"must be a finite number > 0, got {cfg.peak_tflops}")
  if cfg.stop_after is not None and cfg.stop_after < 1:
    raise ConfigError("--stop-after", f"must be >= 1, got {cfg.stop_after}")
  check_mesh(cfg.mesh, cfg.batch_size)


def check_seq_len(seq_len: int, model: str, max_seq_len: int) -> None:
  """``--seq-len`` fits the model; raises ConfigError. Shared by ``train`` and ``eval``."""
  if seq_len > max_seq_len:
    raise ConfigError(
      "--seq-len", f"{seq_len} exceeds {model}'s maximum sequence length {max_seq_len}"
    )


def check_mesh(mesh: str | None, batch_size: int | None = None) -> None:
  """``--mesh`` fits this process or job (and divides ``batch_size`` if given); raises
  ConfigError. Shared by ``train`` and the commands that load a checkpoint onto a mesh."""
  data_n, fsdp_n = parse_mesh(mesh)
  if data_n * fsdp_n > jax.device_count():
    raise ConfigError("--mesh", f"needs {data_n * fsdp_n} devices, {jax.device_count()} available")
  if problem := distributed.mesh_problem(data_n * fsdp_n):  # multi-process: every device
    raise ConfigError("--mesh", problem)
  if batch_size is not None and batch_size % (data_n * fsdp_n):
    raise ConfigError(
      "--batch-size",
      f"{batch_size} is not divisible by the {data_n * fsdp_n} devices of --mesh {mesh}",
    )


def absolute_source(source: str) -> str:
  """``--data`` as stored in a run: paths made absolute (``eval`` may run elsewhere)."""
  if not source.strip() or source.strip() == "builtin" or source.startswith(("tfds:", "hf://")):
    return source  # (an empty one is refused by the data pipeline)
  return os.path.abspath(os.path.expanduser(source))


# ---------------------------------------------------------------------------
# Optimizer.


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 over ``warmup_steps``, then to ``steps``: cosine (the reference's
  default) or linear decay to ``min_lr_ratio`` of the peak, or the peak held (``constant``)."""
  peak, warmup = cfg.peak_lr, cfg.warmup_steps
  if warmup >= cfg.steps:
    return optax.linear_schedule(0.0, peak, cfg.steps)
  end = peak * cfg.min_lr_ratio
  if cfg.schedule == "cosine":  # as before there were other schedules: resumes stay exact
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, cfg.steps, end_value=end)
  if cfg.schedule == "linear":
    after = optax.linear_schedule(peak, end, cfg.steps - warmup)
  else:
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


_COURSE_FLAGS = {  # flags a resume may change; each changes the run's course from there on
  "steps": "--steps",
  "lr": "--lr",
  "warmup": "--warmup",
  "schedule": "--schedule",
  "min_lr_ratio": "--min-lr-ratio",
  "grad_clip": "--grad-clip",
  "weight_decay": "--weight-decay",
  "galore_scale": "--galore-scale",
  "subspace_iters": "--subspace-iters",
  "moment_policy": "--moment-policy",
  "adafactor_beta1": "--adafactor-beta1",
  "document_mask": "--document-mask",
}


def resume_changes(saved: dict, cfg: TrainConfig, step: int) -> str | None:
  """What a resume at ``step`` changes about the course of the run that saved the checkpoint
  (``saved``: its ``train_config``), as one line, or None.

  Such flags may change on resume (lowering the rate after a loss spike, extending a run);
  this line says so. (The CLI takes every flag not given from the run; a library caller's
  ``TrainConfig`` that left one out shows here.) Compared as effective values (``--lr``
  unset is the optimizer's default; ``--warmup`` unset is 10 % of ``--steps``), with the
  rate of the next step under both schedules when the schedule changed.
  """
  # A flag older versions did not have (or save) had its default then.
  defaults = TrainConfig()
  old = dataclasses.replace(cfg, **{k: saved.get(k, getattr(defaults, k)) for k in _COURSE_FLAGS})
  if old.lr is None:  # the rate it ran at; a record without one predates FINETUNE_LR
    old = dataclasses.replace(old, lr=saved.get("peak_lr", cfg.pretraining_lr))

  def course(c: TrainConfig) -> dict:
    values = {k: getattr(c, k) for k in _COURSE_FLAGS}
    values.update(lr=c.peak_lr, warmup=c.warmup_steps)
    if not c.is_galore:
      values.pop("galore_scale"), values.pop("subspace_iters"), values.pop("moment_policy")
    elif c.svd != "subspace":
      values.pop("subspace_iters")
    if not c.is_adafactor:
      values.pop("adafactor_beta1")
    return values

  before, now = course(old), course(cfg)

  def said(k, v) -> str:
    flag = _COURSE_FLAGS[k]
    if isinstance(v, bool):  # a switch by its form
      return flag if v else flag.replace("--", "--no-", 1)
    return f"{flag} {v}" if isinstance(v, str) else f"{flag} {v:g}"

  def was(k, v) -> str:  # the value alone; a switch by its form
    return said(k, v) if isinstance(v, bool) else said(k, v).split(" ", 1)[1]

  changed = [f"{said(k, now[k])} (was {was(k, before[k])})" for k in now if now[k] != before[k]]
  if not changed:
    return None
  line = f"resuming at step {step} with changed {', '.join(changed)}"
  lr_new, lr_old = float(lr_schedule(cfg)(step)), float(lr_schedule(old)(step))
  if lr_new != lr_old:
    line += (
      f"; the next step's learning rate is {lr_new:.4g} (the first run's schedule: {lr_old:.4g})"
    )
  return line


def batched_lapack_hangs(cfg: TrainConfig) -> bool:
  """Whether a batched decomposition (SVD, Cholesky, eigh, QR of a stack of matrices) can
  hang this run's step: true on a mesh of several devices on the CPU backend.

  jaxlib's CPU LAPACK kernels split a batch into tasks on XLA's intra-op thread pool and
  block until they are done, while themselves running on a worker of that same pool. When
  every worker does so at once (one per device of a CPU mesh, each refreshing a stacked
  group), no worker is left to run the tasks. Seen as a GaLore step that never finished its
  first refresh on a 4-device CPU mesh: native stacks showed every ``tf_XLAEigen`` worker
  waiting in ``jax::ParallelBatchMap`` under ``lapack_sgesdd_ffi``. A batch of one runs
  inline, so the trainer refreshes each leaf on its own there. GPU decompositions are
  cuSOLVER calls on a stream and are not affected.
  """
  if math.prod(parse_mesh(cfg.mesh)) == 1:
    return False  # checked first: no backend query (and start-up) for a one-device run
  return jax.default_backend() == "cpu"


def adam8bit_layout(cfg: TrainConfig, mesh: jax.sharding.Mesh | None = None) -> dict:
  """How the run's 8-bit Adam updates its quantised leaves (``scale_by_adam8bit``'s
  ``chunk_size`` and ``rows_sharding``).

  On one fsdp shard, large leaves go chunk by chunk (the default), which bounds their
  float32 temporaries. Under FSDP (``fsdp > 1``) the codes are sharded over their block
  rows, so a chunk is a slice of sharded rows, which XLA compiles as an all-gather of the
  leaf's whole code arrays; each device's rows are already ``1/fsdp`` of the leaf, so the
  update runs unchunked. Given the run's ``mesh``, the leaf's gradient and update keep the
  sharding the trainer gives an array of their shape (a full-rank leaf's: its parameter's)
  and the gradient's block rows the codes' (:func:`galore_jax.sharding.fsdp_spec` of each
  shape): without that, XLA computes the LM head's gradient directly in the block-row
  layout by all-gathering the batch's logits.
  Measured (CPU, 8 host devices, XLA's temp bytes of the per-layer step, 8 x 256 tokens):
  llama_130m bf16 on ``fsdp=8``, 8-bit GaLore 665 MB chunked, 878 MB unchunked alone, 483 MB
  unchunked and constrained (float32 GaLore 470 MB); llama_60m on ``data=2,fsdp=4``, 468 MB
  chunked, 340 MB constrained (float32 GaLore 340 MB).
  """
  fsdp = parse_mesh(cfg.mesh)[1]
  if fsdp == 1:
    return {}
  rows = None
  if mesh is not None:
    from galore_jax import sharding

    def rows(shape):
      return jax.sharding.NamedSharding(mesh, sharding.fsdp_spec(tuple(shape), fsdp))

  return {"chunk_size": None, "rows_sharding": rows}


def build_optimizer(
  cfg: TrainConfig,
  mesh: jax.sharding.Mesh | None = None,
  *,
  clip_in_step: bool = False,
  refresh: str = "scheduled",
  lr: float | jax.Array | None = None,
) -> optax.GradientTransformation:
  """The optimizer of ``cfg``; ``mesh``: the run's, for the sharding of the 8-bit update
  (:func:`adam8bit_layout`). ``clip_in_step``: the train step clips by the global norm
  itself (``steps.clips_in_step``), so ``--grad-clip``'s place in the chain holds an
  identity (the same, empty, state: checkpoints of either step load in the other).
  ``refresh``: :func:`galore_jax.galore`'s, for the trainer's two programs (GaLore only).

  ``lr``: the rate of the step being traced (a scalar, usually a traced argument of it),
  in place of :func:`lr_schedule`. The trainer's step takes the rate as an argument, so
  that the schedule's settings (``--steps``, ``--lr``, ``--warmup``, ``--schedule``,
  ``--min-lr-ratio``) are not constants of the compiled program: an lr sweep or a resume
  that extends the run loads the same compiled step. The transforms that read the rate
  keep their schedule counts, so the state, and the checkpoints, are the same either way.
  """
  sched = lr_schedule(cfg) if lr is None else (lambda count: lr)
  # Adafactor as galore-torch's torchrun_main builds it: the schedule's rate (no relative
  # step size, no parameter scale), a first moment only with --adafactor-beta1, the old
  # weight decayed.
  last = [
    optax.scale_by_learning_rate(sched),
    galore.decay_updated_weights(sched, cfg.weight_decay),
  ]
  if cfg.is_adafactor:
    inner, descent = adafactor.step_and_descent(
      sched,
      beta1=cfg.adafactor_beta1 or None,
      weight_decay=cfg.weight_decay,
      relative_step=False,
      scale_parameter=False,
    )
    last = [descent]  # the rate is inside Adafactor's step
  elif cfg.optimizer.endswith("8bit"):
    inner = adam8bit.scale_by_adam8bit(
      b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, **adam8bit_layout(cfg, mesh)
    )
  else:
    inner = galore.scale_by_adam_hf(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.is_galore:
    core = galore.galore(
      inner,
      rank=cfg.rank,
      update_proj_gap=cfg.update_proj_gap,
      scale=cfg.galore_scale,
      mask=targets.llama_targets,
      matrix_axes=targets.reference_side_axes,
      svd=cfg.svd,
      subspace_iters=cfg.subspace_iters,
      refresh_schedule=cfg.refresh_schedule,
      moment_policy=cfg.moment_policy,
      projector_dtype=DTYPES[cfg.projector_dtype] if cfg.projector_dtype else None,
      seed=cfg.seed,
      refresh_batch_elements=1 if batched_lapack_hangs(cfg) else None,
      inner_params="full" if cfg.is_adafactor else "low_rank",
      refresh=refresh,
    )
  else:
    core = inner
  clip = optax.identity() if clip_in_step else optax.clip_by_global_norm(cfg.grad_clip)
  parts = [clip] if cfg.grad_clip > 0 else []
  return optax.chain(*parts, core, *last)
