"""A model split over a mesh's "model" axis, Megatron-style (docs/distributed.md).

Shard r of N holds, in every block:

  attention  q/k/v columns of its heads (H/N query heads, G/N key/value heads;
             when G < N each key/value head is repeated on the N/G shards whose
             query heads use it), and the matching rows of `o`;
  dense FFN  columns F/N of `gate`/`up` (and their biases), the same rows of `down`;
  MoE FFN    the same F/N slice of every expert; the router is whole.

Norms, the output biases of `o`/`down`, the embedding and the head are whole on
every shard. A half-block therefore ends in one all-reduce (`psum` over the
axis): the partial outputs of `o` and `down` (the experts' combined output for
MoE) are summed, then the whole bias is added once.

Each shard is itself a `Model` (`shard_model`): its config has H/N heads and
F/N FFN width, and its source slices the full model's tensors. A strategy
plans and stores a shard exactly as it would a small model, which is what
makes budgets per device and a disk store per shard (1/N of every layer's
bytes) fall out. `MeshShards` is the engine's view of the mesh from one
process: which shards it holds, on which devices, and how per-shard arrays
become one global `jax.Array` (`assemble`); `ShardedFunctions` are the jitted
half-functions over the mesh, with the signatures of `ModelFunctions`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hetflow.memory import tiers
from hetflow.models import formats, layers, modules
from hetflow.models.config import ModelConfig
from hetflow.models.model import Model, parameter_shapes, unflatten

MODEL_AXIS = "model"


class ShardingError(ValueError):
  """A model, weight format or mesh that cannot be split as asked."""


# -- meshes ----------------------------------------------------------------------------------


def make_mesh(model: int, devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh of `model` devices with the axis "model".

  Args:
    model: shards; the first `model` of jax.devices() (every process's, in
      process order, under jax.distributed) are used.
    devices: the devices to use instead.

  Raises:
    ShardingError: fewer devices than shards, naming how to get more.
  """
  if not isinstance(model, int) or isinstance(model, bool) or model < 1:
    raise ShardingError(f"mesh model axis size {model!r}; expected an int >= 1.")
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) < model:
    raise ShardingError(
        f"a mesh of {model} shards needs {model} devices, and jax sees {len(devices)}"
        f" ({jax.process_count()} process(es)). Start {model} processes with"
        " `python -m hetflow.launch --processes=N -- ...` (docs/distributed.md), or in one"
        f" process set XLA_FLAGS=--xla_force_host_platform_device_count={model} before jax"
        " starts (CPU).")
  return Mesh(np.array(devices[:model]), (MODEL_AXIS,))


def as_mesh(mesh: Any) -> Mesh | None:
  """The Engine's `mesh` argument as a Mesh, or None for a single device.

  Args:
    mesh: None, a jax Mesh with a "model" axis, an int (shards), or a mapping
      {"model": N} (a config's `mesh` section).

  Raises:
    ShardingError: anything else, or a Mesh without a "model" axis.
  """
  if mesh is None:
    return None
  if isinstance(mesh, Mesh):
    if mesh.axis_names != (MODEL_AXIS,):
      raise ShardingError(f"the mesh has axes {mesh.axis_names}; hetflow shards over one axis"
                          f" named {MODEL_AXIS!r} (hetflow.models.sharding.make_mesh).")
    return None if mesh.size == 1 else mesh
  if isinstance(mesh, Mapping):
    extra = sorted(set(mesh) - {MODEL_AXIS})
    if extra:
      raise ShardingError(f"mesh axes {extra} are not supported; the mesh has one axis,"
                          f" {MODEL_AXIS!r} (e.g. mesh.model=2).")
    mesh = mesh.get(MODEL_AXIS, 1)
  if isinstance(mesh, int) and not isinstance(mesh, bool):
    return None if mesh == 1 else make_mesh(mesh)
  raise ShardingError(f"mesh={mesh!r}; expected None, an int (shards on the model axis),"
                      " {'model': N} or a jax.sharding.Mesh.")


# -- which axis of which parameter is split ----------------------------------------------


