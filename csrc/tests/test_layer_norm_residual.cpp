// CPU kernels of fused residual + LayerNorm against a naive double-precision loop, and
// csrc/common/philox.h against values of Triton's tl.rand (taken under TRITON_INTERPRET=1).
// The shapes cover the vector tails (H % 16 != 0, H % 8 != 0) and rows that start inside a
// Philox counter (H % 4 != 0). Exits non-zero if a check failed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "common/philox.h"
#include "cpu/layer_norm_residual.h"

namespace {

using roberta_fast::philox::keep;
using roberta_fast::philox::uniform;

int failures = 0;

void check(bool ok, const char* what, double got = 0.0, double want = 0.0) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s (got %.9g, want %.9g)\n", what, got, want);
  }
}

uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

// (seed, counter) -> first Philox word and the bits of tl.rand's float, from Triton 3.9.
struct KnownAnswer {
  uint64_t seed, offset;
  uint32_t bits, uniform_bits;
};
const KnownAnswer kTritonRand[] = {
    {0x0ull, 0x0ull, 0x6627e8d5u, 0x3f4c4fd1u},
    {0x0ull, 0x1ull, 0xf8e4cca4u, 0x3d63666au},
    {0x1ull, 0x0ull, 0xe3e80670u, 0x3e60bfcbu},
    {0x2aull, 0x7ull, 0x5bbd83b1u, 0x3f377b06u},
    {0x3039ull, 0x0ull, 0xd1fa3e81u, 0x3eb81705u},
    {0x3039ull, 0x2ffull, 0xf0b9f0ceu, 0x3df460f2u},
    {0x3039ull, 0xbfffffull, 0xc9765de0u, 0x3eda2687u},
    {0xe5f4c8f743ull, 0x1cbe991a14ull, 0xd6cb4243u, 0x3ea4d2f6u},
    {0x10000000003ull, 0x10000000011ull, 0xd3fb317du, 0x3eb01339u},
    {0x123456789abcdefull, 0xffffffffull, 0x073402a4u, 0x3d668053u},
    {0x123456789abcdefull, 0x100000000ull, 0xd9412d6au, 0x3e9afb49u},
    {0x3fffffffffffffffull, 0x200000005ull, 0x8ac44b57u, 0x3f6a7768u},
};

// (seed, element offset) -> bits of the element's uniform float: word offset & 3 of
// tl.randint4x(seed, offset >> 2) through tl.uint_to_uniform_float, from Triton 3.9.
struct ElementAnswer {
  uint64_t seed, offset;
  uint32_t uniform_bits;
};
const ElementAnswer kTritonElement[] = {
    {0x0ull, 0x0ull, 0x3f4c4fd1u},
    {0x0ull, 0x1ull, 0x3e74b1d3u},
    {0x0ull, 0x2ull, 0x3f0750a6u},
    {0x0ull, 0x3ull, 0x3f49fe47u},
    {0x1ull, 0x4ull, 0x3f27efd7u},
    {0x2aull, 0x7ull, 0x3f689c0du},
    {0x3039ull, 0x2ffull, 0x3ee153b7u},
    {0x3039ull, 0xbfffffull, 0x3f09ec41u},
    {0xe5f4c8f743ull, 0x1cbe991a14ull, 0x3f02c1c5u},
    {0x10000000003ull, 0x10000000011ull, 0x3f706ea1u},
    {0x123456789abcdefull, 0x3ffffffffull, 0x3ec94116u},
    {0x123456789abcdefull, 0x400000002ull, 0x3f4572bfu},
    {0x3fffffffffffffffull, 0x200000005ull, 0x3ed5f5fdu},
};

void test_philox_known_answers() {
  for (const KnownAnswer& k : kTritonRand) {
    const uint32_t bits = roberta_fast::philox::random_words(k.seed, k.offset).w[0];
    check(bits == k.bits, "philox bits == Triton's", bits, k.bits);
    check(float_bits(roberta_fast::philox::bits_to_uniform(bits)) == k.uniform_bits,
          "uniform == tl.rand", bits, 0.0);
  }
  for (const ElementAnswer& k : kTritonElement) {
    check(float_bits(uniform(k.seed, k.offset)) == k.uniform_bits,
          "element uniform == Triton's randint4x word", uniform(k.seed, k.offset), 0.0);
  }
}

