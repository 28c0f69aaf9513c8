// CPU row kernel of the masked-LM cross-entropy: see masked_lm_loss.h for the contract.
//
// A row of roberta-base logits is 50265 floats (~200 KB): it stays in L2 between the read pass
// (block-wise online max + sum of exponentials) and the write pass (gradient). The inner loops use
// GCC/Clang vector extensions with a branch-free polynomial exp: the compiler maps them to AVX2 /
// AVX-512 / SSE as -march allows, where std::exp would keep the loops scalar.
#include "cpu/masked_lm_loss.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

namespace roberta_fast {
namespace cpu {
namespace {

constexpr int kW = 8;             // lanes per vector (32 bytes)
constexpr int64_t kBlock = 1024;  // elements converted/scanned per block (4 KB of fp32, in L1)

typedef float VecF __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kW * sizeof(int32_t))));

constexpr float kInf = std::numeric_limits<float>::infinity();

inline VecF splat(float x) { return VecF{} + x; }

inline VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The first n < kW elements of p, the rest filled with `fill`.
inline VecF load_partial(const float* p, int64_t n, float fill) {
  float tmp[kW];
  for (int l = 0; l < kW; ++l) tmp[l] = l < n ? p[l] : fill;
  return load(tmp);
}

inline void store(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }

