"""Activation predictors: which FFN neurons will fire, before their weights are read.

`LowRankPredictor` is PowerInfer's: per layer fc1 (D -> r) -> ReLU -> fc2
(r -> F) on the residual stream before the FFN norm; a neuron is predicted
active when its logit exceeds a per-layer threshold, set on held-out data so
that recall reaches a target. The rank r is chosen per layer: the smallest of
the candidates whose predicted density at that recall is close enough to the
true density. Trained with optax, saved and restored with orbax.

A layer may instead hold an exact linear predictor (`exact_gate_params`): for
an RMSNorm model with dReLU a neuron can fire only where its gate input is
positive, and RMSNorm only rescales, so sign(x . (norm * gate column)) on the
pre-norm residual predicts the gate exactly (recall 1; precision = P(up > 0)).
It costs D x F floats, so it is for the layers the low-rank MLP predicts badly
(layer 0 of the synthetic models: its input is mostly the token's random
embedding, outside the low-rank subspace).

Thresholds and reports come from validation samples, which should be what
the runtime sees: decode-step inputs (`experiments.train_predictor` records
them from greedy generations), not only prefill activations of calibration
prompts (precision there was 0.8-0.9 against 0.4-0.5 on decode inputs).

`OraclePredictor` computes the true active set from the layer's own gate/up
weights: exact, the upper bound, and what the invariance tests use.

Both expose `predict(layer, x, h) -> [B, T, F] bool` (jax) in the neuron order
given by `permute` (the bundle store's hot-first order).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hetflow.models.config import ModelConfig
from hetflow.sparsity.stats import Samples, firing


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  """How predictors are trained.

  Attributes:
    ranks: candidate ranks r, tried in increasing order per layer.
    target_recall: recall the per-layer threshold is set to reach.
    max_density_ratio: accept the smallest rank whose predicted density is at
      most this times the true density (else keep the best rank tried).
    steps: optimiser steps per layer and rank.
    batch_size: tokens per step.
    learning_rate: Adam's.
    positive_weight: weight of firing neurons in the loss (recall matters
      more than precision: a missed neuron changes the output).
    validation_fraction: held-out share of the tokens for threshold and report
      (when no separate validation samples are given).
    seed: initialisation and batching.
    exact_layers: layers given the exact gate predictor instead (Llama with
      dReLU only; needs the layer's weights, see `exact_gate_params`).
    method: "mlp" trains PowerInfer's low-rank MLP on the samples; "svd"
      takes the rank-r truncated SVD of the exact gate map (Llama dReLU only;
      needs the weights): no training, so no distribution shift to learn,
      only the threshold is set on the validation samples.
  """

  ranks: tuple[int, ...] = (32, 64, 128, 256)
  target_recall: float = 0.99
  max_density_ratio: float = 1.5
  steps: int = 400
  batch_size: int = 256
  learning_rate: float = 3e-3
  positive_weight: float = 4.0
  validation_fraction: float = 0.2
  seed: int = 0
  exact_layers: tuple[int, ...] = ()
  method: str = "mlp"


@dataclasses.dataclass
class LayerReport:
  """Held-out quality of one layer's predictor.

  Attributes:
    rank: chosen r.
    recall: fraction of firing neurons predicted.
    precision: fraction of predicted neurons that fire.
    predicted_density: fraction of neurons predicted active per token.
    true_density: fraction that fire.
  """

  rank: int
  recall: float
  precision: float
  predicted_density: float
  true_density: float


def _forward(p, x):
  if "exact" in p:  # exact gate predictor: a linear map, threshold 0
    return x @ p["exact"]
  if "u" in p:  # truncated SVD of the exact gate map
    return (x @ p["u"]) @ p["v"]
  z = (x - p["mean"]) * p["inv_std"]
  return jax.nn.relu(z @ p["fc1"] + p["b1"]) @ p["fc2"] + p["b2"]


class LowRankPredictor:
  """Per-layer low-rank MLP predictors.

  Attributes:
    params: per layer {"mean", "inv_std", "fc1", "b1", "fc2", "b2"} (numpy).
    thresholds: per layer logit threshold.
    reports: per layer LayerReport (from training), or None.
  """

  kind = "low_rank"

  def __init__(self, params: list[dict[str, np.ndarray]], thresholds: Sequence[float],
               reports: list[LayerReport] | None = None):
    self.params = params
    self.thresholds = [float(t) for t in thresholds]
    self.reports = reports
    self._device: list[dict[str, jax.Array]] | None = None
    self._fn = jax.jit(lambda p, x, t: _forward(p, x) > t)
    self._score_fn = jax.jit(_forward)

  def nbytes(self) -> int:
    return sum(a.nbytes for p in self.params for a in p.values())

  @property
  def ranks(self) -> list[int]:
    """Per layer rank (0 for an exact gate layer)."""
    return [int(p["fc1"].shape[1]) if "fc1" in p else int(p["u"].shape[1]) if "u" in p else 0
            for p in self.params]

  def place(self, sharding, permute: np.ndarray | None = None) -> None:
    """Puts the weights on a device, output columns in `permute`'s order [L, F]."""
    out = []
    for i, p in enumerate(self.params):
      p = dict(p)
      if permute is not None and "exact" in p:
        p["exact"] = p["exact"][:, permute[i]]
      elif permute is not None and "v" in p:
        p["v"] = p["v"][:, permute[i]]
      elif permute is not None:
        p["fc2"], p["b2"] = p["fc2"][:, permute[i]], p["b2"][permute[i]]
      out.append(jax.device_put(p, sharding))
    self._device = out

  def predict(self, layer: int, x, h=None, margin: float = 0.0):
    """[B, T, F] bool from the pre-norm residual x [B, T, D]; `margin` raises the
    threshold by that fraction of its magnitude (a stricter guess)."""
    del h
    t = self.thresholds[layer]
    return self._fn(self._device[layer], x, t + margin * abs(t))

  def scores(self, layer: int, x):
    """[B, T, F] float logits (what `predict` thresholds) from the pre-norm residual x."""
    return self._score_fn(self._device[layer], x)

  @property
  def linear_layers(self) -> list[bool]:
    """Per layer: its logits approximate x . (norm * gate) (SVD or exact gate), the
    exact target `ErrorFeedback` corrects them with."""
    return ["u" in p or "exact" in p for p in self.params]

  def save(self, path: str) -> None:
    """Writes an orbax checkpoint of the weights and a JSON of thresholds/reports."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    tree = {str(i): p for i, p in enumerate(self.params)}
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(os.path.join(path, "weights"), tree, force=True)
    meta = {"thresholds": self.thresholds, "nbytes": self.nbytes(),
            "ranks": self.ranks,
            "reports": [dataclasses.asdict(r) for r in self.reports] if self.reports else None}
    with open(os.path.join(path, "predictor.json"), "w") as f:
      json.dump(meta, f, indent=1)

  @classmethod
  def load(cls, path: str) -> "LowRankPredictor":
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    meta_path = os.path.join(path, "predictor.json")
    if not os.path.exists(meta_path):
      raise FileNotFoundError(
          f"no trained predictor at {path} ({meta_path} is missing); train one with"
          " `python -m experiments.train_predictor --config=configs/sparse/<model>.py`"
          " or use predictor='oracle'.")
    with open(meta_path) as f:
      meta = json.load(f)
    with ocp.StandardCheckpointer() as ckpt:
      tree = ckpt.restore(os.path.join(path, "weights"))
    params = [{k: np.asarray(v) for k, v in tree[str(i)].items()}
              for i in range(len(meta["thresholds"]))]
    reports = [LayerReport(**r) for r in meta["reports"]] if meta["reports"] else None
    return cls(params, meta["thresholds"], reports)


class ErrorFeedback:
  """A linear predictor's error, measured where it can be, fed back one token later.

  A low-rank gate predictor misses the gate map's other directions; its error
  on neuron j is x . r_j, and the residual stream x changes little from one
  decode token to the next, so neither does the error. Each record the sparse
  step multiplies yields its exact pre-activation (`bundles.planar_step(...,
  pre=True)`) for free; the difference from the predictor's score is this
  neuron's error, added to its score at the next token. Neurons so corrected
  are thresholded near the exact boundary (`known_margin`), the others at the
  trained threshold. On llama-1b-sparse (WORKSPACE_NOTES.md, issue 13) this cut
  the bytes of false positives read by three quarters at a higher recall.

  Units: the predictor scores x . (norm * gate) on the pre-norm residual; the
  step sees h . gate = that / s with s = sqrt(mean(x^2) + eps) (RMSNorm), so
  errors are kept in the step's units and scaled by each token's s.

  Attributes:
    err: [L, F] the last measured error per neuron (step units).
    known: [L, F] whether a neuron's error was measured since `reset`.
  """

  def __init__(self, num_layers: int, num_neurons: int):
    self.err = np.zeros((num_layers, num_neurons), np.float32)
    self.known = np.zeros((num_layers, num_neurons), bool)
    self._score = np.zeros((num_layers, num_neurons), np.float32)
    self._scale = np.ones(num_layers, np.float32)

  @property
  def nbytes(self) -> int:
    return self.err.nbytes + self.known.nbytes + self._score.nbytes + self._scale.nbytes

  def reset(self) -> None:
    """Forgets every error (a new sequence: its residual stream is another)."""
    self.known[:] = False

  def select(self, layer: int, score: np.ndarray, scale: float, threshold: float,
             margin: float, known_margin: float) -> np.ndarray:
    """Positions predicted active at this token.

    Args:
      layer: the layer.
      score: [F] the predictor's scores at this token.
      scale: this token's s (see the class).
      threshold: the layer's trained threshold t.
      margin: t raised by margin * |t| for neurons without a measured error.
      known_margin: neurons with one fire when score + s * err > known_margin * |t|.

    Returns:
      Sorted positions.
    """
    self._score[layer], self._scale[layer] = score, scale
    corrected = score + scale * self.err[layer]
    keep = np.where(self.known[layer], corrected > known_margin * abs(threshold),
                    score > threshold + margin * abs(threshold))
    return np.flatnonzero(keep)

  def rank(self, layer: int, score: np.ndarray, scale: float, threshold: float,
           margin: float) -> np.ndarray:
    """A guess at `layer`'s active neurons from scores on another input (the look-ahead:
    the layer before's), surest first: positions whose score (corrected where the error
    is known, against the exact boundary; else against t) clears the boundary by more
    than margin * |t|, by decreasing clearance. Leaves `select`'s state alone."""
    corrected = score + scale * self.err[layer]
    clearance = np.where(self.known[layer], corrected, score - threshold) - margin * abs(threshold)
    keep = np.flatnonzero(clearance > 0)
    return keep[np.argsort(-clearance[keep], kind="stable")]

  def observe(self, layer: int, positions: np.ndarray, pre: np.ndarray) -> None:
    """Records the exact pre-activations `pre` of the neurons at `positions`
    (-1: none) computed at the token `select` last scored."""
    ok = positions >= 0
    p = positions[ok]
    self.err[layer, p] = pre[ok] - self._score[layer, p] / self._scale[layer]
    self.known[layer, p] = True


