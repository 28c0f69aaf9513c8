// CPU attention kernels, forward and backward. See attention.h.
//
// Work is split into items of (sequence, head, block range) run on ATen's threads. An item
// gathers the real tokens of its (sequence, head) once into zero-padded contiguous buffers in
// the layouts the matrix products read, then walks query blocks (kBlockQ) x key blocks (kBlockK):
// the forward with an online softmax (running max and sum in fp32, O rescaled per key block),
// the backward FlashAttention-2 style per key block (dV, dK accumulated over all query blocks,
// dQ accumulated over the item's key blocks; items that share a (sequence, head) add their dQ
// afterwards). Only real tokens are ever read, so padding costs neither time nor correctness.
//
// Matrix products: ATen's at::native::cpublas::brgemm (oneDNN's brgemm micro-kernels, exported
// by libtorch_cpu), with bf16 operands on AMX tiles where could_pack(bf16) says the CPU has them,
// else in fp32 (AVX-512 / AVX2 FMA). Measured on this project's development machine (Xeon with
// AMX, one thread, best of 7, QK^T of a 64 x 64 block pair at D = 64): fp32 brgemm 4.7 us
// (111 GFLOP/s), MKL sgemm 8.6 us (61 GFLOP/s), an at::vec register-blocked loop 87 us; bf16
// brgemm on AMX 1.1 us (480 GFLOP/s), MKL's bf16 gemm 2.1 us (255 GFLOP/s), at::vec via fp32
// 102 us. cpublas::gemm (the MKL/oneDNN dispatcher) is not exported to extensions; brgemm is.
// AMX wants B in VNNI order (pairs of reduction rows interleaved); the layouts are written here
// directly (the C++ test checks them against cpublas::pack).
//
// Dropout: each row's keep bits come from csrc/cpu/philox_simd.h (the LayerNorm's generator) and
// are applied with simd::select_mul; vectors, conversions and exp are csrc/cpu/simd.h's.
#include "cpu/simd.h"  // first: it configures ATen's vector headers

#include "cpu/attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include "cpu/philox_simd.h"

namespace roberta_fast {
namespace cpu {
namespace {

using c10::BFloat16;
using philox_simd::Dropout;
using philox_simd::lane_bits;
using simd::kLanes;
using simd::Vec;

// Rows and columns of every product operand are padded with zeros to a multiple of kPad: AMX
// wants even reduction lengths, and few distinct shapes keep oneDNN's JIT cache small (each new
// (M, N, K) costs ~0.2 ms of code generation once per thread).
constexpr int64_t kPad = 16;
constexpr int64_t kBlockQ = 64;   // query rows per block
constexpr int64_t kBlockK = 128;  // keys per block (one block for RoBERTa's L <= 128)
// Items per thread that make the split of a (sequence, head) into block ranges worth its cost.
constexpr int64_t kItemsPerThread = 4;
constexpr float kInf = std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// --------------------------------------------------------------------------------------------
// The batch: sequences, their real tokens, where their rows go
// --------------------------------------------------------------------------------------------

struct Sequence {
  int64_t b = 0;                 // index: dropout offsets, batch stride
  int64_t n = 0;                 // real tokens
  const int32_t* pos = nullptr;  // positions of the real tokens in the sequence (null: 0 .. n-1)
  int64_t token0 = 0;            // varlen: first packed token; padded: 0
  int64_t row0 = 0;              // first row of the contiguous outputs
  int64_t lse0 = 0;              // lse[lse0 + h * lse_head + position]

