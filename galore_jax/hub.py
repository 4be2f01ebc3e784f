"""Hugging Face Hub ids as local model directories.

Every flag that takes a Hugging Face model directory (``train --init-from``, ``eval`` /
``sample`` / ``export --checkpoint``, ``plan --init-from``, ``--tokenizer``) takes a Hub id,
``ORG/NAME`` or ``ORG/NAME@REVISION`` (a branch, tag or commit), when no local path of that
name exists. ``huggingface_hub`` fetches the files into its cache, or finds them there: one
copy per revision, shared with transformers and vLLM, under ``HF_HOME`` / ``HF_HUB_CACHE``,
with ``HF_TOKEN`` (or ``hf auth login``) for gated models and ``HF_HUB_OFFLINE=1`` for a
machine without network, which uses what the cache holds.

Only the files a model directory is read for are fetched: ``config.json``, the tokenizer,
``generation_config.json`` and the safetensors weights (``model.safetensors``, or exactly
the shards that ``model.safetensors.index.json`` names). Many repositories carry the
weights twice more (``*.bin`` pickles; Llama's ``original/`` checkpoint, 16 GB for
Llama-3.1-8B; Mistral's ``consolidated.safetensors``), which a plain snapshot would fetch.

The directory handed on is the cache's snapshot of one commit
(``.../models--ORG--NAME/snapshots/<commit>``); a run records it as ``ORG/NAME@COMMIT``
(:func:`pinned`), so its resume finds that exact revision, without network where the
cache holds it.
"""

from __future__ import annotations

import functools
import glob as globlib
import json
import logging
import os
import re
import urllib.parse

from galore_jax.config import ConfigError

# A repository id, ORG/NAME, as the Hub spells them.
_REPO = r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
# ORG/NAME[@REVISION]; anything else is taken as a path.
_HUB_ID = re.compile(_REPO + r"(?:@(?P<rev>[\w./-]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# hf://datasets/ORG/NAME[@REVISION][/PATH]: a dataset's files, as huggingface_hub's
# HfFileSystem spells them.
_DATASET = re.compile(r"hf://datasets/" + _REPO + r"(?:@(?P<rev>[^/]+))?(?P<path>/.*)?")
# A snapshot of one commit in the Hugging Face cache, .../KIND--ORG--NAME/snapshots/<commit>:
# a model's directory, or a dataset's with the PATH of its files.
_CACHED = r".*/{kind}--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[0-9a-f]{{40}})"
_SNAPSHOT = re.compile(_CACHED.format(kind="models"))
_DATA_SNAPSHOT = re.compile(_CACHED.format(kind="datasets") + r"(?P<path>/.*)?")

TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer.model",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "chat_template.jinja",
)
# What each use reads: plan the config alone, a tokenizer its files, a model all of them.
NEEDS = {
  "config": ("config.json",),
  "tokenizer": TOKENIZER_FILES,
  "model": (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    *TOKENIZER_FILES,
  ),
}


def is_hub_id(source: str) -> bool:
  """``ORG/NAME`` or ``ORG/NAME@REVISION`` naming no local file or directory."""
  return bool(_HUB_ID.fullmatch(source)) and not os.path.exists(os.path.expanduser(source))


def describe(path: str) -> str:
  """``ORG/NAME@<commit, 12 digits>`` for a snapshot directory of the Hugging Face cache,
  else ``path`` itself."""
  m = _SNAPSHOT.fullmatch(os.path.normpath(path))
  return f"{m['org']}/{m['name']}@{m['rev'][:12]}" if m else path


def model_name(path: str) -> str:
  """A run's name for the model at ``path``: NAME for a cache snapshot of ORG/NAME (not its
  commit hash), else the directory's own name."""
  m = _SNAPSHOT.fullmatch(os.path.normpath(path))
  return m["name"] if m else os.path.basename(os.path.normpath(path))


