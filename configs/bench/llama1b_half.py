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

import ml_collections

from hetflow.config import model_section


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.model = model_section("llama-1b")
  c.budget = ml_collections.ConfigDict(dict(device="3.2GiB", host="", disk=""))
  c.store_dir = ""
  c.prompt_tokens = 16
  c.new_tokens = 8
  c.repeats = 2  # measured runs per system; the fastest decode is kept, all are reported
  c.warmup = True
  c.memory_limit = ""
  c.drop_caches = True  # evict the model's files before each run (and after warm-up)
  c.drop_method = "fadvise"  # per file; "drop_caches": machine-wide (disturbs others' runs)
  c.timeline = True
  c.profile_trace = False
  c.timeout_s = 900
  c.order = "layerwise_half_k2,layerwise_half_k1"
  c.systems = ml_collections.ConfigDict()
  for k in (1, 2):
    c.systems[f"layerwise_half_k{k}"] = dict(
        kind="hetflow", strategy="layerwise",
        options=dict(offload_tier="disk", resident_layers=11, prefetch_depth=k,
                     kv_reserve_tokens=256))
  c.smoke = {"model": {"name": "llama-tiny"}, "budget": {"device": ""}, "prompt_tokens": 4,
             "new_tokens": 3, "order": "layerwise_half_k1",
             "systems": {"layerwise_half_k1": {"options": {"resident_layers": 1}}}}
  return c
