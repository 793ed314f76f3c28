"""Per-expert predictors for mixtral-tiny-8e-sparse (moe_sparse's trained path).

Run:
  python -m experiments.train_predictor --config=configs/sparse/mixtral_tiny.py \
      --workdir=/tmp/pred-mixtral-tiny
then moe_sparse with neurons=dict(predictor="trained",
predictor_path="/tmp/pred-mixtral-tiny/predictor",
stats_path="/tmp/pred-mixtral-tiny/stats.npz").
Hardware: any CPU; ~10-20 s on the 2-core machines here.
The "layers" are the experts (virtual layer i * 8 + e, hetflow/sparsity/experts.py):
one rank-r truncated SVD of each expert's exact gate map; each expert's pairs are the
tokens routed to it, its threshold set on decode steps of held-out generations.
Expect: density per routed expert ~0.15 on the calibration prompts, ~0.25 on decode
steps (short contexts fire more, WORKSPACE_NOTES.md issue 14); recall near 0.99 (the
target) on decode steps used neither to train nor to set the thresholds
(tests/test_moe_sparse_trained.py measures it).
"""

import ml_collections

from hetflow.config import model_section


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.model = model_section("mixtral-tiny-8e-sparse")
  # As tests/test_moe_sparse.py's model (same bits, same cached calibration).
  c.model.kwargs = dict(sparsity=0.85, hotness="zipf:1.1", popularity="zipf:0.5", reuse=0.45,
                        calibration_tokens=4096)
  c.workdir = "/tmp/pred-mixtral-tiny"
  c.calibration_tokens = 2048
  c.seed = 0
  c.threshold = 0.0
  # Decode-step samples, split by prompt: half to train, a quarter for the thresholds, a
  # quarter for the report. Each expert sees about k / X = 1/4 of them.
  c.decode = dict(prompts=64, prompt_tokens=16, new_tokens=16)
  c.train = dict(method="svd", ranks=(8, 16, 32), target_recall=0.99, max_density_ratio=2.0)
  c.smoke = {"calibration_tokens": 256, "decode": {"prompts": 4, "new_tokens": 4},
             "train": {"ranks": (8,)}}
  return c
