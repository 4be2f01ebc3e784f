"""Instruction data for fine-tuning: the loss is taken on the answers only.

A ``--data`` file of JSON lines (or a JSON array; ``.gz`` / ``.xz`` allowed), or a Parquet
file (a Hub dataset's usual form) whose rows have these columns, whose records are either

* ``{"prompt": "...", "completion": "..."}``: one example is ``[BOS] prompt completion
  EOS`` (BOS when the tokenizer has one), prompt and completion tokenized separately so
  the boundary is exact; the targets that are completion tokens or the final EOS are
  trained, the prompt's are not; or
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: the conversation rendered with
  the tokenizer's chat template (``chat_template`` in ``tokenizer_config.json``); the text
  of every assistant turn, as the template renders it (its end-of-turn token included),
  is trained, everything else is not. ShareGPT's ``{"conversations": [{"from": "human",
  "value": ...}, {"from": "gpt", ...}]}`` is read as these messages (:data:`SHAREGPT_ROLES`).
  The template renders as in transformers' ``apply_chat_template`` (its Jinja filters and
  tags, :func:`_chat_environment`), with the record's ``"tools"`` (tool definitions) as its
  ``tools``; an assistant turn that calls tools (``"tool_calls"``) may have no content; or
* ``{"instruction": "...", "input": "...", "output": "..."}`` (Stanford Alpaca's form;
  ``input`` optional): a prompt/completion example whose prompt is the Alpaca template
  around the instruction and input (:data:`ALPACA_PROMPT`) and whose completion is the
  output.

A file set's first record names its form; ``sample`` lays prompts out the same way
(:func:`prompt_ids`; the run records the form, and ``sample``'s ``--format`` defaults to it).

**Packing** (the default; ``--no-packing``: one example per row). Examples are placed whole
into rows of ``seq_len + 1`` tokens, several to a row, by best-fit decreasing
(:func:`pack_rows`); an example longer than a row has one of its own and is cut at its end.
The batch then also carries ``segments`` (B, L): each input token's example within its row,
1, 2, ... (0: padding), with which the model keeps examples apart (each attends only to
itself and takes rotary positions from 0, :meth:`galore_jax.model.Llama.__call__`) and no
target crosses from one example into the next. So a packed batch gives every example the
loss and gradient it has alone in a row, and the step is the same sum over trained tokens,
for a fraction of the padding: instruction examples are short, and one per row of 512 or
2048 tokens is mostly padding. The packing is fixed per split (a deterministic function of
the examples' lengths); each epoch shuffles its rows.

Masking is the batch's ``mask`` (1.0 on trained targets), which the train step already
multiplies into the token loss: a prompt token contributes nothing to the loss and gets
no gradient. The train / validation split is the path rule of ``galore_jax.data`` applied
to each record's canonical JSON (1 in 100 by content hash, at least one record).

The records are read as a stream and tokenized a batch at a time (``_ExampleBuilder``)
into the token cache of ``galore_jax.data``, keyed by the files, the tokenizer and its
chat template (``cached_examples``); later starts read the examples as memory maps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from galore_jax import data
from galore_jax.data import batching, sources


def _kind(record: Any) -> str | None:
  """The form of an instruction record, its --format in ``sample`` (None: not one)."""
  if isinstance(record, dict):
    if "prompt" in record and "completion" in record:
      return "prompt"
    if "messages" in record or "conversations" in record:
      return "chat"
    if "instruction" in record and "output" in record:
      return "alpaca"
  return None


# What each form is called where a run or `galore-jax preview` says how it reads the data.
FORM_NAMES = {
  "prompt": "prompt/completion records",
  "chat": "chat records in the chat template",
  "alpaca": "Alpaca records in the Alpaca prompt",
}


# Stanford Alpaca's record {"instruction", "input", "output"} (tatsu-lab/alpaca,
# yahma/alpaca-cleaned, and the many sets made in its form) is trained as the Alpaca
# project laid it out: this prompt, then the output as the completion. The prompt ends in
# a newline (as in the Hub set's "text" column and Alpaca-LoRA's template), so the reply
# starts on a token boundary of its own. An empty or missing "input" takes the short form.
ALPACA_PROMPT = (
  "Below is an instruction that describes a task. Write a response that appropriately "
  "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
  "Below is an instruction that describes a task, paired with an input that provides "
  "further context. Write a response that appropriately completes the request.\n\n"
  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


# The template variable that carries an Alpaca record's "input" at inference: a keyword of
# transformers' apply_chat_template, or of vLLM's chat_template_kwargs (a message holds only
# a role and content there).
ALPACA_INPUT_VARIABLE = "input"


def export_chat_template(form: str, tok) -> str | None:
  """For ``export``: a chat template that lays out one user message (and, for training
  elsewhere, its assistant reply) as a run's ``"prompt"`` or ``"alpaca"`` examples held them:
  ``[BOS] prompt`` or ``[BOS]`` and the Alpaca prompt of the message as the instruction (with
  the template variable ``input``, where given and not empty, as its input), then the reply
  and EOS. So ``apply_chat_template`` in transformers, and vLLM's chat endpoint, prompt the
  fine-tuned model as it was trained. None for other forms (a chat run keeps its
  tokenizer's template; text has none to give), or where no rendering tokenizes as
  training did (:func:`_after_bos`)."""
  message = "{{ messages[0]['content'] }}"
  if form == "prompt":
    head = message
  elif form == "alpaca":
    given = ALPACA_INPUT_VARIABLE
    with_input = ALPACA_PROMPT_WITH_INPUT.replace("{instruction}", message)
    head = (
      f"{{% if {given} is defined and {given} %}}"
      + with_input.replace("{input}", f"{{{{ {given} }}}}")
      + "{% else %}"
      + ALPACA_PROMPT.replace("{instruction}", message)
      + "{% endif %}"
    )
  else:
    return None
  sep = _after_bos(tok)
  if sep is None:
    return None
  return (
    "{% if not (messages | length in [1, 2] and messages[0]['role'] == 'user' and "
    "(messages | length == 1 or messages[1]['role'] == 'assistant')) %}"
    "{{ raise_exception('this model was fine-tuned on single prompts: give one user "
    "message (and its assistant reply)') }}{% endif %}"
    f"{{% if bos_token %}}{{{{ bos_token }}}}{sep}{{% endif %}}" + head + "{% if messages | "
    "length == 2 %}{{ messages[1]['content'] }}{{ eos_token }}{% endif %}"
  )


def _after_bos(tok) -> str | None:
  """What a template writes between BOS and the prompt so that tokenizing the rendered text
  whole, as transformers and vLLM do, gives training's ``[BOS] + encode(prompt)``: nothing
  for a byte-level BPE (Llama 3, Qwen2), a space where text after a special token gets no
  word-start marker (a Metaspace pre-tokenizer with ``prepend_scheme: first``, which
  transformers also builds from a SentencePiece ``tokenizer.model``). None if neither does."""
  bos = tok.bos_id()
  if bos < 0:
    return ""
  inner = getattr(tok, "tok", None)  # a tokenizer.json's tokenizers.Tokenizer
  if inner is None:  # exported as tokenizer.model: transformers' Metaspace, scheme "first"
    return " "
  probe = "Below is an instruction."
  want = [bos, *tok.encode(probe)]
  for sep in ("", " "):
    if inner.encode(tok.id_to_piece(bos) + sep + probe, add_special_tokens=False).ids == want:
      return sep
  return None


def alpaca_prompt(instruction: Any, input: Any = None, where: str = "--prompt") -> str:
  """The Alpaca prompt of an instruction and its optional input (``None`` or ``""``: none)."""
  if not isinstance(instruction, str) or not (input is None or isinstance(input, str)):
    raise ValueError(f'{where}: "instruction" and "input" must be strings')
  if input:
    return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
  return ALPACA_PROMPT.format(instruction=instruction)


def _prompt_completion(rec: dict, where: str) -> tuple[str, str]:
  """A ``"prompt"`` or ``"alpaca"`` record as the texts trained on: (prompt, completion)."""
  if _kind(rec) == "alpaca":
    prompt, completion = alpaca_prompt(rec["instruction"], rec.get("input"), where), rec["output"]
    if not isinstance(completion, str):
      raise ValueError(f'{where}: "output" must be a string')
    return prompt, completion
  if not (isinstance(rec["prompt"], str) and isinstance(rec["completion"], str)):
    raise ValueError(f'{where}: "prompt" and "completion" must be strings')
  return rec["prompt"], rec["completion"]


# ShareGPT's spelling of a chat, {"conversations": [{"from": "human", "value": ...}]}, which
# many Hub datasets use (OpenHermes, SlimOrca, ...): its speakers as chat templates name
# the roles.
SHAREGPT_ROLES = {
  "system": "system",
  "human": "user",
  "user": "user",
  "gpt": "assistant",
  "assistant": "assistant",
}


def _messages(rec: dict, where: str) -> list:
  """A chat record's ``messages``, or its ShareGPT ``conversations`` as messages."""
  if "messages" in rec:
    _check_messages(rec["messages"], where)
    return rec["messages"]
  turns = rec["conversations"]
  if not isinstance(turns, list) or not all(
    isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
    for t in turns
  ):
    raise ValueError(f'{where}: "conversations" must be a list of {{"from", "value"}} objects')
  unknown = sorted({t["from"] for t in turns} - set(SHAREGPT_ROLES))
  if unknown:
    raise ValueError(
      f'{where}: "conversations" has the speaker {unknown[0]!r}; expected one of '
      f"{', '.join(SHAREGPT_ROLES)}"
    )
  return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def instruction_format(files: Sequence[Path], columns: dict[str, str] | None = None) -> str | None:
  """The form of the first record of the first JSON or Parquet file if it is an instruction
  record (``"prompt"``, ``"chat"`` or ``"alpaca"``), else None (text data). ``columns``: as
  for ``data.records``."""
  for f in files:
    fmt, _ = data.file_kind(f)
    if fmt == ".txt":  # text only
      return None
    try:  # the first record only: a C4 shard is not read whole at every start
      with contextlib.closing(data.records(f, columns=columns)) as records:
        first = next(records, None)
    except (ValueError, OSError, EOFError):
      return None  # let the text reader report it
    if first is not None:
      return _kind(first[0])
  return None


def source_format(source: str, columns: str | None) -> str:
  """The form the data load will find ``--data source`` in: :func:`instruction_format` of
  its first record (``"prompt"``, ``"chat"``, ``"alpaca"``), else ``"text"``. Reads one
  record; a source that is not local files (the bundled corpus, TFDS, a Hub dataset not
  fetched) or cannot be read counts as text (the load reports what is wrong with it)."""
  if not sources.is_path_source(source) or source.startswith("hf://"):
    return "text"
  try:
    files = sources._resolve_paths(source)
    return instruction_format(files, sources.parse_columns(columns)) or "text"
  except (OSError, ValueError):
    return "text"


def packs_examples(source: str, columns: str | None, packing: bool) -> bool:
  """Whether batches of ``--data source`` are packed instruction examples, with segment ids
  (``packing`` on, and a :func:`source_format` other than text). For ``plan``, which lowers
  the step without reading the data."""
  return packing and source_format(source, columns) != "text"


# --chat-template presets, for tokenizers that have no chat template of their own (a base
# model's). "chatml": ChatML's turns, <|im_start|>ROLE\nCONTENT<|im_end|>, one per line, as
# Qwen and many fine-tunes lay conversations out. An assistant turn ends with the tokenizer's
# EOS right after <|im_end|> (unless EOS is <|im_end|> itself), and the newline between turns
# opens the next one: the reply's trained tail is CONTENT<|im_end|>EOS, so sampling stops
# where a reply ends even when <|im_end|> is no single token of the tokenizer, and the only
# trained target after the prompt's last newline is a reply's first token.
CHAT_TEMPLATES = {
  "chatml": (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' and eos_token != '<|im_end|>' %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
  ),
}


def read_chat_template(value: str) -> str:
  """``--chat-template``: a preset's name (:data:`CHAT_TEMPLATES`), a ``tokenizer_config.json``
  (its ``chat_template``), or a file holding the Jinja text (``chat_template.jinja``).
  ValueError for a file that is missing or holds no template, for a template Jinja cannot
  parse (now, not after the data is read), and for a preset's name that is also a file's."""
  import jinja2

  if value in CHAT_TEMPLATES:
    if Path(value).is_file():  # which one the user means is anyone's guess
      raise ValueError(
        f"{value}: both a preset and a file in this directory; write ./{value} for the file"
      )
    template = CHAT_TEMPLATES[value]
  else:
    path = Path(value).expanduser()
    if not path.is_file():
      raise ValueError(f"{value}: no such file, and not a preset ({', '.join(CHAT_TEMPLATES)})")
    template = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
      try:
        template = json.loads(template).get("chat_template")
      except (ValueError, AttributeError):
        template = None
      if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
      if not isinstance(template, str):
        raise ValueError(f'{value}: no "chat_template" string in it')
  try:
    _chat_environment().parse(template)
  except jinja2.TemplateSyntaxError as e:
    raise ValueError(f"{value}: not a Jinja template ({e.message}, line {e.lineno})") from e
  return template


def _raise_exception(message):  # (a record's location is added where it is rendered)
  raise ValueError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
  # Jinja's own filter sorts keys and escapes non-ASCII and <, >, &, ': a tool call's
  # arguments would be trained in another form than transformers and vLLM render them.
  return json.dumps(
    value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
  )


@functools.cache
def _chat_environment():
  """The Jinja environment chat templates render in, as transformers' ``apply_chat_template``
  sets it up: sandboxed, trimmed blocks, ``{% break %}`` / ``{% continue %}``, the
  ``{% generation %}`` block (which marks assistant text for transformers' assistant mask;
  here its body is rendered as is: the trained text is found by rendering turn by turn),
  ``raise_exception`` and transformers' ``tojson``. Not ``strftime_now``: a template that
  writes today's date (Llama 3.x's system header) takes its own fixed fallback, so the
  examples do not change with the day they are tokenized on."""
  import jinja2.ext
  import jinja2.nodes
  import jinja2.sandbox

  class Generation(jinja2.ext.Extension):
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
  )
  env.globals["raise_exception"] = _raise_exception
  env.filters["tojson"] = _tojson
  return env


