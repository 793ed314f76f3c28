"""`neuron_cluster` (PowerInfer-2): the strategy (strategy.py) and its cost model (cost.py)."""

from strategies.neuron_cluster.cost import NeuronClusterSettings, shape_placement
from strategies.neuron_cluster.strategy import NeuronCluster, NeuronClusterOptions
