"""`neuron_cluster` on a mesh: each shard owns the neurons of its FFN columns.

Shard r of N (hetflow.models.sharding) holds FFN columns r·F/N .. (r+1)·F/N of
`gate`/`up` and the same rows of `down`: exactly the neurons r·F/N .. (r+1)·F/N.
So each local shard runs a NeuronCluster of its own (a *lane*) on its shard's
Model, on its shard's device: its own store of those neurons' records
(`<store_dir>/shard-<r>-of-<N>`, or the cache's directory keyed by the shard's
fingerprint), its own cache and staging, and its own slice of the predictor
(the oracle of its gate/up columns, or the trained predictor's output columns
of its neurons). The hot order comes from the full model's activation
statistics, sliced to the shard's neurons, so shards rank their neurons as one
model would.

A FFN half is then (strategies/mesh_lanes.py): every lane computes its neurons'
partial output from the whole residual stream, one all-reduce sums the partials
over the mesh (the psum after `down` of the dense path), and each lane adds
down's bias and the residual. Attention, the embedding and the head run as the
dense mesh path (`ShardedFunctions`) on the lanes' global arrays.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from hetflow.memory.budget import MemoryLedger
from hetflow.sparsity.predictor import LowRankPredictor
from hetflow.sparsity.stats import ActivationStats, calibration_ids, record_activations
from strategies import mesh_lanes


def _slice_stats(stats: ActivationStats, lo: int, hi: int) -> ActivationStats:
  co = stats.coactivation
  return dataclasses.replace(stats, counts=stats.counts[:, lo:hi],
                             coactivation=None if co is None else co[:, lo:hi, lo:hi])


def _slice_predictor(p: LowRankPredictor, lo: int, hi: int) -> LowRankPredictor:
  """The predictor of neurons lo..hi: the output columns of its last map."""
  params = []
  for layer in p.params:
    layer = dict(layer)
    for key in ("exact", "v", "fc2"):
      if key in layer:
        layer[key] = layer[key][:, lo:hi]
    if "fc2" in layer:
      layer["b2"] = layer["b2"][lo:hi]
    params.append(layer)
  return LowRankPredictor(params, p.thresholds, p.reports)


def lanes(strategy: Any, placement: Any, ledger: MemoryLedger) -> mesh_lanes.Lanes:
  """The engine's NeuronCluster on a mesh: a lane per local shard, each given its
  slice of the full model's statistics and (trained) predictor as
  `_mesh_lane.extra["stats"]` and `["predictor"]` (None: the oracle)."""
  mesh, o = strategy.mesh, strategy.options
  full = mesh.model
  f = full.config.intermediate_size // mesh.size
  if o.stats_path:
    stats = ActivationStats.load(o.stats_path)
  else:
    stats, _ = record_activations(full, calibration_ids(full.config, o.calibration_tokens),
                                  o.threshold)
  predictor = None if o.predictor == "oracle" else LowRankPredictor.load(o.predictor_path)

  def extra(s):
    lo, hi = s.rank * f, (s.rank + 1) * f
    return {"stats": _slice_stats(stats, lo, hi),
            "predictor": None if predictor is None else _slice_predictor(predictor, lo, hi)}

  def options(o, s):
    store_dir = o.store_dir
    if store_dir is not None:
      store_dir = os.path.join(store_dir, f"shard-{s.rank}-of-{mesh.size}")
    return dataclasses.replace(o, store_dir=store_dir, stats_path=None)

  return mesh_lanes.Lanes(strategy, placement, ledger, extra=extra, options=options)
