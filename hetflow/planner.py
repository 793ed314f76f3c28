"""Choosing a strategy for a budget: plan every candidate, predict it, rank.

Like llama.cpp's automatic fitting or Accelerate's device_map="auto", but
across strategies: every registered strategy proposes option sets
(`Strategy.candidates`), plans each within the budget (pure, no I/O), and its
own cost model, run by the simulator (hetflow.simulate), predicts its prefill
and decode time on a HardwareProfile. Plans that cannot fit or cannot be
predicted say why; none is dropped silently.

Measuring this machine's profile is a measurement driver's job, above this
layer (hetflow.bench.machine); `hetflow.plan` and `Engine(strategy="auto")`
compose the two.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hetflow import simulate
from hetflow.hardware import get_profile
from hetflow.memory.budget import Budget, BudgetExceeded, format_bytes
from hetflow.models.model import Model
from hetflow.strategy import NotApplicable, Placement, available_strategies, get_strategy


@dataclasses.dataclass(frozen=True)
class RankedPlan:
  """One candidate: a strategy with options, its placement and prediction.

  Attributes:
    strategy: registered strategy name.
    options: the strategy's Options instance.
    placement: its plan, or None if it does not fit the budget.
    prediction: the simulator's Prediction, or None if infeasible.
    reason: why it ranks where it does (the bottleneck), or why it cannot run.
  """

  strategy: str
  options: Any
  placement: Placement | None
  prediction: simulate.Prediction | None
  reason: str

  @property
  def feasible(self) -> bool:
    return self.prediction is not None

  def __str__(self) -> str:
    if not self.feasible:
      return f"{self.label()}: {self.reason}"
    return f"{self.placement}\n  predicted decode: {self.prediction}\n  {self.reason}"

  def label(self) -> str:
    defaults = type(self.options)()
    changed = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)
               if getattr(self.options, f.name) != getattr(defaults, f.name)}
    inner = ", ".join(f"{k}={v}" for k, v in changed.items())
    return f"{self.strategy}({inner})"


def plan(model: Model, budget: Any = None, profile: Any = None, batch: int = 1,
         prompt_len: int = 128, new_tokens: int = 64,
         strategies: list[str] | None = None) -> list[RankedPlan]:
  """Every strategy's candidate plans for `model` within `budget`, best first.

  Args:
    model: shapes are all that is used; no weights are read.
    budget: hetflow.Budget (or dict / None).
    profile: HardwareProfile, a named profile or a JSON path (this machine's,
      measured and cached: hetflow.bench.machine.machine_profile).
    batch, prompt_len, new_tokens: the workload to predict.
    strategies: names to consider (default: every registered one).

  Returns:
    Feasible plans sorted by predicted decode time per token, then the
    infeasible ones with the reason.
  """
  budget = Budget.from_any(budget)
  if profile is None:
    raise ValueError("the planner predicts on a HardwareProfile: pass one (a named profile,"
                     " a JSON path), or call hetflow.plan, which measures this machine once.")
  profile = get_profile(profile)
  ranked: list[RankedPlan] = []
  for name in strategies or available_strategies():
    cls = get_strategy(name)
    if cls.cost_model is None:
      ranked.append(RankedPlan(name, cls.Options(), None, None,
                               "cannot be predicted: no cost model"))
      continue
    for options in cls.candidates(model, budget):
      try:
        placement = cls(options).plan(model, budget, profile)
        prediction = simulate.predict(model, placement, profile, batch, prompt_len, new_tokens)
      except BudgetExceeded as e:
        ranked.append(RankedPlan(name, options, None, None, f"does not fit: {e}"))
        continue
      except NotApplicable as e:  # e.g. a dense model offered to a sparse strategy, or a
        # sparse one whose activation frequencies the cost model does not know
        ranked.append(RankedPlan(name, options, None, None, f"not applicable: {e}"))
        continue
      tiers = placement.bytes_per_tier()
      reason = (f"decode bound by {prediction.bottleneck}; device {format_bytes(tiers['device'])},"
                f" host {format_bytes(tiers['host'])}, disk {format_bytes(tiers['disk'])}")
      reason += "".join(f"; {note}" for note in placement.notes if note.startswith("needs:"))
      ranked.append(RankedPlan(name, options, placement, prediction, reason))
  feasible = sorted((r for r in ranked if r.feasible),
                    key=lambda r: r.prediction.decode_s_per_token)
  return feasible + [r for r in ranked if not r.feasible]


def plan_config(model: str, device: str, host: str = "", smoke: dict | None = None,
                **overrides):
  """A config for `python -m experiments.plan` with its defaults; configs state only what differs.

  Fields:
    model: the model section (hetflow.config.model_section(model)).
    budget: device / host / disk sizes ("" = unlimited).
    profile: "" = this machine's (measured once and cached; each model's decode
      costs calibrated once), or a named profile or a JSON path.
    prompt_tokens, new_tokens: the workload predicted (and run).
    run: also run the top `run_top` plans and print predicted next to measured.
    timeout_s: per run.
    smoke: overrides for the test suite's smoke run (tests/test_configs.py).
  """
  import ml_collections

  from hetflow.config import model_section

  c = ml_collections.ConfigDict()
  c.model = model_section(model)
  c.budget = ml_collections.ConfigDict(dict(device=device, host=host, disk=""))
  c.profile = ""
  c.prompt_tokens = 16
  c.new_tokens = 16
  c.run = False
  c.run_top = 3
  c.timeout_s = 1800
  c.smoke = smoke or {}
  c.update(overrides)
  return c


def format_table(ranked: list[RankedPlan]) -> str:
  """The ranking as a Markdown table."""
  lines = ["| rank | plan | prefill (s) | decode (tok/s) | why |", "|---|---|---|---|---|"]
  for i, r in enumerate(ranked):
    if r.feasible:
      p = r.prediction
      lines.append(f"| {i + 1} | {r.label()} | {p.prefill_s:.3f} | {p.decode_tokens_per_s:.2f}"
                   f" | {r.reason} |")
    else:
      lines.append(f"| - | {r.label()} | - | - | {r.reason} |")
  return "\n".join(lines)


def best(model: Model, budget: Any = None, profile: Any = None, **workload) -> RankedPlan:
  """The top feasible plan; a clear error listing why each failed otherwise."""
  ranked = plan(model, budget, profile, **workload)
  if not ranked or not ranked[0].feasible:
    reasons = "\n  ".join(f"{r.label()}: {r.reason}" for r in ranked)
    raise ValueError(f"no strategy fits {model.config.name} in {budget}:\n  {reasons}")
  return ranked[0]
