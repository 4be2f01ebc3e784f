"""Tests for galore_jax.data.corpus: the bundled corpus and its fixed split."""

from __future__ import annotations

import pytest

from galore_jax import data as gd


def test_builtin_split_fixed_and_disjoint():
  train = gd.builtin_documents("train")
  val = gd.builtin_documents("validation")
  # The rule is fixed: these sizes change only if the rule (or the corpus) does.
  assert (len(train), len(val)) == (6477, 284)
  assert not set(train) & set(val)
  assert train[0].startswith("EMMA\n\nBy Jane Austen")
  assert all(len(d) >= gd.DOC_MIN_CHARS for d in train + val)
  # Recomputing from the files gives the same documents.
  gd._builtin_sections.cache_clear()
  assert gd.builtin_documents("validation") == val
  # Whole chapters / scenes are held out: each validation document opens a section or
  # continues the previous validation document's section.
  assert val[0].startswith(("CHAPTER", "Chapter"))
  with pytest.raises(ValueError, match="split"):
    gd.builtin_documents("test")
