// CPU attention kernels (csrc/cpu/attention.cpp) against a naive double-precision loop: forward
// (out, LSE) and backward (dq, dk, dv) on the padded layout (key-padding masks with holes and
// all-padding sequences) and the varlen layout (empty sequences), strided operands, fp32, bf16
// (AMX products where the CPU has them, and the fp32-product path) and fp16, head dims from 1 to
// 160, and dropout drawn by the rule of csrc/common/philox.h. Outputs start as NaN, padded
// positions hold NaN and inf. Exits non-zero when a check fails.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/philox.h"
#include "cpu/attention.h"

namespace {

namespace rc = roberta_fast::cpu;
using roberta_fast::philox::keep;

int failures = 0;

void expect(bool ok, const std::string& what, double got, double want) {
  if (ok) return;
  ++failures;
  std::printf("FAIL: %s (got %.6g, want %.6g)\n", what.c_str(), got, want);
}

// The vectorized multipliers equal philox::keep, at any offset alignment and across a wrap of
// the counter's low word.
void test_dropout_multipliers() {
  const float p = 0.2f;
  for (uint64_t seed : {uint64_t{0}, uint64_t{0x5eed1234abcdull}, ~uint64_t{0} >> 2}) {
    for (uint64_t start : {uint64_t{0}, uint64_t{3}, uint64_t{12345}, (uint64_t{4} << 32) - 250,
                           (uint64_t{9} << 32) - 1}) {
      for (int64_t n : {int64_t{1}, int64_t{5}, int64_t{64}, int64_t{129}, int64_t{300}}) {
        std::vector<float> out(n, -1.f);
        rc::attention_dropout_multipliers(seed, start, n, p, out.data());
        int64_t wrong = 0;
        for (int64_t j = 0; j < n; ++j) {
          const float want = keep(seed, start + j, p) ? 1.f / (1.f - p) : 0.f;
          wrong += out[j] != want;
        }
        expect(wrong == 0, "dropout multipliers == philox::keep at offset " +
                               std::to_string(start) + ", n " + std::to_string(n),
               static_cast<double>(wrong), 0.0);
      }
    }
  }
}

// The layout the kernel writes for AMX B operands: VNNI pairs [K / 2][N][2], as oneDNN's packing
// (ATen's cpublas::pack) produces it.
void test_vnni_layout() {
  if (!rc::attention_bf16_uses_amx()) {
    std::printf("note: no AMX here; the bf16 products run in fp32 and the VNNI layout is unused\n");
    return;
  }
  for (int64_t k : {int64_t{32}, int64_t{64}}) {
    for (int64_t n : {int64_t{16}, int64_t{48}, int64_t{64}}) {
      std::vector<c10::BFloat16> b(k * n), packed(k * n), mine(k * n);
      for (int64_t i = 0; i < k * n; ++i) b[i] = static_cast<float>(i % 251) - 100.f;
      at::native::cpublas::pack(k, n, n, n, at::kBFloat16, at::kBFloat16, b.data(),
                                packed.data());
      for (int64_t r = 0; r < k; ++r)
        for (int64_t c = 0; c < n; ++c) mine[(r / 2) * 2 * n + 2 * c + (r % 2)] = b[r * n + c];
      int64_t wrong = 0;
      for (int64_t i = 0; i < k * n; ++i) wrong += mine[i].x != packed[i].x;
      expect(wrong == 0, "VNNI layout == cpublas::pack, K " + std::to_string(k) + " N " +
                             std::to_string(n),
             static_cast<double>(wrong), 0.0);
    }
  }
}

// One problem: sizes, layout, which tokens are real, options.
struct Case {
  std::string name;
  int64_t batch = 1, seqlen = 1, heads = 1, head_dim = 32;
  std::vector<int32_t> lengths;  // varlen when not empty (seqlen is then max_seqlen)
  int mask = 0;  // padded: 0 none, 1 random holes and an all-padding sequence
  float p = 0.f;
  bool strided = false;  // q, k, v, dout, out as slices of one [rows, 5, heads, D] buffer
  rc::AttentionCompute compute = rc::AttentionCompute::kAuto;
};

// Where each sequence's real tokens are: row index in the [rows, heads, D] operands and position
// (for dropout offsets and LSE).
struct Tokens {
  std::vector<std::vector<int64_t>> rows, positions;
  std::vector<bool> real;  // per row
  int64_t total_rows = 0;
};

Tokens tokens_of(const Case& c, const std::vector<uint8_t>& mask) {
  Tokens t;
  const bool varlen = !c.lengths.empty();
  t.total_rows = varlen ? 0 : c.batch * c.seqlen;
  if (varlen)
    for (int32_t n : c.lengths) t.total_rows += n;
  t.real.assign(t.total_rows, false);
  int64_t row0 = 0;
  for (int64_t b = 0; b < c.batch; ++b) {
    std::vector<int64_t> rows, pos;
    const int64_t len = varlen ? c.lengths[b] : c.seqlen;
    for (int64_t i = 0; i < len; ++i) {
      if (!varlen && !mask.empty() && !mask[b * c.seqlen + i]) continue;
      rows.push_back(row0 + i);
      pos.push_back(i);
      t.real[row0 + i] = true;
    }
    row0 += len;
    t.rows.push_back(rows);
    t.positions.push_back(pos);
  }
  return t;
}

struct Reference {
  std::vector<double> out, lse, dq, dk, dv;
};

// The double-precision loop. x[o][r][h][d] for operand o (q, k, v, dout).
Reference reference(const Case& c, const Tokens& t, const std::vector<double>* x, double scale,
                    uint64_t seed) {
  const int64_t hd = c.heads * c.head_dim, d = c.head_dim;
  Reference ref;
  for (auto* v : {&ref.out, &ref.dq, &ref.dk, &ref.dv}) v->assign(t.total_rows * hd, 0.0);
  ref.lse.assign(t.total_rows * c.heads, INFINITY);  // [row][head]
  const std::vector<double>&q = x[0], &k = x[1], &v = x[2], &dout = x[3];
  for (int64_t b = 0; b < c.batch; ++b) {
    const std::vector<int64_t>& rows = t.rows[b];
    const int64_t n = static_cast<int64_t>(rows.size());
    for (int64_t h = 0; h < c.heads; ++h) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t qi = rows[i] * hd + h * d;
        std::vector<double> s(n), prob(n), mult(n, 1.0), dp(n);
        double m = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          double acc = 0.0;
          for (int64_t e = 0; e < d; ++e) acc += q[qi + e] * k[rows[j] * hd + h * d + e];
          s[j] = acc * scale;
          m = std::max(m, s[j]);
        }
        double l = 0.0;
        for (int64_t j = 0; j < n; ++j) l += std::exp(s[j] - m);
        ref.lse[rows[i] * c.heads + h] = m + std::log(l);
        for (int64_t j = 0; j < n; ++j) {
          prob[j] = std::exp(s[j] - m) / l;
          if (c.p > 0.f) {
            const uint64_t off =
                ((b * c.heads + h) * c.seqlen + t.positions[b][i]) * c.seqlen + t.positions[b][j];
            mult[j] = keep(seed, off, c.p) ? 1.0 / (1.0 - c.p) : 0.0;
          }
          for (int64_t e = 0; e < d; ++e)
            ref.out[qi + e] += prob[j] * mult[j] * v[rows[j] * hd + h * d + e];
        }
        double delta = 0.0;
        for (int64_t e = 0; e < d; ++e) delta += dout[qi + e] * ref.out[qi + e];
        for (int64_t j = 0; j < n; ++j) {
          const int64_t kj = rows[j] * hd + h * d;
          double acc = 0.0;
          for (int64_t e = 0; e < d; ++e) acc += dout[qi + e] * v[kj + e];
          const double ds = prob[j] * (acc * mult[j] - delta);
          for (int64_t e = 0; e < d; ++e) {
            ref.dq[qi + e] += scale * ds * k[kj + e];
            ref.dk[kj + e] += scale * ds * q[qi + e];
            ref.dv[kj + e] += prob[j] * mult[j] * dout[qi + e];
          }
        }
      }
    }
  }
  return ref;
}

