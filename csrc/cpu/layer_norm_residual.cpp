// CPU kernels of fused residual + LayerNorm (+ dropout). See layer_norm_residual.h.
//
// Memory-bound: per row the forward reads x and residual once and writes y once, the backward
// reads dy, x and residual once and writes dresidual (and dx) once. Everything else stays in L1:
// the row of s = dropout(x) + residual (fp32), the row's dropout keep bits, and in the backward
// the per-thread fp32 partial sums of dweight/dbias, reduced in a fixed order at the end.
//
// Dropout: the keep bits of 64 consecutive elements come from one vector of 16 Philox counters
// (AVX-512: 16 lanes, four vectors in flight; elsewhere the scalar csrc/common/philox.h), drawn
// per row into an L1 bit array. "u > p" is an integer compare of the folded word against a
// threshold found once per call, exactly the float rule of philox.h, which is monotone in the
// folded word. Philox is most of the arithmetic: about as much as all the rest of a bf16 row.
#include "cpu/simd.h"  // first: it configures ATen's vector headers

#include "cpu/layer_norm_residual.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/philox.h"
#include "cpu/parallel.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the dropout keep bits are read as little-endian words");

namespace roberta_fast {
namespace cpu {
namespace {

using simd::kLanes;
using simd::Vec;

constexpr int64_t kCountersPerWord = 16;  // Philox counters behind one 64-bit word of keep bits

// What a row needs to draw its dropout mask.
struct Dropout {
  bool active = false;
  float scale = 1.0f;        // 1 / (1 - p) for kept elements
  int32_t last_dropped = 0;  // folded words <= this are dropped (see dropout_last_dropped)
  uint32_t key0[philox::kRounds];  // the Philox key of each round
  uint32_t key1[philox::kRounds];

  Dropout(float p, uint64_t seed) {
    active = p > 0.0f;
    if (!active) return;
    scale = 1.0f / (1.0f - p);
    last_dropped = dropout_last_dropped(p);
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < philox::kRounds; ++r) {
      key0[r] = k0;
      key1[r] = k1;
      k0 += philox::kKeyA;
      k1 += philox::kKeyB;
    }
  }
};

inline bool keep_word(uint32_t word, int32_t last_dropped) {
  const int32_t v = static_cast<int32_t>(word);
  return (v < 0 ? ~v : v) > last_dropped;
}

#if RF_SIMD_AVX512
// High and low 32 bits of k * a in each of 16 lanes (two 32x32->64 multiplies, even and odd
// lanes, recombined with lane shuffles).
inline void mulhilo(__m512i k, __m512i a, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, k);
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_DDBB), k);
  *hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);
  *lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);
}

inline __mmask16 keep_lanes(__m512i word, __m512i last_dropped) {
  const __m512i folded = _mm512_xor_si512(word, _mm512_srai_epi32(word, 31));
  return _mm512_cmpgt_epi32_mask(folded, last_dropped);
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
// 4 j + i of out[w] is word i of Philox counter `counter + 16 w + j`. W words at once interleave
// W independent dependency chains (a round's multiply -> shuffle -> xor is ~7 cycles deep), so
// the vector ports, not the latency, set the pace.
// (GCC 12 warns that the intrinsics' undefined pass-through operands are uninitialized.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <int W>
inline void keep_bits64(const Dropout& d, uint64_t counter, uint64_t* out) {
#if RF_SIMD_AVX512
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i c0[W], c1[W], c2[W], c3[W];
  for (int w = 0; w < W; ++w) {
    const uint64_t first = counter + static_cast<uint64_t>(w * kCountersPerWord);
    const __m512i base = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(first)));
    const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(first >> 32));
    c0[w] = _mm512_add_epi32(base, lane);
    // A lane whose low word wrapped carries into the high word.
    c1[w] = _mm512_mask_add_epi32(high, _mm512_cmplt_epu32_mask(c0[w], base), high,
                                  _mm512_set1_epi32(1));
    c2[w] = _mm512_setzero_si512();
    c3[w] = _mm512_setzero_si512();
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
      mulhilo(round_a, c0[w], &hi_a, &lo_a);
      mulhilo(round_b, c2[w], &hi_b, &lo_b);
      c0[w] = _mm512_ternarylogic_epi32(hi_b, c1[w], k0, 0x96);  // 0x96: a ^ b ^ c
      c2[w] = _mm512_ternarylogic_epi32(hi_a, c3[w], k1, 0x96);
      c1[w] = lo_b;
      c3[w] = lo_a;
    }
  }
  const __m512i last = _mm512_set1_epi32(d.last_dropped);
  for (int w = 0; w < W; ++w) {
    out[w] = spread4(keep_lanes(c0[w], last), 0) | spread4(keep_lanes(c1[w], last), 1) |
             spread4(keep_lanes(c2[w], last), 2) | spread4(keep_lanes(c3[w], last), 3);
  }
