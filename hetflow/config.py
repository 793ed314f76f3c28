"""Turning ml_collections configs into hetflow objects, early and with clear errors.

Every launcher's config has a `model` section:
  model.name        synthetic shape (hetflow.checkpoints.SHAPES), used when
                    model.checkpoint is empty
  model.checkpoint  path of a local HF checkpoint directory
  model.seed        seed of synthetic weights
  model.dtype       compute dtype: "float32", "bfloat16" or "float16"
  model.weights     weight format of the linear kernels: "float32", "bfloat16",
                    "int8", "int8-g32", "int4", "int4-asym", ... (hetflow/formats.py)
  model.kwargs      extra keyword arguments for synthetic_model (e.g. sparsity)
and, where it runs a strategy, `strategy.name`, `strategy.options` (fields of
that strategy's Options dataclass) and `budget` (device/host/disk sizes).
Every config may define `smoke`: nested overrides (a dict shaped like the
config) that make it a seconds-long run; the test suite applies them to
smoke-run every config.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from hetflow.checkpoints import load_model, synthetic_model
from hetflow.formats import WeightFormat
from hetflow.memory.budget import Budget
from hetflow.models.model import Model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_section(name: str = "llama-tiny", checkpoint: str = "", seed: int = 0,
                  dtype: str = "float32", weights: str = "float32") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name=name, checkpoint=checkpoint, seed=seed,
                                        dtype=dtype, weights=weights, kwargs={}))


def build_model(section: Any) -> Model:
  """The Model a config's `model` section describes."""
  if section.dtype not in DTYPES:
    raise ValueError(f"model.dtype={section.dtype!r}; expected one of {sorted(DTYPES)}.")
  dtype = DTYPES[section.dtype]
  weights = section.get("weights") or None
  if weights is not None:
    WeightFormat.parse(weights)  # a bad name fails here, naming model.weights
  if section.get("checkpoint"):
    return load_model(section.checkpoint, dtype=dtype, weights=weights)
  kwargs = dict(section.get("kwargs") or {})
  return synthetic_model(section.name, seed=section.seed, dtype=dtype,
                         weights=weights or "float32", **kwargs)


def build_budget(section: Any) -> Budget:
  if section is None:
    return Budget()
  return Budget.from_any({k: (v or None) for k, v in dict(section).items()})


def to_dict(section: Any) -> dict[str, Any]:
  """A (possibly nested) ConfigDict as plain dicts, for dataclass options."""
  if isinstance(section, ml_collections.ConfigDict):
    return {k: to_dict(v) for k, v in section.items()}
  return section


def apply_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with its nested `smoke` overrides merged in."""
  merged = config.to_dict()

  def merge(node, overrides):
    for key, value in overrides.items():
      if isinstance(value, dict) and isinstance(node.get(key), dict):
        merge(node[key], value)
      else:
        node[key] = value

  merge(merged, merged.pop("smoke", None) or {})
  return ml_collections.ConfigDict(merged)
