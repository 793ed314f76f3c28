"""Generate tokens with any model, strategy and budget.

  python -m experiments.generate --config=configs/default.py
  python -m experiments.generate --config=configs/default.py --config.strategy.name=layerwise
"""

from absl import app
from ml_collections import config_flags

from hetflow.generation import generate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", lock_config=True)


def main(argv):
  del argv
  generate(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
