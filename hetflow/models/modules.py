"""Flax modules of the three families, cut at the seams a strategy needs.

A decoder block is two halves with separate parameter trees, so a strategy can
fetch, place or recompute each on its own (DESIGN.md, seam 1):

  layers/<i>/attn   AttentionHalf: norm, q/k/v/o projections, KV cache write
  layers/<i>/mlp    DenseFFNHalf (Llama gated FFN, OPT fc1/fc2) or MoEFFNHalf

plus `embed` (tokens, OPT's learned positions and project_in) and `head` (final
norm, OPT's project_out, LM head). Every parameter is one named leaf: paths
such as `layers/3/mlp/up` are stable and are what checkpoints map to. Kernels
are stored [in, out], so FFN neuron i is column i of `gate`/`up` and row i of
`down`. Shape letters: see hetflow/models/layers.py.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hetflow.models import layers
from hetflow.models.config import ModelConfig

_init = nn.initializers.normal(stddev=0.02)
OPT_POSITION_OFFSET = 2  # OPT's learned positions start at row 2 (HF quirk).


def uses_rms_norm(config: ModelConfig) -> bool:
  return config.arch in ("llama", "mixtral")


def _norm_params(module: nn.Module, config: ModelConfig, prefix: str = "norm"):
  """Creates a norm's leaves and returns a function applying it."""
  d = config.hidden_size
  scale = module.param(prefix, nn.initializers.ones, (d,), module.dtype)
  if uses_rms_norm(config):
    return lambda x: layers.rms_norm(x, scale, config.norm_eps)
  bias = module.param(prefix + "_bias", nn.initializers.zeros, (d,), module.dtype)
  return lambda x: layers.layer_norm(x, scale, bias, config.norm_eps)


def _residual(config: ModelConfig, norm, sublayer, x):
  """Pre-LN: x + f(norm(x)); OPT post-LN (OPT-350m): norm(x + f(x))."""
  if config.do_layer_norm_before:
    return x + sublayer(norm(x))
  return norm(x + sublayer(x))


class AttentionHalf(nn.Module):
  """Norm + multi-head attention (RoPE for Llama/Mixtral) + residual.

  Call: (x [B, T, D], (k_cache, v_cache) [B, S, G, K] each, cache_index scalar,
  positions [B, T], kv_mask [B, S]) -> (x [B, T, D], updated cache).
  """

  config: ModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cache, cache_index, positions, kv_mask):
    c = self.config
    d, h, g, k = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    bias = c.attention_bias or c.arch == "opt"

    def proj(name, n_in, n_out):
      w = self.param(name, _init, (n_in, n_out), self.dtype)
      b = (self.param(name + "_bias", nn.initializers.zeros, (n_out,), self.dtype)
           if bias else None)
      return lambda y: layers.linear(y, w, b)

    q_proj, k_proj = proj("q", d, h * k), proj("k", d, g * k)
    v_proj, o_proj = proj("v", d, g * k), proj("o", h * k, d)
    norm = _norm_params(self, c)
    new_cache = []

    def attend(y):
      b_, t = y.shape[:2]
      q = q_proj(y).reshape(b_, t, h, k) * (k ** -0.5)
      key = k_proj(y).reshape(b_, t, g, k)
      val = v_proj(y).reshape(b_, t, g, k)
      if c.arch != "opt":
        inv_freq = layers.rope_inv_freq(c)
        q = layers.apply_rope(q, positions, inv_freq)
        key = layers.apply_rope(key, positions, inv_freq)
      k_cache = layers.write_cache(cache[0], key, cache_index)
      v_cache = layers.write_cache(cache[1], val, cache_index)
      new_cache.append((k_cache, v_cache))
      out = layers.attention(q, k_cache, v_cache, cache_index, kv_mask,
                             c.sliding_window)
      return o_proj(out.reshape(b_, t, h * k))

    x = _residual(c, norm, attend, x)
    return x, new_cache[0]


class DenseFFNHalf(nn.Module):
  """Norm + FFN + residual: Llama's gated FFN, or OPT's fc1 -> act -> fc2.

  OPT's fc1/fc2 are stored as `up`/`down` so that every dense FFN has neurons
  in the same places (column i of up/gate, row i of down).
  """

  config: ModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    d, f = c.hidden_size, c.intermediate_size
    gated = c.arch != "opt"
    bias = c.mlp_bias or c.arch == "opt"
    norm = _norm_params(self, c)
    w = {}
    for name, shape in (("gate", (d, f)), ("up", (d, f)), ("down", (f, d))):
      if name == "gate" and not gated:
        continue
      w[name] = self.param(name, _init, shape, self.dtype)
      if bias:
        w[name + "_bias"] = self.param(
            name + "_bias", nn.initializers.zeros, shape[1:], self.dtype)
    return _residual(c, norm, lambda y: dense_ffn(c, w, y), x)


