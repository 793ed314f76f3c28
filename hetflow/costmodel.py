"""Cost formulas shared by the strategies' plans and the simulator.

Everything here is arithmetic on shapes and a `HardwareProfile`: no arrays are
allocated, so the formulas work for 30B-parameter shapes on a laptop.

The one formula from the literature is HeteGen's split ratio. For a weight
matrix of W bytes, multiplying a fraction alpha on the accelerator costs
alpha * W / Vc (moving it over the link) + alpha * W / Vg (multiplying it
there), and the CPU's share costs (1 - alpha) * W / Vcpu. The two sides run at
once, so the matrix is done soonest when they finish together:

  (1 - alpha) / Vcpu = alpha / Vc + alpha / Vg
  alpha = Vg * Vc / (Vcpu * Vg + Vcpu * Vc + Vc * Vg)

The rates are *bytes of weights consumed per second* by each side. At batch 1
decode they are bandwidths; over T tokens (prefill) the CPU becomes
compute-bound and consumes weights more slowly (its effective rate is
W / max(W / bw, 2 * T * params / flops)), while the link's rate does not
change, so prefill wants a larger alpha. `effective_rate` captures that.

Weight formats (hetflow/models/formats.py): a quantized kernel moves its stored
bytes, and its matrix-vector product runs at the rate the profile measured for
that format's kernel (`matvec_bw`), not float32's. Where the profile has no
figure for a format, a conservative fraction of float32's weights per second
stands in (`DEFAULT_WEIGHT_RATE`).

Several hosts (`Cluster`): Megatron-style, each host holds 1/N of every layer
(attention heads, FFN columns of gate/up and rows of down) and the whole
embedding, norms and head, as the engine's mesh does, so a host's shard is
itself a model with 1/N of the heads and FFN width (`shard_model`); each layer
half ends with an all-reduce of the hidden-size activations (`allreduce_time`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax.numpy as jnp

from hetflow import hardware
from hetflow.models import formats, sharding

Side = Literal["cpu", "device"]
Phase = Literal["prefill", "decode"]

# Kernels a strategy may split or stream, per half; 3-D ones are Mixtral experts.
ATTN_MATRICES = ("q", "k", "v", "o")
FFN_MATRICES = ("gate", "up", "down")


def hetegen_alpha(v_cpu: float, v_link: float, v_device: float) -> float:
  """HeteGen's fraction of a matrix to send to the accelerator.

  Args:
    v_cpu: bytes of weights per second the CPU multiplies.
    v_link: bytes per second the host->device link moves.
    v_device: bytes of weights per second the accelerator multiplies.

  Returns:
    alpha in [0, 1]: the fraction whose transfer + device time equals the CPU
    time of the rest.
  """
  if min(v_cpu, v_link, v_device) <= 0:
    raise ValueError(f"rates must be > 0, got cpu={v_cpu}, link={v_link}, device={v_device}")
  return v_device * v_link / (v_cpu * v_device + v_cpu * v_link + v_link * v_device)


# Weights per second of each format's matrix-vector product as a fraction of
# float32's, where a profile has no measured figure for it: at or under the low end of
# what XLA CPU's kernels measured here (docs/formats.md and docs/planner.md: bf16
# 0.6-1.2x float32's weights/s, per-channel int8 0.7-1.2x, grouped int8 0.3-0.6x, int4
# 0.2-0.5x, int4-asym 0.17x once under load), so a plan is not predicted faster than
# its kernel was seen to run.
DEFAULT_WEIGHT_RATE = {"bfloat16": 0.5, "float16": 0.5, "int8": 0.7, "int8-g": 0.3,
                       "int4": 0.2, "int4-asym": 0.15}


def _kind(fmt: str) -> str:
  """"int8-g64" -> "int8-g"; "int4-g64-asym" -> "int4-asym"; others unchanged."""
  if fmt.startswith("int8-g"):
    return "int8-g"
  if fmt.startswith("int4"):
    return "int4-asym" if fmt.endswith("-asym") else "int4"
  return fmt


def _bits(fmt: str) -> float:
  if fmt in ("float32", "bfloat16", "float16"):
    return 8.0 * jnp.dtype(fmt).itemsize
  return formats.WeightFormat.parse(fmt).bits_per_weight


def _format_name(fmt: Any) -> str:
  """A weight format or dtype, as a rate table's key ("int4", "float32", "bfloat16")."""
  if isinstance(fmt, formats.WeightFormat):
    return fmt.name
  if isinstance(fmt, str):
    try:
      return formats.WeightFormat.parse(fmt).name
    except formats.FormatError:
      try:
        return jnp.dtype(fmt).name  # a compute dtype with no format of its own: "float16"
      except TypeError:
        raise formats.FormatError(f"{fmt!r} is neither a weight format nor a dtype; expected"
                                  " e.g. float32, bfloat16, int8, int8-g32, int4, int4-asym"
                                  ) from None
  return jnp.dtype(fmt).name


