"""Choosing a strategy for a budget: plan every candidate, predict it, rank.

Like llama.cpp's automatic fitting or Accelerate's device_map="auto", but
across strategies: every registered strategy proposes option sets
(`Strategy.candidates`), plans each within the budget (pure, no I/O), and
the simulator (hetflow.simulate) predicts its prefill and decode time on
this machine's HardwareProfile. Plans that cannot fit say why.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from hetflow import calibration, simulate
from hetflow.hardware import HardwareProfile, get_profile, measure
from hetflow.memory.budget import Budget, BudgetExceeded, format_bytes
from hetflow.models.model import Model
from hetflow.strategy import Placement, available_strategies, get_strategy


def default_profile_path() -> str:
  """$HETFLOW_CACHE (default ~/.cache/hetflow)/hardware_profile.json."""
  root = os.environ.get("HETFLOW_CACHE") or os.path.expanduser("~/.cache/hetflow")
  return os.path.join(root, "hardware_profile.json")


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

  def label(self) -> str:
    defaults = type(self.options)()
    changed = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)
               if getattr(self.options, f.name) != getattr(defaults, f.name)}
    inner = ", ".join(f"{k}={v}" for k, v in changed.items())
    return f"{self.strategy}({inner})"


def load_profile(profile: Any = None, model: Model | None = None,
                 workdir: str = "/tmp/hetflow-profile") -> HardwareProfile:
  """A HardwareProfile: the one given (name, path or object), else the cached
  measurement of this machine, else a quick measurement (cached for next time).

  For this machine's cached profile and a `model`, the model's decode costs are
  measured once too (`hetflow.calibration`) and kept in the cached profile.
  """
  if profile is not None:
    return get_profile(profile)
  path = default_profile_path()
  if os.path.exists(path):
    measured = HardwareProfile.from_json(path)
  else:
    print(f"measuring this machine (once; cached in {path}) ...", flush=True)
    measured = measure(workdir, quick=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    measured.to_json(path)
  if model is not None and calibration.measured(measured, model) is None:
    if calibration.fits_in_memory(model):
      measured = calibration.calibrate(model, measured)
      measured.to_json(path)
    else:
      print(f"not calibrating {calibration.model_key(model)}: two of its layers do not fit in"
            " the memory available; predicting from the profile's generic rates", flush=True)
  return measured


def plan(model: Model, budget: Any = None, profile: Any = None, batch: int = 1,
         prompt_len: int = 128, new_tokens: int = 64,
         strategies: list[str] | None = None) -> list[RankedPlan]:
  """Every strategy's candidate plans for `model` within `budget`, best first.

  Args:
    model: shapes are all that is used; no weights are read.
    budget: hetflow.Budget (or dict / None).
    profile: HardwareProfile, a named profile, a JSON path, or None (measure
      or load this machine's; see `load_profile`).
    batch, prompt_len, new_tokens: the workload to predict.
    strategies: names to consider (default: every registered one).

  Returns:
    Feasible plans sorted by predicted decode time per token, then the
    infeasible ones with the reason.
  """
  budget = Budget.from_any(budget)
  profile = load_profile(profile, model)
  ranked: list[RankedPlan] = []
  for name in strategies or available_strategies():
    cls = get_strategy(name)
    if name not in simulate.cost_models():
      continue  # a strategy without a cost model cannot be predicted
    for options in cls.candidates(model, budget):
      try:
        placement = cls(options).plan(model, budget, profile)
        prediction = simulate.predict(model, placement, profile, batch, prompt_len, new_tokens)
      except BudgetExceeded as e:
        ranked.append(RankedPlan(name, options, None, None, f"does not fit: {e}"))
        continue
      except ValueError as e:  # e.g. a dense model offered to a sparse strategy, or a
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


def _non_default_options(options) -> dict[str, Any]:
  defaults = type(options)()
  return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
          if getattr(options, f.name) != getattr(defaults, f.name)}


def _with_disk_rate(profile: HardwareProfile, factor: float) -> HardwareProfile:
  """`profile` with every disk figure scaled by `factor`."""
  table = {qd: {b: bw * factor for b, bw in row.items()}
           for qd, row in profile.disk_read_bw.items()}
  return dataclasses.replace(profile, disk_read_bw=table)


def run(config, workdir: str, out=None) -> dict[str, Any]:
  """`python -m experiments.plan`: rank plans; with config.run, measure the top ones.

  Args:
    config: ConfigDict with model, budget, profile ("" = this machine's),
      prompt_tokens, new_tokens, run (bool), run_top (int), timeout_s.
    workdir: where the benchmark of the top plans writes its results.
    out: a file to print to (stdout by default).

  Returns:
    {"ranked": [...], "compared": [...]} with predicted and measured figures.
  """
  import sys

  import ml_collections

  from hetflow import config as config_lib

  out = out or sys.stdout
  model = config_lib.build_model(config.model)
  budget = config_lib.build_budget(config.get("budget"))
  profile = load_profile(config.get("profile") or None, model)
  ranked = plan(model, budget, profile, prompt_len=config.prompt_tokens,
                new_tokens=config.new_tokens)
  print(f"{model.description} in {budget}, profile {profile.name}"
        f" ({calibration.summary(profile, model)}):", file=out)
  print(format_table(ranked), file=out)
  if ranked and ranked[0].feasible:
    print(f"\nwinner: {ranked[0].label()}\n{ranked[0].placement}", file=out)
  summary = {"ranked": [{"plan": r.label(), "reason": r.reason,
                         "predicted_decode_tok_s": r.prediction.decode_tokens_per_s
                         if r.feasible else None} for r in ranked], "compared": []}
  if not config.get("run"):
    return summary
  from hetflow.benchmark import benchmark

  top = [r for r in ranked if r.feasible][:config.run_top]
  systems = {f"plan{i + 1}": dict(kind="hetflow", strategy=r.strategy,
                                  options=_non_default_options(r.options))
             for i, r in enumerate(top)}
  bench = ml_collections.ConfigDict(dict(
      model=config.model.to_dict(), budget=config.budget.to_dict(), store_dir="",
      prompt_tokens=config.prompt_tokens, new_tokens=config.new_tokens, warmup=True,
      memory_limit="", drop_caches=True, timeline=False, profile_trace=False,
      timeout_s=config.get("timeout_s", 1800), order=",".join(systems),
      systems=systems))
  results = benchmark(bench, workdir)
  # The disk here is shared and its rate drifts by tens of percent within minutes
  # (WORKSPACE_NOTES.md, "Planner accuracy"): the harness probes it before the
  # first system and after each one. A second prediction at the rate probed
  # around each run tells the simulator's error from the disk's drift.
  probes = [results["probes"]["disk"]["bytes_per_s"]]
  probes += [m.get("disk_probe_after", probes[-1]) for m in results["systems"]]
  profiled = profile.disk_bw(1 << 20, 8)  # the probe's best setting is 8 x 1 MiB
  lines = ["| plan | predicted decode (tok/s) | measured (tok/s) | error | disk probed (GB/s)"
           " | predicted at that disk rate | error |", "|---|---|---|---|---|---|---|"]
  for i, (r, measured) in enumerate(zip(top, results["systems"])):
    predicted = r.prediction.decode_tokens_per_s
    disk = (probes[i] + probes[i + 1]) / 2
    at_disk = simulate.predict(model, r.placement, _with_disk_rate(profile, disk / profiled),
                               prompt_len=config.prompt_tokens,
                               new_tokens=config.new_tokens).decode_tokens_per_s
    got = measured.get("decode_tok_s") if measured.get("ok") else None
    error = (predicted / got - 1) if got else None
    error_at_disk = (at_disk / got - 1) if got else None
    summary["compared"].append({"plan": r.label(), "predicted_decode_tok_s": predicted,
                                "measured_decode_tok_s": got, "error": error,
                                "disk_probed_bytes_per_s": disk,
                                "predicted_at_probed_disk_tok_s": at_disk,
                                "error_at_probed_disk": error_at_disk})
    shown = f"{got:.3f}" if got else f"failed: {measured.get('error')}"
    pct = lambda e: "" if e is None else f"{e:+.0%}"  # noqa: E731
    lines.append(f"| {r.label()} | {predicted:.3f} | {shown} | {pct(error)} | {disk / 1e9:.2f}"
                 f" | {at_disk:.3f} | {pct(error_at_disk)} |")
  print("\n".join(lines), file=out)
  summary.update(model=model.config.name, budget=str(budget),
                 calibration=calibration.summary(profile, model))
  with open(os.path.join(workdir, "plan.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
