// CPU kernels of fused residual + LayerNorm (+ dropout). See layer_norm_residual.h.
//
// Memory-bound: per row the forward reads x and residual once and writes y once, the backward
// reads dy, x and residual once and writes dresidual (and dx) once. Everything else stays in L1:
// the row of s = dropout(x) + residual (fp32), the row's dropout keep bits, and in the backward
// the per-thread fp32 partial sums of dweight/dbias, reduced in a fixed order at the end.
//
// Dropout: the row's keep bits are drawn into an L1 bit array by csrc/cpu/philox_simd.h (16
// Philox counters per AVX-512 vector, four vectors in flight). Philox is most of the arithmetic:
// about as much as all the rest of a bf16 row.
#include "cpu/simd.h"  // first: it configures ATen's vector headers

#include "cpu/layer_norm_residual.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/philox_simd.h"

namespace roberta_fast {
namespace cpu {
namespace {

using simd::kLanes;
using simd::Vec;

using philox_simd::Dropout;
using philox_simd::fill_keep_bits;
using philox_simd::keep_bits_words;
using philox_simd::lane_bits;

// weight/bias as fp32 arrays (converted once per call when W is a half type).
template <typename W>
inline const float* params_as_float(const W* w, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<W, float>) {
    (void)n;
    (void)buf;
    return w;
  } else {
    buf.resize(n);
    simd::convert(w, buf.data(), n);
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

int32_t dropout_last_dropped(float p) { return philox_simd::last_dropped(p); }

const char* layer_norm_residual_vector_level() { return simd::level(); }

void dropout_scales(uint64_t seed, uint64_t offset, int64_t n, float p, float* out) {
  philox_simd::multipliers(Dropout(p, seed), offset, n, out);
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
