"""llama-1b with every block on disk and at most 1 GiB resident: layer-wise vs the disk limit.

Run:
  python -m experiments.benchmark --config=configs/bench/llama1b_disk.py \
      --workdir=/tmp/bench-llama1b-disk
Hardware: the 2-core, 24 GiB CPU machines here (WORKSPACE_NOTES.md: ~2 GB/s O_DIRECT
reads, ~24 GB/s matvec); ~5 GB free disk for the store (converted on first
use, ~30 s); ~1.5 GiB RAM per system; root to drop the page cache.
Expect: 4.1 GB streamed per token (22 blocks x 176 MB, float32), so decode near
disk bandwidth / 4.1 GB ~ 0.5 tok/s; prefetch_depth >= 1 at >= 0.85 of the
limit (the issue's target), depth 0 visibly lower (reads and compute serialised).
"""

from hetflow.bench.config import bench_config


def get_config(arg=None):
  del arg
  # embed + head (524 MB) + 3 ring slots (3 x 176 MB) + a 256-token KV reserve < 1 GiB.
  c = bench_config("llama-1b", budget=dict(device="1GiB", host="", disk=""))
  c.order = "layerwise_k2,layerwise_k2_t4,layerwise_k1,layerwise_k0"
  streamed = dict(offload_tier="disk", resident_layers=0, kv_reserve_tokens=256)
  for k in (0, 1, 2):
    c.systems[f"layerwise_k{k}"] = dict(kind="hetflow", strategy="layerwise",
                                        options=dict(streamed, prefetch_depth=k))
  c.systems.layerwise_k2_t4 = dict(  # fewer, larger requests in flight than the default 8 x 1 MiB
      kind="hetflow", strategy="layerwise",
      options=dict(streamed, prefetch_depth=2, reader_threads=4, read_chunk=4 << 20))
  c.smoke = {"model": {"name": "llama-tiny"}, "budget": {"device": ""}, "prompt_tokens": 4,
             "new_tokens": 3, "order": "layerwise_k1"}
  return c
