"""The bundled corpus and the rules that cut text into documents and splits.

The corpus is Jane Austen's six novels and Shakespeare's complete works
(``galore_jax/data/corpus``, public domain). ``builtin_documents`` cuts it into
sections (chapters, scenes, each work's front matter), holds out every 20th section
for validation, and cuts each section into documents of whole paragraphs
(``split_paragraph_documents``, also used for ``.txt`` path sources). These rules are
fixed: the token caches are keyed by ``DATA_FORMAT_VERSION``.
"""

from __future__ import annotations

import itertools
import lzma
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

# This package's folder, which also holds the bundled tokenizer and corpus.
PACKAGE_DATA = Path(__file__).resolve().parent
CORPUS_DIR = PACKAGE_DATA / "corpus"
# Order matters: documents and sections are numbered in this order.
CORPUS_FILES = ("austen.txt.xz", "shakespeare.txt.xz")
SPLITS = ("train", "validation")

# --- fixed split rules (bump DATA_FORMAT_VERSION whenever one changes: it keys caches) ---
DATA_FORMAT_VERSION = "2"  # 2: .txt paragraphs over DOC_MIN_CHARS are cut at line ends
# Builtin corpus: every VALIDATION_EVERY-th section (chapter / scene / work preamble),
# counting from 0 in corpus order, goes to validation: section_index % 20 == 19.
VALIDATION_EVERY = 20
# Documents are runs of whole paragraphs of at least this many characters
# (a shorter tail of a section is merged into the section's previous document).
DOC_MIN_CHARS = 1000

_SECTION_HEADING = re.compile(r"^(CHAPTER|Chapter|SCENE|Scene)\s+[0-9IVXLCivxlc]+\b")
_BYLINE = re.compile(r"^by\s+(William Shakespeare|Jane Austen)\s*$", re.IGNORECASE)
_YEAR_LINE = re.compile(r"^\(\d{4}\)$")
# A work title glued to the previous work's last line ("[Exeunt.]THE SONNETS"):
# the title is the shortest all-capitals suffix that starts with a capital letter.
_GLUED_TITLE = re.compile(r"^(.*?)([A-Z][A-Z0-9 ,;:'.\-]*)$")


# ----------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------


def _pieces(lines: Iterable[str], min_chars: int, cut_long_paragraphs: bool) -> Iterator[str]:
  """The units documents are made of, as ``lines`` stream past: paragraphs (runs of
  non-blank lines, right-stripped, joined by newlines); with ``cut_long_paragraphs``, each
  paragraph cut at line ends into groups of >= ``min_chars`` characters (a shorter tail
  joins the group before it; a single long line stays whole), so no paragraph is held
  whole. A group is only given out once the next one is complete or its paragraph ends,
  since the tail may still join it."""
  done: list[str] | None = None  # a complete group the paragraph's tail may still join
  cur: list[str] = []
  size = 0
  for line in itertools.chain(lines, [""]):  # a blank line ends the last paragraph
    line = line.rstrip()
    if line.strip():
      size += len(line) + (1 if cur else 0)  # == len("\n".join(cur))
      cur.append(line)
      if cut_long_paragraphs and size >= min_chars:
        if done is not None:
          yield "\n".join(done)
        done, cur, size = cur, [], 0
    elif done is not None or cur:
      yield "\n".join((done or []) + cur)
      done, cur, size = None, [], 0


def paragraph_documents(
  lines: Iterable[str], min_chars: int = DOC_MIN_CHARS, *, cut_long_paragraphs: bool = False
) -> Iterator[str]:
  """:func:`split_paragraph_documents` over a text's lines (each right-stripped, so line
  ends may stay on), as they stream past: only the document being built and the one
  before it are held."""
  done: str | None = None  # a complete document the text's tail may still join
  cur: list[str] = []
  size = 0
  for piece in _pieces(lines, min_chars, cut_long_paragraphs):
    size += len(piece) + (2 if cur else 0)  # == len("\n\n".join(cur))
    cur.append(piece)
    if size >= min_chars:
      if done is not None:
        yield done
      done, cur, size = "\n\n".join(cur), [], 0
  if cur:
    tail = "\n\n".join(cur)
    yield tail if done is None else done + "\n\n" + tail
  elif done is not None:
    yield done


