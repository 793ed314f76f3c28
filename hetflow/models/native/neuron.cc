// hetflow's native CPU kernels of neuron_cluster's sparse step over quantized neuron
// records, as XLA FFI handlers (built into the same library as matvec.cc by
// hetflow/models/native/__init__.py; called from hetflow/sparsity/bundles.py).
//
// A block of n records is two planes of bytes (hetflow/sparsity/bundles.py, RecordCodec):
//   plane A [n, inputs * row]: per record its input rows (gate, up), each values then their
//     scales (and minimums) along hidden, as the model's stored kernel holds them:
//       kind 1 bfloat16   bf16 [D]
//       kind 2 int8       s8 [D], scale f32
//       kind 3 int8-gN    s8 [D], scale f16 [D / N]
//       kind 4 int4       u8 [D / 2] (per group of g: byte j = value j | value j + g/2 << 4),
//                         scale f16 [D / g]; value = (nibble - 8) * scale
//       kind 5 int4-asym  as int4, plus min f16 [D / g]; value = nibble * scale + min
//   plane B [n, b]: per record its down row's values: bf16 [D], s8 [D], or u8 [D / 2] with
//     byte k = value k | value k + D/2 << 4. The down kernel's scales (and minimums) are a
//     per-layer table, float32: [D] per output channel (int8: applied after the sum) or
//     [F / g, D] per group of g neurons and output channel (row group_of[j] for record j).
//
// neuron_in:   y[r, j * inputs + m] = row m of record j . x[r]       (a matrix-vector product)
// neuron_down: y[r, d] = sum_j z[r, j] * down_j[d]                    (an accumulate over rows;
//              records with z[., j] == 0 are skipped: they add exact zeros)
// Every product is accumulated in float32 from exactly widened values, so the results differ
// from the pure-XLA formulation (and from resident's kernels) only in the order of float32
// additions. The input products, and int4's down product, run on simd.h's 16 lanes (AVX-512
// or AVX2) where the compiler targets them, portable loops elsewhere. Work is split between
// the calling thread and XLA's intra-op pool by parallel.h (chunks claimed from an atomic
// counter: no task is ever waited for unstarted).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "simd.h"  // before parallel.h: it spins where HETFLOW_SIMD16 is defined
#include "parallel.h"

namespace {

ParallelStats g_stats;

inline uint16_t load16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

enum Kind : int64_t { kBf16 = 1, kInt8 = 2, kInt8G = 3, kInt4 = 4, kInt4Asym = 5 };

ffi::Error fail(const char* what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, what);
}

