// Fused attention forward, FlashAttention-2 style, on mma.sync tensor cores (sm_80 and later).
//
// One CTA = 64 query rows of one (sequence, head); 4 warps, each owning 16 query rows, so that the
// softmax statistics of a row never leave the 4 lanes (one quad) that hold it. The CTA walks the
// key range in tiles of 64 keys:
//   S = Q K^T          (mma m16n8k16, Q fragments kept in registers, K via ldmatrix)
//   online softmax     (fp32, log2 domain: scores pre-multiplied by scale * log2(e), exp2)
//   O += P V           (P re-packed to half/bf16 in registers as the A operand, V via ldmatrix.trans)
// K/V tiles are double buffered: tile t+1 is fetched with cp.async while tile t is computed.
// Shared-memory tiles are row-major with the 16-byte chunks of a row XOR-swizzled by the row
// index, so that ldmatrix (8 rows x 16 bytes per phase) touches all 32 banks exactly once.
#include "attention.h"

#include <climits>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace roberta_fast::cuda {
namespace {

constexpr int kBlockM = 64;  // query rows per CTA (16 per warp: one m16 row block)
constexpr int kBlockN = 64;  // keys per tile
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

static_assert(kBlockM == kWarps * 16, "one m16 row block per warp");
static_assert(kBlockN % 16 == 0, "key tile is a whole number of k16 steps");

// Q tile + two K tiles + two V tiles, 2-byte elements.
template <int D>
constexpr size_t smem_bytes() {
  return size_t(kBlockM + 4 * kBlockN) * D * 2;
}

// Element offset of the 16-byte chunk `chunk` of row `row` in a [rows][D] tile. The XOR spreads
// the 8 rows that one ldmatrix phase reads (same logical chunk) over 8 distinct bank groups: with
// D >= 64 a row spans at least 128 bytes and the low 3 bits of the chunk are flipped by row % 8;
// with D = 32 two rows share a 128-byte line, so the line's 4 chunks are flipped by (row / 2) % 4.
template <int D>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  constexpr int kChunks = D / 8;
  const int x = kChunks >= 8 ? (row & 7) : ((row >> 1) & 3);
  return row * D + ((chunk ^ x) << 3);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; when !pred the destination is zero-filled and nothing is
// read (src-size 0), which is how out-of-range rows become zeros.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1,
                                            uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1,
                                                  uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// ex2.approx regardless of --use_fast_math; ex2.approx(-inf) = +0, which the masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// c += a * b for one m16n8k16 tile, fp32 accumulate.
template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // Low 16 bits hold `lo` (the lower column index of the pair), as the fragments expect.
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

// Fragment ownership used below (m16n8k16, lane = 4 * g + c, g = lane / 4, c = lane % 4):
//   A (16x16, 4 regs):  {row g, cols 2c..2c+1}, {row g+8, 2c..}, {row g, 2c+8..}, {row g+8, 2c+8..}
//   B (16x8, 2 regs):   {k 2c..2c+1, col g}, {k 2c+8..2c+9, col g}
//   C (16x8, 4 floats): row g cols 2c, 2c+1; row g+8 cols 2c, 2c+1
// ldmatrix.x4: lanes 8i..8i+7 give the 8 row addresses of matrix i, register i receives matrix i;
// without .trans lane gets (row g, cols 2c, 2c+1), with .trans (rows 2c, 2c+1, col g).
// Occupancy target: 4 CTAs (16 warps) per SM caps D <= 64 at 128 registers; D = 128 is held to
// 2 CTAs per SM by its 80 KiB of shared memory anyway.
template <int D>
constexpr int min_blocks_per_sm() {
  return D == 128 ? 2 : 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<D>())
    attention_fwd_kernel(const AttentionFwdParams p, const int num_m_blocks) {
  static_assert(D == 32 || D == 64 || D == 128, "unsupported head dim");
  constexpr int kChunks = D / 8;                // 16-byte chunks per row
  constexpr int kKSteps = D / 16;               // k16 steps of Q K^T
  constexpr int kNTiles = kBlockN / 8;          // n8 tiles of S
  constexpr int kDTiles = D / 8;                // n8 tiles of O
  constexpr int kQTile = kBlockM * D;           // elements
  constexpr int kKVTile = kBlockN * D;          // elements
  constexpr int kRowsPerPass = kThreads / kChunks;  // rows one pass of the CTA copies
  constexpr int kPasses = kBlockN / kRowsPerPass;   // passes per 64-row tile
  static_assert(kRowsPerPass % 8 == 0 && kBlockM == kBlockN, "loader passes share one swizzle");
  using M = Mma<T>;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const sQ = reinterpret_cast<T*>(smem_raw);
  T* const sK = sQ + kQTile;        // [2][kBlockN][D]
  T* const sV = sK + 2 * kKVTile;   // [2][kBlockN][D]
  __shared__ int s_bounds[3];       // first real key, last real key, number of real keys

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  // m-block fastest so that the CTAs sharing one (sequence, head)'s K/V run together (L2 reuse).
  const int m_block = static_cast<int>(blockIdx.x % static_cast<unsigned>(num_m_blocks));
  const int bh = static_cast<int>(blockIdx.x / static_cast<unsigned>(num_m_blocks));
  const int h = bh % p.heads;
  const int b = bh / p.heads;
  const int m0 = m_block * kBlockM;

  const bool varlen = p.cu_seqlens != nullptr;
  int64_t start = 0;  // first token of the sequence (varlen)
  int seqlen = p.max_seqlen;
  if (varlen) {
    start = p.cu_seqlens[b];
    seqlen = p.cu_seqlens[b + 1] - p.cu_seqlens[b];
  }
  if (m0 >= seqlen) return;  // uniform across the CTA

  const T* const q = static_cast<const T*>(p.q) +
                     (varlen ? start * p.q_row_stride : b * p.q_batch_stride) +
                     h * p.q_head_stride;
  const T* const k = static_cast<const T*>(p.k) +
                     (varlen ? start * p.k_row_stride : b * p.k_batch_stride) +
                     h * p.k_head_stride;
  const T* const v = static_cast<const T*>(p.v) +
                     (varlen ? start * p.v_row_stride : b * p.v_batch_stride) +
                     h * p.v_head_stride;
  const int64_t o_row_stride = int64_t(p.heads) * D;
  T* const o = static_cast<T*>(p.o) +
               ((varlen ? start : int64_t(b) * p.max_seqlen) * p.heads + h) * D;
  float* const lse = p.lse + (varlen ? int64_t(h) * p.total_tokens + start
                                     : (int64_t(b) * p.heads + h) * p.max_seqlen);
  const uint8_t* const mask =
      (!varlen && p.key_padding_mask) ? p.key_padding_mask + int64_t(b) * p.max_seqlen : nullptr;

  // Real keys lie in [kv_lo, kv_hi). With a mask, one pass over it finds the first and last real
  // key, so fully padded leading/trailing tiles are never visited; `holes` is set when padding
  // also occurs inside that range (an arbitrary mask), which then is applied key by key.
  int kv_lo = 0;
  int kv_hi = seqlen;
  bool holes = false;
  if (mask) {
    if (tid == 0) {
      s_bounds[0] = INT_MAX;
      s_bounds[1] = -1;
      s_bounds[2] = 0;
    }
    __syncthreads();
    int lo = INT_MAX, hi = -1, cnt = 0;
    for (int j = tid; j < seqlen; j += kThreads) {
      if (mask[j]) {
        lo = min(lo, j);
        hi = j;  // j increases
        ++cnt;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, off));
      hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, off));
      cnt += __shfl_xor_sync(0xffffffffu, cnt, off);
    }
    if (lane == 0) {
      atomicMin(&s_bounds[0], lo);
      atomicMax(&s_bounds[1], hi);
      atomicAdd(&s_bounds[2], cnt);
    }
    __syncthreads();
    kv_lo = s_bounds[0];
    kv_hi = s_bounds[1] + 1;
    if (kv_hi <= kv_lo) kv_lo = kv_hi = 0;
    holes = s_bounds[2] != kv_hi - kv_lo;
  }
  // Every real query lies in [kv_lo, kv_hi) too (same mask); a tile with none only writes zeros.
  const bool any_query = max(m0, kv_lo) < min(m0 + kBlockM, kv_hi);
  const int n_tiles = any_query ? (kv_hi - kv_lo + kBlockN - 1) / kBlockN : 0;

  const int g = lane >> 2;  // fragment row within an 8-row group
  const int c = lane & 3;   // fragment column pair

  float acc_o[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[i][e] = 0.f;
  }
  // Rows g and g+8 of this warp's 16: running max (log2 domain) and this lane's partial sum.
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  if (n_tiles > 0) {
    // Loader geometry: thread `tid` copies chunk ld_ch of rows ld_row, ld_row + kRowsPerPass, ...
    // kChunks consecutive threads cover one row, so global rows are read as whole 64..256-byte
    // segments. kRowsPerPass is a multiple of 8, so every pass has the same swizzle.
    const int ld_row = tid / kChunks;
    const int ld_ch = tid % kChunks;
    const int ld_smem = swizzle<D>(ld_row, ld_ch);

    auto load_kv = [&](int tile, int buf) {
      const int j0 = kv_lo + tile * kBlockN + ld_row;
      const T* gk = k + j0 * p.k_row_stride + ld_ch * 8;
      const T* gv = v + j0 * p.v_row_stride + ld_ch * 8;
      const int64_t k_step = kRowsPerPass * p.k_row_stride;
      const int64_t v_step = kRowsPerPass * p.v_row_stride;
      const uint32_t dk = smem_addr(sK + buf * kKVTile + ld_smem);
      const uint32_t dv = smem_addr(sV + buf * kKVTile + ld_smem);
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int j = j0 + i * kRowsPerPass;
        // Padding keys are zero-filled so that garbage (even NaN) there cannot reach P V.
        const bool ok = j < kv_hi && (!holes || mask[j]);
        cp_async_16(dk + i * kRowsPerPass * D * 2, ok ? gk : k, ok);
        cp_async_16(dv + i * kRowsPerPass * D * 2, ok ? gv : v, ok);
        gk += k_step;
        gv += v_step;
      }
    };

    {
      const T* gq = q + (m0 + ld_row) * p.q_row_stride + ld_ch * 8;
      const int64_t q_step = kRowsPerPass * p.q_row_stride;
      const uint32_t dq = smem_addr(sQ + ld_smem);
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const bool ok = m0 + ld_row + i * kRowsPerPass < seqlen;
        cp_async_16(dq + i * kRowsPerPass * D * 2, ok ? gq : q, ok);
        gq += q_step;
      }
    }
    cp_async_commit();
    load_kv(0, 0);
    cp_async_commit();

    // Q fragments for all k16 steps, loaded once while the first K/V tile is in flight.
    uint32_t q_frag[kKSteps][4];
    cp_async_wait<1>();
    __syncthreads();
    {
      // matrices: 0 = rows 0-7 / k 0-7, 1 = rows 8-15 / k 0-7, 2 = rows 0-7 / k 8-15, 3 = rows 8-15 / k 8-15
      const int row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        const int chunk = kk * 2 + (lane >> 4);
        ldmatrix_x4(smem_addr(sQ + swizzle<D>(row, chunk)), q_frag[kk][0], q_frag[kk][1],
                    q_frag[kk][2], q_frag[kk][3]);
      }
    }

    const float scale_log2 = p.scale * kLog2e;
    // Lane-dependent parts of the ldmatrix addresses.
    // K (non-trans): matrices 0/1 = keys 0-7 with k 0-7 / 8-15, matrices 2/3 = keys 8-15 likewise,
    // i.e. (b0, b1) of n8 tile 2np and (b0, b1) of n8 tile 2np+1.
    const int k_row = (lane & 7) + (lane >> 4) * 8;
    const int k_chunk = (lane >> 3) & 1;
    // V (trans): matrices 0/1 = keys 0-7 / 8-15 with d 0-7, matrices 2/3 = the same with d 8-15,
    // i.e. (b0, b1) of d tile 2dp and (b0, b1) of d tile 2dp+1.
    const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8;
    const int v_chunk = lane >> 4;

