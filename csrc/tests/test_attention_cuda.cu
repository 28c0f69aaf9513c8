// Checks roberta_fast::cuda::attention_fwd against a float64 host reference on random inputs:
// padded layout with a key padding mask (full, length-1, all-padding, random-length and
// arbitrary-mask rows), padded without a mask, and varlen (cu_seqlens) input; head dims 32/64/128;
// fp16 and bf16; sequence lengths 1, 7, 97, 513; contiguous, packed-QKV and gapped strides.
// Outputs are poisoned with NaN before the kernel runs; padding positions of the inputs hold NaN.
// Passes when ||O - ref|| / ||ref|| <= 1e-2 for every case, every valid row is within 5e-2 of its
// reference row, LSE matches, padded rows are exactly O = 0 / LSE = +inf, and nothing is NaN.
//
//   test_attention_cuda            run the checks (exit 0 = pass, 1 = mismatch, 2 = CUDA error)
//   test_attention_cuda --bench    also time a few RoBERTa-sized shapes
// ATTN_TEST_SEED=<n> in the environment replays a run (the seed is printed).
#include "../cuda/attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

using roberta_fast::cuda::attention_fwd;
using roberta_fast::cuda::attention_fwd_supports;
using roberta_fast::cuda::AttentionFwdParams;
using roberta_fast::cuda::DType;

#define CUDA_CHECK(expr)                                                                    \
  do {                                                                                      \
    const cudaError_t err_ = (expr);                                                        \
    if (err_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr,             \
                   cudaGetErrorString(err_));                                               \
      std::exit(2);                                                                         \
    }                                                                                       \
  } while (0)

namespace {

constexpr uint16_t kNaNBits = 0x7fff;  // a NaN in both fp16 and bf16

uint16_t to_bits(float x, DType dt) {
  if (dt == DType::kFloat16) return static_cast<__half_raw>(__float2half_rn(x)).x;
  return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(x)).x;
}

double from_bits(uint16_t u, DType dt) {
  if (dt == DType::kFloat16) {
    __half_raw r;
    r.x = u;
    return __half2float(__half(r));
  }
  __nv_bfloat16_raw r;
  r.x = u;
  return __bfloat162float(__nv_bfloat16(r));
}

enum class Layout { kContiguous, kPackedQKV, kGapped };

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::kContiguous: return "contiguous";
    case Layout::kPackedQKV: return "packed-qkv";
    default: return "gapped";
  }
}

struct Case {
  DType dtype;
  int head_dim;
  bool varlen;
  int heads;
  int max_seqlen;         // padded: L
  std::vector<int> lens;  // padded: real length per row (-1: arbitrary mask); varlen: lengths
  bool use_mask;          // padded only
  Layout layout;
  float in_scale;         // std of the inputs; larger gives peakier softmax
};

struct Tensor3 {  // one of q / k / v on the host, with the strides the kernel is given
  std::vector<uint16_t>* buf;
  int64_t offset, row, head, batch;
};

struct Result {
  bool ok;
  double err;  // relative-norm error of O
  std::string what;
};

