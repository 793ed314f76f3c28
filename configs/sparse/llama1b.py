"""Predictors for llama-1b-sparse (sparsity 0.9, zipf:1.1), for the neuron-cluster benchmark.

Run:
  python -m experiments.train_predictor --config=configs/sparse/llama1b.py \
      --workdir=/tmp/hetflow-llama1b-sparse
Hardware: the 2-core, 24 GiB CPU machines here; ~5 GiB RAM (the greedy
generations for decode-step samples run the resident engine: 4.4 GB of
weights); generating the synthetic weights three times (calibration,
recording, generation) and training dominate: ~10-20 min. A finished run is
reused when the config matches (<workdir>/fingerprint.json).
Expect: measured density ~0.1 per layer on calibration prompts (0.10-0.12),
higher on decode steps (short contexts: ~0.21 at layer 0 to ~0.13); per layer
the rank-128/256 SVD of the gate map at recall near 0.99 (the target) on decode
steps used neither to train nor to set the thresholds, predicted density <= 2x the true one; predictor ~2% of the
model's bytes.
"""

import ml_collections

from hetflow.config import model_section


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.model = model_section("llama-1b-sparse")
  c.model.kwargs = dict(sparsity=0.9, hotness="zipf:1.1")
  c.workdir = "/tmp/hetflow-llama1b-sparse"
  c.calibration_tokens = 2048
  c.seed = 0
  c.threshold = 0.0
  # Decode-step samples (the benchmark decodes 16 tokens after a 16-token prompt).
  c.decode = dict(prompts=16, prompt_tokens=16, new_tokens=32)
  # The truncated SVD of each layer's gate map (no training): a trained MLP
  # reached recall 0.99 on decode steps only by predicting ~95% of neurons.
  c.train = dict(method="svd", ranks=(128, 256), target_recall=0.99, max_density_ratio=2.0,
                 steps=300, batch_size=256, learning_rate=3e-3, positive_weight=4.0)
  c.smoke = {"model": {"name": "llama-tiny-sparse"}, "calibration_tokens": 256,
             "decode": {"prompts": 4, "new_tokens": 4}, "train": {"ranks": (8,)}}
  return c