#pragma unroll 1
    for (int t = 0; t < n_tiles; ++t) {
      const int buf = t & 1;
      cp_async_wait<0>();
      // Tile t is visible to all warps, and every warp is done with tile t-1, whose buffer the
      // prefetch below overwrites.
      __syncthreads();
      if (t + 1 < n_tiles) {
        load_kv(t + 1, buf ^ 1);
        cp_async_commit();
      }
      const T* const tk = sK + buf * kKVTile;
      const T* const tv = sV + buf * kKVTile;

      // S = Q K^T for this warp's 16 rows x 64 keys.
      float s[kNTiles][4];
#pragma unroll
      for (int i = 0; i < kNTiles; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][e] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          uint32_t b0, b1, b2, b3;
          ldmatrix_x4(smem_addr(tk + swizzle<D>(np * 16 + k_row, kk * 2 + k_chunk)), b0, b1, b2,
                      b3);
          M::run(s[2 * np], q_frag[kk], b0, b1);
          M::run(s[2 * np + 1], q_frag[kk], b2, b3);
        }
      }

      // To the log2 domain; padding keys to -inf. Only the last tile (and any tile under an
      // arbitrary mask) can contain padding keys, since tiles start at kv_lo.
      const int n0 = kv_lo + t * kBlockN;