@functools.lru_cache(maxsize=16)
def _compiled_chat_template(template: str):
  """``template`` compiled once per process. Compiling costs about 9 ms (ChatML's), many
  times the rendering, and tokenizing a conversation renders it two times per reply plus
  one: compiled per rendering, 5 MB of conversations took 68 s to tokenize instead of 1."""
  return _chat_environment().from_string(template)


def render_chat(
  template: str, messages: list, *, add_generation_prompt: bool, tools=None, **specials
) -> str:
  """A chat template rendered as transformers renders it (:func:`_chat_environment`);
  ``tools``: a record's tool definitions (JSON schemas), as ``apply_chat_template(tools=)``
  passes them (``tools`` and ``documents`` are defined, as none, where there are none, as
  there)."""
  return _compiled_chat_template(template).render(
    messages=messages,
    tools=tools,
    documents=None,
    add_generation_prompt=add_generation_prompt,
    **specials,
  )


def _chat_renderer(tok, where: str):
  """``render(messages, add_generation_prompt)`` with the tokenizer's chat template."""
  template = getattr(tok, "chat_template", None)
  if not template:
    raise ValueError(
      f'{where}: "messages" records need a chat template, and the tokenizer has none '
      "(chat_template in tokenizer_config.json); --chat-template FILE names one, "
      f"--chat-template {next(iter(CHAT_TEMPLATES))} uses ChatML's"
    )
  specials = {}
  for name, fn in (("bos_token", "bos_id"), ("eos_token", "eos_id")):
    i = getattr(tok, fn)()
    specials[name] = tok.id_to_piece(i) if i >= 0 else ""
  return lambda msgs, gen, tools=None: render_chat(
    template, msgs, add_generation_prompt=gen, tools=tools, **specials
  )


