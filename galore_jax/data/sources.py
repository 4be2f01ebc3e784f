"""Document sources, the tokenizer and the token cache.

* the tokenizer: the bundled 8k BPE SentencePiece model, another SentencePiece model,
  or a Hugging Face ``tokenizer.json`` (``galore_jax.hf``);
* path sources: a file, directory or glob of ``.txt`` / ``.jsonl`` / ``.json`` files
  (optionally ``.gz`` / ``.xz``), split 1 in 100 by content hash (``path_documents``);
* TFDS sources: an already prepared array_record dataset (``tfds_source``; the
  tensorflow_datasets import is lazy: the GPU image has none);
* the token cache: tokenized documents stored under ``cache_dir()``, keyed by the
  source's content, the tokenizer and ``DATA_FORMAT_VERSION``.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import gzip
import hashlib
import io
import json
import lzma
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from galore_jax.data.corpus import (
  DOC_MIN_CHARS,
  PACKAGE_DATA,
  _check_split,
  split_paragraph_documents,
)

BUILTIN_TOKENIZER = PACKAGE_DATA / "tokenizer.model"
# Path sources: a document goes to validation iff blake2b(text) % 100 == 0
# (1 in 100 by content hash, independent of file order).
PATH_VALIDATION_MODULUS = 100


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
COMPRESSION = {".gz": gzip.decompress, ".xz": lzma.decompress}


def file_kind(path: Path) -> tuple[str, str | None]:
  """(format suffix, compression suffix or None), or ValueError."""
  suffixes = [s.lower() for s in path.suffixes]
  comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSION else None
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
    file_kind(f)
  return files


def _looks_like_data(path: Path) -> bool:
  try:
    file_kind(path)
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
  fmt, comp = file_kind(path)
  raw = path.read_bytes()
  if comp:
    try:
      raw = COMPRESSION[comp](raw)
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


def doc_hash(doc: str) -> int:
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
  hashes = [doc_hash(d) for d in docs]
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
# TFDS sources (prepared array_record datasets, read in place)
# ----------------------------------------------------------------------------------------


def tfds_source(source: str, split: str):
  """The random-access ``tfds.data_source`` of ``split`` of a ``"tfds:NAME"`` source, read
  from ``$TFDS_DATA_DIR`` (nothing is downloaded); raises ValueError if it is empty."""
  name = source[len("tfds:") :].strip()
  if not name:
    raise ValueError(f"--data {source!r}: expected tfds:NAME, e.g. tfds:c4/en")
  try:
    import tensorflow_datasets as tfds  # lazy: heavy, and absent from the GPU image
  except ImportError as e:
    raise ImportError(
      f"--data {source!r} needs tensorflow-datasets (pip install tensorflow-datasets)"
    ) from e
  data_dir = os.environ.get("TFDS_DATA_DIR")
  try:
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # noqa: BLE001 -- tfds raises many kinds; re-raise with context
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    where = (
      f"TFDS_DATA_DIR ({data_dir})"
      if data_dir
      else "~/tensorflow_datasets (TFDS's default; TFDS_DATA_DIR names another)"
    )
    # What to do next, not only what failed: the dataset must be prepared once, and
    # galore-jax never downloads (a multi-host job must not have every host fetch C4).
    raise ValueError(
      f"--data {source!r}: cannot open split {split!r} of the TFDS dataset {name!r} in "
      f"{where} ({type(e).__name__}: {first}). It is read in place as array_record files "
      f"and nothing is downloaded: prepare it once with `tfds build {name} "
      f"--file_format=array_record`, or pass the text as JSON lines (--data "
      f"'DIR/*.json.gz', e.g. allenai/c4's en/ files)"
    ) from e
  if len(src) == 0:
    raise ValueError(f"--data {source!r}: split {split!r} is empty")
  return src


def _record_to_text(rec: Any) -> str:
  """The ``"text"`` feature of a TFDS record as a str."""
  text = rec["text"] if isinstance(rec, dict) else rec
  if isinstance(text, np.ndarray):
    text = text.item()
  if isinstance(text, bytes | np.bytes_):
    text = bytes(text).decode("utf-8")
  return str(text)
