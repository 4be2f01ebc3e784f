"""A LLaMA-style decoder in Flax NNX, sized like the GaLore paper's models.

The paper pretrains LLaMA-style decoders (RMSNorm, SwiGLU, RoPE, no biases,
untied LM head, N(0, 0.02) init) from 60M to 7B parameters. This module
rebuilds that architecture with three constraints that the rest of the
project relies on:

* **Per-layer parameter paths.** GaLore projects only the attention and MLP
  kernels, and the per-layer update path needs one gradient per weight, so
  the blocks are kept unrolled (no ``nnx.scan`` over stacked weights) and the
  module attributes carry the Hugging Face names (``q_proj`` ... ``down_proj``).
  A kernel therefore lives at a path such as
  ``('layers', 0, 'attn', 'q_proj', 'kernel')`` and an optimizer mask can
  select it by name.
* **Hugging Face parity.** RoPE uses the "rotate_half" layout of
  ``transformers``' LLaMA, so a ``LlamaForCausalLM`` state dict loads with a
  plain transpose (torch stores ``(out, in)``, Flax stores ``(in, out)``).
* **Explicit dtypes.** Parameters may be float32 or bfloat16 (the paper trains
  pure bf16); the compute dtype is separate; RMSNorm statistics and the
  logits are always float32 because bf16 there costs accuracy for no memory.

Shape suffixes in variable names: B batch, L sequence length, D hidden size,
F MLP intermediate size, H heads, K head dim, V vocabulary size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from galore_jax.targets import LLAMA_TARGETS as GALORE_TARGETS  # noqa: F401 - re-exported

_REMAT_MODES = ("none", "full", "save_matmuls")
_ATTENTION_IMPLS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of the decoder.

  ``max_seq_len`` bounds the sequence length the model accepts (the RoPE
  positions it is meant for); longer inputs are rejected rather than silently
  extrapolated. ``remat`` trades compute for activation memory per block:
  ``"full"`` recomputes everything in the backward pass, ``"save_matmuls"``
  keeps the outputs of the weight matmuls and recomputes the cheap
  element-wise work and attention. ``attention_impl`` chooses the backend of
  ``jax.nn.dot_product_attention``: ``"auto"`` asks for cuDNN fused attention
  on a GPU with a 16-bit compute dtype (``jax.nn.dot_product_attention`` with
  ``implementation=None`` always uses XLA) and falls back to XLA when cuDNN
  refuses the call.
  """

  vocab_size: int = 32000
  hidden_size: int = 512
  intermediate_size: int = 1376
  num_heads: int = 8
  num_layers: int = 8
  max_seq_len: int = 1024
  rms_eps: float = 1e-6
  rope_base: float = 10000.0
  init_std: float = 0.02
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32
  remat: str = "none"
  attention_impl: str = "auto"
  # Fields a Hugging Face checkpoint can set (``galore_jax.hf``). The defaults are the
  # paper's model, so existing configs, parameter trees and checkpoints are unchanged.
  num_kv_heads: int | None = None  # grouped-query attention: K/V heads; None = num_heads
  tie_embeddings: bool = False  # the LM head reuses the embedding table (no lm_head param)
  # Llama-3 RoPE frequency scaling: (factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings); None = plain RoPE. A tuple, not a dict: the config
  # is a static attribute of the NNX graph and must stay hashable.
  rope_scaling: tuple[float, float, float, int] | None = None
  # Qwen2's attention: q, k and v projections have a bias (o_proj and the MLP do not).
  qkv_bias: bool = False

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
    if self.remat not in _REMAT_MODES:
      raise ValueError(f"unknown remat mode {self.remat!r}; choose from {_REMAT_MODES}")
    if self.attention_impl not in _ATTENTION_IMPLS:
      raise ValueError(
        f"unknown attention_impl {self.attention_impl!r}; choose from {_ATTENTION_IMPLS}"
      )
    if self.num_kv_heads is not None and (
      self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads
    ):
      raise ValueError(
        f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
      )
    if self.rope_scaling is not None and len(self.rope_scaling) != 4:
      raise ValueError(
        "rope_scaling must be (factor, low_freq_factor, high_freq_factor, "
        f"original_max_position_embeddings), got {self.rope_scaling!r}"
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads


def _sized(*, hidden: int, intermediate: int, heads: int, layers: int) -> LlamaConfig:
  return LlamaConfig(
    hidden_size=hidden, intermediate_size=intermediate, num_heads=heads, num_layers=layers
  )


CONFIGS: dict[str, LlamaConfig] = {
  # Not in the paper: a model small enough for CPU tests and smoke runs.
  "llama_tiny": _sized(hidden=256, intermediate=688, heads=4, layers=4),
  # The paper's pretraining sizes (see REFERENCE.md, "Pretraining setup").
  "llama_60m": _sized(hidden=512, intermediate=1376, heads=8, layers=8),
  "llama_130m": _sized(hidden=768, intermediate=2048, heads=12, layers=12),
  "llama_350m": _sized(hidden=1024, intermediate=2736, heads=16, layers=24),
  "llama_1b": _sized(hidden=2048, intermediate=5461, heads=32, layers=24),
  "llama_7b": _sized(hidden=4096, intermediate=11008, heads=32, layers=32),
  # Not in the paper's pretraining table: the LLaMA-13B shape (Touvron et al., 2023), for
  # planning sharded runs (``galore-jax plan --mesh``).
  "llama_13b": _sized(hidden=5120, intermediate=13824, heads=40, layers=40),
}


def get_config(name: str, **overrides: Any) -> LlamaConfig:
  """Returns the named config, with fields replaced by ``overrides``.

  Overrides are how run-time facts reach the model, e.g. ``vocab_size`` from
  the tokenizer or ``param_dtype=jnp.bfloat16`` for pure-bf16 training.
  """
  if name not in CONFIGS:
    raise ValueError(f"unknown model {name!r}; choose from {sorted(CONFIGS)}")
  return dataclasses.replace(CONFIGS[name], **overrides)


# Fields added after checkpoints existed; a checkpoint's record leaves them out at their
# defaults, so an older checkpoint of the same model still matches on resume.
_LATER_FIELDS = {
  "num_kv_heads": None,
  "tie_embeddings": False,
  "rope_scaling": None,
  "qkv_bias": False,
}


def config_record(config: LlamaConfig) -> dict[str, str]:
  """The config as strings, for checkpoint metadata (compared on resume)."""
  return {
    k: str(v)
    for k, v in dataclasses.asdict(config).items()
    if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])
  }


