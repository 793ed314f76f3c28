"""llama-1b with half the blocks resident and the rest streamed from disk.

Run:
  python -m experiments.benchmark --config=configs/bench/llama1b_half.py \
      --workdir=/tmp/bench-llama1b-half
Hardware: the 2-core, 24 GiB CPU machines here; ~4.5 GiB RAM per system
(11 resident blocks = 1.9 GB, embed/head 0.5 GB, ring 0.5 GB, jax runtime);
~5 GB free disk for the store; root to drop the page cache.
Expect: 11 blocks (1.9 GB) read per token at ~2 GB/s and 2.3 GB computed from
RAM at ~24 GB/s: limit ~1.1 s/token (~0.9 tok/s); layer-wise at >= 0.85 of it.
The resident blocks are spread over the depth (every other block), so the
disk keeps reading while they compute.
"""

from hetflow.bench.config import bench_config


def get_config(arg=None):
  del arg
  c = bench_config("llama-1b", budget=dict(device="3.2GiB", host="", disk=""))
  c.order = "layerwise_half_k2,layerwise_half_k1"
  for k in (1, 2):
    c.systems[f"layerwise_half_k{k}"] = dict(
        kind="hetflow", strategy="layerwise",
        options=dict(offload_tier="disk", resident_layers=11, prefetch_depth=k,
                     kv_reserve_tokens=256))
  c.smoke = {"model": {"name": "llama-tiny"}, "budget": {"device": ""}, "prompt_tokens": 4,
             "new_tokens": 3, "order": "layerwise_half_k1",
             "systems": {"layerwise_half_k1": {"options": {"resident_layers": 1}}}}
  return c
