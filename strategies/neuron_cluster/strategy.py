"""`neuron_cluster`: PowerInfer-2's strategy for models whose FFNs are sparse.

The fixed region (embeddings, head, attention, norms, KV cache) lives on the
device tier. FFN neurons live on disk in a neuron-bundle store (hottest first)
and in a segmented cache (hot clusters + cold neuron LRU) sized by what the
budget leaves. Prefill runs dense: each layer's FFN is streamed in large
sequential reads, double-buffered; since it computes every record, it also
admits the records the prompt used into the cold region (`prefill_admission`)
and measures every neuron's predictor error at the prompt's last token (the
error feedback), so a new request's first decode tokens do not pay to learn
either. Decode runs sparse, per layer:

  start the cached blocks multiplied whole at the last token -> predict ->
  split the active set into cached and missing -> issue reads for the missing
  records (coalesced runs, `io_depth` in flight) -> compute the rest of the
  cached part while they land -> compute each piece of the missing part as
  its reads complete -> sum -> admit the recently active new records to the
  cold region (scan-resistant: a token's misses outnumber the region).

Static shapes: blocks are power-of-two slices of the staging area (a layer's
cold partition one more size), so decode compiles a handful of shapes. With the oracle predictor on a model with true
zeros the result equals `resident`'s (up to float summation order); with a
trained predictor, missed neurons are an approximation that the stats and the
benchmark report (recall, token agreement); `audit=True` also computes the true
active set to count misses, false positives and the ideal bytes
(`experiments.sparse_audit`).

Look-ahead (`lookahead=True`): a guess at a layer's misses, read into its
staging area before its predictor has run, so that the layer reads only what
the guess missed (`lookahead_source`): layer l+1's predictor applied to layer
l's input (the residual stream changes little between layers), read while
layer l computes; or the records layer l missed at the previous token, read
from the start of layer l's attention (the guess needs no input). Records are
planar in memory (`hetflow.memory.bundle_store.Planes`), and each layer's
cached part is two contiguous blocks (its hot clusters, its cold partition),
so the sparse step is plain matrix products over contiguous rows
(`hetflow.sparsity.bundles.planar_step`), no gather; every cached record of
the layer is multiplied, predicted or not (exact: a neuron that does not
fire adds an exact zero).
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import json
import operator
import os
import time
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from hetflow.memory import bundle_store, tiers
from hetflow.memory import store as layer_store
from hetflow.memory.budget import parse_bytes
from hetflow.memory.buffers import PAGE, aligned_empty, is_aligned, round_up
from hetflow.memory.cache import cache_root
from hetflow.memory.reader import ReaderPool, ReadError, Requests
from hetflow.models import formats, modules
from hetflow.sparsity import bundles as bundles_mod
from hetflow.sparsity.cache import SegmentedCache
from hetflow.sparsity.predictor import ErrorFeedback, LowRankPredictor, OraclePredictor
from hetflow.sparsity.stats import (
  ActivationStats,
  calibration_ids,
  check_sparse,
  record_activations,
)
from hetflow.strategy import NotApplicable, Placement, Strategy, StrategyStats, register_strategy
from strategies.neuron_cluster import cost
from strategies.neuron_cluster import mesh as mesh_lanes


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
    prefill_admission: a dense prefill reads every record anyway: the records
      its prompt used (by the same admission rule, the prompt's tokens counted
      as decode steps) are copied into the cold region before their staging
      area is refilled, so the first decode tokens of a new request do not
      read them again.
    pipeline: overlap reads with compute (`io_depth` reads in flight, cached
      part computed meanwhile, missing part in `pieces` pieces as they land);
      False reads one request at a time, then computes.
    io_depth: requests in flight (in the kernel's AIO queue where it has one,
      at most 64 a read call, else one reader thread each). Small random reads
      are bound by requests per second: on llama-1b-sparse 32 decoded ~5%
      faster than 8 (WORKSPACE_NOTES.md, ninth session). A read call queues
      up to `io_depth` requests at once and a worker thread the rest, as the
      first land; that worker waits for a core on a busy machine, so a round's
      requests (~90 a layer there) should fit at once: one call a round at 64
      was ~5% faster than one a block at 32, and one a round at 32 was slower
      (seventeenth session).
    pieces: when pipelining, the missing part is read in `pieces` read calls
      of about equal size, and its power-of-two blocks (largest first, none
      larger than ~1/pieces of it) are computed as their piece lands. A read
      call costs the host ~0.3 ms; what a second piece buys is the first one's
      compute overlapping the second's reads: at ~18 GB/s, 0.3 ms is ~200
      float32 records of llama-1b. With the cache and the prompt's admission a
      decode step there misses ~100 records a layer, and 1 piece was ~5% faster
      than 2 (WORKSPACE_NOTES.md, sixteenth session; 2 was as fast in the
      seventh, at ~330 misses a layer).
    lookahead: read a guess at a layer's uncached active records before its
      predictor has run (`lookahead_source` picks the guess and when it is
      read); the layer then reads only what the guess missed. A wrong guess
      costs reads, never correctness. Off by default: on llama-1b-sparse the
      predictor's guess left 44% of its records unused and its extra bytes
      cost more than the overlap gained; the previous token's misses are a
      precise guess (89% used, +5% bytes, ~60% of the misses in flight in
      time), yet the token is no faster; even a perfect guess gains only
      ~8-10% on two cores, where the host's work bounds the token
      (`scripts/perfect_lookahead.py`, WORKSPACE_NOTES.md).
    bridge_gap: also read uncached records in gaps of at most this many
      between two records read (`bundle_store.bridge_gaps`): fewer, larger
      requests for more bytes; the extra records are computed too (exact).
    gather_ratio: a layer's cached block (hot clusters, cold partition) is
      multiplied whole unless it holds more than this many records per hit;
      then only its hits are gathered and multiplied (a gather of planar rows
      runs at ~1/gather_ratio of the whole-block rate).
    threshold_margin: a trained predictor's thresholds raised by this
      fraction of their magnitude (fewer false positives read, lower recall;
      the cached records are multiplied whether predicted or not, so what the
      computation misses is only among uncached neurons).
    lookahead_source: the look-ahead's guess. "predictor": layer i+1's
      predictor on layer i's input, ranked and read while layer i computes.
      "previous_token": the records layer i missed at the previous decode
      token, uncached now, read from the start of layer i's attention (the
      disk would idle then; the layer before's reads have landed). The same
      record tends to fire on consecutive tokens, and a miss the cache's
      admission turned away is read again: on llama-1b-sparse 63% of those
      were missed again, and they held 75% of the next token's misses
      (WORKSPACE_NOTES.md). No predictor runs for that guess, every layer has
      one, and none is made at a sequence's first decode token.
    lookahead_margin: the guess's threshold is the trained predictor's raised
      by this fraction of its magnitude (fewer, surer guesses; wasted reads
      cost disk time). With `feedback`, a neuron whose error was measured is
      guessed from its corrected score, raised by the same fraction.
    lookahead_records: read at most this many guessed, uncached records per
      layer, the surest first (the largest margin over the guess's threshold;
      the previous token's misses: the first by position):
      the disk is idle while a layer finishes computing and the next one's
      attention and predictor run, and this bounds what a wrong guess costs
      beyond that window. None: every guessed record.
    feedback: a trained predictor's error on each record multiplied at the
      previous decode token (its exact pre-activation comes out of the step)
      corrects that neuron's score at this one
      (`hetflow.sparsity.predictor.ErrorFeedback`): far fewer false positives
      at the same recall. Llama (RMSNorm) layers whose predictor is the SVD or
      exact gate map, batch-1 decode; elsewhere the plain threshold applies.
      On llama-1b-sparse: 1.12x the ideal bytes at 64/64 tokens equal to dense,
      against 1.51x without (WORKSPACE_NOTES.md, issue 13).
    feedback_margin: corrected scores are thresholded at this multiple of the
      layer's |threshold| (negative: a little below the exact boundary, for
      the error's drift since the last token).
    staging_bytes: the buffer missing records and prefill chunks are read into.
    embed_tier: where the token-embedding table lives: "device" (the fixed
      region) or "disk" (a copy beside the neuron store, `<store>/embed`; each
      pass reads only its tokens' rows, one row per decode token, as
      llama.cpp and PowerInfer leave it mapped), which leaves its bytes to
      the neuron cache. Untied heads only (a tied head multiplies the whole
      table every token), not on a mesh.
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
  prefill_admission: bool = True
  pipeline: bool = True
  io_depth: int = 64
  pieces: int = 1
  lookahead: bool = False
  lookahead_source: Literal["predictor", "previous_token"] = "predictor"
  lookahead_margin: float = 1.0
  lookahead_records: int | None = None
  feedback: bool = True
  feedback_margin: float = -0.1
  threshold_margin: float = 0.0
  bridge_gap: int = 0
  gather_ratio: float = 4.0
  staging_bytes: int | str = "64MiB"
  embed_tier: Literal["device", "disk"] = "device"
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
                          ("hot_policy", ("static", "lru")), ("admission", ("frequency", "all")),
                          ("embed_tier", ("device", "disk")),
                          ("lookahead_source", ("predictor", "previous_token"))):
      if getattr(self, name) not in choices:
        raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {choices}.")
    if self.lookahead_records is not None and (
        not isinstance(self.lookahead_records, int) or isinstance(self.lookahead_records, bool)
        or self.lookahead_records < 0):
      raise ValueError(f"lookahead_records={self.lookahead_records!r}; expected an int >= 0"
                       " or None.")
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


def run_cuts(positions: np.ndarray, starts: list[int]) -> list[int]:
  """Read boundaries for sorted `positions` cut into pieces at `starts`: each
  start (after the first) moved forward to the next start of a run of adjacent
  positions, so that no run is split over two requests; [0, ..., len]."""
  breaks = np.flatnonzero(np.diff(positions) != 1) + 1
  cuts = [0]
  for s in starts[1:]:
    i = int(np.searchsorted(breaks, s))
    cuts.append(max(cuts[-1], int(breaks[i]) if i < len(breaks) else len(positions)))
  return cuts + [len(positions)]


def piece_starts(blocks: list[tuple[int, int]], pieces: int) -> list[int]:
  """The offsets where `pieces` runs of consecutive (offset, size) `blocks`, each
  about 1/pieces of their total, start."""
  per = -(-sum(size for _, size in blocks) // pieces)
  starts, filled = [], per
  for off, size in blocks:
    if filled >= per:
      starts.append(off)
      filled = 0
    filled += size
  return starts


@dataclasses.dataclass(frozen=True)
class _Read:
  """Records being read: `fut` completes when they landed; `done` (if any)
  then copies them into their planes."""

  fut: Any
  done: Any = None

  def wait(self) -> None:
    self.fut.result()
    if self.done is not None:
      self.done()


@dataclasses.dataclass(frozen=True)
class _Ahead:
  """A look-ahead for one layer: the guessed positions (sorted), the staging
  blocks (offset, size) in that layer's area they land in, and their read (one
  call: it has at least the layer's attention's time to land, and each call costs
  the host ~0.4 ms)."""

  positions: np.ndarray
  blocks: list[tuple[int, int]]
  read: _Read


def _check_format(model, options) -> bundles_mod.RecordCodec:
  """The record codec of the model's weight format, or NotApplicable saying why not."""
  try:
    codec = bundles_mod.record_codec(model)
  except formats.FormatError as e:
    raise NotApplicable(str(e)) from None
  if codec.quantized and options.layout != "bundled":
    raise NotApplicable(f"neuron_cluster's layout={options.layout!r} (the no-bundling"
                        f" ablation) is for float32 weights; this model has"
                        f" weights={model.weights!r}: use layout='bundled'.")
  return codec


