"""This machine's HardwareProfile, measured once and cached; the planner on it.

The planner (hetflow.planner) predicts on whatever profile it is given. Here
is where "this machine" comes from: a quick measurement the first time, kept
under the cache root, and each model's own decode costs calibrated once
(hetflow.bench.calibration). `hetflow.plan` and `Engine(strategy="auto")` (its
resolver, `choose`) go through this module.
"""

from __future__ import annotations

import os
from typing import Any

from hetflow import planner
from hetflow.bench import calibration, probes
from hetflow.hardware import HardwareProfile, get_profile, measured_costs, model_key
from hetflow.memory.cache import cache_root
from hetflow.models.model import Model
from hetflow.strategy import Strategy, get_strategy


def default_profile_path() -> str:
  """cache_root()/hardware_profile.json ($HETFLOW_CACHE, default ~/.cache/hetflow)."""
  return os.path.join(cache_root(), "hardware_profile.json")


def machine_profile(profile: Any = None, model: Model | None = None,
                    workdir: str = "/tmp/hetflow-profile") -> HardwareProfile:
  """A HardwareProfile: the one given (name, path or object), else the cached
  measurement of this machine, else a quick measurement (cached for next time).

  For this machine's cached profile and a `model`, the model's decode costs are
  measured once too (hetflow.bench.calibration) and kept in the cached profile.
  """
  if profile is not None:
    return get_profile(profile)
  path = default_profile_path()
  if os.path.exists(path):
    measured = HardwareProfile.from_json(path)
  else:
    print(f"measuring this machine (once; cached in {path}) ...", flush=True)
    measured = probes.measure(workdir, quick=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    measured.to_json(path)
  if model is not None and measured_costs(measured, model) is None:
    if calibration.fits_in_memory(model):
      measured = calibration.calibrate(model, measured)
      measured.to_json(path)
    else:
      print(f"not calibrating {model_key(model)}: two of its layers do not fit in the memory"
            " available; predicting from the profile's generic rates", flush=True)
  return measured


def plan(model: Model, budget: Any = None, profile: Any = None,
         **kwargs) -> list[planner.RankedPlan]:
  """hetflow.planner.plan on `profile`, or on this machine's when it is None."""
  return planner.plan(model, budget, machine_profile(profile, model), **kwargs)


def choose(model: Model, budget: Any, profile: Any) -> tuple[Strategy, HardwareProfile]:
  """The resolver of `strategy="auto"`: the best plan's strategy, and the profile
  it was chosen on (the engine plans with the same one)."""
  profile = machine_profile(profile, model)
  best = planner.best(model, budget, profile)
  return get_strategy(best.strategy)(best.options), profile
