// CUDA kernels of fused residual + LayerNorm (+ dropout). See layer_norm_residual.h.
//
// Layout: a row is processed by a "team" of TPR threads (TPR = 32, a warp, for rows up to a few
// thousand bytes; a power of two up to 512 for longer rows). Each thread holds NV vectors of
// V = 16 / sizeof(T) consecutive elements in registers (vector k of lane t covers columns
// (t + k * TPR) * V ...), loaded with 16-byte loads when every pointer is 16-byte aligned and
// H % V == 0, else with per-element loads. One read of x/residual per row in the forward; the
// backward re-reads x/residual and regenerates the dropout mask instead of storing s; both draw
// one Philox call per four columns when hidden % 4 == 0 (see keep_bits).
// Team reductions: warp shuffles, then, for teams wider than a warp, shared memory under a
// per-team named barrier so that several teams share a block without waiting for each other.
#include "cuda/layer_norm_residual.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <initializer_list>
#include <type_traits>

#include "common/philox.h"
#include "cuda/convert.cuh"

namespace roberta_fast {
namespace cuda {
namespace {

constexpr int kMaxTpr = 512;        // threads per row at most (and per block)
constexpr int kFwdElems = 32;       // elements per thread at most, forward
constexpr int kBwdElems = 16;       // backward keeps more per element (xhat, g, 2 accumulators)
constexpr int kFwdBlock = 128;      // threads per forward block (several rows when TPR < 128)
constexpr int kBwdBlock = 256;      // threads per backward block
constexpr int kMaxTeams = 8;        // kBwdBlock / 32

// How a launch reads its rows and draws its dropout mask. Each path is its own instantiation, so
// that a kernel carries one Philox scheme and the register allocator sees only that one.
//   kVec:     16-byte loads (pointers 16-byte aligned, hidden % V == 0), one Philox call per four
//             columns (hidden % V == 0 implies hidden % 4 == 0)
//   kScalar4: per-element loads, hidden % 4 == 0: one Philox call per four columns
//   kScalar:  per-element loads, one Philox call per element
enum class Path { kVec, kScalar4, kScalar };


// N consecutive elements starting at p (16-byte aligned; N * sizeof(T) a multiple of 16).
template <typename T, int N>
__device__ __forceinline__ void load_aligned(const T* __restrict__ p, float (&out)[N]) {
  constexpr int kPer = 16 / sizeof(T);
  static_assert(N % kPer == 0, "whole 16-byte chunks only");
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + c);
    const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPer; ++i) out[c * kPer + i] = to_float(vals[i]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_aligned(T* __restrict__ p, const float (&in)[N]) {
  constexpr int kPer = 16 / sizeof(T);
  static_assert(N % kPer == 0, "whole 16-byte chunks only");
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    uint4 raw;
    T* vals = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPer; ++i) vals[i] = from_float<T>(in[c * kPer + i]);
    reinterpret_cast<uint4*>(p)[c] = raw;
  }
}

// V elements of row `p` from column col0 (zeros past `hidden`).
template <typename T, int V, bool VEC>
__device__ __forceinline__ void load_row_vec(const T* __restrict__ p, int col0, int hidden,
                                             float (&out)[V]) {
  if (VEC) {
    if (col0 < hidden) {
      load_aligned<T, V>(p + col0, out);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) out[e] = 0.0f;
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = col0 + e < hidden ? to_float(p[col0 + e]) : 0.0f;
  }
}

template <typename T, int V, bool VEC>
__device__ __forceinline__ void store_row_vec(T* __restrict__ p, int col0, int hidden,
                                              const float (&in)[V]) {
  if (VEC) {
    if (col0 < hidden) store_aligned<T, V>(p + col0, in);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (col0 + e < hidden) p[col0 + e] = from_float<T>(in[e]);
  }
}

// weight/bias: the I/O dtype T, or float32 when `fp32` (a uniform branch).
template <typename T, int V, bool VEC>
__device__ __forceinline__ void load_param_vec(const void* __restrict__ p, bool fp32, int col0,
                                               int hidden, float (&out)[V]) {
  if (fp32) {
    load_row_vec<float, V, VEC>(static_cast<const float*>(p), col0, hidden, out);
  } else {
    load_row_vec<T, V, VEC>(static_cast<const T*>(p), col0, hidden, out);
  }
}

// Synchronizes the TPR threads of one team (named barrier 1 + team; 0 is __syncthreads).
__device__ __forceinline__ void team_barrier(int team, int tpr) {
  if (tpr == 32) {
    __syncwarp();
  } else {
    asm volatile("bar.sync %0, %1;" ::"r"(team + 1), "r"(tpr) : "memory");
  }
}

// Sums N values over the team; every thread gets bit-identical totals (butterfly shuffles, then
// every thread adds the per-warp totals in one order). `red`: this team's 16 * N floats.
template <int N>
__device__ __forceinline__ void team_sum(float (&v)[N], float* red, int team, int tpr) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
  if (tpr > 32) {
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int warps = tpr >> 5;
    team_barrier(team, tpr);  // the previous reduction's readers are done with `red`
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) red[i * 16 + warp] = v[i];
    }
    team_barrier(team, tpr);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float total = 0.0f;
      for (int w = 0; w < warps; ++w) total += red[i * 16 + w];
      v[i] = total;
    }
  }
}

