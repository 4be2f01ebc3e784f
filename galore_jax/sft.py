"""Instruction data for fine-tuning: the loss is taken on the answers only.

A ``--data`` file of JSON lines (or a JSON array; ``.gz`` / ``.xz`` allowed) whose records
are either

* ``{"prompt": "...", "completion": "..."}``: one example is ``[BOS] prompt completion
  EOS`` (BOS when the tokenizer has one), prompt and completion tokenized separately so
  the boundary is exact; the targets that are completion tokens or the final EOS are
  trained, the prompt's are not; or
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: the conversation rendered with
  the tokenizer's chat template (``chat_template`` in ``tokenizer_config.json``); the text
  of every assistant turn, as the template renders it (its end-of-turn token included),
  is trained, everything else is not.

**No packing.** Each example is one row of ``seq_len + 1`` tokens, truncated at the end and
padded (padding masked), whatever ``--no-packing`` says: examples never share a row, so no
example attends to another and no segment ids are needed in attention. Instruction
examples are short, so the padding costs less than it would for pretraining text.

Masking is the batch's ``mask`` (1.0 on trained targets), which the train step already
multiplies into the token loss: a prompt token contributes nothing to the loss and gets
no gradient. The train / validation split is the path rule of ``galore_jax.data`` applied
to each record's canonical JSON (1 in 100 by content hash, at least one record).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from galore_jax import data


def _read_records(path: Path) -> list[tuple[Any, str]]:
  """(record, where) for every JSON record of a .jsonl / .json file (compressed or not)."""
  return list(data.json_records(path))


def _kind(record: Any) -> str | None:
  if isinstance(record, dict):
    if "prompt" in record and "completion" in record:
      return "prompt"
    if "messages" in record:
      return "messages"
  return None


def is_instruction_data(files: Sequence[Path]) -> bool:
  """Whether the first record of the first JSON file is a prompt/completion or chat record."""
  for f in files:
    fmt, _ = data.file_kind(f)
    if fmt in (".txt", ".parquet"):  # text only
      return False
    try:  # the first record only: a C4 shard is not read whole at every start
      with contextlib.closing(data.json_records(f)) as records:
        first = next(records, None)
    except (ValueError, OSError, EOFError):
      return False  # let the text reader report it
    if first is not None:
      return _kind(first[0]) is not None
  return False


def render_chat(template: str, messages: list, *, add_generation_prompt: bool, **specials) -> str:
  """A chat template rendered as transformers renders it (sandboxed Jinja, trimmed blocks)."""
  import jinja2.sandbox

  def raise_exception(message):
    raise ValueError(f"chat template: {message}")

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template).render(
    messages=messages, add_generation_prompt=add_generation_prompt, **specials
  )


def _chat_renderer(tok, where: str):
  """``render(messages, add_generation_prompt)`` with the tokenizer's chat template."""
  template = getattr(tok, "chat_template", None)
  if not template:
    raise ValueError(
      f'{where}: "messages" records need a tokenizer with a chat template '
      "(chat_template in tokenizer_config.json)"
    )
  specials = {}
  for name, fn in (("bos_token", "bos_id"), ("eos_token", "eos_id")):
    i = getattr(tok, fn)()
    specials[name] = tok.id_to_piece(i) if i >= 0 else ""
  return lambda msgs, gen: render_chat(template, msgs, add_generation_prompt=gen, **specials)


def _check_messages(messages: Any, where: str) -> None:
  if not isinstance(messages, list) or not all(
    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
    for m in messages
  ):
    raise ValueError(f'{where}: "messages" must be a list of {{"role", "content"}} objects')


def _chat_segments(rec: dict, where: str, tok) -> list[tuple[str, bool]]:
  """The rendered conversation as (text, trained) pieces: assistant turns are trained.

  Turn ``i``'s text is what rendering ``messages[: i + 1]`` adds to rendering
  ``messages[:i]`` with the generation prompt; every rendering must extend the previous
  one (true of ordinary templates), otherwise the turn boundaries are unknown.
  """
  render = _chat_renderer(tok, where)
  messages = rec["messages"]
  _check_messages(messages, where)
  full = render(messages, False)
  pieces: list[tuple[str, bool]] = []
  done = 0
  for i, m in enumerate(messages):
    if m.get("role") != "assistant":
      continue
    start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
    if not (full.startswith(render(messages[: i + 1], False)) and done <= start <= end):
      raise ValueError(f"{where}: the chat template does not render turn by turn")
    pieces += [(full[done:start], False), (full[start:end], True)]
    done = end
  pieces.append((full[done:], False))
  return [(t, trained) for t, trained in pieces if t]


