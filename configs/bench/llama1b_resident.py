"""llama-1b fully resident in float32: hetflow vs HF transformers (PyTorch CPU), same weights.

Run:
  python -m experiments.benchmark --config=configs/bench/llama1b_resident.py \
      --workdir=/tmp/bench-llama1b-resident
Hardware: the 2-core, 24 GiB CPU machines here; ~5 GiB RAM per system (one at
a time, each in a fresh process); ~5 GB disk for the HF copy the peer loads.
Expect: both near the memory-bandwidth roof: ~3.9 GB of weights touched per
token (all but the embedding table) / ~16-24 GB/s ~ 4-6 tok/s; the issue's
target is hetflow >= 0.9x transformers (WORKSPACE_NOTES.md, "Resident").
"""

from hetflow.bench.config import bench_config


def get_config(arg=None):
  del arg
  c = bench_config("llama-1b", new_tokens=32, timeline=False)
  c.order = "resident,transformers"
  c.systems.resident = dict(kind="hetflow", strategy="resident")
  c.systems.transformers = dict(kind="transformers")
  c.smoke = {"model": {"name": "llama-tiny"}, "new_tokens": 4, "repeats": 1,
             "order": "resident"}
  return c
