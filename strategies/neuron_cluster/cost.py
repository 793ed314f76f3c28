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
     size and queue depth -> compute the layer's cached records (all of them:
     the strategy multiplies its hot block and cold partition whole) while the
     reads land (or only its hits, gathered, when they are few: `gather_ratio`),
     then each of `pieces` pieces as it arrives (pipeline), or read
     everything one request at a time and then compute (no pipeline).
  Not modelled: the look-ahead (its guesses' extra reads, and reads moved
  into the previous layer's compute), `bridge_gap`, and with `embed_tier="disk"`
  the token table's row reads (one page-rounded row per token: 8 KiB for llama-1b).

The cache model (hot hits, cold hits, misses and coalesced requests from
firing probabilities) is hetflow.sparsity.cache_model's. MoE models
(TurboSparse-Mixtral) are planned from shapes by `shape_placement`: the
strategy does not run them, but the model predicts them.

What the cost model reads is the plan's NeuronClusterSettings; the strategy
(strategies/neuron_cluster/strategy.py) and `shape_placement` size a plan with
the same function, `plan_sizes`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hetflow import costmodel, hardware, simulate
from hetflow.memory import bundle_store
from hetflow.memory.budget import BudgetExceeded, format_bytes, parse_bytes
from hetflow.memory.buffers import PAGE, round_up
from hetflow.models.modules import uses_rms_norm
from hetflow.sparsity.bundles import neuron_matrices, record_codec
from hetflow.sparsity.cache_model import (
    CacheEstimate,
    estimate_cache,
    layer_frequencies,
    neurons_per_layer,
)
from hetflow.strategy import GroupPlacement, Placement

# A trained predictor reads more neurons than fire: at recall 0.98 the
# llama-1b-sparse predictors had precision 0.55-0.92 (WORKSPACE_NOTES.md,
# "Neuron-cluster benchmark"); assumed 0.8 where no measurement is given.
TRAINED_PRECISION = 0.8
# With the predictor's error fed back (NeuronClusterOptions.feedback: dense Llama
# models), far fewer false positives at the same recall: precision 0.85-0.94 per layer,
# 0.92 overall, on llama-1b-sparse at feedback_margin -0.1 (WORKSPACE_NOTES.md, issue 13).
FEEDBACK_PRECISION = 0.92


# -- a plan's sizes and settings ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class PredictorQuality:
  """What training measured of a trained predictor, per layer (predictor.json).

  Attributes:
    nbytes: the predictor's bytes.
    true_density: [L] fraction of neurons that fired on the held-out steps.
    precision: [L] fraction of predicted neurons that fired.
  """

  nbytes: int
  true_density: tuple[float, ...] | None = None
  precision: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Bytes of a neuron_cluster plan, before the cache takes what is left.

  Attributes:
    neurons: neuron records per layer (X * F for an MoE layer).
    record: bytes of one neuron record (4 KiB-padded).
    stride: bytes between a record's matrix rows.
    fixed: the fixed region: everything but the neurons' rows.
    predictor: the predictor's bytes.
    staging: the buffer misses and prefill chunks are read into.
    kv: the KV cache reserve.
    full_cache: bytes of every record of every layer.
    embed_table: bytes of the token-embedding table kept on disk
      (`embed_tier="disk"`; 0: it is in the fixed region).
    embed_rows: device bytes reserved for the table rows a pass reads (a
      prompt of the KV reserve's length; decode reads one row per token).
  """

  neurons: int
  record: int
  stride: int
  fixed: int
  predictor: int
  staging: int
  kv: int
  full_cache: int
  embed_table: int = 0
  embed_rows: int = 0


@dataclasses.dataclass(frozen=True)
class NeuronClusterSettings:
  """What the cost model reads from a neuron_cluster plan (`Placement.settings`).

  Attributes:
    options: the NeuronClusterOptions planned.
    sizes: the plan's Sizes.
    cache_slots: records the neuron cache holds.
    weight_bits: stored bits per weight where the weights are quantised
      (PowerInfer-2's int4; shape-only plans), else None.
    predictor_quality: a trained predictor's measured quality, or None.
    frequencies: [L, N] firing probabilities to use instead of the model's law.
    cold_start_tokens: average over that many decode steps from an empty cold
      region instead of the steady state.
  """

  options: Any
  sizes: Sizes
  cache_slots: int
  weight_bits: int | None = None
  predictor_quality: PredictorQuality | None = None
  frequencies: np.ndarray | None = None
  cold_start_tokens: int | None = None


def plan_sizes(model, options, weight_bits: int | None = None,
               trained: PredictorQuality | None = None) -> Sizes:
  """Sizes of a plan of `model` under NeuronClusterOptions `options`.

  Args:
    model: shapes and configuration only.
    options: NeuronClusterOptions.
    weight_bits: stored width of the weights if quantised (not the KV cache).
    trained: the trained predictor's figures; None sizes an untrained one at
      rank D/16 (float32).
  """
  c, o = model.config, options
  item = np.dtype(model.dtype).itemsize
  mats = len(neuron_matrices(c))
  n = neurons_per_layer(c)
  if weight_bits is None and getattr(model, "weights", "float32") != "float32":
    record, stride, fixed = _format_sizes(model, n)
  else:
    wq = weight_bits / 8 if weight_bits else item  # bytes per stored weight
    row = int(c.hidden_size * wq)
    stride = row if o.layout == "bundled" else round_up(row)
    record = round_up(mats * stride)
    neuron_rows = mats * c.hidden_size * n * item  # one layer's, in the model's dtype
    fixed = int((model.nbytes - c.num_layers * neuron_rows) * wq / item)
  if o.predictor == "oracle":
    predictor = c.num_layers * (mats - 1) * c.hidden_size * n * item
  elif trained is not None:
    predictor = trained.nbytes
  else:
    r = c.hidden_size // 16
    predictor = c.num_layers * (c.hidden_size * (r + 2) + r * (n + 1) + n) * 4
  staging = max(2, min(parse_bytes(o.staging_bytes) // record, n)) * record
  table = rows = 0
  if getattr(o, "embed_tier", "device") == "disk":
    shape = model.shapes["embed/tokens"]
    scale = weight_bits / (8 * item) if weight_bits else 1.0
    table = int(shape.size * np.dtype(shape.dtype).itemsize * scale)
    tokens = o.kv_reserve_tokens or c.max_position_embeddings
    rows = embed_rows_nbytes(model, min(tokens, c.vocab_size))
    fixed -= table
  return Sizes(neurons=n, record=record, stride=stride, fixed=fixed, predictor=predictor,
               staging=staging, kv=model.kv_cache_nbytes(o.kv_reserve_tokens),
               full_cache=c.num_layers * n * record, embed_table=table, embed_rows=rows)


def embed_rows_bucket(n: int) -> int:
  """Rows of the table a pass embedding `n` distinct tokens builds: a power of two,
  at least 16 (a few compiled shapes)."""
  return 1 << max(4, (n - 1).bit_length())


def embed_row_span(model) -> int:
  """Bytes one token-table row takes when read with O_DIRECT: its pages (one more
  when a row does not start on a page)."""
  shape = model.shapes["embed/tokens"]
  row = shape.shape[-1] * np.dtype(shape.dtype).itemsize
  return round_up(row) + (PAGE if row % PAGE else 0)


def embed_rows_nbytes(model, n: int) -> int:
  """Device bytes a pass embedding `n` distinct tokens reads the table into: their
  rows' pages, or the whole (padded) table where that is smaller (then one read)."""
  shape = model.shapes["embed/tokens"]
  whole = round_up(shape.size * np.dtype(shape.dtype).itemsize)
  return min(embed_rows_bucket(n) * embed_row_span(model), whole)


def _format_sizes(model, neurons: int) -> tuple[int, int, int]:
  """(record, stride, fixed) bytes of a model stored in a weight format: a record holds
  the format's plane-A and plane-B bytes (`hetflow.sparsity.bundles.RecordCodec`),
  padded to 4 KiB; the fixed region is every stored leaf but the neurons' kernels, plus
  the per-layer down tables the records' down rows need."""
  c = model.config
  codec = record_codec(model)
  mats = neuron_matrices(c)
  kernels = sum(s.size * np.dtype(s.dtype).itemsize for name, s in model.shapes.items()
                if name.split("/")[0] == "layers" and name.split("/")[2] == "mlp"
                and name.split("/")[3] in mats)
  fixed = model.nbytes - kernels + c.num_layers * codec.table_nbytes(neurons)
  return round_up(codec.a_nbytes + codec.b_nbytes), codec.a_nbytes, fixed


def make_placement(model, budget, options, sizes: Sizes, weight_bits: int | None = None,
                   trained: PredictorQuality | None = None, notes: tuple[str, ...] = ()
                   ) -> Placement:
  """The placement of a sized plan: fixed region on the device, neurons on disk,
  and a cache of what the device budget leaves (or `options.cache_bytes`).

  Raises:
    BudgetExceeded: when the fixed region, predictor, staging and KV reserve do
      not fit, or a set cache_bytes does not fit beside them.
  """
  o, s, c = options, sizes, model.config
  need = s.fixed + s.predictor + s.staging + s.kv + s.embed_rows
  limit = budget.device
  left = None if limit is None else limit - need
  if left is not None and left < 0:
    raise BudgetExceeded("device", need, 0, limit,
                         group="fixed region + predictor + staging + KV reserve"
                         + (" + embedding rows" if s.embed_rows else ""), minimum=need)
  if o.cache_bytes is None:
    cache = s.full_cache if left is None else min(left, s.full_cache)
  else:
    cache = min(parse_bytes(o.cache_bytes), s.full_cache)
    if left is not None and cache > left:
      raise BudgetExceeded("device", cache, need, limit, group="neuron cache",
                           minimum=need + cache)
  slots = cache // s.record
  # The disk tier holds the whole neuron store: every layer's records and the order.
  disk = bundle_store.store_nbytes(c.num_layers, s.neurons, s.record) + s.embed_table
  if budget.disk is not None and disk > budget.disk:
    raise BudgetExceeded("disk", disk, 0, budget.disk, group="neuron-bundle store"
                         + (" + token table" if s.embed_table else ""), minimum=disk)

  def group(g):
    if g.endswith("/mlp"):
      return GroupPlacement("disk", s.neurons * s.record, "neuron bundles + cache")
    if g == "embed" and s.embed_table:
      return GroupPlacement("disk", s.embed_table, "token table (rows read per pass)")
    return GroupPlacement("device", model.group_nbytes(g), "fixed region")

  groups = {g: group(g) for g in model.group_names()}
  # The embed group's other leaves (OPT's positions, project_in) stay on the device.
  embed_rest = model.group_nbytes("embed") - s.embed_table if s.embed_table else 0
  notes = notes + (f"cache {format_bytes(slots * s.record)} = {slots} neurons"
                   f" ({slots / (c.num_layers * s.neurons):.1%} of all), predictor"
                   f" {o.predictor} {format_bytes(s.predictor)}, staging"
                   f" {format_bytes(s.staging)}, KV reserve {format_bytes(s.kv)}, layout"
                   f" {o.layout}, pipeline {o.pipeline}"
                   + (f", token table on disk ({format_bytes(s.embed_table)}; rows"
                      f" {format_bytes(s.embed_rows)})" if s.embed_table else ""),)
  settings = NeuronClusterSettings(o, s, slots, weight_bits, trained)
  return Placement("neuron_cluster", groups, working_bytes={
      "device": s.predictor + s.staging + s.kv + slots * s.record + s.embed_rows + embed_rest,
      "disk": disk - c.num_layers * s.neurons * s.record - s.embed_table}, notes=notes,
      settings=settings)


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
                  freq: np.ndarray | None = None, precision: float | None = None,
                  prompt_tokens: int = 0) -> DecodeCounts:
  """Expected neurons, bytes and requests read per decode token of a plan.

  Args:
    model: shapes and activation law.
    placement: a neuron_cluster placement (or `shape_placement`'s).
    tokens: cold-start decode steps to average over (None: steady state).
    prompt_tokens: with `tokens`, the prompt before them, which warms the cache
      as that many steps would where `prefill_admission` is on.
    freq: [L, N] firing probabilities to use instead of the model's law (e.g.
      the strategy's recorded statistics, hottest first).
    precision: share of predicted neurons that fire (default: 1 for the
      oracle; for a trained predictor, the per-layer precision its training
      measured (`predictor_quality` in the plan), at least FEEDBACK_PRECISION
      where its error is fed back; else TRAINED_PRECISION).
  """
  s: NeuronClusterSettings = placement.settings
  o = s.options
  quality = s.predictor_quality if o.predictor != "oracle" else None
  if freq is None:
    freq = layer_frequencies(model)
    if quality and quality.true_density:
      # The law's shape, at the density each layer measured while training.
      density = np.asarray(quality.true_density)[:, None]
      freq = np.minimum(freq * density / freq.mean(axis=1, keepdims=True), 1.0)
  if precision is None:
    if o.predictor == "oracle":
      precision = 1.0
    elif quality and quality.precision:
      precision = np.asarray(quality.precision)
      # Fed back on a trained predictor this strategy runs (not a shape plan's, e.g.
      # PowerInfer-2's own predictor, which has no feedback).
      c = model.config
      if getattr(o, "feedback", False) and not c.num_experts and uses_rms_norm(c):
        precision = np.maximum(precision, FEEDBACK_PRECISION)
    else:
      precision = TRAINED_PRECISION
  cache = estimate_cache(freq, s.cache_slots, o.hot_fraction, o.cluster_size, tokens,
                         o.coalesce and o.layout == "bundled", o.admission, o.admit_decay,
                         o.admit_min, prompt_tokens if o.prefill_admission else 0)
  # Falsely predicted neurons do not fire, so they are not the hot ones: they
  # all miss, and coalesce as the true misses do. (On llama-1b-sparse this
  # reproduced the measured hot share of predicted neurons, 19.6%.)
  predicted = cache.active / precision
  read_l = cache.misses + (predicted - cache.active)
  requests_l = cache.requests * read_l / np.maximum(cache.misses, 1e-12)
  if o.layout == "split":  # bytes asked for; O_DIRECT transfers 4 KiB per row
    mats = len(neuron_matrices(model.config))
    row = model.config.hidden_size * np.dtype(model.dtype).itemsize * _weight_scale(model, s)
    nbytes, requests_l = read_l.sum() * mats * row, read_l * mats
  else:
    nbytes = read_l.sum() * s.sizes.record
  requests = float(requests_l.sum())
  return DecodeCounts(cache, predicted, read_l, requests_l, float(predicted.sum()),
                      float(read_l.sum()),
                      float(nbytes), requests, float(nbytes / requests) if requests else 0.0)


def _neuron_bytes(model) -> int:
  """Bytes of weights one neuron's computation touches (its rows, unpadded)."""
  return len(neuron_matrices(model.config)) * model.config.hidden_size * np.dtype(model.dtype).itemsize


def _weight_scale(model, s: NeuronClusterSettings) -> float:
  """Stored bytes per weight relative to the model's dtype (`weight_bits`:
  quantised weights that hetflow has no dtype for, e.g. PowerInfer-2's int4)."""
  bits = s.weight_bits
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


def events(ctx: simulate.PassContext) -> None:
  """Dense streamed prefill and sparse cached decode (see the module docstring),
  from the plan's NeuronClusterSettings."""
  model, prof, pl = ctx.model, ctx.profile, ctx.placement
  c, s = model.config, pl.settings
  o = s.options
  n_layers, mats = c.num_layers, len(neuron_matrices(model.config))
  n = neurons_per_layer(c)
  rec = s.sizes.record
  q = _weight_scale(model, s)
  neuron = _neuron_bytes(model) * q
  mem_bw = prof.memory_bw
  cpu_bw = costmodel.matvec_bw(prof, "cpu", model.dtype)
  measured = hardware.measured_costs(prof, model)
  per_byte = (1 / measured["gather_bw"] if measured and "gather_bw" in measured
              else 1 / cpu_bw + 1 / mem_bw)
  if ctx.phase == "decode":
    counts = decode_counts(model, pl, tokens=s.cold_start_tokens, freq=s.frequencies)
    per_layer = [(float(counts.predicted_per_layer[i]), float(counts.read_per_layer[i]),
                  float(counts.requests_per_layer[i])) for i in range(n_layers)]
    predictor = (s.sizes.predictor / n_layers if o.predictor != "oracle"
                 else (mats - 1) * c.hidden_size * n * np.dtype(model.dtype).itemsize)
  staging_cap = max(2, s.sizes.staging // rec)
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
      # The layer's cached records are multiplied whole (its hot block and
      # cold partition), hit or not, unless they are more than gather_ratio
      # per hit (then the hits are gathered, at ~1/gather_ratio the rate);
      # planar blocks at the rate measured for this model where the profile
      # has one (calibration's gather_bw).
      cached = min(s.cache_slots / n_layers, o.gather_ratio * (predicted - misses))
      work = lambda k: k * neuron * per_byte  # noqa: E731
      if o.layout == "split":
        nbytes = misses * mats * round_up(int(c.hidden_size * np.dtype(model.dtype).itemsize * q))
        size = nbytes / max(misses * mats, 1e-12)
      else:
        nbytes = misses * rec
        size = nbytes / max(requests, 1e-12)
      depth = o.io_depth if o.pipeline else 1
      read_s = nbytes / _disk_bw(prof, size, depth) if nbytes else 0.0
      parts = []
      if o.pipeline:
        parts.append(ctx.add("cpu", work(cached), (pred,), "cached part", i))
        pieces = o.pieces if misses >= 1 else 0
        for _ in range(pieces):
          rd = ctx.add("disk", read_s / pieces, (pred,), "read misses", i, int(nbytes / pieces))
          parts.append(ctx.add("cpu", work(misses / pieces), (rd, parts[-1]), "missed part", i))
      else:
        rd = ctx.add("disk", read_s, (pred,), "read misses", i, int(nbytes))
        parts.append(ctx.add("cpu", work(misses + cached), (rd,), "compute", i))
      # Admitted records are copied into the cache pool.
      admit = misses * rec / mem_bw if s.cache_slots else 0.0
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


def shape_placement(model, budget, options, weight_bits: int | None = None) -> Placement:
  """A neuron_cluster plan sized from shapes, for what the strategy does not run:
  MoE models (every expert's neurons are cache records: X * F per layer) and
  quantised weights (`weight_bits`, e.g. 4 for PowerInfer-2's int4: weights, not
  the KV cache or the predictor, sized and read at that width). Sized exactly as
  the strategy sizes its own plans (`plan_sizes`, `make_placement`).

  Args:
    model: shapes only.
    budget: hetflow.Budget.
    options: NeuronClusterOptions.
    weight_bits: stored bits per weight, or None for the model's dtype.

  Raises:
    BudgetExceeded: when the fixed region alone does not fit.
  """
  sizes = plan_sizes(model, options, weight_bits)
  note = (f"planned from shapes (the strategy does not run {model.config.arch}"
          + (f" at {weight_bits}-bit weights" if weight_bits else "") + ")",)
  return make_placement(model, budget, options, sizes, weight_bits, notes=note)


def memory_for_ffn_in_flash(name: str, fraction: float, dtype: str = "float16",
                            weight_bits: int | None = None) -> float:
  """GB of memory that leaves `fraction` of a named model's FFN weights in flash.

  The model's bytes minus that share of its FFN neurons' rows (shapes only),
  as PowerInfer-2 states its "50% of FFN weights in flash" setting; with
  `weight_bits`, every weight counted at that width.
  """
  from hetflow.checkpoints import synthetic_model
  from hetflow.config import DTYPES  # configs call this; the library does not

  model = synthetic_model(name, dtype=DTYPES[dtype])
  c = model.config
  ffn = c.num_layers * len(neuron_matrices(model.config)) * c.hidden_size * neurons_per_layer(c)
  ffn *= np.dtype(model.dtype).itemsize
  total = sum(model.group_nbytes(g) for g in model.group_names())
  scale = weight_bits / (8 * np.dtype(model.dtype).itemsize) if weight_bits else 1.0
  return round(scale * (total - fraction * ffn) / 1e9, 2)
