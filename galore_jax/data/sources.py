"""Document sources, the tokenizer and the token cache.

* the tokenizer: the bundled 8k BPE SentencePiece model, another SentencePiece model,
  or a Hugging Face ``tokenizer.json`` (``galore_jax.hf``);
* path sources: a file, directory or glob of ``.txt`` / ``.jsonl`` / ``.json`` files
  (optionally ``.gz`` / ``.xz`` / ``.zst``) or ``.parquet`` files (a ``text`` column), and
  markdown read as text where named (not in a directory's walk), read as streams, split 1
  in 100 by content hash (``split_by_hash``);
* TFDS sources: an already prepared array_record dataset (``tfds_source``; the
  tensorflow_datasets import is lazy: the GPU image has none);
* the token cache: tokenized documents stored under ``cache_dir()``, keyed by the
  source's content, the tokenizer and ``DATA_FORMAT_VERSION``; read back as a memory map,
  built by one process at a time (``_building``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob as globlib
import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import re
import secrets
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from galore_jax.data.corpus import (
  DOC_MIN_CHARS,
  PACKAGE_DATA,
  SPLITS,
  _check_split,
  paragraph_documents,
)

BUILTIN_TOKENIZER = PACKAGE_DATA / "tokenizer.model"
# Path sources: a document goes to validation iff blake2b(text) % 100 == 0
# (1 in 100 by content hash, independent of file order).
PATH_VALIDATION_MODULUS = 100


# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------


def load_tokenizer(
  path: str | os.PathLike | None = None, chat_template: str | None = None
) -> spm.SentencePieceProcessor:
  """Loads a SentencePiece model; ``None`` -> the bundled 8k BPE model. A ``tokenizer.json``
  or a model directory goes to :func:`galore_jax.hf.load_tokenizer` (same interface).
  ``chat_template``: the chat template it renders ``"messages"`` records with, in place of
  its own (``--chat-template``; a SentencePiece model has none of its own)."""
  if path is not None and (str(path).endswith(".json") or Path(path).expanduser().is_dir()):
    from galore_jax import hf

    sp = hf.load_tokenizer(path)
  else:
    p = Path(path).expanduser() if path is not None else BUILTIN_TOKENIZER
    if not p.is_file():
      raise FileNotFoundError(f"tokenizer model not found: {str(p)!r}")
    sp = spm.SentencePieceProcessor()
    sp.Load(str(p))
  if chat_template is not None:
    sp.chat_template = chat_template
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
  """Tokenized documents packed into one stream, each followed by EOS: document i is
  ``stream[starts[i] : starts[i + 1] - 1]``. The stream is in the tokens' dtype (uint16
  for the bundled vocabulary: half of int32's host memory; batches are int32); a cached
  source's is a read-only memory map of its cache file, whose pages the processes reading
  that source share (one per GPU of a host) and the OS can drop and read again."""

  stream: np.ndarray
  starts: np.ndarray
  extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # small, per entry

  @property
  def num_docs(self) -> int:
    return len(self.starts) - 1

  def doc(self, i: int) -> np.ndarray:
    """Document ``i``'s tokens, without its EOS."""
    return self.stream[self.starts[i] : self.starts[i + 1] - 1]


def joined_docs(parts: Sequence[_TokenDocs]) -> _TokenDocs:
  """The documents of ``parts``, one part after another (copied into memory: ``eval
  --split all`` of a held-out set)."""
  stream = np.concatenate([p.stream for p in parts])
  return _TokenDocs(stream, _starts([np.diff(p.starts) for p in parts]))


# Documents are tokenized a batch of about this many characters at a time: the tokenizer
# returns a Python int per token (~36 bytes each), and a whole source at once took ~12 GB per
# GB of JSON lines (experiments/data_load.py; one allenai/c4 shard holds ~0.8 GB). Only the
# compact arrays grow with the source.
TOKENIZE_BATCH_CHARS = 8 << 20


def _usable_cpus() -> int:
  if hasattr(os, "sched_getaffinity"):  # a job scheduler's CPU set, not the machine's
    return max(1, len(os.sched_getaffinity(0)))
  return os.cpu_count() or 1


def _starts(lengths: Sequence[np.ndarray]) -> np.ndarray:
  """Where each item begins in the items laid end to end (one more: where they end)."""
  joined = np.concatenate([np.zeros(0, np.int64), *lengths])
  starts = np.zeros(len(joined) + 1, dtype=np.int64)
  np.cumsum(joined, out=starts[1:])
  return starts


class _BatchBuilder:
  """Items appended one at a time and tokenized (``_encode``) a batch of about
  ``TOKENIZE_BATCH_CHARS`` characters at a time; what :func:`split_by_hash` fills
  (``append``, ``len``, ``del``; subclasses drop an item)."""

  def __init__(self):
    self._pending: list = []
    self._pending_chars = 0
    self._count = 0

  def __len__(self) -> int:
    return self._count

  def append(self, item) -> None:
    self._pending.append(item)
    self._pending_chars += self._chars(item)
    self._count += 1
    if self._pending_chars >= TOKENIZE_BATCH_CHARS:
      self._flush()

  def _flush(self) -> None:
    if self._pending:
      pending, self._pending, self._pending_chars = self._pending, [], 0
      self._encode(pending)