def param_count(config: LlamaConfig) -> int:
  """Number of parameters, computed from the config without building a model.

  Embedding and LM head (untied) are ``V*D`` each; every block has four
  ``D*D`` attention kernels (k and v ``D*KV`` with grouped-query attention),
  three ``D*F`` MLP kernels and two norm scales (plus the q, k, v biases with
  ``qkv_bias``); the final norm adds ``D``.
  """
  d, v = config.hidden_size, config.vocab_size
  per_block = 2 * d  # attn_norm and mlp_norm scales
  if config.qkv_bias:
    per_block += d + 2 * config.kv_heads * config.head_dim
  tables = 1 if config.tie_embeddings else 2
  total = tables * v * d + d + config.num_layers * per_block
  return total + galore_target_count(config)


def galore_target_count(config: LlamaConfig) -> int:
  """Number of parameters in the kernels GaLore projects (``GALORE_TARGETS``)."""
  d, f = config.hidden_size, config.intermediate_size
  kv = config.kv_heads * config.head_dim
  return config.num_layers * (2 * d * d + 2 * d * kv + 3 * d * f)


def _normal_init(config: LlamaConfig):
  return nnx.initializers.normal(stddev=config.init_std)


def _linear(
  in_features: int,
  out_features: int,
  config: LlamaConfig,
  rngs: nnx.Rngs,
  preferred_element_type: Any = None,
  use_bias: bool = False,
) -> nnx.Linear:
  """A projection, bias-free unless asked (Qwen2's q/k/v; the bias starts at zero); Flax
  stores its kernel as (in, out)."""
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=use_bias,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    kernel_init=_normal_init(config),
    preferred_element_type=preferred_element_type,
    rngs=rngs,
  )


