"""`tensor_split`: HeteGen's split of every offloaded matrix between CPU and device.

Where the weights live. Within the device budget, whole matrices are kept on
the device, chosen greedily by the CPU time each saves per device byte
(`plan`, the "parameter scheduler"). Every other linear kernel stays in host
memory, cut by output features (columns; kernels are [in, out]) into at most
three column blocks at the prefill and decode split points. Mixtral's expert
kernels are 3-D and do not go through the model's `linear`; they are split
along experts instead (the first alpha * X experts on the device side), so one
matrix unit per MoE layer.

How one split linear runs (`_SplitHalf.linears`). The model's pure halves
(`modules.attention_half` / `ffn_half`) take an injectable `linear`; the
strategy runs each half as a few jitted *stages* cut at its linears (stage j
computes the input of the j-th group of linears that share an input, e.g.
q/k/v or gate/up, from the outputs of the earlier ones), and between stages it
issues, for each kernel of the group:

  1. the input activations device -> host (once per group),
  2. the CPU's multiply of its (1 - alpha) columns, on the CPU backend
     (`jax.devices("cpu")`), where those columns lie,
  3. the device's multiply of its alpha columns, whose host -> device transfer
     was issued while the previous kernel was being multiplied (prefetch),
  4. the CPU's result host -> device, and a join (concatenate + bias).

Every call returns at once (JAX dispatches asynchronously): the CPU backend
works through its queue while the device works through its own, so the CPU
multiply, the weight transfer and the device multiply run at the same time.
The Python thread waits in one place only: before issuing the next kernel's
weight transfer it waits for the device multiply of the kernel before the
current one, which bounds the device memory in flight to two kernels' device
columns (the "staging" bytes in the plan and the ledger), as HeteGen's
pipeline does.

On a GPU machine the device is the GPU and the CPU part runs on the CPU
backend: the natural case. A CPU-only machine is the degenerate case: the
"device" is CPU device 0, and the CPU part runs on the last CPU device, which
is a different device (and a real copy) when XLA is started with
`--xla_force_host_platform_device_count=N`, N > 1, and the same device (every
transfer a no-op) otherwise. Both are exact; only a GPU shows the speed.

The split ratio alpha per matrix and phase comes from HeteGen's formula
(`hetflow.costmodel.hetegen_alpha`) with the rates of a `HardwareProfile`;
prefill (batch x prompt rows) makes the CPU compute-bound, so its alpha is
larger. `TensorSplitOptions.alpha` forces one alpha everywhere (tests, sweeps).

On a mesh (docs/distributed.md) each local shard is a *lane*: a TensorSplit of
its own on the shard's Model (H/N heads, F/N FFN columns), placed on the shard's
device, with the same plan (all shards have the same shapes). The lanes run each
half stage by stage side by side; after the linears that end a half (`o`,
`down`; Mixtral's expert mixture) their partial outputs are summed over every
shard of the mesh (`MeshShards.all_reduce`, the psum of the dense path) before
the bias and the residual, as `hetflow.models.sharding.ShardedFunctions` does.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hetflow import costmodel, hardware, simulate
from hetflow.memory import tiers
from hetflow.memory.budget import BudgetExceeded, MemoryLedger, format_bytes
from hetflow.models import formats, layers, modules
from hetflow.strategy import GroupPlacement, Placement, Strategy, register_strategy

PHASES = ("prefill", "decode")


@dataclasses.dataclass(frozen=True)
class TensorSplitOptions:
  """Options of `tensor_split`.

  Attributes:
    alpha: force this split ratio (fraction of each split matrix multiplied on
      the device) for every split matrix in both phases; None: HeteGen's
      formula from the profile's rates, per phase.
    keep_resident: let the scheduler keep whole matrices on the device while
      the budget allows; False splits every kernel (for tests and sweeps).
    batch: rows per decode step assumed when choosing alphas and predicting.
    prompt_len: prompt tokens per row assumed for the prefill alpha and the
      predicted prefill time.
    kv_reserve_tokens: KV positions (at `batch`) reserved on the device for the
      engine's KV cache; None: the model's max_position_embeddings (as
      layerwise). The scheduler places nothing there.
    reserve_bytes: further device bytes left free (activations).
    pinned: whether host weights are read at the pinned link rate.
    split_overhead_s: fixed cost of one split matmul beyond its bytes (two
      activation copies and extra dispatches); makes the scheduler prefer small
      matrices when choosing what to keep resident.
  """

  alpha: float | None = None
  keep_resident: bool = True
  batch: int = 1
  prompt_len: int = 512
  kv_reserve_tokens: int | None = None
  reserve_bytes: int = 0
  pinned: bool = True
  split_overhead_s: float = 60e-6

  def __post_init__(self):
    if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1] or None, got {self.alpha}.")


@dataclasses.dataclass(frozen=True)
class MatrixSplit:
  """How one kernel of a layer half is held.

  Attributes:
    resident: kept whole on the device (the scheduler's choice).
    nbytes: its bytes.
    units: output columns (experts for Mixtral's "experts"): what alpha splits.
    alpha: per phase, the fraction of units multiplied on the device (1.0 if resident).
  """

  resident: bool
  nbytes: int
  units: int
  alpha: dict[str, float]


@dataclasses.dataclass(frozen=True)
class SplitGroup:
  """A layer half's kernels (`GroupPlacement.details` of tensor_split's layer groups).

  Attributes:
    matrices: kernel name -> MatrixSplit.
    device_bytes: bytes on the device (norms, biases, resident kernels).
    host_bytes: bytes of split kernels in host memory.
  """

  matrices: dict[str, MatrixSplit]
  device_bytes: int
  host_bytes: int


@dataclasses.dataclass(frozen=True)
class TensorSplitSettings:
  """What tensor_split's cost model reads from a plan (`Placement.settings`).

  Attributes:
    alpha: per phase, HeteGen's device fraction of each split kernel.
    split_overhead_s: the option's fixed cost per split kernel (a calibration
      in the profile takes precedence).
  """

  alpha: dict[str, float]
  split_overhead_s: float


def default_profile():
  """The profile used when none is given: HeteGen's testbed (documented in plan notes)."""
  return hardware.PROFILES["a10-pcie"]


