// CPU kernels of fused residual + LayerNorm (+ dropout). See layer_norm_residual.h.
//
// One pass over x/residual per row: s = dropout(x) + residual goes to a per-thread fp32 scratch
// row, the statistics are two-pass on that row (in cache), then y is written. The loops are plain
// arrays so that GCC vectorizes them; reductions keep kLanes partial sums because a single float
// accumulator can neither be vectorized (no -ffast-math) nor be as accurate.
#include "cpu/layer_norm_residual.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>

#include "common/philox.h"

namespace roberta_fast {
namespace cpu {
namespace {

constexpr int64_t kLanes = 16;       // partial sums per reduction (two AVX2 registers)
constexpr int64_t kRandBlock = 64;   // Philox counters (4 elements each) per vectorized block

// Philox for n <= kRandBlock consecutive counters whose low words do not wrap: the high word is
// then one constant, so the loop is pure 32-bit lanes and vectorizes. All four output words are
// kept, interleaved: element 4 * j + i of `words` is word i of counter `counter + j`.
inline void random_block(uint64_t seed, uint64_t counter, int64_t n, uint32_t* words) {
  const uint32_t lo = static_cast<uint32_t>(counter);
  const uint32_t hi = static_cast<uint32_t>(counter >> 32);
  const uint32_t key0 = static_cast<uint32_t>(seed);
  const uint32_t key1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t j = 0; j < n; ++j) {
    uint32_t c0 = lo + static_cast<uint32_t>(j);
    uint32_t c1 = hi;
    uint32_t c2 = 0u;
    uint32_t c3 = 0u;
    uint32_t k0 = key0;
    uint32_t k1 = key1;
    for (int round = 0; round < philox::kRounds; ++round) {
      const uint64_t pa = static_cast<uint64_t>(philox::kRoundA) * c0;
      const uint64_t pb = static_cast<uint64_t>(philox::kRoundB) * c2;
      c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
      c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(pb);
      c3 = static_cast<uint32_t>(pa);
      k0 += philox::kKeyA;
      k1 += philox::kKeyB;
    }
    words[4 * j] = c0;
    words[4 * j + 1] = c1;
    words[4 * j + 2] = c2;
    words[4 * j + 3] = c3;
  }
}

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// The row as fp32: the input itself for float, else converted into `buf`.
template <typename T>
inline const float* as_float(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    (void)n;
    (void)buf;
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = to_float(src[j]);
    return buf;
  }
}

// Sum of a[j] (and of a[j] * b[j]) with kLanes partial sums.
inline float lane_sum(const float* a, int64_t n) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += a[j + k];
  for (int64_t k = 0; j < n; ++j, ++k) acc[k] += a[j];
  float total = 0.0f;
  for (int64_t k = 0; k < kLanes; ++k) total += acc[k];
  return total;
}

inline float lane_sum_sq_dev(const float* a, float center, int64_t n) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) {
      const float d = a[j + k] - center;
      acc[k] += d * d;
    }
  for (int64_t k = 0; j < n; ++j, ++k) {
    const float d = a[j] - center;
    acc[k] += d * d;
  }
  float total = 0.0f;
  for (int64_t k = 0; k < kLanes; ++k) total += acc[k];
  return total;
}

inline void lane_sum2(const float* a, const float* b, int64_t n, float* sum_a, float* sum_ab) {
  float acc_a[kLanes] = {};
  float acc_ab[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) {
      acc_a[k] += a[j + k];
      acc_ab[k] += a[j + k] * b[j + k];
    }
  for (int64_t k = 0; j < n; ++j, ++k) {
    acc_a[k] += a[j];
    acc_ab[k] += a[j] * b[j];
  }
  float ta = 0.0f, tab = 0.0f;
  for (int64_t k = 0; k < kLanes; ++k) {
    ta += acc_a[k];
    tab += acc_ab[k];
  }
  *sum_a = ta;
  *sum_ab = tab;
}

// s = dropout(x) + residual for one row into `s` (fp32).
template <typename T>
inline void residual_row(const T* x, const T* r, float* s, float* scales, float* xbuf,
                         float* rbuf, int64_t row, int64_t hidden, bool dropout, float p,
                         uint64_t seed) {
  const float* xf = as_float(x, hidden, xbuf);
  const float* rf = as_float(r, hidden, rbuf);
  if (dropout) {
    dropout_scales(seed, static_cast<uint64_t>(row) * static_cast<uint64_t>(hidden), hidden, p,
                   scales);
    for (int64_t j = 0; j < hidden; ++j) s[j] = xf[j] * scales[j] + rf[j];
  } else {
    for (int64_t j = 0; j < hidden; ++j) s[j] = xf[j] + rf[j];
  }
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
    for (int64_t j = 0; j < n; ++j) buf[j] = to_float(w[j]);
    return buf.data();
  }
}

// One backward row: s -> xhat in place, g = dy * w, and the row's share of dweight/dbias.
inline void normalize_and_accumulate(float* __restrict xhat, const float* __restrict dy,
                                     const float* __restrict w, float* __restrict g,
                                     float* __restrict dw, float* __restrict db, float mu,
                                     float rs, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = (xhat[j] - mu) * rs;
    xhat[j] = v;
    g[j] = dy[j] * w[j];
    dw[j] += dy[j] * v;
    db[j] += dy[j];
  }
}

}  // namespace

