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

import ml_collections

from hetflow.config import model_section


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.model = model_section("llama-1b")
  c.budget = ml_collections.ConfigDict(dict(device="", host="", disk=""))
  c.store_dir = ""
  c.prompt_tokens = 16
  c.new_tokens = 32
  c.warmup = True
  c.memory_limit = ""
  c.drop_caches = True
  c.timeline = False
  c.profile_trace = False
  c.timeout_s = 900
  c.order = "resident,transformers"
  c.systems = ml_collections.ConfigDict()
  c.systems.resident = dict(kind="hetflow", strategy="resident")
  c.systems.transformers = dict(kind="transformers")
  c.smoke = {"model": {"name": "llama-tiny"}, "new_tokens": 4, "order": "resident"}
  return c