#pragma unroll
      for (int i = 0; i < kNTiles; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][e] *= scale_log2;
      }
      if (holes || n0 + kBlockN > kv_hi) {
#pragma unroll
        for (int i = 0; i < kNTiles; ++i) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = n0 + i * 8 + 2 * c + e;
            if (!(col < kv_hi && (!holes || mask[col]))) {
              s[i][e] = -INFINITY;
              s[i][e + 2] = -INFINITY;
            }
          }
        }
      }

      // Online softmax. A row's 64 scores sit in the 4 lanes of a quad: reduce the max there.
      float mx[2] = {row_max[0], row_max[1]};
#pragma unroll
      for (int i = 0; i < kNTiles; ++i) {
        mx[0] = fmaxf(mx[0], fmaxf(s[i][0], s[i][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[i][2], s[i][3]));
      }
      float m_use[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        // A row with no real key so far keeps max -inf; subtract 0 then so that exp2 sees -inf
        // (giving 0) instead of -inf - -inf = NaN.
        m_use[r] = mx[r] == -INFINITY ? 0.f : mx[r];
        const float alpha = fast_exp2(row_max[r] - m_use[r]);
        row_max[r] = mx[r];
        row_sum[r] *= alpha;
#pragma unroll
        for (int i = 0; i < kDTiles; ++i) {
          acc_o[i][2 * r] *= alpha;
          acc_o[i][2 * r + 1] *= alpha;
        }
      }
#pragma unroll
      for (int i = 0; i < kNTiles; ++i) {
        s[i][0] = fast_exp2(s[i][0] - m_use[0]);
        s[i][1] = fast_exp2(s[i][1] - m_use[0]);
        s[i][2] = fast_exp2(s[i][2] - m_use[1]);
        s[i][3] = fast_exp2(s[i][3] - m_use[1]);
        row_sum[0] += s[i][0] + s[i][1];
        row_sum[1] += s[i][2] + s[i][3];
      }

      // O += P V. The C fragments of S tiles 2kk and 2kk+1 are exactly the A fragment of keys
      // 16kk..16kk+15: {row g, k 2c}, {row g+8, k 2c}, {row g, k 2c+8}, {row g+8, k 2c+8}.
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        const uint32_t a[4] = {M::pack(s[2 * kk][0], s[2 * kk][1]),
                               M::pack(s[2 * kk][2], s[2 * kk][3]),
                               M::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               M::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < kDTiles / 2; ++dp) {
          uint32_t b0, b1, b2, b3;
          ldmatrix_x4_trans(smem_addr(tv + swizzle<D>(kk * 16 + v_row, dp * 2 + v_chunk)), b0,
                            b1, b2, b3);
          M::run(acc_o[2 * dp], a, b0, b1);
          M::run(acc_o[2 * dp + 1], a, b2, b3);
        }
      }
    }
  }

  // Epilogue: finish the row sums across the quad, normalize, and write LSE.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    const int row = m0 + warp * 16 + g + 8 * r;
    const bool in_range = row < seqlen;
    // row_sum is >= 1 once a real key was seen and exactly 0 when none was; `!= 0` (not `> 0`)
    // lets NaN from real inputs propagate instead of turning into a quiet zero row.
    const bool valid = in_range && row_sum[r] != 0.f && (!mask || mask[row]);
    const float inv = valid ? 1.f / row_sum[r] : 0.f;