#if defined(HETFLOW_SIMD16)
inline __m128i bytes16(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// `row_dot` (below) on the 16-lane SIMD layer: the same products and per-lane sums, with
// fused multiply-adds, and a group's scale applied to its lane sums once. The compiler
// vectorized the portable loop at half the AVX2 width (WORKSPACE_NOTES.md, nineteenth session).
inline float row_dot_simd(int64_t kind, const uint8_t* row, const float* x, const float* xsum,
                          int64_t d, int64_t g) {
  f32x16 acc = v_zero();
  switch (kind) {
    case kBf16: {
      const uint16_t* q = reinterpret_cast<const uint16_t*>(row);
      for (int64_t k = 0; k < d; k += kLanes) acc = v_fmadd(v_bf16(q + k), v_load(x + k), acc);
      return v_sum(acc);
    }
    case kInt8: {
      for (int64_t k = 0; k < d; k += kLanes) {
        acc = v_fmadd(v_s8(bytes16(row + k)), v_load(x + k), acc);
      }
      float scale;
      std::memcpy(&scale, row + d, 4);
      return v_sum(acc) * scale;
    }
    case kInt8G: {
      const uint8_t* sc = row + d;
      for (int64_t G = 0; G < d / g; ++G) {
        f32x16 part = v_zero();
        for (int64_t k = G * g; k < (G + 1) * g; k += kLanes) {
          part = v_fmadd(v_s8(bytes16(row + k)), v_load(x + k), part);
        }
        acc = v_fmadd(part, v_set(half_to_float(load16(sc + 2 * G))), acc);
      }
      return v_sum(acc);
    }
    default: {  // int4, int4-asym: the "- 8" (or the minimum) applied to x's group sums
      const int64_t half = g / 2, groups = d / g;
      const uint8_t* sc = row + d / 2;
      const uint8_t* mn = sc + 2 * groups;
      const __m128i low = _mm_set1_epi8(0x0f);
      float extra = 0.f;
      for (int64_t G = 0; G < groups; ++G) {
        const uint8_t* p = row + G * half;
        const float* xg = x + G * g;
        f32x16 part = v_zero();
        for (int64_t k = 0; k < half; k += kLanes) {
          const __m128i b = bytes16(p + k);
          part = v_fmadd(v_u8(_mm_and_si128(b, low)), v_load(xg + k), part);
          part = v_fmadd(v_u8(_mm_and_si128(_mm_srli_epi16(b, 4), low)), v_load(xg + k + half),
                         part);
        }
        const float scale = half_to_float(load16(sc + 2 * G));
        acc = v_fmadd(part, v_set(scale), acc);
        extra += kind == kInt4 ? -8.f * xsum[G] * scale
                               : xsum[G] * half_to_float(load16(mn + 2 * G));
      }
      return v_sum(acc) + extra;
    }
  }
}
#endif  // HETFLOW_SIMD16

// One input row (its values, then scales/minimums) times x [d]; xsum [d / g]: x's group sums.
// d is a multiple of kLanes and of g; int4's g / 2 is a multiple of kLanes (g = 32 or 64).
inline float row_dot(int64_t kind, const uint8_t* row, const float* x, const float* xsum,
                     int64_t d, int64_t g) {
#if defined(HETFLOW_SIMD16)
  return row_dot_simd(kind, row, x, xsum, d, g);
#else
  float acc[kLanes] = {0.f};
  switch (kind) {
    case kBf16: {
      for (int64_t k = 0; k < d; k += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) {
          acc[l] += bf16_to_float(load16(row + 2 * (k + l))) * x[k + l];
        }
      }
      return lanes_sum(acc);
    }
    case kInt8: {
      const int8_t* q = reinterpret_cast<const int8_t*>(row);
      for (int64_t k = 0; k < d; k += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) acc[l] += static_cast<float>(q[k + l]) * x[k + l];
      }
      float scale;
      std::memcpy(&scale, row + d, 4);
      return lanes_sum(acc) * scale;
    }
    case kInt8G: {
      const int8_t* q = reinterpret_cast<const int8_t*>(row);
      const uint8_t* sc = row + d;
      for (int64_t G = 0; G < d / g; ++G) {
        const float scale = half_to_float(load16(sc + 2 * G));
        for (int64_t k = G * g; k < (G + 1) * g; k += kLanes) {
          for (int64_t l = 0; l < kLanes; ++l) {
            acc[l] += scale * (static_cast<float>(q[k + l]) * x[k + l]);
          }
        }
      }
      return lanes_sum(acc);
    }
    default: {  // int4, int4-asym: the "- 8" (or the minimum) applied to x's group sums
      const int64_t half = g / 2, groups = d / g;
      const uint8_t* sc = row + d / 2;
      const uint8_t* mn = sc + 2 * groups;
      float extra = 0.f;
      for (int64_t G = 0; G < groups; ++G) {
        const uint8_t* p = row + G * half;
        const float* xg = x + G * g;
        const float scale = half_to_float(load16(sc + 2 * G));
        for (int64_t k = 0; k < half; k += kLanes) {
          for (int64_t l = 0; l < kLanes; ++l) {
            const uint8_t b = p[k + l];
            acc[l] += scale * (static_cast<float>(b & 15) * xg[k + l] +
                               static_cast<float>(b >> 4) * xg[k + l + half]);
          }
        }
        extra += kind == kInt4 ? -8.f * xsum[G] * scale
                               : xsum[G] * half_to_float(load16(mn + 2 * G));
      }
      return lanes_sum(acc) + extra;
    }
  }
