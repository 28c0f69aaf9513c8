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

// ===== masked_lm_loss =====

// ===== attention =====
// The CUDA C++ forward (inference, no dropout); training and the backward run the Triton kernels,
// which read the same O and LSE. There is no CPU implementation: CPU attention is torch SDPA.

TORCH_LIBRARY_FRAGMENT(roberta_fast, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? cu_seqlens, "
      "int max_seqlen, float scale) -> (Tensor out, Tensor lse)");
}

#ifdef WITH_CUDA
#include "cuda/attention.h"

namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& key_padding_mask,
                                                      const std::optional<at::Tensor>& cu_seqlens,
                                                      int64_t max_seqlen, double scale) {
  namespace rc = roberta_fast::cuda;
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
