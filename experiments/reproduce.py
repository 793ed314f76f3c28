"""Predict a paper's figure with the simulator and print it next to the paper's values.

  python -m experiments.reproduce --config=configs/hetegen/fig8.py --workdir=/tmp/fig8
"""

from absl import app, flags
from ml_collections import config_flags

from hetflow.bench.reproduce import run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/hetegen/fig8.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/hetflow-reproduce", "where the table and plot go")


def main(argv):
  del argv
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
