"""Named synthetic models: the dense shapes (synthetic.py), the sparse ones
(sparse.py) and the routed MoE ones (moe.py), behind one name, so none of those
modules needs another's."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from hetflow.checkpoints.moe import SUFFIX as ROUTED
from hetflow.checkpoints.moe import moe_model
from hetflow.checkpoints.moe_sparse import is_moe_sparse_name, moe_sparse_model
from hetflow.checkpoints.sparse import sparse_model
from hetflow.checkpoints.synthetic import dense_model
from hetflow.models.model import Model


def synthetic_model(name: str, seed: int = 0, dtype: Any = jnp.float32,
                    weights: str = "float32", **kwargs) -> Model:
  """A deterministic random model of a named shape (hetflow.checkpoints.SHAPES).

  Names ending in "-sparse" ("llama-1b-sparse", "opt-tiny-sparse", ...) are
  models with true activation sparsity; they take `sparsity=`, `hotness=` and
  the other keyword arguments of hetflow.checkpoints.sparse.sparse_model.
  Names ending in "-routed" ("mixtral-1b-routed", "mixtral-tiny-8e-routed") are
  MoE models whose routing has a stated expert popularity and reuse; they take
  `popularity=`, `reuse=` and the other keyword arguments of
  hetflow.checkpoints.moe.moe_model.
  Mixtral shapes ending in "-sparse" ("mixtral-1b-sparse", "mixtral-tiny-8e-sparse") are
  routed MoE models with sparse dReLU experts (TurboSparse-Mixtral); they take both sets
  of arguments (hetflow.checkpoints.moe_sparse.moe_sparse_model).
  `weights` is the format of the linear kernels (hetflow/models/formats.py):
  each kernel is generated in float32 and quantized when a strategy places it.
  """
  if is_moe_sparse_name(name):
    model = moe_sparse_model(name, seed=seed, dtype=dtype, **kwargs)
  elif name.endswith("-sparse"):
    model = sparse_model(name, seed=seed, dtype=dtype, **kwargs)
  elif name.endswith(ROUTED):
    model = moe_model(name, seed=seed, dtype=dtype, **kwargs)
  elif kwargs:
    raise TypeError(f"unexpected arguments {sorted(kwargs)} for {name!r} (not a -sparse or"
                    " -routed model).")
  else:
    model = dense_model(name, seed, dtype)
  return model if weights == "float32" else dataclasses.replace(model, weights=weights)
