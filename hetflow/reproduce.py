"""Reproducing a paper's figure on paper: predicted figures next to published ones.

`run(config, workdir)` reads a config from `configs/<paper>/` (see
configs/hetegen/fig8.py for the fields), plans every series' strategy at every
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

from hetflow import hardware, simulate
from hetflow.config import DTYPES, to_dict
from hetflow.checkpoints import synthetic_model
from hetflow.memory.budget import Budget, BudgetExceeded
from hetflow.strategy import get_strategy


def _plan(series: dict, model, budget, profile):
  """The series' plan at `budget`, trying its fallback options if it does not fit."""
  options = dict(series.get("options") or {})
  try:
    return get_strategy(series["strategy"])(options).plan(model, budget, profile), ""
  except BudgetExceeded as first:
    fallback = series.get("fallback_options")
    if not fallback:
      return None, f"needs {first.minimum / 1e9:.2f} GB" if first.minimum else "does not fit"
    try:
      options.update(fallback)
      plan = get_strategy(series["strategy"])(options).plan(model, budget, profile)
      return plan, f"with {fallback}"
    except BudgetExceeded as e:
      return None, f"needs {e.minimum / 1e9:.2f} GB" if e.minimum else "does not fit"


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
  return rows


def format_table(config, rows) -> str:
  lines = [config.title,
           f"hetflow figures are PREDICTED by hetflow.simulate on profile {config.profile!r}"
           f" (batch {config.batch}, prompt {config.prompt_len}, {config.new_tokens} new"
           f" tokens, metric {config.metric}); paper figures as in PAPERS.md.",
           f"{'model':<10} {'series':<26} {'GPU GB':>7} {'paper':>7} {'predicted':>10}"
           f" {'pred/paper':>10}  bound by / note"]
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
    for i, label in enumerate(dict.fromkeys(r["series"] for r in rows)):
      mine = [r for r in rows if r["model"] == name and r["series"] == label]
      color = f"C{i}"
      pts = [(r["gb"], r["predicted"]) for r in mine if r["predicted"] is not None]
      if pts:
        ax.plot(*zip(*pts), "-", color=color, label=f"{label}: predicted")
      pts = [(r["gb"], r["paper"]) for r in mine if r["paper"] is not None]
      if pts:
        ax.plot(*zip(*pts), "o", color=color, mfc="none", label=f"{label}: paper")
    ax.set_title(name)
    ax.set_xlabel("GPU memory (GB)")
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
  return rows
