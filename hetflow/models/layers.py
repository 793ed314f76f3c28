"""Numerical building blocks shared by every architecture, as pure functions.

Shape legend (used in every einsum and `# [..]` comment of hetflow.models):
  B batch, T new tokens, S cache slots, D model width, E embedding width (OPT),
  F FFN width, H query heads, G key/value heads, R = H // G queries per group,
  K head width, V vocabulary, X experts (Mixtral).

They are pure so that a strategy can recompute part of a block its own way
(neuron-cluster computes only some FFN neurons; tensor-split splits a matmul)
with exactly the numerics of the model.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from hetflow.models import formats
from hetflow.models.config import ModelConfig

# Finite instead of -inf so that a fully masked row (a padding query) gives a
# harmless uniform softmax rather than NaNs that could leak through a matmul.
_MASK_VALUE = -1e30


def rms_norm(x, scale, eps):
  """Llama's RMSNorm, computed in float32 as HF does."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return scale * x.astype(dtype)


def layer_norm(x, scale, bias, eps):
  """OPT's LayerNorm (elementwise affine), computed in float32."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  x = (x - mean) * jax.lax.rsqrt(var + eps)
  out = x.astype(dtype)
  if scale is not None:
    out = out * scale
  if bias is not None:
    out = out + bias
  return out


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The FFN nonlinearity by its HF name ("drelu" uses relu on both halves)."""
  if name in ("relu", "drelu"):
    return jax.nn.relu
  if name == "silu":
    return jax.nn.silu
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "gelu_new":
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(f"unsupported activation {name!r}")


def linear(x, kernel, bias=None):
  """x @ kernel (+ bias) for a kernel in any weight format.

  A float32 kernel is an array [in, out] (rows are input features); a
  bfloat16/int8/int4 kernel is its dict of stored leaves, computed with the
  fastest formulation measured for its format (hetflow/models/formats.py).
  """
  y = formats.matmul(x, kernel)
  return y if bias is None else y + bias


def rope_inv_freq(config: ModelConfig):
  """Inverse frequencies of RoPE, with HF's linear / Llama-3 scaling."""
  k = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
  scaling = config.rope_scaling_dict
  if not scaling:
    return inv_freq
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind == "linear":
    return inv_freq / scaling["factor"]
  if kind == "llama3":
    factor = scaling["factor"]
    low = scaling["low_freq_factor"]
    high = scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  return inv_freq


def apply_rope(x, positions, inv_freq):
  """Rotates x [B, T, N, K] by positions [B, T] (HF's rotate-half layout)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, K/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def attention(q, k_cache, v_cache, cache_index, kv_mask, sliding_window=None):
  """Causal attention of T new queries over the S slots of a KV cache.

  Args:
    q: [B, T, H, K] queries, already scaled and rotated.
    k_cache, v_cache: [B, S, G, K], the new keys/values already written.
    cache_index: slot of the first new token (scalar int).
    kv_mask: [B, S] bool, slots that hold a real (non-padding) token.
    sliding_window: if set, a query sees only the last `sliding_window` slots.

  Returns:
    [B, T, H, K] attention output.
  """
  b, t, h, kdim = q.shape
  g = k_cache.shape[2]
  q = q.reshape(b, t, g, h // g, kdim)  # [B, T, G, R, K]
  scores = jnp.einsum("BTGRK,BSGK->BGRTS", q, k_cache,
                      preferred_element_type=jnp.float32)
  query_slot = cache_index + jnp.arange(t)[:, None]  # [T, 1]
  key_slot = jnp.arange(k_cache.shape[1])[None, :]  # [1, S]
  visible = key_slot <= query_slot  # [T, S]
  if sliding_window is not None:
    visible &= key_slot > query_slot - sliding_window
  visible = visible[None] & kv_mask[:, None, :]  # [B, T, S]
  scores = jnp.where(visible[:, None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
  out = jnp.einsum("BGRTS,BSGK->BTGRK", probs, v_cache)
  return out.reshape(b, t, h, kdim)


def write_cache(cache, new, cache_index):
  """Writes new [B, T, G, K] into cache [B, S, G, K] at slot cache_index."""
  return jax.lax.dynamic_update_slice(
      cache, new.astype(cache.dtype), (0, cache_index, 0, 0))


Params = dict[str, Any]