// Keep bits (bit e: element o0 + e) of V consecutive elements starting at a multiple of four:
// philox.h gives element o word o & 3 of random_words(seed, o >> 2), so one Philox call serves
// four elements, a quarter of the per-element arithmetic (20 mul.hi per call).
template <int V>
__device__ __forceinline__ uint32_t keep_bits_by4(uint64_t seed, uint64_t o0, float p) {
  static_assert(V % 4 == 0, "vectors are whole groups of four");
  uint32_t bits = 0;
#pragma unroll
  for (int g = 0; g < V / 4; ++g) {
    const philox::Words w = philox::random_words(seed, (o0 >> 2) + g);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      bits |= static_cast<uint32_t>(philox::bits_to_uniform(w.w[j]) > p) << (4 * g + j);
  }
  return bits;
}

// s = dropout(x) + residual for one vector; bit k*V+e of `kept` records the mask. A vector starts
// at a multiple of V (4 or 8) columns, so its offset is a multiple of four whenever the row's is,
// i.e. when hidden % 4 == 0 (paths kVec and kScalar4); otherwise each element draws its own
// Philox call, whose groups of four straddle the vectors.
template <typename T, int V, Path P>
__device__ __forceinline__ void residual_vec(const T* __restrict__ xr, const T* __restrict__ rr,
                                             int col0, int hidden, bool dropout, uint64_t seed,
                                             uint64_t row_offset, float p, float scale,
                                             float (&s)[V], uint32_t& kept, int bit0) {
  constexpr bool VEC = P == Path::kVec;
  float xv[V], rv[V];
  load_row_vec<T, V, VEC>(xr, col0, hidden, xv);
  load_row_vec<T, V, VEC>(rr, col0, hidden, rv);
  if constexpr (P == Path::kScalar) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float xe = xv[e];
      if (dropout) {
        const bool keep = philox::keep(seed, row_offset + static_cast<uint64_t>(col0 + e), p);
        xe = keep ? xe * scale : 0.0f;
        kept |= static_cast<uint32_t>(keep) << (bit0 + e);
      }
      s[e] = xe + rv[e];
    }
  } else {
    uint32_t bits = 0;
    if (dropout && col0 < hidden) {  // vectors past the row draw nothing: their lanes hold zeros
      bits = keep_bits_by4<V>(seed, row_offset + static_cast<uint64_t>(col0), p);
      kept |= bits << bit0;
    }
#pragma unroll
    for (int e = 0; e < V; ++e) s[e] = (dropout ? ((bits >> e) & 1u ? xv[e] * scale : 0.0f)
                                                : xv[e]) + rv[e];
  }
}

