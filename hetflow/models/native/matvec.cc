// hetflow's native CPU matrix-vector kernels for its stored weight formats, as XLA FFI
// handlers (hetflow/models/native/__init__.py builds, loads and registers them).
//
// One row x [in] (float32) times a stored kernel -> y [out] (float32). The layouts are
// hetflow/models/formats.py's:
//   bfloat16   q bf16 [out, in]
//   int8       q s8 [out, in], scale f32 [out, 1]              (per output channel)
//   int8-gN    q s8 [G, out, g], scale f16 [G, out]            (group-major, G = in / g)
//   int4       q u8 [G, out, g/2], scale f16 [G, out]          value = (nibble - 8) * scale
//   int4-asym  as int4, plus min f16 [G, out]                  value = nibble * scale + min
// int4 packs two values per byte: in each group, byte j holds value j in its low nibble and
// value j + g/2 in its high nibble (GGUF's block order).
//
// Every product is accumulated in float32 (the weights are widened exactly; the activations
// are not quantized, except int4's int8 activations, the same in the pure-XLA formulations:
// see int4_activations): the result differs from the pure-XLA formulations only in the
// order of the float32 additions. Rows are split between the calling thread and XLA's
// intra-op thread pool (common.h, parallel_for).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#include "common.h"

namespace ffi = xla::ffi;

namespace {

using hetflow::bf16_to_float;
using hetflow::half_to_float;

// Calls of any matvec kernel so far in this process.
std::atomic<int64_t> g_calls{0};

template <typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t chunks, Body body) {
  hetflow::parallel_for(pool, chunks, std::move(body), g_calls);
}

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
  });
}

// -- row-major kernels: bfloat16, int8 per channel ------------------------------------------

constexpr int kRowTile = 4;

// y[r] = sum_k w[r, k] x[k] for `rows` rows of a [., n] matrix; T is uint16_t (bf16) or int8_t.
template <typename T>
void rows_dot(const T* w, int64_t n, const float* x, int64_t rows, float* y) {
#if defined(HETFLOW_AVX512)
  if (rows == kRowTile) {
    __m512 acc[kRowTile][2];
    for (int r = 0; r < kRowTile; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
      __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
      for (int r = 0; r < kRowTile; ++r) {
        const T* p = w + r * n + k;
        __m512 w0, w1;
        if constexpr (sizeof(T) == 2) {
          w0 = _mm512_castsi512_ps(_mm512_slli_epi32(
              _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
          w1 = _mm512_castsi512_ps(_mm512_slli_epi32(
              _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16))),
              16));
        } else {
          w0 = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
          w1 = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
        }
        acc[r][0] = _mm512_fmadd_ps(w0, x0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(w1, x1, acc[r][1]);
      }
    }
    for (int r = 0; r < kRowTile; ++r) {
      float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
      for (int64_t j = k; j < n; ++j) {
        float v;
        if constexpr (sizeof(T) == 2) v = bf16_to_float(w[r * n + j]);
        else v = static_cast<float>(w[r * n + j]);
        s += v * x[j];
      }
      y[r] = s;
    }
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    float s = 0.f;
    const T* p = w + r * n;
    for (int64_t j = 0; j < n; ++j) {
      float v;
      if constexpr (sizeof(T) == 2) v = bf16_to_float(p[j]);
      else v = static_cast<float>(p[j]);
      s += v * x[j];
    }
    y[r] = s;
  }
}

// -- float32 [in, out] -----------------------------------------------------------------------

// y = x @ W for W [in, out] row-major (the float32 layout). W is read as it lies: blocks of
// kF32BlockRows rows times panels of kF32Panel columns, each (block, panel) one chunk that
// streams its rows (4 at a time) into a panel of partial sums in L1; the blocks' partial
// sums are then added in block order. An output's value depends only on `in` and its own
// column (the blocks are fixed by `in`), never on `out` or the panel: a column slice of the
// kernel (tensor_split's share) gives the same value for the same output, bit for bit.
constexpr int64_t kF32BlockRows = 256;
constexpr int64_t kF32Panel = 1024;

