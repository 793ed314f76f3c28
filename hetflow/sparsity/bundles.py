"""The compute over neuron-bundle records: which matrices a record holds, and
the sparse FFN step over a subset of records.

The records themselves (their layout on disk, the store that holds them, the
reads that fetch them) are the memory layer's: `hetflow/memory/bundle_store.py`
and `hetflow.memory.reader.ReaderPool.read_many`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hetflow.models import layers
from hetflow.models.config import ModelConfig


def neuron_matrices(config: ModelConfig) -> tuple[str, ...]:
  """The FFN matrices a neuron has a slice of, in record order."""
  return ("up", "down") if config.arch == "opt" else ("gate", "up", "down")


def neuron_step(config: ModelConfig, stride: int, buf, idx, valid, pos, h, small):
  """The FFN over a subset of neurons, read from their records (neuron_cluster's
  sparse step; jit it with `functools.partial(neuron_step, config, stride)`).

  Args:
    config: the model's config.
    stride: elements between one matrix's row and the next in a record.
    buf: [slots, record elements] records (a cache pool or a staging buffer).
    idx: [n] record slots to use; valid: [n] which are real (padding: False).
    pos: [n] the neurons' indices in the layer (for the biases).
    h: [B, T, D] the normed input; small: the layer's biases, if any.

  Returns:
    ([B, T, D] the neurons' contribution, how many of them fired).
  """
  d = config.hidden_size
  w = jnp.take(buf, idx, axis=0)  # [n, record elements]
  rows = {m: w[:, i * stride:i * stride + d] for i, m in enumerate(neuron_matrices(config))}

  def proj(m):
    y = jnp.einsum("BTD,nD->BTn", h, rows[m])
    b = small.get(m + "_bias")
    return y if b is None else y + jnp.take(b, pos)

  act = layers.activation(config.hidden_act)
  if config.arch == "opt":
    a = act(proj("up"))
  else:
    u = proj("up")
    if config.hidden_act == "drelu":
      u = jax.nn.relu(u)
    a = act(proj("gate")) * u
  a = jnp.where(valid, a, 0)  # padding slots contribute exact zeros
  fired = jnp.sum(jnp.any(a.reshape(-1, a.shape[-1]) != 0, axis=0))
  return jnp.einsum("BTn,nD->BTD", a, rows["down"]), fired