def _open_token_table(model, neuron_store_path: str) -> layer_store.LayerStore:
  """The token-embedding table's store (`<neuron store>/embed`, one group "embed"),
  written from `model` if missing, opened locked and checked against the model."""
  path = os.path.join(neuron_store_path, "embed")
  if not os.path.exists(os.path.join(path, layer_store.MANIFEST)):
    record = layer_store.model_fingerprint(model)
    metadata = {"fingerprint": layer_store.fingerprint_digest(record),
                "fingerprint_record": record, "model": model.config.name,
                "description": model.description}
    try:
      layer_store.LayerStore.write(path, [("embed", {"tokens": model.tensor("embed/tokens")})],
                                   progress=False, overwrite=os.path.isdir(path),
                                   metadata=metadata).close()
    except FileExistsError:
      if not layer_store.is_hetflow_store(path):  # not another writer that won the race
        raise
  table = layer_store.LayerStore.open(path, lock=True)
  try:
    layer_store.check_fingerprint(table, layer_store.model_fingerprint(model),
                                  f"{model.description!r} token table")
  except BaseException:
    table.close()
    raise
  return table


def multiplied_bytes(fixed: dict[str, Any], config) -> int:
  """Bytes of the fixed region's weights one decode token multiplies (attention, norms,
  head, router): every group but the token table, of which it reads one row (unless the
  head is tied to it). With the records computed, the token's compute at the matvec rate:
  the compute side of a sparse row's limit (`hetflow.bench.runner`)."""
  return sum(formats.nbytes(v) for g, v in fixed.items()
             if g != "embed" or config.tie_word_embeddings)


def _oracle_weights(model, layer: int, keys) -> dict[str, np.ndarray]:
  """The oracle's gate/up (and biases) of one layer as float32 [D, F]: a quantized
  kernel dequantized, so the oracle predicts the neurons of the weights computed."""
  out = {}
  for k in keys:
    name = f"layers/{layer}/mlp/{k}"
    if name not in model.logical_shapes:
      continue
    if model.format.applies(name):
      out[k] = np.asarray(formats.dequantize(model.param(name)), np.float32)
    else:
      out[k] = model.tensor(name)
  return out


