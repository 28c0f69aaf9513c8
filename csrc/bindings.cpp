// The only file that sees at::Tensor: argument checks, dtype dispatch and op registration.
// Kernels live in csrc/cpu/<op>.cpp (raw pointers) and csrc/cuda/<op>.cu (raw pointers +
// cudaStream_t). Each op registers one schema under the `roberta_fast` namespace with its CPU and
// CUDA implementations under the same name; Python adds fake (meta) impls and autograd.
#include <torch/extension.h>
#include <torch/library.h>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAStream.h>
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
// y = layer_norm(dropout(x) + residual) on 2-D contiguous [rows, H] views (the Python op reshapes).
// Backward returns an empty dx when dropout is off: dx equals dresidual then, and an op may not
// return two aliased outputs, so the autograd formula reuses dresidual.
#include "cpu/layer_norm_residual.h"
#ifdef WITH_CUDA
#include "cuda/layer_norm_residual.h"
#endif

namespace {
namespace lnr {

bool is_io_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The checks shared by forward and backward: shapes, dtypes, devices, contiguity.
void check_common(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                  double dropout_p, const c10::optional<at::Tensor>& seed) {
  TORCH_CHECK_VALUE(x.dim() == 2, "layer_norm_residual: x must be 2-D [rows, H], got ",
                    x.dim(), "-D");
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), "layer_norm_residual: residual shape ",
                    residual.sizes(), " must equal x shape ", x.sizes());
  TORCH_CHECK_TYPE(is_io_dtype(x.scalar_type()),
                   "layer_norm_residual: x must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(residual.scalar_type() == x.scalar_type(),
                   "layer_norm_residual: residual dtype ", residual.scalar_type(),
                   " must equal x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(1),
                    "layer_norm_residual: weight must have shape [", x.size(1), "], got ",
                    weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
                   "layer_norm_residual: weight/bias dtype must be x's dtype or float32, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(),
                    "layer_norm_residual: x, residual and weight must be contiguous");
  TORCH_CHECK(residual.device() == x.device() && weight.device() == x.device(),
              "layer_norm_residual: x, residual and weight must be on one device");
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0,
                    "layer_norm_residual: dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK_VALUE(seed.has_value() && seed->defined(),
                      "layer_norm_residual: dropout_p > 0 needs a seed tensor");
    TORCH_CHECK_TYPE(seed->scalar_type() == at::kLong && seed->numel() == 1,
                     "layer_norm_residual: seed must be an int64 tensor of one element");
    TORCH_CHECK(seed->device() == x.device(), "layer_norm_residual: seed is on ",
                seed->device(), " but x is on ", x.device());
  }
}

void check_bias(const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK_VALUE(bias.sizes() == weight.sizes(), "layer_norm_residual: bias shape ",
                    bias.sizes(), " must equal weight shape ", weight.sizes());
  TORCH_CHECK_TYPE(bias.scalar_type() == weight.scalar_type(),
                   "layer_norm_residual: bias dtype must equal weight dtype");
  TORCH_CHECK_VALUE(bias.is_contiguous(), "layer_norm_residual: bias must be contiguous");
  TORCH_CHECK(bias.device() == weight.device(),
              "layer_norm_residual: bias must be on weight's device");
}

void check_stats(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& mean,
                 const at::Tensor& rstd) {
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "layer_norm_residual: dy shape ", dy.sizes(),
                    " must equal x shape ", x.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(),
                   "layer_norm_residual: dy dtype must equal x dtype");
  TORCH_CHECK_VALUE(dy.is_contiguous(), "layer_norm_residual: dy must be contiguous");
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(0) && t->is_contiguous(),
                      "layer_norm_residual: mean/rstd must be contiguous [rows]");
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat,
                     "layer_norm_residual: mean/rstd must be float32");
    TORCH_CHECK(t->device() == x.device(), "layer_norm_residual: mean/rstd on the wrong device");
  }
  TORCH_CHECK(dy.device() == x.device(), "layer_norm_residual: dy on the wrong device");
}

// Calls f(T{}, W{}) with the C++ types of the (io, param) dtypes.
template <typename F>
void dispatch_cpu(at::ScalarType io, at::ScalarType param, F&& f) {
  const bool fp32_param = param == at::kFloat;
  switch (io) {
    case at::kFloat:
      return f(float{}, float{});
    case at::kHalf:
      return fp32_param ? f(c10::Half{}, float{}) : f(c10::Half{}, c10::Half{});
    case at::kBFloat16:
      return fp32_param ? f(c10::BFloat16{}, float{}) : f(c10::BFloat16{}, c10::BFloat16{});
    default:
      TORCH_CHECK_TYPE(false, "layer_norm_residual: unsupported dtype ", io);
  }
}