#else
  const uint64_t seed = (static_cast<uint64_t>(d.key1[0]) << 32) | d.key0[0];
  for (int w = 0; w < W; ++w) {
    uint64_t bits = 0;
    for (int j = 0; j < kCountersPerWord; ++j) {
      const philox::Words v = philox::random_words(
          seed, counter + static_cast<uint64_t>(w * kCountersPerWord + j));
      for (int i = 0; i < 4; ++i)
        bits |= static_cast<uint64_t>(keep_word(v.w[i], d.last_dropped)) << (4 * j + i);
    }
    out[w] = bits;
  }
#endif
}
#pragma GCC diagnostic pop

// The keep bits of the n elements at offsets o .. o + n - 1: element o + j is bit j % 64 of
// bits[j / 64]. Words of 64 elements are drawn from the Philox counter of o on and shifted down
// by o & 3 when the row starts inside a counter. One zero word of padding follows.
inline void fill_keep_bits(const Dropout& d, uint64_t o, int64_t n, uint64_t* bits) {
  const int first = static_cast<int>(o & 3);
  const int64_t words = (first + n + 63) / 64;
  const uint64_t counter = o >> 2;
  int64_t k = 0;
  for (; k + 4 <= words; k += 4)
    keep_bits64<4>(d, counter + static_cast<uint64_t>(k * kCountersPerWord), bits + k);
  for (; k < words; ++k)
    keep_bits64<1>(d, counter + static_cast<uint64_t>(k * kCountersPerWord), bits + k);
  bits[words] = 0;
  if (first != 0) {
    for (int64_t k = 0; k < words; ++k) bits[k] = (bits[k] >> first) | (bits[k + 1] << (64 - first));
  }
}

inline int64_t keep_bits_words(int64_t n) { return (n + 3 + 63) / 64 + 1; }

// The kLanes keep bits of elements j .. j + kLanes - 1 (j a multiple of kLanes, itself a
// multiple of 8: whole bytes).
inline uint32_t lane_bits(const uint64_t* bits, int64_t j) {
  static_assert(kLanes % 8 == 0 && kLanes <= 32, "lane masks are whole bytes of a 32-bit word");
  uint32_t m = 0;
  std::memcpy(&m, reinterpret_cast<const unsigned char*>(bits) + j / 8, kLanes / 8);
  return m;
}

// weight/bias as fp32 arrays (converted once per call when W is a half type).
template <typename W>
inline const float* params_as_float(const W* w, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<W, float>) {
    (void)n;
    (void)buf;
    return w;
  } else {
    buf.resize(n);
    for (int64_t j = 0; j < n; j += kLanes) {
      const int64_t m = std::min(kLanes, n - j);
      simd::load(w + j, m).store(buf.data() + j, m);
    }
    return buf.data();
  }
}

// Per-thread row scratch: s (or xhat) and g as fp32, and the row's keep bits.
struct RowScratch {
  std::vector<float> a, b;
  std::vector<uint64_t> bits;
  explicit RowScratch(int64_t hidden)
      : a(hidden + kLanes), b(hidden + kLanes), bits(keep_bits_words(hidden)) {}
};

// The dropout of one row, by value (the row functions keep everything in registers).
struct RowMask {
  const uint64_t* bits;  // the row's keep bits, from fill_keep_bits
  bool active;
  float scale;
};

