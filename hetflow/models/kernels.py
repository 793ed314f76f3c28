"""Matrix-vector formulations of every weight format, and a probe that times them.

XLA's CPU `dot` is fast only for float32 with the kernel stored [in, out]; on
bfloat16, int8 and int4 kernels it runs 10-25x slower than float32 (see
`docs/formats.md`). Written as elementwise multiply + reduce over `in` with the
kernel stored [out, in], the same formats keep float32's weights per second, so
fewer bytes per weight are never slower. This module holds each formulation
that was measured, so the choice in `hetflow.models.formats` is reproducible
with `python -m experiments.kernels` (the probe: hetflow/bench/kernels.py).

On CPU, the one-row products that `hetflow.models.formats` asks for (`bfloat16_ew_t`,
`int8_channel_ew_t`, `int8_group_scan_gm`, `int4_scan_gm`, `int4_min_scan_gm`) run
hetflow's native C++ kernels through XLA's FFI (`hetflow.models.native`) when they are
built; the pure-XLA formulations (`*_xla`) are the fallback on other backends, without
a compiler, or with HETFLOW_NATIVE=0. The choice is made when a function is traced.

Conventions (shared with `hetflow.models.formats`): x is [..., in] (the matrix-vector
formulations take one row, x [in]: XLA CPU hands a 2-D multiply-reduce to a
YNNPACK fusion that is fast, and a 3-D one to the same fusion, 20-100x
slower); a float32 kernel is [in, out]; bfloat16 and per-channel int8 kernels
are stored [out, in] ("t" below, scales [out, 1]); grouped kernels are stored
group-major, [in / g, out, g] ("gm" below, scales [in / g, out]), and computed
group by group in a `lax.scan`, each step a 2-D multiply-reduce. int4 packs two
values per byte in GGUF's order: in each group of g, byte j holds value j in its
low nibble and value j + g/2 in its high nibble.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hetflow.models import native

# -- the formulations ----------------------------------------------------------------------


def _f32(x):
  return x.astype(jnp.float32)


def _grouped(x, groups: int):
  """x [..., in] -> [..., groups, in / groups]."""
  return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


def float32_dot(x, w):
  """x @ W, W [in, out]: XLA's dot (the float32 roof)."""
  return jnp.einsum("...i,io->...o", x, w)


def float32_dot_t(x, wt):
  """x @ Wt.T, Wt [out, in]."""
  return jnp.einsum("...i,oi->...o", x, wt)


def float32_ew_t(x, wt):
  """sum over `in` of Wt * x, Wt [out, in]."""
  return jnp.sum(wt * x[..., None, :], axis=-1)


def bfloat16_dot(x, w):
  """bf16 x @ bf16 W [in, out], accumulated in float32."""
  return jnp.einsum("...i,io->...o", x.astype(jnp.bfloat16), w,
                    preferred_element_type=jnp.float32)


def bfloat16_dot_up(x, w):
  """x @ float32(W), W [in, out]."""
  return jnp.einsum("...i,io->...o", _f32(x), _f32(w))


def bfloat16_ew_t_xla(x, wt):
  """sum over `in` of float32(Wt) * x, Wt [out, in]."""
  return jnp.sum(_f32(wt) * _f32(x)[..., None, :], axis=-1)


def bfloat16_ew(x, w):
  """sum over `in` of float32(W) * x, W [in, out] (reduce over rows)."""
  return jnp.sum(_f32(w) * _f32(x)[..., :, None], axis=-2)


def int8_channel_ew_t_xla(x, q, scale):
  """(sum over `in` of float32(q) * x) * scale; q [out, in], scale [out, 1]."""
  return jnp.sum(_f32(q) * _f32(x)[..., None, :], axis=-1) * scale[:, 0]


def int8_channel_dot_t(x, q, scale):
  """(x @ float32(q).T) * scale."""
  return jnp.einsum("...i,oi->...o", _f32(x), _f32(q)) * scale[:, 0]


