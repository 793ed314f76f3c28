// hetflow's native CPU matrix-vector kernels for its stored weight formats, as XLA FFI
// handlers (hetflow/models/native/__init__.py builds, loads and registers them).
//
// One row x [in] (float32) times a stored kernel -> y [out] (float32). The layouts are
// hetflow/models/formats.py's:
//   float32    w f32 [in, out]                                  (XLA's layout for x @ W)
//   bfloat16   q bf16 [out, in]
//   int8       q s8 [out, in], scale f32 [out, 1]              (per output channel)
//   int8-gN    q s8 [G, out, g], scale f16 [G, out]            (group-major, G = in / g)
//   int4       q u8 [G, out, g/2], scale f16 [G, out]          value = (nibble - 8) * scale
//   int4-asym  as int4, plus min f16 [G, out]                  value = nibble * scale + min
// int4 packs two values per byte: in each group, byte j holds value j in its low nibble and
// value j + g/2 in its high nibble (GGUF's block order).
//
// Every product is accumulated in float32 (the weights are widened exactly, the
// activations are not quantized): the result differs from the pure-XLA formulations only
// in the order of the float32 additions. Rows are split between the calling thread and
// XLA's intra-op thread pool; chunks of rows are claimed from an atomic counter, so the
// caller never waits for a task that has not started (no deadlock when the pool is busy or
// runs tasks inline).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "simd.h"  // before parallel.h: it spins where HETFLOW_SIMD16 is defined
#include "parallel.h"

namespace {

ParallelStats g_stats;

// Tiles of `tile` rows, grouped into chunks of about 1/8 of a thread's share.
template <typename F>
void for_row_tiles(ffi::ThreadPool& pool, int64_t out, int64_t tile, F tile_fn) {
  int64_t tiles = (out + tile - 1) / tile;
  int64_t per_chunk = std::max<int64_t>(1, tiles / 16);
  int64_t chunks = (tiles + per_chunk - 1) / per_chunk;
  parallel_for(pool, chunks, [=](int64_t c) {
    int64_t end = std::min(tiles, (c + 1) * per_chunk);
    for (int64_t t = c * per_chunk; t < end; ++t) {
      int64_t o0 = t * tile;
      tile_fn(o0, std::min(tile, out - o0));
    }
  }, g_stats);
}

// -- the portable kernels' lanes ------------------------------------------------------------
// Without simd.h's 16 lanes (ARM, say, or HETFLOW_NO_SIMD), the kernels are C++ loops that
// -O3 vectorizes for the machine's own SIMD width: each of kLanes accumulators sums its own
// products (no reassociation, so no -ffast-math), and the lanes are summed once per row. One
// scalar accumulator per row, as the loops had before, kept them scalar (on an AVX2 machine,
// which compiled them then: 2-3x slower than XLA's own formulations; WORKSPACE_NOTES.md,
// nineteenth session).

template <typename T>
inline float widen(T v) {
  if constexpr (sizeof(T) == 2) return bf16_to_float(v);
  else return static_cast<float>(v);
}

// y[r] = sum_k w[r, k] x[k] for R rows of a [., n] matrix (n any length: a scalar tail).
template <typename T, int R>
void rows_lanes(const T* w, int64_t n, const float* x, float* y) {
  float acc[R][kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int r = 0; r < R; ++r) {
      const T* p = w + r * n + k;
      for (int l = 0; l < kLanes; ++l) acc[r][l] += widen(p[l]) * x[k + l];
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = lanes_sum(acc[r]);
    for (int64_t j = k; j < n; ++j) s += widen(w[r * n + j]) * x[j];
    y[r] = s;
  }
}

// -- row-major kernels: bfloat16, int8 per channel ------------------------------------------

constexpr int kRowTile = 4;

// y[r] = sum_k w[r, k] x[k] for `rows` rows of a [., n] matrix; T is uint16_t (bf16) or int8_t.
template <typename T>
void rows_dot(const T* w, int64_t n, const float* x, int64_t rows, float* y) {
#if defined(HETFLOW_SIMD16)
  if (rows == kRowTile) {
    // One accumulator per row: two were 16 of AVX2's 16 registers, and spilled. Each row
    // prefetches the next tile's bytes at its own offset: a row is only n elements (2-11 KB),
    // too short for the hardware's stream prefetcher to get ahead, and this doubled the rate
    // from DRAM on AVX2 (int8: 7 to 15 G weights/s; WORKSPACE_NOTES.md, twentieth session).
    f32x16 acc[kRowTile];
    for (int r = 0; r < kRowTile; ++r) acc[r] = v_zero();
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
      f32x16 x0 = v_load(x + k), x1 = v_load(x + k + 16);
      for (int r = 0; r < kRowTile; ++r) {
        const T* p = w + r * n + k;
        prefetch(p + kRowTile * n, 32 * sizeof(T));
        f32x16 w0, w1;
        if constexpr (sizeof(T) == 2) {
          w0 = v_bf16(p);
          w1 = v_bf16(p + 16);
        } else {
          w0 = v_s8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
          w1 = v_s8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
        }
        acc[r] = v_fmadd(w1, x1, v_fmadd(w0, x0, acc[r]));
      }
    }
    for (int r = 0; r < kRowTile; ++r) {
      float s = v_sum(acc[r]);
      for (int64_t j = k; j < n; ++j) s += widen(w[r * n + j]) * x[j];
      y[r] = s;
    }
    return;
  }
#endif
  if (rows == kRowTile) return rows_lanes<T, kRowTile>(w, n, x, y);
  for (int64_t r = 0; r < rows; ++r) rows_lanes<T, 1>(w + r * n, n, x, y + r);
}

