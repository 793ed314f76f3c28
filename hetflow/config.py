"""Turning ml_collections configs into hetflow objects, early and with clear errors.

Every launcher's config has a `model` section:
  model.name        synthetic shape (hetflow.checkpoints.SHAPES), used when
                    model.checkpoint is empty
  model.checkpoint  path of a local HF checkpoint directory
  model.seed        seed of synthetic weights
  model.dtype       compute dtype: "float32", "bfloat16" or "float16"
  model.weights     weight format of the linear kernels: "float32", "bfloat16",
                    "int8", "int8-g32", "int4", "int4-asym", ... (hetflow/models/formats.py)
  model.kwargs      extra keyword arguments for synthetic_model (e.g. sparsity)
and, where it runs a strategy, `strategy.name`, `strategy.options` (fields of
that strategy's Options dataclass: hetflow.generation.options_section() holds
every option of every strategy, unset, so `--config.strategy.options.X=...`
works for any of them) and `budget` (device/host/disk sizes), and, where it
generates, `mesh.model`: shards of the model over that many devices or processes
(docs/distributed.md; the budget is then per device).
Every config may define `smoke`: nested overrides (a dict shaped like the
config) that make it a seconds-long run; the test suite applies them to
smoke-run every config.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from typing import Any, Sequence

import jax.numpy as jnp
import ml_collections

from hetflow.checkpoints import load_model, synthetic_model
from hetflow.memory.budget import Budget
from hetflow.models.formats import FormatError, WeightFormat
from hetflow.models.model import Model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
  """A config field or `--config.*` flag that does not exist, or holds a bad value."""


def did_you_mean(name: str, valid: Sequence[str]) -> str:
  """ " Did you mean 'x'?" for the closest valid name, or "" if none is close."""
  close = difflib.get_close_matches(name, list(valid), 1, 0.6)
  return f" Did you mean {close[0]!r}?" if close else ""


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
    try:
      WeightFormat.parse(weights)
    except FormatError as e:
      raise FormatError(f"model.weights: {e}") from None
  if section.get("checkpoint"):
    return load_model(section.checkpoint, dtype=dtype, weights=weights)
  kwargs = dict(section.get("kwargs") or {})
  return synthetic_model(section.name, seed=section.seed, dtype=dtype,
                         weights=weights or "float32", **kwargs)


def mesh_section(model: int = 1) -> ml_collections.ConfigDict:
  """A config's `mesh` section: `model` is the number of shards (1: one device)."""
  return ml_collections.ConfigDict(dict(model=model))


def build_mesh(section: Any) -> int | None:
  """The Engine's `mesh` argument from a config's `mesh` section (None: one device).

  Raises:
    ConfigError: a field other than `model`, or a size that is not an int >= 1.
  """
  if section is None:
    return None
  values = dict(section)
  extra = sorted(set(values) - {"model"})
  if extra:
    raise ConfigError(f"mesh.{extra[0]} is not a mesh field; the mesh section has one field,"
                      " 'model' (shards of the model, e.g. --config.mesh.model=2).")
  size = values.get("model", 1)
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    raise ConfigError(f"mesh.model={size!r}; expected an int >= 1 (shards of the model).")
  return None if size == 1 else size


def build_budget(section: Any) -> Budget:
  """The Budget of a config's `budget` section ("" or None: unlimited)."""
  if section is None:
    return Budget()
  try:
    return Budget.from_any({k: (v or None) for k, v in dict(section).items()})
  except ValueError as e:
    raise ConfigError(f"budget: {e}") from None


# -- command-line overrides ---------------------------------------------------------


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Runs a config file's `get_config` (spec "path.py" or "path.py:arg"), as
  ml_collections' config flags do."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--config={spec!r}: {path!r} is not a file; pass a config file such"
                      " as configs/default.py.")
  module_spec = importlib.util.spec_from_file_location("_hetflow_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_overrides(argv: Sequence[str], default: str, flag: str = "config") -> None:
  """Refuses `--config.a.b=...` flags that name no field, before absl parses them.

  ml_collections reports such a flag as a bare AttributeError (with a "did you
  mean" only for close names); this names the flag, the section and every
  field it does have.

  Args:
    argv: the command line (sys.argv).
    default: the config file used when argv has no `--config`.
    flag: the config flag's name.

  Raises:
    ConfigError: for the first override that names no field.
  """
  spec, paths = default, []
  for i, arg in enumerate(argv):
    if re.match(rf"^--?{flag}(=|$)", arg):
      spec = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
    m = re.match(rf"^--?(?:no)?{flag}\.([^=]+)", arg)
    if m:
      paths.append(m.group(1))
  if not paths:
    return
  config = load_config_file(spec)
  for path in paths:
    node, parts = config, path.split(".")
    for depth, key in enumerate(parts):
      here = ".".join([flag] + parts[:depth])
      if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"--{flag}.{path}: {here} is a value ({type(node).__name__}),"
                          " not a section with fields.")
      if key not in node:
        fields = sorted(node.keys())
        raise ConfigError(
            f"--{flag}.{path}: {here} has no field {key!r};"
            f" its fields are {fields}.{did_you_mean(key, fields)}")
      node = node[key]


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