#endif
}

#if defined(HETFLOW_SIMD16)
// int4's down product on the 16-lane layer, bytes [k, k + 16 * T) of every record: outputs
// k... (low nibbles) and d/2 + k... (high), accumulated in registers over the records in
// record order, as the portable loop does. `lo_hi(j, k, lo, hi)`: record j's 16 values from
// byte k's low and high nibbles, times their scales (plus their minimums). The portable loop
// vectorizes poorly here (two nibbles, two accumulators in memory); bf16's and int8's do not,
// and were not faster on 16 lanes (WORKSPACE_NOTES.md, nineteenth session).
template <int T, typename LoHi>
inline void down_tiles_int4(const float* z, int64_t n, int64_t k, int64_t d, float* out,
                            LoHi lo_hi) {
  f32x16 lo[T], hi[T];
  for (int t = 0; t < T; ++t) lo[t] = hi[t] = v_zero();
  for (int64_t j = 0; j < n; ++j) {
    if (z[j] == 0.f) continue;  // adds exact zeros
    const f32x16 zj = v_set(z[j]);
    for (int t = 0; t < T; ++t) {
      f32x16 a, b;
      lo_hi(j, k + 16 * t, a, b);
      lo[t] = v_fmadd(zj, a, lo[t]);
      hi[t] = v_fmadd(zj, b, hi[t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    v_store(out + k + 16 * t, lo[t]);
    v_store(out + d / 2 + k + 16 * t, hi[t]);
  }
}

// One row's bytes [k0, k0 + w) of an int4 (or int4-asym) down product; false: w is no
// multiple of 16 (the portable loop does it).
inline bool down_int4_simd(bool asym, const float* z, int64_t n, const uint8_t* bp, int64_t row,
                           const float* sp, const float* mp, const int32_t* gp, int64_t d,
                           int64_t k0, int64_t w, float* out) {
  if (w % 16) return false;
  const __m128i low = _mm_set1_epi8(0x0f);
  const f32x16 eight = v_set(8.f);
  auto lo_hi = [=](int64_t j, int64_t k, f32x16& lo, f32x16& hi) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bp + j * row + k));
    const f32x16 nlo = v_u8(_mm_and_si128(b, low));
    const f32x16 nhi = v_u8(_mm_and_si128(_mm_srli_epi16(b, 4), low));
    const float* s = sp + static_cast<int64_t>(gp[j]) * d;
    if (asym) {
      const float* m = mp + static_cast<int64_t>(gp[j]) * d;
      lo = v_fmadd(nlo, v_load(s + k), v_load(m + k));
      hi = v_fmadd(nhi, v_load(s + d / 2 + k), v_load(m + d / 2 + k));
    } else {
      lo = v_mul(v_sub(nlo, eight), v_load(s + k));
      hi = v_mul(v_sub(nhi, eight), v_load(s + d / 2 + k));
    }
  };
  int64_t k = k0;
  for (; k + 32 <= k0 + w; k += 32) down_tiles_int4<2>(z, n, k, d, out, lo_hi);
  for (; k < k0 + w; k += 16) down_tiles_int4<1>(z, n, k, d, out, lo_hi);
  return true;
}
#endif  // HETFLOW_SIMD16

int64_t value_bytes(int64_t kind, int64_t d) {
  return kind == kBf16 ? 2 * d : (kind == kInt4 || kind == kInt4Asym) ? d / 2 : d;
}

int64_t param_bytes(int64_t kind, int64_t d, int64_t g) {
  switch (kind) {
    case kBf16: return 0;
    case kInt8: return 4;
    case kInt8G: case kInt4: return 2 * (d / g);
    default: return 4 * (d / g);
  }
}

