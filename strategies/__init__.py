"""Built-in strategies; importing this package registers them."""

from strategies import resident
from strategies import layerwise
from strategies import tensor_split
from strategies import neuron_cluster