def rate_for(table: dict[str, float], fmt: Any) -> tuple[float, str]:
  """Bytes of stored weights per second for format (or dtype) `fmt`, and where it came from.

  The measured figure of `fmt` itself; else the measured figure of another
  group size of the same kind, at the same weights per second; else
  `DEFAULT_WEIGHT_RATE` of float32's weights per second (float32 falls back to
  any measured dtype).

  Returns:
    (bytes/s, "measured" | "measured <other format>" | "default <fraction> x float32").
  """
  name = _format_name(fmt)
  if name in table:
    return table[name], "measured"
  for other, bw in table.items():
    if other != "float32" and _kind(other) == _kind(name):
      return bw / _bits(other) * _bits(name), f"measured {other}"
  f32 = table.get("float32", next(iter(table.values())))
  if name == "float32":
    return f32, "measured"
  fraction = DEFAULT_WEIGHT_RATE.get(_kind(name), min(DEFAULT_WEIGHT_RATE.values()))
  return f32 / 32.0 * fraction * _bits(name), f"default {fraction:g} x float32"


def _rate(table: dict[str, float], fmt: Any) -> float:
  return rate_for(table, fmt)[0]


def matvec_bw(profile, side: Side, fmt) -> float:
  """Bytes of stored weights per second multiplied at batch 1 on `side`, for a weight
  format ("int4", a WeightFormat) or a dtype (`rate_for` says how it falls back)."""
  return _rate(profile.cpu_matvec_bw if side == "cpu" else profile.device_matvec_bw, fmt)


def flops(profile, side: Side, dtype) -> float:
  """Matmul FLOP/s on `side` (a dtype; quantized kernels compute in the compute dtype)."""
  table = profile.cpu_flops if side == "cpu" else profile.device_flops
  name = jnp.dtype(dtype).name
  return table.get(name, table.get("float32", next(iter(table.values()))))


def matmul_time(profile, side: Side, nbytes: float, num_params: float, tokens: int,
                dtype, fmt: Any = None) -> float:
  """Seconds to multiply `tokens` rows by a weight of `nbytes` stored bytes (`num_params` entries).

  The roofline of the two limits: streaming the weights, and the FLOPs (in the
  compute `dtype`). A quantized kernel (`fmt` other than float32) is computed as
  `formats.matmul` does: up to MATVEC_MAX_ROWS rows one matrix-vector product
  each at the format's rate (each streams the weights), more rows dequantize it
  once to `dtype` and multiply.
  """
  if nbytes <= 0:
    return 0.0
  # "float32" as a format means a plain kernel: one array in the compute dtype.
  name = _format_name(dtype if fmt in (None, "float32") else fmt)
  compute = 2.0 * tokens * num_params / flops(profile, side, dtype)
  if name == _format_name(dtype):
    return max(nbytes / matvec_bw(profile, side, name), compute)
  if tokens <= formats.MATVEC_MAX_ROWS:
    return tokens * nbytes / matvec_bw(profile, side, name)
  wide = num_params * jnp.dtype(dtype).itemsize
  dequantize = nbytes / matvec_bw(profile, side, name) + wide / profile.memory_bw
  return dequantize + max(wide / matvec_bw(profile, side, dtype), compute)


def effective_rate(profile, side: Side, tokens: int, dtype) -> float:
  """Bytes of weights per second consumed by `side` when `tokens` rows go through."""
  itemsize = jnp.dtype(dtype).itemsize
  return 1.0 / max(1.0 / matvec_bw(profile, side, dtype),
                   2.0 * tokens / itemsize / flops(profile, side, dtype))


def phase_alpha(profile, tokens: int, dtype, pinned: bool = True) -> float:
  """HeteGen's alpha for a phase that pushes `tokens` rows (batch x new tokens) through."""
  return hetegen_alpha(effective_rate(profile, "cpu", tokens, dtype),
                       profile.link_bw(pinned),
                       effective_rate(profile, "device", tokens, dtype))