def _embedding(config: LlamaConfig, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(
    config.vocab_size,
    config.hidden_size,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    embedding_init=_normal_init(config),
    rngs=rngs,
  )


def _lm_head(config: LlamaConfig, rngs: nnx.Rngs) -> nnx.Linear:
  # Logits in the compute dtype, upcast for the softmax (as Hugging Face's LLaMA does):
  # a float32 dot result would make the head's weight gradient a float32 (D, V) array
  # too, 0.5 GB at 7B, at the peak of a per-layer update step.
  return _linear(config.hidden_size, config.vocab_size, config, rngs)


def embed_lookup(table_VxD: jax.Array, tokens_BxL: jax.Array, dtype: Any) -> jax.Array:
  """Rows of the embedding table for each token, cast to the compute ``dtype``.

  Same values as ``nnx.Embed``; only the backward pass differs. Autodiff of a
  gather scatters the cotangent into a zero table created by a broadcast that
  depends on nothing, so XLA may allocate that (V, D) buffer at the start of
  the backward pass and hold it throughout. Here the zeros are derived from
  the incoming cotangent, so the table-sized gradient exists only once the
  backward pass has reached the embedding: with per-layer updates it is then
  consumed at once.
  """
  vocab, dim = table_VxD.shape
  param_dtype = table_VxD.dtype

  @jax.custom_vjp
  def lookup(table_VxD, tokens_BxL):
    return jnp.take(table_VxD, tokens_BxL, axis=0).astype(dtype)

  def lookup_fwd(table_VxD, tokens_BxL):
    return lookup(table_VxD, tokens_BxL), tokens_BxL

  def lookup_bwd(tokens_BxL, d_BxLxD):
    zero = (jnp.ravel(d_BxLxD)[0] * 0).astype(param_dtype)  # data dependence, not a constant
    rows_NxD = d_BxLxD.reshape(-1, dim).astype(param_dtype)
    grad_VxD = jnp.broadcast_to(zero, (vocab, dim)).at[jnp.ravel(tokens_BxL)].add(rows_NxD)
    return grad_VxD, None

  lookup.defvjp(lookup_fwd, lookup_bwd)
  return lookup(table_VxD, tokens_BxL)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale (initialised to ones).

  The mean of squares is taken in float32 whatever the compute dtype: in
  bf16 the sum over a 4096-wide row loses enough precision to shift the
  normalisation noticeably.
  """

  def __init__(self, dim: int, config: LlamaConfig):
    self.eps = config.rms_eps
    self.dtype = config.dtype
    self.scale = nnx.Param(jnp.ones((dim,), dtype=config.param_dtype))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x32_BxLxD = x_BxLxD.astype(jnp.float32)
    ms_BxLx1 = jnp.mean(jnp.square(x32_BxLxD), axis=-1, keepdims=True)
    y32_BxLxD = x32_BxLxD * jax.lax.rsqrt(ms_BxLx1 + self.eps)
    y32_BxLxD = y32_BxLxD * self.scale[...].astype(jnp.float32)
    return y32_BxLxD.astype(self.dtype)


def llama3_inv_freq(inv_freq_K2: jax.Array, scaling: tuple[float, float, float, int]):
  """Llama-3's RoPE frequency scaling (the ``"llama3"`` rope type of Hugging Face).

  Wavelengths longer than ``original_max / low_freq_factor`` are divided by
  ``factor``, shorter than ``original_max / high_freq_factor`` are kept, and
  the band between is interpolated smoothly. Float32 throughout, as transformers.
  """
  factor, low, high, original_max = scaling
  wavelen_K2 = 2 * math.pi / inv_freq_K2
  low_wavelen, high_wavelen = original_max / low, original_max / high
  scaled_K2 = jnp.where(wavelen_K2 > low_wavelen, inv_freq_K2 / factor, inv_freq_K2)
  smooth_K2 = (original_max / wavelen_K2 - low) / (high - low)
  smoothed_K2 = (1 - smooth_K2) * scaled_K2 / factor + smooth_K2 * scaled_K2
  medium_K2 = ~(wavelen_K2 < high_wavelen) & ~(wavelen_K2 > low_wavelen)
  return jnp.where(medium_K2, smoothed_K2, scaled_K2)


def rope_cos_sin(
  seq_len: int,
  head_dim: int,
  base: float,
  scaling: tuple | None = None,
  start: Any = 0,
  positions: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Rotary tables for positions ``start .. start + seq_len - 1``, each (seq_len, head_dim)
  float32, in the rotate_half layout; a (batch, 1) ``start`` gives each row its own
  positions and (batch, seq_len, head_dim) tables, as do ``positions`` (batch, seq_len), any
  positions (a packed row's: :func:`segment_positions`).

  Frequency ``i`` rotates the pair (i, i + head_dim/2), not the interleaved
  pair (2i, 2i+1): this is how Hugging Face's LLaMA arranges q/k, so its
  weights need no permutation. In training the tables depend only on static shapes, so
  XLA folds them into constants; decoding passes a traced ``start``. ``scaling``: Llama-3
  frequency scaling (:func:`llama3_inv_freq`), or None.
  """
  inv_freq_K2 = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is not None:
    inv_freq_K2 = llama3_inv_freq(inv_freq_K2, scaling)
  pos_L = start + jnp.arange(seq_len, dtype=jnp.float32)  # (seq_len,) or (batch, seq_len)
  if positions is not None:
    pos_L = positions.astype(jnp.float32)
  angle_LxK2 = pos_L[..., None] * inv_freq_K2
  angle_LxK = jnp.concatenate([angle_LxK2, angle_LxK2], axis=-1)
  return jnp.cos(angle_LxK), jnp.sin(angle_LxK)


def apply_rope(x_BxLxHxK: jax.Array, cos_LxK: jax.Array, sin_LxK: jax.Array) -> jax.Array:
  """Rotates q or k by position; computed in float32, returned in x's dtype. The tables are
  (L, K), shared by the batch, or (B, L, K), one set per row (:func:`rope_cos_sin`)."""
  x32_BxLxHxK = x_BxLxHxK.astype(jnp.float32)
  half = x_BxLxHxK.shape[-1] // 2
  x1, x2 = x32_BxLxHxK[..., :half], x32_BxLxHxK[..., half:]
  rotated_BxLxHxK = jnp.concatenate([-x2, x1], axis=-1)
  cos_Lx1xK = cos_LxK[..., None, :]  # broadcasts over the heads (and the batch if shared)
  sin_Lx1xK = sin_LxK[..., None, :]
  out_BxLxHxK = x32_BxLxHxK * cos_Lx1xK + rotated_BxLxHxK * sin_Lx1xK
  return out_BxLxHxK.astype(x_BxLxHxK.dtype)


def _use_cudnn(impl: str, dtype: Any, head_dim: int) -> bool:
  if impl == "cudnn":
    return True
  if impl == "xla":
    return False
  # "auto": cuDNN's fused kernels take fp16/bf16 only and head dims up to 128.
  return (
    jax.default_backend() == "gpu"
    and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    and head_dim % 8 == 0
    and head_dim <= 128
  )


def segment_positions(segments_BxL: jax.Array) -> jax.Array:
  """Each token's position in its segment (0 at the segment's first token), int32 (B, L).

  A packed row holds several examples one after another, numbered by ``segments_BxL``
  (1, 1, 1, 2, 2, 0, 0: two examples, then padding); each example's rotary positions
  start again from 0, as they would in a row of its own."""
  idx_L = jnp.arange(segments_BxL.shape[1], dtype=jnp.int32)
  new_BxL = jnp.concatenate(
    [
      jnp.ones_like(segments_BxL[:, :1], dtype=bool),
      segments_BxL[:, 1:] != segments_BxL[:, :-1],
    ],
    axis=1,
  )
  first_BxL = jax.lax.cummax(jnp.where(new_BxL, idx_L, 0), axis=1)
  return idx_L - first_BxL


def causal_attention(
  q_BxLxHxK: jax.Array,
  k_BxLxHxK: jax.Array,
  v_BxLxHxK: jax.Array,
  impl: str,
  segments_BxL: jax.Array | None = None,
) -> jax.Array:
  """Causal softmax attention through ``jax.nn.dot_product_attention``.

  ``segments_BxL``: a packed batch's segment ids; a query then sees only the earlier keys
  of its own segment (an explicit (B, 1, L, L) mask on top of the causal one; cuDNN takes
  it as an additive bias), so no example attends to another.

  With ``impl="auto"`` a cuDNN call that is rejected while tracing (no cuDNN,
  unsupported shape or dtype) falls back to XLA; ``impl="cudnn"`` lets the
  error through so a user who asked for it learns why.
  """
  mask = None
  if segments_BxL is not None:
    mask = (segments_BxL[:, :, None] == segments_BxL[:, None, :])[:, None]
  if _use_cudnn(impl, q_BxLxHxK.dtype, q_BxLxHxK.shape[-1]):
    try:
      return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask, is_causal=True, implementation="cudnn"
      )
    except (ValueError, RuntimeError, NotImplementedError, TypeError):
      if impl == "cudnn":
        raise
  return jax.nn.dot_product_attention(
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask, is_causal=True, implementation="xla"
  )