// -- float32 [in, out] --------------------------------------------------------------------
// y = x @ W with W stored [in, out], as XLA's dot reads it: its input rows are split into
// kF32Chunks fixed chunks (by `in` alone, so every output's order of additions is the same
// whatever the output count: a column block of W gives the same values as the whole, output
// for output). A chunk streams 4 rows at a time, each contiguous for the whole output width
// (the hardware prefetcher's best case), into its own partial y; the partials are summed in
// chunk order. XLA's dot read the same matrices at 11-17 GB/s from DRAM on AVX2
// (WORKSPACE_NOTES.md, twentieth session).

constexpr int64_t kF32Chunks = 16;

// a * b + c: fused where the SIMD lanes are (their tail must round as they do), else as the
// compiler likes (one loop computes every output there; std::fma without FMA is a libm call).
inline float madd(float a, float b, float c) {
#if defined(HETFLOW_SIMD16)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// part[o] += sum over rows i in [i0, i1) of x[i] w[i, o], in row order.
void f32_rows(const float* w, int64_t out, const float* x, int64_t i0, int64_t i1, float* part) {
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) {
    const float* r0 = w + i * out;
    const float* r1 = r0 + out;
    const float* r2 = r1 + out;
    const float* r3 = r2 + out;
    int64_t o = 0;
#if defined(HETFLOW_SIMD16)
    const f32x16 x0 = v_set(x[i]), x1 = v_set(x[i + 1]), x2 = v_set(x[i + 2]),
                 x3 = v_set(x[i + 3]);
    for (; o + 16 <= out; o += 16) {
      f32x16 acc = v_load(part + o);
      acc = v_fmadd(v_load(r0 + o), x0, acc);
      acc = v_fmadd(v_load(r1 + o), x1, acc);
      acc = v_fmadd(v_load(r2 + o), x2, acc);
      acc = v_fmadd(v_load(r3 + o), x3, acc);
      v_store(part + o, acc);
    }
#endif
    for (; o < out; ++o) {
      float acc = part[o];
      acc = madd(r0[o], x[i], acc);
      acc = madd(r1[o], x[i + 1], acc);
      acc = madd(r2[o], x[i + 2], acc);
      part[o] = madd(r3[o], x[i + 3], acc);
    }
  }
  for (; i < i1; ++i) {
    const float* r = w + i * out;
    for (int64_t o = 0; o < out; ++o) part[o] = madd(r[o], x[i], part[o]);
  }
}

void f32_matvec(ffi::ThreadPool& pool, const float* w, int64_t in, int64_t out, const float* x,
                float* y) {
  const int64_t per_chunk = std::max<int64_t>(4, ((in + kF32Chunks - 1) / kF32Chunks + 3) / 4 * 4);
  const int64_t chunks = (in + per_chunk - 1) / per_chunk;
  std::vector<float> parts(chunks * out, 0.f);
  float* pp = parts.data();
  parallel_for(pool, chunks, [=](int64_t c) {
    f32_rows(w, out, x, c * per_chunk, std::min(in, (c + 1) * per_chunk), pp + c * out);
  }, g_stats);
  std::copy(pp, pp + out, y);
  for (int64_t c = 1; c < chunks; ++c) {
    for (int64_t o = 0; o < out; ++o) y[o] += pp[c * out + o];
  }
}

