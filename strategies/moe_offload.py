"""`moe_offload`: routed experts as the unit of placement, an expert cache, look-ahead reads.

For mixture-of-experts models (Mixtral). The fixed region -- embeddings, head,
attention, norms, routers and the KV cache -- lives on the device tier. Every
routed expert of every layer is one record in a disk store (`hetflow.memory.LayerStore`,
group "layers/<i>/experts/<e>": gate, up, down back to back, page-aligned), so one
O_DIRECT read (`ReaderPool`) fetches it. An expert cache of `cache_experts` device
slots, shared by the layers, keeps experts between tokens (LFU, next use by layer order
or LRU).

Per layer, when few tokens are routed (decode; the model's own rule,
`modules.gathers_experts`):
  route (in `run_ffn`): the router on the FFN input; experts neither cached nor in
    flight are read now; the pass waits for its experts' reads only;
  look-ahead (optional, same jitted call as the route): layer i+1's norm and router
    applied to layer i's FFN input guess layer i+1's experts; their reads queue
    behind layer i's misses, so they run while layer i's FFN and layer i+1's
    attention compute (layer 0 is guessed from its attention's input);
  compute: `modules.expert_mixture` on the slots' own arrays (one matrix-vector
    product per kernel, nothing gathered), the arithmetic of the model's own MoE
    FFN, so tokens equal `resident`'s.
The look-ahead is off by default (see MoEOffloadOptions.lookahead). A guess is
read in pieces (`_Chain`), and a wrong one stops after the piece in flight once the
router has spoken: it costs those bytes (and may evict an older cached expert,
never one the layer's previous pass used nor one the layer computing now uses),
never correctness: the routed experts are always the router's. When many tokens are routed (a prompt),
every expert of the layer is read into X slots (each is a cache entry afterwards)
and the model's own FFN runs on them, so the prompt's staging area costs no memory
beyond the cache. With at least 2X slots, layers alternate between the first and
the second X, and layer i+1's reads start as soon as layer i's FFN is dispatched
(double buffering); with fewer, they start with layer i+1's attention.

Buffers: the slots are one page-aligned host buffer that jax aliases on a CPU
device (no copy; a slot is refilled only after the last computation that read it
is done, hetflow/memory/buffers.py); elsewhere a slot's kernels are copied to the
device when first used after a read (tested on the CPU with an accelerator's
profile; no accelerator was lent).

Weight formats (hetflow/models/formats.py): a record holds each kernel's stored
leaves with their scales ("gate/q", "gate/scale", ...), so one read still fetches
an expert; decode computes them with the format's matrix-vector kernels on the
slot's own leaves (`modules.expert_output`, as resident's few-token path), a
prompt's pass bit-casts them out of a byte stack of records. The store's identity
names its format: a store of another format is never reused.

Host tier (`host_experts`): records of the most popular experts (by the model's
routing law) are read once into host memory (the budget's host tier; the
`pinned_host` memory kind where the device has its own memory); a miss on one
fills its slot from there instead of the disk. With cold_compute="host" decode
computes such an expert where it lies, on the host CPU, and moves only its output
(Fiddler, KTransformers): correct here, where the device is the CPU itself;
timed only where an accelerator is lent (not yet). Not done (issue 14): sparse
experts (neuron_cluster inside each expert), meshes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import threading
import time
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from hetflow import hardware, simulate
from hetflow.memory import tiers
from hetflow.memory.budget import BudgetExceeded, format_bytes
from hetflow.memory.buffers import aligned_empty, round_up, view_as
from hetflow.memory.cache import cache_root
from hetflow.memory.reader import ReaderPool, check_read_options
from hetflow.memory.store import (
  MANIFEST,
  LayerStore,
  StoreMismatchError,
  check_fingerprint,
  fingerprint_digest,
  is_hetflow_store,
  model_fingerprint,
)
from hetflow.models import formats, layers, modules
from hetflow.models.model import Model
from hetflow.strategy import GroupPlacement, NotApplicable, Placement, Strategy, register_strategy
from strategies import mesh_lanes

EXPERT_TENSORS = ("gate", "up", "down")


POLICIES = ("lfu", "next_use", "lru", "none")


@dataclasses.dataclass(frozen=True)
class MoEOffloadOptions:
  """Options of `moe_offload`.

  Attributes:
    cache_experts: device slots of the expert cache, shared by every layer (one
      expert record each; a prompt's pass reads a layer's X experts into the
      first X): at least X, at most every expert of the model; "auto": as many as
      the device budget allows after the fixed region and the KV reserve.
    cache_policy: which cached expert a miss evicts: "lfu" (least often used,
      ties by recency; the default), "next_use" (the one whose layer comes round
      last: a forward pass visits the layers in order, so this is Belady's choice
      as far as the layer order tells; ties by recency), "lru" (least recently
      used), or "none": no expert is kept from one forward pass to the next (the
      no-cache ablation). Measured at 25% of mixtral-1b-routed (22 slots, under
      k per layer; 7-token decodes): hit rates LFU 0.34-0.37, next_use 0.20, LRU
      0 (it keeps nothing a layer reuses: the access is cyclic). A simulation
      favours next_use on long decodes (notes of issue 14).
    lookahead: the router's first `lookahead` choices for layer i+1, guessed from
      layer i's FFN input, whose reads start behind layer i's (see the module
      docstring): 0 (off, the default), 1 (the first choice only) up to k. A wrong
      guess costs the bytes read before the router spoke; on mixtral-1b-routed the
      guesses were right 66% of the time (notes of issue 14).
    kv_reserve_tokens: KV positions (batch 1) the plan reserves on the device;
      None: the model's max_position_embeddings.
    store_dir: the expert store; None: `default_expert_store_dir` (under
      $HETFLOW_CACHE/expert_stores), written on first use.
    convert: write the store when it does not exist yet; False makes a missing
      store an error.
    direct_io: read with O_DIRECT (cold reads come from the disk).
    reader_threads: read requests in flight.
    read_chunk: bytes per read request (a multiple of 4096).
    host_experts: expert records kept in the budget's host tier (read from the store
      once, when the strategy starts), the most popular by the model's routing law
      first; a miss on one of them fills its device slot from host memory instead
      of the disk (see `_HostTier`). 0 (the default): every record on disk only;
      "auto": as many as the host budget allows (every record when it is unlimited).
    cold_compute: what decode does with a routed expert that is in the host tier but
      not in the device cache: "copy" (the default) fills a device slot with it;
      "host" computes it where it lies, by a jitted function on the host CPU whose
      output alone moves to the device (Fiddler, KTransformers; needs host_experts).
      On a CPU device both run on the same cores: "host" only saves the copy; its
      point is an accelerator, where it is timed (not done yet: no GPU was lent).
  """

  cache_experts: int | Literal["auto"] = "auto"
  cache_policy: Literal["lfu", "next_use", "lru", "none"] = "lfu"
  lookahead: int = 0
  kv_reserve_tokens: int | None = None
  store_dir: str | None = None
  convert: bool = True
  direct_io: bool = True
  reader_threads: int = 8
  read_chunk: int = 1 << 20
  host_experts: int | Literal["auto"] = 0
  cold_compute: Literal["copy", "host"] = "copy"

  def __post_init__(self):
    c = self.cache_experts
    if not (c == "auto" or (isinstance(c, int) and not isinstance(c, bool) and c >= 1)):
      raise ValueError(f"cache_experts={c!r}; expected an int >= 1 or 'auto'.")
    if self.cache_policy not in POLICIES:
      raise ValueError(f"cache_policy={self.cache_policy!r}; expected one of {POLICIES}.")
    if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) or (
        self.lookahead < 0):
      raise ValueError(f"lookahead={self.lookahead!r}; expected the number of guessed experts"
                       " per token to read ahead, an int >= 0 (0: off).")
    check_read_options(self.reader_threads, self.read_chunk)
    h = self.host_experts
    if not (h == "auto" or (isinstance(h, int) and not isinstance(h, bool) and h >= 0)):
      raise ValueError(f"host_experts={h!r}; expected an int >= 0 (records kept in host"
                       " memory) or 'auto'.")
    if self.cold_compute not in ("copy", "host"):
      raise ValueError(f"cold_compute={self.cold_compute!r}; expected 'copy' or 'host'.")
    if self.cold_compute == "host" and h == 0:
      raise ValueError("cold_compute='host' computes the experts kept in host memory; give"
                       " host_experts (an int >= 1 or 'auto') too.")


@dataclasses.dataclass(frozen=True)
class MoEOffloadSettings:
  """What moe_offload's cost model reads from a plan (`Placement.settings`).

  Attributes:
    slots: expert cache slots (shared by the layers).
    record_bytes: bytes of one expert record as stored (padded).
    hit_rate: predicted fraction of decode expert lookups served by the cache.
    lookahead: guessed experts per token whose reads start behind the previous
      layer's (0: none).
    lookahead_accuracy: assumed fraction of a layer's experts the look-ahead
      guesses right (see `expected_hit_rate`).
    read_block_bytes: size of one disk request.
    read_queue_depth: disk requests in flight.
    link_copy: whether a read expert is copied to the device (False on a CPU
      device, where the slot is aliased).
    host_records: expert records kept in the host tier.
    host_share: predicted fraction of decode expert lookups served by the host
      tier (cache misses whose record is in host memory: no disk read).
    cold_compute: "copy" or "host" (MoEOffloadOptions.cold_compute).
  """

  slots: int
  record_bytes: int
  hit_rate: float
  lookahead: int
  lookahead_accuracy: float
  read_block_bytes: int
  read_queue_depth: int
  link_copy: bool
  host_records: int = 0
  host_share: float = 0.0
  cold_compute: str = "copy"


# Eliseev & Mazur 2023 (arXiv 2312.17238) report ~0.8-0.9 recall for guessing Mixtral's
# next-layer experts from the current hidden state; our synthetic models are measured
# in the notes. Used by the cost model only.
LOOKAHEAD_ACCURACY = 0.8
GUESS_PIECE = 8 << 20  # bytes of a guessed read in flight at a time (see _Chain)


@dataclasses.dataclass(frozen=True)
class RoutingLaw:
  """How a model routes, as far as the cost model knows.

  Attributes:
    frequencies: target P(expert in top-k) [X].
    reuse: fraction of a token's experts the previous token also used.
    lru_hit_rates: hit rate of an LRU expert cache shared by the layers, by its slots
      [L * X + 1], measured on the model's own routing; None where unknown.
  """

  frequencies: np.ndarray
  reuse: float
  lru_hit_rates: np.ndarray | None = None


def routing_law(model: Model) -> RoutingLaw:
  """The routing the model follows.

  Synthetic routed models state their law (hetflow.checkpoints.moe.RoutingSpec) and
  measure their LRU hit rates when they calibrate; for any other Mixtral the published
  figures stand in: near-uniform popularity and the reuse an LRU cache of k experts sees
  in Mixtral-8x7B (~0.5, Eliseev & Mazur 2023; see hetflow/checkpoints/moe.py).
  """
  c = model.config
  source = model.source
  spec = getattr(source, "spec", None)
  if spec is not None and hasattr(spec, "frequencies") and hasattr(spec, "reuse"):
    return RoutingLaw(spec.frequencies(c), float(spec.reuse), source.lru_hit_rates())
  n, k = c.num_experts, c.experts_per_token
  return RoutingLaw(np.full(n, k / n), 0.5)


def expert_popularity(model: Model) -> np.ndarray:
  """Target P(expert in top-k) [layers, X]: a synthetic routed model's stated law per
  layer, else the routing law's figures (hetflow/checkpoints/moe.py) for every layer."""
  c = model.config
  target = getattr(model.source, "target_frequencies", None)
  if target is not None and getattr(model.source, "spec", None) is not None:
    return np.stack([np.asarray(target(i), np.float64) for i in range(c.num_layers)])
  return np.tile(np.full(c.num_experts, c.experts_per_token / c.num_experts),
                 (c.num_layers, 1))