void dropout_scales(uint64_t seed, uint64_t offset, int64_t n, float p, float* out) {
  const float scale = 1.0f / (1.0f - p);
  uint32_t words[4 * kRandBlock];
  int64_t j = 0;
  while (j < n) {
    const uint64_t start = offset + static_cast<uint64_t>(j);
    const uint64_t counter = start >> 2;
    const int64_t skip = static_cast<int64_t>(start & 3);  // words of the first counter not ours
    int64_t groups = std::min<int64_t>(kRandBlock, (n - j + skip + 3) / 4);
    // Counters whose low word wraps inside the block: split there.
    const uint64_t to_wrap = (uint64_t{1} << 32) - (counter & 0xffffffffull);
    if (static_cast<uint64_t>(groups) > to_wrap) groups = static_cast<int64_t>(to_wrap);
    random_block(seed, counter, groups, words);
    const int64_t len = std::min<int64_t>(4 * groups - skip, n - j);
    for (int64_t k = 0; k < len; ++k) {
      out[j + k] = philox::bits_to_uniform(words[skip + k]) > p ? scale : 0.0f;
    }
    j += len;
  }
}

template <typename T, typename W>
void layer_norm_residual_fwd(const T* x, const T* residual, const W* weight, const W* bias, T* y,
                             float* mean, float* rstd, int64_t rows, int64_t hidden, float eps,
                             float dropout_p, uint64_t seed) {
  if (rows <= 0 || hidden <= 0) return;
  std::vector<float> wbuf, bbuf;
  const float* w = params_as_float(weight, hidden, wbuf);
  const float* b = params_as_float(bias, hidden, bbuf);
  const bool dropout = dropout_p > 0.0f;
  const float inv_h = 1.0f / static_cast<float>(hidden);
  const int64_t grain = std::max<int64_t>(1, 16384 / hidden);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // Scratch: s, dropout scales, and fp32 copies of x/residual for half inputs.
    std::vector<float> scratch(4 * hidden);
    float* s = scratch.data();
    float* scales = s + hidden;
    float* xbuf = scales + hidden;
    float* rbuf = xbuf + hidden;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * hidden;
      residual_row(x + base, residual + base, s, scales, xbuf, rbuf, row, hidden, dropout,
                   dropout_p, seed);
      const float mu = lane_sum(s, hidden) * inv_h;
      const float var = lane_sum_sq_dev(s, mu, hidden) * inv_h;
      const float rs = 1.0f / std::sqrt(var + eps);
      T* out = y + base;
      for (int64_t j = 0; j < hidden; ++j)
        out[j] = static_cast<T>((s[j] - mu) * rs * w[j] + b[j]);
      mean[row] = mu;
      rstd[row] = rs;
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
  const bool dropout = dropout_p > 0.0f;
  const float inv_h = 1.0f / static_cast<float>(hidden);
  // Fixed chunks of rows, each with its own partial dweight/dbias row, summed afterwards: the
  // result does not depend on thread scheduling and no two threads write one accumulator.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
  std::vector<float> partial(2 * chunks * hidden, 0.0f);
  if (rows > 0) {
    at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
      std::vector<float> scratch(6 * hidden);
      float* xhat = scratch.data();
      float* scales = xhat + hidden;
      float* xbuf = scales + hidden;
      float* rbuf = xbuf + hidden;
      float* g = rbuf + hidden;
      float* dybuf = g + hidden;
      for (int64_t c = cbegin; c < cend; ++c) {
        float* dw = partial.data() + c * 2 * hidden;
        float* db = dw + hidden;
        const int64_t row_begin = rows * c / chunks;
        const int64_t row_end = rows * (c + 1) / chunks;
        for (int64_t row = row_begin; row < row_end; ++row) {
          const int64_t base = row * hidden;
          residual_row(x + base, residual + base, xhat, scales, xbuf, rbuf, row, hidden, dropout,
                       dropout_p, seed);
          const float mu = mean[row];
          const float rs = rstd[row];
          const float* dyf = as_float(dy + base, hidden, dybuf);
          normalize_and_accumulate(xhat, dyf, w, g, dw, db, mu, rs, hidden);
          float sum_g, sum_gx;
          lane_sum2(g, xhat, hidden, &sum_g, &sum_gx);
          const float a = sum_g * inv_h;
          const float bcoef = sum_gx * inv_h;
          T* dres = dresidual + base;
          if (dropout) {
            T* dxr = dx + base;
            for (int64_t j = 0; j < hidden; ++j) {
              const float ds = rs * (g[j] - a - xhat[j] * bcoef);
              dres[j] = static_cast<T>(ds);
              dxr[j] = static_cast<T>(ds * scales[j]);
            }
          } else {
            for (int64_t j = 0; j < hidden; ++j)
              dres[j] = static_cast<T>(rs * (g[j] - a - xhat[j] * bcoef));
          }
        }
      }
    });
  }
  for (int64_t j = 0; j < hidden; ++j) {
    float sw = 0.0f, sb = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) {
      sw += partial[c * 2 * hidden + j];
      sb += partial[c * 2 * hidden + hidden + j];
    }
    dweight[j] = static_cast<W>(sw);
    dbias[j] = static_cast<W>(sb);
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