  int64_t position(int64_t c) const { return pos ? pos[c] : c; }
};

struct Batch {
  Batch() = default;
  Batch(const Batch&) = delete;  // Sequence::pos points into `positions`
  Batch(Batch&&) = default;
  std::vector<Sequence> seqs;
  std::vector<int32_t> positions;  // storage behind Sequence::pos (key-padding mask)
  bool varlen = false;
  int64_t lse_head = 0;
};

Batch describe(const AttentionLayout& layout) {
  Batch out;
  out.varlen = layout.cu_seqlens != nullptr;
  out.lse_head = out.varlen ? layout.tokens : layout.seqlen;
  const int64_t len = layout.seqlen;
  if (layout.key_padding_mask) {
    for (int64_t i = 0; i < layout.batch * len; ++i) {
      if (layout.key_padding_mask[i]) out.positions.push_back(static_cast<int32_t>(i % len));
    }
  }
  int64_t next = 0;  // into positions
  for (int64_t b = 0; b < layout.batch; ++b) {
    Sequence s;
    s.b = b;
    if (out.varlen) {
      s.token0 = layout.cu_seqlens[b];
      s.n = layout.cu_seqlens[b + 1] - layout.cu_seqlens[b];
      s.row0 = s.token0;
      s.lse0 = s.token0;
    } else {
      s.row0 = b * len;
      s.lse0 = b * layout.heads * len;
      if (layout.key_padding_mask) {
        const bool* m = layout.key_padding_mask + b * len;
        s.n = std::count(m, m + len, true);
        s.pos = out.positions.data() + next;
        next += s.n;
        // A run of consecutive positions from 0 is the identity: no table needed.
        if (s.n == 0 || s.pos[s.n - 1] == s.n - 1) s.pos = nullptr;
      } else {
        s.n = len;
      }
    }
    out.seqs.push_back(s);
  }
  return out;
}

template <typename T>
const T* head_base(const AttentionOperand<T>& x, const Batch& batch, const Sequence& s,
                   int64_t h) {
  return x.data + (batch.varlen ? 0 : s.b * x.batch) + s.token0 * x.token + h * x.head;
}

// --------------------------------------------------------------------------------------------
// Row helpers (fp32 vectors of csrc/cpu/simd.h; lanes past a row's end load as 0, never stored)
// --------------------------------------------------------------------------------------------

inline void scale_row(float* x, int64_t n, float a) {
  const Vec va(a);
  for (int64_t j = 0; j < n; j += kLanes) {
    const int64_t m = std::min(kLanes, n - j);
    simd::store(x + j, simd::load(x + j, m) * va, m);
  }
}

// max(scale * x) over a row of raw scores: scale * max(x), or scale * min(x) for scale < 0.
inline float scaled_max(const float* x, int64_t n, float scale) {
  const Vec vsign(scale < 0.f ? -1.f : 1.f);  // max(sign * x) * |scale|
  Vec hi(-kInf);
  for (int64_t j = 0; j < n; j += kLanes) {
    const int64_t m = std::min(kLanes, n - j);
    hi = simd::max_lanes(hi, Vec::set(Vec(-kInf), simd::load(x + j, m) * vsign, m));
  }
  return simd::hmax(hi) * std::fabs(scale);
}

// x = exp(scale * x - shift) in place, returns the sum of the exponentials; with `keep` (the
// row's dropout keep bits) the stored values are the kept ones times keep_scale, the others 0.
inline float exp_and_sum(float* x, int64_t n, float scale, float shift, const uint64_t* keep,
                         float keep_scale) {
  const Vec vscale(scale), vshift(shift), vkeep(keep_scale);
  Vec acc(0.f);
  for (int64_t j = 0; j < n; j += kLanes) {
    const int64_t m = std::min(kLanes, n - j);
    const Vec e = simd::exp(at::vec::fmsub(simd::load(x + j, m), vscale, vshift));
    acc = acc + simd::first(e, m);
    simd::store(x + j, keep ? simd::select_mul(lane_bits(keep, j), e, vkeep) : e, m);
  }
  return simd::hsum(acc);
}

// One backward row over n keys: s (raw q.k) becomes the kept probabilities pd, dp (dO.v)
// becomes ds = p * (dp * mult - delta) with p = exp(scale * s - lse), pd = p * mult, mult the
// dropout multiplier from the keep bits `keep` (0 or keep_scale; 1 without dropout).
inline void backward_row(float* s, float* dp, const uint64_t* keep, float keep_scale, int64_t n,
                         float scale, float lse, float delta) {
  const Vec vscale(scale), vlse(lse), vdelta(delta), vkeep(keep_scale);
  for (int64_t j = 0; j < n; j += kLanes) {
    const int64_t m = std::min(kLanes, n - j);
    const Vec p = simd::exp(at::vec::fmsub(simd::load(s + j, m), vscale, vlse));
    Vec pd = p;
    Vec g = simd::load(dp + j, m);
    if (keep) {
      const uint32_t lanes = lane_bits(keep, j);
      pd = simd::select_mul(lanes, p, vkeep);
      g = simd::select_mul(lanes, g, vkeep);
    }
    simd::store(s + j, pd, m);
    simd::store(dp + j, p * (g - vdelta), m);
  }
}

inline float dot_row(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  for (int64_t j = 0; j < n; j += kLanes) {
    const int64_t m = std::min(kLanes, n - j);
    acc = at::vec::fmadd(simd::load(a + j, m), simd::load(b + j, m), acc);
  }
  return simd::hsum(acc);
}

// --------------------------------------------------------------------------------------------
// Operand layouts for brgemm (C[M, N] (+)= A[M, K] B[K, N], all row-major)
// --------------------------------------------------------------------------------------------

template <typename Tc>
constexpr bool kVnni = std::is_same_v<Tc, BFloat16>;

template <typename Tc>
inline void gemm(int64_t m, int64_t n, int64_t k, const Tc* a, int64_t lda, const Tc* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, kVnni<Tc>);
}

// Rows c0 .. c1 - 1 of one (sequence, head) operand into dst [rows][ld] as Tc, zeros around.
template <typename T, typename Tc>
void gather_rows(const T* base, int64_t token_stride, const Sequence& s, int64_t c0, int64_t c1,
                 int64_t d, int64_t rows, int64_t ld, Tc* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    Tc* out = dst + r * ld;
    if (c0 + r < c1) {
      simd::convert(base + s.position(c0 + r) * token_stride, out, d);
      std::fill(out + d, out + ld, Tc(0.f));
    } else {
      std::fill(out, out + ld, Tc(0.f));
    }
  }
}

// B operand whose reduction dimension runs over the rows of `rows` [nrows][ld]: the rows
// themselves in fp32; for AMX (VNNI) rows 2r and 2r + 1 interleaved element by element.
template <typename Tc>
const Tc* rows_as_b(const Tc* rows, int64_t nrows, int64_t ld, std::vector<Tc>& vnni) {
  if constexpr (!kVnni<Tc>) {
    (void)nrows;
    (void)ld;
    (void)vnni;
    return rows;
  } else {
    vnni.resize(nrows * ld);
    for (int64_t r = 0; r < nrows; r += 2) {
      const uint16_t* a = reinterpret_cast<const uint16_t*>(rows + r * ld);
      const uint16_t* b = a + ld;
      uint32_t* out = reinterpret_cast<uint32_t*>(vnni.data() + r * ld);
      for (int64_t j = 0; j < ld; ++j) out[j] = a[j] | (static_cast<uint32_t>(b[j]) << 16);
    }
    return vnni.data();
  }
}

#if RF_SIMD_AVX512
// dst[c][r] = src[r][c] for a 16 x 16 block of 32-bit words (rows lds, ldd apart).
inline void transpose16x16(const uint32_t* src, int64_t lds, uint32_t* dst, int64_t ldd) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * lds);
  // Within each 128-bit lane: pairs of rows, then quads; then the 4 x 4 grid of lanes.
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // r[4 i + e], lane k: rows 4 i .. 4 i + 3 of column 4 k + e.
  for (int e = 0; e < 4; ++e) {
    const __m512i v0 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x88);
    const __m512i v1 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xDD);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x88);
    const __m512i v3 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xDD);
    _mm512_storeu_si512(dst + e * ldd, _mm512_shuffle_i32x4(v0, v2, 0x88));
    _mm512_storeu_si512(dst + (4 + e) * ldd, _mm512_shuffle_i32x4(v1, v3, 0x88));
    _mm512_storeu_si512(dst + (8 + e) * ldd, _mm512_shuffle_i32x4(v0, v2, 0xDD));
    _mm512_storeu_si512(dst + (12 + e) * ldd, _mm512_shuffle_i32x4(v1, v3, 0xDD));
  }
}
constexpr int64_t kTransposeTile = 16;
#else
constexpr int64_t kTransposeTile = 1;
#endif

