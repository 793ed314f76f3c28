"""hetflow: run large language models on machines too small for them.

  model = hetflow.load_model("path/to/hf_dir")         # or synthetic_model("llama-1b")
  engine = hetflow.Engine(model, strategy="layerwise",
                          budget=hetflow.Budget(device="512MiB", host="4GiB"))
  out = engine.generate(ids, max_new_tokens=32)
  ranked = hetflow.plan(model, hetflow.Budget(device="1GiB"))  # strategies ranked, predicted

This package is the composition root (docs/architecture.md): it re-exports the
public names and registers `strategy="auto"`, the planner's choice on this
machine's profile, with the engine's strategy registry.
"""

from hetflow.bench.machine import choose as _choose_auto
from hetflow.bench.machine import plan
from hetflow.checkpoints import CheckpointError, load_model, save_hf, synthetic_model
from hetflow.engine import Engine, GenerationOutput, SamplingOptions
from hetflow.memory.budget import Budget, BudgetExceeded, MemoryLedger
from hetflow.models import Model, ModelConfig
from hetflow.strategy import (
                              GroupPlacement,
                              NotApplicable,
                              PhaseCounters,
                              Placement,
                              Strategy,
                              StrategyStats,
                              available_strategies,
                              get_strategy,
                              register_resolver,
                              register_strategy,
)

register_resolver("auto", _choose_auto)

__version__ = "0.1.0"
