"""Weight formats: how a model's linear kernels are stored, and how each is computed.

A format is chosen per model (`hetflow.load_model(path, weights="int8")`). It
applies to the linear kernels of the blocks (q, k, v, o, gate, up, down, and
Mixtral's experts) and to an untied LM head; embeddings, norms, biases, the
MoE router and OPT's projections stay in the compute dtype (they are a few
percent of the bytes, and the embedding is read one row per token).

  float32     the kernel is one array [in, out] in the compute dtype (XLA's dot)
  bfloat16    {"q": bfloat16 [out, in]}
  int8        {"q": int8 [out, in], "scale": float32 [out, 1]}: per output channel
  int8-g32    {"q": int8 [in / 32, out, 32], "scale": float16 [in / 32, out]}
              (GGUF Q8_0's values; also -g64, -g128)
  int4        {"q": uint8 [in / 32, out, 16], "scale": float16 [in / 32, out]}:
              symmetric, groups of 32 (GGUF Q4_0); value = (nibble - 8) * scale
  int4-g64    groups of 64
  int4-asym   plus "min": float16 [in / 32, out]; value = nibble * scale + min
              (GGUF Q4_1); also int4-g64-asym

A quantized kernel is a small dict of arrays at the kernel's usual path
(`layers/3/mlp/up` -> {"q", "scale"}), so strategies that move a group's tree
of arrays need no format-specific code; which formulation computes it follows
from the leaves' shapes and dtypes alone. The layouts are the ones XLA CPU
computes fastest (`hetflow.models.kernels`, figures in `docs/formats.md`): bfloat16
and per-channel int8 are stored [out, in] and computed as one multiply and a
reduction over the contiguous `in` axis, the scale applied after it; grouped
formats are stored group-major ([in / g, out, g]) and computed as a scan over
groups, each step a 2-D multiply-reduce (a 3-D reduction, or a group axis
inside each row, ran 10-100x slower). int4 packs two values per byte in GGUF's
block order: in each group, byte j holds value j in its low nibble and value
j + g/2 in its high nibble, so GGUF files map without re-quantizing (their
blocks are only regrouped).

Quantization rules are GGUF's (Q8_0, Q4_0, Q4_1, generalised to other group
sizes), bit for bit at group 32, so a kernel quantized here equals the same
kernel quantized by llama.cpp's converter.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from hetflow.models import kernels

KINDS = ("float32", "bfloat16", "int8", "int4")
QUANTIZED_LEAVES = ("q", "k", "v", "o", "gate", "up", "down")
"""Kernel leaves (under layers/<i>/attn or /mlp) that take the model's format."""

# Rows of x above which a quantized kernel is dequantized once and multiplied
# with XLA's dot (prefill) instead of the matrix-vector formulation (decode):
# the elementwise formulation reads the weights once per row.
MATVEC_MAX_ROWS = 4

_SPEC = re.compile(r"^(float32|bfloat16|int8|int4)(?:-g(\d+))?(-asym)?$")


class FormatError(ValueError):
  """A weight format that hetflow does not have, or a kernel it cannot hold."""