class _TokenBuilder(_BatchBuilder):
  """Tokenizes appended documents a batch at a time into compact chunks of the packed
  stream (each document + EOS; uint16 for vocabularies of up to 65536 pieces).
  :meth:`store` writes them to the cache chunk by chunk; :meth:`finish` joins them in
  memory."""

  def __init__(self, sp):
    super().__init__()
    self.sp = sp
    self.eos = _special_ids(sp)[0]
    self.dtype = np.uint16 if sp.get_piece_size() <= 1 << 16 else np.int32
    self.threads = _usable_cpus()  # a one-off task the start waits for: every core
    self._chunks: list[np.ndarray] = []
    self._lengths: list[np.ndarray] = []  # per document, EOS included

  _chars = staticmethod(len)

  def __delitem__(self, i: int) -> None:
    """Drops document ``i`` (the split rule's fallback, which only small sources reach)."""
    docs = self.finish()
    keep = np.ones(len(docs.stream), dtype=bool)
    keep[docs.starts[i] : docs.starts[i + 1]] = False
    self._chunks, self._lengths = [docs.stream[keep]], [np.delete(np.diff(docs.starts), i)]
    self._count -= 1

  def _encode(self, docs: list[str]) -> None:
    ids = self.sp.encode(docs, num_threads=self.threads)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = itertools.chain.from_iterable(ids)
    tokens = np.fromiter(flat, dtype=self.dtype, count=int(lengths.sum()))
    self._chunks.append(np.insert(tokens, np.cumsum(lengths), np.asarray(self.eos, self.dtype)))
    self._lengths.append(lengths + 1)

  def finish(self) -> _TokenDocs:
    """The documents, joined in memory (once, however often called)."""
    self._flush()
    stream = np.concatenate([np.zeros(0, self.dtype), *self._chunks])
    starts = _starts(self._lengths)
    self._chunks, self._lengths = [stream], [np.diff(starts)]
    return _TokenDocs(stream, starts)

  def store(self, key: Sequence[str]) -> _TokenDocs:
    """The documents, written to the token cache under ``key`` chunk by chunk (never
    joined in memory) and mapped back; joined in memory if the cache cannot be written."""
    self._flush()
    path = _token_cache_path(key)
    if _store_tokens(path, self._chunks, _starts(self._lengths), key=key):
      docs = _load_tokens(path, self.eos, verify=False)  # just written: its CRC is known
      if docs is not None:
        self._chunks, self._lengths = [docs.stream], [np.diff(docs.starts)]
        return docs
    return self.finish()


def _tokenize_docs(sp: spm.SentencePieceProcessor, docs: Iterable[str]) -> _TokenBuilder:
  builder = _TokenBuilder(sp)
  for doc in docs:
    builder.append(doc)
  return builder


def _digest(parts: Sequence[str], length: int = 16) -> str:
  """The first ``length`` hex digits of the SHA-256 of ``parts`` (a cache key, a data
  fingerprint)."""
  return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


# A cache entry is two files: <key>.stream.npy, the packed stream (memory-mapped when
# read), and <key>.docs.npz, the document starts and the stream file's CRC-32, written
# last: an entry without it, or whose stream is cut short or fails the CRC, is a miss.
# Versions before the memory-mapped stream kept tokens and offsets in one <key>.npz.
def _token_cache_path(key_parts: Sequence[str]) -> Path:
  """The entry's stream file; ``_docs_path`` gives its index."""
  return cache_dir() / "tokens" / f"{_digest(key_parts, 32)}.stream.npy"


def _docs_path(stream_path: Path) -> Path:
  return stream_path.with_name(stream_path.name.replace(".stream.npy", ".docs.npz"))


def _legacy_path(stream_path: Path) -> Path:
  return stream_path.with_name(stream_path.name.replace(".stream.npy", ".npz"))


_CACHE_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
_KEY = "key"  # the index's record of the key parts the entry was stored under


def _file_crc32(path: Path) -> int:
  crc = 0
  with open(path, "rb") as f:  # read(), not the map: the pages stay out of this process
    while chunk := f.read(8 << 20):
      crc = zlib.crc32(chunk, crc)
  return crc


def _load_tokens(
  path: Path, eos: int, *, verify: bool = True, key: Sequence[str] | None = None
) -> _TokenDocs | None:
  """The cached documents whose stream file is ``path``, or None (absent, corrupt or
  partial: rebuild). ``verify``: check the stream file's CRC (a full read, ~1.3 GB/s),
  which catches a damaged file that still has the right size. ``key``: the entry's key
  parts, recorded in an index written before keys were (for ``galore-jax cache``)."""
  docs_path = _docs_path(path)
  if not docs_path.is_file():
    return _migrate_legacy(path, eos, key)
  try:
    with np.load(docs_path) as z:
      starts, crc = z["starts"], int(z["crc32"])
      extra = {k: z[k] for k in z.files if k not in ("starts", "crc32", _KEY)}
      unrecorded = key is not None and _KEY not in z.files
    stream = np.load(path, mmap_mode="r")
  except _CACHE_ERRORS:
    return None
  if stream.ndim != 1 or starts.ndim != 1 or not len(starts) or starts[0] != 0:
    return None
  if starts[-1] != len(stream) or (verify and _file_crc32(path) != crc):
    return None
  if unrecorded:
    _write_index(docs_path, starts, crc, extra, key)
  else:
    with contextlib.suppress(OSError):  # when it was last used (galore-jax cache)
      os.utime(docs_path)
  return _TokenDocs(stream, starts, extra)


def _index_writer(
  starts: np.ndarray, crc: int, extra: dict | None, key: Sequence[str] | None
) -> Callable:
  """``write(f)`` of an entry's index: the starts, the stream's CRC-32, the key parts (which
  ``galore-jax cache`` shows) and the small ``extra`` arrays."""
  recorded = {} if key is None else {_KEY: np.array(list(key), dtype=str)}
  return lambda f: np.savez(f, starts=starts, crc32=np.uint32(crc), **recorded, **(extra or {}))


