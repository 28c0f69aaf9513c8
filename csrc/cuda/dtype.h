// The element types the CUDA kernels take, named without ATen so that the .cu files and the
// bindings agree on them. Shared by every csrc/cuda/<op>.h.
#pragma once

namespace roberta_fast::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace roberta_fast::cuda