// The vectorized keep bits equal the scalar rule: rows that start inside a counter, and runs
// of counters across a wrap of the counter's low word (offsets near 2^34) and of the element
// offset's low word (near 2^32).
void test_dropout_scales() {
  const float p = 0.3f;
  const float scale = 1.0f / (1.0f - p);
  for (uint64_t start : {uint64_t{0}, uint64_t{12345}, (uint64_t{1} << 32) - 37,
                         (uint64_t{7} << 32) - 1, (uint64_t{1} << 34) - 37,
                         (uint64_t{5} << 34) - 3, (uint64_t{3} << 34) - 64}) {
    const int64_t n = 201;
    std::vector<float> out(n, -1.0f);
    roberta_fast::cpu::dropout_scales(0x5eed1234abcdull, start, n, p, out.data());
    int64_t kept = 0;
    for (int64_t j = 0; j < n; ++j) {
      const bool k = keep(0x5eed1234abcdull, start + j, p);
      kept += k;
      check(out[j] == (k ? scale : 0.0f), "dropout_scales == philox::keep", out[j], k);
    }
    check(kept > 100 && kept < 181, "kept fraction near 0.7", kept, 0.7 * n);
  }
}

// The integer threshold is the float rule exactly: the last dropped folded word maps to a
// uniform <= p and the next one to a uniform > p, for p on and between the grid of uniforms.
void test_dropout_threshold() {
  using roberta_fast::philox::bits_to_uniform;
  std::vector<float> ps = {1e-9f, 0.1f, 0.25f, 0.3f, 0.5f, 0.9f, 0.99999994f};
  for (uint32_t f : {1u, 1000u, 214748364u, 1073741824u, 2147483000u})
    ps.push_back(bits_to_uniform(f));  // p equal to a uniform: that word is dropped
  for (float p : ps) {
    const int64_t last = roberta_fast::cpu::dropout_last_dropped(p);
    check(last >= -1 && last <= 2147483647, "threshold in range", last, p);
    if (last >= 0) check(bits_to_uniform(static_cast<uint32_t>(last)) <= p, "last dropped <= p",
                         bits_to_uniform(static_cast<uint32_t>(last)), p);
    if (last < 2147483647)
      check(bits_to_uniform(static_cast<uint32_t>(last + 1)) > p, "next kept > p",
            bits_to_uniform(static_cast<uint32_t>(last + 1)), p);
  }
}

// Naive reference in R: s = x * m / (1 - p) + r, LayerNorm, and its gradients. In double it is
// the oracle; in float, plain fp32 code, whose error sets the bar where a row of few elements is
// so ill-conditioned that 2e-6 is out of reach of any fp32 kernel.
// dw_abs / db_abs hold the column sums of |term|: a summation's rounding error scales with them, not
// with the (possibly cancelling) sum itself, so the reduced gradients are judged against them.
template <typename R>
struct Reference {
  std::vector<R> y, dx, dres, dw, db, dw_abs, db_abs;
};