template <typename T, int NV, Path P>
__global__ void __launch_bounds__(kMaxTpr, 1) fwd_kernel(
    const T* __restrict__ x, const T* __restrict__ residual, const void* __restrict__ weight,
    const void* __restrict__ bias, bool param_fp32, T* __restrict__ y, float* __restrict__ mean,
    float* __restrict__ rstd, int64_t rows, int hidden, float eps, float p,
    const int64_t* __restrict__ seed_ptr) {
  constexpr int V = 16 / sizeof(T);
  constexpr bool VEC = P == Path::kVec;
  static_assert(NV * V <= 32, "the dropout mask bits of a thread fit one word");
  __shared__ float red[kFwdBlock / 32][16];  // teams > 1 only when TPR < kFwdBlock
  const int tpr = blockDim.x;
  const int team = threadIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + team;
  if (row >= rows) return;  // a whole team leaves: its barrier involves only its own threads
  const bool dropout = p > 0.0f;
  const uint64_t seed = dropout ? static_cast<uint64_t>(__ldg(seed_ptr)) : 0ull;
  const float scale = dropout ? 1.0f / (1.0f - p) : 1.0f;
  const uint64_t row_offset = static_cast<uint64_t>(row) * static_cast<uint64_t>(hidden);
  const T* xr = x + row * hidden;
  const T* rr = residual + row * hidden;

  float s[NV][V];
  uint32_t kept = 0;
  float sum[1] = {0.0f};
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int col0 = (threadIdx.x + k * tpr) * V;
    residual_vec<T, V, P>(xr, rr, col0, hidden, dropout, seed, row_offset, p, scale, s[k],
                            kept, 0);
#pragma unroll
    for (int e = 0; e < V; ++e) sum[0] += s[k][e];
  }
  team_sum<1>(sum, red[team], team, tpr);
  const float mu = sum[0] / static_cast<float>(hidden);
  // Two-pass variance on the registers: no cancellation of E[s^2] - mean^2.
  float sq[1] = {0.0f};
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int col0 = (threadIdx.x + k * tpr) * V;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float d = col0 + e < hidden ? s[k][e] - mu : 0.0f;
      sq[0] += d * d;
    }
  }
  team_sum<1>(sq, red[team], team, tpr);
  const float rs = rsqrtf(sq[0] / static_cast<float>(hidden) + eps);
  T* yr = y + row * hidden;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int col0 = (threadIdx.x + k * tpr) * V;
    if (col0 >= hidden) continue;
    float w[V], b[V], out[V];
    load_param_vec<T, V, VEC>(weight, param_fp32, col0, hidden, w);
    load_param_vec<T, V, VEC>(bias, param_fp32, col0, hidden, b);
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = (s[k][e] - mu) * rs * w[e] + b[e];
    store_row_vec<T, V, VEC>(yr, col0, hidden, out);
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// Each block loops over rows (team `t` of block `b` takes rows (b * teams + t) + i * stride),
// accumulating its columns' dweight/dbias in registers; the block's teams are then summed in
// shared memory and written as one fp32 partial row pair partial[b] = (dweight, dbias).
template <typename T, int NV, Path P>
__global__ void __launch_bounds__(kMaxTpr, 1) bwd_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ residual,
    const void* __restrict__ weight, bool param_fp32, const float* __restrict__ mean,
    const float* __restrict__ rstd, T* __restrict__ dresidual, T* __restrict__ dx,
    float* __restrict__ partial, int64_t rows, int hidden, float p,
    const int64_t* __restrict__ seed_ptr) {
  constexpr int V = 16 / sizeof(T);
  constexpr bool VEC = P == Path::kVec;
  static_assert(NV * V <= 32, "the dropout mask bits of a thread fit one word");
  __shared__ float red[kMaxTeams][32];
  extern __shared__ float block_acc[];  // [2][hidden] when the block has several teams
  const int tpr = blockDim.x;
  const int teams = blockDim.y;
  const int team = threadIdx.y;
  const bool dropout = p > 0.0f;
  const uint64_t seed = dropout ? static_cast<uint64_t>(__ldg(seed_ptr)) : 0ull;
  const float scale = dropout ? 1.0f / (1.0f - p) : 1.0f;
  const float inv_h = 1.0f / static_cast<float>(hidden);

  float acc_w[NV][V], acc_b[NV][V];
#pragma unroll
  for (int k = 0; k < NV; ++k)
#pragma unroll
    for (int e = 0; e < V; ++e) acc_w[k][e] = acc_b[k][e] = 0.0f;

  const int64_t stride = static_cast<int64_t>(gridDim.x) * teams;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * teams + team; row < rows;
       row += stride) {
    const uint64_t row_offset = static_cast<uint64_t>(row) * static_cast<uint64_t>(hidden);
    const T* xr = x + row * hidden;
    const T* rr = residual + row * hidden;
    const T* dyr = dy + row * hidden;
    const float mu = __ldg(mean + row);
    const float rs = __ldg(rstd + row);
    float xhat[NV][V], g[NV][V];
    uint32_t kept = 0;
    float sums[2] = {0.0f, 0.0f};
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int col0 = (threadIdx.x + k * tpr) * V;
      float dyv[V], w[V];
      residual_vec<T, V, P>(xr, rr, col0, hidden, dropout, seed, row_offset, p, scale, xhat[k],
                              kept, k * V);
      load_row_vec<T, V, VEC>(dyr, col0, hidden, dyv);
      load_param_vec<T, V, VEC>(weight, param_fp32, col0, hidden, w);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        // Past `hidden` dy and w are 0, so nothing out of range reaches the sums.
        const float xh = (xhat[k][e] - mu) * rs;
        xhat[k][e] = xh;
        g[k][e] = dyv[e] * w[e];
        sums[0] += g[k][e];
        sums[1] += g[k][e] * xh;
        acc_w[k][e] += dyv[e] * xh;
        acc_b[k][e] += dyv[e];
      }
    }
    team_sum<2>(sums, red[team], team, tpr);
    const float a = sums[0] * inv_h;
    const float c = sums[1] * inv_h;
    T* dres_r = dresidual + row * hidden;
    T* dx_r = dropout ? dx + row * hidden : nullptr;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int col0 = (threadIdx.x + k * tpr) * V;
      if (col0 >= hidden) continue;
      float ds[V];
