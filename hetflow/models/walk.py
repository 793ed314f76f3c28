"""A full-sequence forward pass that materialises one layer at a time.

Recording activation statistics, calibrating synthetic sparse models and
collecting predictor training data all need the residual stream at every
FFN input of a model that may not fit in memory. `walk` runs embed and the
decoder blocks with only one layer's tensors alive, and hands each FFN input to
a callback, which may also rewrite that layer's FFN weights before they are
applied (the synthetic sparse models calibrate their thresholds that way).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hetflow.models import modules
from hetflow.models.config import ModelConfig

# on_ffn(layer, x [B, T, D] pre-norm residual, mlp leaves) -> mlp leaves or None.
FFNCallback = Callable[[int, np.ndarray, dict[str, np.ndarray]], Any]
# on_block(layer, x [B, T, D] the residual entering the block, before its attention).
BlockCallback = Callable[[int, np.ndarray], None]


@functools.lru_cache(maxsize=16)
def _functions(config: ModelConfig):
  embed = modules.Embed(config, jnp.float32)

  def attn(w, x, positions, mask):
    b, t = x.shape[:2]
    shape = (b, t, config.num_kv_heads, config.head_dim)
    cache = (jnp.zeros(shape, x.dtype), jnp.zeros(shape, x.dtype))
    return modules.attention_half(config, w, x, cache, 0, positions, mask,
                                  modules.named_linear)[0]

  return (jax.jit(lambda p, ids, pos: embed.apply({"params": p}, ids, pos)),
          jax.jit(attn),
          jax.jit(lambda w, x: modules.ffn_half(config, w, x)),
          jax.jit(lambda w, x: modules._norm(config, w)(x)))


def normalize(config: ModelConfig, mlp: dict[str, Any], x):
  """The FFN half's norm applied to x: the input its neurons see."""
  return _functions(config)[3]({k: v for k, v in mlp.items() if k.startswith("norm")}, x)


def walk(config: ModelConfig, tensors: Callable[[str], dict[str, np.ndarray]],
         ids: np.ndarray, on_ffn: FFNCallback | None = None,
         num_layers: int | None = None, on_block: BlockCallback | None = None) -> np.ndarray:
  """Runs ids [B, T] through the blocks, one layer's weights alive at a time.

  Args:
    config: the architecture.
    tensors: group name ("embed", "layers/3/mlp", ...) -> its leaves.
    ids: token ids [B, T] (no padding).
    on_ffn: called with (layer, x, mlp leaves) before each FFN half; it may
      return replacement leaves for that layer.
    num_layers: stop after this many layers (default: all).
    on_block: called with (layer, x) before each block's attention half.

  Returns:
    The residual stream after the last block run, [B, T, D] float32.
  """
  embed, attn, ffn, _ = _functions(config)
  ids = jnp.asarray(ids, jnp.int32)
  b, t = ids.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  mask = jnp.ones((b, t), bool)
  x = embed(tensors("embed"), ids, positions)
  for i in range(config.num_layers if num_layers is None else num_layers):
    if on_block is not None:
      on_block(i, np.asarray(x))
    x = attn(tensors(f"layers/{i}/attn"), x, positions, mask)
    mlp = tensors(f"layers/{i}/mlp")
    if on_ffn is not None:
      mlp = on_ffn(i, np.asarray(x), mlp) or mlp
    x = ffn(mlp, x)
  return np.asarray(x)