inline float hmax(VecF v) {
  float m = v[0];
  for (int l = 1; l < kW; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

inline float hsum(VecF v) {
  float s = 0.0f;
  for (int l = 0; l < kW; ++l) s += v[l];
  return s;
}

// exp(x) for x <= 0 (the arguments are always logit - running max), within ~1 ulp in fp32.
// Range reduction x = k ln2 + r with |r| <= ln2/2 (k rounded by the 1.5 * 2^23 trick), a
// degree-7 Taylor polynomial, and 2^k built from exponent bits. Below -87 the result is 0
// (exp(-87) ~ 1.6e-38 is negligible next to the row's largest term, which is 1). NaN propagates.
inline VecF exp_nonpos(VecF x) {
  const VecI tiny = x < splat(-87.0f);
  const VecF xc = tiny ? splat(-87.0f) : x;
  const VecF magic = splat(12582912.0f);
  const VecF t = xc * splat(1.44269504088896341f) + magic;
  const VecF kf = t - magic;
  const VecI k = (VecI)t - (VecI)magic;
  // ln2 split in two so that kf * ln2_hi is exact.
  const VecF r = (xc - kf * splat(0.693145751953125f)) - kf * splat(1.428606765330187e-06f);
  VecF p = splat(1.0f / 5040.0f);
  p = p * r + splat(1.0f / 720.0f);
  p = p * r + splat(1.0f / 120.0f);
  p = p * r + splat(1.0f / 24.0f);
  p = p * r + splat(1.0f / 6.0f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const VecF two_k = (VecF)((k + 127) << 23);
  return tiny ? splat(0.0f) : p * two_k;
}

inline float exp_nonpos(float x) { return exp_nonpos(splat(x))[0]; }

inline float block_max(const float* x, int64_t n) {
  VecF a = splat(-kInf), b = splat(-kInf);
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    const VecF u = load(x + i), v = load(x + i + kW);
    a = u > a ? u : a;
    b = v > b ? v : b;
  }
  for (; i + kW <= n; i += kW) {
    const VecF u = load(x + i);
    a = u > a ? u : a;
  }
  if (i < n) {
    const VecF u = load_partial(x + i, n - i, -kInf);
    b = u > b ? u : b;
  }
  return hmax(a > b ? a : b);
}

inline float block_sum_exp(const float* x, int64_t n, float m) {
  const VecF mv = splat(m);
  VecF a = splat(0.0f), b = splat(0.0f);
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    a += exp_nonpos(load(x + i) - mv);
    b += exp_nonpos(load(x + i + kW) - mv);
  }
  for (; i + kW <= n; i += kW) a += exp_nonpos(load(x + i) - mv);
  if (i < n) b += exp_nonpos(load_partial(x + i, n - i, -kInf) - mv);
  return hsum(a + b);
}

// out[i] = exp(x[i] - m) * inv for i < n (out may alias x).
inline void block_softmax(const float* x, int64_t n, float m, float inv, float* out) {
  const VecF mv = splat(m), iv = splat(inv);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store(out + i, exp_nonpos(load(x + i) - mv) * iv);
  if (i < n) {
    float tmp[kW];
    store(tmp, exp_nonpos(load_partial(x + i, n - i, -kInf) - mv) * iv);
    for (int64_t l = 0; l < n - i; ++l) out[i + l] = tmp[l];
  }
}

template <typename T>
void fill_row(T* row, int64_t vocab, float value) {
  std::fill(row, row + vocab, static_cast<T>(value));
}

template <typename T, typename L>
void one_row(T* row, int64_t label, int64_t vocab, int64_t ignore_index, float scale,
             bool write_grad, float* loss) {
  if (label == ignore_index) {
    *loss = 0.0f;
    if (write_grad) fill_row(row, vocab, 0.0f);
    return;
  }
  if (label < 0 || label >= vocab) {
    *loss = std::numeric_limits<float>::quiet_NaN();
    if (write_grad) fill_row(row, vocab, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  alignas(64) float buf[kBlock];
  // The block [b0, b0 + n) as fp32: the row itself for float, else a converted copy in buf.
  auto block = [&](int64_t b0, int64_t n) -> const float* {
    if constexpr (std::is_same_v<T, float>) {
      return row + b0;
    } else {
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[b0 + i]);
      return buf;
    }
  };
  // Read pass: per block, its max; the running sum is rescaled only when the max grows. The max
  // starts at the lowest finite float, not -inf, so that -inf logits (a bias banning a token) add
  // exp(-inf) = 0 instead of exp(-inf - -inf) = NaN.
  float m = std::numeric_limits<float>::lowest();
  float s = 0.0f;
  for (int64_t b0 = 0; b0 < vocab; b0 += kBlock) {
    const int64_t n = std::min(kBlock, vocab - b0);
    const float* x = block(b0, n);
    const float bm = block_max(x, n);
    if (bm > m) {
      s *= exp_nonpos(m - bm);
      m = bm;
    }
    s += block_sum_exp(x, n, m);
  }
  const float target = static_cast<float>(row[label]);
  // One std::log per row: the loss gets full precision.
  *loss = m + std::log(s) - target;
  if (!write_grad) return;
  // Write pass: softmax * scale, then the one-hot term at the label.
  const float inv = scale / s;
  for (int64_t b0 = 0; b0 < vocab; b0 += kBlock) {
    const int64_t n = std::min(kBlock, vocab - b0);
    if constexpr (std::is_same_v<T, float>) {
      block_softmax(row + b0, n, m, inv, row + b0);
    } else {
      const float* x = block(b0, n);
      block_softmax(x, n, m, inv, buf);
      for (int64_t i = 0; i < n; ++i) row[b0 + i] = static_cast<T>(buf[i]);
    }
  }
  row[label] = static_cast<T>((exp_nonpos(target - m) / s - 1.0f) * scale);
}

}  // namespace

template <typename T, typename L>
void masked_lm_loss_rows(T* logits, const L* labels, int64_t rows, int64_t vocab,
                         int64_t row_stride, int64_t ignore_index, float scale, bool write_grad,
                         float* row_losses) {
  if (rows <= 0) return;
  // A row is tens of thousands of elements: one row is already a worthwhile task.
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      one_row<T, L>(logits + r * row_stride, static_cast<int64_t>(labels[r]), vocab, ignore_index,
                    scale, write_grad, row_losses + r);
    }
  });
}

#define ROBERTA_FAST_MLM_INSTANTIATE(T, L)                                                   \
  template void masked_lm_loss_rows<T, L>(T*, const L*, int64_t, int64_t, int64_t, int64_t, \
                                          float, bool, float*);
ROBERTA_FAST_MLM_INSTANTIATE(float, int32_t)
ROBERTA_FAST_MLM_INSTANTIATE(float, int64_t)
ROBERTA_FAST_MLM_INSTANTIATE(c10::Half, int32_t)
ROBERTA_FAST_MLM_INSTANTIATE(c10::Half, int64_t)
ROBERTA_FAST_MLM_INSTANTIATE(c10::BFloat16, int32_t)
ROBERTA_FAST_MLM_INSTANTIATE(c10::BFloat16, int64_t)
#undef ROBERTA_FAST_MLM_INSTANTIATE

}  // namespace cpu
}  // namespace roberta_fast
