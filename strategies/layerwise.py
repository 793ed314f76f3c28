"""`layerwise`: some blocks resident, the rest streamed block by block.

Offloaded blocks live in host memory or in a disk store of raw, page-aligned
files (`hetflow.memory.LayerStore`). While block i computes, blocks
i+1..i+k (k = `prefetch_depth`) are in flight:

  disk -> page-aligned host buffer (O_DIRECT, `ReaderPool`) -> jax array
  host (host_sharding) -> device (`jax.device_put`)

The buffers form a ring of k+1 slots, allocated once and recorded in the
ledger; streamed step n uses slot n % (k+1). Streaming wraps around at the end
of a pass, so the next token's first blocks are read while the head computes.

Why a fence before each refill: on CPU, `jax.device_put` of an aligned numpy
buffer aliases it (no copy, see `hetflow/memory/buffers.py`), and dispatch is
asynchronous, so a block's computation may still be reading a slot after the
engine has moved on. A slot is refilled only after the output of the last
computation that used it (the block's FFN output, which depends on its
attention output) is ready; an issuer thread waits on that output, then queues
the slot's reads without waiting for them, so the reads of consecutive blocks
queue back to back and the disk does not drain between blocks; a loader thread
waits for each block's reads, in order, and puts it on the device. The token
loop itself never blocks except in `fetch`, on the block it needs next.

Which blocks stay resident: `resident_layers` of them, spread evenly over the
depth, so that the disk keeps reading (the ring refills) while resident blocks
compute instead of idling through one long resident stretch.

On a mesh (docs/distributed.md) every shard this process holds has its own
store (`<store_dir>/shard-<r>-of-<N>`, holding 1/N of each layer's bytes), its
own ring buffers and its own device; a streamed layer is read for each local
shard and assembled into one global array. The plan is one shard's.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import os
import threading
import time
from typing import Any, Literal

import jax
import numpy as np

from hetflow import hardware, simulate
from hetflow.memory import tiers
from hetflow.memory.budget import BudgetExceeded, format_bytes
from hetflow.memory.buffers import aligned_empty, round_up
from hetflow.memory.reader import ReaderPool, ReadError, check_read_options
from hetflow.memory.store import open_store, padded_group_nbytes, store_nbytes
from hetflow.models.model import Model, unflatten
from hetflow.models.sharding import MeshShards
from hetflow.strategy import GroupPlacement, Placement, Strategy, register_strategy

HALVES = ("attn", "mlp")


@dataclasses.dataclass(frozen=True)
class LayerwiseOptions:
  """Options of the `layerwise` strategy.

  Attributes:
    offload_tier: where blocks that are not resident live: "disk" (a
      LayerStore, read with O_DIRECT) or "host" (host memory kind).
    resident_layers: blocks kept on the device tier, or "auto": as many as the
      device budget allows after embed/head, the ring and the KV reserve.
    prefetch_depth: k, blocks in flight while one computes (0: read each block
      only when the previous one is done; no overlap). The ring has k+1 slots.
    kv_cache_tier: "device", or "host": the KV cache lives in host memory and
      each layer's cache is moved to the device for its attention and back.
    kv_reserve_tokens: KV positions (batch 1) the plan reserves on the KV tier
      when sizing the minimum budget and "auto"; None: the model's
      max_position_embeddings. The engine allocates the real cache through the
      ledger, so a longer generation than reserved fails cleanly, not silently.
    store_dir: the disk store (offload_tier="disk"). None: a cache directory
      derived from the model (`default_store_dir`), converted on first use. On
      a mesh of N shards, shard r's store is `<store_dir>/shard-<r>-of-<N>`
      (None: the cache directory of the shard's own fingerprint).
    convert: write the store when it does not exist yet (with a progress bar);
      False makes a missing store an error.
    direct_io: read the store with O_DIRECT, bypassing the page cache (cold
      reads really come from the disk); False uses buffered reads.
    reader_threads: requests in flight per read (the ReaderPool's workers).
    read_chunk: bytes per read request (a multiple of 4096).
  """

  offload_tier: Literal["host", "disk"] = "disk"
  resident_layers: int | Literal["auto"] = 0
  prefetch_depth: int = 1
  kv_cache_tier: Literal["device", "host"] = "device"
  kv_reserve_tokens: int | None = None
  store_dir: str | None = None
  convert: bool = True
  direct_io: bool = True
  reader_threads: int = 8
  read_chunk: int = 1 << 20

  def __post_init__(self):
    if self.offload_tier not in ("host", "disk"):
      raise ValueError(f"offload_tier={self.offload_tier!r}; expected 'host' or 'disk'.")
    if self.kv_cache_tier not in ("device", "host"):
      raise ValueError(f"kv_cache_tier={self.kv_cache_tier!r}; expected 'device' or 'host'.")
    r = self.resident_layers
    if not (r == "auto" or (isinstance(r, int) and not isinstance(r, bool) and r >= 0)):
      raise ValueError(f"resident_layers={r!r}; expected an int >= 0 or 'auto'.")
    if not isinstance(self.prefetch_depth, int) or self.prefetch_depth < 0:
      raise ValueError(f"prefetch_depth={self.prefetch_depth!r}; expected an int >= 0.")
    if self.kv_reserve_tokens is not None and self.kv_reserve_tokens < 0:
      raise ValueError(f"kv_reserve_tokens={self.kv_reserve_tokens!r}; expected >= 0 or None.")
    check_read_options(self.reader_threads, self.read_chunk)


@dataclasses.dataclass(frozen=True)
class LayerwiseSettings:
  """What layerwise's cost model reads from a plan (`Placement.settings`).

  Attributes:
    prefetch_depth: layers in flight while one computes.
    read_block_bytes: size of one disk request.
    read_queue_depth: disk requests in flight.
    link_copy: whether loading a layer to the device copies it: from host memory
      always; from disk only where the device has its own memory (on a CPU-only
      machine `device_put` aliases the page-aligned read buffer).
  """

  prefetch_depth: int
  read_block_bytes: int
  read_queue_depth: int
  link_copy: bool


# -- the strategy ---------------------------------------------------------------


def spread(num_layers: int, count: int) -> list[int]:
  """`count` layer indices spread evenly over `num_layers` (which stay resident)."""
  return sorted({int((j + 0.5) * num_layers / count) for j in range(count)}) if count else []


@dataclasses.dataclass
class _Layout:
  """Sizes the plan is made of (bytes)."""

  globals_: int  # embed + head
  layer: list[int]  # per layer, exact
  slot: int  # one ring slot: the largest streamed layer (padded as stored)
  kv_layer: int  # KV cache of one layer at the reserve
  kv_tokens: int  # the reserve, in positions at batch 1
  aliases: bool  # device_put of an aligned host buffer aliases it (CPU)
  store: int = 0  # the disk store: every group (embed, head, resident layers too), padded


@register_strategy("layerwise")
class Layerwise(Strategy):
  """Blocks resident up to a budget; the rest streamed from host or disk, prefetched."""

  Options = LayerwiseOptions
  shards_over_mesh = True

  @classmethod
  def candidates(cls, model, budget):
    """For the planner: stream from host RAM or from disk, keeping as many
    layers resident as the device budget allows."""
    return [LayerwiseOptions(offload_tier=tier, resident_layers="auto")
            for tier in ("host", "disk")]

  def __init__(self, options: Any = None):
    super().__init__(options)
    self._loader: concurrent.futures.ThreadPoolExecutor | None = None
    self._issuer: concurrent.futures.ThreadPoolExecutor | None = None
    self._pool: ReaderPool | None = None
    self._closed = False

  # -- planning (pure) ---------------------------------------------------------

  def _layout(self, model: Model, profile=None) -> _Layout:
    """Sizes of a plan. `profile` says whether the device is the CPU, where
    `device_put` aliases the ring's page-aligned read buffers (no staging copy)."""
    cfg = model.config
    aliases = hardware.device_is_cpu(profile)
    layer = [sum(model.group_nbytes(f"layers/{i}/{h}") for h in HALVES)
             for i in range(cfg.num_layers)]
    if self.options.offload_tier == "disk":
      slot = max(sum(round_up(padded_group_nbytes(model, f"layers/{i}/{h}")) for h in HALVES)
                 for i in range(cfg.num_layers))
    else:
      slot = max(layer)
    tokens = self.options.kv_reserve_tokens
    return _Layout(globals_=model.group_nbytes("embed") + model.group_nbytes("head"),
                   layer=layer, slot=slot, kv_layer=model.kv_cache_nbytes(tokens, layers=1),
                   kv_tokens=cfg.max_position_embeddings if tokens is None else tokens,
                   aliases=aliases,
                   store=store_nbytes(model) if self.options.offload_tier == "disk" else 0)

  def _needs(self, lay: _Layout, resident: list[int], num_layers: int) -> dict[str, int]:
    """Bytes per tier for a resident set (the working bytes included)."""
    o = self.options
    streamed = [i for i in range(num_layers) if i not in resident]
    slots = min(o.prefetch_depth + 1, len(streamed))
    need = {"device": lay.globals_ + sum(lay.layer[i] for i in resident), "host": 0, "disk": 0}
    offloaded = sum(lay.layer[i] for i in streamed)
    if o.kv_cache_tier == "device":
      need["device"] += lay.kv_layer * num_layers
    else:
      need["host"] += lay.kv_layer * num_layers
      need["device"] += lay.kv_layer  # one layer's cache on the device during its attention
    if o.offload_tier == "host":
      need["host"] += offloaded
      need["device"] += slots * lay.slot
    else:
      need["disk"] += lay.store
      need["device"] += slots * lay.slot
      if not lay.aliases:  # staging buffers in host memory, then a copy to the device
        need["host"] += slots * lay.slot
    return need

  def minimum_budget(self, model: Model, profile=None) -> dict[str, int]:
    """Smallest bytes per tier these options can run in (pure).

    For "auto", the resident count that needs the least device memory (usually
    0; all layers when a ring slot would cost more than the layers it streams).
    """
    n = model.config.num_layers
    lay = self._layout(model, profile)
    if self.options.resident_layers != "auto":
      return self._needs(lay, spread(n, min(self.options.resident_layers, n)), n)
    return min((self._needs(lay, spread(n, r), n) for r in range(n + 1)),
               key=lambda need: need["device"])

  def plan(self, model: Model, budget, profile=None) -> Placement:
    o = self.options
    n = model.config.num_layers
    lay = self._layout(model, profile)
    if o.resident_layers == "auto":
      count = 0
      for r in range(n, -1, -1):
        if budget.device is None or self._needs(lay, spread(n, r), n)["device"] <= budget.device:
          count = r
          break
    else:
      if o.resident_layers > n:
        raise ValueError(f"resident_layers={o.resident_layers} but the model has {n} layers.")
      count = o.resident_layers
    resident = spread(n, count)
    need = self._needs(lay, resident, n)
    # The smallest budget that works: "auto" can always fall back to streaming everything.
    minimum = self.minimum_budget(model, profile)
    for tier in ("device", "host", "disk"):
      limit = budget.limit(tier)
      if limit is not None and need[tier] > limit:
        raise BudgetExceeded(tier, need[tier], 0, limit,
                             group=f"layerwise plan ({count} of {n} layers resident,"
                                   f" prefetch depth {o.prefetch_depth})",
                             minimum=minimum[tier])

    streamed = [i for i in range(n) if i not in resident]
    slots = min(o.prefetch_depth + 1, len(streamed))
    groups = {"embed": GroupPlacement("device", model.group_nbytes("embed"), "always resident")}
    for i in range(n):
      for h in HALVES:
        nbytes = model.group_nbytes(f"layers/{i}/{h}")
        if i in resident:
          groups[f"layers/{i}/{h}"] = GroupPlacement("device", nbytes, "resident")
        else:
          groups[f"layers/{i}/{h}"] = GroupPlacement(
              o.offload_tier, nbytes, f"streamed, prefetch depth {o.prefetch_depth}")
    groups["head"] = GroupPlacement("device", model.group_nbytes("head"), "always resident")
    # Working bytes: the ring (and staging buffers) and the KV reserve.
    placed = {t: sum(g.nbytes for g in groups.values() if g.tier == t) for t in need}
    working = {t: need[t] - placed[t] for t in ("device", "host", "disk")}
    kv_total = lay.kv_layer * n
    streamed_bytes = sum(lay.layer[i] for i in streamed)
    notes = [
        model.weights_note,
        f"resident layers: {resident if len(resident) < 12 else f'{len(resident)} of {n}'};"
        f" streamed: {len(streamed)} from {o.offload_tier}",
        f"ring: {slots} slot(s) of {format_bytes(lay.slot)}"
        + (" (device_put aliases the staging buffers on CPU: one copy)"
           if o.offload_tier == "disk" and lay.aliases else ""),
        f"KV cache on {o.kv_cache_tier}: {format_bytes(kv_total)} reserved for"
        f" {lay.kv_tokens} tokens at batch 1",
        f"minimum budget for these options: device {format_bytes(minimum['device'])},"
        f" host {format_bytes(minimum['host'])}",
        f"streamed per token: {format_bytes(streamed_bytes)}",
    ]
    settings = LayerwiseSettings(prefetch_depth=o.prefetch_depth, read_block_bytes=o.read_chunk,
                                 read_queue_depth=o.reader_threads,
                                 link_copy=o.offload_tier == "host" or not lay.aliases)
    return Placement(self.name, groups, working_bytes=working, notes=tuple(notes),
                     settings=settings)

  # -- cost model --------------------------------------------------------------------

  @staticmethod
  def cost_model(ctx: simulate.PassContext) -> None:
    """Each streamed layer (both halves, one unit) is loaded -- disk read, then
    host->device copy where the plan's LayerwiseSettings say loading copies --
    into a ring of `prefetch_depth + 1` slots, so `prefetch_depth` layers load
    while one computes; streaming wraps into the next pass."""
    pl, prof = ctx.placement, ctx.profile
    s: LayerwiseSettings = pl.settings
    depth, block, qd = s.prefetch_depth, s.read_block_bytes, s.read_queue_depth
    n = ctx.model.config.num_layers
    done: list[int] = []  # last compute event of every streamed layer, across passes
    prev = None
    for p in range(ctx.passes):
      ctx.pass_index = p
      prev = ctx.add("device", ctx.settings.pass_overhead_s, (prev,), "pass start",
                     overhead=False)
      for i in range(n):
        halves = [f"layers/{i}/attn", f"layers/{i}/mlp"]
        gp = pl.groups[halves[0]]
        nbytes = sum(pl.groups[g].nbytes for g in halves)
        loaded = None
        streamed = gp.tier in ("disk", "host")
        if streamed:
          # A ring slot frees when the layer `depth + 1` streamed steps back is done.
          free = done[-(depth + 1)] if len(done) > depth else None
          if gp.tier == "disk":
            loaded = ctx.add("disk", nbytes / prof.disk_bw(block, qd), (free,),
                             f"read layer {i}", i, nbytes)
          if s.link_copy:
            loaded = ctx.add("link", ctx.copy_time(nbytes), (loaded, free),
                             f"h2d layer {i}", i, nbytes)
        for g in halves:
          prev = ctx.add("device", ctx.half_time(g), (prev, loaded), g, i)
        if streamed:
          done.append(prev)
      prev = ctx.add("device", ctx.head_time(), (prev,), "head")

  # -- materialising -------------------------------------------------------------

  def materialize(self, placement: Placement, model: Model, ledger) -> None:
    o = self.options
    n = model.config.num_layers
    self._model = model
    # The shards this process holds (one, the whole model, without a mesh). The
    # plan, the layout and the ledger are one shard's: all shards are the same size.
    self._shards = shards = self.mesh or MeshShards(model)
    local = shards.local
    self._device = tiers.device_sharding(local[0].device)
    self._layout_ = lay = self._layout(shards.shard)
    self._resident_set = {i for i in range(n)
                          if placement.groups[f"layers/{i}/attn"].tier == "device"}
    self._streamed = [i for i in range(n) if i not in self._resident_set]
    self._nslots = min(o.prefetch_depth + 1, len(self._streamed))
    self._stores = []
    if o.offload_tier == "disk":
      for s in local:
        path = o.store_dir
        if path is not None and shards.size > 1:
          path = os.path.join(path, f"shard-{s.rank}-of-{shards.size}")
        self._stores.append(open_store(s.model, path, convert=o.convert))
      ledger.allocate("disk", self._stores[0].total_nbytes, "layerwise/store")

    def load(group):  # each local shard's host numpy tensors, from its store if there is one
      def tensors(j):
        if not shards.shard.group_nbytes(group):
          return {}
        if self._stores:
          return unflatten(self._stores[j].load(group))
        return local[j].model.group_tensors(group)
      return [tensors(j) for j in range(len(local))]

    def place(tier, group):
      ledger.allocate(tier, shards.shard.group_nbytes(group), group)
      parts = dict(zip((s.rank for s in local), load(group)))
      return shards.put(group, lambda s: parts[s.rank], tier)

    self._globals = {g: place("device", g) for g in ("embed", "head")}
    self._resident = {}
    for i in sorted(self._resident_set):
      self._resident[i] = {h: place("device", f"layers/{i}/{h}") for h in HALVES}
    self._host = {}  # layer -> per local shard: {half: host arrays}
    if o.offload_tier == "host":
      for i in self._streamed:
        halves = {}
        for h in HALVES:
          group = f"layers/{i}/{h}"
          ledger.allocate("host", shards.shard.group_nbytes(group), group)
          halves[h] = [jax.device_put(t, tiers.host_sharding(s.device))
                       for t, s in zip(load(group), local)]
        self._host[i] = [{h: halves[h][j] for h in HALVES} for j in range(len(local))]
    # The ring: allocated once, reused for every token; one buffer per local shard.
    self._slots: list[list[np.ndarray] | None] = []
    for _ in range(self._nslots):
      if o.offload_tier == "disk":
        if not lay.aliases:
          ledger.allocate("host", lay.slot, "layerwise/staging")
        ledger.allocate("device", lay.slot, "layerwise/ring")
        bufs = [aligned_empty(lay.slot) for _ in local]
        # Fault the pages in now: O_DIRECT into never-touched memory ran at
        # ~0.4 GB/s here (vs ~1.4 into touched pages; first touch costs ~0.8
        # GB/s on this VM), which would otherwise slow the first pass (TTFT).
        for buf in bufs:
          buf.fill(0)
        self._slots.append(bufs)
      else:
        ledger.allocate("device", lay.slot, "layerwise/ring")
        self._slots.append(None)
    if self._streamed:
      self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hetflow-layerwise")
      if self._stores:
        self._issuer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="hetflow-layerwise-issue")
        self._pool = ReaderPool(o.reader_threads, direct=o.direct_io)
    self._fences: list[Any] = [None] * self._nslots
    self._pending: collections.deque = collections.deque()  # (step, layer, future)
    self._next_step = 0
    self._current: tuple[int, int, dict] | None = None  # (step, layer, params)
    self._read_end = 0.0  # when the last layer's reads finished (loader thread)
    self._last_output = None
    self._phase = "prefill"
    self._lock = threading.Lock()
    self._kv_host = tiers.host_sharding() if o.kv_cache_tier == "host" else None
    self._refill(0)

  # -- the ring ------------------------------------------------------------------

  def _refill(self, first_step: int) -> None:
    """Schedules loads so that steps first_step .. first_step + slots - 1 are in flight."""
    self._next_step = first_step
    for _ in range(self._nslots):
      self._schedule()

  def _schedule(self) -> None:
    step = self._next_step
    self._next_step += 1
    layer = self._streamed[step % len(self._streamed)]
    slot = step % self._nslots
    fence, self._fences[slot] = self._fences[slot], None
    issued = self._issuer.submit(self._issue, layer, slot, fence) if self._stores else None
    future = self._loader.submit(self._load, layer, fence, issued)
    self._pending.append((step, layer, future))

  def _issue(self, layer: int, slot: int, fence) -> tuple[list, list, int, float]:
    """Runs on the issuer thread: waits for the slot to be free, then queues its reads.

    It does not wait for the reads: the next layer's requests queue behind
    these, so the disk never drains between layers (waiting for each layer's
    last request before queueing the next left the disk idle or under-queued
    for a request's latency per layer: ~10-20% of the time for int8 and int4
    layers of 20-45 MB).

    Returns:
      (read futures, per local shard {half: (group, buffer view)}, bytes, issue time).
    """
    if fence is not None:
      jax.block_until_ready(fence)  # the last computation that read this slot is done
    t0 = time.perf_counter()
    reads, views, nbytes = [], [], 0
    for store, buf in zip(self._stores, self._slots[slot]):
      offset, mine = 0, {}
      for h in HALVES:
        group = f"layers/{layer}/{h}"
        size = store.group_nbytes(group)
        part = buf[offset:offset + size]
        reads.append(self._pool.read_into(store.file(group), 0, part, size,
                                          chunk=self.options.read_chunk))
        mine[h] = (group, part)
        offset += round_up(size)
      views.append(mine)
      nbytes += offset
    return reads, views, nbytes, t0

  def _load(self, layer: int, fence, issued) -> dict[str, dict[str, jax.Array]]:
    """Runs on the loader thread, in step order: waits for a layer's reads (queued
    by `_issue`), or for its slot (from host), then puts it on the device."""
    shards = self._shards
    devices = [tiers.device_sharding(s.device) for s in shards.local]

    def assemble(per_shard):  # [{half: tree}] per local shard -> {half: global tree}
      return {h: shards.assemble(f"layers/{layer}/{h}", [p[h] for p in per_shard])
              for h in HALVES}

    if self._stores:
      reads, views, nbytes, t0 = issued.result()
      concurrent.futures.wait(reads)  # every request done: none still writes into the slot
      for r in reads:
        r.result()  # a ReadError surfaces here, and in fetch() for this layer
      t1 = time.perf_counter()
      # The disk served this layer from when it was queued, or from when the layer queued
      # before it finished (requests are served in order), whichever is later.
      start = max(t0, self._read_end)
      self._read_end = t1
      if self.timeline is not None:
        self.timeline.add("read", f"read layer {layer}", start, t1, layer=layer, nbytes=nbytes)
      # device_put aliases the ring buffers on CPU.
      params = assemble([
          jax.device_put({h: unflatten(store.views(g, part)) for h, (g, part) in mine.items()},
                         device)
          for store, mine, device in zip(self._stores, views, devices)])
      if not self._layout_.aliases:
        jax.block_until_ready(params)  # the staging buffers are free once the copy is done
      if self.timeline is not None:
        self.timeline.add("transfer", f"to device layer {layer}", t1, time.perf_counter(),
                          layer=layer, nbytes=nbytes)
      return params
    if fence is not None:
      jax.block_until_ready(fence)  # the last computation that read this slot is done
    t0 = time.perf_counter()
    params = assemble([jax.device_put(host, device)
                       for host, device in zip(self._host[layer], devices)])
    jax.block_until_ready(params)
    nbytes = self._layout_.layer[layer] * len(shards.local)
    if self.timeline is not None:
      self.timeline.add("transfer", f"to device layer {layer}", t0, time.perf_counter(),
                        layer=layer, nbytes=nbytes)
    return params

  def _count(self, key: str, value: float, phase: str) -> None:
    with self._lock:
      self.counters.phase(phase).add(key, value)

  def _restart(self, layer: int) -> None:
    """Drops whatever is in flight and starts streaming at `layer` (after an error)."""
    if self._last_output is not None:
      jax.block_until_ready(self._last_output)
    for _, _, future in self._pending:
      concurrent.futures.wait([future])
    self._pending.clear()
    self._fences = [None] * self._nslots
    self._current = None
    self._refill(self._streamed.index(layer))

  def _take(self, layer: int) -> dict:
    if not self._pending or self._pending[0][1] != layer:
      self._restart(layer)
    step, _, future = self._pending.popleft()
    t0 = time.perf_counter()
    try:
      params = future.result()
    except BaseException as e:
      self._current = None
      if not isinstance(e, Exception):  # Ctrl-C while waiting: an interrupt, not a read error
        raise
      what = (f"reading layer {layer} from {', '.join(st.path for st in self._stores)}"
              if self._stores
              else f"moving layer {layer} to the device")
      if isinstance(e, OSError):
        raise ReadError(e.errno or errno.EIO, f"layerwise: {what} failed: {e}") from e
      raise RuntimeError(f"layerwise: {what} failed: {e!r}") from e
    t1 = time.perf_counter()
    self._count("wait_s", t1 - t0, self._phase)
    if self.timeline is not None:
      self.timeline.add("wait", f"wait for layer {layer}", t0, t1, layer=layer)
    self._count("streamed_layers", 1, self._phase)
    key = "disk_bytes" if self._stores else "h2d_bytes"
    # What this process moved: one shard's layer bytes per local shard.
    self._count(key, self._layout_.layer[layer] * len(self._shards.local), self._phase)
    self._current = (step, layer, params)
    return params

  # -- the hooks the engine calls -----------------------------------------------

  def globals(self):
    return {"embed": self._globals["embed"], "head": self._globals["head"]}

  def begin(self, phase, num_tokens) -> None:
    self._phase = phase

  def fetch(self, layer, half):
    if layer in self._resident_set:
      return self._resident[layer][half]
    if half == "attn" or self._current is None or self._current[1] != layer:
      self._take(layer)
    return self._current[2][half]

  def run_attention(self, layer, params, x, cache, cache_index, positions, kv_mask, attention):
    if self._kv_host is None:
      x, cache = attention(params, x, cache, cache_index, positions, kv_mask)
    else:
      # Explicit transfers: a jitted function cannot mix memory kinds in one dot.
      nbytes = sum(c.nbytes for c in cache)
      hold = self.ledger.allocate("device", nbytes, "kv_cache/staging") if self.ledger else None
      try:
        on_device = jax.device_put(cache, self._device)
        x, cache = attention(params, x, on_device, cache_index, positions, kv_mask)
        cache = jax.device_put(cache, self._kv_host)
      finally:
        if hold is not None:
          self.ledger.release(hold)
    if layer not in self._resident_set:
      self._last_output = x
    return x, cache

  def run_ffn(self, layer, params, x, ffn):
    x = ffn(params, x)
    if layer not in self._resident_set:
      self._last_output = x
    return x

  def release(self, layer, half) -> None:
    if half != "mlp" or layer in self._resident_set or self._current is None:
      return
    step = self._current[0]
    self._current = None
    # The FFN output is ready only once this block's computation no longer reads the slot.
    self._fences[step % self._nslots] = self._last_output
    self._schedule()

  def kv_cache_tier(self):
    return self.options.kv_cache_tier

  def stats(self):
    with self._lock:
      out = self.counters.copy()
    if self._pool is not None:
      out.reads = self._pool.record()
    out.details.update(resident_layers=sorted(self._resident_set),
                       streamed_layer_bytes=sum(self._layout_.layer[i] for i in self._streamed),
                       offload_tier=self.options.offload_tier)
    return out

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    if self._loader is not None:
      for _, _, future in getattr(self, "_pending", ()):
        concurrent.futures.wait([future])
      self._loader.shutdown(wait=True)
    if self._issuer is not None:
      self._issuer.shutdown(wait=True)
    if self._pool is not None:
      self._pool.close()
    for store in getattr(self, "_stores", ()):
      store.close()
