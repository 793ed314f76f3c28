"""llama-1b with every block on disk, layer-wise, in float32, int8 and int4 (issue 11, table a).

Run:
  python -m experiments.benchmark --config=configs/bench/llama1b_formats_disk.py \
      --workdir=/tmp/bench-llama1b-formats-disk
Hardware: the 2-core, 24 GiB CPU machines here; ~7 GB free disk for the three stores
(each format has its own, converted on first use, before any timing); ~1.5 GiB RAM
per system; root to drop the page cache.
Expect: bytes per token 4.1 GB (float32), 1.2 GB (int8, per channel), 0.66 GB (int4,
groups of 32), so at the disk limit int8 ~3.3x and int4 ~5x float32's tokens/s (the
issue's targets, each at >= 0.9 of its own limit). int4's XLA kernel (a scan over
groups) may be slower than the disk; its fraction of the limit says so.
"""

from hetflow.bench.config import bench_config


def get_config(arg=None):
  del arg
  c = bench_config("llama-1b", budget=dict(device="1GiB", host="", disk=""), new_tokens=8)
  c.order = "layerwise_float32,layerwise_int8,layerwise_int4"
  streamed = dict(offload_tier="disk", resident_layers=0, kv_reserve_tokens=256,
                  prefetch_depth=2)
  for weights in ("float32", "int8", "int4"):
    c.systems[f"layerwise_{weights}"] = dict(kind="hetflow", strategy="layerwise",
                                             weights=weights, options=streamed)
  c.smoke = {"model": {"name": "llama-tiny"}, "budget": {"device": ""}, "prompt_tokens": 4,
             "new_tokens": 3, "repeats": 1}
  return c
