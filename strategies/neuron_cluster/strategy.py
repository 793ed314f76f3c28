"""`neuron_cluster`: PowerInfer-2's strategy for models whose FFNs are sparse.

The fixed region (embeddings, head, attention, norms, KV cache) lives on the
device tier. FFN neurons live on disk in a neuron-bundle store (hottest first)
and in a segmented cache (hot clusters + cold neuron LRU) sized by what the
budget leaves. Prefill runs dense: each layer's FFN is streamed in large
sequential reads, double-buffered. Decode runs sparse, per layer:

  predict -> split the active set into cached and missing -> issue reads for
  the missing records (coalesced runs, `io_depth` in flight) -> compute the
  cached part while they land -> compute each piece of the missing part as
  its reads complete -> sum -> admit the recently active new records to the
  cold region (scan-resistant: a token's misses outnumber the region).

Static shapes: active-set sizes are padded to power-of-two buckets, so decode
compiles a handful of shapes. With the oracle predictor on a model with true
zeros the result equals `resident`'s (up to float summation order); with a
trained predictor, missed neurons are an approximation that the stats and the
benchmark report (recall, token agreement); `audit=True` also computes the true
active set to count misses, false positives and the ideal bytes
(`experiments.sparse_audit`).

Not done: reading layer l+1's neurons while layer l computes. Its active set
is predicted from its own input, which exists only after layer l; a
look-ahead predictor (x_l -> active set of l+1) would be a second, less
accurate model.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
from typing import Any, Literal

import jax
import numpy as np

from hetflow.memory import bundle_store, tiers
from hetflow.memory.budget import parse_bytes
from hetflow.memory.buffers import aligned_empty, view_as
from hetflow.memory.cache import cache_root
from hetflow.memory.reader import ReaderPool, ReadError
from hetflow.models import modules
from hetflow.sparsity import bundles as bundles_mod
from hetflow.sparsity.cache import SegmentedCache
from hetflow.sparsity.predictor import LowRankPredictor, OraclePredictor
from hetflow.sparsity.stats import (
  ActivationStats,
  calibration_ids,
  check_sparse,
  record_activations,
)
from hetflow.strategy import NotApplicable, Placement, Strategy, StrategyStats, register_strategy
from strategies.neuron_cluster import cost


@dataclasses.dataclass(frozen=True)
class NeuronClusterOptions:
  """Options of `neuron_cluster`.

  Attributes:
    predictor: "oracle" computes the true active set from gate/up held in
      memory (exact; the upper bound; costs those bytes); "trained" loads a
      low-rank predictor from `predictor_path`.
    predictor_path: directory written by `experiments.train_predictor`.
    stats_path: activation statistics (.npz) that order neurons by hotness;
      None records them at load on `calibration_tokens` random tokens.
    calibration_tokens: tokens for recording statistics when stats_path is None.
    threshold: activation threshold for models without exact zeros (SiLU);
      None refuses them.
    store_dir: where the neuron-bundle store lives: missing or empty (it is
      written there), or holding this model's store for this order and layout
      (anything else is refused, never deleted); None: the cache
      (`hetflow.memory.bundle_store.default_store_dir`), reused across runs.
    layout: "bundled" (one record per neuron) or "split" (one read per matrix
      per neuron: the no-bundling ablation).
    coalesce: read runs of adjacent missing records with one request.
    cache_bytes: bytes of the neuron cache; None takes what the device budget
      leaves (all neurons if there is no budget); 0 disables the cache.
    hot_fraction: share of the cache given to the hot (cluster) region.
    cluster_size: neurons per hot cluster.
    hot_policy: "static" pins the hottest clusters (by calibration frequency)
      for good; "lru" also swaps a layer's most active uncached cluster in for
      the least recently used hot one when its recent activity is
      `swap_margin` times higher (one sequential read, counted as decode bytes).
    swap_margin: the hysteresis of "lru".
    admission: cold-region admission: "frequency" (scan-resistant: only
      recently active misses, a bounded number per step, never displacing a
      more active entry) or "all" (plain LRU; thrashes when a token's misses
      exceed the region).
    admit_decay: per-token decay of the activity counts admission uses.
    admit_min: activity a miss needs to be admitted (see SegmentedCache).
    pipeline: overlap reads with compute (reads in flight on `io_depth`
      threads, cached part computed meanwhile, missing part in `pieces`
      pieces as they land); False reads one request at a time, then computes.
    io_depth: reader threads (requests in flight).
    pieces: pieces the missing part is split into when pipelining.
    staging_bytes: the buffer missing records and prefill chunks are read into.
    kv_reserve_tokens: KV positions (batch 1) left for the engine's KV cache
      when sizing the neuron cache; None: the model's max positions.
    min_bucket: smallest padded active-set size.
    audit: also compute the true active set each decode step (the oracle,
      held outside the ledger: gate/up of every layer) to report per-layer
      recall/precision on decode inputs, missed neurons and the ideal bytes
      (truly active neurons not in the cache). For count measurements, not
      timed runs or budgeted memory.
  """

  predictor: Literal["oracle", "trained"] = "oracle"
  predictor_path: str | None = None
  stats_path: str | None = None
  calibration_tokens: int = 1024
  threshold: float | None = None
  store_dir: str | None = None
  layout: Literal["bundled", "split"] = "bundled"
  coalesce: bool = True
  cache_bytes: int | str | None = None
  hot_fraction: float = 0.5
  cluster_size: int = 32
  hot_policy: Literal["static", "lru"] = "static"
  swap_margin: float = 1.5
  admission: Literal["frequency", "all"] = "frequency"
  admit_decay: float = 0.9
  admit_min: float = 1.5
  pipeline: bool = True
  io_depth: int = 8
  pieces: int = 4
  staging_bytes: int | str = "64MiB"
  kv_reserve_tokens: int | None = None
  min_bucket: int = 16
  audit: bool = False

  def __post_init__(self):
    # Bad values are named here, not met as numpy errors while materialising.
    for name in ("cache_bytes", "staging_bytes"):
      value = getattr(self, name)
      if value is not None:
        try:
          parse_bytes(value)
        except ValueError as e:
          raise ValueError(f"{name}: {e}") from None
    for name, choices in (("predictor", ("oracle", "trained")), ("layout", ("bundled", "split")),
                          ("hot_policy", ("static", "lru")), ("admission", ("frequency", "all"))):
      if getattr(self, name) not in choices:
        raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {choices}.")
    for name in ("calibration_tokens", "cluster_size", "io_depth", "pieces", "min_bucket"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}; expected an int >= 1.")
    t = self.kv_reserve_tokens
    if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 0):
      raise ValueError(f"kv_reserve_tokens={t!r}; expected an int >= 0 or None.")
    if not 0 <= self.hot_fraction <= 1:
      raise ValueError(f"hot_fraction={self.hot_fraction!r}; expected a fraction in [0, 1].")


def read_predictor_quality(options: NeuronClusterOptions) -> cost.PredictorQuality | None:
  """A trained predictor's size and per-layer quality from its predictor.json, or
  None (the oracle, or a predictor not trained yet)."""
  if options.predictor != "trained":
    return None
  if not options.predictor_path:
    raise ValueError("predictor='trained' needs predictor_path (experiments.train_predictor).")
  meta = os.path.join(options.predictor_path, "predictor.json")
  if not os.path.exists(meta):
    return None
  with open(meta) as f:
    trained = json.load(f)
  reports = trained.get("reports") or []
  return cost.PredictorQuality(
      nbytes=int(trained["nbytes"]),
      true_density=tuple(r["true_density"] for r in reports) or None,
      precision=tuple(r["precision"] for r in reports) or None)


def _bucket(n: int, smallest: int) -> int:
  return max(smallest, 1 << max(0, (n - 1).bit_length()))


def _pad(a: np.ndarray, size: int) -> np.ndarray:
  out = np.zeros(size, np.int32)
  out[:len(a)] = a
  return out


@register_strategy("neuron_cluster")
class NeuronCluster(Strategy):
  """Sparse decode from a neuron-bundle store through a segmented cache."""

  Options = NeuronClusterOptions

  # -- planning ---------------------------------------------------------------

  @classmethod
  def candidates(cls, model, budget):
    """For the planner: the exact oracle predictor, and a trained low-rank one
    (at $HETFLOW_CACHE/predictors/<model name>; until one is trained there,
    plan() sizes it at rank D/16). plan() refuses dense (SiLU) and MoE models
    with a ValueError, which the planner reports as "not applicable"."""
    path = os.path.join(cache_root(), "predictors", model.config.name)
    return [NeuronClusterOptions(), NeuronClusterOptions(predictor="trained", predictor_path=path)]

  def __init__(self, options: Any = None):
    super().__init__(options)
    # A trained predictor's size and measured quality, read once here so that
    # plan() stays pure; None until one is trained (plan() then sizes it).
    self._trained = read_predictor_quality(self.options)

  def plan(self, model, budget, profile=None) -> Placement:
    c, o = model.config, self.options
    if not model.format.plain:  # its bundles would need format-aware code (issue 11)
      raise NotApplicable("neuron_cluster runs float32 weights only; this model has"
                          f" weights={model.weights!r}. Use resident or layerwise, or load"
                          " it with weights='float32'.")
    try:
      check_sparse(c, o.threshold)
    except ValueError as e:
      raise NotApplicable(str(e)) from None
    if c.num_experts:
      raise NotApplicable("neuron_cluster runs dense-FFN models only; MoE models are planned"
                          " from shapes (strategies.neuron_cluster.cost.shape_placement).")
    if not c.do_layer_norm_before:
      raise NotApplicable("neuron_cluster supports pre-LN models only (not OPT-350m).")
    notes = ()
    if o.predictor == "trained" and self._trained is None:
      notes = (f"needs: a trained predictor at {o.predictor_path} (sized here as rank"
               " D/16; python -m experiments.train_predictor)",)
    sizes = cost.plan_sizes(model, o, trained=self._trained)
    return cost.make_placement(model, budget, o, sizes, trained=self._trained, notes=notes)

  cost_model = staticmethod(cost.events)

  # -- materialising ----------------------------------------------------------

  def materialize(self, placement, model, ledger) -> None:
    c, o = model.config, self.options
    self.model, self.config = model, c
    sizes: cost.Sizes = placement.settings.sizes
    self.mats = bundles_mod.neuron_matrices(c)
    sharding = tiers.device_sharding()
    self._threshold = check_sparse(c, o.threshold)

    # Statistics and order.
    if o.stats_path:
      self.activation_stats = ActivationStats.load(o.stats_path)
    else:
      ids = calibration_ids(c, o.calibration_tokens)
      self.activation_stats, _ = record_activations(model, ids, o.threshold)
    order = self.activation_stats.hot_order()
    self.frequency = np.take_along_axis(self.activation_stats.frequency, order, axis=1)

    # Store.
    self.store = bundle_store.open_store(model, order, self.mats, o.layout, o.store_dir)
    ledger.allocate("disk", self.store.total_nbytes, "neuron store")

    # Fixed region.
    def put(group_leaves, name):
      nbytes = sum(a.nbytes for a in group_leaves.values())
      ledger.allocate("device", nbytes, name)
      return jax.device_put(group_leaves, sharding)

    self._fixed = {}
    for g in model.group_names():
      if g.endswith("/mlp"):
        leaves = model.group_tensors(g)
        layer = int(g.split("/")[1])
        small = {k: v for k, v in leaves.items() if k not in self.mats}
        for k in ("gate_bias", "up_bias"):
          if k in small:
            small[k] = small[k][order[layer]]
        self._fixed[g] = put(small, "fixed")
      else:
        self._fixed[g] = put(model.group_tensors(g), "fixed")

    # Predictor.
    def oracle():
      weights = []
      for i in range(c.num_layers):
        keys = [m for m in self.mats if m != "down"] + [
            m + "_bias" for m in self.mats if m != "down"]
        weights.append({k: model.tensor(f"layers/{i}/mlp/{k}") for k in keys
                        if f"layers/{i}/mlp/{k}" in model.shapes})
      p = OraclePredictor(c, weights, self._threshold)
      p.place(sharding, order)
      return p

    if o.predictor == "oracle":
      self.predictor = oracle()
    else:
      self.predictor = LowRankPredictor.load(o.predictor_path)
      self.predictor.place(sharding, order)
    ledger.allocate("device", self.predictor.nbytes(), "predictor")
    # Not in the ledger: an auditing instrument, not part of the system measured.
    self._truth = None
    if o.audit:
      self._truth = self.predictor if o.predictor == "oracle" else oracle()
    self._audit = np.zeros((c.num_layers, 4), np.int64)  # true pos, false pos, false neg, ideal

    # Staging and cache pool: aligned buffers that jax aliases (no copies).
    rec = self.store.record_nbytes
    self.record_elems = rec // np.dtype(model.dtype).itemsize
    ledger.allocate("device", sizes.staging, "staging")
    self.staging_cap = sizes.staging // rec
    self.staging = aligned_empty(sizes.staging)
    self.staging_jax = jax.device_put(
        view_as(self.staging, 0, (self.staging_cap, self.record_elems), model.dtype), sharding)
    self.num_slots = placement.settings.cache_slots
    ledger.allocate("device", self.num_slots * rec, "cache")
    self.pool = aligned_empty(max(self.num_slots, 1) * rec)
    self.pool_jax = jax.device_put(
        view_as(self.pool, 0, (max(self.num_slots, 1), self.record_elems), model.dtype),
        sharding)
    hot = int(self.num_slots * o.hot_fraction)
    self.cache = SegmentedCache(c.num_layers, c.intermediate_size, self.num_slots, hot,
                                o.cluster_size, o.admission, o.admit_decay, o.admit_min)
    self.reader = ReaderPool(o.io_depth)
    for index, (layer, cluster) in enumerate(self.cache.choose_hot(self.frequency)):
      first, positions = self.cache.place_hot(index, layer, cluster)
      reqs = self.store.requests(positions, o.coalesce)
      reqs = [(off, n, dst + first * rec) for off, n, dst in reqs]
      self.reader.read_many(self.store.file(layer), self.pool, reqs).result()
    self.reader.reset_stats()
    self.cache.counters = type(self.cache.counters)()

    self._build_functions()
    self._phase = "prefill"
    self._shapes: set[tuple] = set()
    self._new_shapes_per_token: list[int] = []
    self._fired: list[Any] = []
    self._staging_users: list[list[Any]] = [[], []]  # computations reading each half

  def _build_functions(self):
    c = self.config
    stride = self.store.row_stride // np.dtype(self.model.dtype).itemsize
    self._partial = jax.jit(functools.partial(bundles_mod.neuron_step, c, stride))
    self._norm = jax.jit(lambda w, x: modules._norm(c, w)(x))
    self._add = jax.jit(lambda a, b: a + b)

    def finish(x, acc, small):
      b = small.get("down_bias")
      return x + (acc if b is None else acc + b)

    self._finish = jax.jit(finish)

  # -- the engine's hooks -------------------------------------------------------

  def globals(self):
    return {"embed": self._fixed["embed"], "head": self._fixed.get("head", {})}

  def fetch(self, layer, half):
    return self._fixed[f"layers/{layer}/{half}"]

  def begin(self, phase, num_tokens):
    self._phase = phase if num_tokens == 1 else "prefill"
    self._step_shapes = 0

  def end(self):
    if self._phase == "decode":
      self._new_shapes_per_token.append(self._step_shapes)

  def _compute(self, kind, buf, idx, pos, h, small):
    n = len(idx)
    size = _bucket(n, self.options.min_bucket)
    key = (kind, size, h.shape)
    if key not in self._shapes:
      self._shapes.add(key)
      self._step_shapes += 1
    valid = np.arange(size) < n
    return self._partial(buf, _pad(idx, size), valid, _pad(pos, size), h, small)

  def run_ffn(self, layer, params, x, ffn):
    h = self._norm(params, x)
    try:
      if self._phase == "decode":
        parts = self._decode(layer, params, x, h)
      else:
        parts = self._prefill(layer, params, h)
    except OSError as e:  # the reads of this layer's neurons (and any hot-cache swap)
      raise ReadError(e.errno or errno.EIO,
                      f"neuron_cluster: reading layer {layer}'s neurons from"
                      f" {self.store.file(layer)} (store {self.store.path}) failed: {e}") from e
    acc = parts[0]
    for p in parts[1:]:
      acc = self._add(acc, p)
    return self._finish(x, acc, params)

  def _prefill(self, layer, params, h):
    """Dense: stream the layer's records in chunks, double-buffered in staging."""
    f = self.config.intermediate_size
    half = max(1, self.staging_cap // 2)
    chunks = [(s, min(half, f - s)) for s in range(0, f, half)]
    path = self.store.file(layer)
    rec = self.store.record_nbytes

    def submit(k):
      s, n = chunks[k]
      base = (k % 2) * half
      # Aliasing rule (hetflow/memory/buffers.py): every computation still
      # reading this half (this layer's or the previous layer's) must finish
      # before the half is refilled.
      jax.block_until_ready(self._staging_users[k % 2])
      self._staging_users[k % 2] = []
      reqs = self.store.requests(np.arange(s, s + n), True, max_run=1 << 20)
      reqs = [(off, nb, dst + base * rec) for off, nb, dst in reqs]
      self.counters.prefill.add("disk_bytes", sum(r[1] for r in reqs))
      self.counters.prefill.add("disk_requests", len(reqs))
      return [self.reader.read_many(path, self.staging, reqs)]

    outs, pending = [], submit(0)
    for k, (s, n) in enumerate(chunks):
      for fut in pending:
        fut.result()
      if k + 1 < len(chunks):
        pending = submit(k + 1)
      base = (k % 2) * half
      out, _ = self._compute("prefill", self.staging_jax, np.arange(base, base + n),
                             np.arange(s, s + n), h, params)
      outs.append(out)
      self._staging_users[k % 2].append(out)
    return outs

  def _decode(self, layer, params, x, h):
    o, c = self.options, self.config
    mask = self.predictor.predict(layer, x, h)
    # Waits for x: the one sync per layer (earlier computations are done).
    active = np.nonzero(np.asarray(mask).reshape(-1, c.intermediate_size).any(0))[0]
    if o.hot_policy == "lru" and self.num_slots:
      self._swap_hot(layer)
    self.counters.decode.add("predicted", len(active))
    if self._truth is not None:
      true = np.asarray(self._truth.predict(layer, x, h)).reshape(-1, c.intermediate_size).any(0)
      predicted = np.zeros_like(true)
      predicted[active] = True
      uncached = self.cache.slot_of[layer] < 0 if self.num_slots else np.ones_like(true)
      self._audit[layer] += [(true & predicted).sum(), (~true & predicted).sum(),
                             (true & ~predicted).sum(), (true & uncached).sum()]
    if self.num_slots:
      hit_pos, hit_slots, missing = self.cache.lookup(layer, active)
    else:
      hit_pos, hit_slots, missing = active[:0], active[:0], active
    outs = []
    path, rec = self.store.file(layer), self.store.record_nbytes

    def cached_part():
      if len(hit_slots):
        outs.append(self._compute("cache", self.pool_jax, hit_slots, hit_pos, h, params)[0])

    if o.pipeline:  # computes while the first reads land
      cached_part()
    for r0 in range(0, len(missing), self.staging_cap):
      rnd = missing[r0:r0 + self.staging_cap]
      # Staging is refilled: computations reading it must be done.
      jax.block_until_ready(self._staging_users + [outs])
      self._staging_users = [[], []]
      pieces = np.array_split(np.arange(len(rnd)), o.pieces if o.pipeline else 1)
      pieces = [p for p in pieces if len(p)]
      pending = []
      for p in pieces:
        reqs = self.store.requests(rnd[p], o.coalesce)
        reqs = [(off, nb, dst + int(p[0]) * rec) for off, nb, dst in reqs]
        self.counters.decode.add("disk_bytes", sum(q[1] for q in reqs))
        self.counters.decode.add("disk_requests", len(reqs))
        pending.append([self.reader.read_many(path, self.staging, reqs, parallel=o.pipeline)])
      for p, futs in zip(pieces, pending):
        for fut in futs:
          fut.result()
        out, fired = self._compute("staging", self.staging_jax, p, rnd[p], h, params)
        outs.append(out)
        self._staging_users[0].append(out)
        self._fired.append(fired)  # neurons read that really fired: the useful bytes
      self.counters.decode.add("read_neurons", len(rnd))
      if self.num_slots:
        self.cache.protect(len(hit_slots))
        slots = self.cache.admit(layer, rnd)
        ok = slots >= 0
        self.pool.reshape(-1, rec)[slots[ok]] = self.staging.reshape(-1, rec)[np.nonzero(ok)[0]]
    if not o.pipeline:
      cached_part()
    if not outs:  # nothing predicted active: an exact zero FFN output
      outs.append(self._compute("cache", self.pool_jax, active[:0], active[:0], h, params)[0])
    return outs

  def _swap_hot(self, layer):
    """Cluster-level LRU: one swap at most per layer step, before its lookup.

    Safe then: every computation reading the pool so far (earlier layers',
    this layer's previous step) fed x, which the predictor's output waited
    for; this step's have not started.
    """
    swap = self.cache.swap_candidate(layer, self.options.swap_margin)
    if swap is None:
      return
    index, cluster = swap
    first, positions = self.cache.place_hot(index, layer, cluster)
    rec = self.store.record_nbytes
    reqs = [(off, n, dst + first * rec) for off, n, dst in self.store.requests(positions, True)]
    self.reader.read_many(self.store.file(layer), self.pool, reqs).result()
    self.counters.decode.add("disk_bytes", sum(r[1] for r in reqs))
    self.counters.decode.add("disk_requests", len(reqs))
    self.counters.decode.add("swap_bytes", sum(r[1] for r in reqs))
    self.cache.counters.cluster_swaps += 1

  # -- reporting ----------------------------------------------------------------

  def stats(self) -> StrategyStats:
    """Counters since load.

    Byte figures per decode token: `disk_bytes_per_token` read;
    `useful_bytes_per_token` of read neurons that really fired (from their
    computed activations); `false_positive_bytes_per_token` of read neurons
    that did not fire. With `audit`: `ideal_bytes_per_token` = bytes of truly
    active neurons not in the cache when the step looked (what a perfect
    predictor would read), `missed_neurons_per_token` (false negatives,
    computed without: the approximation), and per-layer recall/precision on
    decode inputs. Without audit the truth of unread neurons is unknown and
    `ideal_bytes_per_token` falls back to the useful bytes (`ideal_exact`
    says which).
    """
    d = self.counters.decode
    n = max(d.passes, 1)
    fired = int(sum(int(f) for f in self._fired))
    neuron = self.store.neuron_nbytes
    per_token = d.disk_bytes / n
    useful = fired * neuron / n
    f_total = self.config.num_layers * self.config.intermediate_size
    tp, fp, fn, uncached = self._audit.T
    audited = self._truth is not None
    ideal = uncached.sum() * neuron / n if audited else useful
    details = {
        "decode_tokens": d.passes,
        "disk_bytes_per_token": per_token,
        "ideal_bytes_per_token": ideal,
        "ideal_exact": audited,
        "useful_bytes_per_token": useful,
        "false_positive_bytes_per_token": (d.get("read_neurons") - fired) * neuron / n,
        "read_amplification": per_token / ideal if ideal else float("nan"),
        "requests_per_token": d.disk_requests / n,
        "cluster_swap_bytes_per_token": d.get("swap_bytes") / n,
        "predicted_density": d.get("predicted") / n / f_total,
        "read_neurons_per_token": d.get("read_neurons") / n,
        "prefill_disk_bytes": self.counters.prefill.disk_bytes,
        "cache_slots": self.num_slots,
        "cache_fraction": self.num_slots / f_total,
        "cache": dataclasses.asdict(self.cache.counters),
        "compiled_shapes": len(self._shapes),
        "new_shapes_per_token": list(self._new_shapes_per_token),
    }
    if audited:
      details.update(
          missed_neurons_per_token=fn.sum() / n,
          true_density=(tp + fn).sum() / n / f_total,
          recall=float(tp.sum() / max((tp + fn).sum(), 1)),
          precision=float(tp.sum() / max((tp + fp).sum(), 1)),
          layer_recall=[float(a / max(a + b, 1)) for a, b in zip(tp, fn)],
          layer_precision=[float(a / max(a + b, 1)) for a, b in zip(tp, fp)])
    out = self.counters.copy()
    out.decode.other["useful_bytes"] = fired * neuron
    out.details.update(details)
    out.reads = self.reader.record()
    return out

  def close(self):
    reader = getattr(self, "reader", None)
    if reader is not None:
      reader.close()
    store = getattr(self, "store", None)
    if store is not None:
      store.close()