Result run_case(const Case& cs, std::mt19937_64& rng) {
  const DType dt = cs.dtype;
  const int D = cs.head_dim;
  const int H = cs.heads;
  const int B = static_cast<int>(cs.lens.size());
  const int L = cs.max_seqlen;

  // Sequence bounds and per-token validity.
  std::vector<int32_t> cu(B + 1, 0);
  std::vector<uint8_t> mask;  // padded: [B, L]
  int64_t n_tok;              // rows of q/k/v/o
  if (cs.varlen) {
    for (int b = 0; b < B; ++b) cu[b + 1] = cu[b] + cs.lens[b];
    n_tok = cu[B];
  } else {
    n_tok = int64_t(B) * L;
    mask.assign(size_t(B) * L, 0);
    std::bernoulli_distribution coin(0.7);
    for (int b = 0; b < B; ++b) {
      if (cs.lens[b] >= 0) {
        for (int l = 0; l < cs.lens[b]; ++l) mask[size_t(b) * L + l] = 1;
      } else {
        for (int l = 0; l < L; ++l) mask[size_t(b) * L + l] = coin(rng) ? 1 : 0;
        if (L > 2) mask[size_t(b) * L] = 0;  // left padding as well as holes
      }
    }
  }
  auto seq_len = [&](int b) { return cs.varlen ? cs.lens[b] : L; };
  auto is_real = [&](int b, int l) { return cs.varlen || !cs.use_mask || mask[size_t(b) * L + l]; };
  auto token = [&](int b, int l) -> int64_t { return cs.varlen ? cu[b] + l : int64_t(b) * L + l; };

  // Host inputs in the requested layout; everything not a real element is NaN.
  std::vector<uint16_t> bufs[3];
  Tensor3 t[3];
  const int64_t n_rows_alloc = std::max<int64_t>(n_tok, 1);
  if (cs.layout == Layout::kPackedQKV) {
    bufs[0].assign(size_t(n_rows_alloc) * 3 * H * D + 8, kNaNBits);
    for (int i = 0; i < 3; ++i) {
      t[i] = {&bufs[0], int64_t(i) * H * D, 3LL * H * D, D, int64_t(L) * 3 * H * D};
    }
  } else {
    const int64_t hs = cs.layout == Layout::kGapped ? D + 8 : D;
    const int64_t rs = cs.layout == Layout::kGapped ? H * hs + 16 : H * hs;
    const int64_t bs = cs.layout == Layout::kGapped ? int64_t(L) * rs + 24 : int64_t(L) * rs;
    const int64_t elems = cs.varlen ? n_rows_alloc * rs : int64_t(std::max(B, 1)) * bs;
    for (int i = 0; i < 3; ++i) {
      bufs[i].assign(size_t(elems) + 8, kNaNBits);
      t[i] = {&bufs[i], 0, rs, hs, bs};
    }
  }
  auto elem_index = [&](const Tensor3& x, int b, int l, int h, int d) -> int64_t {
    const int64_t base = cs.varlen ? (cu[b] + l) * x.row : b * x.batch + l * x.row;
    return x.offset + base + h * x.head + d;
  };
  // The reference sees exactly the rounded inputs: ref[i] is [n_tok, H, D] in float64.
  std::vector<double> ref_in[3];
  std::normal_distribution<float> normal(0.f, cs.in_scale);
  for (int i = 0; i < 3; ++i) ref_in[i].assign(size_t(n_tok) * H * D, NAN);
  for (int b = 0; b < B; ++b) {
    for (int l = 0; l < seq_len(b); ++l) {
      if (!is_real(b, l)) continue;
      for (int i = 0; i < 3; ++i) {
        for (int h = 0; h < H; ++h) {
          for (int d = 0; d < D; ++d) {
            const uint16_t bits = to_bits(normal(rng), dt);
            (*t[i].buf)[elem_index(t[i], b, l, h, d)] = bits;
            ref_in[i][(size_t(token(b, l)) * H + h) * D + d] = from_bits(bits, dt);
          }
        }
      }
    }
  }

  // Device buffers; outputs poisoned with NaN.
  const size_t o_elems = size_t(n_tok) * H * D;
  const size_t lse_elems = size_t(n_tok) * H;
  uint16_t* d_bufs[3] = {nullptr, nullptr, nullptr};
  const int n_bufs = cs.layout == Layout::kPackedQKV ? 1 : 3;
  for (int i = 0; i < n_bufs; ++i) {
    CUDA_CHECK(cudaMalloc(&d_bufs[i], bufs[i].size() * 2));
    CUDA_CHECK(cudaMemcpy(d_bufs[i], bufs[i].data(), bufs[i].size() * 2, cudaMemcpyHostToDevice));
  }
  uint16_t* d_o = nullptr;
  float* d_lse = nullptr;
  int32_t* d_cu = nullptr;
  uint8_t* d_mask = nullptr;
  CUDA_CHECK(cudaMalloc(&d_o, std::max<size_t>(o_elems, 1) * 2));
  CUDA_CHECK(cudaMalloc(&d_lse, std::max<size_t>(lse_elems, 1) * 4));
  CUDA_CHECK(cudaMemset(d_o, 0xff, std::max<size_t>(o_elems, 1) * 2));
  CUDA_CHECK(cudaMemset(d_lse, 0xff, std::max<size_t>(lse_elems, 1) * 4));
  if (cs.varlen) {
    CUDA_CHECK(cudaMalloc(&d_cu, cu.size() * 4));
    CUDA_CHECK(cudaMemcpy(d_cu, cu.data(), cu.size() * 4, cudaMemcpyHostToDevice));
  } else if (cs.use_mask) {
    CUDA_CHECK(cudaMalloc(&d_mask, mask.size()));
    CUDA_CHECK(cudaMemcpy(d_mask, mask.data(), mask.size(), cudaMemcpyHostToDevice));
  }

  AttentionFwdParams p{};
  const void* ptrs[3];
  for (int i = 0; i < 3; ++i) {
    ptrs[i] = (cs.layout == Layout::kPackedQKV ? d_bufs[0] : d_bufs[i]) + t[i].offset;
  }
  p.q = ptrs[0];
  p.k = ptrs[1];
  p.v = ptrs[2];
  p.o = d_o;
  p.lse = d_lse;
  p.q_row_stride = t[0].row;
  p.k_row_stride = t[1].row;
  p.v_row_stride = t[2].row;
  p.q_head_stride = t[0].head;
  p.k_head_stride = t[1].head;
  p.v_head_stride = t[2].head;
  p.q_batch_stride = cs.varlen ? 0 : t[0].batch;
  p.k_batch_stride = cs.varlen ? 0 : t[1].batch;
  p.v_batch_stride = cs.varlen ? 0 : t[2].batch;
  p.cu_seqlens = d_cu;
  p.key_padding_mask = d_mask;
  p.batch = B;
  p.heads = H;
  p.max_seqlen = L;
  p.head_dim = D;
  p.total_tokens = cs.varlen ? n_tok : 0;
  p.scale = 1.f / std::sqrt(float(D));
  p.dtype = dt;
  CUDA_CHECK(attention_fwd(p, nullptr));
  CUDA_CHECK(cudaDeviceSynchronize());

  std::vector<uint16_t> o(o_elems);
  std::vector<float> lse(lse_elems);
  if (o_elems) CUDA_CHECK(cudaMemcpy(o.data(), d_o, o_elems * 2, cudaMemcpyDeviceToHost));
  if (lse_elems) CUDA_CHECK(cudaMemcpy(lse.data(), d_lse, lse_elems * 4, cudaMemcpyDeviceToHost));
  for (int i = 0; i < n_bufs; ++i) CUDA_CHECK(cudaFree(d_bufs[i]));
  CUDA_CHECK(cudaFree(d_o));
  CUDA_CHECK(cudaFree(d_lse));
  if (d_cu) CUDA_CHECK(cudaFree(d_cu));
  if (d_mask) CUDA_CHECK(cudaFree(d_mask));

  // float64 reference and comparison.
  double num = 0, den = 0, lse_num = 0, lse_den = 0, lse_max_abs = 0, row_max_rel = 0;
  int64_t nan_count = 0, bad_pad = 0;
  std::vector<double> s, o_ref(D);
  std::vector<int> keys;
  for (int b = 0; b < B; ++b) {
    const int n = seq_len(b);
    keys.clear();
    for (int j = 0; j < n; ++j) {
      if (is_real(b, j)) keys.push_back(j);
    }
    for (int h = 0; h < H; ++h) {
      for (int i = 0; i < n; ++i) {
        const int64_t tok = token(b, i);
        const uint16_t* orow = o.data() + (tok * H + h) * D;
        const float lse_out = cs.varlen ? lse[size_t(h) * n_tok + tok]
                                        : lse[(size_t(b) * H + h) * L + i];
        bool row_nan = std::isnan(lse_out);
        for (int d = 0; d < D; ++d) row_nan |= std::isnan(from_bits(orow[d], dt));
        if (row_nan) {
          ++nan_count;
          continue;
        }
        if (!is_real(b, i) || keys.empty()) {
          bool zero = std::isinf(lse_out) && lse_out > 0;
          for (int d = 0; d < D; ++d) zero &= from_bits(orow[d], dt) == 0.0;
          if (!zero) ++bad_pad;
          continue;
        }
        const double* qr = ref_in[0].data() + (size_t(tok) * H + h) * D;
        s.assign(keys.size(), 0.0);
        double m = -INFINITY;
        for (size_t jj = 0; jj < keys.size(); ++jj) {
          const double* kr = ref_in[1].data() + (size_t(token(b, keys[jj])) * H + h) * D;
          double acc = 0;
          for (int d = 0; d < D; ++d) acc += qr[d] * kr[d];
          s[jj] = acc * double(p.scale);
          m = std::max(m, s[jj]);
        }
        double l = 0;
        std::fill(o_ref.begin(), o_ref.end(), 0.0);
        for (size_t jj = 0; jj < keys.size(); ++jj) {
          const double* vr = ref_in[2].data() + (size_t(token(b, keys[jj])) * H + h) * D;
          const double e = std::exp(s[jj] - m);
          l += e;
          for (int d = 0; d < D; ++d) o_ref[d] += e * vr[d];
        }
        double rn = 0, rd = 0;
        for (int d = 0; d < D; ++d) {
          const double ref = o_ref[d] / l;
          const double diff = from_bits(orow[d], dt) - ref;
          rn += diff * diff;
          rd += ref * ref;
        }
        num += rn;
        den += rd;
        row_max_rel = std::max(row_max_rel, rd > 0 ? std::sqrt(rn / rd) : std::sqrt(rn));
        const double lse_ref = m + std::log(l);
        const double lse_diff = double(lse_out) - lse_ref;
        lse_num += lse_diff * lse_diff;
        lse_den += lse_ref * lse_ref;
        lse_max_abs = std::max(lse_max_abs, std::fabs(lse_diff));
      }
    }
  }
  // The loops above visit every output row: all [b, l] with l < L (padded), all T tokens (varlen).
  const double err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  const double lse_err = lse_den > 0 ? std::sqrt(lse_num / lse_den) : std::sqrt(lse_num);
  const bool ok = nan_count == 0 && bad_pad == 0 && err <= 1e-2 && row_max_rel <= 5e-2 &&
                  lse_err <= 1e-3;
  char line[512];
  std::string lens;
  for (int x : cs.lens) lens += (lens.empty() ? "" : ",") + std::to_string(x);
  std::snprintf(line, sizeof(line),
                "%-4s %-6s D=%-3d H=%d L=%-3d lens=[%s] %s%s in_std=%.1f | O rel %.2e, worst row "
                "%.2e | LSE rel %.2e, max abs %.2e | NaN rows %lld, bad padded rows %lld",
                ok ? "ok" : "FAIL", cs.varlen ? "varlen" : "padded", D, H, L, lens.c_str(),
                layout_name(cs.layout), cs.varlen ? "" : (cs.use_mask ? " mask" : " no-mask"),
                double(cs.in_scale), err, row_max_rel, lse_err, lse_max_abs,
                static_cast<long long>(nan_count), static_cast<long long>(bad_pad));
  return {ok, err, line};
}

