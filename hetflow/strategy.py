"""The Strategy protocol and the registry of strategies (docs/architecture.md).

A strategy decides where every parameter group lives (`plan`, pure), puts the
weights there through the ledger (`materialize`), and serves them to the
engine layer by layer (`globals`, `fetch`, `release`), optionally computing
the token embedding or a layer's attention or FFN its own way (`run_embed`,
`run_attention`, `run_ffn`). Its cost model (`cost_model`, optional) lets the
planner rank its plans.

Strategies are found through the entry-point group `hetflow.strategies`
(setup.cfg lists the built-ins there, like any third-party package), or by
importing a module that uses `@register_strategy`. This module never imports
a strategy itself.

Placement groups, in execution order: "embed", "layers/<i>/attn",
"layers/<i>/mlp", "head" (hetflow.models.Model.group_names).
"""

from __future__ import annotations

import abc
import dataclasses
from importlib import metadata
from typing import Any, Callable, ClassVar, Literal

from hetflow.memory.budget import Budget, MemoryLedger, format_bytes
from hetflow.memory.reader import ReadRecord
from hetflow.models.model import Model
from hetflow.trace import Timeline

Tier = Literal["device", "host", "disk"]
Phase = Literal["prefill", "decode"]


class NotApplicable(ValueError):
  """A strategy cannot serve this model at all (not a matter of budget): e.g. a
  dense model offered to a sparse strategy. The planner lists the plan as "not
  applicable" with this message; any other error is a bug and propagates."""


@dataclasses.dataclass(frozen=True)
class GroupPlacement:
  """Where one parameter group lives and why.

  Attributes:
    tier: the tier holding the group between uses.
    nbytes: its size in bytes.
    reason: one line a person can read in `print(placement)`.
    details: strategy-specific facts as the strategy's own typed record (e.g.
      tensor_split's split ratio per matrix), or None.
  """

  tier: Tier
  nbytes: int
  reason: str = ""
  details: Any = None


@dataclasses.dataclass(frozen=True)
class Placement:
  """A strategy's plan: every group's tier and bytes per tier. Predictions are the
  planner's (hetflow.planner.RankedPlan), not part of a plan.

  Attributes:
    strategy: name of the strategy that made it.
    groups: group name -> GroupPlacement, in execution order.
    working_bytes: extra bytes per tier the strategy needs while running
      (staging buffers, caches, the KV cache reserve), on top of the groups' bytes.
    notes: free-form lines shown when printed.
    settings: what the strategy's cost model needs to predict this plan, as the
      strategy's own frozen dataclass (e.g. layerwise's prefetch depth, read size
      and queue depth), or None.
  """

  strategy: str
  groups: dict[str, GroupPlacement]
  working_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
  notes: tuple[str, ...] = ()
  settings: Any = None

  def bytes_per_tier(self) -> dict[str, int]:
    """Resident bytes per tier: groups living there plus working bytes."""
    out = {"device": 0, "host": 0, "disk": 0}
    for g in self.groups.values():
      out[g.tier] += g.nbytes
    for tier, n in self.working_bytes.items():
      out[tier] += n
    return out

  def __str__(self) -> str:
    lines = [f"Placement by {self.strategy!r}:"]
    tiers = self.bytes_per_tier()
    lines.append("  " + ", ".join(f"{t}: {format_bytes(n)}" for t, n in tiers.items()))
    # Consecutive layers with the same half, tier and reason share one row.
    rows: list[list] = []  # [label kind, tier, reason, first layer, last layer]
    for name, g in self.groups.items():
      parts = name.split("/")
      layer, kind = (int(parts[1]), parts[2]) if parts[0] == "layers" else (None, name)
      last = next((r for r in reversed(rows) if r[0] == kind), None)
      if (layer is not None and last and last[1:3] == [g.tier, g.reason]
          and last[4] == layer - 1):
        last[4] = layer
      else:
        rows.append([kind, g.tier, g.reason, layer, layer])
    for kind, tier, reason, first, last in rows:
      if first is None:
        label = kind
      else:
        span = str(first) if first == last else f"{first}-{last}"
        label = f"layers/{span}/{kind}"
      lines.append(f"  {label:<24} {tier:<6} {reason}")
    lines.extend(f"  {n}" for n in self.notes)
    return "\n".join(lines)


@dataclasses.dataclass
class PhaseCounters:
  """What a strategy did in one phase, summed over its passes.

  Attributes:
    passes: forward passes.
    tokens: new tokens per row, summed over passes.
    disk_bytes: bytes read from the strategy's files.
    disk_requests: read requests issued for them.
    h2d_bytes: bytes of weights copied host -> device.
    wait_s: seconds the engine waited in `fetch` for weights not yet there.
    other: strategy-specific counters (e.g. "streamed_layers", "split_matmuls").
  """

  passes: int = 0
  tokens: int = 0
  disk_bytes: int = 0
  disk_requests: int = 0
  h2d_bytes: int = 0
  wait_s: float = 0.0
  other: dict[str, float] = dataclasses.field(default_factory=dict)

  def add(self, key: str, value: float) -> None:
    """Adds `value` to the counter `key`: a field above, or one of `other`."""
    if key in _COUNTER_FIELDS:
      setattr(self, key, getattr(self, key) + value)
    else:
      self.other[key] = self.other.get(key, 0) + value

  def get(self, key: str, default: float = 0) -> float:
    if key in _COUNTER_FIELDS:
      return getattr(self, key)
    return self.other.get(key, default)

  def __getitem__(self, key: str) -> float:
    if key in _COUNTER_FIELDS:
      return getattr(self, key)
    return self.other[key]