class KVCache(NamedTuple):
  """One layer's keys and values (after RoPE) for every position decoded so far, each
  (batch, max_len, kv_heads, head_dim) in the compute dtype."""

  keys: jax.Array
  values: jax.Array


class Attention(nnx.Module):
  """Multi-head causal self-attention with RoPE.

  q/k/v are separate (D, D) kernels rather than one fused (D, 3D) kernel:
  GaLore's projector is chosen per matrix, and a fused matrix would share one
  subspace across q, k and v (and change which side gets projected). With
  grouped-query attention (``num_kv_heads`` < ``num_heads``) k and v are
  (D, KV * K) and each K/V head serves ``num_heads / num_kv_heads`` query heads
  (``jax.nn.dot_product_attention`` broadcasts the groups itself).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d = config.hidden_size
    kv_dim = config.kv_heads * config.head_dim
    self.num_heads = config.num_heads
    self.num_kv_heads = config.kv_heads
    self.head_dim = config.head_dim
    self.rope_base = config.rope_base
    self.rope_scaling = config.rope_scaling
    self.impl = config.attention_impl
    bias = config.qkv_bias
    self.q_proj = _linear(d, d, config, rngs, use_bias=bias)
    self.k_proj = _linear(d, kv_dim, config, rngs, use_bias=bias)
    self.v_proj = _linear(d, kv_dim, config, rngs, use_bias=bias)
    self.o_proj = _linear(d, d, config, rngs)

  def __call__(self, x_BxLxD: jax.Array, segments_BxL: jax.Array | None = None) -> jax.Array:
    """``segments_BxL``: a packed batch's segment ids (see :func:`causal_attention`)."""
    b, seq_len, d = x_BxLxD.shape
    h, k, g = self.num_heads, self.head_dim, self.num_kv_heads
    q_BxLxHxK = self.q_proj(x_BxLxD).reshape(b, seq_len, h, k)
    k_BxLxHxK = self.k_proj(x_BxLxD).reshape(b, seq_len, g, k)
    v_BxLxHxK = self.v_proj(x_BxLxD).reshape(b, seq_len, g, k)
    positions = None if segments_BxL is None else segment_positions(segments_BxL)
    cos_LxK, sin_LxK = rope_cos_sin(
      seq_len, k, self.rope_base, self.rope_scaling, positions=positions
    )
    q_BxLxHxK = apply_rope(q_BxLxHxK, cos_LxK, sin_LxK)
    k_BxLxHxK = apply_rope(k_BxLxHxK, cos_LxK, sin_LxK)
    out_BxLxHxK = causal_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, self.impl, segments_BxL)
    return self.o_proj(out_BxLxHxK.reshape(b, seq_len, d))

  def decode(
    self, x_BxTxD: jax.Array, cache: KVCache, pos_B: jax.Array
  ) -> tuple[jax.Array, KVCache]:
    """Attention of T new tokens, row b's at positions ``pos_B[b] .. pos_B[b] + T - 1``, over
    themselves and the cached keys / values before them; their own keys / values are written
    to the cache.

    Row b's cache from ``pos_B[b] + T`` on is masked out, so whatever it holds is never read.
    """
    b, t, d = x_BxTxD.shape
    h, k, g = self.num_heads, self.head_dim, self.num_kv_heads
    q_BxTxHxK = self.q_proj(x_BxTxD).reshape(b, t, h, k)
    k_BxTxGxK = self.k_proj(x_BxTxD).reshape(b, t, g, k)
    v_BxTxGxK = self.v_proj(x_BxTxD).reshape(b, t, g, k)
    start_Bx1 = pos_B[:, None]
    cos_BxTxK, sin_BxTxK = rope_cos_sin(t, k, self.rope_base, self.rope_scaling, start=start_Bx1)
    q_BxTxHxK = apply_rope(q_BxTxHxK, cos_BxTxK, sin_BxTxK)
    k_BxTxGxK = apply_rope(k_BxTxGxK, cos_BxTxK, sin_BxTxK)
    # Each row writes at its own offset (rows of a batch of prompts are at different places).
    write = jax.vmap(
      lambda c_SxGxK, x_TxGxK, p: jax.lax.dynamic_update_slice(c_SxGxK, x_TxGxK, (p, 0, 0))
    )
    keys_BxSxGxK = write(cache.keys, k_BxTxGxK.astype(cache.keys.dtype), pos_B)
    values_BxSxGxK = write(cache.values, v_BxTxGxK.astype(cache.values.dtype), pos_B)
    s = keys_BxSxGxK.shape[1]
    # Row b's query i (position pos_B[b] + i) sees cache rows 0 .. pos_B[b] + i. An explicit
    # mask and XLA's attention whatever attention_impl says: decoding's queries sit at traced
    # offsets into the cache, which a causal flag (aligned at row 0) cannot express.
    seen_BxTxS = jnp.arange(s) <= (start_Bx1 + jnp.arange(t))[:, :, None]
    out_BxTxHxK = jax.nn.dot_product_attention(
      q_BxTxHxK,
      keys_BxSxGxK.astype(q_BxTxHxK.dtype),
      values_BxSxGxK.astype(q_BxTxHxK.dtype),
      mask=seen_BxTxS[:, None],
      implementation="xla",
    )
    out_BxTxD = self.o_proj(out_BxTxHxK.reshape(b, t, d))
    return out_BxTxD, KVCache(keys_BxSxGxK, values_BxSxGxK)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = _linear(d, f, config, rngs)
    self.up_proj = _linear(d, f, config, rngs)
    self.down_proj = _linear(f, d, config, rngs)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    gate_BxLxF = jax.nn.silu(self.gate_proj(x_BxLxD))
    up_BxLxF = self.up_proj(x_BxLxD)
    return self.down_proj(gate_BxLxF * up_BxLxF)