ffi::Error NeuronInImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> a,
                        ffi::ResultBuffer<ffi::F32> y, int64_t kind, int64_t group,
                        int64_t inputs) {
  auto xd = x.dimensions(), ad = a.dimensions();
  if (xd.size() != 2 || ad.size() != 2 || kind < kBf16 || kind > kInt4Asym) {
    return fail("hetflow neuron_in: x [R, D], a [n, inputs * row] and a known kind expected");
  }
  const int64_t rows = xd[0], d = xd[1], n = ad[0];
  const int64_t g = (kind == kBf16 || kind == kInt8) ? d : group;
  if (g <= 0 || d % g || d % kLanes || (kind >= kInt4 && (g / 2) % kLanes)) {
    return fail("hetflow neuron_in: D must be a multiple of 16 and of the group (int4: 32, 64)");
  }
  const int64_t row = value_bytes(kind, d) + param_bytes(kind, d, g);
  if (ad[1] != inputs * row || y->element_count() != static_cast<size_t>(rows * n * inputs)) {
    return fail("hetflow neuron_in: a [n, inputs * row bytes], y [R, n * inputs] expected");
  }
  // x's group sums, once per call (int4's "- 8" and int4-asym's minimum).
  auto xsum = std::make_shared<std::vector<float>>(rows * (d / g), 0.f);
  const float* xp = x.typed_data();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < d; ++k) (*xsum)[r * (d / g) + k / g] += xp[r * d + k];
  }
  const uint8_t* ap = a.typed_data();
  float* yp = y->typed_data();
  const int64_t total = n * inputs;
  const int64_t tile = 16;
  const int64_t chunks = (total + tile - 1) / tile;
  parallel_for(pool, chunks, [=](int64_t c) {
    const int64_t end = std::min(total, (c + 1) * tile);
    for (int64_t i = c * tile; i < end; ++i) {
      const uint8_t* rp = ap + i * row;
      for (int64_t r = 0; r < rows; ++r) {
        yp[r * total + i] = row_dot(kind, rp, xp + r * d, xsum->data() + r * (d / g), d, g);
      }
    }
  }, g_stats);
  return ffi::Error::Success();
}

