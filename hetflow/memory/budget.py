"""Byte budgets per tier, and the ledger that enforces them.

Every byte hetflow places in a tier goes through one :class:`MemoryLedger`. On a
CPU-only machine ``device.memory_stats()`` is None, so the ledger is the only
record of what a strategy holds; on a GPU it is cross-checked against
``memory_stats()``. A placement that would exceed its tier's budget is refused
*before* anything is recorded, so a caught :class:`BudgetExceeded` leaves the
ledger exactly as it was.

Units: ``KiB/MiB/GiB/TiB`` are powers of 1024, ``kB/MB/GB/TB`` powers of 1000,
``B`` (or no unit) bytes.
"""

from __future__ import annotations

import dataclasses
import decimal
import itertools
import math
import re
import threading
from collections.abc import Mapping
from typing import Any, Literal

Tier = Literal["device", "host", "disk"]

TIERS: tuple[str, ...] = ("device", "host", "disk")

_UNITS: dict[str, int] = {
  "": 1,
  "b": 1,
  "kb": 10**3,
  "mb": 10**6,
  "gb": 10**9,
  "tb": 10**12,
  "kib": 2**10,
  "mib": 2**20,
  "gib": 2**30,
  "tib": 2**40,
}
_ACCEPTED = "B, kB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024)"
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
# The largest count accepted: 8 EiB, far above any machine, and still an int64
# (numpy, the ledger's arithmetic and XLA all take it).
MAX_BYTES = 2**63 - 1


def parse_bytes(x: int | float | str) -> int:
  """Parses a byte count.

  Args:
    x: an int (bytes), an integral float, or a string such as ``"512MiB"``,
      ``"2GB"``, ``"1.5 GiB"`` or ``"4096"``. Units are case-insensitive.

  Returns:
    The number of bytes, rounded to the nearest integer.

  Raises:
    ValueError: if ``x`` is negative, too large (above ``MAX_BYTES``), not a
      number, or has an unknown unit.
  """
  # bool is an int subclass; Budget(host=True) is a bug, not one byte.
  if isinstance(x, bool):
    raise ValueError(f"not a byte count: {x!r}")
  if isinstance(x, int):
    value = x
  elif isinstance(x, float):
    if not math.isfinite(x):
      raise ValueError(f"not a byte count: {x!r}")
    value = round(x)
  elif isinstance(x, str):
    m = _BYTES_RE.match(x)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
      raise ValueError(
        f"cannot parse {x!r} as a byte count; expected a number with an "
        f"optional unit, e.g. '512MiB', '2GB', '1.5 GiB', '4096'. "
        f"Accepted units: {_ACCEPTED}."
      )
    # Decimal, not float: "1e400GiB" must be refused as too large, not
    # overflow to inf (and a float would round large exact counts).
    amount = decimal.Decimal(m.group(1))
    # Past 10**30 the product is over MAX_BYTES whatever the unit; refusing it
    # here keeps "1e9999999" from building a million-digit int.
    value = MAX_BYTES + 1 if amount.adjusted() > 30 else round(amount * _UNITS[unit])
  else:
    raise ValueError(f"not a byte count: {x!r} (type {type(x).__name__})")
  if value < 0:
    raise ValueError(f"byte count must be >= 0, got {x!r}")
  if value > MAX_BYTES:
    raise ValueError(f"byte count {x!r} is too large (the most is {MAX_BYTES} bytes, 8 EiB);"
                     " pass a size such as '512MiB' or '16GiB'.")
  return int(value)


def format_bytes(n: int | float | None) -> str:
  """Formats a byte count with a binary unit, e.g. ``"1.50 GiB"``.

  Args:
    n: bytes; None formats as ``"unlimited"`` (an unset budget).

  Returns:
    A short human-readable string.
  """
  if n is None:
    return "unlimited"
  sign = "-" if n < 0 else ""
  n = abs(n)
  if n < 1024:
    return f"{sign}{int(n)} B"
  for unit in ("KiB", "MiB", "GiB", "TiB"):
    n /= 1024
    if n < 1024 or unit == "TiB":
      return f"{sign}{n:.2f} {unit}"
  raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class Budget:
  """Byte budget per tier.

  Strings with units are accepted and normalised to ints, so
  ``Budget(device="512MiB", host="4GiB")`` works.

  Attributes:
    device: bytes hetflow may place in accelerator memory (XLA CPU buffers on
      a CPU-only machine); None means unlimited.
    host: bytes hetflow may place in host RAM (pinned where the backend has
      pinned memory); None means unlimited.
    disk: bytes hetflow may place in its disk stores; None means unlimited.
  """

  device: int | None = None
  host: int | None = None
  disk: int | None = None

  def __post_init__(self):
    # Frozen: normalise through object.__setattr__ so strings become ints once
    # and every consumer compares ints.
    for tier in TIERS:
      value = getattr(self, tier)
      if value is not None:
        try:
          object.__setattr__(self, tier, parse_bytes(value))
        except ValueError as e:
          raise ValueError(f"Budget.{tier}: {e}") from None

  def limit(self, tier: str) -> int | None:
    """Returns the budget of ``tier`` in bytes (None: unlimited)."""
    _check_tier(tier)
    return getattr(self, tier)

  @classmethod
  def from_any(cls, x: Any) -> Budget:
    """Builds a Budget from None, a Budget, a dict or a ConfigDict.

    Args:
      x: None (everything unlimited), a Budget (returned as is), or a
        mapping / ``ml_collections.ConfigDict`` with keys among
        ``device``, ``host``, ``disk`` and values as :func:`parse_bytes`
        accepts them (or None).

    Returns:
      A Budget.

    Raises:
      ValueError: on unknown keys or unparsable sizes.
      TypeError: on any other type.
    """
    if x is None:
      return cls()
    if isinstance(x, Budget):
      return x
    if hasattr(x, "to_dict") and not isinstance(x, Mapping):
      x = x.to_dict()  # ml_collections.ConfigDict / FrozenConfigDict
    if isinstance(x, Mapping):
      unknown = sorted(set(x) - set(TIERS))
      if unknown:
        raise ValueError(f"unknown budget tier(s) {unknown}; the tiers are {list(TIERS)}"
                         " (e.g. device='1GiB' for accelerator memory).")
      return cls(**dict(x))
    raise TypeError(
      f"cannot build a Budget from {type(x).__name__}; pass None, a Budget, a dict or a ConfigDict"
    )

  def __str__(self) -> str:
    parts = ", ".join(f"{t}={format_bytes(getattr(self, t))}" for t in TIERS)
    return f"Budget({parts})"