// part[c] (+)= sum over rows i in [i0, i1) of x[i] * w[i, c], c in [c0, c0 + cols); w's rows
// are `ld` floats apart. Rows are added in order, one fused multiply-add each.
void f32_block(const float* w, int64_t ld, const float* x, int64_t i0, int64_t i1, int64_t c0,
               int64_t cols, float* part) {
#if defined(HETFLOW_AVX512)
  alignas(64) float acc[kF32Panel];
  std::memset(acc, 0, sizeof(float) * cols);
  const int64_t full = cols / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols - full)) - 1);
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) {
    const float* r0 = w + i * ld + c0;
    const float* r1 = r0 + ld;
    const float* r2 = r1 + ld;
    const float* r3 = r2 + ld;
    const __m512 x0 = _mm512_set1_ps(x[i]), x1 = _mm512_set1_ps(x[i + 1]);
    const __m512 x2 = _mm512_set1_ps(x[i + 2]), x3 = _mm512_set1_ps(x[i + 3]);
    int64_t c = 0;
    for (; c < full; c += 16) {
      __m512 a = _mm512_load_ps(acc + c);
      a = _mm512_fmadd_ps(x0, _mm512_loadu_ps(r0 + c), a);
      a = _mm512_fmadd_ps(x1, _mm512_loadu_ps(r1 + c), a);
      a = _mm512_fmadd_ps(x2, _mm512_loadu_ps(r2 + c), a);
      a = _mm512_fmadd_ps(x3, _mm512_loadu_ps(r3 + c), a);
      _mm512_store_ps(acc + c, a);
    }
    if (tail) {
      __m512 a = _mm512_maskz_loadu_ps(tail, acc + c);
      a = _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(tail, r0 + c), a);
      a = _mm512_fmadd_ps(x1, _mm512_maskz_loadu_ps(tail, r1 + c), a);
      a = _mm512_fmadd_ps(x2, _mm512_maskz_loadu_ps(tail, r2 + c), a);
      a = _mm512_fmadd_ps(x3, _mm512_maskz_loadu_ps(tail, r3 + c), a);
      _mm512_mask_storeu_ps(acc + c, tail, a);
    }
  }
  for (; i < i1; ++i) {
    const float* r0 = w + i * ld + c0;
    const __m512 x0 = _mm512_set1_ps(x[i]);
    int64_t c = 0;
    for (; c < full; c += 16) {
      const __m512 a = _mm512_load_ps(acc + c);
      _mm512_store_ps(acc + c, _mm512_fmadd_ps(x0, _mm512_loadu_ps(r0 + c), a));
    }
    if (tail) {
      __m512 a = _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(tail, r0 + c),
                                 _mm512_maskz_loadu_ps(tail, acc + c));
      _mm512_mask_storeu_ps(acc + c, tail, a);
    }
  }
  std::memcpy(part, acc, sizeof(float) * cols);
#else
  for (int64_t c = 0; c < cols; ++c) part[c] = 0.f;
  for (int64_t i = i0; i < i1; ++i) {
    const float* r = w + i * ld + c0;
    for (int64_t c = 0; c < cols; ++c) part[c] = std::fma(x[i], r[c], part[c]);
  }
#endif
}

