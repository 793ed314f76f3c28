"""Neurons inside routed experts: an MoE's experts seen as the layers of a dense sparse model.

neuron_cluster's machinery (the neuron-bundle store, the predictors, the segmented
cache, the planar step) works on "layers" of F neurons with gate, up and down rows.
An MoE layer i with X experts is, for that machinery, X such layers: expert e of layer
i is *virtual layer* i * X + e (`virtual_layer`). `ExpertNeurons` presents a Mixtral
model's experts that way (a Llama-architecture dReLU config of L * X layers that holds
FFN groups only), so the store is written, opened and fingerprinted, the oracle built
and the cache sized by the same code as for a dense model: one record per expert
neuron, one store file per expert. `record_expert_activations` counts which expert
neurons fire on the tokens routed to them (the statistics that order each expert's
records hottest first and choose the hot clusters) and keeps predictor training pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from hetflow.models import modules
from hetflow.models.config import ModelConfig
from hetflow.models.model import Model
from hetflow.models.walk import normalize, walk
from hetflow.sparsity.predictor import exact_gate_params
from hetflow.sparsity.stats import EXACT_ZERO_ACTIVATIONS, ActivationStats, Samples, intermediate

EXPERT_MATRICES = ("gate", "up", "down")


def check_sparse_experts(config: ModelConfig) -> None:
  """Refuses what is not an MoE with exact-zero (ReLU/dReLU) gated experts.

  Raises:
    ValueError: naming what the model is and what to use instead.
  """
  if not config.num_experts:
    raise ValueError(f"{config.name} has no routed experts; for a dense sparse model use"
                     " neuron_cluster.")
  if config.hidden_act not in EXACT_ZERO_ACTIVATIONS:
    raise ValueError(f"{config.name}'s experts use {config.hidden_act!r}, which has no exact"
                     " zeros: skipping neurons would change the outputs. Use an MoE with"
                     " ReLU/dReLU experts (TurboSparse-Mixtral, mixtral-*-sparse), or"
                     " moe_offload for whole experts.")


def virtual_layer(config: ModelConfig, layer: int, expert: int) -> int:
  """The virtual layer of `expert` of `layer`: layer * X + expert."""
  return layer * config.num_experts + expert


def expert_config(config: ModelConfig) -> ModelConfig:
  """The dense view of an MoE's experts: L * X gated layers of F neurons, same activation."""
  return ModelConfig(
      arch="llama", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size,
      num_layers=config.num_layers * config.num_experts, num_heads=config.num_heads,
      num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
      hidden_act=config.hidden_act, norm_eps=config.norm_eps, name=f"{config.name}-experts")


class ExpertNeurons:
  """A Mixtral Model's experts as the FFN groups "layers/<i * X + e>/mlp" of a dense model.

  Holds what neuron_cluster's planning and store code read of a model (config, dtype,
  weight format, shapes, groups, tensors, description, source), for the experts only: no
  embedding, attention or router (the MoE strategy keeps those). Each group also holds its
  layer's FFN norm (the input every expert of the layer sees). In a quantized format an
  expert's kernel is the model's stored kernel of the layer (every expert quantized on its
  own rows, hetflow/models/formats.py) taken at the expert: exactly the values `resident`
  computes with.

  Attributes:
    model: the MoE Model.
    config: `expert_config(model.config)`.
    dtype, weights, format, description, source: the model's (the description names the
      view).
    shapes: the stored leaves per virtual layer (a quantized kernel's "q", "scale", ...).
    logical_shapes: the float parameters per virtual layer.
  """

  def __init__(self, model: Model):
    check_sparse_experts(model.config)
    self.model = model
    self.config = expert_config(model.config)
    self.dtype = model.dtype
    self.source = model.source
    self.weights = model.weights
    self.format = model.format
    self.description = f"experts of {model.description}"
    self.shapes = self._per_expert(model.shapes)
    self.logical_shapes = self._per_expert(model.logical_shapes)
    self._layer: int | None = None
    self._stacks: dict[tuple[str, bool], Any] = {}

  def _per_expert(self, shapes: dict[str, jax.ShapeDtypeStruct]
                  ) -> dict[str, jax.ShapeDtypeStruct]:
    """Layer i's expert leaves [X, ...] (and norm) as virtual layers i * X + e's [...]."""
    c, out = self.model.config, {}
    for i in range(c.num_layers):
      prefix = f"layers/{i}/mlp/"
      names = [n for n in shapes if n.startswith(prefix)
               and n[len(prefix):].split("/")[0] in (*EXPERT_MATRICES, "norm")]
      for e in range(c.num_experts):
        v = f"layers/{virtual_layer(c, i, e)}/mlp/"
        for n in names:
          s = shapes[n]
          norm = n[len(prefix):] == "norm"
          out[v + n[len(prefix):]] = s if norm else jax.ShapeDtypeStruct(s.shape[1:], s.dtype)
    return out

  def _split(self, name: str) -> tuple[int, int, str]:
    _, v, _, leaf = name.split("/", 3)
    layer, expert = divmod(int(v), self.model.config.num_experts)
    return layer, expert, leaf

  def tensor(self, name: str) -> np.ndarray:
    """A float parameter (a quantized kernel's value before quantization), or one stored
    leaf of a quantized kernel ("layers/9/mlp/up/scale")."""
    layer, expert, leaf = self._split(name)
    if leaf == "norm":
      return self.model.tensor(f"layers/{layer}/mlp/norm")
    if "/" in leaf:
      kernel, part = leaf.split("/")
      return self._stack(layer, kernel, stored=True)[part][expert]
    return self._stack(layer, leaf, stored=False)[expert]

  def param(self, name: str) -> Any:
    """An expert's parameter as stored: an array, or a quantized kernel's dict of leaves."""
    layer, expert, leaf = self._split(name)
    if leaf == "norm" or not self.format.applies(name):
      return self.tensor(name)
    return {k: v[expert] for k, v in self._stack(layer, leaf, stored=True).items()}

  def _stack(self, layer: int, leaf: str, stored: bool) -> Any:
    """The layer's stack of `leaf` [X, ...] (as stored, or float), kept while that layer's
    experts are read (the store and the oracle read a layer's experts one after another)."""
    if self._layer != layer:
      self._layer, self._stacks = layer, {}
    key = (leaf, stored)
    if key not in self._stacks:
      name = f"layers/{layer}/mlp/{leaf}"
      self._stacks[key] = self.model.param(name) if stored else self.model.tensor(name)
    return self._stacks[key]

  def release(self) -> None:
    """Drops the kept stacks (call once the store and the predictor are built)."""
    self._layer, self._stacks = None, {}

  def group_names(self) -> list[str]:
    return [f"layers/{v}/mlp" for v in range(self.config.num_layers)]

  def group_tensors(self, group: str) -> dict[str, Any]:
    """A virtual layer's experts' kernels as stored, and its norm."""
    return {leaf: self.param(f"{group}/{leaf}") for leaf in (*EXPERT_MATRICES, "norm")}

  def group_nbytes(self, group: str) -> int:
    return sum(s.size * np.dtype(s.dtype).itemsize for n, s in self.shapes.items()
               if n.startswith(group + "/"))

  @property
  def nbytes(self) -> int:
    return sum(s.size * np.dtype(s.dtype).itemsize for s in self.shapes.values())

  def kv_cache_nbytes(self, tokens: int | None = None, batch: int = 1, dtype=None) -> int:
    """None of the KV cache is the experts': the MoE strategy reserves it."""
    return 0


