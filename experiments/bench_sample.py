"""Sampling speed of ``galore_jax.sample``, every case measured in one run (ratios, not
absolute times, are what carry between machines).

Cases, all greedy on the same random model and the same prompts:

* ``recompute``: no key / value cache; every new token is a forward pass over the whole
  padded sequence so far (how ``sample`` worked before ``Llama.decode``), one prompt at a time;
* ``cached_b1``: ``sample.generate`` one prompt at a time (prefill, then one token per call);
* ``cached_bN``: ``sample.generate_batch`` of N prompts together (``sample --prompts
  --batch-size N``).

Each cached case runs once to compile (``compile_s``: the first run's time less a steady
run's) and once timed; the uncached case compiles with one forward pass (``compile_s``: its
time), as its steady run is long. Tokens per second count the tokens the replies keep.
Greedy replies of the cached cases should equal the recomputed ones token for token in
float32; in bfloat16 the batched matmuls may round differently and a reply can fork, which
``same_as_recompute`` shows.

    python experiments/bench_sample.py                      # llama_60m, float32 (CPU)
    python experiments/bench_sample.py --model llama_1b --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from galore_jax import model as M
from galore_jax import sample


def random_run(model: str, dtype: str, vocab: int, seed: int = 0):
  """A random model as ``sample.generate_batch`` reads it (graph, config) and its params."""
  cfg = M.get_config(model, vocab_size=vocab, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
  graphdef, params = nnx.split(M.Llama(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
  return types.SimpleNamespace(graphdef=graphdef, model_cfg=cfg), params


def recompute_greedy(prompt: list[int], n: int, forward, width: int) -> list[int]:
  """The uncached baseline: one ``forward(buf, at)`` (the greedy token after position
  ``at``) over a whole ``width``-token buffer per new token. Every prompt shares the one
  buffer shape, so it compiles once: the model is causal, and what follows a position does
  not change its logits."""
  buf = np.zeros((1, width), np.int32)
  buf[0, : len(prompt)] = prompt
  for pos in range(len(prompt), len(prompt) + n):
    buf[0, pos] = int(forward(jnp.asarray(buf), pos - 1))
  return buf[0, len(prompt) : len(prompt) + n].tolist()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="llama_60m")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--prompts", type=int, default=8, help="how many prompts (default 8)")
  p.add_argument("--batch-size", type=int, default=8, help="the batched case's N (default 8)")
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument(
    "--no-recompute", action="store_true", help="skip the uncached case (slow at long replies)"
  )
  p.add_argument("--json", help="write the results here")
  args = p.parse_args(argv)
  if args.prompts < 1 or args.batch_size < 1 or args.new_tokens < 1:
    p.error("--prompts, --batch-size and --new-tokens must be >= 1")

  run, params = random_run(args.model, args.dtype, args.vocab)
  rng = np.random.default_rng(0)
  # Prompt lengths spread over a few PROMPT_BUCKETs' worth, as a file of real prompts would.
  lengths = rng.integers(9, 41, size=args.prompts)
  prompts = [rng.integers(3, args.vocab, size=int(n)).tolist() for n in lengths]
  n = args.new_tokens
  # A random model's greedy reply does not stop early: no stop ids are given.
  gen = dict(max_new_tokens=n, temperature=0.0)

  def one_at_a_time():
    return [sample.generate(run, params, ids, **gen) for ids in prompts]

  def batched():
    out = []
    for i in range(0, len(prompts), args.batch_size):
      chunk = prompts[i : i + args.batch_size]
      # Fill the last batch up as the CLI does, so every batch has one compiled shape.
      filled = chunk + [chunk[-1]] * (args.batch_size - len(chunk))
      out += sample.generate_batch(run, params, filled, first_index=i, **gen)[: len(chunk)]
    return out

  greedy_at = jax.jit(lambda p, buf, at: nnx.merge(run.graphdef, p)(buf)[0, at].argmax())
  width = int(lengths.max()) + n

  def recompute():
    forward = lambda buf, at: greedy_at(params, buf, at)
    return [recompute_greedy(ids, n, forward, width) for ids in prompts]

  cases = {"cached_b1": (one_at_a_time, True), f"cached_b{args.batch_size}": (batched, True)}
  if not args.no_recompute:
    warm = lambda: int(greedy_at(params, jnp.zeros((1, width), jnp.int32), 0))
    cases = {"recompute": (recompute, False), **cases}
  results: dict = {
    "model": args.model,
    "dtype": args.dtype,
    "device": jax.devices()[0].device_kind,
    "backend": jax.default_backend(),
    "prompts": args.prompts,
    "prompt_tokens": [int(x) for x in lengths],
    "new_tokens": n,
    "cases": {},
  }
  replies = {}
  for name, (fn, warm_is_a_run) in cases.items():
    t0 = time.perf_counter()
    fn() if warm_is_a_run else warm()  # compiles
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    replies[name] = fn()
    steady = time.perf_counter() - t0
    kept = sum(len(r) for r in replies[name])
    results["cases"][name] = {
      "s": round(steady, 3),
      "tokens_per_s": round(kept / steady, 1),
      "compile_s": round(max(first - steady, 0.0) if warm_is_a_run else first, 2),
    }
    print(
      f"{name:>12}: {kept} tokens in {steady:.2f} s = {kept / steady:8.1f} tokens/s "
      f"(warm-up {first:.2f} s)",
      flush=True,
    )
    _write(args.json, results)

  base = replies.get("recompute")
  for name, r in replies.items():
    if base is not None and name != "recompute":
      same = sum(a == b for a, b in zip(r, base, strict=True))
      results["cases"][name]["same_as_recompute"] = same
  tps = {k: v["tokens_per_s"] for k, v in results["cases"].items()}
  batched_name = f"cached_b{args.batch_size}"
  results["ratios"] = {f"{batched_name}/cached_b1": round(tps[batched_name] / tps["cached_b1"], 2)}
  if base is not None:
    results["ratios"]["cached_b1/recompute"] = round(tps["cached_b1"] / tps["recompute"], 2)
  same = [
    f"{k} {v['same_as_recompute']}/{args.prompts}"
    for k, v in results["cases"].items()
    if "same_as_recompute" in v
  ]
  print("ratios:", ", ".join(f"{k} = {v}x" for k, v in results["ratios"].items()))
  if same:
    print("replies equal to recompute's:", ", ".join(same))
  _write(args.json, results)
  return 0


def _write(path, results):
  if path:
    with open(path, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  sys.exit(main())