// dst[c][r] = src[r][c] for 32-bit words, src [rows][cols].
inline void transpose32(const uint32_t* src, int64_t rows, int64_t cols, uint32_t* dst) {
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t r1 = std::min(rows, r0 + kTile);
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t c1 = std::min(cols, c0 + kTile);
#if RF_SIMD_AVX512
      if (r1 - r0 == kTransposeTile && c1 - c0 == kTransposeTile) {
        transpose16x16(src + r0 * cols + c0, cols, dst + c0 * rows + r0, rows);
        continue;
      }
#endif
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
    }
  }
}

// B operands of the products with the reduction over the head dim (S = Q K^T, dP = dO V^T):
// for each key block of `rows` [nrows][ld], its transpose [ld][w] (fp32) or the VNNI form
// [ld / 2][w][2] (bf16), which is the transpose of the rows viewed as 32-bit pairs. Block kb
// starts at element j0 * ld with j0 = kb * kBlockK.
template <typename Tc>
void keys_as_b(const Tc* rows, int64_t nrows, int64_t ld, Tc* dst) {
  constexpr int64_t kWords = sizeof(uint32_t) / sizeof(Tc);  // elements per 32-bit word
  for (int64_t j0 = 0; j0 < nrows; j0 += kBlockK) {
    const int64_t w = std::min(kBlockK, nrows - j0);
    transpose32(reinterpret_cast<const uint32_t*>(rows + j0 * ld), w, ld / kWords,
                reinterpret_cast<uint32_t*>(dst + j0 * ld));
  }
}

