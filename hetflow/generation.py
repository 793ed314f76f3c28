"""`python -m experiments.generate`: load a model, generate, print stats."""

from __future__ import annotations

import sys

import numpy as np

from hetflow import config as config_lib
from hetflow.engine import Engine, GenerationOutput
from hetflow.memory.budget import format_bytes


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
  options = config_lib.build_options(config.strategy.name, config.strategy.get("options"))
  budget = config_lib.build_budget(config.get("budget"))
  model = config_lib.build_model(config.model)
  print(f"model: {model.description} ({model.config.arch}, {model.config.num_layers} layers,"
        f" {format_bytes(model.nbytes)} in {config.model.dtype})", file=out)
  engine = Engine(model, strategy=config.strategy.name, budget=budget, options=options)
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
