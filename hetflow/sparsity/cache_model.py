"""How often FFN neurons fire, and what a segmented neuron cache then serves.

Building blocks of neuron_cluster's cost model (strategies/neuron_cluster/cost.py),
from shapes and firing probabilities only.

The cache model. Neuron i of a layer fires on a token with probability p_i
(the activation law: the synthetic model's own target frequencies, or a Zipf
law at a published sparsity). The hot region pins the clusters with the
largest summed frequency; the cold region is an LRU over single neurons, and
its hit probability follows Che's approximation for LRU under independent
requests: the cache holds what was requested within the last T tokens, with T
such that the expected number of distinct neurons requested in T tokens fills
the region, so neuron i hits with probability 1 - (1 - p_i)^T. A run of
`tokens` decode steps from a cold region (as a short benchmark is) uses
min(t, T) at step t. Misses of adjacent records (the store is in hotness
order) coalesce: expected requests = sum_r q_r (1 - q_{r-1}) with q the
per-record miss probability.

MoE (TurboSparse-Mixtral): every expert's neurons are neurons of the layer; a
token reaches k of X experts, so with uniform routing neuron i of an expert
fires with (k / X) p_i.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from hetflow.checkpoints.sparse import parse_hotness, zipf_frequencies
from hetflow.strategy import NotApplicable


@dataclasses.dataclass(frozen=True)
class ActivationLaw:
  """How often FFN neurons fire.

  Attributes:
    sparsity: mean fraction of a layer's (an expert's, for MoE) neurons that
      are zero per token.
    hotness: "zipf:<s>" or "uniform" (hetflow.checkpoints.sparse).
    max_frequency: cap of the hottest neurons' firing frequency.
    source: where the figures come from.
  """

  sparsity: float
  hotness: str = "zipf:1.1"
  max_frequency: float = 0.95
  source: str = ""


# Published activation sparsities (docs/papers.md). The hotness law is not
# published: Zipf with exponent 1.1 (the synthetic models' default) is assumed.
PUBLISHED_LAWS: dict[str, ActivationLaw] = {
    "turbosparse-mistral-7b": ActivationLaw(0.90, source="docs/papers.md: TurboSparse-Mistral-7B 90%"),
    "bamboo-7b": ActivationLaw(0.875, source="docs/papers.md: Bamboo-7B ~85-90% (midpoint)"),
    "turbosparse-mixtral-47b": ActivationLaw(
        0.85, source="docs/papers.md: TurboSparse-Mixtral-47B 85% per expert (97% overall)"),
}


def activation_law(model) -> ActivationLaw:
  """The law of a synthetic sparse model (its spec) or of a published model (by name).

  Raises:
    NotApplicable: when neither is known (a dense model: nothing to predict).
  """
  spec = getattr(model.source, "spec", None)
  if spec is not None and hasattr(spec, "sparsity"):
    return ActivationLaw(spec.sparsity, spec.hotness, spec.max_frequency,
                         f"synthetic {model.config.name}")
  name = model.config.name
  if name in PUBLISHED_LAWS:
    return PUBLISHED_LAWS[name]
  raise NotApplicable(f"no activation law for {name!r}: use a '-sparse' synthetic model or one"
                   f" of {sorted(PUBLISHED_LAWS)}.")


def neurons_per_layer(config) -> int:
  """Neuron records per layer: F, or X * F for an MoE layer."""
  return config.intermediate_size * max(config.num_experts, 1)


def layer_frequencies(model, law: ActivationLaw | None = None) -> np.ndarray:
  """[L, N] firing probability per token of every neuron, hottest first per layer."""
  c = model.config
  source = getattr(model.source, "target_frequencies", None)
  if law is None and source is not None:
    return -np.sort(-np.stack([source(i) for i in range(c.num_layers)]), axis=1)
  law = law or activation_law(model)
  p = zipf_frequencies(c.intermediate_size, 1.0 - law.sparsity, parse_hotness(law.hotness),
                       law.max_frequency)
  if c.num_experts:  # k of X experts per token, routed uniformly
    p = -np.sort(-np.tile(p * c.experts_per_token / c.num_experts, c.num_experts))
  return np.broadcast_to(p, (c.num_layers, len(p)))


@dataclasses.dataclass(frozen=True)
class CacheEstimate:
  """Expected per-token counts of the segmented cache, per layer.

  Attributes:
    active: [L] neurons that fire.
    hot_hits, cold_hits, misses: [L] active neurons served by each region / read.
    requests: [L] read requests after coalescing adjacent misses.
    cold_horizon: Che's characteristic time T in whole tokens (inf: the cold
      region holds every neuron that is not hot).
  """

  active: np.ndarray
  hot_hits: np.ndarray
  cold_hits: np.ndarray
  misses: np.ndarray
  requests: np.ndarray
  cold_horizon: float

  @property
  def hit_rate(self) -> float:
    return float((self.hot_hits.sum() + self.cold_hits.sum()) / max(self.active.sum(), 1e-12))


def _che_horizon(p: np.ndarray, slots: int) -> float:
  """T with sum(1 - (1 - p)^T) = slots (Che's approximation for LRU)."""
  p = p[p > 0]
  if slots <= 0:
    return 0.0
  if slots >= len(p):
    return math.inf  # everything that ever fires fits
  log1m = np.log1p(-np.minimum(p, 1 - 1e-12))
  filled = lambda t: float(np.sum(-np.expm1(t * log1m)))  # noqa: E731
  lo, hi = 0.0, 1.0
  while filled(hi) < slots:
    hi *= 2
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if filled(mid) < slots else (lo, mid)
  return hi


def estimate_cache(freq: np.ndarray, slots: int, hot_fraction: float = 0.5,
                   cluster_size: int = 32, tokens: int | None = None,
                   coalesce: bool = True, admission: str = "all", admit_decay: float = 0.9,
                   admit_min: float = 1.5, warm_tokens: int = 0) -> CacheEstimate:
  """Expected hits, misses and read requests per token for a segmented cache.

  Args:
    freq: [L, N] firing probabilities, hottest first per layer (store order).
    slots: records the cache pool holds (0: no cache).
    hot_fraction, cluster_size: as NeuronClusterOptions (hot clusters chosen
      by summed frequency across all layers, like SegmentedCache.choose_hot).
    tokens: decode steps since the cold region was empty, averaged over
      (None: steady state).
    coalesce: adjacent misses are read with one request.
    admission, admit_decay, admit_min: the cold region's policy, as
      SegmentedCache. "all" admits every miss (LRU: Che's approximation).
      "frequency" admits a miss whose decayed activity reaches admit_min and
      evicts only colder entries, so the region converges to the hottest
      non-hot neurons (modelled as exactly those, an LFU); from a cold start
      neuron i is in by step t with probability 1 - exp(-t p_i w_i), w_i the
      chance that it was also active within the window admit_min asks for.
    warm_tokens: with `tokens`, steps of history the cold region had before the
      first one averaged over (a prompt's tokens, which neuron_cluster's
      `prefill_admission` counts as decode steps).

  Returns:
    A CacheEstimate.
  """
  freq = np.ascontiguousarray(freq, np.float64)
  num_layers, n = freq.shape
  hot = np.zeros_like(freq, bool)
  clusters_hot = int(slots * hot_fraction) // cluster_size
  per = n // cluster_size if cluster_size else 0
  if clusters_hot and per:
    score = freq[:, :per * cluster_size].reshape(num_layers, per, cluster_size).sum(-1)
    best = np.argsort(-score, axis=None, kind="stable")[:clusters_hot]
    for i in best:
      layer, cl = divmod(int(i), per)
      hot[layer, cl * cluster_size:(cl + 1) * cluster_size] = True
  cold_slots = slots - clusters_hot * cluster_size
  # A token's requests arrive together, layer after layer: a record is asked
  # for again only a whole token later, so only whole tokens of horizon count
  # (a region smaller than one token's misses never hits).
  horizon = _che_horizon(freq[~hot], cold_slots)
  horizon = math.floor(horizon) if math.isfinite(horizon) else horizon
  log1m = np.log1p(-np.minimum(freq, 1 - 1e-12))
  if admission == "frequency":
    hit = _lfu_hits(freq, hot, cold_slots, tokens, log1m, admit_decay, admit_min, warm_tokens)
  elif tokens is None:
    hit = -np.expm1(horizon * log1m) if math.isfinite(horizon) else np.ones_like(freq)
  else:  # step t of a cold start remembers min(t, T) tokens
    steps = [min(t, horizon) for t in range(warm_tokens, warm_tokens + max(tokens, 1))]
    hit = np.mean([-np.expm1(s * log1m) for s in steps], axis=0)
  hit = np.where(hot, 1.0, hit)
  if slots <= 0:
    hit = np.zeros_like(freq)
  miss = freq * (1.0 - hit)  # per record: fires and is not cached
  if coalesce:
    prev = np.concatenate([np.zeros((num_layers, 1)), miss[:, :-1]], axis=1)
    requests = np.sum(miss * (1.0 - prev), axis=1)
  else:
    requests = miss.sum(1)
  return CacheEstimate(active=freq.sum(1), hot_hits=np.sum(freq * hot, 1),
                       cold_hits=np.sum(freq * hit * ~hot, 1), misses=miss.sum(1),
                       requests=requests, cold_horizon=horizon)


def _lfu_hits(freq, hot, cold_slots, tokens, log1m, decay, admit_min, warm=0) -> np.ndarray:
  """Hit probabilities of a frequency-admitted cold region (see estimate_cache)."""
  member = np.zeros(freq.shape, bool)
  if cold_slots > 0:
    p = np.where(hot, -1.0, freq).reshape(-1)
    top = np.argsort(-p, kind="stable")[:cold_slots]
    member[np.unravel_index(top[p[top] > 0], freq.shape)] = True
  if tokens is None:
    return member.astype(np.float64)
  # Admission needs activity >= admit_min: one earlier activation within w tokens.
  w = 0 if admit_min <= 1 else (math.log(admit_min - 1) / math.log(decay) if decay > 0 else 0)
  prior = -np.expm1(max(w, 0) * log1m) if admit_min > 1 else np.ones_like(freq)
  rate = freq * prior  # admissions per token
  steps = np.arange(warm, warm + max(tokens, 1))[:, None, None]
  return member * np.mean(-np.expm1(-steps * rate[None]), axis=0)
