"""Blockwise 8-bit Adam.

Adam whose two moment buffers are stored with 8-bit block-wise dynamic
quantisation, after Dettmers et al., `8-bit Optimizers via Block-wise
Quantization <https://arxiv.org/abs/2110.02861>`_, ICLR 2022. It is written as
an optax transform so it can run on its own (:func:`adamw8bit`) or as the inner
optimizer of a GaLore wrapper on the projected low-rank updates
(:func:`scale_by_adam8bit`), on leaves of any shape, including stacked
``(L, r, n)`` per-layer batches.

Storage format
--------------
A moment tensor ``x`` with ``n`` elements is flattened, zero-padded to
``B * ceil(n / B)`` elements (``B = block_size``) and cut into blocks of ``B``.
Each block keeps one float32 scale ``s = max |x_block|`` and ``B`` one-byte codes
``c`` such that ``x ~= s * Q[c]``, where ``Q`` is a fixed, sorted 256-entry code
map in ``[-1, 1]`` (first moment) or ``[0, 1]`` (second moment, ``v >= 0``).
Quantising picks the nearest entry of ``Q`` to ``x / s`` (its decade and cell
computed arithmetically, then one comparison with the midpoints on either side);
dequantising is a table lookup times ``s``. Codes are stored as ``(num_blocks, B)``
arrays: ``int8`` for the signed map, ``uint8`` for the unsigned one. A large leaf
therefore costs ``2 * B * ceil(n / B)`` code bytes plus ``2 * 4 * ceil(n / B)`` scale
bytes instead of ``8 n`` bytes.

The code maps are the *dynamic* (dynamic-exponent) maps of Dettmers (2016) /
Dettmers et al. (2022): of the 8 bits, a run of leading zeros encodes a decimal
exponent ``10^-e`` (``e = 0..6``), the first one bit is an indicator, and the
bits after it are a linear fraction in ``[0.1, 1]``. Decade ``10^(k-6)``
(``k = 0..6``) therefore holds ``2^k`` linearly spaced values (the centres of
``2^k`` equal bins of ``[0.1, 1]``), mirrored for the sign; the unsigned map
uses the sign bit as one more fraction bit (``2^(k+1)`` values a decade). With
``0`` and ``1`` added both maps have exactly 256 entries. Round-to-nearest
is off by at most 0.70 % (signed) / 0.35 % (unsigned) of the block absmax, and
values down to ~1e-7 of the block absmax stay nonzero.

Choice of block size: 256 by default. Recent bitsandbytes releases run their
blockwise 8-bit optimizer kernels with 256-element blocks (the paper and early
releases used 2048). Smaller blocks isolate outliers better (one large value
only coarsens its own 256 neighbours) at a cost of 8/256 = 3 % extra bytes for
the two float32 scales, i.e. 2.03 bytes per parameter for both moments.

Update rule (per step ``t``, everything in float32 inside the jitted update)::

    m = b1 * deq(m_q) + (1 - b1) * g
    v = b2 * deq(v_q) + (1 - b2) * g^2
    u = sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)     (eps before b.c.)
    u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)       (eps after b.c.)
    m_q, v_q = quant(m), quant(v)

As in bitsandbytes, the direction ``u`` is computed from the fresh float32
moments; only what is carried to the next step is quantised. Leaves with fewer
than ``min_8bit_size`` elements keep plain float32 moments (bitsandbytes'
``min_8bit_size``, 4096 by default).

Rounding. By default (``rounding="nonzero"``) a nonzero value that is nearest
to the code 0 is stored as the smallest code of its sign instead.
bitsandbytes does this only for negative first-moment values and flushes a tiny
second moment to 0; with that rule (``rounding="bitsandbytes"``), a coordinate
whose ``v`` is below ~1.6e-7 of its block maximum gets ``v = 0`` and an update
``m / (sqrt((1 - b2) g^2) + eps)`` at the next step: ~30 times an Adam step, or
``m / eps`` if its gradient is then 0. ``stochastic_rounding=True`` (not in
bitsandbytes) rounds the second moment stochastically; see
:func:`scale_by_adam8bit` for why that helps late in training.
``experiments/quant_error.py`` measures all three.

Note on ``eps``: ``eps_before_bias_correction=True`` (default) is the Hugging
Face ``transformers.AdamW`` / galore-torch ``GaLoreAdamW`` placement. The
bitsandbytes 8-bit kernels (and thus galore-torch's ``GaLoreAdamW8bit``) divide
by ``sqrt(v) + eps * sqrt(1 - b2^t)``, which is algebraically the optax
placement, ``eps_before_bias_correction=False``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_jax import tree as tree_lib

__all__ = [
  "QuantizedArray",
  "STATIC_ARGS",
  "ScaleByAdam8bitState",
  "adamw8bit",
  "dequantize",
  "dynamic_code_map",
  "quantize",
  "scale_by_adam8bit",
  "state_bytes",
]

CHUNK_SIZE = 2**22
"""Default ``chunk_size`` of :func:`scale_by_adam8bit` / :func:`adamw8bit` (elements)."""

STATIC_ARGS = ("block_size", "min_8bit_size", "seed", "chunk_size", "rows_sharding")
"""Arguments of :func:`scale_by_adam8bit` / :func:`adamw8bit` that fix the state's layout or the
compiled program, so ``optax.inject_hyperparams`` must leave them Python values:
``optax.inject_hyperparams(adamw8bit, static_args=galore_jax.ADAM8BIT_STATIC_ARGS)``."""

_NUM_DECADES = 7  # exponents 10^-6 ... 10^0


@functools.cache
def _dynamic_map_np(signed: bool) -> np.ndarray:
  values = [0.0, 1.0]
  for k in range(_NUM_DECADES):
    n_bins = 2**k if signed else 2 ** (k + 1)
    edges = np.linspace(0.1, 1.0, n_bins + 1)
    centres = 0.5 * (edges[:-1] + edges[1:]) * 10.0 ** (k - (_NUM_DECADES - 1))
    values.extend(centres.tolist())
    if signed:
      values.extend((-centres).tolist())
  code = np.sort(np.asarray(values, dtype=np.float64)).astype(np.float32)
  if code.size != 256 or np.unique(code).size != 256:
    raise AssertionError("dynamic code map must have 256 distinct entries")
  return code


def dynamic_code_map(signed: bool) -> np.ndarray:
  """The sorted 256-entry dynamic-exponent code map (float32 numpy array).

  Signed: 127 negative values, 0, 127 positive values, and 1 (so the largest
  negative magnitude is ~0.993). Unsigned: 0, 254 positive values, and 1.

  Args:
      signed: whether to build the signed map (first moment) or the unsigned map
          (second moment).

  Returns:
      A read-only copy of the sorted code map.
  """
  out = _dynamic_map_np(bool(signed)).copy()
  out.setflags(write=False)
  return out


# Signed codes are stored as int8 (index - 128), unsigned as uint8 (index); the
# storage dtype is what tells `dequantize` which map a code array refers to.
_SIGNED_OFFSET = 128
_ROUNDINGS = ("nonzero", "bitsandbytes")


class QuantizedArray(NamedTuple):
  """A block-wise 8-bit quantised tensor; a plain pytree of two arrays.

  Attributes:
      codes: ``(num_blocks, block_size)`` one-byte indices into the dynamic code
          map. ``int8`` (index - 128) means the signed map, ``uint8`` the unsigned
          map. The flattened tensor is zero-padded to ``num_blocks * block_size``.
      scales: ``(num_blocks,)`` float32 absolute maximum of each block.

  Nothing else is stored: the block size is ``codes.shape[-1]``, the map is
  given by ``codes.dtype`` and the logical shape comes from the caller (for the
  optimizer, the shape of the incoming update), so the state has the same
  structure for every leaf and survives ``jax.tree.map``, ``jit``,
  ``jax.eval_shape`` and checkpointing. Blocks run over the flattened tensor,
  so the codes can be sharded along the block axis, not along the param's
  own axes.
  """

  codes: jax.Array
  scales: jax.Array


def _num_blocks(size: int, block_size: int) -> int:
  return max(1, -(-size // block_size))


def _code_bin(a: jax.Array, *, signed: bool) -> tuple[jax.Array, jax.Array]:
  """Where ``a = |y|`` (float32, in [0, 1]) falls in the code map, by arithmetic.

  Returns ``(p, upper)``: ``p`` is the index of the positive code whose bin (the
  linspace cell of its decade) holds ``a``, and ``upper`` says whether ``a`` lies at or
  above that code. Its decade ``k`` (0..6) is the number of the thresholds
  ``10^-6 ... 10^-1`` that ``a`` reaches (compares, no logarithm); decade ``k`` has ``n``
  codes (``2^k`` signed, ``2^(k+1)`` unsigned) starting at index ``127 + n`` (signed) or
  ``n - 1`` (unsigned), and ``a`` lies in its cell ``floor((a / 10^(k-6) - 0.1) n / 0.9)``,
  one multiply-add with per-decade constants. ``p`` is within one of the nearest code:
  the midpoint between two decades lies inside the upper decade's first cell, and
  float32 rounding can move a value across a cell edge (a value just under a decade's
  threshold gives cell ``n`` of the decade below: the same index). That is what
  :func:`_count_below`'s correction needs.
  """
  k = sum((a >= np.float32(10.0**d)).astype(jnp.int32) for d in range(1 - _NUM_DECADES, 0))
  decades = np.arange(_NUM_DECADES)
  n = 2.0**decades if signed else 2.0 ** (decades + 1)
  slope = jnp.asarray((10.0 ** (_NUM_DECADES - 1 - decades) * n / 0.9).astype(np.float32))
  offset = jnp.asarray((0.1 * n / 0.9).astype(np.float32))
  t = a * jnp.take(slope, k, mode="clip") - jnp.take(offset, k, mode="clip")
  cell = jnp.floor(t)
  first = jnp.asarray((n + 127.0 if signed else n - 1.0).astype(np.float32))
  p = jnp.clip(jnp.take(first, k, mode="clip") + cell, 127.0 if signed else 0.0, 255.0)
  return p.astype(jnp.int32), t - cell >= 0.5


def _count_below(
  table: np.ndarray, y: jax.Array, guess: jax.Array, *, inclusive: bool, rounds: int
) -> jax.Array:
  """Number of entries of the sorted ``table`` that are < y (<= y), given a ``guess``
  within ``rounds`` of it.

  Each round compares ``y`` with the two entries next to the guess and moves it one
  place towards the count: 2 independent table lookups a round, where a binary search
  over 255 entries needs 8 dependent ones. On this project's 2-core CPU, quantising 4M
  values to the signed map takes 13.3 ms this way against 18.5 ms by binary search, with
  identical codes.
  """
  below = jnp.less_equal if inclusive else jnp.less
  size = table.shape[0]
  table = jnp.asarray(table)
  count = jnp.clip(guess, 0, size)
  for _ in range(rounds):
    # count > c iff table[c] is below y; count < c iff table[c - 1] is not
    up = (count < size) & below(jnp.take(table, count, mode="clip"), y)
    down = (count > 0) & ~below(jnp.take(table, count - 1, mode="clip"), y)
    count = count + up.astype(jnp.int32) - down.astype(jnp.int32)
  return count


def _search(y: jax.Array, *, signed: bool, midpoints: bool) -> jax.Array:
  """The code map's search for float32 ``y``: the number of midpoints between codes below
  ``y`` (the nearest code's index) if ``midpoints``, else the number of codes ``<= y``
  among the first 255 (one more than the index of the code just below ``y``)."""
  code = _dynamic_map_np(bool(signed))
  # The map is symmetric bar its last entry (code[i] = -code[254 - i]), so a negative
  # y's counts mirror those of |y|: 254 - p midpoints, 255 - p codes below it.
  # (The unsigned map has no negative codes: a negative y counts nothing below it.)
  p, upper = _code_bin(jnp.abs(y) if signed else jnp.maximum(y, 0.0), signed=signed)
  negative = (y < 0) if signed else jnp.zeros(y.shape, bool)
  if midpoints:
    guess = jnp.where(negative, 254 - p, p)
    return _count_below(0.5 * (code[:-1] + code[1:]), y, guess, inclusive=False, rounds=1)
  above = p + upper.astype(jnp.int32)  # codes <= |y|
  guess = jnp.where(negative, 255 - above, above)
  return _count_below(code[:-1], y, guess, inclusive=True, rounds=1)


def quantize(
  x: jax.Array,
  *,
  signed: bool,
  block_size: int,
  rounding: str = "nonzero",
  key: jax.Array | None = None,
) -> QuantizedArray:
  """Block-wise dynamic 8-bit quantisation of ``x`` (any shape).

  Each block of ``block_size`` consecutive elements of ``x.ravel()`` is divided
  by its absmax and rounded to the nearest entry of the dynamic code map, with
  one exception for values that are nonzero but nearest to the code 0:

  * ``rounding="nonzero"`` (default): they go to the smallest code of their
    own sign instead, so no nonzero value is stored as 0 or with a flipped
    sign. For the second moment this matters: a ``v`` stored as 0 next to a
    nonzero ``m`` gives an update ``m / (sqrt((1 - b2) g^2) + eps)``, up to
    ``1 / sqrt(1 - b2) ~ 32`` times an Adam step, and ``m / eps`` when ``g = 0``.
  * ``rounding="bitsandbytes"``: as the bitsandbytes 8-bit optimizer kernels
    do it: only a negative value of the signed map is moved (to the smallest
    negative code, so the stored first moment keeps its sign); positive values
    and the unsigned map use plain round-to-nearest.

  Either way the value moves by less than 1e-6 of the block absmax.

  With a PRNG ``key`` the rounding is stochastic instead: a value between two
  adjacent codes ``q_lo <= y < q_hi`` (``y = x / absmax``) becomes ``q_hi`` with
  probability ``(y - q_lo) / (q_hi - q_lo)``, so ``E[dequantize(quantize(x))] = x``
  (the ``rounding`` rule for values next to 0 still applies afterwards).

  Args:
      x: array to quantise; computed in float32.
      signed: signed map (values of either sign) or unsigned map (``x >= 0``;
          negative inputs are rounded to 0).
      block_size: number of elements sharing one absmax scale.
      rounding: ``"nonzero"`` or ``"bitsandbytes"``, see above.
      key: optional PRNG key; if given, round stochastically.

  Returns:
      A :class:`QuantizedArray`.
  """
  if block_size <= 0:
    raise ValueError(f"block_size must be positive, got {block_size}")
  if rounding not in _ROUNDINGS:
    raise ValueError(f"rounding must be one of {_ROUNDINGS}, got {rounding!r}")
  flat = jnp.ravel(x).astype(jnp.float32)
  nb = _num_blocks(flat.size, block_size)
  blocks = jnp.pad(flat, (0, nb * block_size - flat.size)).reshape(nb, block_size)
  return _quantize_blocks(blocks, signed=signed, rounding=rounding, key=key)


def _quantize_blocks(
  blocks: jax.Array, *, signed: bool, rounding: str, key: jax.Array | None
) -> QuantizedArray:
  """:func:`quantize` of a float32 ``(num_blocks, block_size)`` array, one scale per row."""
  code = _dynamic_map_np(bool(signed))
  scales = jnp.max(jnp.abs(blocks), axis=1)
  safe = jnp.where(scales > 0, scales, 1.0)
  normed = blocks / safe[:, None]
  if key is None:  # nearest code = number of midpoints below y
    idx = _search(normed, signed=signed, midpoints=True)
  else:  # bracket code[lo] <= y < code[lo + 1], then round up with prob. (y - q_lo) / gap
    table = jnp.asarray(code)
    lo = jnp.clip(_search(normed, signed=signed, midpoints=False) - 1, 0, 254)
    q_lo, q_hi = table[lo], table[lo + 1]
    prob = jnp.clip((normed - q_lo) / (q_hi - q_lo), 0.0, 1.0)
    idx = lo + (jax.random.uniform(key, normed.shape) < prob).astype(lo.dtype)
  idx = jnp.where(jnp.isnan(normed), 0, idx)  # as a search finding nothing below NaN
  zero = int(np.flatnonzero(code == 0.0)[0])
  if signed:
    idx = jnp.where((normed < 0) & (idx == zero), zero - 1, idx)
  if rounding == "nonzero":
    idx = jnp.where((normed > 0) & (idx == zero), zero + 1, idx)
  if signed:
    codes = (idx - _SIGNED_OFFSET).astype(jnp.int8)
  else:
    codes = idx.astype(jnp.uint8)
  return QuantizedArray(codes=codes, scales=scales)


def dequantize(q: QuantizedArray, shape) -> jax.Array:
  """Inverse of :func:`quantize`: float32 array of the given shape."""
  shape = tuple(int(d) for d in shape)
  size = math.prod(shape)
  nb, block_size = q.codes.shape
  if _num_blocks(size, block_size) != nb:
    raise ValueError(f"shape {shape} does not match {nb} blocks of {block_size} codes")
  values = _dequantize_blocks(q)
  return values.reshape(-1)[:size].reshape(shape)


def _dequantize_blocks(q: QuantizedArray) -> jax.Array:
  """Float32 ``(num_blocks, block_size)`` values of ``q``."""
  signed = bool(jnp.dtype(q.codes.dtype) == jnp.int8)
  code = jnp.asarray(_dynamic_map_np(signed))
  idx = q.codes.astype(jnp.int32)
  if signed:
    idx = idx + _SIGNED_OFFSET
  return jnp.take(code, idx, axis=0) * q.scales[:, None]


def _chunk_rows(num_rows: int, target: int) -> int:
  """Rows per chunk: ``target``, or a divisor of ``num_rows`` near it so no remainder is left."""
  if num_rows <= target:
    return num_rows
  for rows in range(target, target // 2, -1):
    if num_rows % rows == 0:
      return rows
  return target


def _update_rows_in_place(fn, arrays, rows_per_chunk: int):
  """Applies ``fn(chunk_index, *row_slices) -> new_slices`` to chunks of rows, in place.

  ``fn`` returns arrays of the shapes and dtypes of its inputs; each chunk's
  result is written back over the rows it was computed from (a ``fori_loop``
  carrying the inputs, ``dynamic_update_slice``), so the loop allocates one
  chunk's temporaries and no second copy of any input: the update overwrites
  the gradient's rows and the new codes the old ones. A single call, when
  everything fits in one chunk.
  """
  num_rows = arrays[0].shape[0]
  if num_rows <= rows_per_chunk:
    return fn(None, *arrays)

  def apply(index, start, rows, carry):
    parts = [jax.lax.dynamic_slice_in_dim(a, start, rows) for a in carry]
    new = fn(index, *parts)
    return tuple(
      jax.lax.dynamic_update_slice_in_dim(a, n.astype(a.dtype), start, 0)
      for a, n in zip(carry, new, strict=True)
    )

  chunks, rest = divmod(num_rows, rows_per_chunk)
  carry = jax.lax.fori_loop(
    0,
    chunks,
    lambda c, carry: apply(c, c * rows_per_chunk, rows_per_chunk, carry),
    tuple(arrays),
  )
  if rest:
    carry = apply(jnp.asarray(chunks), chunks * rows_per_chunk, rest, carry)
  return carry


def _zeros_quantized(size: int, *, signed: bool, block_size: int):
  nb = _num_blocks(size, block_size)
  if signed:
    zero = int(np.flatnonzero(_dynamic_map_np(True) == 0.0)[0])
    codes = jnp.full((nb, block_size), zero - _SIGNED_OFFSET, jnp.int8)
  else:
    codes = jnp.zeros((nb, block_size), jnp.uint8)
  return QuantizedArray(codes=codes, scales=jnp.zeros((nb,), jnp.float32))


def _adam_moments(g32, m_prev, v_prev, *, c1, c2, b1, b2, eps, eps_first):
  """Adam's new moments and update (without learning rate) from float32 values;
  ``c1``, ``c2`` are the bias corrections ``1 - b^t``; ``eps_first``: ``eps`` before them."""
  m = b1 * m_prev + (1.0 - b1) * g32
  v = b2 * v_prev + (1.0 - b2) * jnp.square(g32)
  if eps_first:
    u = (jnp.sqrt(c2) / c1) * m / (jnp.sqrt(v) + eps)
  else:
    u = (m / c1) / (jnp.sqrt(v / c2) + eps)
  return u, m, v


def _rows_update(arrays, c1, c2, v_key, *, b1, b2, eps, eps_first, rounding, out_dtype):
  """One chunk of a quantised leaf's step: ``arrays`` = its gradient rows
  ``(rows, block_size)`` and the stored moments' codes and scales of those rows ->
  the update rows (``out_dtype``) and the new codes and scales."""
  g_rows, m_codes, m_scales, v_codes, v_scales = arrays
  # Padding rows are zeros in g and in both stored moments, so they stay 0.
  u, m, v = _adam_moments(
    g_rows.astype(jnp.float32),
    _dequantize_blocks(QuantizedArray(m_codes, m_scales)),
    _dequantize_blocks(QuantizedArray(v_codes, v_scales)),
    c1=c1,
    c2=c2,
    b1=b1,
    b2=b2,
    eps=eps,
    eps_first=eps_first,
  )
  m_new = _quantize_blocks(m, signed=True, rounding=rounding, key=None)
  v_new = _quantize_blocks(v, signed=False, rounding=rounding, key=v_key)
  return u.astype(out_dtype), *m_new, *v_new


# The same, as a jitted function at module level, so that JAX's trace cache (keyed by the
# function, the argument shapes and the static hyperparameters) serves every leaf and
# chunk of one shape: a model's layers repeat a few shapes, and tracing and lowering this
# quantiser once per leaf was about a third of the time to trace the llama_7b 8-bit step.
# A nested jit is inlined by XLA, so the compiled program is the same.
_rows_update_jit = jax.jit(
  _rows_update, static_argnames=("b1", "b2", "eps", "eps_first", "rounding", "out_dtype")
)


class ScaleByAdam8bitState(NamedTuple):
  """State of :func:`scale_by_adam8bit`.

  ``mu`` / ``nu`` mirror the params tree, except that each leaf with at least
  ``min_8bit_size`` elements is replaced by a :class:`QuantizedArray`
  (``int8`` codes for ``mu``, ``uint8`` for ``nu``); smaller leaves hold float32
  arrays of the param's shape.
  """

  count: jax.Array  # int32 step counter
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam8bit(
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  block_size: int = 256,
  min_8bit_size: int = 4096,
  eps_before_bias_correction: bool = True,
  rounding: str = "nonzero",
  stochastic_rounding: bool = False,
  seed: int = 0,
  chunk_size: int | None = CHUNK_SIZE,
  rows_sharding: Callable | None = None,
) -> optax.GradientTransformation:
  r"""Adam preconditioning with block-wise 8-bit moment storage.

  With :math:`\hat{m}, \hat{v}` the dequantised stored moments and
  :math:`c_1 = 1 - \beta_1^t`, :math:`c_2 = 1 - \beta_2^t`:

  .. math::
      m_t = \beta_1 \hat{m}_{t-1} + (1 - \beta_1) g_t, \quad
      v_t = \beta_2 \hat{v}_{t-1} + (1 - \beta_2) g_t^2

  and the returned update (without learning rate or sign) is
  :math:`\frac{\sqrt{c_2}}{c_1} \frac{m_t}{\sqrt{v_t} + \epsilon}` if
  ``eps_before_bias_correction`` (Hugging Face / galore-torch placement) or
  :math:`\frac{m_t / c_1}{\sqrt{v_t / c_2} + \epsilon}` otherwise (optax and
  bitsandbytes placement). :math:`m_t, v_t` are then stored with block-wise
  dynamic 8-bit quantisation (see the module docstring).

  Args:
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: term added to the denominator.
      block_size: elements per quantisation block (one float32 absmax each).
      min_8bit_size: leaves with fewer elements keep float32 moments.
      eps_before_bias_correction: where ``eps`` goes; see above.
      rounding: how values nearest to the code 0 are stored, see :func:`quantize`.
          ``"bitsandbytes"`` reproduces bitsandbytes' rounding exactly; the
          default ``"nonzero"`` never stores a positive ``v`` as 0, which keeps
          rare coordinates with tiny ``v`` from taking ``~1/sqrt(1-b2)`` times
          oversized steps.
      stochastic_rounding: round the second moment stochastically (unbiased)
          instead of to the nearest code. Not in bitsandbytes. With nearest
          rounding and ``b2 = 0.999`` a step changes ``v`` by ~0.1 %, less than
          half a code gap (0.35 % of the block absmax at the top of the map),
          so a ``v`` that should decay relative to its block's largest entry
          stays put; the stale, too-large ``v`` shortens steps late in
          training. Stochastic rounding removes that bias at the cost of
          rounding noise. The first moment always rounds to nearest.
      seed: seed of the stochastic rounding; the key of a step is derived
          from it, the step count and the leaf's position (and, in a chunked
          leaf, the chunk's index).
      chunk_size: a quantised leaf with more elements than this is updated in
          chunks of about this many elements, one after another (a
          ``fori_loop`` that writes each chunk's result over its input rows),
          so the float32 moments and the quantiser's temporaries (~18 bytes
          per element) exist for one chunk, not the whole leaf: for a
          32000 x 4096 embedding that is ~75 MB instead of 2.4 GB. ``None``
          updates every leaf in one piece (fastest when memory is plentiful).
          The result does not depend on it (except the stochastic-rounding
          stream). Under FSDP (state sharded over the block rows) pass ``None``:
          each chunk is a dynamic slice of the sharded row axis, for which XLA
          all-gathers the leaf's whole code arrays; unchunked, every device
          updates its own rows (already ``1/fsdp`` of the leaf).
      rows_sharding: ``shape -> jax.sharding.Sharding`` or None. If given, a
          quantised leaf's gradient and update are constrained to the sharding
          it returns for their shape, and the gradient's ``(num_blocks,
          block_size)`` rows to the one it returns for theirs, which should be
          the codes' sharding: the reshaping between the two layouts then
          moves the gradient (an all-to-all) rather than leaving XLA to pick
          (it may gather the loss's logits to produce the LM head's gradient in
          row layout). The trainer passes its FSDP rule
          (:func:`galore_jax.config.adam8bit_layout`).

  Returns:
      An ``optax.GradientTransformation``. Updates keep the dtype of the incoming
      updates; all arithmetic is float32.

  References:
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.

      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, ICLR 2015.
  """
  if block_size <= 0:
    raise ValueError(f"block_size must be positive, got {block_size}")
  if rounding not in _ROUNDINGS:
    raise ValueError(f"rounding must be one of {_ROUNDINGS}, got {rounding!r}")

  def is_8bit(size: int) -> bool:
    return size >= min_8bit_size

  def init_fn(params):
    def init_leaf(p, signed):
      if is_8bit(p.size):
        return _zeros_quantized(p.size, signed=signed, block_size=block_size)
      return jnp.zeros(p.shape, jnp.float32)

    return ScaleByAdam8bitState(
      count=jnp.zeros([], jnp.int32),
      mu=jax.tree.map(functools.partial(init_leaf, signed=True), params),
      nu=jax.tree.map(functools.partial(init_leaf, signed=False), params),
    )

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    step_key = jax.random.fold_in(jax.random.key(seed), count) if stochastic_rounding else None
    t = count.astype(jnp.float32)
    c1 = 1.0 - jnp.asarray(b1, jnp.float32) ** t
    c2 = 1.0 - jnp.asarray(b2, jnp.float32) ** t

    is_masked = lambda x: isinstance(x, optax.MaskedNode)

    moments = functools.partial(
      _adam_moments, c1=c1, c2=c2, b1=b1, b2=b2, eps=eps, eps_first=eps_before_bias_correction
    )
    # Python-number hyperparameters (the usual case; not ones injected as arrays) make the
    # per-chunk update a cached jitted call: traced and lowered once per chunk shape, not
    # once per leaf (see _rows_update).
    cached = all(isinstance(x, (int, float)) for x in (b1, b2, eps))
    rows_update = _rows_update_jit if cached else _rows_update

    def quantized_leaf(i, g, m_stored, v_stored):
      num_rows = m_stored.codes.shape[0]
      if rows_sharding is not None:
        g = jax.lax.with_sharding_constraint(g, rows_sharding(g.shape))
      flat = jnp.ravel(g)
      g_rows = jnp.pad(flat, (0, num_rows * block_size - flat.size)).reshape(num_rows, block_size)
      if rows_sharding is not None:
        g_rows = jax.lax.with_sharding_constraint(g_rows, rows_sharding(g_rows.shape))
      leaf_key = jax.random.fold_in(step_key, i) if stochastic_rounding else None

      def rows(chunk, g_rows, m_codes, m_scales, v_codes, v_scales):
        v_key = leaf_key
        if v_key is not None and chunk is not None:
          v_key = jax.random.fold_in(v_key, chunk)
        return rows_update(
          (g_rows, m_codes, m_scales, v_codes, v_scales),
          c1,
          c2,
          v_key,
          b1=b1,
          b2=b2,
          eps=eps,
          eps_first=eps_before_bias_correction,
          rounding=rounding,
          out_dtype=jnp.dtype(g.dtype),
        )

      target = num_rows if chunk_size is None else max(1, chunk_size // block_size)
      u_rows, m_codes, m_scales, v_codes, v_scales = _update_rows_in_place(
        rows,
        (g_rows, m_stored.codes, m_stored.scales, v_stored.codes, v_stored.scales),
        _chunk_rows(num_rows, target),
      )
      u = u_rows.reshape(-1)[: g.size].reshape(g.shape)
      if rows_sharding is not None:
        u = jax.lax.with_sharding_constraint(u, rows_sharding(u.shape))
      return u, QuantizedArray(m_codes, m_scales), QuantizedArray(v_codes, v_scales)

    def leaf(i, g, m_stored, v_stored):
      if is_masked(g):
        return g, m_stored, v_stored
      if is_8bit(g.size):
        return quantized_leaf(i, g, m_stored, v_stored)
      u, m, v = moments(g.astype(jnp.float32), m_stored, v_stored)
      return u.astype(g.dtype), m, v

    # MaskedNode placeholders (updates of part of a tree) count as leaves so a
    # leaf's index, and with it its rounding key, does not depend on the part.
    treedef = jax.tree.structure(updates, is_leaf=is_masked)
    outs = [
      leaf(i, g, m, v)
      for i, (g, m, v) in enumerate(
        zip(
          treedef.flatten_up_to(updates),
          treedef.flatten_up_to(state.mu),
          treedef.flatten_up_to(state.nu),
          strict=True,
        )
      )
    ]
    new_updates = treedef.unflatten([o[0] for o in outs])
    mu = treedef.unflatten([o[1] for o in outs])
    nu = treedef.unflatten([o[2] for o in outs])
    return new_updates, ScaleByAdam8bitState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def adamw8bit(
  learning_rate: optax.ScalarOrSchedule,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  mask: Any | None = None,
  block_size: int = 256,
  min_8bit_size: int = 4096,
  eps_before_bias_correction: bool = True,
  rounding: str = "nonzero",
  stochastic_rounding: bool = False,
  seed: int = 0,
  chunk_size: int | None = CHUNK_SIZE,
  rows_sharding: Callable | None = None,
) -> optax.GradientTransformation:
  """AdamW with block-wise 8-bit moments (Dettmers et al., 2022).

  ``chain(scale_by_adam8bit(...), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``: decoupled weight decay as in
  ``optax.adamw``. See :func:`scale_by_adam8bit` for the other arguments.

  Args:
      learning_rate: a fixed learning rate or a schedule.
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: term added to the denominator.
      weight_decay: decoupled weight decay coefficient.
      mask: pytree (or callable returning one) of booleans selecting the leaves
          weight decay applies to, as in ``optax.adamw``.
      block_size: elements per quantisation block.
      min_8bit_size: leaves with fewer elements keep float32 moments.
      eps_before_bias_correction: ``eps`` placement, see
          :func:`scale_by_adam8bit`.
      rounding: ``"nonzero"`` or ``"bitsandbytes"``, see :func:`quantize`.
      stochastic_rounding: stochastic rounding of the second moment, see
          :func:`scale_by_adam8bit`.
      seed: seed of the stochastic rounding.
      chunk_size: update large leaves in chunks, see :func:`scale_by_adam8bit`.
      rows_sharding: sharding of a quantised leaf's update, see
          :func:`scale_by_adam8bit`.

  Returns:
      An ``optax.GradientTransformation``.
  """
  return optax.chain(
    scale_by_adam8bit(
      b1=b1,
      b2=b2,
      eps=eps,
      block_size=block_size,
      min_8bit_size=min_8bit_size,
      eps_before_bias_correction=eps_before_bias_correction,
      rounding=rounding,
      stochastic_rounding=stochastic_rounding,
      seed=seed,
      chunk_size=chunk_size,
      rows_sharding=rows_sharding,
    ),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )


def state_bytes(state) -> int:
  """Bytes held by the array leaves of ``state`` (works on ``eval_shape``)."""
  return tree_lib.tree_bytes(state)