def host_expert_keys(model: Model, count: int) -> list[tuple[int, int]]:
  """The `count` (layer, expert) records the host tier holds: the most popular by
  `expert_popularity` (ties: lower layer, then lower expert first)."""
  p = expert_popularity(model)
  order = np.argsort(-p.reshape(-1), kind="stable")[:count]
  return [tuple(int(v) for v in divmod(int(i), p.shape[1])) for i in order]


def predicted_host_share(model: Model, keys, hit_rate: float) -> float:
  """Predicted fraction of decode lookups that miss the device cache and find their
  record in the host tier: the misses times the host records' share of the demand,
  as if the cache's misses were spread like the demand. That holds for LRU (its
  hits come from reuse of the previous token's experts): on mixtral-tiny-8e-routed,
  8 slots, 200 sampled tokens, 8 and 16 of 24 records in host memory, 0.234 and
  0.377 predicted for 0.233 and 0.447 measured. LFU keeps the popular experts the
  host tier holds too, so this line over-predicts it (0.234 for 0.142; notes of
  issue 14). With every record in host memory it is exact: 1 - hit rate."""
  if not keys:
    return 0.0
  c = model.config
  p = expert_popularity(model)
  demand = sum(p[i, e] for i, e in keys) / (c.num_layers * c.experts_per_token)
  return float((1.0 - hit_rate) * min(1.0, demand))


def expected_hit_rate(law: RoutingLaw, k: int, slots: int, layers: int, policy: str) -> float:
  """Predicted fraction of routed experts found in a cache of `slots` shared by `layers`.

  LRU, where the model measured its routing (`RoutingLaw.lru_hit_rates`): that
  measurement at `slots`. It counts the locality beyond one token that `reuse` does
  not state (a sequence's favourite experts): on mixtral-tiny-8e-routed at 4 slots a
  layer, the line below predicted 2.2 expert reads a token where 8 sampled decodes
  measured 1.67 on average, and the measurement 1.56 (notes, twentieth session).

  Otherwise from the law's popularity and reuse, with `per_layer` = slots / layers
  (the layers are visited in turn): with at least k, the previous token's experts are
  still cached when the layer comes round again and hit `reuse` of the lookups; each
  further slot holds an expert used longer ago or more often, and the hit rate grows
  linearly to 1 at every expert of the layer (X). With fewer than k, LRU keeps nothing
  a layer reuses (the other layers' reads evict it first, the access is cyclic); LFU
  keeps the hottest experts, at most their share of the demand; next_use keeps the
  previous experts of the layers that come next, so the hit rate grows linearly from
  0 to `reuse` at k (within 9% of the mean of 8 sampled decodes of mixtral-tiny-8e-routed
  at 8, 9 and 12 slots; a simulation of a Markov routing with reuse 0.6 over 16 layers
  gave 0.27 and 0.46 at 14 and 22 slots against 0.26 and 0.41 by this line, but
  mixtral-1b-routed measured 0.20 at 22 slots in 7-token decodes; LFU's gave 0.29 for a
  measured 0.34-0.37; notes of issue 14). "none" keeps nothing.
  """
  if policy == "none":
    return 0.0
  if policy == "lru" and law.lru_hit_rates is not None:
    return float(law.lru_hit_rates[slots])
  n = len(law.frequencies)
  per_layer = slots / layers
  if per_layer >= n:
    return 1.0
  if per_layer >= k:
    return float(law.reuse + (1.0 - law.reuse) * (per_layer - k) / (n - k))
  if policy == "lru":
    return 0.0
  if policy == "next_use":
    return float(law.reuse * per_layer / k)
  p = np.sort(np.asarray(law.frequencies, np.float64))[::-1] / k  # share of lookups
  whole = int(per_layer)
  return float(p[:whole].sum() + (per_layer - whole) * p[whole])