template <typename T>
inline Vec dropout_load(const T* x, int64_t j, const RowMask& m, Vec scale) {
  const Vec v = simd::load(x + j);
  return m.active ? simd::select_mul(lane_bits(m.bits, j), v, scale) : v;
}

template <typename T>
inline Vec dropout_load(const T* x, int64_t j, int64_t n, const RowMask& m, Vec scale) {
  const Vec v = simd::load(x + j, n);
  return m.active ? simd::select_mul(lane_bits(m.bits, j), v, scale) : v;
}

// Folds acc = f(j, n, acc) over the row's vectors (n = kLanes, or fewer for the last one; f
// leaves lanes past n alone) into four accumulators, then sums their lanes: the latency of the
// accumulating add, not the number of adds, would bound a single chain.
template <typename F>
inline float row_reduce(int64_t hidden, F&& f) {
  Vec a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f);
  int64_t j = 0;
  for (; j + 4 * kLanes <= hidden; j += 4 * kLanes) {
    a0 = f(j, kLanes, a0);
    a1 = f(j + kLanes, kLanes, a1);
    a2 = f(j + 2 * kLanes, kLanes, a2);
    a3 = f(j + 3 * kLanes, kLanes, a3);
  }
  for (; j + kLanes <= hidden; j += kLanes) a0 = f(j, kLanes, a0);
  if (j < hidden) a1 = f(j, hidden - j, a1);
  return simd::hsum((a0 + a1) + (a2 + a3));
}

// Forward of one row: s = dropout(x) + r into the L1 scratch `s` and its mean, the two-pass
// variance on s, then y. Returns (mean, rstd).
template <typename T>
inline std::pair<float, float> forward_row(const T* __restrict x, const T* __restrict r,
                                           const float* __restrict w,
                                           const float* __restrict b, T* __restrict y,
                                           float* __restrict s, RowMask m, int64_t hidden,
                                           float eps) {
  const Vec scale(m.scale);
  const float sum = row_reduce(hidden, [&](int64_t j, int64_t n, Vec acc) {
    if (n == kLanes) {
      const Vec sv = dropout_load(x, j, m, scale) + simd::load(r + j);
      sv.store(s + j);
      return acc + sv;
    }
    const Vec sv = dropout_load(x, j, n, m, scale) + simd::load(r + j, n);  // 0 past n
    sv.store(s + j, n);
    return acc + sv;
  });
  // Divisions, not products with a rounded 1 / H: once per row, and a row whose mean is large
  // next to its spread amplifies every rounding of the mean.
  const float h = static_cast<float>(hidden);
  const float mean = sum / h;
  const Vec vm(mean);
  const float sum_sq = row_reduce(hidden, [&](int64_t j, int64_t n, Vec acc) {
    const Vec d = n == kLanes ? Vec::loadu(s + j) - vm : simd::first(Vec::loadu(s + j, n) - vm, n);
    return at::vec::fmadd(d, d, acc);
  });
  const float rstd = 1.0f / std::sqrt(sum_sq / h + eps);

  const Vec vr(rstd);
  int64_t j = 0;
  for (; j + kLanes <= hidden; j += kLanes) {
    const Vec xhat = (Vec::loadu(s + j) - vm) * vr;
    simd::store(y + j, at::vec::fmadd(xhat, Vec::loadu(w + j), Vec::loadu(b + j)));
  }
  if (j < hidden) {
    const int64_t n = hidden - j;
    const Vec xhat = (Vec::loadu(s + j, n) - vm) * vr;
    simd::store(y + j, at::vec::fmadd(xhat, Vec::loadu(w + j, n), Vec::loadu(b + j, n)), n);
  }
  return {mean, rstd};
}