// dst[c][r] = Tc(src[r][c]) for an fp32 tile src [rows][cols] (through `tmp` for bf16).
template <typename Tc>
void transpose_tile(const float* src, int64_t rows, int64_t cols, Tc* dst,
                    std::vector<float>& tmp) {
  if constexpr (std::is_same_v<Tc, float>) {
    (void)tmp;
    transpose32(reinterpret_cast<const uint32_t*>(src), rows, cols,
                reinterpret_cast<uint32_t*>(dst));
  } else {
    tmp.resize(rows * cols);
    transpose32(reinterpret_cast<const uint32_t*>(src), rows, cols,
                reinterpret_cast<uint32_t*>(tmp.data()));
    simd::convert(tmp.data(), dst, rows * cols);
  }
}

// --------------------------------------------------------------------------------------------
// Work items and threads
// --------------------------------------------------------------------------------------------

struct Item {
  int64_t seq, head, block0, block1;  // blocks: query blocks (forward) or key blocks (backward)
  int64_t cost;
  int64_t partial = -1;  // backward: the dQ partial of this item (float offset), -1: none
};

// Items of (sequence, head, block range): each (sequence, head) is cut into as many ranges as
// it takes to give every thread kItemsPerThread items, never more than it has blocks.
std::vector<Item> make_items(const Batch& batch, int64_t heads, int64_t block) {
  int64_t pairs = 0;
  for (const Sequence& s : batch.seqs) pairs += s.n > 0 ? heads : 0;
  const int64_t want = kItemsPerThread * at::get_num_threads();
  const int64_t split = pairs > 0 ? std::max<int64_t>(1, ceil_div(want, pairs)) : 1;
  std::vector<Item> items;
  for (int64_t si = 0; si < static_cast<int64_t>(batch.seqs.size()); ++si) {
    const int64_t n = batch.seqs[si].n;
    if (n == 0) continue;
    const int64_t blocks = ceil_div(n, block);
    const int64_t parts = std::min(split, blocks);
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t part = 0; part < parts; ++part) {
        const int64_t b0 = blocks * part / parts, b1 = blocks * (part + 1) / parts;
        items.push_back({si, h, b0, b1, (std::min(n, b1 * block) - b0 * block) * n});
      }
    }
  }
  return items;
}

// Runs work(item, state) for every item on ATen's threads; a thread takes the next item when it
// is free, largest first, so sequences of unequal length do not leave a thread idle at the end.
template <typename State, typename Work>
void run_items(std::vector<Item>& items, Work&& work) {
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  const int64_t count = static_cast<int64_t>(items.size());
  if (count == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(count, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    State state;
    for (int64_t i = next++; i < count; i = next++) work(items[i], state);
    state.release();
  });
}

// --------------------------------------------------------------------------------------------
// The kernels
// --------------------------------------------------------------------------------------------

struct Problem {
  const AttentionLayout* layout;
  Batch batch;
  int64_t d;   // head dim
  int64_t dp;  // head dim padded for the products (a multiple of kPad for AMX)
  float scale;
  Dropout drop;  // active iff p > 0

  // The dropout keep bits of position i against keys c0 .. c0 + n - 1 of sequence s, head h:
  // bit c of keep (philox_simd::keep_bits_words(n) words) for key c0 + c.
  void keep_bits(const Sequence& s, int64_t h, int64_t i, int64_t c0, int64_t n, uint64_t* keep,
                 std::vector<uint64_t>& span_bits) const {
    const int64_t len = layout->seqlen;
    const uint64_t row = static_cast<uint64_t>(((s.b * layout->heads + h) * len + i) * len);
    const int64_t j0 = s.position(c0);
    const int64_t span = s.position(c0 + n - 1) - j0 + 1;
    if (span == n) {
      philox_simd::fill_keep_bits(drop, row + j0, n, keep);
      return;
    }
    // Keys with holes between them: draw the span, keep the real keys' bits.
    span_bits.resize(philox_simd::keep_bits_words(span));
    philox_simd::fill_keep_bits(drop, row + j0, span, span_bits.data());
    std::fill(keep, keep + philox_simd::keep_bits_words(n), uint64_t{0});
    for (int64_t c = 0; c < n; ++c) {
      const int64_t b = s.position(c0 + c) - j0;
      keep[c >> 6] |= ((span_bits[b >> 6] >> (b & 63)) & 1u) << (c & 63);
    }
  }
};

// Tokens c0 .. c1 - 1 of operand x for (sequence s, head h) into dst, as Tc rows of pr.dp
// elements, zero-padded to a multiple of kPad rows.
template <typename T, typename Tc>
void gather(const Problem& pr, const AttentionOperand<T>& x, const Sequence& s, int64_t h,
            int64_t c0, int64_t c1, std::vector<Tc>& dst) {
  const int64_t rows = round_up(c1 - c0, kPad);
  dst.resize(rows * pr.dp);
  gather_rows(head_base(x, pr.batch, s, h), x.token, s, c0, c1, pr.d, rows, pr.dp, dst.data());
}

