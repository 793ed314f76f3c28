"""Synthetic Mixtral-shaped models whose routers behave like trained ones.

`moe_model("mixtral-1b-routed", popularity="zipf:0.5", reuse=0.45, seed=0)` (also
`hetflow.synthetic_model(...)`) gives a random MoE model whose routing has two stated
properties, measured on the model's own computation (`routing_statistics`):

  * popularity: how often each expert of a layer is routed to. The law
    "zipf:<s>" gives expert e of a layer the target frequency p_e = P(e is in a
    token's top-k) = min(max_frequency, C / rank^s) over a random per-layer
    permutation, with sum(p) = k (so mean(p) = k / X); "uniform" is zipf:0. The
    figure a single number summarises it by is the *hot share*: the fraction of
    routed slots that go to the most popular quarter of the experts (0.25 when
    uniform).
  * reuse: the fraction of a token's k experts (per layer) that the previous
    token also used, averaged over tokens and layers. Independent routing gives
    sum(p_e^2) / k (k / X = 0.25 for top-2 of 8, uniform): a cache holding the
    previous token's experts hits that often by chance alone.

Published figures of trained Mixtral-8x7B (quoted from memory of the Mixtral
paper, Jiang et al. 2024, arXiv 2401.04088, Section 5 "Routing analysis"; the
exact table was not re-checked here): expert choice per layer is close to
uniform over domains (Figure 7: no expert specialises by topic; the load-balancing
loss keeps the 8 experts near 1/8 of first choices), and consecutive tokens
repeat experts more than chance: the same first-choice expert ~14% of the time
at layer 0 and ~22-28% at layers 15 and 31 against 12.5% at random; the next
token's first choice among the previous token's top-2 ~47% (layer 0) to ~55-62%
(layers 15, 31) against 46% at random. Those are different measures from
`reuse` here (which counts both of a token's experts); Eliseev & Mazur 2023
(arXiv 2312.17238, mixtral-offloading) measured what an offloader sees: an LRU
cache of k = 2 experts per layer hits ~0.4-0.6 of Mixtral's expert lookups, and
guessing layer i+1's experts from layer i's hidden state recalls ~0.8-0.9. We know
of no published per-expert frequency table for Mixtral; other MoE families
(DeepSeek, Qwen-MoE, Switch) are reported more skewed. Hence the defaults
popularity="zipf:0.5" (hot share 0.39) and reuse=0.45.

Construction (per layer, from the seed, calibrated layer by layer on random
token sequences run through the model itself, `hetflow.models.walk`):
  * a constant coordinate in the residual stream (as the sparse models,
    hetflow/checkpoints/sparse.py): the embedding's column 0 is a constant and
    the attention output projections and expert down projections write zero
    there, so the router's row 0 acts as a per-expert bias: the popularity.
  * the slowly drifting directions of the residual stream: random attention is
    close to uniform over its window, so its output carries a component that
    changes little from one token to the next. Slow feature analysis on the FFN
    inputs of calibration sequences (whitened lag-1 autocorrelation, an
    eigenproblem, within the principal directions the tokens can estimate)
    finds the directions whose projections change least between consecutive
    tokens, and those that change most.
  * router logits = bias + scale * (cos(phi) * slow + sin(phi) * fast), where
    slow and fast are random mixtures of those directions per expert. For a
    given phi the biases are fitted (a fixed-point iteration on log frequencies)
    so that the measured frequencies equal the targets; phi is bisected so that
    the measured reuse equals the target. Both are measured on exactly the
    logits the model computes (h @ router), so the targets are met on the
    calibration tokens; tests/test_moe.py measures fresh sequences.
The drift is that of the context's running mean, so it slows as the context
grows: reuse rises slowly with the position (calibrated and measured on
positions 16-255 of 256-token sequences; longer decodes see somewhat more reuse).
Greedy decoding of a random model tends to loop, which repeats experts
far more than any figure here: measure routing on sampled or teacher-forced
tokens, as `routing_statistics` does.

The calibration also counts, on its own tokens and the routing it reached, the hit rate
an LRU expert cache shared by the layers would have at every size
(`shared_lru_hit_rates`): the locality beyond one token that `reuse` does not state,
which moe_offload's cost model reads (`strategies.moe_offload.routing_law`).

The calibration result (the routers, [L, D, X], and those hit rates) is cached under
cache_root()/moe (hetflow.memory.cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from typing import Any

import jax.numpy as jnp
import numpy as np

from hetflow.checkpoints.sparse import parse_hotness, zipf_frequencies
from hetflow.checkpoints.synthetic import SHAPES, SyntheticSource
from hetflow.memory.cache import cache_root, cached_arrays
from hetflow.models import modules
from hetflow.models.config import ModelConfig
from hetflow.models.model import Model
from hetflow.models.walk import normalize, walk

# 2: slow feature analysis in the top N / 32 principal directions; 3: the cache also
# holds the calibration's measured LRU hit rates (`shared_lru_hit_rates`).
_VERSION = 3
RESIDUAL_CONSTANT = 1.0  # value of the residual stream's constant coordinate
LOGIT_SCALE = 2.0  # std of the non-bias part of the router logits
SUFFIX = "-routed"

# Mixtral-shaped models small enough for a 2-core, 24 GiB machine. mixtral-1b:
# 8 experts of 3 x 1024 x 2816 (8.7M parameters, 35 MB in float32) in each of
# 16 layers, 1.17B parameters in all (4.7 GB float32, 2.3 GB bfloat16), of which
# 0.33B are used per token (top-2).
MOE_SHAPES: dict[str, dict[str, Any]] = {
    "mixtral-1b": dict(arch="mixtral", vocab_size=32000, hidden_size=1024,
                       intermediate_size=2816, num_layers=16, num_heads=16, num_kv_heads=4,
                       head_dim=64, max_position_embeddings=4096, rope_theta=1e6,
                       num_experts=8, experts_per_token=2, bos_token_id=1, eos_token_id=2),
    # mixtral-tiny (hetflow.checkpoints.SHAPES) has 4 experts; this one has Mixtral's 8, for tests.
    "mixtral-tiny-8e": dict(SHAPES["mixtral-tiny"], num_experts=8),
}


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
  """How a synthetic MoE model routes (see the module docstring for the measures).

  Attributes:
    popularity: per-layer expert frequency law: "zipf:<s>" or "uniform".
    reuse: target fraction of a token's experts the previous token also used
      (per layer, averaged); must lie between chance (sum(p^2) / k) and what
      the model's slow directions allow (calibration says if not).
    max_frequency: cap of the hottest expert's frequency P(in top-k).
    drift_window: the attention's sliding window (the model's
      `sliding_window`), which sets how fast the slow directions drift: their
      value is close to a running mean over that many tokens, so a sequence's
      favourite experts change on that time scale, the same at every position.
      None: attention over the whole context, whose mean drifts ever more slowly
      (each sequence keeps its favourites; reuse grows with the position).
    calibration_tokens: random tokens the routers are calibrated on.
    sequence_length: length of the calibration sequences.
    warmup: first positions of each sequence left out of the statistics (the
      context mean is still settling there).
    strict: refuse a reuse some layer cannot reach (ValueError with the range);
      False calibrates such a layer to the nearest reachable reuse and marks it
      "clamped" in `MoESource.calibration_report` (measure the model with
      `routing_statistics` and state what it gives).
  """

  popularity: str = "zipf:0.5"
  reuse: float = 0.45
  max_frequency: float = 0.95
  drift_window: int | None = 64
  calibration_tokens: int = 16384
  sequence_length: int = 256
  warmup: int = 16
  strict: bool = True

  def __post_init__(self):
    parse_hotness(self.popularity)
    if not 0.0 < self.reuse < 1.0:
      raise ValueError(f"reuse must be in (0, 1), got {self.reuse}.")
    if not 0 <= self.warmup < self.sequence_length - 1:
      raise ValueError(f"warmup={self.warmup} must leave positions in sequence_length="
                       f"{self.sequence_length}.")

  def frequencies(self, config: ModelConfig) -> np.ndarray:
    """Target P(expert in top-k) by popularity rank [X], hottest first (sums to k)."""
    n, k = config.num_experts, config.experts_per_token
    return zipf_frequencies(n, k / n, parse_hotness(self.popularity), self.max_frequency)

  def hot_share(self, config: ModelConfig) -> float:
    """Target fraction of routed slots taken by the most popular quarter of experts."""
    return hot_share(self.frequencies(config), config.experts_per_token)

  def chance_reuse(self, config: ModelConfig) -> float:
    """Reuse if consecutive tokens were routed independently: sum(p^2) / k."""
    p = self.frequencies(config)
    return float(np.sum(p ** 2) / config.experts_per_token)


def hot_share(frequencies: np.ndarray, k: int) -> float:
  """Fraction of routed slots that go to the hottest quarter (at least one) of experts."""
  p = np.sort(np.asarray(frequencies, np.float64))[::-1]
  return float(p[:max(1, len(p) // 4)].sum() / k)


def moe_config(name: str) -> ModelConfig:
  """The config of a "<mixtral shape>-routed" name (MOE_SHAPES, or a Mixtral of SHAPES)."""
  base = name[:-len(SUFFIX)] if name.endswith(SUFFIX) else None
  shapes = {**{n: s for n, s in SHAPES.items() if s["arch"] == "mixtral"}, **MOE_SHAPES}
  if base not in shapes:
    raise ValueError(f"unknown routed MoE model {name!r}; known: "
                     f"{sorted(n + SUFFIX for n in shapes)}.")
  return ModelConfig(name=name, **shapes[base])


def _rng(seed: int, *key) -> np.random.Generator:
  digest = hashlib.sha256(":".join(map(str, (seed, "moe") + key)).encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@dataclasses.dataclass(frozen=True)
class RoutingStats:
  """Routing measured on token sequences.

  Attributes:
    frequency: [L, X] fraction of tokens that routed to each expert.
    reuse: [L] fraction of a token's experts the previous token also used.
    tokens: tokens counted per layer.
  """

  frequency: np.ndarray
  reuse: np.ndarray
  tokens: int

  def hot_share(self, k: int) -> float:
    """Hot share per layer (own hottest quarter), averaged over layers."""
    return float(np.mean([hot_share(f, k) for f in self.frequency]))


def _topk(logits: np.ndarray, k: int) -> np.ndarray:
  """Expert sets [..., X] bool of the top-k logits."""
  idx = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
  out = np.zeros(logits.shape, bool)
  np.put_along_axis(out, idx, True, axis=-1)
  return out


def _measure(chosen: np.ndarray, k: int, warmup: int) -> tuple[np.ndarray, float]:
  """(frequency [X], reuse) of expert sets chosen [B, T, X] over positions >= warmup."""
  c = chosen[:, warmup:]
  reuse = float((c[:, 1:] & c[:, :-1]).sum(-1).mean() / k)
  return c.reshape(-1, c.shape[-1]).mean(0), reuse


def shared_lru_hit_rates(chosen: np.ndarray, warmup: int) -> np.ndarray:
  """Hit rate of an LRU expert cache shared by the layers, at every size [L * X + 1].

  A decode visits the layers in order for each token and looks a layer's k experts up
  together. An LRU cache of S slots holds a (layer, expert) key iff fewer than S other
  keys were used since the key's last use (its stack distance; LRU is a stack algorithm,
  Mattson et al. 1970), so one pass over the stream counts every size at once. The keys
  of one visit count as used in ascending expert order.

  Args:
    chosen: [L, B, T, X] bool, the k experts each layer routed each token of B
      sequences to; each sequence starts with an empty cache.
    warmup: first positions of each sequence whose lookups are not counted.

  Returns:
    Entry S: the fraction of counted lookups that hit with S slots.
  """
  layers, batch, length, n = chosen.shape
  k = int(chosen[0, 0, 0].sum())
  keys_total = layers * n
  last = np.full((batch, keys_total), -1)  # when each key was last used; -1: never
  rows = np.arange(batch)[:, None]
  depths = np.zeros(keys_total + 1, np.int64)  # last bin: first use (a miss at any size)
  for t in range(length):
    for layer in range(layers):
      keys = layer * n + np.nonzero(chosen[layer, :, t])[1].reshape(batch, k)
      if t >= warmup:
        seen = last[rows, keys]  # [B, k]
        depth = (last[:, None, :] > seen[:, :, None]).sum(-1)
        depth[seen < 0] = keys_total
        depths += np.bincount(depth.ravel(), minlength=keys_total + 1)
      last[rows, keys] = (t * layers + layer) * k + np.arange(k)
  return np.concatenate([[0.0], np.cumsum(depths[:-1]) / depths.sum()])


class MoESource:
  """A WeightSource whose routers follow a RoutingSpec (see the module docstring)."""

  def __init__(self, config: ModelConfig, seed: int, spec: RoutingSpec):
    self.config = config
    self.seed = seed
    self.spec = spec
    self.base = SyntheticSource(config, seed)
    self._calibration: dict[str, np.ndarray] | None = None
    self._lock = threading.Lock()
    self._report: dict[str, Any] | None = None

  @property
  def calibration_report(self) -> dict[str, Any] | None:
    """Per layer what the calibration reached (phi, reuse, clamped, frequency error,
    autocorrelations), when this process calibrated; None when the routers came from
    the cache. Not a public attribute, so store fingerprints do not depend on it."""
    return self._report

  def target_frequencies(self, layer: int) -> np.ndarray:
    """Target P(expert e in top-k) of `layer`, indexed by expert [X]."""
    p = self.spec.frequencies(self.config)
    return p[_rng(self.seed, "perm", layer).permutation(len(p)).argsort()]

  def get(self, name: str, dtype) -> np.ndarray:
    if name.endswith("/mlp/router"):
      layer = int(name.split("/")[1])
      return self.routers()[layer].astype(dtype)
    return self._tensor(name).astype(dtype, copy=False)

  def _tensor(self, name: str) -> np.ndarray:
    array = self.base.get(name, np.float32)
    if name == "embed/tokens":
      array[:, 0] = RESIDUAL_CONSTANT
    elif name.endswith("/attn/o"):
      array[:, 0] = 0.0
    elif name.endswith("/mlp/down"):
      array[..., 0] = 0.0  # [X, F, D]: no expert writes the constant coordinate
    return array

  def _group(self, group: str) -> dict[str, np.ndarray]:
    prefix = group + "/"
    return {n[len(prefix):]: self._tensor(n) for n in self.base._shapes if n.startswith(prefix)}

  # -- calibration ------------------------------------------------------------

  def _cache_path(self) -> str:
    key = json.dumps([_VERSION, dataclasses.asdict(self.config), self.seed,
                      dataclasses.asdict(self.spec)], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(cache_root(), "moe", f"{self.config.name}-{self.seed}-{digest}.npz")

  def calibration(self) -> dict[str, np.ndarray]:
    """{"routers" [L, D, X] float32, "lru_hit_rates" [L * X + 1]}, calibrated once and
    cached."""
    with self._lock:
      if self._calibration is None:
        self._calibration = cached_arrays(self._cache_path(), self._calibrate)
      return self._calibration

  def routers(self) -> np.ndarray:
    """The calibrated routers [L, D, X] (float32)."""
    return self.calibration()["routers"]

  def lru_hit_rates(self) -> np.ndarray:
    """Hit rate of an LRU expert cache of S slots shared by the layers, by S [L * X + 1],
    measured on the calibration tokens (`shared_lru_hit_rates`)."""
    return self.calibration()["lru_hit_rates"]

  def _calibrate(self) -> dict[str, np.ndarray]:
    c, s = self.config, self.spec
    n, k = c.num_experts, c.experts_per_token
    t = min(s.sequence_length, c.max_position_embeddings)
    b = max(2, -(-s.calibration_tokens // t))
    ids = _rng(self.seed, "calibration").integers(3, c.vocab_size, (b, t))
    routers = np.zeros((c.num_layers, c.hidden_size, n), np.float32)
    chosen = np.zeros((c.num_layers, b, t, n), bool)
    report = []

    def on_ffn(layer, x, w):
      h = np.asarray(normalize(c, w, x), np.float64)  # [B, T, D], what the router sees
      routers[layer] = self._fit(layer, h, report)
      chosen[layer] = _topk(h @ routers[layer], k)
      w["router"] = routers[layer]
      return w

    walk(c, self._group, ids, on_ffn)
    self._report = {"layers": report}
    return {"routers": routers, "lru_hit_rates": shared_lru_hit_rates(chosen, s.warmup)}

  def _fit(self, layer: int, h: np.ndarray, report: list) -> np.ndarray:
    """The router of one layer [D, X] that meets the spec on FFN inputs h [B, T, D]."""
    c, s = self.config, self.spec
    k, n = c.experts_per_token, c.num_experts
    w0 = s.warmup
    rest = h[..., 1:]
    centred = rest - rest[:, w0:].reshape(-1, rest.shape[-1]).mean(0)
    # Slow feature analysis: whiten, then the lag-1 autocorrelation's eigenvectors.
    flat = centred[:, w0:].reshape(-1, centred.shape[-1])
    cov = flat.T @ flat / len(flat)
    evals, evecs = np.linalg.eigh(cov)
    # Only the principal directions the tokens can estimate (N / 32 of them): in the
    # others the lag-1 statistics are noise (mixtral-1b on 1,920 tokens found
    # "directions" with autocorrelation 1.004 and -0.99, and missed its targets).
    rank = min(len(evals), max(8, len(flat) // 32))
    keep = np.zeros(len(evals), bool)
    keep[-rank:] = True
    keep &= evals > evals.max() * 1e-6
    whiten = evecs[:, keep] / np.sqrt(evals[keep])  # [D-1, r]
    z = centred @ whiten  # [B, T, r], unit covariance
    a, b_ = z[:, w0 + 1:].reshape(-1, z.shape[-1]), z[:, w0:-1].reshape(-1, z.shape[-1])
    lag = (a.T @ b_ + b_.T @ a) / (2 * len(a))
    rho, dirs = np.linalg.eigh(lag)  # ascending autocorrelation
    # The few slowest directions (the top ones drift far more slowly than the tenth).
    m = max(2, min(n // 2, dirs.shape[1] // 2))
    slow_dirs = whiten @ dirs[:, -m:]  # [D-1, m]: unit-variance projections, slowest
    fast_dirs = whiten @ dirs[:, :m]  # the fastest-changing ones
    rng = _rng(self.seed, "router", layer)
    mix_slow = rng.standard_normal((m, n)) / np.sqrt(m)
    mix_fast = rng.standard_normal((m, n)) / np.sqrt(m)
    slow = slow_dirs @ mix_slow  # [D-1, X]
    fast = fast_dirs @ mix_fast
    # The router's logits are h0 * row0 + rest @ w[1:]; precompute both parts.
    h0 = h[..., 0]  # the constant coordinate (after the norm: nearly constant)
    slow_logits, fast_logits = rest @ slow, rest @ fast  # [B, T, X]
    unit = float(h0[:, w0:].mean())
    target = self.target_frequencies(layer)

    def logits(phi, row0):
      mixed = np.cos(phi) * slow_logits + np.sin(phi) * fast_logits
      return h0[..., None] * row0 + LOGIT_SCALE * mixed

    def fit_bias(phi):
      """Row 0 such that the measured frequencies equal the targets (fixed point)."""
      row0 = np.zeros(n)
      for _ in range(100):
        freq, _ = _measure(_topk(logits(phi, row0), k), k, w0)
        row0 = row0 + 0.5 * (np.log(target) - np.log(np.maximum(freq, 1e-4))) / unit
      freq, reuse = _measure(_topk(logits(phi, row0), k), k, w0)
      return row0, freq, reuse

    def router(phi, row0):
      w = np.zeros((c.hidden_size, n))
      w[0] = row0
      w[1:] = LOGIT_SCALE * (np.cos(phi) * slow + np.sin(phi) * fast)
      return w

    # Usually reuse falls as phi grows (more of the fast directions); bisect either way.
    lo, hi = 0.0, np.pi / 2
    at_lo, at_hi = fit_bias(lo)[2], fit_bias(hi)[2]
    target_reuse = s.reuse
    if not min(at_lo, at_hi) <= s.reuse <= max(at_lo, at_hi):
      message = (f"{c.name} layer {layer}: reuse={s.reuse} is out of reach with popularity="
                 f"{s.popularity!r}; this model's routers give {min(at_lo, at_hi):.3f} to"
                 f" {max(at_lo, at_hi):.3f} (chance alone: {s.chance_reuse(c):.3f}).")
      if s.strict:
        raise ValueError(message)
      target_reuse = min(max(s.reuse, min(at_lo, at_hi)), max(at_lo, at_hi))
    for _ in range(20):
      mid = (lo + hi) / 2
      reuse = fit_bias(mid)[2]
      lo, hi = (mid, hi) if (reuse > target_reuse) == (at_lo > at_hi) else (lo, mid)
    row0, freq, reuse = fit_bias((lo + hi) / 2)
    report.append({"layer": layer, "phi": (lo + hi) / 2, "reuse": reuse,
                   "clamped": target_reuse != s.reuse,
                   "max_freq_error": float(np.max(np.abs(freq / target - 1))),
                   "slow_autocorrelation": float(rho[-m:].mean()),
                   "fast_autocorrelation": float(rho[:m].mean())})
    return router((lo + hi) / 2, row0).astype(np.float32)


def routing_statistics(model: Model, ids: np.ndarray, warmup: int = 16) -> RoutingStats:
  """Measures a MoE model's routing on token sequences (teacher-forced: the same
  routing a decode of these tokens computes, one layer's weights alive at a time).

  Args:
    model: a Mixtral-architecture Model.
    ids: [B, T] token ids.
    warmup: first positions of each sequence left out.

  Returns:
    RoutingStats.
  """
  c = model.config
  if not c.num_experts:
    raise ValueError(f"{c.name} is not a mixture-of-experts model.")
  k = c.experts_per_token
  freq, reuse = [], []

  def on_ffn(layer, x, w):
    h = normalize(c, w, x)
    _, idx = modules.route(c, w["router"], h)
    chosen = np.zeros(tuple(idx.shape[:2]) + (c.num_experts,), bool)
    np.put_along_axis(chosen, np.asarray(idx), True, axis=-1)
    f, r = _measure(chosen, k, warmup)
    freq.append(f)
    reuse.append(r)

  def tensors(group):
    return model.group_tensors(group)

  walk(c, tensors, np.asarray(ids), on_ffn)
  return RoutingStats(np.array(freq), np.array(reuse), ids.shape[0] * (ids.shape[1] - warmup))


def moe_model(name: str, popularity: str = "zipf:0.5", reuse: float = 0.45, seed: int = 0,
              dtype: Any = jnp.float32, **spec: Any) -> Model:
  """A synthetic Mixtral-shaped model whose routing follows a stated law.

  Args:
    name: "<shape>-routed" for "mixtral-1b" (MOE_SHAPES) or a Mixtral shape of
      hetflow.checkpoints.SHAPES ("mixtral-tiny-routed", "mixtral-8x7b-routed").
    popularity: expert frequency law per layer, "zipf:<s>" or "uniform".
    reuse: fraction of a token's experts the previous token also used.
    seed: same name, seed and spec give the same bits everywhere.
    dtype: compute dtype.
    **spec: further RoutingSpec fields.

  Returns:
    A Model; `model.source.spec` states the targets, `model.source.target_frequencies(i)`
    layer i's law.
  """
  s = RoutingSpec(popularity=popularity, reuse=reuse, **spec)
  config = moe_config(name).replace(sliding_window=s.drift_window)
  return Model(config=config, source=MoESource(config, seed, s), dtype=dtype,
               description=f"synthetic {name} (seed {seed}, popularity {popularity},"
                           f" reuse {reuse})")