// Backward of one row. Pass 1 (reads x, r, dy): xhat and g = dy * w into the L1 scratch, the
// row sums of g and g * xhat, and the row's share of dweight/dbias (dw, db: this thread's fp32
// partial rows, padded to whole vectors). Lanes past the row's end load as 0, so g and dy are 0
// there and add nothing. Pass 2 (L1 -> writes): ds = rstd * (g - mean(g) - xhat * mean(g xhat)),
// written to dres and, with dropout, masked and scaled to dx.
template <typename T>
inline void backward_row(const T* __restrict dy, const T* __restrict x, const T* __restrict r,
                         const float* __restrict w, float mean, float rstd, T* __restrict dres,
                         T* __restrict dx, float* __restrict dw, float* __restrict db,
                         float* __restrict xhat, float* __restrict g, RowMask m,
                         int64_t hidden) {
  const Vec scale(m.scale), vm(mean), vr(rstd);
  Vec sg0(0.0f), sg1(0.0f), sx0(0.0f), sx1(0.0f);
  auto pass1 = [&](int64_t j, int64_t n, Vec& sg, Vec& sx) {
    const bool full = n == kLanes;
    const Vec xv = full ? dropout_load(x, j, m, scale) : dropout_load(x, j, n, m, scale);
    const Vec rv = full ? simd::load(r + j) : simd::load(r + j, n);
    const Vec dyv = full ? simd::load(dy + j) : simd::load(dy + j, n);
    const Vec xh = (xv + rv - vm) * vr;
    const Vec gv = dyv * Vec::loadu(w + j, n);
    xh.store(xhat + j);
    gv.store(g + j);
    sg = sg + gv;
    sx = at::vec::fmadd(gv, xh, sx);
    at::vec::fmadd(dyv, xh, Vec::loadu(dw + j)).store(dw + j);
    (Vec::loadu(db + j) + dyv).store(db + j);
  };
  int64_t j = 0;
  for (; j + 2 * kLanes <= hidden; j += 2 * kLanes) {
    pass1(j, kLanes, sg0, sx0);
    pass1(j + kLanes, kLanes, sg1, sx1);
  }
  for (; j < hidden; j += kLanes) pass1(j, std::min(kLanes, hidden - j), sg0, sx0);

  // (g - mean(g)) first: it cancels exactly where it should (H = 1, constant g).
  const float h = static_cast<float>(hidden);
  const Vec mean_g(simd::hsum(sg0 + sg1) / h);
  const Vec mean_gx(simd::hsum(sx0 + sx1) / h);
  auto ds_at = [&](int64_t j) {
    return vr * at::vec::fnmadd(Vec::loadu(xhat + j), mean_gx, Vec::loadu(g + j) - mean_g);
  };
  j = 0;
  for (; j + kLanes <= hidden; j += kLanes) {
    const Vec ds = ds_at(j);
    simd::store(dres + j, ds);
    if (m.active) simd::store(dx + j, simd::select_mul(lane_bits(m.bits, j), ds, scale));
  }
  if (j < hidden) {
    const int64_t n = hidden - j;
    const Vec ds = ds_at(j);
    simd::store(dres + j, ds, n);
    if (m.active)
      simd::store(dx + j, simd::select_mul(lane_bits(m.bits, j), ds, scale), n);
  }
}

}  // namespace

int32_t dropout_last_dropped(float p) {
  // u(f) = bits_to_uniform(f) is non-decreasing in the folded word f in [0, 2^31): the dropped
  // words (u <= p) are 0 .. the answer. Bisection on [lo, hi) with u(lo) <= p < u(hi).
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

const char* layer_norm_residual_vector_level() { return simd::level(); }

void dropout_scales(uint64_t seed, uint64_t offset, int64_t n, float p, float* out) {
  if (n <= 0) return;
  const Dropout d(p, seed);
  std::vector<uint64_t> bits(keep_bits_words(n));
  fill_keep_bits(d, offset, n, bits.data());
  for (int64_t j = 0; j < n; ++j) out[j] = (bits[j >> 6] >> (j & 63)) & 1u ? d.scale : 0.0f;
}

// Chunks of rows for parallel_chunks: about 16K elements or more each (the per-chunk overhead is
// a few rows' worth below that), and at most 64 of them (enough for a thread slowed by other
// work to hand its share to the other), whatever the number of threads.
inline int64_t row_chunks(int64_t rows, int64_t hidden) {
  return std::max<int64_t>(1, std::min<int64_t>({rows, 64, rows * hidden / 16384}));
}

template <typename T, typename W>
void layer_norm_residual_fwd(const T* x, const T* residual, const W* weight, const W* bias, T* y,
                             float* mean, float* rstd, int64_t rows, int64_t hidden, float eps,
                             float dropout_p, uint64_t seed) {
  if (rows <= 0 || hidden <= 0) return;
  std::vector<float> wbuf, bbuf;
  const float* w = params_as_float(weight, hidden, wbuf);
  const float* b = params_as_float(bias, hidden, bbuf);
  const Dropout d(dropout_p, seed);
  const int64_t chunks = row_chunks(rows, hidden);
  parallel_chunks(chunks, [&](int64_t c) {
    RowScratch scratch(hidden);
    const RowMask mask{scratch.bits.data(), d.active, d.scale};
    const auto [begin, end] = chunk_rows(rows, chunks, c);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * hidden;
      if (mask.active) fill_keep_bits(d, static_cast<uint64_t>(base), hidden, scratch.bits.data());
      const auto stats = forward_row(x + base, residual + base, w, b, y + base,
                                     scratch.a.data(), mask, hidden, eps);
      mean[row] = stats.first;
      rstd[row] = stats.second;
    }
  });
}