def _check_messages(messages: Any, where: str) -> None:
  """A list of ``{"role", "content"}`` objects; an assistant turn that calls tools
  (``"tool_calls"``, a list) may have no content (``null``), as in OpenAI's format."""
  if not isinstance(messages, list) or not all(
    isinstance(m, dict)
    and isinstance(m.get("role"), str)
    and (
      isinstance(m.get("content"), str)
      or (m.get("content") is None and isinstance(m.get("tool_calls"), list))
    )
    for m in messages
  ):
    raise ValueError(f'{where}: "messages" must be a list of {{"role", "content"}} objects')


def _tools(rec: dict, where: str) -> list | None:
  """A chat record's ``"tools"`` (tool definitions, passed to the chat template), or None."""
  tools = rec.get("tools")
  if tools is not None and not (
    isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
  ):
    raise ValueError(f'{where}: "tools" must be a list of objects (JSON schemas of the tools)')
  return tools


def _encode_rendered(
  tok, conversations: list[list[tuple[str, bool]]]
) -> list[tuple[list[int], list[bool]]]:
  """Token ids of each conversation a chat template rendered, given as (text, trained)
  pieces (its turns), and whether each id is trained, in batched calls, as transformers'
  tokenizer of the exported model encodes the whole text.

  A ``tokenizer.json`` encodes each conversation whole, and an id is trained where its
  characters overlap a trained piece (the rule of transformers'
  ``return_assistant_tokens_mask``): cut at the turns, a Metaspace tokenizer (Llama 2's)
  gave each turn its word-start marker (a reply ``yes`` trained as ``▁yes``). A
  SentencePiece model reads its control pieces (``<s>``, ``</s>``, turn markers such as
  Mistral's ``[INST]``) as plain characters, so those a template writes become their ids
  here (:func:`_control_pieces`; else a reply's EOS would be trained as three pieces, and
  sampling never stop), and only the text that starts a conversation gets its word-start
  marker (``▁``, the dummy prefix), not each turn's text or the text after a control piece
  (:func:`_without_word_start`; else a reply ``yes`` after ``assistant\\n`` trained as
  ``▁yes``, which transformers' tokenizer never gives there). A SentencePiece model's turns
  are still encoded one by one: where the whole text would merge across a turn's start (a
  generation prompt that ends in a space), its ids differ from transformers' there."""
  if hasattr(tok, "tok"):  # galore_jax.hf's tokenizer.json wrapper
    texts = ["".join(text for text, _ in pieces) for pieces in conversations]
    encoded = tok.tok.encode_batch(texts, add_special_tokens=False) if texts else []
    out = []
    for pieces, enc in zip(conversations, encoded, strict=True):
      trained = np.zeros(len(enc.ids), bool)
      ends = np.cumsum([len(text) for text, _ in pieces])
      for (text, flag), b in zip(pieces, ends, strict=True):
        if flag and (span := _covering_tokens(enc, int(b) - len(text), int(b))):
          trained[span[0] : span[1] + 1] = True
      out.append((list(enc.ids), trained.tolist()))
    return out
  specials, cut = _control_pieces(tok)
  starts, within = [], []  # plain text that starts a conversation, and the rest
  layout = []  # per conversation, per piece: its flag, control ids and "start" / "within"
  for conversation in conversations:
    at_start, pieces = True, []
    for text, flag in conversation:
      parts = []
      for part in cut.split(text) if cut else [text]:
        if part in specials:
          parts.append(specials[part])
        elif part:
          (starts if at_start else within).append(part)
          parts.append("start" if at_start else "within")
        at_start = at_start and not part
      pieces.append((flag, parts))
    layout.append(pieces)
  encoded = {
    "start": iter(tok.encode(starts) if starts else []),
    "within": iter(_without_word_start(tok).encode(within) if within else []),
  }
  out = []
  for pieces in layout:
    ids: list[int] = []
    trained: list[bool] = []
    for flag, parts in pieces:
      for part in parts:
        part_ids = next(encoded[part]) if isinstance(part, str) else [part]
        ids += part_ids
        trained += [flag] * len(part_ids)
    out.append((ids, trained))
  return out


