"""`moe_offload`: routed experts as the unit of placement, an expert cache, look-ahead reads.

For mixture-of-experts models (Mixtral). The fixed region -- embeddings, head,
attention, norms, routers and the KV cache -- lives on the device tier. Every
routed expert of every layer is one record in a disk store (`hetflow.memory.LayerStore`,
group "layers/<i>/experts/<e>": gate, up, down back to back, page-aligned), so one
O_DIRECT read (`ReaderPool`) fetches it. Each layer has a pool of `cache_experts`
device slots, an expert cache with an LRU or LFU policy.

Per layer, when few tokens are routed (decode; the model's own rule,
`modules.gathers_experts`):
  look-ahead (in `run_attention`): layer i's FFN norm and router applied to the
    hidden state entering layer i's attention (layer i-1's output) guess its
    experts; reads of the guessed experts not in the cache start, then the
    attention is dispatched, so the reads run while it computes;
  route (in `run_ffn`): the router on the real FFN input; experts neither cached
    nor in flight are read now; the pass waits for its experts' reads only;
  compute: `modules.routed_experts` on the slots, the arithmetic of the model's
    own MoE FFN, so tokens equal `resident`'s.
A wrong guess costs its bytes (and may evict a useful expert), never correctness:
the routed experts are always the router's. When many tokens are routed
(prefill), every expert of the layer is read into a staging area of X records
(reads start with the layer's attention) and the model's own FFN runs on it.

Buffers: slots and staging are page-aligned host buffers that jax aliases on a
CPU device (no copy; a slot is refilled only after the last computation that
read its pool is done, hetflow/memory/buffers.py); elsewhere a refilled slot is
copied into a device array. Not done: the host tier for experts, and computing
cold experts on the CPU where they lie (Fiddler); see docs of issue 14.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from hetflow import hardware, simulate
from hetflow.memory import tiers
from hetflow.memory.budget import BudgetExceeded, format_bytes
from hetflow.memory.buffers import aligned_empty, round_up, view_as
from hetflow.memory.reader import ReaderPool
from hetflow.memory.store import LayerStore
from hetflow.models import layers, modules
from hetflow.models.model import Model
from hetflow.strategy import GroupPlacement, NotApplicable, Placement, Strategy, register_strategy
from strategies.layerwise import default_store_dir, store_fingerprint

EXPERT_TENSORS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class MoEOffloadOptions:
  """Options of `moe_offload`.

  Attributes:
    cache_experts: device slots per layer (the expert cache), at least the
      experts a token routes to (k) and at most the layer's experts (X); "auto":
      as many as the device budget allows after the fixed region, the staging
      area and the KV reserve.
    cache_policy: which cached expert a miss evicts: "lru" (least recently
      used), "lfu" (least often used, ties by recency), or "none": no expert
      is kept from one forward pass to the next (the no-cache ablation).
    lookahead: guess each layer's experts from the hidden state entering its
      attention and start their reads before the attention computes.
    kv_reserve_tokens: KV positions (batch 1) the plan reserves on the device;
      None: the model's max_position_embeddings.
    store_dir: the expert store; None: a cache directory derived from the model
      ($HETFLOW_CACHE/stores/<name>-<dtype>-<hash>-experts), written on first use.
    convert: write the store when it does not exist yet; False makes a missing
      store an error.
    direct_io: read with O_DIRECT (cold reads come from the disk).
    reader_threads: read requests in flight.
    read_chunk: bytes per read request (a multiple of 4096).
  """

  cache_experts: int | Literal["auto"] = "auto"
  cache_policy: Literal["lru", "lfu", "none"] = "lru"
  lookahead: bool = True
  kv_reserve_tokens: int | None = None
  store_dir: str | None = None
  convert: bool = True
  direct_io: bool = True
  reader_threads: int = 8
  read_chunk: int = 1 << 20

  def __post_init__(self):
    c = self.cache_experts
    if not (c == "auto" or (isinstance(c, int) and not isinstance(c, bool) and c >= 1)):
      raise ValueError(f"cache_experts={c!r}; expected an int >= 1 or 'auto'.")
    if self.cache_policy not in ("lru", "lfu", "none"):
      raise ValueError(f"cache_policy={self.cache_policy!r}; expected 'lru', 'lfu' or 'none'.")
    if self.reader_threads < 1:
      raise ValueError(f"reader_threads={self.reader_threads!r}; expected >= 1.")
    if self.read_chunk <= 0 or self.read_chunk % 4096:
      raise ValueError(f"read_chunk={self.read_chunk!r}; expected a positive multiple of 4096.")


@dataclasses.dataclass(frozen=True)
class MoEOffloadSettings:
  """What moe_offload's cost model reads from a plan (`Placement.settings`).

  Attributes:
    slots: expert cache slots per layer.
    record_bytes: bytes of one expert record as stored (padded).
    hit_rate: predicted fraction of decode expert lookups served by the cache.
    lookahead: whether reads start before the layer's attention.
    lookahead_accuracy: assumed fraction of a layer's experts the look-ahead
      guesses right (see `expected_hit_rate`).
    read_block_bytes: size of one disk request.
    read_queue_depth: disk requests in flight.
    link_copy: whether a read expert is copied to the device (False on a CPU
      device, where the slot is aliased).
  """

  slots: int
  record_bytes: int
  hit_rate: float
  lookahead: bool
  lookahead_accuracy: float
  read_block_bytes: int
  read_queue_depth: int
  link_copy: bool


# Eliseev & Mazur 2023 (arXiv 2312.17238) report ~0.8-0.9 recall for guessing Mixtral's
# next-layer experts from the current hidden state; our synthetic models are measured
# in the notes. Used by the cost model only.
LOOKAHEAD_ACCURACY = 0.8


def routing_law(model: Model) -> tuple[np.ndarray, float]:
  """(target expert frequencies P(in top-k) [X], reuse) the model's routing follows.

  Synthetic routed models state theirs (hetflow.checkpoints.moe.RoutingSpec);
  for any other Mixtral the published figures stand in: near-uniform popularity
  and the reuse an LRU cache of k experts sees in Mixtral-8x7B (~0.5, Eliseev &
  Mazur 2023; see hetflow/checkpoints/moe.py).
  """
  c = model.config
  spec = getattr(model.source, "spec", None)
  if spec is not None and hasattr(spec, "frequencies") and hasattr(spec, "reuse"):
    return spec.frequencies(c), float(spec.reuse)
  n, k = c.num_experts, c.experts_per_token
  return np.full(n, k / n), 0.5


def expected_hit_rate(frequencies: np.ndarray, reuse: float, k: int, slots: int,
                      policy: str) -> float:
  """Predicted fraction of a layer's routed experts found in a cache of `slots`.

  The k slots of the previous token's experts hit `reuse` of the lookups (LRU and
  LFU both keep them: they were just used). The other `slots - k` hold the next
  most popular experts, which serve their share of the rest of the demand: the
  demand on the `slots` hottest experts beyond what chance reuse already covers,
  out of all demand beyond it. "none" keeps nothing.
  """
  if policy == "none":
    return 0.0
  p = np.sort(np.asarray(frequencies, np.float64))[::-1] / k  # share of lookups
  chance = float(np.sum(p * p * k))  # reuse by chance: sum(P(in top-k)^2) / k
  covered = float(p[:slots].sum())
  if covered >= 1.0 - 1e-9:
    return 1.0
  rest = max(0.0, (covered - chance) / max(1e-9, 1.0 - chance)) if slots > k else 0.0
  return float(min(1.0, reuse + (1.0 - reuse) * rest))


def record_nbytes(model: Model) -> int:
  """Bytes of one expert record as stored: gate, up and down, each page-aligned."""
  c = model.config
  one = c.hidden_size * c.intermediate_size * jnp.dtype(model.dtype).itemsize
  return 3 * round_up(one)


def write_expert_store(model: Model, path: str, progress: bool = True) -> LayerStore:
  """Writes every expert of `model` as one record (group "layers/<i>/experts/<e>")."""
  c = model.config

  def groups():
    for i in range(c.num_layers):
      stacks = {n: model.tensor(f"layers/{i}/mlp/{n}") for n in EXPERT_TENSORS}
      for e in range(c.num_experts):
        yield f"layers/{i}/experts/{e}", {n: np.ascontiguousarray(stacks[n][e])
                                          for n in EXPERT_TENSORS}

  metadata = {"fingerprint": store_fingerprint(model), "model": c.name, "layout": "experts",
              "dtype": jnp.dtype(model.dtype).name, "description": model.description}
  return LayerStore.write(path, groups(), progress=progress, metadata=metadata,
                          description=f"writing {c.name}'s experts",
                          overwrite=os.path.isdir(path))


def open_expert_store(model: Model, path: str | None, convert: bool) -> LayerStore:
  """The expert store of `model` at `path` (default beside layerwise's), written if missing."""
  path = path or default_store_dir(model) + "-experts"
  if not os.path.exists(os.path.join(path, "manifest.json")):
    if not convert:
      raise FileNotFoundError(f"no expert store at {path}; pass convert=True to write it.")
    return write_expert_store(model, path)
  store = LayerStore.open(path)
  if (store.metadata.get("fingerprint") != store_fingerprint(model)
      or store.metadata.get("layout") != "experts"):
    raise ValueError(f"the store at {path} was not written from this model's experts"
                     f" ({model.description!r}); pass another store_dir or delete it.")
  return store


@dataclasses.dataclass
class _Layer:
  """One layer's expert cache: which expert each slot holds, and its bookkeeping."""

  host: np.ndarray  # [S, record bytes] page-aligned
  pool: Any  # jax array [S, record elements] (aliases `host` on a CPU device)
  expert: list  # slot -> expert id or None
  last_use: list  # slot -> pass index of its last use
  uses: np.ndarray  # expert -> uses so far (LFU)
  inflight: dict  # slot -> future of its read
  guessed: set  # experts the look-ahead read in this pass (not cached before)
  guess: set = dataclasses.field(default_factory=set)  # the look-ahead's whole guess
  fence: Any = None  # the last output computed from this pool


@register_strategy("moe_offload")
class MoEOffload(Strategy):
  """Fixed region on the device; routed experts on disk, cached per layer, read ahead."""

  Options = MoEOffloadOptions

  @classmethod
  def candidates(cls, model, budget):
    return [MoEOffloadOptions(), MoEOffloadOptions(cache_policy="lfu")]

  def __init__(self, options: Any = None):
    super().__init__(options)
    self._reader: ReaderPool | None = None
    self._closed = False

  # -- planning (pure) -----------------------------------------------------------

  def _sizes(self, model: Model, profile=None) -> dict[str, int]:
    c = model.config
    fixed = sum(model.group_nbytes(g) for g in ("embed", "head"))
    fixed += sum(model.group_nbytes(f"layers/{i}/attn") for i in range(c.num_layers))
    mlp_fixed = sum(s.size * s.dtype.itemsize for n, s in model.shapes.items()
                    if n.startswith("layers/") and "/mlp/" in n
                    and n.rsplit("/", 1)[1] not in EXPERT_TENSORS)
    return dict(fixed=fixed + mlp_fixed, mlp_fixed=mlp_fixed, record=record_nbytes(model),
                kv=model.kv_cache_nbytes(self.options.kv_reserve_tokens),
                aliases=int(hardware.device_is_cpu(profile)))

  def _needs(self, model: Model, sizes: dict[str, int], slots: int) -> dict[str, int]:
    c = model.config
    working = sizes["record"] * (c.num_experts + c.num_layers * slots)  # staging + caches
    need = {"device": sizes["fixed"] + sizes["kv"] + working, "host": 0,
            "disk": c.num_layers * c.num_experts * sizes["record"]}
    if not sizes["aliases"]:
      need["host"] += working  # the page-aligned buffers reads land in
    return need

  def plan(self, model, budget, profile=None) -> Placement:
    c, o = model.config, self.options
    if not c.num_experts:
      raise NotApplicable(f"moe_offload places routed experts; {c.name} has none (a dense"
                          " model: use layerwise, tensor_split or neuron_cluster).")
    k, n = c.experts_per_token, c.num_experts
    sizes = self._sizes(model, profile)
    minimum = self._needs(model, sizes, k)
    if o.cache_experts == "auto":
      slots = k if o.cache_policy == "none" else n
      while slots > k and budget.device is not None and (
          self._needs(model, sizes, slots)["device"] > budget.device):
        slots -= 1
    else:
      if not k <= o.cache_experts <= n:
        raise ValueError(f"cache_experts={o.cache_experts}; {c.name} routes {k} of {n} experts"
                         f" per token, so it must lie in [{k}, {n}].")
      slots = o.cache_experts
    need = self._needs(model, sizes, slots)
    for tier in ("device", "host", "disk"):
      limit = budget.limit(tier)
      if limit is not None and need[tier] > limit:
        raise BudgetExceeded(tier, need[tier], 0, limit,
                             group=f"moe_offload plan ({slots} expert slots per layer)",
                             minimum=minimum[tier])
    freq, reuse = routing_law(model)
    hit = expected_hit_rate(freq, reuse, k, slots, o.cache_policy)
    groups = {}
    for g in model.group_names():
      if g.endswith("/mlp"):
        groups[g] = GroupPlacement(
            "disk", n * sizes["record"] + sizes["mlp_fixed"] // c.num_layers,
            f"{n} expert records on disk, {slots} cached (norm and router on the device)")
      else:
        groups[g] = GroupPlacement("device", model.group_nbytes(g), "fixed region")
    placed_device = sum(g.nbytes for g in groups.values() if g.tier == "device")
    working = {"device": need["device"] - placed_device, "host": need["host"]}
    notes = (
        f"expert record: {format_bytes(sizes['record'])}; cache: {slots} of {n} experts per"
        f" layer ({o.cache_policy}); staging: {n} records",
        f"routing law: reuse {reuse:.2f}, predicted cache hit rate {hit:.2f}",
        f"predicted expert bytes per token: "
        f"{format_bytes(int(c.num_layers * k * (1 - hit) * sizes['record']))}",
        f"minimum budget: device {format_bytes(minimum['device'])}",
    )
    settings = MoEOffloadSettings(
        slots=slots, record_bytes=sizes["record"], hit_rate=hit, lookahead=o.lookahead,
        lookahead_accuracy=LOOKAHEAD_ACCURACY, read_block_bytes=o.read_chunk,
        read_queue_depth=o.reader_threads, link_copy=not sizes["aliases"])
    return Placement(self.name, groups, working_bytes=working, notes=notes, settings=settings)

  # -- cost model ------------------------------------------------------------------

  @staticmethod
  def cost_model(ctx: simulate.PassContext) -> None:
    """Per layer: attention on the device; the layer's expert reads (misses only in
    decode, all X records in prefill) on the disk, started with the attention when
    the look-ahead guesses them (a `lookahead_accuracy` share of the misses) and
    after the router otherwise; the FFN computes the routed experts once they land."""
    c = ctx.model.config
    s: MoEOffloadSettings = ctx.placement.settings
    prof = ctx.profile
    k, n = c.experts_per_token, c.num_experts
    dtype = ctx.dtype
    gathers = ctx.rows * k < n
    experts = k if gathers else n
    expert_params = 3 * c.hidden_size * c.intermediate_size
    rate = prof.disk_bw(s.read_block_bytes, s.read_queue_depth)
    prev = None
    for p in range(ctx.passes):
      ctx.pass_index = p
      prev = ctx.add("device", ctx.settings.pass_overhead_s, (prev,), "pass start",
                     overhead=False)
      for i in range(c.num_layers):
        misses = experts * (1.0 - s.hit_rate) if gathers else float(n)
        early = misses * (s.lookahead_accuracy if (s.lookahead or not gathers) else 0.0)
        nbytes_early, nbytes_late = early * s.record_bytes, (misses - early) * s.record_bytes
        read_early = ctx.add("disk", nbytes_early / rate, (prev,), f"guessed experts {i}", i,
                             int(nbytes_early)) if nbytes_early else None
        if read_early is not None and s.link_copy:
          read_early = ctx.add("link", ctx.copy_time(nbytes_early), (read_early,),
                               f"h2d guessed {i}", i, int(nbytes_early))
        prev = ctx.add("device", ctx.half_time(f"layers/{i}/attn"), (prev,),
                       f"layers/{i}/attn", i)
        read_late = ctx.add("disk", nbytes_late / rate, (prev,), f"missed experts {i}", i,
                            int(nbytes_late)) if nbytes_late else None
        if read_late is not None and s.link_copy:
          read_late = ctx.add("link", ctx.copy_time(nbytes_late), (read_late,),
                              f"h2d missed {i}", i, int(nbytes_late))
        ffn = ctx.compute_time("device", experts * expert_params * dtype.itemsize,
                               experts * expert_params, half="mlp")
        prev = ctx.add("device", ffn, (prev, read_early, read_late), f"layers/{i}/mlp", i)
      prev = ctx.add("device", ctx.head_time(), (prev,), "head")

  # -- materialising -----------------------------------------------------------------

  def materialize(self, placement, model, ledger) -> None:
    c, o = model.config, self.options
    self.model, self.config = model, c
    s: MoEOffloadSettings = placement.settings
    self.slots, self.record = s.slots, s.record_bytes
    self.aliases = not s.link_copy
    self.store = open_expert_store(model, o.store_dir, o.convert)
    info = self.store.tensors("layers/0/experts/0")
    itemsize = jnp.dtype(model.dtype).itemsize
    self._offsets = {t: info[t].offset // itemsize for t in EXPERT_TENSORS}
    self._elems = self.record // itemsize
    device = tiers.device_sharding()
    self._device = device
    self._fixed = {}
    for g in model.group_names():
      tensors = model.group_tensors(g) if not g.endswith("/mlp") else {
          name: model.tensor(f"{g}/{name}") for name in ("norm", "router")}
      ledger.allocate("device", sum(a.nbytes for a in tensors.values()), g)
      self._fixed[g] = jax.device_put(tensors, device)
    records = self.record * (c.num_experts + c.num_layers * self.slots)
    ledger.allocate("device", records, "moe_offload/experts")
    if not self.aliases:
      ledger.allocate("host", records, "moe_offload/staging")
    self._layers = [self._new_layer(self.slots) for _ in range(c.num_layers)]
    self._staging = self._new_layer(c.num_experts)  # prefill: every expert of one layer
    self._reader = ReaderPool(o.reader_threads, direct=o.direct_io)
    self._pass = 0
    self._phase = "prefill"
    self._gather = True
    self._compiled = _functions(c)
    self._set_slot = jax.jit(lambda pool, i, rec: pool.at[i].set(rec), donate_argnums=(0,))

  def _new_layer(self, slots: int) -> _Layer:
    host = aligned_empty(slots * self.record)
    host.fill(0)  # fault the pages in: O_DIRECT into untouched pages is slow (layerwise.py)
    view = view_as(host, 0, (slots, self._elems), self.model.dtype)
    return _Layer(host=host, pool=jax.device_put(view, self._device), expert=[None] * slots,
                  last_use=[-1] * slots, uses=np.zeros(self.config.num_experts, np.int64),
                  inflight={}, guessed=set())

  # -- the cache -----------------------------------------------------------------------

  def _count(self, key: str, value: float) -> None:
    self.counters.phase(self._phase).add(key, value)

  def _victim(self, lay: _Layer, keep: set) -> int:
    """The slot a new expert goes to: a free one, else the policy's choice outside `keep`."""
    free = [s for s, e in enumerate(lay.expert) if e is None]
    if free:
      return free[0]
    options = [s for s, e in enumerate(lay.expert) if e not in keep]
    if self.options.cache_policy == "lfu":
      return min(options, key=lambda s: (lay.uses[lay.expert[s]], lay.last_use[s]))
    return min(options, key=lambda s: lay.last_use[s])

  def _read(self, layer: int, lay: _Layer, slot: int, expert: int) -> None:
    """Starts reading `expert` of `layer` into `slot` (after its pool is quiet)."""
    if lay.fence is not None:
      jax.block_until_ready(lay.fence)  # no computation may still read the pool
      lay.fence = None
    if slot in lay.inflight:
      lay.inflight.pop(slot).result()  # a guessed read being replaced
    lay.expert[slot] = expert
    lay.last_use[slot] = self._pass
    group = f"layers/{layer}/experts/{expert}"
    dest = lay.host[slot * self.record:(slot + 1) * self.record]
    lay.inflight[slot] = self._reader.read_into(self.store.file(group), 0, dest,
                                                self.store.group_nbytes(group),
                                                chunk=self.options.read_chunk)
    self._count("disk_bytes", self.store.group_nbytes(group))
    self._count("disk_requests", -(-self.store.group_nbytes(group) // self.options.read_chunk))
    self._count("expert_reads", 1)

  def _wait(self, lay: _Layer, slots) -> None:
    """Waits for the reads of `slots`; copies them to the device where it has its own memory."""
    t0 = time.perf_counter()
    for slot in slots:
      future = lay.inflight.pop(slot, None)
      if future is None:
        continue
      future.result()
      if not self.aliases:
        rec = view_as(lay.host, slot * self.record, (self._elems,), self.model.dtype)
        lay.pool = self._set_slot(lay.pool, slot, jax.device_put(rec, self._device))
        self._count("h2d_bytes", self.record)
    self._count("wait_s", time.perf_counter() - t0)

  def _prefetch(self, layer: int, experts) -> None:
    """Starts reads of `experts` of `layer` that are neither cached nor in flight."""
    lay = self._layers[layer]
    keep = set(int(e) for e in experts)
    lay.guess, lay.guessed = keep, set()
    if len(keep) > len(lay.expert):
      return  # more guesses than slots (a large batch): no look-ahead for this layer
    for e in sorted(keep):
      if e not in lay.expert:
        self._read(layer, lay, self._victim(lay, keep), e)
        lay.guessed.add(e)

  # -- the hooks the engine calls ---------------------------------------------------------

  def globals(self):
    return {"embed": self._fixed["embed"], "head": self._fixed["head"]}

  def fetch(self, layer, half):
    return self._fixed[f"layers/{layer}/{half}"]

  def begin(self, phase, num_tokens) -> None:
    self._phase = phase
    self._pass += 1
    self._rows = None
    if self.options.cache_policy == "none":
      for lay in self._layers:
        for slot in list(lay.inflight):
          lay.inflight.pop(slot).result()
        lay.expert = [None] * len(lay.expert)

  def run_attention(self, layer, params, x, cache, cache_index, positions, kv_mask, attention):
    c = self.config
    gather = modules.gathers_experts(c, (x.shape[0], x.shape[1], c.experts_per_token))
    mlp = self._fixed[f"layers/{layer}/mlp"]
    if not gather:
      # Many tokens: every expert of the layer, read while the attention computes.
      lay = self._staging
      for e in range(c.num_experts):
        self._read(layer, lay, e, e)
    elif self.options.lookahead:
      guess = np.asarray(self._compiled.route(mlp, x))
      self._prefetch(layer, guess.reshape(-1))
    return attention(params, x, cache, cache_index, positions, kv_mask)

  def run_ffn(self, layer, params, x, ffn):
    c = self.config
    gather = modules.gathers_experts(c, (x.shape[0], x.shape[1], c.experts_per_token))
    if not gather:
      lay = self._staging
      self._wait(lay, range(c.num_experts))
      lay.expert = [None] * c.num_experts  # staging is refilled per layer
      out = self._compiled.dense(params, x, lay.pool, self._offsets_tuple())
      lay.fence = out
      self._count("streamed_layers", 1)
      return out
    lay = self._layers[layer]
    idx = np.asarray(self._compiled.route(params, x))  # [B, T, k]
    needed = [int(e) for e in np.unique(idx)]
    keep = set(needed)
    self._count("expert_lookups", idx.size)
    if self.options.lookahead and lay.guess:
      self._count("lookahead_guesses", len(lay.guess))
      self._count("lookahead_right", len(keep & lay.guess))
      self._count("lookahead_useful_reads", len(keep & lay.guessed))
      self._count("lookahead_wasted_bytes", len(lay.guessed - keep) * self.record)
    lay.guess = set()
    if len(needed) > len(lay.expert):
      # More distinct experts than slots (a large batch): through the staging area.
      stage = self._staging
      for e in needed:
        self._read(layer, stage, e, e)
      self._wait(stage, needed)
      stage.expert = [None] * c.num_experts
      out = self._compiled.routed(params, x, stage.pool, jnp.arange(c.num_experts,
                                                                    dtype=jnp.int32),
                                  self._offsets_tuple())
      stage.fence = out
      self._count("ideal_bytes", len(needed) * self.record)
      self._count("overflow_layers", 1)
      return out
    # Hits: experts in the cache before this pass's look-ahead touched the layer.
    cached_before = [e for e in needed if e in lay.expert and e not in lay.guessed]
    self._count("expert_hits", int(sum(np.sum(idx == e) for e in cached_before)))
    self._count("ideal_bytes", (len(needed) - len(cached_before)) * self.record)
    for e in needed:
      if e not in lay.expert:
        self._read(layer, lay, self._victim(lay, keep), e)
    slot_of = np.zeros(c.num_experts, np.int32)
    slots = []
    for e in needed:
      s = lay.expert.index(e)
      slot_of[e] = s
      slots.append(s)
      lay.last_use[s] = self._pass
      lay.uses[e] += 1
    self._wait(lay, slots)
    lay.guessed = set()
    out = self._compiled.routed(params, x, lay.pool, jnp.asarray(slot_of),
                                self._offsets_tuple())
    lay.fence = out
    return out

  def _offsets_tuple(self):
    return tuple(self._offsets[t] for t in EXPERT_TENSORS)

  def stats(self):
    out = self.counters.copy()
    if self._reader is not None:
      out.reads = self._reader.record()
    c = self.config
    for phase in ("prefill", "decode"):
      p = out.phase(phase)
      lookups = p.get("expert_lookups")
      if lookups:
        out.details[f"{phase}_hit_rate"] = p.get("expert_hits") / lookups
      if p.get("lookahead_guesses"):
        out.details[f"{phase}_lookahead_accuracy"] = (p.get("lookahead_right")
                                                      / p.get("lookahead_guesses"))
    d = out.decode
    if d.tokens:
      out.details["decode_expert_reads_per_token"] = d.get("expert_reads") / d.tokens
      out.details["decode_disk_bytes_per_token"] = d.disk_bytes / d.tokens
      out.details["decode_ideal_bytes_per_token"] = d.get("ideal_bytes") / d.tokens
    out.details.update(cache_slots_per_layer=self.slots, cache_policy=self.options.cache_policy,
                       lookahead=self.options.lookahead, record_bytes=self.record,
                       experts=c.num_experts, layers=c.num_layers)
    return out

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    for lay in getattr(self, "_layers", []) + ([self._staging] if hasattr(self, "_staging")
                                               else []):
      for future in lay.inflight.values():
        try:
          future.result()
        except Exception:  # noqa: BLE001 - closing: the error was or will be reported
          pass
      lay.inflight.clear()
    if self._reader is not None:
      self._reader.close()


@functools.lru_cache(maxsize=16)
def _functions(config):
  """The jitted pieces: routing (also the look-ahead's guess) and the two ways of
  computing the FFN."""

  def split(pool, offsets, count):
    d, f = config.hidden_size, config.intermediate_size
    og, ou, od = offsets
    return (pool[:, og:og + d * f].reshape(count, d, f),
            pool[:, ou:ou + d * f].reshape(count, d, f),
            pool[:, od:od + f * d].reshape(count, f, d))

  def norm(w, x):
    return layers.rms_norm(x, w["norm"], config.norm_eps)  # Mixtral: pre-norm RMSNorm

  @jax.jit
  def route(w, x):
    return modules.route(config, w["router"], norm(w, x))[1]

  @functools.partial(jax.jit, static_argnums=(4,))
  def routed(w, x, pool, slot_of, offsets):
    h = norm(w, x)
    weights, idx = modules.route(config, w["router"], h)
    gate, up, down = split(pool, offsets, pool.shape[0])
    return x + modules.routed_experts(config, h, weights, slot_of[idx], gate, up, down)

  @functools.partial(jax.jit, static_argnums=(3,))
  def dense(w, x, pool, offsets):
    gate, up, down = split(pool, offsets, pool.shape[0])
    return modules.ffn_half(config, dict(w, gate=gate, up=up, down=down), x)

  return _Functions(route=route, routed=routed, dense=dense)


@dataclasses.dataclass(frozen=True)
class _Functions:
  route: Any
  routed: Any
  dense: Any
