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

from hetflow import costmodel, simulate
from hetflow.hardware import get_profile, shared, with_network
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
         strategies: list[str] | None = None,
         cluster: costmodel.Cluster | None = None) -> list[RankedPlan]:
  """Every strategy's candidate plans for `model` within `budget`, best first.

  Args:
    model: shapes are all that is used; no weights are read.
    budget: hetflow.Budget (or dict / None); per host on a cluster.
    profile: HardwareProfile, a named profile or a JSON path (this machine's,
      measured and cached: hetflow.bench.machine.machine_profile); on a
      cluster, of one machine, with a `network` between them.
    batch, prompt_len, new_tokens: the workload to predict.
    strategies: names to consider (default: every registered one).
    cluster: hosts the model is sharded over (each plan is one host's shard,
      `costmodel.shard_model`, on its share of its machine); None: one.

  Returns:
    Feasible plans sorted by predicted decode time per token, then the
    infeasible ones with the reason.
  """
  budget = Budget.from_any(budget)
  if profile is None:
    raise ValueError("the planner predicts on a HardwareProfile: pass one (a named profile,"
                     " a JSON path), or call hetflow.plan, which measures this machine once.")
  profile = get_profile(profile)
  cluster = cluster or costmodel.Cluster()
  if cluster.hosts > 1:
    model = costmodel.shard_model(model, cluster.hosts)
    profile = shared(profile, cluster.per_machine)
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
        prediction = simulate.predict(model, placement, profile, batch, prompt_len, new_tokens,
                                      cluster=cluster)
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
                disk: str = "", cluster: dict | None = None, **overrides):
  """A config for `python -m experiments.plan` with its defaults; configs state only what differs.

  Fields:
    model: the model section (hetflow.config.model_section(model)).
    budget: device / host / disk sizes ("" = unlimited).
    profile: "" = this machine's (measured once and cached; each model's decode
      costs calibrated once), or a named profile or a JSON path.
    prompt_tokens, new_tokens: the workload predicted (and run).
    run: also run the top `run_top` plans and print predicted next to measured.
    timeout_s: per run.
    cluster: hosts ("" = one machine; "1,2,4,8,16" = the table of
      `cluster_table` over those host counts, the budget then per host),
      networks ("10gbe,100gbe": presets of hetflow.hardware.NETWORKS, or
      "profile" for the profile's own), per_machine (processes per machine).
    smoke: overrides for the test suite's smoke run (tests/test_configs.py).
  """
  import ml_collections

  from hetflow.config import model_section

  c = ml_collections.ConfigDict()
  c.model = model_section(model)
  c.budget = ml_collections.ConfigDict(dict(device=device, host=host, disk=disk))
  c.profile = ""
  c.prompt_tokens = 16
  c.new_tokens = 16
  c.run = False
  c.run_top = 3
  c.timeout_s = 1800
  c.cluster = ml_collections.ConfigDict(
      {**dict(hosts="", networks="10gbe,100gbe", per_machine=1), **(cluster or {})})
  c.smoke = smoke or {}
  c.update(overrides)
  return c


@dataclasses.dataclass(frozen=True)
class ClusterRow:
  """The best plan for one host count on one network.

  Attributes:
    hosts: processes holding 1/hosts of every layer each.
    network: the network's name.
    best: the best plan of one host's shard, or None when none fits.
    weights_per_host: bytes of one host's shard of the weights.
    disk_per_token: bytes each host reads from its disk per decode token.
    limit: what bounds decode: "disk", "link" (host -> device copies),
      "compute" or "network" (the busiest per token), or why nothing fits.
  """

  hosts: int
  network: str
  best: RankedPlan | None
  weights_per_host: int
  disk_per_token: int
  limit: str

  @property
  def tokens_per_s(self) -> float | None:
    return self.best.prediction.decode_tokens_per_s if self.best else None


