"""Generate tokens with any model, strategy and budget.

  python -m experiments.generate --config=configs/default.py
  python -m experiments.generate --config=configs/default.py --config.strategy.name=layerwise
  python -m experiments.generate --config=configs/default.py --config.strategy.name=layerwise \
      --config.strategy.options.store_dir=/tmp/stores/llama-1b

Several processes (one per host; docs/distributed.md), each with the same flags:
  python -m experiments.generate --config=configs/default.py --config.mesh.model=2 \
      --coordinator=HOST0:12355 --num_processes=2 --process_id=0   # on host 0
  ... --process_id=1                                                # on host 1
(or $HETFLOW_COORDINATOR, $HETFLOW_NUM_PROCESSES, $HETFLOW_PROCESS_ID, which
`python -m hetflow.launch` sets for N processes on this machine).

A flag that names no config field, an option the strategy does not have, or a
checkpoint hetflow cannot read ends the run with "error: ..." and exit status 1.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from hetflow import config as config_lib
from hetflow import distributed
from hetflow.checkpoints import CheckpointError
from hetflow.generation import generate
from hetflow.models.sharding import ShardingError
from hetflow.strategy import NotApplicable

_DEFAULT = "configs/default.py"
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, lock_config=True)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (several"
                                   " processes; default $HETFLOW_COORDINATOR)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run (default"
                                      " $HETFLOW_NUM_PROCESSES; none: one process)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (default"
                                   " $HETFLOW_PROCESS_ID)")


def main(argv):
  del argv
  try:
    # Before anything starts a jax backend.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    generate(_CONFIG.value)
  except (config_lib.ConfigError, CheckpointError, distributed.DistributedError,
          ShardingError, NotApplicable) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  try:
    config_lib.check_overrides(sys.argv, _DEFAULT)
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  app.run(main)
