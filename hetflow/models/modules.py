"""Flax modules of the three families, cut at the seams a strategy needs.

A decoder block is two halves with separate parameter trees, so a strategy can
fetch, place or recompute each on its own (docs/architecture.md, the model seam):

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

from hetflow.models import formats, layers
from hetflow.models.config import ModelConfig

_init = nn.initializers.normal(stddev=0.02)
OPT_POSITION_OFFSET = 2  # OPT's learned positions start at row 2 (HF quirk).


def uses_rms_norm(config: ModelConfig) -> bool:
  return config.arch in ("llama", "mixtral")


def _norm_leaves(module: nn.Module, config: ModelConfig, prefix: str = "norm") -> dict:
  """Declares a norm's leaves (scale, and bias for LayerNorm) on `module`."""
  d = config.hidden_size
  w = {prefix: module.param(prefix, nn.initializers.ones, (d,), module.dtype)}
  if not uses_rms_norm(config):
    w[prefix + "_bias"] = module.param(prefix + "_bias", nn.initializers.zeros, (d,),
                                       module.dtype)
  return w


def _residual(config: ModelConfig, norm, sublayer, x):
  """Pre-LN: x + f(norm(x)); OPT post-LN (OPT-350m): norm(x + f(x))."""
  if config.do_layer_norm_before:
    return x + sublayer(norm(x))
  return norm(x + sublayer(x))


def _norm(config: ModelConfig, w, prefix: str = "norm"):
  """The norm whose leaves are w[prefix] (and w[prefix + "_bias"] for OPT)."""
  if uses_rms_norm(config):
    return lambda x: layers.rms_norm(x, w[prefix], config.norm_eps)
  return lambda x: layers.layer_norm(x, w[prefix], w.get(prefix + "_bias"), config.norm_eps)


def attention_half(config: ModelConfig, w, x, cache, cache_index, positions, kv_mask,
                   linear=layers.linear):
  """AttentionHalf as a pure function of its leaves `w`.

  `linear(y, w, name)` computes projection `name` ("q", "k", "v", "o") with its
  bias; strategies pass their own (tensor-split splits each matmul).
  Returns (x [B, T, D], (k_cache, v_cache)).
  """
  c = config
  h, g, k = c.num_heads, c.num_kv_heads, c.head_dim
  new_cache = []

  def attend(y):
    b, t = y.shape[:2]
    q = linear(y, w, "q").reshape(b, t, h, k) * (k ** -0.5)
    key = linear(y, w, "k").reshape(b, t, g, k)
    val = linear(y, w, "v").reshape(b, t, g, k)
    if c.arch != "opt":
      inv_freq = layers.rope_inv_freq(c)
      q = layers.apply_rope(q, positions, inv_freq)
      key = layers.apply_rope(key, positions, inv_freq)
    k_cache = layers.write_cache(cache[0], key, cache_index)
    v_cache = layers.write_cache(cache[1], val, cache_index)
    new_cache.append((k_cache, v_cache))
    out = layers.attention(q, k_cache, v_cache, cache_index, kv_mask, c.sliding_window)
    return linear(out.reshape(b, t, h * k), w, "o")

  x = _residual(c, _norm(c, w), attend, x)
  return x, new_cache[0]


def named_linear(y, w, name):
  """The default `linear` of the pure halves: y @ w[name] + w[name_bias]."""
  return layers.linear(y, w[name], w.get(name + "_bias"))


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
    w = _norm_leaves(self, c)
    for name, n_in, n_out in (("q", d, h * k), ("k", d, g * k), ("v", d, g * k),
                              ("o", h * k, d)):
      w[name] = self.param(name, _init, (n_in, n_out), self.dtype)
      if bias:
        w[name + "_bias"] = self.param(name + "_bias", nn.initializers.zeros, (n_out,),
                                       self.dtype)
    return attention_half(c, w, x, cache, cache_index, positions, kv_mask, named_linear)


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
    w = _norm_leaves(self, c)
    for name, shape in (("gate", (d, f)), ("up", (d, f)), ("down", (f, d))):
      if name == "gate" and not gated:
        continue
      w[name] = self.param(name, _init, shape, self.dtype)
      if bias:
        w[name + "_bias"] = self.param(
            name + "_bias", nn.initializers.zeros, shape[1:], self.dtype)
    return ffn_half(c, w, x)


