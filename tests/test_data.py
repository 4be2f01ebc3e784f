"""Tests for galore_jax.data.batching: grain loaders over the builtin, path and TFDS sources."""

from __future__ import annotations

import dataclasses
import gzip
import json
import lzma

import numpy as np
import pytest

from galore_jax import data as gd
from galore_jax.data import DataConfig, batching, eval_batches, load_tokenizer, make_dataset

KEYS = ("inputs", "targets", "mask")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
  """Token caches go to a per-session temp dir, not ~/.cache."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield


@pytest.fixture(scope="session")
def sp():
  return load_tokenizer()


def _same(a: dict, b: dict) -> bool:
  return all(np.array_equal(a[k], b[k]) for k in KEYS)


def _check_batch(b: dict, cfg: DataConfig, vocab: int):
  assert set(b) == set(KEYS)
  for k in KEYS:
    assert b[k].shape == (cfg.batch_size, cfg.seq_len), k
  assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32
  assert b["mask"].dtype == np.float32
  assert set(np.unique(b["mask"])) <= {0.0, 1.0}
  for k in ("inputs", "targets"):
    assert b[k].min() >= 0 and b[k].max() < vocab
  # targets are the inputs shifted by one (each row is one window of seq_len + 1 tokens)
  np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])


def test_builtin_batches_deterministic():
  cfg = DataConfig(seq_len=64, batch_size=4, seed=3)
  a, b = make_dataset(cfg, "train"), make_dataset(cfg, "train")
  assert a.vocab_size == 8192 and a.steps_per_epoch == a.num_examples // 4
  steps = [0, 1, a.steps_per_epoch - 1, a.steps_per_epoch, 10 * a.steps_per_epoch + 7]
  for s in steps:
    x = a.batch(s)
    _check_batch(x, cfg, a.vocab_size)
    assert x["mask"].all()  # packed windows are full
    assert _same(x, b.batch(s))
  # the token stream was cached outside the package
  cached = list(gd.cache_dir().glob("tokens/*.npz"))
  assert cached and all(gd.PACKAGE_DATA not in p.parents for p in cached)
  # another epoch is another order
  assert not _same(a.batch(0), a.batch(a.steps_per_epoch))
  # a different seed gives different batches
  c = make_dataset(DataConfig(seq_len=64, batch_size=4, seed=4), "train")
  assert not _same(a.batch(0), c.batch(0))
  # iterate(start) == batch(start), batch(start + 1), ...
  it = a.iterate(41)
  for s in range(41, 45):
    assert _same(next(it), a.batch(s))
  assert _same(next(iter(a)), a.batch(0))
  with pytest.raises(ValueError):
    a.batch(-1)


def test_builtin_validation_and_eval_batches():
  cfg = DataConfig(seq_len=128, batch_size=8)
  val = make_dataset(cfg, "validation")
  train = make_dataset(cfg, "train")
  assert val.num_tokens < train.num_tokens / 10
  ev = eval_batches(cfg, 3)
  assert len(ev) == 3
  assert all(_same(x, y) for x, y in zip(ev, eval_batches(cfg, 3), strict=True))
  for x in ev:
    _check_batch(x, cfg, val.vocab_size)
  # unshuffled: the first window is the start of the first validation document
  sp = val.tokenizer
  first = sp.encode(gd.builtin_documents("validation")[0])[: cfg.seq_len]
  np.testing.assert_array_equal(ev[0]["inputs"][0], first)
  # all batches: the last one is padded with fully masked rows
  allb = eval_batches(cfg, None)
  assert len(allb) == -(-val.num_examples // cfg.batch_size)
  assert allb[-1]["mask"].sum() == (val.num_examples % 8 or 8) * cfg.seq_len


def test_eval_batches_of_all_documents_are_both_splits_in_turn():
  # split="all" (eval of a held-out set of the user's own): the training split's
  # documents, then the validation split's, one window each without packing.
  cfg = DataConfig(seq_len=128, batch_size=8, packing=False)
  docs = gd.builtin_documents("train") + gd.builtin_documents("validation")
  allb = list(eval_batches(cfg, None, split="all"))
  assert len(allb) == -(-len(docs) // 8)
  sp = load_tokenizer()
  for i in (0, len(gd.builtin_documents("train")), len(docs) - 1):  # each part's first, last
    want = sp.encode(docs[i])[: cfg.seq_len]
    np.testing.assert_array_equal(allb[i // 8]["inputs"][i % 8][: len(want)], want)
  with pytest.raises(ValueError, match="split must be one of"):
    eval_batches(cfg, 1, split="train")
  # What a held-out set (train --eval-data, eval --data) means: all of a path source.
  assert [gd.held_out_split(s) for s in ("a.jsonl", " builtin", "tfds:c4/en")] == [
    "all",
    "validation",
    "validation",
  ]


def test_packed_stream_is_held_in_the_tokens_dtype(sp):
  # The packed token stream stays uint16 for the bundled vocabulary (half of int32's host
  # memory: 3.2 GB, not 6.4, for 1.6B tokens of eight C4 shards); batches are int32.
  index = batching._split_index(DataConfig(seq_len=64, batch_size=4), "train", sp)
  stream = index.make_batch.stream
  assert stream.dtype == np.uint16 and (stream == sp.eos_id()).sum() == index.num_documents
  x = index.make_batch([0, 5])
  assert x["inputs"].dtype == np.int32
  np.testing.assert_array_equal(x["inputs"][1], stream[5 * 64 : 6 * 64])


def test_eval_batches_are_built_when_read_not_held(monkeypatch):
  """``eval --eval-batches all`` streams a large split: eval_batches builds nothing up
  front, and each read builds one batch (the same arrays as before)."""
  built = []
  split_index = batching._split_index

  def counting_index(*a):
    index = split_index(*a)
    make = index.make_batch
    return dataclasses.replace(index, make_batch=lambda ids: built.append(1) or make(ids))

  monkeypatch.setattr(batching, "_split_index", counting_index)
  cfg = DataConfig(seq_len=128, batch_size=8)
  ev = eval_batches(cfg, None)
  assert len(ev) > 5 and built == []
  last = ev[-1]
  assert len(built) == 1 and _same(last, ev[len(ev) - 1]) and len(built) == 2
  assert [b["inputs"][0, 0] for b in ev[1:3]] == [ev[1]["inputs"][0, 0], ev[2]["inputs"][0, 0]]
  with pytest.raises(IndexError):
    ev[len(ev)]
  assert len(list(ev)) == len(ev)  # iteration stops at the end (Sequence protocol)


def test_builtin_unpacked_mask(sp):
  cfg = DataConfig(seq_len=512, batch_size=16, packing=False, seed=1)
  ds = make_dataset(cfg, "train")
  assert ds.num_examples == len(gd.builtin_documents("train"))
  x = ds.batch(5)
  _check_batch(x, cfg, ds.vocab_size)
  for row in range(cfg.batch_size):
    n = int(x["mask"][row].sum())
    assert x["mask"][row, :n].all()  # a prefix of real targets, then padding
    if n < cfg.seq_len:  # short document: ends with EOS, then pad
      assert x["targets"][row, n - 1] == sp.eos_id()
      assert (x["inputs"][row, n + 1 :] == sp.pad_id()).all()


# ---------------------------------------------------------------------------- path sources


def _docs(n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  words = "the of and to a in that it was her his she he you not be with as had for".split()
  return [
    f"Doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(5, 120)))) for i in range(n)
  ]


def test_jsonl_gz_source(tmp_path, sp):
  # Named and laid out as allenai/c4's shards (records with text, timestamp and url), read
  # through a glob that picks two of three (the README's C4-without-TFDS command).
  docs = _docs(400)
  for shard, part in ((0, docs[:150]), (1, docs[150:]), (9, ["Doc x: left out"] * 50)):
    with gzip.open(tmp_path / f"c4-train.{shard:05d}-of-01024.json.gz", "wt") as f:
      for d in part:
        f.write(json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": "u"}) + "\n")
  path = tmp_path / "c4-train.0000[0-8]-of-01024.json.gz"
  train = gd.path_documents(str(path), "train")
  val = gd.path_documents(str(path), "validation")
  assert len(train) + len(val) == len(docs) and not set(train) & set(val)
  assert val == [d for d in docs if gd.doc_hash(d) % 100 == 0] and 1 <= len(val) <= 15
  # packing=False: each row is one document (+ EOS), truncated / padded
  cfg = DataConfig(source=str(path), seq_len=32, batch_size=4, packing=False, seed=0)
  ds = make_dataset(cfg, "train")
  assert ds.num_examples == len(train)
  x = ds.batch(3)
  _check_batch(x, cfg, ds.vocab_size)
  for row in range(4):
    text = sp.decode(x["inputs"][row][x["mask"][row] > 0].tolist())
    assert text.startswith("Doc ")
    full = next(d for d in train if d.startswith(text.split(":")[0] + ":"))
    ids = sp.encode(full) + [sp.eos_id()]
    n = min(len(ids), 33) - 1
    assert x["mask"][row].sum() == n
    np.testing.assert_array_equal(x["inputs"][row, :n], ids[:n])
    np.testing.assert_array_equal(x["targets"][row, :n], ids[1 : n + 1])
  assert make_dataset(cfg, "train").batch(3)["inputs"].tolist() == x["inputs"].tolist()


def test_document_mask_gives_each_packed_document_its_segment(tmp_path, sp):
  # --document-mask: the same packed windows, targets and mask, plus segments that begin at
  # each EOS (a document's separator before it); eval batches too; not without packing.
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(300)))
  plain = DataConfig(source=str(path), seq_len=64, batch_size=4)
  masked = dataclasses.replace(plain, document_mask=True)
  a, b = make_dataset(plain).batch(2), make_dataset(masked).batch(2)
  assert "segments" not in a and all(np.array_equal(a[k], b[k]) for k in a)
  eos = sp.eos_id()
  for inputs, seg in zip(b["inputs"], b["segments"], strict=True):
    # A new segment exactly where an EOS is, and nowhere else.
    np.testing.assert_array_equal(np.diff(seg) == 1, inputs[1:] == eos)
    assert set(np.diff(seg)) <= {0, 1} and seg[0] in (1, 2)
  assert (b["inputs"] == eos).sum() >= 4  # several documents per row here
  assert "segments" in eval_batches(masked)[0]
  one = dataclasses.replace(masked, packing=False)
  assert "segments" not in make_dataset(one).batch(0)  # a row holds one document


def test_txt_json_dir_and_glob_sources(tmp_path):
  docs = _docs(60, seed=1)
  (tmp_path / "a.txt").write_text("\n\n".join(docs[:30]) + "\n", encoding="utf-8")
  (tmp_path / "b.json").write_text(json.dumps([{"text": d} for d in docs[30:45]]))
  (tmp_path / "c.txt.xz").write_bytes(lzma.compress("\n\n".join(docs[45:]).encode()))
  (tmp_path / "d.json").write_text(json.dumps({"text": "one pretty-printed object"}, indent=2))
  (tmp_path / "notes.md").write_text("ignored in a directory")
  all_docs = gd.path_documents(str(tmp_path), "train") + gd.path_documents(
    str(tmp_path), "validation"
  )
  # a .txt file is cut into paragraph groups of >= 1000 characters
  txt_docs = gd.split_paragraph_documents((tmp_path / "a.txt").read_text())
  assert len(txt_docs) < 30 and "\n\n".join(txt_docs) == "\n\n".join(docs[:30])
  assert set(docs[30:45]) <= set(all_docs)
  assert "one pretty-printed object" in all_docs
  for source in (str(tmp_path), str(tmp_path / "*.t*"), str(tmp_path / "b.json")):
    cfg = DataConfig(source=source, seq_len=16, batch_size=2)
    x = make_dataset(cfg, "train").batch(0)
    _check_batch(x, cfg, 8192)
    assert len(eval_batches(cfg, 2)) >= 1


def test_a_directory_names_the_files_it_does_not_read_and_markdown_is_read_when_named(tmp_path):
  # A directory of markdown notes beside one .txt file trained on that one file, silently.
  # Markdown is now read as plain text where it is named (a file or a glob), and a
  # directory's walk, which skips it (a dataset repository's README.md is its card), names
  # what it skips. Hidden files and directories are skipped silently, as a glob's * does.
  from galore_jax.data import sources

  docs = _docs(40, seed=3)
  root = tmp_path / "corpus"
  (root / "sub").mkdir(parents=True)
  (root / "a.txt").write_text("\n\n".join(docs[:20]))
  (root / "README.md").write_text("\n\n".join(docs[20:]))
  (root / "sub" / "table.csv").write_text("a,b")
  (root / ".git").mkdir()
  (root / ".git" / "notes.txt").write_text("not data")
  (root / ".hidden.jsonl").write_text('{"text": "not data"}\n')
  assert sources._resolve_paths(str(root)) == [root / "a.txt"]
  assert gd.unread_note(str(root), "--eval-data") == (
    f"galore-jax: note: --eval-data {root}: not reading its 2 other files (README.md, "
    f"sub/table.csv); a glob names other files to read (e.g. '{root}/**/*.md'; markdown is "
    "read as plain text)"
  )
  md = str(root / "README.md")
  read = gd.path_documents(md, "train") + gd.path_documents(md, "validation")
  assert sorted(read) == sorted(gd.split_paragraph_documents("\n\n".join(docs[20:])))
  assert sources._resolve_paths(str(root / "**" / "*.md")) == [root / "README.md"]
  for quiet in (str(root / "a.txt"), str(root / "*.txt"), "builtin", "tfds:c4/en", None):
    assert gd.unread_note(quiet) is None
  (root / "a.txt").unlink()
  with pytest.raises(FileNotFoundError, match=r"holds 2 other files \(README.md, sub/table.csv\)"):
    sources._resolve_paths(str(root))


def test_epoch_is_a_permutation(tmp_path):
  (tmp_path / "d.txt").write_text("\n\n".join(_docs(40, seed=2)))
  cfg = DataConfig(source=str(tmp_path / "d.txt"), seq_len=8, batch_size=1, seed=7)
  ds = make_dataset(cfg, "train")
  n = ds.steps_per_epoch
  assert n == ds.num_examples > 10
  rows = [tuple(ds.batch(s)["inputs"][0]) for s in range(2 * n)]
  assert sorted(rows[:n]) == sorted(rows[n:])  # same windows each epoch
  assert rows[:n] != rows[n:]  # in a new order


def test_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing_dir"):
    make_dataset(DataConfig(source=str(tmp_path / "missing_dir" / "x.jsonl")), "train")
  with pytest.raises(FileNotFoundError, match=r"\*\.jsonl"):
    make_dataset(DataConfig(source=str(tmp_path / "*.jsonl")), "train")
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n  \n")
  with pytest.raises(ValueError, match="empty.txt"):
    make_dataset(DataConfig(source=str(empty)), "train")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    make_dataset(DataConfig(source=str(bad)), "train")
  with pytest.raises(ValueError, match="unsupported"):
    (tmp_path / "x.csv").write_text("a,b")
    make_dataset(DataConfig(source=str(tmp_path / "x.csv")), "train")
  small = tmp_path / "small.txt"
  small.write_text("\n\n".join(_docs(3)))
  with pytest.raises(ValueError, match="too small"):
    make_dataset(DataConfig(source=str(small), seq_len=256, batch_size=64), "train")
  one = tmp_path / "one.jsonl"
  one.write_text('{"text": "a single document"}\n')
  with pytest.raises(ValueError, match="validation"):
    eval_batches(DataConfig(source=str(one), seq_len=4, batch_size=1), 1)
  one_line = tmp_path / "text8.txt"  # text8-like: 100 MB without a line end is one document
  one_line.write_text(" ".join(_docs(40)).replace("\n", " "))
  with pytest.raises(ValueError, match=r"one document \(break it into lines first, e.g. fold"):
    eval_batches(DataConfig(source=str(one_line), seq_len=4, batch_size=1), 1)
  with pytest.raises(ValueError):
    DataConfig(seq_len=0)


# ---------------------------------------------------------------------------- tfds


_TFDS_BUILDER = None


def _tiny_tfds_builder():
  """A real TFDS GeneratorBasedBuilder, prepared as array_record (no TensorFlow, no
  network): name 'galore_jax_tiny_text', config 'plain', splits train/validation."""
  global _TFDS_BUILDER
  if _TFDS_BUILDER is not None:
    return _TFDS_BUILDER
  tfds = pytest.importorskip("tensorflow_datasets")

  class GaloreJaxTinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="plain")]

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
      )

    def _split_generators(self, dl_manager):
      return {
        "train": self._generate_examples("train", 120),
        "validation": self._generate_examples("validation", 20),
      }

    def _generate_examples(self, split, n):
      for i, text in enumerate(_docs(n, seed=0 if split == "train" else 1)):
        yield i, {"text": f"{split} {text}"}

  _TFDS_BUILDER = GaloreJaxTinyText
  return GaloreJaxTinyText


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")
  from galore_jax.data import sources

  data_dir = tmp_path_factory.mktemp("tfds")
  with sources._tfds_temp_dirs_removed():  # (a new builder's tmp*tfds, as in tfds_source)
    make = _tiny_tfds_builder()
    builder = make(config="plain", data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  files = sorted(p.name for p in (data_dir / "galore_jax_tiny_text" / "plain" / "1.0.0").iterdir())
  assert any(".array_record-" in f for f in files), files
  return data_dir


@pytest.mark.parametrize("packing", [False, True])
def test_tfds_source_end_to_end(tfds_dir, monkeypatch, sp, packing):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
  cfg = DataConfig(
    source="tfds:galore_jax_tiny_text/plain", seq_len=32, batch_size=4, packing=packing, seed=5
  )
  ds = make_dataset(cfg, "train")
  assert ds.num_documents == 120
  for s in (0, 1, ds.steps_per_epoch, 3 * ds.steps_per_epoch + 1):
    x = ds.batch(s)
    _check_batch(x, cfg, ds.vocab_size)
    assert _same(x, make_dataset(cfg, "train").batch(s))
  it = ds.iterate(2)
  assert _same(next(it), ds.batch(2)) and _same(next(it), ds.batch(3))
  assert not _same(ds.batch(0), ds.batch(ds.steps_per_epoch))
  text = sp.decode(ds.batch(0)["inputs"][0].tolist())
  assert "train Doc" in text and "validation" not in text
  if packing:
    assert ds.batch(0)["mask"].mean() > 0.5
    assert sp.eos_id() in ds.batch(0)["inputs"]  # several documents per row
  else:
    assert ds.num_examples == 120 and ds.steps_per_epoch == 30
  # validation comes from the dataset's 'validation' split, in stored order
  import tensorflow_datasets as tfds

  src = tfds.data_source(
    "galore_jax_tiny_text/plain", split="validation", data_dir=str(tfds_dir), download=False
  )
  first_doc = src[0]["text"].decode()
  assert first_doc.startswith("validation Doc ")
  ev = eval_batches(cfg, 2)
  assert len(ev) == 2
  first = sp.decode(ev[0]["inputs"][0][ev[0]["mask"][0] > 0].tolist())
  assert first_doc.startswith(first) and len(first) > 20


def test_an_unprepared_tfds_dataset_leaves_no_temporary_directory(tmp_path, monkeypatch):
  """TFDS makes a tmp*tfds directory for a dataset it has no local information for and
  never removes it (DatasetInfo.initialize_from_bucket): tfds_source removes it."""
  import tempfile

  import tensorflow_datasets as tfds

  from galore_jax.data import sources

  def unprepared(name, **_):
    tempfile.mkdtemp("tfds")  # as TFDS does before it finds no prepared split
    raise NotImplementedError("Random access data source for dataset mnist is not available")

  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  monkeypatch.setattr(tfds, "data_source", unprepared)
  (tmp_path / "tmpkepttfds").mkdir()  # another process's: left alone
  with pytest.raises(ValueError, match="cannot open split 'train' of the TFDS dataset 'mnist'"):
    sources.tfds_source("tfds:mnist", "train")
  assert [p.name for p in tmp_path.iterdir()] == ["tmpkepttfds"]


def test_tfds_errors(tfds_dir, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
  with pytest.raises(ValueError, match="tfds:no_such_dataset_xyz") as e:
    make_dataset(DataConfig(source="tfds:no_such_dataset_xyz"), "train")
  # It says what to do: prepare the dataset, or pass JSON lines.
  assert "tfds build no_such_dataset_xyz --file_format=array_record" in str(e.value)
  assert "--data 'DIR/*.json.gz'" in str(e.value)
  with pytest.raises(ValueError, match="too small"):
    make_dataset(
      DataConfig(source="tfds:galore_jax_tiny_text/plain", batch_size=512, packing=False),
      "train",
    )
