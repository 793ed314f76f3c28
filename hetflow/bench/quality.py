"""What a weight format costs in quality: next-token distributions against float32.

For a fixed prompt set, every position's next-token distribution of the model
in a format is compared with the same model's float32 one: top-1 agreement
(the argmax is the same token) and the mean KL divergence KL(float32 || format)
in nats. Both come from `Engine.forward` under `resident`, so they describe
the weights, not a strategy (every strategy gives resident's tokens).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hetflow.engine import Engine
from hetflow.models.model import Model


@dataclasses.dataclass(frozen=True)
class Quality:
  """Next-token agreement of a model in some format with its float32 self.

  Attributes:
    weights: the format measured.
    top1: fraction of positions whose most likely next token is float32's.
    mean_kl: mean over positions of KL(float32 || format), in nats.
    max_kl: the largest KL at one position.
    positions: positions compared (prompts x length).
  """

  weights: str
  top1: float
  mean_kl: float
  max_kl: float
  positions: int


def prompt_set(vocab_size: int, count: int = 8, length: int = 32, seed: int = 0) -> np.ndarray:
  """A fixed set of prompts [count, length]: random ids from a seeded generator."""
  rng = np.random.default_rng(seed)
  return rng.integers(3, vocab_size, size=(count, length), dtype=np.int32)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(reference_logits: np.ndarray, logits: np.ndarray, weights: str) -> Quality:
  """Quality of `logits` against `reference_logits` (both [B, T, V])."""
  ref, got = _log_softmax(reference_logits), _log_softmax(logits)
  kl = np.sum(np.exp(ref) * (ref - got), axis=-1)  # [B, T]
  top1 = np.mean(np.argmax(ref, axis=-1) == np.argmax(got, axis=-1))
  return Quality(weights, float(top1), float(kl.mean()), float(kl.max()), int(kl.size))


def logits_of(model: Model, prompts: np.ndarray) -> np.ndarray:
  """Logits [B, T, V] of `model` on `prompts`, all weights resident."""
  with Engine(model, "resident") as engine:
    return engine.forward(prompts)


def measure(model: Model, formats, prompts: np.ndarray | None = None) -> list[Quality]:
  """Quality of each format in `formats` for `model`'s weights, against float32.

  Args:
    model: any Model; its float weights are the reference.
    formats: weight format names ("bfloat16", "int8", "int4", ...).
    prompts: [B, T] ids; default `prompt_set(vocab_size)`.

  Returns:
    One Quality per format, in order.
  """
  if prompts is None:
    prompts = prompt_set(model.config.vocab_size)
  reference = logits_of(dataclasses.replace(model, weights="float32"), prompts)
  return [compare(reference, logits_of(dataclasses.replace(model, weights=f), prompts), f)
          for f in formats]
