"""Record activation statistics and train per-layer predictors, from a config.

What `python -m experiments.train_predictor --config=configs/sparse/<name>.py`
runs: statistics go to <workdir>/stats.npz, the predictor (orbax) to
<workdir>/predictor; both are what the neuron_cluster strategy's `stats_path`
and `predictor_path` options take.

Training pairs come from two sources: prefill activations of random
calibration prompts, and decode steps of greedy generations (the runtime
predicts on decode inputs, which differ: short contexts, repeated tokens).
Thresholds and the reported recall/precision come from held-out generations
only, so they describe what decode will see. A finished run is reused when
its config matches (`fingerprint.json`): benchmarks never retrain.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from hetflow import config as config_lib
from hetflow.sparsity.predictor import (
  LowRankPredictor,
  TrainOptions,
  exact_gate_params,
  train_predictors,
)
from hetflow.sparsity.stats import Samples, calibration_ids, record_activations

_VERSION = 2  # 2: decode-step samples, exact layers, svd


def _fingerprint(config: Any) -> dict[str, Any]:
  from hetflow.checkpoints import sparse

  keys = ("model", "calibration_tokens", "seed", "threshold", "train", "decode")
  d = {k: config_lib.to_dict(config[k]) for k in keys if k in config}
  return json.loads(json.dumps(dict(d, version=_VERSION, sparse_version=sparse._VERSION),
                               default=str))


def decode_samples(model, prompts: int, prompt_tokens: int, new_tokens: int, seed: int,
                   threshold: float | None = None) -> tuple[Samples, list[np.ndarray]]:
  """(input, active) pairs of the decode steps of greedy generations.

  Generates `new_tokens` per random prompt with the resident engine, then
  replays prompt + generated tokens through the layer-at-a-time walk: by
  causality, position P + j's residual is what decode step j's FFN sees.

  Returns:
    (samples with rows ordered prompt-major, per-row prompt index per layer).
  """
  from hetflow.engine import Engine

  c = model.config
  ids = np.random.default_rng(seed + 104729).integers(3, c.vocab_size, (prompts, prompt_tokens))
  with Engine(model, "resident") as engine:
    out = engine.generate(ids, max_new_tokens=new_tokens, stop_tokens=())
  seqs = np.concatenate([ids, out.tokens[:, :-1]], axis=1)  # the last token is never an input
  _, data = record_activations(model, seqs, threshold, samples=True)
  t = seqs.shape[1]
  keep = (np.arange(t) >= prompt_tokens)
  rows = np.tile(keep, prompts)
  data = Samples([x[rows] for x in data.inputs], [a[rows] for a in data.active])
  owner = np.repeat(np.arange(prompts), int(keep.sum()))
  return data, owner


def train_from_config(config: Any, workdir: str) -> dict[str, Any]:
  """Records statistics and samples, trains predictors, saves both (or reuses them).

  Returns:
    {"stats_path", "predictor_path", "reports": per-layer dicts (held-out
    decode inputs)}.
  """
  os.makedirs(workdir, exist_ok=True)
  stats_path = os.path.join(workdir, "stats.npz")
  path = os.path.join(workdir, "predictor")
  fp_path = os.path.join(workdir, "fingerprint.json")
  fingerprint = _fingerprint(config)
  if os.path.exists(fp_path) and os.path.exists(stats_path):
    with open(fp_path) as f:
      if json.load(f) == fingerprint:
        predictor = LowRankPredictor.load(path)
        print(f"reusing the predictor in {path} (same config; delete {fp_path} to retrain)")
        return {"stats_path": stats_path, "predictor_path": path,
                "reports": [r.__dict__ for r in predictor.reports]}

  t0 = time.perf_counter()
  model = config_lib.build_model(config.model)
  threshold = config.get("threshold") or None
  ids = calibration_ids(model.config, config.calibration_tokens, seed=config.seed)
  print(f"recording activations of {model.description} on {ids.size} tokens ...", flush=True)
  stats, samples = record_activations(model, ids, threshold=threshold, samples=True)
  stats.save(stats_path)
  print(f"  measured density per layer: {[round(float(d), 3) for d in stats.density]}"
        f" ({time.perf_counter() - t0:.0f} s)", flush=True)

  validation = None
  decode = config.get("decode")
  if decode:
    print(f"generating {decode['prompts']} x {decode['new_tokens']} tokens for decode-step"
          " samples ...", flush=True)
    dec, owner = decode_samples(model, decode["prompts"], decode["prompt_tokens"],
                                decode["new_tokens"], config.seed, threshold)
    # Held out by prompt: a generation's repeated tokens would leak across a random split.
    va = owner >= decode["prompts"] // 2
    validation = Samples([x[va] for x in dec.inputs], [a[va] for a in dec.active])
    samples = Samples([np.concatenate([x, d[~va]]) for x, d in zip(samples.inputs, dec.inputs)],
                      [np.concatenate([a, d[~va]]) for a, d in zip(samples.active, dec.active)])
    print(f"  decode density per layer: {[round(float(a.mean()), 3) for a in dec.active]}"
          f" ({time.perf_counter() - t0:.0f} s)", flush=True)

  options = TrainOptions(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                            for k, v in config_lib.to_dict(config.train).items()})
  layers = (range(model.config.num_layers) if options.method == "svd"
            else options.exact_layers)
  exact = {i: exact_gate_params(model.config, {k: model.tensor(f"layers/{i}/mlp/{k}")
                                               for k in ("norm", "gate")})
           for i in layers}
  predictor = train_predictors(samples, options, progress=lambda s: print(s, flush=True),
                               validation=validation, exact=exact)
  predictor.save(path)
  where = "held-out decode steps" if validation is not None else "held-out calibration tokens"
  print(f"on {where}:\nlayer  rank  recall  precision  predicted  true")
  for i, r in enumerate(predictor.reports):
    print(f"{i:5d} {r.rank:5d} {r.recall:7.3f} {r.precision:10.3f} {r.predicted_density:10.3f}"
          f" {r.true_density:5.3f}")
  print(f"predictor: {predictor.nbytes() / 2**20:.1f} MiB in {path};"
        f" total {time.perf_counter() - t0:.0f} s")
  with open(fp_path, "w") as f:
    json.dump(fingerprint, f, indent=1)
  return {"stats_path": stats_path, "predictor_path": path,
          "reports": [r.__dict__ for r in predictor.reports]}
