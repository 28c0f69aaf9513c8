// Vector helpers of the CPU kernels: ATen's Vectorized<float> at the widest level the compiler
// targets (AVX-512 or AVX2 from -march; ATen's portable generic vectors otherwise), plus what ATen
// does not offer: loads and stores that convert fp16/bf16 <-> fp32 one fp32 vector at a time (with
// AVX-512 BF16's converting instruction where present), masked tails, row conversions, a
// lane-select multiply, an exp, and horizontal sums and maxima. The dropout masks built on these
// vectors are in csrc/cpu/philox_simd.h.
//
// Include this header FIRST in a .cpp, before any ATen header: it picks ATen's vector level
// (CPU_CAPABILITY_AVX512 / _AVX2) and names ATen's inline vector namespace for it (CPU_CAPABILITY),
// so that another translation unit of the library that includes ATen's vectors without these
// macros never shares an inline function of a different definition with these kernels.
#pragma once

#if defined(CPU_CAPABILITY) || defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#error "cpu/simd.h picks ATen's vector level itself: include it before any ATen header"
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY roberta_fast_avx512
#define RF_SIMD_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && defined(__BMI2__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY roberta_fast_avx2
#define RF_SIMD_AVX512 0
#else
#define CPU_CAPABILITY roberta_fast_generic
#define RF_SIMD_AVX512 0
#endif

// ATen's vector headers carry pragmas for other compilers and trip GCC's maybe-uninitialized
// on _mm512_undefined_*: not this library's warnings.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if RF_SIMD_AVX512
#include <immintrin.h>
#endif

namespace roberta_fast {
namespace cpu {
namespace simd {

using Vec = at::vec::Vectorized<float>;
// fp32 lanes per vector: 16 with AVX-512, 8 otherwise.
constexpr int64_t kLanes = Vec::size();

// The name of the vector level these kernels were compiled for (for diagnostics and tests).
inline const char* level() {
#if RF_SIMD_AVX512
#if defined(__AVX512BF16__)
  return "avx512+bf16";
#else
  return "avx512";
#endif
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "generic";
#endif
}

// Lane mask of the first n lanes (0 <= n <= kLanes).
inline uint32_t first_lanes(int64_t n) {
  return static_cast<uint32_t>((uint64_t{1} << n) - 1);
}

// ---- loads: kLanes (or the first n) elements as fp32; lanes past n are 0 ----

inline Vec load(const float* p) { return Vec::loadu(p); }
inline Vec load(const float* p, int64_t n) { return Vec::loadu(p, n); }

template <typename H>
inline Vec load_half_generic(const H* p, int64_t n) {
  float tmp[kLanes] = {};
  for (int64_t l = 0; l < n; ++l) tmp[l] = static_cast<float>(p[l]);
  return Vec::loadu(tmp);
}

inline Vec load(const c10::BFloat16* p, int64_t n) {
#if RF_SIMD_AVX512
  // bf16 is the high half of an fp32: widen and shift.
  const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>(first_lanes(n)), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  return load_half_generic(p, n);
#endif
}

inline Vec load(const c10::BFloat16* p) {
#if RF_SIMD_AVX512
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  return load_half_generic(p, kLanes);
#endif
}

inline Vec load(const c10::Half* p, int64_t n) {
#if RF_SIMD_AVX512
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>(first_lanes(n)), p));
#else
  return load_half_generic(p, n);
#endif
}

inline Vec load(const c10::Half* p) {
#if RF_SIMD_AVX512
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  return load_half_generic(p, kLanes);
#endif
}

// ---- stores: kLanes (or the first n) lanes, rounded to nearest even for fp16/bf16 ----

inline void store(float* p, Vec v) { v.store(p); }
inline void store(float* p, Vec v, int64_t n) { v.store(p, n); }

template <typename H>
inline void store_half_generic(H* p, Vec v, int64_t n) {
  float tmp[kLanes];
  v.store(tmp);
  for (int64_t l = 0; l < n; ++l) p[l] = static_cast<H>(tmp[l]);
}

#if RF_SIMD_AVX512
inline __m256i to_bf16_bits(Vec v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);  // one instruction, ties to even
#else
  // Round to nearest even on the bits; NaN stays a (quiet) NaN.
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, is_nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(rounded);
#endif
}
#endif

