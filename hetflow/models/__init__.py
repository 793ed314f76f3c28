"""Flax models: Llama family (incl. ReLU/dReLU), OPT, Mixtral. Pure: no tiers."""

from hetflow.models import layers, modules
from hetflow.models.config import SUPPORTED_ACTIVATIONS, ModelConfig
from hetflow.models.model import (
                                  Model,
                                  ModelFunctions,
                                  WeightSource,
                                  forward_reference,
                                  group_of,
                                  parameter_shapes,
                                  unflatten,
)
