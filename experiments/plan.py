"""Rank every strategy's plans for a model and budget; optionally measure the top ones.

  python -m experiments.plan --config=configs/plan/llama1b.py
  python -m experiments.plan --config=configs/plan/llama1b.py --config.run=true \
      --workdir=/tmp/plan
"""

from absl import app, flags
from ml_collections import config_flags

from hetflow.bench import plan_run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/plan/llama1b.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/hetflow-plan", "where --run writes results")


def main(argv):
  del argv
  plan_run.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
