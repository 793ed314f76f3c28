"""hetflow: run large language models on machines too small for them.

  model = hetflow.load_model("path/to/hf_dir")         # or synthetic_model("llama-1b")
  engine = hetflow.Engine(model, strategy="layerwise",
                          budget=hetflow.Budget(device="512MiB", host="4GiB"))
  out = engine.generate(ids, max_new_tokens=32)
  ranked = hetflow.plan(model, hetflow.Budget(device="1GiB"))  # strategies ranked, predicted
"""

from hetflow.checkpoints import CheckpointError, load_model, save_hf, synthetic_model
from hetflow.engine import Engine, GenerationOutput, SamplingOptions
from hetflow.memory.budget import Budget, BudgetExceeded, MemoryLedger
from hetflow.models import Model, ModelConfig
from hetflow.planner import plan
from hetflow.strategy import (
                              GroupPlacement,
                              Placement,
                              Strategy,
                              available_strategies,
                              get_strategy,
                              register_strategy,
)

__version__ = "0.1.0"
