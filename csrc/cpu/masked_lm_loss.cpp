// CPU row kernel of the masked-LM cross-entropy: see masked_lm_loss.h for the contract.
//
// A row of roberta-base logits is 50265 values (~200 KB in fp32): it stays in L2 from the read
// pass to the write pass, so the row crosses memory once each way. Read pass, per block of
// kBlock elements (in L1): the block's max, then exp(x - block max) summed and, when the gradient
// is wanted, stored as fp32 (in place for fp32 logits, in a per-thread fp32 row otherwise).
// The row's running max and sum combine the blocks. Write pass: each stored exponential times
// one factor per block, exp(block max - row max) * scale / sum: one exp per logit in all.
#include "cpu/simd.h"  // first: it configures ATen's vector headers

#include "cpu/masked_lm_loss.h"
#include "cpu/parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace roberta_fast {
namespace cpu {
namespace {

using simd::kLanes;
using simd::Vec;

constexpr int64_t kBlock = 2048;  // elements per block (8 KB of fp32, in L1)

constexpr float kInf = std::numeric_limits<float>::infinity();

// Largest of x[0 .. n). Four accumulators: the max's latency would bound one chain. A NaN logit
// need not survive here: it reaches the loss through the sum of exponentials.
inline float block_max(const float* x, int64_t n) {
  Vec a(-kInf), b(-kInf), c(-kInf), d(-kInf);
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    a = simd::max_lanes(a, Vec::loadu(x + i));
    b = simd::max_lanes(b, Vec::loadu(x + i + kLanes));
    c = simd::max_lanes(c, Vec::loadu(x + i + 2 * kLanes));
    d = simd::max_lanes(d, Vec::loadu(x + i + 3 * kLanes));
  }
  for (; i < n; i += kLanes) {
    const int64_t k = std::min(kLanes, n - i);
    a = simd::max_lanes(a, Vec::set(Vec(-kInf), Vec::loadu(x + i, k), k));
  }
  return simd::hmax(simd::max_lanes(simd::max_lanes(a, b), simd::max_lanes(c, d)));
}

// Sum of exp(x[i] - m) over i < n; with `out`, the exponentials are stored there (out may be x).
inline float block_sum_exp(const float* x, int64_t n, float m, float* out) {
  const Vec mv(m);
  Vec a(0.0f), b(0.0f);
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const Vec e0 = simd::exp(Vec::loadu(x + i) - mv);
    const Vec e1 = simd::exp(Vec::loadu(x + i + kLanes) - mv);
    if (out) {
      e0.store(out + i);
      e1.store(out + i + kLanes);
    }
    a = a + e0;
    b = b + e1;
  }
  for (; i < n; i += kLanes) {
    const int64_t k = std::min(kLanes, n - i);
    const Vec e = simd::first(simd::exp(Vec::loadu(x + i, k) - mv), k);
    if (out) e.store(out + i, k);
    a = a + e;
  }
  return simd::hsum(a + b);
}

// The block src[0 .. n) as fp32 into dst; returns its largest value (as block_max).
template <typename T>
inline float to_float_max(const T* src, int64_t n, float* dst) {
  Vec a(-kInf), b(-kInf);
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const Vec u = simd::load(src + i), v = simd::load(src + i + kLanes);
    u.store(dst + i);
    v.store(dst + i + kLanes);
    a = simd::max_lanes(a, u);
    b = simd::max_lanes(b, v);
  }
  for (; i < n; i += kLanes) {
    const int64_t k = std::min(kLanes, n - i);
    const Vec u = simd::load(src + i, k);
    u.store(dst + i, k);
    a = simd::max_lanes(a, Vec::set(Vec(-kInf), u, k));
  }
  return simd::hmax(simd::max_lanes(a, b));
}

// dst[i] = src[i] * f for i < n (dst may alias src when T is float).
template <typename T>
inline void scale_store(const float* src, int64_t n, float f, T* dst) {
  const Vec fv(f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) simd::store(dst + i, Vec::loadu(src + i) * fv);
  if (i < n) simd::store(dst + i, Vec::loadu(src + i, n - i) * fv, n - i);
}

template <typename T>
void fill_row(T* row, int64_t vocab, float value) {
  std::fill(row, row + vocab, static_cast<T>(value));
}

// Per-thread scratch: the row as fp32 (half-precision logits only) and the block maxima.
struct RowScratch {
  std::vector<float> row, block_max;
  RowScratch(int64_t vocab, bool need_row)
      : row(need_row ? vocab + kLanes : 0), block_max((vocab + kBlock - 1) / kBlock) {}
};

template <typename T>
void one_row(T* row, int64_t label, int64_t vocab, int64_t ignore_index, float scale,
             bool write_grad, float* loss, RowScratch& scratch) {
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
  constexpr bool kFloat = std::is_same_v<T, float>;
  const float target = static_cast<float>(row[label]);
  // Read pass. A block max is at least the lowest finite float, not -inf, so that -inf logits
  // (a bias banning a token) add exp(-inf) = 0 instead of exp(-inf - -inf) = NaN.
  float m = std::numeric_limits<float>::lowest();
  float s = 0.0f;
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t b0 = blk * kBlock;
    const int64_t n = std::min(kBlock, vocab - b0);
    float* x;  // the block as fp32
    float bm;
    if constexpr (kFloat) {
      x = row + b0;
      bm = block_max(x, n);
    } else {
      x = scratch.row.data() + b0;
      bm = to_float_max(row + b0, n, x);
    }
    bm = bm < std::numeric_limits<float>::lowest() ? std::numeric_limits<float>::lowest() : bm;
    const float bs = block_sum_exp(x, n, bm, write_grad ? x : nullptr);
    scratch.block_max[blk] = bm;
    if (bm > m) {
      s = s * std::exp(m - bm) + bs;
      m = bm;
    } else {
      s += bs * std::exp(bm - m);  // NaN (a NaN logit) propagates to the loss
    }
  }
  // One std::log per row: the loss gets full precision.
  *loss = m + std::log(s) - target;
  if (!write_grad) return;
  // Write pass: softmax * scale, then the one-hot term at the label.
  const float inv = scale / s;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t b0 = blk * kBlock;
    const int64_t n = std::min(kBlock, vocab - b0);
    const float* e;  // the block's stored exponentials
    if constexpr (kFloat) {
      e = row + b0;
    } else {
      e = scratch.row.data() + b0;
    }
    scale_store(e, n, std::exp(scratch.block_max[blk] - m) * inv, row + b0);
  }
  row[label] = static_cast<T>((std::exp(target - m) / s - 1.0f) * scale);
}

}  // namespace

template <typename T, typename L>
void masked_lm_loss_rows(T* logits, const L* labels, int64_t rows, int64_t vocab,
                         int64_t row_stride, int64_t ignore_index, float scale, bool write_grad,
                         float* row_losses) {
  if (rows <= 0) return;
  // A row of a real vocabulary is tens of thousands of elements: one row is already a worthwhile
  // chunk; tiny vocabularies take several rows per chunk.
  const int64_t chunks = std::max<int64_t>(1, std::min(rows, rows * vocab / 4096));
  parallel_chunks(chunks, [&](int64_t c) {
    RowScratch scratch(vocab, !std::is_same_v<T, float>);
    const auto [begin, end] = chunk_rows(rows, chunks, c);
    for (int64_t r = begin; r < end; ++r) {
      one_row<T>(logits + r * row_stride, static_cast<int64_t>(labels[r]), vocab, ignore_index,
                 scale, write_grad, row_losses + r, scratch);
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
