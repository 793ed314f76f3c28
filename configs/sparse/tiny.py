"""Predictors for llama-tiny-sparse (or opt-tiny-sparse with :opt).

Run:
  python -m experiments.train_predictor --config=configs/sparse/tiny.py --workdir=/tmp/pred-tiny
Hardware: any CPU; ~20 s on the 2-core machines here.
Expect: measured density ~0.1 per layer; recall ~0.99 (the target) at
predicted density ~0.2-0.35 (precision ~0.3-0.5) per layer.
"""

import ml_collections

from hetflow.config import model_section


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  name = "opt-tiny-sparse" if arg == "opt" else "llama-tiny-sparse"
  c.model = model_section(name)
  c.model.kwargs = dict(sparsity=0.9, hotness="zipf:1.1")
  c.workdir = "/tmp/pred-tiny"
  c.calibration_tokens = 2048
  c.seed = 0
  c.threshold = 0.0
  c.train = dict(ranks=(16, 32), target_recall=0.99, max_density_ratio=2.0, steps=300,
                 batch_size=256, learning_rate=3e-3, positive_weight=4.0)
  return c
