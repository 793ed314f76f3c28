"""Predictors for llama-1b-sparse (sparsity 0.9, zipf:1.1), for the neuron-cluster benchmark.

Run:
  python -m experiments.train_predictor --config=configs/sparse/llama1b.py \
      --workdir=/tmp/hetflow-llama1b-sparse
Hardware: the 2-core, 24 GiB CPU machines here; ~2 GiB RAM; generating the
synthetic weights twice (calibration, recording) dominates: ~10-20 min.
Expect: measured density ~0.1 per layer; recall ~0.98 at predicted density
<= 2x the true density; predictor ~2-4% of the model's bytes.
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
  c.train = dict(ranks=(128, 256), target_recall=0.98, max_density_ratio=2.0, steps=300,
                 batch_size=256, learning_rate=3e-3, positive_weight=4.0)
  return c
