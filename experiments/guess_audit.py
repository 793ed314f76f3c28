"""How precisely a look-ahead could guess each layer's active neurons (counts, no timings).

  python -m experiments.guess_audit --config=configs/bench/llama1b_sparse.py \
      --system=nc_prefill --prompts=4

The trained predictor of one neuron_cluster system of a benchmark config, applied to
three residuals per layer at the dense decode's steps (`hetflow.bench.audit.guess_quality`):
the FFN's input (what the strategy selects from), the block's input (half a layer ahead)
and the block before's FFN input (one layer ahead, what `lookahead` guesses from).
"""

import json

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from hetflow import config as config_lib
from hetflow.bench.audit import GUESS_SOURCES, guess_quality, reference_tokens
from hetflow.sparsity.predictor import LowRankPredictor

_CONFIG = config_flags.DEFINE_config_file("config", None, "a benchmark config")
_SYSTEM = flags.DEFINE_string("system", "nc_prefill", "a neuron_cluster system of the config")
_PROMPTS = flags.DEFINE_integer("prompts", 4, "fixed prompts (benchmark seeds 0..n-1)")
_OUT = flags.DEFINE_string("out", None, "JSON file for the results")


def main(argv):
  del argv
  c = _CONFIG.value
  options = config_lib.to_dict(c.systems[_SYSTEM.value].options)
  if options.get("predictor") != "trained":
    raise app.UsageError(f"system {_SYSTEM.value!r} has no trained predictor: pick one whose"
                         " options set predictor='trained' and predictor_path")
  model = config_lib.build_model(c.model)
  predictor = LowRankPredictor.load(options["predictor_path"])
  predictor.place(jax.devices()[0])
  reference = reference_tokens(model, _PROMPTS.value, c.prompt_tokens, c.new_tokens)
  got = guess_quality(model, predictor, reference, c.prompt_tokens)
  print("| layer | active/token | " + " | ".join(f"{k} recall | precision" for k in GUESS_SOURCES)
        + " |")
  print("|---" * (2 + 2 * len(GUESS_SOURCES)) + "|")
  for i, n in enumerate(got["true_per_token"]):
    cells = [f"{got[k]['recall'][i]:.3f} | {got[k]['precision'][i]:.3f}" for k in GUESS_SOURCES]
    print(f"| {i} | {n:.0f} | " + " | ".join(cells) + " |")
  for k in GUESS_SOURCES:
    print(f"{k}: mean recall {np.nanmean(got[k]['recall']):.3f},"
          f" precision {np.nanmean(got[k]['precision']):.3f}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({k: {m: np.asarray(v).tolist() for m, v in got[k].items()} for k in GUESS_SOURCES},
                f, indent=1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