def ffn_half(config: ModelConfig, w, x, linear=named_linear):
  """DenseFFNHalf or MoEFFNHalf (by config) as a pure function: norm, FFN, residual."""
  core = moe_ffn if config.arch == "mixtral" else dense_ffn
  return _residual(config, _norm(config, w), lambda h: core(config, w, h, linear), x)


def dense_ffn(config: ModelConfig, w: dict[str, Any], h, linear=named_linear):
  """The FFN of DenseFFNHalf on normalised input h [B, T, D] (no residual)."""
  act = layers.activation(config.hidden_act)
  if "gate" not in w:  # OPT: fc1 -> act -> fc2
    return linear(act(linear(h, w, "up")), w, "down")
  u = linear(h, w, "up")
  if config.hidden_act == "drelu":
    u = jax.nn.relu(u)
  return linear(act(linear(h, w, "gate")) * u, w, "down")


class MoEFFNHalf(nn.Module):
  """Mixtral: norm + top-k routed mixture of gated-FFN experts + residual."""

  config: ModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    d, f, n = c.hidden_size, c.intermediate_size, c.num_experts
    w = _norm_leaves(self, c)
    w["router"] = self.param("router", _init, (d, n), self.dtype)
    w["gate"] = self.param("gate", _init, (n, d, f), self.dtype)
    w["up"] = self.param("up", _init, (n, d, f), self.dtype)
    w["down"] = self.param("down", _init, (n, f, d), self.dtype)
    return ffn_half(c, w, x)


def route(config: ModelConfig, router, h):
  """Top-k routing as HF Mixtral: softmax in f32, top-k, renormalise.

  Returns (weights [B, T, k] f32, expert indices [B, T, k]).
  """
  logits = layers.linear(h, router).astype(jnp.float32)  # [B, T, X]
  probs = jax.nn.softmax(logits, axis=-1)
  top_vals, top_idx = jax.lax.top_k(probs, config.experts_per_token)
  return top_vals / jnp.sum(top_vals, axis=-1, keepdims=True), top_idx


def combine_weights(config: ModelConfig, router, h):
  """Routing as dense combine weights [B, T, X] f32 (zero for unselected experts)."""
  return _dense_combine(config, *route(config, router, h))


def _dense_combine(config: ModelConfig, weights, idx):
  one_hot = jax.nn.one_hot(idx, config.num_experts, dtype=jnp.float32)  # [B, T, k, X]
  return jnp.einsum("BTk,BTkX->BTX", weights, one_hot)


def moe_ffn(config: ModelConfig, w: dict[str, Any], h, linear=None):
  """The mixture of MoEFFNHalf on normalised input h [B, T, D].

  Few tokens (decode): gather the selected experts' kernels, so a step reads
  k experts' bytes instead of all X. Many tokens (prefill): compute every
  expert and weight the unselected ones by zero, which is cheaper than a
  gather per token once most experts are hit anyway. Expert kernels are 3-D,
  so `linear` does not apply; it is accepted for a uniform signature.
  """
  del linear
  weights, idx = route(config, w["router"], h)
  act = layers.activation(config.hidden_act)
  # Quantized experts are dequantized after the gather (only k experts' bytes).
  expert = lambda kernel: formats.dequantize(kernel, h.dtype)
  if gathers_experts(config, idx.shape):
    return routed_experts(config, h, weights, idx, w["gate"], w["up"], w["down"])
  combine = _dense_combine(config, weights, idx).astype(h.dtype)  # [B, T, X]
  g = act(jnp.einsum("BTD,XDF->BTXF", h, expert(w["gate"])))
  u = jnp.einsum("BTD,XDF->BTXF", h, expert(w["up"]))
  if config.hidden_act == "drelu":
    u = jax.nn.relu(u)
  out = jnp.einsum("BTXF,XFD->BTXD", g * u, expert(w["down"]))
  return jnp.einsum("BTXD,BTX->BTD", out, combine)


def gathers_experts(config: ModelConfig, idx_shape) -> bool:
  """Whether moe_ffn gathers the selected experts (few tokens) rather than computing all."""
  b, t, k = idx_shape
  return b * t * k < config.num_experts