def dense_ffn(config: ModelConfig, w: dict[str, Any], h):
  """The FFN of DenseFFNHalf on normalised input h [B, T, D] (no residual)."""
  if "gate" in w:
    return layers.gated_ffn(h, w["gate"], w["up"], w["down"], config.hidden_act,
                            w.get("gate_bias"), w.get("up_bias"),
                            w.get("down_bias"))
  act = layers.activation(config.hidden_act)
  return layers.linear(act(layers.linear(h, w["up"], w.get("up_bias"))),
                       w["down"], w.get("down_bias"))


class MoEFFNHalf(nn.Module):
  """Mixtral: norm + top-k routed mixture of gated-FFN experts + residual.

  Computes every expert and weights the unselected ones by zero: exact, and
  simple, at the cost of X/k times the FLOPs (fine for tests and prefill of
  small models; strategies that care stream only the selected experts).
  """

  config: ModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    d, f, n = c.hidden_size, c.intermediate_size, c.num_experts
    norm = _norm_params(self, c)
    w = {
        "router": self.param("router", _init, (d, n), self.dtype),
        "gate": self.param("gate", _init, (n, d, f), self.dtype),
        "up": self.param("up", _init, (n, d, f), self.dtype),
        "down": self.param("down", _init, (n, f, d), self.dtype),
    }
    return _residual(c, norm, lambda y: moe_ffn(c, w, y), x)


def route(config: ModelConfig, router, h):
  """Top-k routing as HF Mixtral: softmax in f32, top-k, renormalise.

  Returns combine weights [B, T, X] (zero for experts not selected).
  """
  logits = layers.linear(h, router).astype(jnp.float32)  # [B, T, X]
  probs = jax.nn.softmax(logits, axis=-1)
  top_vals, top_idx = jax.lax.top_k(probs, config.experts_per_token)
  top_vals = top_vals / jnp.sum(top_vals, axis=-1, keepdims=True)
  one_hot = jax.nn.one_hot(top_idx, config.num_experts, dtype=jnp.float32)
  return jnp.einsum("BTk,BTkX->BTX", top_vals, one_hot)


def moe_ffn(config: ModelConfig, w: dict[str, Any], h):
  """The mixture of MoEFFNHalf on normalised input h [B, T, D]."""
  combine = route(config, w["router"], h).astype(h.dtype)  # [B, T, X]
  act = layers.activation(config.hidden_act)
  g = act(jnp.einsum("BTD,XDF->BTXF", h, w["gate"]))
  u = jnp.einsum("BTD,XDF->BTXF", h, w["up"])
  if config.hidden_act == "drelu":
    u = jax.nn.relu(u)
  out = jnp.einsum("BTXF,XFD->BTXD", g * u, w["down"])
  return jnp.einsum("BTXD,BTX->BTD", out, combine)


class Embed(nn.Module):
  """Token embedding; OPT adds learned positions and project_in."""

  config: ModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, positions):
    c = self.config
    tokens = self.param("tokens", _init, (c.vocab_size, c.embed_dim), self.dtype)
    x = jnp.take(tokens, ids, axis=0)  # [B, T, E]
    if c.arch != "opt":
      return x
    if c.embed_dim != c.hidden_size:
      x = layers.linear(x, self.param("project_in", _init,
                                      (c.embed_dim, c.hidden_size), self.dtype))
    table = self.param("positions", _init, (
        c.max_position_embeddings + OPT_POSITION_OFFSET, c.hidden_size), self.dtype)
    return x + jnp.take(table, positions + OPT_POSITION_OFFSET, axis=0)


class Head(nn.Module):
  """Final norm, OPT's project_out, and the LM head (tied or not).

  Call: (x [B, T, D], embed_tokens [V, E] or None) -> logits [B, T, V] in f32.
  The embedding table is an argument, not a parameter, so tied models do not
  hold it twice.
  """

  config: ModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, embed_tokens=None):
    c = self.config
    if c.final_layer_norm:
      x = _norm_params(self, c)(x)
    if c.arch == "opt" and c.embed_dim != c.hidden_size:
      x = layers.linear(x, self.param("project_out", _init,
                                      (c.hidden_size, c.embed_dim), self.dtype))
    if c.tie_word_embeddings:
      logits = jnp.einsum("BTE,VE->BTV", x, embed_tokens)
    else:
      logits = layers.linear(x, self.param("lm_head", _init,
                                           (c.embed_dim, c.vocab_size), self.dtype))
    return logits.astype(jnp.float32)