class OraclePredictor:
  """The true active set, computed from the layer's gate/up (needs those weights)."""

  kind = "oracle"

  def __init__(self, config: ModelConfig, weights: list[dict[str, np.ndarray]],
               threshold: float = 0.0):
    """Args: weights: per layer the leaves "gate"/"up" (+ biases) [D, F]."""
    self.config = config
    self.weights = weights
    self.threshold = threshold
    self._device = None
    self._fn = firing(config, threshold)

  def nbytes(self) -> int:
    weights = self.weights if self.weights is not None else self._device
    return sum(a.nbytes for w in weights for a in w.values())

  def place(self, sharding, permute: np.ndarray | None = None) -> None:
    out = []
    for i, w in enumerate(self.weights):
      if permute is not None:
        w = {k: v[..., permute[i]] for k, v in w.items()}
      out.append(jax.device_put(w, sharding))
    self._device = out
    self.weights = None  # the placed copy is the one that counts

  def predict(self, layer: int, x, h, margin: float = 0.0):
    del x, margin  # exact: nothing to tighten
    return self._fn(self._device[layer], h)


def exact_gate_params(config: ModelConfig, mlp: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The exact gate predictor of one Llama dReLU layer from its mlp leaves."""
  if config.arch != "llama" or config.hidden_act != "drelu":
    raise ValueError("exact gate predictors need a Llama model with dReLU (gate > 0 is"
                     " then necessary for firing).")
  return {"exact": (mlp["norm"][:, None] * mlp["gate"]).astype(np.float32)}


def svd_params(exact: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
  """Rank-`rank` truncation of an exact gate predictor (x @ u @ v ~ x @ exact).

  u = U S and v = V^T of the top `rank` singular triplets, from the eigenvectors of the
  smaller Gram matrix (D x D for a [D, F] map with D < F): the same truncation as the
  SVD's, ~4x faster (24 s -> 6 s for one 1024 x 2816 expert on a loaded core here, and
  mixtral-1b-sparse has 128 of them). Columns of a higher rank's u and rows of its v
  extend a lower rank's.
  """
  w = exact["exact"].astype(np.float64)
  rank = min(rank, *w.shape)
  if w.shape[0] <= w.shape[1]:
    val, vec = np.linalg.eigh(w @ w.T)
    vec = vec[:, ::-1][:, :rank]  # U, by decreasing singular value
    sv = np.sqrt(np.maximum(val[::-1][:rank], 0.0))
    u, v = vec * sv, (vec.T @ w) / np.maximum(sv, 1e-30)[:, None]
  else:
    val, vec = np.linalg.eigh(w.T @ w)
    vec = vec[:, ::-1][:, :rank]  # V
    u, v = w @ vec, vec.T
  return {"u": u.astype(np.float32), "v": v.astype(np.float32)}


def _fit_threshold(p, x_va, y_va, rank, options):
  logits = np.asarray(jax.jit(_forward)(p, jnp.asarray(x_va)))
  pos = logits[y_va]
  # The (1 - target_recall) quantile of the firing neurons' scores: the
  # highest threshold (so the best precision) that reaches the target.
  thr = float(np.quantile(pos, 1.0 - options.target_recall)) if pos.size else 0.0
  return thr, evaluate(p, thr, x_va, y_va, rank)


def evaluate(p: dict[str, np.ndarray], threshold: float, x: np.ndarray, y: np.ndarray,
             rank: int = 0) -> LayerReport:
  """Recall, precision and densities of one layer's predictor on (x [N, D], y [N, F])."""
  pred = np.asarray(jax.jit(_forward)(p, jnp.asarray(x))) > threshold
  tp = (pred & y).sum()
  return LayerReport(rank=rank, recall=float(tp / max(y.sum(), 1)),
                     precision=float(tp / max(pred.sum(), 1)),
                     predicted_density=float(pred.mean()), true_density=float(y.mean()))