def expert_leaves(model: Model) -> list[tuple[str, tuple[int, ...], np.dtype]]:
  """One expert's stored tensors in record order: (name in the record, shape, dtype).

  float32 experts hold "gate", "up" and "down" as arrays [D, F], [D, F], [F, D]; a
  weight format's experts hold each kernel's leaves with their scales ("gate/q",
  "gate/scale", ...; hetflow/models/formats.py), so one record is still one read.
  """
  out = []
  for t in EXPERT_TENSORS:
    prefix = f"layers/0/mlp/{t}"
    names = [n for n in model.shapes if n == prefix or n.startswith(prefix + "/")]
    for n in sorted(names, key=lambda n: (n != prefix, n)):
      shape = model.shapes[n]
      out.append((t + n[len(prefix):], tuple(shape.shape[1:]), np.dtype(shape.dtype)))
  return out


def record_nbytes(model: Model) -> int:
  """Bytes of one expert record as stored: every tensor of gate, up and down page-aligned."""
  return sum(round_up(int(np.prod(shape)) * dtype.itemsize)
             for _, shape, dtype in expert_leaves(model))


def _is_expert_tensor(name: str) -> bool:
  """Whether a stored tensor ("layers/3/mlp/up" or "layers/3/mlp/up/q") is a routed expert's."""
  parts = name.split("/")
  return len(parts) >= 4 and parts[0] == "layers" and parts[2] == "mlp" and (
      parts[3] in EXPERT_TENSORS)


KIND = "moe_experts"


def expert_fingerprint(model: Model) -> dict[str, Any]:
  """The fingerprint record of an expert store: the model's, plus what a record holds.

  A weight format's store also names its format ("weights"), so a store of another
  format is never reused (the model's tensors differ too); float32 stores, written
  before formats were stored, keep their identity.
  """
  record = {"kind": KIND, "model": model_fingerprint(model), "tensors": list(EXPERT_TENSORS)}
  if not model.format.plain:
    record["weights"] = model.weights
  return record


def default_expert_store_dir(model: Model) -> str:
  """cache_root()/expert_stores/<name>-<weights>-<fingerprint digest[:12]> (weights:
  the format, e.g. "float32", "int8", "int4")."""
  digest = fingerprint_digest(expert_fingerprint(model))
  return os.path.join(cache_root(), "expert_stores",
                      f"{model.config.name}-{model.weights}-{digest[:12]}")


def write_expert_store(model: Model, path: str, progress: bool = True,
                       overwrite: bool = False) -> None:
  """Writes every expert of `model` as one record (group "layers/<i>/experts/<e>").

  A `LayerStore` (atomic, free space checked first, never replacing anything but a
  hetflow store), with the fingerprint in its manifest; peak memory one layer.
  """
  c = model.config

  def groups():
    for i in range(c.num_layers):
      stacks = {n: model.param(f"layers/{i}/mlp/{n}") for n in EXPERT_TENSORS}
      for e in range(c.num_experts):
        record = {}
        for n in EXPERT_TENSORS:
          if isinstance(stacks[n], dict):  # a weight format's leaves, in expert_leaves' order
            record.update({f"{n}/{leaf}": np.ascontiguousarray(stacks[n][leaf][e])
                           for leaf in sorted(stacks[n])})
          else:
            record[n] = np.ascontiguousarray(stacks[n][e])
        yield f"layers/{i}/experts/{e}", record

  fp = expert_fingerprint(model)
  metadata = {"kind": KIND, "fingerprint": fingerprint_digest(fp), "fingerprint_record": fp,
              "dtype": jnp.dtype(model.dtype).name, "weights": model.weights,
              "description": model.description}
  LayerStore.write(path, groups(), progress=progress, metadata=metadata, overwrite=overwrite,
                   description=f"writing {c.name}'s experts",
                   nbytes=c.num_layers * c.num_experts * record_nbytes(model)).close()


def open_expert_store(model: Model, path: str | None, convert: bool) -> LayerStore:
  """The expert store of `model` (default: `default_expert_store_dir`), written if missing,
  opened with its shared lock held (release it with `close()`).

  Raises:
    StoreMismatchError: the store at `path` holds another model, dtype or kind.
    FileNotFoundError: it is missing and `convert` is False.
  """
  path = os.path.abspath(path or default_expert_store_dir(model))
  if not os.path.exists(os.path.join(path, MANIFEST)):
    if not convert:
      raise FileNotFoundError(f"no expert store at {path}; pass convert=True to write it.")
    try:
      write_expert_store(model, path, overwrite=os.path.isdir(path))
    except FileExistsError:
      if not is_hetflow_store(path):  # not another writer that won the race
        raise
  store = LayerStore.open(path, lock=True)
  try:
    if store.metadata.get("kind") != KIND:
      raise StoreMismatchError(f"{store.path} is a hetflow store of another kind, not an"
                               " expert store; pass another store_dir")
    check_fingerprint(store, expert_fingerprint(model),
                      f"{model.description!r}, weights {model.weights}")
  except BaseException:
    store.close()
    raise
  return store


def record_layout(store: LayerStore) -> tuple:
  """Where gate, up and down lie in an expert record, hashable (a static jit argument):
  per kernel (byte offset, shape, dtype name), or for a weight format's kernel a
  tuple of (leaf, (byte offset, shape, dtype name))."""
  info = store.tensors("layers/0/experts/0")
  spec = lambda t: (int(t.offset), tuple(int(n) for n in t.shape), np.dtype(t.dtype).name)
  out = []
  for kernel in EXPERT_TENSORS:
    if kernel in info:
      out.append(spec(info[kernel]))
    else:
      out.append(tuple((name.split("/", 1)[1], spec(t)) for name, t in sorted(info.items())
                       if name.split("/", 1)[0] == kernel))
  return tuple(out)


def _kernels(buffer: np.ndarray, start: int, layout: tuple, device):
  """(gate, up, down) of the record at byte `start` of `buffer` as jax arrays on `device`
  (views, no copy, on a CPU device): arrays, or a weight format's dicts of leaves."""
  put = lambda offset, shape, dtype: jax.device_put(
      view_as(buffer, start + offset, shape, dtype), device)
  return tuple(put(*k) if isinstance(k[0], int) else {name: put(*spec) for name, spec in k}
               for k in layout)


class _Chain:
  """A guessed expert's read in pieces, each started when the previous one lands, so a
  wrong guess stops after the piece in flight (a submitted read cannot be recalled).

  Attributes:
    future: done when the last piece landed or, once cancelled, the one in flight did;
      its result is `submitted`.
    submitted: bytes handed to the reader so far.
  """

  def __init__(self, reader: ReaderPool, path: str, dest: np.ndarray, nbytes: int,
               piece: int, chunk: int):
    self.future: concurrent.futures.Future = concurrent.futures.Future()
    self.submitted, self._cancelled, self._lock = 0, False, threading.Lock()
    self._args = (reader, path, dest, nbytes, piece, chunk)
    self._next(None)

  def _next(self, done) -> None:
    reader, path, dest, nbytes, piece, chunk = self._args
    try:
      if done is not None:
        done.result()  # a failed piece fails the read
      with self._lock:
        if self._cancelled or self.submitted >= nbytes:
          self.future.set_result(self.submitted)
          return
        start = self.submitted
        n = min(piece, nbytes - start)
        self.submitted += n
      reader.read_into(path, start, dest[start:start + n], n, chunk=chunk).add_done_callback(
          self._next)
    except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
      if not self.future.done():
        self.future.set_exception(e)

  def cancel(self) -> None:
    with self._lock:
      self._cancelled = True


