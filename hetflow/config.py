"""Turning ml_collections configs into hetflow objects, early and with clear errors.

Every launcher's config has a `model` section:
  model.name        synthetic shape (hetflow.checkpoints.SHAPES), used when
                    model.checkpoint is empty
  model.checkpoint  path of a local HF checkpoint directory
  model.seed        seed of synthetic weights
  model.dtype       compute dtype: "float32", "bfloat16" or "float16"
  model.kwargs      extra keyword arguments for synthetic_model (e.g. sparsity)
and, where it runs a strategy, `strategy.name`, `strategy.options` (fields of
that strategy's Options dataclass: `options_section()` holds every option of
every strategy, unset, so `--config.strategy.options.X=...` works for any of
them) and `budget` (device/host/disk sizes).
Every config may define `smoke`: nested overrides (a dict shaped like the
config) that make it a seconds-long run; the test suite applies them to
smoke-run every config.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import types
import typing
from typing import Any, Literal, Sequence, Union

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from hetflow.checkpoints import load_model, synthetic_model
from hetflow.memory.budget import Budget
from hetflow.models.model import Model
from hetflow.strategy import available_strategies, get_strategy

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
  """A config field or `--config.*` flag that does not exist, or holds a bad value."""


def _did_you_mean(name: str, valid: Sequence[str]) -> str:
  close = difflib.get_close_matches(name, list(valid), 1, 0.6)
  return f" Did you mean {close[0]!r}?" if close else ""


def model_section(name: str = "llama-tiny", checkpoint: str = "", seed: int = 0,
                  dtype: str = "float32") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name=name, checkpoint=checkpoint, seed=seed,
                                        dtype=dtype, kwargs={}))


def build_model(section: Any) -> Model:
  """The Model a config's `model` section describes."""
  if section.dtype not in DTYPES:
    raise ValueError(f"model.dtype={section.dtype!r}; expected one of {sorted(DTYPES)}.")
  dtype = DTYPES[section.dtype]
  if section.get("checkpoint"):
    return load_model(section.checkpoint, dtype=dtype)
  kwargs = dict(section.get("kwargs") or {})
  return synthetic_model(section.name, seed=section.seed, dtype=dtype, **kwargs)


def build_budget(section: Any) -> Budget:
  """The Budget of a config's `budget` section ("" or None: unlimited)."""
  if section is None:
    return Budget()
  try:
    return Budget.from_any({k: (v or None) for k, v in dict(section).items()})
  except ValueError as e:
    raise ConfigError(f"budget: {e}") from None


# -- strategy options --------------------------------------------------------------


def _flag_type(hint: Any) -> type:
  """The type a command-line flag parses an option of annotation `hint` as.

  Optional[X] parses as X (None stays the strategy's default); Literal strings and
  byte sizes (int | str) parse as str; anything else mixed (int | "auto") parses
  as a Python literal, and the Options dataclass checks it.
  """
  args = [a for a in (typing.get_args(hint) if _is_union(hint) else (hint,))
          if a is not type(None)]
  kinds = set()
  for a in args:
    if typing.get_origin(a) is Literal:
      kinds.update(type(v) for v in typing.get_args(a))
    else:
      kinds.add(a)
  if len(kinds) == 1 and next(iter(kinds)) in (bool, int, float, str):
    return next(iter(kinds))
  if kinds == {int, str}:
    return object if any(typing.get_origin(a) is Literal for a in args) else str
  return object


def _is_union(hint: Any) -> bool:
  return typing.get_origin(hint) in (Union, types.UnionType)


def _matches(value: Any, hint: Any) -> bool:
  """Whether `value` is of the annotated type (enough for option checking)."""
  if hint is Any:
    return True
  if _is_union(hint):
    return any(_matches(value, a) for a in typing.get_args(hint))
  if typing.get_origin(hint) is Literal:
    return value in typing.get_args(hint)
  if hint is type(None):
    return value is None
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  origin = typing.get_origin(hint) or hint
  return not isinstance(origin, type) or isinstance(value, origin)


def _describe(hint: Any) -> str:
  if _is_union(hint):
    return " or ".join(_describe(a) for a in typing.get_args(hint))
  if typing.get_origin(hint) is Literal:
    return " or ".join(repr(v) for v in typing.get_args(hint))
  return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def options_section() -> ml_collections.ConfigDict:
  """Every option of every registered strategy, unset (None: the strategy's default).

  A launcher's `strategy.options` is this section, so each option can be set
  with `--config.strategy.options.<name>=...`, and a misspelt name is refused
  by ml_collections with its "did you mean" (and by `check_overrides` with the
  list of valid names). `build_options` keeps only what was set.
  """
  kinds: dict[str, type] = {}
  for name in available_strategies():
    hints = typing.get_type_hints(get_strategy(name).Options)
    for f in dataclasses.fields(get_strategy(name).Options):
      kind = _flag_type(hints[f.name])
      # An option two strategies type differently parses as a literal.
      kinds[f.name] = kind if kinds.get(f.name, kind) is kind else object
  return ml_collections.ConfigDict(
      {k: config_dict.placeholder(kinds[k]) for k in sorted(kinds)})


def strategy_class(name: str) -> type:
  """The registered strategy `name`; a ConfigError naming the valid ones otherwise."""
  names = available_strategies()
  if name not in names:
    raise ConfigError(f"strategy.name={name!r} is not a strategy; the strategies are"
                      f" {names + ['auto']}.{_did_you_mean(str(name), names)}")
  return get_strategy(name)


def build_options(strategy: str, section: Any) -> Any:
  """The strategy's Options from a config's `strategy.options` (None if none is set).

  Args:
    strategy: the registered strategy name, or "auto" (which takes no options).
    section: a ConfigDict or dict of option values; None values are unset.

  Returns:
    An instance of the strategy's Options dataclass, or None (the defaults).

  Raises:
    ConfigError: for an unknown strategy, or naming the option that the
      strategy does not have (with the names it has) or whose value is of the
      wrong type or refused by the Options dataclass.
  """
  values = {k: v for k, v in (to_dict(section) or {}).items() if v is not None}
  if strategy == "auto":
    if values:
      raise ConfigError(
          f"strategy.options {sorted(values)} were set with strategy.name='auto', which picks"
          " its own options; name a strategy to set its options, or unset them.")
    return None
  cls = strategy_class(strategy).Options
  if not values:
    return None
  hints = typing.get_type_hints(cls)
  fields = [f.name for f in dataclasses.fields(cls)]
  for key, value in sorted(values.items()):
    if key not in fields:
      owners = [n for n in available_strategies()
                if key in {f.name for f in dataclasses.fields(get_strategy(n).Options)}]
      where = (f" (it is an option of {owners}: set strategy.name to one of them, or drop"
               " the option)") if owners else ""
      valid = f"its options are {fields}" if fields else "it has no options"
      raise ConfigError(
          f"strategy.options.{key} is not an option of strategy {strategy!r}{where};"
          f" {valid}.{_did_you_mean(key, fields)}")
    if not _matches(value, hints[key]):
      raise ConfigError(
          f"strategy.options.{key}={value!r} ({type(value).__name__}); the {strategy!r}"
          f" strategy expects {_describe(hints[key])}.")
  try:
    return cls(**values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"strategy.options of {strategy!r}: {e}") from None


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
            f" its fields are {fields}.{_did_you_mean(key, fields)}")
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