def _write_index(docs_path: Path, *args) -> None:
  """Rewrites an entry's index atomically (:func:`_index_writer`'s arguments); an
  unwritable cache is left as it is."""
  _replace(docs_path, _index_writer(*args))


def _migrate_legacy(path: Path, eos: int, key: Sequence[str] | None) -> _TokenDocs | None:
  """An entry of the one-file format (tokens without EOS, offsets), rewritten in this
  one's and removed: an upgrade does not tokenize its sources again."""
  legacy = _legacy_path(path)
  if not legacy.is_file():
    return None
  try:
    with np.load(legacy) as z:
      tokens, offsets = z["tokens"], z["offsets"]
  except _CACHE_ERRORS:
    return None
  stream = np.insert(tokens, offsets[1:], np.asarray(eos, tokens.dtype))
  starts = offsets + np.arange(len(offsets), dtype=offsets.dtype)  # one EOS per document
  del tokens
  if not _store_tokens(path, [stream], starts, key=key):
    return _TokenDocs(stream, starts)
  legacy.unlink(missing_ok=True)
  return _load_tokens(path, eos, verify=False) or _TokenDocs(stream, starts)


def _new_temp(path: Path, write: Callable, mode: str = "wb") -> str:
  """A new temporary file next to ``path`` (to replace it atomically) holding what
  ``write(f)`` writes; returns its name, or removes it and raises if writing fails. It is
  created with the mode the umask gives: ``mkstemp``'s 0600 would keep the entries of a
  cache directory that several users share (GALORE_JAX_CACHE_DIR) from all but the one
  who wrote them."""
  tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return tmp


def _replace(path: Path, write: Callable, mode: str = "wb") -> bool:
  """Replaces ``path`` atomically with what ``write(f)`` writes (:func:`_new_temp`); False,
  and no file left, where the cache cannot be written (the cache is an optimisation)."""
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path, write, mode)
    os.replace(tmp, path)
    tmp = None
    return True
  except OSError:
    return False
  finally:
    if tmp is not None:  # not moved into place (an error, or a Ctrl-C)
      Path(tmp).unlink(missing_ok=True)


def _store_tokens(
  path: Path,
  chunks: Sequence[np.ndarray],
  starts: np.ndarray,
  extra: dict | None = None,
  *,
  key: Sequence[str] | None = None,
) -> bool:
  """Writes the stream (``chunks``, in order) and its index (``starts``, the small
  ``extra`` arrays and the entry's ``key`` parts, which ``galore-jax cache`` shows) to the
  cache, each file atomically, the index last. The cache is an optimisation only: an
  unwritable cache directory (or a full disk) is ignored (False)."""
  dtype = chunks[0].dtype if chunks else np.dtype(np.uint16)

  def write_stream(f) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
    np.lib.format.write_array_header_1_0(f, {**header, "shape": (int(starts[-1]),)})
    for chunk in chunks:
      f.write(np.ascontiguousarray(chunk, dtype).data)

  tmps: list[str] = []
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmps.append(_new_temp(path, write_stream))
    crc = _file_crc32(Path(tmps[0]))
    tmps.append(_new_temp(_docs_path(path), _index_writer(starts, crc, extra, key)))
    _docs_path(path).unlink(missing_ok=True)  # no index names a stream being replaced
    os.replace(tmps[0], path)
    os.replace(tmps[1], _docs_path(path))
    return True
  except BaseException as e:  # a full disk, or a Ctrl-C while writing: no stray files
    for t in tmps:
      Path(t).unlink(missing_ok=True)
    if isinstance(e, OSError):
      return False
    raise


def lock_path(path: Path) -> Path:
  """The build lock of the cache entry whose stream is ``path`` (:func:`_building`)."""
  return path.with_name(path.name.replace(".stream.npy", ".lock"))


@contextlib.contextmanager
def _building(path: Path, say_waiting: bool = False):
  """Holds the cache entry's build lock (``flock`` on ``<entry>.lock``) while its
  documents are read and tokenized, so that of several processes starting on the same
  source (one per GPU of a host, or jobs sharing a cache) one tokenizes and the others
  wait and then read its entry, instead of each tokenizing the same files on the same
  cores. ``say_waiting``: print a line on stderr when this process waits (not on the other
  processes of a job: process 0 speaks for it). Without locks
  (no ``fcntl``, an unwritable cache, a file system without them) each process builds its
  own."""
  lock = lock_path(path)
  try:
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)  # (flock needs no write access)
  except (ImportError, OSError):
    yield
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      from galore_jax import distributed

      if say_waiting and not distributed.joined_as_another_process():
        print(
          "galore-jax: waiting for another process that is tokenizing the same files",
          file=sys.stderr,
        )
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # ENOLCK: no locks here
      pass
    yield
  finally:
    os.close(fd)  # releases the lock


def load_or_build(path: Path, load, build, say_waiting: bool = False):
  """``load()`` (a cache entry, or None), else ``build()`` (which stores it) under the
  build lock of the entry whose stream is ``path`` (:func:`_building`), after a second
  ``load()``: another process may have built it while this one waited."""
  got = load()
  if got is None:
    with _building(path, say_waiting):
      got = load()
      if got is None:
        got = build()
  return got


def build_splits(split: str, new_builder, items: Iterable, store, empty, key=lambda item: item):
  """Splits ``items`` as they stream past (:func:`split_by_hash`) into builders, stores each
  non-empty one (``store(split, builder)`` returns the stored split) and returns
  ``split``'s. ``split="train"`` builds both splits (training reads validation next);
  ``"validation"`` (``eval`` of a new source) builds that one only, the ~1 % of the items it
  needs, and counts the other. ``empty(total)``: the error for an empty ``split``."""
  both = split == "train"
  parts = {s: new_builder() if both or s == split else _Count() for s in SPLITS}
  split_by_hash(items, parts["train"], parts["validation"], key=key)
  if not len(parts[split]):
    raise empty(sum(map(len, parts.values())))
  built = {s: store(s, b) for s, b in parts.items() if not isinstance(b, _Count) and len(b)}
  return built[split]