template <typename T, typename W>
void layer_norm_residual_bwd(const T* dy, const T* x, const T* residual, const W* weight,
                             const float* mean, const float* rstd, T* dresidual, T* dx,
                             W* dweight, W* dbias, int64_t rows, int64_t hidden, float dropout_p,
                             uint64_t seed) {
  if (hidden <= 0) return;
  std::vector<float> wbuf;
  const float* w = params_as_float(weight, hidden, wbuf);
  const Dropout d(dropout_p, seed);
  // Each chunk of rows accumulates its own fp32 partial dweight/dbias row, summed afterwards in
  // chunk order: the result depends neither on scheduling nor on the number of threads, no two
  // threads write one accumulator, and nothing of size [rows, H] is allocated besides the outputs.
  const int64_t chunks = row_chunks(rows, hidden);
  const int64_t padded = (hidden + kLanes - 1) / kLanes * kLanes;
  std::vector<float> partial(2 * chunks * padded, 0.0f);
  if (rows > 0) {
    parallel_chunks(chunks, [&](int64_t c) {
      RowScratch scratch(hidden);
      const RowMask mask{scratch.bits.data(), d.active, d.scale};
      float* dw = partial.data() + c * 2 * padded;
      const auto [begin, end] = chunk_rows(rows, chunks, c);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * hidden;
        if (mask.active)
          fill_keep_bits(d, static_cast<uint64_t>(base), hidden, scratch.bits.data());
        backward_row(dy + base, x + base, residual + base, w, mean[row], rstd[row],
                     dresidual + base, mask.active ? dx + base : nullptr, dw, dw + padded,
                     scratch.a.data(), scratch.b.data(), mask, hidden);
      }
    });
  }
  for (int64_t j = 0; j < hidden; j += kLanes) {
    Vec sw(0.0f), sb(0.0f);
    for (int64_t c = 0; c < chunks; ++c) {
      sw = sw + Vec::loadu(partial.data() + c * 2 * padded + j);
      sb = sb + Vec::loadu(partial.data() + c * 2 * padded + padded + j);
    }
    const int64_t n = std::min(kLanes, hidden - j);
    simd::store(dweight + j, sw, n);
    simd::store(dbias + j, sb, n);
  }
}

#define RF_INSTANTIATE(T, W)                                                                    \
  template void layer_norm_residual_fwd<T, W>(const T*, const T*, const W*, const W*, T*, float*, \
                                              float*, int64_t, int64_t, float, float, uint64_t); \
  template void layer_norm_residual_bwd<T, W>(const T*, const T*, const T*, const W*,            \
                                              const float*, const float*, T*, T*, W*, W*,        \
                                              int64_t, int64_t, float, uint64_t);

RF_INSTANTIATE(float, float)
RF_INSTANTIATE(c10::Half, c10::Half)
RF_INSTANTIATE(c10::Half, float)
RF_INSTANTIATE(c10::BFloat16, c10::BFloat16)
RF_INSTANTIATE(c10::BFloat16, float)
#undef RF_INSTANTIATE

}  // namespace cpu
}  // namespace roberta_fast
