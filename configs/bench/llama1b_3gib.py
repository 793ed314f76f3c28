"""llama-1b on a machine emulated down to 3 GiB of RAM: hetflow vs transformers vs Accelerate.

Run (as root; locks all but 3 GiB of RAM for the whole run, page cache included):
  python -m experiments.benchmark --config=configs/bench/llama1b_3gib.py \
      --workdir=/tmp/bench-llama1b-3gib
Hardware: the 2-core, 24 GiB CPU machines here, and nothing else running on
them (the lock takes ~20 GiB that other processes would then miss); ~10 GB
free disk (store + an HF copy of the weights for the peers).
Expect (issue 3): transformers ~0.44 tok/s, Accelerate all-disk ~0.62,
Accelerate half-resident ~0.50 (they thrash the page cache); layer-wise with
as many resident blocks as 1.8 GiB of device budget allows >= 1.5x the best
of them, since its O_DIRECT reads do not depend on the page cache at all.
"""

from hetflow.bench.config import bench_config


def get_config(arg=None):
  del arg
  # Leaves ~1.2 GiB of the 3 GiB for the jax runtime, activations and page cache.
  c = bench_config("llama-1b", budget=dict(device="1.8GiB", host="", disk=""),
                   memory_limit="3GiB", timeout_s=1800)
  c.order = "layerwise_auto,layerwise_disk,transformers,accelerate_disk,accelerate_half"
  for name, resident in (("layerwise_auto", "auto"), ("layerwise_disk", 0)):
    c.systems[name] = dict(kind="hetflow", strategy="layerwise",
                           options=dict(offload_tier="disk", resident_layers=resident,
                                        prefetch_depth=2, kv_reserve_tokens=256))
  c.systems.transformers = dict(kind="transformers")
  c.systems.accelerate_disk = dict(kind="accelerate", resident_layers=0)
  c.systems.accelerate_half = dict(kind="accelerate", resident_layers=11)
  c.smoke = {"model": {"name": "llama-tiny"}, "budget": {"device": ""}, "memory_limit": "",
             "prompt_tokens": 4, "new_tokens": 3, "order": "layerwise_auto"}
  return c