template <typename Tc>
struct ThreadState {
  std::vector<Tc> q, k, v, dout, keys_b, values_b, tmp_vnni0, tmp_vnni1, tmp_vnni2;
  std::vector<Tc> a0, a1, a2;            // converted / transposed A tiles
  std::vector<float> s, dp, o, dq, dk, dv, tile;  // fp32 tiles and accumulators
  std::vector<float> m, l, lse, delta, row0, row1;
  std::vector<uint64_t> keep, span_bits;  // a row's dropout keep bits (see Problem::keep_bits)
  void release() {
    if constexpr (kVnni<Tc>) at::native::cpublas::brgemm_release(true);
  }
};

template <typename T>
T* out_row(T* base, const AttentionLayout& layout, const Sequence& s, int64_t c, int64_t h) {
  return base + ((s.row0 + s.position(c)) * layout.heads + h) * layout.head_dim;
}

// The rows of head h at the padded positions of padded sequence b: zero in each of `outs`, and
// LSE = +inf. A thread does this for the (sequence, head) whose first block it runs.
template <typename T>
void fill_padding(const AttentionLayout& layout, int64_t b, int64_t h,
                  std::initializer_list<T*> outs, float* lse) {
  if (!layout.key_padding_mask) return;
  const int64_t len = layout.seqlen, d = layout.head_dim;
  for (int64_t i = 0; i < len; ++i) {
    if (layout.key_padding_mask[b * len + i]) continue;
    const int64_t at = ((b * len + i) * layout.heads + h) * d;
    for (T* o : outs) std::fill(o + at, o + at + d, T(0.f));
    if (lse) lse[(b * layout.heads + h) * len + i] = kInf;
  }
}

// fill_padding for the sequences without any real token (they get no work items).
template <typename T>
void fill_empty_sequences(const AttentionLayout& layout, const Batch& batch,
                          std::initializer_list<T*> outs, float* lse) {
  for (const Sequence& s : batch.seqs) {
    if (s.n > 0) continue;
    for (int64_t h = 0; h < layout.heads; ++h) fill_padding<T>(layout, s.b, h, outs, lse);
  }
}

template <typename T, typename Tc>
void forward_item(const Problem& pr, const AttentionOperand<T>& q, const AttentionOperand<T>& k,
                  const AttentionOperand<T>& v, T* out, float* lse, const Item& item,
                  ThreadState<Tc>& w) {
  const AttentionLayout& layout = *pr.layout;
  const Sequence& s = pr.batch.seqs[item.seq];
  const int64_t h = item.head, n = s.n, n16 = round_up(n, kPad), d = pr.d, dp = pr.dp;
  if (item.block0 == 0) fill_padding<T>(layout, s.b, h, {out}, lse);

  // Keys as K^T blocks and values as B over their rows.
  gather(pr, k, s, h, 0, n, w.k);
  w.keys_b.resize(n16 * dp);
  keys_as_b(w.k.data(), n16, dp, w.keys_b.data());
  gather(pr, v, s, h, 0, n, w.v);
  const Tc* values = rows_as_b(w.v.data(), n16, dp, w.tmp_vnni0);

  // This item's queries.
  const int64_t q_begin = item.block0 * kBlockQ, q_end = std::min(n, item.block1 * kBlockQ);
  gather(pr, q, s, h, q_begin, q_end, w.q);

  const int64_t kmax = std::min(n16, kBlockK);
  w.s.resize(kBlockQ * kmax);
  w.a0.resize(kBlockQ * kmax);
  w.o.resize(kBlockQ * dp);
  w.m.resize(kBlockQ);
  w.l.resize(kBlockQ);
  w.keep.resize(philox_simd::keep_bits_words(kBlockK));
  for (int64_t i0 = q_begin; i0 < q_end; i0 += kBlockQ) {
    const int64_t mq = std::min(kBlockQ, n - i0), mqp = round_up(mq, kPad);
    const Tc* qa = w.q.data() + (i0 - q_begin) * dp;
    std::fill(w.m.begin(), w.m.end(), -kInf);
    std::fill(w.l.begin(), w.l.end(), 0.f);
    for (int64_t j0 = 0; j0 < n; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, n - j0), nkp = round_up(nk, kPad);
      float* st = w.s.data();
      gemm<Tc>(mqp, nkp, dp, qa, dp, w.keys_b.data() + j0 * dp, nkp, st, nkp, false);
      Tc* pa = kVnni<Tc> ? w.a0.data() : reinterpret_cast<Tc*>(st);
      for (int64_t r = 0; r < mqp; ++r) {
        float* srow = st + r * nkp;
        Tc* prow = pa + r * nkp;
        if (r >= mq) {  // padding rows of the block: zero probabilities
          std::fill(prow, prow + nkp, Tc(0.f));
          continue;
        }
        const uint64_t* keep = nullptr;
        if (pr.drop.active) {
          pr.keep_bits(s, h, s.position(i0 + r), j0, nk, w.keep.data(), w.span_bits);
          keep = w.keep.data();
        }
        const float m_new = std::max(w.m[r], scaled_max(srow, nk, pr.scale));
        const float sum = exp_and_sum(srow, nk, pr.scale, m_new, keep, pr.drop.scale);
        const float alpha = std::exp(w.m[r] - m_new);  // 0 on the first block
        w.l[r] = w.l[r] * alpha + sum;
        w.m[r] = m_new;
        if (j0 > 0) scale_row(w.o.data() + r * dp, dp, alpha);
        if constexpr (kVnni<Tc>) simd::convert(srow, prow, nk);  // fp32: prow is srow
        std::fill(prow + nk, prow + nkp, Tc(0.f));
      }
      gemm<Tc>(mqp, dp, nkp, pa, nkp, values + j0 * dp, dp, w.o.data(), dp, j0 > 0);
    }
    for (int64_t r = 0; r < mq; ++r) {
      float* orow = w.o.data() + r * dp;
      scale_row(orow, d, 1.f / w.l[r]);
      simd::convert(orow, out_row(out, layout, s, i0 + r, h), d);
      lse[s.lse0 + h * pr.batch.lse_head + s.position(i0 + r)] = w.m[r] + std::log(w.l[r]);
    }
  }
}