#pragma unroll
      for (int e = 0; e < V; ++e) ds[e] = rs * (g[k][e] - a - xhat[k][e] * c);
      store_row_vec<T, V, VEC>(dres_r, col0, hidden, ds);
      if (dropout) {
#pragma unroll
        for (int e = 0; e < V; ++e) ds[e] = ((kept >> (k * V + e)) & 1u) ? ds[e] * scale : 0.0f;
        store_row_vec<T, V, VEC>(dx_r, col0, hidden, ds);
      }
    }
  }

  float* out_w = partial + static_cast<int64_t>(blockIdx.x) * 2 * hidden;
  float* out_b = out_w + hidden;
  if (teams == 1) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int col0 = (threadIdx.x + k * tpr) * V;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (col0 + e < hidden) {
          out_w[col0 + e] = acc_w[k][e];
          out_b[col0 + e] = acc_b[k][e];
        }
      }
    }
    return;
  }
  // Teams add their accumulators into shared memory one after another (a fixed order, so the
  // result is deterministic), then the block writes its partial row.
  for (int t = 0; t < teams; ++t) {
    if (team == t) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int col0 = (threadIdx.x + k * tpr) * V;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const int col = col0 + e;
          if (col < hidden) {
            block_acc[col] = (t == 0 ? 0.0f : block_acc[col]) + acc_w[k][e];
            block_acc[hidden + col] = (t == 0 ? 0.0f : block_acc[hidden + col]) + acc_b[k][e];
          }
        }
      }
    }
    __syncthreads();
  }
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int col = tid; col < hidden; col += blockDim.x * blockDim.y) {
    out_w[col] = block_acc[col];
    out_b[col] = block_acc[hidden + col];
  }
}

// dweight[col] = sum over parts of partial[part][0][col], dbias likewise from [part][1][col].
template <typename W>
__global__ void __launch_bounds__(256) reduce_partials_kernel(const float* __restrict__ partial,
                                                              int parts, int hidden,
                                                              W* __restrict__ dweight,
                                                              W* __restrict__ dbias) {
  __shared__ float tile[2][8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float sw = 0.0f, sb = 0.0f;
  if (col < hidden) {
    for (int part = threadIdx.y; part < parts; part += 8) {
      const float* row = partial + static_cast<int64_t>(part) * 2 * hidden;
      sw += row[col];
      sb += row[hidden + col];
    }
  }
  tile[0][threadIdx.y][threadIdx.x] = sw;
  tile[1][threadIdx.y][threadIdx.x] = sb;
  __syncthreads();
  if (threadIdx.y == 0 && col < hidden) {
    float tw = 0.0f, tb = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      tw += tile[0][i][threadIdx.x];
      tb += tile[1][i][threadIdx.x];
    }
    dweight[col] = from_float<W>(tw);
    dbias[col] = from_float<W>(tb);
  }
}