class DecoderBlock(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.hidden_size, config)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, config)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array, segments_BxL: jax.Array | None = None) -> jax.Array:
    return self.mlp_residual(self.attention_residual(x_BxLxD, segments_BxL))

  # The two halves are separate stages of the per-layer train step.
  ATTENTION = ("attn_norm", "attn")
  MLP = ("mlp_norm", "mlp")

  def attention_residual(
    self, x_BxLxD: jax.Array, segments_BxL: jax.Array | None = None
  ) -> jax.Array:
    return x_BxLxD + self.attn(self.attn_norm(x_BxLxD), segments_BxL)

  def mlp_residual(self, x_BxLxD: jax.Array) -> jax.Array:
    return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))

  def decode(self, x_BxTxD: jax.Array, cache: KVCache, pos_B: jax.Array):
    """The block on T new tokens, attending through ``cache`` (see :meth:`Attention.decode`)."""
    attended_BxTxD, cache = self.attn.decode(self.attn_norm(x_BxTxD), cache, pos_B)
    return self.mlp_residual(x_BxTxD + attended_BxTxD), cache


def checkpointed(fn, remat: str):
  """``fn`` wrapped in ``jax.checkpoint`` as the ``remat`` mode asks ("none": unchanged)."""
  if remat == "none":
    return fn
  if remat == "full":
    policy = None
  else:  # "save_matmuls"
    # Weight matmuls are (B, L, D) x (D, F) dot_generals without batch dims
    # and are saved; attention's score / value products have batch dims and
    # are recomputed together with the element-wise work.
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return jax.checkpoint(fn, policy=policy)