def split_axis(config: ModelConfig, name: str) -> int | None:
  """The axis of parameter `name` split over the model axis, or None (whole on every shard).

  Args:
    config: the full model's config.
    name: a parameter path ("layers/3/attn/q") or a group's leaf name
      prefixed by the group ("layers/3/mlp/down_bias"), in logical
      coordinates (a kernel is [..., in, out]).
  """
  parts = name.split("/")
  if parts[0] != "layers" or len(parts) < 4:
    return None
  half, leaf = parts[2], parts[3]
  if half == "attn":
    return {"q": 1, "k": 1, "v": 1, "q_bias": 0, "k_bias": 0, "v_bias": 0, "o": 0}.get(leaf)
  if config.arch == "mixtral":
    return {"gate": 2, "up": 2, "down": 1}.get(leaf)
  return {"gate": 1, "up": 1, "down": 0, "gate_bias": 0, "up_bias": 0}.get(leaf)


def _splits_inputs(config: ModelConfig, kernel: str) -> bool | None:
  """Whether kernel `kernel` ("layers/3/attn/o") is split along its inputs (rows: o,
  down), along its outputs (columns), or not at all (None)."""
  axis = split_axis(config, kernel)
  if axis is None:
    return None
  return axis == len(parameter_shapes(config)[kernel].shape) - 2


def stored_split_axis(config: ModelConfig, weights: formats.WeightFormat, name: str,
                      ndim: int) -> int | None:
  """The split axis of a stored leaf ("layers/3/mlp/down/scale", `ndim` dims), or None.

  A quantized kernel's leaves (hetflow/models/formats.py) are split where its
  logical rows or columns went: bfloat16 and per-channel int8 `q` [..., out, in];
  grouped `q` [..., G, out, g] and their `scale`/`min` [..., G, out] (a split
  of the inputs splits the groups, so no group may straddle two shards:
  `check_shardable`); a per-channel int8 scale [..., out, 1] follows a split of
  the outputs and is whole when the inputs are split (each shard's partial
  product is scaled by the whole row's scale, and the sum of the partials is
  the whole product). Any other name is a logical parameter (`split_axis`).

  Args:
    config: the full model's config.
    weights: the model's weight format.
    name: a stored leaf's or a parameter's path.
    ndim: its dimensions.
  """
  parts = name.split("/")
  if len(parts) != 5 or parts[0] != "layers":
    return split_axis(config, name)
  rows = _splits_inputs(config, "/".join(parts[:4]))
  if rows is None:
    return None
  if not weights.group:  # bfloat16, per-channel int8: q [..., out, in], scale [..., out, 1]
    if parts[4] == "q":
      return ndim - 1 if rows else ndim - 2
    return None if rows else ndim - 2
  if parts[4] == "q":  # [..., G, out, g]
    return ndim - 3 if rows else ndim - 2
  return ndim - 2 if rows else ndim - 1  # scale, min: [..., G, out]