void check_fwd(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
               const at::Tensor& bias, double eps, double dropout_p,
               const c10::optional<at::Tensor>& seed) {
  check_common(x, residual, weight, dropout_p, seed);
  check_bias(weight, bias);
  TORCH_CHECK_VALUE(eps > 0.0, "layer_norm_residual: eps must be > 0, got ", eps);
}

void check_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& residual,
               const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
               double dropout_p, const c10::optional<at::Tensor>& seed) {
  check_common(x, residual, weight, dropout_p, seed);
  check_stats(x, dy, mean, rstd);
}

// The forward and backward shells both devices share once their inputs are checked: allocate the
// outputs, have the device's `launch` fill them, return them. Keeping allocation here keeps the
// outputs (shapes, dtypes, the empty dx) the same whichever device runs.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_fwd(const at::Tensor& x, Launch&& launch) {
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  launch(y, mean, rstd);
  return {y, mean, rstd};
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_bwd(const at::Tensor& x,
                                                                   const at::Tensor& weight,
                                                                   bool dropout, Launch&& launch) {
  at::Tensor dresidual = at::empty_like(x);
  at::Tensor dx = dropout ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor dweight = at::empty_like(weight);
  at::Tensor dbias = at::empty_like(weight);
  launch(dresidual, dx, dweight, dbias);
  return {dresidual, dx, dweight, dbias};
}

