"""Built-in strategies; importing this package registers them."""

from strategies import layerwise, neuron_cluster, resident, tensor_split