template <typename R>
Reference<R> reference(const std::vector<float>& x, const std::vector<float>& r,
                    const std::vector<float>& w, const std::vector<float>& b,
                    const std::vector<float>& dy, int64_t rows, int64_t h, double eps, float p,
                    uint64_t seed) {
  Reference<R> out;
  out.y.assign(rows * h, R(0));
  out.dx.assign(rows * h, R(0));
  out.dres.assign(rows * h, R(0));
  out.dw.assign(h, R(0));
  out.db.assign(h, R(0));
  out.dw_abs.assign(h, R(0));
  out.db_abs.assign(h, R(0));
  std::vector<R> s(h), m(h), xhat(h), g(h);
  const R kept = p > 0.0f ? static_cast<R>(1.0f / (1.0f - p)) : R(1);
  for (int64_t i = 0; i < rows; ++i) {
    R mean = 0;
    for (int64_t j = 0; j < h; ++j) {
      const int64_t o = i * h + j;
      // The multiplier as the kernels hold it, an fp32 1 / (1 - p): a row of few elements is
      // ill-conditioned enough that its rounding would otherwise count as the kernel's error.
      m[j] = p > 0.0f ? (keep(seed, static_cast<uint64_t>(o), p) ? kept : R(0)) : R(1);
      s[j] = x[o] * m[j] + r[o];
      mean += s[j];
    }
    mean /= h;
    R var = 0;
    for (int64_t j = 0; j < h; ++j) var += (s[j] - mean) * (s[j] - mean);
    var /= h;
    const R rstd = R(1) / std::sqrt(var + static_cast<R>(eps));
    R sum_g = 0, sum_gx = 0;
    for (int64_t j = 0; j < h; ++j) {
      const int64_t o = i * h + j;
      xhat[j] = (s[j] - mean) * rstd;
      out.y[o] = xhat[j] * w[j] + b[j];
      g[j] = dy[o] * w[j];
      sum_g += g[j];
      sum_gx += g[j] * xhat[j];
      out.dw[j] += dy[o] * xhat[j];
      out.db[j] += dy[o];
      out.dw_abs[j] += std::fabs(dy[o] * xhat[j]);
      out.db_abs[j] += std::fabs(dy[o]);
    }
    for (int64_t j = 0; j < h; ++j) {
      const int64_t o = i * h + j;
      out.dres[o] = rstd * (g[j] - sum_g / h - xhat[j] * sum_gx / h);
      out.dx[o] = out.dres[o] * m[j];
    }
  }
  return out;
}

// ||got - want|| / ||scale||, with scale = want unless given (NaN or inf in got: infinite error).
template <typename T>
double rel_err(const std::vector<T>& got, const std::vector<double>& want,
               const std::vector<double>* scale = nullptr) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = static_cast<float>(got[i]);
    if (!std::isfinite(g)) return INFINITY;
    const double ref_i = scale ? (*scale)[i] : want[i];
    num += (g - want[i]) * (g - want[i]);
    den += ref_i * ref_i;
  }
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