def _cached_tokens(key_parts: Sequence[str], build, eos: int) -> _TokenDocs:
  """Loads tokenized documents from the cache, or builds them (``build()`` returns a
  :class:`_TokenBuilder`) and stores them."""
  path = _token_cache_path(key_parts)
  return load_or_build(
    path, lambda: _load_tokens(path, eos, key=key_parts), lambda: build().store(key_parts)
  )


def _hash_contents(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


# A file changed this recently is hashed again at every start (its hash is not recorded):
# file times tick coarsely (a few ms), so a second write within the same tick as the one
# recorded would keep its times (git's "racy" entries).
_HASH_FRESH_S = 2.0


def _sha256_file(path: Path) -> str:
  """The SHA-256 of ``path``'s contents (the token cache's key of a source file).

  Recorded under ``hashes/`` in the cache with the file's device, inode, size, mtime and
  ctime, and read back while all five are unchanged: a start on a large source (hundreds
  of GB of JSON lines, hashed at about 1 GB/s by every process of a host) then hashes only
  the files that changed. Any write changes the ctime, which cannot be set back."""
  path = Path(path)
  st = path.stat()
  stamp = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
  name = str(path.resolve())
  record = cache_dir() / "hashes" / f"{_digest([name], 32)}.json"
  with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
    saved = json.loads(record.read_text())
    if saved["stamp"] == stamp and saved["path"] == name:
      return saved["sha256"]
  sha = _hash_contents(path)
  after = path.stat()
  fresh = time.time() - after.st_ctime < _HASH_FRESH_S
  if not fresh and [after.st_size, after.st_mtime_ns, after.st_ctime_ns] == stamp[2:]:
    # (An unwritable cache: hashed at every start, as before.)
    _replace(record, lambda f: json.dump({"path": name, "stamp": stamp, "sha256": sha}, f), "w")
  return sha


def _tokenizer_hash(sp: spm.SentencePieceProcessor) -> str:
  return hashlib.sha256(sp.serialized_model_proto()).hexdigest()


# ----------------------------------------------------------------------------------------
# Path sources (.txt / .jsonl / .json, optionally .gz / .xz / .zst; .parquet)
# ----------------------------------------------------------------------------------------

_TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# Plain text read as a .txt file is, when named (a file, or a glob's match). A directory's
# walk skips them: a dataset repository's README.md is its card, not its data.
_NAMED_TEXT_SUFFIXES = (".md", ".markdown")


class _ZstdReader(io.RawIOBase):
  """A .zst file decompressed as a stream, frame after frame (SlimPajama's and The Pile's
  ``*.jsonl.zst``). The ``zstandard`` package's own stream reader ends quietly inside a
  truncated frame (half a file read back as nothing, measured); this one raises EOFError
  there, as gzip and lzma do, and OSError for a damaged frame."""

  CHUNK = 1 << 18

  def __init__(self, raw):
    try:
      import zstandard
    except ImportError as e:
      raise OSError("reading .zst needs the zstandard package (pip install zstandard)") from e
    self._zstd, self._raw = zstandard, raw
    self._frame = None  # the decompressor of the frame being read
    self._out = memoryview(b"")  # decompressed, not yet read

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    while not self._out:
      data = self._raw.read(self.CHUNK)
      if not data:
        if self._frame is not None and not self._frame.eof:
          raise EOFError("the file ends inside a zstd frame (truncated?)")
        return 0
      out = []
      while data:
        if self._frame is None or self._frame.eof:
          self._frame = self._zstd.ZstdDecompressor().decompressobj()
        try:
          out.append(self._frame.decompress(data))
        except self._zstd.ZstdError as e:
          raise OSError(f"damaged zstd data: {e}") from e
        data = self._frame.unused_data if self._frame.eof else b""
      self._out = memoryview(b"".join(out))
    n = min(len(buffer), len(self._out))
    buffer[:n] = self._out[:n]
    self._out = self._out[n:]
    return n


# A binary file -> its decompressed stream, by suffix (the suffixes path sources accept as
# compressed).
_DECOMPRESSING = {
  ".gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
  ".xz": lzma.LZMAFile,
  ".zst": lambda f: io.BufferedReader(_ZstdReader(f), buffer_size=_ZstdReader.CHUNK),
}
# The same, bytes -> bytes.
COMPRESSION = {
  suffix: (lambda data, open_=open_: open_(io.BytesIO(data)).read())
  for suffix, open_ in _DECOMPRESSING.items()
}


def _suffixes(path: Path) -> tuple[str, str | None]:
  """(format suffix as named, compression suffix or None)."""
  suffixes = [s.lower() for s in path.suffixes]
  comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSION else None
  fmt_suffixes = suffixes[:-1] if comp else suffixes
  return (fmt_suffixes[-1] if fmt_suffixes else ""), comp


def file_kind(path: Path) -> tuple[str, str | None]:
  """(format suffix, compression suffix or None), or ValueError. Markdown is ``.txt``."""
  fmt, comp = _suffixes(path)
  if fmt in _NAMED_TEXT_SUFFIXES:
    fmt = ".txt"
  if fmt not in _TEXT_SUFFIXES or (fmt == ".parquet" and comp):
    raise ValueError(
      f"unsupported data file {str(path)!r}: expected .txt, .md, .jsonl or .json "
      "(optionally .gz / .xz / .zst compressed), or .parquet"
    )
  return fmt, comp


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
  """A directory source's data files and its other files, each sorted. Hidden files and
  directories (``.git``, ``.cache``) are neither, as a glob's ``*`` skips them; markdown
  is an other file here (see _NAMED_TEXT_SUFFIXES). Symlinked directories are not
  followed (symlinked files are read)."""
  data, other = [], []
  for folder, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    for name in names:
      q = Path(folder, name)
      if name.startswith(".") or not q.is_file():
        continue
      try:
        file_kind(q)
        readable = _suffixes(q)[0] not in _NAMED_TEXT_SUFFIXES
      except ValueError:
        readable = False
      (data if readable else other).append(q)
  return sorted(data), sorted(other)


def is_path_source(source: str) -> bool:
  """Whether ``--data source`` names files (a path, directory or glob), not the bundled
  corpus or a TFDS dataset. (``config.absolute_source`` keeps its own test: the config
  module must not import the data pipeline, which needs grain.)"""
  source = source.strip()
  return source != "builtin" and not source.startswith("tfds:")


def _is_glob(source: str) -> bool:
  return any(c in source for c in "*?[")


def _resolve_paths(source: str) -> list[Path]:
  """Expands a --data path / directory / glob into a sorted list of data files."""
  expanded = os.path.expanduser(source)
  if _is_glob(expanded):
    matches = sorted(Path(p) for p in globlib.glob(expanded, recursive=True))
    files = [p for p in matches if p.is_file()]
    if not files:
      raise FileNotFoundError(f"--data {source!r}: the glob matches no files")
  else:
    p = Path(expanded)
    if not p.exists():
      raise FileNotFoundError(f"--data {source!r}: no such file or directory")
    if p.is_dir():
      files, other = _walk(p)
      if not files:
        raise FileNotFoundError(
          f"--data {source!r}: the directory holds no .txt / .jsonl / .json / .parquet "
          "files (optionally .gz / .xz / .zst compressed)"
          + (f"; it holds {_named(p, other)}: {_glob_hint(source)}" if other else "")
        )
    else:
      files = [p]
  for f in files:
    file_kind(f)
  return files


def _glob_hint(source: str) -> str:
  pattern = os.path.join(source, "**", "*.md")
  return f"a glob names other files to read (e.g. '{pattern}'; markdown is read as plain text)"


def _named(root: Path, files: list[Path], shown: int = 3) -> str:
  names = [str(f.relative_to(root)) for f in files[:shown]]
  more = f" and {len(files) - shown} more" if len(files) > shown else ""
  return f"{len(files)} other file{'s' if len(files) > 1 else ''} ({', '.join(names)}{more})"


def unread_note(source: str | None, flag: str = "--data") -> str | None:
  """A note naming the files a directory source holds but does not read (of no data
  format, or markdown), or None: a directory of `.md` documents beside one `.txt` file
  would otherwise train on that one file, unnoticed."""
  if not source or not is_path_source(source):
    return None
  p = Path(os.path.expanduser(source))
  if _is_glob(str(p)) or not p.is_dir():
    return None
  _, other = _walk(p)
  if not other:
    return None
  return f"galore-jax: note: {flag} {source}: not reading its {_named(p, other)}; " + _glob_hint(
    source
  )


# --columns FIELD=COLUMN,...: the fields a record is read by, each of which may be taken
# from a column (a JSON key) of another name.
RECORD_FIELDS = ("text", "prompt", "completion", "messages", "conversations", "instruction",
                 "input", "output")  # fmt: skip


def parse_columns(spec: str | None) -> dict[str, str]:
  """``--columns``: ``"input=context,output=response"`` -> ``{"input": "context", ...}``
  (``FIELD=COLUMN``: the record field :data:`RECORD_FIELDS` names is read from
  ``COLUMN``). ValueError on a malformed spec, an unknown field or a field named twice."""
  if not spec:
    return {}
  columns: dict[str, str] = {}
  for part in spec.split(","):
    field, eq, column = (x.strip() for x in part.partition("="))
    if not (eq and field and column):
      raise ValueError(f"expected FIELD=COLUMN[,FIELD=COLUMN...], got {part.strip()!r}")
    if field not in RECORD_FIELDS:
      raise ValueError(f"unknown field {field!r}; fields: {', '.join(RECORD_FIELDS)}")
    if field in columns:
      raise ValueError(f"{field} is given twice")
    columns[field] = column
  return columns


def check_columns_read(files: Sequence[Path], columns: dict[str, str]) -> None:
  """ValueError when ``--columns`` is given for files that are all plain text: a ``.txt``
  or ``.md`` file has no fields, and the mapping would otherwise be ignored unsaid."""
  if columns and files and all(file_kind(f)[0] == ".txt" for f in files):
    raise ValueError(
      f"--columns {columns_spec(columns)}: the files are plain text ({files[0].name}"
      f"{f' and {len(files) - 1} more' if len(files) > 1 else ''}), which has no fields; "
      "--columns reads JSON lines, JSON and Parquet records"
    )


def columns_spec(columns: dict[str, str]) -> str:
  """The canonical ``--columns`` of a mapping (sorted by field): the token cache's key."""
  return ",".join(f"{f}={c}" for f, c in sorted(columns.items()))


def _renamed(rec: Any, columns: dict[str, str], where: str) -> Any:
  """A JSON record with each ``--columns`` field read from its column (which must be
  there); other keys are kept, a key of a mapped field's name is replaced."""
  if not columns or not isinstance(rec, dict):
    return rec
  for field, column in columns.items():
    if column not in rec:
      raise ValueError(
        f'{where}: no "{column}" (--columns {field}={column}; its fields: {", ".join(rec)})'
      )
  taken = set(columns) | set(columns.values())
  return {
    **{k: v for k, v in rec.items() if k not in taken},
    **{f: rec[c] for f, c in columns.items()},
  }


def _record_text(rec: Any, where: str) -> str:
  if isinstance(rec, str):
    return rec
  if isinstance(rec, dict) and "text" in rec:
    text = rec["text"]
    if isinstance(text, str):
      return text
  fields = f" (its fields: {', '.join(rec)}; --columns text=FIELD reads another)"
  raise ValueError(
    f'{where}: expected a JSON object with a string "text" field'
    + (fields if isinstance(rec, dict) and "text" not in rec else "")
  )


@contextlib.contextmanager
def _reading(path: Path, newline: str | None = "\n"):
  """``(text, raw)``: the file as UTF-8 text, decompressed as its suffix says, read as a
  stream (``newline`` as for ``open``), and its binary file (``raw.tell()``: the bytes
  read). A decoding or decompression error inside the block is a ValueError that names
  the file."""
  _, comp = file_kind(path)
  with open(path, "rb") as raw:
    try:
      stream = _DECOMPRESSING[comp](raw) if comp else raw
      yield io.TextIOWrapper(stream, encoding="utf-8", newline=newline), raw
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}: not UTF-8 text: {e}") from e
    except (OSError, EOFError, lzma.LZMAError) as e:
      if not comp:
        raise
      raise ValueError(f"{path}: cannot decompress ({comp}): {e}") from e


