"""`python -m experiments.generate`: load a model, generate, print stats.

Also the config section of strategy options (`options_section`, `build_options`):
it needs the strategy registry, a layer above hetflow.config.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, Literal, Union

import ml_collections
import numpy as np
from ml_collections import config_dict

from hetflow import config as config_lib
from hetflow.engine import Engine, GenerationOutput
from hetflow.memory.budget import format_bytes
from hetflow.strategy import available_strategies, get_strategy


def generate(config, out=sys.stdout) -> GenerationOutput:
  """Runs the generation a config describes and prints text/ids and a stats table.

  Args:
    config: ConfigDict with model, strategy, budget, prompt, batch_size,
      max_new_tokens, temperature, top_k, top_p, seed (see configs/default.py).
    out: where to print.

  Returns:
    The GenerationOutput.
  """
  # Everything a config names is checked before the model is loaded.
  options = build_options(config.strategy.name, config.strategy.get("options"))
  budget = config_lib.build_budget(config.get("budget"))
  mesh = config_lib.build_mesh(config.get("mesh"))
  model = config_lib.build_model(config.model)
  print(f"model: {model.description} ({model.config.arch}, {model.config.num_layers} layers,"
        f" {format_bytes(model.nbytes)} in {config.model.dtype})", file=out)
  engine = Engine(model, strategy=config.strategy.name, budget=budget, options=options,
                  mesh=mesh)
  print(engine.placement, file=out)
  prompt = config.prompt
  if isinstance(prompt, str) and model.tokenizer is None:
    # No tokenizer (synthetic models): a fixed id prompt, the same every run.
    prompt = list(np.random.default_rng(0).integers(3, model.config.vocab_size, 16))
  prompts = [prompt] * config.batch_size
  with engine:
    result = engine.generate(prompts, max_new_tokens=config.max_new_tokens,
                             temperature=config.temperature, top_k=config.top_k,
                             top_p=config.top_p, seed=config.seed)
  if result.text is not None:
    for text in result.text:
      print(f"> {text}", file=out)
  else:
    for row in result.tokens:
      print("tokens:", " ".join(map(str, row)), file=out)
  print(format_stats(result.stats), file=out)
  return result


def format_stats(stats) -> str:
  rows = [("prompt tokens", stats["prompt_tokens"]),
          ("time to first token", f"{stats['prefill_s'] * 1e3:.1f} ms"),
          ("new tokens", stats["new_tokens"]),
          ("decode", f"{stats['decode_tokens_per_s']:.2f} tok/s"),
          ("compilations", stats["recompilations"])]
  for tier, info in stats["ledger"]["tiers"].items():
    if info["peak"]:
      rows.append((f"peak {tier}", format_bytes(info["peak"])))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# -- strategy options (the registry is a layer above hetflow.config) ---------------


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
  by ml_collections with its "did you mean" (and by hetflow.config's
  `check_overrides` with the
  list of valid names). `build_options` keeps only what was set. Launchers' configs use it
  (configs/default.py).
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
    raise config_lib.ConfigError(f"strategy.name={name!r} is not a strategy; the strategies are"
                      f" {names + ['auto']}.{config_lib.did_you_mean(str(name), names)}")
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
  values = {k: v for k, v in (config_lib.to_dict(section) or {}).items() if v is not None}
  if strategy == "auto":
    if values:
      raise config_lib.ConfigError(
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
      raise config_lib.ConfigError(
          f"strategy.options.{key} is not an option of strategy {strategy!r}{where};"
          f" {valid}.{config_lib.did_you_mean(key, fields)}")
    if not _matches(value, hints[key]):
      raise config_lib.ConfigError(
          f"strategy.options.{key}={value!r} ({type(value).__name__}); the {strategy!r}"
          f" strategy expects {_describe(hints[key])}.")
  try:
    return cls(**values)
  except (TypeError, ValueError) as e:
    raise config_lib.ConfigError(f"strategy.options of {strategy!r}: {e}") from None