template <typename T, typename Tc>
void backward_item(const Problem& pr, const AttentionOperand<T>& dout,
                   const AttentionOperand<T>& q, const AttentionOperand<T>& k,
                   const AttentionOperand<T>& v, const AttentionOperand<T>& out, const float* lse,
                   T* dq, T* dk, T* dv, float* partials, const Item& item, ThreadState<Tc>& w) {
  const AttentionLayout& layout = *pr.layout;
  const Sequence& s = pr.batch.seqs[item.seq];
  const int64_t h = item.head, n = s.n, n16 = round_up(n, kPad), d = pr.d, dp = pr.dp;
  if (item.block0 == 0) fill_padding<T>(layout, s.b, h, {dq, dk, dv}, nullptr);

  // Every query row: Q and dO as A operands and as B over their rows; LSE and delta.
  gather(pr, q, s, h, 0, n, w.q);
  gather(pr, dout, s, h, 0, n, w.dout);
  const Tc* q_b = rows_as_b(w.q.data(), n16, dp, w.tmp_vnni0);
  const Tc* dout_b = rows_as_b(w.dout.data(), n16, dp, w.tmp_vnni1);
  w.lse.resize(n);
  w.delta.resize(n);
  w.row0.resize(d);
  w.row1.resize(d);
  {
    const T* out_base = head_base(out, pr.batch, s, h);
    for (int64_t c = 0; c < n; ++c) {
      const int64_t i = s.position(c);
      simd::convert(w.dout.data() + c * dp, w.row0.data(), d);  // dO as gathered, exactly
      simd::convert(out_base + i * out.token, w.row1.data(), d);
      w.delta[c] = dot_row(w.row0.data(), w.row1.data(), d);
      w.lse[c] = lse[s.lse0 + h * pr.batch.lse_head + i];
    }
  }

  // This item's keys: K^T and V^T blocks, K as B over its rows.
  const int64_t k_begin = item.block0 * kBlockK, k_end = std::min(n, item.block1 * kBlockK);
  const int64_t k_rows = round_up(k_end - k_begin, kPad);
  gather(pr, k, s, h, k_begin, k_end, w.k);
  w.keys_b.resize(k_rows * dp);
  keys_as_b(w.k.data(), k_rows, dp, w.keys_b.data());
  const Tc* k_b = rows_as_b(w.k.data(), k_rows, dp, w.tmp_vnni2);
  gather(pr, v, s, h, k_begin, k_end, w.v);
  w.values_b.resize(k_rows * dp);
  keys_as_b(w.v.data(), k_rows, dp, w.values_b.data());

  const int64_t kmax = std::min(k_rows, kBlockK);
  w.s.resize(kBlockQ * kmax);
  w.dp.resize(kBlockQ * kmax);
  w.a0.resize(kBlockQ * kmax);
  w.a1.resize(kBlockQ * kmax);
  w.a2.resize(kBlockQ * kmax);
  w.dq.resize(n16 * dp);
  w.dk.resize(kmax * dp);
  w.dv.resize(kmax * dp);
  w.keep.resize(philox_simd::keep_bits_words(kBlockK));
  for (int64_t j0 = k_begin; j0 < k_end; j0 += kBlockK) {
    const int64_t nk = std::min(kBlockK, n - j0), nkp = round_up(nk, kPad);
    const int64_t jo = j0 - k_begin;  // offset in this item's key buffers
    for (int64_t i0 = 0; i0 < n; i0 += kBlockQ) {
      const int64_t mq = std::min(kBlockQ, n - i0), mqp = round_up(mq, kPad);
      float* st = w.s.data();
      float* dpt = w.dp.data();
      gemm<Tc>(mqp, nkp, dp, w.q.data() + i0 * dp, dp, w.keys_b.data() + jo * dp, nkp, st, nkp,
               false);
      gemm<Tc>(mqp, nkp, dp, w.dout.data() + i0 * dp, dp, w.values_b.data() + jo * dp, nkp, dpt,
               nkp, false);
      for (int64_t r = 0; r < mqp; ++r) {
        float* srow = st + r * nkp;
        float* dprow = dpt + r * nkp;
        if (r < mq) {
          const uint64_t* keep = nullptr;
          if (pr.drop.active) {
            pr.keep_bits(s, h, s.position(i0 + r), j0, nk, w.keep.data(), w.span_bits);
            keep = w.keep.data();
          }
          backward_row(srow, dprow, keep, pr.drop.scale, nk, pr.scale, w.lse[i0 + r],
                       w.delta[i0 + r]);
          std::fill(srow + nk, srow + nkp, 0.f);
          std::fill(dprow + nk, dprow + nkp, 0.f);
        } else {
          std::fill(srow, srow + nkp, 0.f);
          std::fill(dprow, dprow + nkp, 0.f);
        }
      }
      // dV += Pd^T dO, dK += dS^T Q, dQ += dS K (scale applied when written out).
      Tc* pdt = w.a0.data();
      Tc* dst = w.a1.data();
      transpose_tile(st, mqp, nkp, pdt, w.tile);
      transpose_tile(dpt, mqp, nkp, dst, w.tile);
      const Tc* ds = reinterpret_cast<const Tc*>(dpt);
      if constexpr (kVnni<Tc>) {
        simd::convert(dpt, w.a2.data(), mqp * nkp);
        ds = w.a2.data();
      }
      gemm<Tc>(nkp, dp, mqp, pdt, mqp, dout_b + i0 * dp, dp, w.dv.data(), dp, i0 > 0);
      gemm<Tc>(nkp, dp, mqp, dst, mqp, q_b + i0 * dp, dp, w.dk.data(), dp, i0 > 0);
      gemm<Tc>(mqp, dp, nkp, ds, nkp, k_b + jo * dp, dp, w.dq.data() + i0 * dp, dp,
               j0 > k_begin);
    }
    for (int64_t r = 0; r < nk; ++r) {
      float* dkrow = w.dk.data() + r * dp;
      scale_row(dkrow, d, pr.scale);
      simd::convert(dkrow, out_row(dk, layout, s, j0 + r, h), d);
      simd::convert(w.dv.data() + r * dp, out_row(dv, layout, s, j0 + r, h), d);
    }
  }
  for (int64_t c = 0; c < n; ++c) {
    float* dqrow = w.dq.data() + c * dp;
    if (partials) {
      std::memcpy(partials + item.partial + c * d, dqrow, d * sizeof(float));
    } else {
      scale_row(dqrow, d, pr.scale);
      simd::convert(dqrow, out_row(dq, layout, s, c, h), d);
    }
  }
}