ffi::Error NeuronDownImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::U8> b,
                          ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> minimum,
                          ffi::Buffer<ffi::S32> group_of, ffi::ResultBuffer<ffi::F32> y,
                          int64_t kind) {
  auto zd = z.dimensions(), bd = b.dimensions(), yd = y->dimensions();
  if (zd.size() != 2 || bd.size() != 2 || yd.size() != 2 || zd[1] != bd[0] ||
      yd[0] != zd[0] || kind < kBf16 || kind > kInt4Asym) {
    return fail("hetflow neuron_down: z [R, n], b [n, row bytes], y [R, D] expected");
  }
  const int64_t rows = zd[0], n = zd[1], d = yd[1];
  if (bd[1] != value_bytes(kind, d) || group_of.element_count() != static_cast<size_t>(n)) {
    return fail("hetflow neuron_down: b's rows do not hold D values, or group_of is not [n]");
  }
  const bool grouped = kind == kInt8G || kind == kInt4 || kind == kInt4Asym;
  const int64_t table_rows = grouped ? static_cast<int64_t>(scale.element_count()) / d : 1;
  if ((kind != kBf16 && scale.element_count() != static_cast<size_t>(table_rows * d)) ||
      (kind == kInt4Asym && minimum.element_count() != scale.element_count())) {
    return fail("hetflow neuron_down: the down table must be [D] or [groups, D] float32");
  }
  const float* zp = z.typed_data();
  const uint8_t* bp = b.typed_data();
  const float* sp = scale.typed_data();
  const float* mp = minimum.typed_data();
  const int32_t* gp = group_of.typed_data();
  float* yp = y->typed_data();
  const int64_t row = bd[1];
  // Split along the outputs (int4: along the bytes; byte k feeds d = k and k + D/2): every
  // thread accumulates its own outputs over all records, in record order.
  const int64_t span = (kind == kInt4 || kind == kInt4Asym) ? d / 2 : d;
  const int64_t tile = 256;
  const int64_t chunks = (span + tile - 1) / tile;
  parallel_for(pool, chunks, [=](int64_t c) {
    const int64_t k0 = c * tile, k1 = std::min(span, k0 + tile), w = k1 - k0;
    for (int64_t r = 0; r < rows; ++r) {
      float* out = yp + r * d;
#if defined(HETFLOW_SIMD16)
      if ((kind == kInt4 || kind == kInt4Asym) &&
          down_int4_simd(kind == kInt4Asym, zp + r * n, n, bp, row, sp, mp, gp, d, k0, w, out)) {
        continue;
      }
#endif
      float acc[256], acc2[256];
      std::fill(acc, acc + w, 0.f);
      std::fill(acc2, acc2 + w, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float zj = zp[r * n + j];
        if (zj == 0.f) continue;  // adds exact zeros
        const uint8_t* p = bp + j * row;
        if (kind == kBf16) {
          for (int64_t k = 0; k < w; ++k) acc[k] += zj * bf16_to_float(load16(p + 2 * (k0 + k)));
        } else if (kind == kInt8) {
          const int8_t* q = reinterpret_cast<const int8_t*>(p) + k0;
          for (int64_t k = 0; k < w; ++k) acc[k] += zj * static_cast<float>(q[k]);
        } else if (kind == kInt8G) {
          const int8_t* q = reinterpret_cast<const int8_t*>(p) + k0;
          const float* s = sp + static_cast<int64_t>(gp[j]) * d + k0;
          for (int64_t k = 0; k < w; ++k) acc[k] += zj * (static_cast<float>(q[k]) * s[k]);
        } else {
          const uint8_t* q = p + k0;
          const float* s = sp + static_cast<int64_t>(gp[j]) * d;
          const float* s_lo = s + k0;
          const float* s_hi = s + d / 2 + k0;
          if (kind == kInt4) {
            for (int64_t k = 0; k < w; ++k) {
              acc[k] += zj * (static_cast<float>((q[k] & 15) - 8) * s_lo[k]);
              acc2[k] += zj * (static_cast<float>((q[k] >> 4) - 8) * s_hi[k]);
            }
          } else {
            const float* m = mp + static_cast<int64_t>(gp[j]) * d;
            const float* m_lo = m + k0;
            const float* m_hi = m + d / 2 + k0;
            for (int64_t k = 0; k < w; ++k) {
              acc[k] += zj * (static_cast<float>(q[k] & 15) * s_lo[k] + m_lo[k]);
              acc2[k] += zj * (static_cast<float>(q[k] >> 4) * s_hi[k] + m_hi[k]);
            }
          }
        }
      }
      if (kind == kInt8) {
        for (int64_t k = 0; k < w; ++k) out[k0 + k] = acc[k] * sp[k0 + k];
      } else {
        for (int64_t k = 0; k < w; ++k) out[k0 + k] = acc[k];
      }
      if (kind == kInt4 || kind == kInt4Asym) {
        for (int64_t k = 0; k < w; ++k) out[d / 2 + k0 + k] = acc2[k];
      }
    }
  }, g_stats);
  return ffi::Error::Success();
}

}  // namespace

extern "C" {

// Calls of the neuron kernels so far in this process (tests check which path ran).
int64_t hetflow_neuron_calls() { return g_stats.calls.load(); }

}  // extern "C"

XLA_FFI_DEFINE_HANDLER_SYMBOL(hetflow_neuron_in, NeuronInImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("inputs"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(hetflow_neuron_down, NeuronDownImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind"));
