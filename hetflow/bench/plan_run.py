"""`python -m experiments.plan`: rank a model's plans for a budget and, with
`run`, measure the top ones next to their predictions (the planner's accuracy);
with `cluster.hosts`, the predicted table over host counts and networks instead."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import ml_collections

from hetflow import config as config_lib
from hetflow import planner, simulate
from hetflow.bench import calibration
from hetflow.bench.machine import machine_profile
from hetflow.bench.runner import benchmark
from hetflow.hardware import HardwareProfile


def _non_default_options(options) -> dict[str, Any]:
  defaults = type(options)()
  return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
          if getattr(options, f.name) != getattr(defaults, f.name)}


def _with_disk_rate(profile: HardwareProfile, factor: float) -> HardwareProfile:
  """`profile` with every disk figure scaled by `factor`."""
  table = {qd: {b: bw * factor for b, bw in row.items()}
           for qd, row in profile.disk_read_bw.items()}
  return dataclasses.replace(profile, disk_read_bw=table)


def _ints(text: str, what: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in str(text).split(",") if x.strip())
  except ValueError:
    raise ValueError(f"{what}={text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None


def _cluster(config, model, budget, profile: HardwareProfile, out) -> dict[str, Any]:
  """The predicted table over `config.cluster`'s host counts and networks."""
  hosts = _ints(config.cluster.hosts, "cluster.hosts")
  networks = tuple(n.strip() for n in str(config.cluster.networks).split(",") if n.strip())
  rows = planner.cluster_table(model, budget, profile, hosts, networks,
                               per_machine=int(config.cluster.get("per_machine", 1)),
                               prompt_len=config.prompt_tokens, new_tokens=config.new_tokens)
  print(f"{model.description} ({model.weights}), Megatron-sharded over hosts of profile"
        f" {profile.name}, budget per host {budget}:", file=out)
  print(planner.format_cluster_table(rows, budget), file=out)
  return {"cluster": [{"hosts": r.hosts, "network": r.network,
                       "plan": r.best.label() if r.best else None,
                       "weights_per_host": r.weights_per_host,
                       "disk_per_token": r.disk_per_token,
                       "decode_tok_s": r.tokens_per_s,
                       "network_s_per_token": r.best.prediction.network_s_per_token
                       if r.best else None, "limit": r.limit} for r in rows],
          "compared": []}


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
  out = out or sys.stdout
  model = config_lib.build_model(config.model)
  budget = config_lib.build_budget(config.get("budget"))
  profile = machine_profile(config.get("profile") or None, model)
  cluster = config.get("cluster")
  if cluster is not None and cluster.get("hosts"):
    return _cluster(config, model, budget, profile, out)
  ranked = planner.plan(model, budget, profile, prompt_len=config.prompt_tokens,
                        new_tokens=config.new_tokens)
  print(f"{model.description} in {budget}, profile {profile.name}"
        f" ({calibration.summary(profile, model)}):", file=out)
  print(planner.format_table(ranked), file=out)
  if ranked and ranked[0].feasible:
    print(f"\nwinner: {ranked[0].label()}\n{ranked[0].placement}", file=out)
  summary = {"ranked": [{"plan": r.label(), "reason": r.reason,
                         "predicted_decode_tok_s": r.prediction.decode_tokens_per_s
                         if r.feasible else None} for r in ranked], "compared": []}
  if not config.get("run"):
    return summary
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
