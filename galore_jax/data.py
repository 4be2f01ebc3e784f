"""Data pipeline: tokenizer, bundled corpus, and deterministic grain loaders.

Three kinds of source (``DataConfig.source``, the ``--data`` value):

* ``"builtin"`` -- the bundled public-domain corpus (Jane Austen's six novels and
  Shakespeare's complete works, ``galore_jax/data/corpus``), split into documents
  and into a train / validation split by a fixed rule (see ``builtin_documents``).
* a path, directory or glob of ``.txt`` / ``.jsonl`` / ``.json`` files (each optionally
  ``.gz`` or ``.xz`` compressed). JSON records need a ``"text"`` field, or are
  instruction records (``prompt`` / ``completion`` or ``messages``, ``galore_jax.sft``).
* ``"tfds:NAME"`` (e.g. ``"tfds:c4/en"``) -- an already prepared TFDS dataset in
  array_record format, read with ``tfds.data_source`` from ``$TFDS_DATA_DIR``
  (never downloaded), tokenized on the fly.

Every loader is a random-access ``grain.MapDataset``: example indices -> shuffle(seed)
-> batch -> map(indices -> arrays) -> repeat, so ``Dataset.batch(step)`` is a pure
function of ``(config, split, step)``: resuming training only needs the step. Each
epoch is reshuffled (grain folds the epoch number into the shuffle seed); a batch never
mixes two epochs (an epoch's remainder is dropped).

Batches are ``{"inputs": int32 (B, L), "targets": int32 (B, L), "mask": float32 (B, L)}``;
each row is one window of L + 1 tokens, so ``targets[:, :-1] == inputs[:, 1:]``, and
``mask`` is 1.0 where the target is a real token, 0.0 on padding. Documents are
followed by EOS; no BOS is added.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import gzip
import hashlib
import io
import json
import lzma
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import grain
import numpy as np
import sentencepiece as spm

__all__ = [
  "DataConfig",
  "Dataset",
  "builtin_documents",
  "cache_dir",
  "eval_batches",
  "load_tokenizer",
  "make_dataset",
  "path_documents",
  "split_paragraph_documents",
  "BUILTIN_TOKENIZER",
  "CORPUS_FILES",
  "SPLITS",
]

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
BUILTIN_TOKENIZER = PACKAGE_DATA / "tokenizer.model"
CORPUS_DIR = PACKAGE_DATA / "corpus"
# Order matters: documents and sections are numbered in this order.
CORPUS_FILES = ("austen.txt.xz", "shakespeare.txt.xz")
SPLITS = ("train", "validation")

# --- fixed split rules (bump DATA_FORMAT_VERSION whenever one changes: it keys caches) ---
DATA_FORMAT_VERSION = "2"  # 2: .txt paragraphs over DOC_MIN_CHARS are cut at line ends
# Builtin corpus: every VALIDATION_EVERY-th section (chapter / scene / work preamble),
# counting from 0 in corpus order, goes to validation: section_index % 20 == 19.
VALIDATION_EVERY = 20
# Documents are runs of whole paragraphs of at least this many characters
# (a shorter tail of a section is merged into the section's previous document).
DOC_MIN_CHARS = 1000
# Path sources: a document goes to validation iff blake2b(text) % 100 == 0
# (1 in 100 by content hash, independent of file order).
PATH_VALIDATION_MODULUS = 100

_SECTION_HEADING = re.compile(r"^(CHAPTER|Chapter|SCENE|Scene)\s+[0-9IVXLCivxlc]+\b")
_BYLINE = re.compile(r"^by\s+(William Shakespeare|Jane Austen)\s*$", re.IGNORECASE)
_YEAR_LINE = re.compile(r"^\(\d{4}\)$")
# A work title glued to the previous work's last line ("[Exeunt.]THE SONNETS"):
# the title is the shortest all-capitals suffix that starts with a capital letter.
_GLUED_TITLE = re.compile(r"^(.*?)([A-Z][A-Z0-9 ,;:'.\-]*)$")


# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike | None = None) -> spm.SentencePieceProcessor:
  """Loads a SentencePiece model; ``None`` -> the bundled 8k BPE model. A ``tokenizer.json``
  or a model directory goes to :func:`galore_jax.hf.load_tokenizer` (same interface)."""
  if path is not None and (str(path).endswith(".json") or Path(path).expanduser().is_dir()):
    from galore_jax import hf

    return hf.load_tokenizer(path)
  p = Path(path).expanduser() if path is not None else BUILTIN_TOKENIZER
  if not p.is_file():
    raise FileNotFoundError(f"tokenizer model not found: {str(p)!r}")
  sp = spm.SentencePieceProcessor()
  sp.Load(str(p))
  return sp


def _special_ids(sp: spm.SentencePieceProcessor) -> tuple[int, int]:
  """(eos_id, pad_id). A model without a pad piece pads with id 0 (always masked)."""
  eos = sp.eos_id()
  if eos < 0:
    raise ValueError("tokenizer has no EOS piece; documents need an EOS separator")
  pad = sp.pad_id()
  return eos, (pad if pad >= 0 else 0)


# ----------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------


def _paragraphs(lines: Sequence[str]) -> list[str]:
  """Blank-line separated paragraphs; lines are right-stripped, inner newlines kept."""
  out: list[str] = []
  cur: list[str] = []
  for line in lines:
    line = line.rstrip()
    if line.strip():
      cur.append(line)
    elif cur:
      out.append("\n".join(cur))
      cur = []
  if cur:
    out.append("\n".join(cur))
  return out


def _line_groups(para: str, min_chars: int) -> list[str]:
  """A paragraph cut at line ends into groups of >= ``min_chars`` characters (a shorter
  tail joins the previous group); a single long line stays whole."""
  groups: list[list[str]] = []
  cur: list[str] = []
  size = 0
  for line in para.split("\n"):
    size += len(line) + (1 if cur else 0)
    cur.append(line)
    if size >= min_chars:
      groups.append(cur)
      cur, size = [], 0
  if cur:
    if groups:
      groups[-1] += cur
    else:
      groups.append(cur)
  return ["\n".join(g) for g in groups]


def split_paragraph_documents(
  text: str, min_chars: int = DOC_MIN_CHARS, *, cut_long_paragraphs: bool = False
) -> list[str]:
  """Groups whole consecutive paragraphs into documents of >= ``min_chars`` characters.

  Paragraphs are separated by blank lines; inside a document they are joined by one
  blank line. A tail shorter than ``min_chars`` joins the previous document (so only
  a text shorter than ``min_chars`` as a whole gives a shorter document).

  ``cut_long_paragraphs`` (``--data`` .txt files): a paragraph longer than
  ``min_chars`` is first cut at line ends into groups of >= ``min_chars``, so a file
  without blank lines (one sentence per line) still gives many documents.
  """
  docs: list[str] = []
  cur: list[str] = []
  size = 0
  paras = _paragraphs(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
  if cut_long_paragraphs:
    paras = [g for p in paras for g in (_line_groups(p, min_chars) if len(p) > min_chars else [p])]
  for para in paras:
    size += len(para) + (2 if cur else 0)  # == len("\n\n".join(cur))
    cur.append(para)
    if size >= min_chars:
      docs.append("\n\n".join(cur))
      cur, size = [], 0
  if cur:
    tail = "\n\n".join(cur)
    if docs:
      docs[-1] = docs[-1] + "\n\n" + tail
    else:
      docs.append(tail)
  return docs


def _title_line(lines: Sequence[str], byline: int) -> int:
  """Index of a work's title line: the first line above its byline that is neither
  blank nor a ``(1814)``-style year."""
  t = byline - 1
  while t > 0 and (not lines[t].strip() or _YEAR_LINE.match(lines[t].strip())):
    t -= 1
  return max(t, 0)


def _unglue_titles(lines: list[str]) -> list[str]:
  """Puts a work title glued to the previous work's last line (``[Exeunt.]THE SONNETS``,
  ``THE ENDANTONY AND CLEOPATRA``) on its own line."""
  out = list(lines)
  for j, line in enumerate(lines):
    if not _BYLINE.match(line) or j == 0:
      continue
    t = _title_line(lines, j)
    prev = lines[t]
    if prev.startswith("THE END") and len(prev) > len("THE END"):
      head, title = "THE END", prev[len("THE END") :]
    else:
      m = _GLUED_TITLE.match(prev)
      if not m or not m.group(1).strip():
        continue
      head, title = m.group(1), m.group(2)
    out[t] = head + "\n" + title  # re-split below
  return "\n".join(out).split("\n")


def _corpus_sections(text: str) -> list[list[str]]:
  """Splits one corpus file into sections (lists of lines).

  A section starts at each chapter / scene heading (``CHAPTER IV``, ``Chapter 12``,
  ``SCENE 2.``, ``Scene III.``) and at each work's title line (the line above the
  ``by William Shakespeare`` / ``By Jane Austen`` byline, skipping blank and
  ``(1814)``-style lines). A work's front matter (title, persons of the play,
  preface) is its own section, and poems without scenes are one section. A section
  with under 1000 characters of text (a bare title page) is merged into the next.
  """
  lines = _unglue_titles(text.replace("\r\n", "\n").split("\n"))
  starts = {0}
  for j, line in enumerate(lines):
    if _SECTION_HEADING.match(line):
      starts.add(j)
    elif _BYLINE.match(line):
      starts.add(_title_line(lines, j))
  bounds = sorted(starts) + [len(lines)]
  sections: list[list[str]] = []
  carry: list[str] = []
  for a, b in zip(bounds[:-1], bounds[1:], strict=True):
    sec = carry + lines[a:b]
    # A section with less than DOC_MIN_CHARS of text (a bare title page) joins the next.
    if sum(len(x.strip()) for x in sec) < DOC_MIN_CHARS and b < len(lines):
      carry = sec
    else:
      sections.append(sec)
      carry = []
  return sections


@lru_cache(maxsize=1)
def _builtin_sections() -> tuple[tuple[str, ...], ...]:
  """All sections of the bundled corpus, in corpus order, each as its documents."""
  sections: list[tuple[str, ...]] = []
  for name in CORPUS_FILES:
    path = CORPUS_DIR / name
    if not path.is_file():
      raise FileNotFoundError(f"bundled corpus file missing: {str(path)!r}")
    text = lzma.decompress(path.read_bytes()).decode("utf-8")
    for sec in _corpus_sections(text):
      docs = split_paragraph_documents("\n".join(sec))
      if docs:
        sections.append(tuple(docs))
  return tuple(sections)


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def builtin_documents(split: str) -> list[str]:
  """Documents of the bundled corpus for ``split`` ('train' | 'validation'), in corpus order.

  Rule (fixed, no randomness): the corpus (Austen's novels, then Shakespeare's
  works) is cut into sections -- chapters, scenes, and each work's front matter --
  numbered from 0; section ``i`` is validation iff ``i % 20 == 19`` (whole chapters
  and scenes are held out, 1 in 20). Each section is cut into documents of whole
  paragraphs of at least 1000 characters (see ``split_paragraph_documents``).
  """
  _check_split(split)
  want_val = split == "validation"
  return [
    doc
    for i, sec in enumerate(_builtin_sections())
    if ((i % VALIDATION_EVERY) == VALIDATION_EVERY - 1) == want_val
    for doc in sec
  ]


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to train on and how to cut it into batches.

  source: ``"builtin"`` | a path, directory or glob of ``.txt`` / ``.jsonl`` / ``.json``
    files (optionally ``.gz`` / ``.xz``) | ``"tfds:NAME"`` (e.g. ``"tfds:c4/en"``).
  packing: True -> documents are concatenated (each followed by EOS) into one token
    stream cut into windows of ``seq_len + 1`` tokens (stride ``seq_len``: every token
    after the first is a target exactly once). For ``tfds:`` sources the stream is
    built per batch from a fixed group of documents. False -> the paper's C4 setup:
    each document (+ EOS) truncated / padded to ``seq_len + 1`` tokens, padding masked.
  seed: shuffle seed (any int); epoch ``e`` is shuffled with a seed derived from it.
  tokenizer: SentencePiece model path; ``None`` -> the bundled 8k BPE model.
  """

  source: str = "builtin"
  seq_len: int = 256
  batch_size: int = 8
  packing: bool = True
  seed: int = 0
  tokenizer: str | None = None

  def __post_init__(self):
    if not isinstance(self.source, str) or not self.source.strip():
      raise ValueError(f"--data must be a non-empty string, got {self.source!r}")
    if int(self.seq_len) < 1:
      raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
    if int(self.batch_size) < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _shuffle_seed(seed: int) -> int:
  """Maps any int seed to grain's 32-bit shuffle seed (hashing keeps seeds s and s+1
  from sharing shuffles, since grain uses seed + epoch for epoch `epoch`)."""
  h = hashlib.blake2b(f"galore_jax.data.shuffle:{int(seed)}".encode(), digest_size=4)
  return int.from_bytes(h.digest(), "little")