def json_records(path: Path, at=None) -> Iterator[tuple[Any, str]]:
  """``(record, where)`` for each JSON record of a .jsonl / .json file (compressed or not),
  ``where`` naming it for errors. JSON lines are read one line at a time, and a .json file
  holding one array (Alpaca's layout) one item at a time, so memory does not grow with the
  file; a .json file holding one object over many lines is parsed whole. ``at(n)``: as for
  :func:`_file_documents`."""
  fmt, _ = file_kind(path)
  if fmt in (".txt", ".parquet"):
    raise ValueError(f"{path}: a {fmt} file holds no JSON records")
  # Lines end at "\n" only: "\r" is JSON whitespace, and U+2028 may stand unescaped in a
  # JSON string.
  with _reading(path, newline="\n") as (text, raw):
    for record in _json_records(text, fmt, path):
      if at is not None:
        at(raw.tell())
      yield record


def _json_records(text: io.TextIOBase, fmt: str, path: Path) -> Iterator[tuple[Any, str]]:
  lines = enumerate(text, 1)
  if fmt == ".json":  # one JSON array or object, or JSON lines (C4's *.json.gz)
    lineno, line = next(((n, x) for n, x in lines if x.strip()), (0, ""))
    if not line:
      return
    if line.lstrip().startswith("["):  # one array: not parsed whole (a line may be all of it)
      yield from _json_array_items(line, text, path)
      return
    try:
      first = json.loads(line)
    except json.JSONDecodeError as e:  # not a record per line: one object over many lines
      try:
        whole = json.loads(line + text.read())
      except json.JSONDecodeError:
        whole = None
      if not isinstance(whole, dict):
        raise ValueError(f"{path}:{lineno}: invalid JSON line: {e}") from e
      yield whole, str(path)
      return
    yield first, f"{path}:{lineno}"
  for lineno, line in lines:
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: invalid JSON line: {e}") from e
    yield rec, f"{path}:{lineno}"