// How a row is split: `tpr` threads per row, `nv` vectors per thread.
struct Split {
  int tpr;
  int nv;
};

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// A warp per row with the fewest vectors per thread that cover it; longer rows get max_elems
// per thread and as many threads as needed. tpr == 0: the row is too long.
Split choose_split(int64_t hidden, int vec, int max_elems) {
  const int64_t vecs = (hidden + vec - 1) / vec;
  const int max_nv = max_elems / vec;
  for (int nv = 1; nv <= max_nv; nv *= 2)
    if (32 * nv >= vecs) return {32, nv};
  const int tpr = next_pow2((vecs + max_nv - 1) / max_nv);
  if (tpr > kMaxTpr) return {0, 0};
  return {tpr, max_nv};
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

bool can_vectorize(DType io, int64_t hidden, std::initializer_list<const void*> ptrs) {
  if (hidden % (16 / elem_size(io)) != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

Path path_for(bool vec, int64_t hidden) {
  if (vec) return Path::kVec;
  return hidden % 4 == 0 ? Path::kScalar4 : Path::kScalar;
}

// f(std::integral_constant<Path, P>{}) for the run-time `path`: one instantiation per path.
template <typename F>
cudaError_t with_path(Path path, F&& f) {
  switch (path) {
    case Path::kVec:
      return f(std::integral_constant<Path, Path::kVec>{});
    case Path::kScalar4:
      return f(std::integral_constant<Path, Path::kScalar4>{});
    default:
      return f(std::integral_constant<Path, Path::kScalar>{});
  }
}

template <typename T, int NV, Path P>
cudaError_t launch_fwd_nv(const void* x, const void* residual, const void* weight,
                          const void* bias, bool param_fp32, void* y, float* mean, float* rstd,
                          int64_t rows, int hidden, float eps, float p, const int64_t* seed,
                          int tpr, cudaStream_t stream) {
  const int teams = tpr >= kFwdBlock ? 1 : kFwdBlock / tpr;
  const dim3 block(tpr, teams);
  const int64_t blocks = (rows + teams - 1) / teams;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  fwd_kernel<T, NV, P><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(residual), weight, bias, param_fp32,
      static_cast<T*>(y), mean, rstd, rows, hidden, eps, p, seed);
  return cudaGetLastError();
}

template <typename T, Path P>
cudaError_t launch_fwd_t(const void* x, const void* residual, const void* weight,
                         const void* bias, bool param_fp32, void* y, float* mean, float* rstd,
                         int64_t rows, int hidden, float eps, float p, const int64_t* seed,
                         Split split, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
#define RF_FWD_CASE(N)                                                                          \
  case N:                                                                                       \
    if constexpr (N * V <= kFwdElems) {                                                          \
      return launch_fwd_nv<T, N, P>(x, residual, weight, bias, param_fp32, y, mean, rstd,      \
                                      rows, hidden, eps, p, seed, split.tpr, stream);           \
    }                                                                                           \
    break;
  switch (split.nv) {
    RF_FWD_CASE(1)
    RF_FWD_CASE(2)
    RF_FWD_CASE(4)
    RF_FWD_CASE(8)
    default:
      break;
  }
#undef RF_FWD_CASE
  return cudaErrorInvalidValue;
}

template <typename T, int NV, Path P>
cudaError_t launch_bwd_nv(const void* dy, const void* x, const void* residual, const void* weight,
                          bool param_fp32, const float* mean, const float* rstd, void* dresidual,
                          void* dx, float* partial, int64_t parts, int64_t rows, int hidden,
                          float p, const int64_t* seed, int tpr, cudaStream_t stream) {
  const int teams = tpr >= kBwdBlock ? 1 : kBwdBlock / tpr;
  const dim3 block(tpr, teams);
  const size_t smem = teams > 1 ? 2 * static_cast<size_t>(hidden) * sizeof(float) : 0;
  bwd_kernel<T, NV, P><<<static_cast<unsigned>(parts), block, smem, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(residual),
      weight, param_fp32, mean, rstd, static_cast<T*>(dresidual), static_cast<T*>(dx), partial,
      rows, hidden, p, seed);
  return cudaGetLastError();
}

// The backward kernel of a split, for launching and for occupancy queries.
template <typename T, Path P>
cudaError_t launch_bwd_t(const void* dy, const void* x, const void* residual, const void* weight,
                         bool param_fp32, const float* mean, const float* rstd, void* dresidual,
                         void* dx, float* partial, int64_t parts, int64_t rows, int hidden,
                         float p, const int64_t* seed, Split split, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
#define RF_BWD_CASE(N)                                                                          \
  case N:                                                                                       \
    if constexpr (N * V <= kBwdElems) {                                                          \
      return launch_bwd_nv<T, N, P>(dy, x, residual, weight, param_fp32, mean, rstd,           \
                                      dresidual, dx, partial, parts, rows, hidden, p, seed,     \
                                      split.tpr, stream);                                       \
    }                                                                                           \
    break;
  switch (split.nv) {
    RF_BWD_CASE(1)
    RF_BWD_CASE(2)
    RF_BWD_CASE(4)
    default:
      break;
  }
#undef RF_BWD_CASE
  return cudaErrorInvalidValue;
}

template <typename T>
const void* bwd_kernel_ptr(int nv) {
  constexpr int V = 16 / sizeof(T);
  switch (nv) {
    case 1:
      return reinterpret_cast<const void*>(&bwd_kernel<T, 1, Path::kVec>);
    case 2:
      return reinterpret_cast<const void*>(&bwd_kernel<T, 2, Path::kVec>);
    case 4:
      if constexpr (4 * V <= kBwdElems)
        return reinterpret_cast<const void*>(&bwd_kernel<T, 4, Path::kVec>);
      return nullptr;
    default:
      return nullptr;
  }
}

const void* bwd_kernel_for(DType io, int nv) {
  switch (io) {
    case DType::kFloat32:
      return bwd_kernel_ptr<float>(nv);
    case DType::kFloat16:
      return bwd_kernel_ptr<__half>(nv);
    default:
      return bwd_kernel_ptr<__nv_bfloat16>(nv);
  }
}

template <typename W>
cudaError_t launch_reduce(const float* partial, int64_t parts, int hidden, void* dweight,
                          void* dbias, cudaStream_t stream) {
  const dim3 block(32, 8);
  const unsigned blocks = static_cast<unsigned>((hidden + 31) / 32);
  reduce_partials_kernel<W><<<blocks, block, 0, stream>>>(
      partial, static_cast<int>(parts), hidden, static_cast<W*>(dweight), static_cast<W*>(dbias));
  return cudaGetLastError();
}

}  // namespace

