"""Run a benchmark config: several systems on one model and budget, side by side.

  python -m experiments.benchmark --config=configs/bench/tiny.py --workdir=/tmp/bench-tiny
  python -m experiments.benchmark --config=configs/bench/llama1b_disk.py --workdir=/tmp/bench-disk \
      --config.new_tokens=8 --config.profile_trace=True

Writes results.json, results.md and timeline.png into --workdir (see hetflow/bench/runner.py).
"""

from absl import app, flags
from ml_collections import config_flags

from hetflow.bench.runner import benchmark

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/bench/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "./results/bench", "Where results are written.")


def main(argv):
  del argv
  benchmark(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