# Characters of a .json array read at a time (more for an item that is longer).
_JSON_CHUNK = 1 << 20
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_NUMBER_PART = re.compile(r"[0-9.eE+-]*")  # what may follow a number cut by a chunk's end


def _json_array_items(head: str, text: io.TextIOBase, path: Path) -> Iterator[tuple[Any, str]]:
  """The items of the JSON array that opens ``head`` (a file's first non-blank line; ``text``
  the rest of the file), each decoded when it is reached: memory holds one item and the
  chunk it is in, not the file (an instruction set of gigabytes as one array), and the
  first item comes without reading the rest. Invalid JSON, or anything after the array, is
  a ValueError naming the item."""
  decoder = json.JSONDecoder()
  buf, pos, eof = head, head.index("[") + 1, False

  def read_more():  # keeps what is not decoded yet; reads at least as much again
    nonlocal buf, pos, eof
    chunk = text.read(max(_JSON_CHUNK, len(buf) - pos))
    buf, pos, eof = buf[pos:] + chunk, 0, not chunk

  def next_char() -> str:  # the next character that is not whitespace ("" at the end)
    nonlocal pos
    while True:
      pos = _JSON_SPACE.match(buf, pos).end()
      if pos < len(buf) or eof:
        return buf[pos : pos + 1]
      read_more()

  i = 0
  if next_char() == "]":
    pos += 1
  else:
    while True:
      if not next_char():
        raise ValueError(f"{path} [item {i}]: the JSON array ends early")
      while True:  # an item may go on in the next chunk (a number, however short)
        try:
          item, end = decoder.raw_decode(buf, pos)
          if eof or not _JSON_NUMBER_PART.fullmatch(buf, end):
            break
        except json.JSONDecodeError as e:
          if eof:
            raise ValueError(f"{path} [item {i}]: invalid JSON: {e}") from e
        read_more()
      pos = end
      yield item, f"{path} [item {i}]"
      i += 1
      c = next_char()
      if c == "]":
        pos += 1
        break
      if c != ",":
        raise ValueError(
          f"{path} [item {i}]: expected ',' or ']' in the JSON array, found "
          + (repr(c) if c else "its end")
        )
      pos += 1
  if next_char():
    raise ValueError(
      f"{path}: more after its JSON array (a .json file holds one array, one object or JSON lines)"
    )