def routed_experts(config: ModelConfig, h, weights, idx, gate, up, down):
  """moe_ffn's few-tokens branch: the selected experts only, combined by `weights`.

  `gate`/`up` [N, D, F] and `down` [N, F, D] are any stack of experts (arrays, or
  a weight format's leaves, hetflow/models/formats.py) and `idx` [B, T, k] indexes
  into it. Each selected expert is taken out of the stack on its own and handed to
  `expert_mixture`, which an expert-offloading strategy calls directly with the
  kernels its cache holds, so both run the same arithmetic (docs/architecture.md,
  the invariant). Quantized experts stay in their stored format after the take
  (only k experts' bytes) and `expert_mixture` computes them with the format's
  matrix-vector kernels.
  """
  b, t, k = idx.shape
  take = lambda m, i: jax.tree.map(lambda a: a[i], m)
  kernels = [tuple(take(m, idx[r, s, j]) for m in (gate, up, down))
             for r in range(b) for s in range(t) for j in range(k)]
  return expert_mixture(config, h, weights, kernels)


def expert_mixture(config: ModelConfig, h, weights, kernels):
  """The selected experts of each token on h [B, T, D], combined by `weights` [B, T, k].

  `kernels` lists (gate [D, F], up [D, F], down [F, D]) per token and choice, in
  the order of `weights` flattened ([B, T, k] row-major); a kernel is an array or
  a weight format's leaves (one expert's, no stack axis), computed in its stored
  format by `formats.matmul` (the native matrix-vector kernels on CPU). One
  matrix-vector product per kernel, with no gather into a [B, T, k, D, F] stack:
  a stack copies every selected kernel (measured 0.7 GB/s against 16.5 GB/s for
  the products on a mixtral-1b layer, notes of issue 14).
  """
  b, t, k = weights.shape
  outs = [expert_output(config, h[n // (t * k), (n // k) % t][None], *kernel)
          for n, kernel in enumerate(kernels)]
  return combine_expert_outputs(outs, weights)


def expert_output(config: ModelConfig, x, gate, up, down):
  """One expert on one token's normalised input x [1, D] -> [1, D] (`expert_mixture`'s
  product per choice; an offloading strategy may run it where the expert lies)."""
  act = layers.activation(config.hidden_act)
  mm = lambda x, w: formats.matmul(x, w) if isinstance(w, dict) else x @ w
  u = mm(x, up)
  if config.hidden_act == "drelu":
    u = jax.nn.relu(u)
  return mm(act(mm(x, gate)) * u, down)


def combine_expert_outputs(outs, weights):
  """`expert_output`s in [B, T, k] row-major order, combined by `weights` [B, T, k]."""
  b, t, k = weights.shape
  out = jnp.stack(outs).reshape(b, t, k, -1)  # [B, T, k, D]
  return jnp.einsum("BTkD,BTk->BTD", out, weights.astype(out.dtype))


class Embed(nn.Module):
  """Token embedding; OPT adds learned positions and project_in."""

  config: ModelConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, positions):
    c = self.config
    w = {"tokens": self.param("tokens", _init, (c.vocab_size, c.embed_dim), self.dtype)}
    if c.arch == "opt":
      if c.embed_dim != c.hidden_size:
        w["project_in"] = self.param("project_in", _init, (c.embed_dim, c.hidden_size),
                                     self.dtype)
      w["positions"] = self.param("positions", _init, (
          c.max_position_embeddings + OPT_POSITION_OFFSET, c.hidden_size), self.dtype)
    return embed(c, w, ids, positions)


def embed(config: ModelConfig, w, ids, positions):
  """Embed as a pure function of its leaves `w`: ids [B, T] -> x [B, T, D]."""
  x = jnp.take(w["tokens"], ids, axis=0)  # [B, T, E]
  if config.arch != "opt":
    return x
  if "project_in" in w:
    x = layers.linear(x, w["project_in"])
  return x + jnp.take(w["positions"], positions + OPT_POSITION_OFFSET, axis=0)


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
    w = _norm_leaves(self, c) if c.final_layer_norm else {}
    if c.arch == "opt" and c.embed_dim != c.hidden_size:
      w["project_out"] = self.param("project_out", _init, (c.hidden_size, c.embed_dim),
                                    self.dtype)
    if not c.tie_word_embeddings:
      w["lm_head"] = self.param("lm_head", _init, (c.embed_dim, c.vocab_size), self.dtype)
    return head(c, w, x, embed_tokens)


def head(config: ModelConfig, w, x, embed_tokens=None):
  """Head as a pure function of its leaves `w`: x [B, T, D] -> logits [B, T, V] f32."""
  if config.final_layer_norm:
    x = _norm(config, w)(x)
  if "project_out" in w:
    x = layers.linear(x, w["project_out"])
  if config.tie_word_embeddings:
    logits = jnp.einsum("BTE,VE->BTV", x, embed_tokens)
  else:
    logits = layers.linear(x, w["lm_head"])
  return logits.astype(jnp.float32)