def check_shardable(model: Model, n: int) -> None:
  """Refuses, by name, a model that cannot be split into `n` equal shards.

  Raises:
    ShardingError: heads or FFN width not divisible by n, or a grouped weight
      format whose groups would straddle two shards of a kernel split along
      its inputs (`o`, `down`).
  """
  c = model.config
  problems = []
  if c.num_heads % n:
    problems.append(f"num_heads={c.num_heads} is not a multiple of {n}")
  g = c.num_kv_heads
  if g % n and n % g:
    problems.append(f"num_kv_heads={g} neither divides nor is a multiple of {n}")
  if c.intermediate_size % n:
    problems.append(f"intermediate_size={c.intermediate_size} is not a multiple of {n}")
  if problems:
    raise ShardingError(f"{c.name} cannot be split into {n} shards: {'; '.join(problems)}."
                        " Use a mesh size that divides the heads and the FFN width.")
  group = model.format.group
  if group:
    rows = {"o": c.num_heads * c.head_dim, "down": c.intermediate_size}
    for kernel, inputs in rows.items():
      if (inputs // n) % group:
        raise ShardingError(
            f"{c.name} in weights={model.weights!r} cannot be split into {n} shards: `{kernel}`"
            f" is split along its {inputs} inputs, {inputs // n} per shard, which is not a"
            f" multiple of the format's groups of {group} (a group would straddle two"
            " shards). Use fewer shards, a format with smaller groups, or per-channel"
            " 'int8' / 'bfloat16'.")


def shard_config(config: ModelConfig, n: int) -> ModelConfig:
  """The config of one shard: H/N query heads, max(G/N, 1) key/value heads, F/N FFN width."""
  return config.replace(num_heads=config.num_heads // n,
                        num_kv_heads=max(config.num_kv_heads // n, 1),
                        intermediate_size=config.intermediate_size // n)


def _shard_slice(config: ModelConfig, name: str, shape: tuple[int, ...], rank: int, n: int,
                 axis: int | None) -> tuple[slice, ...] | None:
  """The index of shard `rank`'s part of `name` (full shape `shape`, split along
  `axis`), or None when it is whole on every shard."""
  if axis is None:
    return None
  index = [slice(None)] * len(shape)
  leaf = name.split("/")[3]
  g = config.num_kv_heads
  if leaf in ("k", "v", "k_bias", "v_bias") and g < n:
    # Fewer key/value heads than shards: shard r uses kv head r // (n / g), whole.
    # (Key/value kernels are split along their outputs, so a stored leaf's
    # split axis holds the heads' columns in the same order.)
    head = rank // (n // g)
    k = config.head_dim
    index[axis] = slice(head * k, (head + 1) * k)
  else:
    width = shape[axis] // n
    index[axis] = slice(rank * width, (rank + 1) * width)
  return tuple(index)


class ShardSource:
  """A weight source handing out shard `rank` of `size` of a model's tensors.

  Plain tensors are sliced from the full model's source; a quantized kernel is
  quantized whole (or read as stored, from a GGUF file) and its stored leaves
  are sliced (`get_stored`), so that every shard holds exactly its part of the
  full model's stored kernel: a scale computed over a shard's half row would
  differ from the whole row's.

  Attributes:
    source: the full model's source.
    rank: which shard.
    size: shards in all.
  """

  def __init__(self, model: Model, rank: int, size: int):
    self.source = model.source
    self.rank = rank
    self.size = size
    self._model = model

  def get(self, name: str, dtype) -> np.ndarray:
    full = self.source.get(name, dtype)
    config = self._model.config
    index = _shard_slice(config, name, full.shape, self.rank, self.size,
                         split_axis(config, name))
    return full if index is None else np.ascontiguousarray(full[index])

  def get_stored(self, name: str, fmt) -> dict[str, np.ndarray]:
    """Kernel `name`'s stored leaves in `fmt` (the full model's format): the full
    model's stored kernel, each leaf sliced along its split axis."""
    del fmt  # the shard's format is the full model's
    full = self._model.param(name)
    config = self._model.config
    out = {}
    for leaf, array in full.items():
      array = np.asarray(array)
      axis = stored_split_axis(config, self._model.format, f"{name}/{leaf}", array.ndim)
      index = _shard_slice(config, name, array.shape, self.rank, self.size, axis)
      out[leaf] = array if index is None else np.ascontiguousarray(array[index])
    return out


def shard_model(model: Model, rank: int, size: int) -> Model:
  """Shard `rank` of `size` of `model`, itself a Model (its own config, shapes, store).

  Raises:
    ShardingError: see check_shardable.
  """
  if size == 1:
    return model
  check_shardable(model, size)
  return Model(config=shard_config(model.config, size),
               source=ShardSource(model, rank, size), dtype=model.dtype,
               tokenizer=model.tokenizer, weights=model.weights,
               description=f"{model.description} [shard {rank} of {size}]")


def partition_spec(config: ModelConfig, weights: formats.WeightFormat, name: str,
                   ndim: int) -> P:
  """The PartitionSpec of parameter or stored leaf `name` (ndim dims) over the model axis."""
  axis = stored_split_axis(config, weights, name, ndim)
  spec = [None] * ndim
  if axis is not None:
    spec[axis] = MODEL_AXIS
  return P(*spec)


def cache_spec() -> P:
  """The KV cache [B, S, G, K]: its key/value heads are split like k/v."""
  return P(None, None, MODEL_AXIS, None)


# -- one process's view of the mesh --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LocalShard:
  """A shard held by this process.

  Attributes:
    rank: its index on the model axis.
    device: the device that computes it.
    model: the shard as a Model (shard_model).
  """

  rank: int
  device: jax.Device
  model: Model


class MeshShards:
  """How `model` is split over `mesh`, seen from this process.

  Without a mesh (mesh=None) there is one shard, the whole model on the first
  device, and `assemble` returns its part as is: strategies keep one code path.

  Attributes:
    mesh: the mesh, or None.
    model: the full model.
    size: shards in all (1 without a mesh).
    local: the shards this process holds, in the mesh's device order.
  """

  def __init__(self, model: Model, mesh: Mesh | None = None):
    self.mesh = mesh
    self.model = model
    self.size = 1 if mesh is None else mesh.size
    if mesh is None:
      self.local = (LocalShard(0, jax.local_devices()[0], model),)
    else:
      check_shardable(model, self.size)
      me = jax.process_index()
      self.local = tuple(LocalShard(r, d, shard_model(model, r, self.size))
                         for r, d in enumerate(mesh.devices.flat) if d.process_index == me)

  @property
  def shard(self) -> Model:
    """One shard's Model (all shards have the same shapes): what budgets are planned on."""
    return self.local[0].model

  def sharding(self, name: str, ndim: int, memory_kind: str = tiers.DEVICE_KIND) -> NamedSharding:
    """The NamedSharding of the global parameter `name`."""
    return NamedSharding(self.mesh, partition_spec(self.model.config, self.model.format, name,
                                                   ndim),
                         memory_kind=memory_kind)

  def assemble(self, group: str, parts: list[Any]) -> Any:
    """One tree of global arrays from each local shard's tree of `group` (in `local` order).

    Split leaves are the shards' parts side by side along the split axis;
    whole leaves must be the same on every shard.
    """
    if self.mesh is None:
      return parts[0]

    def leaf(path, *arrays):
      name = "/".join([group] + [p.key for p in path])  # a kernel's leaves: ".../up/q"
      first = arrays[0]
      axis = stored_split_axis(self.model.config, self.model.format, name, first.ndim)
      shape = list(first.shape)
      if axis is not None:
        shape[axis] *= self.size
      kind = getattr(first.sharding, "memory_kind", None) or tiers.DEVICE_KIND
      return jax.make_array_from_single_device_arrays(
          tuple(shape), self.sharding(name, first.ndim, kind), list(arrays))

    return jax.tree_util.tree_map_with_path(leaf, *parts)

  def put(self, group: str, tensors: Callable[[LocalShard], Any], tier: str = "device") -> Any:
    """`group`'s global arrays in `tier`, from each local shard's host tensors."""
    return self.assemble(group, [
        jax.device_put(tensors(s), tiers.sharding_for_tier(tier, s.device)) for s in self.local])

  # -- per-shard pieces, for strategies that compute each local shard on its own --------

  def local_parts(self, array: jax.Array) -> list[jax.Array]:
    """A global array's pieces on this process's shards' devices, in `local` order."""
    if self.mesh is None:
      return [array]
    by_device = {s.device: s.data for s in array.addressable_shards}
    return [by_device[s.device] for s in self.local]

  def replicated(self, parts: list[jax.Array]) -> jax.Array:
    """One global array whole on every shard, from the same array on each local shard."""
    if self.mesh is None:
      return parts[0]
    return jax.make_array_from_single_device_arrays(
        parts[0].shape, NamedSharding(self.mesh, P()), list(parts))

  def kv_cache(self, parts: list[jax.Array]) -> jax.Array:
    """One layer's global K or V cache ([B, S, G, K], split over its key/value heads)
    from each local shard's [B, S, G/N, K]."""
    if self.mesh is None:
      return parts[0]
    b, t, g, k = parts[0].shape
    return jax.make_array_from_single_device_arrays(
        (b, t, g * self.size, k), NamedSharding(self.mesh, cache_spec()), list(parts))

  def all_reduce(self, parts: list[jax.Array]) -> list[jax.Array]:
    """The sum over every shard of the mesh of one array per shard, on each local shard.

    The all-reduce of a half's partial outputs (the psum of ShardedFunctions)
    for a strategy that computes each shard's half on its own: `parts` are this
    process's shards' partial arrays (same shape, each on its shard's device).
    """
    if self.mesh is None:
      return list(parts)
    stacked = jax.make_array_from_single_device_arrays(
        (self.size,) + tuple(parts[0].shape), NamedSharding(self.mesh, P(MODEL_AXIS)),
        [_add_axis(p) for p in parts])
    return [_drop_axis(p) for p in self.local_parts(_psum(self.mesh)(stacked))]

  def replicate(self, array: Any) -> jax.Array:
    """A host array (the same in every process) as a global array whole on every shard."""
    array = np.asarray(array)
    if self.mesh is None:
      return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, NamedSharding(self.mesh, P()),
                                        lambda index: array[index])


_add_axis = jax.jit(lambda a: a[None])
_drop_axis = jax.jit(lambda a: a[0])


@functools.lru_cache(maxsize=8)
def _psum(mesh: Mesh) -> Callable:
  """Sums a [N, ...] array split over the model axis; each shard gets the sum ([1, ...])."""
  spec = P(MODEL_AXIS)
  return jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, MODEL_AXIS), mesh=mesh,
                               in_specs=spec, out_specs=spec))


