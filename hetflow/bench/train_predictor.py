"""Record activation statistics and train per-layer predictors, from a config.

What `python -m experiments.train_predictor --config=configs/sparse/<name>.py`
runs: statistics go to <workdir>/stats.npz, the predictor (orbax) to
<workdir>/predictor; both are what the neuron_cluster strategy's `stats_path`
and `predictor_path` options take.

Training pairs come from two sources: prefill activations of random
calibration prompts, and decode steps of greedy generations (the runtime
predicts on decode inputs, which differ: short contexts, repeated tokens).
The generations are split by prompt: half train, a quarter sets the
thresholds, and the last quarter, used for nothing else, gives the reported
recall and precision (`test_reports`): a threshold set to reach a recall
reaches it on its own samples by construction. For an MoE with sparse experts
(`mixtral-*-sparse`, the moe_sparse strategy) the "layers" are its experts
(virtual layer i * X + e, `hetflow.sparsity.experts`): each expert's pairs are
the tokens routed to it. A finished run is reused when
its config matches (`fingerprint.json`): benchmarks never retrain.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from hetflow import config as config_lib
from hetflow.sparsity import experts
from hetflow.sparsity.predictor import (
  LowRankPredictor,
  TrainOptions,
  evaluate,
  exact_gate_params,
  train_predictors,
)
from hetflow.sparsity.stats import Samples, calibration_ids, record_activations

_VERSION = 3  # 2: decode-step samples, exact layers, svd; 3: thresholds and test split


def _fingerprint(config: Any) -> dict[str, Any]:
  from hetflow.checkpoints import sparse

  keys = ("model", "calibration_tokens", "seed", "threshold", "train", "decode")
  d = {k: config_lib.to_dict(config[k]) for k in keys if k in config}
  return json.loads(json.dumps(dict(d, version=_VERSION, sparse_version=sparse._VERSION),
                               default=str))


def _record(model, ids: np.ndarray, threshold: float | None):
  """(stats, samples, per layer the flat token index of each sample): a dense model's
  layers see every token; an MoE's experts (virtual layers) the tokens routed to them."""
  if model.config.num_experts:
    acts = experts.record_expert_activations(model, ids, samples=True)
    return acts.stats, acts.samples, acts.rows
  stats, data = record_activations(model, ids, threshold, samples=True)
  return stats, data, [np.arange(ids.size)] * len(data.inputs)


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
  _, data, where = _record(model, seqs, threshold)
  t = seqs.shape[1]
  keep = [w % t >= prompt_tokens for w in where]
  data = _rows(data, keep)
  return data, [w[k] // t for w, k in zip(where, keep)]


def train_from_config(config: Any, workdir: str) -> dict[str, Any]:
  """Records statistics and samples, trains predictors, saves both (or reuses them).

  Returns:
    {"stats_path", "predictor_path", "reports": per-layer dicts on the
    samples the thresholds were set on, "test_reports": per-layer dicts on
    decode steps used neither to train nor to set thresholds (None without
    `config.decode`)}.

  Raises:
    ValueError: if `config.decode` asks for fewer than 4 prompts.
  """
  os.makedirs(workdir, exist_ok=True)
  stats_path = os.path.join(workdir, "stats.npz")
  path = os.path.join(workdir, "predictor")
  fp_path = os.path.join(workdir, "fingerprint.json")
  test_path = os.path.join(workdir, "test_reports.json")
  fingerprint = _fingerprint(config)
  if all(os.path.exists(p) for p in (fp_path, stats_path, test_path)):
    with open(fp_path) as f:
      if json.load(f) == fingerprint:
        predictor = LowRankPredictor.load(path)
        print(f"reusing the predictor in {path} (same config; delete {fp_path} to retrain)")
        return {"stats_path": stats_path, "predictor_path": path,
                "reports": [r.__dict__ for r in predictor.reports],
                "test_reports": _load_json(test_path)}

  t0 = time.perf_counter()
  model = config_lib.build_model(config.model)
  threshold = config.get("threshold") or None
  ids = calibration_ids(model.config, config.calibration_tokens, seed=config.seed)
  print(f"recording activations of {model.description} on {ids.size} tokens ...", flush=True)
  stats, samples, _ = _record(model, ids, threshold)
  stats.save(stats_path)
  print(f"  measured density per layer: {[round(float(a.mean()), 3) for a in samples.active]}"
        f" ({time.perf_counter() - t0:.0f} s)", flush=True)

  validation = test = None
  decode = config.get("decode")
  if decode:
    n = decode["prompts"]
    if n < 4:
      raise ValueError(f"decode.prompts={n}: at least 4 are needed (half to train, a quarter"
                       " to set thresholds, a quarter to test them); raise it in the config.")
    print(f"generating {n} x {decode['new_tokens']} tokens for decode-step samples ...",
          flush=True)
    dec, owners = decode_samples(model, n, decode["prompt_tokens"], decode["new_tokens"],
                                config.seed, threshold)
    # Split by prompt: a generation's repeated tokens would leak across a random split.
    part = [np.where(o < n // 2, 0, np.where(o < n - n // 4, 1, 2)) for o in owners]
    train, validation, test = (_rows(dec, [p == k for p in part]) for k in range(3))
    # An expert that no generation of the threshold quarter was routed to sets its
    # threshold on its calibration rows instead (which method "svd" never trains on).
    for i, x in enumerate(validation.inputs):
      if not len(x):
        validation.inputs[i], validation.active[i] = samples.inputs[i], samples.active[i]
    samples = Samples([np.concatenate([x, d]) for x, d in zip(samples.inputs, train.inputs)],
                      [np.concatenate([a, d]) for a, d in zip(samples.active, train.active)])
    print(f"  decode density per layer: {[round(float(a.mean()), 3) for a in dec.active]}"
          f" ({time.perf_counter() - t0:.0f} s)", flush=True)

  options = TrainOptions(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                            for k, v in config_lib.to_dict(config.train).items()})
  layers = range(len(samples.inputs)) if options.method == "svd" else options.exact_layers
  if model.config.num_experts:  # the experts' view: one gate map per virtual layer
    every = experts.expert_gate_params(model) if layers else {}
    exact = {i: every[i] for i in layers}
  else:
    exact = {i: exact_gate_params(model.config, {k: model.tensor(f"layers/{i}/mlp/{k}")
                                                 for k in ("norm", "gate")})
             for i in layers}
  predictor = train_predictors(samples, options, progress=lambda s: print(s, flush=True),
                               validation=validation, exact=exact)
  predictor.save(path)
  test_reports = None
  if test is not None:
    test_reports = [evaluate(p, thr, x, y, r.rank).__dict__ for p, thr, x, y, r in
                    zip(predictor.params, predictor.thresholds, test.inputs, test.active,
                        predictor.reports)]
  shown = test_reports or [r.__dict__ for r in predictor.reports]
  where = ("decode steps used neither to train nor to set thresholds" if test is not None
           else "held-out calibration tokens (also used to set the thresholds)")
  print(f"on {where}:\nlayer  rank  recall  precision  predicted  true")
  for i, r in enumerate(shown):
    print(f"{i:5d} {r['rank']:5d} {r['recall']:7.3f} {r['precision']:10.3f}"
          f" {r['predicted_density']:10.3f} {r['true_density']:5.3f}")
  print(f"predictor: {predictor.nbytes() / 2**20:.1f} MiB in {path};"
        f" total {time.perf_counter() - t0:.0f} s")
  with open(test_path, "w") as f:
    json.dump(test_reports, f, indent=1)
  with open(fp_path, "w") as f:  # last: a run is reused only once everything is written
    json.dump(fingerprint, f, indent=1)
  return {"stats_path": stats_path, "predictor_path": path,
          "reports": [r.__dict__ for r in predictor.reports], "test_reports": test_reports}


def _rows(samples: Samples, keep: list[np.ndarray]) -> Samples:
  """The rows kept per layer (a mask per layer)."""
  return Samples([x[k] for x, k in zip(samples.inputs, keep)],
                 [a[k] for a, k in zip(samples.active, keep)])


def _load_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)
