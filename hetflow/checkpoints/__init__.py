"""Reading HF safetensors directories lazily; synthetic models; writing HF dirs."""

from hetflow.checkpoints.hf import CheckpointError, load_hf
from hetflow.checkpoints.hf_names import config_from_hf, config_to_hf
from hetflow.checkpoints.load import load_model
from hetflow.checkpoints.named import synthetic_model
from hetflow.checkpoints.synthetic import SHAPES, save_hf, synthetic_config
