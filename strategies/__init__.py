"""Built-in strategies: importing this package registers them.

Each is one module or package holding its Options, its Strategy and its cost
model; setup.cfg lists them in the `hetflow.strategies` entry-point group, the
way a third-party strategy registers, so `hetflow.get_strategy` finds them
without importing this package.
"""

from strategies import layerwise, moe_offload, neuron_cluster, resident, tensor_split
