"""Generate tokens with any model, strategy and budget.

  python -m experiments.generate --config=configs/default.py
  python -m experiments.generate --config=configs/default.py --config.strategy.name=layerwise
  python -m experiments.generate --config=configs/default.py --config.strategy.name=layerwise \
      --config.strategy.options.store_dir=/tmp/stores/llama-1b

A flag that names no config field, an option the strategy does not have, or a
checkpoint hetflow cannot read ends the run with "error: ..." and exit status 1.
"""

import sys

from absl import app
from ml_collections import config_flags

from hetflow import config as config_lib
from hetflow.checkpoints import CheckpointError
from hetflow.generation import generate

_DEFAULT = "configs/default.py"
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, lock_config=True)


def main(argv):
  del argv
  try:
    generate(_CONFIG.value)
  except (config_lib.ConfigError, CheckpointError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  try:
    config_lib.check_overrides(sys.argv, _DEFAULT)
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  app.run(main)
