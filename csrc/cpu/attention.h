// Softmax self-attention on the CPU, forward and backward, FlashAttention-style: blocked, with an
// online softmax and fp32 accumulation, never holding an [L, L] matrix per head. Raw pointers, no
// at::Tensor.
//
// Layouts (the ones the Python op takes, no transposes):
// * padded: q, k, v [B, L, heads, D] with an optional key-padding mask [B, L] (true = real);
// * varlen: q, k, v [T, heads, D], sequences packed end to end, described by cu_seqlens.
// Outputs are contiguous in the same shape; LSE (natural log, fp32) is [B, heads, L] (padded) or
// [heads, T] (varlen). Padded query rows get O = 0 and LSE = +inf; padded keys are never read, so
// whatever they hold (NaN, inf) cannot reach a real row; a padded position gets zero gradients.
//
// Dropout on the probabilities (csrc/common/philox.h): element (b, h, i, j), i and j positions
// in sequence b, has offset ((b * heads + h) * Lmax + i) * Lmax + j, Lmax = L (padded) or
// max_seqlen (varlen), and is kept iff philox::keep(seed, offset, p); kept values are scaled by
// 1 / (1 - p). The backward regenerates the mask: the Triton kernels' mask, bit for bit.
//
// T is float, c10::BFloat16 or c10::Half. Matrix products run through ATen's brgemm (oneDNN
// micro-kernels): bf16 on AMX tiles where the CPU has them, everything else in fp32.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace roberta_fast {
namespace cpu {

// The batch: sizes, where the sequences are and which tokens are real.
struct AttentionLayout {
  int64_t batch = 0;       // number of sequences
  int64_t seqlen = 0;      // Lmax: L (padded) or max_seqlen (varlen, >= every length)
  int64_t tokens = 0;      // varlen: T (packed tokens); padded: unused
  int64_t heads = 0;
  int64_t head_dim = 0;
  const int32_t* cu_seqlens = nullptr;  // varlen: [batch + 1] offsets; null for padded
  const bool* key_padding_mask = nullptr;  // padded, optional: [batch, L] contiguous
};

// A strided operand: element (b, t, h, d) lives at data[b * batch + t * token + h * head + d]
// (unit stride in d). For varlen, t is the packed token index and `batch` is unused.
template <typename T>
struct AttentionOperand {
  const T* data = nullptr;
  int64_t batch = 0;
  int64_t token = 0;
  int64_t head = 0;
};

// How the matrix products run; kAuto picks bf16 on AMX tiles for bf16 input where the CPU has
// them. kFloat32 forces fp32 products for every input (the path of CPUs without AMX; tests use
// it to cover that path on any machine).
enum class AttentionCompute { kAuto, kFloat32 };

// Forward: out (contiguous, q's shape) and lse. dropout_p in [0, 1); seed unused when it is 0.
template <typename T>
void attention_fwd(const AttentionLayout& layout, AttentionOperand<T> q, AttentionOperand<T> k,
                   AttentionOperand<T> v, T* out, float* lse, float scale, float dropout_p,
                   uint64_t seed, AttentionCompute compute = AttentionCompute::kAuto);

// Backward from the forward's out and lse: dq, dk, dv (contiguous, q's shape). Recomputes the
// probabilities from lse and delta = rowsum(dout * out) itself.
template <typename T>
void attention_bwd(const AttentionLayout& layout, AttentionOperand<T> dout, AttentionOperand<T> q,
                   AttentionOperand<T> k, AttentionOperand<T> v, AttentionOperand<T> out,
                   const float* lse, T* dq, T* dk, T* dv, float scale, float dropout_p,
                   uint64_t seed, AttentionCompute compute = AttentionCompute::kAuto);

// The dropout multiplier (0 or 1 / (1 - p)) of the elements with offsets offset .. offset + n - 1
// under the contract above (vectorized Philox; exposed for tests).
void attention_dropout_multipliers(uint64_t seed, uint64_t offset, int64_t n, float p,
                                   float* out);

// Whether bf16 products run on AMX tiles on this machine (ATen's could_pack for bf16).
bool attention_bf16_uses_amx();

}  // namespace cpu
}  // namespace roberta_fast
