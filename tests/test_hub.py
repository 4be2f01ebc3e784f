"""Hugging Face Hub ids as model directories (``galore_jax.hub``).

Nothing is downloaded: the end-to-end test builds a Hugging Face cache on disk in the
layout huggingface_hub keeps (``models--ORG--NAME/{refs,snapshots,blobs}``) and runs with
``HF_HUB_OFFLINE``, through the real ``snapshot_download``; the fetch tests stand in for the
Hub with a listing of a repository's files, filtered by huggingface_hub's own pattern
matcher, to check which files a model fetches.
"""

import dataclasses
import json
import os
import shutil

import huggingface_hub
import pytest
from huggingface_hub import constants, errors
from huggingface_hub.utils import filter_repo_objects

from galore_jax import checkpoint, cli, data, hf, hub, trainer
from galore_jax import model as M
from galore_jax.config import ConfigError, TrainConfig

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_model(cache, repo="acme/tiny-llama", *, weights=True):
  """A tiny LLaMA with the bundled tokenizer, as huggingface_hub caches it: the snapshot's
  files are links to content-named blobs (their own names are not kept)."""
  org, name = repo.split("/")
  root = cache / f"models--{org}--{name}"
  snap = root / "snapshots" / COMMIT
  snap.mkdir(parents=True)
  cfg = dataclasses.replace(
    M.get_config("llama_tiny"), num_layers=2, hidden_size=64, intermediate_size=128
  )
  hf.save_pretrained(snap, cfg, M.init_params(cfg, 0), tokenizer=data.load_tokenizer(None))
  if not weights:
    (snap / "model.safetensors").unlink()
  (root / "blobs").mkdir()
  for i, f in enumerate(sorted(snap.iterdir())):
    blob = root / "blobs" / f"{i:040x}"
    shutil.move(f, blob)
    f.symlink_to(os.path.relpath(blob, snap))
  (root / "refs").mkdir()
  (root / "refs" / "main").write_text(COMMIT)
  return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  """An empty Hugging Face cache, and no network as far as huggingface_hub knows."""
  cache = tmp_path / "hf_cache"
  cache.mkdir()
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return cache


