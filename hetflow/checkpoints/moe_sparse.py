"""Synthetic Mixtral-shaped models with sparse (dReLU) experts, as TurboSparse-Mixtral.

`moe_sparse_model("mixtral-1b-sparse", sparsity=0.85, hotness="zipf:1.1",
popularity="zipf:0.5", reuse=0.45)` (also `hetflow.synthetic_model(...)`) gives a
random MoE model whose routers follow a stated law (hetflow/checkpoints/moe.py:
expert popularity and reuse of the previous token's experts) and whose experts are
dReLU FFNs (ReLU on gate and up) in which, per routed token, about `1 - sparsity`
of the expert's neurons fire, neuron i of expert e with a frequency that follows the
hotness law (hetflow/checkpoints/sparse.py). The zeros are exact and come from the
model's own computation (an inactive neuron's gate input is negative).

Published figures (TurboSparse, Song et al. 2024, arXiv 2406.05955, and PowerInfer-2,
Xue et al. 2024, arXiv 2406.06282, as docs/papers.md records them; not re-checked
here): TurboSparse-Mixtral-47B is Mixtral-8x7B converted to dReLU experts, about 85%
of each routed expert's neurons are zero per token (97% of all expert neurons, as a
token reaches 2 of 8 experts), 4.3B of its 47B parameters active per token. Neuron
hotness inside an expert is not published; Zipf(1.1) is the dense models' default.

Construction (per layer, calibrated layer by layer on random token sequences run
through the model itself, `hetflow.models.walk`):
  * the routers exactly as `hetflow.checkpoints.moe.MoESource` fits them (the
    residual stream's constant coordinate 0 carries the per-expert bias);
  * each expert's gate has columns in a random low-rank subspace plus noise
    (`sparse.low_rank_directions`: predictable by low-rank predictors), and its
    row 0 turns the constant coordinate into a per-neuron threshold, set by
    `sparse.fit_thresholds` on the FFN inputs of the tokens routed to that expert
    (the activation law is stated per routed token, so it is fitted on those);
    the up projection's row 0 is a positive offset so that up > 0 almost always
    (a neuron fires ~ its gate fires).
The thresholds are fitted on the calibration tokens routed to each expert (a few
hundred per expert), so a layer's density on fresh tokens lands near, not at, the
target; tests/test_moe_sparse.py measures it. The calibration (routers and rows)
is cached under cache_root()/moe_sparse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from hetflow.checkpoints.moe import MOE_SHAPES, MoESource, RoutingSpec, _topk, shared_lru_hit_rates
from hetflow.checkpoints.sparse import (
  UP_MARGIN,
  SparsitySpec,
  fit_thresholds,
  low_rank_directions,
  parse_hotness,
  zipf_frequencies,
)
from hetflow.checkpoints.synthetic import SHAPES
from hetflow.memory.cache import cache_root
from hetflow.models.config import ModelConfig
from hetflow.models.model import Model
from hetflow.models.walk import normalize, walk

_VERSION = 2  # 2: the cache also holds the measured LRU hit rates
SUFFIX = "-sparse"
# The routing fields of RoutingSpec and the expert fields of SparsitySpec a caller may set.
_ROUTING_FIELDS = {f.name for f in dataclasses.fields(RoutingSpec)}
_SPARSITY_FIELDS = {f.name for f in dataclasses.fields(SparsitySpec)} - {"calibration_tokens"}


def mixtral_shapes() -> dict[str, dict[str, Any]]:
  """The Mixtral shapes a "-sparse" MoE name may start with."""
  return {**{n: s for n, s in SHAPES.items() if s["arch"] == "mixtral"}, **MOE_SHAPES}


def is_moe_sparse_name(name: str) -> bool:
  """Whether `name` is "<a Mixtral shape>-sparse" (this module's models)."""
  return name.endswith(SUFFIX) and name[:-len(SUFFIX)] in mixtral_shapes()


def moe_sparse_config(name: str) -> ModelConfig:
  """The config of a "<Mixtral shape>-sparse" name: its experts get dReLU."""
  if not is_moe_sparse_name(name):
    raise ValueError(f"unknown sparse MoE model {name!r}; known: "
                     f"{sorted(n + SUFFIX for n in mixtral_shapes())}.")
  return ModelConfig(name=name, **dict(mixtral_shapes()[name[:-len(SUFFIX)]],
                                       hidden_act="drelu"))


def _rng(seed: int, *key) -> np.random.Generator:
  digest = hashlib.sha256(":".join(map(str, (seed, "moe_sparse") + key)).encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class SparseMoESource(MoESource):
  """A WeightSource with routed experts (MoESource) whose neurons fire sparsely.

  Attributes:
    spec: the RoutingSpec (what `strategies.moe_offload.routing_law` reads).
    sparsity: the SparsitySpec of every expert (`sparsity`, `hotness`, `rank`,
      `noise`, `max_frequency`; calibrated on `spec.calibration_tokens`).
  """

  def __init__(self, config: ModelConfig, seed: int, spec: RoutingSpec, sparsity: SparsitySpec):
    super().__init__(config, seed, spec)
    self.sparsity = sparsity
    self.rank = sparsity.rank or max(4, config.hidden_size // 32)

  def target_expert_frequencies(self, layer: int, expert: int) -> np.ndarray:
    """Per-neuron target firing frequency of `expert` of `layer` when routed to [F]."""
    f, s = self.config.intermediate_size, self.sparsity
    p = zipf_frequencies(f, 1.0 - s.sparsity, parse_hotness(s.hotness), s.max_frequency)
    return p[_rng(self.seed, "perm", layer, expert).permutation(f).argsort()]

  # -- tensors ----------------------------------------------------------------

  def get(self, name: str, dtype) -> np.ndarray:
    if name.endswith("/mlp/router"):
      return self.calibration()["routers"][int(name.split("/")[1])].astype(dtype)
    return self._sparse_tensor(name, calibrated=True).astype(dtype, copy=False)

  def _sparse_tensor(self, name: str, calibrated: bool) -> np.ndarray:
    array = self._tensor(name)
    leaf = name.rsplit("/", 1)[1]
    if "/mlp/" not in name or leaf not in ("gate", "up"):
      return array
    layer = int(name.split("/")[1])
    if leaf == "gate":  # [X, D, F]
      array = np.stack([low_rank_directions(_rng(self.seed, "subspace", layer, e), raw,
                                            self.rank, self.sparsity.noise)
                        for e, raw in enumerate(array)])
    array[:, 0] = self.calibration()[leaf][layer] if calibrated else 0.0
    return array

  def _group(self, group: str) -> dict[str, np.ndarray]:
    prefix = group + "/"
    return {n[len(prefix):]: self._sparse_tensor(n, calibrated=False)
            for n in self.base._shapes if n.startswith(prefix)}

  # -- calibration ------------------------------------------------------------

  def _cache_path(self) -> str:
    key = json.dumps([_VERSION, dataclasses.asdict(self.config), self.seed,
                      dataclasses.asdict(self.spec), dataclasses.asdict(self.sparsity),
                      self.rank], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(cache_root(), "moe_sparse",
                        f"{self.config.name}-{self.seed}-{digest}.npz")

  def _calibrate(self) -> dict[str, np.ndarray]:
    """MoESource's calibration, plus the "gate" and "up" rows 0 [L, X, F]."""
    c, s = self.config, self.spec
    n, k = c.num_experts, c.experts_per_token
    t = min(s.sequence_length, c.max_position_embeddings)
    b = max(2, -(-s.calibration_tokens // t))
    ids = _rng(self.seed, "calibration").integers(3, c.vocab_size, (b, t))
    out = {"routers": np.zeros((c.num_layers, c.hidden_size, n), np.float32),
           **{m: np.zeros((c.num_layers, n, c.intermediate_size), np.float32)
              for m in ("gate", "up")}}
    chosen = np.zeros((c.num_layers, b, t, n), bool)
    report = []

    def on_ffn(layer, x, w):
      h = np.asarray(normalize(c, w, x), np.float64)  # [B, T, D], what the router sees
      out["routers"][layer] = self._fit(layer, h, report)
      w["router"] = out["routers"][layer]
      chosen[layer] = _topk(h @ out["routers"][layer], k)
      routed = chosen[layer].reshape(-1, n)  # [N, X]
      flat = np.asarray(x, np.float32).reshape(-1, c.hidden_size)
      for e in range(n):
        # RMSNorm only rescales: sign(h . col) = sign((x * norm) . col), and coordinate 0
        # of x is the constant, so row 0 of gate and up acts as a per-neuron bias.
        scaled = flat[routed[:, e]] * w["norm"]
        if len(scaled) < 16:
          raise ValueError(f"{c.name} layer {layer}: expert {e} was routed {len(scaled)} of"
                           f" {len(flat)} calibration tokens, too few to fit its neurons;"
                           " raise calibration_tokens.")
        unit = scaled[0, 0]
        up = scaled @ w["up"][e]
        out["up"][layer, e] = (UP_MARGIN * up.std(0) - up.mean(0)) / unit
        thr = fit_thresholds(scaled @ w["gate"][e], self.target_expert_frequencies(layer, e))
        out["gate"][layer, e] = -thr / unit
        w["gate"][e, 0], w["up"][e, 0] = out["gate"][layer, e], out["up"][layer, e]
      return w

    walk(c, self._group, ids, on_ffn)
    self._report = {"layers": report}
    return {**out, "lru_hit_rates": shared_lru_hit_rates(chosen, s.warmup)}


def moe_sparse_model(name: str, sparsity: float = 0.85, hotness: str = "zipf:1.1",
                     popularity: str = "zipf:0.5", reuse: float = 0.45, seed: int = 0,
                     dtype: Any = jnp.float32, **spec: Any) -> Model:
  """A synthetic Mixtral-shaped model with routed dReLU experts whose neurons fire sparsely.

  Args:
    name: "<Mixtral shape>-sparse": "mixtral-1b-sparse", "mixtral-tiny-8e-sparse",
      "mixtral-tiny-sparse", ...
    sparsity: fraction of a routed expert's neurons that are zero per token (0.85:
      TurboSparse-Mixtral's, see the module docstring).
    hotness: neuron firing-frequency law inside each expert, "zipf:<s>" or "uniform".
    popularity: expert frequency law per layer (RoutingSpec).
    reuse: fraction of a token's experts the previous token also used (RoutingSpec).
    seed: same name, seed and spec give the same bits everywhere.
    dtype: compute dtype.
    **spec: further RoutingSpec fields (calibration_tokens, strict, ...) and
      SparsitySpec fields (rank, noise, max_frequency).

  Returns:
    A Model; `model.source.spec` states the routing targets, `model.source.sparsity`
    the experts' law, `model.source.target_expert_frequencies(i, e)` expert e's.
  """
  unknown = set(spec) - _ROUTING_FIELDS - _SPARSITY_FIELDS
  if unknown:
    raise TypeError(f"unexpected arguments {sorted(unknown)} for {name!r}; expected fields"
                    f" of RoutingSpec {sorted(_ROUTING_FIELDS)} or SparsitySpec"
                    f" {sorted(_SPARSITY_FIELDS)}.")
  routing = RoutingSpec(popularity=popularity, reuse=reuse,
                        **{k: v for k, v in spec.items() if k in _ROUTING_FIELDS})
  experts = SparsitySpec(sparsity=sparsity, hotness=hotness,
                         calibration_tokens=routing.calibration_tokens,
                         **{k: v for k, v in spec.items() if k in _SPARSITY_FIELDS})
  config = moe_sparse_config(name).replace(sliding_window=routing.drift_window)
  return Model(config=config, source=SparseMoESource(config, seed, routing, experts),
               dtype=dtype,
               description=f"synthetic {name} (seed {seed}, sparsity {sparsity}, {hotness},"
                           f" popularity {popularity}, reuse {reuse})")