@dataclasses.dataclass
class ExpertActivations:
  """Which expert neurons fired on the tokens routed to them.

  Attributes:
    stats: per virtual layer (`virtual_layer`) firing counts [L * X, F] over all
      `stats.tokens` tokens: an expert neuron's frequency is P(routed and fires),
      the demand a cache shared by every expert sees.
    routed: [L, X] tokens routed to each expert.
    samples: predictor training pairs per virtual layer (the pre-norm input of the
      tokens routed to that expert, which neurons fired), when asked.
    rows: with `samples`, per virtual layer the flat token index (into ids.reshape(-1))
      of each of its samples: which prompt and position a pair comes from.
  """

  stats: ActivationStats
  routed: np.ndarray
  samples: Samples | None = None
  rows: list[np.ndarray] | None = None

  def density(self) -> np.ndarray:
    """[L, X] fraction of an expert's neurons that fire per token routed to it."""
    routed = self.routed.reshape(-1)
    f = self.stats.counts.shape[1]
    out = self.stats.counts.sum(1) / np.maximum(routed * f, 1)
    return out.reshape(self.routed.shape)


def record_expert_activations(model: Model, ids: np.ndarray,
                              samples: bool = False) -> ExpertActivations:
  """Runs prompts through an MoE `model` a layer at a time and counts its firing expert neurons.

  Args:
    model: a Mixtral-architecture model with ReLU/dReLU experts.
    ids: prompts [B, T].
    samples: also keep (pre-norm input, active set) pairs per expert.

  Returns:
    ExpertActivations.
  """
  c = model.config
  check_sparse_experts(c)
  n, f = c.num_experts, c.intermediate_size
  counts = np.zeros((c.num_layers * n, f), np.int64)
  routed = np.zeros((c.num_layers, n), np.int64)
  data = Samples([None] * (c.num_layers * n), [None] * (c.num_layers * n)) if samples else None
  where = [None] * (c.num_layers * n) if samples else None
  fire = jax.jit(lambda w, h: intermediate(c, w, h) != 0)
  route = jax.jit(lambda router, h: modules.route(c, router, h)[1])

  def on_ffn(layer, x, w):
    flat = x.reshape(-1, c.hidden_size)
    h = normalize(c, w, flat)
    idx = np.asarray(route(w["router"], h[None]))[0]  # [N, k]
    for e in range(n):
      rows = np.nonzero((idx == e).any(-1))[0]
      routed[layer, e] = len(rows)
      kernels = {m: w[m][e] for m in ("gate", "up")}
      # Rows padded to a power of two: a few compiled shapes, not one per expert.
      padded = np.zeros(1 << max(len(rows) - 1, 0).bit_length(), np.int64)
      padded[:len(rows)] = rows
      active = np.asarray(fire(kernels, h[padded]))[:len(rows)]
      v = virtual_layer(c, layer, e)
      counts[v] = active.sum(0)
      if data is not None:
        data.inputs[v] = flat[rows].astype(np.float32)
        data.active[v] = active
        where[v] = rows

  walk(c, model.group_tensors, np.asarray(ids), on_ffn)
  stats = ActivationStats(counts, int(np.prod(np.shape(ids))), 0.0, None,
                          expert_config(c).name)
  return ExpertActivations(stats, routed, data, where)


def expert_gate_params(model: Model) -> dict[int, dict[str, np.ndarray]]:
  """Each expert's exact gate predictor (`predictor.exact_gate_params`), by virtual layer:
  what `method="svd"` truncates. Reads a layer's expert stacks once."""
  view = ExpertNeurons(model)
  out = {v: exact_gate_params(view.config, {m: view.tensor(f"layers/{v}/mlp/{m}")
                                            for m in ("norm", "gate")})
         for v in range(view.config.num_layers)}
  view.release()
  return out