// One case in I/O dtype T with weights W; inputs are rounded to T first so that the double
// reference sees exactly the kernel's inputs.
template <typename T, typename W>
void test_case(const char* name, int64_t rows, int64_t h, float p, double tol, std::mt19937& gen) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n = rows * h;
  std::vector<T> x(n), r(n), dy(n), y(n), dres(n), dx(n);
  std::vector<W> w(h), b(h), dw(h), db(h);
  std::vector<float> xf(n), rf(n), dyf(n), wf(h), bf(h);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<T>(normal(gen));
    r[i] = static_cast<T>(normal(gen));
    dy[i] = static_cast<T>(normal(gen));
    xf[i] = static_cast<float>(x[i]);
    rf[i] = static_cast<float>(r[i]);
    dyf[i] = static_cast<float>(dy[i]);
  }
  for (int64_t j = 0; j < h; ++j) {
    w[j] = static_cast<W>(1.0f + 0.5f * normal(gen));
    b[j] = static_cast<W>(0.5f * normal(gen));
    wf[j] = static_cast<float>(w[j]);
    bf[j] = static_cast<float>(b[j]);
  }
  const uint64_t seed = (static_cast<uint64_t>(gen()) << 30) ^ gen();
  const float nan = std::nanf("");
  std::vector<float> mean(rows, nan), rstd(rows, nan);
  for (auto* v : {&y, &dres, &dx}) std::fill(v->begin(), v->end(), static_cast<T>(nan));
  std::fill(dw.begin(), dw.end(), static_cast<W>(nan));
  std::fill(db.begin(), db.end(), static_cast<W>(nan));

  const double eps = 1e-5;
  roberta_fast::cpu::layer_norm_residual_fwd<T, W>(x.data(), r.data(), w.data(), b.data(),
                                                   y.data(), mean.data(), rstd.data(), rows, h,
                                                   static_cast<float>(eps), p, seed);
  roberta_fast::cpu::layer_norm_residual_bwd<T, W>(
      dy.data(), x.data(), r.data(), w.data(), mean.data(), rstd.data(), dres.data(),
      p > 0.0f ? dx.data() : nullptr, dw.data(), db.data(), rows, h, p, seed);
  const Reference<double> ref = reference<double>(xf, rf, wf, bf, dyf, rows, h, eps, p, seed);
  const Reference<float> base = reference<float>(xf, rf, wf, bf, dyf, rows, h, eps, p, seed);

  char what[160];
  auto errs_of = [&](const auto& y_, const auto& dres_, const auto& dx_, const auto& dw_,
                     const auto& db_) {
    return std::vector<double>{rel_err(y_, ref.y), rel_err(dres_, ref.dres),
                               p > 0.0f ? rel_err(dx_, ref.dx) : 0.0,
                               rel_err(dw_, ref.dw, &ref.dw_abs), rel_err(db_, ref.db, &ref.db_abs)};
  };
  const std::vector<double> errs = errs_of(y, dres, dx, dw, db);
  const std::vector<double> base_errs = errs_of(base.y, base.dres, base.dx, base.dw, base.db);
  const char* names[] = {"y", "dresidual", "dx", "dweight", "dbias"};
  for (int k = 0; k < 5; ++k) {
    const double allowed = std::max(tol, 2.0 * base_errs[k]);
    std::snprintf(what, sizeof(what), "%s rows=%lld H=%lld p=%.2f: %s rel err", name,
                  static_cast<long long>(rows), static_cast<long long>(h), p, names[k]);
    check(errs[k] < allowed, what, errs[k], allowed);
  }
  // The kernel's dropout mask is the Philox rule: dropped elements get exactly zero dx.
  if (p > 0.0f) {
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; ++i) {
      const bool k = keep(seed, static_cast<uint64_t>(i), p);
      if (!k && static_cast<float>(dx[i]) != 0.0f) ++wrong;
    }
    std::snprintf(what, sizeof(what), "%s rows=%lld H=%lld: dropped elements have dx == 0", name,
                  static_cast<long long>(rows), static_cast<long long>(h));
    check(wrong == 0, what, static_cast<double>(wrong), 0.0);
  }
}

}  // namespace

int main() {
  std::printf("vector level of the kernels: %s\n", roberta_fast::cpu::layer_norm_residual_vector_level());
  test_philox_known_answers();
  test_dropout_scales();
  test_dropout_threshold();
  std::mt19937 gen(std::random_device{}());
  for (int64_t rows : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{97}}) {
    for (int64_t h : {int64_t{1}, int64_t{3}, int64_t{15}, int64_t{16}, int64_t{17}, int64_t{33},
                      int64_t{100}, int64_t{768}, int64_t{1000}, int64_t{1024}}) {
      for (float p : {0.0f, 0.25f}) {
        test_case<float, float>("fp32", rows, h, p, 2e-6, gen);
        test_case<c10::Half, c10::Half>("fp16", rows, h, p, 2e-3, gen);
        test_case<c10::Half, float>("fp16/fp32 params", rows, h, p, 2e-3, gen);
        test_case<c10::BFloat16, c10::BFloat16>("bf16", rows, h, p, 1.6e-2, gen);
        test_case<c10::BFloat16, float>("bf16/fp32 params", rows, h, p, 1.6e-2, gen);
      }
    }
  }
  test_case<float, float>("fp32", 3, 4096, 0.1f, 2e-6, gen);
  test_case<c10::BFloat16, c10::BFloat16>("bf16", 5, 4099, 0.1f, 1.6e-2, gen);
  if (failures) {
    std::printf("%d checks failed\n", failures);
    return 1;
  }
  std::printf("all layer_norm_residual CPU checks passed\n");
  return 0;
}
