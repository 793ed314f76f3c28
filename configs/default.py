"""The embedded default: greedy generation on a synthetic TinyLlama-shaped model.

Run:
  python -m experiments.generate --config=configs/default.py
  python -m experiments.generate --config=configs/default.py \
      --config.model.checkpoint=/path/to/hf_dir --config.prompt="Once upon a time"
  python -m experiments.generate --config=configs/default.py --config.strategy.name=layerwise \
      --config.strategy.options.prefetch_depth=2 --config.budget.device=1GiB
  python -m hetflow.launch --processes=2 -- python -m experiments.generate \
      --config=configs/default.py --config.mesh.model=2   # two processes, one shard each
Every option of every strategy can be set as --config.strategy.options.<name>
(hetflow.generation.options_section); the chosen strategy must have it.
Hardware: any machine with ~6 GiB free RAM (llama-1b is 4.4 GB in float32).
Expect: 32 generated token ids (random weights, so no meaningful text), about
5 tok/s decode on a 2-core CPU (memory-bandwidth bound; WORKSPACE_NOTES.md).
"""

import ml_collections

from hetflow.config import mesh_section, model_section
from hetflow.generation import options_section


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.model = model_section("llama-1b")
  c.strategy = ml_collections.ConfigDict(dict(name="resident", options=options_section()))
  c.budget = ml_collections.ConfigDict(dict(device="", host="", disk=""))  # per device
  c.mesh = mesh_section()  # --config.mesh.model=2: two shards (docs/distributed.md)
  c.prompt = "Once upon a time"  # token ids are used when the model has no tokenizer
  c.batch_size = 1
  c.max_new_tokens = 32
  c.temperature = 0.0
  c.top_k = 0
  c.top_p = 1.0
  c.seed = 0
  c.smoke = {"model": {"name": "llama-tiny"}, "max_new_tokens": 4}
  return c