def _parquet(raw, path: Path):
  """``(pyarrow, ParquetFile)`` of an open file; pyarrow (a dependency of
  tensorflow-datasets) is imported here, where it is needed. Errors name the file."""
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError as e:
    raise ValueError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from e
  try:
    return pa, pq.ParquetFile(raw)
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path}: not a readable Parquet file: {e}") from e


def _parquet_rows(pa, file, path: Path, columns: list[str]) -> Iterator[tuple[dict, str]]:
  """``(row, where)``: ``columns`` of each row as a dict, read a batch of rows at a time."""
  row = 0
  try:
    for batch in file.iter_batches(batch_size=1024, columns=columns):
      for record in batch.to_pylist():
        yield record, f"{path} [row {row}]"
        row += 1
  except (pa.ArrowException, OSError) as e:  # a damaged row group
    raise ValueError(f"{path}: cannot read from row {row} on: {e}") from e


def _parquet_texts(raw, path: Path, column: str = "text") -> Iterator[str]:
  """The ``text`` column (or ``column``, ``--columns text=COLUMN``) of a Parquet file
  (HuggingFaceFW/fineweb-edu's ``data/*.parquet``, for one)."""
  pa, file = _parquet(raw, path)
  schema = file.schema_arrow
  if column not in schema.names:
    names = ", ".join(schema.names)
    if column == "text":
      raise ValueError(
        f'{path}: no "text" column (columns: {names}; --columns text=COLUMN reads another)'
      )
    raise ValueError(f'{path}: no "{column}" column (--columns text={column}; columns: {names})')
  kind = schema.field(column).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    raise ValueError(f'{path}: the "{column}" column holds {kind}, not strings')
  for record, where in _parquet_rows(pa, file, path, [column]):
    if record[column] is None:
      raise ValueError(f'{where}: "{column}" is null')
    yield record[column]


# The columns a Parquet row is read as a record with (instruction data: galore_jax.sft),
# so that other columns (ids, scores, timestamps) neither cost reading nor enter the
# record, whose canonical JSON decides its split. Alpaca's columns are read only from a
# file without the others (tatsu-lab/alpaca also has "text", the example laid out whole).
RECORD_COLUMNS = ("prompt", "completion", "messages", "conversations", "text")
ALPACA_COLUMNS = ("instruction", "input", "output")


def _record_columns(names: Sequence[str]) -> list[str]:
  """The columns of a Parquet file with column ``names`` that its records are made of."""
  alpaca = {"instruction", "output"} <= set(names)
  if alpaca and not set(RECORD_COLUMNS[:4]) & set(names):  # no prompt, messages, ...
    return [c for c in ALPACA_COLUMNS if c in names]
  return [c for c in RECORD_COLUMNS if c in names]


def records(
  path: Path, at=None, columns: dict[str, str] | None = None
) -> Iterator[tuple[Any, str]]:
  """``(record, where)`` for each record of a .jsonl / .json file (:func:`json_records`) or
  each row of a .parquet file, as a dict of its :data:`RECORD_COLUMNS` (a Hub dataset's
  instruction data: ``messages`` as a list of ``{role, content}`` structs). ``at(n)``: as
  for :func:`_file_documents`. ``columns`` (:func:`parse_columns`): fields read from
  columns of other names; each column must be in every record."""
  columns = columns or {}
  if file_kind(path)[0] != ".parquet":
    for rec, where in json_records(path, at):
      yield _renamed(rec, columns, where), where
    return
  with open(path, "rb") as raw:
    pa, file = _parquet(raw, path)
    names = file.schema_arrow.names
    for field, column in columns.items():
      if column not in names:
        raise ValueError(
          f'{path}: no "{column}" column (--columns {field}={column}; columns: {", ".join(names)})'
        )
    # The fields as the renamed rows have them, and the columns they are read from.
    taken = set(columns) | set(columns.values())
    fields = _record_columns([*columns, *(n for n in names if n not in taken)])
    read = list(dict.fromkeys(columns.get(f, f) for f in fields))
    for record, where in _parquet_rows(pa, file, path, read):
      if at is not None:
        at(raw.tell())
      yield ({f: record[columns.get(f, f)] for f in fields} if columns else record), where


def _file_documents(path: Path, at=None, columns: dict[str, str] | None = None) -> Iterator[str]:
  """The non-empty documents of one file, read as a stream: a .txt file is cut into
  documents of >= 1000 characters at blank lines, or at line ends inside longer paragraphs
  (``paragraph_documents``; CR LF and a lone CR end lines too); a JSON record (see
  :func:`json_records`) or a Parquet row (its ``text``) is one document. ``at(n)`` is told
  the bytes of the file read so far (compressed bytes for a compressed file). ``columns``:
  as for :func:`records` (``text=COLUMN``: the text is read from ``COLUMN``)."""
  fmt, _ = file_kind(path)
  columns = columns or {}
  if fmt == ".parquet":
    with open(path, "rb") as raw:
      yield from _non_empty(_parquet_texts(raw, path, columns.get("text", "text")), raw, at)
    return
  with _reading(path, newline=None if fmt == ".txt" else "\n") as (text, raw):
    if fmt == ".txt":
      docs = paragraph_documents(text, cut_long_paragraphs=True)
    else:
      docs = (
        _record_text(_renamed(rec, columns, where), where)
        for rec, where in _json_records(text, fmt, path)
      )
    yield from _non_empty(docs, raw, at)


