"""The compute over neuron-bundle records: which matrices a record holds, and
the sparse FFN step over a block of records.

The records themselves (their layout on disk and in memory, the store that
holds them, the reads that fetch them) are the memory layer's:
`hetflow/memory/bundle_store.py` and `hetflow.memory.reader.ReaderPool.read_many`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hetflow.models import formats, layers, native
from hetflow.models.config import ModelConfig


def neuron_matrices(config: ModelConfig) -> tuple[str, ...]:
  """The FFN matrices a neuron has a slice of, in record order (down last)."""
  return ("up", "down") if config.arch == "opt" else ("gate", "up", "down")


def planar_step(config: ModelConfig, a, b, h, bias, valid, pre: bool = False, recency=None):
  """The FFN over a contiguous block of neuron records held planar
  (neuron_cluster's sparse step; jit it with `functools.partial(planar_step, config)`).

  Two plain matrix products, no gather: the block's rows are row-major
  matrices, so this runs at the matrix-vector rate of the memory.

  Args:
    config: the model's config.
    a: [n, M * D] each neuron's input rows back to back (Llama: gate, up;
      OPT: up).
    b: [n, D] each neuron's down row.
    h: [B, T, D] the normed input.
    bias: [n, M] the input rows' biases, or None.
    valid: a scalar count (the first `valid` records are real) or an [n]
      bool mask; the others contribute exact zeros.
    pre: also return each record's selecting pre-activation (Llama: gate,
      OPT: up, bias included) at the last token, [n] (a predictor's exact
      target: `hetflow.sparsity.predictor.ErrorFeedback`).
    recency: [T] weights of the pass's tokens; with `pre`, the third output is
      then the pair (those pre-activations, each record's count of the tokens it
      fired at, token t weighted recency[t], [n]: a prefill's history for the
      cache's admission filter).

  Returns:
    ([B, T, D] the block's contribution, how many of its neurons fired), and
    with `pre` that [n] array third.
  """
  n, d = b.shape
  m = a.shape[1] // d
  y = jnp.einsum("BTD,mD->BTm", h, a.reshape(n * m, d)).reshape(*h.shape[:2], n, m)
  if bias is not None:
    y = y + bias
  z, fired = _activate(config, y, valid)
  out = jnp.einsum("BTn,nD->BTD", z, b)
  return (out, fired, _third(y, z, recency)) if pre else (out, fired)


def _third(y, z, recency):
  """A step's third output: the selecting pre-activations at the last token, and with
  `recency` [T] the records' recency-weighted firing counts over the tokens, [n]."""
  if recency is None:
    return _selecting(y)
  return _selecting(y), jnp.einsum("BTn,T->n", (z != 0).astype(jnp.float32), recency)


def _selecting(y):
  """Each record's selecting pre-activation (Llama: gate, OPT: up) at the last token, [n]."""
  return y[..., 0].reshape(-1, y.shape[2])[-1]


def _activate(config: ModelConfig, y, valid):
  """The neurons' activations z [B, T, n] from their input rows' products y [B, T, n, M]
  (biases added), with the records past `valid` exact zeros, and how many fired."""
  n = y.shape[2]
  act = layers.activation(config.hidden_act)
  if config.arch == "opt":
    z = act(y[..., 0])
  else:
    u = y[..., 1]
    if config.hidden_act == "drelu":
      u = jax.nn.relu(u)
    z = act(y[..., 0]) * u
  keep = valid if jnp.ndim(valid) else jnp.arange(n) < valid
  z = jnp.where(keep, z, 0)
  fired = jnp.sum(jnp.any(z.reshape(-1, n) != 0, axis=0))
  return z, fired


def planar_gather_step(config: ModelConfig, a, b, idx, h, bias, valid, pre: bool = False):
  """`planar_step` over the records at slots `idx` of whole planar buffers
  (a: [slots, M * D], b: [slots, D]): a gather of contiguous rows first, for
  a few hits in a large cached block, where multiplying the whole block costs more."""
  return planar_step(config, jnp.take(a, idx, axis=0), jnp.take(b, idx, axis=0), h, bias, valid,
                     pre)


# -- quantized neuron records ---------------------------------------------------------------
# A quantized record holds exactly the values `resident` of the same format holds (the
# model's stored kernels, hetflow/models/formats.py), regrouped per neuron, so the sparse
# step gives resident's outputs up to the order of float32 additions:
#   plane A (per input matrix, gate then up): the neuron's row of that kernel, values then
#     their scales (and minimums) along `hidden`, as the kernel stores them:
#       bfloat16   bf16 [D]
#       int8       s8 [D], scale f32                              (per output channel)
#       int8-gN    s8 [D] (groups of N along D), scale f16 [D / N]
#       int4       u8 [D / 2] (per group of g: byte j = value j | value j + g/2 << 4),
#                  scale f16 [D / g] (int4-asym: and min f16 [D / g])
#   plane B: the neuron's down row, values only: bf16 [D], s8 [D], or u8 [D / 2] with
#     byte k = value k | value k + D/2 << 4. The down kernel's scales run along the
#     neurons (its `in` axis: one per output channel, or one per group of g neurons and
#     output channel), shared by g neurons, so they are a per-layer table ("down_scale",
#     "down_min": [D] f32, or [F / g, D] f16) in the store beside the records, held in
#     memory with the fixed region (1/8 of the down values' bytes at int4-g32), and each
#     slot's group comes from its neuron id.


@dataclasses.dataclass(frozen=True)
class RecordCodec:
  """How one neuron's rows are stored in a record of a weight format.

  Attributes:
    weights: the format's name (hetflow/models/formats.py), e.g. "int4".
    kind: how its leaves are laid out: "float32", "bfloat16", "int8", "int8-g", "int4" or
      "int4-asym" (`formats.format_of`).
    group: values per scale (0: per output channel).
    hidden: D.
    inputs: input matrices in plane A (gate, up: 2; OPT's up: 1).
  """

  weights: str
  kind: str
  group: int
  hidden: int
  inputs: int

  @property
  def quantized(self) -> bool:
    """Whether records hold anything but the compute dtype's rows."""
    return self.kind != "float32"

  @property
  def value_nbytes(self) -> int:
    """Bytes of one row's values."""
    d = self.hidden
    return {"bfloat16": 2 * d, "int4": d // 2, "int4-asym": d // 2}.get(self.kind, d)

  @property
  def param_nbytes(self) -> int:
    """Bytes of one input row's scales (and minimums) after its values."""
    if self.kind in ("float32", "bfloat16"):
      return 0
    if self.kind == "int8":
      return 4
    per = 2 if self.kind == "int4-asym" else 1
    return per * 2 * (self.hidden // self.group)

  @property
  def row_nbytes(self) -> int:
    """Bytes of one input row in plane A."""
    if self.kind == "float32":
      return 4 * self.hidden
    return self.value_nbytes + self.param_nbytes

  @property
  def a_nbytes(self) -> int:
    """Bytes of a neuron's plane-A part (its input rows)."""
    return self.inputs * self.row_nbytes

  @property
  def b_nbytes(self) -> int:
    """Bytes of a neuron's plane-B part (its down row)."""
    return 4 * self.hidden if self.kind == "float32" else self.value_nbytes

  @property
  def grouped_down(self) -> bool:
    """Whether the down table has one row per group of neurons (else one for all)."""
    return self.kind in ("int8-g", "int4", "int4-asym")

  def table_nbytes(self, neurons: int) -> int:
    """Bytes of one layer's down table (F neurons) in memory, where it is float32 (the
    store keeps group tables float16, as the kernel does)."""
    if self.kind in ("float32", "bfloat16"):
      return 0
    if self.kind == "int8":
      return 4 * self.hidden
    per = 2 if self.kind == "int4-asym" else 1
    return per * 4 * (neurons // self.group) * self.hidden

  # -- writing (numpy) -----------------------------------------------------------------------

  def encode(self, model: Any, layer: int, matrices: tuple[str, ...]
             ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """One layer's records from the model's stored kernels (quantized once, here).

    Args:
      model: the hetflow Model (`param` gives a kernel as stored, one at a time).
      layer: the layer.
      matrices: record order (`neuron_matrices`), down last.

    Returns:
      (A [F, a_nbytes] uint8, B [F, b_nbytes] uint8, the down table), rows in neuron-id
      order.
    """
    parts = [self._input_rows(model.param(f"layers/{layer}/mlp/{m}")) for m in matrices[:-1]]
    a = np.concatenate(parts, axis=1)
    b, table = self._down_rows(model.param(f"layers/{layer}/mlp/{matrices[-1]}"))
    return np.ascontiguousarray(a), np.ascontiguousarray(b), table

  def _input_rows(self, kernel) -> np.ndarray:
    """A gate/up kernel as stored -> [F, row_nbytes] uint8 (values, scales, minimums)."""
    leaves = {k: np.asarray(v) for k, v in kernel.items()}
    q = leaves["q"]
    if self.kind in ("bfloat16", "int8"):  # [F, D]
      cols = [q.view(np.uint8)]
    else:  # group-major [G, F, b] -> [F, G * b]
      cols = [np.ascontiguousarray(np.swapaxes(q, 0, 1)).reshape(q.shape[1], -1).view(np.uint8)]
    for name in ("scale", "min"):
      if name in leaves:
        p = leaves[name]
        p = p if self.kind == "int8" else p.T  # [F, 1] f32, or [G, F] f16 -> [F, G]
        cols.append(np.ascontiguousarray(p).view(np.uint8))
    return np.concatenate(cols, axis=1)

  def _down_rows(self, kernel) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The down kernel as stored -> ([F, b_nbytes] uint8, its table)."""
    leaves = {k: np.asarray(v) for k, v in kernel.items()}
    q = leaves["q"]
    if self.kind in ("bfloat16", "int8"):  # [D, F]
      rows = np.ascontiguousarray(q.T).view(np.uint8)
      table = {"down_scale": leaves["scale"][:, 0].astype(np.float32)} if "scale" in leaves else {}
      return rows, table
    groups, d, per = q.shape  # [F / g, D, g or g / 2]
    if self.kind == "int8-g":
      rows = np.ascontiguousarray(np.transpose(q, (0, 2, 1))).reshape(groups * per, d)
      rows = rows.view(np.uint8)
    else:
      nib = np.concatenate([q & 15, q >> 4], axis=-1)  # [F / g, D, g]: value j of the group
      nib = np.transpose(nib, (0, 2, 1)).reshape(-1, d)  # [F, D]
      half = d // 2
      rows = np.ascontiguousarray(nib[:, :half] | (nib[:, half:] << np.uint8(4)))
    table = {"down_" + k: np.ascontiguousarray(leaves[k]) for k in ("scale", "min")
             if k in leaves}
    return rows, table

  # -- computing (jax) -----------------------------------------------------------------------

  def input_weights(self, a):
    """Plane A [n, a_nbytes] uint8 -> the input rows as float32 [n, inputs, D]."""
    n, d = a.shape[0], self.hidden
    rows = a.reshape(n * self.inputs, self.row_nbytes)
    v = rows[:, :self.value_nbytes]
    p = rows[:, self.value_nbytes:]
    if self.kind == "bfloat16":
      w = _bitcast(v, jnp.bfloat16).astype(jnp.float32)
    elif self.kind == "int8":
      w = _bitcast(v, jnp.int8).astype(jnp.float32) * _bitcast(p, jnp.float32)
    else:
      g = self.group
      groups = d // g
      scale = _bitcast(p[:, :2 * groups], jnp.float16).astype(jnp.float32)[..., None]
      if self.kind == "int8-g":
        w = _bitcast(v, jnp.int8).astype(jnp.float32).reshape(-1, groups, g) * scale
      else:
        v = v.reshape(-1, groups, g // 2)
        vals = jnp.concatenate([v & 15, v >> 4], axis=-1).astype(jnp.float32)
        if self.kind == "int4-asym":
          minimum = _bitcast(p[:, 2 * groups:], jnp.float16).astype(jnp.float32)[..., None]
          w = vals * scale + minimum
        else:
          w = (vals - 8.0) * scale
    return w.reshape(n, self.inputs, d)

  def down_weights(self, b, table, group_of):
    """Plane B [n, b_nbytes] uint8 -> the down rows as float32 [n, D] (the per-channel int8
    scale is applied after the sum, as resident does: `down_after`)."""
    if self.kind == "bfloat16":
      return _bitcast(b, jnp.bfloat16).astype(jnp.float32)
    if self.kind in ("int8", "int8-g"):
      w = _bitcast(b, jnp.int8).astype(jnp.float32)
    else:
      w = jnp.concatenate([b & 15, b >> 4], axis=-1).astype(jnp.float32)
      if self.kind == "int4":
        w = w - 8.0
    if self.kind == "int8":
      return w
    scale = jnp.take(table["down_scale"], group_of, axis=0).astype(jnp.float32)
    if self.kind == "int4-asym":
      return w * scale + jnp.take(table["down_min"], group_of, axis=0).astype(jnp.float32)
    return w * scale

  def down_after(self, y, table):
    """The down product's per-output-channel scale, applied after the sum (int8)."""
    return y * table["down_scale"] if self.kind == "int8" else y


def _bitcast(u8, dtype):
  """uint8 [..., k * size] -> dtype [..., k] (the bytes reinterpreted, little-endian)."""
  size = jnp.dtype(dtype).itemsize
  if size == 1:
    return jax.lax.bitcast_convert_type(u8, dtype)
  return jax.lax.bitcast_convert_type(u8.reshape(*u8.shape[:-1], -1, size), dtype)


def record_codec(model: Any) -> RecordCodec:
  """The record codec of `model`'s weight format (float32: plain rows of the compute dtype).

  Raises:
    formats.FormatError: a format whose groups do not divide the hidden size or the
      neurons.
  """
  fmt = formats.WeightFormat.parse(model.weights)
  c = model.config
  inputs = len(neuron_matrices(c)) - 1
  if fmt.plain:
    return RecordCodec(fmt.name, "float32", 0, c.hidden_size, inputs)
  kind = fmt.kind
  if kind == "int8" and fmt.group:
    kind = "int8-g"
  elif kind == "int4" and fmt.asymmetric:
    kind = "int4-asym"
  if kind in ("int4", "int4-asym") and c.hidden_size % 2:
    raise formats.FormatError(f"{c.name}: an odd hidden size ({c.hidden_size}) cannot pack"
                              " a down row's int4 values two per byte.")
  return RecordCodec(fmt.name, kind, fmt.group, c.hidden_size, inputs)


def _rows(h):
  return h.reshape(-1, h.shape[-1]).astype(jnp.float32)


# The native kernels' codes of the kinds (hetflow/models/native/neuron.cc).
_NATIVE_KIND = {"bfloat16": 1, "int8": 2, "int8-g": 3, "int4": 4, "int4-asym": 5}


def _input_products_xla(codec: RecordCodec, x, a):
  """x [R, D] times every input row of plane A -> [R, n * inputs] (dequantize, then dot)."""
  n = a.shape[0]
  return jnp.einsum("rD,kD->rk", x, codec.input_weights(a).reshape(n * codec.inputs, -1))


def _down_product_xla(codec: RecordCodec, z, b, table, group_of):
  """z [R, n] times plane B's down rows -> [R, D]."""
  out = jnp.einsum("rn,nD->rD", z, codec.down_weights(b, table, group_of))
  return codec.down_after(out, table)


def _input_products_native(codec: RecordCodec, x, a):
  call = jax.ffi.ffi_call("hetflow_neuron_in",
                          jax.ShapeDtypeStruct((x.shape[0], a.shape[0] * codec.inputs),
                                               jnp.float32), vmap_method="sequential")
  return call(x, a, kind=np.int64(_NATIVE_KIND[codec.kind]),
              group=np.int64(codec.group or codec.hidden), inputs=np.int64(codec.inputs))


def _down_product_native(codec: RecordCodec, z, b, table, group_of):
  none = jnp.zeros((1,), jnp.float32)
  scale = table.get("down_scale", none).astype(jnp.float32)
  minimum = table.get("down_min", none).astype(jnp.float32)
  call = jax.ffi.ffi_call("hetflow_neuron_down",
                          jax.ShapeDtypeStruct((z.shape[0], codec.hidden), jnp.float32),
                          vmap_method="sequential")
  return call(z, b, scale, minimum, group_of.astype(jnp.int32),
              kind=np.int64(_NATIVE_KIND[codec.kind]))


def _native(codec: RecordCodec, rows: int) -> bool:
  """Whether a step of `rows` input rows uses the native kernels: decode-sized rows, a
  hidden size of whole 16-float lanes, on a machine where they were built
  (HETFLOW_NATIVE=0: never); decided when traced."""
  return (rows <= formats.MATVEC_MAX_ROWS and codec.hidden % 16 == 0
          and native.enabled())


def quantized_step(config: ModelConfig, codec: RecordCodec, a, b, table, group_of, h, bias,
                   valid, pre: bool = False, recency=None):
  """`planar_step` over quantized records (jit it with the config and codec bound).

  Args:
    config: the model's config.
    codec: the records' RecordCodec.
    a: [n, a_nbytes] uint8 plane A.
    b: [n, b_nbytes] uint8 plane B.
    table: the layer's down table ({"down_scale"[, "down_min"]}; {} for bfloat16).
    group_of: [n] int32 each record's row of a grouped down table (neuron id // g).
    h: [B, T, D] the normed input.
    bias: [n, M] the input rows' biases, or None.
    valid: as `planar_step`.
    pre, recency: as `planar_step`.

  Returns:
    ([B, T, D] the block's contribution in h's dtype, how many of its neurons fired), and
    with `pre` the [n] selecting pre-activations third.
  """
  x = _rows(h)
  n = a.shape[0]
  if _native(codec, x.shape[0]):
    y = jax.lax.platform_dependent(
        x, a, cpu=functools.partial(_input_products_native, codec),
        default=functools.partial(_input_products_xla, codec))
  else:
    y = _input_products_xla(codec, x, a)
  y = y.reshape(*h.shape[:2], n, codec.inputs)
  if bias is not None:
    y = y + bias
  z, fired = _activate(config, y, valid)
  third = _third(y, z, recency) if pre else None
  z = z.reshape(-1, n).astype(jnp.float32)
  if _native(codec, x.shape[0]):
    out = jax.lax.platform_dependent(
        z, b, table, group_of, cpu=functools.partial(_down_product_native, codec),
        default=functools.partial(_down_product_xla, codec))
  else:
    out = _down_product_xla(codec, z, b, table, group_of)
  out = out.reshape(h.shape).astype(h.dtype)
  return (out, fired, third) if pre else (out, fired)


def quantized_gather_step(config: ModelConfig, codec: RecordCodec, a, b, idx, table, group_of,
                          h, bias, valid, pre: bool = False):
  """`quantized_step` over the records at slots `idx` of whole planar buffers."""
  return quantized_step(config, codec, jnp.take(a, idx, axis=0), jnp.take(b, idx, axis=0),
                        table, group_of, h, bias, valid, pre)