// Argument checks of the launcher: errors come back as codes, nothing is launched.
bool check_arguments() {
  bool ok = true;
  auto expect = [&](const char* what, cudaError_t got, cudaError_t want) {
    if (got != want) {
      std::printf("FAIL argument check '%s': got %s, want %s\n", what, cudaGetErrorName(got),
                  cudaGetErrorName(want));
      ok = false;
    }
  };
  ok &= attention_fwd_supports(32) && attention_fwd_supports(64) && attention_fwd_supports(128) &&
        !attention_fwd_supports(80) && !attention_fwd_supports(0);
  if (!ok) std::printf("FAIL attention_fwd_supports\n");

  void* buf = nullptr;
  CUDA_CHECK(cudaMalloc(&buf, 1 << 20));
  AttentionFwdParams good{};
  good.q = good.k = good.v = buf;
  good.o = buf;
  good.lse = static_cast<float*>(buf);
  good.q_row_stride = good.k_row_stride = good.v_row_stride = 2 * 64;
  good.q_head_stride = good.k_head_stride = good.v_head_stride = 64;
  good.q_batch_stride = good.k_batch_stride = good.v_batch_stride = 4 * 2 * 64;
  good.batch = 2;
  good.heads = 2;
  good.max_seqlen = 4;
  good.head_dim = 64;
  good.scale = 0.125f;
  good.dtype = DType::kFloat16;

  AttentionFwdParams p = good;
  p.head_dim = 80;
  expect("head_dim 80", attention_fwd(p, nullptr), cudaErrorInvalidValue);
  p = good;
  p.q = nullptr;
  expect("null q", attention_fwd(p, nullptr), cudaErrorInvalidValue);
  p = good;
  p.lse = nullptr;
  expect("null lse", attention_fwd(p, nullptr), cudaErrorInvalidValue);
  p = good;
  p.k = static_cast<const char*>(buf) + 2;
  expect("misaligned k", attention_fwd(p, nullptr), cudaErrorInvalidValue);
  p = good;
  p.v_row_stride = 100;
  expect("row stride not a multiple of 8", attention_fwd(p, nullptr), cudaErrorInvalidValue);
  p = good;
  p.q_head_stride = -64;
  expect("negative stride", attention_fwd(p, nullptr), cudaErrorInvalidValue);
  p = good;
  p.batch = -1;
  expect("negative batch", attention_fwd(p, nullptr), cudaErrorInvalidValue);
  p = good;
  p.cu_seqlens = static_cast<const int32_t*>(buf);
  p.total_tokens = 8;
  p.key_padding_mask = static_cast<const uint8_t*>(buf);
  expect("mask with varlen", attention_fwd(p, nullptr), cudaErrorInvalidValue);
  // Nothing to compute: success without touching (null) pointers.
  p = AttentionFwdParams{};
  p.head_dim = 64;
  p.heads = 2;
  p.max_seqlen = 4;
  p.batch = 0;
  expect("zero batch", attention_fwd(p, nullptr), cudaSuccess);
  p.batch = 2;
  p.max_seqlen = 0;
  expect("zero length", attention_fwd(p, nullptr), cudaSuccess);
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaFree(buf));
  std::printf("%s argument checks\n", ok ? "ok  " : "FAIL");
  return ok;
}

