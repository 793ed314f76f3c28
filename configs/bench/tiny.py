"""A seconds-long smoke benchmark on llama-tiny (used by tests/test_benchmark.py).

Run:
  python -m experiments.benchmark --config=configs/bench/tiny.py --workdir=/tmp/bench-tiny
  python -m experiments.benchmark --config=configs/bench/tiny.py --workdir=/tmp/bench-tiny \
      --config.order=resident,layerwise_disk,transformers,accelerate_disk
Hardware: any CPU machine; ~1 GiB RAM; root to drop the page cache (else fadvise).
Expect: every row ok with identical tokens; the figures themselves mean little
(llama-tiny is 1.5 MB: per-call overheads dominate, fraction_of_limit is tiny).
"""

from hetflow.bench.config import bench_config


def get_config(arg=None):
  del arg
  c = bench_config("llama-tiny", prompt_tokens=8, new_tokens=4, repeats=1, timeout_s=300)
  c.order = "resident,layerwise_disk,layerwise_host"
  c.systems.resident = dict(kind="hetflow", strategy="resident")
  c.systems.layerwise_disk = dict(kind="hetflow", strategy="layerwise",
                                  options=dict(offload_tier="disk", prefetch_depth=1))
  c.systems.layerwise_host = dict(kind="hetflow", strategy="layerwise",
                                  options=dict(offload_tier="host", prefetch_depth=1))
  c.systems.transformers = dict(kind="transformers")
  c.systems.accelerate_disk = dict(kind="accelerate", resident_layers=0)
  return c
