"""hetflow: run large language models on machines too small for them."""

from hetflow.checkpoints import CheckpointError, load_model, save_hf, synthetic_model
from hetflow.models import Model, ModelConfig