def _non_empty(docs: Iterable[str], raw, at) -> Iterator[str]:
  for doc in docs:
    if doc.strip():
      if at is not None:
        at(raw.tell())
      yield doc


def doc_hash(doc: str) -> int:
  """64-bit content hash of a document (the 1-in-100 validation rule)."""
  h = hashlib.blake2b(doc.encode("utf-8"), digest_size=8)
  return int.from_bytes(h.digest(), "little")


def split_by_hash(items: Iterable, train, validation, key=lambda item: item) -> None:
  """The validation rule of path sources, applied as ``items`` stream past: an item goes
  to ``validation`` iff ``doc_hash(key(item)) % 100 == 0`` (1 in 100, by content, so
  independent of file order and the same for duplicates), else to ``train``, each in
  order. If that selects none and there are at least two, the item with the smallest hash
  (the first of equals) moves from ``train`` to ``validation``. ``train`` and
  ``validation`` take ``append``, ``len`` and ``del [i]`` (lists, or token builders)."""
  smallest = None  # (hash, index in train, item)
  for item in items:
    h = doc_hash(key(item))
    if h % PATH_VALIDATION_MODULUS == 0:
      validation.append(item)
      continue
    if smallest is None or h < smallest[0]:
      smallest = (h, len(train), item)
    train.append(item)
  if not len(validation) and len(train) >= 2:
    del train[smallest[1]]
    validation.append(smallest[2])


def _empty_split(source: str, split: str, total: int) -> ValueError:
  if not total:
    return ValueError(f"--data {source!r}: no non-empty documents")
  return ValueError(
    f"--data {source!r}: split {split!r} is empty ({total} document(s) in all; "
    f"the validation split needs at least two. A .txt file gives one document per "
    f"{DOC_MIN_CHARS} characters, cut at blank lines or line ends, so a file of one line is "
    "one document (break it into lines first, e.g. fold -s -w 1000); a JSON record is one)"
  )


def read_files(files: Sequence[Path], read, progress=None) -> Iterator:
  """``read(file, at)``'s items for every file in order (``_file_documents``,
  ``json_records``); ``progress(done, total)`` in bytes of the files."""
  sizes = [f.stat().st_size for f in files]
  total, before = sum(sizes), 0
  for f, size in zip(files, sizes, strict=True):
    at = None if progress is None else (lambda n, before=before: progress(before + n, total))
    yield from read(f, at)
    before += size
  if progress is not None:
    progress(total, total)


def _all_documents(files: Sequence[Path], progress=None, columns=None) -> Iterator[str]:
  """Every file's documents in order; ``progress(done, total)`` in bytes of the files;
  ``columns``: as for :func:`records`."""
  read = _file_documents if not columns else lambda f, at: _file_documents(f, at, columns)
  return read_files(files, read, progress)


def path_documents(source: str, split: str, columns: dict[str, str] | None = None) -> list[str]:
  """Documents of a path source for ``split``, in file order (files sorted by path),
  split by :func:`split_by_hash`; ``columns``: as for :func:`records`."""
  _check_split(split)
  parts = {"train": [], "validation": []}
  docs = _all_documents(_resolve_paths(source), columns=columns)
  split_by_hash(docs, parts["train"], parts["validation"])
  if not parts[split]:
    raise _empty_split(source, split, len(parts["train"]) + len(parts["validation"]))
  return parts[split]


class _Count:
  """A split that is only counted on this pass, not tokenized (:func:`split_by_hash`)."""

  def __init__(self):
    self.n = 0

  def __len__(self) -> int:
    return self.n

  def append(self, _doc: str) -> None:
    self.n += 1

  def __delitem__(self, _i: int) -> None:
    self.n -= 1


def path_tokens(
  source: str, split: str, sp, key_parts: Sequence[str], progress=None, *, files=None, columns=None
) -> _TokenDocs:
  """The tokenized documents of ``split`` of a path source (what :func:`path_documents`
  gives, tokenized), from the token cache under ``[*key_parts, split]``. A miss reads
  the files once, as a stream; for ``train`` it tokenizes and caches both splits (training
  reads the validation split next), for ``validation`` (``eval`` of a new source) only
  that one, the ~1 % of the text it needs. ``files``: ``source`` already resolved (a
  caller that hashed them for the key), else resolved here. ``columns``: as for
  :func:`records` (``key_parts`` must name them)."""
  _check_split(split)
  eos = _special_ids(sp)[0]

  def build() -> _TokenDocs:
    paths = _resolve_paths(source) if files is None else files
    return build_splits(
      split,
      lambda: _TokenBuilder(sp),
      _all_documents(paths, progress, columns),
      lambda s, builder: builder.store([*key_parts, s]),
      lambda total: _empty_split(source, split, total),
    )

  return load_or_build(
    _token_cache_path([*key_parts, "train"]),  # one lock per source
    lambda: _load_tokens(_token_cache_path([*key_parts, split]), eos, key=[*key_parts, split]),
    build,
    say_waiting=progress is not None,
  )


# ----------------------------------------------------------------------------------------
# TFDS sources (prepared array_record datasets, read in place)
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tfds_temp_dirs_removed():
  """Removes the empty ``tmp*tfds`` directories made in the temporary directory while it is
  open: TFDS makes one for a dataset it has no local information for (to copy that from
  its GCS bucket, ``DatasetInfo.initialize_from_bucket``) and never removes it, so every
  ``--data tfds:NAME`` that is not prepared here left one behind."""
  pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
  before = set(globlib.glob(pattern))
  try:
    yield
  finally:
    for path in set(globlib.glob(pattern)) - before:
      with contextlib.suppress(OSError):  # not empty (another process's), or gone
        os.rmdir(path)


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
    with _tfds_temp_dirs_removed():
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
