"""Data pipeline: tokenizer, bundled corpus, and deterministic grain loaders.

Three kinds of source (``DataConfig.source``, the ``--data`` value):

* ``"builtin"`` -- the bundled public-domain corpus (Jane Austen's six novels and
  Shakespeare's complete works, ``galore_jax/data/corpus``), split into documents
  and into a train / validation split by a fixed rule (see ``builtin_documents``).
* a path, directory or glob of ``.txt`` / ``.jsonl`` / ``.json`` files (each optionally
  ``.gz``, ``.xz`` or ``.zst`` compressed) or ``.parquet`` files (their ``text`` column);
  a named ``.md`` file is read as ``.txt`` (a directory skips them, see ``unread_note``). JSON
  records need a ``"text"`` field, or are instruction records (``prompt`` /
  ``completion``, ``messages``, ``conversations`` or ``instruction`` / ``output``,
  ``galore_jax.sft``); ``DataConfig.columns`` reads these fields from keys / columns of
  other names (``parse_columns``).
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
followed by EOS; no BOS is added. Packed instruction examples (``galore_jax.sft``) add
``"segments": int32 (B, L)``, each input token's example within its row (0: padding).

Modules: ``corpus`` (the bundled corpus and its document / split rules), ``sources``
(tokenizer, path and TFDS sources, token cache), ``batching`` (``DataConfig``,
``Dataset``, ``make_dataset``, ``eval_batches``). Every name is re-exported here.
"""

# Every module-level name of the former single-module ``galore_jax.data`` that is used from
# outside stays importable from here.
from galore_jax.data.batching import (  # noqa: F401
  DataConfig,
  Dataset,
  Rows,
  SplitIndex,
  eval_batches,
  held_out_split,
  make_dataset,
)
from galore_jax.data.corpus import (  # noqa: F401
  CORPUS_DIR,
  CORPUS_FILES,
  DATA_FORMAT_VERSION,
  DOC_MIN_CHARS,
  PACKAGE_DATA,
  SPLITS,
  VALIDATION_EVERY,
  _builtin_sections,
  builtin_documents,
  paragraph_documents,
  split_paragraph_documents,
)
from galore_jax.data.sources import (  # noqa: F401
  BUILTIN_TOKENIZER,
  COMPRESSION,
  PATH_VALIDATION_MODULUS,
  RECORD_FIELDS,
  cache_dir,
  doc_hash,
  file_kind,
  json_records,
  load_tokenizer,
  parse_columns,
  path_documents,
  records,
  split_by_hash,
  tfds_source,
  unread_note,
)

# Former private names, kept for code that used them.
_Plan = _SplitIndex = SplitIndex  # "plan" meant three things in the package
_Rows, _COMPRESSION, _doc_hash, _file_kind = Rows, COMPRESSION, doc_hash, file_kind

__all__ = [
  "DataConfig",
  "Dataset",
  "builtin_documents",
  "cache_dir",
  "eval_batches",
  "held_out_split",
  "load_tokenizer",
  "make_dataset",
  "path_documents",
  "split_paragraph_documents",
  "tfds_source",
  "unread_note",
  "BUILTIN_TOKENIZER",
  "CORPUS_DIR",
  "CORPUS_FILES",
  "DATA_FORMAT_VERSION",
  "DOC_MIN_CHARS",
  "PACKAGE_DATA",
  "PATH_VALIDATION_MODULUS",
  "SPLITS",
  "VALIDATION_EVERY",
]