#pragma unroll
    for (int i = 0; i < kDTiles; ++i) {
      // A select, not a multiply: a padded query row may have computed NaN from its inputs.
      acc_o[i][2 * r] = valid ? acc_o[i][2 * r] * inv : 0.f;
      acc_o[i][2 * r + 1] = valid ? acc_o[i][2 * r + 1] * inv : 0.f;
    }
    if (c == 0 && in_range) {
      lse[row] = valid ? row_max[r] * kLn2 + logf(row_sum[r]) : INFINITY;
    }
  }

  // Stage O through the (no longer needed) Q tile so the global stores are full 16-byte rows.
  // Each n8 tile of O is exactly one 16-byte chunk of a row.
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + g + 8 * r;
      *reinterpret_cast<uint32_t*>(sQ + swizzle<D>(row, i) + 2 * c) =
          M::pack(acc_o[i][2 * r], acc_o[i][2 * r + 1]);
    }
  }
  __syncthreads();
  {
    const int st_row = tid / kChunks;
    const int st_ch = tid % kChunks;
    T* go = o + (m0 + st_row) * o_row_stride + st_ch * 8;
    const T* so = sQ + swizzle<D>(st_row, st_ch);
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      if (m0 + st_row + i * kRowsPerPass < seqlen) {
        *reinterpret_cast<uint4*>(go) = *reinterpret_cast<const uint4*>(so + i * kRowsPerPass * D);
      }
      go += kRowsPerPass * o_row_stride;
    }
  }
}

