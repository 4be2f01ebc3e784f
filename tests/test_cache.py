"""Tests for galore_jax.cache and ``galore-jax cache``: what the token and compilation
caches hold, which token entries are stale, and removing them."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time

import pytest

from galore_jax import cache, cli, compile_cache, data, sft
from galore_jax.data import sources


def _words(n: int, seed: int) -> str:
  words = "the of and a to in is you that it he was for on are as with his".split()
  return "\n\n".join(
    f"Doc {seed}.{i}: " + " ".join(words[(i * 7 + j * 3 + seed) % len(words)] for j in range(60))
    for i in range(n)
  )


@pytest.fixture
def caches(tmp_path, monkeypatch):
  """A cache directory of the test's own, with entries of three sources: a.txt (both
  splits, as training builds them), b.txt (validation only, as eval of a new source
  does) and sft.jsonl (instruction records: tokens and trained flags, both splits)."""
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(sources, "_HASH_FRESH_S", 0.0)  # record the new files' hashes
  (tmp_path / "a.txt").write_text(_words(400, 1))
  (tmp_path / "b.txt").write_text(_words(400, 2))
  records = [{"prompt": f"q {i}?", "completion": f" {_words(1, i)[:80]}"} for i in range(300)]
  (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  cfg = lambda name: data.DataConfig(source=str(tmp_path / name), seq_len=32, batch_size=2)
  data.make_dataset(cfg("a.txt"), "train")
  list(data.eval_batches(cfg("b.txt"), 1))
  data.make_dataset(cfg("sft.jsonl"), "train")
  return tmp_path


def _run(capsys, *args) -> tuple[int, str]:
  code = cli.main(["cache", *map(str, args)])
  out, err = capsys.readouterr()
  assert err == ""
  return code, out


def test_entries_name_their_source_and_split(caches):
  got = sorted(e.describe() for e in cache.token_entries())
  assert got == sorted(
    [
      f"train: text {caches / 'a.txt'}",
      f"validation: text {caches / 'a.txt'}",
      f"validation: text {caches / 'b.txt'}",
      f"train: instructions {caches / 'sft.jsonl'}",
      f"train: instructions (trained flags) {caches / 'sft.jsonl'}",
      f"validation: instructions {caches / 'sft.jsonl'}",
      f"validation: instructions (trained flags) {caches / 'sft.jsonl'}",
    ]
  )
  hashes = {}
  assert all(cache.stale_reason(e, hashes) is None for e in cache.token_entries())
  # Each source file was hashed once for all of its entries.
  assert sorted(hashes) == sorted(str(caches / n) for n in ("a.txt", "b.txt", "sft.jsonl"))
  # Files read through --columns: the entry says how.
  records = [{"q": f"q {i}?", "a": f" {_words(1, i)[:80]}"} for i in range(300)]
  (caches / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  cfg = data.DataConfig(source=str(caches / "qa.jsonl"), seq_len=32, batch_size=2)
  list(data.eval_batches(dataclasses.replace(cfg, columns="prompt=q,completion=a"), 1))
  assert f"validation: instructions {caches / 'qa.jsonl'} (--columns completion=a,prompt=q)" in [
    e.describe() for e in cache.token_entries()
  ]


def test_edited_or_deleted_sources_make_their_entries_stale_and_only_those_are_removed(
  caches, capsys
):
  (caches / "a.txt").unlink()
  with open(caches / "b.txt", "a") as f:
    f.write("\n\nOne more document.")
  code, out = _run(capsys)
  assert code == 0
  lines = out.splitlines()
  assert lines[0].startswith(f"token cache {caches / 'cache' / 'tokens'}: 7 entries, ")
  assert "; 3 stale, " in lines[0]
  stale = [line for line in lines if "[stale: " in line]
  assert len(stale) == 3
  assert sum(f"[stale: source missing: {caches / 'a.txt'}]" in line for line in stale) == 2
  assert sum(f"[stale: source changed: {caches / 'b.txt'}]" in line for line in stale) == 1

  code, out = _run(capsys, "--remove", "stale")
  assert code == 0 and out.startswith(
    f"token cache {caches / 'cache' / 'tokens'}: removed 3 entries, "
  )
  left = sorted(e.describe() for e in cache.token_entries())
  assert len(left) == 4 and all("sft.jsonl" in d for d in left)
  # What is left still serves a run: the instruction set is read back, not tokenized.
  cfg = data.DataConfig(source=str(caches / "sft.jsonl"), seq_len=32, batch_size=2)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(sft, "_ExampleBuilder", lambda *a: pytest.fail("tokenized again"))
    data.make_dataset(cfg, "train")


def test_an_entry_being_built_is_listed_and_kept(caches, capsys):
  # Another process holds the build lock of an entry (it is tokenizing into it, and has
  # written a temporary file): listed as under way, not stale, and kept by --remove tokens.
  # A temporary file whose build is not under way (killed) is stale.
  entry = next(e for e in cache.token_entries() if e.describe().startswith("train: text"))
  root = caches / "cache" / "tokens"
  (root / f"{entry.name}.stream.npy.123.abcd.tmp").write_bytes(b"x" * 1000)
  other = "0" * 32
  (root / f"{other}.stream.npy.456.ef01.tmp").write_bytes(b"y" * 1000)
  fd = os.open(root / f"{entry.name}.lock", os.O_RDONLY)
  fcntl.flock(fd, fcntl.LOCK_EX)
  try:
    hashes = {}
    reasons = {e.name: cache.stale_reason(e, hashes) for e in cache.token_entries() if e.unfinished}
    assert reasons == {entry.name: None, other: "its build was stopped before the end"}
    assert (caches / "cache" / "hashes").is_dir()  # the source files' recorded hashes
    code, out = _run(capsys, "--remove", "tokens")
    assert code == 0 and not (caches / "cache" / "hashes").exists()
    assert "removed 6 entries" in out  # the 7 but the one being built
    assert "kept train: text" in out and "another process is building it" in out
    assert sorted(p.name for p in root.iterdir()) == sorted(f.name for f in entry.files) + [
      f"{entry.name}.stream.npy.123.abcd.tmp"
    ]
  finally:
    os.close(fd)
  _run(capsys, "--remove", "tokens")
  assert list(root.iterdir()) == []


def test_loading_an_entry_marks_it_used(caches):
  # The listing orders entries by last use: a load touches the index.
  b = f"validation: text {caches / 'b.txt'}"
  entry = next(e for e in cache.token_entries() if e.describe() == b)
  index = caches / "cache" / "tokens" / f"{entry.name}.docs.npz"
  os.utime(index, (time.time() - 86400,) * 2)
  assert cache.token_entries()[0].name == entry.name  # least recently used first
  cfg = data.DataConfig(source=str(caches / "b.txt"), seq_len=32, batch_size=2)
  list(data.eval_batches(cfg, 1))
  assert index.stat().st_mtime > time.time() - 60
  assert cache.token_entries()[0].name != entry.name


def test_entries_of_older_versions_are_unknown_until_read(caches):
  # An index written before keys were recorded: shown as unknown, never removed as stale,
  # and given its key by the next run that reads it.
  b = f"validation: text {caches / 'b.txt'}"
  entry = next(e for e in cache.token_entries() if e.describe() == b)
  index = caches / "cache" / "tokens" / f"{entry.name}.docs.npz"
  with sources.np.load(index) as z:
    kept = {k: z[k] for k in z.files if k != "key"}
  with open(index, "wb") as f:
    sources.np.savez(f, **kept)
  old = next(e for e in cache.token_entries() if e.name == entry.name)
  assert old.key is None and old.describe() == "unknown (written by an older version)"
  assert cache.stale_reason(old, {}) is None
  cfg = data.DataConfig(source=str(caches / "b.txt"), seq_len=32, batch_size=2)
  list(data.eval_batches(cfg, 1))
  (now,) = [e for e in cache.token_entries() if e.name == entry.name]
  assert now.describe() == b and not now.temporaries
  with sources.np.load(index) as z:
    assert all(sources.np.array_equal(z[k], v) for k, v in kept.items())
  index.write_bytes(b"not an index")  # damaged: rebuilt where it is next read
  (got,) = [e for e in cache.token_entries() if e.name == entry.name]
  assert got.describe().startswith("damaged index") and cache.stale_reason(got, {}) is None


def test_the_compilation_cache_is_measured_and_emptied_of_its_own_files(
  tmp_path, capsys, monkeypatch
):
  monkeypatch.setenv("GALORE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  jc = tmp_path / "jc"
  (jc / compile_cache.STEPS_DIR / "ab").mkdir(parents=True)
  (jc / "jit_step-0123-cache").write_bytes(b"x" * 3000)
  (jc / "jit_step-0123-atime").write_bytes(b"t" * 8)
  (jc / compile_cache.STEPS_DIR / "ab" / "step.bin").write_bytes(b"s" * 500)
  (jc / "notes.txt").write_text("a file of the user's, in a directory named by them")
  code, out = _run(capsys, "--compile-cache", jc)
  assert code == 0 and f"compilation cache {jc}: 3 files, 0.0 MB" in out
  assert "token cache" in out and ": 0 entries, " in out
  code, out = _run(capsys, "--compile-cache", jc, "--remove", "compile")
  assert code == 0 and f"compilation cache {jc}: removed 3 files" in out
  assert sorted(p.name for p in jc.iterdir()) == ["notes.txt"]
  assert not (tmp_path / "cache").exists()  # listing creates no cache directory


def test_the_cache_command_refuses_a_bad_flag(capsys):
  with pytest.raises(SystemExit) as stop:
    cli.main(["cache", "--remove", "everything"])
  assert stop.value.code == 2 and "invalid choice: 'everything'" in capsys.readouterr().err
