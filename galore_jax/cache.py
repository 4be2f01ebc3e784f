"""The on-disk caches as a user sees them (``galore-jax cache``): what each holds, how
large it is, which token-cache entries can never be read again, and removing them.

Two caches live under :func:`galore_jax.data.cache_dir` and are never pruned by a run:

* the token cache (``tokens/``, :mod:`galore_jax.data.sources`): one entry per split of
  each source and tokenizer. An entry whose source files were deleted or edited since is
  *stale*: its key names their old contents, so no run reads it again.
* JAX's persistent compilation cache (``jax-cache/``, :mod:`galore_jax.compile_cache`),
  with the traced-step cache inside it.

Removing an entry that a running process has mapped is safe (the process keeps reading
the unlinked file); one being built (its build lock held) is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from galore_jax.data import corpus, sources

# A source file in a key: its absolute path and the SHA-256 of its contents.
_SOURCE_PART = re.compile(r"^(/.*):([0-9a-f]{64})$")


@dataclasses.dataclass(frozen=True)
class TokenEntry:
  """One token-cache entry: its files (stream, index, build lock, and what a killed build
  or an older version left), their total size, when it was last read or written (the
  index's mtime: every load touches it) and the key parts it was stored under (None for
  an entry written before they were recorded)."""

  name: str
  files: tuple[Path, ...]
  size: int
  used: float
  key: tuple[str, ...] | None
  damaged: bool = False  # its index cannot be read: the next use rebuilds the entry

  @property
  def sources(self) -> list[tuple[str, str]]:
    """``(path, sha256)`` of each source file the entry was tokenized from."""
    found = (_SOURCE_PART.match(part) for part in self.key or ())
    return [m.groups() for m in found if m]

  @property
  def split(self) -> str | None:
    if not self.key:
      return None
    return self.key[-2] if self.key[-1] in ("tokens", "trained") else self.key[-1]

  @property
  def temporaries(self) -> list[Path]:
    """Files of a build under way, or of one that was stopped (killed) before the end."""
    return [f for f in self.files if f.name.endswith(".tmp")]

  @property
  def readable(self) -> bool:
    """Whether there is an entry to read: an index, or a file of the older one-file format.
    (A lone build lock is not one: an entry's split was never built under its name.)"""
    names = {f.name for f in self.files}
    return f"{self.name}.docs.npz" in names or f"{self.name}.npz" in names

  @property
  def unfinished(self) -> bool:
    """Only temporary files (:func:`token_entries` lists them apart from their entry)."""
    return bool(self.files) and len(self.temporaries) == len(self.files)

  def describe(self) -> str:
    """What the entry holds, in a few words: kind, split and source."""
    if not self.readable:
      return "a build under way" + (", or one stopped before the end" if self.unfinished else "")
    if self.damaged:
      return "damaged index (the next run that reads this entry rebuilds it)"
    if self.key is None:
      return "unknown (written by an older version)"
    if self.key[0] == "builtin":
      what = "bundled corpus"
    elif "sft" in self.key:
      what = "instructions" + (" (trained flags)" if self.key[-1] == "trained" else "")
    else:
      what = "text"
    files = [path for path, _ in self.sources]
    if files:
      what += f" {files[0]}" + (f" and {len(files) - 1} more" if len(files) > 1 else "")
    for part in self.key:  # the files read through --columns (galore_jax.data.batching)
      if part.startswith("columns="):
        what += f" (--columns {part.removeprefix('columns=')})"
    return f"{self.split}: {what}"


def token_entries(*, locks: bool = False) -> list[TokenEntry]:
  """The token cache's entries, least recently used first: the readable ones, and apart
  from them the temporary files of each build under way or stopped. ``locks``: also the
  lone build locks (an entry's split never built under its name) that emptying removes."""
  root = sources.cache_dir() / "tokens"
  groups: dict[tuple[str, bool], list[Path]] = {}
  for path in root.iterdir() if root.is_dir() else ():
    groups.setdefault((path.name.split(".", 1)[0], path.suffix == ".tmp"), []).append(path)
  entries = []
  for (name, _), files in groups.items():
    index = root / f"{name}.docs.npz"
    key, damaged = None, False
    if index in files:
      try:
        with sources.np.load(index) as z:
          if sources._KEY in z.files:
            key = tuple(str(part) for part in z[sources._KEY])
      except sources._CACHE_ERRORS:
        damaged = True
    stats = []
    for f in files:
      with contextlib.suppress(OSError):  # removed meanwhile (a build's temporary file)
        stats.append((f, f.stat()))
    # The index (every load touches it), else the files of a build or an older format.
    times = {f: st.st_mtime for f, st in stats if f.suffix != ".lock"}
    used = times.get(index, max(times.values(), default=0.0))
    size = sum(st.st_size for _, st in stats)
    entry = TokenEntry(name, tuple(sorted(files)), size, used, key, damaged)
    if locks or entry.readable or entry.unfinished or building(entry):
      entries.append(entry)
  return sorted(entries, key=lambda e: (e.used, e.name))


def stale_reason(entry: TokenEntry, hashes: dict[str, str | None]) -> str | None:
  """Why no run can read ``entry`` again (None: one may). ``hashes`` memoizes the
  SHA-256 of the files looked at (None: missing), shared between entries."""
  if not entry.readable:
    return (
      "its build was stopped before the end" if entry.unfinished and not building(entry) else None
    )
  if entry.key is None:
    return None
  if entry.key[1:2] != (corpus.DATA_FORMAT_VERSION,):
    return "written for another data format"
  if "sft" in entry.key:
    from galore_jax import sft

    at = entry.key.index("sft")
    if entry.key[at + 1 : at + 2] != (sft.EXAMPLES_FORMAT_VERSION,):
      return "written for another instruction format"
  recorded = entry.sources
  if entry.key[0] == "builtin":
    recorded = [
      (str(corpus.CORPUS_DIR / name), sha)
      for name, sha in zip(corpus.CORPUS_FILES, entry.key[2:], strict=False)
    ]
  for path, sha in recorded:
    if path not in hashes:
      hashes[path] = sources._sha256_file(Path(path)) if os.path.isfile(path) else None
    if hashes[path] is None:
      return f"source missing: {path}"
    if hashes[path] != sha:
      return f"source changed: {path}"
  return None


@contextlib.contextmanager
def _unless_building(entry: TokenEntry) -> Iterator[bool]:
  """Holds the entry's build lock while it is removed; False when another process holds
  it (the entry is being built)."""
  lock = sources.cache_dir() / "tokens" / f"{entry.name}.lock"
  try:
    import fcntl

    fd = os.open(lock, os.O_RDONLY)
  except (ImportError, OSError):  # no lock file (or no locks): nothing is building it
    yield True
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      yield False
      return
    except OSError:
      pass
    yield True
  finally:
    os.close(fd)


def building(entry: TokenEntry) -> bool:
  """Whether another process holds the entry's build lock (is tokenizing into it)."""
  with _unless_building(entry) as free:
    return not free


def remove_token_entry(entry: TokenEntry) -> str | None:
  """Removes the entry's files; else says why it was kept (another process is building
  it, or a file cannot be removed: another user's, in a shared cache)."""
  with _unless_building(entry) as free:
    if not free:
      return "another process is building it"
    for f in entry.files:
      try:
        f.unlink(missing_ok=True)
      except OSError as e:
        return f"{f}: {e.strerror}"
  return None


def clear_hash_records() -> None:
  """Removes the recorded hashes of source files (``sources._sha256_file``): each source
  is hashed again at its next start."""
  shutil.rmtree(sources.cache_dir() / "hashes", ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class CompileCacheUsage:
  files: int
  size: int


def _compile_cache_files(directory: Path) -> Iterator[Path]:
  """JAX's entries (``*-cache``, ``*-atime``) and the traced-step cache's files: not other
  files a user keeps in a directory named by JAX_COMPILATION_CACHE_DIR."""
  from galore_jax import compile_cache

  if not directory.is_dir():
    return
  for path in directory.iterdir():
    if path.is_file() and path.name.endswith(("-cache", "-atime")):
      yield path
  steps = directory / compile_cache.STEPS_DIR
  if steps.is_dir():
    yield from (p for p in steps.rglob("*") if p.is_file())


def compile_cache_usage(directory: str) -> CompileCacheUsage:
  files = list(_compile_cache_files(Path(directory)))
  return CompileCacheUsage(len(files), sum(f.stat().st_size for f in files))


def clear_compile_cache(directory: str) -> CompileCacheUsage:
  """Removes the compilation cache's entries (those it may: not another user's in a shared
  directory); returns what was removed."""
  from galore_jax import compile_cache

  files = size = 0
  for f in list(_compile_cache_files(Path(directory))):
    with contextlib.suppress(OSError):
      n = f.stat().st_size
      f.unlink()
      files, size = files + 1, size + n
  shutil.rmtree(Path(directory) / compile_cache.STEPS_DIR, ignore_errors=True)
  return CompileCacheUsage(files, size)