def _block_runner(remat: str):
  """Returns ``run(block, x)``, wrapped in ``jax.checkpoint`` as ``remat`` asks.

  The checkpointed function takes the block's parameters as an explicit
  pytree (split / merge) instead of closing over the module: a block's forward
  pass mutates nothing, and this keeps remat usable when the model itself is
  captured by an outer ``jax.jit`` / ``jax.make_jaxpr`` rather than passed
  through ``nnx.jit``.
  """
  if remat == "none":
    return lambda block, x_BxLxD, segments_BxL=None: block(x_BxLxD, segments_BxL)

  def run(block: DecoderBlock, x_BxLxD: jax.Array, segments_BxL=None) -> jax.Array:
    graphdef, state = nnx.split(block)

    def apply(state, x_BxLxD, segments_BxL):
      return nnx.merge(graphdef, state)(x_BxLxD, segments_BxL)

    return checkpointed(apply, remat)(state, x_BxLxD, segments_BxL)

  return run


class Llama(nnx.Module):
  """The decoder: embed -> blocks -> final norm -> LM head (untied unless ``tie_embeddings``).

  Blocks are an unrolled ``nnx.List`` so each layer has its own parameter
  path and gradient; compile time grows with depth, which is acceptable at
  the paper's sizes (<= 32 layers).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = _embedding(config, rngs)
    self.layers = nnx.List([DecoderBlock(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, config)
    if not config.tie_embeddings:
      self.lm_head = _lm_head(config, rngs)

  def __call__(self, tokens_BxL: jax.Array, segments_BxL: jax.Array | None = None) -> jax.Array:
    """Maps int tokens (B, L) to float32 next-token logits (B, L, V).

    ``segments_BxL``: for a packed batch, each token's example within its row (1, 2, ...;
    0 for padding). Each example then sees only itself, from rotary position 0: its logits
    are those of the example alone in a row (up to float rounding)."""
    cfg = self.config
    seq_len = tokens_BxL.shape[1]
    if seq_len > cfg.max_seq_len:
      raise ValueError(f"seq_len {seq_len} exceeds max_seq_len {cfg.max_seq_len}")
    if segments_BxL is not None and segments_BxL.shape != tokens_BxL.shape:
      raise ValueError(f"segments {segments_BxL.shape} do not match tokens {tokens_BxL.shape}")
    run_block = _block_runner(cfg.remat)
    x_BxLxD = embed_lookup(self.embed.embedding[...], tokens_BxL, cfg.dtype)
    for block in self.layers:
      x_BxLxD = run_block(block, x_BxLxD, segments_BxL)
    return self.head(x_BxLxD)

  def init_cache(self, batch: int, max_len: int) -> list[KVCache]:
    """Empty key / value caches for :meth:`decode`, one per layer."""
    cfg = self.config
    if max_len > cfg.max_seq_len:
      raise ValueError(f"max_len {max_len} exceeds max_seq_len {cfg.max_seq_len}")
    shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
    return [KVCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in self.layers]

  def decode(
    self,
    tokens_BxT: jax.Array,
    caches: list[KVCache],
    pos: jax.Array,
    *,
    logits_at: jax.Array | None = None,
  ) -> tuple[jax.Array, list[KVCache]]:
    """Float32 logits (B, T, V) of T tokens placed at positions ``pos .. pos + T - 1``, and
    the caches with their keys / values added: the same logits as :meth:`__call__` on the
    whole sequence so far, at the cost of the new tokens only. A prompt goes in at
    ``pos = 0`` (prefill), then one token per call. ``pos`` is one position for the batch
    or one per row (B,): rows of a batch of prompts move on from different lengths.
    ``pos + T`` must not exceed the caches' length (``dynamic_update_slice`` would clamp the
    write, not fail).

    ``logits_at`` (B,): only the logits of token ``logits_at[b]`` of each row, (B, V); a
    prefill needs just the last prompt token's, not a (B, T, V) float32 array.
    """
    b = tokens_BxT.shape[0]
    pos_B = jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (b,))
    x_BxTxD = embed_lookup(self.embed.embedding[...], tokens_BxT, self.config.dtype)
    new_caches = []
    for block, cache in zip(self.layers, caches, strict=True):
      x_BxTxD, cache = block.decode(x_BxTxD, cache, pos_B)
      new_caches.append(cache)
    if logits_at is not None:
      x_Bx1xD = jnp.take_along_axis(x_BxTxD, logits_at[:, None, None], axis=1)
      return self.head(x_Bx1xD)[:, 0], new_caches
    return self.head(x_BxTxD), new_caches

  def layerwise_stages(self):
    """The model as :class:`galore_jax.layerwise.Stages` for per-layer updates: the embedding,
    the attention half and the MLP half of each decoder block, final norm + LM head."""
    from galore_jax import layerwise  # imports this module

    if self.config.tie_embeddings:
      raise ValueError("a tied embedding is used by two stages: per-layer updates need untied")
    stage = layerwise.Stage
    blocks = [
      [
        stage(
          lambda b, x, segments: b.attention_residual(x, segments),
          DecoderBlock.ATTENTION,
          ("layers", i),
          takes_segments=True,
        ),
        stage(lambda b, x: b.mlp_residual(x), DecoderBlock.MLP, ("layers", i)),
      ]
      for i in range(len(self.layers))
    ]
    return layerwise.Stages(
      embed=stage(lambda m, t: embed_lookup(m.embed.embedding[...], t, m.config.dtype), ("embed",)),
      blocks=blocks,
      head=stage(lambda m, x: m.head(x), ("final_norm", "lm_head")),
    )

  def head(self, x_BxLxD: jax.Array) -> jax.Array:
    """Final norm and LM head: last hidden states (B, L, D) -> float32 logits (B, L, V)."""
    h_BxLxD = self.final_norm(x_BxLxD)
    if self.config.tie_embeddings:  # logits = h @ E^T, in the compute dtype like the untied head
      table_VxD = self.embed.embedding[...].astype(self.config.dtype)
      return jnp.einsum("bld,vd->blv", h_BxLxD, table_VxD).astype(jnp.float32)
    return self.lm_head(h_BxLxD).astype(jnp.float32)


def init_params(config: LlamaConfig, seed: int = 0, shardings: Any = None) -> dict:
  """Freshly initialised parameters of ``Llama(config)``, as its pure dict.

  Built one part at a time (embedding, each block, final norm, LM head), each
  part from its own key ``fold_in(key(seed), part index)``. One ``jax.jit`` of
  the whole model's constructor is one XLA program holding a random generator
  per weight; its compile time grows with depth, and on a GPU it took minutes at
  llama_1b. Every block has the same shapes, so one compiled block initialiser
  serves all layers and compile time no longer depends on depth. The values
  differ from ``Llama(config, rngs=nnx.Rngs(seed))`` (other keys), not the
  distribution.

  ``shardings``: a pytree of shardings shaped like the result (the trainer's
  parameter shardings); each part is created directly in its sharding.
  """
  root = jax.random.key(seed)

  def jitted(make, sharding):
    def init(key):
      return nnx.to_pure_dict(nnx.state(make(nnx.Rngs(key)), nnx.Param))

    return jax.jit(init, out_shardings=sharding)

  sh = shardings or {}
  get = lambda *path: _subtree(sh, path)
  params: dict = {}
  params["embed"] = jitted(lambda r: _embedding(config, r), get("embed"))(
    jax.random.fold_in(root, 0)
  )
  block_sharding = get("layers", 0)
  block_init = jitted(lambda r: DecoderBlock(config, rngs=r), block_sharding)
  layers = {}
  for i in range(config.num_layers):
    if get("layers", i) != block_sharding:
      raise ValueError(f"layer {i} is sharded unlike layer 0; init_params needs them alike")
    layers[i] = block_init(jax.random.fold_in(root, 1 + i))
  params["layers"] = layers
  params["final_norm"] = jitted(lambda r: RMSNorm(config.hidden_size, config), get("final_norm"))(
    jax.random.fold_in(root, 1 + config.num_layers)
  )
  if not config.tie_embeddings:
    params["lm_head"] = jitted(lambda r: _lm_head(config, r), get("lm_head"))(
      jax.random.fold_in(root, 2 + config.num_layers)
    )
  return params


def _subtree(tree: Any, path: tuple[Any, ...]) -> Any:
  for key in path:
    if not tree:
      return None
    tree = tree[key]
  return tree


# --------------------------------------------------------------------------
# Hugging Face weights.


def hf_mapping(config: LlamaConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
  """HF state-dict key -> (our parameter path, whether to transpose)."""
  mapping: dict[str, tuple[tuple[Any, ...], bool]] = {
    "model.embed_tokens.weight": (("embed", "embedding"), False),
    "model.norm.weight": (("final_norm", "scale"), False),
  }
  if not config.tie_embeddings:
    mapping["lm_head.weight"] = (("lm_head", "kernel"), True)
  for i in range(config.num_layers):
    hf = f"model.layers.{i}"
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      mapping[f"{hf}.self_attn.{name}.weight"] = (("layers", i, "attn", name, "kernel"), True)
    if config.qkv_bias:
      for name in ("q_proj", "k_proj", "v_proj"):
        mapping[f"{hf}.self_attn.{name}.bias"] = (("layers", i, "attn", name, "bias"), False)
    for name in ("gate_proj", "up_proj", "down_proj"):
      mapping[f"{hf}.mlp.{name}.weight"] = (("layers", i, "mlp", name, "kernel"), True)
    mapping[f"{hf}.input_layernorm.weight"] = (("layers", i, "attn_norm", "scale"), False)
    mapping[f"{hf}.post_attention_layernorm.weight"] = (("layers", i, "mlp_norm", "scale"), False)
  return mapping


def _get_variable(model: Llama, path: tuple[Any, ...]) -> nnx.Variable:
  node: Any = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def _abbrev(keys: list[str], limit: int = 8) -> str:
  return f"{keys[:limit]}{f' ... ({len(keys)} in all)' if len(keys) > limit else ''}"


def load_hf_weights(model: Llama, state_dict: Mapping[str, np.ndarray]) -> None:
  """Copies a Hugging Face ``LlamaForCausalLM`` state dict into ``model`` in place.

  Linear weights are transposed from torch's (out, in) to Flax's (in, out);
  RoPE needs no permutation because both sides use the rotate_half layout.
  Everything is checked before anything is written, so a failed load leaves
  the model untouched. Rotary ``inv_freq`` buffers are ignored (they are
  recomputed); any other unknown key is an error, since it means the two
  architectures differ (bias terms, more layers, ...).
  """
  mapping = hf_mapping(model.config)
  missing = sorted(k for k in mapping if k not in state_dict)
  if missing:
    hint = ""
    if "lm_head.weight" in missing:
      hint = " (a tied-embedding checkpoint has no lm_head.weight; this model is untied)"
    raise ValueError(f"missing keys in state dict{hint}: {_abbrev(missing)}")
  # A tied model's state dict also lists the shared table as lm_head.weight.
  tied_alias = "lm_head.weight" if model.config.tie_embeddings else None
  unexpected = sorted(
    k
    for k in state_dict
    if k not in mapping and not k.endswith("rotary_emb.inv_freq") and k != tied_alias
  )
  if unexpected:
    raise ValueError(f"unexpected keys in state dict: {_abbrev(unexpected)}")

  updates: list[tuple[nnx.Variable, jax.Array]] = []
  for hf_key, (path, transpose) in mapping.items():
    value = np.asarray(state_dict[hf_key])
    if transpose:
      value = value.T
    variable = _get_variable(model, path)
    current = variable[...]
    if value.shape != current.shape:
      raise ValueError(
        f"shape mismatch for {hf_key} -> {'.'.join(map(str, path))}: "
        f"got {tuple(value.shape)}{' after transpose' if transpose else ''}, "
        f"model has {tuple(current.shape)}"
      )
    updates.append((variable, jnp.asarray(value, dtype=current.dtype)))
  for variable, value in updates:
    variable[...] = value
