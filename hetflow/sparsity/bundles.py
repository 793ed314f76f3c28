"""The compute over neuron-bundle records: which matrices a record holds, and
the sparse FFN step over a block of records.

The records themselves (their layout on disk and in memory, the store that
holds them, the reads that fetch them) are the memory layer's:
`hetflow/memory/bundle_store.py` and `hetflow.memory.reader.ReaderPool.read_many`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hetflow.models import layers
from hetflow.models.config import ModelConfig


def neuron_matrices(config: ModelConfig) -> tuple[str, ...]:
  """The FFN matrices a neuron has a slice of, in record order (down last)."""
  return ("up", "down") if config.arch == "opt" else ("gate", "up", "down")


def planar_step(config: ModelConfig, a, b, h, bias, valid, pre: bool = False):
  """The FFN over a contiguous block of neuron records held planar
  (neuron_cluster's sparse step; jit it with `functools.partial(planar_step, config)`).

  Two plain matrix products, no gather: the block's rows are row-major
  matrices, so this runs at the matrix-vector rate of the memory.

  Args:
    config: the model's config.
    a: [n, M * D] each neuron's input rows back to back (Llama: gate, up;
      OPT: up).
    b: [n, D] each neuron's down row.
    h: [B, T, D] the normed input.
    bias: [n, M] the input rows' biases, or None.
    valid: a scalar count (the first `valid` records are real) or an [n]
      bool mask; the others contribute exact zeros.
    pre: also return each record's selecting pre-activation (Llama: gate,
      OPT: up, bias included) at the last token, [n] (a predictor's exact
      target: `hetflow.sparsity.predictor.ErrorFeedback`).

  Returns:
    ([B, T, D] the block's contribution, how many of its neurons fired), and
    with `pre` that [n] array third.
  """
  n, d = b.shape
  m = a.shape[1] // d
  y = jnp.einsum("BTD,mD->BTm", h, a.reshape(n * m, d)).reshape(*h.shape[:2], n, m)
  if bias is not None:
    y = y + bias
  act = layers.activation(config.hidden_act)
  if config.arch == "opt":
    z = act(y[..., 0])
  else:
    u = y[..., 1]
    if config.hidden_act == "drelu":
      u = jax.nn.relu(u)
    z = act(y[..., 0]) * u
  keep = valid if jnp.ndim(valid) else jnp.arange(n) < valid
  z = jnp.where(keep, z, 0)
  fired = jnp.sum(jnp.any(z.reshape(-1, n) != 0, axis=0))
  out = jnp.einsum("BTn,nD->BTD", z, b)
  return (out, fired, y[..., 0].reshape(-1, n)[-1]) if pre else (out, fired)


def planar_gather_step(config: ModelConfig, a, b, idx, h, bias, valid, pre: bool = False):
  """`planar_step` over the records at slots `idx` of whole planar buffers
  (a: [slots, M * D], b: [slots, D]): a gather of contiguous rows first, for
  a few hits in a large cached block, where multiplying the whole block costs more."""
  return planar_step(config, jnp.take(a, idx, axis=0), jnp.take(b, idx, axis=0), h, bias, valid,
                     pre)