// -- group-major kernels: int8-gN, int4 (symmetric, asymmetric) -----------------------------

constexpr int kGroupTile = 16;
constexpr int kPrefetchGroups = 4;

struct Grouped {
  const void* q;           // [G, out, bytes_per_group]
  const uint16_t* scale;   // f16 [G, out]
  const uint16_t* minimum; // f16 [G, out] or null
  const float* x;          // [G * g]
  int64_t groups, out, g;
  float* y;                // [out]
};

#if defined(HETFLOW_SIMD16)
inline void load_params(const uint16_t* p, int rows, float* dst) {
  if (rows == kGroupTile) {
    v_store(dst, v_f16(p));
  } else {
    for (int r = 0; r < rows; ++r) dst[r] = _cvtsh_ss(p[r]);
  }
}

inline f32x16 int8x16(const int8_t* p) {
  return v_s8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Rows [o0, o0 + R) of an int8-gG kernel (R = kGroupTile, or any R <= kGroupTile for the last
// tile); per group and row, a 16-lane partial sum times the row's scale joins the row's
// accumulator, reduced across lanes once at the end.
template <int G, int R>
void int8g_tile(const Grouped& a, int64_t o0) {
  constexpr int V = G / 16;
  const int8_t* q = static_cast<const int8_t*>(a.q);
  f32x16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = v_zero();
  alignas(64) float s[kGroupTile];
  for (int64_t k = 0; k < a.groups; ++k) {
    const int8_t* base = q + (k * a.out + o0) * G;
    if (k + kPrefetchGroups < a.groups) {
      prefetch(base + kPrefetchGroups * a.out * G, R * G);
    }
    load_params(a.scale + k * a.out + o0, R, s);
    f32x16 xv[V];
    for (int v = 0; v < V; ++v) xv[v] = v_load(a.x + k * G + 16 * v);
    for (int r = 0; r < R; ++r) {
      const int8_t* p = base + r * G;
      f32x16 t = v_mul(int8x16(p), xv[0]);
      for (int v = 1; v < V; ++v) t = v_fmadd(int8x16(p + 16 * v), xv[v], t);
      acc[r] = v_fmadd(t, v_set(s[r]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) a.y[o0 + r] = v_sum(acc[r]);
}

// int4: per 16 bytes, the low nibbles are 16 values and the high nibbles the 16 values g/2
// further on. Symmetric: sum((n - 8) x) = sum(n x) - 8 sum(x), the second term folded into
// the first multiply (fmsub with 8 * the group's x, lane by lane). Asymmetric: the minimum
// times the group's x joins the accumulator after the scaled sum.
template <int G, int R, bool kAsym>
void int4_tile(const Grouped& a, int64_t o0) {
  constexpr int H = G / 32;  // 16-byte pieces per row and group
  const uint8_t* q = static_cast<const uint8_t*>(a.q);
  const __m128i low = _mm_set1_epi8(0x0f);
  f32x16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = v_zero();
  alignas(64) float s[kGroupTile];
  alignas(64) float m[kGroupTile];
  for (int64_t k = 0; k < a.groups; ++k) {
    const uint8_t* base = q + (k * a.out + o0) * (G / 2);
    if (k + kPrefetchGroups < a.groups) {
      prefetch(base + kPrefetchGroups * a.out * (G / 2), R * (G / 2));
    }
    load_params(a.scale + k * a.out + o0, R, s);
    if constexpr (kAsym) load_params(a.minimum + k * a.out + o0, R, m);
    const float* xg = a.x + k * G;
    f32x16 xlo[H], xhi[H];
    f32x16 xsum = v_zero();
    for (int h = 0; h < H; ++h) {
      xlo[h] = v_load(xg + 16 * h);
      xhi[h] = v_load(xg + G / 2 + 16 * h);
      xsum = v_add(xsum, v_add(xlo[h], xhi[h]));
    }
    const f32x16 x8 = v_mul(xsum, v_set(8.f));
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = base + r * (G / 2);
      f32x16 t;
      for (int h = 0; h < H; ++h) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h));
        f32x16 wlo = v_u8(_mm_and_si128(b, low));
        f32x16 whi = v_u8(_mm_and_si128(_mm_srli_epi16(b, 4), low));
        if (h == 0) {
          t = kAsym ? v_mul(wlo, xlo[0]) : v_fmsub(wlo, xlo[0], x8);
        } else {
          t = v_fmadd(wlo, xlo[h], t);
        }
        t = v_fmadd(whi, xhi[h], t);
      }
      acc[r] = v_fmadd(t, v_set(s[r]), acc[r]);
      if constexpr (kAsym) acc[r] = v_fmadd(v_set(m[r]), xsum, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) a.y[o0 + r] = v_sum(acc[r]);
}

// Calls Tile<R> for the tile's row count R (a full tile, or the last, shorter one).
template <template <int> class Tile, int R = kGroupTile>
void dispatch_rows(const Grouped& a, int64_t o0, int64_t rows) {
  if constexpr (R >= 1) {
    if (rows == R) {
      Tile<R>::run(a, o0);
    } else {
      dispatch_rows<Tile, R - 1>(a, o0, rows);
    }
  }
}

template <int G> struct Int8G { template <int R> struct T { static void run(const Grouped& a, int64_t o0) { int8g_tile<G, R>(a, o0); } }; };
template <int G, bool A> struct Int4 { template <int R> struct T { static void run(const Grouped& a, int64_t o0) { int4_tile<G, R, A>(a, o0); } }; };
#endif  // HETFLOW_SIMD16

// The portable grouped kernels (what a compiler without AVX2 or AVX-512 builds, and what
// HETFLOW_NO_SIMD builds for the tests): R rows at a time, per group one contiguous [R, g]
// piece of the group-major layout; each row's lane partial sums times its scale join the
// row's lane accumulators. int4: lane l sums value j (low nibble) and value j + g/2 (high) for
// j = l, l + kLanes, ...; x's lane sums carry the symmetric `- 8` and the asymmetric minimum.
// Needs g a multiple of kLanes (int8) or of 2 * kLanes (int4): every stored format's group.
template <int R, bool kInt4, bool kAsym>
void grouped_lanes(const Grouped& a, int64_t o0) {
  const int64_t g = a.g, bytes = kInt4 ? g / 2 : g;
  float acc[R][kLanes] = {};
  for (int64_t k = 0; k < a.groups; ++k) {
    const float* xg = a.x + k * g;
    const uint8_t* base = static_cast<const uint8_t*>(a.q) + (k * a.out + o0) * bytes;
    const uint16_t* sk = a.scale + k * a.out + o0;
    if (k + kPrefetchGroups < a.groups) {  // the stride between groups defeats the hardware's
      prefetch(base + kPrefetchGroups * a.out * bytes, R * bytes);
    }
    float xl[kLanes] = {};  // int4: x's lane sums (each lane's values, low and high)
    if constexpr (kInt4) {
      for (int64_t j = 0; j < g / 2; j += kLanes) {
        for (int l = 0; l < kLanes; ++l) xl[l] += xg[j + l] + xg[g / 2 + j + l];
      }
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = base + r * bytes;
      float part[kLanes] = {};
      if constexpr (kInt4) {
        for (int64_t j = 0; j < g / 2; j += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            part[l] += static_cast<float>(p[j + l] & 15) * xg[j + l] +
                       static_cast<float>(p[j + l] >> 4) * xg[g / 2 + j + l];
          }
        }
      } else {
        const int8_t* q = reinterpret_cast<const int8_t*>(p);
        for (int64_t j = 0; j < g; j += kLanes) {
          for (int l = 0; l < kLanes; ++l) part[l] += static_cast<float>(q[j + l]) * xg[j + l];
        }
      }
      const float scale = half_to_float(sk[r]);
      if constexpr (kAsym) {
        const float minimum = half_to_float(a.minimum[k * a.out + o0 + r]);
        for (int l = 0; l < kLanes; ++l) acc[r][l] += part[l] * scale + xl[l] * minimum;
      } else if constexpr (kInt4) {
        for (int l = 0; l < kLanes; ++l) acc[r][l] += (part[l] - 8.f * xl[l]) * scale;
      } else {
        for (int l = 0; l < kLanes; ++l) acc[r][l] += part[l] * scale;
      }
    }
  }
  for (int r = 0; r < R; ++r) a.y[o0 + r] = lanes_sum(acc[r]);
}

template <bool kInt4, bool kAsym>
void grouped_portable(const Grouped& a, int64_t o0, int64_t rows) {
  if (rows == kGroupTile) return grouped_lanes<kGroupTile, kInt4, kAsym>(a, o0);
  for (int64_t r = 0; r < rows; ++r) grouped_lanes<1, kInt4, kAsym>(a, o0 + r);
}

// Any group size, one product at a time (a grouped layout of another group size).
void grouped_generic(const Grouped& a, int64_t o0, int64_t rows, bool int4, bool asym) {
  for (int64_t r = 0; r < rows; ++r) {
    int64_t o = o0 + r;
    float acc = 0.f;
    for (int64_t k = 0; k < a.groups; ++k) {
      const float* xg = a.x + k * a.g;
      float part = 0.f;
      if (!int4) {
        const int8_t* p = static_cast<const int8_t*>(a.q) + (k * a.out + o) * a.g;
        for (int64_t j = 0; j < a.g; ++j) part += static_cast<float>(p[j]) * xg[j];
      } else {
        int64_t half = a.g / 2;
        const uint8_t* p = static_cast<const uint8_t*>(a.q) + (k * a.out + o) * half;
        float xs = 0.f;
        for (int64_t j = 0; j < half; ++j) {
          part += static_cast<float>(p[j] & 15) * xg[j] + static_cast<float>(p[j] >> 4) * xg[j + half];
          xs += xg[j] + xg[j + half];
        }
        if (!asym) part -= 8.f * xs;
        acc += part * half_to_float(a.scale[k * a.out + o]);
        if (asym) acc += xs * half_to_float(a.minimum[k * a.out + o]);
        continue;
      }
      acc += part * half_to_float(a.scale[k * a.out + o]);
    }
    a.y[o] = acc;
  }
}

void grouped(ffi::ThreadPool& pool, const Grouped& a, bool int4, bool asym) {
  for_row_tiles(pool, a.out, kGroupTile, [a, int4, asym](int64_t o0, int64_t rows) {
#if defined(HETFLOW_SIMD16)
    if (!int4 && a.g == 32) return dispatch_rows<Int8G<32>::T>(a, o0, rows);
    if (!int4 && a.g == 64) return dispatch_rows<Int8G<64>::T>(a, o0, rows);
    if (!int4 && a.g == 128) return dispatch_rows<Int8G<128>::T>(a, o0, rows);
    if (int4 && !asym && a.g == 32) return dispatch_rows<Int4<32, false>::T>(a, o0, rows);
    if (int4 && !asym && a.g == 64) return dispatch_rows<Int4<64, false>::T>(a, o0, rows);
    if (int4 && asym && a.g == 32) return dispatch_rows<Int4<32, true>::T>(a, o0, rows);
    if (int4 && asym && a.g == 64) return dispatch_rows<Int4<64, true>::T>(a, o0, rows);
#endif
    if (a.g % (2 * kLanes) == 0) {
      if (!int4) return grouped_portable<false, false>(a, o0, rows);
      if (!asym) return grouped_portable<true, false>(a, o0, rows);
      return grouped_portable<true, true>(a, o0, rows);
    }
    grouped_generic(a, o0, rows, int4, asym);
  });
}

// -- the FFI handlers ------------------------------------------------------------------------

ffi::Error check(bool ok, const char* what) {
  return ok ? ffi::Error::Success() : ffi::Error::InvalidArgument(what);
}

template <ffi::DataType D, typename T>
ffi::Error RowMajor(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<D> q,
                    ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, bool scaled) {
  auto qd = q.dimensions();
  if (qd.size() != 2 || x.element_count() != static_cast<size_t>(qd[1]) ||
      y->element_count() != static_cast<size_t>(qd[0]) ||
      (scaled && scale.element_count() != static_cast<size_t>(qd[0]))) {
    return check(false, "hetflow matvec: x [in], q [out, in], scale [out, 1], y [out] expected");
  }
  const int64_t out = qd[0], n = qd[1];
  const T* w = reinterpret_cast<const T*>(q.typed_data());
  const float* xp = x.typed_data();
  const float* sp = scaled ? scale.typed_data() : nullptr;
  float* yp = y->typed_data();
  for_row_tiles(pool, out, kRowTile, [=](int64_t o0, int64_t rows) {
    rows_dot<T>(w + o0 * n, n, xp, rows, yp + o0);
    if (sp) for (int64_t r = 0; r < rows; ++r) yp[o0 + r] *= sp[o0 + r];
  });
  return ffi::Error::Success();
}

ffi::Error F32Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 2 || x.element_count() != static_cast<size_t>(wd[0]) ||
      y->element_count() != static_cast<size_t>(wd[1])) {
    return check(false, "hetflow matvec: float32 x [in], w [in, out], y [out] expected");
  }
  f32_matvec(pool, w.typed_data(), wd[0], wd[1], x.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

ffi::Error Bf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> q,
                    ffi::ResultBuffer<ffi::F32> y) {
  return RowMajor<ffi::BF16, uint16_t>(pool, x, q, ffi::Buffer<ffi::F32>(x), y, false);
}

ffi::Error Int8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                    ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  return RowMajor<ffi::S8, int8_t>(pool, x, q, scale, y, true);
}

