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
the same process after its imports (the peak is what the data adds on top). Then it reads
a byte of every page of the packed training stream (as an epoch of batches would) and
prints the process's private memory (``RssAnon``) and file pages it maps (``RssFile``:
the token cache, shared by processes that read the same source). One real C4 shard holds
about 800 MB of text; eight (the README's glob) about 6.4 GB.

``--sft`` writes instruction records instead (``sft.jsonl``: prompt/completion, as a
fine-tuning set), read by ``galore_jax.sft``; ``--chat`` conversations (``chat.jsonl``:
"messages" records of one to three user/assistant turns), rendered in the ChatML preset
(``--chat-template chatml``) with the loss on the replies.

``--processes N`` starts N workers at once for each case, as a host's N GPUs (one
process each) start on the same source: the seconds are the last worker's, the memory
each worker's, and ``tokenized`` counts the workers that tokenized the files themselves.

    python experiments/data_load.py --dir /tmp/data_load --mb 200 [--txt | --sft | --chat]
      [--processes 4]
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_shard(
  path: Path,
  megabytes: float,
  seed: int = 0,
  txt: bool = False,
  sft: bool = False,
  chat: bool = False,
) -> int:
  """A C4-like JSON-lines shard of about ``megabytes`` MB of JSON (``txt``: plain text;
  ``sft``: instruction records, a prompt of 1-4 sentences and a completion of 2-10;
  ``chat``: conversations of 1-3 turns, each a user message and a reply as ``sft``'s);
  returns its documents."""
  from galore_jax.data import CORPUS_DIR, CORPUS_FILES

  text = " ".join(lzma.open(CORPUS_DIR / name, "rt").read() for name in CORPUS_FILES)
  sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if len(s) > 20]
  rng, target, written, docs = random.Random(seed), int(megabytes * 1e6), 0, 0
  plain = txt or sft or chat
  with open(path, "w") if plain else gzip.open(path, "wt", compresslevel=1) as f:
    while written < target and chat:
      messages = []
      for _ in range(rng.randint(1, 3)):
        user = " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 4)))
        reply = " ".join(rng.choice(sentences) for _ in range(rng.randint(2, 10)))
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
      line = json.dumps({"messages": messages}) + "\n"
      f.write(line)
      written, docs = written + len(line), docs + 1
    while written < target and sft:
      prompt = " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 4)))
      completion = " ".join(rng.choice(sentences) for _ in range(rng.randint(2, 10)))
      line = json.dumps({"prompt": prompt, "completion": " " + completion}) + "\n"
      f.write(line)
      written, docs = written + len(line), docs + 1
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


def status(field: str = "VmHWM") -> int:
  """A ``/proc/self/status`` memory field in bytes. VmHWM, the peak resident memory:
  unlike ``ru_maxrss``, which keeps the parent's peak across fork + exec, it starts again
  at exec."""
  with open("/proc/self/status") as f:
    return next(int(x.split()[1]) * 1024 for x in f if x.startswith(f"{field}:"))