@register_strategy("neuron_cluster")
class NeuronCluster(Strategy):
  """Sparse decode from a neuron-bundle store through a segmented cache."""

  Options = NeuronClusterOptions
  # On a mesh: one NeuronCluster per local shard (strategies/neuron_cluster/mesh.py).
  shards_over_mesh = True
  _lanes: Any = None  # the mesh's Lanes, on the strategy the engine holds
  _mesh_lane: Any = None  # a lane's LaneSetup: its device, stats and predictor slices

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
    _check_format(model, o)
    try:
      check_sparse(c, o.threshold)
    except ValueError as e:
      raise NotApplicable(str(e)) from None
    if c.num_experts:
      raise NotApplicable("neuron_cluster runs dense-FFN models only; MoE models are planned"
                          " from shapes (strategies.neuron_cluster.cost.shape_placement).")
    if not c.do_layer_norm_before:
      raise NotApplicable("neuron_cluster supports pre-LN models only (not OPT-350m).")
    if o.embed_tier == "disk":
      if c.tie_word_embeddings:
        raise NotApplicable(f"neuron_cluster's embed_tier='disk': {c.name} ties its head to the"
                            " token table, which the head multiplies whole every token; use"
                            " embed_tier='device'.")
      if self.mesh is not None and self.mesh.size > 1:
        raise NotApplicable("neuron_cluster's embed_tier='disk' runs on one device, not a"
                            " mesh; use embed_tier='device'.")
    notes = ()
    if o.predictor == "trained" and self._trained is None:
      notes = (f"needs: a trained predictor at {o.predictor_path} (sized here as rank"
               " D/16; python -m experiments.train_predictor)",)
    sizes = cost.plan_sizes(model, o, trained=self._trained)
    return cost.make_placement(model, budget, o, sizes, trained=self._trained, notes=notes)

  cost_model = staticmethod(cost.events)

  # -- materialising ----------------------------------------------------------

  def materialize(self, placement, model, ledger) -> None:
    if self.mesh is not None and self.mesh.size > 1:
      self._lanes = mesh_lanes.lanes(self, placement, ledger)
      return
    c, o = model.config, self.options
    lane = self._mesh_lane
    self.model, self.config = model, c
    sizes: cost.Sizes = placement.settings.sizes
    self.mats = bundles_mod.neuron_matrices(c)
    self.codec = _check_format(model, o)
    sharding = tiers.device_sharding(None if lane is None else lane.device)
    self._sharding = sharding
    self._threshold = check_sparse(c, o.threshold)

    # Statistics and order.
    if lane is not None:
      self.activation_stats = lane.extra["stats"]
    elif o.stats_path:
      self.activation_stats = ActivationStats.load(o.stats_path)
    else:
      ids = calibration_ids(c, o.calibration_tokens)
      self.activation_stats, _ = record_activations(model, ids, o.threshold)
    order = self.activation_stats.hot_order()
    self.frequency = np.take_along_axis(self.activation_stats.frequency, order, axis=1)

    # Store.
    self.store = bundle_store.open_store(model, order, self.mats, o.layout, o.store_dir,
                                         codec=self.codec)
    ledger.allocate("disk", self.store.total_nbytes, "neuron store")
    self._load_tables(ledger, sharding, order)
    self._table = None  # the token table's store when it lives on disk
    self._embed_reserve = sizes.embed_rows
    if sizes.embed_table:
      self._table = _open_token_table(model, self.store.path)
      ledger.allocate("disk", sizes.embed_table, "token table")
      ledger.allocate("device", sizes.embed_rows, "embedding rows")

    # Fixed region; the input rows' biases (OPT) also stay on the host, [F, M]
    # per layer in record order, to build each block's bias.
    def put(group_leaves, name):
      nbytes = formats.nbytes(group_leaves)
      ledger.allocate("device", nbytes, name)
      return jax.device_put(group_leaves, sharding)

    self._fixed, self._bias = {}, {}
    inputs = self.mats[:-1]
    for g in model.group_names():
      if g == "embed" and self._table is not None:  # the rest of the group: OPT's positions
        self._fixed[g] = put({n.split("/", 1)[1]: model.tensor(n) for n in model.shapes
                              if n.startswith("embed/") and n != "embed/tokens"}, "fixed")
      elif g.endswith("/mlp"):
        leaves = model.group_tensors(g)
        layer = int(g.split("/")[1])
        small = {k: v for k, v in leaves.items() if k not in self.mats}
        for k in ("gate_bias", "up_bias"):
          if k in small:
            small[k] = small[k][order[layer]]
        if any(m + "_bias" in small for m in inputs):
          f = c.intermediate_size
          self._bias[layer] = np.stack(
              [np.asarray(small.get(m + "_bias", np.zeros(f)), np.float32) for m in inputs], 1)
        self._fixed[g] = put(small, "fixed")
      else:
        self._fixed[g] = put(model.group_tensors(g), "fixed")

    # Predictor.
    def oracle():
      weights = []
      keys = [m for m in self.mats if m != "down"] + [
          m + "_bias" for m in self.mats if m != "down"]
      for i in range(c.num_layers):
        weights.append(_oracle_weights(model, i, keys))
      p = OraclePredictor(c, weights, self._threshold)
      p.place(sharding, order)
      return p

    if o.predictor == "oracle":
      self.predictor = oracle()
    else:
      self.predictor = (LowRankPredictor.load(o.predictor_path) if lane is None
                        else lane.extra["predictor"])
      self.predictor.place(sharding, order)
    ledger.allocate("device", self.predictor.nbytes(), "predictor")
    # Error feedback: host arrays ([L, F] floats, ~1.5 MB for llama-1b) taken
    # from the staging allowance below, so the plan's total stands.
    self._fb, self._pre = None, [[] for _ in range(c.num_layers)]
    fb_bytes = 0
    if (o.feedback and o.predictor == "trained" and modules.uses_rms_norm(c)
        and any(self.predictor.linear_layers)):
      self._fb = ErrorFeedback(c.num_layers, c.intermediate_size)
      fb_bytes = self._fb.nbytes
      ledger.allocate("device", fb_bytes, "predictor feedback")
    # Not in the ledger: an auditing instrument, not part of the system measured.
    self._truth = None
    if o.audit:
      self._truth = self.predictor if o.predictor == "oracle" else oracle()
    # true pos, false pos, false neg (of the predictor), ideal, and true neurons never
    # computed (not predicted, cached or guessed by the look-ahead: the approximation).
    self._audit = np.zeros((c.num_layers, 5), np.int64)

    # Staging and cache pool: planar record buffers that jax aliases (no
    # copies). Staging is two areas, one per layer parity: a layer's misses
    # land in its area while the look-ahead fills the other for the next layer.
    per_slot = self.store.planes(1).nbytes
    ledger.allocate("device", sizes.staging - fb_bytes, "staging")
    cap = max(2, (sizes.staging - fb_bytes) // per_slot) // 2
    self._min_block = min(o.min_bucket, 1 << (cap.bit_length() - 1))
    self.area_cap = cap // self._min_block * self._min_block
    self.st_planes = self.store.planes(2 * self.area_cap)
    self.staging = aligned_empty(self.st_planes.nbytes)
    self.num_slots = placement.settings.cache_slots
    ledger.allocate("device", self.num_slots * self.store.record_nbytes, "cache")
    self.pool_planes = self.store.planes(max(self.num_slots, 1))
    self.pool = aligned_empty(self.pool_planes.nbytes)
    self._views: dict[tuple[str, int, int], tuple[Any, Any]] = {}
    self._slot_pos = np.full(self.pool_planes.slots, -1, np.int64)  # position held, per slot
    hot = int(self.num_slots * o.hot_fraction)
    self.cache = SegmentedCache(c.num_layers, c.intermediate_size, self.num_slots, hot,
                                o.cluster_size, o.admission, o.admit_decay, o.admit_min)
    self.reader = ReaderPool(o.io_depth)
    # Each layer's hot clusters next to each other: its cached part is one block.
    pending = []
    chosen = sorted(self.cache.choose_hot(self.frequency))
    for index, (layer, cluster) in enumerate(chosen):
      first, positions = self.cache.place_hot(index, layer, cluster)
      self._slot_pos[first:first + len(positions)] = positions
      pending.append(self._read(layer, positions, "pool", first, True))
    for r in pending:
      r.wait()
    self.reader.reset_stats()
    self.cache.counters = type(self.cache.counters)()

    self._build_functions()
    self._precompile()
    self._phase = "prefill"
    self._shapes: set[tuple] = set()
    self._new_shapes_per_token: list[int] = []
    self._fired: list[Any] = []
    self._area_users: list[list[Any]] = [[], []]  # computations reading each staging area
    self._ahead: dict[int, _Ahead] = {}  # look-ahead reads in flight, by the layer they serve
    self._missed: dict[int, np.ndarray] = {}  # each layer's misses at the last decode token
    self._unsettled = None  # the last decoded layer's bookkeeping (see _settle)
    self._prompt_records: list[list[tuple]] = [[], []]  # per staging area (_admit_prompt)
    self._whole: dict[tuple[int, str], bool] = {}  # (layer, "hot"/"cold"): multiplied whole
    self._timer = collections.Counter()  # seconds per decode phase
    self._computed = 0  # records multiplied in decode

  def _load_tables(self, ledger, sharding, order):
    """A quantized store's per-layer down tables, on the device with the fixed region, and
    each record position's row of a grouped table (its neuron id // group)."""
    self._tables: dict[int, dict[str, Any]] = {}
    self._group_of: dict[int, np.ndarray] = {}
    if not self.codec.quantized:
      return
    for layer in range(self.config.num_layers):
      # float32 in memory (float16 in the store): the kernels read it once per record.
      table = {k: v.astype(np.float32) for k, v in self.store.tables(layer).items()}
      ledger.allocate("device", sum(a.nbytes for a in table.values()), "fixed")
      self._tables[layer] = jax.device_put(table, sharding)
      g = self.codec.group if self.codec.grouped_down else self.config.intermediate_size
      self._group_of[layer] = (order[layer] // g).astype(np.int32)

  def _quantized_args(self, layer, positions):
    """(down table, each slot's table row) of a block of quantized records at `positions`
    (-1: none; such slots are masked out, any row serves)."""
    return self._tables[layer], self._group_of[layer][np.maximum(positions, 0)]

  def _build_functions(self):
    c = self.config
    self._step = jax.jit(functools.partial(bundles_mod.planar_step, c, pre=True))
    self._gather = jax.jit(functools.partial(bundles_mod.planar_gather_step, c, pre=True))
    if self.codec.quantized:
      self._qstep = jax.jit(functools.partial(bundles_mod.quantized_step, c, self.codec,
                                              pre=True))
      self._qgather = jax.jit(functools.partial(bundles_mod.quantized_gather_step, c,
                                                self.codec, pre=True))
    eps = c.norm_eps
    self._rms = jax.jit(lambda x: jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))) + eps))
    self._norm = jax.jit(lambda w, x: modules._norm(c, w)(x))
    # A layer's parts (cached blocks, landed blocks) summed in one dispatch, left to right
    # as a chain of adds would (the same float32 result), padded with -0.0 (which leaves
    # every value as it is) to a power of two parts: a few sums compile, not one per count.
    self._sum = jax.jit(lambda parts: functools.reduce(operator.add, parts))
    self._neg_zero: dict[tuple, Any] = {}

    def finish(x, acc, small):
      b = small.get("down_bias")
      return x + (acc if b is None else acc + b)

    self._finish = jax.jit(finish)

  # -- reads into planar buffers ------------------------------------------------

  def _buffer(self, which):
    return (self.pool, self.pool_planes) if which == "pool" else (
        self.staging, self.st_planes)

  def _read(self, layer, positions, which, first, parallel, phase=None) -> _Read:
    """Starts reading records at sorted `positions` of `layer` into slots first, ... ."""
    o = self.options
    buf, planes = self._buffer(which)
    path = self.store.file(layer)
    if self.store.planar_direct:
      reqs = self.store.planar_requests(positions, planes, first, o.coalesce)
      fut = self.reader.read_many(path, buf, reqs, parallel=parallel)
      done = None
    else:  # rows are not whole pages: read whole records, then copy them in
      rec = self.store.record_nbytes
      tmp = aligned_empty(max(1, len(positions)) * rec)
      reqs = Requests.of(self.store.requests(positions, o.coalesce))
      fut = self.reader.read_many(path, tmp, reqs, parallel=parallel)
      slots = np.arange(first, first + len(positions))

      def done():
        self.store.fill(planes, buf, slots, tmp.reshape(-1, rec)[:len(positions)])
    if phase is not None:
      counters = getattr(self.counters, phase)
      counters.add("disk_bytes", reqs.nbytes)
      counters.add("disk_requests", len(reqs))
    return _Read(fut, done)

  def _view(self, which, start, size):
    """Jax arrays (A, B) aliasing slots [start, start + size) of a planar buffer."""
    key = (which, start, size)
    v = self._views.get(key)
    if v is None:
      buf, planes = self._buffer(which)
      if self.codec.quantized:  # bytes, decoded by the step
        a, b = planes.views(buf, np.uint8, planes.b_nbytes)
      else:
        a, b = planes.views(buf, self.model.dtype, self.config.hidden_size)
      a, b = a[start:start + size], b[start:start + size]
      v = jax.device_put(a, self._sharding), jax.device_put(b, self._sharding)
      # jax aliases 64-byte-aligned memory (hetflow/memory/buffers.py) and copies the
      # rest: a copy would go stale as reads and admissions refill the buffer, so one
      # is made afresh at each use (tiny quantized records: rows of a few dozen bytes).
      if is_aligned(a, 64) and is_aligned(b, 64):
        self._views[key] = v
    return v

  def _blocks(self, n: int, pieces: int = 1, exact: bool = False) -> list[tuple[int, int]]:
    """(offset, size) power-of-two blocks covering n slots (rounded up to the
    smallest block unless `exact`), largest first, none larger than ~n /
    pieces: a few compiled shapes, no per-token recompiles, and the first
    block's reads land early enough to overlap the rest."""
    mb = 1 if exact else self._min_block
    left = -(-n // mb) * mb
    cap = max(mb, 1 << max(0, (-(-left // pieces) - 1).bit_length()))
    out, at = [], 0
    while left:
      size = min(cap, 1 << (left.bit_length() - 1))
      out.append((at, size))
      at += size
      left -= size
    return out

  def _compute(self, kind, which, start, size, valid, layer, positions, h, params,
               recency=None):
    """One block's contribution; `positions` [size] (-1: none) give the biases.
    Returns (out, fired, the step's third output: see `_block`)."""
    key = (kind, size, h.shape)
    if key not in self._shapes:
      self._shapes.add(key)
      self._step_shapes += 1
    out, fired, third = self._block(which, start, size, valid, layer, positions, h, recency)
    if self._phase == "decode":
      self._computed += int(valid.sum()) if isinstance(valid, np.ndarray) else int(valid)
      if self._fb is not None:  # read at this layer's next token (long done by then)
        self._pre[layer].append((np.asarray(positions), third))
    return out, fired, third

  def _block(self, which, start, size, valid, layer, positions, h, recency=None):
    """The step over slots [start, start + size) of a planar buffer: (out, fired, the
    last token's selecting pre-activations; with `recency` [T], those and the
    records' recency-weighted firing counts over the pass's tokens)."""
    a, b = self._view(which, start, size)
    bias = None
    if layer in self._bias:
      bias = self._bias[layer][np.maximum(positions, 0)]
    if self.codec.quantized:
      table, group_of = self._quantized_args(layer, np.asarray(positions))
      return self._qstep(a, b, table, group_of, h, bias, valid, recency=recency)
    return self._step(a, b, h, bias, valid, recency=recency)

  def _gather_block(self, idx, valid, layer, h):
    """The step over the pool's slots `idx`: (out, fired, pre)."""
    a, b = self._view("pool", 0, self.pool_planes.slots)
    bias = self._bias[layer][np.maximum(self._slot_pos[idx], 0)] if layer in self._bias else None
    if self.codec.quantized:
      table, group_of = self._quantized_args(layer, self._slot_pos[idx])
      return self._qgather(a, b, idx, table, group_of, h, bias, valid)
    return self._gather(a, b, idx, h, bias, valid)

  def _precompile(self):
    """Compiles the sparse step for every block a batch-1 decode token can use, at
    load: which blocks a token needs depends on its misses, so a prompt unlike the
    warm-up's would otherwise compile some in the middle of decoding."""
    c, o, mb = self.config, self.options, self._min_block
    x = jnp.zeros((1, 1, c.hidden_size), self.model.dtype)
    h = self._norm(self._fixed["layers/0/mlp"], x)
    pow2 = lambda top: [1 << k for k in range(mb.bit_length() - 1, max(top, 1).bit_length())  # noqa: E731
                        if mb <= 1 << k <= top]
    blocks = {("staging", size) for size in pow2(self.area_cap)}
    gathers = set()
    if self.num_slots:
      for layer in range(c.num_layers):
        for first, n in (self.cache.hot_range(layer), self.cache.cold_range(layer)):
          if not n:
            continue
          if (first, n) == self.cache.cold_range(layer):
            blocks.add(("pool", n))
          else:
            exact = first + -(-n // mb) * mb > self.pool_planes.slots
            blocks.update(("pool", size) for _, size in self._blocks(n, exact=exact))
          hits = n if o.gather_ratio <= 1 else int(n / o.gather_ratio)  # most hits gathered
          gathers.update(pow2(-(-hits // mb) * mb))
    outs = [self._block(which, 0, size, np.zeros(size, bool), 0, np.full(size, -1), h)
            for which, size in sorted(blocks)]
    outs += [self._gather_block(np.zeros(size, np.int32), np.zeros(size, bool), 0, h)
             for size in sorted(gathers)]
    # A token's parts: its cached blocks, and its misses' blocks, a few per round.
    outs += [self._summed([outs[0][0]] * n) for n in (2, 4, 8, 16, 32)]
    jax.block_until_ready(outs)

  def _whole_block(self, layer, kind, h, params):
    """The contributions of `layer`'s hot clusters or cold partition, multiplied whole."""
    if kind == "cold":
      first, n = self.cache.cold_range(layer)
      valid = self.cache.cold_valid(layer)
      pos = np.where(valid, self._slot_pos[first:first + n], -1)
      return [self._compute("cold", "pool", first, n, valid, layer, pos, h, params)[0]]
    first, n = self.cache.hot_range(layer)
    outs = []
    # Blocks are padded to the smallest size, except at the pool's end.
    exact = first + -(-n // self._min_block) * self._min_block > self.pool_planes.slots
    for off, size in self._blocks(n, exact=exact):
      pos = self._slot_pos[first + off:first + off + size].copy()
      pos[max(0, n - off):] = -1  # a block's tail past the layer's clusters
      outs.append(self._compute("hot", "pool", first + off, size, pos >= 0, layer, pos, h,
                                params)[0])
    return outs

  def _gathered(self, kind, slots, layer, h):
    """The contributions of the pool's records at `slots`, gathered in power-of-two blocks."""
    outs = []
    for off, size in self._blocks(len(slots)):
      idx = np.zeros(size, np.int32)
      part = slots[off:off + size]
      idx[:len(part)] = part
      valid = np.arange(size) < len(part)
      key = ("gather-" + kind, size, h.shape)
      if key not in self._shapes:
        self._shapes.add(key)
        self._step_shapes += 1
      self._computed += len(part)
      out, _, pre = self._gather_block(idx, valid, layer, h)
      outs.append(out)
      if self._fb is not None:
        self._pre[layer].append((np.where(valid, self._slot_pos[idx], -1), pre))
    return outs

  # -- the engine's hooks -------------------------------------------------------

  def globals(self):
    if self._lanes is not None:
      return self._lanes.globals()
    return {"embed": self._fixed["embed"], "head": self._fixed.get("head", {})}

  def run_embed(self, params, ids, positions, embed):
    """With the token table on disk: reads the pass's distinct tokens' rows (the
    bucket of rows is in the plan's reserve, or the ledger grants the excess for
    the pass) and embeds from them."""
    if self._lanes is not None or self._table is None:
      return embed(params, ids, positions)
    ids = np.asarray(ids)
    tokens, inverse = np.unique(ids, return_inverse=True)
    info = self._table.tensors("embed")["tokens"]
    row = info.nbytes // info.shape[0]
    span = cost.embed_row_span(self.model)
    rows = cost.embed_rows_bucket(len(tokens))
    need = cost.embed_rows_nbytes(self.model, len(tokens))
    whole = need < rows * span  # the whole table is the smaller read
    extra = None
    if need > self._embed_reserve:
      extra = self.ledger.allocate("device", need - self._embed_reserve, "embedding rows")
    try:
      buf = aligned_empty(need)
      if whole:
        reqs = [(info.offset, need, 0)]
        table, local = buf[:info.nbytes].view(info.dtype).reshape(info.shape), ids
      else:
        starts = info.offset + tokens.astype(np.int64) * row
        firsts = starts // PAGE * PAGE
        reqs = [(int(a), int(round_up(int(b) + row) - a), k * span)
                for k, (a, b) in enumerate(zip(firsts, starts))]
      self.reader.read_many(self._table.file("embed"), buf, reqs).result()
      counters = getattr(self.counters, self._phase)
      counters.add("disk_bytes", sum(q[1] for q in reqs))
      counters.add("disk_requests", len(reqs))
      if not whole:
        # Row k lies at k * span + its offset in its first page; moved down to
        # k * row in order, no row overwrites one not yet moved.
        for k, skew in enumerate(starts - firsts):
          if k * span + skew != k * row:
            buf[k * row:(k + 1) * row] = buf[k * span + skew:k * span + skew + row]
        buf[len(tokens) * row:rows * row] = 0
        table = buf[:rows * row].view(info.dtype).reshape(rows, *info.shape[1:])
        local = inverse.reshape(ids.shape)
      x = embed(dict(params, tokens=jax.device_put(table, self._sharding)),
                local.astype(np.int32), positions)
      if extra is not None:
        x.block_until_ready()
    finally:
      if extra is not None:
        self.ledger.release(extra)
    return x

  def fetch(self, layer, half):
    if self._lanes is not None:
      return self._lanes.fetch(layer, half)
    return self._fixed[f"layers/{layer}/{half}"]

  def begin(self, phase, num_tokens):
    if self._lanes is not None:
      return self._lanes.begin(phase, num_tokens)
    self._settle()  # none unless a pass failed before its end
    self._prompt_records = [[], []]  # a failed prefill's: its areas may be refilled since
    self._phase = phase if num_tokens == 1 else "prefill"
    if self._phase == "prefill":  # another sequence
      self._missed = {}
      if self._fb is not None:
        self._fb.reset()
        self._pre = [[] for _ in self._pre]
    self._step_shapes = 0
    for ahead in self._ahead.values():  # none unless a step failed: let its reads finish
      ahead.read.fut.exception()
    self._ahead = {}

  def end(self):
    if self._lanes is not None:
      return self._lanes.end()
    self._settle()
    for area in (0, 1):
      self._admit_prompt(area)
    if self._phase == "decode":
      self._new_shapes_per_token.append(self._step_shapes)

  def run_attention(self, layer, params, x, cache, cache_index, positions, kv_mask, attention):
    if self._lanes is not None:
      return self._lanes.run_attention(layer, params, x, cache, cache_index, positions,
                                       kv_mask, attention)
    out = attention(params, x, cache, cache_index, positions, kv_mask)
    o = self.options
    if (o.lookahead and o.lookahead_source == "previous_token" and self._phase == "decode"
        and layer in self._missed):
      # This guess needs no input, so its reads start here, while the device computes
      # the attention and predictor: the disk would idle then (the layer before's
      # reads have landed), and they do not queue in front of that layer's own.
      self._look_ahead(layer, self._guess(layer, self._missed[layer]))
    return out

  def run_ffn(self, layer, params, x, ffn):
    if self._lanes is not None:
      return self._lanes.run_ffn(layer, x)
    return self.ffn_finish(layer, params, x, self.ffn_partial(layer, params, x))

  def ffn_finish(self, layer, params, x, acc):
    """The residual plus `acc` (the FFN's output, summed over the shards on a mesh)
    plus down's bias."""
    del layer
    return self._finish(x, acc, params)

  def ffn_partial(self, layer, params, x):
    """Layer `layer`'s FFN output before down's bias and the residual (on a mesh:
    this shard's neurons' part, summed over the shards by the caller)."""
    h = self._norm(params, x)
    try:
      if self._phase == "decode":
        parts = self._decode(layer, params, x, h)
      else:
        parts = self._prefill(layer, params, x, h)
    except OSError as e:  # the reads of this layer's neurons (and any hot-cache swap)
      raise ReadError(e.errno or errno.EIO,
                      f"neuron_cluster: reading layer {layer}'s neurons from"
                      f" {self.store.file(layer)} (store {self.store.path}) failed: {e}") from e
    return self._summed(parts)

  def _summed(self, parts):
    """The sum of `parts` in one dispatch (`_sum`)."""
    if len(parts) == 1:
      return parts[0]
    first = parts[0]
    key = (first.shape, first.dtype)
    if key not in self._neg_zero:
      self._neg_zero[key] = jnp.full(first.shape, -0.0, first.dtype)
    pad = (1 << (len(parts) - 1).bit_length()) - len(parts)
    return self._sum(tuple(parts) + (self._neg_zero[key],) * pad)

  def _prefill(self, layer, params, x, h):
    """Dense: stream the layer's records in chunks, double-buffered in the two areas.
    The prefill computes every record, so it also leaves what the first decode steps
    would otherwise learn by reading: with `prefill_admission`, each chunk's records
    the prompt used are offered to the cache before its area is refilled
    (`_admit_prompt`); with `feedback` (batch 1), every record's error at the prompt's
    last token is measured (`_seed_scores`)."""
    o, f = self.options, self.config.intermediate_size
    half = self.area_cap
    chunks = [(s, min(half, f - s)) for s in range(0, f, half)]
    recency = None
    if o.prefill_admission and self.cache.cold_slots:
      # Token i from the prompt's end weighs decay**i, as i decode steps would.
      tokens = h.shape[1]
      recency = jnp.asarray(o.admit_decay ** np.arange(tokens - 1, -1, -1), jnp.float32)
      self.cache.begin_prompt(layer, tokens)
    seed = self._seed_scores(layer, x)

    def submit(k):
      s, n = chunks[k]
      area = k % 2
      # Aliasing rule (hetflow/memory/buffers.py): every computation still
      # reading this area (this layer's or the previous layer's) must finish
      # before it is refilled.
      jax.block_until_ready(self._area_users[area])
      self._admit_prompt(area)
      self._area_users[area] = []
      return self._read(layer, np.arange(s, s + n), "staging", area * half, True, "prefill")

    outs, pending = [], submit(0)
    if seed is not None:  # selected once the first read is under way: it waits for attention
      self._fb.select(layer, np.asarray(seed[0]).reshape(-1), float(seed[1]),
                      self.predictor.thresholds[layer], o.threshold_margin, o.feedback_margin)
    for k, (s, n) in enumerate(chunks):
      pending.wait()
      if k + 1 < len(chunks):
        pending = submit(k + 1)
      base = (k % 2) * half
      for off, size in self._blocks(n):
        pos = np.arange(s + off, s + off + size)
        valid = pos < s + n
        positions = np.where(valid, pos, -1)
        out, _, third = self._compute("prefill", "staging", base + off, size, valid, layer,
                                      positions, h, params, recency)
        pre, recent = third if recency is not None else (third, None)
        outs.append(out)
        self._area_users[k % 2].append(out)
        if seed is not None:  # observed at the layer's first decode step (_predict)
          self._pre[layer].append((positions, pre))
        if recency is not None:
          n_valid = int(valid.sum())
          self._prompt_records[k % 2].append(
              (layer, pos[:n_valid], base + off + np.arange(n_valid), recent))
    return outs

  def _seed_scores(self, layer, x):
    """With error feedback on a batch-1 prompt: the predictor's scores and scale at the
    prompt's last token (dispatched, not waited for), or None. Selected on them, the
    exact pre-activations the prefill computes for every record give every neuron's
    error (`ErrorFeedback.observe`) for the first decode step, as a decode step does
    for the records it computed."""
    if self._fb is None or x.shape[0] != 1 or not self.predictor.linear_layers[layer]:
      return None
    last = x[:, -1:]
    return self.predictor.scores(layer, last), self._rms(last)

  def _admit_prompt(self, area):
    """Copies the records of staging `area` that the cache admits on the prompt's
    history (`SegmentedCache.admit_prompt`) into the cold region: the first decode
    steps then read what the prompt's last tokens used only if the cache had no
    room. Before the area is refilled, or at the end of the prefill pass."""
    if self._prompt_records[area]:
      jax.block_until_ready(self._area_users[area])  # the counts come from these
    for layer, positions, staged, recent in self._prompt_records[area]:
      recent = np.asarray(recent)[:len(positions)]
      offered, slots = self.cache.admit_prompt(layer, positions, recent)
      ok = slots >= 0
      if ok.any():
        self._copy_to_pool(staged[np.searchsorted(positions, offered[ok])], slots[ok],
                           offered[ok])
    self._prompt_records[area] = []

  def _predict(self, layer, x, h, before_wait=None):
    """This layer's predicted positions and, with look-ahead, the next layer's
    guess from this layer's input (one sync for both). `before_wait()` runs once
    the predictor's computations are dispatched, before the host waits for them."""
    o, c = self.options, self.config
    fb = (self._fb is not None and x.shape[0] * x.shape[1] == 1
          and self.predictor.linear_layers[layer])
    if fb:
      outs = [self.predictor.scores(layer, x), self._rms(x)]
    else:
      outs = [self.predictor.predict(layer, x, h, margin=o.threshold_margin)]
    # The guess for the next layer from this layer's input (the previous token's
    # guess is started in `run_attention`): with feedback, that layer's scores
    # (corrected where its error is known), ranked surest first.
    ahead = o.lookahead and o.lookahead_source == "predictor" and layer + 1 < c.num_layers
    rank = ahead and fb and self.predictor.linear_layers[layer + 1]
    if rank:
      outs.append(self.predictor.scores(layer + 1, x))
    elif ahead:
      nxt = self._fixed[f"layers/{layer + 1}/mlp"]
      outs.append(self.predictor.predict(layer + 1, x, self._norm(nxt, x),
                                         margin=o.lookahead_margin))
    if self._fb is not None:
      if fb:
        self._observe(layer)  # the last token's (normally done already, while reading)
      self._pre[layer] = []  # from here on: this token's pre-activations
    if before_wait is not None:
      before_wait()
    t0 = time.perf_counter()
    got = [np.asarray(m) for m in outs]
    self._timer["wait_input_s"] += time.perf_counter() - t0
    guess = None
    if rank:
      guess = self._fb.rank(layer + 1, got[-1].reshape(-1), float(got[1]),
                            self.predictor.thresholds[layer + 1], o.lookahead_margin)
    elif ahead:
      guess = np.nonzero(got[-1].reshape(-1, c.intermediate_size).any(0))[0]
    if fb:
      active = self._fb.select(layer, got[0].reshape(-1), float(got[1]),
                               self.predictor.thresholds[layer], o.threshold_margin,
                               o.feedback_margin)
    else:
      active = np.nonzero(got[0].reshape(-1, c.intermediate_size).any(0))[0]
    return active, (self._guess(layer + 1, guess) if ahead else None)

  def _guess(self, layer, positions):
    """The look-ahead's guess for `layer` (a seam for tests: a wrong guess costs reads only)."""
    return positions

  def _observe(self, layer):
    """Feeds the error feedback the exact pre-activations the step computed for `layer`
    at its last token."""
    for positions, pre in self._pre[layer]:
      self._fb.observe(layer, positions, np.asarray(pre))
    self._pre[layer] = []

  def _settle(self):
    """The bookkeeping a layer leaves for later: its records' admission into the cache
    and its pre-activations for the feedback. Called while the next layer's reads are
    in flight (the layer's computations are done by then: the next layer's input
    waited for them), or at the end of the pass, so it is off the disk's critical path;
    always before the layer's staging area is refilled (two layers on) or its scores
    are next selected (the next token)."""
    if self._unsettled is None:
      return
    layer, read_pos, read_slots, cached_outs, observe = self._unsettled
    self._unsettled = None
    if read_pos:
      self._admit(layer, read_pos, read_slots, cached_outs)
    if observe:
      self._observe(layer)

  def _decode(self, layer, params, x, h):
    o, c = self.options, self.config
    cached_outs, early = [], set()

    def cached_early():
      # A cached block this layer multiplied whole at the last token does not depend
      # on the prediction: the device computes it while the host waits for the
      # predictor, selects and queues the reads (serial with the device otherwise).
      # Pipelined, static hot clusters only (an LRU swap refills the hot block after this).
      if not self.num_slots or not o.pipeline or o.hot_policy != "static":
        return
      for kind in ("hot", "cold"):
        if self._whole.get((layer, kind)):
          cached_outs.extend(self._whole_block(layer, kind, h, params))
          early.add(kind)

    active, guess = self._predict(layer, x, h, cached_early)
    if o.hot_policy == "lru" and self.num_slots:
      self._swap_hot(layer)
    self.counters.decode.add("predicted", len(active))
    if self._truth is not None:
      true = np.asarray(self._truth.predict(layer, x, h)).reshape(-1, c.intermediate_size).any(0)
      predicted = np.zeros_like(true)
      predicted[active] = True
      uncached = self.cache.slot_of[layer] < 0 if self.num_slots else np.ones_like(true)
      computed = predicted | ~uncached
      if layer in self._ahead:
        computed[self._ahead[layer].positions] = True
      self._audit[layer] += [(true & predicted).sum(), (~true & predicted).sum(),
                             (true & ~predicted).sum(), (true & uncached).sum(),
                             (true & ~computed).sum()]
    if self.num_slots:
      _, hit_slots, missing = self.cache.split(layer, active)  # `use`d in overlapped()
    else:
      hit_slots, missing = active[:0], active
    self._missed[layer] = missing
    outs = []

    def cached_part():
      # A layer's cached records are two blocks (hot clusters, cold partition),
      # multiplied whole (an unpredicted record fires only if the predictor
      # missed it: exact for the oracle, closer to dense for a trained one)
      # unless the block is large next to its hits: then the hits are gathered.
      if not self.num_slots:
        return
      for kind in ("hot", "cold"):
        first, n = self.cache.hot_range(layer) if kind == "hot" else self.cache.cold_range(layer)
        hits = hit_slots[(hit_slots >= first) & (hit_slots < first + n)]
        whole = bool(n and len(hits) and n <= o.gather_ratio * len(hits))
        self._whole[(layer, kind)] = whole
        if kind in early or not n or not len(hits):
          continue
        if whole:
          cached_outs.extend(self._whole_block(layer, kind, h, params))
        else:
          cached_outs.extend(self._gathered(kind, hits, layer, h))

    area = layer % 2
    if self._unsettled is not None and self._unsettled[0] % 2 == area:
      self._settle()  # its records lie in the area this layer's reads refill (moe_sparse)
    base = area * self.area_cap
    ahead = self._ahead.pop(layer, None)
    read_pos, read_slots = [], []  # for admission
    # The look-ahead's records: in flight or landed at base, ...; the rest of the
    # misses are read first (so the disk's queue never empties), then the
    # guess's are all computed (those cached since or read twice are masked out).
    used = 0
    if ahead is not None:
      inflight = np.isin(missing, ahead.positions)
      self.counters.decode.add("ahead_used", int(inflight.sum()))
      self.counters.decode.add("ahead_read", len(ahead.positions))
      self.counters.decode.add("ahead_landed", int(ahead.read.fut.done()))
      self.counters.decode.add("ahead_layers", 1)
      missing = missing[~inflight]
      read_pos.append(ahead.positions)
      read_slots.append(base + np.arange(len(ahead.positions)))
      used = -(-len(ahead.positions) // self._min_block) * self._min_block

    def overlapped():
      # Once this layer's first reads are queued, while they land: this layer's
      # and the layer before's bookkeeping, the predictor's guess for the next
      # layer (queued behind these), the cached part's computations, then the
      # guess's records (read by now).
      if self.num_slots:
        self.cache.use(layer, active, hit_slots)
      self._settle()
      if guess is not None:
        self._look_ahead(layer + 1, guess)
      if o.pipeline:
        cached_part()
      if ahead is not None:
        compute_ahead()

    def compute_ahead():
      t0 = time.perf_counter()
      ahead.read.wait()
      self._timer["wait_read_s"] += time.perf_counter() - t0
      for off, size in ahead.blocks:
        pos = np.full(size, -1, np.int64)
        part = ahead.positions[off:off + size]
        pos[:len(part)] = part
        valid = pos >= 0
        if self.num_slots:
          valid &= self.cache.slot_of[layer, np.maximum(pos, 0)] < 0
        out, fired, _ = self._compute("staging", "staging", base + off, size, valid, layer,
                                      pos, h, params)
        outs.append(out)
        self._fired.append(fired)
    self.counters.decode.add("late_reads", len(missing))
    if o.bridge_gap and len(missing):
      free = self.cache.slot_of[layer] < 0 if self.num_slots else None
      if ahead is not None:
        free = np.ones(self.config.intermediate_size, bool) if free is None else free.copy()
        free[ahead.positions] = False
      missing = bundle_store.bridge_gaps(missing, o.bridge_gap, free)
    # The rest of the misses, in rounds when they overflow the area.
    started = False
    while len(missing):
      room = self.area_cap - used
      if room < self._min_block:  # the area is full: compute and admit what it holds, start over
        if not started:  # the look-ahead's records filled it: computed before they are overwritten
          overlapped()
          started = True
        self.counters.decode.add("read_neurons", sum(len(p) for p in read_pos))
        self._admit(layer, read_pos, read_slots, cached_outs)
        read_pos, read_slots = [], []
        jax.block_until_ready(outs)
        used, room = 0, self.area_cap
      rnd, missing = missing[:room], missing[room:]
      pieces = o.pieces if o.pipeline else 1
      blocks = self._blocks(len(rnd), pieces)
      # One read call per piece, not per block (a call costs the host ~0.3 ms),
      # cut where a run of adjacent records starts, not at the pieces' edges: a
      # run split in two would cost a second request (the disk is IOPS-bound at
      # these sizes). A block is computed once every read that starts inside or
      # before it has landed.
      cuts = run_cuts(rnd, piece_starts(blocks, pieces))
      reads = [(a, self._read(layer, rnd[a:b], "staging", base + used + a, o.pipeline,
                              "decode")) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
      if not started:
        overlapped()
        started = True
      for off, size in blocks:
        t0 = time.perf_counter()
        while reads and reads[0][0] < off + size:
          reads.pop(0)[1].wait()
        self._timer["wait_read_s"] += time.perf_counter() - t0
        pos = np.full(size, -1, np.int64)
        part = rnd[off:off + size]
        pos[:len(part)] = part
        out, fired, _ = self._compute("staging", "staging", base + used + off, size,
                                      pos >= 0, layer, pos, h, params)
        outs.append(out)
        self._fired.append(fired)
      read_pos.append(rnd)
      read_slots.append(base + used + np.arange(len(rnd)))
      used += sum(size for _, size in blocks)
    if not started:  # no reads of its own: the guess held every miss, or none
      overlapped()
    self.counters.decode.add("read_neurons", sum(len(p) for p in read_pos))
    if not o.pipeline:
      cached_part()
    fb = self._fb is not None and x.shape[0] * x.shape[1] == 1
    self._unsettled = (layer, read_pos, read_slots, cached_outs, fb)
    self._area_users[area] = outs
    outs = cached_outs + outs
    if not outs:  # nothing predicted or cached: an exact zero FFN output
      size = self._min_block
      outs.append(self._compute("staging", "staging", base, size, np.zeros(size, bool), layer,
                                np.full(size, -1), h, params)[0])
    return outs

  def _admit(self, layer, read_pos, read_slots, cached_outs):
    """Copies the admitted records from staging into the cold partition."""
    if not self.num_slots:
      return
    pos, st = np.concatenate(read_pos), np.concatenate(read_slots)
    # Only records outside the cache: a look-ahead guess may hold cached ones.
    keep = self.cache.slot_of[layer, pos] < 0
    pos, st = pos[keep], st[keep]
    slots = self.cache.admit(layer, pos)
    ok = slots >= 0
    if not ok.any():
      return
    # The cold partition's block may still be computing: the aliasing rule.
    jax.block_until_ready(cached_outs)
    self._copy_to_pool(st[ok], slots[ok], pos[ok])

  def _copy_to_pool(self, staged, slots, positions):
    """Copies the records at staging slots `staged` (of `positions`) to pool `slots`."""
    sa, sb = self.st_planes.views(self.staging, np.uint8, self.st_planes.b_nbytes)
    pa, pb = self.pool_planes.views(self.pool, np.uint8, self.pool_planes.b_nbytes)
    pa[slots] = sa[staged]
    pb[slots] = sb[staged]
    self._slot_pos[slots] = positions

  def _look_ahead(self, layer, guess):
    """Starts reading the guessed, uncached records of `layer` into its area (`guess`
    surest first or sorted; at most `lookahead_records`, the first of them)."""
    if self.num_slots:
      guess = guess[self.cache.slot_of[layer, guess] < 0]
    limit = self.options.lookahead_records
    guess = np.sort(guess[:self.area_cap if limit is None else min(limit, self.area_cap)])
    if self.options.bridge_gap:
      free = self.cache.slot_of[layer] < 0 if self.num_slots else None
      guess = bundle_store.bridge_gaps(guess, self.options.bridge_gap, free)[:self.area_cap]
    if not len(guess):
      return
    area = layer % 2
    # Its area was last read by layer - 2's computations (the previous pass's for
    # layers 0 and 1), and their records admitted at the step after theirs (or the
    # pass's end). The host has waited since for what they fed (layer - 1's
    # predictor, or the sampled token): free to refill.
    base = area * self.area_cap
    blocks = self._blocks(len(guess), self.options.pieces)
    self._ahead[layer] = _Ahead(guess, blocks,
                                self._read(layer, guess, "staging", base, True, "decode"))

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
    self._slot_pos[first:first + len(positions)] = positions
    before = self.counters.decode.disk_bytes
    self._read(layer, positions, "pool", first, True, "decode").wait()
    self.counters.decode.add("swap_bytes", self.counters.decode.disk_bytes - before)
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
    if self._lanes is not None:
      return self._lanes.stats()
    d = self.counters.decode
    n = max(d.passes, 1)
    fired = int(sum(int(f) for f in self._fired))
    neuron = self.store.neuron_nbytes
    per_token = d.disk_bytes / n
    useful = fired * neuron / n
    f_total = self.config.num_layers * self.config.intermediate_size
    tp, fp, fn, uncached, never = self._audit.T
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
        # The sparse step: records multiplied (cached blocks, landed reads) and
        # their bytes (set against the run's f32 matvec probe for the compute limit).
        "computed_neurons_per_token": self._computed / n,
        "computed_bytes_per_token": self._computed * neuron / n,
        "fixed_bytes_per_token": multiplied_bytes(self._fixed, self.config),
        # Look-ahead: of the misses each layer needed, the share already in
        # flight or landed when the layer began; the guess's reads; the share of
        # the layers whose guess had landed whole by then.
        "ahead_fraction": d.get("ahead_used") / max(d.get("ahead_used") + d.get("late_reads"), 1),
        "ahead_read_neurons_per_token": d.get("ahead_read") / n,
        "ahead_unused_neurons_per_token": (d.get("ahead_read") - d.get("ahead_used")) / n,
        "ahead_landed_fraction": d.get("ahead_landed") / max(d.get("ahead_layers"), 1),
        "late_read_neurons_per_token": d.get("late_reads") / n,
        # Host-side waits per token: for a layer's input (the predictor's sync:
        # the device still computing) and for reads still in flight.
        "wait_input_s_per_token": self._timer["wait_input_s"] / n,
        "wait_read_s_per_token": self._timer["wait_read_s"] / n,
        "new_shapes_per_token": list(self._new_shapes_per_token),
    }
    if audited:
      details.update(
          missed_neurons_per_token=fn.sum() / n,
          # What the computation missed: neither predicted, cached nor guessed.
          uncomputed_neurons_per_token=never.sum() / n,
          computed_recall=float(1 - never.sum() / max((tp + fn).sum(), 1)),
          true_density=(tp + fn).sum() / n / f_total,
          recall=float(tp.sum() / max((tp + fn).sum(), 1)),
          precision=float(tp.sum() / max((tp + fp).sum(), 1)),
          layer_recall=[float(a / max(a + b, 1)) for a, b in zip(tp, fn)],
          layer_precision=[float(a / max(a + b, 1)) for a, b in zip(tp, fp)])
    out = self.counters.copy()
    out.decode.add("wait_s", self._timer["wait_read_s"])
    out.decode.other["useful_bytes"] = fired * neuron
    out.decode.other["computed_bytes"] = self._computed * neuron
    out.details.update(details)
    out.reads = self.reader.record()
    return out

  def close(self):
    if self._lanes is not None:
      self._lanes.close()
    reader = getattr(self, "reader", None)
    if reader is not None:
      reader.close()
    store = getattr(self, "store", None)
    if store is not None:
      store.close()
    table = getattr(self, "_table", None)
    if table is not None:
      table.close()
