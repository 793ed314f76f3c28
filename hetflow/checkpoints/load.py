"""`load_model`: a checkpoint by its path, whichever kind it is."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from hetflow.checkpoints.hf import load_hf
from hetflow.models.model import Model


def load_model(path: str, dtype: Any = jnp.float32, weights: str | None = None) -> Model:
  """Loads a checkpoint lazily: an HF directory, or a llama-family *.gguf file.

  Args:
    path: a directory with config.json and *.safetensors
      (hetflow/checkpoints/hf.py), or a GGUF file (hetflow/checkpoints/gguf.py).
    dtype: compute dtype of activations (and of every tensor not in `weights`).
    weights: weight format of the linear kernels ("float32", "bfloat16",
      "int8", "int8-g32", "int4", "int4-asym", ...; hetflow/models/formats.py),
      quantized once, tensor by tensor, as a strategy places them. None:
      float32 for an HF directory, the format of its kernels for a GGUF file.

  Returns:
    A Model whose tensors are read on demand.

  Raises:
    CheckpointError: naming the missing or bad file, field or tensor.
  """
  path = os.fspath(path)
  if path.endswith(".gguf") and os.path.isfile(path):
    from hetflow.checkpoints import gguf  # the gguf package is needed only for GGUF files
    return gguf.load_gguf(path, dtype=dtype, weights=weights)
  return load_hf(path, dtype=dtype, weights=weights)
