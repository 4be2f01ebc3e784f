"""Host memory of ``galore_jax.hf.load_pretrained`` against reading the whole file first.

Writes a random LLaMA checkpoint (``model.safetensors`` + ``config.json``; default 155M
parameters, 594 MiB in float32) once, then loads it in a fresh process per method and
samples the process's anonymous resident memory (``RssAnon``: the mapped file's pages are
page cache, not counted) every 2 ms:

* ``ours``: ``hf.load_pretrained`` (slice by slice into the target dtype and device);
* ``ours-bf16``: the same into bfloat16;
* ``load_file``: ``safetensors.numpy.load_file`` (the whole model as host arrays), then
  ``jax.device_put`` of each.

On a CPU the device arrays are host memory too, so the parameters themselves are one
copy of the model; what matters is how far above that the peak goes.

    python experiments/hf_load_memory.py --dir /tmp/hf_load_memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


def _anon() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("RssAnon"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def write_checkpoint(d: Path, hidden: int, layers: int, vocab: int) -> None:
  import numpy as np
  from safetensors.numpy import save_file

  from galore_jax import hf
  from galore_jax import model as M

  cfg = M.LlamaConfig(
    vocab_size=vocab,
    hidden_size=hidden,
    intermediate_size=hidden * 11 // 4,
    num_heads=hidden // 64,
    num_kv_heads=hidden // 256,
    num_layers=layers,
  )
  abstract = hf.abstract_params(cfg)
  rng = np.random.default_rng(0)
  tensors = {}
  for key, (path, transpose) in M.hf_mapping(cfg).items():
    leaf = abstract
    for k in path:
      leaf = leaf[k]
    shape = leaf.shape[::-1] if transpose else leaf.shape
    tensors[key] = rng.standard_normal(shape, dtype=np.float32)
  d.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
  (d / "config.json").write_text(json.dumps(hf.config_to_dict(cfg)))


def measure(d: Path, method: str) -> dict:
  import jax
  import jax.numpy as jnp

  from galore_jax import hf

  jnp.zeros(1).block_until_ready()  # the runtime's own memory is in the baseline
  base, peak, stop = _anon(), [0], [False]

  def watch():
    while not stop[0]:
      peak[0] = max(peak[0], _anon())
      time.sleep(0.002)

  thread = threading.Thread(target=watch)
  thread.start()
  t0 = time.perf_counter()
  if method == "load_file":
    from safetensors.numpy import load_file

    params = {k: jax.device_put(v) for k, v in load_file(str(d / "model.safetensors")).items()}
  else:
    dtype = jnp.bfloat16 if method == "ours-bf16" else jnp.float32
    params = hf.load_pretrained(d, param_dtype=dtype)[1]
  jax.block_until_ready(params)
  seconds = time.perf_counter() - t0
  stop[0] = True
  thread.join()
  mib = lambda n: round(n / 2**20)
  return {
    "method": method,
    "params_mib": mib(sum(x.nbytes for x in jax.tree.leaves(params))),
    "peak_growth_mib": mib(max(peak[0], _anon()) - base),
    "seconds": round(seconds, 1),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dir", default="runs/hf_load_memory")
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--method", default=None, help=argparse.SUPPRESS)  # the child process
  args = p.parse_args(argv)
  d = Path(args.dir)
  if args.method:
    print(json.dumps(measure(d, args.method)))
    return 0
  if not (d / "config.json").is_file():
    write_checkpoint(d, args.hidden, args.layers, args.vocab)
  size = (d / "model.safetensors").stat().st_size / 2**20
  print(f"checkpoint {d}: {size:.0f} MiB")
  for method in ("ours", "ours-bf16", "load_file"):
    out = subprocess.run(
      [sys.executable, __file__, "--dir", str(d), "--method", method],
      check=True,
      capture_output=True,
      text=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    print(
      f"{method:10s} parameters {r['params_mib']:5d} MiB, host memory peak +"
      f"{r['peak_growth_mib']:5d} MiB ({r['peak_growth_mib'] / r['params_mib']:.2f}x), "
      f"{r['seconds']} s"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
