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

Cost models are registered by strategy name, so a new strategy brings its own:

  @simulate.register_cost_model("neuron_cluster")
  def neuron_cluster_events(ctx: simulate.PassContext) -> None:
    for i in range(ctx.model.config.num_layers):
      read = ctx.add("disk", seconds, label=f"layer {i} neurons", layer=i)
      ...

On a machine whose "device" is the CPU itself (`costmodel.shares_cpu`), the
"device" and "link" resources are the "cpu" resource: compute of both kinds
contends for the same cores, and a host->device copy is a memcpy by those
cores over the memory bus the matvecs already fill (measured here: layer-wise
from host memory takes compute + copy time per token, not the larger of the
two; WORKSPACE_NOTES.md, "Planner accuracy").

Decode time is measured in steady state: two decode passes are simulated back
to back and the second one's increment is the per-token time, so prefetches
that run across the token boundary count as they do in a real run.

Everything here works on shapes (`Model.shapes` is `jax.eval_shape`), so the
30B models of the HeteGen figures cost nothing to predict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import jax.numpy as jnp

from hetflow import calibration, costmodel
from hetflow.strategy import Placement

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
  pass_index: int = 0
  _scales: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)

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
                   half: str | None = None) -> float:
    """Seconds of a matmul on `side` over this pass's rows: the roofline, scaled
    to this model's measured decode rate when `half` ("attn", "mlp") is given."""
    seconds = costmodel.matmul_time(self.profile, side, nbytes, num_params, self.rows,
                                    self.dtype)
    return seconds * (self.scale(half, side) if half else 1.0)

  def half_time(self, group: str, side: str = "device") -> float:
    """Seconds to compute one whole layer half on `side` (kernels + attention core)."""
    half = group.split("/")[-1]
    seconds = sum(self.compute_time(side, m.nbytes, m.num_params)
                  for m in costmodel.group_matrices(self.model, group))
    if half == "attn":
      seconds += costmodel.attention_core_time(self.model, self.profile, side, self.batch,
                                               self.tokens, self.context)
    return seconds * self.scale(half, side)

  def head_time(self, side: str = "device") -> float:
    # The engine computes logits of the last token only, in both phases.
    return (costmodel.head_time(self.model, self.profile, side, self.batch, 1)
            * self.scale("head", side))

  def copy_time(self, nbytes: float) -> float:
    """Seconds to move `nbytes` of whole layers host -> device: this model's measured
    layer copy where the profile has one, else the profile's link rate."""
    measured = calibration.measured(self.profile, self.model)
    if measured:
      layer = sum(self.model.group_nbytes(f"layers/0/{h}") for h in ("attn", "mlp"))
      return measured["layer_copy_s"] * nbytes / layer
    return nbytes / self.profile.link_bw(True)


CostModel = Callable[[PassContext], None]
_COST_MODELS: dict[str, CostModel] = {}


def register_cost_model(strategy: str) -> Callable[[CostModel], CostModel]:
  """Decorator: registers the cost model of `strategy`; duplicates are refused."""

  def wrap(fn: CostModel) -> CostModel:
    if strategy in _COST_MODELS and _COST_MODELS[strategy] is not fn:
      raise ValueError(f"a cost model for {strategy!r} is already registered"
                       f" ({_COST_MODELS[strategy].__module__}).")
    _COST_MODELS[strategy] = fn
    return fn

  return wrap


