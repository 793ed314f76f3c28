"""The Strategy protocol and the registry of strategies (DESIGN.md, seam 3).

A strategy decides where every parameter group lives (`plan`, pure), puts the
weights there through the ledger (`materialize`), and serves them to the
engine layer by layer (`fetch` / `release`), optionally computing a layer's
FFN its own way (`run_ffn`). Built-in strategies live in the top-level
`strategies` package; third-party ones register through the entry-point group
`hetflow.strategies` (module:Class) or by importing a module that uses
`@register_strategy`.

Placement groups, in execution order: "embed", "layers/<i>/attn",
"layers/<i>/mlp", "head" (hetflow.models.Model.group_names).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from importlib import metadata
from typing import Any, Callable, ClassVar, Literal

from hetflow.memory.budget import Budget, MemoryLedger, format_bytes
from hetflow.models.model import Model
from hetflow.trace import Timeline

Tier = Literal["device", "host", "disk"]
Phase = Literal["prefill", "decode"]


@dataclasses.dataclass(frozen=True)
class GroupPlacement:
  """Where one parameter group lives and why.

  Attributes:
    tier: the tier holding the group between uses.
    nbytes: its size in bytes.
    reason: one line a person can read in `print(placement)`.
    details: strategy-specific facts (e.g. split ratios per matrix).
  """

  tier: Tier
  nbytes: int
  reason: str = ""
  details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Placement:
  """A strategy's plan: every group's tier, bytes per tier, and predictions.

  Attributes:
    strategy: name of the strategy that made it.
    groups: group name -> GroupPlacement, in execution order.
    working_bytes: extra bytes per tier the strategy needs while running
      (staging buffers, caches), on top of the groups' resident bytes.
    predicted: predicted figures (e.g. "decode_s_per_token") with their basis.
    notes: free-form lines shown when printed.
    settings: runtime settings a cost model needs to predict this plan
      (e.g. layerwise's prefetch_depth, read size, queue depth).
  """

  strategy: str
  groups: dict[str, GroupPlacement]
  working_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
  predicted: dict[str, Any] = dataclasses.field(default_factory=dict)
  notes: tuple[str, ...] = ()
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)

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
    for key, value in self.predicted.items():
      lines.append(f"  predicted {key}: {value}")
    lines.extend(f"  {n}" for n in self.notes)
    return "\n".join(lines)


class Strategy(abc.ABC):
  """Base class of every strategy; see the module docstring for the protocol.

  Subclasses set `Options` to a frozen dataclass documenting every option.
  The engine calls, per forward pass: `begin(phase)`, then for each layer i
  `fetch(i, "attn")`, `run_attention(...)`, `release(i, "attn")`, `fetch(i, "mlp")`,
  `run_ffn(...)`,
  `release(i, "mlp")`, and finally `end()`.
  """

  name: ClassVar[str] = ""
  Options: ClassVar[type] = type(None)

  def __init__(self, options: Any = None):
    if options is None:
      options = self.Options()
    elif isinstance(options, dict):
      options = self.Options(**options)
    self.options = options
    self.timeline: Timeline | None = None
    self.ledger: MemoryLedger | None = None

  @classmethod
  def candidates(cls, model: Model, budget: Budget) -> list[Any]:
    """Option sets worth comparing for this model and budget (the planner's
    search space). Default: the strategy's default options only."""
    return [cls.Options()]

  @abc.abstractmethod
  def plan(self, model: Model, budget: Budget, profile: Any = None) -> Placement:
    """Where every group lives. Pure: no I/O, no allocation.

    Raises:
      hetflow.memory.BudgetExceeded: with `minimum` set, if no placement fits.
    """

  @abc.abstractmethod
  def materialize(self, placement: Placement, model: Model, ledger: MemoryLedger) -> None:
    """Puts the weights in their tiers, recording every byte in `ledger`."""

  @abc.abstractmethod
  def fetch(self, layer: int, half: str) -> Any:
    """Returns layer `layer`'s `half` ("attn"/"mlp") parameters, ready to compute."""

  def globals(self) -> dict[str, Any]:
    """Parameters of "embed" and "head" (trees of device arrays)."""
    raise NotImplementedError

  def release(self, layer: int, half: str) -> None:
    """The engine is done with these weights for this pass."""

  def begin(self, phase: Phase, num_tokens: int) -> None:
    """A forward pass over `num_tokens` new tokens per row starts."""

  def end(self) -> None:
    """The forward pass is over (the next one may start prefetching)."""

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

  def stats(self) -> dict[str, Any]:
    """Counters for the run so far (bytes read or transferred per tier, ...)."""
    return {}

  def close(self) -> None:
    """Releases buffers, threads and files."""


_REGISTRY: dict[str, type[Strategy]] = {}
_BUILTINS_LOADED = False


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
  """Class decorator: registers a Strategy under `name`; duplicates are refused."""

  def wrap(cls: type[Strategy]) -> type[Strategy]:
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(
          f"strategy {name!r} is already registered by"
          f" {_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}; pick another name.")
    cls.name = name
    _REGISTRY[name] = cls
    return cls

  return wrap


def _load_plugins() -> None:
  global _BUILTINS_LOADED
  if _BUILTINS_LOADED:
    return
  _BUILTINS_LOADED = True
  importlib.import_module("strategies")
  for entry in metadata.entry_points(group="hetflow.strategies"):
    if entry.name not in _REGISTRY:
      entry.load()


def available_strategies() -> list[str]:
  _load_plugins()
  return sorted(_REGISTRY)


def get_strategy(name: str) -> type[Strategy]:
  """The Strategy class registered as `name`; a clear error if there is none."""
  _load_plugins()
  if name not in _REGISTRY:
    raise ValueError(f"unknown strategy {name!r}; available: {sorted(_REGISTRY)}.")
  return _REGISTRY[name]


def make_strategy(strategy: str | Strategy, options: Any = None) -> Strategy:
  if isinstance(strategy, Strategy):
    if options is not None:
      raise ValueError("pass options to the strategy's constructor, not to the Engine.")
    return strategy
  return get_strategy(strategy)(options)