def _covering_tokens(enc, a: int, b: int) -> tuple[int, int] | None:
  """The first and last token of a ``tokenizers`` encoding that cover characters ``a..b-1``
  of its text: from the first that covers the first character to the last that covers the
  last one. A character no token covers (one a normalizer drops) is passed over; two tokens
  may cover one character (Metaspace's marker and an unknown character's ``<unk>``), where
  transformers' ``char_to_token`` names only the first. None if no token covers any."""
  first = next((t for c in range(a, b) if (t := enc.char_to_token(c)) is not None), None)
  if first is None:
    return None
  last = next(t for c in range(b - 1, a - 1, -1) if (t := enc.char_to_token(c)) is not None)
  while last + 1 < len(enc) and (enc.token_to_chars(last + 1) or (b,))[0] < b:
    last += 1
  return first, last


@functools.lru_cache(maxsize=8)
def _without_word_start(tok):
  """A SentencePiece model ``tok`` without its dummy prefix (the ``▁`` it puts before every
  text it encodes), for text that does not start the input: transformers' tokenizer of
  the model puts it only at the start (Metaspace's ``prepend_scheme="first"``)."""
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto.FromString(tok.serialized_model_proto())
  if not proto.normalizer_spec.add_dummy_prefix:
    return tok
  proto.normalizer_spec.add_dummy_prefix = False
  return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


@functools.lru_cache(maxsize=8)
def _control_pieces(tok) -> tuple[dict[str, int], re.Pattern | None]:
  """A SentencePiece model's control pieces by their text (the pieces it never finds in
  text; user-defined ones it does), and a pattern that splits a text around them. Read
  once per tokenizer (a pass over the vocabulary)."""
  pieces = {tok.id_to_piece(i): i for i in range(tok.get_piece_size()) if tok.is_control(i)}
  if not pieces:
    return pieces, None
  # Longest first: the alternation takes the first piece that matches where it tries.
  longest_first = sorted(pieces, key=len, reverse=True)
  return pieces, re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")


def _chat_segments(rec: dict, where: str, tok) -> list[tuple[str, bool]]:
  """The rendered conversation as (text, trained) pieces: assistant turns are trained.

  Turn ``i``'s text is what rendering ``messages[: i + 1]`` adds to rendering
  ``messages[:i]`` with the generation prompt; every rendering must extend the previous
  one (true of ordinary templates), otherwise the turn boundaries are unknown.
  """
  import jinja2

  chat_render, tools = _chat_renderer(tok, where), _tools(rec, where)

  def render(msgs, gen):
    try:
      return chat_render(msgs, gen, tools)
    except ValueError as e:  # the template's raise_exception("...")
      raise ValueError(f"{where}: {e}") from e
    except (jinja2.TemplateError, TypeError, LookupError, AttributeError) as e:
      raise ValueError(
        f"{where}: the chat template cannot render this record ({type(e).__name__}: {e})"
      ) from e

  messages = _messages(rec, where)
  full = render(messages, False)
  pieces: list[tuple[str, bool]] = []
  done = 0
  for i, m in enumerate(messages):
    if m.get("role") != "assistant":
      continue
    through_reply = render(messages[: i + 1], False)
    start, end = len(render(messages[:i], True)), len(through_reply)
    if not (full.startswith(through_reply) and done <= start <= end):
      raise ValueError(f"{where}: the chat template does not render turn by turn")
    pieces += [(full[done:start], False), (full[start:end], True)]
    done = end
  pieces.append((full[done:], False))
  return [(t, trained) for t, trained in pieces if t]


