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