# ----------------------------------------------------------------------------------------
# Token cache (~/.cache/galore_jax, never the package directory)
# ----------------------------------------------------------------------------------------


def cache_dir() -> Path:
  """``$GALORE_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/galore_jax``, else
  ``~/.cache/galore_jax``."""
  env = os.environ.get("GALORE_JAX_CACHE_DIR")
  if env:
    return Path(env).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME")
  base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
  return base / "galore_jax"


@dataclasses.dataclass(frozen=True)
class _TokenDocs:
  """Tokenized documents: ``tokens[offsets[i]:offsets[i + 1]]`` is document i (no EOS)."""

  tokens: np.ndarray
  offsets: np.ndarray

  @property
  def num_docs(self) -> int:
    return len(self.offsets) - 1

  def doc(self, i: int) -> np.ndarray:
    return self.tokens[self.offsets[i] : self.offsets[i + 1]]

  def stream(self, eos: int) -> np.ndarray:
    """All documents, each followed by EOS, as one int32 array."""
    return np.insert(self.tokens.astype(np.int32), self.offsets[1:], eos)


def _tokenize_docs(sp: spm.SentencePieceProcessor, docs: Sequence[str]) -> _TokenDocs:
  ids = sp.encode(list(docs), num_threads=max(1, min(4, os.cpu_count() or 1)))
  lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
  offsets = np.zeros(len(ids) + 1, dtype=np.int64)
  np.cumsum(lengths, out=offsets[1:])
  dtype = np.uint16 if sp.get_piece_size() <= 1 << 16 else np.int32
  tokens = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(offsets[-1]))
  return _TokenDocs(tokens, offsets)


