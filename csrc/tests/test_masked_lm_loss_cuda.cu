// GPU test of the CUDA masked-LM cross-entropy row kernel against a naive double loop on the
// host: fp32, fp16 and bf16 logits, vocabularies of 1, 7, 1000 and 50265, a padded (misaligned)
// row stride, logits of magnitude ~1e4, ignored rows, a bad label (NaN, never an out-of-bounds
// access) and loss-only mode. Exits non-zero on a mismatch or a CUDA error.
#include "cuda/masked_lm_loss.h"
#include "masked_lm_loss_reference.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

using roberta_fast::cuda::DType;
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

#define CUDA_OK(expr)                                                                    \
  do {                                                                                   \
    cudaError_t err_ = (expr);                                                           \
    if (err_ != cudaSuccess) {                                                           \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(err_), __FILE__, __LINE__); \
      std::exit(2);                                                                      \
    }                                                                                    \
  } while (0)

float to_f(float x) { return x; }
float to_f(__half x) { return __half2float(x); }
float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> T from_f(float x);
template <> float from_f<float>(float x) { return x; }
template <> __half from_f<__half>(float x) { return __float2half(x); }
template <> __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <typename T> DType kind();
template <> DType kind<float>() { return DType::kFloat32; }
template <> DType kind<__half>() { return DType::kFloat16; }
template <> DType kind<__nv_bfloat16>() { return DType::kBFloat16; }