void f32_matvec(ffi::ThreadPool& pool, const float* w, const float* x, int64_t n, int64_t out,
                float* y) {
  const int64_t blocks = (n + kF32BlockRows - 1) / kF32BlockRows;
  const int64_t panels = (out + kF32Panel - 1) / kF32Panel;
  // One block: its sums are the result. Several: partial sums [blocks, out], then added.
  std::unique_ptr<float[]> parts(blocks > 1 ? new float[blocks * out] : nullptr);
  float* part = blocks > 1 ? parts.get() : y;
  parallel_for(pool, blocks * panels, [=](int64_t c) {
    const int64_t b = c / panels, p = c % panels;
    const int64_t c0 = p * kF32Panel, cols = std::min(kF32Panel, out - c0);
    const int64_t i0 = b * kF32BlockRows, i1 = std::min(n, i0 + kF32BlockRows);
    f32_block(w, out, x, i0, i1, c0, cols, (blocks > 1 ? part + b * out : y) + c0);
  });
  if (blocks == 1) return;
  // The blocks' partial sums, added in block order (a chunk of columns per task).
  parallel_for(pool, panels, [=](int64_t p) {
    const int64_t c0 = p * kF32Panel, c1 = std::min(out, c0 + kF32Panel);
    for (int64_t c = c0; c < c1; ++c) {
      float s = part[c];
      for (int64_t b = 1; b < blocks; ++b) s += part[b * out + c];
      y[c] = s;
    }
  });
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

#if defined(HETFLOW_AVX512) && defined(__AVX512VNNI__)
// Half a group's int8 activations (g / 2 bytes, g = 32 or 64) repeated across 64 bytes, so
// that dword lane d meets bytes 4 (d % (g / 8)).. of every row's half-group.
inline __m512i broadcast_half(const int8_t* p, int64_t g) {
  return g == 32 ? _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
                 : _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// int4's activations (one named choice: docs/formats.md, "int4 activations"): x is quantized
// per group of the weights' g values to int8, q = round-half-even(x * (1 / d)) with
// d = max |x| * float32(1 / 127) (GGUF Q8_0's block, in hetflow's group), and a row's value
// is the sum over groups of (scale * d) * (the exact integer sum of weight value * q), plus,
// for the asymmetric format, min * (d * sum of q). kernels.int4_scan_gm_xla computes the
// same from the same q and d; only the order of the float32 additions differs.
struct Int4Acts {
  std::unique_ptr<int8_t[]> q;       // [groups * g]
  std::unique_ptr<float[]> d;        // [groups]
  std::unique_ptr<int32_t[]> lanes;  // [groups * 16]: per SIMD lane, the sum of its 8 q's
};

Int4Acts int4_activations(const float* x, int64_t groups, int64_t g) {
  Int4Acts out{std::unique_ptr<int8_t[]>(new int8_t[groups * g]),
               std::unique_ptr<float[]>(new float[groups]),
               std::unique_ptr<int32_t[]>(new int32_t[groups * 16])};
  const int64_t half = g / 2, per_row = std::max<int64_t>(1, g / 8);  // a row's dword lanes
  for (int64_t k = 0; k < groups; ++k) {
    const float* xg = x + k * g;
    int8_t* q = out.q.get() + k * g;
    float amax = 0.f;
#if defined(HETFLOW_AVX512)
    if (g % 16 == 0) {  // the same values, 16 at a time (cvtps rounds half to even, as nearbyint)
      __m512 m = _mm512_setzero_ps();
      for (int64_t j = 0; j < g; j += 16) {
        m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xg + j)));
      }
      amax = _mm512_reduce_max_ps(m);
    } else
#endif
    for (int64_t j = 0; j < g; ++j) amax = std::max(amax, std::fabs(xg[j]));
    const float d = amax * (1.f / 127.f);  // what XLA makes of a division by 127
    const float inv = d != 0.f ? 1.f / d : 0.f;
#if defined(HETFLOW_AVX512)
    if (g % 16 == 0) {
      const __m512 vinv = _mm512_set1_ps(inv);
      const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
      for (int64_t j = 0; j < g; j += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + j), vinv));
        v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), _mm512_cvtepi32_epi8(v));
      }
    } else
#endif
    for (int64_t j = 0; j < g; ++j) {
      q[j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(xg[j] * inv))));
    }
    out.d[k] = d;
    // Lane t of a row holds its bytes 4t..4t+3: low nibbles = values 4t.., high = half + 4t..
#if defined(HETFLOW_AVX512) && defined(__AVX512VNNI__)
    if (g == 32 || g == 64) {  // the kernel's own broadcast halves, times ones
      const __m512i ones = _mm512_set1_epi8(1);
      const __m512i xlo = broadcast_half(q, g), xhi = broadcast_half(q + half, g);
      const __m512i sums =
          _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, xlo), ones, xhi);
      _mm512_storeu_si512(out.lanes.get() + k * 16, sums);
      continue;
    }
#endif
    for (int64_t lane = 0; lane < 16; ++lane) {
      const int64_t t = lane % per_row;
      int32_t sum = 0;
      for (int64_t b = 4 * t; b < std::min(half, 4 * t + 4); ++b) sum += q[b] + q[half + b];
      out.lanes[k * 16 + lane] = sum;
    }
  }
  return out;
}