@dataclasses.dataclass(frozen=True)
class WeightFormat:
  """How linear kernels are stored.

  Attributes:
    kind: "float32", "bfloat16", "int8" or "int4".
    group: values sharing one scale along `in` (0: one scale per output
      channel, int8 only; int4 needs 32 or 64).
    asymmetric: int4 only: a minimum per group besides the scale (GGUF Q4_1).
  """

  kind: str = "float32"
  group: int = 0
  asymmetric: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise FormatError(f"weight format kind {self.kind!r}; expected one of {KINDS}.")
    if self.kind in ("float32", "bfloat16") and (self.group or self.asymmetric):
      raise FormatError(f"{self.kind} takes no group size or minimum.")
    if self.kind == "int4" and self.group not in (32, 64):
      raise FormatError(f"int4 needs groups of 32 or 64, not {self.group}.")
    if self.kind == "int8" and (self.asymmetric or self.group not in (0, 32, 64, 128)):
      raise FormatError("int8 is symmetric, per channel or in groups of 32, 64 or 128.")

  @classmethod
  def parse(cls, spec: str | WeightFormat | None) -> WeightFormat:
    """"int4-g64-asym" -> WeightFormat("int4", 64, True); None -> float32."""
    if spec is None:
      return cls()
    if isinstance(spec, WeightFormat):
      return spec
    m = _SPEC.match(str(spec).strip().lower())
    if not m:
      raise FormatError(
          f"weights={spec!r} is not a weight format; expected float32, bfloat16, int8,"
          " int8-g32 (-g64, -g128), int4 (groups of 32), int4-g64, int4-asym or int4-g64-asym.")
    kind, group, asym = m.group(1), int(m.group(2) or 0), bool(m.group(3))
    if kind == "int4" and not group:
      group = 32
    return cls(kind, group, asym)

  @property
  def name(self) -> str:
    """The canonical spelling, e.g. "int4-asym", "int8-g32", "int4-g64"."""
    name = self.kind
    if self.group and not (self.kind == "int4" and self.group == 32):
      name += f"-g{self.group}"
    return name + ("-asym" if self.asymmetric else "")

  @property
  def plain(self) -> bool:
    """Kernels are plain arrays of the compute dtype (float32)."""
    return self.kind == "float32"

  @property
  def bits_per_weight(self) -> float:
    """Stored bits per kernel weight, scales and minimums included."""
    if self.kind == "float32":
      return 32.0
    if self.kind == "bfloat16":
      return 16.0
    value = 8 if self.kind == "int8" else 4
    if not self.group:
      return float(value)  # one float32 scale per row is negligible
    return value + 16 * (2 if self.asymmetric else 1) / self.group

  def applies(self, name: str) -> bool:
    """Whether parameter `name` (e.g. "layers/3/mlp/up") takes this format."""
    if self.plain:
      return False
    parts = name.split("/")
    if parts[0] == "layers":
      return len(parts) == 4 and parts[3] in QUANTIZED_LEAVES
    return name == "head/lm_head"

  def leaf_shapes(self, shape: tuple[int, ...]) -> dict[str, jax.ShapeDtypeStruct]:
    """Stored leaves of a kernel of logical shape [..., in, out]."""
    *lead, n_in, n_out = shape
    lead = tuple(lead)
    if self.kind == "bfloat16":
      return {"q": jax.ShapeDtypeStruct(lead + (n_out, n_in), jnp.bfloat16)}
    group = self.group or n_in
    if n_in % group:
      raise FormatError(f"a kernel of {n_in} inputs cannot be cut into groups of {group}"
                        f" ({self.name}); choose another format for this model.")
    groups = n_in // group
    if not self.group:
      return {"q": jax.ShapeDtypeStruct(lead + (n_out, n_in), jnp.int8),
              "scale": jax.ShapeDtypeStruct(lead + (n_out, 1), jnp.float32)}
    per_group = group if self.kind == "int8" else group // 2
    leaves = {"q": jax.ShapeDtypeStruct(lead + (groups, n_out, per_group),
                                        jnp.int8 if self.kind == "int8" else jnp.uint8),
              "scale": jax.ShapeDtypeStruct(lead + (groups, n_out), jnp.float16)}
    if self.asymmetric:
      leaves["min"] = jax.ShapeDtypeStruct(lead + (groups, n_out), jnp.float16)
    return leaves

  def quantize(self, kernel: np.ndarray) -> dict[str, np.ndarray]:
    """Stores one kernel [..., in, out] (any float dtype) in this format.

    bfloat16 kernels are only transposed (never widened); integer formats
    widen this one tensor to float32 while quantizing it.
    """
    if self.plain:
      raise FormatError("float32 kernels are stored as they are; nothing to quantize.")
    if self.kind == "bfloat16":
      return {"q": np.ascontiguousarray(np.swapaxes(kernel.astype(ml_dtypes.bfloat16,
                                                                  copy=False), -1, -2))}
    wt = np.ascontiguousarray(np.swapaxes(np.asarray(kernel, np.float32), -1, -2))
    *lead, n_out, n_in = wt.shape  # [..., out, in]
    group = self.group or n_in
    blocks = wt.reshape(*lead, n_out, n_in // group, group)
    if self.kind == "int8":
      q, scale = quantize_int8(blocks)
      if not self.group:
        return {"q": np.ascontiguousarray(q.reshape(wt.shape)), "scale": scale}  # [out, 1]
      leaves = {"q": q, "scale": scale.astype(np.float16)}
    elif self.asymmetric:
      packed, scale, minimum = quantize_int4_asym(blocks)
      leaves = {"q": packed, "scale": scale, "min": minimum}
    else:
      packed, scale = quantize_int4(blocks)
      leaves = {"q": packed, "scale": scale}
    return group_major(leaves)


def group_major(leaves: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Row-major blocks ({"q": [..., out, G, b], "scale"/"min": [..., out, G]}) -> group-major
  ([..., G, out, b] and [..., G, out]), contiguous: a copy, values unchanged."""
  out = {}
  for name, a in leaves.items():
    a = np.moveaxis(a, -3, -2) if name == "q" else np.swapaxes(a, -1, -2)
    out[name] = np.ascontiguousarray(a)
  return out


# -- quantization rules (numpy; GGUF's, bit for bit at group 32) ------------------------------


def _roundf(x: np.ndarray) -> np.ndarray:
  """C's roundf: halves away from zero (ggml's Q8_0 rounding)."""
  a = np.abs(x)
  return np.sign(x) * np.floor(a + np.float32(0.5))


def quantize_int8(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Q8_0's rule on [..., groups, g] float32: (int8 values, float32 scales [..., groups])."""
  d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
  with np.errstate(divide="ignore"):
    inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
  q = _roundf(blocks * inv).astype(np.int8)
  return q, d[..., 0].astype(np.float32)


def _pack(values: np.ndarray) -> np.ndarray:
  """[..., groups, g] nibbles -> [..., groups, g / 2] bytes (low: j, high: j + g/2)."""
  half = values.shape[-1] // 2
  return values[..., :half] | (values[..., half:] << np.uint8(4))


def quantize_int4(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Q4_0's rule on [..., groups, g]: (packed uint8 [..., groups, g/2], float16 scales)."""
  imax = np.abs(blocks).argmax(axis=-1)[..., None]
  peak = np.take_along_axis(blocks, imax, axis=-1)
  d = peak / np.float32(-8)
  with np.errstate(divide="ignore"):
    inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
  q = np.trunc(blocks * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
  return _pack(q), d[..., 0].astype(np.float16)


def quantize_int4_asym(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Q4_1's rule on [..., groups, g]: (packed values, float16 scales, float16 minimums)."""
  hi = blocks.max(axis=-1, keepdims=True)
  lo = blocks.min(axis=-1, keepdims=True)
  d = (hi - lo) / np.float32(15)
  with np.errstate(divide="ignore"):
    inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
  q = np.trunc((blocks - lo) * inv + np.float32(0.5)).astype(np.uint8).clip(0, 15)
  return _pack(q), d[..., 0].astype(np.float16), lo[..., 0].astype(np.float16)


# -- computing with a kernel (jax) ------------------------------------------------------------


def format_of(kernel: Any) -> str:
  """The format a stored kernel is in, from its leaves alone:
  "float32", "bfloat16", "int8" (per channel), "int8-g", "int4" or "int4-asym"."""
  if not isinstance(kernel, dict):
    return "float32"
  q = kernel["q"]
  if q.dtype == jnp.bfloat16:
    return "bfloat16"
  if q.dtype == jnp.int8:
    return "int8" if q.ndim == kernel["scale"].ndim else "int8-g"
  return "int4-asym" if "min" in kernel else "int4"


def dequantize(kernel: Any, dtype=jnp.float32):
  """A stored kernel as a float array [..., in, out] of `dtype`."""
  fmt = format_of(kernel)
  if fmt == "float32":
    return kernel.astype(dtype)
  q = kernel["q"]
  if fmt == "bfloat16":
    return jnp.swapaxes(q, -1, -2).astype(dtype)
  scale = kernel["scale"].astype(jnp.float32)
  if fmt == "int8":
    return jnp.swapaxes(q.astype(jnp.float32) * scale, -1, -2).astype(dtype)
  if fmt == "int8-g":
    w = q.astype(jnp.float32) * scale[..., None]  # [..., G, out, g]
  else:
    vals = jnp.concatenate([(q & 15).astype(jnp.float32), (q >> 4).astype(jnp.float32)],
                           axis=-1)
    if "min" in kernel:
      w = vals * scale[..., None] + kernel["min"].astype(jnp.float32)[..., None]
    else:
      w = (vals - 8.0) * scale[..., None]
  *lead, groups, n_out, g = w.shape
  return jnp.swapaxes(w, -1, -2).reshape(*lead, groups * g, n_out).astype(dtype)


def _matvec(x, kernel, fmt):
  """One row x [in] @ a stored kernel -> [out] float32, the fastest measured formulation."""
  if fmt == "float32":
    return kernels.float32_matvec(x, kernel)
  q = kernel["q"]
  if fmt == "bfloat16":
    return kernels.bfloat16_ew_t(x, q)
  if fmt == "int8":
    return kernels.int8_channel_ew_t(x, q, kernel["scale"])
  if fmt == "int8-g":
    return kernels.int8_group_scan_gm(x, q, kernel["scale"])
  if fmt == "int4":
    return kernels.int4_scan_gm(x, q, kernel["scale"])
  return kernels.int4_min_scan_gm(x, q, kernel["scale"], kernel["min"])


def matmul(x, kernel):
  """x [..., in] @ a stored kernel -> [..., out] in x's dtype.

  Up to MATVEC_MAX_ROWS rows (decode) go one row at a time through the fastest
  measured matrix-vector formulation of the kernel's format (each on a 1-D
  row: see hetflow/models/kernels.py for why); more rows (prefill) dequantize the
  kernel once and use XLA's dot. A float32 kernel [in, out] takes XLA's dot for
  prefill, and for a row of another dtype (whose product promotes) or a stack of kernels.
  """
  fmt = format_of(kernel)
  lead = x.shape[:-1]
  rows = int(np.prod(lead))
  if fmt == "float32" and (rows > MATVEC_MAX_ROWS or x.dtype != kernel.dtype
                          or kernel.ndim != 2):
    return jnp.einsum("...i,io->...o", x, kernel)
  if rows > MATVEC_MAX_ROWS:
    return jnp.einsum("...i,io->...o", x.astype(jnp.float32),
                      dequantize(kernel)).astype(x.dtype)
  flat = x.reshape(rows, x.shape[-1])
  y = jnp.stack([_matvec(flat[r], kernel, fmt) for r in range(rows)])
  return y.reshape(*lead, -1).astype(x.dtype)


def take_outputs(kernel: Any, lo: int, hi: int) -> Any:
  """Output features [lo, hi) of a stored kernel, in the same format (a numpy copy).

  The column block of a float32 kernel [in, out]; for a quantized one, the
  same rows of every leaf (q [out, in] or [G, out, g], per-channel scales
  [out, 1], group scales and minimums [G, out]), so the block is computed by
  the same formulation as the whole kernel, output for output.
  """
  fmt = format_of(kernel)
  if fmt == "float32":
    return np.ascontiguousarray(np.asarray(kernel)[..., lo:hi])
  grouped = fmt in ("int8-g", "int4", "int4-asym")
  out = {}
  for name, leaf in kernel.items():
    leaf = np.asarray(leaf)
    if grouped and name in ("scale", "min"):
      out[name] = np.ascontiguousarray(leaf[..., lo:hi])  # [G, out]
    else:
      out[name] = np.ascontiguousarray(np.take(leaf, np.arange(lo, hi), axis=-2))
  return out


def nbytes(tree: Any) -> int:
  """Bytes of every array in a kernel or tree (host numpy or jax)."""
  return sum(int(a.nbytes) for a in jax.tree.leaves(tree))
