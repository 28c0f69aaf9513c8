// Fused multi-head attention forward (inference) on tensor cores: raw device pointers and a
// cudaStream_t, no ATen. Plain C++: includable from a host file compiled by a C++ compiler with the
// CUDA include path.
//
// Computes, per (sequence, head), O = softmax(Q K^T * scale + key_bias) V, non-causal, with the
// keys of a sequence limited by key_padding_mask (padded layout) or by cu_seqlens (varlen layout).
// Also writes LSE, the natural-log log-sum-exp of the scaled scores of each query row, in fp32;
// a padded query row (mask 0) or a row with no real key gets O = 0 and LSE = +inf, the convention
// the attention backward relies on. The q/k/v values at padding positions are never used: they
// may hold anything, NaN included.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/dtype.h"

namespace roberta_fast::cuda {


struct AttentionFwdParams {
  // Padded: [B, L, H, D] (any token / head / batch strides, last dim contiguous).
  // Varlen: [T, H, D], sequence b holding tokens cu_seqlens[b] .. cu_seqlens[b + 1] - 1.
  const void* q;
  const void* k;
  const void* v;
  void* o;     // contiguous, same layout as q: [B, L, H, D] or [T, H, D]
  float* lse;  // contiguous: padded [B, H, L]; varlen [H, T]
  int64_t q_row_stride, k_row_stride, v_row_stride;        // elements between consecutive tokens
  int64_t q_head_stride, k_head_stride, v_head_stride;     // elements between heads
  int64_t q_batch_stride, k_batch_stride, v_batch_stride;  // elements between sequences (padded)
  const int32_t* cu_seqlens;        // varlen: [B + 1] on the device; nullptr for padded
  const uint8_t* key_padding_mask;  // padded: [B, L] contiguous, nonzero = real token; or nullptr
  int batch;
  int heads;
  int max_seqlen;  // padded: L; varlen: an upper bound of every sequence length
  int head_dim;
  int64_t total_tokens;  // varlen: T
  float scale;           // softmax scale, typically head_dim ** -0.5
  DType dtype;
};

// Enqueues the kernel on `stream`; never synchronizes. Returns cudaSuccess (also when there is
// nothing to compute: zero batch, heads or length), cudaErrorInvalidValue for bad arguments
// (unsupported head_dim, null pointers, base pointers not 16-byte aligned, strides that are not
// non-negative multiples of 8 elements, a mask with varlen input), or the launch error.
cudaError_t attention_fwd(const AttentionFwdParams& p, cudaStream_t stream);

// Head dims with a compiled kernel: 32, 64 and 128.
bool attention_fwd_supports(int head_dim);

}  // namespace roberta_fast::cuda