def int8_channel_dot_int(x, q, scale):
  """x quantized per row to int8, int8 x int8 -> int32 dot, both scales after."""
  x = _f32(x)
  sx = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
  sx = jnp.where(sx == 0, 1.0, sx)
  xq = jnp.round(x / sx).astype(jnp.int8)
  acc = jnp.einsum("...i,oi->...o", xq, q, preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * sx * scale[:, 0]


def int8_group_ew_t(x, q, scale):
  """Per group: sum of float32(q) * x, times the group's scale, then summed."""
  o, groups = scale.shape
  part = jnp.sum(_f32(q).reshape(o, groups, -1) * _grouped(_f32(x), groups)[..., None, :, :],
                 axis=-1)  # [..., out, groups]
  return jnp.sum(part * _f32(scale), axis=-1)


def int8_group_dequant_ew_t(x, q, scale):
  """Dequantize (q * scale per group) first, then multiply and reduce."""
  o, groups = scale.shape
  w = (_f32(q).reshape(o, groups, -1) * _f32(scale)[..., None]).reshape(o, -1)
  return jnp.sum(w * _f32(x)[..., None, :], axis=-1)


def int8_group_scan_gm_xla(x, q, scale):
  """Group-major int8 [G, out, g]: a scan over groups, each a 2-D multiply-reduce, scale after."""
  groups, n_out, g = q.shape
  xg = _f32(x).reshape(groups, g)

  def step(acc, args):
    qg, xk, sg = args
    return acc + jnp.sum(_f32(qg) * xk, axis=-1) * _f32(sg), None

  return jax.lax.scan(step, jnp.zeros((n_out,), jnp.float32), (q, xg, scale))[0]


def int8_group_3d_gm(x, q, scale):
  """Group-major int8: one 3-D multiply-reduce over all groups, then the scales."""
  groups, _, g = q.shape
  part = jnp.sum(_f32(q) * _f32(x).reshape(groups, 1, g), axis=-1)  # [G, out]
  return jnp.sum(part * _f32(scale), axis=0)


def int4_scan_gm_xla(x, packed, scale):
  """Group-major symmetric int4 [G, out, g/2]: per group two sums (low, high nibbles),
  minus 8 * sum(x), times the scale."""
  groups, n_out, half = packed.shape
  xg = _f32(x).reshape(groups, 2 * half)

  def step(acc, args):
    pg, xk, sg = args
    v = (jnp.sum(_f32(pg & 15) * xk[:half], axis=-1)
         + jnp.sum(_f32(pg >> 4) * xk[half:], axis=-1))
    return acc + (v - 8.0 * jnp.sum(xk)) * _f32(sg), None

  return jax.lax.scan(step, jnp.zeros((n_out,), jnp.float32), (packed, xg, scale))[0]


def int4_min_scan_gm_xla(x, packed, scale, minimum):
  """Group-major asymmetric int4: per group (nibble sums) * scale + sum(x) * min."""
  groups, n_out, half = packed.shape
  xg = _f32(x).reshape(groups, 2 * half)

  def step(acc, args):
    pg, xk, sg, mg = args
    v = (jnp.sum(_f32(pg & 15) * xk[:half], axis=-1)
         + jnp.sum(_f32(pg >> 4) * xk[half:], axis=-1))
    return acc + v * _f32(sg) + jnp.sum(xk) * _f32(mg), None

  return jax.lax.scan(step, jnp.zeros((n_out,), jnp.float32),
                      (packed, xg, scale, minimum))[0]


# -- what hetflow.models.formats computes one row with ---------------------------------------
# On CPU, the native kernel of the format (hetflow/models/native: C++ through XLA's FFI,
# float32 accumulation, both cores) where it was built; elsewhere (another backend, no
# compiler, HETFLOW_NATIVE=0) the fastest XLA formulation above. Both give the same
# values up to the order of float32 additions (tests/test_native_kernels.py).


def _native_or_xla(fmt: str, xla, x, *leaves):
  if not native.accepts(fmt, x, *leaves) or not native.enabled():
    return xla(x, *leaves)
  return jax.lax.platform_dependent(x, *leaves, cpu=functools.partial(native.matvec, fmt),
                                    default=xla)


def float32_matvec(x, w):
  """One row x [in] @ float32 W [in, out]: native, else `float32_dot`."""
  return _native_or_xla("float32", float32_dot, x, w)


def bfloat16_ew_t(x, wt):
  """bfloat16 Wt [out, in] times one row x [in]: native, else `bfloat16_ew_t_xla`."""
  return _native_or_xla("bfloat16", bfloat16_ew_t_xla, x, wt)


def int8_channel_ew_t(x, q, scale):
  """Per-channel int8 times one row: native, else `int8_channel_ew_t_xla`."""
  return _native_or_xla("int8", int8_channel_ew_t_xla, x, q, scale)


def int8_group_scan_gm(x, q, scale):
  """Group-major int8 times one row: native, else `int8_group_scan_gm_xla`."""
  return _native_or_xla("int8-g", int8_group_scan_gm_xla, x, q, scale)


def int4_scan_gm(x, packed, scale):
  """Group-major symmetric int4 times one row: native, else `int4_scan_gm_xla`."""
  return _native_or_xla("int4", int4_scan_gm_xla, x, packed, scale)


def int4_min_scan_gm(x, packed, scale, minimum):
  """Group-major asymmetric int4 times one row: native, else `int4_min_scan_gm_xla`."""
  return _native_or_xla("int4-asym", int4_min_scan_gm_xla, x, packed, scale, minimum)


def group_major(q, scale, minimum=None):
  """Row-major [out, in or in/2] values and [out, G] scales -> group-major ([G, out, .], [G, out])."""
  n_out, groups = scale.shape
  q = jnp.swapaxes(q.reshape(n_out, groups, -1), 0, 1)
  out = (q, scale.T) if minimum is None else (q, scale.T, minimum.T)
  return tuple(jnp.asarray(a).copy() for a in out)


def _nibbles(packed):
  """uint8 [out, in / 2] -> (low, high) nibbles as float32, each [out, in / 2]."""
  return _f32(packed & 15), _f32(packed >> 4)


def _int4_parts(x, packed, groups):
  """Per group: sum of nibble * x, and the sum of x ([..., out, groups], [..., groups])."""
  o = packed.shape[0]
  lo, hi = _nibbles(packed)
  xg = _grouped(_f32(x), groups)  # [..., groups, g]
  half = xg.shape[-1] // 2
  x_lo, x_hi = xg[..., :half], xg[..., half:]
  lo = lo.reshape(o, groups, half)
  hi = hi.reshape(o, groups, half)
  part = jnp.sum(lo * x_lo[..., None, :, :] + hi * x_hi[..., None, :, :], axis=-1)
  return part, jnp.sum(xg, axis=-1)


def int4_ew_t(x, packed, scale):
  """Symmetric int4 (Q4_0): value = (nibble - 8) * scale, the 8 and scale after the sums."""
  part, xsum = _int4_parts(x, packed, scale.shape[1])
  return jnp.sum((part - 8.0 * xsum[..., None, :]) * _f32(scale), axis=-1)


def int4_signed_ew_t(x, packed, scale):
  """Symmetric int4: nibbles made signed (- 8) before the multiply; scale after."""
  o, groups = scale.shape
  lo, hi = _nibbles(packed)
  xg = _grouped(_f32(x), groups)
  half = xg.shape[-1] // 2
  lo = (lo - 8.0).reshape(o, groups, half)
  hi = (hi - 8.0).reshape(o, groups, half)
  part = jnp.sum(lo * xg[..., None, :, :half] + hi * xg[..., None, :, half:], axis=-1)
  return jnp.sum(part * _f32(scale), axis=-1)


def int4_dequant_ew_t(x, packed, scale):
  """Dequantize to float32 [out, in] first, then multiply and reduce."""
  return float32_ew_t(x, dequant_int4(packed, scale))


def int4_min_ew_t(x, packed, scale, minimum):
  """Asymmetric int4 (Q4_1): value = nibble * scale + min, both applied after the sums."""
  part, xsum = _int4_parts(x, packed, scale.shape[1])
  return jnp.sum(part * _f32(scale) + xsum[..., None, :] * _f32(minimum), axis=-1)


def dequant_int4(packed, scale, minimum=None):
  """int4 kernel -> float32 [out, in]."""
  o, groups = scale.shape
  lo, hi = _nibbles(packed)
  half = packed.shape[1] // groups
  vals = jnp.concatenate([lo.reshape(o, groups, half), hi.reshape(o, groups, half)], axis=-1)
  if minimum is None:
    return ((vals - 8.0) * _f32(scale)[..., None]).reshape(o, -1)
  return (vals * _f32(scale)[..., None] + _f32(minimum)[..., None]).reshape(o, -1)
