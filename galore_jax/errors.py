"""Exceptions reported in one line: what the CLI prints for bad input, never a traceback."""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 200) -> str:
  """The first line of ``error``'s message, cut to ``limit`` characters; its type's name when
  the message is empty (an exception raised with no message must not turn the report itself
  into an ``IndexError``)."""
  lines = str(error).strip().splitlines()
  return (lines[0] if lines else type(error).__name__)[:limit]
