"""Writes the checkpoint fixture of tests/test_checkpoint_compat.py (run once, then committed).

A GaLore run (per-layer updates) of a 2-layer, 32-wide model with a 128-piece tokenizer on the
builtin corpus: a checkpoint after step 2 of 3, that checkpoint's params, and the losses of
the same run trained straight to step 3. It was made with the code of commit e946d0b (before
galore_jax/train.py was split), so the test proves that checkpoints written before the split
still restore and continue. Run from the repository root:

  python tests/data/ckpt_v1/make.py
"""

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402

from galore_jax import checkpoint, data, train  # noqa: E402
from galore_jax import model as model_lib  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = "ckpt_micro"
MODEL_CONFIG = dict(hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2)
CONFIG = dict(
  model=MODEL,
  optimizer="galore_adamw",
  rank=4,
  update_proj_gap=2,
  steps=3,
  batch_size=4,
  seq_len=16,
  eval_every=1000,
  eval_batches=1,
  save_every=1000,
  progress=False,
)


def register_model():
  model_lib.CONFIGS[MODEL] = model_lib.LlamaConfig(**MODEL_CONFIG)


def make_tokenizer(path: Path):
  text = "\n".join(data.builtin_documents("train"))[:200_000]
  with tempfile.TemporaryDirectory() as d:
    corpus = Path(d) / "corpus.txt"
    corpus.write_text(text)
    spm.SentencePieceTrainer.Train(
      input=str(corpus),
      model_prefix=str(Path(d) / "tok"),
      vocab_size=128,
      model_type="bpe",
      pad_id=3,
      character_coverage=1.0,
      minloglevel=2,
    )
    shutil.copy(Path(d) / "tok.model", path)


def main():
  register_model()
  tok = HERE / "tok.model"
  if not tok.exists():
    make_tokenizer(tok)
  with tempfile.TemporaryDirectory() as d:
    cfg = train.TrainConfig(tokenizer=str(tok), **CONFIG)
    straight = train.train(dataclasses.replace(cfg, out=f"{d}/straight"), log=print)
    first = train.train(dataclasses.replace(cfg, out=f"{d}/run", stop_after=2), log=print)
    assert first["step"] == 2
    shutil.rmtree(HERE / "run", ignore_errors=True)
    (HERE / "run").mkdir()
    shutil.copytree(f"{d}/run/checkpoints", HERE / "run" / "checkpoints")
  step, meta = checkpoint.read_meta(str(HERE / "run"))
  run = train.setup(cfg, 128)
  params = checkpoint.restore(str(HERE / "run"), step, {"params": run.abstract_params})["params"]
  flat = {
    "/".join(str(k.key) for k in path): np.asarray(v)
    for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  np.savez(HERE / "params_step2.npz", **flat)
  (HERE / "expected.json").write_text(
    json.dumps({"config": CONFIG, "model_config": MODEL_CONFIG, "losses": straight["losses"]})
    + "\n"
  )
  print("losses", straight["losses"], "first", first["losses"], file=sys.stderr)


if __name__ == "__main__":
  main()