def measure(source: str, chat: bool = False) -> dict:
  """In this (fresh) process: the seconds and peak memory of loading both splits (what
  ``make_dataset`` and ``eval_batches`` do), then the memory after reading every page of
  the training stream."""
  import warnings

  from galore_jax import data, sft
  from galore_jax.data import batching, sources

  warnings.simplefilter("ignore")  # (instruction records cut by seq_len are counted)

  template = sft.read_chat_template("chatml") if chat else None
  config = data.DataConfig(source=source, seq_len=256, batch_size=8, chat_template=template)
  sp = data.load_tokenizer(None, template)
  base = status()
  encoded = []
  builders = (sources._TokenBuilder, getattr(sft, "_ExampleBuilder", None))
  for builder in filter(None, builders):  # text, instruction records (versions before: none)

    def counting_flush(self, flush=builder._flush):  # whether this process tokenized
      encoded.append(1)
      return flush(self)

    builder._flush = counting_flush
  t0 = time.perf_counter()
  train = batching._split_index(config, "train", sp)
  validation = data.eval_batches(config, 4)
  validation[0]
  seconds = time.perf_counter() - t0
  peak = status()
  batches = train.make_batch
  if isinstance(getattr(batches, "examples", None), list):  # versions before: held arrays
    stream_bytes, touched = sum(t.nbytes + m.nbytes for t, m in batches.examples), 0
  else:
    stream = batches.stream if hasattr(batches, "stream") else batches.examples.tokens
    touched = int(np.asarray(stream[:: 4096 // stream.itemsize], np.int64).sum())  # each page
    stream_bytes = stream.nbytes
  return {
    "seconds": round(seconds, 4),
    "peak_bytes": peak,
    "baseline_bytes": base,
    "anon_bytes": status("RssAnon"),
    "file_bytes": status("RssFile"),
    "stream_bytes": stream_bytes,
    "tokenized": bool(encoded),
    "tokens": train.num_tokens,
    "touched": touched,
  }


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--dir", default="/tmp/galore_jax_data_load", help="where the shard goes")
  ap.add_argument("--mb", type=float, default=200.0, help="MB of JSON lines to write")
  ap.add_argument("--txt", action="store_true", help="a plain-text file instead of JSON lines")
  ap.add_argument("--sft", action="store_true", help="prompt/completion records (fine-tuning)")
  ap.add_argument("--chat", action="store_true", help='"messages" records in ChatML')
  ap.add_argument("--processes", type=int, default=1, help="workers started at once per case")
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    print(json.dumps(measure(args.worker, chat=args.chat)))
    return {}
  work = Path(args.dir)
  work.mkdir(parents=True, exist_ok=True)
  name = "corpus.txt" if args.txt else "c4-train.00000-of-01024.json.gz"
  shard = work / ("chat.jsonl" if args.chat else "sft.jsonl" if args.sft else name)
  if not shard.is_file():
    t0 = time.perf_counter()
    n = write_shard(shard, args.mb, txt=args.txt, sft=args.sft, chat=args.chat)
    print(f"wrote {shard} ({n} documents, {time.perf_counter() - t0:.0f} s)", flush=True)
  cache = work / "cache"
  if cache.exists():
    import shutil

    shutil.rmtree(cache)
  env = dict(os.environ, GALORE_JAX_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  results = {}
  for case in ("first", "cached"):
    workers = [
      subprocess.Popen(
        [sys.executable, __file__, "--worker", str(shard), *(["--chat"] if args.chat else [])],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
      for _ in range(args.processes)
    ]
    outs = [w.communicate() for w in workers]
    for w, (_, err) in zip(workers, outs, strict=True):
      if w.returncode:
        raise SystemExit(f"worker failed:\n{err}")
    results[case] = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  gb = lambda b: f"{b / 1e9:.2f}"
  print(f"{shard.name}: {shard.stat().st_size / 1e6:.0f} MB on disk, about {args.mb:g} MB of text")
  r0 = results["first"][0]
  print(f"{r0['tokens']:,} training tokens, packed stream {gb(r0['stream_bytes'])} GB")
  print(f"{args.processes} process(es) per case; memory columns: the largest worker's")
  print(
    "| start | seconds | tokenized | peak GB | after imports GB | private GB | mapped file GB |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|")
  for case, rs in results.items():
    big = lambda k, rs=rs: max(r[k] for r in rs)
    print(
      f"| {case} | {max(r['seconds'] for r in rs):.2f} | {sum(r['tokenized'] for r in rs)} "
      f"| {gb(big('peak_bytes'))} | {gb(big('baseline_bytes'))} | {gb(big('anon_bytes'))} "
      f"| {gb(big('file_bytes'))} |"
    )
  return results


if __name__ == "__main__":
  main()