Problem make_problem(const AttentionLayout& layout, bool vnni, float scale, float dropout_p,
                     uint64_t seed) {
  return Problem{&layout, describe(layout), layout.head_dim,
                 vnni ? round_up(layout.head_dim, kPad) : layout.head_dim, scale,
                 Dropout(dropout_p, seed)};
}

bool use_amx(AttentionCompute compute) {
  return compute == AttentionCompute::kAuto && attention_bf16_uses_amx();
}

template <typename T, typename Tc>
void run_fwd(const AttentionLayout& layout, AttentionOperand<T> q, AttentionOperand<T> k,
             AttentionOperand<T> v, T* out, float* lse, float scale, float dropout_p,
             uint64_t seed) {
  const Problem pr = make_problem(layout, kVnni<Tc>, scale, dropout_p, seed);
  fill_empty_sequences<T>(layout, pr.batch, {out}, lse);
  std::vector<Item> items = make_items(pr.batch, layout.heads, kBlockQ);
  run_items<ThreadState<Tc>>(items, [&](const Item& item, ThreadState<Tc>& w) {
    forward_item<T, Tc>(pr, q, k, v, out, lse, item, w);
  });
}

template <typename T, typename Tc>
void run_bwd(const AttentionLayout& layout, AttentionOperand<T> dout, AttentionOperand<T> q,
             AttentionOperand<T> k, AttentionOperand<T> v, AttentionOperand<T> out,
             const float* lse, T* dq, T* dk, T* dv, float scale, float dropout_p, uint64_t seed) {
  const Problem pr = make_problem(layout, kVnni<Tc>, scale, dropout_p, seed);
  fill_empty_sequences<T>(layout, pr.batch, {dq, dk, dv}, nullptr);
  std::vector<Item> items = make_items(pr.batch, layout.heads, kBlockK);
  // A (sequence, head) cut into several key ranges gets one dQ partial per range, summed below.
  struct Group {
    int64_t seq, head, first, parts;
  };
  std::vector<Group> groups;
  int64_t partial_size = 0;
  for (size_t i = 0; i < items.size();) {
    size_t e = i;
    while (e < items.size() && items[e].seq == items[i].seq && items[e].head == items[i].head) ++e;
    if (e - i > 1) {
      const int64_t rows = pr.batch.seqs[items[i].seq].n * pr.d;
      groups.push_back({items[i].seq, items[i].head, partial_size, static_cast<int64_t>(e - i)});
      for (size_t j = i; j < e; ++j, partial_size += rows) items[j].partial = partial_size;
    }
    i = e;
  }
  std::vector<float> partials(partial_size);
  run_items<ThreadState<Tc>>(items, [&](const Item& item, ThreadState<Tc>& w) {
    backward_item<T, Tc>(pr, dout, q, k, v, out, lse, dq, dk, dv,
                         item.partial >= 0 ? partials.data() : nullptr, item, w);
  });
  at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> row(pr.d);
    for (int64_t g = g0; g < g1; ++g) {
      const Group& grp = groups[g];
      const Sequence& s = pr.batch.seqs[grp.seq];
      const int64_t rows = s.n * pr.d;
      for (int64_t c = 0; c < s.n; ++c) {
        std::fill(row.begin(), row.end(), 0.f);
        for (int64_t part = 0; part < grp.parts; ++part) {
          const float* src = partials.data() + grp.first + part * rows + c * pr.d;
          for (int64_t j = 0; j < pr.d; ++j) row[j] += src[j];
        }
        scale_row(row.data(), pr.d, pr.scale);
        simd::convert(row.data(), out_row(dq, layout, s, c, grp.head), pr.d);
      }
    }
  });
}

}  // namespace

