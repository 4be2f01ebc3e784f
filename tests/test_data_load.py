"""Tests for experiments/data_load.py (the start-up time and memory of a C4-like source)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("txt", [False, True])
def test_data_load_measures_a_first_and_a_cached_start(tmp_path, load_experiment, capsys, txt):
  data_load = load_experiment("data_load")
  results = data_load.main(["--dir", str(tmp_path), "--mb", "0.3"] + ["--txt"] * txt)
  assert (tmp_path / ("corpus.txt" if txt else "c4-train.00000-of-01024.json.gz")).is_file()
  [first], [cached] = results["first"], results["cached"]
  assert first["tokens"] == cached["tokens"] > 50_000
  assert first["tokenized"] and not cached["tokenized"]
  for r in (first, cached):
    assert r["peak_bytes"] >= r["baseline_bytes"] > 50 << 20 and r["seconds"] > 0
    assert r["stream_bytes"] > 100_000 and r["anon_bytes"] > 0 and r["file_bytes"] > 0
  assert (tmp_path / "cache" / "tokens").is_dir()  # the first start wrote the token cache
  out = capsys.readouterr().out
  assert "| first | " in out and "| cached | " in out


def test_workers_started_together_tokenize_once(tmp_path, load_experiment, capsys):
  data_load = load_experiment("data_load")
  results = data_load.main(["--dir", str(tmp_path), "--mb", "0.3", "--processes", "2"])
  assert [r["tokenized"] for r in results["first"]] in ([True, False], [False, True])
  assert [r["tokenized"] for r in results["cached"]] == [False, False]
  assert "2 process(es) per case" in capsys.readouterr().out


@pytest.mark.parametrize("kind,file,field", [("sft", "sft.jsonl", '"prompt"'),
                                             ("chat", "chat.jsonl", '"messages"')])  # fmt: skip
def test_instruction_records_are_measured_too(tmp_path, load_experiment, kind, file, field):
  data_load = load_experiment("data_load")
  results = data_load.main(["--dir", str(tmp_path), "--mb", "0.3", f"--{kind}"])
  [first], [cached] = results["first"], results["cached"]
  assert first["tokenized"] and not cached["tokenized"]
  assert first["tokens"] == cached["tokens"] > 30_000
  assert field in (tmp_path / file).read_text().splitlines()[0]