def _completion_ids(tok, texts: list[tuple[str, str]], p_ids: list) -> list[list[int]]:
  """The ids of each completion as going on from its prompt (``p_ids``: the prompts' ids),
  as transformers' tokenizer of the export encodes the rendered example whole: the whole
  text's ids after the prompt's, where they begin with them. Encoded alone, a completion
  would get the word-start marker of a SentencePiece model or a Metaspace tokenizer
  (Llama 2's ``tokenizer.json``): ``ten`` after ``Response:\\n`` trained as ``▁ten``. Where
  the whole text merges across the boundary (a prompt ending in a space), the completion
  is encoded alone, without that marker where the tokenizer is SentencePiece."""
  if not texts:
    return []
  whole = tok.encode([p + c for p, c in texts])
  alone = [i for i, (p, w) in enumerate(zip(p_ids, whole, strict=True)) if w[: len(p)] != p]
  after = tok if hasattr(tok, "tok") else _without_word_start(tok)
  by_alone = after.encode([texts[i][1] for i in alone]) if alone else []
  encoded = dict(zip(alone, by_alone, strict=True))
  return [encoded.get(i, w[len(p) :]) for i, (p, w) in enumerate(zip(p_ids, whole, strict=True))]


def tokenize_examples(
  records: Sequence[tuple[Any, str]], tok
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Each record -> (tokens int32, trained bool per token); see the module docstring."""
  eos, bos = tok.eos_id(), tok.bos_id()
  prefix = [bos] if bos >= 0 else []
  out: list[tuple[np.ndarray, np.ndarray]] = []
  # Prompts, completions and conversations are tokenized in batched calls (the fast
  # tokenizer's threads; SentencePiece's per-call cost, where a conversation's pieces are
  # many and short).
  texts = [_prompt_completion(r, w) for r, w in records if _kind(r) in ("prompt", "alpaca")]
  p_ids = tok.encode([p for p, _ in texts]) if texts else []
  c_ids = _completion_ids(tok, texts, p_ids)
  by_prompt = iter(zip(p_ids, c_ids, strict=True))
  chats = [_chat_segments(r, w, tok) for r, w in records if _kind(r) == "chat"]
  by_chat = iter(_encode_rendered(tok, chats))
  for r, w in records:
    kind = _kind(r)
    if kind in ("prompt", "alpaca"):
      p, c = next(by_prompt)
      toks = prefix + list(p) + list(c) + [eos]
      trained = [False] * (len(prefix) + len(p)) + [True] * (len(c) + 1)
    elif kind == "chat":
      toks, trained = next(by_chat)
    else:
      raise ValueError(
        f'{w}: expected {{"prompt", "completion"}}, {{"messages"}}, {{"conversations"}} or '
        '{"instruction", "output"} like the first record'
      )
    out.append((np.asarray(toks, np.int32), np.asarray(trained, bool)))
  return out


PROMPT_FORMATS = ("text", "prompt", "chat", "alpaca")


def prompt_ids(
  tok, prompt: str | list[dict] | dict, fmt: str, where: str = "--prompt"
) -> list[int]:
  """Token ids to sample a reply to ``prompt`` from, laid out as training laid out its data:

  * ``"text"``: the text as is (pretraining documents; an empty prompt is one EOS, the
    context every document follows);
  * ``"prompt"``: what a ``{"prompt", "completion"}`` example holds before its completion
    (``[BOS] prompt``);
  * ``"chat"``: a ``{"messages"}`` conversation rendered with the chat template up to where
    the next assistant reply starts (the generation prompt). ``prompt`` is a string (one user
    turn) or a list of ``{"role", "content"}`` messages (a system turn, earlier turns of a
    conversation) whose last is not the assistant's;
  * ``"alpaca"``: ``[BOS]`` and the Alpaca prompt of an instruction (a string) or of an
    ``{"instruction", "input"}`` dict, as an ``{"instruction", "input", "output"}`` example
    holds it before its output.

  The last three are the untrained head of :func:`tokenize_examples`' own example, tokenized
  as training tokenized it, so a prompt is tokenized as in training (a chat's text through
  the generation prompt is encoded by itself, as transformers encodes a generation prompt:
  it differs from training's ids only where a token spans the reply's start).
  ``ValueError`` if the tokenizer has no chat template; starting with ``where`` for messages
  the template cannot render as a prompt (another format, no turn, the assistant's turn
  last, roles the template refuses).
  """
  if isinstance(prompt, dict) and fmt == "alpaca":
    prompt = alpaca_prompt(prompt.get("instruction"), prompt.get("input"), where)
  elif isinstance(prompt, str) and fmt == "alpaca":
    prompt = alpaca_prompt(prompt)
  elif isinstance(prompt, dict):
    raise ValueError(f'{where}: an "instruction" is an Alpaca prompt; use --format alpaca')
  elif not isinstance(prompt, str) and fmt != "chat":
    raise ValueError(f'{where}: a list of "messages" is a chat; use --format chat')
  if fmt == "text":
    return tok.encode(prompt) if prompt else [tok.eos_id()]
  if fmt in ("prompt", "alpaca"):
    ((toks, trained),) = tokenize_examples([({"prompt": prompt, "completion": ""}, where)], tok)
    return toks[: int(np.argmax(trained))].tolist()
  if fmt != "chat":
    raise ValueError(f"unknown prompt format {fmt!r}; choose from {', '.join(PROMPT_FORMATS)}")
  if not getattr(tok, "chat_template", None):
    raise ValueError(
      "chat: the tokenizer has no chat template (chat_template in tokenizer_config.json, or "
      "the run's --chat-template); use --format text or prompt"
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
    cut, at = len(_chat_renderer(tok, where)(messages, True)), 0
  except (ValueError, jinja2.TemplateError) as e:  # raise_exception("roles must alternate")
    raise ValueError(str(e) if str(e).startswith(where) else f"{where}: {e}") from e
  kept = []
  for text, _ in pieces:
    if at + len(text) > cut:
      break
    kept.append(text)
    at += len(text)
  return _encode_rendered(tok, [[(text, False) for text in kept]])[0][0]


def reply_end_ids(tok, fmt: str) -> set[int]:
  """Token ids that end a sampled reply: EOS, and with ``"chat"`` the special token the
  template closes an assistant turn with (Qwen's ``<|im_end|>``, which a base model's
  tokenizer does not call EOS): the first special token of an empty reply's trained tail."""
  ends = {tok.eos_id()}
  if fmt == "chat" and (special := _added_special_ids(tok)):
    turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    ((toks, trained),) = tokenize_examples([({"messages": turns}, "--prompt")], tok)
    ends |= next(({int(i)} for i in toks[trained] if int(i) in special), set())
  return ends


def _added_special_ids(tok) -> set[int]:
  """The special tokens a ``tokenizer.json`` adds (a chat template's turn markers, Qwen's
  ``<|im_end|>``), or a SentencePiece model's control pieces other than BOS and EOS."""
  added = getattr(getattr(tok, "tok", None), "get_added_tokens_decoder", None)
  if added is None:
    return set(_control_pieces(tok)[0].values()) - {tok.bos_id(), tok.eos_id()}
  return {int(i) for i, t in added().items() if t.special}


def show_example(tok, toks: np.ndarray, trained: np.ndarray, seq_len: int, where: str) -> str:
  """One example as ``galore-jax preview`` prints it: a line naming it (its tokens, how many
  are trained, what a row of ``seq_len + 1`` tokens cuts off), then its text with the trained
  pieces in ``[[ ]]`` and special tokens by name; the text stops where the row ends."""
  row = seq_len + 1
  n, n_trained = len(toks), int(trained.sum())
  head = f"{where}: {n} tokens, {n_trained} trained"
  if n > row:
    head += f"; a row holds {row} (--seq-len {seq_len} + 1), so the last {n - row} are cut"
    if n_trained and not trained[1:row].any():  # target j is token j + 1
      head += ", every trained one among them: this example trains nothing"
  # By name: decoding drops them, and a chat template's are the turns' boundaries.
  special = ({tok.bos_id(), tok.eos_id()} | _added_special_ids(tok)) - {-1}
  runs: list[list] = []  # [ids, trained, special]: a special token alone, else a flag's run
  for t, flag in zip(toks[:row].tolist(), trained[:row].tolist(), strict=True):
    if runs and not runs[-1][2] and t not in special and runs[-1][1] == flag:
      runs[-1][0].append(t)
    else:
      runs.append([[t], flag, t in special])
  text, was = [], False
  for ids, flag, alone in runs:
    if flag != was:  # a trained stretch opens or closes
      text.append("[[" if flag else "]]")
      was = flag
    text.append(tok.id_to_piece(ids[0]) if alone else tok.decode(ids))
  return f"{head}\n{''.join(text)}" + ("]]" if was else "")


def split_records(records: list[tuple[Any, str]], split: str) -> list[tuple[Any, str]]:
  """The path-source split rule (``galore_jax.data.split_by_hash``) on canonical JSON."""
  parts = {"train": [], "validation": []}
  data.split_by_hash(records, parts["train"], parts["validation"], key=_canonical)
  return parts[split]


def _canonical(record: tuple[Any, str]) -> str:
  return json.dumps(record[0], sort_keys=True)


def _text_chars(record: Any) -> int:
  """About how many characters a record holds (how full a tokenizer batch is)."""
  if not isinstance(record, dict):
    return 1
  texts = [record.get(k) for k in ("prompt", "completion", "instruction", "input", "output")]
  if isinstance(record.get("messages"), list):
    texts += [m.get("content") for m in record["messages"] if isinstance(m, dict)]
  if isinstance(record.get("conversations"), list):
    texts += [m.get("value") for m in record["conversations"] if isinstance(m, dict)]
  return 1 + sum(len(t) for t in texts if isinstance(t, str))


# No trained target in an example: its first trained position is past any row.
_NONE = np.iinfo(np.int64).max


class _ExampleBuilder(sources._BatchBuilder):
  """Tokenizes instruction records (``tokenize_examples``) a batch of about
  ``TOKENIZE_BATCH_CHARS`` characters at a time into compact chunks: the examples' tokens
  one after another (uint16 for vocabularies of up to 65536 pieces), whether each is
  trained, and per example its first trained position from 0 and from 1 (what the
  seq_len warnings need). :meth:`store` writes them to the token cache, which maps them
  back."""

  def __init__(self, tok):
    super().__init__()
    self.tok = tok
    self.dtype = np.uint16 if tok.get_piece_size() <= 1 << 16 else np.int32
    self._tokens: list[np.ndarray] = []
    self._trained: list[np.ndarray] = []
    self._lengths: list[np.ndarray] = []
    self._first: list[np.ndarray] = []  # (examples, 2): from position 0, from position 1

  @staticmethod
  def _chars(record: tuple[Any, str]) -> int:
    return _text_chars(record[0])

  def __delitem__(self, i: int) -> None:
    """Drops example ``i`` (the split rule's fallback, which only small sources reach)."""
    ex = self.finish()
    keep = np.ones(len(ex.tokens), dtype=bool)
    keep[ex.starts[i] : ex.starts[i + 1]] = False
    self._tokens, self._trained = [ex.tokens[keep]], [ex.trained[keep]]
    self._lengths, self._first = [np.delete(np.diff(ex.starts), i)], [np.delete(ex.first, i, 0)]
    self._count -= 1

  def _encode(self, records: list[tuple[Any, str]]) -> None:
    examples = tokenize_examples(records, self.tok)
    self._lengths.append(np.fromiter((len(t) for t, _ in examples), np.int64, len(examples)))
    self._tokens.append(np.concatenate([t.astype(self.dtype) for t, _ in examples]))
    self._trained.append(np.concatenate([m for _, m in examples]))
    first = np.empty((len(examples), 2), np.int64)
    for j, (toks, trained) in enumerate(examples):
      first[j, 0] = int(np.argmax(trained)) if trained.any() else len(toks)
      first[j, 1] = 1 + int(np.argmax(trained[1:])) if trained[1:].any() else _NONE
    self._first.append(first)

  def _joined_first(self) -> np.ndarray:
    return np.concatenate([np.zeros((0, 2), np.int64), *self._first])

  def finish(self) -> _Examples:
    """The examples, joined in memory."""
    self._flush()
    ex = _Examples(
      np.concatenate([np.zeros(0, self.dtype), *self._tokens]),
      np.concatenate([np.zeros(0, bool), *self._trained]),
      sources._starts(self._lengths),
      self._joined_first(),
    )
    self._tokens, self._trained = [ex.tokens], [ex.trained]
    self._lengths, self._first = [np.diff(ex.starts)], [ex.first]
    return ex

  def store(self, keys: tuple[list[str], list[str]]) -> _Examples:
    """The examples, written to the token cache (``keys``: the tokens' entry and the
    trained flags') chunk by chunk and mapped back; in memory if it cannot be written."""
    self._flush()
    starts, first = sources._starts(self._lengths), self._joined_first()
    paths = tuple(map(sources._token_cache_path, keys))
    if sources._store_tokens(
      paths[1], self._trained, starts, key=keys[1]
    ) and sources._store_tokens(paths[0], self._tokens, starts, {"first": first}, key=keys[0]):
      ex = _load_examples(keys, verify=False)
      if ex is not None:
        return ex
    return self.finish()


@dataclasses.dataclass(frozen=True)
class _Examples:
  """Tokenized instruction examples: example i is ``tokens[starts[i] : starts[i + 1]]``,
  ``trained`` flags its tokens (the targets that carry loss are ``trained[1:]``), and
  ``first[i]`` is its first trained position from 0 and from 1 (``_NONE``: none). Read
  from the token cache, the two streams are read-only memory maps."""

  tokens: np.ndarray
  trained: np.ndarray
  starts: np.ndarray
  first: np.ndarray

  def __len__(self) -> int:
    return len(self.starts) - 1


def _joined_examples(parts: Sequence[_Examples]) -> _Examples:
  """The examples of ``parts``, one part after another (copied into memory)."""
  return _Examples(
    np.concatenate([p.tokens for p in parts]),
    np.concatenate([p.trained for p in parts]),
    sources._starts([np.diff(p.starts) for p in parts]),
    np.concatenate([p.first for p in parts]),
  )


def _load_examples(keys: tuple[list[str], list[str]], *, verify: bool = True) -> _Examples | None:
  """The examples cached under ``keys`` (:func:`_cache_keys`), or None."""
  paths = tuple(map(sources._token_cache_path, keys))
  # (No entries of the one-file format: instruction sets were not cached before it.)
  tokens = sources._load_tokens(paths[0], -1, verify=verify, key=keys[0])
  trained = sources._load_tokens(paths[1], -1, verify=verify, key=keys[1])
  if tokens is None or trained is None or "first" not in tokens.extra:
    return None
  if not np.array_equal(tokens.starts, trained.starts):
    return None
  return _Examples(tokens.stream, trained.stream, tokens.starts, tokens.extra["first"])


# Keys the example caches with the files, the tokenizer and its chat template: bump when
# tokenize_examples lays examples out differently.
# 2: a SentencePiece template's BOS / EOS text as their ids; 3: chat templates render in
# transformers' environment (its tojson) with a record's "tools"; 4: every control piece of
# a SentencePiece model as its id, its word-start marker only where a conversation or a
# prompt starts, and a completion's ids as its prompt's whole text gives them; 5: a
# tokenizer.json encodes a conversation whole, training the ids that overlap a reply.
EXAMPLES_FORMAT_VERSION = "5"


def _cache_keys(key_parts: Sequence[str], split: str) -> tuple[list[str], list[str]]:
  key = [*key_parts, "sft", EXAMPLES_FORMAT_VERSION, split]
  return [*key, "tokens"], [*key, "trained"]


def cached_examples(
  source: str,
  split: str,
  tok,
  files: Sequence[Path],
  key_parts: Sequence[str],
  progress=None,
  columns: dict[str, str] | None = None,
) -> _Examples:
  """The tokenized examples of ``split`` of an instruction file set, from the token cache
  under ``key_parts`` (the files and the tokenizer; its chat template is added here). A
  miss reads the files once, as a stream, and, as for text sources, tokenizes and caches
  both splits for ``train`` and only the validation split for ``validation``. ``columns``:
  as for ``data.records`` (``key_parts`` must name them)."""
  template = getattr(tok, "chat_template", None) or ""
  key = [*key_parts, hashlib.sha256(template.encode()).hexdigest()]
  return sources.load_or_build(
    sources._token_cache_path(_cache_keys(key, "train")[0]),  # one lock per file set
    lambda: _load_examples(_cache_keys(key, split)),
    lambda: sources.build_splits(
      split,
      lambda: _ExampleBuilder(tok),
      sources.read_files(files, lambda f, at: data.records(f, at, columns), progress),
      lambda s, builder: builder.store(_cache_keys(key, s)),
      lambda total: _empty(source, split, total),
      key=_canonical,
    ),
    say_waiting=progress is not None,
  )


def _empty(source: str, split: str, total: int) -> ValueError:
  if not total:
    return ValueError(f"--data {source!r}: no records")
  return ValueError(
    f"--data {source!r}: split {split!r} is empty ({total} record(s) in all; "
    "the validation split needs at least two)"
  )


class _ExampleBatch(data.Rows):
  """Row indices -> rows of examples: ``rows`` (:func:`pack_rows`) packs several into a row,
  and the batch then carries ``segments``; None: one example per row (no segments). ``mask``
  is 1 where the target is trained and of the same example as its input."""

  def __init__(
    self, examples: _Examples, batch_size: int, seq_len: int, pad, rows: PackedRows | None = None
  ):
    super().__init__(batch_size, seq_len, pad)
    self.examples, self.packed = examples, rows is not None
    self.rows = rows if rows is not None else PackedRows.one_per_row(len(examples))

  def __call__(self, idx) -> dict[str, np.ndarray]:
    buf, _ = self.empty()
    seg = np.zeros(buf.shape, np.int32)
    trained = np.zeros(buf.shape, bool)
    ex, rows = self.examples, self.rows
    for r, i in enumerate(np.asarray(idx, dtype=np.int64).reshape(-1)):
      at = 0
      for k, e in enumerate(rows.members[rows.starts[i] : rows.starts[i + 1]]):
        start, end = int(ex.starts[e]), int(ex.starts[e + 1])
        n = min(end - start, self.seq_len + 1 - at)  # only a lone, over-long example is cut
        buf[r, at : at + n] = ex.tokens[start : start + n]
        trained[r, at : at + n] = ex.trained[start : start + n]
        seg[r, at : at + n] = k + 1
        at += n
    # Target j is token j + 1: trained, and of the example whose token j predicts it (an
    # example's first token is never the target of the one before it; nor is padding).
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    batch = self.finish(buf, (trained[:, 1:] & same).astype(np.float32))
    if self.packed:
      batch["segments"] = np.ascontiguousarray(seg[:, :-1])
    return batch


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """Examples packed into rows: row i holds examples ``members[starts[i] : starts[i + 1]]``
  (in their order in the split), one after another."""

  members: np.ndarray
  starts: np.ndarray

  def __len__(self) -> int:
    return len(self.starts) - 1

  @classmethod
  def one_per_row(cls, n: int) -> PackedRows:
    return cls(np.arange(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64))


def pack_rows(lengths: np.ndarray, capacity: int) -> PackedRows:
  """Best-fit decreasing bin packing of examples of ``lengths`` tokens into rows of
  ``capacity`` tokens: longest first, each into the open row it leaves least room in (a new
  row when none has room). An example longer than a row fills one alone. Deterministic.
  Measured on log-normal lengths (a median of 150 tokens): 0.02-0.08 % more rows than the
  fewest possible, 1.8 s for a million examples (one scan of ``capacity`` flags each)."""
  lengths = np.minimum(np.asarray(lengths, np.int64), capacity)
  order = np.argsort(-lengths, kind="stable")
  # rows_with[c]: the open rows with exactly c tokens free; has[c]: whether any.
  rows_with: list[list[int]] = [[] for _ in range(capacity + 1)]
  has = np.zeros(capacity + 1, bool)
  row_of = np.empty(len(lengths), np.int64)
  n_rows = 0
  for e in order:
    n = int(lengths[e])
    c = n + int(np.argmax(has[n:]))  # the fullest open row it fits in, if any
    if has[c]:
      r = rows_with[c].pop()
      has[c] = bool(rows_with[c])
    else:
      r, c = n_rows, capacity
      n_rows += 1
    row_of[e] = r
    free = c - n
    if free > 0:
      rows_with[free].append(r)
      has[free] = True
  members = np.argsort(row_of, kind="stable")  # by row, then by place in the split
  counts = np.bincount(row_of, minlength=n_rows)
  return PackedRows(members, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def split_index(
  config: data.DataConfig,
  split: str,
  tok,
  files: Sequence[Path],
  eos: int,
  pad: int,
  key_parts: Sequence[str] = (),
  progress=None,
):
  """The ``data.SplitIndex`` of an instruction file set: its examples packed into rows
  (``config.packing``, :func:`pack_rows`) or one per row. ``key_parts``: the token cache's
  key of the files and the tokenizer (empty: they are hashed here); ``progress``: as for
  ``data.make_dataset``."""
  del eos  # placed by tokenize_examples
  if not key_parts:
    key_parts = [
      *(f"{f.resolve()}:{sources._sha256_file(f)}" for f in files),
      sources._tokenizer_hash(tok),
    ]
  # "all": eval of a held-out set of the user's own, every example.
  examples = batching._of_split(
    split,
    lambda s: cached_examples(
      config.source, s, tok, files, key_parts, progress, sources.parse_columns(config.columns)
    ),
    _joined_examples,
  )
  n = len(examples)
  n_tok = int(examples.starts[-1])
  B, L = config.batch_size, config.seq_len
  # A row holds seq_len + 1 tokens; an example whose reply starts after them trains nothing
  # (its mask is all zero), and a split of only such examples would report a loss of 0.
  # One with no trained token at all (a conversation without an "assistant" turn, e.g.
  # roles named "model" or "bot") is told apart: a longer --seq-len would not help it.
  none = examples.first[:, 1] == _NONE
  late = (examples.first[:, 1] > L) & ~none
  of = lambda k: f"{int(k)} of {n} {'' if split == 'all' else split + ' '}example(s)"
  said = []
  if late.any():
    said.append(
      f"{of(late.sum())} have no trained token within --seq-len {L} (+1) tokens (the "
      f"earliest reply among them starts at token {int(examples.first[late, 1].min())})"
    )
  if none.any():
    said.append(
      f'{of(none.sum())} have no trained token at all (only "assistant" turns are trained: '
      'replies under another role, e.g. "model", train nothing)'
    )
  if said and late.sum() + none.sum() == n:
    todo = "raise --seq-len" if late.any() else "check the roles of the conversations"
    raise ValueError(f"--data {config.source!r}: {'; '.join(said)}: nothing to learn from; {todo}")
  for what in said:
    warnings.warn(f"--data {config.source!r}: {what}: they add nothing to the loss", stacklevel=2)
  if not config.packing:
    return data.SplitIndex(n, B, _ExampleBatch(examples, B, L, pad), n, n, n_tok)
  rows = pack_rows(np.diff(examples.starts), L + 1)
  return data.SplitIndex(
    len(rows), B, _ExampleBatch(examples, B, L, pad, rows), n, len(rows), n_tok
  )


plan = split_index  # its name before data._Plan became data.SplitIndex
