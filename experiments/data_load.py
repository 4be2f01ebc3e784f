"""Start-up time and host memory of a path source shaped like allenai/c4's JSON-lines shards.

Writes a C4-like ``c4-train.00000-of-01024.json.gz`` once (``--mb`` MB of text: documents
of 500-4000 characters made of the bundled corpus's sentences in random order, with C4's
``text`` / ``url`` fields; with ``--txt``, the same documents as one plain-text file,
``corpus.txt``, a sentence per line and a blank line between documents), then, each in a
fresh process:

* ``first``: ``data.make_dataset`` (train) + ``data.eval_batches`` with an empty token
  cache: the files are read, split, tokenized and cached;
* ``cached``: the same again, from the token cache.

Each prints its seconds and its peak resident memory (``VmHWM``, Linux), and the baseline of
the same process after its imports (the peak is what the data adds on top). One real C4
shard holds about 800 MB of text; eight (the README's glob) about 6.4 GB.

    python experiments/data_load.py --dir /tmp/data_load --mb 200 [--txt]
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_shard(path: Path, megabytes: float, seed: int = 0, txt: bool = False) -> int:
  """A C4-like JSON-lines shard of about ``megabytes`` MB of JSON (``txt``: plain text);
  returns its documents."""
  from galore_jax.data import CORPUS_DIR, CORPUS_FILES

  text = " ".join(lzma.open(CORPUS_DIR / name, "rt").read() for name in CORPUS_FILES)
  sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if len(s) > 20]
  rng, target, written, docs = random.Random(seed), int(megabytes * 1e6), 0, 0
  with open(path, "w") if txt else gzip.open(path, "wt", compresslevel=1) as f:
    while written < target:
      doc, length = [], rng.randint(500, 4000)
      while sum(map(len, doc)) < length:
        doc.append(rng.choice(sentences))
      if txt:
        line = "\n".join(doc) + "\n\n"
      else:
        line = json.dumps({"text": " ".join(doc), "url": f"https://example.com/{docs}"}) + "\n"
      f.write(line)
      written, docs = written + len(line), docs + 1
  return docs


def rss() -> int:
  """This process's peak resident memory (VmHWM: unlike ``ru_maxrss``, which keeps the
  parent's peak across fork + exec, it starts again at exec)."""
  with open("/proc/self/status") as f:
    return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))


def measure(source: str) -> dict:
  """In this (fresh) process: the seconds and peak memory of loading both splits."""
  from galore_jax import data

  config = data.DataConfig(source=source, seq_len=256, batch_size=8)
  data.load_tokenizer()
  base = rss()
  t0 = time.perf_counter()
  train = data.make_dataset(config, "train")
  validation = data.eval_batches(config, 4)
  validation[0]
  return {
    "seconds": round(time.perf_counter() - t0, 2),
    "peak_bytes": rss(),
    "baseline_bytes": base,
    "tokens": train.num_tokens,
    "documents": train.num_documents,
  }


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--dir", default="/tmp/galore_jax_data_load", help="where the shard goes")
  ap.add_argument("--mb", type=float, default=200.0, help="MB of JSON lines to write")
  ap.add_argument("--txt", action="store_true", help="a plain-text file instead of JSON lines")
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    print(json.dumps(measure(args.worker)))
    return {}
  work = Path(args.dir)
  work.mkdir(parents=True, exist_ok=True)
  shard = work / ("corpus.txt" if args.txt else "c4-train.00000-of-01024.json.gz")
  if not shard.is_file():
    t0 = time.perf_counter()
    n = write_shard(shard, args.mb, txt=args.txt)
    print(f"wrote {shard} ({n} documents, {time.perf_counter() - t0:.0f} s)", flush=True)
  cache = work / "cache"
  if cache.exists():
    import shutil

    shutil.rmtree(cache)
  env = dict(os.environ, GALORE_JAX_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  results = {}
  for case in ("first", "cached"):
    out = subprocess.run(
      [sys.executable, __file__, "--worker", str(shard)],
      env=env,
      capture_output=True,
      text=True,
      check=True,
    )
    results[case] = json.loads(out.stdout.strip().splitlines()[-1])
  gb = lambda b: f"{b / 1e9:.2f}"
  print(f"{shard.name}: {shard.stat().st_size / 1e6:.0f} MB on disk, about {args.mb:g} MB of text")
  print("| start | seconds | peak GB | after imports GB | tokens |")
  print("|---|---:|---:|---:|---:|")
  for case, r in results.items():
    print(
      f"| {case} | {r['seconds']} | {gb(r['peak_bytes'])} | {gb(r['baseline_bytes'])} "
      f"| {r['tokens']:,} |"
    )
  return results


if __name__ == "__main__":
  main()
