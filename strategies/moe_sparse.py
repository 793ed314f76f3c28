"""`moe_sparse`: PowerInfer-2's sparse experts: neuron_cluster inside each routed expert.

For mixture-of-experts models whose experts are ReLU/dReLU FFNs (TurboSparse-Mixtral,
`mixtral-*-sparse`). The fixed region -- embeddings, head, attention, norms, routers and
the KV cache -- lives on the device tier, as in `moe_offload`. The experts' neurons
live on disk as neuron_cluster's records, one per expert neuron: expert e of layer i
is virtual layer i * X + e of `hetflow.sparsity.experts.ExpertNeurons` (a dense view
of the experts), so the neuron-bundle store (one file per expert, neurons hottest
first), the predictor (per expert), the segmented cache (hot clusters of the hottest
expert neurons of the whole model, cold partitions per expert) and the planar step are
neuron_cluster's own: this strategy holds a `NeuronCluster` over that view and hands
it one expert at a time.

Per layer (`run_ffn`): the router on the FFN input picks each token's experts; for
each expert routed to by some token, the inner neuron_cluster computes that expert's
FFN -- in decode (one token) sparsely: its predictor's active neurons, cached or read
from the expert's records, the rest of the expert never read; in a prompt's pass
densely, streaming the expert's records as neuron_cluster streams a layer -- and the
outputs are combined with the router's weights, as the model's own MoE FFN does. Only
routed experts are touched: an expert no token chose costs nothing. With the oracle
predictor the tokens equal `resident`'s (a neuron that does not fire adds an exact
zero; a neuron not cached is read, never skipped); a trained predictor is an
approximation that the stats report (neuron_cluster's rule).

Experts of one layer share its input, so the inner strategy's rule that a staging
area is free once the layer's input is ready does not hold between them: each expert's
output is waited for before the next expert reads into the staging areas.

Weight formats (bfloat16, int8 per channel or grouped, int4, int4-asym): an expert
neuron's record holds its rows of resident's stored kernels in neuron_cluster's codec
(`hetflow.sparsity.bundles.RecordCodec`; each expert is quantized on its own rows, so
expert e's slice of the stored stack is exactly its kernel), each virtual layer's down
scales a table beside its records, and the sparse step is neuron_cluster's quantized one
(native kernels, XLA fallback). The format is in the store's fingerprint and default
directory: a store of another format is refused, never reused.

On a mesh (docs/distributed.md) each shard owns the F/N neurons r·F/N..(r+1)·F/N of
every expert (Megatron-style, as moe_offload): a lane per local shard
(strategies/mesh_lanes.py) runs this strategy on its shard's Model, with its own
store, cache, staging and predictor slice; the expert activation statistics are the
full model's, sliced to the shard's neurons. Every lane routes the same experts (the
router is whole), computes its neurons' part of their weighted mixture, and one
all-reduce per FFN sums the parts before the residual.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hetflow import costmodel, simulate
from hetflow.memory import tiers
from hetflow.memory.budget import Budget, BudgetExceeded, format_bytes
from hetflow.memory.cache import cache_root, cached_arrays
from hetflow.memory.store import fingerprint_digest, model_fingerprint
from hetflow.models import formats, layers, modules
from hetflow.sparsity import experts as experts_mod
from hetflow.sparsity.bundles import record_codec
from hetflow.sparsity.predictor import LowRankPredictor
from hetflow.sparsity.stats import ActivationStats, calibration_ids
from hetflow.strategy import GroupPlacement, NotApplicable, Placement, Strategy, register_strategy
from strategies import mesh_lanes
from strategies.moe_offload import routing_law
from strategies.neuron_cluster import cost as nc_cost
from strategies.neuron_cluster import mesh as nc_mesh
from strategies.neuron_cluster.strategy import NeuronCluster, NeuronClusterOptions, multiplied_bytes

CALIBRATION_LENGTH = 256  # the synthetic sparse MoE models' calibrated sequence length


@dataclasses.dataclass(frozen=True)
class MoESparseOptions:
  """Options of `moe_sparse`.

  Attributes:
    neurons: the options of the neuron machinery inside the experts
      (NeuronClusterOptions, or a dict of its fields): predictor, cache, reads. Its
      `predictor_path` holds one predictor per expert (virtual layer i * X + e,
      `python -m experiments.train_predictor --config=configs/sparse/mixtral1b.py`);
      its `stats_path`, if set, expert activation statistics in that order. Set by this
      strategy: the KV reserve (below), `lookahead` (off: the next virtual layer is
      another expert of the same layer) and `prefill_admission` (off: a prefill
      multiplies each expert over every token, routed to it or not, so the prompt's
      history would count tokens the expert never served); `embed_tier` must stay
      "device" (the embedding is this strategy's fixed region).
    kv_reserve_tokens: KV positions (batch 1) the plan reserves on the device;
      None: the model's max_position_embeddings.
    calibration_tokens: tokens the expert activation statistics (which order each
      expert's records hottest first and pick the hot clusters) are recorded on when
      `neurons.stats_path` is None; cached under $HETFLOW_CACHE/expert_stats.
    shape_weight_bits: plan and predict a float model's weights as if stored at this
      many bits (the fixed region and the neuron records sized and read at that width,
      neuron_cluster's `shape_placement`), for shapes too large to make; such a plan is a
      prediction only, `materialize` refuses it. A model in a weight format
      (weights="int4") runs for real, with this left None. None: the model's weights.
  """

  neurons: Any = dataclasses.field(default_factory=NeuronClusterOptions)
  kv_reserve_tokens: int | None = None
  calibration_tokens: int = 2048
  shape_weight_bits: int | None = None

  def __post_init__(self):
    n = self.neurons
    if isinstance(n, dict):
      n = NeuronClusterOptions(**n)
    elif not isinstance(n, NeuronClusterOptions):
      raise ValueError(f"neurons={n!r}; expected NeuronClusterOptions or a dict of its fields.")
    if n.lookahead:
      raise ValueError("neurons.lookahead is not supported inside experts (the next virtual"
                       " layer is another expert of the same layer); leave it False.")
    if n.embed_tier != "device":
      raise ValueError(f"neurons.embed_tier={n.embed_tier!r}: the token table is moe_sparse's"
                       " fixed region (on the device), not the experts'; leave it 'device'.")
    object.__setattr__(self, "neurons", dataclasses.replace(n, kv_reserve_tokens=0,
                                                            prefill_admission=False))
    t = self.kv_reserve_tokens
    if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 0):
      raise ValueError(f"kv_reserve_tokens={t!r}; expected an int >= 0 or None.")
    c = self.calibration_tokens
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
      raise ValueError(f"calibration_tokens={c!r}; expected an int >= 1.")
    b = self.shape_weight_bits
    if b is not None and b not in (2, 3, 4, 8, 16):
      raise ValueError(f"shape_weight_bits={b!r}; expected None or one of 2, 3, 4, 8, 16.")


@dataclasses.dataclass(frozen=True)
class MoESparseSettings:
  """What moe_sparse's cost model reads from a plan (`Placement.settings`).

  Attributes:
    inner: the inner neuron_cluster's Placement over the experts' view (its
      NeuronClusterSettings: cache slots, record and staging sizes, predictor).
    fixed_bytes: bytes of the fixed region (without the KV reserve).
    kv_bytes: the KV reserve.
    expert_frequencies: [X] P(expert in a token's top-k), the routing law.
    sparsity: fraction of a routed expert's neurons that are zero per token.
    hotness: neuron hotness law inside an expert.
  """

  inner: Placement
  fixed_bytes: int
  kv_bytes: int
  expert_frequencies: tuple[float, ...]
  sparsity: float
  hotness: str


def expert_law(model) -> tuple[float, str, float]:
  """(sparsity, hotness, max_frequency) of a model's experts: a synthetic sparse MoE's
  stated law, else the published law by name (hetflow.sparsity.cache_model)."""
  source = model.source
  spec = getattr(source, "sparsity", None)
  if spec is None:  # a shard on a mesh: its source slices the full model's
    spec = getattr(getattr(source, "source", None), "sparsity", None)
  if spec is not None and hasattr(spec, "hotness"):
    return spec.sparsity, spec.hotness, spec.max_frequency
  from hetflow.sparsity.cache_model import activation_law
  law = activation_law(model)
  return law.sparsity, law.hotness, law.max_frequency


def expert_stats_path(model, tokens: int) -> str:
  """cache_root()/expert_stats/<name>-<fingerprint digest[:12]>-<tokens>.npz."""
  digest = fingerprint_digest({"model": model_fingerprint(model), "tokens": tokens,
                               "length": CALIBRATION_LENGTH})
  return os.path.join(cache_root(), "expert_stats",
                      f"{model.config.name}-{digest[:12]}-{tokens}.npz")


def expert_stats(model, options: MoESparseOptions) -> str:
  """The path of `model`'s expert activation statistics: `options.neurons.stats_path`, else
  recorded once on `calibration_tokens` tokens and cached (`expert_stats_path`).

  They only rank each expert's neurons (record order, hot clusters), so a quantized model's
  are its float32 weights' (one file for every format; exactness does not depend on them).
  """
  if options.neurons.stats_path is not None:
    return options.neurons.stats_path
  if not model.format.plain:
    model = dataclasses.replace(model, weights="float32")
  path = expert_stats_path(model, options.calibration_tokens)
  if not os.path.exists(path):
    ids = calibration_ids(model.config, options.calibration_tokens, length=CALIBRATION_LENGTH)
    cached_arrays(path, lambda: experts_mod.record_expert_activations(model, ids).stats.arrays())
  return path


@register_strategy("moe_sparse")
class MoESparse(Strategy):
  """Fixed region on the device; routed experts' active neurons from neuron records."""

  Options = MoESparseOptions
  # On a mesh: one MoESparse per local shard, each owning the F/N neurons of every expert
  # (strategies/mesh_lanes.py; see the module docstring).
  shards_over_mesh = True
  _lanes: Any = None  # the mesh's Lanes, on the strategy the engine holds
  _mesh_lane: Any = None  # a lane's LaneSetup: its device, stats and predictor slices

  @classmethod
  def candidates(cls, model, budget):
    """For the planner: the exact oracle, and trained per-expert predictors (at
    $HETFLOW_CACHE/predictors/<model name>-experts; sized at rank D/16 until trained)."""
    path = os.path.join(cache_root(), "predictors", f"{model.config.name}-experts")
    return [MoESparseOptions(),
            MoESparseOptions(neurons=dict(predictor="trained", predictor_path=path))]

  def __init__(self, options: Any = None):
    super().__init__(options)
    self._inner = NeuronCluster(self.options.neurons)

  # -- planning (pure) -----------------------------------------------------------

  def _fixed_bytes(self, model) -> int:
    """Embeddings, head, attention, and the FFN halves' norms and routers."""
    total = sum(model.group_nbytes(g) for g in model.group_names() if not g.endswith("/mlp"))
    shapes = model.shapes
    total += sum(s.size * np.dtype(s.dtype).itemsize for n, s in shapes.items()
                 if "/mlp/" in n and n.split("/")[3] not in experts_mod.EXPERT_MATRICES)
    return total

  def plan(self, model, budget, profile=None) -> Placement:
    c, o = model.config, self.options
    try:
      experts_mod.check_sparse_experts(c)
      sparsity, hotness, _ = expert_law(model)
      record_codec(model)  # a format the records cannot hold is refused here, by name
    except ValueError as e:
      raise NotApplicable(str(e)) from None
    if o.shape_weight_bits and not model.format.plain:
      raise NotApplicable(f"shape_weight_bits={o.shape_weight_bits} sizes float weights at"
                          f" another width; this model is stored as weights={model.weights!r}"
                          " already: leave shape_weight_bits None.")
    fixed = self._fixed_bytes(model)
    halves = sum(model.group_nbytes(g) for g in model.group_names() if not g.endswith("/mlp"))
    mlp_fixed = (fixed - halves) // c.num_layers  # a layer's FFN norm and router
    bits = o.shape_weight_bits
    if bits:
      fixed = int(fixed * bits / (8 * np.dtype(model.dtype).itemsize))
    kv = model.kv_cache_nbytes(o.kv_reserve_tokens)
    device = None if budget.device is None else max(budget.device - fixed - kv, 0)
    view = experts_mod.ExpertNeurons(model)
    inner_budget = Budget(device=device, host=budget.host, disk=budget.disk)
    try:
      inner = (nc_cost.shape_placement(view, inner_budget, o.neurons, bits) if bits else
               self._inner.plan(view, inner_budget, profile))
    except BudgetExceeded as e:  # restated for the whole plan
      if e.tier == "device":
        e.requested += fixed + kv
        e.budget = budget.device
        e.group = f"moe_sparse fixed region + KV reserve + {e.group}"
        if e.minimum is not None:
          e.minimum += fixed + kv
      raise
    if budget.device is not None and budget.device < fixed + kv:
      need = fixed + kv + inner.working_bytes.get("device", 0)
      raise BudgetExceeded("device", fixed + kv, 0, budget.device,
                           group="moe_sparse fixed region + KV reserve", minimum=need)
    s = inner.settings
    groups = {}
    per_layer = c.num_experts * s.sizes.neurons * s.sizes.record
    for g in model.group_names():
      if g.endswith("/mlp"):
        groups[g] = GroupPlacement("disk", per_layer, f"{c.num_experts} experts' neuron records"
                                   " on disk (norm and router on the device)")
      else:
        groups[g] = GroupPlacement("device", model.group_nbytes(g), "fixed region")
    working = dict(inner.working_bytes)
    working["device"] = working.get("device", 0) + kv + c.num_layers * mlp_fixed
    freq = routing_law(model).frequencies
    settings = MoESparseSettings(inner=inner, fixed_bytes=fixed, kv_bytes=kv,
                                 expert_frequencies=tuple(float(f) for f in freq),
                                 sparsity=sparsity, hotness=hotness)
    notes = (f"fixed region {format_bytes(fixed)}, KV reserve {format_bytes(kv)}",
             *inner.notes)
    return Placement(self.name, groups, working_bytes=working, notes=notes, settings=settings)

  @staticmethod
  def cost_model(ctx: simulate.PassContext) -> None:
    """See `events`."""
    events(ctx)

  # -- materialising -----------------------------------------------------------------

  def materialize(self, placement, model, ledger) -> None:
    c, o = model.config, self.options
    if o.shape_weight_bits:
      raise NotApplicable(f"shape_weight_bits={o.shape_weight_bits} plans are predictions from"
                          " shapes. To run quantized weights, load the model with weights='int4'"
                          " (or another format) and leave it None.")
    if self.mesh is not None and self.mesh.size > 1:
      self._lanes = _lanes(self, placement, ledger)
      return
    lane = self._mesh_lane
    self.model, self.config = model, c
    device = tiers.device_sharding(None if lane is None else lane.device)
    self._fixed = {}
    for g in model.group_names():
      tensors = model.group_tensors(g) if not g.endswith("/mlp") else {
          name: model.tensor(f"{g}/{name}") for name in ("norm", "router")}
      ledger.allocate("device", formats.nbytes(tensors), g)
      self._fixed[g] = jax.device_put(tensors, device)
    if lane is None:
      inner = dataclasses.replace(o.neurons, stats_path=expert_stats(model, o))
    else:  # the statistics and a trained predictor come sliced in the lane's setup
      inner = dataclasses.replace(o.neurons, stats_path=None)
    self._inner = NeuronCluster(inner)
    self._inner._mesh_lane = lane
    self.view = experts_mod.ExpertNeurons(model)
    self._inner.materialize(placement.settings.inner, self.view, ledger)
    self.view.release()
    self._route = _route_function(c)
    self._phase = "prefill"
    self._experts_run = {"prefill": 0, "decode": 0}

  @property
  def store(self):
    """The neuron-bundle store of the experts (this shard's, on a mesh)."""
    return self._inner.store

  # -- the hooks the engine calls ---------------------------------------------------------

  def globals(self):
    if self._lanes is not None:
      return self._lanes.globals()
    return {"embed": self._fixed["embed"], "head": self._fixed["head"]}

  def fetch(self, layer, half):
    if self._lanes is not None:
      return self._lanes.fetch(layer, half)
    return self._fixed[f"layers/{layer}/{half}"]

  def begin(self, phase, num_tokens) -> None:
    if self._lanes is not None:
      return self._lanes.begin(phase, num_tokens)
    self._phase = phase if num_tokens == 1 else "prefill"
    self._inner.begin(phase, num_tokens)
    self._inner.counters.phase(self._phase).passes += 1
    self._inner.counters.phase(self._phase).tokens += num_tokens

  def end(self) -> None:
    if self._lanes is not None:
      return self._lanes.end()
    self._inner.end()

  def run_ffn(self, layer, params, x, ffn):
    if self._lanes is not None:
      return self._lanes.run_ffn(layer, x)
    return self.ffn_finish(layer, params, x, self.ffn_partial(layer, params, x))

  def ffn_partial(self, layer, params, x):
    """Layer `layer`'s routed experts' mixture, without the residual (on a mesh: this
    shard's neurons' part of it, summed over the shards by the caller)."""
    c = self.config
    combine, idx = self._route(params, x)  # [B, T, X] weights (0: not routed), [B, T, k]
    out = jnp.zeros_like(x)
    for e in np.unique(np.asarray(idx)).tolist():
      v = experts_mod.virtual_layer(c, layer, e)
      part = self._inner.ffn_partial(v, params, x)  # expert e's FFN of norm(x)
      out = _accumulate(out, part, combine[..., e])
      jax.block_until_ready(out)  # the next expert may refill the staging it read
      self._experts_run[self._phase] += 1
    return out

  def ffn_finish(self, layer, params, x, summed):
    """The residual plus the experts' mixture (summed over the mesh)."""
    del layer, params
    return _add(x, summed)

  def stats(self):
    if self._lanes is not None:
      return self._lanes.stats()
    inner = self._inner.stats()
    out = self.counters.copy()
    for phase in ("prefill", "decode"):
      a, b = out.phase(phase), inner.phase(phase)
      a.disk_bytes += b.disk_bytes
      a.disk_requests += b.disk_requests
      a.wait_s += b.wait_s
      a.other.update({k: v for k, v in b.other.items()})
      a.other["experts_run"] = self._experts_run[phase]
    out.reads = inner.reads
    out.details.update(inner.details)
    out.details["fixed_bytes_per_token"] = multiplied_bytes(self._fixed, self.config)
    d = out.decode
    if d.tokens:
      out.details["decode_experts_per_token"] = self._experts_run["decode"] / d.tokens
      out.details["decode_disk_bytes_per_token"] = d.disk_bytes / d.tokens
      out.details["decode_ideal_bytes_per_token"] = inner.details.get("ideal_bytes_per_token")
    out.details.update(experts=self.config.num_experts, layers=self.config.num_layers)
    return out

  def close(self) -> None:
    if self._lanes is not None:
      self._lanes.close()
    self._inner.close()


def _lanes(strategy: MoESparse, placement, ledger) -> mesh_lanes.Lanes:
  """The engine's MoESparse on a mesh: a lane per local shard, each given the full model's
  expert statistics sliced to its shard's neurons of every expert (and a trained
  predictor's output columns of those neurons) as its inner NeuronCluster's lane setup."""
  mesh, o = strategy.mesh, strategy.options
  full = mesh.model
  f = full.config.intermediate_size // mesh.size
  stats = ActivationStats.load(expert_stats(full, o))
  n = o.neurons
  predictor = None if n.predictor == "oracle" else LowRankPredictor.load(n.predictor_path)

  def extra(s):
    lo, hi = s.rank * f, (s.rank + 1) * f
    return {"stats": nc_mesh._slice_stats(stats, lo, hi),
            "predictor": None if predictor is None else nc_mesh._slice_predictor(predictor,
                                                                                 lo, hi)}

  def options(o, s):
    store_dir = o.neurons.store_dir
    if store_dir is not None:
      store_dir = os.path.join(store_dir, f"shard-{s.rank}-of-{mesh.size}")
    return dataclasses.replace(o, neurons=dataclasses.replace(o.neurons, store_dir=store_dir,
                                                              stats_path=None))

  return mesh_lanes.Lanes(strategy, placement, ledger, extra=extra, options=options)


@jax.jit
def _accumulate(out, part, weight):
  """out + weight * part: an expert's output weighted by the router (0: not routed)."""
  return out + weight[..., None].astype(part.dtype) * part


@jax.jit
def _add(x, y):
  return x + y


@functools.lru_cache(maxsize=16)
def _route_function(config):
  @jax.jit
  def route(w, x):
    h = layers.rms_norm(x, w["norm"], config.norm_eps)  # Mixtral: pre-norm RMSNorm
    weights, idx = modules.route(config, w["router"], h)
    return modules._dense_combine(config, weights, idx), idx
  return route



# -- the cost model -------------------------------------------------------------------


def virtual_frequencies(model, settings: MoESparseSettings) -> np.ndarray:
  """[L * X, F] P(expert routed and neuron fires) per token, hottest first per expert: the
  routing law's expert frequency times the expert's neuron law."""
  from hetflow.checkpoints.sparse import parse_hotness, zipf_frequencies

  c = model.config
  _, _, cap = expert_law(model)
  p = zipf_frequencies(c.intermediate_size, 1.0 - settings.sparsity,
                       parse_hotness(settings.hotness), cap)
  routed = np.asarray(settings.expert_frequencies)  # P(in top-k), hottest first
  one = routed[:, None] * p[None, :]  # [X, F]
  return np.tile(one, (c.num_layers, 1))


def events(ctx: simulate.PassContext) -> None:
  """Per layer: attention on the device; in decode, for each of the k routed experts in
  turn (the strategy waits for one expert before the next): its predictor, its cached
  records multiplied while its predicted misses are read (pieces, pipelined), then the
  missed part; in a prompt's pass, every expert streamed densely (chunks of half the
  staging, one sequential read each) and multiplied over all the prompt's rows. Expected
  neurons, misses and requests per expert come from neuron_cluster's cache model
  (`decode_counts`) over the experts' view, with each expert's neuron law weighted by its
  routing frequency (`virtual_frequencies`)."""
  model, prof = ctx.model, ctx.profile
  c = model.config
  s: MoESparseSettings = ctx.placement.settings
  inner = s.inner.settings
  o = inner.options
  view = experts_mod.ExpertNeurons(model)
  n_x, k, f = c.num_experts, c.experts_per_token, c.intermediate_size
  rec = inner.sizes.record
  item = np.dtype(model.dtype).itemsize
  q = nc_cost._weight_scale(view, inner)  # stored bytes per weight over the dtype's
  params = len(experts_mod.EXPERT_MATRICES) * c.hidden_size  # one neuron's weights
  if model.format.plain:
    neuron = params * item * q
  else:  # a record's useful bytes in the model's format
    codec = record_codec(view)
    neuron = codec.a_nbytes + codec.b_nbytes
  cpu_bw = costmodel.matvec_bw(prof, "cpu", model.dtype)
  per_byte = 1 / cpu_bw + 1 / prof.memory_bw
  if ctx.phase == "decode":
    if "counts" not in ctx.state:
      ctx.state["counts"] = nc_cost.decode_counts(view, s.inner,
                                                  freq=virtual_frequencies(model, s))
    counts = ctx.state["counts"]
    slots_per_expert = inner.cache_slots / (c.num_layers * n_x)
    predictor = (inner.sizes.predictor / (c.num_layers * n_x) if o.predictor != "oracle"
                 else 2 * c.hidden_size * f * item)
  prev = None
  for p in range(ctx.passes):
    ctx.pass_index = p
    prev = ctx.add("device", ctx.settings.pass_overhead_s, (prev,), "pass start",
                   overhead=False)
    for i in range(c.num_layers):
      prev = ctx.add("device", nc_cost._kernels_time(ctx, f"layers/{i}/attn", q), (prev,),
                     "attn", i)
      if ctx.phase != "decode":
        half = max(1, inner.sizes.staging // rec // 2)
        for _ in range(n_x):
          for start in range(0, f, half):
            m = min(half, f - start)
            rd = ctx.add("disk", m * rec / nc_cost._disk_bw(prof, m * rec, 1), (prev,),
                         "prefill read", i, m * rec)
            prev = ctx.add("cpu", ctx.compute_time("cpu", m * neuron, m * params),
                           (rd, prev), "prefill expert", i)
        continue
      sl = slice(i * n_x, (i + 1) * n_x)
      predicted = float(counts.predicted_per_layer[sl].sum()) / k  # per routed expert
      misses = float(counts.read_per_layer[sl].sum()) / k
      requests = float(counts.requests_per_layer[sl].sum()) / k
      hits = max(predicted - misses, 0.0)
      cached = min(slots_per_expert, o.gather_ratio * hits)
      nbytes = misses * rec
      read_s = nbytes / nc_cost._disk_bw(prof, nbytes / max(requests, 1e-12), o.io_depth) \
          if nbytes else 0.0
      for _ in range(k):
        pred = ctx.add("cpu", predictor / cpu_bw, (prev,), "predict", i)
        parts = [ctx.add("cpu", cached * neuron * per_byte, (pred,), "cached part", i)]
        pieces = o.pieces if misses >= 1 else 0
        for _ in range(pieces):
          rd = ctx.add("disk", read_s / pieces, (pred,), "read misses", i, int(nbytes / pieces))
          parts.append(ctx.add("cpu", misses / pieces * neuron * per_byte, (rd, parts[-1]),
                               "missed part", i))
        admit = misses * rec / prof.memory_bw if inner.cache_slots else 0.0
        prev = ctx.add("cpu", admit, tuple(parts), "sum + admit", i)
    prev = ctx.add("device", ctx.head_time() * q, (prev,), "head")