template <typename T, typename L>
void run_case(const char* name, int64_t rows, int64_t vocab, int64_t pad, double magnitude,
              double tol) {
  const int64_t stride = vocab + pad;
  const int64_t ignore_index = -100;
  std::normal_distribution<double> normal(0.0, magnitude);
  std::uniform_int_distribution<int64_t> pick(0, vocab - 1);
  std::vector<T> host(rows * stride);
  std::vector<double> seen(rows * vocab);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t v = 0; v < stride; ++v) {
      host[r * stride + v] = from_f<T>(v < vocab ? static_cast<float>(normal(rng)) : 7.0f);
      if (v < vocab) seen[r * vocab + v] = to_f(host[r * stride + v]);
    }
  }
  std::vector<L> labels(rows);
  int64_t labelled = 0;
  for (int64_t r = 0; r < rows; ++r) {
    labels[r] = static_cast<L>(r % 4 == 2 ? ignore_index : pick(rng));
    labelled += labels[r] != ignore_index;
  }
  const float scale = 1.0f / static_cast<float>(labelled > 0 ? labelled : 1);

  const MaskedLmLossReference ref =
      masked_lm_loss_reference(seen, labels, rows, vocab, ignore_index, scale);

  T* d_logits;
  L* d_labels;
  float *d_scale, *d_losses;
  CUDA_OK(cudaMalloc(&d_logits, host.size() * sizeof(T)));
  CUDA_OK(cudaMalloc(&d_labels, rows * sizeof(L)));
  CUDA_OK(cudaMalloc(&d_scale, sizeof(float)));
  CUDA_OK(cudaMalloc(&d_losses, rows * sizeof(float)));
  CUDA_OK(cudaMemcpy(d_labels, labels.data(), rows * sizeof(L), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_scale, &scale, sizeof(float), cudaMemcpyHostToDevice));
  const bool int64_labels = sizeof(L) == 8;

  for (int write_grad = 0; write_grad < 2; ++write_grad) {
    CUDA_OK(cudaMemcpy(d_logits, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemset(d_losses, 0xff, rows * sizeof(float)));  // NaN poison
    CUDA_OK(roberta_fast::cuda::masked_lm_loss_rows(d_logits, kind<T>(), d_labels, int64_labels,
                                                     rows, vocab, stride, ignore_index, d_scale,
                                                     d_losses, write_grad != 0, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<float> losses(rows);
    std::vector<T> out(host.size());
    CUDA_OK(cudaMemcpy(losses.data(), d_losses, rows * sizeof(float), cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(out.data(), d_logits, out.size() * sizeof(T), cudaMemcpyDeviceToHost));
    std::vector<double> got_loss(losses.begin(), losses.end());
    std::vector<double> got(rows * vocab);
    bool pad_ok = true, untouched = true;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t v = 0; v < stride; ++v) {
        const float g = to_f(out[r * stride + v]);
        if (v < vocab) {
          got[r * vocab + v] = g;
          untouched = untouched && g == to_f(host[r * stride + v]);
        } else {
          pad_ok = pad_ok && g == 7.0f;
        }
      }
    }
    char what[256];
    const double e_loss = relative_error(got_loss, ref.loss);
    const double e_grad = write_grad ? relative_error(got, ref.grad) : 0.0;
    std::snprintf(what, sizeof(what),
                  "%s rows=%lld vocab=%lld pad=%lld |x|~%g write_grad=%d: loss %.3e grad %.3e",
                  name, (long long)rows, (long long)vocab, (long long)pad, magnitude, write_grad,
                  e_loss, e_grad);
    std::printf("%s\n", what);
    expect(e_loss <= tol && e_grad <= tol, what);
    expect(pad_ok, std::string(what) + ": padding written");
    if (!write_grad) expect(untouched, std::string(what) + ": logits modified without write_grad");
  }
  CUDA_OK(cudaFree(d_logits));
  CUDA_OK(cudaFree(d_labels));
  CUDA_OK(cudaFree(d_scale));
  CUDA_OK(cudaFree(d_losses));
}

void bad_label_gives_nan() {
  const int64_t vocab = 1000;
  std::vector<float> host(2 * vocab, 0.25f);
  const int64_t labels[2] = {3, vocab};
  const float scale = 0.5f;
  float *d_logits, *d_scale, *d_losses;
  int64_t* d_labels;
  CUDA_OK(cudaMalloc(&d_logits, host.size() * sizeof(float)));
  CUDA_OK(cudaMalloc(&d_labels, sizeof(labels)));
  CUDA_OK(cudaMalloc(&d_scale, sizeof(float)));
  CUDA_OK(cudaMalloc(&d_losses, 2 * sizeof(float)));
  CUDA_OK(cudaMemcpy(d_logits, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_labels, labels, sizeof(labels), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_scale, &scale, sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(roberta_fast::cuda::masked_lm_loss_rows(d_logits, DType::kFloat32, d_labels, true, 2,
                                                   vocab, vocab, -100, d_scale, d_losses, true,
                                                   nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  float losses[2];
  CUDA_OK(cudaMemcpy(losses, d_losses, sizeof(losses), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(host.data(), d_logits, host.size() * sizeof(float), cudaMemcpyDeviceToHost));
  expect(std::isfinite(losses[0]) && std::fabs(losses[0] - std::log(1000.0)) < 1e-4,
         "the good row next to a bad label");
  expect(std::isnan(losses[1]) && std::isnan(host[vocab + 17]), "a bad label gives NaN");
  CUDA_OK(cudaFree(d_logits));
  CUDA_OK(cudaFree(d_labels));
  CUDA_OK(cudaFree(d_scale));
  CUDA_OK(cudaFree(d_losses));
}

}  // namespace

int main() {
  for (int64_t vocab : {1, 7, 1000, 50265}) {
    run_case<float, int64_t>("fp32", 37, vocab, 0, 3.0, 2e-5);
    run_case<float, int32_t>("fp32/int32 padded", 37, vocab, 3, 3.0, 2e-5);
    run_case<__nv_bfloat16, int64_t>("bf16 padded", 37, vocab, 1, 3.0, 1e-2);
    run_case<__half, int32_t>("fp16", 37, vocab, 0, 3.0, 2e-3);
  }
  run_case<float, int64_t>("fp32 big", 9, 50265, 5, 1e4, 2e-5);
  run_case<__nv_bfloat16, int64_t>("bf16 big", 9, 50265, 0, 1e4, 1e-2);
  bad_label_gives_nan();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all masked_lm_loss CUDA kernel checks passed\n");
  return 0;
}