def pinned(path: str | None) -> str | None:
  """What a run records for ``path``: ``ORG/NAME@COMMIT`` for a snapshot directory of the
  Hugging Face cache, or for the tokenizer file such a directory is read for;
  ``hf://datasets/ORG/NAME@COMMIT/PATH`` for a dataset's files there; else ``path``.
  A resume, an ``eval`` or a machine with another cache resolves the record again
  (:func:`local_dir`), fetching that exact commit if its cache lacks it."""
  if not path:
    return path
  if d := _DATA_SNAPSHOT.fullmatch(os.path.normpath(path)):  # --data's files
    return f"hf://datasets/{d['org']}/{d['name']}@{d['rev']}{d['path'] or ''}"
  m = _SNAPSHOT.fullmatch(os.path.normpath(path))
  if m is None:
    from galore_jax import hf

    folder = os.path.dirname(os.path.normpath(path))
    m = _SNAPSHOT.fullmatch(folder)
    found = hf.find_tokenizer(folder) if m else None
    if found is None or os.path.normpath(found) != os.path.normpath(path):
      return path
  return f"{m['org']}/{m['name']}@{m['rev']}"


def repo_id(record: str | None) -> str | None:
  """``ORG/NAME`` of what a run recorded from the Hub (``ORG/NAME[@REV]`` or
  ``hf://datasets/ORG/NAME[@REV]/PATH``, :func:`pinned`), else None (a local path)."""
  if not record:
    return None
  m = _DATASET.fullmatch(record) or _HUB_ID.fullmatch(record)
  return m["repo"] if m else None


def local_dir(source: str | None, *, flag: str, need: str = "model", log=None) -> str | None:
  """``source`` unchanged (None too) unless it is a Hub id (:func:`is_hub_id`); then the
  cache's snapshot directory holding what ``need`` (``model``, ``config`` or ``tokenizer``)
  reads, fetched if it is not there. ``log`` gets one line naming the commit and the
  directory. Raises :class:`ConfigError` for ``flag`` in one line: no such model, a gated
  one without a token, no network and nothing cached, or a repository without safetensors
  weights."""
  if not source or not is_hub_id(source):
    return source
  m = _HUB_ID.fullmatch(source)
  repo = m["repo"]
  folder = _fetch(repo, m["rev"], NEEDS[need], lambda f: _lacks(f, need), source, flag)
  index = os.path.join(folder, "model.safetensors.index.json")
  if need == "model" and os.path.isfile(index):
    try:
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise ConfigError(flag, f"{source}: unreadable model.safetensors.index.json ({e})") from e

    def lacks_shards(folder: str) -> str | None:
      missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
      return f"shard {missing[0]} of its index" if missing else None

    # The commit the first call found: the shards of the index just read.
    folder = _fetch(repo, os.path.basename(folder), shards, lacks_shards, source, flag)
    if lacking := lacks_shards(folder):
      raise ConfigError(flag, f"{source} ({describe(folder)}, {folder}) has no {lacking}")
  if lacking := _lacks(folder, need):
    offline = "; offline, only the files fetched before are there" if _offline() else ""
    raise ConfigError(flag, f"{source} ({describe(folder)}, {folder}) has no {lacking}{offline}")
  if log is not None:
    log(f"galore-jax: note: {flag} {source}: {describe(folder)}, in {folder}")
  return folder


def local_data(source: str | None, *, flag: str, log=None) -> str | None:
  """A ``--data`` source ``hf://datasets/ORG/NAME[@REVISION]/PATH`` (huggingface_hub's own
  spelling; PATH a file, a directory or a glob of the dataset's files, e.g.
  ``data/train-*.parquet``; a revision such as ``refs/convert/parquet``, the Hub's Parquet
  copy of a dataset, may be written with ``%2F`` for its slashes) as the same files in the
  cache's snapshot, fetched if they are not there: a local path or glob, which the data
  pipeline reads as any other. Any other source is returned unchanged."""
  if not source or not source.startswith("hf://"):
    return source
  m = _DATASET.fullmatch(source)
  if m is None or not (m["path"] or "").strip("/"):
    raise ConfigError(
      flag,
      f"{source}: expected hf://datasets/ORG/NAME[@REVISION]/PATH, PATH naming the dataset's "
      "files (a file, a directory or a glob such as data/train-*.parquet)",
    )
  path = m["path"].strip("/")
  revision = urllib.parse.unquote(m["rev"]) if m["rev"] else None

  def lacks(folder: str) -> str | None:
    found = globlib.glob(os.path.join(folder, path), recursive=True)
    return None if found else f"no file matching {path}"

  patterns = [path, f"{path}/*"]  # the files it names, or those under the directory
  folder = _fetch(m["repo"], revision, patterns, lacks, source, flag, repo_type="dataset")
  if lacking := lacks(folder):
    raise ConfigError(flag, f"{source}: the dataset ({folder}) has {lacking}")
  if log is not None:
    log(f"galore-jax: note: {flag} {source}: commit {os.path.basename(folder)[:12]}, in {folder}")
  return os.path.join(folder, path)


