"""Runs the mesh scenarios of tests/test_mesh.py in a fresh process, one JSON line each.

  PYTHONPATH=. python tests/mesh_worker.py DEVICES SETUP_JSON SCENARIO...

DEVICES > 1 gives this process that many CPU devices (set before jax starts,
which is why this runs in its own process); under `python -m hetflow.launch` it
is 1 and the devices are the processes'. SETUP_JSON holds "prompts",
"new_tokens" and "store_root" (the test's). A scenario is
"model[@weights]:shards:strategy[:offload_tier]" (weights: a format such as int4;
a "-sparse" model is tests/test_neuron_cluster.py's sparse synthetic one, a Mixtral
"-sparse" one has sparse experts for moe_sparse; for moe_offload, ":one" generates
for the first prompt only, so that decode takes the routed-experts path), or
"refuse:strategy[:kv_host]" (a strategy, or one with its KV cache in host memory,
that must refuse a mesh of 2; "test-unsharded" is
resident declared unable to shard, registered here), or
"refuse-split:model@weights:shards:strategy" (a format whose groups a shard's
split would straddle: refused with ShardingError before anything is placed).
Prints "RESULT <json>" per scenario.
"""

import json
import os
import sys

DEVICES = int(sys.argv[1])
if DEVICES > 1:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"

from hetflow import distributed  # noqa: E402

distributed.initialize()


from test_mesh import synthetic  # noqa: E402

import hetflow  # noqa: E402
from hetflow.engine import Engine  # noqa: E402
from hetflow.models.sharding import ShardingError  # noqa: E402
from hetflow.strategy import NotApplicable, get_strategy, register_strategy  # noqa: E402


@register_strategy("test-unsharded")
class Unsharded(get_strategy("resident")):
  """`resident` declared unable to shard: what the engine refuses on a mesh."""

  shards_over_mesh = False


def run(spec: str, setup: dict) -> dict:
  parts = spec.split(":")
  if parts[0] == "refuse-split":  # a format whose groups a split of `down` would straddle
    try:
      Engine(synthetic(parts[1]), parts[3], mesh=int(parts[2]))
    except ShardingError as e:
      return {"spec": spec, "refused": str(e)}
    return {"spec": spec, "refused": None}
  if parts[0] == "refuse":
    options = dict(kv_cache_tier="host") if parts[2:] == ["kv_host"] else None
    try:
      Engine(hetflow.synthetic_model("llama-tiny"), parts[1], mesh=2, options=options)
    except NotApplicable as e:
      return {"spec": spec, "refused": str(e)}
    return {"spec": spec, "refused": None}
  shards, strategy = int(parts[1]), parts[2]
  store_dir = os.path.join(setup["store_root"], f"{parts[0]}-{shards}-{strategy}")
  options = None
  if strategy == "layerwise":
    tier = parts[3] if len(parts) > 3 else "disk"
    options = dict(offload_tier=tier, prefetch_depth=1, store_dir=store_dir)
  elif strategy == "tensor_split":  # every kernel split, both sides computing
    options = dict(alpha=0.5, keep_resident=False)
  elif strategy == "neuron_cluster":
    options = dict(cache_bytes="16KiB", cluster_size=8, store_dir=store_dir)
    if parts[3:] == ["ahead"]:  # each lane guesses its misses while the attention computes
      options.update(lookahead=True, lookahead_source="previous_token")
  elif strategy == "moe_offload":  # a small cache: misses, evictions and guesses
    options = dict(cache_experts=10, lookahead=1, store_dir=store_dir)
  elif strategy == "moe_sparse":  # a small neuron cache: decode reads from every store
    options = dict(neurons=dict(cache_bytes="16KiB", cluster_size=8, store_dir=store_dir))
  prompts = setup["prompts"][:1] if parts[3:] == ["one"] else setup["prompts"]
  model = synthetic(parts[0])
  with Engine(model, strategy, mesh=shards, options=options) as engine:
    out = engine.generate(prompts, max_new_tokens=setup["new_tokens"], stop_tokens=())
    logits = engine.forward(setup["prompts"][:1])
    stats = out.stats["strategy"]
    stores = [s.path for s in getattr(engine.strategy, "_stores", ())]
    lanes = getattr(engine.strategy, "_lanes", None)
    if lanes is not None and strategy != "tensor_split":  # a store per lane
      stores = [lane.store.path for lane in lanes.lanes]
    return {"spec": spec, "tokens": out.tokens.tolist(),
            "logits": logits[0, -1].tolist(),
            "local_shards": out.stats["mesh"]["local_shards"],
            "decode_disk_bytes": stats.decode.disk_bytes,
            "decode_tokens": stats.decode.tokens,
            "store_neurons": ([lane.store.num_neurons for lane in lanes.lanes]
                              if strategy in ("neuron_cluster", "moe_sparse") else None),
            "store_weights": ([lane.store.weights for lane in lanes.lanes]
                              if strategy in ("neuron_cluster", "moe_sparse") else None),
            "experts_run": stats.decode.get("experts_run"),
            "split_matmuls": stats.decode.get("split_matmuls"),
            "expert_lookups": stats.decode.get("expert_lookups"),
            "ahead_read": stats.decode.get("ahead_read"),
            "store_bytes_paths": stores,
            "store_bytes": [sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p))
                            for p in stores]}


if __name__ == "__main__":
  for spec in sys.argv[3:]:
    print("RESULT " + json.dumps(run(spec, json.loads(sys.argv[2]))), flush=True)
