"""Batches: deterministic grain loaders over the document sources.

Every loader is a random-access ``grain.MapDataset``: example indices -> shuffle(seed)
-> batch -> map(indices -> arrays) -> repeat, so ``Dataset.batch(step)`` is a pure
function of ``(config, split, step)``. A split is first described as a
``SplitIndex`` (how many indexable items, how many per batch, and the map that turns
a batch of indices into arrays): packed windows of the token stream, whole documents,
TFDS records, or instruction examples (``galore_jax.sft``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
import sentencepiece as spm

from galore_jax.data.corpus import (
  CORPUS_DIR,
  CORPUS_FILES,
  DATA_FORMAT_VERSION,
  SPLITS,
  _check_split,
  builtin_documents,
)
from galore_jax.data.sources import (
  _cached_tokens,
  _digest,
  _record_to_text,
  _resolve_paths,
  _sha256_file,
  _special_ids,
  _TokenDocs,
  _tokenize_docs,
  _tokenizer_hash,
  check_columns_read,
  columns_spec,
  is_path_source,
  joined_docs,
  load_tokenizer,
  parse_columns,
  path_tokens,
  tfds_source,
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to train on and how to cut it into batches.

  source: ``"builtin"`` | a path, directory or glob of ``.txt`` / ``.jsonl`` / ``.json``
    files (optionally ``.gz`` / ``.xz`` / ``.zst``) or ``.parquet`` files | ``"tfds:NAME"`` (e.g.
    ``"tfds:c4/en"``).
  packing: True -> documents are concatenated (each followed by EOS) into one token
    stream cut into windows of ``seq_len + 1`` tokens (stride ``seq_len``: every token
    after the first is a target exactly once). For ``tfds:`` sources the stream is
    built per batch from a fixed group of documents. False -> the paper's C4 setup:
    each document (+ EOS) truncated / padded to ``seq_len + 1`` tokens, padding masked.
    Instruction records (``galore_jax.sft``): True -> whole examples packed several to a
    row and kept apart (``segments``); False -> one example per row.
  seed: shuffle seed (any int); epoch ``e`` is shuffled with a seed derived from it.
  tokenizer: SentencePiece model path; ``None`` -> the bundled 8k BPE model.
  columns: ``"FIELD=COLUMN,..."``: a path source's record fields (``text``, ``prompt``,
    ``output``, ...) read from JSON keys / Parquet columns of other names
    (``sources.parse_columns``; other sources have no columns); ``None``: the fields' own
    names.
  chat_template: Jinja text that renders ``"messages"`` records in place of the tokenizer's
    chat template (``galore_jax.sft.read_chat_template``); ``None``: the tokenizer's.
  document_mask: with ``packing``, text batches also carry ``segments`` (``Rows``): a token
    attends only to its own document, not to the documents packed before it in its row.
    Instruction examples are kept apart whenever they are packed.
  """

  source: str = "builtin"
  seq_len: int = 256
  batch_size: int = 8
  packing: bool = True
  seed: int = 0
  tokenizer: str | None = None
  columns: str | None = None
  chat_template: str | None = None
  document_mask: bool = False

  def __post_init__(self):
    if not isinstance(self.source, str) or not self.source.strip():
      raise ValueError(f"--data must be a non-empty string, got {self.source!r}")
    if int(self.seq_len) < 1:
      raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
    if int(self.batch_size) < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    parse_columns(self.columns)  # a malformed spec fails here, not at the first read


def _shuffle_seed(seed: int) -> int:
  """Maps any int seed to grain's 32-bit shuffle seed (hashing keeps seeds s and s+1
  from sharing shuffles, since grain uses seed + epoch for epoch `epoch`)."""
  h = hashlib.blake2b(f"galore_jax.data.shuffle:{int(seed)}".encode(), digest_size=4)
  return int.from_bytes(h.digest(), "little")


# ----------------------------------------------------------------------------------------
# Batch assembly (the grain map: a batch of example indices -> arrays)
# ----------------------------------------------------------------------------------------


