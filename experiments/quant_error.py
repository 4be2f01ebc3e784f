"""Quantisation error of the block-wise 8-bit Adam moments (galore_jax.adam8bit).

Feeds one gradient stream to 8-bit Adam and to the float32 path of the same
transform (``min_8bit_size`` above the leaf size) and prints, at a few steps:

  1shot m/v  ||deq(quant(x)) - x|| / ||x||  for the float32 moments x (one rounding)
  drift m/v  ||deq(x8) - x32|| / ||x32||     8-bit state vs float32 state after t steps
  bias v     mean(deq(v8)) / mean(v32) - 1
  upd cos    cosine(u8, u32);   upd rel ||u8 - u32|| / ||u32||;   max|u8|, max|u32|
  v0         fraction of elements whose stored v is 0 while the float32 v is not

Gradient streams, shape 256 x 1024 (1024 blocks of 256):
  iid        (N(0, 1) + 0.1) * s,  s fixed per element, log s ~ N(0, 1)
  decaying   same, times exp(-r t) with r ~ U(0, 0.02) per element, so relative
             magnitudes inside a block drift, as in a run that is converging.

Variants: rounding="bitsandbytes" (bitsandbytes' rounding), rounding="nonzero"
(the default), and the default plus stochastic rounding of v.

Usage: python experiments/quant_error.py [--steps 300] [--block-size 256]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from galore_jax import adam8bit as a8

SHAPE = (256, 1024)
VARIANTS = {
  "bitsandbytes": dict(rounding="bitsandbytes"),
  "nonzero": dict(rounding="nonzero"),
  "nonzero+SR(v)": dict(rounding="nonzero", stochastic_rounding=True),
}


def _rel(a, b):
  return jnp.linalg.norm(a - b) / jnp.linalg.norm(b)


def run(stream: str, variant: str, steps: int, block_size: int, report_at) -> None:
  k_scale, k_rate, k_stream = jax.random.split(jax.random.key(0), 3)
  scale = jnp.exp(jax.random.normal(k_scale, SHAPE))
  rate = jax.random.uniform(k_rate, SHAPE, maxval=0.02) if stream == "decaying" else 0.0
  opt8 = a8.scale_by_adam8bit(block_size=block_size, **VARIANTS[variant])
  opt32 = a8.scale_by_adam8bit(min_8bit_size=10**12)

  @jax.jit
  def step(t, s8, s32):
    g = (jax.random.normal(jax.random.fold_in(k_stream, t), SHAPE) + 0.1) * scale
    g = g * jnp.exp(-rate * t)
    u8, s8 = opt8.update(g, s8)
    u32, s32 = opt32.update(g, s32)
    return s8, s32, u8, u32

  @jax.jit
  def metrics(s8, s32, u8, u32):
    m8, v8 = a8.dequantize(s8.mu, SHAPE), a8.dequantize(s8.nu, SHAPE)
    m32, v32 = s32.mu, s32.nu
    qm = a8.quantize(m32, signed=True, block_size=block_size)
    qv = a8.quantize(v32, signed=False, block_size=block_size)
    return {
      "1shot m": _rel(a8.dequantize(qm, SHAPE), m32),
      "1shot v": _rel(a8.dequantize(qv, SHAPE), v32),
      "drift m": _rel(m8, m32),
      "drift v": _rel(v8, v32),
      "bias v": jnp.mean(v8) / jnp.mean(v32) - 1.0,
      "upd cos": jnp.vdot(u8, u32) / (jnp.linalg.norm(u8) * jnp.linalg.norm(u32)),
      "upd rel": _rel(u8, u32),
      "max|u8|": jnp.max(jnp.abs(u8)),
      "max|u32|": jnp.max(jnp.abs(u32)),
      "v0": jnp.mean((v8 == 0) & (v32 > 0)),
    }

  s8, s32 = opt8.init(jnp.zeros(SHAPE)), opt32.init(jnp.zeros(SHAPE))
  print(f"\n[{stream}] {variant}, block_size={block_size}")
  header = None
  for t in range(1, steps + 1):
    s8, s32, u8, u32 = step(t, s8, s32)
    if t in report_at:
      row = {k: float(v) for k, v in metrics(s8, s32, u8, u32).items()}
      if header is None:
        header = "step " + " ".join(f"{k:>8}" for k in row)
        print(header)
      print(
        f"{t:4d} " + " ".join(f"{v:8.4f}" if k != "v0" else f"{v:8.1e}" for k, v in row.items())
      )


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--block-size", type=int, default=256)
  ap.add_argument("--streams", default="iid,decaying")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  args = ap.parse_args()
  report_at = {t for t in (1, 10, 100, 300, 1000) if t <= args.steps} | {args.steps}
  for stream in args.streams.split(","):
    for variant in args.variants.split(","):
      run(stream, variant, args.steps, args.block_size, report_at)


if __name__ == "__main__":
  main()
