"""An event simulator that predicts a plan's prefill and per-token decode time.

A strategy's cost model turns a `Placement` into a list of `Event`s for one or
more forward passes: each event occupies one *resource* ("disk", "link" for
host->device, "link_d2h" for device->host, "cpu", "device") for a number of
seconds and may depend on earlier events. The simulator runs them as the
hardware would: every resource serves its events one at a time in the order
they were issued (dispatch order, as CUDA streams, XLA CPU devices and a disk
queue do), and an event starts when its resource is free and its dependencies
are done. Overlap between reading, transferring and computing falls out of
that schedule; it is not assumed.

A strategy brings its own cost model, as its `cost_model` (hetflow.strategy):

  class MyStrategy(hetflow.Strategy):
    @staticmethod
    def cost_model(ctx: simulate.PassContext) -> None:
      for i in range(ctx.model.config.num_layers):
        read = ctx.add("disk", seconds, label=f"layer {i} weights", layer=i)
        ...

and reads what it needs from the typed `ctx.placement.settings` its `plan` wrote.

On a machine whose "device" is the CPU itself (`hardware.device_is_cpu`), the
"device" and "link" resources are the "cpu" resource: compute of both kinds
contends for the same cores, and a host->device copy is a memcpy by those
cores over the memory bus the matvecs already fill (measured here: layer-wise
from host memory takes compute + copy time per token, not the larger of the
two; WORKSPACE_NOTES.md, "Planner accuracy").

Decode time is measured in steady state: two decode passes are simulated back
to back and the second one's increment is the per-token time, so prefetches
that run across the token boundary count as they do in a real run.

On a `costmodel.Cluster` of N hosts, the model a cost model sees is one host's
shard (`costmodel.shard_model`) and the profile one process's share of its
machine (`hardware.shared`); `half_time` ends every layer half with its
all-reduce over the profile's `network`. The collective sits inside the jitted
half (XLA CPU runs it there), so it occupies the device; reads and copies go on.
A cost model that does not compute its halves through `half_time` issues no
collectives: its plans are not applicable on more than one host (`NotApplicable`).

Everything here works on shapes (`Model.shapes` is `jax.eval_shape`), so the
30B models of the HeteGen figures cost nothing to predict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

from hetflow import costmodel, hardware
from hetflow.strategy import NotApplicable, Placement, get_strategy

Resource = Literal["disk", "link", "link_d2h", "cpu", "device"]
RESOURCES: tuple[str, ...] = ("disk", "link", "link_d2h", "cpu", "device")
# Where the device is the CPU: the resources that are really the CPU's cores.
_SHARED_WITH_CPU = ("device", "link", "link_d2h")


@dataclasses.dataclass(frozen=True)
class Event:
  """One use of one resource.

  Attributes:
    resource: which resource it occupies (see RESOURCES).
    seconds: how long it occupies it.
    deps: ids of events that must finish first.
    label: what it is, for traces.
    layer: the layer it belongs to, or None.
    nbytes: bytes moved or consumed, for reports.
    pass_index: which simulated forward pass issued it.
  """

  resource: str
  seconds: float
  deps: tuple[int, ...] = ()
  label: str = ""
  layer: int | None = None
  nbytes: int = 0
  pass_index: int = 0


@dataclasses.dataclass(frozen=True)
class SimSettings:
  """Knobs of the simulation that are not hardware rates.

  Attributes:
    call_overhead_s: fixed cost of one dispatched computation or transfer
      (kernel launch, XLA dispatch); charged to the resource that runs it.
    pass_overhead_s: fixed cost per forward pass on the device (embedding,
      sampling, the host round trip of the next token).
  """

  call_overhead_s: float = 20e-6
  pass_overhead_s: float = 200e-6


@dataclasses.dataclass
class PassContext:
  """What a cost model sees, and the event list it appends to.

  Attributes:
    model: a hetflow Model (only shapes are read).
    placement: the plan being simulated.
    profile: a hetflow.hardware.HardwareProfile.
    settings: SimSettings.
    phase: "prefill" or "decode".
    batch: rows.
    tokens: new tokens per row in this pass (prompt length in prefill, 1 in decode).
    context: KV-cache length attended over.
    passes: forward passes to issue back to back (the cost model loops over them).
    events: the list being built; use `add`.
    state: scratch space a cost model may keep between passes.
    cluster: the hosts the model is sharded over (`model` is then one host's shard).
    collectives: layer all-reduces charged so far (by `half_time`), to tell a cost
      model that issues none.
  """

  model: Any
  placement: Placement
  profile: Any
  settings: SimSettings
  phase: str
  batch: int
  tokens: int
  context: int
  passes: int
  events: list[Event] = dataclasses.field(default_factory=list)
  state: dict[str, Any] = dataclasses.field(default_factory=dict)
  cluster: costmodel.Cluster = costmodel.Cluster()
  pass_index: int = 0
  _scales: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
  collectives: int = 0

  def _allreduce(self) -> float:
    """Seconds of one all-reduce of this pass's hidden-size activations over the cluster."""
    if self.cluster.hosts == 1:
      return 0.0
    self.collectives += 1
    c = self.model.config
    return costmodel.allreduce_time(self.rows * c.hidden_size * self.dtype.itemsize,
                                    self.cluster.hosts, _network(self.profile))

  def add(self, resource: str, seconds: float, deps=(), label: str = "",
          layer: int | None = None, nbytes: int = 0, overhead: bool = True) -> int:
    """Issues an event; returns its id. `overhead` adds one call_overhead_s."""
    if resource not in RESOURCES:
      raise ValueError(f"unknown resource {resource!r}; expected one of {RESOURCES}.")
    deps = tuple(d for d in deps if d is not None)
    seconds = seconds + (self.settings.call_overhead_s if overhead else 0.0)
    self.events.append(Event(resource, seconds, deps, label, layer, nbytes, self.pass_index))
    return len(self.events) - 1

  @property
  def dtype(self):
    return jnp.dtype(self.model.dtype)

  @property
  def rows(self) -> int:
    """Rows through every matmul in this pass: batch x new tokens."""
    return self.batch * self.tokens

  def scale(self, half: str, side: str) -> float:
    """Measured over roofline time of `half` ("attn", "mlp", "head") in decode; 1 in prefill."""
    if self.phase != "decode":
      return 1.0
    key = (half, side)
    if key not in self._scales:
      self._scales[key] = costmodel.decode_scale(self.profile, self.model, half, side)
    return self._scales[key]

  def compute_time(self, side: str, nbytes: float, num_params: float,
                   half: str | None = None, fmt: str | None = None) -> float:
    """Seconds of a matmul on `side` over this pass's rows: the roofline (of the
    stored format `fmt`, default the compute dtype), scaled to this model's
    measured decode rate when `half` ("attn", "mlp") is given."""
    seconds = costmodel.matmul_time(self.profile, side, nbytes, num_params, self.rows,
                                    self.dtype, fmt)
    return seconds * (self.scale(half, side) if half else 1.0)

  def half_time(self, group: str, side: str = "device") -> float:
    """Seconds to compute one whole layer half on `side` (kernels + attention core), and on
    a cluster the all-reduce that ends it."""
    half = group.split("/")[-1]
    seconds = sum(self.compute_time(side, m.nbytes, m.num_params, fmt=m.format)
                  for m in costmodel.group_matrices(self.model, group))
    if half == "attn":
      seconds += costmodel.attention_core_time(self.model, self.profile, side, self.batch,
                                               self.tokens, self.context)
    return seconds * self.scale(half, side) + self._allreduce()

  def head_time(self, side: str = "device") -> float:
    """Seconds of the LM head (whole on every host of a cluster)."""
    # The engine computes logits of the last token only, in both phases.
    return (costmodel.head_time(self.model, self.profile, side, self.batch, 1)
            * self.scale("head", side))

  def copy_time(self, nbytes: float) -> float:
    """Seconds to move `nbytes` of whole layers host -> device: this model's measured
    layer copy where the profile has one, else the profile's link rate."""
    measured = hardware.measured_costs(self.profile, self.model)
    if measured:
      layer = sum(self.model.group_nbytes(f"layers/0/{h}") for h in ("attn", "mlp"))
      return measured["layer_copy_s"] * nbytes / layer
    return nbytes / self.profile.link_bw(True)


def _network(profile):
  if not profile.network:
    raise ValueError(f"profile {profile.name!r} has no network: give it one"
                     " (hardware.with_network(profile, '10gbe'), or a measured one) to predict"
                     " more than one host.")
  return profile.network


class NoCostModel(ValueError):
  """The strategy of a plan has no cost model."""


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The simulated timeline of an event list.

  Attributes:
    events: the events.
    start, end: per event, seconds from the first issue.
    busy: seconds each resource was occupied.
  """

  events: list[Event]
  start: list[float]
  end: list[float]
  busy: dict[str, float]

  @property
  def makespan(self) -> float:
    return max(self.end, default=0.0)

  def pass_end(self, index: int) -> float:
    return max((e for e, ev in zip(self.end, self.events) if ev.pass_index == index),
               default=0.0)

  def bottleneck(self) -> str:
    return max(self.busy, key=self.busy.get) if self.busy else ""


def run_events(events: list[Event], shared_cpu: bool = False) -> Schedule:
  """Schedules events: each resource serves in issue order; deps must finish first.

  Args:
    events: as built by a cost model (deps refer to earlier indices).
    shared_cpu: map the "device" and link resources onto "cpu" (the device is the CPU).

  Returns:
    The Schedule.
  """
  free: dict[str, float] = {}
  busy: dict[str, float] = {}
  start, end = [], []
  for i, ev in enumerate(events):
    res = "cpu" if shared_cpu and ev.resource in _SHARED_WITH_CPU else ev.resource
    if any(d >= i for d in ev.deps):
      raise ValueError(f"event {i} ({ev.label}) depends on a later event {ev.deps}.")
    t0 = max([free.get(res, 0.0)] + [end[d] for d in ev.deps])
    start.append(t0)
    end.append(t0 + ev.seconds)
    free[res] = t0 + ev.seconds
    busy[res] = busy.get(res, 0.0) + ev.seconds
  return Schedule(events, start, end, busy)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """What the simulator predicts for one plan.

  Attributes:
    strategy: the placement's strategy.
    prefill_s: time to first token (one prefill pass over the prompt).
    decode_s_per_token: steady-state seconds per decode step.
    new_tokens: tokens generated, for `throughput`.
    bottleneck: the busiest resource in decode.
    decode_busy: seconds per decode step each resource is busy.
    prefill_busy: as decode_busy, for the prefill pass.
    network_s_per_token: of decode_s_per_token, seconds in collectives (0 on one host).
    cluster: the hosts it was predicted on.
  """

  strategy: str
  prefill_s: float
  decode_s_per_token: float
  new_tokens: int
  bottleneck: str
  decode_busy: dict[str, float]
  prefill_busy: dict[str, float]
  network_s_per_token: float = 0.0
  cluster: costmodel.Cluster = costmodel.Cluster()

  @property
  def decode_tokens_per_s(self) -> float:
    return 1.0 / self.decode_s_per_token

  @property
  def throughput(self) -> float:
    """Generated tokens / (prefill + decode), as HeteGen and FlexGen report it."""
    total = self.prefill_s + (self.new_tokens - 1) * self.decode_s_per_token
    return self.new_tokens / total

  def __str__(self) -> str:
    return (f"{self.strategy}: prefill {self.prefill_s * 1e3:.1f} ms, decode "
            f"{self.decode_s_per_token * 1e3:.2f} ms/token ({self.decode_tokens_per_s:.2f}"
            f" tok/s), throughput {self.throughput:.2f} tok/s, decode bound by"
            f" {self.bottleneck}")


def simulate_pass(model, placement: Placement, profile, phase: str, batch: int,
                  tokens: int, context: int, passes: int = 1,
                  settings: SimSettings | None = None,
                  cluster: costmodel.Cluster | None = None) -> Schedule:
  """Builds and schedules `passes` back-to-back forward passes of one phase.

  On a cluster, `model` and `profile` are one host's (see the module docstring).

  Raises:
    NoCostModel: the strategy has none.
    NotApplicable: on more than one host, for a cost model that issues no collectives.
  """
  cost_model = get_strategy(placement.strategy).cost_model
  if cost_model is None:
    raise NoCostModel(f"strategy {placement.strategy!r} has no cost model, so its plans cannot"
                      " be predicted (give its class a `cost_model`; see hetflow/simulate.py).")
  cluster = cluster or costmodel.Cluster()
  ctx = PassContext(model, placement, profile, settings or SimSettings(), phase, batch,
                    tokens, context, passes, cluster=cluster)
  cost_model(ctx)
  if cluster.hosts > 1 and ctx.collectives < 2 * model.config.num_layers * passes:
    raise NotApplicable(f"{placement.strategy}'s cost model does not compute its layer halves"
                        " through PassContext.half_time, so a sharded model's all-reduces are"
                        f" not in its prediction; it cannot be predicted on {cluster.hosts} hosts")
  return run_events(ctx.events, shared_cpu=hardware.device_is_cpu(profile))


def predict(model, placement: Placement, profile, batch: int = 1, prompt_len: int = 512,
            new_tokens: int = 64, settings: SimSettings | None = None,
            cluster: costmodel.Cluster | None = None) -> Prediction:
  """Predicts prefill time and steady-state decode time per token of a plan.

  Args:
    model: a hetflow Model (shapes only are used; weights are never read); on a
      cluster, one host's shard (`costmodel.shard_model`).
    placement: from any registered strategy's `plan()`.
    profile: a HardwareProfile (hetflow.hardware); on a cluster, one process's
      (`hardware.shared` where several share a machine), with a `network`.
    batch: rows per pass.
    prompt_len: prompt tokens per row.
    new_tokens: tokens generated; decode is simulated at the mean context length.
    settings: SimSettings.
    cluster: the hosts; None: one.

  Returns:
    A Prediction.
  """
  cluster = cluster or costmodel.Cluster()
  pre = simulate_pass(model, placement, profile, "prefill", batch, prompt_len, prompt_len,
                      1, settings, cluster)
  context = prompt_len + max(new_tokens, 1) // 2
  dec = simulate_pass(model, placement, profile, "decode", batch, 1, context, 2, settings,
                      cluster)
  per_token = dec.pass_end(1) - dec.pass_end(0)
  one = simulate_pass(model, placement, profile, "decode", batch, 1, context, 1, settings,
                      cluster)
  busy = {r: s / 1.0 for r, s in one.busy.items()}
  network = 0.0
  if cluster.hosts > 1:
    network = costmodel.collective_seconds(model, cluster, _network(profile), batch)
  return Prediction(placement.strategy, pre.makespan, per_token, new_tokens,
                    max(busy, key=busy.get), busy, dict(pre.busy), network, cluster)


def layer_groups(model) -> list[str]:
  """The model's "layers/<i>/<half>" groups, in execution order."""
  return [g for g in model.group_names() if g.startswith("layers/")]


def layer_of(group: str) -> int:
  return int(group.split("/")[1])
