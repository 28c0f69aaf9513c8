// CUDA row kernel of the masked-LM cross-entropy: see masked_lm_loss.h for the contract.
//
// One thread block per row (grid-stride over rows). The read pass loads the row once with 16-byte
// vector loads (after a scalar head that reaches 16-byte alignment, since rows of an odd vocabulary
// start anywhere) and keeps an online (max, sum of exponentials) pair per thread, merged across the
// block with warp shuffles. The write pass reloads the row (an L2 hit for a 100-200 KB row) and
// stores the gradient with the same vector width. All arithmetic is fp32.
#include "cuda/masked_lm_loss.h"

#include <cfloat>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/convert.cuh"

namespace roberta_fast {
namespace cuda {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kWarp = 32;


// 16 bytes of T: one vector load/store instruction when the address is 16-byte aligned.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// Running (max, sum of exp(x - max)). The max starts at -FLT_MAX, not -inf, so that -inf logits
// (a bias that bans a token) contribute exp(-inf) = 0 instead of exp(-inf - -inf) = NaN.
struct Online {
  float m = -FLT_MAX;
  float s = 0.0f;

  // Add n values at once: one rescale per call at most, one exp per value. A NaN value is
  // ignored by fmaxf but reaches the sum through __expf, so NaN propagates to the loss.
  template <int N>
  __device__ __forceinline__ void add(const float (&x)[N]) {
    float vm = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) vm = fmaxf(vm, x[i]);
    if (vm > m) {
      s *= __expf(m - vm);
      m = vm;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) s += __expf(x[i] - m);
  }

  __device__ __forceinline__ void merge(float m2, float s2) {
    const float mn = fmaxf(m, m2);
    s = s * __expf(m - mn) + s2 * __expf(m2 - mn);
    m = mn;
  }
};

// Where the 16-byte aligned body of a row starts and how many packs it holds.
template <typename T>
struct RowSplit {
  int64_t head;   // scalar elements before the first aligned pack
  int64_t packs;  // aligned packs
  int64_t tail;   // first element after the packs
  __device__ RowSplit(const T* row, int64_t vocab) {
    const uintptr_t misalign = reinterpret_cast<uintptr_t>(row) & 15u;
    head = misalign == 0 ? 0 : static_cast<int64_t>((16u - misalign) / sizeof(T));
    if (head > vocab) head = vocab;
    packs = (vocab - head) / Pack<T>::kN;
    tail = head + packs * Pack<T>::kN;
  }
};

template <typename T>
__device__ void fill_row(T* row, int64_t vocab, float value) {
  const RowSplit<T> split(row, vocab);
  const T v = from_float<T>(value);
  for (int64_t i = threadIdx.x; i < split.head; i += blockDim.x) row[i] = v;
  Pack<T> p;
#pragma unroll
  for (int k = 0; k < Pack<T>::kN; ++k) p.v[k] = v;
  Pack<T>* body = reinterpret_cast<Pack<T>*>(row + split.head);
  for (int64_t i = threadIdx.x; i < split.packs; i += blockDim.x) body[i] = p;
  for (int64_t i = split.tail + threadIdx.x; i < vocab; i += blockDim.x) row[i] = v;
}

template <typename T, typename L>
__global__ void __launch_bounds__(kMaxThreads)
    mlm_rows_kernel(T* __restrict__ logits, const L* __restrict__ labels, int64_t rows,
                    int64_t vocab, int64_t row_stride, int64_t ignore_index,
                    const float* __restrict__ scale, float* __restrict__ row_losses,
                    bool write_grad) {
  constexpr int kN = Pack<T>::kN;
  __shared__ float red_m[kMaxThreads / kWarp];
  __shared__ float red_s[kMaxThreads / kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    T* row = logits + r * row_stride;
    const int64_t label = static_cast<int64_t>(labels[r]);
    // The branches below depend on the row only: uniform across the block.
    if (label == ignore_index) {
      if (threadIdx.x == 0) row_losses[r] = 0.0f;
      if (write_grad) fill_row(row, vocab, 0.0f);
      continue;
    }
    if (label < 0 || label >= vocab) {
      if (threadIdx.x == 0) row_losses[r] = __int_as_float(0x7fc00000);  // NaN
      if (write_grad) fill_row(row, vocab, __int_as_float(0x7fc00000));
      continue;
    }
    // Read the target before the barrier below: after it, threads overwrite the row.
    const float target = threadIdx.x == 0 ? to_float(row[label]) : 0.0f;
    const RowSplit<T> split(row, vocab);
    const Pack<T>* body = reinterpret_cast<const Pack<T>*>(row + split.head);

    Online acc;
    for (int64_t i = threadIdx.x; i < split.head; i += blockDim.x) {
      const float x[1] = {to_float(row[i])};
      acc.add(x);
    }
    for (int64_t i = threadIdx.x; i < split.packs; i += blockDim.x) {
      const Pack<T> p = body[i];
      float x[kN];
#pragma unroll
      for (int k = 0; k < kN; ++k) x[k] = to_float(p.v[k]);
      acc.add(x);
    }
    for (int64_t i = split.tail + threadIdx.x; i < vocab; i += blockDim.x) {
      const float x[1] = {to_float(row[i])};
      acc.add(x);
    }

    // Block reduction of the (max, sum) pairs: shuffles within warps, then warp 0.
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const float m2 = __shfl_xor_sync(0xffffffffu, acc.m, offset);
      const float s2 = __shfl_xor_sync(0xffffffffu, acc.s, offset);
      acc.merge(m2, s2);
    }
    if (lane == 0) {
      red_m[warp] = acc.m;
      red_s[warp] = acc.s;
    }
    __syncthreads();
    if (warp == 0) {
      Online w;
      if (lane < warps) {
        w.m = red_m[lane];
        w.s = red_s[lane];
      }
#pragma unroll
      for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        const float m2 = __shfl_xor_sync(0xffffffffu, w.m, offset);
        const float s2 = __shfl_xor_sync(0xffffffffu, w.s, offset);
        w.merge(m2, s2);
      }
      if (lane == 0) {
        red_m[0] = w.m;
        red_s[0] = w.s;
      }
    }
    __syncthreads();
    const float m = red_m[0];
    const float s = red_s[0];
    if (threadIdx.x == 0) row_losses[r] = m + logf(s) - target;

