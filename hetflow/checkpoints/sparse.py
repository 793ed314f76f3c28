"""Synthetic models with true activation sparsity and a skewed neuron hotness.

`sparse_model("llama-1b-sparse", sparsity=0.9, hotness="zipf:1.1", seed=0)`
(also reachable as `hetflow.synthetic_model(...)`) gives a random model in which,
per token and layer, about `1 - sparsity` of the FFN neurons are active and
neuron i of a layer fires with a frequency that follows the hotness law. The
zeros are exact and come from the model's own computation: an inactive neuron's
ReLU input is negative, nothing is masked after the fact. This is what lets the
neuron-cluster strategy be benchmarked honestly without downloaded weights.
The figures it gives are those of *this* sparsity: real models' speed-ups
depend on their real sparsity (ReluLLaMA-7B 67%, ProSparse-7B 89%, Bamboo-7B
~85-90%, TurboSparse-Mistral 90%, OPT 96-98%; see docs/papers.md).

Construction (per layer, from the seed):
  * target frequencies p_i: `zipf:s` gives p = min(max_frequency, C / rank^s)
    over a random permutation of the neurons, with C set so that mean(p) =
    1 - sparsity; `uniform` gives p_i = 1 - sparsity.
  * the neuron-selecting projection (Llama's gate, OPT's fc1 = `up`) has
    columns in a random rank-`rank` subspace plus `noise` times a full-rank
    random column. Real FFN pre-activations are predictable from a low-rank
    view of the residual stream (that is why PowerInfer's low-rank predictors
    work); this makes the synthetic ones so too, by a knob.
  * a threshold per neuron: OPT uses fc1's bias. Llama has no FFN biases, so
    coordinate 0 of the residual stream is held at a constant (the embedding
    column is constant and the attention / FFN output projections write zero
    there), and the gate's row 0 turns it into a per-neuron bias. Because
    RMSNorm only rescales, "gate input > 0" is exactly a linear condition on
    the pre-norm residual. dReLU's up projection gets a positive offset the
    same way so that up > 0 almost always (active ~ gate fires).
  * thresholds are calibrated layer by layer on random prompts: each neuron's
    pre-activation is fitted by a Gaussian and its threshold put at the
    (1 - p_i) quantile, then all of a layer's thresholds are shifted by one
    common number of deviations so that the layer's firing fraction on the
    calibration tokens is the target exactly (the Gaussian fit alone drifted
    from 0.10 at layer 0 to ~0.157 in deep llama-1b layers). Density varies
    from prompt to prompt (a prompt's tokens share their attention context):
    on tiny models single prompts range 0.07-0.23 in the last layer, so a
    layer's density is within ~10% of the target over a few dozen prompts,
    not on every prompt; `tests/test_sparsity.py` measures it.

Calibration of a large shape generates every weight once (tens of seconds for
llama-1b); its result (two floats per neuron) is cached under
cache_root()/sparse (hetflow.memory.cache).
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
from scipy import special

from hetflow.checkpoints.synthetic import SHAPES, SyntheticSource
from hetflow.memory.cache import cache_root, cached_arrays
from hetflow.models.config import ModelConfig
from hetflow.models.model import Model
from hetflow.models.walk import normalize, walk

_VERSION = 2  # 2: per-layer shift to the exact target density
RESIDUAL_CONSTANT = 1.0  # value of the residual stream's constant coordinate (Llama)
UP_MARGIN = 3.0  # dReLU up offset, in standard deviations: P(up <= 0) ~ 0.1%


@dataclasses.dataclass(frozen=True)
class SparsitySpec:
  """How sparse a synthetic model is, and how predictable.

  Attributes:
    sparsity: target fraction of FFN neurons that are zero per token.
    hotness: per-neuron firing-frequency law: "zipf:<s>" (rank^-s) or
      "uniform".
    rank: rank of the subspace the neuron-selecting projection lives in
      (None: hidden_size // 32, at least 4). Predictors of rank >= 2 * rank
      can represent the active set of a Llama model exactly when noise = 0.
    noise: weight of a full-rank random component in those columns (relative
      norm); makes prediction imperfect, as in real models.
    max_frequency: cap of the hottest neurons' firing frequency.
    calibration_tokens: random tokens the thresholds are calibrated on.
  """

  sparsity: float = 0.9
  hotness: str = "zipf:1.1"
  rank: int | None = None
  noise: float = 0.1
  max_frequency: float = 0.95
  calibration_tokens: int = 2048

  def __post_init__(self):
    if not 0.0 <= self.sparsity < 1.0:
      raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}.")
    parse_hotness(self.hotness)


def parse_hotness(hotness: str) -> float:
  """The Zipf exponent of a hotness law ("uniform" is exponent 0)."""
  if hotness == "uniform":
    return 0.0
  kind, _, value = hotness.partition(":")
  try:
    s = float(value)
  except ValueError:
    s = -1.0
  if kind != "zipf" or s < 0:
    raise ValueError(f"hotness must be 'uniform' or 'zipf:<s>' with s >= 0, got {hotness!r}.")
  return s


def zipf_frequencies(n: int, density: float, exponent: float, cap: float) -> np.ndarray:
  """p_r = min(cap, C r^-exponent) for ranks r = 1..n, with mean(p) = density."""
  if density >= cap:
    return np.full(n, cap)
  base = np.arange(1, n + 1, dtype=np.float64) ** -exponent
  lo, hi = 0.0, 1.0
  while np.minimum(cap, hi * base).mean() < density:
    hi *= 2
  for _ in range(100):  # bisection on C
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if np.minimum(cap, mid * base).mean() < density else (lo, mid)
  return np.minimum(cap, hi * base)


def low_rank_directions(rng: np.random.Generator, raw: np.ndarray, rank: int,
                        noise: float) -> np.ndarray:
  """Columns [D, F] in a random rank-`rank` subspace plus `noise` times `raw` (columns of
  norm ~1): a neuron-selecting projection that low-rank predictors can learn."""
  d, f = raw.shape
  basis, _ = np.linalg.qr(rng.standard_normal((d, rank), dtype=np.float32))
  coef = rng.standard_normal((rank, f), dtype=np.float32) / np.sqrt(rank)
  return (basis @ coef + np.float32(noise) * raw).astype(np.float32)


def fit_thresholds(z: np.ndarray, p: np.ndarray) -> np.ndarray:
  """Per-neuron thresholds [F] on pre-activations z [N, F] for frequencies p [F].

  A Gaussian fit per neuron sets the shape (tails of a few hundred samples
  are too noisy for p ~ 1e-3); one shift per layer, in units of each
  neuron's deviation, then makes the layer's firing fraction on these
  tokens equal the target exactly. The fit alone drifts with depth (0.10
  at layer 0 to ~0.157 in deep llama-1b layers): the pre-activations are
  not Gaussian there.
  """
  mean, std = z.mean(0), z.std(0) + 1e-12
  base = mean + std * np.sqrt(2.0) * special.erfinv(1.0 - 2.0 * p)
  target = float(p.mean())

  def density(shift):
    return float((z > base + shift * std).mean())

  lo, hi = -4.0, 4.0  # density falls as the shift grows
  for _ in range(40):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if density(mid) > target else (lo, mid)
  return base + hi * std


def sparse_config(name: str) -> ModelConfig:
  """The config of a "<shape>-sparse" name: Llama shapes get dReLU, OPT keeps ReLU."""
  if not name.endswith("-sparse") or name[:-len("-sparse")] not in SHAPES:
    known = sorted(n + "-sparse" for n, s in SHAPES.items() if s["arch"] in ("llama", "opt"))
    raise ValueError(f"unknown sparse synthetic model {name!r}; known: {known}.")
  shape = dict(SHAPES[name[:-len("-sparse")]])
  if shape["arch"] == "llama":
    shape["hidden_act"] = "drelu"
  elif shape["arch"] != "opt":
    raise ValueError(f"{name}: sparse synthetic models exist for Llama and OPT shapes only.")
  return ModelConfig(name=name, **shape)


def _rng(seed: int, *key) -> np.random.Generator:
  digest = hashlib.sha256(":".join(map(str, (seed, "sparse") + key)).encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class SparseSource:
  """A WeightSource whose FFN neurons fire sparsely (see the module docstring)."""

  def __init__(self, config: ModelConfig, seed: int, spec: SparsitySpec):
    self.config = config
    self.seed = seed
    self.spec = spec
    self.base = SyntheticSource(config, seed)
    d = config.hidden_size
    self.rank = spec.rank or max(4, d // 32)
    self._calibration: dict[str, np.ndarray] | None = None
    self._lock = threading.Lock()

  # -- the law ----------------------------------------------------------------

  def target_frequencies(self, layer: int) -> np.ndarray:
    """Per-neuron target firing frequency of `layer` [F] (float64)."""
    f = self.config.intermediate_size
    p = zipf_frequencies(f, 1.0 - self.spec.sparsity, parse_hotness(self.spec.hotness),
                         self.spec.max_frequency)
    return p[_rng(self.seed, "perm", layer).permutation(f).argsort()]  # neuron -> its rank's p

  def _directions(self, layer: int, raw: np.ndarray) -> np.ndarray:
    """Low-rank + noise columns [D, F] for the neuron-selecting projection."""
    return low_rank_directions(_rng(self.seed, "subspace", layer), raw, self.rank,
                               self.spec.noise)

  # -- tensors ----------------------------------------------------------------

  def get(self, name: str, dtype) -> np.ndarray:
    return self._tensor(name, calibrated=True).astype(dtype, copy=False)

  def _tensor(self, name: str, calibrated: bool) -> np.ndarray:
    array = self.base.get(name, np.float32)
    parts = name.split("/")
    leaf = parts[-1]
    llama = self.config.arch == "llama"
    if llama and name == "embed/tokens":
      array[:, 0] = RESIDUAL_CONSTANT
    elif llama and name.endswith("/attn/o"):
      array[:, 0] = 0.0
    elif name.endswith("/mlp/down") and llama:
      array[:, 0] = 0.0
    elif parts[0] == "layers" and parts[2] == "mlp":
      layer = int(parts[1])
      selector = "gate" if llama else "up"
      if leaf == selector:
        array = self._directions(layer, array)
      if llama and leaf in ("gate", "up"):
        array[0] = self.calibration()[leaf][layer] if calibrated else 0.0
      elif not llama and leaf == "up_bias" and calibrated:
        array = self.calibration()["up_bias"][layer].copy()
    return array

  def _group(self, group: str) -> dict[str, np.ndarray]:
    prefix = group + "/"
    return {n[len(prefix):]: self._tensor(n, calibrated=False)
            for n in self.base._shapes if n.startswith(prefix)}

  # -- calibration ------------------------------------------------------------

  def _cache_path(self) -> str:
    key = json.dumps([_VERSION, dataclasses.asdict(self.config), self.seed,
                      dataclasses.asdict(self.spec), self.rank], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(cache_root(), "sparse", f"{self.config.name}-{self.seed}-{digest}.npz")

  def calibration(self) -> dict[str, np.ndarray]:
    """Per-layer thresholds: {"gate", "up"} rows 0 (Llama) or {"up_bias"} (OPT), [L, F]."""
    with self._lock:
      if self._calibration is None:
        self._calibration = cached_arrays(self._cache_path(), self._calibrate)
      return self._calibration

  def _calibrate(self) -> dict[str, np.ndarray]:
    c = self.config
    t = min(128, c.max_position_embeddings)
    b = max(1, -(-self.spec.calibration_tokens // t))
    ids = _rng(self.seed, "calibration").integers(3, c.vocab_size, (b, t))
    out = {k: np.zeros((c.num_layers, c.intermediate_size), np.float32)
           for k in (("gate", "up") if c.arch == "llama" else ("up_bias",))}

    def on_ffn(layer, x, w):
      x = x.reshape(-1, c.hidden_size)
      p = self.target_frequencies(layer)
      if c.arch == "llama":
        scaled = x * w["norm"]  # sign(h . col) = sign(scaled . col): RMSNorm only rescales
        unit = scaled[0, 0]  # = norm[0] * RESIDUAL_CONSTANT on every token
        up = scaled @ w["up"]
        out["up"][layer] = (UP_MARGIN * up.std(0) - up.mean(0)) / unit
        thr = fit_thresholds(scaled @ w["gate"], p)  # row 0 of gate is still zero here
        out["gate"][layer] = -thr / unit
        w["gate"][0], w["up"][0] = out["gate"][layer], out["up"][layer]
      else:
        h = np.asarray(normalize(c, w, x))
        out["up_bias"][layer] = -fit_thresholds(h @ w["up"], p)
        w["up_bias"] = out["up_bias"][layer]
      return w

    walk(c, self._group, ids, on_ffn)
    return out


def sparse_model(name: str, sparsity: float = 0.9, hotness: str = "zipf:1.1", seed: int = 0,
                 dtype: Any = jnp.float32, **spec: Any) -> Model:
  """A synthetic model whose FFN activations are truly sparse.

  Args:
    name: "<shape>-sparse" for a Llama or OPT shape of hetflow.checkpoints.SHAPES,
      e.g. "llama-1b-sparse", "opt-6.7b-sparse", "llama-tiny-sparse".
    sparsity: fraction of FFN neurons that are zero per token (on average).
    hotness: "zipf:<s>" or "uniform" (see SparsitySpec).
    seed: same name, seed and spec give the same bits everywhere.
    dtype: compute dtype.
    **spec: further SparsitySpec fields (rank, noise, max_frequency, ...).

  Returns:
    A Model; `model.source.target_frequencies(layer)` gives the law it follows.
  """
  config = sparse_config(name)
  s = SparsitySpec(sparsity=sparsity, hotness=hotness, **spec)
  return Model(config=config, source=SparseSource(config, seed, s), dtype=dtype,
               description=f"synthetic {name} (seed {seed}, sparsity {sparsity}, {hotness})")
