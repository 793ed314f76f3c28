"""Reproducing a paper's figure on paper: predicted figures next to published ones.

`run(config, workdir)` reads a config from `configs/<paper>/` (built with
`reproduce_config`, which documents the fields), plans every series' strategy at every
memory level for every model *from shapes only* (`jax.eval_shape`; no weight is
materialised), predicts it with `hetflow.simulate` on the config's named
`HardwareProfile`, and prints one row per point: the paper's figure, the
prediction, their ratio, and what bounds the prediction. It says plainly that
the hetflow figures are predicted. A plot of both goes to the workdir.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import ml_collections

from hetflow import hardware, simulate
from hetflow.bench.machine import machine_profile
from hetflow.checkpoints import synthetic_model
from hetflow.config import DTYPES, to_dict
from hetflow.memory.budget import Budget, BudgetExceeded
from hetflow.strategy import NotApplicable, get_strategy
from strategies.neuron_cluster import NeuronClusterOptions, shape_placement
from strategies.neuron_cluster.cost import decode_counts

# neuron_cluster options for predicting a paper's hardware from shapes alone: a
# trained predictor that plan() sizes at rank D/16 (nothing exists at this path
# and nothing is loaded: these plans are never materialised).
SHAPE_ONLY_NEURON_CLUSTER = dict(predictor="trained", predictor_path="/nonexistent/predictor",
                                 kv_reserve_tokens=512)


def reproduce_config(title: str, profile: str, models: list[str], series: list[dict],
                     **overrides) -> ml_collections.ConfigDict:
  """A reproduce config with the common defaults; configs state only what differs.

  Fields:
    title: the table's heading.
    profile: a named HardwareProfile (hetflow.hardware.PROFILES).
    models: synthetic shape names to predict.
    series: one dict per strategy: label, strategy, options, paper ({model:
      [(memory GB, published figure or None)]}), optionally shape_plan,
      fallback_options.
    dtype, batch, prompt_len, new_tokens: the workload (default: fp16, batch 1,
      64-token prompt, 64 new tokens).
    metric: "decode" (tok/s per decode step) or "throughput" (new tokens over
      prefill + decode).
    memory_label: the x axis's unit label.
    assumptions: lines printed under the table.
    cross_levels: predict every series at every series' memory levels.
    ratios: optional rows comparing two series.
    measure: optional scaled-down real run (see `measure_scaled`).
    plot: file name of the plot in the workdir ("" for none).
    smoke: overrides for a seconds-long test run.
  """
  c = ml_collections.ConfigDict(dict(
      title=title, profile=profile, dtype="float16", batch=1, prompt_len=64, new_tokens=64,
      metric="decode", memory_label="mem GB", assumptions=[], series=series, models=models,
      cross_levels=False, plot="", smoke={}))
  for key, value in overrides.items():
    c[key] = value
  return c


def _plan(series: dict, model, budget, profile):
  """The series' plan at `budget`, trying its fallback options if it does not fit.

  A series with `shape_plan=True` (neuron_cluster only) is planned from shapes
  by strategies.neuron_cluster.cost.shape_placement where the strategy refuses the
  model (MoE); with `shape_plan="always"` it always is (options may then set
  weight_bits).
  """
  options = dict(series.get("options") or {})
  bits = options.pop("weight_bits", None)
  if series.get("shape_plan") == "always":  # e.g. int4 weights, which hetflow cannot hold
    try:
      return (shape_placement(model, budget, NeuronClusterOptions(**options), bits),
              "planned from shapes")
    except BudgetExceeded as e:
      return None, f"needs {e.minimum / 1e9:.2f} GB"
  try:
    return get_strategy(series["strategy"])(options).plan(model, budget, profile), ""
  except BudgetExceeded as first:
    if series.get("shape_plan"):  # the shapes planner refused it too
      return None, f"needs {first.minimum / 1e9:.2f} GB" if first.minimum else "does not fit"
    fallback = series.get("fallback_options")
    if not fallback:
      return None, f"needs {first.minimum / 1e9:.2f} GB" if first.minimum else "does not fit"
    try:
      options.update(fallback)
      plan = get_strategy(series["strategy"])(options).plan(model, budget, profile)
      return plan, f"with {fallback}"
    except BudgetExceeded as e:
      return None, f"needs {e.minimum / 1e9:.2f} GB" if e.minimum else "does not fit"
  except NotApplicable as e:
    if not series.get("shape_plan"):
      raise
    try:
      return (shape_placement(model, budget, NeuronClusterOptions(**options), bits),
              f"planned from shapes (strategy refuses: {e})")
    except BudgetExceeded as e2:
      return None, f"needs {e2.minimum / 1e9:.2f} GB"


def predict_points(config) -> list[dict[str, Any]]:
  """Every (model, series, memory level) point: paper value and prediction."""
  profile = hardware.get_profile(config.profile)
  rows = []
  series_list = [to_dict(s) for s in config.series]
  for name in config.models:
    model = synthetic_model(name, dtype=DTYPES[config.dtype])
    levels = {}
    for s in series_list:
      for gb, value in s["paper"].get(name, []):
        levels.setdefault(float(gb), {})[s["label"]] = value
    for s in series_list:
      own = {float(gb) for gb, _ in s["paper"].get(name, [])}
      for gb in sorted(levels if config.get("cross_levels", False) else own):
        plan, why = _plan(s, model, Budget(device=int(gb * 1e9)), profile)
        row = dict(model=name, series=s["label"], gb=gb,
                   paper=levels[gb].get(s["label"]), predicted=None, note=why)
        if plan is not None:
          pred = simulate.predict(model, plan, profile, config.batch, config.prompt_len,
                                  config.new_tokens)
          row.update(
              predicted=(pred.throughput if config.metric == "throughput"
                         else pred.decode_tokens_per_s),
              prefill_s=pred.prefill_s, decode_s_per_token=pred.decode_s_per_token,
              bound_by=pred.bottleneck)
        rows.append(row)
  rows += _ratio_rows(config, rows)
  return rows


def _ratio_rows(config, rows) -> list[dict[str, Any]]:
  """config.ratios: speed-ups of one series over another at one level, as papers quote them.

  Each entry: model, gb, numerator and denominator (series labels), paper
  (the published ratio) and label.
  """
  out = []
  for r in config.get("ratios") or []:
    r = to_dict(r)
    pick = {x["series"]: x for x in rows if x["model"] == r["model"] and x["gb"] == r["gb"]}
    num, den = pick.get(r["numerator"]), pick.get(r["denominator"])
    value = None
    if num and den and num["predicted"] and den["predicted"]:
      value = num["predicted"] / den["predicted"]
    out.append(dict(model=r["model"], series=r["label"], gb=r["gb"], paper=r["paper"],
                    predicted=value, note="ratio (x)", ratio=True))
  return out


def format_table(config, rows) -> str:
  lines = [config.title,
           f"hetflow figures are PREDICTED by hetflow.simulate on profile {config.profile!r}"
           f" (batch {config.batch}, prompt {config.prompt_len}, {config.new_tokens} new"
           f" tokens, metric {config.metric}); paper figures as the config quotes them.",
           f"{'model':<10} {'series':<26} {config.get('memory_label', 'GPU GB'):>7} {'paper':>7}"
           f" {'predicted':>10} {'pred/paper':>10}  bound by / note"]
  if config.get("assumptions"):
    lines[1:1] = ["assumed: " + a for a in config.assumptions]
  for r in rows:
    paper = f"{r['paper']:.2f}" if r["paper"] is not None else "-"
    pred = f"{r['predicted']:.2f}" if r["predicted"] is not None else "-"
    ratio = (f"{r['predicted'] / r['paper']:.2f}"
             if r["paper"] is not None and r["predicted"] is not None else "-")
    note = " ".join(x for x in (r.get("bound_by", ""), r["note"]) if x)
    lines.append(f"{r['model']:<10} {r['series']:<26} {r['gb']:>7.1f} {paper:>7} {pred:>10}"
                 f" {ratio:>10}  {note}")
  return "\n".join(lines)


def plot(config, rows, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = list(config.models)
  fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
  for ax, name in zip(axes[0], models):
    for i, label in enumerate(dict.fromkeys(r["series"] for r in rows if not r.get("ratio"))):
      mine = [r for r in rows if r["model"] == name and r["series"] == label]
      color = f"C{i}"
      pts = [(r["gb"], r["predicted"]) for r in mine if r["predicted"] is not None]
      if pts:
        ax.plot(*zip(*pts), "-", color=color, label=f"{label}: predicted")
      pts = [(r["gb"], r["paper"]) for r in mine if r["paper"] is not None]
      if pts:
        ax.plot(*zip(*pts), "o", color=color, mfc="none", label=f"{label}: paper")
    ax.set_title(name)
    ax.set_xlabel(config.get("memory_label", "GPU GB").replace("GB", "memory (GB)"))
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(config.title + " (lines: predicted; circles: paper)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config, workdir: str, out=None) -> list[dict[str, Any]]:
  """Predicts every point, prints the table, writes rows JSON and the plot."""
  out = out or sys.stdout
  rows = predict_points(config)
  print(format_table(config, rows), file=out)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "reproduce.json"), "w") as f:
    json.dump(rows, f, indent=1)
  if config.get("plot"):
    path = os.path.join(workdir, config.plot)
    plot(config, rows, path)
    print(f"plot: {path}", file=out)
  if config.get("measure"):
    measured = measure_scaled(config.measure, out)
    with open(os.path.join(workdir, "measured.json"), "w") as f:
      json.dump(measured, f, indent=1)
    rows = rows + [measured]
  return rows


def measure_scaled(section, out=None) -> dict[str, Any]:
  """Runs a scaled-down neuron_cluster model for real and prints measured next to predicted.

  Counts (bytes read, requests and cache hits per decode token) are compared
  on the first generation, from a cold cache, against the cost model fed the
  strategy's own recorded activation statistics; decode speed on a second
  generation (compiled) against the simulator on this machine's profile.

  Args:
    section: ConfigDict with model (a config model section), budget, options
      (NeuronClusterOptions fields), prompt_tokens, new_tokens, profile ("":
      this machine's, measured once and cached).
    out: file to print to.

  Returns:
    A dict of the measured and predicted figures.
  """
  import dataclasses

  import numpy as np

  from hetflow import config as config_lib
  from hetflow.engine import Engine

  out = out or sys.stdout
  model = config_lib.build_model(section.model)
  budget = config_lib.build_budget(section.get("budget"))
  profile = machine_profile(section.get("profile") or None, model)
  ids = np.random.default_rng(0).integers(3, model.config.vocab_size,
                                          (1, section.prompt_tokens))
  with Engine(model, "neuron_cluster", budget, options=to_dict(section.options)) as engine:
    nc = engine.strategy
    first = engine.generate(ids, max_new_tokens=section.new_tokens, stop_tokens=())
    st = first.stats["strategy"].details
    steps = st["decode_tokens"]
    cache = st["cache"]
    active = max(cache["hot_hits"] + cache["cold_hits"] + cache["misses"], 1)
    measured = dict(disk_bytes=st["disk_bytes_per_token"],
                    requests=st["requests_per_token"],
                    hit_rate=(cache["hot_hits"] + cache["cold_hits"]) / active,
                    predicted_neurons=active / steps)
    freq = nc.frequency  # recorded statistics, hottest first: the law the run follows
    counts = decode_counts(model, engine.placement, tokens=steps, freq=freq,
                           prompt_tokens=section.prompt_tokens)
    predicted = dict(disk_bytes=counts.disk_bytes, requests=counts.requests,
                     hit_rate=counts.cache.hit_rate, predicted_neurons=counts.predicted)
    second = engine.generate(ids, max_new_tokens=section.new_tokens, stop_tokens=())
    # The second run starts where the first left the cold region: 2 x steps in all.
    placement = dataclasses.replace(engine.placement, settings=dataclasses.replace(
        engine.placement.settings, frequencies=freq, cold_start_tokens=2 * steps))
    pred = simulate.predict(model, placement, profile, 1, section.prompt_tokens,
                            section.new_tokens)
  load = os.getloadavg()[0]
  noisy = load > 0.5 * (os.cpu_count() or 1)
  print(f"\nscaled-down run on this machine: {model.description}, budget {budget},"
        f" {steps} decode tokens; counts MEASURED (first run, cold cache) vs PREDICTED"
        f" (cost model on the run's recorded activation statistics):", file=out)
  print(f"{'per decode token':<24} {'measured':>12} {'predicted':>12} {'pred/meas':>10}", file=out)
  for key in ("predicted_neurons", "hit_rate", "disk_bytes", "requests"):
    m, p = measured[key], predicted[key]
    print(f"{key:<24} {m:>12.4g} {p:>12.4g} {p / m if m else float('nan'):>10.2f}", file=out)
  tok_s = second.stats["decode_tokens_per_s"]
  print(f"decode tok/s: MEASURED {tok_s:.2f} (second run), PREDICTED {pred.decode_tokens_per_s:.2f}"
        f" on profile {profile.name} (ratio {pred.decode_tokens_per_s / tok_s:.2f})"
        + (f"; NOISY: load average {load:.1f} on {os.cpu_count()} cores" if noisy else ""),
        file=out)
  return dict(model=model.config.name, series="measured (scaled-down)", gb=None, paper=None,
              predicted=pred.decode_tokens_per_s, measured_decode_tok_s=tok_s,
              counts_measured=measured, counts_predicted=predicted, load_average=load,
              noisy=noisy, note="measured on this machine")