# The named counters (not `other`, which holds the rest).
_COUNTER_FIELDS = frozenset(f.name for f in dataclasses.fields(PhaseCounters)) - {"other"}


@dataclasses.dataclass
class StrategyStats:
  """What a strategy did in the run so far: the record the benchmark reads.

  Attributes:
    prefill: counters of prefill passes.
    decode: counters of decode passes.
    reads: the file reader's own record (requests, bytes, how many were
      O_DIRECT, fallbacks to buffered reads), or None if the strategy reads no files.
    details: facts about the run that are not counters (e.g. resident layers,
      cache slots, the predictor's density).
  """

  prefill: PhaseCounters = dataclasses.field(default_factory=PhaseCounters)
  decode: PhaseCounters = dataclasses.field(default_factory=PhaseCounters)
  reads: ReadRecord | None = None
  details: dict[str, Any] = dataclasses.field(default_factory=dict)

  def phase(self, phase: str) -> PhaseCounters:
    if phase not in ("prefill", "decode"):
      raise ValueError(f"unknown phase {phase!r}; expected 'prefill' or 'decode'.")
    return getattr(self, phase)

  def copy(self) -> StrategyStats:
    return dataclasses.replace(
        self, prefill=dataclasses.replace(self.prefill, other=dict(self.prefill.other)),
        decode=dataclasses.replace(self.decode, other=dict(self.decode.other)),
        details=dict(self.details))


class Strategy(abc.ABC):
  """Base class of every strategy; see the module docstring for the protocol.

  Subclasses set `Options` to a frozen dataclass documenting every option,
  implement `plan`, `materialize`, `globals` and `fetch`, and may override the
  run hooks and `cost_model`. The engine calls, per forward pass: `begin(phase,
  num_tokens)`, `globals()`, `run_embed(...)`, then for each layer i
  `fetch(i, "attn")`, `run_attention(...)`, `release(i, "attn")`, `fetch(i, "mlp")`,
  `run_ffn(...)`, `release(i, "mlp")`, and finally `end()`.

  The engine owns the ledger's lifetimes: what `materialize` allocates through
  `ledger` is given back by the engine when it closes, so `close` only has to
  release buffers, threads and files.

  Attributes:
    options: the Options instance.
    counters: the run's StrategyStats; strategies add to
      `self.counters.phase(phase)` and fill `details`; `stats()` returns it.
    timeline: the engine's Timeline (events a strategy records when tracing).
    ledger: the engine's MemoryLedger (for allocations made while running).
    mesh: the engine's hetflow.models.sharding.MeshShards (set before `plan`):
      the shards this process holds; `plan` is given one shard's Model. Only
      strategies with `shards_over_mesh` run on a mesh of more than one shard;
      the engine refuses the others with NotApplicable.
  """

  name: ClassVar[str] = ""
  Options: ClassVar[type] = type(None)
  # The strategy's cost model: a function of a hetflow.simulate.PassContext that
  # issues the events of `ctx.passes` forward passes (see hetflow/simulate.py).
  # None: the planner lists the strategy as "cannot be predicted: no cost model".
  cost_model: ClassVar[Callable[..., None] | None] = None
  # Whether materialize/fetch serve every local shard of `mesh` (global arrays).
  shards_over_mesh: ClassVar[bool] = False

  def __init__(self, options: Any = None):
    if options is None:
      options = self.Options()
    elif isinstance(options, dict):
      options = self.Options(**options)
    self.options = options
    self.counters = StrategyStats()
    self.timeline: Timeline | None = None
    self.ledger: MemoryLedger | None = None
    self.mesh: Any = None

  @classmethod
  def candidates(cls, model: Model, budget: Budget) -> list[Any]:
    """Option sets worth comparing for this model and budget (the planner's
    search space). Default: the strategy's default options only."""
    return [cls.Options()]

  @abc.abstractmethod
  def plan(self, model: Model, budget: Budget, profile: Any = None) -> Placement:
    """Where every group lives. Pure: no I/O, no allocation, no measurement.

    Args:
      model: shapes and configuration are all a plan may read.
      budget: bytes per tier.
      profile: the hetflow.hardware.HardwareProfile to plan for, or None.

    Raises:
      hetflow.memory.BudgetExceeded: with `minimum` set, if no placement fits.
      NotApplicable: if the strategy cannot serve this model at all.
    """

  @abc.abstractmethod
  def materialize(self, placement: Placement, model: Model, ledger: MemoryLedger) -> None:
    """Puts the weights in their tiers, recording every byte in `ledger`."""

  @abc.abstractmethod
  def globals(self) -> dict[str, Any]:
    """Parameters of "embed" and "head" (trees of device arrays; "head" may be {})."""

  @abc.abstractmethod
  def fetch(self, layer: int, half: str) -> Any:
    """Returns layer `layer`'s `half` ("attn"/"mlp") parameters, ready to compute."""

  def release(self, layer: int, half: str) -> None:
    """The engine is done with these weights for this pass."""

  def begin(self, phase: Phase, num_tokens: int) -> None:
    """A forward pass over `num_tokens` new tokens per row starts."""

  def end(self) -> None:
    """The forward pass is over (the next one may start prefetching)."""

  def run_embed(self, params: Any, ids, positions, embed: Callable) -> Any:
    """Embeds the pass's token ids; default: the model's jitted `embed` over the
    `embed` leaves `globals()` gave (a strategy that keeps the token table
    elsewhere passes only the rows it needs)."""
    return embed(params, ids, positions)

  def run_attention(self, layer: int, params: Any, x, cache, cache_index, positions,
                    kv_mask, attention: Callable) -> tuple[Any, Any]:
    """Computes layer `layer`'s attention half; default: the model's jitted one.

    Returns (x, updated cache). `attention` is ModelFunctions.attention.
    """
    return attention(params, x, cache, cache_index, positions, kv_mask)

  def run_ffn(self, layer: int, params: Any, x, ffn: Callable) -> Any:
    """Computes layer `layer`'s FFN half; default: the model's jitted `ffn`."""
    return ffn(params, x)

  def kv_cache_tier(self) -> Tier:
    """Which tier holds the KV cache (the engine allocates it there)."""
    return "device"

  def stats(self) -> StrategyStats:
    """What the strategy did in the run so far (see StrategyStats)."""
    return self.counters

  def close(self) -> None:
    """Releases buffers, threads and files (the engine gives back the ledger's bytes)."""


