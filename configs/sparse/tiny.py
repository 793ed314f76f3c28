"""Predictors for llama-tiny-sparse (or opt-tiny-sparse with :opt).

Run:
  python -m experiments.train_predictor --config=configs/sparse/tiny.py --workdir=/tmp/pred-tiny
Hardware: any CPU; ~20-30 s on the 2-core machines here.
Expect: measured density ~0.1 per layer (higher on decode steps: short
contexts); recall near 0.99 (the target) at predicted density ~0.2-0.35 per
layer, on decode steps used neither to train nor to set the thresholds.
"""

import ml_collections

from hetflow.config import model_section


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  opt = arg == "opt"
  c.model = model_section("opt-tiny-sparse" if opt else "llama-tiny-sparse")
  c.model.kwargs = dict(sparsity=0.9, hotness="zipf:1.1")
  c.workdir = "/tmp/pred-tiny"
  c.calibration_tokens = 2048
  c.seed = 0
  c.threshold = 0.0
  # Decode-step samples: greedy generations from random prompts, split by
  # prompt: half to train, a quarter for thresholds, a quarter for the report.
  c.decode = dict(prompts=8, prompt_tokens=16, new_tokens=32)
  # Llama: the truncated SVD of the gate map (trained MLPs generalise badly
  # to decode steps); OPT's LayerNorm is not a pure rescale: a trained MLP.
  c.train = dict(method="mlp" if opt else "svd", ranks=(8, 16, 32), target_recall=0.99,
                 max_density_ratio=2.0, steps=300, batch_size=256, learning_rate=3e-3,
                 positive_weight=4.0)
  c.smoke = {"calibration_tokens": 256, "decode": {"prompts": 4, "new_tokens": 4},
             "train": {"ranks": (8,), "steps": 20}}
  return c
