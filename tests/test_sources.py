"""Tests for galore_jax.data.sources: the tokenizer (path and TFDS sources: test_data.py)."""

from __future__ import annotations

import pytest

from galore_jax import data as gd
from galore_jax.data import load_tokenizer


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