template <typename T, int D>
cudaError_t launch(const AttentionFwdParams& p, int num_m_blocks, unsigned grid,
                   cudaStream_t stream) {
  constexpr size_t smem = smem_bytes<D>();
  auto* kernel = attention_fwd_kernel<T, D>;
  if (smem > 48 * 1024) {
    // Opt in to more than the default 48 KiB; a host-side attribute, no device synchronization.
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, kThreads, smem, stream>>>(p, num_m_blocks);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_head_dim(const AttentionFwdParams& p, int num_m_blocks, unsigned grid,
                              cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return launch<T, 32>(p, num_m_blocks, grid, stream);
    case 64: return launch<T, 64>(p, num_m_blocks, grid, stream);
    case 128: return launch<T, 128>(p, num_m_blocks, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// A stride matters only when its dimension has more than one index; torch reports arbitrary
// strides for size-1 dimensions, so those are not held to the cp.async rule.
bool stride_ok(int64_t stride, int64_t extent) {
  return extent <= 1 || (stride >= 0 && stride % 8 == 0);
}

}  // namespace

bool attention_fwd_supports(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 128;
}

cudaError_t attention_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  if (!attention_fwd_supports(p.head_dim)) return cudaErrorInvalidValue;
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  const bool varlen = p.cu_seqlens != nullptr;
  if (p.batch < 0 || p.heads < 0 || p.max_seqlen < 0 || (varlen && p.total_tokens < 0)) {
    return cudaErrorInvalidValue;
  }
  if (varlen && p.key_padding_mask != nullptr) return cudaErrorInvalidValue;
  // Tokens but no room for them: every row would be left unwritten.
  if (varlen && p.total_tokens > 0 && p.max_seqlen == 0) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.heads == 0 || p.max_seqlen == 0 || (varlen && p.total_tokens == 0)) {
    return cudaSuccess;
  }
  if (!p.q || !p.k || !p.v || !p.o || !p.lse) return cudaErrorInvalidValue;
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.o)) {
    return cudaErrorInvalidValue;
  }
  if ((reinterpret_cast<uintptr_t>(p.lse) & 3u) != 0) return cudaErrorInvalidValue;
  const int64_t rows = varlen ? p.total_tokens : p.max_seqlen;
  if (!stride_ok(p.q_row_stride, rows) || !stride_ok(p.k_row_stride, rows) ||
      !stride_ok(p.v_row_stride, rows) || !stride_ok(p.q_head_stride, p.heads) ||
      !stride_ok(p.k_head_stride, p.heads) || !stride_ok(p.v_head_stride, p.heads)) {
    return cudaErrorInvalidValue;
  }
  if (!varlen && (!stride_ok(p.q_batch_stride, p.batch) || !stride_ok(p.k_batch_stride, p.batch) ||
                  !stride_ok(p.v_batch_stride, p.batch))) {
    return cudaErrorInvalidValue;
  }

  const int num_m_blocks = (p.max_seqlen + kBlockM - 1) / kBlockM;
  const int64_t grid = int64_t(p.batch) * p.heads * num_m_blocks;
  if (grid > INT_MAX) return cudaErrorInvalidConfiguration;

  AttentionFwdParams kp = p;
  // Strides of size-1 dimensions are never used by the kernel; make that explicit.
  if (rows <= 1) kp.q_row_stride = kp.k_row_stride = kp.v_row_stride = 0;
  if (p.heads <= 1) kp.q_head_stride = kp.k_head_stride = kp.v_head_stride = 0;
  if (varlen || p.batch <= 1) kp.q_batch_stride = kp.k_batch_stride = kp.v_batch_stride = 0;

  const unsigned g = static_cast<unsigned>(grid);
  return p.dtype == DType::kFloat16 ? dispatch_head_dim<__half>(kp, num_m_blocks, g, stream)
                                    : dispatch_head_dim<__nv_bfloat16>(kp, num_m_blocks, g, stream);
}

}  // namespace roberta_fast::cuda