#if defined(HETFLOW_AVX512)
inline void load_params(const uint16_t* p, int rows, float* dst) {
  if (rows == kGroupTile) {
    _mm512_storeu_ps(dst, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  } else {
    for (int r = 0; r < rows; ++r) dst[r] = _cvtsh_ss(p[r]);
  }
}

inline void prefetch(const char* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

inline __m512 int8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Rows [o0, o0 + R) of an int8-gG kernel (R = kGroupTile, or any R <= kGroupTile for the last
// tile); per group and row, a 16-lane partial sum times the row's scale joins the row's
// accumulator, reduced across lanes once at the end.
template <int G, int R>
void int8g_tile(const Grouped& a, int64_t o0) {
  constexpr int V = G / 16;
  const int8_t* q = static_cast<const int8_t*>(a.q);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  alignas(64) float s[kGroupTile];
  for (int64_t k = 0; k < a.groups; ++k) {
    const int8_t* base = q + (k * a.out + o0) * G;
    if (k + kPrefetchGroups < a.groups) {
      prefetch(reinterpret_cast<const char*>(base + kPrefetchGroups * a.out * G), R * G);
    }
    load_params(a.scale + k * a.out + o0, R, s);
    __m512 xv[V];
    for (int v = 0; v < V; ++v) xv[v] = _mm512_loadu_ps(a.x + k * G + 16 * v);
    for (int r = 0; r < R; ++r) {
      const int8_t* p = base + r * G;
      __m512 t = _mm512_mul_ps(int8x16(p), xv[0]);
      for (int v = 1; v < V; ++v) t = _mm512_fmadd_ps(int8x16(p + 16 * v), xv[v], t);
      acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(s[r]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) a.y[o0 + r] = _mm512_reduce_add_ps(acc[r]);
}

#if defined(__AVX512VNNI__)
// int4 x int8 activations, with VNNI: one 64-byte load holds 64 / (G / 2) rows' bytes of one
// group (4 rows at G = 32, 2 at G = 64; a group's rows lie together), as 16 dwords. The low
// nibbles (values 0..G/2-1 of each row) and the high ones (G/2..G-1), masked into bytes, each
// meet their half of the group's int8 activations (broadcast to every row) in one vpdpbusd,
// which adds 4 byte products into each dword lane: 8 exact integer products per lane, from an
// accumulator that starts at the lane's correction (-8 * its activations' sum for the
// symmetric format; 0 for the asymmetric one, whose minimum times the activations' sum is
// added in float). Each lane's integer sum, converted, is scaled by its row's scale times the
// group's activation scale and accumulated over groups; a row's D = G / 8 lanes are added
// once at the end. A row's arithmetic does not depend on its place in the tile (a slice of
// the rows, tensor_split's share, gives the same values, bit for bit).
template <int G, int M, bool kAsym>
void int4_tile(const Grouped& a, const Int4Acts& x, int64_t o0, int64_t rows) {
  constexpr int B = G / 2, D = B / 4, RPL = 16 / D;  // bytes per row, lanes per row, rows per load
  const uint8_t* q = static_cast<const uint8_t*>(a.q);
  const __m512i low = _mm512_set1_epi8(0x0f);
  // The last load's bytes beyond `rows` are not read (masked): their lanes get scale 0.
  const int64_t last_rows = rows - (M - 1) * RPL;
  const __mmask64 last = last_rows >= RPL ? ~__mmask64{0} : (__mmask64{1} << (last_rows * B)) - 1;
  const __mmask16 pmask = static_cast<__mmask16>((1u << rows) - 1);
  __m512i spread[M];  // lane d of load m -> the row's index among the tile's 16 scales
  for (int m = 0; m < M; ++m) {
    alignas(64) int32_t idx[16];
    for (int d = 0; d < 16; ++d) idx[d] = m * RPL + d / D;
    spread[m] = _mm512_load_si512(idx);
  }
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < a.groups; ++k) {
    const uint8_t* base = q + (k * a.out + o0) * B;
    if (k + kPrefetchGroups < a.groups) {
      prefetch(reinterpret_cast<const char*>(base + kPrefetchGroups * a.out * B), rows * B);
    }
    const __m512 dk = _mm512_set1_ps(x.d[k]);
    const __m512 s16 = _mm512_mul_ps(
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(pmask, a.scale + k * a.out + o0)), dk);
    const int8_t* xk = x.q.get() + k * G;
    const __m512i xlo = broadcast_half(xk, G), xhi = broadcast_half(xk + B, G);
    const __m512i lanes = _mm512_loadu_si512(x.lanes.get() + k * 16);
    const __m512i start =
        kAsym ? _mm512_setzero_si512() : _mm512_mullo_epi32(lanes, _mm512_set1_epi32(-8));
    __m512 m16, xsum;
    if constexpr (kAsym) {
      m16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(pmask, a.minimum + k * a.out + o0));
      xsum = _mm512_mul_ps(dk, _mm512_cvtepi32_ps(lanes));
    }
    for (int m = 0; m < M; ++m) {
      const __m512i v = m == M - 1 ? _mm512_maskz_loadu_epi8(last, base + m * 64)
                                   : _mm512_loadu_si512(base + m * 64);
      __m512i i = _mm512_dpbusd_epi32(start, _mm512_and_si512(v, low), xlo);
      i = _mm512_dpbusd_epi32(i, _mm512_and_si512(_mm512_srli_epi16(v, 4), low), xhi);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_permutexvar_ps(spread[m], s16),
                               acc[m]);
      if constexpr (kAsym) {
        acc[m] = _mm512_fmadd_ps(_mm512_permutexvar_ps(spread[m], m16), xsum, acc[m]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    alignas(64) float sums[16];
    _mm512_store_ps(sums, acc[m]);
    for (int r = 0; r < RPL && m * RPL + r < rows; ++r) {
      float sum = sums[r * D];
      for (int d = 1; d < D; ++d) sum += sums[r * D + d];
      a.y[o0 + m * RPL + r] = sum;
    }
  }
}

template <int G> constexpr int kInt4RowsPerLoad = 16 / (G / 8);

// Calls int4_tile with M = the loads that cover `rows` (the last tile may be short).
template <int G, bool kAsym, int M = kGroupTile / kInt4RowsPerLoad<G>>
void int4_rows(const Grouped& a, const Int4Acts& x, int64_t o0, int64_t rows) {
  constexpr int RPL = kInt4RowsPerLoad<G>;
  if constexpr (M >= 1) {
    if ((rows + RPL - 1) / RPL == M) {
      int4_tile<G, M, kAsym>(a, x, o0, rows);
    } else {
      int4_rows<G, kAsym, M - 1>(a, x, o0, rows);
    }
  }
}
#define HETFLOW_INT4_VNNI 1
#endif  // __AVX512VNNI__

// int4 with float activations (`float_input`: the FFN down projection's input, which
// neuron_cluster computes block by block of neurons and so never holds whole before the
// last block; docs/formats.md "int4 activations"). Per row and 16 bytes of a group: the
// bytes widened to 16 dwords; vpermps looks each dword's low 4 bits up in a 16-entry table
// of the values (nibble - 8, or the nibble for the asymmetric format), so the low nibbles
// need no mask and no int-to-float convert, and the high ones one shift (6 instructions per
// 32 weights instead of 9; rates in WORKSPACE_NOTES.md, helper "kernels2"). The low values meet the
// group's first g/2 activations, the high ones the last g/2; per group and row the 16-lane
// sum times the scale (plus, asymmetric, the minimum times the group's activation sum)
// joins the row's accumulator, reduced once at the end.
template <int G, int R, bool kAsym>
void int4f_tile(const Grouped& a, int64_t o0) {
  constexpr int H = G / 32;  // 16-byte pieces per row and group
  const uint8_t* q = static_cast<const uint8_t*>(a.q);
  alignas(64) float values[16];
  for (int n = 0; n < 16; ++n) values[n] = static_cast<float>(kAsym ? n : n - 8);
  const __m512 table = _mm512_load_ps(values);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  alignas(64) float s[kGroupTile];
  alignas(64) float m[kGroupTile];
  for (int64_t k = 0; k < a.groups; ++k) {
    const uint8_t* base = q + (k * a.out + o0) * (G / 2);
    if (k + kPrefetchGroups < a.groups) {
      prefetch(reinterpret_cast<const char*>(base + kPrefetchGroups * a.out * (G / 2)),
               R * (G / 2));
    }
    load_params(a.scale + k * a.out + o0, R, s);
    if constexpr (kAsym) load_params(a.minimum + k * a.out + o0, R, m);
    const float* xg = a.x + k * G;
    __m512 xlo[H], xhi[H];
    __m512 xsum = _mm512_setzero_ps();
    for (int h = 0; h < H; ++h) {
      xlo[h] = _mm512_loadu_ps(xg + 16 * h);
      xhi[h] = _mm512_loadu_ps(xg + G / 2 + 16 * h);
      if constexpr (kAsym) xsum = _mm512_add_ps(xsum, _mm512_add_ps(xlo[h], xhi[h]));
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = base + r * (G / 2);
      __m512 t;
      for (int h = 0; h < H; ++h) {
        const __m512i b =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h)));
        const __m512 wlo = _mm512_permutexvar_ps(b, table);
        const __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
        t = h == 0 ? _mm512_mul_ps(wlo, xlo[0]) : _mm512_fmadd_ps(wlo, xlo[h], t);
        t = _mm512_fmadd_ps(whi, xhi[h], t);
      }
      acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(s[r]), acc[r]);
      if constexpr (kAsym) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(m[r]), xsum, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) a.y[o0 + r] = _mm512_reduce_add_ps(acc[r]);
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
template <int G, bool A> struct Int4F { template <int R> struct T { static void run(const Grouped& a, int64_t o0) { int4f_tile<G, R, A>(a, o0); } }; };
#endif  // HETFLOW_AVX512

// The portable versions of the grouped kernels (any group size; what a compiler without
// AVX-512 (int4: without VNNI) builds, and what HETFLOW_NO_SIMD builds for the tests).
void grouped_generic(const Grouped& a, int64_t o0, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    int64_t o = o0 + r;
    float acc = 0.f;
    for (int64_t k = 0; k < a.groups; ++k) {
      const float* xg = a.x + k * a.g;
      const int8_t* p = static_cast<const int8_t*>(a.q) + (k * a.out + o) * a.g;
      float part = 0.f;
      for (int64_t j = 0; j < a.g; ++j) part += static_cast<float>(p[j]) * xg[j];
      acc += part * half_to_float(a.scale[k * a.out + o]);
    }
    a.y[o] = acc;
  }
}

// int4 with float activations (any group size).
void int4f_generic(const Grouped& a, int64_t o0, int64_t rows, bool asym) {
  const int64_t half = a.g / 2;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t o = o0 + r;
    float acc = 0.f;
    for (int64_t k = 0; k < a.groups; ++k) {
      const float* xg = a.x + k * a.g;
      const uint8_t* p = static_cast<const uint8_t*>(a.q) + (k * a.out + o) * half;
      float part = 0.f, xs = 0.f;
      for (int64_t j = 0; j < half; ++j) {
        part += static_cast<float>(p[j] & 15) * xg[j] + static_cast<float>(p[j] >> 4) * xg[j + half];
        xs += xg[j] + xg[j + half];
      }
      if (!asym) part -= 8.f * xs;
      acc += part * half_to_float(a.scale[k * a.out + o]);
      if (asym) acc += xs * half_to_float(a.minimum[k * a.out + o]);
    }
    a.y[o] = acc;
  }
}

