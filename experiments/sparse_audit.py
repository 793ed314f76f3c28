"""Count-based audit of neuron_cluster vs dense (agreement, recall, bytes per token).

  python -m experiments.sparse_audit --config=configs/bench/llama1b_sparse.py \
      --systems=nc_pipeline --prompts=4

Takes the benchmark config's model, budget, prompt length, new tokens and
systems' options; no timings (valid on a loaded machine).
"""

import json

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from hetflow import config as config_lib
from hetflow.bench.audit import audit, reference_tokens, summary

_CONFIG = config_flags.DEFINE_config_file("config", None, "a benchmark config")
_SYSTEMS = flags.DEFINE_list("systems", ["nc_pipeline"], "neuron_cluster systems of the config")
_PROMPTS = flags.DEFINE_integer("prompts", 4, "fixed prompts (benchmark seeds 0..n-1)")
_OVERRIDES = flags.DEFINE_string("overrides", "{}", "JSON options merged into every system")
_OUT = flags.DEFINE_string("out", None, "JSON file for the results")
_REFERENCE = flags.DEFINE_string("reference", None, "an earlier --out: reuse its dense tokens")


def main(argv):
  del argv
  c = _CONFIG.value
  model = config_lib.build_model(c.model)
  budget = config_lib.build_budget(c.budget)
  if _REFERENCE.value:
    with open(_REFERENCE.value) as f:
      ref = np.array(json.load(f)["reference"])
  else:
    ref = reference_tokens(model, _PROMPTS.value, c.prompt_tokens, c.new_tokens)
  print(f"dense reference: {ref.tolist()}", flush=True)
  results = {"reference": ref.tolist()}
  for name in _SYSTEMS.value:
    options = dict(config_lib.to_dict(c.systems[name].options), **json.loads(_OVERRIDES.value))
    results[name] = audit(model, options, ref, c.prompt_tokens, budget)
    print(f"== {name} {json.loads(_OVERRIDES.value)}\n{summary(results[name])}", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