def test_a_hub_id_is_a_path_only_when_no_such_path_exists(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for s in ("meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-0.5B@main", f"a/b@{COMMIT}", "runs/ft"):
    assert hub.is_hub_id(s), s
  for s in ("/abs/dir", "./a/b", "~/a", "llama", "a/b/c", "a/", "/a/b"):
    assert not hub.is_hub_id(s), s
  (tmp_path / "runs" / "ft").mkdir(parents=True)  # a local directory of that name wins
  assert not hub.is_hub_id("runs/ft")
  assert hub.local_dir("runs/ft", flag="--checkpoint") == "runs/ft"

  snap = str(tmp_path / "hub" / "models--meta-llama--Llama-3.2-1B" / "snapshots" / COMMIT)
  assert hub.describe(snap + "/") == "meta-llama/Llama-3.2-1B@0123456789ab"
  assert hub.model_name(snap) == "Llama-3.2-1B"
  assert trainer.default_out(TrainConfig(init_from=snap)).startswith("runs/Llama-3.2-1B_galore")
  assert hub.describe("/data/llama") == "/data/llama" and hub.model_name("/data/llama/") == "llama"
  # A run records the commit, for its snapshot and for the tokenizer read from it.
  os.makedirs(snap)
  for name in ("tokenizer.model", "tokenizer.json"):
    open(os.path.join(snap, name), "w").close()
  assert hub.pinned(snap) == f"meta-llama/Llama-3.2-1B@{COMMIT}"
  assert hub.pinned(os.path.join(snap, "tokenizer.json")) == f"meta-llama/Llama-3.2-1B@{COMMIT}"
  # Not the file that the directory is read for: kept as a path.
  assert hub.pinned(os.path.join(snap, "tokenizer.model")).endswith("tokenizer.model")
  assert hub.pinned("/data/tok.model") == "/data/tok.model" and hub.pinned(None) is None


class FakeHub:
  """The Hub's listing of one repository: ``snapshot_download`` writes the files its
  patterns allow (huggingface_hub's matcher) into a snapshot directory, as the real one
  would; ``local_files_only`` finds only what is already there."""

  def __init__(self, root, files, index=None):
    self.root, self.files, self.calls = root, files, []
    self.index = index

  def snapshot_download(self, repo_id, *, revision=None, allow_patterns=None, **kw):
    self.calls.append((revision, sorted(allow_patterns), kw.get("local_files_only", False)))
    folder = self.root / "snapshots" / COMMIT
    if kw.get("local_files_only"):
      if not folder.is_dir():
        raise errors.LocalEntryNotFoundError("not cached")
      return str(folder)
    assert revision in (None, COMMIT)
    folder.mkdir(parents=True, exist_ok=True)
    for name in filter_repo_objects(self.files, allow_patterns=allow_patterns):
      path = folder / name
      path.parent.mkdir(parents=True, exist_ok=True)
      content = json.dumps(self.index) if name == "model.safetensors.index.json" else "x"
      path.write_text(content)
    return str(folder)

  def fetched(self):
    folder = self.root / "snapshots" / COMMIT
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


LLAMA_3_FILES = [  # meta-llama/Llama-3.1-8B's listing, in short
  ".gitattributes",
  "LICENSE",
  "README.md",
  "config.json",
  "generation_config.json",
  "model-00001-of-00002.safetensors",
  "model-00002-of-00002.safetensors",
  "model.safetensors.index.json",
  "original/consolidated.00.pth",
  "original/params.json",
  "original/tokenizer.model",
  "special_tokens_map.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "consolidated.safetensors",  # as Mistral's repositories carry
  "pytorch_model-00001-of-00002.bin",
  "pytorch_model-00002-of-00002.bin",
]


def test_only_the_files_a_model_reads_are_fetched(tmp_path, monkeypatch):
  index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
  index["weight_map"]["b"] = "model-00002-of-00002.safetensors"
  fake = FakeHub(tmp_path / "repo", LLAMA_3_FILES, index)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
  said = []
  folder = hub.local_dir("meta-llama/Llama-3.1-8B", flag="--init-from", log=said.append)
  assert fake.fetched() == [
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
  ]
  assert folder.endswith(COMMIT)
  # The shards come from the commit the first call found; the cache is asked first.
  calls = [(rev, local) for rev, _, local in fake.calls]
  assert calls == [(None, False), (COMMIT, True), (COMMIT, False)]
  hub.local_dir(f"meta-llama/Llama-3.1-8B@{COMMIT}", flag="--init-from")
  assert [local for _, _, local in fake.calls[3:]] == [True, True]  # all cached: no Hub
  assert said == [
    f"galore-jax: note: --init-from meta-llama/Llama-3.1-8B: {hub.describe(folder)}, in {folder}"
  ]

  for need, want in (("config", ["config.json"]), ("tokenizer", ["tokenizer.json"])):
    fake = FakeHub(tmp_path / need, LLAMA_3_FILES, index)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    hub.local_dir("meta-llama/Llama-3.1-8B", flag="--tokenizer", need=need)
    assert [f for f in fake.fetched() if f in ("config.json", "tokenizer.json")] == want
    assert not any("safetensors" in f for f in fake.fetched()), fake.fetched()

  # A revision is passed on; a repository of pickles alone is a one-line error.
  fake = FakeHub(tmp_path / "pickles", ["config.json", "pytorch_model.bin", "tokenizer.json"])
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
  with pytest.raises(ConfigError) as e:
    hub.local_dir(f"old/model@{COMMIT}", flag="--init-from")
  assert fake.calls[0][0] == COMMIT and fake.fetched() == ["config.json", "tokenizer.json"]
  assert "only safetensors weights are read" in str(e.value) and "\n" not in str(e.value)


def _http_error(cls, message):
  """huggingface_hub's HTTP errors want a response object, whose class depends on its
  version; what the code reads is the message."""
  e = cls.__new__(cls)
  Exception.__init__(e, message)
  return e


@pytest.mark.parametrize(
  "error, said",
  [
    (errors.GatedRepoError, "a gated model: accept its license on huggingface.co"),
    (errors.RepositoryNotFoundError, "not a local path, and no Hugging Face model has that id"),
    (errors.RevisionNotFoundError, "the Hub has no revision 'v9' of acme/model"),
    (errors.HfHubHTTPError, "fetching it from the Hugging Face Hub failed: 500 Server Error"),
  ],
)
def test_hub_failures_are_one_line_errors(monkeypatch, error, said):
  def fail(*a, **kw):
    raise _http_error(error, "500 Server Error: Internal\nfor url: https://huggingface.co/x")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
  with pytest.raises(ConfigError) as e:
    hub.local_dir("acme/model@v9", flag="--init-from")
  assert e.value.flag == "--init-from" and str(e.value).startswith("--init-from: acme/model@v9: ")
  assert said in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_without_network_the_cache_is_used_and_its_gaps_are_named(offline_cache, capsys):
  assert cli.main(["eval", "--checkpoint", "acme/tiny-llama"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("galore-jax: error: --checkpoint: acme/tiny-llama: not a local path")
  assert f"not in the cache ({offline_cache})" in err and "HF_HUB_OFFLINE is set" in err, err
  assert len(err.splitlines()) == 1

  _cache_model(offline_cache, "acme/no-weights", weights=False)  # fetched by `plan` only
  assert cli.main(["eval", "--checkpoint", "acme/no-weights"]) == 2
  err = capsys.readouterr().err.strip()
  assert "has no model.safetensors" in err and "offline, only the files fetched before" in err
  assert len(err.splitlines()) == 1, err


def test_a_run_from_a_hub_id_records_its_commit_and_resumes_from_the_cache(
  offline_cache, tmp_path, capsys, monkeypatch
):
  snap = _cache_model(offline_cache)
  plan = ["plan", "--init-from", "acme/tiny-llama", "--no-compile", "--json"]
  assert cli.main(plan) == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out)["config"]["model"] == "acme/tiny-llama@0123456789ab"
  assert f"--init-from acme/tiny-llama: acme/tiny-llama@0123456789ab, in {snap}" in captured.err

  files = _cache_dataset(offline_cache)  # instruction data, from the Hub too
  run = tmp_path / "run"
  # --steps 4 throughout (each stop by --stop-after): the resumes continue the same schedule.
  args = ["train", "--init-from", "acme/tiny-llama", "--steps", "4", "--stop-after", "2"]
  args += ["--batch-size", "2"]
  args += ["--seq-len", "32", "--rank", "4", "--eval-every", "2", "--eval-batches", "1"]
  args += ["--save-every", "2", "--out", str(run), "--no-progress"]
  args += ["--data", "hf://datasets/acme/arith/data/train-*.parquet"]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "model acme/tiny-llama@0123456789ab: " in out, out
  assert (
    f"--data hf://datasets/acme/arith/data/train-*.parquet: commit 0123456789ab, in {files}" in out
  )
  saved = checkpoint.saved_train_config(str(run))[1]
  # The commit, not this cache's path: another machine's cache resolves it too.
  assert saved["init_from"] == saved["tokenizer"] == f"acme/tiny-llama@{COMMIT}"
  assert saved["data"] == f"hf://datasets/acme/arith@{COMMIT}/data/train-*.parquet"

  # The resume takes them from the run and finds the snapshots without the Hub, in another
  # cache too (another machine's, or this one's moved): the run names no cache path.
  moved = tmp_path / "moved_cache"
  shutil.move(offline_cache, moved)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(moved))
  resume = ["train", "--resume", "--out", str(run), "--no-progress"]
  assert cli.main([*resume, "--stop-after", "1"]) == 0
  out = capsys.readouterr().out
  assert "trained steps 2..3" in out and f"in {moved}/datasets--acme--arith" in out
  offline_cache = moved
  # eval of the run reads its tokenizer from the cache; of the Hub id, the model before.
  assert cli.main(["eval", "--checkpoint", str(run), "--eval-batches", "1", "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["step"] == 3
  eval_base = ["eval", "--checkpoint", "acme/tiny-llama", "--eval-batches", "1", "--json"]
  eval_base += ["--seq-len", "32", "--batch-size", "1"]
  assert cli.main(eval_base) == 0
  assert json.loads(capsys.readouterr().out)["step"] == 0

  # A cache that lost the model, without network: the run goes on with what it kept, the
  # config.json in its checkpoint and the copy of its tokenizer.
  shutil.rmtree(offline_cache / "models--acme--tiny-llama")
  assert cli.main(["eval", "--checkpoint", str(run), "--eval-batches", "1"]) == 0
  copy = f"using the copy the run kept in {run / 'tokenizer'}"
  assert copy in capsys.readouterr().err
  assert cli.main(resume) == 0
  captured = capsys.readouterr()
  assert "trained steps 3..4" in captured.out and copy in captured.out
  assert f"--init-from acme/tiny-llama@{COMMIT}: not a local path" in captured.out
  assert "goes on with the config.json that its checkpoint 3 kept" in captured.out
  assert checkpoint.saved_train_config(str(run))[1]["init_from"] == f"acme/tiny-llama@{COMMIT}"
  # The export's model card names the base model and the dataset as the Hub does.
  assert cli.main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
  card = huggingface_hub.ModelCard.load(tmp_path / "hf" / "README.md")
  assert card.data.base_model == "acme/tiny-llama" and card.data.datasets == ["acme/arith"]
  assert "Fine-tuned from [acme/tiny-llama](https://huggingface.co/acme/tiny-llama)" in card.text
  assert "| steps | 4 of 4 |" in card.text and "## Prompt format" in card.text


def _cache_dataset(cache, repo="acme/arith"):
  """A dataset repository in the cache: prompt/completion records in two Parquet files."""
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  org, name = repo.split("/")
  root = cache / f"datasets--{org}--{name}"
  snap = root / "snapshots" / COMMIT
  (snap / "data").mkdir(parents=True)
  (root / "refs").mkdir()
  (root / "refs" / "main").write_text(COMMIT)
  for shard in range(2):
    rows = [
      {"prompt": f"What is {a} plus {shard}? ", "completion": f"{a + shard}.", "id": a}
      for a in range(200)
    ]
    pq.write_table(pa.Table.from_pylist(rows), snap / "data" / f"train-{shard:05d}.parquet")
  return snap


def test_hub_dataset_files_are_named_as_huggingface_hub_does(offline_cache):
  snap = _cache_dataset(offline_cache)
  said = []
  got = hub.local_data(
    "hf://datasets/acme/arith/data/train-*.parquet", flag="--data", log=said.append
  )
  assert got == f"{snap}/data/train-*.parquet" and len(said) == 1
  # A run records them so that any cache finds them: read back, the same files.
  pinned = f"hf://datasets/acme/arith@{COMMIT}/data/train-*.parquet"
  assert hub.pinned(got) == pinned and hub.local_data(pinned, flag="--data") == got
  assert hub.local_data("hf://datasets/acme/arith@main/data", flag="--data") == f"{snap}/data"
  assert hub.local_data(f"hf://datasets/acme/arith@{COMMIT}/data/", flag="--data").endswith("data")
  assert hub.local_data("/local/x.jsonl", flag="--data") == "/local/x.jsonl"
  assert hub.local_data("tfds:c4/en", flag="--data") == "tfds:c4/en"
  for source, why in [
    ("hf://datasets/acme/arith", "expected hf://datasets/ORG/NAME[@REVISION]/PATH"),
    ("hf://models/acme/arith/x", "expected hf://datasets/ORG/NAME[@REVISION]/PATH"),
    ("hf://datasets/acme/arith/test-*.parquet", "has no file matching test-*.parquet"),
    ("hf://datasets/acme/other/x.parquet", "the Hugging Face dataset is not in the cache"),
  ]:
    with pytest.raises(ConfigError) as e:
      hub.local_data(source, flag="--eval-data")
    assert str(e.value).startswith(f"--eval-data: {source}: ") and why in str(e.value), e.value


def test_a_run_outlives_its_init_from_directory(offline_cache, tmp_path, capsys):
  """A fine-tune's base model deleted (a scratch file system purged): resume, eval and
  export of the run still work, from its checkpoint and its copy of the tokenizer."""
  base = tmp_path / "base"
  shutil.copytree(_cache_model(offline_cache), base, symlinks=False)
  run, exported = tmp_path / "run", tmp_path / "exported"
  # --steps 3 throughout (the first stop by --stop-after): the resume loads the compiled step.
  args = ["train", "--init-from", str(base), "--steps", "3", "--stop-after", "2"]
  args += ["--batch-size", "2"]
  args += ["--seq-len", "32", "--rank", "4", "--eval-every", "2", "--eval-batches", "1"]
  args += ["--save-every", "2", "--out", str(run), "--no-progress"]
  assert cli.main(args) == 0
  assert sorted(os.listdir(run / "tokenizer")) == ["tokenizer.model"]
  shutil.rmtree(base)
  capsys.readouterr()
  assert cli.main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0
  out = capsys.readouterr().out
  assert f"--init-from {base}: no such directory; the run goes on with the config.json" in out
  assert f"tokenizer {base}/tokenizer.model cannot be read (no such file)" in out
  assert "trained steps 2..3" in out
  assert cli.main(["export", "--checkpoint", str(run), "--out", str(exported)]) == 0
  assert hf.load_pretrained(exported)[0].num_layers == 2
  # Without the copy (a run of an older version), the error names the way out.
  shutil.rmtree(run / "tokenizer")
  saved = checkpoint.saved_train_config(str(run))[1]["tokenizer"]
  assert saved == str(run / "tokenizer")  # what the resume used, recorded
  assert cli.main(["eval", "--checkpoint", str(run)]) == 2
  assert "pass --tokenizer" in capsys.readouterr().err