def split_paragraph_documents(
  text: str, min_chars: int = DOC_MIN_CHARS, *, cut_long_paragraphs: bool = False
) -> list[str]:
  """Groups whole consecutive paragraphs into documents of >= ``min_chars`` characters.

  Paragraphs are separated by blank lines; inside a document they are joined by one
  blank line. A tail shorter than ``min_chars`` joins the previous document (so only
  a text shorter than ``min_chars`` as a whole gives a shorter document).

  ``cut_long_paragraphs`` (``--data`` .txt files): a paragraph longer than
  ``min_chars`` is first cut at line ends into groups of >= ``min_chars``, so a file
  without blank lines (one sentence per line) still gives many documents.
  """
  lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
  return list(paragraph_documents(lines, min_chars, cut_long_paragraphs=cut_long_paragraphs))


def _title_line(lines: Sequence[str], byline: int) -> int:
  """Index of a work's title line: the first line above its byline that is neither
  blank nor a ``(1814)``-style year."""
  t = byline - 1
  while t > 0 and (not lines[t].strip() or _YEAR_LINE.match(lines[t].strip())):
    t -= 1
  return max(t, 0)


def _unglue_titles(lines: list[str]) -> list[str]:
  """Puts a work title glued to the previous work's last line (``[Exeunt.]THE SONNETS``,
  ``THE ENDANTONY AND CLEOPATRA``) on its own line."""
  out = list(lines)
  for j, line in enumerate(lines):
    if not _BYLINE.match(line) or j == 0:
      continue
    t = _title_line(lines, j)
    prev = lines[t]
    if prev.startswith("THE END") and len(prev) > len("THE END"):
      head, title = "THE END", prev[len("THE END") :]
    else:
      m = _GLUED_TITLE.match(prev)
      if not m or not m.group(1).strip():
        continue
      head, title = m.group(1), m.group(2)
    out[t] = head + "\n" + title  # re-split below
  return "\n".join(out).split("\n")


def _corpus_sections(text: str) -> list[list[str]]:
  """Splits one corpus file into sections (lists of lines).

  A section starts at each chapter / scene heading (``CHAPTER IV``, ``Chapter 12``,
  ``SCENE 2.``, ``Scene III.``) and at each work's title line (the line above the
  ``by William Shakespeare`` / ``By Jane Austen`` byline, skipping blank and
  ``(1814)``-style lines). A work's front matter (title, persons of the play,
  preface) is its own section, and poems without scenes are one section. A section
  with under 1000 characters of text (a bare title page) is merged into the next.
  """
  lines = _unglue_titles(text.replace("\r\n", "\n").split("\n"))
  starts = {0}
  for j, line in enumerate(lines):
    if _SECTION_HEADING.match(line):
      starts.add(j)
    elif _BYLINE.match(line):
      starts.add(_title_line(lines, j))
  bounds = sorted(starts) + [len(lines)]
  sections: list[list[str]] = []
  carry: list[str] = []
  for a, b in zip(bounds[:-1], bounds[1:], strict=True):
    sec = carry + lines[a:b]
    # A section with less than DOC_MIN_CHARS of text (a bare title page) joins the next.
    if sum(len(x.strip()) for x in sec) < DOC_MIN_CHARS and b < len(lines):
      carry = sec
    else:
      sections.append(sec)
      carry = []
  return sections


@lru_cache(maxsize=1)
def _builtin_sections() -> tuple[tuple[str, ...], ...]:
  """All sections of the bundled corpus, in corpus order, each as its documents."""
  sections: list[tuple[str, ...]] = []
  for name in CORPUS_FILES:
    path = CORPUS_DIR / name
    if not path.is_file():
      raise FileNotFoundError(f"bundled corpus file missing: {str(path)!r}")
    text = lzma.decompress(path.read_bytes()).decode("utf-8")
    for sec in _corpus_sections(text):
      docs = split_paragraph_documents("\n".join(sec))
      if docs:
        sections.append(tuple(docs))
  return tuple(sections)


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def builtin_documents(split: str) -> list[str]:
  """Documents of the bundled corpus for ``split`` ('train' | 'validation'), in corpus order.

  Rule (fixed, no randomness): the corpus (Austen's novels, then Shakespeare's
  works) is cut into sections -- chapters, scenes, and each work's front matter --
  numbered from 0; section ``i`` is validation iff ``i % 20 == 19`` (whole chapters
  and scenes are held out, 1 in 20). Each section is cut into documents of whole
  paragraphs of at least 1000 characters (see ``split_paragraph_documents``).
  """
  _check_split(split)
  want_val = split == "validation"
  return [
    doc
    for i, sec in enumerate(_builtin_sections())
    if ((i % VALIDATION_EVERY) == VALIDATION_EVERY - 1) == want_val
    for doc in sec
  ]
