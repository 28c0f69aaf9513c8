// Dropout masks of the CPU kernels: the Philox4x32-10 rule of csrc/common/philox.h drawn as keep
// bits, one bit per element, which the row loops apply with simd::select_mul.
//
// The core runs Philox on 16 consecutive counters per AVX-512 vector, W vectors in flight (a
// round's multiply -> shuffle -> xor chain is ~7 cycles deep; several independent chains let the
// vector ports, not the latency, set the pace); without AVX-512 each counter goes through the
// scalar philox::random_words. "u > p" is an integer compare of the folded word against a
// threshold found once per call (last_dropped), exactly philox.h's float rule, which is
// monotone in the folded word. Measured on this project's development machine (Xeon with
// AVX-512, one thread, ns per counter): 2.0 with W = 2..4, 2.6 with W = 1; the high and low
// halves of the products from two vpmuludq and lane shuffles instead of vpmulld: 2.0 against 2.6.
//
// Element o is bit o % 64 of word o / 64 of a bit array (little-endian words, so the bits of
// elements j .. j + 7, j a multiple of 8, are byte j / 8).
#pragma once

#include "cpu/simd.h"  // first: it configures ATen's vector headers

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/philox.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the dropout keep bits are read as little-endian words");

namespace roberta_fast {
namespace cpu {
namespace philox_simd {

// The dropout rule as an integer threshold: an element whose random word folds to f (philox.h's
// bits_to_uniform before the scaling) is dropped iff f <= last_dropped(p) (-1: nothing is
// dropped). u(f) = bits_to_uniform(f) is non-decreasing in f in [0, 2^31): the dropped words
// (u <= p) are 0 .. the answer, found by bisection on [lo, hi) with u(lo) <= p < u(hi).
inline int32_t last_dropped(float p) {
  if (!(philox::bits_to_uniform(0u) <= p)) return -1;
  int64_t lo = 0, hi = int64_t{1} << 31;  // hi: past the last word, as if u(hi) > p
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (philox::bits_to_uniform(static_cast<uint32_t>(mid)) <= p) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return static_cast<int32_t>(lo);
}

// What drawing a mask needs: the seed, its round keys, the threshold and the kept scale.
struct Dropout {
  bool active;         // p > 0: the kernels skip dropout entirely at p = 0
  float scale;         // 1 / (1 - p) for kept elements
  int32_t last;        // folded words <= last are dropped
  uint64_t seed;
  uint32_t key0[philox::kRounds];  // the Philox key of each round
  uint32_t key1[philox::kRounds];

  Dropout(float p, uint64_t seed_)
      : active(p > 0.0f), scale(1.0f / (1.0f - p)), last(last_dropped(p)), seed(seed_) {
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < philox::kRounds; ++r) {
      key0[r] = k0;
      key1[r] = k1;
      k0 += philox::kKeyA;
      k1 += philox::kKeyB;
    }
  }
};

constexpr int64_t kCountersPerWord = 16;  // Philox counters behind one 64-bit word of keep bits

inline bool keep_word(uint32_t word, int32_t last) {
  const int32_t v = static_cast<int32_t>(word);
  return (v < 0 ? ~v : v) > last;
}

// (GCC 12 warns that the intrinsics' undefined pass-through operands are uninitialized.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#if RF_SIMD_AVX512
// High and low 32 bits of k * a in each of 16 lanes (two 32x32->64 multiplies, even and odd
// lanes, recombined with lane shuffles).
inline void mulhilo(__m512i k, __m512i a, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, k);
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_DDBB), k);
  *hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);
  *lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);
}

// The Philox core: lane j of words[w][i] is word i of counter `counter + 16 w + j`.
template <int W>
inline void random_words16(const Dropout& d, uint64_t counter, __m512i (&words)[W][4]) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int w = 0; w < W; ++w) {
    const uint64_t first = counter + static_cast<uint64_t>(w * kCountersPerWord);
    const __m512i base = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(first)));
    const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(first >> 32));
    words[w][0] = _mm512_add_epi32(base, lane);
    // A lane whose low word wrapped carries into the high word.
    words[w][1] = _mm512_mask_add_epi32(high, _mm512_cmplt_epu32_mask(words[w][0], base), high,
                                        _mm512_set1_epi32(1));
    words[w][2] = _mm512_setzero_si512();
    words[w][3] = _mm512_setzero_si512();
  }
  const __m512i round_a = _mm512_set1_epi32(static_cast<int32_t>(philox::kRoundA));
  const __m512i round_b = _mm512_set1_epi32(static_cast<int32_t>(philox::kRoundB));
#pragma GCC unroll 10
  for (int r = 0; r < philox::kRounds; ++r) {
    const __m512i k0 = _mm512_set1_epi32(static_cast<int32_t>(d.key0[r]));
    const __m512i k1 = _mm512_set1_epi32(static_cast<int32_t>(d.key1[r]));
#pragma GCC unroll 4
    for (int w = 0; w < W; ++w) {
      __m512i hi_a, lo_a, hi_b, lo_b;
      mulhilo(round_a, words[w][0], &hi_a, &lo_a);
      mulhilo(round_b, words[w][2], &hi_b, &lo_b);
      words[w][0] = _mm512_ternarylogic_epi32(hi_b, words[w][1], k0, 0x96);  // 0x96: a ^ b ^ c
      words[w][2] = _mm512_ternarylogic_epi32(hi_a, words[w][3], k1, 0x96);
      words[w][1] = lo_b;
      words[w][3] = lo_a;
    }
  }
}

