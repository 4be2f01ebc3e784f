"""Trains the bundled SentencePiece BPE tokenizer (galore_jax/data/tokenizer.model).

Trained on the TRAINING split of the bundled corpus only (``builtin_documents('train')``,
one document per SentencePiece "sentence", newlines kept as a user-defined piece), with
fixed options and a single thread, so the output is byte-for-byte reproducible:

    python experiments/train_tokenizer.py            # writes galore_jax/data/tokenizer.model
    python experiments/train_tokenizer.py --check    # retrains in memory, compares bytes

Special ids: unk=0, bos=1, eos=2, pad=3 (LLaMA's unk/bos/eos ids, plus a pad piece).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time
from pathlib import Path

import sentencepiece as spm

from galore_jax.data import BUILTIN_TOKENIZER, builtin_documents

# Every option is spelled out (not left to SentencePiece defaults) so that the model
# does not change with the library's defaults. Recorded in galore_jax/data/corpus/SOURCES.md.
TRAINING_OPTIONS: dict = dict(
  model_type="bpe",
  vocab_size=8192,
  byte_fallback=True,  # any UTF-8 byte is encodable: no <unk> in practice
  character_coverage=1.0,  # every character of the training text gets a piece (85)
  unk_id=0,
  bos_id=1,
  eos_id=2,
  pad_id=3,
  user_defined_symbols=["\n"],  # newline is one piece, never merged
  normalization_rule_name="identity",  # no NFKC: decode(encode(text)) == text
  remove_extra_whitespaces=False,  # keep verse indentation and double spaces
  add_dummy_prefix=True,
  split_digits=True,
  allow_whitespace_only_pieces=True,
  split_by_whitespace=True,
  max_sentence_length=65536,  # bytes; the longest training document is ~16 kB
  input_sentence_size=0,  # use every training document
  shuffle_input_sentence=False,
  num_threads=1,  # the thread count is stored in the model: keep it fixed
  minloglevel=2,
)


def train_model() -> tuple[bytes, float]:
  """Returns (serialized model, seconds)."""
  docs = builtin_documents("train")
  buf = io.BytesIO()
  t0 = time.perf_counter()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=buf, **TRAINING_OPTIONS)
  return buf.getvalue(), time.perf_counter() - t0


def describe(model: bytes) -> str:
  sp = spm.SentencePieceProcessor(model_proto=model)
  lines = [
    f"sha256 {hashlib.sha256(model).hexdigest()}  ({len(model)} bytes)",
    f"vocab {sp.get_piece_size()}  unk/bos/eos/pad = "
    f"{sp.unk_id()}/{sp.bos_id()}/{sp.eos_id()}/{sp.pad_id()}",
  ]
  for split in ("train", "validation"):
    docs = builtin_documents(split)
    ids = sp.encode(docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_tok = sum(len(x) for x in ids)
    lines.append(
      f"{split}: {len(docs)} documents, {n_bytes} bytes, {n_tok} tokens "
      f"(+{len(docs)} EOS), {n_bytes / n_tok:.3f} bytes/token"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--output", type=Path, default=BUILTIN_TOKENIZER, help="model file to write")
  ap.add_argument(
    "--check",
    action="store_true",
    help="retrain in memory and exit 1 unless it equals --output byte for byte",
  )
  args = ap.parse_args(argv)
  model, secs = train_model()
  print(f"trained in {secs:.1f} s")
  print(describe(model))
  if args.check:
    same = args.output.is_file() and args.output.read_bytes() == model
    print(f"{args.output}: {'identical' if same else 'DIFFERS'}")
    return 0 if same else 1
  args.output.parent.mkdir(parents=True, exist_ok=True)
  args.output.write_bytes(model)
  print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
