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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

from hetflow import hardware

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


def _rate(table: dict[str, float], dtype: Any) -> float:
  """A per-dtype rate, falling back to float32 then to any measured dtype."""
  name = jnp.dtype(dtype).name
  for key in (name, "float32"):
    if key in table:
      return table[key]
  return next(iter(table.values()))


def matvec_bw(profile, side: Side, dtype) -> float:
  """Bytes of weights per second multiplied at batch 1 on `side`."""
  return _rate(profile.cpu_matvec_bw if side == "cpu" else profile.device_matvec_bw, dtype)


def flops(profile, side: Side, dtype) -> float:
  """Matmul FLOP/s on `side`."""
  return _rate(profile.cpu_flops if side == "cpu" else profile.device_flops, dtype)


def matmul_time(profile, side: Side, nbytes: float, num_params: float, tokens: int,
                dtype) -> float:
  """Seconds to multiply `tokens` rows by a weight of `nbytes` (`num_params` entries).

  The roofline of the two limits: streaming the weights once, and the FLOPs.
  """
  if nbytes <= 0:
    return 0.0
  return max(nbytes / matvec_bw(profile, side, dtype),
             2.0 * tokens * num_params / flops(profile, side, dtype))


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
    nbytes: bytes in the model's dtype.
    stage: index of the input it consumes within its half (matrices with the
      same stage read the same activations, e.g. q/k/v or gate/up).
    out_features: columns (experts for "experts"): the unit alpha splits.
  """

  group: str
  name: str
  shape: tuple[int, ...]
  num_params: int
  nbytes: int
  stage: int
  out_features: int

  @property
  def in_features(self) -> int:
    return self.shape[-2]


def _stage_of(arch: str, half: str, name: str) -> int:
  if half == "attn":
    return 0 if name in ("q", "k", "v") else 1
  if arch == "mixtral":
    return 0
  return 0 if name in ("gate", "up") else 1


def group_matrices(model, group: str) -> list[Matrix]:
  """The splittable weights of one layer half, in the order the half uses them."""
  shapes = model.shapes
  itemsize = jnp.dtype(model.dtype).itemsize
  half = group.split("/")[-1]
  arch = model.config.arch
  out: list[Matrix] = []
  names = ATTN_MATRICES if half == "attn" else FFN_MATRICES
  if half == "mlp" and arch == "mixtral":
    kernels = [shapes[f"{group}/{n}"] for n in FFN_MATRICES]
    params = sum(k.size for k in kernels)
    x, d, f = kernels[0].shape
    return [Matrix(group, "experts", (x, d, f), params, params * itemsize, 0, x)]
  for n in names:
    key = f"{group}/{n}"
    if key in shapes:
      s = shapes[key]
      out.append(Matrix(group, n, tuple(s.shape), s.size, s.size * itemsize,
                        _stage_of(arch, half, n), s.shape[-1]))
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
             if n.startswith(prefix) and not is_matrix_leaf(model, group, n[len(prefix):]))


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
  seconds = sum(matmul_time(profile, "device", m.nbytes, m.num_params, 1, model.dtype)
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
  """Seconds for the LM head on `tokens` rows (the engine runs it on the last only)."""
  c = model.config
  itemsize = jnp.dtype(model.dtype).itemsize
  params = c.embed_dim * c.vocab_size
  return matmul_time(profile, side, params * itemsize, params, batch * tokens, model.dtype)