inline __mmask16 keep_lanes(__m512i word, __m512i last) {
  const __m512i folded = _mm512_xor_si512(word, _mm512_srai_epi32(word, 31));
  return _mm512_cmpgt_epi32_mask(folded, last);
}

// Bit i of m moved to bit 4 i + shift.
inline uint64_t spread4(uint32_t m, int shift) {
#if defined(__BMI2__)
  return _pdep_u64(m, 0x1111111111111111ull << shift);
#else
  uint64_t x = m & 0xffffu;
  x = (x | (x << 24)) & 0x000000ff000000ffull;
  x = (x | (x << 12)) & 0x000f000f000f000full;
  x = (x | (x << 6)) & 0x0303030303030303ull;
  x = (x | (x << 3)) & 0x1111111111111111ull;
  return x << shift;
#endif
}
#endif

// Keep bits of the 64 W elements 4 * counter .. 4 * counter + 64 W - 1 into out[0 .. W): bit
// 4 j + i of out[w] is word i of Philox counter `counter + 16 w + j`.
template <int W>
inline void keep_bits64(const Dropout& d, uint64_t counter, uint64_t* out) {
#if RF_SIMD_AVX512
  __m512i words[W][4];
  random_words16<W>(d, counter, words);
  const __m512i last = _mm512_set1_epi32(d.last);
  for (int w = 0; w < W; ++w) {
    out[w] = spread4(keep_lanes(words[w][0], last), 0) | spread4(keep_lanes(words[w][1], last), 1) |
             spread4(keep_lanes(words[w][2], last), 2) | spread4(keep_lanes(words[w][3], last), 3);
  }
#else
  for (int w = 0; w < W; ++w) {
    uint64_t bits = 0;
    for (int j = 0; j < kCountersPerWord; ++j) {
      const philox::Words v = philox::random_words(
          d.seed, counter + static_cast<uint64_t>(w * kCountersPerWord + j));
      for (int i = 0; i < 4; ++i)
        bits |= static_cast<uint64_t>(keep_word(v.w[i], d.last)) << (4 * j + i);
    }
    out[w] = bits;
  }
#endif
}

#pragma GCC diagnostic pop

// Words of a bit array for n elements that start anywhere in a counter, with the word of padding
// fill_keep_bits writes.
constexpr int64_t keep_bits_words(int64_t n) { return (n + 3 + 63) / 64 + 1; }

// The keep bits of the n elements at offsets o .. o + n - 1 into bits[0 .. keep_bits_words(n)):
// element o + j is bit j % 64 of bits[j / 64]. Words of 64 elements are drawn from the Philox
// counter of o on, four at a time and the rest together, and shifted down by o & 3 when the run
// starts inside a counter. Bits past n are those of the next elements, then zeros.
inline void fill_keep_bits(const Dropout& d, uint64_t o, int64_t n, uint64_t* bits) {
  const int first = static_cast<int>(o & 3);
  const int64_t words = (first + n + 63) / 64;
  const uint64_t counter = o >> 2;
  auto at = [&](int64_t k) { return counter + static_cast<uint64_t>(k * kCountersPerWord); };
  int64_t k = 0;
  for (; k + 4 <= words; k += 4) keep_bits64<4>(d, at(k), bits + k);
  switch (words - k) {
    case 3: keep_bits64<3>(d, at(k), bits + k); break;
    case 2: keep_bits64<2>(d, at(k), bits + k); break;
    case 1: keep_bits64<1>(d, at(k), bits + k); break;
    default: break;
  }
  bits[words] = 0;
  if (first != 0) {
    for (int64_t w = 0; w < words; ++w) bits[w] = (bits[w] >> first) | (bits[w + 1] << (64 - first));
  }
}

// The simd::kLanes keep bits of elements j .. j + kLanes - 1 (j a multiple of kLanes, itself a
// multiple of 8: whole bytes), as a lane mask for simd::select_mul.
inline uint32_t lane_bits(const uint64_t* bits, int64_t j) {
  static_assert(simd::kLanes % 8 == 0 && simd::kLanes <= 32,
                "lane masks are whole bytes of a 32-bit word");
  uint32_t m = 0;
  std::memcpy(&m, reinterpret_cast<const unsigned char*>(bits) + j / 8, simd::kLanes / 8);
  return m;
}

// The multiplier (0 or d.scale) of the elements at offsets o .. o + n - 1, by the rule of
// philox.h whatever p (at p = 0 too, where the kernels skip dropout).
inline void multipliers(const Dropout& d, uint64_t o, int64_t n, float* out) {
  constexpr int64_t kChunk = 1024;
  uint64_t bits[keep_bits_words(kChunk)];
  const simd::Vec one(1.0f), scale(d.scale);
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t m = std::min(kChunk, n - j0);
    fill_keep_bits(d, o + static_cast<uint64_t>(j0), m, bits);
    for (int64_t j = 0; j < m; j += simd::kLanes) {
      simd::store(out + j0 + j, simd::select_mul(lane_bits(bits, j), one, scale),
                  std::min(simd::kLanes, m - j));
    }
  }
}

}  // namespace philox_simd
}  // namespace cpu
}  // namespace roberta_fast