// int4 with its int8 activations (any group size; the same integer sums as the SIMD kernel).
void int4_generic(const Grouped& a, const Int4Acts& x, int64_t o0, int64_t rows, bool asym) {
  const int64_t half = a.g / 2;
  const int32_t offset = asym ? 0 : 8;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t o = o0 + r;
    float acc = 0.f;
    for (int64_t k = 0; k < a.groups; ++k) {
      const int8_t* q = x.q.get() + k * a.g;
      const uint8_t* p = static_cast<const uint8_t*>(a.q) + (k * a.out + o) * half;
      int32_t isum = 0, qsum = 0;
      for (int64_t j = 0; j < half; ++j) {
        isum += ((p[j] & 15) - offset) * q[j] + ((p[j] >> 4) - offset) * q[j + half];
        qsum += q[j] + q[j + half];
      }
      acc += static_cast<float>(isum) * (half_to_float(a.scale[k * a.out + o]) * x.d[k]);
      if (asym) {
        acc += half_to_float(a.minimum[k * a.out + o]) * (x.d[k] * static_cast<float>(qsum));
      }
    }
    a.y[o] = acc;
  }
}

void int4(ffi::ThreadPool& pool, const Grouped& a, bool asym) {
  const Int4Acts x = int4_activations(a.x, a.groups, a.g);  // outlives every chunk
  const Int4Acts* xp = &x;
  for_row_tiles(pool, a.out, kGroupTile, [a, xp, asym](int64_t o0, int64_t rows) {
#if defined(HETFLOW_INT4_VNNI)
    if (!asym && a.g == 32) return int4_rows<32, false>(a, *xp, o0, rows);
    if (!asym && a.g == 64) return int4_rows<64, false>(a, *xp, o0, rows);
    if (asym && a.g == 32) return int4_rows<32, true>(a, *xp, o0, rows);
    if (asym && a.g == 64) return int4_rows<64, true>(a, *xp, o0, rows);
#endif
    int4_generic(a, *xp, o0, rows, asym);
  });
}