class _Pool:
  """Expert slots: page-aligned host records, their device arrays, and what each holds.

  Attributes:
    host: [slots, record bytes] page-aligned buffer reads land in.
    stacks: jax arrays [X, record elements] over slots [hX, (h+1)X) for each half
      h (two where the slots hold 2X records, else one; alias `host` on a CPU
      device): a prompt's pass puts layer i's experts in half i % halves, so
      layer i+1's reads run while layer i's FFN computes.
    kernels: slot -> (gate [D, F], up [D, F], down [F, D]) jax arrays, what the
      routed FFN multiplies by (alias `host` on a CPU device; elsewhere copied when
      first used after the slot's read landed, None until then).
    key: slot -> (layer, expert) it holds, or None.
    last_use: slot -> step (layer pass) of its last use.
    fence: slot -> the last output computed from it (refilled only once that is ready).
    inflight: slot -> future of its read.
    chains: slot -> the `_Chain` of a guessed read still to be counted.
    device_records: slot -> the device copy of a record filled from the host tier
      (devices with their own memory), until a prompt's stack takes it.
  """

  def __init__(self, slots: int, record: int, elems: int, dtype, device, layout, aliases,
               experts: int):
    self.host = aligned_empty(slots * record)
    self.host.fill(0)  # fault the pages in: O_DIRECT into untouched pages is slow (layerwise.py)
    self.stacks = [jax.device_put(view_as(self.host, h * experts * record, (experts, elems),
                                          dtype), device)
                   for h in range(2 if slots >= 2 * experts else 1)]
    self.record, self.device, self.layout = record, device, layout
    self.kernels: list[Any] = [self.views(s) if aliases else None for s in range(slots)]
    self.key: list[tuple[int, int] | None] = [None] * slots
    self.last_use = [-1] * slots
    self.fence: list[Any] = [None] * slots
    self.inflight: dict[int, Any] = {}
    self.chains: dict[int, _Chain] = {}
    self.where: dict[tuple[int, int], int] = {}  # (layer, expert) -> slot
    self.device_records: dict[int, Any] = {}  # slot -> its record filled from the host tier

  def views(self, slot: int):
    """The slot's (gate, up, down) as jax arrays, or a weight format's leaves (no copy on
    a CPU device)."""
    return _kernels(self.host, slot * self.record, self.layout, self.device)

  def clear(self) -> None:
    for slot in list(self.inflight):
      self.inflight.pop(slot).result()
    self.key = [None] * len(self.key)
    self.where.clear()


class _HostTier:
  """Expert records kept in host memory (the budget's host tier), read from the store once.

  On a CPU device (host memory is the device's) they stay in one page-aligned
  numpy buffer, and a slot is filled by a memcpy on a worker thread. Where the
  device has its own memory, each record is a jax array in the host memory kind
  (`pinned_host` where the backend lists it, so a copy to the device is a DMA
  transfer) and a slot is filled by `jax.device_put`; with cold_compute="host" the
  records stay plain host arrays, which a jitted function on the host CPU reads.

  Attributes:
    index: (layer, expert) -> position of its record.
    buffer: [records, record bytes] page-aligned host buffer, or None once the
      records live in jax's host memory kind.
    arrays: position -> the record as a jax array [elements] in the host memory
      kind (devices with their own memory and cold_compute="copy"), else empty.
    kernels: position -> (gate, up, down) on the host CPU device, views of `buffer`
      (cold_compute="host"), else empty.
  """

  def __init__(self, keys, store: LayerStore, reader: ReaderPool, record: int, chunk: int,
               elems: int, dtype, layout, to_memory_kind: bool, host_compute: bool):
    self.index = {key: pos for pos, key in enumerate(keys)}
    self.record = record
    self.buffer = aligned_empty(max(1, len(keys)) * record)
    futures = [reader.read_into(store.file(f"layers/{i}/experts/{e}"), 0,
                                self.slice(pos), store.group_nbytes(f"layers/{i}/experts/{e}"),
                                chunk=chunk) for (i, e), pos in self.index.items()]
    for future in futures:
      future.result()
    self.arrays: dict[int, Any] = {}
    self.kernels: dict[int, Any] = {}
    if host_compute:
      cpu = jax.devices("cpu")[0]
      self.kernels = {pos: _kernels(self.buffer, pos * record, layout, cpu)
                      for pos in self.index.values()}
    elif to_memory_kind:
      sharding = tiers.host_sharding()
      self.arrays = {pos: jax.device_put(view_as(self.buffer, pos * record, (elems,), dtype),
                                         sharding) for pos in self.index.values()}
      jax.block_until_ready(list(self.arrays.values()))
      self.buffer = None  # the records live in the host memory kind now

  def slice(self, pos: int) -> np.ndarray:
    return self.buffer[pos * self.record:(pos + 1) * self.record]


