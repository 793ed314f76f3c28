"""The segmented neuron cache (PowerInfer-2): a hot region and a cold region.

One pool of neuron-record slots shared by every layer, in two regions:

* hot: clusters (runs of `cluster_size` adjacent records in hotness order, i.e.
  neurons that fire often) chosen by summed firing frequency across all
  layers, loaded at start with one sequential read per cluster. Static by
  default; with the strategy's `hot_policy="lru"`, `swap_candidate` proposes
  replacing the least recently used hot cluster by this layer's most active
  uncached cluster when that one's recent activity (decayed active count)
  is clearly higher (cluster-level LRU; the swap costs one sequential read of
  the cluster).
* cold: single neurons, admitted on a miss, evicted least recently used,
  each layer in its own partition of `cold_slots // num_layers` slots.
  With `admission="frequency"` (the default) the region is scan-resistant:
  a step's misses are admitted only if they were active recently (a decayed
  activity count, LLM in a Flash's "window", at least `admit_min`), at most
  `cold_slots // num_layers` per layer and step (so one token's misses can
  never flush the region), hottest first, and only by evicting an LRU entry
  whose own recent activity is lower (TinyLFU's rule). A token's misses
  (~17.5k on llama-1b) are far more than the region holds (~4.8k); admitting
  them all evicted everything before it was reused (0 cold hits).

Recency is a stamp per slot (a clock that every use advances), not a linked list: a
step's ~500 hits per layer are stamped in one numpy assignment, and an admission finds
its victims by sorting the partition's stamps, in the order a list would give them.

Each layer's cached records are two contiguous slot ranges (`hot_range`,
`cold_range`): its hot clusters sit next to each other (the strategy places
them in layer order and a swap replaces a cluster of the same layer) and its
cold partition is its own, so the strategy computes a layer's cached part as
two dense blocks instead of gathering scattered slots (`cold_valid` masks
the partition's empty slots).

The fixed region (attention, norms, embeddings, KV cache) is not here: the
strategy places it. Evicted records are dropped, never written back (weights
are read-only). Only slot bookkeeping lives here; the bytes are the caller's
`pool` buffer, sized by the ledger.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_EMPTY = np.iinfo(np.int64).max  # the recency of an empty cold slot: never a victim


@dataclasses.dataclass
class CacheCounters:
  """Hits and misses since the last reset.

  Attributes:
    hot_hits, cold_hits, misses: active neurons found in each region / not.
    admitted, evicted: cold-region insertions and evictions.
    rejected: misses the admission policy kept out of the cold region.
    cluster_swaps: hot clusters replaced (cluster LRU).
  """

  hot_hits: int = 0
  cold_hits: int = 0
  misses: int = 0
  admitted: int = 0
  evicted: int = 0
  rejected: int = 0
  cluster_swaps: int = 0


class SegmentedCache:
  """Slot bookkeeping of the hot (cluster) and cold (neuron-LRU) regions.

  Args:
    num_layers, num_neurons: L, F.
    num_slots: records the pool holds.
    hot_slots: slots [0, hot_slots) form the hot region (rounded down to
      whole clusters); the rest are the cold region.
    cluster_size: neurons per hot cluster.
    admission: "all" admits every miss (plain LRU); "frequency" filters them
      (see the module docstring).
    decay: per-token decay of the activity counts (window ~ 1 / (1 - decay)
      tokens).
    admit_min: activity count a miss needs to be admitted (1 = active now;
      1.5 with decay 0.9 = also active in one of the last ~6 tokens).
  """

  def __init__(self, num_layers: int, num_neurons: int, num_slots: int, hot_slots: int,
               cluster_size: int = 32, admission: str = "frequency", decay: float = 0.9,
               admit_min: float = 1.5):
    if admission not in ("all", "frequency"):
      raise ValueError(f"admission must be 'all' or 'frequency', got {admission!r}.")
    self.admission, self.decay, self.admit_min = admission, decay, admit_min
    self.num_layers, self.num_neurons = num_layers, num_neurons
    self.cluster_size = cluster_size
    self.num_clusters_hot = hot_slots // cluster_size
    self.hot_slots = self.num_clusters_hot * cluster_size
    self.num_slots = num_slots
    self.slot_of = np.full((num_layers, num_neurons), -1, np.int32)
    # hot: cluster slot index -> (layer, cluster) held there.
    self.hot_owner: list[tuple[int, int] | None] = [None] * self.num_clusters_hot
    # cold: per layer, its partition's free slots (a stack) and what each slot holds.
    self.cold_slots = num_slots - self.hot_slots
    self.partition = self.cold_slots // max(num_layers, 1)
    self.cold_free = [list(range(self.cold_range(i)[0] + self.partition - 1,
                                 self.cold_range(i)[0] - 1, -1)) for i in range(num_layers)]
    self._cold_pos = np.full((num_layers, self.partition), -1, np.int64)  # -1: empty
    # Recency: the clock's value at each hot cluster slot's / cold slot's last use
    # (larger is more recent; every use takes a new value, so no two are equal). An
    # empty cold slot reads as used last of all, so it is never a victim.
    self._clock = 0
    self._hot_used = np.zeros(self.num_clusters_hot, np.int64)
    self._cold_used = np.full((num_layers, self.partition), _EMPTY, np.int64)
    # Decayed count of steps each neuron was active in: the admission filter.
    self.activity = np.zeros((num_layers, num_neurons), np.float32)
    self.cluster_activity = np.zeros((num_layers, num_neurons // max(cluster_size, 1)),
                                     np.float32)
    self.hot_index: dict[tuple[int, int], int] = {}  # (layer, cluster) -> hot cluster slot
    self._hot_ranges: dict[int, tuple[int, int]] = {}  # hot_range's answers since a change
    self.counters = CacheCounters()

  # -- where a layer's records are ------------------------------------------

  def hot_range(self, layer: int) -> tuple[int, int]:
    """(first slot, slots) of `layer`'s hot clusters (contiguous; (0, 0) if none)."""
    got = self._hot_ranges.get(layer)
    if got is None:  # a walk over every layer's clusters: once per change, not per step
      idx = sorted(i for (lay, _), i in self.hot_index.items() if lay == layer)
      if idx and idx[-1] - idx[0] + 1 != len(idx):
        raise AssertionError(f"layer {layer}'s hot clusters are not contiguous: {idx}")
      got = (idx[0] * self.cluster_size, len(idx) * self.cluster_size) if idx else (0, 0)
      self._hot_ranges[layer] = got
    return got

  def cold_range(self, layer: int) -> tuple[int, int]:
    """(first slot, slots) of `layer`'s cold partition."""
    return self.hot_slots + layer * self.partition, self.partition

  def cold_valid(self, layer: int) -> np.ndarray:
    """[partition] bool: which of `layer`'s cold slots hold a record."""
    return self._cold_pos[layer] >= 0

  # -- hot region -----------------------------------------------------------

  def choose_hot(self, frequency: np.ndarray) -> list[tuple[int, int]]:
    """The (layer, cluster) pairs to pin, by summed frequency, for freq [L, F] in hot order."""
    c = self.cluster_size
    n = self.num_neurons // c
    if n == 0 or self.num_clusters_hot == 0:
      return []
    score = frequency[:, :n * c].reshape(self.num_layers, n, c).sum(-1)  # [L, n]
    best = np.argsort(-score, axis=None, kind="stable")[:self.num_clusters_hot]
    return [(int(i // n), int(i % n)) for i in best]

  def place_hot(self, index: int, layer: int, cluster: int) -> tuple[int, np.ndarray]:
    """Puts (layer, cluster) in hot cluster slot `index`; returns (first slot, positions).

    The caller fills slots [first, first + cluster_size) with those records.
    """
    c = self.cluster_size
    old = self.hot_owner[index]
    if old is not None:
      self.slot_of[old[0], old[1] * c:(old[1] + 1) * c] = -1
      del self.hot_index[old]
      self._hot_ranges.pop(old[0], None)
    positions = np.arange(cluster * c, (cluster + 1) * c)
    # A cluster entering the hot region may have members in the cold region.
    cold_first = self.cold_range(layer)[0]
    for p in positions:
      slot = int(self.slot_of[layer, p])
      if slot >= cold_first:
        self.cold_free[layer].append(slot)
        self._cold_used[layer, slot - cold_first] = _EMPTY
        self._cold_pos[layer, slot - cold_first] = -1
    first = index * c
    self.slot_of[layer, positions] = np.arange(first, first + c)
    self.hot_owner[index] = (layer, cluster)
    self.hot_index[(layer, cluster)] = index
    self._hot_ranges.pop(layer, None)
    self._hot_used[index] = self._tick(1)[0]
    return first, positions

  def swap_candidate(self, layer: int, margin: float = 1.5) -> tuple[int, int] | None:
    """(hot cluster slot, cluster of `layer`) to swap in, or None.

    The candidate is `layer`'s most active cluster outside the hot region; it
    replaces the least recently used hot cluster if its activity exceeds
    `margin` times that cluster's (hysteresis: a swap costs a read); the
    victim is a cluster of the same layer (so each layer's hot clusters stay
    contiguous). Call it before the step's `lookup` (or `split`), when no
    computation reads the victim's slots.
    """
    if not self.num_clusters_hot or not self.cluster_activity.shape[1]:
      return None
    act = self.cluster_activity[layer].copy()
    for (lay, cl) in self.hot_index:
      if lay == layer:
        act[cl] = -1.0
    cand = int(np.argmax(act))
    victim = self.hot_victim(set(), layer)
    if act[cand] <= 0 or victim is None:
      return None
    vl, vc = self.hot_owner[victim]
    if act[cand] <= margin * self.cluster_activity[vl, vc]:
      return None
    return victim, cand

  def hot_victim(self, protect: set[int], layer: int | None = None) -> int | None:
    """Least recently used hot cluster slot not in `protect` (of `layer`, if given)."""
    held = [i for i, owner in enumerate(self.hot_owner)
            if owner is not None and i not in protect and (layer is None or owner[0] == layer)]
    return min(held, key=lambda i: self._hot_used[i]) if held else None

  # -- lookups --------------------------------------------------------------

  def lookup(self, layer: int, positions: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits active `positions` (`split`) and records their use at this step (`use`)."""
    found = self.split(layer, positions)
    self.use(layer, positions, found[1])
    return found

  def split(self, layer: int, positions: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cached positions, their slots, missing positions) of active `positions`,
    recording nothing: a pipelined caller starts the misses' reads first and calls
    `use` while they land, before its next `admit` or `swap_candidate`."""
    slots = self.slot_of[layer, positions]
    hit = slots >= 0
    return positions[hit], slots[hit], positions[~hit]

  def use(self, layer: int, positions: np.ndarray, cached: np.ndarray) -> None:
    """Counts `positions` as active in this step (the admission filter's history)
    and marks the slots `cached` of its hits used, in the order given (the last is
    the most recent)."""
    self.activity[layer] *= self.decay
    self.activity[layer, positions] += 1.0
    n = self.cluster_activity.shape[1]
    self.cluster_activity[layer] *= self.decay
    if n:
      self.cluster_activity[layer] += np.bincount(
          positions // self.cluster_size, minlength=n + 1)[:n]  # the tail is no cluster
    hot = cached < self.hot_slots
    hot_hits = int(hot.sum())
    self.counters.hot_hits += hot_hits
    self.counters.cold_hits += len(cached) - hot_hits
    self.counters.misses += len(positions) - len(cached)
    clusters = np.unique(cached[hot] // max(self.cluster_size, 1))
    self._hot_used[clusters] = self._tick(len(clusters))
    cold = cached[~hot] - self.cold_range(layer)[0]
    self._cold_used[layer][cold] = self._tick(len(cold))

  def admit(self, layer: int, positions: np.ndarray) -> np.ndarray:
    """Gives cold slots to `positions` (just read); -1 where none is given.

    Victims come from the LRU end of the layer's partition; neurons touched in
    this step are at the MRU end. The caller must not overwrite a victim's slot
    while a computation still reads it.
    """
    positions = np.asarray(positions)
    out = np.full(len(positions), -1, np.int32)
    slot_of, activity = self.slot_of[layer], self.activity[layer]
    order = np.flatnonzero(slot_of[positions] < 0)  # cached ones take no slot
    if self.admission == "frequency":
      score = activity[positions[order]]
      hot = score >= self.admit_min
      order, score = order[hot], score[hot]
      order = order[np.argsort(-score, kind="stable")]  # hottest first
    if len(order) > 1:  # a position named twice is admitted once, where it comes first
      named = np.sort(positions[order])
      if (named[1:] == named[:-1]).any():
        order = order[np.sort(np.unique(positions[order], return_index=True)[1])]
    free = self.cold_free[layer]
    used, held_pos = self._cold_used[layer], self._cold_pos[layer]
    if (len(order) and not free and len(used) and self.admission == "frequency"
        and activity[held_pos[np.argmin(used)]] >= activity[positions[order[0]]]):
      order = order[:0]  # a full partition whose LRU entry beats the hottest candidate
    order = order[:self.partition]  # each slot is free or held
    if not len(order):
      self.counters.rejected += len(positions)
      return out
    # Free slots first (popped from the stack's end), then the least recently used.
    first = self.cold_range(layer)[0]
    n_free = min(len(free), len(order))
    slots = np.array(free[len(free) - n_free:][::-1], np.int64) - first  # in the partition
    del free[len(free) - n_free:]
    evict = order[n_free:]
    if len(evict):
      k = len(evict)
      lru = np.argpartition(used, k - 1)[:k] if k < len(used) else np.arange(k)
      lru = lru[np.argsort(used[lru])]
      victims = held_pos[lru]
      if self.admission == "frequency":  # only a hotter candidate evicts (candidates come
        # hottest first, victims coldest first: the first loser ends the admission)
        loses = activity[victims] >= activity[positions[evict]]
        if loses.any():
          keep = int(np.argmax(loses))
          lru, victims = lru[:keep], victims[:keep]
      slot_of[victims] = -1
      self.counters.evicted += len(victims)
      slots = np.concatenate([slots, lru])
    admitted = positions[order[:len(slots)]]
    held_pos[slots] = admitted
    used[slots] = self._tick(len(slots))
    slots += first
    slot_of[admitted] = slots
    out[order[:len(slots)]] = slots
    self.counters.admitted += len(admitted)
    self.counters.rejected += len(positions) - len(admitted)
    return out

  def begin_prompt(self, layer: int, tokens: int) -> None:
    """A prompt of `tokens` tokens counts as that many steps of `layer`'s admission
    history: its activity decays by decay**tokens (before `admit_prompt` adds the
    prompt's own). The hot clusters' activity (cluster LRU) counts decode steps only."""
    self.activity[layer] *= self.decay ** tokens

  def admit_prompt(self, layer: int, positions: np.ndarray, recent: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """After a dense prefill read `positions` of `layer` (once `begin_prompt`): adds
    `recent`, their firing counts over the prompt (the token i from its end weighted
    decay**i, as i decode steps would count it), to their activity, then admits the
    uncached ones the prompt used by the usual rule, at the price of a copy.

    Returns:
      (the uncached positions offered, their slots: -1 where none was given).
    """
    self.activity[layer, positions] += recent
    offered = positions[(recent > 0) & (self.slot_of[layer, positions] < 0)]
    return offered, self.admit(layer, offered)

  def _tick(self, n: int) -> np.ndarray:
    """n new clock values, in increasing order (uses stamped with them in that order)."""
    self._clock += n
    return np.arange(self._clock - n, self._clock, dtype=np.int64)

  @property
  def cached(self) -> int:
    return int((self.slot_of >= 0).sum())
