"""Named synthetic models: the dense shapes (synthetic.py) and the sparse ones
(sparse.py), behind one name, so neither module needs the other's."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from hetflow.checkpoints.sparse import sparse_model
from hetflow.checkpoints.synthetic import dense_model
from hetflow.models.model import Model


def synthetic_model(name: str, seed: int = 0, dtype: Any = jnp.float32,
                    weights: str = "float32", **kwargs) -> Model:
  """A deterministic random model of a named shape (hetflow.checkpoints.SHAPES).

  Names ending in "-sparse" ("llama-1b-sparse", "opt-tiny-sparse", ...) are
  models with true activation sparsity; they take `sparsity=`, `hotness=` and
  the other keyword arguments of hetflow.checkpoints.sparse.sparse_model.
  `weights` is the format of the linear kernels (hetflow/models/formats.py):
  each kernel is generated in float32 and quantized when a strategy places it.
  """
  if name.endswith("-sparse"):
    model = sparse_model(name, seed=seed, dtype=dtype, **kwargs)
  elif kwargs:
    raise TypeError(f"unexpected arguments {sorted(kwargs)} for {name!r} (not a -sparse model).")
  else:
    model = dense_model(name, seed, dtype)
  return model if weights == "float32" else dataclasses.replace(model, weights=weights)