int64_t layer_norm_residual_max_hidden(DType io) {
  // The backward's split is the binding one: kMaxTpr threads x kBwdElems elements.
  (void)io;
  return static_cast<int64_t>(kMaxTpr) * kBwdElems;
}

int64_t layer_norm_residual_bwd_parts(DType io, int64_t rows, int64_t hidden) {
  const Split split = choose_split(hidden, 16 / elem_size(io), kBwdElems);
  if (split.tpr == 0) return 1;
  const int teams = split.tpr >= kBwdBlock ? 1 : kBwdBlock / split.tpr;
  const int64_t needed = (rows + teams - 1) / teams;
  int device = 0, sms = 1, per_sm = 1;
  if (cudaGetDevice(&device) == cudaSuccess)
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const void* kernel = bwd_kernel_for(io, split.nv);
  const size_t smem = teams > 1 ? 2 * static_cast<size_t>(hidden) * sizeof(float) : 0;
  if (kernel == nullptr ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, split.tpr * teams, smem) !=
          cudaSuccess ||
      per_sm < 1) {
    per_sm = 1;
  }
  const int64_t resident = static_cast<int64_t>(sms) * per_sm;
  return needed < 1 ? 1 : (needed < resident ? needed : resident);
}

cudaError_t layer_norm_residual_fwd(DType io, DType param, const void* x, const void* residual,
                                    const void* weight, const void* bias, void* y, float* mean,
                                    float* rstd, int64_t rows, int64_t hidden, float eps,
                                    float dropout_p, const int64_t* seed, cudaStream_t stream) {
  if (hidden <= 0 || hidden > layer_norm_residual_max_hidden(io)) return cudaErrorInvalidValue;
  if (param != io && param != DType::kFloat32) return cudaErrorInvalidValue;
  if (dropout_p > 0.0f && seed == nullptr) return cudaErrorInvalidValue;
  if (rows <= 0) return cudaSuccess;
  const bool param_fp32 = param == DType::kFloat32;
  const Split split = choose_split(hidden, 16 / elem_size(io), kFwdElems);
  if (split.tpr == 0) return cudaErrorInvalidValue;
  const Path path = path_for(can_vectorize(io, hidden, {x, residual, y}) &&
                                  aligned16(weight) && aligned16(bias), hidden);
  const int h = static_cast<int>(hidden);
#define RF_FWD(T)                                                                              \
  return with_path(path, [&](auto pc) {                                                        \
    return launch_fwd_t<T, decltype(pc)::value>(x, residual, weight, bias, param_fp32, y, mean, \
                                                rstd, rows, h, eps, dropout_p, seed, split,     \
                                                stream);                                        \
  });
  switch (io) {
    case DType::kFloat32:
      RF_FWD(float)
    case DType::kFloat16:
      RF_FWD(__half)
    case DType::kBFloat16:
      RF_FWD(__nv_bfloat16)
  }
#undef RF_FWD
  return cudaErrorInvalidValue;
}

