"""Strategies that run on a mesh as one instance per local shard ("lanes").

A strategy whose FFN is its own machinery (a neuron store and cache, an expert
cache) runs on a mesh (docs/distributed.md) as a *lane* per shard this process
holds: an instance of itself on the shard's Model (hetflow.models.sharding:
H/N heads, F/N FFN columns), on the shard's device, with its own store
(`<store_dir>/shard-<r>-of-<N>`, or the cache's directory keyed by the shard's
fingerprint), cache and buffers, planned as the engine planned one shard.
`Lanes` is what the engine's strategy delegates its hooks to:

  globals, attention  the lanes' arrays assembled into global ones, and the
                      engine's mesh attention (`ShardedFunctions`) on them; a
                      lane's own `run_attention` still runs first on its piece of
                      x (for what it starts there: reads, guesses) with no attention;
  FFN                 every lane's `ffn_partial` (its shard's part of the half
                      before bias and residual) from the whole residual stream,
                      one all-reduce over the mesh (`MeshShards.all_reduce`, the
                      psum after `down` of the dense path), then each lane's
                      `ffn_finish` (bias and residual).

A lane strategy provides `ffn_partial(layer, params, x)` and
`ffn_finish(layer, params, x, summed)`, and reads `_mesh_lane` (a LaneSetup: the
device to place on, and what the caller sliced for it) in `materialize`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from hetflow.memory.budget import MemoryLedger
from hetflow.strategy import StrategyStats


@dataclasses.dataclass(frozen=True)
class LaneSetup:
  """What a lane is given besides its shard's Model.

  Attributes:
    device: the shard's device: the lane's arrays and computations live there.
    rank: the shard's index on the mesh's model axis.
    size: shards in all.
    extra: strategy-specific parts prepared from the full model (e.g.
      neuron_cluster's activation statistics sliced to the shard's neurons).
  """

  device: Any
  rank: int
  size: int
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _no_attention(*args):
  del args


class Lanes:
  """One instance of a strategy per local shard, and the all-reduce between them.

  Attributes:
    lanes: the per-shard strategies, in `mesh.local` order.
  """

  def __init__(self, strategy: Any, placement: Any, ledger: MemoryLedger,
               extra: Callable[[Any], Mapping[str, Any]] | None = None,
               options: Callable[[Any, Any], Any] | None = None):
    """Materialises a lane per local shard.

    Args:
      strategy: the engine's strategy (its `mesh`, `options`, `timeline`).
      placement: the plan of one shard (all shards have the same shapes).
      ledger: the engine's ledger: it counts one shard's bytes (budgets are
        per device); the other local lanes count in ledgers of their own.
      extra: LocalShard -> the lane's LaneSetup.extra.
      options: (options, LocalShard) -> the lane's options; default: the
        strategy's, with `store_dir` (if set) made the shard's subdirectory.
    """
    mesh = strategy.mesh
    self._mesh = mesh
    self.lanes = []
    for j, s in enumerate(mesh.local):
      o = strategy.options
      if options is not None:
        o = options(o, s)
      elif getattr(o, "store_dir", None) is not None:
        o = dataclasses.replace(o, store_dir=os.path.join(o.store_dir,
                                                          f"shard-{s.rank}-of-{mesh.size}"))
      lane = type(strategy)(o)
      lane.timeline = strategy.timeline
      lane.ledger = ledger if j == 0 else MemoryLedger(ledger.budget)
      lane._mesh_lane = LaneSetup(s.device, s.rank, mesh.size, extra(s) if extra else {})
      try:
        lane.materialize(placement, s.model, lane.ledger)
      except BaseException:
        lane.close()
        self.close()
        raise
      self.lanes.append(lane)
    first = self.lanes[0]
    self._globals = {g: mesh.assemble(g, [ln.globals()[g] for ln in self.lanes])
                     for g in first.globals()}
    layers = mesh.model.config.num_layers
    self._attention = [mesh.assemble(f"layers/{i}/attn", [ln.fetch(i, "attn") for ln in self.lanes])
                       for i in range(layers)]

  def globals(self) -> dict[str, Any]:
    return self._globals

  def fetch(self, layer: int, half: str) -> Any:
    """Attention: the global arrays; FFN: the group's name (each lane fetches its own)."""
    return self._attention[layer] if half == "attn" else f"layers/{layer}/{half}"

  def begin(self, phase: str, num_tokens: int) -> None:
    for lane in self.lanes:
      # The engine counts passes and tokens on the strategy it holds; each lane's
      # per-token figures need its own.
      counters = lane.counters.phase(phase)
      counters.passes += 1
      counters.tokens += num_tokens
      lane.begin(phase, num_tokens)

  def end(self) -> None:
    for lane in self.lanes:
      lane.end()

  def run_attention(self, layer, params, x, cache, cache_index, positions, kv_mask, attention):
    for lane, xj in zip(self.lanes, self._mesh.local_parts(x)):
      lane.run_attention(layer, lane.fetch(layer, "attn"), xj, None, cache_index, None, None,
                         _no_attention)
    return attention(params, x, cache, cache_index, positions, kv_mask)

  def run_ffn(self, layer: int, x: Any) -> Any:
    """Every lane's part of the FFN, summed over the mesh, then bias and residual."""
    mesh = self._mesh
    xs = mesh.local_parts(x)
    params = [lane.fetch(layer, "mlp") for lane in self.lanes]
    partials = [lane.ffn_partial(layer, p, xj) for lane, p, xj in zip(self.lanes, params, xs)]
    summed = mesh.all_reduce(partials)
    return mesh.replicated([lane.ffn_finish(layer, p, xj, sj)
                            for lane, p, xj, sj in zip(self.lanes, params, xs, summed)])

  def stats(self) -> StrategyStats:
    """Counters summed over this process's lanes (bytes read, requests, ...); passes,
    tokens and the details (per-token figures, cache state) are the first lane's."""
    per_lane = [lane.stats() for lane in self.lanes]
    out = per_lane[0].copy()
    for other in per_lane[1:]:
      for phase in ("prefill", "decode"):
        mine, theirs = out.phase(phase), other.phase(phase)
        for key in ("disk_bytes", "disk_requests", "h2d_bytes", "wait_s"):
          mine.add(key, theirs.get(key))
        for key, value in theirs.other.items():
          mine.add(key, value)
    out.details["mesh_lanes"] = [s.rank for s in self._mesh.local]
    return out

  def close(self) -> None:
    for lane in self.lanes:
      lane.close()