double norm(const std::vector<double>& x) {
  double sum = 0.0;
  for (double v : x) sum += v * v;
  return std::sqrt(sum);
}

// ||got - want|| / ||want|| over the rows of real tokens (NaN or inf there: infinite error);
// rows of padded positions must be exactly 0. A result that vanishes in exact arithmetic (one
// key per row: dq = dk = 0) is judged against `size`, the norm of the largest other result.
template <typename T>
double error(const std::vector<T>& got, const std::vector<double>& want, const Tokens& t,
             int64_t row_size, double size, bool* padded_zero) {
  double num = 0.0, den = 0.0;
  for (int64_t r = 0; r < t.total_rows; ++r) {
    for (int64_t e = 0; e < row_size; ++e) {
      const double g = static_cast<float>(got[r * row_size + e]);
      if (!t.real[r]) {
        if (g != 0.0) *padded_zero = false;
        continue;
      }
      if (!std::isfinite(g)) return INFINITY;
      const double w = want[r * row_size + e];
      num += (g - w) * (g - w);
      den += w * w;
    }
  }
  if (den < 1e-12 * size * size) den = size * size;
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

template <typename T>
void run_case(const Case& c, double tol, std::mt19937& gen) {
  const bool varlen = !c.lengths.empty();
  const int64_t hd = c.heads * c.head_dim;
  std::vector<uint8_t> mask;
  if (!varlen && c.mask) {
    std::bernoulli_distribution real(0.7);
    mask.resize(c.batch * c.seqlen);
    for (auto& m : mask) m = real(gen);
    mask[0] = 1;
    if (c.batch > 1)
      for (int64_t i = 0; i < c.seqlen; ++i) mask[(c.batch - 1) * c.seqlen + i] = 0;
  }
  const Tokens t = tokens_of(c, mask);
  const int64_t rows = t.total_rows;

  // Operands q, k, v, dout, out: separate contiguous buffers, or slices of one fused buffer.
  const int64_t slots = c.strided ? 5 : 1;
  const float nan = std::nanf(""), inf = INFINITY;
  std::vector<T> fused(c.strided ? rows * 5 * hd : 0);
  std::vector<T> own[5];
  T* base[5];
  for (int o = 0; o < 5; ++o) {
    if (c.strided) {
      base[o] = fused.data() + o * hd;
    } else {
      own[o].resize(rows * hd);
      base[o] = own[o].data();
    }
  }
  const int64_t token_stride = slots * hd;
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<double> x[4];
  for (int o = 0; o < 4; ++o) {
    x[o].resize(rows * hd);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t e = 0; e < hd; ++e) {
        // Padded positions hold NaN and inf: the kernels must never read them.
        const T value = t.real[r] ? static_cast<T>(normal(gen)) : static_cast<T>(o % 2 ? nan : inf);
        base[o][r * token_stride + e] = value;
        x[o][r * hd + e] = static_cast<float>(value);
      }
    }
  }
  auto operand = [&](int o) {
    rc::AttentionOperand<T> a;
    a.data = base[o];
    a.batch = varlen ? 0 : c.seqlen * token_stride;
    a.token = token_stride;
    a.head = c.head_dim;
    return a;
  };
  rc::AttentionLayout layout;
  layout.batch = c.batch;
  layout.seqlen = c.seqlen;
  layout.tokens = varlen ? rows : 0;
  layout.heads = c.heads;
  layout.head_dim = c.head_dim;
  std::vector<int32_t> cu(1, 0);
  if (varlen) {
    for (int32_t n : c.lengths) cu.push_back(cu.back() + n);
    layout.cu_seqlens = cu.data();
  }
  std::unique_ptr<bool[]> mask_ptr(new bool[mask.size() + 1]);
  for (size_t i = 0; i < mask.size(); ++i) mask_ptr[i] = mask[i] != 0;
  if (!mask.empty()) layout.key_padding_mask = mask_ptr.get();

  const uint64_t seed = (static_cast<uint64_t>(gen()) << 31) ^ gen();
  const float scale = 1.f / std::sqrt(static_cast<float>(c.head_dim));
  std::vector<T> out(rows * hd, static_cast<T>(nan)), dq(rows * hd, static_cast<T>(nan)),
      dk(rows * hd, static_cast<T>(nan)), dv(rows * hd, static_cast<T>(nan));
  std::vector<float> lse(rows * c.heads, nan);  // [B, heads, L] or [heads, T]
  rc::attention_fwd<T>(layout, operand(0), operand(1), operand(2), out.data(), lse.data(), scale,
                       c.p, seed, c.compute);
  // The backward reads the forward's output as an operand too (slot 4 of the fused buffer).
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t e = 0; e < hd; ++e) base[4][r * token_stride + e] = out[r * hd + e];
  rc::attention_bwd<T>(layout, operand(3), operand(0), operand(1), operand(2), operand(4),
                       lse.data(), dq.data(), dk.data(), dv.data(), scale, c.p, seed, c.compute);

  const Reference ref = reference(c, t, x, scale, seed);
  const std::string name = c.name + (c.p > 0.f ? " dropout" : "") + (c.strided ? " strided" : "");
  bool zero = true;
  const char* names[] = {"out", "dq", "dk", "dv"};
  const std::vector<T>* got[] = {&out, &dq, &dk, &dv};
  const std::vector<double>* want[] = {&ref.out, &ref.dq, &ref.dk, &ref.dv};
  double size = 0.0;
  for (int o = 0; o < 4; ++o) size = std::max(size, norm(*want[o]));
  for (int o = 0; o < 4; ++o) {
    const double err = error(*got[o], *want[o], t, hd, size, &zero);
    expect(err < tol, name + ": " + names[o] + " rel err", err, tol);
  }
  expect(zero, name + ": padded rows are exactly zero", 0.0, 0.0);
  // LSE: close on real rows (fp32 throughout), +inf on padded ones.
  double lse_err = 0.0;
  bool padded_inf = true;
  for (int64_t b = 0, row0 = 0; b < c.batch; ++b) {
    const int64_t len = varlen ? c.lengths[b] : c.seqlen;
    for (int64_t i = 0; i < len; ++i) {
      for (int64_t h = 0; h < c.heads; ++h) {
        const int64_t at = varlen ? h * rows + row0 + i : (b * c.heads + h) * c.seqlen + i;
        const double want_lse = ref.lse[(row0 + i) * c.heads + h];
        if (!t.real[row0 + i]) {
          padded_inf = padded_inf && std::isinf(lse[at]) && lse[at] > 0;
        } else {
          lse_err = std::max(lse_err, std::fabs(lse[at] - want_lse) / (1.0 + std::fabs(want_lse)));
        }
      }
    }
    row0 += len;
  }
  expect(lse_err < 1e-2 * tol + 1e-5, name + ": lse", lse_err, 0.0);
  expect(padded_inf, name + ": padded rows have lse = +inf", 0.0, 0.0);
}