cudaError_t layer_norm_residual_bwd(DType io, DType param, const void* dy, const void* x,
                                    const void* residual, const void* weight, const float* mean,
                                    const float* rstd, void* dresidual, void* dx, void* dweight,
                                    void* dbias, float* workspace, int64_t parts, int64_t rows,
                                    int64_t hidden, float dropout_p, const int64_t* seed,
                                    cudaStream_t stream) {
  if (hidden <= 0 || hidden > layer_norm_residual_max_hidden(io)) return cudaErrorInvalidValue;
  if (param != io && param != DType::kFloat32) return cudaErrorInvalidValue;
  const bool dropout = dropout_p > 0.0f;
  if (dropout && (seed == nullptr || dx == nullptr)) return cudaErrorInvalidValue;
  if (parts < 1 || parts > 0x7fffffff) return cudaErrorInvalidValue;
  const bool param_fp32 = param == DType::kFloat32;
  const int h = static_cast<int>(hidden);
  cudaError_t err = cudaSuccess;
  if (rows > 0) {
    const Split split = choose_split(hidden, 16 / elem_size(io), kBwdElems);
    if (split.tpr == 0) return cudaErrorInvalidValue;
    const Path path = path_for(can_vectorize(io, hidden, {dy, x, residual, dresidual, dx}) &&
                                    aligned16(weight), hidden);
#define RF_BWD(T)                                                                              \
  err = with_path(path, [&](auto pc) {                                                         \
    return launch_bwd_t<T, decltype(pc)::value>(dy, x, residual, weight, param_fp32, mean,     \
                                                rstd, dresidual, dx, workspace, parts, rows, h, \
                                                dropout_p, seed, split, stream);                \
  });                                                                                          \
  break;
    switch (io) {
      case DType::kFloat32:
        RF_BWD(float)
      case DType::kFloat16:
        RF_BWD(__half)
      case DType::kBFloat16:
        RF_BWD(__nv_bfloat16)
    }
#undef RF_BWD
    if (err != cudaSuccess) return err;
  } else {
    // No rows: dweight = dbias = 0, from one zeroed partial row.
    err = cudaMemsetAsync(workspace, 0, 2 * static_cast<size_t>(hidden) * sizeof(float), stream);
    if (err != cudaSuccess) return err;
    parts = 1;
  }
  if (param_fp32) return launch_reduce<float>(workspace, parts, h, dweight, dbias, stream);
  switch (io) {
    case DType::kFloat16:
      return launch_reduce<__half>(workspace, parts, h, dweight, dbias, stream);
    case DType::kBFloat16:
      return launch_reduce<__nv_bfloat16>(workspace, parts, h, dweight, dbias, stream);
    default:
      return launch_reduce<float>(workspace, parts, h, dweight, dbias, stream);
  }
}

}  // namespace cuda
}  // namespace roberta_fast