# -- the jitted half-functions over the mesh ------------------------------------------------


def _reduced_linear(y, w, name):
  """`o` and `down` end a half: their partial products are summed over the shards,
  then the (whole) bias is added once."""
  if name in ("o", "down"):
    out = jax.lax.psum(layers.linear(y, w[name]), MODEL_AXIS)
    bias = w.get(name + "_bias")
    return out if bias is None else out + bias
  return modules.named_linear(y, w, name)


class ShardedFunctions:
  """`ModelFunctions` over a mesh: each half runs on every shard's slice, then one psum.

  Arguments and results are global arrays: parameters sharded as
  `partition_spec` says, the residual stream x and the logits whole on every
  shard, the KV cache split over its key/value heads (`cache_spec`).
  """

  def __init__(self, shards: MeshShards):
    mesh, full = shards.mesh, shards.model.config
    config = shards.shard.config  # the shapes each shard computes with
    dtype = jnp.dtype(shards.model.dtype)
    self.config, self.dtype, self._mesh = full, dtype, mesh
    fmt = shards.model.format
    shapes = shards.shard.shapes  # stored leaves: a quantized kernel is a dict of them

    def specs(group):
      prefix = group + "/"
      return unflatten({n[len(prefix):]: partition_spec(full, fmt, n, len(s.shape))
                        for n, s in shapes.items() if n.startswith(prefix)})

    attn_specs, ffn_specs = specs("layers/0/attn"), specs("layers/0/mlp")
    cache = (cache_spec(), cache_spec())
    whole = P()

    def attention(w, x, kv, index, pos, mask):
      return modules.attention_half(config, w, x, kv, index, pos, mask, _reduced_linear)

    def ffn(w, x):
      if config.arch != "mixtral":
        return modules.ffn_half(config, w, x, _reduced_linear)
      moe = lambda h: jax.lax.psum(modules.moe_ffn(config, w, h), MODEL_AXIS)
      return modules._residual(config, modules._norm(config, w), moe, x)

    # check_vma=False: the quantized kernels (hetflow/models/kernels.py) scan from
    # unvarying zeros and dispatch per platform, which the varying-axes type check
    # refuses inside a shard; the psums below are written out, nothing is inferred.
    spmd = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    self.embed = jax.jit(spmd(lambda p, ids, pos: modules.embed(config, p, ids, pos),
                              in_specs=whole, out_specs=whole))
    self.attention = jax.jit(
        spmd(attention, in_specs=(attn_specs, whole, cache, whole, whole, whole),
             out_specs=(whole, cache)), donate_argnums=(2,))
    self.ffn = jax.jit(spmd(ffn, in_specs=(ffn_specs, whole), out_specs=whole))
    self.head = jax.jit(spmd(lambda p, tokens, x: modules.head(config, p, x, tokens),
                             in_specs=whole, out_specs=whole))
    self._local_kv_heads = config.num_kv_heads
    self._zeros: dict[tuple[int, ...], Callable] = {}

  def new_cache(self, batch: int, slots: int, sharding=None):
    """A zeroed KV cache for one layer, split over the shards' key/value heads."""
    del sharding  # always the mesh's
    shape = (batch, slots, self._local_kv_heads * self._mesh.size, self.config.head_dim)
    if shape not in self._zeros:  # one jitted maker per shape: compiled once, not per call
      self._zeros[shape] = jax.jit(lambda: jnp.zeros(shape, self.dtype),
                                   out_shardings=NamedSharding(self._mesh, cache_spec()))
    make = self._zeros[shape]
    return (make(), make())