bool attention_bf16_uses_amx() { return at::native::cpublas::could_pack(at::kBFloat16); }

void attention_dropout_multipliers(uint64_t seed, uint64_t offset, int64_t n, float p,
                                   float* out) {
  philox_simd::multipliers(Dropout(p, seed), offset, n, out);
}

template <typename T>
void attention_fwd(const AttentionLayout& layout, AttentionOperand<T> q, AttentionOperand<T> k,
                   AttentionOperand<T> v, T* out, float* lse, float scale, float dropout_p,
                   uint64_t seed, AttentionCompute compute) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (use_amx(compute)) {
      return run_fwd<T, BFloat16>(layout, q, k, v, out, lse, scale, dropout_p, seed);
    }
  }
  run_fwd<T, float>(layout, q, k, v, out, lse, scale, dropout_p, seed);
}

template <typename T>
void attention_bwd(const AttentionLayout& layout, AttentionOperand<T> dout, AttentionOperand<T> q,
                   AttentionOperand<T> k, AttentionOperand<T> v, AttentionOperand<T> out,
                   const float* lse, T* dq, T* dk, T* dv, float scale, float dropout_p,
                   uint64_t seed, AttentionCompute compute) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (use_amx(compute)) {
      return run_bwd<T, BFloat16>(layout, dout, q, k, v, out, lse, dq, dk, dv, scale, dropout_p,
                                  seed);
    }
  }
  run_bwd<T, float>(layout, dout, q, k, v, out, lse, dq, dk, dv, scale, dropout_p, seed);
}

#define RF_INSTANTIATE(T)                                                                      \
  template void attention_fwd<T>(const AttentionLayout&, AttentionOperand<T>,                  \
                                 AttentionOperand<T>, AttentionOperand<T>, T*, float*, float,  \
                                 float, uint64_t, AttentionCompute);                           \
  template void attention_bwd<T>(const AttentionLayout&, AttentionOperand<T>,                  \
                                 AttentionOperand<T>, AttentionOperand<T>, AttentionOperand<T>, \
                                 AttentionOperand<T>, const float*, T*, T*, T*, float, float,  \
                                 uint64_t, AttentionCompute);

RF_INSTANTIATE(float)
RF_INSTANTIATE(c10::BFloat16)
RF_INSTANTIATE(c10::Half)
#undef RF_INSTANTIATE

}  // namespace cpu
}  // namespace roberta_fast
