"""Tests for galore_jax.data.sources: the tokenizer, path sources read as streams and
tokenized in batches (path and TFDS sources end to end: test_data.py)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import lzma
import os
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from galore_jax import data as gd
from galore_jax.data import load_tokenizer, sources


@pytest.fixture(scope="session")
def sp():
  return load_tokenizer()


def test_tokenizer_ids_and_round_trip(sp):
  assert sp.get_piece_size() == 8192
  assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
  texts = [
    "Emma Woodhouse, handsome, clever, and rich,\nwith a comfortable home",
    "  From fairest creatures we desire increase,\n\n  That thereby beauty's rose",
    "Caf\u00e9 na\u00efve \u2014 \u00c6thelred, 1,234,567 \U0001f600 \u4e2d\u6587",
    "\ttab  two  spaces, trailing \n",
    "",
  ]
  for t in texts:
    ids = sp.encode(t)
    assert sp.unk_id() not in ids  # byte fallback covers everything
    assert sp.decode(ids) == t
  assert sp.encode("said.\nEmma", out_type=str) == ["\u2581said", ".", "\n", "Emma"]
  assert sp.encode("1234", out_type=str) == ["\u2581", "1", "2", "3", "4"]  # split digits


def test_load_tokenizer_missing(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match="nope.model"):
    load_tokenizer(str(missing))


def test_bundled_tokenizer_is_reproducible(load_experiment):
  """Retraining with experiments/train_tokenizer.py gives the shipped file byte for byte."""
  mod = load_experiment("train_tokenizer")
  model, _ = mod.train_model()
  assert model == gd.BUILTIN_TOKENIZER.read_bytes()


# ----------------------------------------------------------------------------------------
# Path sources read as streams, tokenized a batch at a time
# ----------------------------------------------------------------------------------------


class _EncodeSpy:
  """The tokenizer, recording the characters of each ``encode`` call."""

  def __init__(self, sp):
    self.sp, self.calls = sp, []

  def __getattr__(self, name):  # eos_id, get_piece_size, ...
    return getattr(self.sp, name)

  def encode(self, docs, **kw):
    self.calls.append(sum(map(len, docs)))
    return self.sp.encode(docs, **kw)


def _write_jsonl_gz(path, texts):
  with gzip.open(path, "wt") as f:
    for t in texts:
      f.write(json.dumps({"text": t, "url": "u"}) + "\n")


def _assert_packed(docs, sp, texts):
  """``docs`` (a _TokenDocs) holds ``texts`` tokenized, each followed by EOS."""
  ids = sp.encode(texts)
  want = np.concatenate([np.append(np.asarray(x, np.int64), sp.eos_id()) for x in ids])
  np.testing.assert_array_equal(docs.stream, want)
  np.testing.assert_array_equal(np.diff(docs.starts), [len(x) + 1 for x in ids])
  np.testing.assert_array_equal(docs.doc(len(ids) - 1), ids[-1])


def _texts(n, seed=0):
  rng = np.random.default_rng(seed)
  words = np.array("the of and a to in is you that it he was for on are as with his".split())
  return [f"Doc {i}: " + " ".join(rng.choice(words, size=rng.integers(5, 200))) for i in range(n)]


def test_path_tokens_hold_one_batch_of_tokenizer_output_at_a_time(tmp_path, sp, monkeypatch):
  # The tokenizer returns a Python int per token (~36 bytes), so a whole C4 shard at once
  # would take ~9 GB per GB of text: the source is tokenized TOKENIZE_BATCH_CHARS at a time
  # into the compact arrays, which equal tokenizing each split's documents in one call.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(sources, "TOKENIZE_BATCH_CHARS", 2000)
  texts = _texts(400)
  _write_jsonl_gz(tmp_path / "a.jsonl.gz", texts[:250])
  _write_jsonl_gz(tmp_path / "b.jsonl.gz", texts[250:])
  src = str(tmp_path / "*.jsonl.gz")
  spy = _EncodeSpy(sp)
  got = {s: sources.path_tokens(src, s, spy, ["t"]) for s in ("train", "validation")}
  longest = max(map(len, texts))
  assert len(spy.calls) > 20 and max(spy.calls) < 2000 + longest, spy.calls
  for split, docs in got.items():
    want = gd.path_documents(src, split)
    assert docs.stream.dtype == np.uint16 and docs.num_docs == len(want) > 0
    _assert_packed(docs, sp, want)
  # Train's pass cached both splits: reading validation again opens no file.
  read = sources._file_documents
  monkeypatch.setattr(sources, "_file_documents", lambda *a: pytest.fail("file read again"))
  np.testing.assert_array_equal(
    sources.path_tokens(src, "validation", spy, ["t"]).stream, got["validation"].stream
  )
  # Validation first (eval of a new source) tokenizes validation alone: ~1 % of the text.
  monkeypatch.setattr(sources, "_file_documents", read)
  spy.calls.clear()
  val = sources.path_tokens(src, "validation", spy, ["v"])
  np.testing.assert_array_equal(val.stream, got["validation"].stream)
  assert sum(spy.calls) == sum(map(len, gd.path_documents(src, "validation")))
  assert not sources._token_cache_path(["v", "train"]).exists()


def test_split_fallback_moves_the_smallest_hash_out_of_tokenized_batches(tmp_path, sp, monkeypatch):
  # No document hashes to 0 mod 100: the one with the smallest hash becomes validation,
  # taken out of the train arrays after earlier batches were already tokenized.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(sources, "TOKENIZE_BATCH_CHARS", 1)  # one document per batch
  texts = [t for t in _texts(60, seed=1) if gd.doc_hash(t) % 100][:5]
  (tmp_path / "five.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  smallest = min(range(5), key=lambda i: gd.doc_hash(texts[i]))
  src = str(tmp_path / "five.jsonl")
  for split, want in (
    ("validation", [texts[smallest]]),  # first: train is only counted on this pass
    ("train", [t for i, t in enumerate(texts) if i != smallest]),
  ):
    assert gd.path_documents(src, split) == want
    _assert_packed(sources.path_tokens(src, split, sp, ["f"]), sp, want)


def test_json_lines_are_read_as_a_stream(tmp_path):
  # A JSON-lines file is read a line at a time: its first record comes before the rest is
  # read or parsed (a bad later line does not stop it), and the progress in bytes grows
  # with it. The old reader decompressed and split the whole file first.
  rng = np.random.default_rng(0)
  texts = [rng.bytes(3000).hex() for _ in range(400)]  # ~2.4 MB, barely compressible
  f = tmp_path / "c4.json.gz"
  with gzip.open(f, "wt") as out:
    out.write(json.dumps({"text": "first\u2028record"}, ensure_ascii=False) + "\n")
    for t in texts:
      out.write(json.dumps({"text": t}) + "\n")
    out.write("{not json\n")
  records = gd.json_records(f)
  # U+2028 is a line break to str.splitlines, not to JSON lines.
  assert next(records) == ({"text": "first\u2028record"}, f"{f}:1")
  with pytest.raises(ValueError, match=r"c4\.json\.gz:402: invalid JSON line"):
    list(records)
  seen = []
  docs = sources._all_documents([f], progress=lambda done, total: seen.append((done, total)))
  size = f.stat().st_size
  assert next(docs) == "first\u2028record" and seen[0][0] < size / 4, (seen, size)
  with pytest.raises(ValueError, match="invalid JSON line"):
    list(docs)
  assert len(seen) > 100 and all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))
  f.write_bytes(gzip.compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts)))
  assert list(sources._all_documents([f], progress=lambda *a: seen.append(a)))[-1] == texts[-1]
  assert seen[-1] == (f.stat().st_size, f.stat().st_size)


def test_a_json_array_is_read_one_item_at_a_time(tmp_path, monkeypatch):
  # A .json file of one array (Alpaca's layout, instruction sets of gigabytes) is decoded an
  # item at a time: its first record comes before the rest is read (a bad later item does
  # not stop it), and the progress in bytes grows with it. The old reader parsed it whole:
  # every start's look at its first record read all of it, in several times its size.
  rng = np.random.default_rng(2)
  texts = [rng.bytes(3000).hex() for _ in range(1500)]  # 9 MB (a chunk is 1 MB), ~5 MB .gz
  f = tmp_path / "alpaca.json.gz"
  with gzip.open(f, "wt") as out:
    out.write("[\n" + ",\n".join(json.dumps({"text": t}, indent=2) for t in texts))
    out.write(',\n{"text": }\n]\n')
  records = gd.json_records(f)
  assert next(records) == ({"text": texts[0]}, f"{f} [item 0]")
  with pytest.raises(ValueError, match=r"alpaca\.json\.gz \[item 1500\]: invalid JSON"):
    list(records)
  seen = []
  docs = sources._all_documents([f], progress=lambda done, total: seen.append(done))
  assert next(docs) == texts[0] and seen[0] < f.stat().st_size / 4, (seen, f.stat().st_size)
  # The same values as json.loads, however the chunks cut them (numbers, escapes, nesting,
  # an array on one line or over many).
  items = [0, -12.5e-3, 7, 'a"b\\c\u2028é', [1, [2, {}]], {"k": [True, None]}, 10**20, 3.25]
  g = tmp_path / "mixed.json"
  for chunk in (1, 2, 3, 7):
    monkeypatch.setattr(sources, "_JSON_CHUNK", chunk)
    for text in (json.dumps(items), json.dumps(items, indent=1), "  []  ", "[\n]"):
      g.write_text(text, encoding="utf-8")
      assert [r for r, _ in gd.json_records(g)] == json.loads(text), (chunk, text)
    for text, why in (
      ("[1, 2", r"\[item 2\]: expected ',' or ']' in the JSON array, found its end"),
      ("[1 2]", r"\[item 1\]: expected ',' or ']' in the JSON array, found '2'"),
      ("[1,", r"\[item 1\]: the JSON array ends early"),
      ("[1,]", r"\[item 1\]: invalid JSON"),
      ("[1] [2]", r"mixed\.json: more after its JSON array"),
    ):
      g.write_text(text)
      with pytest.raises(ValueError, match=why):
        list(gd.json_records(g))


@pytest.mark.parametrize("blank_lines", [True, False])
def test_txt_files_are_read_as_a_stream(tmp_path, blank_lines):
  # A .txt file's documents come as its lines are read (a file of one sentence per line,
  # without a blank line, is one paragraph: it is cut at line ends as it streams past, not
  # held whole), and equal split_paragraph_documents of the whole text; "\r\n" and "\r"
  # end lines as "\n" does.
  rng = np.random.default_rng(1)
  lines = [rng.bytes(int(rng.integers(10, 300))).hex() for _ in range(6000)]  # ~1.8 MB
  sep = ["\n", "\r\n", "\r"] + (["\n\n", "\r\n\r\n"] if blank_lines else [])
  text = "".join(line + sep[int(rng.integers(len(sep)))] for line in lines)
  f = tmp_path / "lines.txt.xz"
  f.write_bytes(lzma.compress(text.encode(), preset=0))
  seen = []
  docs = sources._all_documents([f], progress=lambda done, total: seen.append(done))
  first = next(docs)
  assert seen[0] < f.stat().st_size / 4, (seen[0], f.stat().st_size)
  want = gd.split_paragraph_documents(text, cut_long_paragraphs=True)
  assert [first, *docs] == want and len(want) > 500


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not the format"])
@pytest.mark.parametrize("which", ["stream", "index"])
def test_a_damaged_token_cache_is_rebuilt(tmp_path, sp, monkeypatch, which, damage):
  # A cache file cut short or with a bad CRC (a copy interrupted, a disk error) is read as
  # a miss and rewritten, never a crash at start-up or wrong tokens: the stream file by
  # its length and the CRC-32 its index keeps, the index (a zip) by zip's own CRC.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(50)))
  src = str(tmp_path / "d.jsonl")
  want = sources.path_tokens(src, "train", sp, ["k"])
  want_stream, want_starts = np.array(want.stream), np.array(want.starts)
  del want  # (a mapped file: the damage below writes it in place)
  stream_path = sources._token_cache_path(["k", "train"])
  path = stream_path if which == "stream" else sources._docs_path(stream_path)
  good, good_stream = path.read_bytes(), stream_path.read_bytes()
  if damage == "truncated":
    path.write_bytes(good[: len(good) // 2])
  elif damage == "flipped byte":  # in the tokens (past the 128-byte .npy header) or the zip
    at = len(good) // 2
    path.write_bytes(good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1 :])
  else:
    path.write_bytes(b"not an array")
  got = sources.path_tokens(src, "train", sp, ["k"])
  np.testing.assert_array_equal(got.stream, want_stream)
  np.testing.assert_array_equal(got.starts, want_starts)
  assert stream_path.read_bytes() == good_stream  # rewritten
  assert sources._load_tokens(stream_path, sp.eos_id()) is not None


def test_a_cached_stream_is_a_read_only_map_of_its_file(tmp_path, sp, monkeypatch):
  # The packed stream is not read into memory: the processes of a host that train on the
  # same source (one per GPU) share the cache file's pages. The first start maps back
  # what it wrote (its chunks never joined in memory).
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  texts = _texts(300)
  _write_jsonl_gz(tmp_path / "a.jsonl.gz", texts)
  src = str(tmp_path / "a.jsonl.gz")
  joined = []
  monkeypatch.setattr(sources._TokenBuilder, "finish", lambda self: joined.append(1))
  for start in ("first", "cached"):
    docs = sources.path_tokens(src, "train", sp, ["m"])
    assert isinstance(docs.stream, np.memmap) and not docs.stream.flags.writeable, start
    assert Path(docs.stream.filename) == sources._token_cache_path(["m", "train"])
    _assert_packed(docs, sp, gd.path_documents(src, "train"))
  assert joined == []


def test_cache_entries_get_the_umasks_mode(tmp_path, sp, monkeypatch):
  # A cache directory several users share (GALORE_JAX_CACHE_DIR on a cluster) serves them
  # all: the entries are 0644 under umask 022, not mkstemp's 0600, and the lock opens
  # read-only (flock needs no write access). No temporary file is left.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  _write_jsonl_gz(tmp_path / "a.jsonl.gz", _texts(300))
  old = os.umask(0o022)
  try:
    sources.path_tokens(str(tmp_path / "a.jsonl.gz"), "train", sp, ["p"])
  finally:
    os.umask(old)
  made = sorted((tmp_path / "cache" / "tokens").iterdir())
  assert len(made) == 5 and not [p for p in made if p.suffix == ".tmp"]  # 2 entries + lock
  assert {oct(p.stat().st_mode & 0o777) for p in made} == {"0o644"}


def test_an_unwritable_cache_keeps_the_tokens_in_memory(tmp_path, sp, monkeypatch):
  # The cache is an optimisation: where it cannot be written (a file where its directory
  # should be, a full disk) the documents are joined in memory and the run goes on.
  (tmp_path / "file").write_text("x")
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "file" / "cache"))
  texts = _texts(300)
  _write_jsonl_gz(tmp_path / "a.jsonl.gz", texts)
  src = str(tmp_path / "a.jsonl.gz")
  for split in ("train", "validation"):
    docs = sources.path_tokens(src, split, sp, ["u"])
    assert not isinstance(docs.stream, np.memmap)
    _assert_packed(docs, sp, gd.path_documents(src, split))


def test_a_source_file_is_hashed_again_only_when_it_changed(tmp_path, monkeypatch):
  # The cache key hashes every source file at every start (about 1 GB/s: minutes for a
  # few hundred GB, in every process of a host). The hash is recorded with the file's
  # stat and read back while it is unchanged; any write changes the ctime.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(sources, "_HASH_FRESH_S", 0.0)
  src = tmp_path / "a.txt"
  src.write_text("one document\n" * 1000)
  hashed = []
  contents = sources._hash_contents
  monkeypatch.setattr(sources, "_hash_contents", lambda p: hashed.append(p) or contents(p))
  want = hashlib.sha256(src.read_bytes()).hexdigest()
  assert sources._sha256_file(src) == want and len(hashed) == 1
  assert sources._sha256_file(src) == want and len(hashed) == 1  # recorded: not read
  # Same size, same mtime (set back), other bytes: the ctime tells.
  before = src.stat()
  src.write_text("two document\n" * 1000)
  os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))
  assert src.stat().st_size == before.st_size
  want = hashlib.sha256(src.read_bytes()).hexdigest()
  assert sources._sha256_file(src) == want and len(hashed) == 2
  # Replaced by another file (a new inode) with the same times.
  other = tmp_path / "b.txt"
  other.write_text("six document\n" * 1000)
  os.replace(other, src)
  assert sources._sha256_file(src) == hashlib.sha256(src.read_bytes()).hexdigest()
  assert len(hashed) == 3
  # A file changed within the last _HASH_FRESH_S seconds is not recorded (a second write
  # in the same tick of the file clock would keep its times).
  monkeypatch.setattr(sources, "_HASH_FRESH_S", 3600.0)
  fresh = tmp_path / "fresh.txt"
  fresh.write_text("x")
  sources._sha256_file(fresh), sources._sha256_file(fresh)
  assert len(hashed) == 5


def test_an_interrupted_cache_write_leaves_no_files(tmp_path, sp, monkeypatch):
  # A Ctrl-C while an entry is written (the trainer stops the data load at once) leaves
  # neither temporary files nor an entry, and the next start builds it.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  _write_jsonl_gz(tmp_path / "a.jsonl.gz", _texts(300))
  src = str(tmp_path / "a.jsonl.gz")
  crc = sources._file_crc32

  def interrupted(path):  # the stream is written; its index is not
    raise KeyboardInterrupt

  with monkeypatch.context() as m:
    m.setattr(sources, "_file_crc32", interrupted)
    with pytest.raises(KeyboardInterrupt):
      sources.path_tokens(src, "train", sp, ["k"])
  assert [p.suffix for p in (tmp_path / "cache" / "tokens").iterdir()] == [".lock"]
  assert sources._file_crc32 is crc
  _assert_packed(sources.path_tokens(src, "train", sp, ["k"]), sp, gd.path_documents(src, "train"))


def test_a_cache_entry_of_the_one_file_format_is_converted_not_rebuilt(tmp_path, sp, monkeypatch):
  # Versions before the mapped stream kept tokens (no EOS) and offsets in one <key>.npz:
  # an upgrade reads it into the new format, removes it, and tokenizes nothing.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  texts = _texts(300)
  _write_jsonl_gz(tmp_path / "a.jsonl.gz", texts)
  src = str(tmp_path / "a.jsonl.gz")
  split_docs = {s: gd.path_documents(src, s) for s in ("train", "validation")}
  for split, texts in split_docs.items():  # what the old reader cached
    ids = sp.encode(texts)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
    legacy = sources._legacy_path(sources._token_cache_path(["o", split]))
    legacy.parent.mkdir(parents=True, exist_ok=True)
    np.savez(legacy, tokens=np.concatenate(ids).astype(np.uint16), offsets=offsets)
  monkeypatch.setattr(sources, "_file_documents", lambda *a: pytest.fail("tokenized again"))
  for split, texts in split_docs.items():
    docs = sources.path_tokens(src, split, sp, ["o"])
    _assert_packed(docs, sp, texts)
    assert isinstance(docs.stream, np.memmap)
    assert not sources._legacy_path(sources._token_cache_path(["o", split])).exists()


def test_a_second_process_waits_for_the_first_to_tokenize(tmp_path, sp, monkeypatch, capsys):
  # Processes starting on the same source (one per GPU of a host) tokenize it once: the
  # one holding the entry's lock builds, the others wait, then read its entry. Here this
  # test holds the lock (flock: another open file conflicts even in one process).
  fcntl = pytest.importorskip("fcntl")
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  texts = _texts(300)
  _write_jsonl_gz(tmp_path / "a.jsonl.gz", texts)
  src = str(tmp_path / "a.jsonl.gz")
  stream_path = sources._token_cache_path(["w", "train"])
  stream_path.parent.mkdir(parents=True)
  lock = os.open(sources.lock_path(stream_path), os.O_RDWR | os.O_CREAT)
  fcntl.flock(lock, fcntl.LOCK_EX)
  spy, got = _EncodeSpy(sp), []
  waiter = threading.Thread(
    target=lambda: got.append(sources.path_tokens(src, "train", spy, ["w"], lambda *a: None))
  )
  waiter.start()
  deadline, err = time.monotonic() + 30, ""
  while "waiting for another process" not in err and time.monotonic() < deadline:
    time.sleep(0.05)
    err += capsys.readouterr().err
  assert "galore-jax: waiting for another process that is tokenizing the same files" in err
  assert waiter.is_alive() and not got
  for split in ("train", "validation"):  # "the other process" builds both entries
    builder = sources._tokenize_docs(sp, gd.path_documents(src, split))
    builder.store(["w", split])
  os.close(lock)
  waiter.join(30)
  assert not waiter.is_alive() and spy.calls == []  # read the entry, tokenized nothing
  _assert_packed(got[0], sp, gd.path_documents(src, "train"))


def test_only_process_0_of_a_job_says_it_waits(tmp_path, monkeypatch, capsys):
  # Every process of a host's job waits for the one tokenizing: one line for the job.
  fcntl = pytest.importorskip("fcntl")
  from galore_jax import distributed

  monkeypatch.setattr(distributed, "joined_as_another_process", lambda: True)
  entry = tmp_path / "entry"
  lock = os.open(sources.lock_path(entry), os.O_RDWR | os.O_CREAT)
  fcntl.flock(lock, fcntl.LOCK_EX)
  entered = threading.Event()

  def wait():
    with sources._building(entry, say_waiting=True):
      entered.set()

  waiter = threading.Thread(target=wait)
  waiter.start()
  time.sleep(0.3)
  assert not entered.is_set()  # it waits ...
  os.close(lock)
  waiter.join(30)
  assert entered.is_set() and "waiting" not in capsys.readouterr().err  # ... and says nothing


def test_parquet_sources_read_the_text_column(tmp_path, sp, monkeypatch):
  # HuggingFaceFW/fineweb(-edu) ships Parquet only: a row's "text" is one document, read a
  # batch of rows at a time, split and tokenized as JSON records are.
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  texts = _texts(600, seed=2)
  table = pa.table({"id": list(range(600)), "text": texts, "url": ["u"] * 600})
  (tmp_path / "data").mkdir()
  pq.write_table(table.slice(0, 400), tmp_path / "data" / "000.parquet", row_group_size=150)
  pq.write_table(table.slice(400), tmp_path / "data" / "001.parquet", row_group_size=150)
  src = str(tmp_path / "data")  # a directory: both files, in name order
  docs = gd.path_documents(src, "train") + gd.path_documents(src, "validation")
  assert sorted(docs) == sorted(texts)
  assert gd.path_documents(src, "validation") == [t for t in texts if gd.doc_hash(t) % 100 == 0]
  cfg = gd.DataConfig(source=src, seq_len=32, batch_size=4)
  ds = gd.make_dataset(cfg, "train")
  train = gd.path_documents(src, "train")
  assert ds.num_documents == len(train)
  assert ds.num_tokens == sum(len(x) + 1 for x in sp.encode(train))  # each + EOS

  def parquet(name, **columns):
    pq.write_table(pa.table(columns), tmp_path / name)
    return str(tmp_path / name)

  for source, says in [
    (
      parquet("no_text.parquet", body=["a", "b"]),
      'no "text" column (columns: body; --columns text=COLUMN reads another)',
    ),
    (parquet("ints.parquet", text=[1, 2]), '"text" column holds int64, not strings'),
    (parquet("null.parquet", text=["a" * 50, None, "b"]), '[row 1]: "text" is null'),
  ]:
    with pytest.raises(ValueError, match=re.escape(says)):
      gd.path_documents(source, "train")
  (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
  with pytest.raises(ValueError, match="not a readable Parquet file"):
    gd.path_documents(str(tmp_path / "bad.parquet"), "train")
  (tmp_path / "x.parquet.gz").write_bytes(b"")
  with pytest.raises(ValueError, match="unsupported data file"):
    gd.path_documents(str(tmp_path / "x.parquet.gz"), "train")
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # an environment without pyarrow
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ValueError, match=r"reading \.parquet needs pyarrow"):
    gd.path_documents(src, "train")


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".txt.xz"])
def test_a_truncated_compressed_file_is_an_error_not_less_data(tmp_path, sp, monkeypatch, suffix):
  # A download cut short still decompresses up to the cut: read as a stream, its first
  # documents are already tokenized when the end is missed. That must fail the start
  # (naming the file), never train on part of the file or cache the part.
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  texts = _texts(300, seed=3)
  if suffix == ".jsonl.gz":
    whole = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
  else:
    whole = lzma.compress("\n\n".join(texts).encode())
  f = tmp_path / f"cut{suffix}"
  f.write_bytes(whole[: len(whole) * 2 // 3])
  with pytest.raises(ValueError, match=rf"cut{re.escape(suffix)}: cannot decompress"):
    sources.path_tokens(str(f), "train", sp, ["cut"])
  left = (tmp_path / "cache" / "tokens").glob("*")
  assert [p.suffix for p in left] == [".lock"]  # the build lock: nothing cached


def test_zst_sources_are_read_frame_after_frame_and_truncation_is_an_error(tmp_path, monkeypatch):
  # SlimPajama and The Pile ship *.jsonl.zst. zstandard's own stream reader reads a file cut
  # inside a frame back as less data without an error; ours raises, as gzip and lzma do.
  zstandard = pytest.importorskip("zstandard")
  texts = _texts(500, seed=4)
  data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
  half = len(data) // 2  # two frames, as a file written in parts is
  whole = b"".join(zstandard.ZstdCompressor().compress(x) for x in (data[:half], data[half:]))
  f = tmp_path / "part.jsonl.zst"
  f.write_bytes(whole)
  assert list(sources._all_documents([f])) == texts
  assert sources.COMPRESSION[".zst"](whole) == data
  f.write_bytes(whole[: len(whole) // 3])  # cut inside the first frame
  with pytest.raises(ValueError, match=r"cannot decompress \(\.zst\): the file ends inside a zstd"):
    list(sources._all_documents([f]))
  damaged = bytearray(whole)
  damaged[40:60] = b"\xff" * 20
  f.write_bytes(bytes(damaged))
  with pytest.raises(ValueError, match=r"cannot decompress \(\.zst\): damaged zstd data"):
    list(sources._all_documents([f]))
  monkeypatch.setitem(sys.modules, "zstandard", None)  # an environment without it
  f.write_bytes(whole)
  with pytest.raises(ValueError, match=r"reading \.zst needs the zstandard package"):
    list(sources._all_documents([f]))


def test_columns_read_a_records_fields_from_columns_of_other_names(tmp_path, sp, monkeypatch):
  """--columns text=content reads The Stack's (or RedPajama's) text column, in JSON and in
  Parquet, as the same documents a "text" field gives; a column that is not there, and a
  malformed spec, are errors naming them; the token cache keeps the mapping apart."""
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  assert sources.parse_columns(" input = context , output=response") == {
    "input": "context",
    "output": "response",
  }
  assert sources.parse_columns(None) == sources.parse_columns("") == {}
  for bad, says in [
    ("text", "expected FIELD=COLUMN[,FIELD=COLUMN...], got 'text'"),
    ("text=", "expected FIELD=COLUMN"),
    ("body=content", "unknown field 'body'; fields: text, prompt,"),
    ("text=a,text=b", "text is given twice"),
  ]:
    with pytest.raises(ValueError, match=re.escape(says)):
      sources.parse_columns(bad)
    with pytest.raises(ValueError, match=re.escape(says)):
      gd.DataConfig(source=str(tmp_path), columns=bad)

  texts = _texts(120, seed=3)
  plain = tmp_path / "plain"
  plain.mkdir()
  _write_jsonl_gz(plain / "a.jsonl.gz", texts)
  # A "text" key that is not the text: the mapping replaces it.
  stack = [{"content": t, "text": "not this", "id": i} for i, t in enumerate(texts)]
  (tmp_path / "stack.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stack))
  pq.write_table(
    pa.Table.from_pylist([{"content": t, "id": i} for i, t in enumerate(texts)]),
    tmp_path / "stack.parquet",
  )
  for split in ("train", "validation"):
    want = gd.path_documents(str(plain), split)
    for f in ("stack.jsonl", "stack.parquet"):
      assert gd.path_documents(str(tmp_path / f), split, {"text": "content"}) == want
  assert gd.path_documents(str(tmp_path / "stack.jsonl"), "train")[0] == "not this"

  # The same files through the pipeline, with and without the mapping: other batches (the
  # mapping is in the token cache's key, or the second would read the first's tokens).
  cfg = gd.DataConfig(source=str(tmp_path / "stack.parquet"), seq_len=16, batch_size=2)
  with pytest.raises(ValueError, match='no "text" column .*--columns text=COLUMN reads another'):
    gd.make_dataset(cfg)
  mapped = gd.make_dataset(dataclasses.replace(cfg, columns="text=content"))
  cfg = dataclasses.replace(cfg, source=str(tmp_path / "stack.jsonl"))  # "text": "not this"
  unmapped = gd.make_dataset(cfg).batch(0)["inputs"]
  assert sp.decode(unmapped[0].tolist()).startswith("not this")
  got = gd.make_dataset(dataclasses.replace(cfg, columns="text=content")).batch(0)["inputs"]
  np.testing.assert_array_equal(got, mapped.batch(0)["inputs"])
  assert not np.array_equal(got, unmapped)

  for f, says in [
    ("stack.jsonl", 'stack.jsonl:1: no "body" (--columns text=body; its fields: content,'),
    (
      "stack.parquet",
      'stack.parquet: no "body" column (--columns text=body; columns: content, id)',
    ),
  ]:
    with pytest.raises(ValueError, match=re.escape(says)):
      gd.path_documents(str(tmp_path / f), "train", {"text": "body"})
  (tmp_path / "c.jsonl").write_text('{"content": "x", "id": 1}\n')
  with pytest.raises(ValueError, match=re.escape("(its fields: content, id; --columns text=FIELD")):
    gd.path_documents(str(tmp_path / "c.jsonl"), "train")
  # Plain text has no fields: --columns with only .txt / .md files is an error, not ignored
  # (with records among the files it maps theirs).
  (tmp_path / "notes").mkdir()
  for name in ("a.txt", "b.md"):
    (tmp_path / "notes" / name).write_text("\n\n".join(texts[:60]))
  notes = gd.DataConfig(source=str(tmp_path / "notes"), seq_len=16, batch_size=2)
  gd.make_dataset(notes)
  with pytest.raises(ValueError, match=re.escape("--columns text=content: the files are plain ")):
    gd.make_dataset(dataclasses.replace(notes, columns="text=content"))
  (tmp_path / "notes" / "c.jsonl").write_text('{"content": "mapped", "id": 1}\n')
  glob = str(tmp_path / "notes" / "*")
  gd.make_dataset(dataclasses.replace(notes, source=glob, columns="text=content"))
