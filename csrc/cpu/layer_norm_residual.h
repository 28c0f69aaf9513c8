// Fused residual + LayerNorm (+ dropout) on the CPU: y = layer_norm(dropout(x) + residual).
//
// Raw pointers on 2-D contiguous [rows, H] views. T is the I/O dtype (float, c10::Half,
// c10::BFloat16); W is the dtype of weight/bias (T, or float with half inputs). Statistics and
// accumulation are in fp32. Dropout is active iff dropout_p > 0; element (row, col) uses counter
// row * H + col of csrc/common/philox.h, so the mask is the Triton and CUDA kernels' mask.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace roberta_fast {
namespace cpu {

// Forward: writes y [rows, H] and the fp32 statistics mean [rows], rstd [rows]
// (rstd = 1 / sqrt(var + eps), var the biased variance of s = dropout(x) + residual).
template <typename T, typename W>
void layer_norm_residual_fwd(const T* x, const T* residual, const W* weight, const W* bias, T* y,
                             float* mean, float* rstd, int64_t rows, int64_t hidden, float eps,
                             float dropout_p, uint64_t seed);

// Backward: recomputes s from x, residual and the seed (nothing but mean/rstd is stored by the
// forward), writes dresidual [rows, H], dx [rows, H] (only when dropout is active: otherwise
// dx == dresidual and `dx` may be null), dweight [H] and dbias [H].
template <typename T, typename W>
void layer_norm_residual_bwd(const T* dy, const T* x, const T* residual, const W* weight,
                             const float* mean, const float* rstd, T* dresidual, T* dx,
                             W* dweight, W* dbias, int64_t rows, int64_t hidden, float dropout_p,
                             uint64_t seed);

// Writes the dropout multiplier (0 or 1 / (1 - p)) of elements offset .. offset + n - 1.
void dropout_scales(uint64_t seed, uint64_t offset, int64_t n, float p, float* out);

// The dropout rule of csrc/common/philox.h as an integer threshold: an element whose random word
// v folds to f = (v as int32 < 0 ? ~v : v) is dropped iff f <= dropout_last_dropped(p), which
// holds iff its uniform float is <= p (-1: nothing is dropped; 2^31 - 1: everything is).
int32_t dropout_last_dropped(float p);

// The vector instructions these kernels were compiled for: "avx512+bf16", "avx512", "avx2" or
// "generic" (chosen by the compiler flags, see csrc/cpu/simd.h).
const char* layer_norm_residual_vector_level();

}  // namespace cpu
}  // namespace roberta_fast
