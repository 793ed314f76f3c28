"""Activation statistics: which FFN neurons fire, how often, and together.

A neuron fires on a token when its intermediate activation is nonzero: ReLU's
output for OPT, act(gate) * relu(up) for dReLU Llama. Models with SiLU/GELU
have no exact zeros; `check_sparse` refuses them unless an explicit magnitude
threshold is given (then "fires" means |activation| > threshold, and a sparse
computation that skips the others is an approximation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hetflow.models import layers
from hetflow.models.config import ModelConfig
from hetflow.models.model import Model
from hetflow.models.walk import normalize, walk

EXACT_ZERO_ACTIVATIONS = ("relu", "drelu")


def check_sparse(config: ModelConfig, threshold: float | None = None) -> float:
  """The activation threshold to use for `config`; refuses SiLU-like models without one.

  Raises:
    ValueError: for activations without exact zeros when threshold is None.
  """
  if config.arch == "mixtral":
    raise ValueError("neuron sparsity of MoE experts is not supported; use a dense model.")
  if threshold is not None:
    return float(threshold)
  if config.hidden_act not in EXACT_ZERO_ACTIVATIONS:
    raise ValueError(
        f"{config.name} uses {config.hidden_act!r}, which has no exact zeros: skipping"
        " neurons would change the outputs. Pass an explicit activation threshold to"
        " accept that approximation, or use a ReLU/dReLU model.")
  return 0.0


def intermediate(config: ModelConfig, w: dict[str, Any], h):
  """The FFN's intermediate activations [..., F] on normalised input h."""
  act = layers.activation(config.hidden_act)
  if "gate" not in w:
    return act(layers.linear(h, w["up"], w.get("up_bias")))
  u = layers.linear(h, w["up"], w.get("up_bias"))
  if config.hidden_act == "drelu":
    u = jax.nn.relu(u)
  return act(layers.linear(h, w["gate"], w.get("gate_bias"))) * u


def firing(config: ModelConfig, threshold: float):
  """A jitted (mlp leaves, normalised h) -> [..., F] bool: which neurons fire, i.e. whose
  intermediate activation's magnitude exceeds `threshold`."""
  return jax.jit(lambda w, h: jnp.abs(intermediate(config, w, h)) > threshold)


@dataclasses.dataclass
class ActivationStats:
  """Per-layer firing counts over calibration tokens.

  Attributes:
    counts: [L, F] tokens on which each neuron fired.
    tokens: calibration tokens seen.
    threshold: the activation threshold used (0 for exact zeros).
    coactivation: [L, F, F] tokens on which both neurons fired, or None
      (recorded only when asked: F^2 counts per layer).
    model: name of the model they were recorded on.
  """

  counts: np.ndarray
  tokens: int
  threshold: float = 0.0
  coactivation: np.ndarray | None = None
  model: str = ""

  @property
  def frequency(self) -> np.ndarray:
    """[L, F] firing frequency per neuron."""
    return self.counts / max(self.tokens, 1)

  @property
  def density(self) -> np.ndarray:
    """[L] mean fraction of neurons firing per token."""
    return self.frequency.mean(axis=1)

  def hot_order(self) -> np.ndarray:
    """[L, F] neuron ids, hottest first (ties by id, so the order is stable)."""
    return np.argsort(-self.counts, axis=1, kind="stable")

  def arrays(self) -> dict[str, Any]:
    """What `save` writes and `load` reads back."""
    arrays = dict(counts=self.counts, tokens=self.tokens, threshold=self.threshold,
                  model=self.model)
    if self.coactivation is not None:
      arrays["coactivation"] = self.coactivation
    return arrays

  def save(self, path: str) -> None:
    np.savez(path, **self.arrays())

  @classmethod
  def load(cls, path: str) -> "ActivationStats":
    with np.load(path) as f:
      return cls(counts=f["counts"], tokens=int(f["tokens"]), threshold=float(f["threshold"]),
                 coactivation=f["coactivation"] if "coactivation" in f else None,
                 model=str(f["model"]))


@dataclasses.dataclass
class Samples:
  """Predictor training pairs per layer.

  Attributes:
    inputs: L arrays [N, D]: the residual stream before the FFN norm.
    active: L arrays [N, F] bool: which neurons fired.
  """

  inputs: list[np.ndarray]
  active: list[np.ndarray]


def calibration_ids(config: ModelConfig, num_tokens: int, seed: int = 0,
                    length: int = 128) -> np.ndarray:
  """Random prompts [B, T] of about num_tokens tokens (for synthetic models).

  Real models should be calibrated on real text; random ids are what a random
  model sees in tests and benchmarks.
  """
  t = min(length, config.max_position_embeddings)
  b = max(1, -(-num_tokens // t))
  return np.random.default_rng(seed + 7919).integers(3, config.vocab_size, (b, t))


def record_activations(model: Model, ids: np.ndarray, threshold: float | None = None,
                       coactivation: bool = False, samples: bool = False
                       ) -> tuple[ActivationStats, Samples | None]:
  """Runs prompts through `model` one layer at a time and counts firing neurons.

  Args:
    model: any dense Llama/OPT model (weights materialised a layer at a time).
    ids: prompts [B, T].
    threshold: activation magnitude counted as firing (required for SiLU).
    coactivation: also count pairs (F x F per layer).
    samples: also keep (pre-norm input, active set) pairs for predictor training.

  Returns:
    (stats, samples or None).
  """
  c = model.config
  thr = check_sparse(c, threshold)
  counts = np.zeros((c.num_layers, c.intermediate_size), np.int64)
  co = (np.zeros((c.num_layers, c.intermediate_size, c.intermediate_size), np.int64)
        if coactivation else None)
  data = Samples([], []) if samples else None
  fire = firing(c, thr)

  def on_ffn(layer, x, w):
    x = x.reshape(-1, c.hidden_size)
    active = np.asarray(fire(w, normalize(c, w, x)))
    counts[layer] = active.sum(0)
    if co is not None:
      a = active.astype(np.float32)
      co[layer] = np.rint(a.T @ a).astype(np.int64)
    if data is not None:
      data.inputs.append(x.astype(np.float32))
      data.active.append(active)

  walk(c, model.group_tensors, ids, on_ffn)
  stats = ActivationStats(counts, int(np.prod(ids.shape)), thr, co, c.name)
  return stats, data