def tokenize_examples(
  records: Sequence[tuple[Any, str]], tok
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Each record -> (tokens int32, trained bool per token); see the module docstring."""
  eos, bos = tok.eos_id(), tok.bos_id()
  prefix = [bos] if bos >= 0 else []
  out: list[tuple[np.ndarray, np.ndarray]] = []
  prompts = [(r, w) for r, w in records if _kind(r) == "prompt"]
  for r, w in prompts:
    if not (isinstance(r["prompt"], str) and isinstance(r["completion"], str)):
      raise ValueError(f'{w}: "prompt" and "completion" must be strings')
  p_ids = tok.encode([r["prompt"] for r, _ in prompts]) if prompts else []
  c_ids = tok.encode([r["completion"] for r, _ in prompts]) if prompts else []
  by_prompt = iter(zip(p_ids, c_ids, strict=True))
  for r, w in records:
    kind = _kind(r)
    if kind == "prompt":
      p, c = next(by_prompt)
      toks = prefix + list(p) + list(c) + [eos]
      trained = [False] * (len(prefix) + len(p)) + [True] * (len(c) + 1)
    elif kind == "messages":
      toks, trained = [], []
      for text, flag in _chat_segments(r, w, tok):
        ids = tok.encode(text)
        toks += ids
        trained += [flag] * len(ids)
    else:
      raise ValueError(
        f'{w}: expected {{"prompt", "completion"}} or {{"messages"}} like the first record'
      )
    out.append((np.asarray(toks, np.int32), np.asarray(trained, bool)))
  return out


PROMPT_FORMATS = ("text", "prompt", "chat")


def prompt_ids(tok, prompt: str | list[dict], fmt: str, where: str = "--prompt") -> list[int]:
  """Token ids to sample a reply to ``prompt`` from, laid out as training laid out its data:

  * ``"text"``: the text as is (pretraining documents; an empty prompt is one EOS, the
    context every document follows);
  * ``"prompt"``: what a ``{"prompt", "completion"}`` example holds before its completion
    (``[BOS] prompt``);
  * ``"chat"``: a ``{"messages"}`` conversation rendered with the chat template up to where
    the next assistant reply starts (the generation prompt). ``prompt`` is a string (one user
    turn) or a list of ``{"role", "content"}`` messages (a system turn, earlier turns of a
    conversation) whose last is not the assistant's.

  The last two are the untrained head of :func:`tokenize_examples`' own example, each piece
  tokenized as training tokenized it (earlier assistant turns on their own), so a prompt is
  tokenized exactly as in training. ``ValueError`` if the tokenizer has no chat template;
  starting with ``where`` for messages the template cannot render as a prompt (another
  format, no turn, the assistant's turn last, roles the template refuses).
  """
  if not isinstance(prompt, str) and fmt != "chat":
    raise ValueError(f'{where}: a list of "messages" is a chat; use --format chat')
  if fmt == "text":
    return tok.encode(prompt) if prompt else [tok.eos_id()]
  if fmt == "prompt":
    ((toks, trained),) = tokenize_examples([({"prompt": prompt, "completion": ""}, where)], tok)
    return toks[: int(np.argmax(trained))].tolist()
  if fmt != "chat":
    raise ValueError(f"unknown prompt format {fmt!r}; choose from {', '.join(PROMPT_FORMATS)}")
  if not getattr(tok, "chat_template", None):
    raise ValueError(
      "chat: the tokenizer has no chat template (chat_template in tokenizer_config.json); "
      "use --format text or prompt"
    )
  messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
  _check_messages(messages, where)
  if not messages or messages[-1].get("role") == "assistant":
    raise ValueError(f'{where}: "messages" must end with a turn the assistant replies to')
  # The conversation with an empty reply, cut where the reply starts: a boundary between
  # its pieces (the reply's own piece begins there, even when an empty reply renders as
  # nothing).
  import jinja2

  try:
    reply = {"messages": [*messages, {"role": "assistant", "content": ""}]}
    pieces = _chat_segments(reply, where, tok)
    cut, at, head = len(_chat_renderer(tok, where)(messages, True)), 0, []
  except (ValueError, jinja2.TemplateError) as e:  # raise_exception("roles must alternate")
    raise ValueError(str(e) if str(e).startswith(where) else f"{where}: {e}") from e
  for text, _ in pieces:
    if at + len(text) > cut:
      break
    head += tok.encode(text)
    at += len(text)
  return head


def reply_end_ids(tok, fmt: str) -> set[int]:
  """Token ids that end a sampled reply: EOS, and with ``"chat"`` the special token the
  template closes an assistant turn with (Qwen's ``<|im_end|>``, which a base model's
  tokenizer does not call EOS): the first special token of an empty reply's trained tail."""
  ends = {tok.eos_id()}
  added = getattr(getattr(tok, "tok", None), "get_added_tokens_decoder", None)
  if fmt == "chat" and added is not None:
    turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    ((toks, trained),) = tokenize_examples([({"messages": turns}, "--prompt")], tok)
    special = {i for i, t in added().items() if t.special}
    ends |= next(({int(i)} for i in toks[trained] if int(i) in special), set())
  return ends


def split_records(records: list[tuple[Any, str]], split: str) -> list[tuple[Any, str]]:
  """The path-source split rule (``galore_jax.data.split_by_hash``) on canonical JSON."""
  parts = {"train": [], "validation": []}
  canonical = lambda rec: json.dumps(rec[0], sort_keys=True)
  data.split_by_hash(records, parts["train"], parts["validation"], key=canonical)
  return parts[split]


class _ExampleBatch(data.Rows):
  """Example indices -> one example per row; ``mask`` is 1 where the target is trained."""

  def __init__(self, examples, batch_size: int, seq_len: int, pad: int):
    super().__init__(batch_size, seq_len, pad)
    self.examples = examples

  def __call__(self, idx) -> dict[str, np.ndarray]:
    buf, mask = self.empty()
    for r, i in enumerate(np.asarray(idx, dtype=np.int64).reshape(-1)):
      toks, trained = self.examples[int(i)]
      n = min(len(toks), self.seq_len + 1)
      buf[r, :n] = toks[:n]
      mask[r, : max(n - 1, 0)] = trained[1:n]  # target j is token j + 1
    return self.finish(buf, mask)


def split_index(
  config: data.DataConfig, split: str, tok, files: Sequence[Path], eos: int, pad: int
):
  """The ``data.SplitIndex`` of an instruction file set (one example per row, never packed)."""
  del eos  # placed by tokenize_examples
  records = [rw for f in files for rw in _read_records(f)]
  if not records:
    raise ValueError(f"--data {config.source!r}: no records")
  chosen = split_records(records, split)
  if not chosen:
    raise ValueError(
      f"--data {config.source!r}: split {split!r} is empty ({len(records)} record(s) in all; "
      "the validation split needs at least two)"
    )
  examples = tokenize_examples(chosen, tok)
  n = len(examples)
  n_tok = int(sum(len(t) for t, _ in examples))
  B, L = config.batch_size, config.seq_len
  # A row holds seq_len + 1 tokens; an example whose reply starts after them trains nothing
  # (its mask is all zero), and a split of only such examples would report a loss of 0.
  cut = sum(not trained[1 : L + 1].any() for _, trained in examples)
  if cut:
    head = min(int(np.argmax(t)) if t.any() else len(t) for _, t in examples)
    what = (
      f"--data {config.source!r}: {cut} of {n} {split} example(s) have no trained token "
      f"within --seq-len {L} (+1) tokens (the shortest prompt before a reply takes {head})"
    )
    if cut == n:
      raise ValueError(f"{what}: nothing to learn from; raise --seq-len")
    warnings.warn(f"{what}: their replies are cut off and add nothing to the loss", stacklevel=2)
  return data.SplitIndex(n, B, _ExampleBatch(examples, B, L, pad), n, n, n_tok)


plan = split_index  # its name before data._Plan became data.SplitIndex