def _cached_tokens(key_parts: Sequence[str], build) -> _TokenDocs:
  """Loads tokenized documents from the cache, or builds (``build()``) and stores them.

  The cache is an optimisation only: an unwritable cache directory is ignored.
  """
  key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:32]
  path = cache_dir() / "tokens" / f"{key}.npz"
  if path.is_file():
    try:
      with np.load(path) as z:
        return _TokenDocs(z["tokens"], z["offsets"])
    except (OSError, ValueError, KeyError):
      pass  # corrupt / partial: rebuild
  docs = build()
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      np.savez(f, tokens=docs.tokens, offsets=docs.offsets)
    os.replace(tmp, path)
  except OSError:
    if tmp is not None:
      Path(tmp).unlink(missing_ok=True)
  return docs


def _sha256_file(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _tokenizer_hash(sp: spm.SentencePieceProcessor) -> str:
  return hashlib.sha256(sp.serialized_model_proto()).hexdigest()


# ----------------------------------------------------------------------------------------
# Path sources (.txt / .jsonl / .json, optionally .gz / .xz)
# ----------------------------------------------------------------------------------------

_TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
_COMPRESSION = {".gz": gzip.decompress, ".xz": lzma.decompress}


def _file_kind(path: Path) -> tuple[str, str | None]:
  """(format suffix, compression suffix or None), or ValueError."""
  suffixes = [s.lower() for s in path.suffixes]
  comp = suffixes[-1] if suffixes and suffixes[-1] in _COMPRESSION else None
  fmt_suffixes = suffixes[:-1] if comp else suffixes
  fmt = fmt_suffixes[-1] if fmt_suffixes else ""
  if fmt not in _TEXT_SUFFIXES:
    raise ValueError(
      f"unsupported data file {str(path)!r}: expected .txt, .jsonl or .json "
      "(optionally .gz / .xz compressed)"
    )
  return fmt, comp


def _resolve_paths(source: str) -> list[Path]:
  """Expands a --data path / directory / glob into a sorted list of data files."""
  expanded = os.path.expanduser(source)
  if any(c in expanded for c in "*?["):
    matches = sorted(Path(p) for p in globlib.glob(expanded, recursive=True))
    files = [p for p in matches if p.is_file()]
    if not files:
      raise FileNotFoundError(f"--data {source!r}: the glob matches no files")
  else:
    p = Path(expanded)
    if not p.exists():
      raise FileNotFoundError(f"--data {source!r}: no such file or directory")
    if p.is_dir():
      files = sorted(q for q in p.rglob("*") if q.is_file() and _looks_like_data(q))
      if not files:
        raise FileNotFoundError(
          f"--data {source!r}: directory holds no .txt / .jsonl / .json(.gz) files"
        )
    else:
      files = [p]
  for f in files:
    _file_kind(f)
  return files


def _looks_like_data(path: Path) -> bool:
  try:
    _file_kind(path)
    return True
  except ValueError:
    return False


def _record_text(rec: Any, where: str) -> str:
  if isinstance(rec, str):
    return rec
  if isinstance(rec, dict) and "text" in rec:
    text = rec["text"]
    if isinstance(text, str):
      return text
  raise ValueError(f'{where}: expected a JSON object with a string "text" field')


def _file_documents(path: Path) -> list[str]:
  """Documents of one file: a .txt file is cut into documents of >= 1000 characters at
  blank lines, or at line ends inside longer paragraphs (``split_paragraph_documents``);
  a JSON record is one document."""
  fmt, comp = _file_kind(path)
  raw = path.read_bytes()
  if comp:
    try:
      raw = _COMPRESSION[comp](raw)
    except (OSError, EOFError, lzma.LZMAError) as e:
      raise ValueError(f"{path}: cannot decompress ({comp}): {e}") from e
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text: {e}") from e
  if fmt == ".txt":
    return split_paragraph_documents(text, cut_long_paragraphs=True)
  docs: list[str] = []
  whole: Any = None
  if fmt == ".json":  # a JSON array / object, or JSON lines (C4's *.json.gz files)
    try:
      whole = json.loads(text)
    except json.JSONDecodeError:
      whole = None
  if isinstance(whole, list):
    for i, rec in enumerate(whole):
      docs.append(_record_text(rec, f"{path} [item {i}]"))
  elif isinstance(whole, dict):
    docs.append(_record_text(whole, str(path)))
  else:  # JSON lines
    for lineno, line in enumerate(io.StringIO(text), 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON line: {e}") from e
      docs.append(_record_text(rec, f"{path}:{lineno}"))
  return [d for d in docs if d.strip()]


def _doc_hash(doc: str) -> int:
  """64-bit content hash of a document (the 1-in-100 validation rule)."""
  h = hashlib.blake2b(doc.encode("utf-8"), digest_size=8)
  return int.from_bytes(h.digest(), "little")


def path_documents(source: str, split: str) -> list[str]:
  """Documents of a path source for ``split``, in file order (files sorted by path).

  Validation rule: a document is in 'validation' iff ``blake2b(text) % 100 == 0``
  (1 in 100, by content, so independent of file order and the same for duplicates).
  If that selects no document and there are at least two, the one with the smallest
  hash is the validation split.
  """
  _check_split(split)
  docs = [d for f in _resolve_paths(source) for d in _file_documents(f)]
  if not docs:
    raise ValueError(f"--data {source!r}: no non-empty documents")
  hashes = [_doc_hash(d) for d in docs]
  is_val = [h % PATH_VALIDATION_MODULUS == 0 for h in hashes]
  if not any(is_val) and len(docs) >= 2:
    is_val[int(np.argmin(np.array(hashes, dtype=np.uint64)))] = True
  want = split == "validation"
  out = [d for d, v in zip(docs, is_val, strict=True) if v == want]
  if not out:
    raise ValueError(
      f"--data {source!r}: split {split!r} is empty ({len(docs)} document(s) in all; "
      f"the validation split needs at least two. A .txt file gives one document per "
      f"{DOC_MIN_CHARS} characters, cut at blank lines or line ends; a JSON record is one)"
    )
  return out


# ----------------------------------------------------------------------------------------
# Batch assembly (the grain map: a batch of example indices -> arrays)
# ----------------------------------------------------------------------------------------


class _Rows:
  """Builds a {'inputs', 'targets', 'mask'} batch of `batch_size` rows from token
  windows of up to seq_len + 1 tokens; missing rows / tokens are padding (mask 0)."""

  def __init__(self, batch_size: int, seq_len: int, pad: int):
    self.batch_size, self.seq_len, self.pad = batch_size, seq_len, pad

  def empty(self) -> tuple[np.ndarray, np.ndarray]:
    buf = np.full((self.batch_size, self.seq_len + 1), self.pad, dtype=np.int32)
    return buf, np.zeros((self.batch_size, self.seq_len), dtype=np.float32)

  def from_windows(self, windows: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    buf, mask = self.empty()
    for r, w in enumerate(windows):
      buf[r, : len(w)] = w
      mask[r, : max(len(w) - 1, 0)] = 1.0
    return self.finish(buf, mask)

  @staticmethod
  def finish(buf: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    return {
      "inputs": np.ascontiguousarray(buf[:, :-1]),
      "targets": np.ascontiguousarray(buf[:, 1:]),
      "mask": mask,
    }


class _WindowBatch(_Rows):
  """Window indices -> rows cut from the packed token stream (window i starts at
  token i * seq_len and has seq_len + 1 tokens, so consecutive windows share one)."""

  def __init__(self, stream: np.ndarray, batch_size: int, seq_len: int, pad: int):
    super().__init__(batch_size, seq_len, pad)
    self.stream = stream
    self.offsets = np.arange(seq_len + 1, dtype=np.int64)

  def __call__(self, idx) -> dict[str, np.ndarray]:
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    buf, mask = self.empty()
    buf[: len(idx)] = self.stream[idx[:, None] * self.seq_len + self.offsets]
    mask[: len(idx)] = 1.0
    return self.finish(buf, mask)


def _truncated(doc: np.ndarray, seq_len: int, eos: int) -> np.ndarray:
  """Document + EOS, truncated to seq_len + 1 tokens."""
  return np.append(np.asarray(doc[: seq_len + 1], np.int32), np.int32(eos))[: seq_len + 1]


class _DocBatch(_Rows):
  """Document indices -> one document per row, + EOS, truncated / padded (packing=False)."""

  def __init__(self, docs: _TokenDocs, batch_size: int, seq_len: int, eos: int, pad: int):
    super().__init__(batch_size, seq_len, pad)
    self.docs, self.eos = docs, eos

  def __call__(self, idx) -> dict[str, np.ndarray]:
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    return self.from_windows(
      [_truncated(self.docs.doc(int(i)), self.seq_len, self.eos) for i in idx]
    )


def _record_to_text(rec: Any) -> str:
  text = rec["text"] if isinstance(rec, dict) else rec
  if isinstance(text, np.ndarray):
    text = text.item()
  if isinstance(text, bytes | np.bytes_):
    text = bytes(text).decode("utf-8")
  return str(text)


class _TfdsBatch(_Rows):
  """Record indices -> records read from the TFDS data source (one batched read), their
  'text' tokenized (one batched SentencePiece call), then either one document per row
  (``pack=False``) or all of them, each + EOS, packed into the batch's rows like the
  packed stream (``pack=True``; tokens past the last row are dropped, rows past the
  group's tokens are padding)."""

  def __init__(self, source, sp, batch_size: int, seq_len: int, eos: int, pad: int, pack: bool):
    super().__init__(batch_size, seq_len, pad)
    self.source, self.sp, self.eos, self.pack = source, sp, eos, pack

  def tokens(self, idx) -> list[list[int]]:
    keys = [int(i) for i in np.asarray(idx).reshape(-1)]
    getitems = getattr(self.source, "__getitems__", None)
    records = getitems(keys) if getitems else [self.source[k] for k in keys]
    texts = [_record_to_text(r) for r in records]
    return self.sp.encode(texts, num_threads=min(4, max(1, len(texts))))

  def __call__(self, idx) -> dict[str, np.ndarray]:
    ids = self.tokens(idx)
    if not self.pack:
      return self.from_windows([_truncated(x, self.seq_len, self.eos) for x in ids])
    stream = np.fromiter(
      (t for x in ids for t in (*x, self.eos)),
      dtype=np.int32,
      count=sum(len(x) + 1 for x in ids),
    )
    L = self.seq_len
    return self.from_windows(
      [w for r in range(self.batch_size) if len(w := stream[r * L : r * L + L + 1])]
    )


# ----------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------


class Dataset:
  """Deterministic, randomly accessible stream of training batches.

  ``batch(step)`` is a pure function of (config, split, step): epoch
  ``step // steps_per_epoch`` is a fresh shuffle of the split's examples, and a
  batch never straddles two epochs (the remainder of an epoch is dropped). So the
  data position of a checkpoint is just the step.

  Attributes: config, split, tokenizer, vocab_size, eos_id, pad_id, num_documents,
  num_examples (windows / documents / packed rows per epoch), steps_per_epoch,
  num_tokens (tokens incl. one EOS per document; None for tfds sources),
  grain_dataset (the infinite ``grain.MapDataset`` of batches).
  """

  def __init__(
    self,
    *,
    config: DataConfig,
    split: str,
    tokenizer: spm.SentencePieceProcessor,
    grain_dataset: grain.MapDataset,
    steps_per_epoch: int,
    num_examples: int,
    num_documents: int,
    num_tokens: int | None,
    read_threads: int,
  ):
    self.config = config
    self.split = split
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.get_piece_size()
    self.eos_id, self.pad_id = _special_ids(tokenizer)
    self.grain_dataset = grain_dataset
    self.steps_per_epoch = steps_per_epoch
    self.num_examples = num_examples
    self.num_documents = num_documents
    self.num_tokens = num_tokens
    self._read_threads = read_threads

  @property
  def seq_len(self) -> int:
    return self.config.seq_len

  @property
  def batch_size(self) -> int:
    return self.config.batch_size

  def epoch(self, step: int) -> int:
    return int(step) // self.steps_per_epoch

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch for training step ``step`` (0-based)."""
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    return self.grain_dataset[step]

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``batch(start_step)``, ``batch(start_step + 1)``, ... forever, prefetched
    by grain in background threads."""
    start_step = int(start_step)
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}")
    opts = grain.ReadOptions(
      num_threads=self._read_threads, prefetch_buffer_size=2 * self._read_threads
    )
    return iter(self.grain_dataset[start_step:].to_iter_dataset(opts))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.iterate(0)

  def __repr__(self) -> str:
    c = self.config
    return (
      f"Dataset(source={c.source!r}, split={self.split!r}, packing={c.packing}, "
      f"seq_len={c.seq_len}, batch_size={c.batch_size}, seed={c.seed}, "
      f"documents={self.num_documents}, examples={self.num_examples}, "
      f"steps_per_epoch={self.steps_per_epoch}, tokens={self.num_tokens}, "
      f"vocab_size={self.vocab_size})"
    )


@dataclasses.dataclass
class _Plan:
  """A split as `num_items` indexable items (windows / documents / records), taken
  `per_batch` at a time (batch_size, or a document group for tfds packing) and turned
  into a batch by `make_batch`."""

  num_items: int
  per_batch: int
  make_batch: Any
  num_documents: int
  num_examples: int
  num_tokens: int | None
  read_threads: int = 1


def _in_memory_plan(config: DataConfig, docs: _TokenDocs, eos: int, pad: int) -> _Plan:
  B, L = config.batch_size, config.seq_len
  n_tok = int(docs.offsets[-1]) + docs.num_docs
  if config.packing:
    stream = docs.stream(eos)
    n = max(len(stream) - 1, 0) // L
    return _Plan(n, B, _WindowBatch(stream, B, L, pad), docs.num_docs, n, n_tok)
  nd = docs.num_docs
  return _Plan(nd, B, _DocBatch(docs, B, L, eos, pad), nd, nd, n_tok)


# tfds packing: each batch packs a fixed group of documents, sized for about this many
# times the batch's tokens (mean document length from the split's first 64 documents).
_TFDS_PACK_OVERSAMPLE = 1.25


def _tfds_plan(config: DataConfig, split: str, sp, eos: int, pad: int) -> _Plan:
  name = config.source[len("tfds:") :].strip()
  if not name:
    raise ValueError(f"--data {config.source!r}: expected tfds:NAME, e.g. tfds:c4/en")
  try:
    import tensorflow_datasets as tfds  # lazy: heavy, and absent from the GPU image
  except ImportError as e:
    raise ImportError(
      f"--data {config.source!r} needs tensorflow-datasets (pip install tensorflow-datasets)"
    ) from e
  data_dir = os.environ.get("TFDS_DATA_DIR")
  try:
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # noqa: BLE001 -- tfds raises many kinds; re-raise with context
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(
      f"--data {config.source!r}: cannot open split {split!r} of the prepared TFDS "
      f"dataset {name!r} (TFDS_DATA_DIR={data_dir!r}; needs array_record files, "
      f"nothing is downloaded): {type(e).__name__}: {first}"
    ) from e
  n = len(src)
  if n == 0:
    raise ValueError(f"--data {config.source!r}: split {split!r} is empty")
  B, L = config.batch_size, config.seq_len
  make = _TfdsBatch(src, sp, B, L, eos, pad, pack=config.packing)
  threads = max(1, min(4, os.cpu_count() or 1))
  if not config.packing:
    return _Plan(n, B, make, n, n, None, threads)
  sample = make.tokens(np.arange(min(n, 64)))
  mean = float(np.mean([len(x) + 1 for x in sample]))
  group = max(1, math.ceil(_TFDS_PACK_OVERSAMPLE * (B * L + 1) / mean))
  return _Plan(n, group, make, n, (n // group) * B, None, threads)


def _plan(config: DataConfig, split: str, sp: spm.SentencePieceProcessor) -> _Plan:
  _check_split(split)
  eos, pad = _special_ids(sp)
  source = config.source.strip()
  if source.startswith("tfds:"):
    return _tfds_plan(config, split, sp, eos, pad)
  tok_hash = _tokenizer_hash(sp)
  if source == "builtin":
    corpus_hash = [_sha256_file(CORPUS_DIR / n) for n in CORPUS_FILES]
    key = ["builtin", DATA_FORMAT_VERSION, *corpus_hash, tok_hash, split]
    docs = _cached_tokens(key, lambda: _tokenize_docs(sp, builtin_documents(split)))
  else:
    files = _resolve_paths(source)
    from galore_jax import sft  # lazy: sft builds on this module

    if sft.is_instruction_data(files):  # prompt/completion or chat records: masked loss
      return sft.plan(config, split, sp, files, eos, pad)
    key = ["paths", DATA_FORMAT_VERSION, *(f"{f.resolve()}:{_sha256_file(f)}" for f in files)]
    key += [tok_hash, split]
    docs = _cached_tokens(key, lambda: _tokenize_docs(sp, path_documents(source, split)))
  return _in_memory_plan(config, docs, eos, pad)


def _too_small(config: DataConfig, split: str, plan: _Plan) -> ValueError:
  if plan.per_batch != config.batch_size:  # tfds packing
    what = f"{plan.num_documents} documents, {plan.per_batch} packed into each batch"
  else:
    what = f"{plan.num_examples} examples of up to {config.seq_len + 1} tokens"
  if plan.num_tokens is not None:
    what += f", {plan.num_tokens} tokens"
  return ValueError(
    f"--data {config.source!r}: split {split!r} is too small for one batch of "
    f"{config.batch_size} ({what}); use more data or a smaller batch size / seq_len"
  )


def make_dataset(config: DataConfig, split: str = "train", *, shard=None) -> Dataset:
  """Builds the shuffled, infinitely repeating batch stream for ``split``.

  grain pipeline (all random access, ``grain.MapDataset``): item indices ->
  shuffle(seed; reshuffled each epoch) -> batch(drop remainder) -> map(indices ->
  arrays: gather windows / documents, or read + tokenize tfds records) -> repeat.

  ``shard`` (a :class:`galore_jax.distributed.RowShard`, multi-process runs): batches hold
  only that process's rows of each global batch (the same shuffled indices).
  """
  sp = load_tokenizer(config.tokenizer)
  plan = _plan(config, split, sp)
  ds = grain.MapDataset.range(plan.num_items).shuffle(seed=_shuffle_seed(config.seed))
  make_batch = plan.make_batch
  if shard is not None:  # --- multi-process hook (galore_jax.distributed) ---
    from galore_jax import distributed

    make_batch = distributed.local_batches(make_batch, plan.per_batch, shard)
  ds = ds.batch(plan.per_batch, drop_remainder=True).map(make_batch)
  steps = len(ds)
  if steps == 0:
    raise _too_small(config, split, plan)
  return Dataset(
    config=config,
    split=split,
    tokenizer=sp,
    grain_dataset=ds.repeat(),
    steps_per_epoch=steps,
    num_examples=plan.num_examples,
    num_documents=plan.num_documents,
    num_tokens=plan.num_tokens,
    read_threads=plan.read_threads,
  )


def eval_batches(config: DataConfig, max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
  """Fixed validation batches: the validation split's examples in order (no shuffle),
  the first ``max_batches`` batches (all if None). A last, partial batch is padded to
  ``batch_size`` rows with fully masked rows, so every batch has the training shape.
  """
  sp = load_tokenizer(config.tokenizer)
  plan = _plan(config, "validation", sp)
  if plan.num_items == 0:
    raise _too_small(config, "validation", plan)
  ds = grain.MapDataset.range(plan.num_items).batch(plan.per_batch).map(plan.make_batch)
  n = len(ds) if max_batches is None else min(len(ds), int(max_batches))
  return [ds[i] for i in range(n)]