@dataclasses.dataclass(frozen=True)
class Matrix:
  """One weight a strategy may keep resident, split or stream.

  Attributes:
    group: its placement group, e.g. "layers/3/attn".
    name: leaf name ("q", ..., "down"); Mixtral's three expert kernels are one
      Matrix named "experts" (split along experts, never along features).
    shape: kernel shape ([in, out], or [X, in, out] summed over the three for
      "experts": then `shape` is (X, D, F) and `num_params` counts all three).
    num_params: entries.
    nbytes: bytes as stored (the model's weight format: scales included).
    stage: index of the input it consumes within its half (matrices with the
      same stage read the same activations, e.g. q/k/v or gate/up).
    out_features: columns (experts for "experts"): the unit alpha splits.
    format: the stored weight format's name ("int8", "int4", ...; "float32" for a plain
      kernel in the model's compute dtype, as in hetflow/models/formats.py).
  """

  group: str
  name: str
  shape: tuple[int, ...]
  num_params: int
  nbytes: int
  stage: int
  out_features: int
  format: str = "float32"

  @property
  def in_features(self) -> int:
    return self.shape[-2]


def _stage_of(arch: str, half: str, name: str) -> int:
  if half == "attn":
    return 0 if name in ("q", "k", "v") else 1
  if arch == "mixtral":
    return 0
  return 0 if name in ("gate", "up") else 1


def _stored_nbytes(model, name: str) -> int:
  """Bytes of parameter `name` as stored: its array, or a quantized kernel's leaves."""
  shapes = model.shapes
  if name in shapes:
    return shapes[name].size * shapes[name].dtype.itemsize
  prefix = name + "/"
  return sum(s.size * s.dtype.itemsize for n, s in shapes.items() if n.startswith(prefix))


def kernel_format(model, name: str) -> str:
  """The stored format of parameter `name` ("float32" where the model's format does not apply)."""
  fmt = getattr(model, "format", None)
  if fmt is None or not fmt.applies(name):
    return "float32"
  return fmt.name


def group_matrices(model, group: str) -> list[Matrix]:
  """The splittable weights of one layer half, in the order the half uses them."""
  shapes = model.logical_shapes if hasattr(model, "logical_shapes") else model.shapes
  half = group.split("/")[-1]
  arch = model.config.arch
  out: list[Matrix] = []
  names = ATTN_MATRICES if half == "attn" else FFN_MATRICES
  if half == "mlp" and arch == "mixtral":
    keys = [f"{group}/{n}" for n in FFN_MATRICES]
    kernels = [shapes[k] for k in keys]
    params = sum(k.size for k in kernels)
    x, d, f = kernels[0].shape
    return [Matrix(group, "experts", (x, d, f), params,
                   sum(_stored_nbytes(model, k) for k in keys), 0, x,
                   kernel_format(model, keys[0]))]
  for n in names:
    key = f"{group}/{n}"
    if key in shapes:
      s = shapes[key]
      out.append(Matrix(group, n, tuple(s.shape), s.size, _stored_nbytes(model, key),
                        _stage_of(arch, half, n), s.shape[-1], kernel_format(model, key)))
  if half == "mlp":  # the FFN uses up (and gate) first, then down
    out.sort(key=lambda m: m.stage)
  return out


def is_matrix_leaf(model, group: str, leaf: str) -> bool:
  """Whether `leaf` of `group` is a splittable kernel (vs. a norm, bias, router)."""
  half = group.split("/")[-1]
  if half == "attn":
    return leaf in ATTN_MATRICES
  return leaf in FFN_MATRICES


def small_nbytes(model, group: str) -> int:
  """Bytes of a half's leaves that are not splittable kernels (norms, biases, router)."""
  prefix = group + "/"
  return sum(s.size * s.dtype.itemsize for n, s in model.shapes.items()
             if n.startswith(prefix)
             and not is_matrix_leaf(model, group, n[len(prefix):].split("/")[0]))


def attention_core_time(model, profile, side: Side, batch: int, tokens: int,
                        context: int) -> float:
  """Seconds for the attention itself (scores and mixing over the KV cache).

  Decode reads the cache once (bandwidth-bound); prefill does 4 * B * T * S *
  H * K FLOPs (two matmuls).
  """
  c = model.config
  itemsize = jnp.dtype(model.dtype).itemsize
  cache_bytes = 2 * batch * context * c.num_kv_heads * c.head_dim * itemsize
  fl = 4.0 * batch * tokens * context * c.num_heads * c.head_dim
  return max(cache_bytes / matvec_bw(profile, side, model.dtype),
             fl / flops(profile, side, model.dtype))