class Rows:
  """Builds a {'inputs', 'targets', 'mask'} batch of `batch_size` rows from token
  windows of up to seq_len + 1 tokens; missing rows / tokens are padding (mask 0).

  ``document_eos``: the EOS id, for ``DataConfig.document_mask``: the batch also gets
  ``segments``, each document of a packed row its own (EOS starts one), so that a token
  attends only to the tokens of its document."""

  document_eos: int | None = None

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

  def finish(self, buf: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    out = {
      "inputs": np.ascontiguousarray(buf[:, :-1]),
      "targets": np.ascontiguousarray(buf[:, 1:]),
      "mask": mask,
    }
    if self.document_eos is not None:
      # A document's segment begins at the EOS before it, as a sampled document begins at
      # EOS (`sample --prompt ""`); every target stays trained, the next document's first
      # token after an EOS included.
      is_eos = out["inputs"] == self.document_eos
      out["segments"] = (1 + np.cumsum(is_eos, axis=1, dtype=np.int32)).astype(np.int32)
    return out


class _WindowBatch(Rows):
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


class _DocBatch(Rows):
  """Document indices -> one document per row, + EOS, truncated / padded (packing=False)."""

  def __init__(self, docs: _TokenDocs, batch_size: int, seq_len: int, eos: int, pad: int):
    super().__init__(batch_size, seq_len, pad)
    self.docs, self.eos = docs, eos

  def __call__(self, idx) -> dict[str, np.ndarray]:
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    return self.from_windows(
      [_truncated(self.docs.doc(int(i)), self.seq_len, self.eos) for i in idx]
    )


class _TfdsBatch(Rows):
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
  grain_dataset (the infinite ``grain.MapDataset`` of batches), fingerprint (a digest of
  the source's files and document rules, which changes when a file is added, removed or
  edited; None for tfds sources), data_format (``"text"``, or the form of instruction
  records: ``"prompt"``, ``"chat"`` or ``"alpaca"``, see ``galore_jax.sft``).
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
    fingerprint: str | None = None,
    data_format: str = "text",
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
    self.fingerprint = fingerprint
    self.data_format = data_format

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
class SplitIndex:
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
  fingerprint: str | None = None  # see Dataset
  data_format: str = "text"  # see Dataset


def _in_memory_index(config: DataConfig, docs: _TokenDocs, eos: int, pad: int) -> SplitIndex:
  B, L = config.batch_size, config.seq_len
  n_tok = len(docs.stream)  # each document + EOS
  if config.packing:
    n = max(n_tok - 1, 0) // L
    windows = _WindowBatch(docs.stream, B, L, pad)
    if config.document_mask:
      windows.document_eos = eos
    return SplitIndex(n, B, windows, docs.num_docs, n, n_tok)
  nd = docs.num_docs
  return SplitIndex(nd, B, _DocBatch(docs, B, L, eos, pad), nd, nd, n_tok)


# tfds packing: each batch packs a fixed group of documents, sized for about this many
# times the batch's tokens (mean document length from the split's first 64 documents).
_TFDS_PACK_OVERSAMPLE = 1.25


def _tfds_index(config: DataConfig, split: str, sp, eos: int, pad: int) -> SplitIndex:
  src = tfds_source(config.source, split)
  n = len(src)
  B, L = config.batch_size, config.seq_len
  make = _TfdsBatch(src, sp, B, L, eos, pad, pack=config.packing)
  if config.packing and config.document_mask:
    make.document_eos = eos
  threads = max(1, min(4, os.cpu_count() or 1))
  if not config.packing:
    return SplitIndex(n, B, make, n, n, None, threads)
  sample = make.tokens(np.arange(min(n, 64)))
  mean = float(np.mean([len(x) + 1 for x in sample]))
  group = max(1, math.ceil(_TFDS_PACK_OVERSAMPLE * (B * L + 1) / mean))
  return SplitIndex(n, group, make, n, (n // group) * B, None, threads)


# What eval_batches reads: the documents held out from training, or every document of a
# source (a held-out set of the user's own: `eval --data held_out.jsonl`).
EVAL_SPLITS = ("validation", "all")


def held_out_split(source: str) -> str:
  """What of ``source`` to evaluate when it is a held-out set (``train --eval-data``, or
  ``eval --data`` of a source the run did not train on): all of a path source; the
  validation split of the bundled corpus or of a TFDS dataset, which have one."""
  return "all" if is_path_source(source) else "validation"


def _of_split(split: str, of, join=joined_docs):
  """``of(split)``, or for ``"all"`` both splits' documents (or examples, with their
  ``join``) one after the other."""
  return of(split) if split != "all" else join([of(s) for s in SPLITS])


def _split_index(
  config: DataConfig, split: str, sp: spm.SentencePieceProcessor, progress=None
) -> SplitIndex:
  if split != "all":
    _check_split(split)
  eos, pad = _special_ids(sp)
  source = config.source.strip()
  if source.startswith("tfds:"):
    if split == "all":
      raise ValueError(
        f"--data {source!r}: a TFDS source has its own held-out split; evaluate its "
        "validation split (--split validation)"
      )
    return _tfds_index(config, split, sp, eos, pad)
  tok_hash = _tokenizer_hash(sp)
  if source == "builtin":
    corpus_hash = [_sha256_file(CORPUS_DIR / n) for n in CORPUS_FILES]
    key = ["builtin", DATA_FORMAT_VERSION, *corpus_hash]
    docs = _of_split(
      split,
      lambda s: _cached_tokens(
        [*key, tok_hash, s], lambda: _tokenize_docs(sp, builtin_documents(s)), eos
      ),
    )
    return dataclasses.replace(_in_memory_index(config, docs, eos, pad), fingerprint=_digest(key))
  files = _resolve_paths(source)
  columns = parse_columns(config.columns)
  check_columns_read(files, columns)
  # Each file as "<absolute path>:<sha256>": `galore-jax cache` reads them back from the
  # entry's index (galore_jax.cache) to name the source and to tell stale entries.
  key = ["paths", DATA_FORMAT_VERSION, *(f"{f.resolve()}:{_sha256_file(f)}" for f in files)]
  if columns:  # other records from the same files (and so other batches)
    key.append(f"columns={columns_spec(columns)}")
  from galore_jax import sft  # lazy: sft builds on this module

  if form := sft.instruction_format(files, columns):  # instruction records: masked loss
    index = sft.split_index(config, split, sp, files, eos, pad, [*key, tok_hash], progress)
    index = dataclasses.replace(index, data_format=form)
  else:
    docs = _of_split(
      split,
      lambda s: path_tokens(
        source, s, sp, [*key, tok_hash], progress, files=files, columns=columns
      ),
    )
    index = _in_memory_index(config, docs, eos, pad)
  return dataclasses.replace(index, fingerprint=_digest(key))


def _too_small(config: DataConfig, split: str, index: SplitIndex) -> ValueError:
  if index.per_batch != config.batch_size:  # tfds packing
    what = f"{index.num_documents} documents, {index.per_batch} packed into each batch"
  else:
    what = f"{index.num_examples} examples of up to {config.seq_len + 1} tokens"
  if index.num_tokens is not None:
    what += f", {index.num_tokens} tokens"
  return ValueError(
    f"--data {config.source!r}: split {split!r} is too small for one batch of "
    f"{config.batch_size} ({what}); use more data or a smaller batch size / seq_len"
  )


def make_dataset(config: DataConfig, split: str = "train", *, shard=None, progress=None) -> Dataset:
  """Builds the shuffled, infinitely repeating batch stream for ``split``.

  grain pipeline (all random access, ``grain.MapDataset``): item indices ->
  shuffle(seed; reshuffled each epoch) -> batch(drop remainder) -> map(indices ->
  arrays: gather windows / documents, or read + tokenize tfds records) -> repeat.

  ``shard`` (a :class:`galore_jax.distributed.RowShard`, multi-process runs): batches hold
  only that process's rows of each global batch (the same shuffled indices).

  ``progress(done, total)``: told the bytes read while a path source is tokenized (only
  on a token-cache miss: the first use of those files with this tokenizer).
  """
  sp = load_tokenizer(config.tokenizer, config.chat_template)
  index = _split_index(config, split, sp, progress)
  ds = grain.MapDataset.range(index.num_items).shuffle(seed=_shuffle_seed(config.seed))
  make_batch = index.make_batch
  if shard is not None:
    from galore_jax import distributed

    make_batch = distributed.local_batches(make_batch, index.per_batch, shard)
  ds = ds.batch(index.per_batch, drop_remainder=True).map(make_batch)
  steps = len(ds)
  if steps == 0:
    raise _too_small(config, split, index)
  return Dataset(
    config=config,
    split=split,
    tokenizer=sp,
    grain_dataset=ds.repeat(),
    steps_per_epoch=steps,
    num_examples=index.num_examples,
    num_documents=index.num_documents,
    num_tokens=index.num_tokens,
    read_threads=index.read_threads,
    fingerprint=index.fingerprint,
    data_format=index.data_format,
  )


class EvalBatches(Sequence):
  """Validation batches built on access, not held: ``len`` is known up front, ``[i]``
  builds batch ``i`` (the same arrays every time). ``eval --eval-batches all`` over a
  large split thus streams it (tokenising as it goes, overlapped with the device) instead
  of reading the whole split into host memory before the first batch runs."""

  def __init__(self, ds: grain.MapDataset, n: int):
    self._ds, self._n = ds, n

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(self._n))]
    if not -self._n <= i < self._n:
      raise IndexError(f"batch {i} of {self._n}")
    return self._ds[i % self._n]


def eval_batches(
  config: DataConfig, max_batches: int | None = None, *, progress=None, split="validation"
) -> EvalBatches:
  """Fixed evaluation batches: the examples of ``split`` in order (no shuffle), the first
  ``max_batches`` batches (all if None), built when read (see :class:`EvalBatches`;
  ``list(...)`` holds them). A last, partial batch is padded to ``batch_size`` rows with
  fully masked rows, so every batch has the training shape. ``split``: ``"validation"``
  (the documents held out from training) or ``"all"`` (every document of a path source
  or the bundled corpus: the training split's, then the validation split's).
  ``progress``: as for :func:`make_dataset`.
  """
  if split not in EVAL_SPLITS:
    raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
  sp = load_tokenizer(config.tokenizer, config.chat_template)
  index = _split_index(config, split, sp, progress)
  if index.num_items == 0:
    raise _too_small(config, split, index)
  ds = grain.MapDataset.range(index.num_items).batch(index.per_batch).map(index.make_batch)
  n = len(ds) if max_batches is None else min(len(ds), int(max_batches))
  return EvalBatches(ds, n)
