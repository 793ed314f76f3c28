"""Times every weight format's matrix-vector formulations (hetflow/models/kernels.py).

The launcher is `python -m experiments.kernels`; docs/formats.md has what it showed.
Each case is one formulation of one format on one kernel shape, with random weights
quantized the way the formulation stores them, checked against float32 of the same
(dequantized) weights so a wrong formulation cannot look fast.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hetflow.models import native
from hetflow.models.kernels import (
    bfloat16_dot,
    bfloat16_dot_up,
    bfloat16_ew,
    bfloat16_ew_t_xla,
    dequant_int4,
    float32_dot,
    float32_dot_t,
    float32_ew_t,
    group_major,
    int4_dequant_ew_t,
    int4_ew_t,
    int4_min_ew_t,
    int4_min_scan_gm_xla,
    int4_scan_gm_xla,
    int4_signed_ew_t,
    int8_channel_dot_int,
    int8_channel_dot_t,
    int8_channel_ew_t_xla,
    int8_group_3d_gm,
    int8_group_dequant_ew_t,
    int8_group_ew_t,
    int8_group_scan_gm_xla,
)


# The native kernels (hetflow/models/native), one per stored layout.
def native_bfloat16(x, wt):
  """Native bfloat16 Wt [out, in] times one row."""
  return native.matvec("bfloat16", x, wt)


def native_int8(x, q, scale):
  """Native per-channel int8 times one row."""
  return native.matvec("int8", x, q, scale)


def native_int8_group(x, q, scale):
  """Native group-major int8 times one row."""
  return native.matvec("int8-g", x, q, scale)


def native_int4(x, packed, scale):
  """Native group-major symmetric int4 times one row."""
  return native.matvec("int4", x, packed, scale)


def native_int4_min(x, packed, scale, minimum):
  """Native group-major asymmetric int4 times one row."""
  return native.matvec("int4-asym", x, packed, scale, minimum)


def _qwix_einsum(x, qarray):
  """qwix (Google's JAX quantization library): its einsum on a QArray weight."""
  import qwix
  return qwix.einsum("...i,oi->...o", x.astype(jnp.float32), qarray)


def _qwix_dequant_ew(x, qarray):
  """qwix.dequantize, then hetflow's multiply-reduce."""
  import qwix
  return float32_ew_t(x, qwix.dequantize(qarray))


# -- the probe -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """One formulation of one format on one shape, with its inputs.

  Attributes:
    format: weight format label ("float32", "int8-g32", "int4", ...).
    name: formulation label.
    fn: f(x, *weights) -> y [..., out].
    weights: the stored arrays (their bytes are the weight bytes).
  """

  format: str
  name: str
  fn: Callable[..., Any]
  weights: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Timing:
  """What `measure` reports for one Case.

  Attributes:
    format, name: as in Case.
    shape: (in, out).
    seconds: best time of one call.
    weight_bytes: bytes of the stored arrays.
    gbps: weight bytes per second / 1e9.
    gweights: weights (in * out) per second / 1e9.
    max_rel_error: max |y - y_ref| / max |y_ref| against float32 of the
      dequantized weights (catches a wrong formulation).
  """

  format: str
  name: str
  shape: tuple[int, int]
  seconds: float
  weight_bytes: int
  gbps: float
  gweights: float
  max_rel_error: float


def _quantize_int8(w_t: np.ndarray, group: int):
  o, n = w_t.shape
  g = n if group == 0 else group
  blocks = w_t.reshape(o, n // g, g)
  scale = np.abs(blocks).max(axis=-1) / 127.0
  scale = np.where(scale == 0, 1.0, scale).astype(np.float32 if group == 0 else np.float16)
  q = np.clip(np.rint(blocks / scale.astype(np.float32)[..., None]), -127, 127).astype(np.int8)
  return q.reshape(o, n), scale


def _quantize_int4(w_t: np.ndarray, group: int, asymmetric: bool):
  o, n = w_t.shape
  blocks = w_t.reshape(o, n // group, group)
  if asymmetric:
    lo, hi = blocks.min(-1), blocks.max(-1)
    scale = ((hi - lo) / 15.0).astype(np.float16)
    minimum = lo.astype(np.float16)
    s = np.where(scale == 0, 1.0, scale.astype(np.float32))
    vals = np.clip(np.rint((blocks - minimum.astype(np.float32)[..., None]) / s[..., None]),
                   0, 15)
  else:
    amax_idx = np.abs(blocks).argmax(-1)
    signed_max = np.take_along_axis(blocks, amax_idx[..., None], -1)[..., 0]
    scale = (signed_max / -8.0).astype(np.float16)  # GGUF Q4_0's rule
    s = np.where(scale == 0, 1.0, scale.astype(np.float32))
    vals = np.clip(np.rint(blocks / s[..., None]) + 8, 0, 15)
    minimum = None
  vals = vals.astype(np.uint8)
  half = group // 2
  packed = (vals[..., :half] | (vals[..., half:] << 4)).reshape(o, n // 2)
  return packed, scale, minimum


def native_label() -> str:
  """The native kernels' formulation label, naming the code the library was built with
  (avx512, avx2 or portable: the same source gives 2-15x apart, docs/formats.md)."""
  return f"native C++ (FFI, {native.simd() or 'portable'})"


def cases(n_in: int, n_out: int, formats=None, seed: int = 0, qwix: bool = True,
          use_native: bool = False) -> list[Case]:
  """Every measured formulation for a [n_in x n_out] kernel.

  Args:
    n_in, n_out: the kernel's shape (x has n_in features).
    formats: labels to keep (None: all).
    seed: seed of the random weights.
    qwix: include qwix's QArray formulations (needs `pip install qwix`).
    use_native: include the native kernels (one row only; they must be built).

  Returns:
    The cases, in a stable order.
  """
  rng = np.random.default_rng(seed)
  w = (rng.standard_normal((n_in, n_out), dtype=np.float32) / np.sqrt(n_in)).astype(np.float32)
  wt = np.ascontiguousarray(w.T)
  put = jax.device_put
  bf = put(w.astype(jnp.bfloat16))
  bft = put(wt.astype(jnp.bfloat16))
  out: list[Case] = [
      Case("float32", "dot [in,out]", float32_dot, (put(w),)),
      Case("float32", "dot [out,in]", float32_dot_t, (put(wt),)),
      Case("float32", "mul+sum [out,in]", float32_ew_t, (put(wt),)),
      Case("bfloat16", "dot [in,out] bf16", bfloat16_dot, (bf,)),
      Case("bfloat16", "dot [in,out] upcast", bfloat16_dot_up, (bf,)),
      Case("bfloat16", "mul+sum [out,in]", bfloat16_ew_t_xla, (bft,)),
      Case("bfloat16", "mul+sum [in,out]", bfloat16_ew, (bf,)),
  ]
  q, s = _quantize_int8(wt, 0)  # s [out, 1]
  ch = (put(q), put(s))
  out += [Case("int8", "mul+sum, scale after", int8_channel_ew_t_xla, ch),
          Case("int8", "dot upcast, scale after", int8_channel_dot_t, ch),
          Case("int8", "int8 x int8 dot", int8_channel_dot_int, ch)]
  native_name = native_label() if use_native else None
  if use_native:
    out += [Case("bfloat16", native_name, native_bfloat16, (bft,)), Case("int8", native_name, native_int8, ch)]
  for g in (32, 64, 128):
    q, s = _quantize_int8(wt, g)
    gr = (put(q), put(s))
    gm = tuple(put(a) for a in group_major(q, s))
    out += [Case(f"int8-g{g}", "row-major: mul+sum per group, scale after", int8_group_ew_t, gr),
            Case(f"int8-g{g}", "row-major: dequantize, mul+sum", int8_group_dequant_ew_t, gr),
            Case(f"int8-g{g}", "group-major: one 3-D mul+sum", int8_group_3d_gm, gm),
            Case(f"int8-g{g}", "group-major: scan over groups", int8_group_scan_gm_xla, gm)]
    if use_native:
      out.append(Case(f"int8-g{g}", native_name, native_int8_group, gm))
  for g in (32, 64):
    p, s, _ = _quantize_int4(wt, g, False)
    sym = (put(p), put(s))
    gm = tuple(put(a) for a in group_major(p, s))
    label = "int4" if g == 32 else f"int4-g{g}"
    out += [Case(label, "row-major: mul+sum, 8 and scale after", int4_ew_t, sym),
            Case(label, "row-major: signed nibbles, scale after", int4_signed_ew_t, sym),
            Case(label, "row-major: dequantize, mul+sum", int4_dequant_ew_t, sym),
            Case(label, "group-major: scan over groups", int4_scan_gm_xla, gm)]
    if use_native:
      out.append(Case(label, native_name, native_int4, gm))
    p, s, m = _quantize_int4(wt, g, True)
    out += [Case(label + "-asym", "row-major: mul+sum, scale+min after", int4_min_ew_t,
                 (put(p), put(s), put(m))),
            Case(label + "-asym", "group-major: scan over groups", int4_min_scan_gm_xla,
                 tuple(put(a) for a in group_major(p, s, m)))]
    if use_native:
      out.append(Case(label + "-asym", native_name, native_int4_min,
                      tuple(put(a) for a in group_major(p, s, m))))
  if qwix:
    import qwix as qw
    for label, qtype, tiles in (("int8", jnp.int8, {}), ("int8-g32", jnp.int8, {1: 32}),
                                ("int4", jnp.int4, {1: 32})):
      channel = () if tiles else (0,)
      qa = qw.quantize(jnp.asarray(wt), qtype, channelwise_axes=channel, tiled_axes=tiles)
      qa = put(qa)
      out += [Case(label, "qwix.einsum (QArray)", _qwix_einsum, (qa,)),
              Case(label, "qwix.dequantize, mul+sum", _qwix_dequant_ew, (qa,))]
  if formats is not None:
    out = [c for c in out if c.format in formats]
  return out


def _reference(case: Case, x):
  """float32 matvec with the case's own (dequantized) weights."""
  fn, w = case.fn, case.weights
  if fn in (float32_dot,):
    return x @ np.asarray(w[0])
  if fn in (float32_dot_t, float32_ew_t):
    return x @ np.asarray(w[0]).T
  if fn in (bfloat16_dot, bfloat16_dot_up, bfloat16_ew):
    return x @ np.asarray(w[0], np.float32)
  if fn in (bfloat16_ew_t_xla, native_bfloat16):
    return x @ np.asarray(w[0], np.float32).T
  if fn in (_qwix_einsum, _qwix_dequant_ew):
    import qwix
    return x @ np.asarray(qwix.dequantize(w[0]), np.float32).T
  if w[0].ndim == 3:  # group-major: back to row-major
    q = np.swapaxes(np.asarray(w[0]), 0, 1)
    w = (q.reshape(q.shape[0], -1),) + tuple(np.asarray(a).T for a in w[1:])
  if len(w) == 2 and w[0].dtype == jnp.int8:
    q, s = (np.asarray(a, np.float32) for a in w)
    o, groups = s.shape
    return x @ (q.reshape(o, groups, -1) * s[..., None]).reshape(o, -1).T
  return x @ np.asarray(dequant_int4(*(jnp.asarray(a) for a in w))).T


def bytes_of(tree) -> int:
  return sum(a.nbytes for a in jax.tree.leaves(tree))


def measure(n_in: int, n_out: int, formats=None, repeats: int = 20, batch: int = 1,
            qwix: bool = True, progress: Callable[[Timing], None] | None = None,
            use_native: bool | None = None, spill_bytes: int = 0) -> list[Timing]:
  """Times every formulation on one kernel shape (best of `repeats` calls).

  Args:
    n_in, n_out: the kernel's shape.
    formats: format labels to keep (None: all).
    repeats: timed calls per case; the best is kept.
    batch: rows of x (1: decode's matrix-vector product, x passed as [in]).
    qwix: include qwix's formulations.
    progress: called with each Timing as it is measured.
    use_native: time the native kernels too (None: when they are built and batch is 1).
    spill_bytes: cycle through enough copies of each case's weights to fill this many
      bytes, so that they are read from memory, not from a cache that holds one copy
      (0: one copy; a [4096 x 11008] float32 matrix fits a 260 MB L3).

  Returns:
    One Timing per case.
  """
  if use_native is None:
    use_native = batch == 1 and native.enabled()
  x = np.random.default_rng(1).standard_normal((batch, n_in), dtype=np.float32)
  xd = jax.device_put(x[0] if batch == 1 else x)
  results = []
  for case in cases(n_in, n_out, formats, qwix=qwix, use_native=use_native):
    fn = jax.jit(case.fn)
    y = np.asarray(fn(xd, *case.weights)).reshape(batch, n_out)
    ref = _reference(case, x)
    err = float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))
    nbytes = bytes_of(case.weights)
    copies = [case.weights] + [jax.tree.map(lambda a: a.copy(), case.weights)
                               for _ in range(-(-spill_bytes // nbytes) - 1)]
    best = float("inf")
    for i in range(repeats):
      weights = copies[i % len(copies)]
      t0 = time.perf_counter()
      fn(xd, *weights).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    del copies
    timing = Timing(case.format, case.name, (n_in, n_out), best, nbytes, nbytes / best / 1e9,
                    n_in * n_out / best / 1e9, err)
    if progress is not None:
      progress(timing)
    results.append(timing)
  return results