template <ffi::DataType D>
ffi::Error GroupedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<D> q,
                       ffi::Buffer<ffi::F16> scale, const uint16_t* minimum,
                       ffi::ResultBuffer<ffi::F32> y, bool int4, bool asym) {
  auto qd = q.dimensions();
  if (qd.size() != 3) return check(false, "hetflow matvec: grouped q [G, out, b] expected");
  const int64_t groups = qd[0], out = qd[1], g = int4 ? 2 * qd[2] : qd[2];
  auto sd = scale.dimensions();
  if (sd.size() != 2 || sd[0] != groups || sd[1] != out ||
      x.element_count() != static_cast<size_t>(groups * g) ||
      y->element_count() != static_cast<size_t>(out)) {
    return check(false, "hetflow matvec: x [G * g], scale [G, out], y [out] expected");
  }
  Grouped a{q.untyped_data(), reinterpret_cast<const uint16_t*>(scale.untyped_data()), minimum,
            x.typed_data(), groups, out, g, y->typed_data()};
  grouped(pool, a, int4, asym);
  return ffi::Error::Success();
}

ffi::Error Int8GImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                     ffi::Buffer<ffi::F16> scale, ffi::ResultBuffer<ffi::F32> y) {
  return GroupedImpl<ffi::S8>(pool, x, q, scale, nullptr, y, false, false);
}

