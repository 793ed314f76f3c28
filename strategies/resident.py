"""`resident`: every weight on the device tier. The reference every strategy
must reproduce, and the fastest choice when the model fits."""

from __future__ import annotations

import dataclasses

from tqdm.auto import tqdm

from hetflow import simulate
from hetflow.memory.budget import BudgetExceeded, format_bytes
from hetflow.models.sharding import MeshShards
from hetflow.strategy import GroupPlacement, Placement, Strategy, register_strategy


@dataclasses.dataclass(frozen=True)
class ResidentOptions:
  """Options of `resident`.

  Attributes:
    kv_reserve_tokens: KV positions (batch 1) the plan reserves on the device
      for the engine's KV cache, so that a run at the stated minimum budget
      has room for its cache; None: the model's max_position_embeddings.
  """

  kv_reserve_tokens: int | None = None

  def __post_init__(self):
    t = self.kv_reserve_tokens
    if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 0):
      raise ValueError(f"kv_reserve_tokens={t!r}; expected an int >= 0 or None.")


@register_strategy("resident")
class Resident(Strategy):
  """All parameter groups placed on the device tier once, at load.

  On a mesh each device holds its shard of every group (hetflow.models.sharding);
  the plan and the ledger count one device's bytes.
  """

  Options = ResidentOptions
  shards_over_mesh = True

  def plan(self, model, budget, profile=None) -> Placement:
    groups = {g: GroupPlacement("device", model.group_nbytes(g), "resident")
              for g in model.group_names()}
    tokens = self.options.kv_reserve_tokens
    tokens = model.config.max_position_embeddings if tokens is None else tokens
    # The engine allocates the KV cache on the device through the same ledger:
    # a minimum without it would fail at the first generate.
    kv = model.kv_cache_nbytes(tokens)
    placement = Placement(self.name, groups, working_bytes={"device": kv},
                          notes=(model.weights_note,
                                 f"KV cache: {format_bytes(kv)} reserved for {tokens} tokens"
                                 " at batch 1"))
    need = placement.bytes_per_tier()["device"]
    if budget.device is not None and need > budget.device:
      raise BudgetExceeded("device", need, 0, budget.device,
                           group=f"all weights and the KV cache for {tokens} tokens",
                           minimum=need)
    return placement

  def materialize(self, placement, model, ledger) -> None:
    shards = self.mesh or MeshShards(model)
    self._params = {}
    total = sum(g.nbytes for g in placement.groups.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights",
              disable=total < (256 << 20)) as bar:
      for group, info in placement.groups.items():
        ledger.allocate("device", info.nbytes, group)
        # Each shard's tensors are read (sliced) on their own, so a process reads only
        # the shards it holds.
        self._params[group] = shards.put(group, lambda s, g=group: s.model.group_tensors(g))
        bar.update(info.nbytes)

  @staticmethod
  def cost_model(ctx: simulate.PassContext) -> None:
    """Everything on the device: compute only, one half after the other."""
    prev = None
    for p in range(ctx.passes):
      ctx.pass_index = p
      prev = ctx.add("device", ctx.settings.pass_overhead_s, (prev,), "pass start",
                     overhead=False)
      for g in simulate.layer_groups(ctx.model):
        prev = ctx.add("device", ctx.half_time(g), (prev,), g, simulate.layer_of(g))
      prev = ctx.add("device", ctx.head_time(), (prev,), "head")

  def globals(self):
    return {"embed": self._params["embed"], "head": self._params.get("head", {})}

  def fetch(self, layer, half):
    return self._params[f"layers/{layer}/{half}"]
