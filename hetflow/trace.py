"""A timeline of what happened per layer: compute, transfers, disk reads.

Strategies and the engine append events; a benchmark turns the timeline into
a Chrome/Perfetto trace (`to_chrome_trace`) and a picture (`plot`) that shows
whether reads overlap compute.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time


@dataclasses.dataclass(frozen=True)
class Event:
  """One interval. kind: "compute", "transfer" or "read"; times in seconds."""

  kind: str
  label: str
  start: float
  end: float
  layer: int | None = None
  nbytes: int = 0


class Timeline:
  """Thread-safe list of events (reader threads append too).

  Attributes:
    events: the events, oldest first (at most `max_events`: older ones are dropped).
    max_events: the bound, or None (keep all).
    origin: time zero of the Chrome trace.
  """

  def __init__(self, max_events: int | None = None):
    """A timeline; `max_events` bounds it (a ring), so a long untraced run stays flat."""
    self.max_events = max_events
    self.events: collections.deque[Event] = collections.deque(maxlen=max_events)
    self._lock = threading.Lock()
    self.origin = time.perf_counter()

  def add(self, kind: str, label: str, start: float, end: float, layer: int | None = None,
          nbytes: int = 0) -> None:
    with self._lock:
      self.events.append(Event(kind, label, start, end, layer, nbytes))

  def clear(self) -> None:
    with self._lock:
      self.events.clear()
      self.origin = time.perf_counter()

  def to_chrome_trace(self, path: str) -> None:
    """Writes the events as a Chrome trace (open in ui.perfetto.dev)."""
    lanes = {"compute": 1, "transfer": 2, "read": 3}
    trace = [{"name": e.label, "cat": e.kind, "ph": "X", "pid": 0,
              "tid": lanes.get(e.kind, 4), "ts": (e.start - self.origin) * 1e6,
              "dur": (e.end - e.start) * 1e6,
              "args": {"layer": e.layer, "bytes": e.nbytes}} for e in self.events]
    with open(path, "w") as f:
      json.dump({"traceEvents": trace}, f)

  def plot(self, path: str, title: str = "") -> None:
    """A Gantt chart: one lane per kind, one bar per event."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["read", "transfer", "compute"]
    colors = {"read": "tab:orange", "transfer": "tab:blue", "compute": "tab:green"}
    fig, ax = plt.subplots(figsize=(12, 3))
    t0 = min((e.start for e in self.events), default=self.origin)
    for e in self.events:
      if e.kind in kinds:
        ax.barh(kinds.index(e.kind), (e.end - e.start) * 1e3, left=(e.start - t0) * 1e3,
                color=colors[e.kind], edgecolor="black", linewidth=0.3)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("ms")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
