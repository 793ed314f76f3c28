"""Records activation statistics and trains neuron-activation predictors.

  python -m experiments.train_predictor --config=configs/sparse/tiny.py --workdir=/tmp/pred
"""

from absl import app, flags
from ml_collections import config_flags

from hetflow.bench.train_predictor import train_from_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/sparse/<name>.py",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where stats.npz and predictor/ go")


def main(argv):
  del argv
  train_from_config(_CONFIG.value, _WORKDIR.value or _CONFIG.value.workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