def half_roofline(model, profile, half: str, context: int) -> float:
  """Roofline seconds of one decode step (batch 1) of layer 0's `half` ("attn", "mlp", "head")."""
  if half == "head":
    return head_time(model, profile, "device", 1, 1)
  group = f"layers/0/{half}"
  seconds = sum(matmul_time(profile, "device", m.nbytes, m.num_params, 1, model.dtype, m.format)
                for m in group_matrices(model, group))
  if half == "attn":
    seconds += attention_core_time(model, profile, "device", 1, 1, context)
  return seconds


def decode_scale(profile, model, half: str, side: Side) -> float:
  """Measured over roofline decode time of `half` ("attn", "mlp", "head") on `side`.

  1.0 unless `profile` carries a calibration of this model's shapes
  (`hetflow.bench.calibration`); that was measured on the profile's device, so it
  applies to the CPU side only where the device is the CPU.
  """
  measured = hardware.measured_costs(profile, model)
  if not measured or (side == "cpu" and not hardware.device_is_cpu(profile)):
    return 1.0
  return measured[f"{half}_s"] / half_roofline(model, profile, half, int(measured["context"]))


def head_time(model, profile, side: Side, batch: int, tokens: int) -> float:
  """Seconds for the LM head on `tokens` rows (the engine runs it on the last only).

  An untied head takes the model's weight format; a tied one is the embedding,
  in the compute dtype.
  """
  c = model.config
  params = c.embed_dim * c.vocab_size
  if c.tie_word_embeddings or "head/lm_head" not in model.logical_shapes:
    nbytes, fmt = params * jnp.dtype(model.dtype).itemsize, None
  else:
    nbytes, fmt = _stored_nbytes(model, "head/lm_head"), kernel_format(model, "head/lm_head")
  return matmul_time(profile, side, nbytes, params, batch * tokens, model.dtype, fmt)


# -- several hosts ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Processes that each hold 1/`hosts` of every layer (Megatron-style tensor parallelism).

  Attributes:
    hosts: processes on the mesh's model axis; each holds a shard with 1/hosts
      of the heads, the FFN width and the vocabulary, in its own memory and on
      its own disk, under its own budget (the budget a plan is given is per host).
    per_machine: how many of those processes share one machine (its cores,
      memory bus and disk): each gets 1/per_machine of the profile's rates
      (`hardware.shared`). 1 = one process per machine.
  """

  hosts: int = 1
  per_machine: int = 1

  def __post_init__(self):
    for f in ("hosts", "per_machine"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"Cluster.{f}={v!r}; expected an int >= 1.")
    if self.hosts % self.per_machine:
      raise ValueError(f"Cluster(hosts={self.hosts}, per_machine={self.per_machine}): the"
                       " processes must fill whole machines (hosts a multiple of per_machine).")


def shard_model(model, hosts: int):
  """One host's shard of `model` under Megatron-style sharding over `hosts`, as a model.

  The engine's own split (`hetflow.models.sharding`): 1/N of the query heads, of the
  key/value heads (each repeated on the hosts whose query heads use it where there are
  fewer than N) and of the FFN width; norms, the embedding and the head whole on every
  host. Only shapes are meant to be read from the result.

  Raises:
    hetflow.models.sharding.ShardingError: what the engine would refuse, by name.
  """
  if hosts == 1:
    return model
  sharding.check_shardable(model, hosts)
  config = sharding.shard_config(model.config, hosts)
  return dataclasses.replace(model, config=config.replace(name=f"{config.name} (1/{hosts})"))


def allreduce_time(nbytes: float, hosts: int, network) -> float:
  """Seconds of an all-reduce of `nbytes` (each host's full vector) over `hosts`.

  The faster of a ring (2(N-1) messages of nbytes/N: bandwidth-optimal) and
  recursive doubling (ceil(log2 N) exchanges of all nbytes: latency-optimal),
  as collective libraries choose by size. `network` is a profile's `network`.
  """
  if hosts <= 1:
    return 0.0
  a, b = network["latency_s"], network["bandwidth"]
  ring = 2 * (hosts - 1) * (a + nbytes / hosts / b)
  doubling = math.ceil(math.log2(hosts)) * (a + nbytes / b)
  return min(ring, doubling)


def collective_seconds(shard, cluster: Cluster, network, batch: int, tokens: int = 1) -> float:
  """Seconds of collectives in one forward pass of `tokens` new tokens per row, for one
  host's `shard` on `cluster`: two all-reduces per layer of the hidden-size activations."""
  if cluster.hosts == 1:
    return 0.0
  c = shard.config
  item = jnp.dtype(shard.dtype).itemsize
  return 2 * c.num_layers * allreduce_time(batch * tokens * c.hidden_size * item,
                                           cluster.hosts, network)
