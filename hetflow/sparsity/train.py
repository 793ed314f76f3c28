"""Record activation statistics and train per-layer predictors, from a config.

What `python -m experiments.train_predictor --config=configs/sparse/<name>.py`
runs: statistics go to <workdir>/stats.npz, the predictor (orbax) to
<workdir>/predictor; both are what the neuron_cluster strategy's `stats_path`
and `predictor_path` options take.
"""

from __future__ import annotations

import os
import time
from typing import Any

from hetflow import config as config_lib
from hetflow.sparsity.predictor import TrainOptions, train_predictors
from hetflow.sparsity.stats import calibration_ids, record_activations


def train_from_config(config: Any, workdir: str) -> dict[str, Any]:
  """Records statistics on calibration prompts, trains predictors, saves both.

  Returns:
    {"stats_path", "predictor_path", "reports": per-layer dicts}.
  """
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  model = config_lib.build_model(config.model)
  ids = calibration_ids(model.config, config.calibration_tokens, seed=config.seed)
  print(f"recording activations of {model.description} on {ids.size} tokens ...", flush=True)
  stats, samples = record_activations(model, ids, threshold=config.get("threshold") or None,
                                      samples=True)
  stats_path = os.path.join(workdir, "stats.npz")
  stats.save(stats_path)
  print(f"  measured density per layer: {[round(float(d), 3) for d in stats.density]}"
        f" ({time.perf_counter() - t0:.0f} s)", flush=True)
  options = TrainOptions(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                            for k, v in config_lib.to_dict(config.train).items()})
  predictor = train_predictors(samples, options, progress=lambda s: print(s, flush=True))
  path = os.path.join(workdir, "predictor")
  predictor.save(path)
  print("layer  rank  recall  precision  predicted  true")
  for i, r in enumerate(predictor.reports):
    print(f"{i:5d} {r.rank:5d} {r.recall:7.3f} {r.precision:10.3f} {r.predicted_density:10.3f}"
          f" {r.true_density:5.3f}")
  print(f"predictor: {predictor.nbytes() / 2**20:.1f} MiB in {path};"
        f" total {time.perf_counter() - t0:.0f} s")
  return {"stats_path": stats_path, "predictor_path": path,
          "reports": [r.__dict__ for r in predictor.reports]}