def cost_models() -> list[str]:
  """Names of the strategies the simulator can predict."""
  return sorted(_COST_MODELS)


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
  """

  strategy: str
  prefill_s: float
  decode_s_per_token: float
  new_tokens: int
  bottleneck: str
  decode_busy: dict[str, float]
  prefill_busy: dict[str, float]

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
                  settings: SimSettings | None = None) -> Schedule:
  """Builds and schedules `passes` back-to-back forward passes of one phase."""
  _load_builtin_cost_models()
  if placement.strategy not in _COST_MODELS:
    raise ValueError(f"no cost model for strategy {placement.strategy!r}; registered:"
                     f" {cost_models()}.")
  ctx = PassContext(model, placement, profile, settings or SimSettings(), phase, batch,
                    tokens, context, passes)
  _COST_MODELS[placement.strategy](ctx)
  return run_events(ctx.events, shared_cpu=costmodel.shares_cpu(profile))


def predict(model, placement: Placement, profile, batch: int = 1, prompt_len: int = 512,
            new_tokens: int = 64, settings: SimSettings | None = None) -> Prediction:
  """Predicts prefill time and steady-state decode time per token of a plan.

  Args:
    model: a hetflow Model (shapes only are used; weights are never read).
    placement: from any registered strategy's `plan()`.
    profile: a HardwareProfile (hetflow.hardware).
    batch: rows per pass.
    prompt_len: prompt tokens per row.
    new_tokens: tokens generated; decode is simulated at the mean context length.
    settings: SimSettings.

  Returns:
    A Prediction.
  """
  pre = simulate_pass(model, placement, profile, "prefill", batch, prompt_len, prompt_len,
                      1, settings)
  context = prompt_len + max(new_tokens, 1) // 2
  dec = simulate_pass(model, placement, profile, "decode", batch, 1, context, 2, settings)
  per_token = dec.pass_end(1) - dec.pass_end(0)
  one = simulate_pass(model, placement, profile, "decode", batch, 1, context, 1, settings)
  busy = {r: s / 1.0 for r, s in one.busy.items()}
  return Prediction(placement.strategy, pre.makespan, per_token, new_tokens,
                    max(busy, key=busy.get), busy, dict(pre.busy))


# -- built-in cost models -------------------------------------------------------


def _layer_groups(model) -> list[str]:
  return [g for g in model.group_names() if g.startswith("layers/")]


def _layer_of(group: str) -> int:
  return int(group.split("/")[1])


@register_cost_model("resident")
def resident_events(ctx: PassContext) -> None:
  """Everything on the device: compute only, one half after the other."""
  prev = None
  for p in range(ctx.passes):
    ctx.pass_index = p
    prev = ctx.add("device", ctx.settings.pass_overhead_s, (prev,), "pass start",
                   overhead=False)
    for g in _layer_groups(ctx.model):
      prev = ctx.add("device", ctx.half_time(g), (prev,), g, _layer_of(g))
    prev = ctx.add("device", ctx.head_time(), (prev,), "head")


def _setting(placement: Placement, key: str, default):
  """A strategy setting carried in the placement (settings, predicted, or any group's details)."""
  if key in placement.settings:
    return placement.settings[key]
  if key in placement.predicted:
    return placement.predicted[key]
  for g in placement.groups.values():
    if key in g.details:
      return g.details[key]
  return default


@register_cost_model("layerwise")
def layerwise_events(ctx: PassContext) -> None:
  """Layer-wise streaming (strategies/layerwise.py): each streamed layer (both
  halves, one unit) is loaded -- disk read, then host->device copy -- into a
  ring of `prefetch_depth + 1` slots, so `prefetch_depth` layers load while one
  computes; streaming wraps into the next pass.

  Settings read from the placement (`settings`, `predicted`, or a group's `details`), with
  layerwise's defaults:
    prefetch_depth (1): layers in flight while one computes.
    read_block_bytes (4 MiB): size of one disk request.
    read_queue_depth (4): disk requests in flight.
    link_copy: whether loading to the device copies. Default: from host memory
      always; from disk only where the device has its own memory (on a CPU-only
      machine `device_put` aliases the page-aligned read buffer).
  """
  pl, prof = ctx.placement, ctx.profile
  depth = int(_setting(pl, "prefetch_depth", 1))
  block = int(_setting(pl, "read_block_bytes", 4 << 20))
  qd = int(_setting(pl, "read_queue_depth", 4))
  shared = costmodel.shares_cpu(prof)
  n = ctx.model.config.num_layers
  done: list[int] = []  # last compute event of every streamed layer, across passes
  prev = None
  for p in range(ctx.passes):
    ctx.pass_index = p
    prev = ctx.add("device", ctx.settings.pass_overhead_s, (prev,), "pass start",
                   overhead=False)
    for i in range(n):
      halves = [f"layers/{i}/attn", f"layers/{i}/mlp"]
      gp = pl.groups[halves[0]]
      nbytes = sum(pl.groups[g].nbytes for g in halves)
      loaded = None
      streamed = gp.tier in ("disk", "host")
      if streamed:
        # A ring slot frees when the layer `depth + 1` streamed steps back is done.
        free = done[-(depth + 1)] if len(done) > depth else None
        copy = True
        if gp.tier == "disk":
          loaded = ctx.add("disk", nbytes / prof.disk_bw(block, qd), (free,),
                           f"read layer {i}", i, nbytes)
          copy = not shared
        copy = bool(_setting(pl, "link_copy", copy))
        if copy:
          loaded = ctx.add("link", ctx.copy_time(nbytes), (loaded, free),
                           f"h2d layer {i}", i, nbytes)
      for g in halves:
        prev = ctx.add("device", ctx.half_time(g), (prev, loaded), g, i)
      if streamed:
        done.append(prev)
    prev = ctx.add("device", ctx.head_time(), (prev,), "head")


@register_cost_model("tensor_split")
def tensor_split_events(ctx: PassContext) -> None:
  """HeteGen's split: per matrix, alpha of it goes host->device and is multiplied
  there while the CPU multiplies the rest; activations cross both ways.

  Mirrors strategies/tensor_split.py: the weight transfer of split kernel u+1
  is issued right after kernel u's device multiply, once kernel u-1's device
  multiply has finished (two kernels of staging); it wraps into the next pass.
  Every kernel also costs a fixed `split_overhead_s` on the device: the
  strategy runs each half as stages cut at its kernels, with extra dispatches
  and activation copies, resident kernels included (measured here: the gap to
  the calibrated halves stayed ~35 ms per llama-1b token whether 10% or 90%
  of the kernels were resident). This model's measured figure where the
  profile has a calibration, else the strategy option's.
  Reads `details["matrices"]` of each group: {name: {"resident": bool,
  "alpha": {"prefill": a, "decode": a}}}.
  """
  pl, prof, c = ctx.placement, ctx.profile, ctx.model.config
  itemsize = ctx.dtype.itemsize
  # link_copy False: host and device are one CPU device; copies are no-ops.
  # (Only meaningful when the profile is of such a machine.)
  no_copy = costmodel.shares_cpu(prof) and not _setting(pl, "link_copy", True)
  link = float("inf") if no_copy else prof.link_bw(True)
  groups = _layer_groups(ctx.model)
  mats = {g: costmodel.group_matrices(ctx.model, g) for g in groups}
  info = {g: pl.groups[g].details.get("matrices", {}) for g in groups}
  measured = calibration.measured(prof, ctx.model)
  split_cost = (measured["split_kernel_s"] if measured and "split_kernel_s" in measured
                else float(_setting(pl, "split_overhead_s", 0.0)))
  units = [(g, m) for g in groups for m in mats[g]
           if not info[g].get(m.name, {}).get("resident", False)]
  issued: dict[int, int | None] = {}  # unit (across passes) -> its transfer event
  dev_events: list[int] = []  # device multiply of every split kernel, in order

  def alpha_of(g, m):
    return info[g].get(m.name, {}).get("alpha", {}).get(ctx.phase, 0.0)

  def issue(k: int) -> None:
    if k in issued or k >= len(units) * ctx.passes:
      return
    g, m = units[k % len(units)]
    nbytes = alpha_of(g, m) * m.nbytes
    after = dev_events[-2] if len(dev_events) >= 2 else None
    issued[k] = (ctx.add("link", nbytes / link, (after,), f"h2d {g}/{m.name}",
                         _layer_of(g), int(nbytes)) if nbytes else None)

  prev = None
  k = 0  # split kernels so far, across passes
  for p in range(ctx.passes):
    ctx.pass_index = p
    prev = ctx.add("device", ctx.settings.pass_overhead_s, (prev,), "pass start",
                   overhead=False)
    for g in groups:
      layer, half = _layer_of(g), g.split("/")[-1]
      stage_in = prev
      for stage in sorted({m.stage for m in mats[g]}):
        if stage == 1 and half == "attn":
          stage_in = ctx.add("device", costmodel.attention_core_time(
              ctx.model, prof, "device", ctx.batch, ctx.tokens, ctx.context)
                             * ctx.scale(half, "device"), (stage_in,), f"{g} core", layer)
        in_stage = [m for m in mats[g] if m.stage == stage]
        split = [m for m in in_stage if not info[g].get(m.name, {}).get("resident", False)]
        joins, cpu = [], {}
        if split:  # one device->host copy of the input serves the whole stage
          width = c.hidden_size if split[0].name == "experts" else split[0].in_features
          x_bytes = ctx.rows * width * itemsize
          sent = ctx.add("link_d2h", x_bytes / link, (stage_in,), f"d2h {g} x", layer,
                         x_bytes)
          for m in split:  # CPU parts are issued first
            a = alpha_of(g, m)
            cpu[m.name] = ctx.add("cpu", ctx.compute_time("cpu", (1 - a) * m.nbytes,
                                                          (1 - a) * m.num_params, half),
                                  (sent,), f"cpu {g}/{m.name}", layer)
        for m in in_stage:
          if m not in split:
            joins.append(ctx.add("device", ctx.compute_time("device", m.nbytes, m.num_params,
                                                            half) + split_cost,
                                 (stage_in,), f"{g}/{m.name}", layer))
            continue
          a = alpha_of(g, m)
          issue(k)
          dev = ctx.add("device", ctx.compute_time("device", a * m.nbytes, a * m.num_params,
                                                   half),
                        (stage_in, issued[k]), f"dev {g}/{m.name}", layer)
          dev_events.append(dev)
          k += 1
          issue(k)
          out_cols = c.hidden_size if m.name == "experts" else m.out_features
          y_bytes = int(ctx.rows * (1 - a) * out_cols * itemsize)
          back = ctx.add("link", y_bytes / link, (cpu[m.name],), f"h2d {g}/{m.name} y",
                         layer, y_bytes)
          joins.append(ctx.add("device", split_cost, (dev, back), f"join {g}/{m.name}", layer))
        stage_in = ctx.add("device", 0.0, tuple(joins), f"{g} stage {stage}", layer)
      prev = stage_in
    prev = ctx.add("device", ctx.head_time(), (prev,), "head")


def _load_builtin_cost_models() -> None:
  """Strategies may register cost models in their own modules; import them."""
  try:
    import strategies  # noqa: F401  (registers strategies and their cost models)
  except ImportError:  # running without the plugin package on the path
    pass
  from hetflow.sparsity import cost  # noqa: F401  (neuron_cluster's cost model)
