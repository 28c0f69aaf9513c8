// ctest: the CPU masked-LM cross-entropy row kernel against a naive double-precision loop.
// Covers vocabularies of 1, 7, 1000 and 50265 and around the vector width (15, 17) and the
// kernel's 2048-element blocks (2048, 2049, 4097), logits of magnitude ~1e4, ignored rows, a bad
// label (NaN row, never an out-of-bounds read), padded row strides (padding left untouched),
// int32 and int64 labels, fp16/bf16 storage, and -inf logits filling whole blocks. Exits
// non-zero on any mismatch.
#include "cpu/masked_lm_loss.h"
#include "masked_lm_loss_reference.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

using roberta_fast::cpu::masked_lm_loss_rows;
using roberta_fast::testing::masked_lm_loss_reference;
using roberta_fast::testing::MaskedLmLossReference;
using roberta_fast::testing::relative_error;

int failures = 0;
std::mt19937_64 rng{std::random_device{}()};

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

template <typename T, typename L>
void run_case(const char* tname, int64_t rows, int64_t vocab, int64_t pad, double magnitude,
              double tol) {
  const int64_t stride = vocab + pad;
  const int64_t ignore_index = -100;
  std::normal_distribution<double> normal(0.0, magnitude);
  std::uniform_int_distribution<int64_t> pick(0, vocab - 1);
  std::vector<T> logits(rows * stride);
  std::vector<double> seen(rows * vocab);
  const T pad_value = static_cast<T>(12345.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t v = 0; v < stride; ++v) {
      if (v < vocab) {
        logits[r * stride + v] = static_cast<T>(static_cast<float>(normal(rng)));
        seen[r * vocab + v] = static_cast<double>(static_cast<float>(logits[r * stride + v]));
      } else {
        logits[r * stride + v] = pad_value;
      }
    }
  }
  std::vector<L> labels(rows);
  std::vector<int64_t> labels64(rows);
  int64_t labelled = 0;
  for (int64_t r = 0; r < rows; ++r) {
    // Every third row is ignored; the others carry a random label (sometimes the row's max).
    labels64[r] = (r % 3 == 1) ? ignore_index : pick(rng);
    labels[r] = static_cast<L>(labels64[r]);
    labelled += labels64[r] != ignore_index;
  }
  const double scale = 1.0 / std::max<int64_t>(labelled, 1);
  const MaskedLmLossReference ref =
      masked_lm_loss_reference(seen, labels64, rows, vocab, ignore_index, scale);

  std::vector<float> losses(rows, NAN);
  masked_lm_loss_rows<T, L>(logits.data(), labels.data(), rows, vocab, stride, ignore_index,
                            static_cast<float>(scale), /*write_grad=*/true, losses.data());
  std::vector<double> got_loss(losses.begin(), losses.end());
  std::vector<double> got_grad(rows * vocab);
  bool pad_intact = true;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t v = 0; v < stride; ++v) {
      const T g = logits[r * stride + v];
      if (v < vocab) {
        got_grad[r * vocab + v] = static_cast<double>(static_cast<float>(g));
      } else {
        pad_intact = pad_intact && static_cast<float>(g) == static_cast<float>(pad_value);
      }
    }
  }
  const double e_loss = relative_error(got_loss, ref.loss);
  const double e_grad = relative_error(got_grad, ref.grad);
  char what[256];
  std::snprintf(what, sizeof(what), "%s rows=%lld vocab=%lld pad=%lld |x|~%g: loss err %.3e, grad err %.3e (tol %.1e)",
                tname, static_cast<long long>(rows), static_cast<long long>(vocab),
                static_cast<long long>(pad), magnitude, e_loss, e_grad, tol);
  std::printf("%s\n", what);
  expect(e_loss <= tol && e_grad <= tol, what);
  expect(pad_intact, std::string(what) + ": row padding was written");
  for (int64_t r = 0; r < rows; ++r) {
    if (labels64[r] != ignore_index) continue;
    expect(losses[r] == 0.0f, "ignored row has a non-zero loss");
    for (int64_t v = 0; v < vocab; ++v) {
      if (got_grad[r * vocab + v] != 0.0) {
        expect(false, "ignored row has a non-zero gradient");
        break;
      }
    }
  }

  // Loss only: the logits stay untouched.
  std::vector<T> copy(logits.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t v = 0; v < vocab; ++v) copy[r * stride + v] = static_cast<T>(static_cast<float>(seen[r * vocab + v]));
  std::vector<float> losses2(rows, NAN);
  masked_lm_loss_rows<T, L>(copy.data(), labels.data(), rows, vocab, stride, ignore_index,
                            static_cast<float>(scale), /*write_grad=*/false, losses2.data());
  std::vector<double> got_loss2(losses2.begin(), losses2.end());
  expect(relative_error(got_loss2, ref.loss) <= tol,
         std::string(what) + ": loss without gradient differs");
  bool untouched = true;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t v = 0; v < vocab; ++v)
      untouched = untouched && static_cast<double>(static_cast<float>(copy[r * stride + v])) == seen[r * vocab + v];
  expect(untouched, std::string(what) + ": write_grad=false modified the logits");
}

