// CUDA kernels of fused residual + LayerNorm (+ dropout): y = layer_norm(dropout(x) + residual).
//
// Raw pointers on 2-D contiguous [rows, H] views and a cudaStream_t; no ATen. The I/O dtype is
// float, __half or __nv_bfloat16 (`io`); weight/bias are either of the I/O dtype or float32
// (`param`). Statistics and accumulation in fp32. Dropout is active iff dropout_p > 0; the seed is
// read on the device from `seed` (int64, one element) and element (row, col) uses Philox counter
// row * H + col (csrc/common/philox.h), the same mask as the CPU and Triton kernels.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/dtype.h"

namespace roberta_fast {
namespace cuda {

// Largest hidden size these kernels take (the row is kept in registers).
int64_t layer_norm_residual_max_hidden(DType io);

// Number of partial dweight/dbias rows the backward writes: the workspace holds
// parts * 2 * hidden floats. Depends on the current device (its SM count).
int64_t layer_norm_residual_bwd_parts(DType io, int64_t rows, int64_t hidden);

// Forward: y [rows, H], mean [rows], rstd [rows] (fp32; rstd = 1 / sqrt(var + eps)).
cudaError_t layer_norm_residual_fwd(DType io, DType param, const void* x, const void* residual,
                                    const void* weight, const void* bias, void* y, float* mean,
                                    float* rstd, int64_t rows, int64_t hidden, float eps,
                                    float dropout_p, const int64_t* seed, cudaStream_t stream);

// Backward: recomputes s = dropout(x) + residual from the seed; writes dresidual, dx (only when
// dropout is active, else it may be null: dx == dresidual), dweight and dbias (param dtype).
// `workspace` holds `parts` (from layer_norm_residual_bwd_parts) * 2 * hidden floats.
cudaError_t layer_norm_residual_bwd(DType io, DType param, const void* dy, const void* x,
                                    const void* residual, const void* weight, const float* mean,
                                    const float* rstd, void* dresidual, void* dx, void* dweight,
                                    void* dbias, float* workspace, int64_t parts, int64_t rows,
                                    int64_t hidden, float dropout_p, const int64_t* seed,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace roberta_fast