_REGISTRY: dict[str, type[Strategy]] = {}
_RESOLVERS: dict[str, Callable[..., tuple[Strategy, Any]]] = {}


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
  """Class decorator: registers a Strategy under `name`; duplicates are refused."""

  def wrap(cls: type[Strategy]) -> type[Strategy]:
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(
          f"strategy {name!r} is already registered by"
          f" {_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}; pick another name.")
    if name in _RESOLVERS:
      raise ValueError(f"{name!r} is a reserved strategy name; pick another name.")
    cls.name = name
    _REGISTRY[name] = cls
    return cls

  return wrap


def register_resolver(name: str, resolve: Callable[..., tuple[Strategy, Any]]) -> None:
  """Registers a name that stands for a choice made at run time, such as "auto".

  `resolve(model, budget, profile)` returns (a Strategy instance, the profile it
  was chosen for). The planner's layer registers "auto" (hetflow/__init__.py),
  so the engine can offer it without importing the planner.
  """
  _RESOLVERS[name] = resolve


def _entry_points():
  return metadata.entry_points(group="hetflow.strategies")


def _load(name: str) -> None:
  """Imports the entry point(s) registered under `name` (the class registers itself)."""
  for entry in _entry_points():
    if entry.name == name and name not in _REGISTRY:
      cls = entry.load()
      if name not in _REGISTRY:  # a class without the decorator: register it by its entry name
        register_strategy(name)(cls)


def available_strategies() -> list[str]:
  """Every registered strategy name, the installed entry points' included."""
  for entry in _entry_points():
    _load(entry.name)
  return sorted(_REGISTRY)


def get_strategy(name: str) -> type[Strategy]:
  """The Strategy class registered as `name`; a clear error if there is none."""
  _load(name)
  if name not in _REGISTRY:
    raise ValueError(f"unknown strategy {name!r}; available: {available_strategies()}"
                     " (a strategy registers with @hetflow.register_strategy or the"
                     " 'hetflow.strategies' entry-point group).")
  return _REGISTRY[name]


def make_strategy(strategy: str | Strategy, options: Any = None, model: Model | None = None,
                  budget: Budget | None = None, profile: Any = None) -> tuple[Strategy, Any]:
  """A Strategy instance for a name, an instance, or a resolver name such as "auto".

  Returns:
    (strategy, profile): the profile is the one a resolver chose for, else `profile`.
  """
  if isinstance(strategy, Strategy):
    if options is not None:
      raise ValueError("pass options to the strategy's constructor, not to the Engine.")
    return strategy, profile
  if strategy in _RESOLVERS:
    if options is not None:
      raise ValueError(f"strategy={strategy!r} chooses its own options; pass a strategy name"
                       " to set them.")
    return _RESOLVERS[strategy](model, budget, profile)
  return get_strategy(strategy)(options), profile