uint64_t cpu_seed_value(double dropout_p, const c10::optional<at::Tensor>& seed) {
  return dropout_p > 0.0 ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& bias, double eps, double dropout_p, const c10::optional<at::Tensor>& seed) {
  check_fwd(x, residual, weight, bias, eps, dropout_p, seed);
  return run_fwd(x, [&](at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
    const uint64_t seed_value = cpu_seed_value(dropout_p, seed);
    dispatch_cpu(x.scalar_type(), weight.scalar_type(), [&](auto t, auto w) {
      using T = decltype(t);
      using W = decltype(w);
      roberta_fast::cpu::layer_norm_residual_fwd<T, W>(
          x.const_data_ptr<T>(), residual.const_data_ptr<T>(), weight.const_data_ptr<W>(),
          bias.const_data_ptr<W>(), y.mutable_data_ptr<T>(), mean.mutable_data_ptr<float>(),
          rstd.mutable_data_ptr<float>(), x.size(0), x.size(1), static_cast<float>(eps),
          static_cast<float>(dropout_p), seed_value);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& residual,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd, double dropout_p,
    const c10::optional<at::Tensor>& seed) {
  check_bwd(dy, x, residual, weight, mean, rstd, dropout_p, seed);
  const bool dropout = dropout_p > 0.0;
  return run_bwd(x, weight, dropout, [&](at::Tensor& dresidual, at::Tensor& dx,
                                         at::Tensor& dweight, at::Tensor& dbias) {
    const uint64_t seed_value = cpu_seed_value(dropout_p, seed);
    dispatch_cpu(x.scalar_type(), weight.scalar_type(), [&](auto t, auto w) {
      using T = decltype(t);
      using W = decltype(w);
      roberta_fast::cpu::layer_norm_residual_bwd<T, W>(
          dy.const_data_ptr<T>(), x.const_data_ptr<T>(), residual.const_data_ptr<T>(),
          weight.const_data_ptr<W>(), mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
          dresidual.mutable_data_ptr<T>(), dropout ? dx.mutable_data_ptr<T>() : nullptr,
          dweight.mutable_data_ptr<W>(), dbias.mutable_data_ptr<W>(), x.size(0), x.size(1),
          static_cast<float>(dropout_p), seed_value);
    });
  });
}

#ifdef WITH_CUDA
roberta_fast::cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return roberta_fast::cuda::DType::kFloat32;
    case at::kHalf:
      return roberta_fast::cuda::DType::kFloat16;
    case at::kBFloat16:
      return roberta_fast::cuda::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "layer_norm_residual: unsupported dtype ", t);
  }
}

const int64_t* cuda_seed_ptr(double dropout_p, const c10::optional<at::Tensor>& seed) {
  return dropout_p > 0.0 ? seed->const_data_ptr<int64_t>() : nullptr;
}

// The CUDA kernels keep a row in registers, which bounds H.
void check_cuda_hidden(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.size(1) <= roberta_fast::cuda::layer_norm_residual_max_hidden(
                                     cuda_dtype(x.scalar_type())),
                    "layer_norm_residual: H = ", x.size(1), " is larger than the cuda kernels "
                    "support; use the triton backend");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cuda(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& bias, double eps, double dropout_p, const c10::optional<at::Tensor>& seed) {
  check_fwd(x, residual, weight, bias, eps, dropout_p, seed);
  check_cuda_hidden(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return run_fwd(x, [&](at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
    check_cuda(roberta_fast::cuda::layer_norm_residual_fwd(
                   cuda_dtype(x.scalar_type()), cuda_dtype(weight.scalar_type()),
                   x.const_data_ptr(), residual.const_data_ptr(), weight.const_data_ptr(),
                   bias.const_data_ptr(), y.mutable_data_ptr(), mean.mutable_data_ptr<float>(),
                   rstd.mutable_data_ptr<float>(), x.size(0), x.size(1), static_cast<float>(eps),
                   static_cast<float>(dropout_p), cuda_seed_ptr(dropout_p, seed),
                   c10::cuda::getCurrentCUDAStream()),
               "layer_norm_residual_fwd");
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& residual,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd, double dropout_p,
    const c10::optional<at::Tensor>& seed) {
  check_bwd(dy, x, residual, weight, mean, rstd, dropout_p, seed);
  check_cuda_hidden(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool dropout = dropout_p > 0.0;
  return run_bwd(x, weight, dropout, [&](at::Tensor& dresidual, at::Tensor& dx,
                                         at::Tensor& dweight, at::Tensor& dbias) {
    const int64_t rows = x.size(0), hidden = x.size(1);
    const auto io = cuda_dtype(x.scalar_type());
    // fp32 partial dweight/dbias of each backward block, reduced by a second kernel.
    const int64_t parts = roberta_fast::cuda::layer_norm_residual_bwd_parts(io, rows, hidden);
    at::Tensor workspace = at::empty({parts * 2 * hidden}, x.options().dtype(at::kFloat));
    check_cuda(roberta_fast::cuda::layer_norm_residual_bwd(
                   io, cuda_dtype(weight.scalar_type()), dy.const_data_ptr(), x.const_data_ptr(),
                   residual.const_data_ptr(), weight.const_data_ptr(),
                   mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                   dresidual.mutable_data_ptr(), dropout ? dx.mutable_data_ptr() : nullptr,
                   dweight.mutable_data_ptr(), dbias.mutable_data_ptr(),
                   workspace.mutable_data_ptr<float>(), parts, rows, hidden,
                   static_cast<float>(dropout_p), cuda_seed_ptr(dropout_p, seed),
                   c10::cuda::getCurrentCUDAStream()),
               "layer_norm_residual_bwd");
  });
}
#endif  // WITH_CUDA

}  // namespace lnr
}  // namespace

TORCH_LIBRARY_FRAGMENT(roberta_fast, m) {
  m.def("layer_norm_residual_fwd(Tensor x, Tensor residual, Tensor weight, Tensor bias, "
        "float eps, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_residual_bwd(Tensor dy, Tensor x, Tensor residual, Tensor weight, "
        "Tensor mean, Tensor rstd, float dropout_p, Tensor? seed) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(roberta_fast, CPU, m) {
  m.impl("layer_norm_residual_fwd", &lnr::fwd_cpu);
  m.impl("layer_norm_residual_bwd", &lnr::bwd_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(roberta_fast, CUDA, m) {
  m.impl("layer_norm_residual_fwd", &lnr::fwd_cuda);
  m.impl("layer_norm_residual_bwd", &lnr::bwd_cuda);
}
#endif


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
  roberta_fast::cuda::DType dtype = roberta_fast::cuda::DType::kFloat32;
  if (logits.scalar_type() == at::kHalf) dtype = roberta_fast::cuda::DType::kFloat16;
  if (logits.scalar_type() == at::kBFloat16) dtype = roberta_fast::cuda::DType::kBFloat16;
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
// attention_fwd -> (out, lse) and attention_bwd -> (dq, dk, dv) on the padded [B, L, heads, D]
// (optional key_padding_mask [B, L], max_seqlen = L) or the varlen [T, heads, D] layout
// (cu_seqlens); max_seqlen is a SymInt so that torch.export keeps L a dynamic dimension.
// CPU: the blocked kernels of csrc/cpu/attention.cpp, forward and backward, fp32 / bf16 / fp16,
// any head dim, dropout in-kernel from `seed` (int64 [1]). CUDA: the forward only, for inference
// (fp16/bf16, no dropout); its gradients come from the Triton backward, which reads the same out
// and lse.
#include "cpu/attention.h"

TORCH_LIBRARY_FRAGMENT(roberta_fast, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? cu_seqlens, "
      "SymInt max_seqlen, float scale, float dropout_p=0.0, Tensor? seed=None) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, Tensor? cu_seqlens, SymInt max_seqlen, float scale, "
      "float dropout_p, Tensor? seed) -> (Tensor dq, Tensor dk, Tensor dv)");
}

namespace {
namespace attn {

namespace rc = roberta_fast::cpu;

// Checks of q, k, v (and the other [.., heads, D] operands) and the batch description; returns
// the layout the kernels take. Every message names the op and says what was expected.
rc::AttentionLayout check_layout(const char* op, const at::Tensor& q,
                                 const std::vector<const at::Tensor*>& others,
                                 const std::optional<at::Tensor>& key_padding_mask,
                                 const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                 double scale) {
  const bool varlen = cu_seqlens.has_value();
  TORCH_CHECK_VALUE(q.dim() == (varlen ? 3 : 4), op, ": q must be ",
                    varlen ? "[T, heads, D] with cu_seqlens" : "[B, L, heads, D]", ", got shape ",
                    q.sizes());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 ||
                       q.scalar_type() == at::kHalf,
                   op, ": the cpu kernel takes float32, bfloat16 or float16, got ",
                   q.scalar_type());
  TORCH_CHECK_VALUE(q.size(-1) >= 1, op, ": head dim must be at least 1");
  for (const at::Tensor* t : others) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), op, ": every [.., heads, D] operand must have q's "
                      "shape ", q.sizes(), ", got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": every operand must have q's "
                     "dtype ", q.scalar_type(), ", got ", t->scalar_type());
  }
  for (const at::Tensor* t : others) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": operands must be CPU tensors, got ",
                      t->device());
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  rc::AttentionLayout layout;
  layout.heads = q.size(-2);
  layout.head_dim = q.size(-1);
  if (varlen) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK_VALUE(!key_padding_mask.has_value(), op,
                      ": the varlen layout (cu_seqlens) takes no key_padding_mask");
    TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ",
                     cu.scalar_type());
    TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 2 && cu.is_contiguous() &&
                          cu.device().is_cpu(),
                      op, ": cu_seqlens must be a contiguous 1-D CPU tensor [batch + 1], got "
                      "shape ", cu.sizes());
    TORCH_CHECK_VALUE(max_seqlen >= 0, op, ": max_seqlen must be >= 0, got ", max_seqlen);
    const int32_t* c = cu.const_data_ptr<int32_t>();
    TORCH_CHECK_VALUE(c[0] == 0, op, ": cu_seqlens must start at 0, got ", c[0]);
    for (int64_t b = 0; b + 1 < cu.size(0); ++b) {
      TORCH_CHECK_VALUE(c[b + 1] >= c[b], op, ": cu_seqlens must be non-decreasing");
      TORCH_CHECK_VALUE(c[b + 1] - c[b] <= max_seqlen, op, ": sequence ", b, " has ",
                        c[b + 1] - c[b], " tokens, more than max_seqlen = ", max_seqlen);
    }
    TORCH_CHECK_VALUE(c[cu.size(0) - 1] == q.size(0), op, ": cu_seqlens[-1] = ",
                      c[cu.size(0) - 1], " must equal total_tokens = ", q.size(0));
    layout.batch = cu.size(0) - 1;
    layout.seqlen = max_seqlen;
    layout.tokens = q.size(0);
    layout.cu_seqlens = c;
  } else {
    TORCH_CHECK_VALUE(max_seqlen == q.size(1), op, ": max_seqlen must be L = ", q.size(1),
                      " for the padded layout, got ", max_seqlen);
    layout.batch = q.size(0);
    layout.seqlen = q.size(1);
    if (key_padding_mask.has_value()) {
      const at::Tensor& mask = *key_padding_mask;
      TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, op,
                       ": key_padding_mask must be bool (True = real token), got ",
                       mask.scalar_type());
      TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == q.size(0) && mask.size(1) == q.size(1),
                        op, ": key_padding_mask must be [B, L] = [", q.size(0), ", ", q.size(1),
                        "], got ", mask.sizes());
      TORCH_CHECK_VALUE(mask.is_contiguous() && mask.device().is_cpu(), op,
                        ": key_padding_mask must be a contiguous CPU tensor");
      layout.key_padding_mask = mask.const_data_ptr<bool>();
    }
  }
  return layout;
}

