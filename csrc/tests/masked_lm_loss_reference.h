// The double-precision oracle of the masked-LM cross-entropy row kernels, shared by the CPU test
// (test_masked_lm_loss.cpp) and the CUDA test (test_masked_lm_loss_cuda.cu, host code): both
// kernels must match the same naive loop. Plain C++, header-only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace roberta_fast::testing {

struct MaskedLmLossReference {
  std::vector<double> loss;  // per row; 0 for ignored rows
  std::vector<double> grad;  // rows x vocab, already multiplied by `scale`; 0 for ignored rows
};

// Naive two-pass log-sum-exp in double on the values the kernel sees (after storage rounding):
// `x` holds rows x vocab logits, densely packed. L is the label type (int32 or int64).
template <typename L>
MaskedLmLossReference masked_lm_loss_reference(const std::vector<double>& x,
                                               const std::vector<L>& labels, int64_t rows,
                                               int64_t vocab, int64_t ignore_index,
                                               double scale) {
  MaskedLmLossReference ref{std::vector<double>(rows, 0.0),
                            std::vector<double>(rows * vocab, 0.0)};
  for (int64_t r = 0; r < rows; ++r) {
    if (labels[r] == ignore_index) continue;
    const double* row = &x[r * vocab];
    double m = row[0];
    for (int64_t v = 1; v < vocab; ++v) m = std::max(m, row[v]);
    double s = 0.0;
    for (int64_t v = 0; v < vocab; ++v) s += std::exp(row[v] - m);
    ref.loss[r] = m + std::log(s) - row[labels[r]];
    for (int64_t v = 0; v < vocab; ++v) {
      ref.grad[r * vocab + v] = (std::exp(row[v] - m) / s - (v == labels[r] ? 1.0 : 0.0)) * scale;
    }
  }
  return ref;
}

// ||a - b|| / ||b|| (the absolute norm when b is all zeros); infinite when `a` has a NaN or inf.
inline double relative_error(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den == 0.0 ? std::sqrt(num) : std::sqrt(num / den);
}

}  // namespace roberta_fast::testing