void int4_float_input(ffi::ThreadPool& pool, const Grouped& a, bool asym) {
  for_row_tiles(pool, a.out, kGroupTile, [a, asym](int64_t o0, int64_t rows) {
#if defined(HETFLOW_AVX512)
    if (!asym && a.g == 32) return dispatch_rows<Int4F<32, false>::T>(a, o0, rows);
    if (!asym && a.g == 64) return dispatch_rows<Int4F<64, false>::T>(a, o0, rows);
    if (asym && a.g == 32) return dispatch_rows<Int4F<32, true>::T>(a, o0, rows);
    if (asym && a.g == 64) return dispatch_rows<Int4F<64, true>::T>(a, o0, rows);
#endif
    int4f_generic(a, o0, rows, asym);
  });
}

void grouped(ffi::ThreadPool& pool, const Grouped& a, bool int4_format, bool asym,
             bool float_input) {
  if (int4_format) return float_input ? int4_float_input(pool, a, asym) : int4(pool, a, asym);
  for_row_tiles(pool, a.out, kGroupTile, [a](int64_t o0, int64_t rows) {
#if defined(HETFLOW_AVX512)
    if (a.g == 32) return dispatch_rows<Int8G<32>::T>(a, o0, rows);
    if (a.g == 64) return dispatch_rows<Int8G<64>::T>(a, o0, rows);
    if (a.g == 128) return dispatch_rows<Int8G<128>::T>(a, o0, rows);
#endif
    grouped_generic(a, o0, rows);
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
    return check(false, "hetflow matvec: x [in], w [in, out], y [out] expected");
  }
  f32_matvec(pool, w.typed_data(), x.typed_data(), wd[0], wd[1], y->typed_data());
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
                       ffi::ResultBuffer<ffi::F32> y, bool int4, bool asym,
                       bool float_input = false) {
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
  grouped(pool, a, int4, asym, float_input);
  return ffi::Error::Success();
}

ffi::Error Int8GImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                     ffi::Buffer<ffi::F16> scale, ffi::ResultBuffer<ffi::F32> y) {
  return GroupedImpl<ffi::S8>(pool, x, q, scale, nullptr, y, false, false);
}