// Dense-equivalent TFLOP/s (4 * B * H * L^2 * D) of a few RoBERTa-sized shapes.
void bench() {
  struct Shape {
    int B, H, L, D;
    DType dt;
    bool right_padded;
  };
  const Shape shapes[] = {{32, 12, 512, 64, DType::kFloat16, false},
                          {32, 12, 512, 64, DType::kBFloat16, false},
                          {32, 16, 512, 64, DType::kFloat16, true},
                          {64, 12, 128, 64, DType::kFloat16, false},
                          {16, 16, 512, 128, DType::kFloat16, false},
                          {32, 16, 512, 32, DType::kFloat16, false}};
  std::mt19937 rng(1234);
  for (const Shape& sh : shapes) {
    const size_t n = size_t(sh.B) * sh.L * sh.H * sh.D;
    void *q, *k, *v, *o;
    float* lse;
    uint8_t* mask = nullptr;
    CUDA_CHECK(cudaMalloc(&q, n * 2));
    CUDA_CHECK(cudaMalloc(&k, n * 2));
    CUDA_CHECK(cudaMalloc(&v, n * 2));
    CUDA_CHECK(cudaMalloc(&o, n * 2));
    CUDA_CHECK(cudaMalloc(&lse, size_t(sh.B) * sh.H * sh.L * 4));
    std::vector<uint16_t> host(n);
    std::normal_distribution<float> normal;
    for (auto& x : host) x = to_bits(normal(rng), sh.dt);
    CUDA_CHECK(cudaMemcpy(q, host.data(), n * 2, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(k, host.data(), n * 2, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(v, host.data(), n * 2, cudaMemcpyHostToDevice));
    int64_t real = int64_t(sh.B) * sh.L;
    if (sh.right_padded) {
      std::vector<uint8_t> m(size_t(sh.B) * sh.L, 0);
      std::uniform_int_distribution<int> len(sh.L / 4, sh.L);
      real = 0;
      for (int b = 0; b < sh.B; ++b) {
        const int n_real = len(rng);
        real += n_real;
        for (int l = 0; l < n_real; ++l) m[size_t(b) * sh.L + l] = 1;
      }
      CUDA_CHECK(cudaMalloc(&mask, m.size()));
      CUDA_CHECK(cudaMemcpy(mask, m.data(), m.size(), cudaMemcpyHostToDevice));
    }
    AttentionFwdParams p{};
    p.q = q;
    p.k = k;
    p.v = v;
    p.o = o;
    p.lse = lse;
    p.q_row_stride = p.k_row_stride = p.v_row_stride = int64_t(sh.H) * sh.D;
    p.q_head_stride = p.k_head_stride = p.v_head_stride = sh.D;
    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = int64_t(sh.L) * sh.H * sh.D;
    p.key_padding_mask = mask;
    p.batch = sh.B;
    p.heads = sh.H;
    p.max_seqlen = sh.L;
    p.head_dim = sh.D;
    p.scale = 1.f / std::sqrt(float(sh.D));
    p.dtype = sh.dt;
    cudaEvent_t e0, e1;
    CUDA_CHECK(cudaEventCreate(&e0));
    CUDA_CHECK(cudaEventCreate(&e1));
    for (int i = 0; i < 5; ++i) CUDA_CHECK(attention_fwd(p, nullptr));
    const int iters = 50;
    CUDA_CHECK(cudaEventRecord(e0));
    for (int i = 0; i < iters; ++i) CUDA_CHECK(attention_fwd(p, nullptr));
    CUDA_CHECK(cudaEventRecord(e1));
    CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    ms /= iters;
    const double flops = 4.0 * sh.B * sh.H * double(sh.L) * sh.L * sh.D;
    std::printf("bench B=%d H=%d L=%d D=%d %s%s: %.3f ms, %.1f TFLOP/s dense-equivalent "
                "(%.0f%% of tokens real)\n",
                sh.B, sh.H, sh.L, sh.D, sh.dt == DType::kFloat16 ? "fp16" : "bf16",
                sh.right_padded ? " right-padded" : "", ms, flops / (ms * 1e-3) / 1e12,
                100.0 * real / (double(sh.B) * sh.L));
    CUDA_CHECK(cudaEventDestroy(e0));
    CUDA_CHECK(cudaEventDestroy(e1));
    CUDA_CHECK(cudaFree(q));
    CUDA_CHECK(cudaFree(k));
    CUDA_CHECK(cudaFree(v));
    CUDA_CHECK(cudaFree(o));
    CUDA_CHECK(cudaFree(lse));
    if (mask) CUDA_CHECK(cudaFree(mask));
  }
}

}  // namespace

int main(int argc, char** argv) {
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::fprintf(stderr, "no CUDA device: this test needs a GPU (sm_80 or newer)\n");
    return 2;
  }
  uint64_t seed = std::random_device{}();
  seed = (seed << 32) ^ std::random_device{}();
  if (const char* env = std::getenv("ATTN_TEST_SEED")) seed = std::strtoull(env, nullptr, 10);
  std::printf("seed %llu (ATTN_TEST_SEED=%llu replays)\n", static_cast<unsigned long long>(seed),
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);

  std::vector<Case> cases;
  const Layout layouts[] = {Layout::kContiguous, Layout::kPackedQKV, Layout::kGapped};
  int rot = 0;
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    for (int D : {32, 64, 128}) {
      for (int L : {1, 7, 97, 513}) {
        std::uniform_int_distribution<int> any_len(1, L);
        // full, length 1, all padding, random length, arbitrary mask
        cases.push_back({dt, D, false, L > 100 ? 2 : 3, L, {L, 1, 0, any_len(rng), -1}, true,
                         layouts[rot % 3], (rot % 2) ? 2.0f : 1.0f});
        ++rot;
      }
      cases.push_back({dt, D, false, 3, 97, {97, 97}, false, layouts[rot % 3], 1.0f});
      ++rot;
      cases.push_back({dt, D, true, 2, 513, {1, 7, 97, 513, 0, 64}, false, layouts[rot % 3],
                       (rot % 2) ? 2.0f : 1.0f});
      ++rot;
      cases.push_back({dt, D, true, 3, 130, {130, 65, 64, 63}, false, layouts[rot % 3], 1.0f});
      ++rot;
    }
  }

  bool all_ok = check_arguments();
  double worst = 0;
  for (const Case& cs : cases) {
    const Result r = run_case(cs, rng);
    std::printf("%s\n", r.what.c_str());
    all_ok &= r.ok;
    worst = std::max(worst, r.err);
  }
  std::printf("max O relative error over all cases: %.3e\n", worst);
  if (argc > 1 && std::string(argv[1]) == "--bench") bench();
  std::printf("%s\n", all_ok ? "PASSED" : "FAILED");
  return all_ok ? 0 : 1;
}