def _check_tier(tier: str) -> None:
  if tier not in TIERS:
    raise ValueError(f"unknown tier {tier!r}; expected one of {list(TIERS)}")


class BudgetExceeded(MemoryError):
  """A placement would exceed a tier's budget.

  Attributes are plain and mutable on purpose: a planner that catches this can
  fill in ``minimum`` (the smallest budget that would work for its plan) and
  re-raise; the message is rebuilt from the attributes each time it is shown.

  Attributes:
    tier: the tier that is over budget.
    requested: bytes of the refused placement.
    in_use: bytes already held in the tier when it was refused.
    budget: the tier's budget in bytes.
    group: what was being placed (e.g. ``"layers/3"``), or None.
    minimum: the smallest budget for ``tier`` that would make the plan work,
      when a caller knows it; else None.
  """

  def __init__(
    self,
    tier: str,
    requested: int,
    in_use: int,
    budget: int,
    group: str | None = None,
    minimum: int | None = None,
  ):
    self.tier = tier
    self.requested = requested
    self.in_use = in_use
    self.budget = budget
    self.group = group
    self.minimum = minimum
    super().__init__(self._message())

  def _message(self) -> str:
    what = f"{self.group!r} " if self.group else ""
    msg = (
      f"{self.tier} tier over budget: placing {what}({format_bytes(self.requested)}) "
      f"with {format_bytes(self.in_use)} in use exceeds the {self.tier} budget of "
      f"{format_bytes(self.budget)}."
    )
    if self.minimum is not None:
      msg += (
        f" The smallest {self.tier} budget that works for this plan is "
        f"{format_bytes(self.minimum)}; raise Budget({self.tier}=...)."
      )
    else:
      msg += f" Raise Budget({self.tier}=...) or choose a strategy that places less there."
    return msg

  def __str__(self) -> str:
    return self._message()

  def __reduce__(self):
    # Keep the exception picklable (it crosses process boundaries in benchmarks).
    return (
      type(self),
      (self.tier, self.requested, self.in_use, self.budget, self.group, self.minimum),
    )


@dataclasses.dataclass(frozen=True)
class Allocation:
  """A record of bytes placed in a tier; hand it back to ``MemoryLedger.release``.

  Attributes:
    id: unique within its ledger.
    tier: one of ``TIERS``.
    nbytes: bytes held.
    group: what the bytes belong to (e.g. ``"layers/3"``, ``"kv_cache"``).
  """

  id: int
  tier: str
  nbytes: int
  group: str