template <bool kFloatInput>
ffi::Error Int4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                    ffi::Buffer<ffi::F16> scale, ffi::ResultBuffer<ffi::F32> y) {
  return GroupedImpl<ffi::U8>(pool, x, q, scale, nullptr, y, true, false, kFloatInput);
}

template <bool kFloatInput>
ffi::Error Int4AsymImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                        ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> minimum,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto md = minimum.dimensions(), sd = scale.dimensions();
  if (md.size() != sd.size() || minimum.element_count() != scale.element_count()) {
    return check(false, "hetflow matvec: min must have scale's shape [G, out]");
  }
  return GroupedImpl<ffi::U8>(pool, x, q, scale,
                              reinterpret_cast<const uint16_t*>(minimum.untyped_data()), y, true,
                              true, kFloatInput);
}

}  // namespace

extern "C" {

// Which code the library was built with: 1 AVX-512, 0 portable.
int hetflow_native_simd() {
#if defined(HETFLOW_AVX512)
  return 1;
#else
  return 0;
#endif
}

// Threads that computed rows in the last call (1: the caller alone).
int hetflow_native_last_workers() { return hetflow::g_last_workers.load(); }

// Calls of any kernel so far in this process (tests and benchmarks check which path ran).
int64_t hetflow_native_calls() { return g_calls.load(); }

// Threads XLA's pool offers a call, from the last call (0 before any).
int hetflow_native_pool_threads() { return hetflow::g_pool_threads.load(); }

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(hetflow_matvec_int4, Int4Impl<false>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(hetflow_matvec_int4_asym, Int4AsymImpl<false>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// int4 with float activations (down's input; see int4f_tile).
XLA_FFI_DEFINE_HANDLER_SYMBOL(hetflow_matvec_int4_float, Int4Impl<true>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(hetflow_matvec_int4_asym_float, Int4AsymImpl<true>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