uint64_t seed_value(const char* op, double dropout_p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
                    dropout_p);
  if (dropout_p == 0.0) return 0;
  TORCH_CHECK_VALUE(seed.has_value() && seed->defined(), op, ": dropout_p > 0 needs a seed tensor");
  TORCH_CHECK_TYPE(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
                   ": seed must be an int64 tensor of one element");
  TORCH_CHECK_VALUE(seed->device().is_cpu(), op, ": seed must be a CPU tensor");
  return static_cast<uint64_t>(seed->item<int64_t>());
}

std::vector<int64_t> lse_shape(const at::Tensor& q, bool varlen) {
  if (varlen) return {q.size(1), q.size(0)};
  return {q.size(0), q.size(2), q.size(1)};
}

// The kernels read any strides but need a unit stride along D.
at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) == 1 ? t : t.contiguous();
}

template <typename T>
rc::AttentionOperand<T> operand(const at::Tensor& t, bool varlen) {
  rc::AttentionOperand<T> x;
  x.data = t.const_data_ptr<T>();
  x.batch = varlen ? 0 : t.stride(0);
  x.token = t.stride(varlen ? 0 : 1);
  x.head = t.stride(varlen ? 1 : 2);
  return x;
}

// Calls f(T{}) with the C++ type of dtype (one of the three check_layout admits).
template <typename F>
void dispatch(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: return f(c10::Half{});
  }
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                           const at::Tensor& v_in,
                                           const std::optional<at::Tensor>& key_padding_mask,
                                           const std::optional<at::Tensor>& cu_seqlens,
                                           int64_t max_seqlen, double scale, double dropout_p,
                                           const std::optional<at::Tensor>& seed) {
  const char* op = "attention_fwd";
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in),
                   v = unit_last_stride(v_in);
  const rc::AttentionLayout layout =
      check_layout(op, q, {&q, &k, &v}, key_padding_mask, cu_seqlens, max_seqlen, scale);
  const uint64_t seed_v = seed_value(op, dropout_p, seed);
  const bool varlen = cu_seqlens.has_value();
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(lse_shape(q, varlen), q.options().dtype(at::kFloat));
  dispatch(q.scalar_type(), [&](auto t) {
    using T = decltype(t);
    rc::attention_fwd<T>(layout, operand<T>(q, varlen), operand<T>(k, varlen),
                         operand<T>(v, varlen), out.mutable_data_ptr<T>(),
                         lse.mutable_data_ptr<float>(), static_cast<float>(scale),
                         static_cast<float>(dropout_p), seed_v);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, double scale,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  const char* op = "attention_bwd";
  const at::Tensor grad_out = unit_last_stride(grad_out_in), q = unit_last_stride(q_in),
                   k = unit_last_stride(k_in), v = unit_last_stride(v_in),
                   out = unit_last_stride(out_in);
  const rc::AttentionLayout layout = check_layout(op, q, {&q, &k, &v, &out, &grad_out},
                                                  key_padding_mask, cu_seqlens, max_seqlen, scale);
  const uint64_t seed_v = seed_value(op, dropout_p, seed);
  const bool varlen = cu_seqlens.has_value();
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape(q, varlen)) &&
                        lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                        lse.device().is_cpu(),
                    op, ": lse must be the forward's contiguous float32 ",
                    varlen ? "[heads, T]" : "[B, heads, L]", " tensor, got ", lse.sizes(), " ",
                    lse.scalar_type());
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), contiguous);
  at::Tensor dk = at::empty(q.sizes(), contiguous);
  at::Tensor dv = at::empty(q.sizes(), contiguous);
  dispatch(q.scalar_type(), [&](auto t) {
    using T = decltype(t);
    rc::attention_bwd<T>(layout, operand<T>(grad_out, varlen), operand<T>(q, varlen),
                         operand<T>(k, varlen), operand<T>(v, varlen), operand<T>(out, varlen),
                         lse.const_data_ptr<float>(), dq.mutable_data_ptr<T>(),
                         dk.mutable_data_ptr<T>(), dv.mutable_data_ptr<T>(),
                         static_cast<float>(scale), static_cast<float>(dropout_p), seed_v);
  });
  return {dq, dk, dv};
}

}  // namespace attn
}  // namespace