void bad_label_gives_nan() {
  const int64_t vocab = 11;
  std::vector<float> logits(2 * vocab, 0.5f);
  for (int64_t bad : {int64_t{11}, int64_t{-1}, int64_t{1} << 40}) {
    std::vector<int64_t> labels = {3, bad};
    std::vector<float> losses(2, 0.0f);
    masked_lm_loss_rows<float, int64_t>(logits.data(), labels.data(), 2, vocab, vocab, -100, 0.5f,
                                        true, losses.data());
    expect(std::isfinite(losses[0]), "good row next to a bad label must stay finite");
    expect(std::isnan(losses[1]), "a label outside [0, vocab) must give a NaN loss");
    expect(std::isnan(logits[vocab + 5]), "a label outside [0, vocab) must give a NaN gradient");
    std::fill(logits.begin(), logits.end(), 0.5f);
  }
}

// -inf logits (a bias that bans tokens) contribute nothing and get a zero gradient, also when
// they fill whole blocks of the kernel (2048 elements), before and after the row's maximum.
void minus_inf_logits() {
  const int64_t vocab = 7000;
  std::vector<float> logits(vocab);
  std::normal_distribution<double> normal(0.0, 2.0);
  auto banned = [](int64_t v) { return v < 2500 || (v >= 4096 && v < 6144); };
  for (int64_t v = 0; v < vocab; ++v) {
    logits[v] = banned(v) ? -INFINITY : static_cast<float>(normal(rng));
  }
  double m = -INFINITY, s = 0.0;
  for (int64_t v = 0; v < vocab; ++v)
    if (!banned(v)) m = std::max(m, static_cast<double>(logits[v]));
  for (int64_t v = 0; v < vocab; ++v)
    if (!banned(v)) s += std::exp(logits[v] - m);
  const int64_t label = 3001;
  const double ref = m + std::log(s) - logits[label];
  float loss = NAN;
  masked_lm_loss_rows<float, int64_t>(logits.data(), &label, 1, vocab, vocab, -100, 1.0f, true,
                                      &loss);
  expect(std::fabs(loss - ref) <= 1e-5 * std::fabs(ref), "-inf logits: loss differs");
  bool zero = true;
  for (int64_t v = 0; v < vocab; ++v) zero = zero && (!banned(v) || logits[v] == 0.0f);
  expect(zero && std::isfinite(logits[label]), "-inf logits: gradient not 0/finite");
}

}  // namespace

int main() {
  const double fp32_tol = 1e-5;
  for (int64_t vocab : {1, 7, 15, 17, 1000, 2048, 2049, 4097, 50265}) {
    const int64_t rows = vocab > 10000 ? 5 : 13;
    run_case<float, int64_t>("fp32", rows, vocab, 0, 3.0, fp32_tol);
    run_case<float, int32_t>("fp32/int32", rows, vocab, 5, 3.0, fp32_tol);
  }
  // Large magnitudes: naive exp would overflow; the running max keeps everything finite.
  run_case<float, int64_t>("fp32 big", 7, 1000, 3, 1e4, fp32_tol);
  run_case<float, int64_t>("fp32 big", 4, 50265, 0, 1e4, fp32_tol);
  // Half types: the reference sees the same rounded inputs; the gradient is rounded on store.
  run_case<c10::Half, int64_t>("fp16", 9, 1000, 8, 3.0, 2e-3);
  run_case<c10::BFloat16, int32_t>("bf16", 9, 50265, 0, 3.0, 1e-2);
  run_case<c10::BFloat16, int64_t>("bf16", 13, 2049, 7, 3.0, 1e-2);
  run_case<c10::Half, int32_t>("fp16", 13, 17, 0, 3.0, 2e-3);
  run_case<c10::BFloat16, int64_t>("bf16 big", 5, 1000, 0, 1e4, 1e-2);
  bad_label_gives_nan();
  minus_inf_logits();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all masked_lm_loss CPU kernel checks passed\n");
  return 0;
}
