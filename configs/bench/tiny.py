"""A seconds-long smoke benchmark on llama-tiny (used by tests/test_benchmark.py).

Run:
  python -m experiments.benchmark --config=configs/bench/tiny.py --workdir=/tmp/bench-tiny
  python -m experiments.benchmark --config=configs/bench/tiny.py --workdir=/tmp/bench-tiny \
      --config.order=resident,layerwise_disk,transformers,accelerate_disk
Hardware: any CPU machine; ~1 GiB RAM; root to drop the page cache (else fadvise).
Expect: every row ok with identical tokens; the figures themselves mean little
(llama-tiny is 1.5 MB: per-call overheads dominate, fraction_of_limit is tiny).
"""

import ml_collections

from hetflow.config import model_section


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.model = model_section("llama-tiny")
  c.budget = ml_collections.ConfigDict(dict(device="", host="", disk=""))
  c.store_dir = ""  # "": the model's default store, converted on first use
  c.prompt_tokens = 8
  c.new_tokens = 4
  c.repeats = 1  # measured runs per system; the fastest decode is kept, all are reported
  c.warmup = True  # an identical run first, so the measured one has no compilation
  c.memory_limit = ""  # e.g. "3GiB": lock the rest of RAM for the whole run
  c.drop_caches = True  # evict the model's files before each run (and after warm-up)
  c.drop_method = "fadvise"  # per file; "drop_caches": machine-wide (disturbs others' runs)
  c.timeline = True
  c.profile_trace = False
  c.timeout_s = 300
  c.order = "resident,layerwise_disk,layerwise_host"  # which systems run, in this order
  c.systems = ml_collections.ConfigDict()
  c.systems.resident = dict(kind="hetflow", strategy="resident")
  c.systems.layerwise_disk = dict(kind="hetflow", strategy="layerwise",
                                  options=dict(offload_tier="disk", prefetch_depth=1))
  c.systems.layerwise_host = dict(kind="hetflow", strategy="layerwise",
                                  options=dict(offload_tier="host", prefetch_depth=1))
  c.systems.transformers = dict(kind="transformers")
  c.systems.accelerate_disk = dict(kind="accelerate", resident_layers=0)
  c.smoke = {}
  return c