@register_strategy("moe_offload")
class MoEOffload(Strategy):
  """Fixed region on the device; routed experts on disk (some also in host memory), cached
  on the device, read ahead."""

  Options = MoEOffloadOptions
  # On a mesh: one MoEOffload per local shard, each caching its F/N slice of every
  # expert (strategies/mesh_lanes.py; docs/distributed.md says why not expert-parallel).
  shards_over_mesh = True
  _lanes: Any = None  # the mesh's Lanes, on the strategy the engine holds
  _mesh_lane: Any = None  # a lane's LaneSetup (its device)

  @classmethod
  def candidates(cls, model, budget):
    """For the planner: the default (LFU), with the look-ahead of the first choice, and
    with as many records in the host tier as its budget allows."""
    return [MoEOffloadOptions(), MoEOffloadOptions(lookahead=1),
            MoEOffloadOptions(host_experts="auto")]

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
                    if n.startswith("layers/") and "/mlp/" in n and not _is_expert_tensor(n))
    return dict(fixed=fixed + mlp_fixed, mlp_fixed=mlp_fixed, record=record_nbytes(model),
                kv=model.kv_cache_nbytes(self.options.kv_reserve_tokens),
                aliases=int(hardware.device_is_cpu(profile)))

  def _needs(self, model: Model, sizes: dict[str, int], slots: int) -> dict[str, int]:
    c = model.config
    working = sizes["record"] * max(c.num_experts, slots)  # the slots (staging inside)
    need = {"device": sizes["fixed"] + sizes["kv"] + working, "host": 0,
            "disk": c.num_layers * c.num_experts * sizes["record"]}
    if not sizes["aliases"]:
      need["host"] += working  # the page-aligned buffers reads land in
      halves = 2 if slots >= 2 * c.num_experts else 1
      need["device"] += sizes["record"] * c.num_experts * halves  # a prompt's stacks
    return need

  def plan(self, model, budget, profile=None) -> Placement:
    c, o = model.config, self.options
    if not c.num_experts:
      raise NotApplicable(f"moe_offload places routed experts; {c.name} has none (a dense"
                          " model: use layerwise, tensor_split or neuron_cluster).")
    k, n = c.experts_per_token, c.num_experts
    sizes = self._sizes(model, profile)
    total = n * c.num_layers
    minimum = self._needs(model, sizes, n)
    if o.cache_experts == "auto":
      slots = n if o.cache_policy == "none" else total
      if budget.device is not None:
        spare = budget.device - self._needs(model, sizes, 0)["device"] + n * sizes["record"]
        slots = max(n, min(slots, spare // sizes["record"]))
        while slots > n and self._needs(model, sizes, slots)["device"] > budget.device:
          slots -= 1  # a device with its own memory: a second prompt stack did not fit
    else:
      if not n <= o.cache_experts <= total:
        raise ValueError(f"cache_experts={o.cache_experts}; {c.name} has {n} experts in each"
                         f" of {c.num_layers} layers and a prompt's pass holds every expert of"
                         f" a layer in the slots, so it must lie in [{n}, {total}].")
      slots = o.cache_experts
    need = self._needs(model, sizes, slots)
    hosted = self._host_count(model, budget, sizes, need["host"])
    need["host"] += hosted * sizes["record"]
    if o.host_experts != "auto":
      minimum["host"] += hosted * sizes["record"]
    for tier in ("device", "host", "disk"):
      limit = budget.limit(tier)
      if limit is not None and need[tier] > limit:
        raise BudgetExceeded(tier, need[tier], 0, limit,
                             group=f"moe_offload plan ({slots} expert slots)",
                             minimum=minimum[tier])
    law = routing_law(model)
    hit = expected_hit_rate(law, k, slots, c.num_layers, o.cache_policy)
    keys = host_expert_keys(model, hosted)
    host_share = predicted_host_share(model, keys, hit)
    per_layer = np.bincount([i for i, _ in keys], minlength=c.num_layers)
    groups = {}
    for g in model.group_names():
      if g.endswith("/mlp"):
        copies = per_layer[int(g.split("/")[1])]
        groups[g] = GroupPlacement(
            "disk", n * sizes["record"] + sizes["mlp_fixed"] // c.num_layers,
            f"{n} expert records on disk" + (f", {copies} of them also in host memory"
                                             if copies else "")
            + " (norm and router on the device)")
      else:
        groups[g] = GroupPlacement("device", model.group_nbytes(g), "fixed region")
    placed_device = sum(g.nbytes for g in groups.values() if g.tier == "device")
    working = {"device": need["device"] - placed_device, "host": need["host"]}
    notes = (
        f"expert record: {format_bytes(sizes['record'])}; cache: {slots} of {total} experts"
        f" ({o.cache_policy}, shared by the layers); staging: {n} records",
        f"routing law: reuse {law.reuse:.2f}, predicted cache hit rate {hit:.2f}"
        + (" (measured LRU)" if o.cache_policy == "lru" and law.lru_hit_rates is not None
           else ""),
        f"predicted expert bytes per token: "
        f"{format_bytes(int(c.num_layers * k * (1 - hit) * sizes['record']))}",
        f"minimum budget: device {format_bytes(minimum['device'])}",
    ) + ((f"host tier: {hosted} of {total} expert records"
          f" ({format_bytes(hosted * sizes['record'])}), predicted to serve {host_share:.2f}"
          f" of the lookups; cold experts: {o.cold_compute}",) if hosted else ())
    settings = MoEOffloadSettings(
        slots=slots, record_bytes=sizes["record"], hit_rate=hit,
        lookahead=min(o.lookahead, k),
        lookahead_accuracy=LOOKAHEAD_ACCURACY, read_block_bytes=o.read_chunk,
        read_queue_depth=o.reader_threads, link_copy=not sizes["aliases"],
        host_records=hosted, host_share=host_share,
        cold_compute=o.cold_compute if hosted else "copy")
    return Placement(self.name, groups, working_bytes=working, notes=notes, settings=settings)

  def _host_count(self, model: Model, budget, sizes: dict[str, int], host_need: int) -> int:
    """Expert records the host tier holds: the option's count, or under "auto" as many
    as the host budget leaves after the strategy's other host bytes."""
    c, h = model.config, self.options.host_experts
    total = c.num_layers * c.num_experts
    if h == "auto":
      limit = budget.limit("host")
      return total if limit is None else int(max(0, min(total, (limit - host_need)
                                                        // sizes["record"])))
    if h > total:
      raise ValueError(f"host_experts={h}; {c.name} has {total} expert records in all.")
    return h

  # -- cost model ------------------------------------------------------------------

  @staticmethod
  def cost_model(ctx: simulate.PassContext) -> None:
    """Per layer: attention on the device; the layer's expert reads on the disk (all X
    records in a prompt's pass, started with the attention; the misses in decode,
    after the router); the FFN computes once they land. With the look-ahead, a
    `lookahead_accuracy` share of layer i+1's disk misses is read right after layer
    i's, so those reads overlap layer i's FFN and layer i+1's attention; each wrong
    guess reads one piece (GUESS_PIECE) before it is stopped: bytes, not waiting.
    The host tier (`host_share` of decode's lookups, `host_records` of a prompt's
    reads) fills slots over the link instead of the disk (on a CPU device the link
    is a memcpy by the same cores); with cold_compute="host" decode computes those
    experts on the host CPU instead, beside the device's FFN. A prompt's FFN also
    slices its X records out of the stacked slots: one pass over their bytes at
    the memory rate."""
    c = ctx.model.config
    s: MoEOffloadSettings = ctx.placement.settings
    prof = ctx.profile
    k, n = c.experts_per_token, c.num_experts
    fmt = ctx.model.format
    bits = fmt.bits_per_weight if not fmt.plain else 8 * ctx.dtype.itemsize
    gathers = ctx.rows * k < n
    experts = k if gathers else n
    expert_params = 3 * c.hidden_size * c.intermediate_size
    rate = prof.disk_bw(s.read_block_bytes, s.read_queue_depth)
    if gathers:
      hosted = experts * s.host_share  # cache misses served by the host tier
      misses = max(0.0, experts * (1.0 - s.hit_rate) - hosted)  # from the disk
    else:
      hosted = n * s.host_records / (n * c.num_layers)  # evenly, as far as a plan knows
      misses = n - hosted
    on_host = hosted if gathers and s.cold_compute == "host" else 0.0
    ahead = s.lookahead > 0 and gathers
    share = s.lookahead / k  # of the misses, guessed (right or wrong)
    right = misses * share * s.lookahead_accuracy if ahead else 0.0
    guessed = (misses * share * (s.lookahead_accuracy * s.record_bytes + (
        1.0 - s.lookahead_accuracy) * min(s.record_bytes, GUESS_PIECE)) if ahead else 0)
    double = s.slots >= 2 * n  # a prompt's reads double-buffered
    slicing = 0.0 if gathers else n * s.record_bytes / prof.memory_bw

    def read(nbytes, deps, label, layer):
      if not nbytes:
        return None
      event = ctx.add("disk", nbytes / rate, deps, label, layer, int(nbytes))
      if s.link_copy:
        event = ctx.add("link", ctx.copy_time(nbytes), (event,), f"h2d {label}", layer,
                        int(nbytes))
      return event

    def fill(count, deps, label, layer):
      """Slots filled from the host tier: a transfer to the device, or on a CPU device
      a memcpy (np.copyto) at the memory rate (the link probe's rate is jax's device_put,
      8-12x slower here: bench run 3, notes of issue 14)."""
      nbytes = count * s.record_bytes
      if not nbytes:
        return None
      seconds = ctx.copy_time(nbytes) if s.link_copy else nbytes / prof.memory_bw
      return ctx.add("link", seconds, deps, label, layer, int(nbytes))

    def compute(side, count):
      return ctx.compute_time(side, count * expert_params * bits / 8, count * expert_params,
                              half="mlp", fmt=fmt.name)

    prev = None
    for p in range(ctx.passes):
      ctx.pass_index = p
      prev = ctx.add("device", ctx.settings.pass_overhead_s, (prev,), "pass start",
                     overhead=False)
      early = (read(guessed, (prev,), "guessed experts 0", 0),)  # layer 0: at its attention
      for i in range(c.num_layers):
        if not gathers and (i == 0 or not double):
          early = (read(misses * s.record_bytes, (prev,), f"experts {i}", i),
                   fill(hosted, (prev,), f"host experts {i}", i))
        prev = ctx.add("device", ctx.half_time(f"layers/{i}/attn"), (prev,),
                       f"layers/{i}/attn", i)
        late = read((misses - right) * s.record_bytes if gathers else 0, (prev,),
                    f"missed experts {i}", i)
        host = None
        if gathers and on_host:
          host = ctx.add("cpu", compute("cpu", on_host), (prev,), f"host experts {i}", i)
        elif gathers:
          host = fill(hosted, (prev,), f"host experts {i}", i)
        # Layer i+1's guessed reads (decode), or its prompt reads into the other half
        # (whose last reader, layer i-1's FFN, came before this attention).
        guess_next = ()
        if i + 1 < c.num_layers and (gathers or double):
          nbytes = guessed if gathers else misses * s.record_bytes
          guess_next = (read(nbytes, (prev,), f"experts {i + 1} ahead", i + 1),
                        None if gathers else fill(hosted, (prev,), f"host experts {i + 1}", i + 1))
        ffn = compute("device", experts - on_host) + slicing
        prev = ctx.add("device", ffn, (prev, *early, late, host), f"layers/{i}/mlp", i)
        early = guess_next
      prev = ctx.add("device", ctx.head_time(), (prev,), "head")

  # -- materialising -----------------------------------------------------------------

  def materialize(self, placement, model, ledger) -> None:
    if self.mesh is not None and self.mesh.size > 1:
      self._lanes = mesh_lanes.Lanes(self, placement, ledger)
      return
    c, o = model.config, self.options
    self.model, self.config = model, c
    s: MoEOffloadSettings = placement.settings
    self.slots, self.record = s.slots, s.record_bytes
    self.aliases = not s.link_copy
    self.store = open_expert_store(model, o.store_dir, o.convert)
    # Where each kernel (or format leaf) lies in a record, and the dtype a prompt's stack
    # of records is viewed as: the compute dtype for float32 experts, bytes for a
    # format's (the leaves are bit-cast out of it, `_functions`).
    self._layout = record_layout(self.store)
    self._stack_dtype = np.dtype(model.dtype) if model.format.plain else np.dtype(np.uint8)
    self._elems = self.record // self._stack_dtype.itemsize
    device = tiers.device_sharding(None if self._mesh_lane is None else self._mesh_lane.device)
    self._device = device
    self._fixed = {}
    for g in model.group_names():
      tensors = model.group_tensors(g) if not g.endswith("/mlp") else {
          name: model.tensor(f"{g}/{name}") for name in ("norm", "router")}
      ledger.allocate("device", formats.nbytes(tensors), g)
      self._fixed[g] = jax.device_put(tensors, device)
    records = self.record * self.slots
    ledger.allocate("device", records, "moe_offload/experts")
    if not self.aliases:
      halves = 2 if self.slots >= 2 * c.num_experts else 1
      ledger.allocate("device", self.record * c.num_experts * halves, "moe_offload/stacks")
      ledger.allocate("host", records, "moe_offload/staging")
    new = functools.partial(_Pool, record=self.record, elems=self._elems,
                            dtype=self._stack_dtype, device=device, layout=self._layout,
                            aliases=self.aliases)
    # The expert cache, shared by every layer; a prompt's pass reads every expert of a
    # layer into X of its slots (each read is a cache entry like any other).
    self._cache = new(self.slots, experts=c.num_experts)
    self._reader = ReaderPool(o.reader_threads, direct=o.direct_io)
    self._host = None
    self._copier = None
    if s.host_records:
      ledger.allocate("host", s.host_records * self.record, "moe_offload/host_experts")
      self.host_load_bytes = s.host_records * self.record  # read once, before any pass
      self._host = _HostTier(host_expert_keys(model, s.host_records), self.store, self._reader,
                             self.record, o.read_chunk, self._elems, self._stack_dtype,
                             self._layout, to_memory_kind=not self.aliases,
                             host_compute=s.cold_compute == "host")
      self._copier = concurrent.futures.ThreadPoolExecutor(1, "moe-host-fill")
    self._step = 0
    self._uses: dict[tuple[int, int], int] = {}
    self._previous: dict[int, set] = {}  # layer -> experts its last pass used
    self._guess: dict[int, set] = {}
    self._guessed: dict[int, set] = {}
    self._phase = "prefill"
    self._prompt_reads: set[int] = set()
    self._dropped: list[_Chain] = []  # guessed reads cut short, counted at the pass's end
    # A lane's FFN is its shard's part of the experts' output, summed over the mesh
    # before the residual (ffn_finish).
    self._compiled = _functions(c, residual=self._mesh_lane is None)
    self._host_compiled = _host_functions(c) if s.cold_compute == "host" else None
    self._set_slot = jax.jit(lambda pool, i, rec: pool.at[i].set(rec), donate_argnums=(0,))

  # -- the cache -----------------------------------------------------------------------

  def _count(self, key: str, value: float) -> None:
    self.counters.phase(self._phase).add(key, value)

  def _victim(self, pool: _Pool, layer: int, keep: set,
              spare: set = frozenset()) -> int | None:
    """The slot an expert of `layer` goes to: a free one, else the policy's choice
    among the experts in neither `keep` nor `spare` (None: there is none)."""
    free = [s for s, key in enumerate(pool.key) if key is None]
    if free:
      return free[0]
    options = [s for s, key in enumerate(pool.key) if key not in keep and key not in spare]
    if not options:
      return None
    policy = self.options.cache_policy
    if policy == "lfu":
      return min(options, key=lambda s: (self._uses.get(pool.key[s], 0), pool.last_use[s]))
    if policy == "next_use":  # layers ahead of `layer` by 1 .. L (`layer` itself: L)
      n = self.config.num_layers
      return max(options, key=lambda s: ((pool.key[s][0] - layer - 1) % n, -pool.last_use[s]))
    return min(options, key=lambda s: pool.last_use[s])

  def _read(self, pool: _Pool, slot: int, layer: int, expert: int,
            guess: bool = False) -> None:
    """Starts reading `expert` of `layer` into `slot` (after its last computation is
    done); a `guess` is read as a `_Chain` and counted when it lands or is dropped."""
    if pool.fence[slot] is not None:
      jax.block_until_ready(pool.fence[slot])  # no computation may still read the slot
      pool.fence[slot] = None
    if slot in pool.inflight:
      pool.inflight.pop(slot).result()  # a guessed read being replaced
    if slot in pool.chains:
      self._dropped.append(pool.chains.pop(slot))
    if pool.key[slot] is not None and pool.where.get(pool.key[slot]) == slot:
      del pool.where[pool.key[slot]]
    other = pool.where.get((layer, expert))
    if other is not None:  # a prompt's pass puts expert e in slot e; drop the other copy
      pool.key[other] = None
    pool.key[slot] = (layer, expert)
    pool.where[(layer, expert)] = slot
    if not self.aliases:
      pool.kernels[slot] = None  # a device copy of what the slot held before
      pool.device_records.pop(slot, None)
    pool.last_use[slot] = self._step
    if self._host is not None and (layer, expert) in self._host.index:
      self._fill_from_host(pool, slot, self._host.index[(layer, expert)])
      return
    group = f"layers/{layer}/experts/{expert}"
    nbytes = self.store.group_nbytes(group)
    dest = pool.host[slot * self.record:(slot + 1) * self.record]
    chunk = self.options.read_chunk
    if guess:
      chain = _Chain(self._reader, self.store.file(group), dest, nbytes, GUESS_PIECE, chunk)
      pool.chains[slot] = chain
      pool.inflight[slot] = chain.future
      return
    pool.inflight[slot] = self._reader.read_into(self.store.file(group), 0, dest, nbytes,
                                                 chunk=chunk)
    self._count_read(nbytes)

  def _fill_from_host(self, pool: _Pool, slot: int, pos: int) -> None:
    """Fills `slot` with host record `pos`: a memcpy on the copier thread where the slot is
    the device's memory (CPU), else a transfer to the device of the record's jax array."""
    self._count("host_fills", 1)
    self._count("host_bytes", self.record)
    if self.aliases:
      dest = pool.host[slot * self.record:(slot + 1) * self.record]
      pool.inflight[slot] = self._copier.submit(np.copyto, dest, self._host.slice(pos))
      return
    rec = self._host.arrays.get(pos)  # cold_compute="host" keeps plain host arrays
    rec = jax.device_put(rec if rec is not None else view_as(
        self._host.buffer, pos * self.record, (self._elems,), self._stack_dtype), self._device)
    pool.kernels[slot] = self._compiled.unpack(rec, self._layout)
    pool.device_records[slot] = rec  # a prompt's stack takes it from here (`_wait`)
    self._count("h2d_bytes", self.record)

  def _count_read(self, nbytes: int) -> None:
    self._count("disk_bytes", nbytes)
    self._count("disk_requests", -(-nbytes // self.options.read_chunk))
    self._count("expert_reads", 1)

  def _prompt_read(self, layer: int) -> None:
    """Starts reading every expert of `layer` into its half of the slots (once a pass)."""
    if layer in self._prompt_reads:
      return
    self._prompt_reads.add(layer)
    n = self.config.num_experts
    h = layer % len(self._cache.stacks)
    for e in range(n):
      self._read(self._cache, h * n + e, layer, e)

  def _wait(self, pool: _Pool, slots, stack: bool = False) -> None:
    """Waits for the reads of `slots`; with `stack`, copies them into the prefill's stack
    where the device has its own memory (decode copies each slot's kernels when first
    used, `_routed`)."""
    t0 = time.perf_counter()
    for slot in slots:
      rec = pool.device_records.pop(slot, None)
      if rec is not None and stack:  # filled from the host tier: already on the device
        h, j = divmod(slot, self.config.num_experts)
        pool.stacks[h] = self._set_slot(pool.stacks[h], j, rec)
      future = pool.inflight.pop(slot, None)
      if future is None:
        continue
      future.result()
      if slot in pool.chains:  # a right guess: the whole record landed
        self._count_read(pool.chains.pop(slot).submitted)
      if stack and not self.aliases:
        rec = view_as(pool.host, slot * self.record, (self._elems,), self._stack_dtype)
        h, j = divmod(slot, self.config.num_experts)
        pool.stacks[h] = self._set_slot(pool.stacks[h], j, jax.device_put(rec, self._device))
        self._count("h2d_bytes", self.record)
    self._count("wait_s", time.perf_counter() - t0)

  def _prefetch(self, layer: int, experts, protect: set = frozenset()) -> None:
    """Starts reads of the guessed `experts` of `layer` that are not cached.

    A guess never displaces an expert this layer's previous pass used (a guess
    is right less often than a token reuses its predecessor's experts), nor one
    in `protect` (the experts of the layer computing now).
    """
    keep = {(layer, int(e)) for e in experts}
    self._guess[layer], self._guessed[layer] = keep, set()
    if len(keep) + len(protect) > len(self._cache.key):
      return  # more guesses than spare slots (a large batch): no look-ahead for this layer
    for key in sorted(keep):
      if key not in self._cache.where:
        slot = self._victim(self._cache, layer, keep,
                            self._previous.get(layer, set()) | protect)
        if slot is None:
          break
        self._read(self._cache, slot, *key, guess=True)
        self._guessed[layer].add(key)

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
    self._phase = phase
    self._prompt_reads = set()  # layers of this pass whose prompt reads have started
    if self.options.cache_policy == "none":
      self._cache.clear()

  def end(self) -> None:
    """Counts the dropped guesses' bytes once their last piece has landed."""
    if self._lanes is not None:
      return self._lanes.end()
    pool = getattr(self, "_cache", None)
    for slot in list(pool.chains if pool is not None else ()):  # none expected: guesses
      chain = pool.chains.pop(slot)  # are settled by the layer's own run_ffn
      chain.cancel()
      self._dropped.append(chain)
      if pool.key[slot] is not None:
        pool.where.pop(pool.key[slot], None)
        pool.key[slot] = None
    for chain in self._dropped:
      chain.future.result()
      self._count_read(chain.submitted)
      self._count("lookahead_wasted_bytes", chain.submitted)
    self._dropped = []

  def run_attention(self, layer, params, x, cache, cache_index, positions, kv_mask, attention):
    if self._lanes is not None:
      return self._lanes.run_attention(layer, params, x, cache, cache_index, positions,
                                       kv_mask, attention)
    c = self.config
    gather = modules.gathers_experts(c, (x.shape[0], x.shape[1], c.experts_per_token))
    if not gather:
      # Many tokens: every expert of the layer, read while the attention computes
      # (unless the previous layer's FFN started them already).
      self._prompt_read(layer)
    elif self.options.lookahead and layer == 0:
      # The other layers are guessed from the previous layer's FFN input (run_ffn).
      guess = np.asarray(self._compiled.route(self._fixed[f"layers/{layer}/mlp"], x))
      self._prefetch(layer, guess[..., :self.options.lookahead].reshape(-1))
    return attention(params, x, cache, cache_index, positions, kv_mask)

  def run_ffn(self, layer, params, x, ffn):
    if self._lanes is not None:
      return self._lanes.run_ffn(layer, x)
    c = self.config
    self._step += 1
    gather = modules.gathers_experts(c, (x.shape[0], x.shape[1], c.experts_per_token))
    if not gather:
      pool, n = self._cache, c.num_experts
      h = layer % len(pool.stacks)
      self._wait(pool, range(h * n, (h + 1) * n), stack=True)
      out = self._compiled.dense(params, x, pool.stacks[h], self._layout)
      for slot in range(h * n, (h + 1) * n):
        pool.fence[slot] = out
        pool.last_use[slot] = self._step
      self._count("streamed_layers", 1)
      if len(pool.stacks) == 2 and layer + 1 < c.num_layers:
        self._prompt_read(layer + 1)  # into the other half, while this FFN computes
      return out
    pool = self._cache
    ahead = self.options.lookahead and layer + 1 < c.num_layers
    if ahead:  # this layer's experts, and a guess of the next layer's from the same input
      idx, guess_next = map(np.asarray, self._compiled.route_ahead(
          params, self._fixed[f"layers/{layer + 1}/mlp"], x))
    else:
      idx = np.asarray(self._compiled.route(params, x))  # [B, T, k]
    needed = [(layer, int(e)) for e in np.unique(idx)]
    keep = set(needed)
    self._count("expert_lookups", idx.size)
    guess, guessed = self._guess.pop(layer, set()), self._guessed.pop(layer, set())
    if guess:
      self._count("lookahead_guesses", len(guess))
      self._count("lookahead_right", len(keep & guess))
      self._count("lookahead_useful_reads", len(keep & guessed))
      for key in guessed - keep:
        slot = pool.where.get(key)
        if slot is None or slot not in pool.chains:
          continue
        chain = pool.chains.pop(slot)
        if chain.future.done() and chain.submitted == self.store.group_nbytes(
            f"layers/{key[0]}/experts/{key[1]}"):
          pool.inflight.pop(slot).result()  # landed whole: a cache entry like any other
          self._count_read(chain.submitted)
          self._count("lookahead_wasted_bytes", chain.submitted)
          continue
        chain.cancel()  # stop reading; the slot holds nothing usable
        self._dropped.append(chain)
        del pool.where[key]
        pool.key[slot] = None
    self._previous[layer] = keep
    for key in needed:
      self._uses[key] = self._uses.get(key, 0) + 1
    # Hits: experts in the cache before this pass's look-ahead touched the layer.
    cached_before = [key for key in needed if key in pool.where and key not in guessed]
    lookups = lambda keys: int(sum(np.sum(idx == e) for _, e in keys))
    self._count("expert_hits", lookups(cached_before))
    # Misses whose record is in the host tier cost no disk bytes.
    hosted = [key for key in needed if key not in cached_before and self._host is not None
              and key in self._host.index]
    self._count("host_hits", lookups(hosted))
    self._count("ideal_bytes", (len(needed) - len(cached_before) - len(hosted)) * self.record)
    # cold_compute="host": a host-tier expert not in a device slot is computed where it lies.
    on_host = {key for key in hosted if key not in pool.where} if self._host_compiled else set()
    self._count("host_computed", lookups(on_host))
    for key in needed:
      if key not in pool.where and key not in on_host:
        self._read(pool, self._victim(pool, layer, keep), *key)
    if ahead:
      # Queued behind this layer's reads (the reader serves requests in order), so
      # they run while this layer and the next attention compute.
      self._prefetch(layer + 1, guess_next[..., :self.options.lookahead].reshape(-1),
                     protect=keep)
    slot_of = {key[1]: pool.where[key] for key in needed if key not in on_host}
    for slot in slot_of.values():
      pool.last_use[slot] = self._step
    slots = list(slot_of.values())
    self._wait(pool, slots)
    if on_host:
      out = self._routed_on_host(params, x, pool, idx, slot_of, layer)
    else:
      out = self._routed(params, x, pool, idx, slot_of)
    for slot in slots:
      pool.fence[slot] = out
    return out

  def ffn_partial(self, layer, params, x):
    """A lane's part of layer `layer`'s FFN: its shard's slice of the experts, no residual."""
    return self.run_ffn(layer, params, x, None)

  def ffn_finish(self, layer, params, x, summed):
    """The residual plus the experts' output summed over the mesh."""
    return _add(x, summed)

  def _routed(self, params, x, pool: _Pool, idx: np.ndarray, slot_of: dict[int, int]):
    """Runs the routed experts `idx` [B, T, k]; `slot_of` maps each to its slot in `pool`."""
    kernels = []
    for e in idx.reshape(-1):
      slot = slot_of[int(e)]
      if pool.kernels[slot] is None:  # a device with its own memory: copy the slot once
        pool.kernels[slot] = pool.views(slot)
        self._count("h2d_bytes", self.record)
      kernels.append(pool.kernels[slot])
    return self._compiled.routed(params, x, kernels)

  def _routed_on_host(self, params, x, pool: _Pool, idx: np.ndarray,
                      slot_of: dict[int, int], layer: int):
    """As `_routed`, with the experts missing from `slot_of` computed by the host CPU on
    their host-tier records; only their outputs ([1, D] per token and choice) move."""
    cpu = jax.devices("cpu")[0]
    flat = idx.reshape(-1)
    b, t, k = idx.shape
    rows = tuple((n // (t * k), (n // k) % t) for n, e in enumerate(flat)
                 if int(e) not in slot_of)
    host_kernels = [self._host.kernels[self._host.index[(layer, int(e))]] for e in flat
                    if int(e) not in slot_of]
    h = jax.device_put(self._compiled.normed(params, x), cpu)
    given = jax.device_put(self._host_compiled(h, rows, host_kernels), self._device)
    kernels = []
    for e in flat:
      slot = slot_of.get(int(e))
      if slot is not None and pool.kernels[slot] is None:
        pool.kernels[slot] = pool.views(slot)
        self._count("h2d_bytes", self.record)
      kernels.append(None if slot is None else pool.kernels[slot])
    return self._compiled.routed_mixed(params, x, kernels, given)

  def stats(self):
    if self._lanes is not None:
      return self._lanes.stats()
    out = self.counters.copy()
    if self._reader is not None:
      out.reads = self._reader.record()
    c = self.config
    for phase in ("prefill", "decode"):
      p = out.phase(phase)
      lookups = p.get("expert_lookups")
      if lookups:
        out.details[f"{phase}_hit_rate"] = p.get("expert_hits") / lookups
        if self._host is not None:
          out.details[f"{phase}_host_hit_rate"] = p.get("host_hits") / lookups
      if p.get("lookahead_guesses"):
        out.details[f"{phase}_lookahead_accuracy"] = (p.get("lookahead_right")
                                                      / p.get("lookahead_guesses"))
    d = out.decode
    if d.tokens:
      out.details["decode_expert_reads_per_token"] = d.get("expert_reads") / d.tokens
      out.details["decode_disk_bytes_per_token"] = d.disk_bytes / d.tokens
      out.details["decode_ideal_bytes_per_token"] = d.get("ideal_bytes") / d.tokens
    out.details.update(host_records=len(self._host.index) if self._host is not None else 0,
                       host_load_bytes=self.host_load_bytes if self._host is not None else 0,
                       cold_compute=self.options.cold_compute,
                       cache_slots=self.slots, cache_policy=self.options.cache_policy,
                       lookahead=self.options.lookahead, record_bytes=self.record,
                       experts=c.num_experts, layers=c.num_layers)
    return out

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    if self._lanes is not None:
      self._lanes.close()
    for pool in (getattr(self, "_cache", None),):
      for future in (pool.inflight.values() if pool is not None else ()):
        try:
          future.result()
        except Exception:  # noqa: BLE001 - closing: the error was or will be reported
          pass
    if getattr(self, "_copier", None) is not None:
      self._copier.shutdown()
    if self._reader is not None:
      self._reader.close()
    if getattr(self, "store", None) is not None:
      self.store.close()  # its shared lock


_add = jax.jit(lambda a, b: a + b)


@functools.lru_cache(maxsize=16)
def _functions(config, residual: bool = True):
  """The jitted pieces: routing (also the look-ahead's guess) and the two ways of
  computing the FFN (with the residual, or without: a shard's part on a mesh)."""

  def split(pool, layout, count):
    """The stacked kernels [count, ...] (or a format's stacked leaves) of a stack of records."""

    def leaf(offset, shape, dtype):
      dtype, size = np.dtype(dtype), int(np.prod(shape))
      if dtype == pool.dtype:  # float32 experts in a float32 stack: elements
        start = offset // dtype.itemsize
        return pool[:, start:start + size].reshape(count, *shape)
      raw = pool[:, offset:offset + size * dtype.itemsize]  # a byte stack: bit-cast
      if dtype.itemsize > 1:
        raw = raw.reshape(count, size, dtype.itemsize)
      return jax.lax.bitcast_convert_type(raw, dtype).reshape(count, *shape)

    return tuple(leaf(*k) if isinstance(k[0], int) else {name: leaf(*spec) for name, spec in k}
                 for k in layout)

  def norm(w, x):
    return layers.rms_norm(x, w["norm"], config.norm_eps)  # Mixtral: pre-norm RMSNorm

  @jax.jit
  def route(w, x):
    return modules.route(config, w["router"], norm(w, x))[1]

  @jax.jit
  def route_ahead(w, w_next, x):
    """This layer's experts, and the next layer's router's guess from the same input."""
    return route(w, x), route(w_next, x)

  @jax.jit
  def routed(w, x, kernels):
    """The routed experts only: `kernels` lists (gate, up, down) per token and choice
    (the router's [B, T, k] order), the slots' own arrays, so nothing is gathered
    (modules.expert_mixture: 4 ms per mixtral-1b layer here, against 60-99 ms when
    the kernels were gathered from a stack of slots; notes of issue 14)."""
    h = norm(w, x)
    weights, _ = modules.route(config, w["router"], h)
    out = modules.expert_mixture(config, h, weights, kernels)
    return x + out if residual else out

  @functools.partial(jax.jit, static_argnums=(3,))
  def dense(w, x, pool, layout):
    gate, up, down = split(pool, layout, pool.shape[0])
    w = dict(w, gate=gate, up=up, down=down)
    if residual:
      return modules.ffn_half(config, w, x)
    return modules.moe_ffn(config, w, modules._norm(config, w)(x))

  @functools.partial(jax.jit, static_argnums=(1,))
  def unpack(record, layout):
    """One record [elements] on the device -> its (gate, up, down) (a host-tier fill)."""
    return jax.tree.map(lambda a: a[0], split(record[None], layout, 1))

  @jax.jit
  def normed(w, x):
    return norm(w, x)

  @jax.jit
  def routed_mixed(w, x, kernels, given):
    """As `routed`, where a None kernel's output is the next of `given` (computed
    elsewhere, cold_compute="host"): the same products and combination."""
    h = norm(w, x)
    weights, _ = modules.route(config, w["router"], h)
    b, t, k = weights.shape
    given = iter(given)
    outs = [next(given) if kernel is None else
            modules.expert_output(config, h[n // (t * k), (n // k) % t][None], *kernel)
            for n, kernel in enumerate(kernels)]
    out = modules.combine_expert_outputs(outs, weights)
    return x + out if residual else out

  return _Functions(route=route, route_ahead=route_ahead, routed=routed, dense=dense,
                    unpack=unpack, normed=normed, routed_mixed=routed_mixed)


@functools.lru_cache(maxsize=16)
def _host_functions(config):
  """cold_compute="host": the experts a decode step computes on the host CPU, jitted for
  the CPU device (their inputs live there), each `modules.expert_output` on its
  token's normalised row."""

  @functools.partial(jax.jit, static_argnums=(1,))
  def outputs(h, rows, kernels):
    return [modules.expert_output(config, h[r, s][None], *kernel)
            for (r, s), kernel in zip(rows, kernels)]

  return outputs


@dataclasses.dataclass(frozen=True)
class _Functions:
  route: Any
  route_ahead: Any
  routed: Any
  dense: Any
  unpack: Any
  normed: Any
  routed_mixed: Any