def cluster_table(model: Model, budget: Any, profile: Any, hosts: tuple[int, ...],
                  networks: tuple[str, ...], per_machine: int = 1, **workload
                  ) -> list[ClusterRow]:
  """The best plan for `model` on each host count over each network (`plan` per cell).

  Args:
    model: the whole model; each cell plans one host's shard of it.
    budget: per host.
    profile: one machine's HardwareProfile (or name or path).
    hosts: host counts, e.g. (1, 2, 4, 8, 16).
    networks: names in `hardware.NETWORKS`, or "profile" for the profile's own.
    per_machine: processes per machine (`costmodel.Cluster`).
    **workload: batch, prompt_len, new_tokens, strategies (as `plan`).

  Returns:
    One row per (network, host count).
  """
  profile = get_profile(profile)
  rows = []
  for net in networks:
    prof = profile if net == "profile" else with_network(profile, net)
    for n in hosts:
      cluster = costmodel.Cluster(n, min(per_machine, n))
      shard = costmodel.shard_model(model, n)
      ranked = plan(model, budget, prof, cluster=cluster, **workload)
      weights = shard.nbytes
      feasible = [r for r in ranked if r.feasible]
      if not feasible:
        rows.append(ClusterRow(n, net, None, weights, 0, "nothing fits: " + _why_not(ranked)))
        continue
      # Of plans predicted equally fast, the one that keeps the most in memory (all layers
      # resident under "layerwise" is resident by another name).
      fastest = feasible[0].prediction.decode_s_per_token
      best_plan = min((r for r in feasible
                       if r.prediction.decode_s_per_token <= fastest * (1 + 1e-9)),
                      key=lambda r: (_tier_bytes(r, "disk"), _tier_bytes(r, "host"),
                                     r.strategy != "resident"))
      p = best_plan.prediction
      disk = _tier_bytes(best_plan, "disk")
      busy = dict(p.decode_busy)
      network = p.network_s_per_token
      terms = {"disk": busy.get("disk", 0.0), "link": busy.get("link", 0.0),
               "compute": max(busy.get("device", 0.0), busy.get("cpu", 0.0)) - network,
               "network": network}
      rows.append(ClusterRow(n, net, best_plan, weights, disk, max(terms, key=terms.get)))
  return rows


def _tier_bytes(r: RankedPlan, tier: str) -> int:
  return sum(g.nbytes for g in r.placement.groups.values() if g.tier == tier)


def _why_not(ranked: list[RankedPlan]) -> str:
  """The infeasible plans' reasons, short: "layerwise(...): disk tier over budget; ..."."""
  reasons = {}
  for r in ranked:
    if r.reason.startswith("does not fit: "):
      reasons[r.label()] = r.reason[len("does not fit: "):].split(":")[0]
    elif r.reason.startswith("not applicable"):
      reasons.setdefault(r.strategy, "not applicable")
  return "; ".join(f"{k}: {v}" for k, v in reasons.items())


def _short(budget: Any) -> str:
  b = Budget.from_any(budget)
  return ", ".join(f"{t} {format_bytes(b.limit(t)) if b.limit(t) is not None else 'unlimited'}"
                   for t in ("device", "host", "disk"))


def format_cluster_table(rows: list[ClusterRow], budget: Any) -> str:
  """`cluster_table`'s rows as Markdown, with where scaling stops and why."""
  lines = ["| network | hosts | plan per host | budget per host | weights per host"
           " | disk read per token per host | decode (tok/s) | x half the hosts | network share"
           " | bound by |", "|---|---|---|---|---|---|---|---|---|---|"]
  prev: dict[str, float] = {}
  for r in rows:
    if r.best is None:
      lines.append(f"| {r.network} | {r.hosts} | - | {_short(budget)}"
                   f" | {format_bytes(r.weights_per_host)}"
                   f" | - | - | - | - | {r.limit} |")
      continue
    p = r.best.prediction
    tok = p.decode_tokens_per_s
    gain = f"{tok / prev[r.network]:.2f}" if r.network in prev else "-"
    prev[r.network] = tok
    lines.append(f"| {r.network} | {r.hosts} | {r.best.label()} | {_short(budget)}"
                 f" | {format_bytes(r.weights_per_host)} | {format_bytes(r.disk_per_token)}"
                 f" | {tok:.3f} | {gain}"
                 f" | {p.network_s_per_token / p.decode_s_per_token:.0%} | {r.limit} |")
  lines.append("")
  lines += scaling_notes(rows)
  return "\n".join(lines)


def scaling_notes(rows: list[ClusterRow]) -> list[str]:
  """One line per network: where doubling the hosts stops paying (< 1.2x), and why."""
  notes = []
  for net in dict.fromkeys(r.network for r in rows):
    mine = [r for r in rows if r.network == net and r.best is not None]
    stop = None
    for a, b in zip(mine, mine[1:]):
      if b.tokens_per_s < 1.2 * a.tokens_per_s:
        stop = (a, b)
        break
    if stop is None:
      last = mine[-1] if mine else None
      notes.append(f"- {net}: still scaling at {last.hosts} hosts (bound by {last.limit})"
                   if last else f"- {net}: nothing fits")
    else:
      a, b = stop
      notes.append(f"- {net}: stops scaling at {a.hosts} -> {b.hosts} hosts"
                   f" ({a.tokens_per_s:.3f} -> {b.tokens_per_s:.3f} tok/s): bound by {b.limit}"
                   f" (network {b.best.prediction.network_s_per_token * 1e3:.1f} ms of"
                   f" {b.best.prediction.decode_s_per_token * 1e3:.1f} ms per token)")
  return notes


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