def _split_point(alpha: float, units: int) -> int:
  """Columns (or experts) on the device side for `alpha`."""
  return int(round(alpha * units))


@register_strategy("tensor_split")
class TensorSplit(Strategy):
  """CPU and device multiply each offloaded matrix together (HeteGen)."""

  Options = TensorSplitOptions
  shards_over_mesh = True

  # -- planning ----------------------------------------------------------------

  def alphas(self, model, profile) -> dict[str, float]:
    """alpha per phase for this model's dtype on `profile` (or the forced one)."""
    o = self.options
    if o.alpha is not None:
      return {p: o.alpha for p in PHASES}
    rows = {"prefill": o.batch * o.prompt_len, "decode": o.batch}
    return {p: costmodel.phase_alpha(profile, rows[p], model.dtype, o.pinned) for p in PHASES}

  def plan(self, model, budget, profile=None) -> Placement:
    o = self.options
    notes = []
    if profile is None:
      profile = default_profile()
      notes.append(f"no HardwareProfile given: alphas from {profile.name!r}")
    alpha = self.alphas(model, profile)
    layer_groups = [g for g in model.group_names() if g.startswith("layers/")]
    mats = {g: costmodel.group_matrices(model, g) for g in layer_groups}

    def device_units(m, a):
      return _split_point(a, m.out_features)

    def link_bytes(m) -> int:  # device-side bytes of a split matrix, larger phase
      return max(device_units(m, alpha[p]) for p in PHASES) * m.nbytes // m.out_features

    def staging(resident: set) -> int:  # two kernels' device columns in flight
      return 2 * max((link_bytes(m) for g in layer_groups for m in mats[g]
                      if (g, m.name) not in resident), default=0)

    fixed = (model.group_nbytes("embed") + model.group_nbytes("head")
             + sum(costmodel.small_nbytes(model, g) for g in layer_groups))
    c = model.config
    kv_tokens = c.max_position_embeddings if o.kv_reserve_tokens is None else o.kv_reserve_tokens
    reserve = o.reserve_bytes + model.kv_cache_nbytes(kv_tokens, o.batch)
    minimum = fixed + reserve + staging(set())
    limit = budget.device
    if (limit is not None and minimum > limit and o.alpha is None
        and alpha["prefill"] > alpha["decode"]):
      # Staging is sized by the larger (prefill) alpha; when that does not fit,
      # prefill settles for what the staging room allows, down to decode's alpha.
      formula = alpha["prefill"]
      largest = max(m.nbytes for v in mats.values() for m in v)
      room = (limit - fixed - reserve) / (2 * largest)
      alpha["prefill"] = min(formula, max(alpha["decode"], room - 1e-3))
      minimum = fixed + reserve + staging(set())
      if minimum > limit:
        alpha["prefill"] = alpha["decode"]
        minimum = fixed + reserve + staging(set())
      notes.append(f"prefill alpha capped at {alpha['prefill']:.3f} (formula: {formula:.3f})"
                   " so that staging fits the device budget")
    if limit is not None and minimum > limit:
      raise BudgetExceeded("device", minimum, 0, limit,
                           group="tensor_split: embed, head, norms, reserve and two kernels"
                           " of staging", minimum=minimum)

    # The scheduler: per device byte, how much decode time does keeping a
    # matrix whole on the device save over splitting it?
    v_cpu = costmodel.effective_rate(profile, "cpu", o.batch, model.dtype)
    v_dev = costmodel.effective_rate(profile, "device", o.batch, model.dtype)
    v_link = profile.link_bw(o.pinned)
    a = alpha["decode"]

    def saving_per_byte(m) -> float:
      split = max((1 - a) * m.nbytes / v_cpu, a * m.nbytes / v_link + a * m.nbytes / v_dev)
      return (split + o.split_overhead_s - m.nbytes / v_dev) / m.nbytes

    resident: set[tuple[str, str]] = set()
    used = fixed + reserve
    if o.keep_resident:
      candidates = sorted(((g, m) for g in layer_groups for m in mats[g]),
                          key=lambda gm: -saving_per_byte(gm[1]))
      for g, m in candidates:
        trial = resident | {(g, m.name)}
        if limit is None or used + m.nbytes + staging(trial) <= limit:
          resident, used = trial, used + m.nbytes

    groups = {"embed": GroupPlacement("device", model.group_nbytes("embed"), "resident")}
    device_parts = 0
    for g in layer_groups:
      info, host_bytes, dev_bytes = {}, 0, costmodel.small_nbytes(model, g)
      split_names, res_names = [], []
      for m in mats[g]:
        keep = (g, m.name) in resident
        info[m.name] = MatrixSplit(
            resident=keep, nbytes=m.nbytes, units=m.out_features,
            alpha={p: (1.0 if keep else device_units(m, alpha[p]) / m.out_features)
                   for p in PHASES})
        if keep:
          dev_bytes += m.nbytes
          res_names.append(m.name)
        else:
          host_bytes += m.nbytes
          split_names.append(m.name)
      details = SplitGroup(info, dev_bytes, host_bytes)
      if not split_names:
        groups[g] = GroupPlacement("device", dev_bytes, "resident (whole)", details)
        continue
      reason = (f"split {','.join(split_names)} alpha prefill {alpha['prefill']:.2f}"
                f" decode {alpha['decode']:.2f}")
      if res_names:
        reason += f"; resident {','.join(res_names)}"
      groups[g] = GroupPlacement("host", host_bytes, reason, details)
      device_parts += dev_bytes
    groups["head"] = GroupPlacement("device", model.group_nbytes("head"), "resident")
    stage = staging(resident)
    working = {"device": device_parts + stage}
    host_need = sum(gp.nbytes for gp in groups.values() if gp.tier == "host")
    if budget.host is not None and host_need > budget.host:
      raise BudgetExceeded("host", host_need, 0, budget.host,
                           group="tensor_split: split matrices", minimum=host_need)
    notes += [
        f"alpha (device fraction of each split matrix): prefill {alpha['prefill']:.3f}"
        f" ({o.batch}x{o.prompt_len} rows), decode {alpha['decode']:.3f}",
        f"matrices resident: {len(resident)} of {sum(len(v) for v in mats.values())};"
        f" staging {format_bytes(stage)} (two kernels of device columns in flight);"
        f" reserve {format_bytes(reserve)} (KV cache for {kv_tokens} positions at batch"
        f" {o.batch}, and {format_bytes(o.reserve_bytes)} more)",
        "host groups: nbytes = host part; their device part (norms, biases, resident"
        " kernels) is in working_bytes['device']",
    ]
    return Placement(self.name, groups, working, tuple(notes),
                     TensorSplitSettings(alpha, o.split_overhead_s))

  # -- cost model ------------------------------------------------------------------

  @staticmethod
  def cost_model(ctx: simulate.PassContext) -> None:
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
    Reads each layer group's SplitGroup (its `details`) and the plan's
    TensorSplitSettings.
    """
    pl, prof, c = ctx.placement, ctx.profile, ctx.model.config
    itemsize = ctx.dtype.itemsize
    # Where the device is the CPU, host and device are one CPU device: the
    # "copies" are no-ops.
    link = float("inf") if hardware.device_is_cpu(prof) else prof.link_bw(True)
    groups = simulate.layer_groups(ctx.model)
    mats = {g: costmodel.group_matrices(ctx.model, g) for g in groups}
    info = {g: pl.groups[g].details.matrices for g in groups}
    measured = hardware.measured_costs(prof, ctx.model)
    split_cost = (measured["split_kernel_s"] if measured and "split_kernel_s" in measured
                  else pl.settings.split_overhead_s)
    units = [(g, m) for g in groups for m in mats[g] if not info[g][m.name].resident]
    issued: dict[int, int | None] = {}  # unit (across passes) -> its transfer event
    dev_events: list[int] = []  # device multiply of every split kernel, in order

    def alpha_of(g, m):
      return info[g][m.name].alpha[ctx.phase]

    def issue(k: int) -> None:
      if k in issued or k >= len(units) * ctx.passes:
        return
      g, m = units[k % len(units)]
      nbytes = alpha_of(g, m) * m.nbytes
      after = dev_events[-2] if len(dev_events) >= 2 else None
      issued[k] = (ctx.add("link", nbytes / link, (after,), f"h2d {g}/{m.name}",
                           simulate.layer_of(g), int(nbytes)) if nbytes else None)

    prev = None
    k = 0  # split kernels so far, across passes
    for p in range(ctx.passes):
      ctx.pass_index = p
      prev = ctx.add("device", ctx.settings.pass_overhead_s, (prev,), "pass start",
                     overhead=False)
      for g in groups:
        layer, half = simulate.layer_of(g), g.split("/")[-1]
        stage_in = prev
        for stage in sorted({m.stage for m in mats[g]}):
          if stage == 1 and half == "attn":
            stage_in = ctx.add("device", costmodel.attention_core_time(
                ctx.model, prof, "device", ctx.batch, ctx.tokens, ctx.context)
                               * ctx.scale(half, "device"), (stage_in,), f"{g} core", layer)
          in_stage = [m for m in mats[g] if m.stage == stage]
          split = [m for m in in_stage if not info[g][m.name].resident]
          joins, cpu = [], {}
          if split:  # one device->host copy of the input serves the whole stage
            width = c.hidden_size if split[0].name == "experts" else split[0].in_features
            x_bytes = ctx.rows * width * itemsize
            sent = ctx.add("link_d2h", x_bytes / link, (stage_in,), f"d2h {g} x", layer,
                           x_bytes)
            for m in split:  # CPU parts are issued first
              a = alpha_of(g, m)
              cpu[m.name] = ctx.add("cpu", ctx.compute_time("cpu", (1 - a) * m.nbytes,
                                                            (1 - a) * m.num_params, half,
                                                            m.format),
                                    (sent,), f"cpu {g}/{m.name}", layer)
          for m in in_stage:
            if m not in split:
              joins.append(ctx.add("device", ctx.compute_time("device", m.nbytes, m.num_params,
                                                              half, m.format) + split_cost,
                                   (stage_in,), f"{g}/{m.name}", layer))
              continue
            a = alpha_of(g, m)
            issue(k)
            dev = ctx.add("device", ctx.compute_time("device", a * m.nbytes, a * m.num_params,
                                                     half, m.format),
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

  # -- materialising -----------------------------------------------------------

  def materialize(self, placement, model, ledger) -> None:
    self._lanes: list[TensorSplit] = []
    if self.mesh is not None and self.mesh.size > 1:
      self._materialize_lanes(placement, ledger)
      return
    self._materialize_on(placement, model, ledger, jax.devices()[0], jax.devices("cpu"))

  def _materialize_lanes(self, placement, ledger) -> None:
    """One lane per local shard, on the shard's device (see the module docstring).

    The engine's ledger counts one shard's bytes (budgets are per device); the
    other lanes account in ledgers of their own with the same budget.
    """
    self._placement = placement
    for j, s in enumerate(self.mesh.local):
      lane = TensorSplit(self.options)
      lane.counters, lane.timeline, lane._lanes = self.counters, self.timeline, []
      lane.ledger = ledger if j == 0 else MemoryLedger(ledger.budget)
      lane._materialize_on(placement, s.model, lane.ledger, s.device,
                           jax.local_devices(backend="cpu"))
      self._lanes.append(lane)
    lane = self._lanes[0]
    self.accel, self.host_device = lane.accel, lane.host_device
    self._globals = {g: self.mesh.assemble(g, [ln._globals[g] for ln in self._lanes])
                     for g in ("embed", "head")}

  def _materialize_on(self, placement, model, ledger, accel, cpus) -> None:
    self._model = model
    self._config = model.config
    self._placement = placement
    self.accel = accel
    # The CPU part runs on the CPU backend; on a CPU-only machine with several
    # CPU devices, on another one than the "device", so transfers are real.
    self.host_device = cpus[-1] if self.accel.platform == "cpu" else cpus[0]
    self._dev_sharding = tiers.device_sharding(self.accel)
    self._globals = {}
    for g in ("embed", "head"):
      ledger.allocate("device", placement.groups[g].nbytes, g)
      self._globals[g] = jax.device_put(model.group_tensors(g), self._dev_sharding)
    self._halves: dict[str, _SplitHalf] = {}
    for g, gp in placement.groups.items():
      if g.startswith("layers/"):
        self._halves[g] = _SplitHalf.build(self, model, g, gp, ledger)
    ledger.allocate("device", placement.working_bytes["device"]
                    - sum(h.device_bytes for h in self._halves.values()
                          if placement.groups[h.group].tier == "host"),
                    "tensor_split staging")
    # Split kernels in execution order: the unit of transfer and of staging.
    self._units = [(g, m.name) for g in self._halves
                   for m in costmodel.group_matrices(model, g)
                   if not placement.groups[g].details.matrices[m.name].resident]
    self._unit_of = {u: i for i, u in enumerate(self._units)}
    self._phase = "prefill"
    self._issued: dict[int, tuple[str, list]] = {}  # unit -> (phase, device blocks)
    self._recent: collections.deque = collections.deque(maxlen=2)  # device outputs

  def globals(self):
    return self._globals

  # -- the per-layer protocol --------------------------------------------------

  def begin(self, phase, num_tokens) -> None:
    for lane in self._lanes:
      lane.begin(phase, num_tokens)
    self._phase = phase
    if self._lanes:
      return
    self._recent.clear()
    for unit, (p, _) in list(self._issued.items()):
      if p != phase:  # prefetched for another phase's split point
        del self._issued[unit]

  def _issue(self, unit: int, phase: str) -> None:
    if unit not in self._issued:
      group, name = self._units[unit]
      kernel = self._halves[group].kernel(name)
      self._issued[unit] = (phase, kernel.transfer(phase, self._dev_sharding,
                                                   self.counters.phase(phase)))

  def device_blocks(self, group: str, name: str) -> list:
    """The device-side blocks of kernel `name` for the current phase (issued if needed)."""
    unit = self._unit_of[(group, name)]
    self._issue(unit, self._phase)
    return self._issued.pop(unit)[1]

  def device_part_issued(self, group: str, name: str, y_dev) -> None:
    """Kernel `name`'s device multiply was dispatched: bound staging, prefetch the next.

    At most two kernels' device blocks are in flight: the one just dispatched
    and the next one's transfer, issued only once the previous kernel's device
    multiply is done (its blocks are then free).
    """
    unit = self._unit_of[(group, name)]
    if y_dev is not None:
      self._recent.append(y_dev)
      if len(self._recent) == 2:
        jax.block_until_ready(self._recent[0])
    if unit + 1 < len(self._units):
      self._issue(unit + 1, self._phase)
    else:  # wrap: the next pass is a decode step
      self._issue(0, "decode")

  def fetch(self, layer, half):
    return f"layers/{layer}/{half}"

  def _stager(self, kind: str) -> _Stager:
    return _stager(self._config, kind)

  def run_attention(self, layer, params, x, cache, cache_index, positions, kv_mask,
                    attention):
    if self._lanes:
      return self._run_lanes(params, "attn", x, (cache, cache_index, positions, kv_mask))
    return self._run_staged(params, "attn", (x, cache, cache_index, positions, kv_mask))

  def run_ffn(self, layer, params, x, ffn):
    if self._lanes:
      return self._run_lanes(params, "mlp", x, ())
    half = self._halves[params]
    if half.experts is not None:
      return half.run_moe(self, x, self._phase, self.counters.phase(self._phase))
    return self._run_staged(params, "mlp", (x,))

  def _run_staged(self, group, kind, args):
    half = self._halves[group]
    counters = self.counters.phase(self._phase)
    stager = self._stager(kind)
    stager.discover(half.shapes, args)
    outs: list = []
    for names in stager.groups:
      y = stager.stage(half.small, args, tuple(outs))
      outs += half.linears(self, y, names, self._phase, counters)
    return stager.stage(half.small, args, tuple(outs))

  def _run_lanes(self, group, kind, x, rest):
    """One half on every local shard's lane; the halves' partial outputs summed over
    the mesh after `o`/`down` (or the expert mixture), then bias and residual.

    x and the KV cache are global arrays (x whole on every shard, the cache split
    over its key/value heads); each lane computes on its own shard's pieces.
    """
    mesh, lanes = self.mesh, self._lanes
    phase = self._phase
    counters = self.counters.phase(phase)
    xs = mesh.local_parts(x)
    if kind == "attn":
      cache, index, positions, mask = rest
      caches = list(zip(*(mesh.local_parts(c) for c in cache)))
      positions, mask = mesh.local_parts(positions), mesh.local_parts(mask)
      args = [(xs[j], caches[j], index, positions[j], mask[j]) for j in range(len(lanes))]
    else:
      args = [(xs[j],) for j in range(len(lanes))]
    halves = [lane._halves[group] for lane in lanes]
    if halves[0].experts is not None:
      parts = [h.run_moe(lane, a[0], phase, counters, residual=False)
               for h, lane, a in zip(halves, lanes, args)]
      return mesh.replicated(_moe_post_lanes(xs, mesh.all_reduce(parts)))
    stager = lanes[0]._stager(kind)
    stager.discover(halves[0].shapes, args[0])
    outs: list[list] = [[] for _ in lanes]
    for names in stager.groups:
      ends = any(n in _ENDS_HALF for n in names)
      for j, (lane, half) in enumerate(zip(lanes, halves)):
        y = stager.stage(half.small, args[j], tuple(outs[j]))
        outs[j] += half.linears(lane, y, names, phase, counters, bias=not ends)
      if ends:  # one kernel (o or down): sum the shards' partial products, then its bias
        summed = mesh.all_reduce([o[-1] for o in outs])
        for j, half in enumerate(halves):
          outs[j][-1] = _join((summed[j],), half.kernels[names[-1]].bias)
    final = [stager.stage(half.small, a, tuple(o)) for half, a, o in zip(halves, args, outs)]
    if kind == "attn":
      new_x = mesh.replicated([f[0] for f in final])
      return new_x, tuple(mesh.kv_cache([f[1][i] for f in final]) for i in range(2))
    return mesh.replicated(final)

  def stats(self):
    self.counters.details.update(alpha=self._placement.settings.alpha,
                                 link_is_real=self.host_device != self.accel,
                                 host_compute_device=str(self.host_device))
    return self.counters

  def close(self) -> None:
    for lane in getattr(self, "_lanes", ()):
      lane.close()
    if getattr(self, "_lanes", None):
      return
    self._issued.clear()
    self._halves.clear()


class _Cut(Exception):
  """Raised inside a traced half to stop at the input of the next linear."""

  def __init__(self, y):
    super().__init__()
    self.y = y


def _stage_fn(fn, w, args, outs):
  """Runs half `fn` with the first len(outs) linears given; stops at the next one.

  Returns that linear's input, or the half's output when every linear is given.
  """
  given = iter(outs)
  count = [0]

  def linear(y, w_, name):
    if count[0] < len(outs):
      count[0] += 1
      return next(given)
    raise _Cut(y)

  try:
    return fn(w, args, linear)
  except _Cut as cut:
    return cut.y


@functools.lru_cache(maxsize=32)
def _stager(config, kind: str) -> "_Stager":
  """The staged form of a half, shared by every engine on the same config."""
  if kind == "attn":
    fn = lambda w, args, linear: modules.attention_half(config, w, *args, linear=linear)
  else:
    fn = lambda w, args, linear: modules.ffn_half(config, w, *args, linear=linear)
  return _Stager(fn)


class _Stager:
  """A half cut at its linears into jitted stages (one jit; one trace per stage)."""

  def __init__(self, fn):
    self.fn = fn
    self.stage = jax.jit(functools.partial(_stage_fn, fn))
    self.groups: list[list[str]] | None = None

  def discover(self, shapes, args) -> None:
    """Which linears the half calls, in order, grouped by shared input."""
    if self.groups is not None:
      return
    calls: list[tuple[str, int]] = []

    def record(y, w, name):
      calls.append((name, id(y)))
      return jnp.zeros(y.shape[:-1] + (w[name].shape[-1],), y.dtype)

    jax.eval_shape(lambda w, a: self.fn(w, a, record), shapes, args)
    groups: list[list[str]] = []
    last = None
    for name, ident in calls:
      if ident == last:
        groups[-1].append(name)
      else:
        groups.append([name])
      last = ident
    self.groups = groups


def _matmul(y, chunks):
  # Same einsum as layers.linear, one per column block, so the split output
  # equals the resident one column for column.
  return jnp.concatenate([layers.linear(y, c) for c in chunks], axis=-1)


_matmul_jit = jax.jit(_matmul)


@jax.jit
def _join(parts, bias):
  y = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
  return y if bias is None else y + bias


def _moe_partial(config, h, combine, gate, up, down):
  """Mixtral's expert mixture over a subset of experts (as modules.moe_ffn; quantized
  experts are dequantized as it does)."""
  gate, up, down = (formats.dequantize(k, h.dtype) for k in (gate, up, down))
  act = layers.activation(config.hidden_act)
  g = act(jnp.einsum("BTD,XDF->BTXF", h, gate))
  u = jnp.einsum("BTD,XDF->BTXF", h, up)
  if config.hidden_act == "drelu":
    u = jax.nn.relu(u)
  out = jnp.einsum("BTXF,XFD->BTXD", g * u, down)
  return jnp.einsum("BTXD,BTX->BTD", out, combine)


@dataclasses.dataclass
class _Kernel:
  """One kernel of a half: whole on the device, or column blocks on the host."""

  name: str
  resident: Any  # device array, or None when split
  chunks: list  # host arrays (column blocks), when split
  cuts: dict[str, int]  # phase -> number of leading chunks on the device side
  bias: Any = None

  def transfer(self, phase: str, sharding, counters) -> list:
    """Issues the host->device copy of the device-side blocks for `phase`."""
    blocks = self.chunks[:self.cuts[phase]]
    counters.add("h2d_bytes", sum(a.nbytes for a in jax.tree.leaves(blocks)))
    return jax.device_put(blocks, sharding) if blocks else []


@dataclasses.dataclass
class _SplitHalf:
  """A layer half's weights as tensor_split holds them."""

  group: str
  small: dict  # norms, biases, router: on the device
  kernels: dict[str, _Kernel]
  shapes: dict  # ShapeDtypeStructs of every leaf (for stage discovery)
  device_bytes: int
  experts: _Kernel | None = None  # Mixtral: gate/up/down split along experts

  @classmethod
  def build(cls, strategy: TensorSplit, model, group: str, gp: GroupPlacement, ledger):
    tensors = model.group_tensors(group)
    info = gp.details.matrices
    dev, host = strategy._dev_sharding, strategy.host_device
    small = {k: v for k, v in tensors.items() if not costmodel.is_matrix_leaf(model, group, k)}
    # Stage discovery needs each kernel's logical [in, out]: a quantized one is a dict.
    shapes = {k: model.logical_shapes[f"{group}/{k}"] for k in tensors}
    device_bytes = formats.nbytes(small)
    host_bytes = 0
    kernels, experts = {}, None
    for name, m in info.items():
      leaves = ["gate", "up", "down"] if name == "experts" else [name]
      if m.resident:
        arrays = [jax.device_put(tensors[n], dev) for n in leaves]
        device_bytes += sum(formats.nbytes(tensors[n]) for n in leaves)
        kernel = _Kernel(name, arrays if name == "experts" else arrays[0], [], {})
      else:
        units = m.units
        cuts = sorted({0, units} | {_split_point(m.alpha[p], units) for p in PHASES})
        chunks = []
        for lo, hi in zip(cuts[:-1], cuts[1:]):
          # Each block keeps the model's format (every leaf of a quantized kernel).
          if name == "experts":
            blocks = [jax.tree.map(lambda a, lo=lo, hi=hi: np.ascontiguousarray(a[lo:hi]), tensors[n])
                      for n in leaves]
          else:
            blocks = [formats.take_outputs(tensors[name], lo, hi)]
          blocks = [jax.device_put(b, host) for b in blocks]
          chunks.append(blocks if name == "experts" else blocks[0])
        host_bytes += sum(formats.nbytes(tensors[n]) for n in leaves)
        phase_cuts = {p: cuts.index(_split_point(m.alpha[p], units)) for p in PHASES}
        kernel = _Kernel(name, None, chunks, phase_cuts)
      if name == "experts":
        experts = kernel
      else:
        kernel.bias = small.pop(name + "_bias", None)
        kernels[name] = kernel
    small_dev = jax.device_put(small, dev)
    # The halves test for a kernel's presence ("gate" in w picks the gated FFN);
    # the stages never read kernels (their linears are given), so None stands in.
    small_dev.update({n: None for n in kernels})
    for k in kernels.values():
      if k.bias is not None:
        k.bias = jax.device_put(k.bias, dev)
    if device_bytes:
      ledger.allocate("device", device_bytes, group)
    if host_bytes:
      ledger.allocate("host", host_bytes, group)
    return cls(group, small_dev, kernels, shapes, device_bytes, experts)

  def kernel(self, name: str) -> _Kernel:
    return self.experts if name == "experts" else self.kernels[name]

  def linears(self, strategy: TensorSplit, y, names, phase, counters, bias: bool = True
              ) -> list:
    """Outputs of the kernels `names`, which share input `y` [B, T, in] (with their
    biases unless `bias` is False: a shard's partial `o`/`down` on a mesh)."""
    host = strategy.host_device
    y_host = None
    cpu_parts = {}
    # CPU parts first, so the CPU starts while the device path is issued.
    for n in names:
      k = self.kernels[n]
      if k.resident is None and k.cuts[phase] < len(k.chunks):
        if y_host is None:
          y_host = jax.device_put(y, host)
          counters.add("activation_bytes_d2h", y.nbytes)
        cpu_parts[n] = _matmul_jit(y_host, tuple(k.chunks[k.cuts[phase]:]))
    outs = []
    for n in names:
      k = self.kernels[n]
      if k.resident is not None:
        outs.append(_join((_matmul_jit(y, (k.resident,)),), k.bias if bias else None))
        counters.add("resident_matmuls", 1)
        continue
      parts, y_dev = [], None
      blocks = strategy.device_blocks(self.group, n)
      if blocks:
        y_dev = _matmul_jit(y, tuple(blocks))
        parts.append(y_dev)
      strategy.device_part_issued(self.group, n, y_dev)
      if n in cpu_parts:
        back = jax.device_put(cpu_parts[n], strategy._dev_sharding)
        counters.add("activation_bytes_h2d", cpu_parts[n].nbytes)
        parts.append(back)
      outs.append(_join(tuple(parts), k.bias if bias else None))
      counters.add("split_matmuls", 1)
    return outs

  def run_moe(self, strategy: TensorSplit, x, phase, counters, residual: bool = True):
    """Mixtral's FFN half with experts split between device and CPU (without the
    residual if `residual` is False: a shard's partial mixture on a mesh)."""
    c = strategy._config
    k = self.experts
    h, combine = _moe_pre(c, self.small, x)
    parts = []
    if k.resident is not None:
      parts.append(_moe_jit(c, h, combine, *k.resident))
      counters.add("resident_matmuls", 1)
    else:
      n_dev = sum(jax.tree.leaves(b[0])[0].shape[0] for b in k.chunks[:k.cuts[phase]])
      if k.cuts[phase] < len(k.chunks):
        host = strategy.host_device
        h_host = jax.device_put(h, host)
        comb_host = jax.device_put(combine[..., n_dev:], host)
        counters.add("activation_bytes_d2h", h.nbytes + comb_host.nbytes)
        rest = k.chunks[k.cuts[phase]:]
        cpu = _moe_jit(c, h_host, comb_host, *(_cat([b[i] for b in rest]) for i in range(3)))
      moved, y_dev = strategy.device_blocks(self.group, "experts"), None
      if moved:
        y_dev = _moe_jit(c, h, combine[..., :n_dev],
                         *(_cat([b[i] for b in moved]) for i in range(3)))
        parts.append(y_dev)
      strategy.device_part_issued(self.group, "experts", y_dev)
      if k.cuts[phase] < len(k.chunks):
        parts.append(jax.device_put(cpu, strategy._dev_sharding))
        counters.add("activation_bytes_h2d", cpu.nbytes)
      counters.add("split_matmuls", 1)
    return _moe_post(x, tuple(parts)) if residual else _moe_sum(tuple(parts))


def _cat(blocks):
  return blocks[0] if len(blocks) == 1 else _concat_experts(tuple(blocks))


@jax.jit
def _concat_experts(blocks):
  return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *blocks)


@functools.partial(jax.jit, static_argnums=0)
def _moe_pre(config, w, x):
  h = modules._norm(config, w)(x)
  return h, modules.combine_weights(config, w["router"], h).astype(h.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _moe_jit(config, h, combine, gate, up, down):
  return _moe_partial(config, h, combine, gate, up, down)


@jax.jit
def _moe_sum(parts):
  out = parts[0]
  for p in parts[1:]:
    out = out + p
  return out


@jax.jit
def _moe_post(x, parts):
  return x + _moe_sum(parts)


def _moe_post_lanes(xs, summed):
  """Each lane's residual plus the mixture summed over the mesh."""
  return [_moe_post(x, (y,)) for x, y in zip(xs, summed)]


# The kernels that end a half: on a mesh their partial products are summed over shards.
_ENDS_HALF = ("o", "down")