    if (write_grad) {
      const float sc = *scale;
      const float inv = sc / s;
      for (int64_t i = threadIdx.x; i < split.head; i += blockDim.x) {
        const float g = __expf(to_float(row[i]) - m) * inv;
        row[i] = from_float<T>(i == label ? g - sc : g);
      }
      Pack<T>* out = reinterpret_cast<Pack<T>*>(row + split.head);
      for (int64_t i = threadIdx.x; i < split.packs; i += blockDim.x) {
        Pack<T> p = out[i];
        const int64_t first = split.head + i * kN;
#pragma unroll
        for (int k = 0; k < kN; ++k) {
          const float g = __expf(to_float(p.v[k]) - m) * inv;
          p.v[k] = from_float<T>(first + k == label ? g - sc : g);
        }
        out[i] = p;
      }
      for (int64_t i = split.tail + threadIdx.x; i < vocab; i += blockDim.x) {
        const float g = __expf(to_float(row[i]) - m) * inv;
        row[i] = from_float<T>(i == label ? g - sc : g);
      }
    }
    // The next row reuses red_m / red_s.
    __syncthreads();
  }
}

template <typename T, typename L>
cudaError_t launch(void* logits, const void* labels, int64_t rows, int64_t vocab,
                   int64_t row_stride, int64_t ignore_index, const float* scale,
                   float* row_losses, bool write_grad, cudaStream_t stream) {
  // Enough threads for ~4+ packs each on a roberta-sized row, fewer for small vocabularies.
  const int64_t packs = vocab / Pack<T>::kN + 1;
  int threads = 128;
  if (packs >= 4 * 256) threads = 256;
  if (packs >= 4 * 512) threads = kMaxThreads;
  const int64_t max_grid = int64_t{1} << 20;
  const unsigned grid = static_cast<unsigned>(rows < max_grid ? rows : max_grid);
  mlm_rows_kernel<T, L><<<grid, threads, 0, stream>>>(
      static_cast<T*>(logits), static_cast<const L*>(labels), rows, vocab, row_stride,
      ignore_index, scale, row_losses, write_grad);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_labels(void* logits, const void* labels, bool labels_int64, int64_t rows,
                          int64_t vocab, int64_t row_stride, int64_t ignore_index,
                          const float* scale, float* row_losses, bool write_grad,
                          cudaStream_t stream) {
  if (labels_int64) {
    return launch<T, int64_t>(logits, labels, rows, vocab, row_stride, ignore_index, scale,
                              row_losses, write_grad, stream);
  }
  return launch<T, int32_t>(logits, labels, rows, vocab, row_stride, ignore_index, scale,
                            row_losses, write_grad, stream);
}

}  // namespace

cudaError_t masked_lm_loss_rows(void* logits, DType dtype, const void* labels,
                                bool labels_int64, int64_t rows, int64_t vocab,
                                int64_t row_stride, int64_t ignore_index, const float* scale,
                                float* row_losses, bool write_grad, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows < 0 || vocab <= 0 || (rows > 1 && row_stride < vocab)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return launch_labels<float>(logits, labels, labels_int64, rows, vocab, row_stride,
                                  ignore_index, scale, row_losses, write_grad, stream);
    case DType::kFloat16:
      return launch_labels<__half>(logits, labels, labels_int64, rows, vocab, row_stride,
                                   ignore_index, scale, row_losses, write_grad, stream);
    case DType::kBFloat16:
      return launch_labels<__nv_bfloat16>(logits, labels, labels_int64, rows, vocab,
                                          row_stride, ignore_index, scale, row_losses,
                                          write_grad, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace roberta_fast
