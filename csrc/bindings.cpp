// The only file that sees at::Tensor: argument checks, dtype dispatch and op registration.
// Kernels live in csrc/cpu/<op>.cpp (raw pointers) and csrc/cuda/<op>.cu (raw pointers +
// cudaStream_t). Each op registers one schema under the `roberta_fast` namespace with its CPU and
// CUDA implementations under the same name; Python adds fake (meta) impls and autograd.
#include <torch/extension.h>
#include <torch/library.h>

#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

#ifdef WITH_CUDA
void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}
#endif

}  // namespace

TORCH_LIBRARY(roberta_fast, m) {
  // Schemas are declared in each op's section below with TORCH_LIBRARY_FRAGMENT.
}

// ===== layer_norm_residual =====

// ===== masked_lm_loss =====
// masked_lm_loss_rows: per row of a logits chunk, the cross-entropy loss (returned, fp32) and, with
// write_grad, the gradient of the mean loss written IN PLACE over the logits. `scale` is a
// one-element fp32 tensor on the logits' device (1 / number of labelled rows): the kernels read it
// there, so nothing waits for the device.
#include "cpu/masked_lm_loss.h"
#ifdef WITH_CUDA
#include "cuda/masked_lm_loss.h"
#endif

namespace {

void mlm_check_rows_args(const at::Tensor& logits, const at::Tensor& labels,
                         const at::Tensor& scale) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "masked_lm_loss_rows: logits must be 2-D [rows, vocab], got ",
                    logits.dim(), "-D");
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                       logits.scalar_type() == at::kBFloat16,
                   "masked_lm_loss_rows: logits must be float32, float16 or bfloat16, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "masked_lm_loss_rows: the vocabulary is empty");
  TORCH_CHECK_VALUE(logits.size(0) == 0 || logits.size(1) == 1 || logits.stride(1) == 1,
                    "masked_lm_loss_rows: logits rows must be contiguous (stride 1 along the "
                    "vocabulary)");
  TORCH_CHECK_VALUE(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1),
                    "masked_lm_loss_rows: logits rows must not overlap");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   "masked_lm_loss_rows: labels must be int64 or int32, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == logits.size(0),
                    "masked_lm_loss_rows: labels must be 1-D with one label per logits row (",
                    logits.size(0), "), got shape ", labels.sizes());
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat && scale.numel() == 1,
                   "masked_lm_loss_rows: scale must be a one-element float32 tensor");
  TORCH_CHECK_VALUE(labels.device() == logits.device() && scale.device() == logits.device(),
                    "masked_lm_loss_rows: logits, labels and scale must be on one device (got ",
                    logits.device(), ", ", labels.device(), ", ", scale.device(), ")");
}

at::Tensor masked_lm_loss_rows_cpu(at::Tensor logits, const at::Tensor& labels_in,
                                   const at::Tensor& scale, int64_t ignore_index,
                                   bool write_grad) {
  mlm_check_rows_args(logits, labels_in, scale);
  const at::Tensor labels = labels_in.contiguous();
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  // On the CPU the check costs nothing next to the kernel: a bad label is an error, not a NaN.
  if (rows > 0) {
    const at::Tensor labelled = labels.ne(ignore_index);
    const at::Tensor bad = labelled.logical_and(labels.lt(0).logical_or(labels.ge(vocab)));
    if (bad.any().item<bool>()) {
      const int64_t row = bad.nonzero()[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(false, "masked_lm_loss: label ", labels[row].item<int64_t>(), " at row ",
                        row, " is outside [0, ", vocab, ") and is not ignore_index (",
                        ignore_index, ")");
    }
  }
  at::Tensor row_losses = at::empty({rows}, logits.options().dtype(at::kFloat));
  const float s = scale.item<float>();
  const int64_t stride = rows > 1 ? logits.stride(0) : vocab;
  auto run = [&](auto* data) {
    using scalar_t = std::remove_pointer_t<decltype(data)>;
    if (labels.scalar_type() == at::kLong) {
      roberta_fast::cpu::masked_lm_loss_rows<scalar_t, int64_t>(
          data, labels.data_ptr<int64_t>(), rows, vocab, stride, ignore_index, s, write_grad,
          row_losses.data_ptr<float>());
    } else {
      roberta_fast::cpu::masked_lm_loss_rows<scalar_t, int32_t>(
          data, labels.data_ptr<int32_t>(), rows, vocab, stride, ignore_index, s, write_grad,
          row_losses.data_ptr<float>());
    }
  };
  // The kernel is instantiated for these three types only (checked above).
  switch (logits.scalar_type()) {
    case at::kFloat: run(logits.data_ptr<float>()); break;
    case at::kHalf: run(logits.data_ptr<at::Half>()); break;
    default: run(logits.data_ptr<at::BFloat16>()); break;
  }
  return row_losses;
}

#ifdef WITH_CUDA
at::Tensor masked_lm_loss_rows_cuda(at::Tensor logits, const at::Tensor& labels_in,
                                    const at::Tensor& scale, int64_t ignore_index,
                                    bool write_grad) {
  mlm_check_rows_args(logits, labels_in, scale);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor labels = labels_in.contiguous();
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  at::Tensor row_losses = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return row_losses;
  // No label check here (it would wait for the device): the kernel never addresses memory with
  // a bad label and turns that row's loss and gradient into NaN instead. Python checks labels
  // explicitly when ROBERTA_FAST_CHECK_LABELS=1.
  roberta_fast::cuda::MlmDtype dtype = roberta_fast::cuda::MlmDtype::kFloat32;
  if (logits.scalar_type() == at::kHalf) dtype = roberta_fast::cuda::MlmDtype::kFloat16;
  if (logits.scalar_type() == at::kBFloat16) dtype = roberta_fast::cuda::MlmDtype::kBFloat16;
  const int64_t stride = rows > 1 ? logits.stride(0) : vocab;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  check_cuda(roberta_fast::cuda::masked_lm_loss_rows(
                 logits.data_ptr(), dtype, labels.data_ptr(),
                 labels.scalar_type() == at::kLong, rows, vocab, stride, ignore_index,
                 scale.data_ptr<float>(), row_losses.data_ptr<float>(), write_grad, stream),
             "masked_lm_loss_rows kernel launch");
  return row_losses;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(roberta_fast, m) {
  m.def("masked_lm_loss_rows(Tensor(a!) logits, Tensor labels, Tensor scale, int ignore_index, "
        "bool write_grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(roberta_fast, CPU, m) {
  m.impl("masked_lm_loss_rows", &masked_lm_loss_rows_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(roberta_fast, CUDA, m) {
  m.impl("masked_lm_loss_rows", &masked_lm_loss_rows_cuda);
}
#endif


// ===== attention =====

PYBIND11_MODULE(_C, m) {
  m.doc() = "roberta_fast native kernels; the ops are registered as torch.ops.roberta_fast.*";
  m.def("built_with_cuda", []() {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this extension.");
}