def _train_layer(x_tr, y_tr, x_va, y_va, rank: int, options: TrainOptions, key):
  n, d = x_tr.shape
  f = y_tr.shape[1]
  mean = x_tr.mean(0)
  inv_std = 1.0 / (x_tr.std(0) + 1e-6)
  k1, k2, key = jax.random.split(key, 3)
  params = {
      "mean": jnp.asarray(mean), "inv_std": jnp.asarray(inv_std),
      "fc1": jax.random.normal(k1, (d, rank)) / np.sqrt(d), "b1": jnp.zeros(rank),
      "fc2": jax.random.normal(k2, (rank, f)) / np.sqrt(rank),
      "b2": jnp.full(f, -1.0),
  }
  frozen = ("mean", "inv_std")
  opt = optax.adam(options.learning_rate)
  trainable = {k: v for k, v in params.items() if k not in frozen}
  state = opt.init(trainable)
  fixed = {k: params[k] for k in frozen}
  w_pos = options.positive_weight

  def loss_fn(tr, x, y):
    logits = _forward({**fixed, **tr}, x)
    loss = optax.sigmoid_binary_cross_entropy(logits, y)
    return jnp.mean(loss * jnp.where(y > 0, w_pos, 1.0))

  @jax.jit
  def step(tr, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(tr, x, y)
    updates, state = opt.update(grads, state, tr)
    return optax.apply_updates(tr, updates), state, loss

  x_tr_j, y_tr_j = jnp.asarray(x_tr), jnp.asarray(y_tr, jnp.float32)
  rng = np.random.default_rng(options.seed)
  bs = min(options.batch_size, n)
  for _ in range(options.steps):
    idx = rng.integers(0, n, bs)
    trainable, state, _ = step(trainable, state, x_tr_j[idx], y_tr_j[idx])
  params = {k: np.asarray(v) for k, v in {**fixed, **trainable}.items()}
  thr, report = _fit_threshold(params, x_va, y_va, rank, options)
  return params, thr, report


def train_predictors(samples: Samples, options: TrainOptions = TrainOptions(),
                     progress: Callable[[str], None] | None = print,
                     validation: Samples | None = None,
                     exact: dict[int, dict[str, np.ndarray]] | None = None
                     ) -> LowRankPredictor:
  """Trains one low-rank predictor per layer on recorded (input, active) pairs.

  Args:
    samples: from record_activations(..., samples=True).
    options: TrainOptions.
    progress: called with one line per layer and rank (None: silent).
    validation: held-out pairs the threshold is set on and the reports come
      from (decode-step inputs, as the runtime sees them); None holds out
      `validation_fraction` of `samples`.
    exact: layer -> exact_gate_params, for `options.exact_layers` and for
      every layer with method "svd".

  Returns:
    A LowRankPredictor with per-layer held-out reports.
  """
  params, thresholds, reports = [], [], []
  key = jax.random.key(options.seed)
  for layer, (x, y) in enumerate(zip(samples.inputs, samples.active)):
    if validation is not None:
      x_tr, y_tr = x, y
      x_va, y_va = validation.inputs[layer], validation.active[layer]
    else:
      n = x.shape[0]
      perm = np.random.default_rng(options.seed + layer).permutation(n)
      n_va = max(1, int(n * options.validation_fraction))
      va, tr = perm[:n_va], perm[n_va:]
      x_tr, y_tr, x_va, y_va = x[tr], y[tr], x[va], y[va]
    if layer in options.exact_layers:
      if not exact or layer not in exact:
        raise ValueError(f"exact_layers has {layer}: pass its exact_gate_params.")
      rep = evaluate(exact[layer], 0.0, x_va, y_va)
      if progress:
        progress(f"layer {layer:3d} exact gate: recall {rep.recall:.3f} precision"
                 f" {rep.precision:.3f} predicted density {rep.predicted_density:.3f}"
                 f" (true {rep.true_density:.3f})")
      params.append(exact[layer])
      thresholds.append(0.0)
      reports.append(rep)
      continue
    best = full = None
    for rank in sorted(options.ranks):
      key, sub = jax.random.split(key)
      if options.method == "svd":
        if not exact or layer not in exact:
          raise ValueError(f"method 'svd' needs layer {layer}'s exact_gate_params.")
        if full is None:  # one decomposition per layer, truncated for each rank
          full = svd_params(exact[layer], max(options.ranks))
        p = {"u": full["u"][:, :rank], "v": full["v"][:rank]}
        thr, rep = _fit_threshold(p, x_va, y_va, rank, options)
      else:
        p, thr, rep = _train_layer(x_tr, y_tr, x_va, y_va, rank, options, sub)
      if progress:
        progress(f"layer {layer:3d} rank {rank:5d}: recall {rep.recall:.3f} precision"
                 f" {rep.precision:.3f} predicted density {rep.predicted_density:.3f}"
                 f" (true {rep.true_density:.3f})")
      if best is None or rep.predicted_density < best[2].predicted_density:
        best = (p, thr, rep)
      if rep.predicted_density <= options.max_density_ratio * rep.true_density:
        best = (p, thr, rep)
        break
    params.append(best[0])
    thresholds.append(best[1])
    reports.append(best[2])
  return LowRankPredictor(params, thresholds, reports)
