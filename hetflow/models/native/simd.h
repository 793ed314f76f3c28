// hetflow's native kernels' SIMD layer (matvec.cc, neuron.cc): 16 float lanes, `f32x16`.
//
// The kernels are written once on it: one AVX-512 register, or two AVX2 ones (with FMA and
// F16C: x86 since 2013), whichever the compiler targets (-march=native). Where neither is
// there (ARM, say), or with HETFLOW_NO_SIMD (the tests), HETFLOW_SIMD16 is not defined and
// the kernels use their portable loops.

#ifndef HETFLOW_MODELS_NATIVE_SIMD_H_
#define HETFLOW_MODELS_NATIVE_SIMD_H_

#include <cstdint>

#if defined(__AVX512F__) && !defined(HETFLOW_NO_SIMD)
#define HETFLOW_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(HETFLOW_NO_SIMD)
#define HETFLOW_AVX2 1
#endif
#if defined(HETFLOW_AVX512) || defined(HETFLOW_AVX2)
#define HETFLOW_SIMD16 1
#include <immintrin.h>
#endif

#if defined(HETFLOW_SIMD16)
namespace {
#if defined(HETFLOW_AVX512)
using f32x16 = __m512;
inline f32x16 v_zero() { return _mm512_setzero_ps(); }
inline f32x16 v_set(float v) { return _mm512_set1_ps(v); }
inline f32x16 v_load(const float* p) { return _mm512_loadu_ps(p); }
inline f32x16 v_add(f32x16 a, f32x16 b) { return _mm512_add_ps(a, b); }
inline f32x16 v_sub(f32x16 a, f32x16 b) { return _mm512_sub_ps(a, b); }
inline f32x16 v_mul(f32x16 a, f32x16 b) { return _mm512_mul_ps(a, b); }
inline f32x16 v_fmadd(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmadd_ps(a, b, c); }
inline f32x16 v_fmsub(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmsub_ps(a, b, c); }
inline float v_sum(f32x16 a) { return _mm512_reduce_add_ps(a); }
// 16 bytes (signed or unsigned), 16 bfloat16s, 16 float16s -> 16 floats, exactly.
inline f32x16 v_s8(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); }
inline f32x16 v_u8(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }
inline f32x16 v_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline f32x16 v_f16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void v_store(float* p, f32x16 a) { _mm512_storeu_ps(p, a); }
#elif defined(HETFLOW_AVX2)
struct f32x16 {
  __m256 lo, hi;
};
inline f32x16 v_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline f32x16 v_set(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline f32x16 v_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline f32x16 v_add(f32x16 a, f32x16 b) {
  return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
inline f32x16 v_sub(f32x16 a, f32x16 b) {
  return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)};
}
inline f32x16 v_mul(f32x16 a, f32x16 b) {
  return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
}
inline f32x16 v_fmadd(f32x16 a, f32x16 b, f32x16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline f32x16 v_fmsub(f32x16 a, f32x16 b, f32x16 c) {
  return {_mm256_fmsub_ps(a.lo, b.lo, c.lo), _mm256_fmsub_ps(a.hi, b.hi, c.hi)};
}
inline float v_sum(f32x16 a) {
  __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
inline f32x16 v_s8(__m128i b) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)))};
}
inline f32x16 v_u8(__m128i b) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)),
          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(b, b)))};
}
inline f32x16 v_bf16(const uint16_t* p) {
  __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16))};
}
inline f32x16 v_f16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline void v_store(float* p, f32x16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
#endif

}  // namespace
#endif  // HETFLOW_SIMD16

#endif  // HETFLOW_MODELS_NATIVE_SIMD_H_
