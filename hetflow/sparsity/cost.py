"""The simulator's cost model of `neuron_cluster` (PowerInfer-2), from shapes only.

Prefill is dense: each layer's neuron records are streamed in chunks of half
the staging buffer (one large sequential read each, double-buffered) and
multiplied over the whole prompt, as `NeuronCluster._prefill` does.

Decode is sparse. Per layer and token:

  predict (oracle: gate/up over every neuron; trained: the low-rank predictor)
  -> expected active neurons, split into hot hits, cold hits and misses by a
     cache model -> read the misses (bundled: one record per neuron, runs of
     adjacent misses coalesced into one request; split: one 4 KiB-padded read
     per matrix per neuron) at the profile's disk bandwidth for that request
     size and queue depth -> compute the cached part while the reads land,
     then each of `pieces` pieces as it arrives (pipeline), or read everything
     one request at a time and then compute (no pipeline).

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
fires with (k / X) p_i. The strategy does not run MoE models, but
`shape_placement` plans one from shapes so that the model can still predict
it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from hetflow import calibration, costmodel, simulate
from hetflow.checkpoints.sparse import parse_hotness, zipf_frequencies
from hetflow.memory.budget import BudgetExceeded, format_bytes, parse_bytes
from hetflow.memory.buffers import round_up
from hetflow.sparsity.bundles import neuron_matrices
from hetflow.strategy import GroupPlacement, Placement

# A trained predictor reads more neurons than fire: at recall 0.98 the
# llama-1b-sparse predictors had precision 0.55-0.92 (WORKSPACE_NOTES.md,
# "Neuron-cluster benchmark"); assumed 0.8 where no measurement is given.
TRAINED_PRECISION = 0.8


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


# Published activation sparsities (shared/PAPERS.md). The hotness law is not
# published: Zipf with exponent 1.1 (the synthetic models' default) is assumed.
PUBLISHED_LAWS: dict[str, ActivationLaw] = {
    "turbosparse-mistral-7b": ActivationLaw(0.90, source="PAPERS.md: TurboSparse-Mistral-7B 90%"),
    "bamboo-7b": ActivationLaw(0.875, source="PAPERS.md: Bamboo-7B ~85-90% (midpoint)"),
    "turbosparse-mixtral-47b": ActivationLaw(
        0.85, source="PAPERS.md: TurboSparse-Mixtral-47B 85% per expert (97% overall)"),
}


def activation_law(model) -> ActivationLaw:
  """The law of a synthetic sparse model (its spec) or of a published model (by name).

  Raises:
    ValueError: when neither is known.
  """
  spec = getattr(model.source, "spec", None)
  if spec is not None and hasattr(spec, "sparsity"):
    return ActivationLaw(spec.sparsity, spec.hotness, spec.max_frequency,
                         f"synthetic {model.config.name}")
  name = model.config.name
  if name in PUBLISHED_LAWS:
    return PUBLISHED_LAWS[name]
  raise ValueError(f"no activation law for {name!r}: use a '-sparse' synthetic model or one"
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
                   admit_min: float = 1.5) -> CacheEstimate:
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
    hit = _lfu_hits(freq, hot, cold_slots, tokens, log1m, admit_decay, admit_min)
  elif tokens is None:
    hit = -np.expm1(horizon * log1m) if math.isfinite(horizon) else np.ones_like(freq)
  else:  # step t of a cold start remembers min(t, T) tokens
    steps = [min(t, horizon) for t in range(max(tokens, 1))]
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


def _lfu_hits(freq, hot, cold_slots, tokens, log1m, decay, admit_min) -> np.ndarray:
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
  steps = np.arange(max(tokens, 1))[:, None, None]
  return member * np.mean(-np.expm1(-steps * rate[None]), axis=0)


# -- the placement's settings -------------------------------------------------


def _settings(placement: Placement) -> dict[str, Any]:
  """neuron_cluster's sizes and options, from an mlp group's details."""
  for g, gp in placement.groups.items():
    if g.endswith("/mlp") and "record_nbytes" in gp.details:
      return gp.details
  raise ValueError("this neuron_cluster placement carries no sizes in its mlp groups' details"
                   " (made by an older plan()?).")


@dataclasses.dataclass(frozen=True)
class DecodeCounts:
  """Expected per-token reads of a plan's decode, summed over layers.

  Attributes:
    cache: the CacheEstimate (counts of truly active neurons).
    predicted_per_layer: [L] neurons the predictor selects.
    read_per_layer: [L] neurons read from disk.
    requests_per_layer: [L] read requests.
    predicted: neurons the predictor selects per token.
    read_neurons: neurons read from disk per token.
    disk_bytes: bytes read per token.
    requests: read requests per token.
    request_bytes: mean bytes per request.
  """

  cache: CacheEstimate
  predicted_per_layer: np.ndarray
  read_per_layer: np.ndarray
  requests_per_layer: np.ndarray
  predicted: float
  read_neurons: float
  disk_bytes: float
  requests: float
  request_bytes: float


def decode_counts(model, placement: Placement, tokens: int | None = None,
                  freq: np.ndarray | None = None, precision: float | None = None
                  ) -> DecodeCounts:
  """Expected neurons, bytes and requests read per decode token of a plan.

  Args:
    model: shapes and activation law.
    placement: a neuron_cluster placement (or `shape_placement`'s).
    tokens: cold-start decode steps to average over (None: steady state).
    freq: [L, N] firing probabilities to use instead of the model's law (e.g.
      the strategy's recorded statistics, hottest first).
    precision: share of predicted neurons that fire (default: 1 for the
      oracle; for a trained predictor, the per-layer precision its training
      measured (`predictor_quality` in the plan), else TRAINED_PRECISION).
  """
  s = _settings(placement)
  quality = s.get("predictor_quality") if s["predictor"] != "oracle" else None
  if freq is None:
    freq = layer_frequencies(model)
    if quality:
      # The law's shape, at the density each layer measured while training.
      density = np.asarray(quality["true_density"])[:, None]
      freq = np.minimum(freq * density / freq.mean(axis=1, keepdims=True), 1.0)
  if precision is None:
    if s["predictor"] == "oracle":
      precision = 1.0
    elif quality:
      precision = np.asarray(quality["precision"])
    else:
      precision = TRAINED_PRECISION
  cache = estimate_cache(freq, s["cache_slots"], s["hot_fraction"], s["cluster_size"], tokens,
                         s["coalesce"] and s["layout"] == "bundled",
                         s.get("admission", "all"), s.get("admit_decay", 0.9),
                         s.get("admit_min", 1.5))
  # Falsely predicted neurons do not fire, so they are not the hot ones: they
  # all miss, and coalesce as the true misses do. (On llama-1b-sparse this
  # reproduced the measured hot share of predicted neurons, 19.6%.)
  predicted = cache.active / precision
  read_l = cache.misses + (predicted - cache.active)
  requests_l = cache.requests * read_l / np.maximum(cache.misses, 1e-12)
  if s["layout"] == "split":  # bytes asked for; O_DIRECT transfers 4 KiB per row
    mats = len(neuron_matrices(model.config))
    row = model.config.hidden_size * np.dtype(model.dtype).itemsize * _weight_scale(model, s)
    nbytes, requests_l = read_l.sum() * mats * row, read_l * mats
  else:
    nbytes = read_l.sum() * s["record_nbytes"]
  requests = float(requests_l.sum())
  return DecodeCounts(cache, predicted, read_l, requests_l, float(predicted.sum()),
                      float(read_l.sum()),
                      float(nbytes), requests, float(nbytes / requests) if requests else 0.0)


def _neuron_bytes(model) -> int:
  """Bytes of weights one neuron's computation touches (its rows, unpadded)."""
  return len(neuron_matrices(model.config)) * model.config.hidden_size * np.dtype(model.dtype).itemsize


def _weight_scale(model, s: dict[str, Any]) -> float:
  """Stored bytes per weight relative to the model's dtype ("weight_bits" in the details:
  quantised weights that hetflow has no dtype for, e.g. PowerInfer-2's int4)."""
  bits = s.get("weight_bits")
  return bits / (8 * np.dtype(model.dtype).itemsize) if bits else 1.0


def _kernels_time(ctx, group: str, scale: float) -> float:
  """A layer half's compute with its kernels `scale` times their dtype's bytes."""
  half = group.split("/")[-1]
  seconds = sum(ctx.compute_time("device", scale * m.nbytes, m.num_params)
                for m in costmodel.group_matrices(ctx.model, group))
  if half == "attn":  # the KV cache keeps the compute dtype
    seconds += costmodel.attention_core_time(ctx.model, ctx.profile, "device", ctx.batch,
                                             ctx.tokens, ctx.context)
  return seconds * ctx.scale(half, "device")


def _disk_bw(profile, size: float, depth: int) -> float:
  # A reader may always keep fewer requests in flight, so where several
  # cores' I/O is slower (UFS's single command queue) one queue's rate holds.
  size = max(int(size), 4096)
  return max(profile.disk_bw(size, 1), profile.disk_bw(size, max(depth, 1)))


# -- the cost model -----------------------------------------------------------


@simulate.register_cost_model("neuron_cluster")
def neuron_cluster_events(ctx: simulate.PassContext) -> None:
  """Dense streamed prefill and sparse cached decode (see the module docstring).

  Reads neuron_cluster's sizes and options from the mlp groups' details
  (record_nbytes, cache_slots, predictor_nbytes, staging_nbytes, layout,
  coalesce, pipeline, io_depth, pieces, hot_fraction, cluster_size,
  admission, ...), and optionally: weight_bits (quantised weights),
  frequencies ([L, N] firing probabilities instead of the model's law) and
  cold_start_tokens (average over that many decode steps from an empty cold
  region instead of the steady state).
  """
  model, prof, pl = ctx.model, ctx.profile, ctx.placement
  c, s = model.config, _settings(pl)
  n_layers, mats = c.num_layers, len(neuron_matrices(model.config))
  n = neurons_per_layer(c)
  rec = s["record_nbytes"]
  q = _weight_scale(model, s)
  neuron = _neuron_bytes(model) * q
  mem_bw = prof.memory_bw
  cpu_bw = costmodel.matvec_bw(prof, "cpu", model.dtype)
  measured = calibration.measured(prof, model)
  per_byte = (1 / measured["gather_bw"] if measured and "gather_bw" in measured
              else 1 / cpu_bw + 1 / mem_bw)
  if ctx.phase == "decode":
    counts = decode_counts(model, pl, tokens=s.get("cold_start_tokens"),
                           freq=s.get("frequencies"))
    per_layer = [(float(counts.predicted_per_layer[i]), float(counts.read_per_layer[i]),
                  float(counts.requests_per_layer[i])) for i in range(n_layers)]
    predictor = (s["predictor_nbytes"] / n_layers if s["predictor"] != "oracle"
                 else (mats - 1) * c.hidden_size * n * np.dtype(model.dtype).itemsize)
  staging_cap = max(2, s["staging_nbytes"] // rec)
  prev = None
  for p in range(ctx.passes):
    ctx.pass_index = p
    prev = ctx.add("device", ctx.settings.pass_overhead_s, (prev,), "pass start",
                   overhead=False)
    for i in range(n_layers):
      prev = ctx.add("device", _kernels_time(ctx, f"layers/{i}/attn", q), (prev,), "attn", i)
      if ctx.phase != "decode":
        prev = _prefill_ffn(ctx, i, prev, n, rec, neuron, staging_cap)
        continue
      predicted, misses, requests = per_layer[i]
      pred = ctx.add("cpu", predictor / cpu_bw, (prev,), "predict", i)
      hits = predicted - misses
      # Gathered rows are copied (jnp.take) and then multiplied: at the rate
      # measured for this model where the profile has one (calibration).
      work = lambda k: k * neuron * per_byte  # noqa: E731
      if s["layout"] == "split":
        nbytes = misses * mats * round_up(int(c.hidden_size * np.dtype(model.dtype).itemsize * q))
        size = nbytes / max(misses * mats, 1e-12)
      else:
        nbytes = misses * rec
        size = nbytes / max(requests, 1e-12)
      depth = s["io_depth"] if s["pipeline"] else 1
      read_s = nbytes / _disk_bw(prof, size, depth) if nbytes else 0.0
      parts = []
      if s["pipeline"]:
        parts.append(ctx.add("cpu", work(hits), (pred,), "cached part", i))
        pieces = s["pieces"] if misses >= 1 else 0
        for _ in range(pieces):
          rd = ctx.add("disk", read_s / pieces, (pred,), "read misses", i, int(nbytes / pieces))
          parts.append(ctx.add("cpu", work(misses / pieces), (rd, parts[-1]), "missed part", i))
      else:
        rd = ctx.add("disk", read_s, (pred,), "read misses", i, int(nbytes))
        parts.append(ctx.add("cpu", work(predicted), (rd,), "compute", i))
      # Admitted records are copied into the cache pool.
      admit = misses * rec / mem_bw if s["cache_slots"] else 0.0
      prev = ctx.add("cpu", admit, tuple(parts), "sum + admit", i)
    params = c.embed_dim * c.vocab_size
    head = costmodel.matmul_time(prof, "device", q * params * np.dtype(model.dtype).itemsize,
                                 params, ctx.batch, model.dtype) * ctx.scale("head", "device")
    prev = ctx.add("device", head, (prev,), "head")


def _prefill_ffn(ctx, layer, prev, n, rec, neuron, staging_cap) -> int:
  """Dense FFN: chunks of half the staging buffer, read while the previous one computes."""
  c, prof = ctx.model.config, ctx.profile
  half = max(1, staging_cap // 2)
  chunks = [min(half, n - k) for k in range(0, n, half)]
  # An MoE token reaches k of X experts: that share of the neurons' FLOPs.
  share = c.experts_per_token / c.num_experts if c.num_experts else 1.0
  item = np.dtype(ctx.model.dtype).itemsize
  done: list[int] = []
  for k, m in enumerate(chunks):
    free = done[k - 2] if k >= 2 else None  # the staging half being refilled
    # One contiguous request per chunk, on one reader thread.
    rd = ctx.add("disk", m * rec / _disk_bw(prof, m * rec, 1), (prev if k == 0 else None, free),
                 "prefill read", layer, m * rec)
    comp = ctx.compute_time("cpu", m * neuron, share * m * neuron / item)
    done.append(ctx.add("cpu", comp, (rd, done[-1] if done else prev), "prefill ffn", layer))
  return done[-1]


# -- plans from shapes (models the strategy does not run) ----------------------


def shape_placement(model, budget, options: dict[str, Any] | None = None) -> Placement:
  """A neuron_cluster placement sized from shapes, for what the strategy does not run.

  That is MoE models, and quantised weights: `options` may add "weight_bits"
  (e.g. 4 for PowerInfer-2's int4) to NeuronClusterOptions' fields; weights
  (not the KV cache, not the predictor) are then sized and read at that width.

  Mirrors NeuronCluster.plan: the fixed region (everything but the neurons'
  rows), the predictor, the staging buffer and a KV reserve come first; the
  cache takes what the device budget leaves. Neurons are those of every
  expert (X * F per layer).

  Raises:
    BudgetExceeded: when the fixed region alone does not fit.
  """
  from strategies.neuron_cluster import NeuronClusterOptions

  options = dict(options or {})
  bits = options.pop("weight_bits", None)
  o = NeuronClusterOptions(**options)
  c = model.config
  item = np.dtype(model.dtype).itemsize
  wq = bits / 8 if bits else item  # bytes per stored weight
  mats = len(neuron_matrices(model.config))
  n = neurons_per_layer(c)
  record = round_up(int(mats * c.hidden_size * wq))
  neurons = mats * c.hidden_size * n * item
  # Everything but the neurons' rows, at the stored width (norms too: negligible).
  fixed = int((sum(model.group_nbytes(g) for g in model.group_names())
               - c.num_layers * neurons) * wq / item)
  if o.predictor == "oracle":
    predictor = c.num_layers * (mats - 1) * c.hidden_size * n * item
  else:  # rank D/16, as NeuronCluster plans an untrained one (float32)
    r = c.hidden_size // 16
    predictor = c.num_layers * (c.hidden_size * (r + 2) + r * (n + 1) + n) * 4
  staging = max(2, min(parse_bytes(o.staging_bytes) // record, n)) * record
  kv = (parse_bytes(o.kv_reserve_bytes) if o.kv_reserve_bytes is not None else
        2 * c.num_layers * c.num_kv_heads * c.head_dim * item
        * min(c.max_position_embeddings, 1024))
  need = fixed + predictor + staging + kv
  full = c.num_layers * n * record
  if budget.device is None:
    cache = full
  elif budget.device < need:
    raise BudgetExceeded("device", need, 0, budget.device,
                         group="fixed region + predictor + staging", minimum=need)
  else:
    cache = min(budget.device - need, full)
  if o.cache_bytes is not None:
    cache = min(cache, parse_bytes(o.cache_bytes))
  slots = cache // record
  details = dict(dataclasses.asdict(o), record_nbytes=record, row_stride=int(c.hidden_size * wq),
                 cache_slots=slots, predictor_nbytes=predictor, staging_nbytes=staging,
                 weight_bits=bits)
  groups = {g: (GroupPlacement("disk", model.group_nbytes(g), "neuron bundles + cache", details)
                if g.endswith("/mlp") else
                GroupPlacement("device", model.group_nbytes(g), "fixed region"))
            for g in model.group_names()}
  notes = (f"planned from shapes by hetflow.sparsity.cost (the strategy does not run"
           f" {c.arch}): cache {format_bytes(slots * record)} = {slots} neurons"
           f" ({slots / (c.num_layers * n):.1%} of all)",)
  return Placement("neuron_cluster", groups, working_bytes={
      "device": predictor + staging + slots * record}, notes=notes)


def memory_for_ffn_in_flash(name: str, fraction: float, dtype: str = "float16",
                            weight_bits: int | None = None) -> float:
  """GB of memory that leaves `fraction` of a named model's FFN weights in flash.

  The model's bytes minus that share of its FFN neurons' rows (shapes only),
  as PowerInfer-2 states its "50% of FFN weights in flash" setting; with
  `weight_bits`, every weight counted at that width.
  """
  from hetflow.checkpoints import synthetic_model
  from hetflow.config import DTYPES

  model = synthetic_model(name, dtype=DTYPES[dtype])
  c = model.config
  ffn = c.num_layers * len(neuron_matrices(model.config)) * c.hidden_size * neurons_per_layer(c)
  ffn *= np.dtype(model.dtype).itemsize
  total = sum(model.group_nbytes(g) for g in model.group_names())
  scale = weight_bits / (8 * np.dtype(model.dtype).itemsize) if weight_bits else 1.0
  return round(scale * (total - fraction * ffn) / 1e9, 2)
