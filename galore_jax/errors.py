"""Exceptions reported in one line: what the CLI prints for bad input, never a traceback."""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 200) -> str:
  """The first line of ``error``'s message, cut to ``limit`` characters; its type's name when
  the message is empty (an exception raised with no message must not turn the report itself
  into an ``IndexError``)."""
  lines = str(error).strip().splitlines()
  return (lines[0] if lines else type(error).__name__)[:limit]


# Interrupt exceptions (types) whose ignored copies the hook below drops.
_QUIET_INTERRUPTS: set[type[BaseException]] = set()


def hide_ignored_interrupts(*types: type[BaseException]) -> None:
  """Drops the "Exception ignored in ..." report of an interrupt (``types``) that Python
  could not propagate: a signal handler's exception raised where the signal landed, when
  that was inside a gc callback (jax registers one, and tokenizing or decoding runs the
  collector often) or a ``__del__``. Its handler has recorded the signal, and the caller
  acts on it at its next check; the report would only be a traceback on the user's screen.

  The hook is installed once per process, on top of the one in place, and never removed:
  other hooks may have been installed over it since (``checkpoint``'s), which restoring
  an old one would drop."""
  if not _QUIET_INTERRUPTS:
    import sys

    previous = sys.unraisablehook

    def hook(unraisable):
      if not isinstance(unraisable.exc_value, tuple(_QUIET_INTERRUPTS)):
        previous(unraisable)

    sys.unraisablehook = hook
  _QUIET_INTERRUPTS.update(types)


def is_out_of_memory(error: BaseException) -> bool:
  """XLA's out-of-memory error (``JaxRuntimeError`` / ``XlaRuntimeError``, a RuntimeError,
  whose message begins with the status ``RESOURCE_EXHAUSTED``)."""
  return isinstance(error, RuntimeError) and str(error).lstrip().startswith("RESOURCE_EXHAUSTED")


# What an out-of-memory message before training (or in its first step) points to.
PLAN_HINT = "`galore-jax plan` with the same flags predicts the peak and what would shrink it"