ffi::Error Int4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                    ffi::Buffer<ffi::F16> scale, ffi::ResultBuffer<ffi::F32> y) {
  return GroupedImpl<ffi::U8>(pool, x, q, scale, nullptr, y, true, false);
}

ffi::Error Int4AsymImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                        ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> minimum,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto md = minimum.dimensions(), sd = scale.dimensions();
  if (md.size() != sd.size() || minimum.element_count() != scale.element_count()) {
    return check(false, "hetflow matvec: min must have scale's shape [G, out]");
  }
  return GroupedImpl<ffi::U8>(pool, x, q, scale,
                              reinterpret_cast<const uint16_t*>(minimum.untyped_data()), y, true,
                              true);
}

}  // namespace

extern "C" {

// Which code the library was built with: 512 AVX-512, 256 AVX2, 0 portable.
int hetflow_native_simd() {
#if defined(HETFLOW_AVX512)
  return 512;
#elif defined(HETFLOW_AVX2)
  return 256;
#else
  return 0;
#endif
}

// Threads that computed rows in the last call (1: the caller alone).
int hetflow_native_last_workers() { return g_stats.last_workers.load(); }

// Calls of any kernel so far in this process (tests and benchmarks check which path ran).
int64_t hetflow_native_calls() { return g_stats.calls.load(); }

// Threads XLA's pool offers a call, from the last call (0 before any).
int hetflow_native_pool_threads() { return g_stats.pool_threads.load(); }

}  // extern "C"

XLA_FFI_DEFINE_HANDLER_SYMBOL(hetflow_matvec_f32, F32Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(hetflow_matvec_bf16, Bf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(hetflow_matvec_int8, Int8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(hetflow_matvec_int8g, Int8GImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(hetflow_matvec_int4, Int4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(hetflow_matvec_int4_asym, Int4AsymImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