template <typename T>
void run_all(const std::string& type, double tol, rc::AttentionCompute compute,
             std::mt19937& gen) {
  std::vector<Case> cases;
  // Padded (holes: random padding and an all-padding sequence) and varlen (lengths) cases.
  auto padded = [&](const char* name, int64_t batch, int64_t seqlen, int64_t heads, int64_t d,
                    bool holes) {
    Case c;
    c.name = type + " " + name;
    c.batch = batch;
    c.seqlen = seqlen;
    c.heads = heads;
    c.head_dim = d;
    c.mask = holes ? 1 : 0;
    c.compute = compute;
    cases.push_back(c);
  };
  auto varlen = [&](const char* name, int64_t heads, int64_t d, std::vector<int32_t> lengths) {
    padded(name, static_cast<int64_t>(lengths.size()), 0, heads, d, false);
    Case& c = cases.back();
    for (int32_t n : lengths) c.seqlen = std::max<int64_t>(c.seqlen, n);
    c.lengths = std::move(lengths);
  };
  padded("L=1", 1, 1, 1, 64, false);
  padded("L=7 holes", 2, 7, 2, 32, true);
  padded("L=97 D=40 holes", 3, 97, 2, 40, true);
  padded("L=130 D=33", 2, 130, 1, 33, false);
  padded("L=97 D=128", 1, 97, 2, 128, false);
  padded("L=40 D=160 holes", 2, 40, 1, 160, true);
  padded("L=513 holes", 1, 513, 1, 32, true);
  padded("D=1", 2, 9, 2, 1, true);
  padded("no sequences", 0, 5, 2, 32, false);
  varlen("varlen", 2, 64, {33, 0, 70, 1});
  varlen("varlen long", 1, 48, {300, 17});
  std::vector<Case> all;
  for (const Case& c : cases) {
    for (float p : {0.f, 0.2f}) {
      for (bool strided : {false, true}) {
        Case d = c;
        d.p = p;
        d.strided = strided;
        all.push_back(d);
      }
    }
  }
  // With D = 1, ds = p * (dp - delta) cancels almost entirely, and delta comes from the output
  // as stored (rounded to T): half-precision gradients lose a few more bits there.
  for (const Case& c : all) run_case<T>(c, c.head_dim == 1 ? 2 * tol : tol, gen);
}

}  // namespace

int main() {
  test_dropout_multipliers();
  test_vnni_layout();
  std::mt19937 gen(std::random_device{}());
  for (int threads : {1, 2}) {
    at::set_num_threads(threads);
    run_all<float>("fp32", 5e-6, rc::AttentionCompute::kAuto, gen);
    run_all<c10::BFloat16>("bf16", 1.5e-2, rc::AttentionCompute::kAuto, gen);
    run_all<c10::BFloat16>("bf16 (fp32 products)", 1.5e-2, rc::AttentionCompute::kFloat32, gen);
    run_all<c10::Half>("fp16", 2e-3, rc::AttentionCompute::kAuto, gen);
  }
  if (failures) {
    std::printf("%d checks failed\n", failures);
    return 1;
  }
  std::printf("all attention CPU checks passed\n");
  return 0;
}