TORCH_LIBRARY_IMPL(roberta_fast, CPU, m) {
  m.impl("attention_fwd", &attn::fwd_cpu);
  m.impl("attention_bwd", &attn::bwd_cpu);
}

#ifdef WITH_CUDA
#include "cuda/attention.h"

namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& key_padding_mask,
                                                      const std::optional<at::Tensor>& cu_seqlens,
                                                      int64_t max_seqlen, double scale,
                                                      double dropout_p,
                                                      const std::optional<at::Tensor>& /*seed*/) {
  namespace rc = roberta_fast::cuda;
  TORCH_CHECK_VALUE(dropout_p == 0.0, "attention_fwd: the CUDA forward has no dropout; training "
                    "runs the Triton kernels");
  const bool varlen = cu_seqlens.has_value();
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(),
              "attention_fwd: q, k, v must be CUDA tensors on one device");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "attention_fwd: the CUDA kernel takes float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention_fwd: q, k, v must have one dtype");
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "attention_fwd: q, k, v must have one shape");
  TORCH_CHECK(q.dim() == (varlen ? 3 : 4), "attention_fwd: q must be ",
              varlen ? "[T, heads, D] with cu_seqlens" : "[B, L, heads, D]", ", got ", q.sizes());
  TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1 && v.stride(-1) == 1,
              "attention_fwd: the last dimension of q, k, v must be contiguous");
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK(rc::attention_fwd_supports(static_cast<int>(head_dim)),
              "attention_fwd: head dim ", head_dim, " has no CUDA kernel (32, 64, 128)");
  c10::cuda::CUDAGuard guard(q.device());

  rc::AttentionFwdParams p{};
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse;
  at::Tensor mask_bytes;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.head_dim = static_cast<int>(head_dim);
  p.scale = static_cast<float>(scale);
  p.dtype = q.scalar_type() == at::kHalf ? rc::DType::kFloat16 : rc::DType::kBFloat16;
  const int row_dim = varlen ? 0 : 1;
  p.q_row_stride = q.stride(row_dim);
  p.k_row_stride = k.stride(row_dim);
  p.v_row_stride = v.stride(row_dim);
  p.q_head_stride = q.stride(row_dim + 1);
  p.k_head_stride = k.stride(row_dim + 1);
  p.v_head_stride = v.stride(row_dim + 1);
  p.heads = static_cast<int>(q.size(row_dim + 1));
  if (varlen) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(cu.device() == q.device() && cu.scalar_type() == at::kInt && cu.dim() == 1 &&
                    cu.size(0) >= 1 && cu.is_contiguous(),
                "attention_fwd: cu_seqlens must be a contiguous int32 [batch + 1] tensor on q's device");
    TORCH_CHECK(!key_padding_mask.has_value(), "attention_fwd: varlen input takes no key_padding_mask");
    p.cu_seqlens = cu.data_ptr<int32_t>();
    p.batch = static_cast<int>(cu.size(0) - 1);
    p.total_tokens = q.size(0);
    p.max_seqlen = static_cast<int>(max_seqlen);
    lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  } else {
    p.batch = static_cast<int>(q.size(0));
    p.max_seqlen = static_cast<int>(q.size(1));
    p.q_batch_stride = q.stride(0);
    p.k_batch_stride = k.stride(0);
    p.v_batch_stride = v.stride(0);
    if (key_padding_mask.has_value()) {
      const at::Tensor& mask = *key_padding_mask;
      TORCH_CHECK(mask.device() == q.device() && mask.dim() == 2 && mask.size(0) == q.size(0) &&
                      mask.size(1) == q.size(1),
                  "attention_fwd: key_padding_mask must be [B, L] on q's device");
      mask_bytes = mask.to(at::kByte).contiguous();
      p.key_padding_mask = mask_bytes.data_ptr<uint8_t>();
    }
    lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  }
  p.lse = lse.data_ptr<float>();
  check_cuda(rc::attention_fwd(p, c10::cuda::getCurrentCUDAStream()), "attention_fwd");
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(roberta_fast, CUDA, m) { m.impl("attention_fwd", &attention_fwd_cuda); }
#endif  // WITH_CUDA

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
