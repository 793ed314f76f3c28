"""Flax models: Llama family (incl. ReLU/dReLU), OPT, Mixtral. Pure: no tiers."""

from hetflow.models.config import ModelConfig, SUPPORTED_ACTIVATIONS
from hetflow.models.model import (Model, ModelFunctions, WeightSource, forward_reference,
                                  group_of, parameter_shapes, unflatten)
from hetflow.models import layers, modules