class MemoryLedger:
  """Thread-safe record of every byte hetflow holds, per tier and per group.

  Reader threads, prefetchers and the token loop allocate and release
  concurrently, so every method takes one lock; none does I/O while holding it.

  Args:
    budget: anything :meth:`Budget.from_any` accepts.
  """

  def __init__(self, budget: Any = None):
    self.budget = Budget.from_any(budget)
    self._lock = threading.Lock()
    self._ids = itertools.count()
    self._live: dict[int, Allocation] = {}
    self._used = {t: 0 for t in TIERS}
    self._peak = {t: 0 for t in TIERS}
    # (group, tier) -> bytes; groups are keyed per tier because one group
    # can span tiers (tensor-split keeps part of a layer on each side).
    self._group_used: dict[tuple[str, str], int] = {}
    self._group_peak: dict[tuple[str, str], int] = {}

  def check(self, tier: str, nbytes: int) -> bool:
    """Says whether placing ``nbytes`` in ``tier`` now would fit; records nothing."""
    _check_tier(tier)
    limit = self.budget.limit(tier)
    with self._lock:
      return limit is None or self._used[tier] + int(nbytes) <= limit

  def headroom(self, tier: str) -> int | None:
    """Bytes still free in ``tier`` (None: unlimited)."""
    _check_tier(tier)
    limit = self.budget.limit(tier)
    with self._lock:
      return None if limit is None else limit - self._used[tier]

  def allocate(self, tier: str, nbytes: int, group: str = "") -> Allocation:
    """Records ``nbytes`` placed in ``tier`` on behalf of ``group``.

    Args:
      tier: one of ``TIERS``.
      nbytes: bytes to record (>= 0).
      group: what they belong to, for per-group peaks and error messages.

    Returns:
      The Allocation to pass to :meth:`release`.

    Raises:
      BudgetExceeded: if the tier would go over budget; nothing is recorded.
      ValueError: on an unknown tier or negative size.
    """
    _check_tier(tier)
    nbytes = int(nbytes)
    if nbytes < 0:
      raise ValueError(f"cannot allocate a negative size ({nbytes}) in {tier}")
    limit = self.budget.limit(tier)
    with self._lock:
      in_use = self._used[tier]
      if limit is not None and in_use + nbytes > limit:
        raise BudgetExceeded(tier, nbytes, in_use, limit, group or None)
      alloc = Allocation(next(self._ids), tier, nbytes, group)
      self._live[alloc.id] = alloc
      self._used[tier] = in_use + nbytes
      self._peak[tier] = max(self._peak[tier], self._used[tier])
      key = (group, tier)
      g = self._group_used.get(key, 0) + nbytes
      self._group_used[key] = g
      self._group_peak[key] = max(self._group_peak.get(key, 0), g)
      return alloc

  def release(self, allocation: Allocation) -> None:
    """Returns an allocation's bytes to its tier.

    Raises:
      ValueError: if it was already released (or belongs to another ledger):
        a double release would silently corrupt every later budget check.
    """
    with self._lock:
      live = self._live.get(allocation.id)
      if live is None or live != allocation:
        raise ValueError(
          f"allocation {allocation} is not live in this ledger "
          "(released twice, or from another ledger)"
        )
      del self._live[allocation.id]
      self._used[allocation.tier] -= allocation.nbytes
      key = (allocation.group, allocation.tier)
      self._group_used[key] -= allocation.nbytes

  def hold(self, tier: str, nbytes: int, group: str = "") -> _Hold:
    """Context manager: allocates on entry, releases on exit."""
    return _Hold(self, tier, nbytes, group)

  def used(self, tier: str) -> int:
    """Bytes held now in ``tier``."""
    _check_tier(tier)
    with self._lock:
      return self._used[tier]

  def peak(self, tier: str) -> int:
    """Largest number of bytes held at once in ``tier`` since the last reset."""
    _check_tier(tier)
    with self._lock:
      return self._peak[tier]

  def used_by_group(self, tier: str | None = None) -> dict[str, int]:
    """Bytes held now per group (summed over tiers, or in ``tier`` only)."""
    if tier is not None:
      _check_tier(tier)
    out: dict[str, int] = {}
    with self._lock:
      for (group, t), n in self._group_used.items():
        if n and (tier is None or t == tier):
          out[group] = out.get(group, 0) + n
    return out

  def live(self) -> list[Allocation]:
    """The allocations not yet released, oldest first."""
    with self._lock:
      return list(self._live.values())

  def reset_peaks(self) -> None:
    """Sets every peak to the current usage (e.g. between prefill and decode)."""
    with self._lock:
      self._peak = dict(self._used)
      self._group_peak = dict(self._group_used)

  def summary(self) -> dict[str, Any]:
    """A JSON-able snapshot.

    Returns:
      ``{"tiers": {tier: {"used", "peak", "budget"}}, "groups": {group:
      {tier: {"used", "peak"}}}}``, bytes as ints, budget None when unlimited.
    """
    with self._lock:
      tiers = {
        t: {"used": self._used[t], "peak": self._peak[t], "budget": self.budget.limit(t)}
        for t in TIERS
      }
      groups: dict[str, dict[str, dict[str, int]]] = {}
      for (group, t), peak in sorted(self._group_peak.items()):
        groups.setdefault(group, {})[t] = {
          "used": self._group_used.get((group, t), 0),
          "peak": peak,
        }
    return {"tiers": tiers, "groups": groups}

  def __repr__(self) -> str:
    with self._lock:
      parts = ", ".join(
        f"{t}={format_bytes(self._used[t])}/{format_bytes(self.budget.limit(t))}" for t in TIERS
      )
    return f"MemoryLedger({parts})"


class _Hold:
  def __init__(self, ledger: MemoryLedger, tier: str, nbytes: int, group: str):
    self._args = (ledger, tier, nbytes, group)
    self.allocation: Allocation | None = None

  def __enter__(self) -> Allocation:
    ledger, tier, nbytes, group = self._args
    self.allocation = ledger.allocate(tier, nbytes, group)
    return self.allocation

  def __exit__(self, *exc) -> None:
    self._args[0].release(self.allocation)
