"""GPU: packed instruction batches through cuDNN's fused attention.

A packed batch (several instruction examples per row, ``segments``) adds a (B, 1, L, L)
mask to the causal one; ``attention_impl="auto"`` hands it to cuDNN, which takes it as an
additive bias. That path cannot run on a CPU, so this checks on the GPU, for one model in
bfloat16 (default ``llama_130m``, 8 x 1024 tokens):

* whether cuDNN's fused attention is in the compiled program (``auto``) or XLA's own
  attention was fallen back to (the fallback is silent by design);
* the logits of a packed batch under ``auto`` against ``xla`` (same weights): the largest
  difference, relative to the largest logit;
* each example of a packed row against the same example alone in a row (``auto``);
* forward + backward time of the packed batch, ``auto`` vs ``xla``, and of the same batch
  without segments (plain causal attention), median of 10.

Writes one JSON object to ``--json`` (also printed). ``--cpu-smoke``: a tiny model, to
test the script where there is no GPU (cuDNN is then refused and ``auto`` is XLA).

    python experiments/gpu_packed_check.py --json /tmp/packed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from galore_jax import model as M  # noqa: E402


def packed_batch(batch: int, seq_len: int, vocab: int, seed: int = 0):
  """Rows of examples of 20-400 tokens, packed one after another, the rest padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=(batch, seq_len)).astype(np.int32)
  segments = np.zeros((batch, seq_len), np.int32)
  for r in range(batch):
    at, k = 0, 1
    while True:
      n = int(rng.integers(20, 401))
      if at + n > seq_len:
        break
      segments[r, at : at + n] = k
      at, k = at + n, k + 1
  return jnp.asarray(tokens), jnp.asarray(segments)


def timed(fn, *args, reps: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama_130m")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--json", default=None)
  p.add_argument("--cpu-smoke", action="store_true")
  args = p.parse_args(argv)
  overrides = dict(dtype=jnp.bfloat16, max_seq_len=args.seq_len)
  if args.cpu_smoke:
    overrides.update(hidden_size=64, intermediate_size=176, num_heads=4, num_layers=2)
    args.batch_size, args.seq_len = 2, 256
    overrides["max_seq_len"] = args.seq_len
  result: dict = {"device": jax.devices()[0].device_kind, "model": args.model}
  tokens, segments = packed_batch(args.batch_size, args.seq_len, 32000)
  logits, programs = {}, {}
  for impl in ("auto", "xla"):
    config = M.get_config(args.model, attention_impl=impl, **overrides)
    params = M.init_params(config, seed=0)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda c=config: M.Llama(c, rngs=nnx.Rngs(0))))
    forward = jax.jit(lambda p, t, s, g=graphdef: nnx.merge(g, p)(t, s))
    compiled = forward.lower(params, tokens, segments).compile()
    text = compiled.as_text()
    result[f"{impl}_uses_cudnn"] = "cudnn" in text and "fmha" in text
    logits[impl] = compiled(params, tokens, segments)

    def loss(p, t, s, g=graphdef):
      return jnp.mean(nnx.merge(g, p)(t, s)[..., 0])

    grad = jax.jit(jax.grad(loss))
    result[f"{impl}_packed_fwd_bwd_s"] = timed(grad, params, tokens, segments)
    plain = jax.jit(jax.grad(lambda p, t, g=graphdef: jnp.mean(nnx.merge(g, p)(t)[..., 0])))
    result[f"{impl}_causal_fwd_bwd_s"] = timed(plain, params, tokens)
    programs[impl] = (forward, params)
    print(json.dumps(result), flush=True)
  scale = float(jnp.max(jnp.abs(logits["xla"])))
  result["auto_vs_xla_max_rel"] = float(jnp.max(jnp.abs(logits["auto"] - logits["xla"]))) / scale
  # Each example of row 0 alone in a row of its own, through the same (auto) program.
  forward, params = programs["auto"]
  worst, seg0 = 0.0, np.asarray(segments[0])
  for k in range(1, int(seg0.max()) + 1):
    at = np.flatnonzero(seg0 == k)
    alone = jnp.zeros((1, args.seq_len), jnp.int32).at[0, : len(at)].set(tokens[0, at])
    alone_seg = jnp.zeros((1, args.seq_len), jnp.int32).at[0, : len(at)].set(1)
    out = forward(params, alone, alone_seg)[0, : len(at)]
    worst = max(worst, float(jnp.max(jnp.abs(out - logits["auto"][0, at]))))
  result["example_alone_vs_packed_max_rel"] = worst / scale
  print(json.dumps(result), flush=True)
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