inline void store(c10::BFloat16* p, Vec v) {
#if RF_SIMD_AVX512
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(v));
#else
  store_half_generic(p, v, kLanes);
#endif
}

inline void store(c10::BFloat16* p, Vec v, int64_t n) {
#if RF_SIMD_AVX512
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>(first_lanes(n)), to_bf16_bits(v));
#else
  store_half_generic(p, v, n);
#endif
}

inline void store(c10::Half* p, Vec v) {
#if RF_SIMD_AVX512
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  store_half_generic(p, v, kLanes);
#endif
}

inline void store(c10::Half* p, Vec v, int64_t n) {
#if RF_SIMD_AVX512
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>(first_lanes(n)),
                           _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  store_half_generic(p, v, n);
#endif
}

// n elements of src as D, any pairing of fp32 / fp16 / bf16 (rounded to nearest even). With
// AVX-512 through load/store above; elsewhere ATen's converters (vectorized where ATen has them).
template <typename S, typename D>
inline void convert(const S* src, D* dst, int64_t n) {
  if constexpr (std::is_same_v<S, D>) {
    std::memcpy(dst, src, n * sizeof(S));
  } else {
#if RF_SIMD_AVX512
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) store(dst + j, load(src + j));
    if (j < n) store(dst + j, load(src + j, n - j), n - j);
#else
    at::vec::convert(src, dst, n);
#endif
  }
}

// ---- arithmetic ATen does not have ----

// e^x for the kernels' softmax arguments, x <= 0 up to rounding (a logit or score minus a max).
// With AVX-512 inline: x = k ln2 + r with |r| <= ln2 / 2 (k rounded by adding 1.5 * 2^23), a
// degree-7 Taylor polynomial in r (truncation below 6e-9 relative), times 2^k by vscalefps.
// Largest relative error on [-87, 3] 7.7e-8, as Sleef's 1-ulp exp (ATen's Vectorized::exp), in
// about 6 ns a vector against Sleef's 10. Below -87 the result is exactly 0 (e^-87 ~ 1.6e-38 is nothing next to
// a softmax's largest term, 1; -inf gives 0), above 88.7 +inf; NaN stays NaN. Elsewhere ATen's
// exp.
inline Vec exp(Vec x) {
#if RF_SIMD_AVX512
  const __m512 v = x;
  const __mmask16 keep = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 k = _mm512_sub_ps(_mm512_fmadd_ps(v, _mm512_set1_ps(1.44269504088896341f), magic),
                                 magic);
  // ln2 in two parts so that k * ln2_hi is exact.
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), v);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, k);
#else
  return x.exp();
#endif
}

// x * scale in the lanes whose bit is set in `lanes`, 0 in the others.
inline Vec select_mul(uint32_t lanes, Vec x, Vec scale) {
#if RF_SIMD_AVX512
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(lanes), x, scale);
#else
  float a[kLanes], s[kLanes];
  x.store(a);
  scale.store(s);
  for (int64_t l = 0; l < kLanes; ++l) a[l] = (lanes >> l) & 1u ? a[l] * s[l] : 0.0f;
  return Vec::loadu(a);
#endif
}

// Lane-wise max, one instruction where possible: a NaN lane may or may not survive (callers that
// must see NaN see it through a sum).
inline Vec max_lanes(Vec a, Vec b) {
#if RF_SIMD_AVX512
  return _mm512_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

// The first n lanes of v, the others 0.
inline Vec first(Vec v, int64_t n) { return Vec::set(Vec(0.0f), v, n); }

// Sum of the lanes (once per row or block: a plain loop; GCC 12 warns falsely on
// _mm512_reduce_add_ps).
inline float hsum(Vec v) {
  float a[kLanes];
  v.store(a);
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += a[l];
  return total;
}

// Largest lane (NaN lanes are skipped: callers see NaN through their sums).
inline float hmax(Vec v) {
  float a[kLanes];
  v.store(a);
  float m = a[0];
  for (int64_t l = 1; l < kLanes; ++l) m = a[l] > m ? a[l] : m;
  return m;
}

}  // namespace simd
}  // namespace cpu
}  // namespace roberta_fast