def _lacks(folder: str, need: str) -> str | None:
  """What ``need`` reads and ``folder`` does not hold, in words; None if nothing."""

  def has(name: str) -> bool:
    return os.path.isfile(os.path.join(folder, name))

  if need in ("config", "model") and not has("config.json"):
    return "config.json: not a transformers model"
  if need == "tokenizer" and not (has("tokenizer.json") or has("tokenizer.model")):
    return "tokenizer.json or tokenizer.model"
  if need == "model" and not (has("model.safetensors") or has("model.safetensors.index.json")):
    return (
      "model.safetensors or model.safetensors.index.json: only safetensors weights are read "
      "(a repository of *.bin pickles can be converted with transformers' from_pretrained, "
      "then save_pretrained)"
    )
  return None


def _fetch(
  repo: str, revision: str | None, patterns, lacks, source: str, flag: str, repo_type=None
) -> str:
  """The snapshot of ``repo`` at ``revision`` with the files ``patterns`` allows. A commit's
  cached snapshot is used without asking the Hub when ``lacks(folder)`` finds nothing
  missing: a commit never changes, and without network huggingface_hub retries such a
  request for about 25 s. A branch or tag is looked up on the Hub, as transformers does
  (the cache's copy when the Hub cannot be reached)."""
  import huggingface_hub
  from huggingface_hub import errors

  get = functools.partial(
    huggingface_hub.snapshot_download,
    repo,
    repo_type=repo_type,
    revision=revision,
    allow_patterns=list(patterns),
  )
  # Its retries log through `logging`, a line per failed request; what went wrong is said
  # once, below. Download progress bars are tqdm's and stay.
  quiet = logging.getLogger("huggingface_hub")
  level = quiet.level
  quiet.setLevel(logging.ERROR)
  try:
    if revision and _COMMIT.fullmatch(revision):
      try:
        folder = get(local_files_only=True)
        if lacks(folder) is None:
          return folder
      except errors.LocalEntryNotFoundError:  # not cached (or not whole): ask the Hub
        pass
    return get()
  except errors.GatedRepoError:
    why = (
      "a gated model: accept its license on huggingface.co, then log in (hf auth login) or "
      "set HF_TOKEN"
    )
  except errors.RevisionNotFoundError:
    why = f"the Hub has no revision {revision!r} of {repo}"
  except errors.RepositoryNotFoundError:
    what = (
      "no Hugging Face dataset has that id"
      if repo_type == "dataset"
      else "not a local path, and no Hugging Face model has that id"
    )
    why = f"{what} (a private one needs hf auth login or HF_TOKEN)"
  except errors.LocalEntryNotFoundError:
    offline = " (HF_HUB_OFFLINE is set)" if _offline() else ""
    what = (
      "the Hugging Face dataset is"
      if repo_type == "dataset"
      else "not a local path, and as a Hugging Face Hub id it is"
    )
    why = f"{what} not in the cache ({_cache_dir()}) and the Hub could not be reached{offline}"
  except (OSError, ValueError) as e:  # HTTP errors, a full disk, a malformed id
    lines = str(e).strip().splitlines()
    why = f"fetching it from the Hugging Face Hub failed: {lines[0] if lines else type(e).__name__}"
  finally:
    quiet.setLevel(level)
  raise ConfigError(flag, f"{source}: {why}")


def _offline() -> bool:
  from huggingface_hub import constants

  return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str:
  from huggingface_hub import constants

  return constants.HF_HUB_CACHE
