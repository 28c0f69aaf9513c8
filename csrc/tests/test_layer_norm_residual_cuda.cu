// CUDA kernels of fused residual + LayerNorm against a host double-precision reference (the
// dropout mask from csrc/common/philox.h on the host). Exits non-zero on any mismatch.
// With dropout the masks are compared element by element as well: the backward's from dx (a
// dropped element's dx is exactly 0), the forward's from y (which of "kept" and "dropped" the
// output is nearer to, where the two are far apart), on hidden sizes that are multiples of four
// (one Philox call per four elements) and ones that are not (one call per element).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "common/philox.h"
#include "cuda/layer_norm_residual.h"

namespace {

using roberta_fast::cuda::DType;

int failures = 0;

#define CUDA_OK(expr)                                                                  \
  do {                                                                                 \
    cudaError_t err_ = (expr);                                                         \
    if (err_ != cudaSuccess) {                                                         \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(err_), __FILE__,  \
                  __LINE__, #expr);                                                    \
      std::exit(2);                                                                    \
    }                                                                                  \
  } while (0)

void check(bool ok, const char* what, double got, double want) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s (got %.6g, limit %.6g)\n", what, got, want);
  }
}

template <typename T> T from_f(float v);
template <> float from_f<float>(float v) { return v; }
template <> __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
float to_f(float v) { return v; }
float to_f(__half v) { return __half2float(v); }
float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// One unit in the last place, relative to the value (2^-mantissa bits).
template <typename T> double rel_ulp();
template <> double rel_ulp<float>() { return std::ldexp(1.0, -23); }
template <> double rel_ulp<__half>() { return std::ldexp(1.0, -10); }
template <> double rel_ulp<__nv_bfloat16>() { return std::ldexp(1.0, -7); }

template <typename T> DType dtype_of();
template <> DType dtype_of<float>() { return DType::kFloat32; }
template <> DType dtype_of<__half>() { return DType::kFloat16; }
template <> DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* dev = nullptr;
  CUDA_OK(cudaMalloc(&dev, host.size() * sizeof(T) + 16));
  if (!host.empty())
    CUDA_OK(cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return dev;
}

// A device buffer filled with NaN bytes (0xFF) so that an unwritten element shows.
template <typename T>
T* poisoned(size_t n) {
  T* dev = nullptr;
  CUDA_OK(cudaMalloc(&dev, n * sizeof(T) + 16));
  CUDA_OK(cudaMemset(dev, 0xFF, n * sizeof(T) + 16));
  return dev;
}

template <typename T>
std::vector<float> to_host(const T* dev, size_t n) {
  std::vector<T> host(n);
  if (n) CUDA_OK(cudaMemcpy(host.data(), dev, n * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = to_f(host[i]);
  return out;
}

double rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

// The dropout mask of every element against `keep` (philox::keep on the host, as the reference
// drew it), read back from the kernels' outputs. Backward: exact, since dx is exactly 0 where the
// mask drops and nonzero elsewhere for random inputs. Forward: y is nearer to the output with the
// element kept than to the one with it dropped (both from the host's row statistics), judged
// where the two differ by more than 8 units in the last place (`ulp`, relative; fp16's at least,
// above the fp32 kernel's own arithmetic error), far beyond the output's rounding.
void check_masks(const char* name, int64_t rows, int64_t h, float p, int offset_elems,
                 double ulp, const std::vector<char>& keep, const std::vector<double>& xd,
                 const std::vector<double>& rd, const std::vector<double>& wd,
                 const std::vector<double>& bd, float eps, const std::vector<float>& y,
                 const std::vector<float>& dx) {
  const double scale = 1.0 / (1.0 - p);
  int64_t bwd_wrong = 0, fwd_wrong = 0, fwd_judged = 0, dropped = 0;
  std::vector<double> s(h);
  for (int64_t i = 0; i < rows; ++i) {
    double mean = 0.0;
    for (int64_t j = 0; j < h; ++j) {
      const int64_t o = i * h + j;
      dropped += !keep[o];
      s[j] = (keep[o] ? xd[o] * scale : 0.0) + rd[o];
      mean += s[j];
    }
    mean /= h;
    double var = 0.0;
    for (int64_t j = 0; j < h; ++j) var += (s[j] - mean) * (s[j] - mean);
    const double rstd = 1.0 / std::sqrt(var / h + eps);
    for (int64_t j = 0; j < h; ++j) {
      const int64_t o = i * h + j;
      bwd_wrong += (dx[o] != 0.0f) != static_cast<bool>(keep[o]);
      const double y_keep = (xd[o] * scale + rd[o] - mean) * rstd * wd[j] + bd[j];
      const double y_drop = (rd[o] - mean) * rstd * wd[j] + bd[j];
      const double size = std::fmax(std::fabs(y_keep), std::fabs(y_drop));
      const double apart = 8.0 * std::fmax(ulp, 1.0 / 1024) * size + 1e-6;
      if (std::fabs(y_keep - y_drop) <= apart) continue;
      const bool seen_keep = std::fabs(y[o] - y_keep) < std::fabs(y[o] - y_drop);
      fwd_wrong += seen_keep != static_cast<bool>(keep[o]);
      ++fwd_judged;
    }
  }
  char what[200];
  std::snprintf(what, sizeof(what), "%s rows=%lld H=%lld p=%.2f offset=%d: backward mask "
                "elements differing from philox", name, static_cast<long long>(rows),
                static_cast<long long>(h), p, offset_elems);
  check(bwd_wrong == 0, what, static_cast<double>(bwd_wrong), 0.0);
  std::snprintf(what, sizeof(what), "%s rows=%lld H=%lld p=%.2f offset=%d: forward mask "
                "elements differing from philox (of %lld judged)", name,
                static_cast<long long>(rows), static_cast<long long>(h), p, offset_elems,
                static_cast<long long>(fwd_judged));
  check(fwd_wrong == 0, what, static_cast<double>(fwd_wrong), 0.0);
  // On the larger shapes the check must have looked at something: a third of the elements at
  // least, and some of them dropped.
  if (rows * h >= 1000) {
    std::snprintf(what, sizeof(what), "%s rows=%lld H=%lld: elements judged for the forward "
                  "mask", name, static_cast<long long>(rows), static_cast<long long>(h));
    check(3 * fwd_judged >= rows * h, what, static_cast<double>(fwd_judged),
          static_cast<double>(rows * h) / 3.0);
    std::snprintf(what, sizeof(what), "%s rows=%lld H=%lld: dropped elements", name,
                  static_cast<long long>(rows), static_cast<long long>(h));
    check(dropped > 0, what, static_cast<double>(dropped), 1.0);
  }
}

// `offset_elems` shifts x/residual/dy/y by a few elements to exercise the unaligned path.
template <typename T, typename W>
void run_case(const char* name, int64_t rows, int64_t h, float p, double tol, int offset_elems,
              std::mt19937& gen) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n = rows * h;
  std::vector<T> x(n + offset_elems), r(n + offset_elems), dy(n + offset_elems);
  std::vector<W> w(h), b(h);
  std::vector<double> xd(n), rd(n), dyd(n), wd(h), bd(h);
  for (int64_t i = 0; i < n; ++i) {
    x[i + offset_elems] = from_f<T>(normal(gen));
    r[i + offset_elems] = from_f<T>(normal(gen));
    dy[i + offset_elems] = from_f<T>(normal(gen));
    xd[i] = to_f(x[i + offset_elems]);
    rd[i] = to_f(r[i + offset_elems]);
    dyd[i] = to_f(dy[i + offset_elems]);
  }
  for (int64_t j = 0; j < h; ++j) {
    w[j] = from_f<W>(1.0f + 0.5f * normal(gen));
    b[j] = from_f<W>(0.5f * normal(gen));
    wd[j] = to_f(w[j]);
    bd[j] = to_f(b[j]);
  }
  const int64_t seed_value = static_cast<int64_t>(((static_cast<uint64_t>(gen()) << 29) ^ gen()));
  const float eps = 1e-5f;

  T* d_x = to_device(x);
  T* d_r = to_device(r);
  T* d_dy = to_device(dy);
  W* d_w = to_device(w);
  W* d_b = to_device(b);
  int64_t* d_seed = to_device(std::vector<int64_t>{seed_value});
  T* d_y = poisoned<T>(n + offset_elems);
  T* d_dres = poisoned<T>(n + offset_elems);
  T* d_dx = poisoned<T>(n + offset_elems);
  float* d_mean = poisoned<float>(rows);
  float* d_rstd = poisoned<float>(rows);
  W* d_dw = poisoned<W>(h);
  W* d_db = poisoned<W>(h);
  const DType io = dtype_of<T>(), param = dtype_of<W>();
  const int64_t parts = roberta_fast::cuda::layer_norm_residual_bwd_parts(io, rows, h);
  float* d_work = poisoned<float>(parts * 2 * h);

  CUDA_OK(roberta_fast::cuda::layer_norm_residual_fwd(
      io, param, d_x + offset_elems, d_r + offset_elems, d_w, d_b, d_y + offset_elems, d_mean,
      d_rstd, rows, h, eps, p, d_seed, 0));
  CUDA_OK(roberta_fast::cuda::layer_norm_residual_bwd(
      io, param, d_dy + offset_elems, d_x + offset_elems, d_r + offset_elems, d_w, d_mean, d_rstd,
      d_dres + offset_elems, p > 0.0f ? d_dx + offset_elems : nullptr, d_dw, d_db, d_work, parts,
      rows, h, p, d_seed, 0));
  CUDA_OK(cudaDeviceSynchronize());

  // Host double reference with the same Philox mask.
  std::vector<double> ry(n), rdres(n), rdx(n), rdw(h, 0.0), rdb(h, 0.0), s(h), m(h);
  std::vector<char> keep(n, 1);
  for (int64_t i = 0; i < rows; ++i) {
    double mean = 0.0;
    for (int64_t j = 0; j < h; ++j) {
      const int64_t o = i * h + j;
      if (p > 0.0f)
        keep[o] = roberta_fast::philox::keep(static_cast<uint64_t>(seed_value),
                                             static_cast<uint64_t>(o), p);
      m[j] = p > 0.0f ? (keep[o] ? 1.0 / (1.0 - p) : 0.0) : 1.0;
      s[j] = xd[o] * m[j] + rd[o];
      mean += s[j];
    }
    mean /= h;
    double var = 0.0;
    for (int64_t j = 0; j < h; ++j) var += (s[j] - mean) * (s[j] - mean);
    const double rstd = 1.0 / std::sqrt(var / h + eps);
    double sg = 0.0, sgx = 0.0;
    for (int64_t j = 0; j < h; ++j) {
      const int64_t o = i * h + j;
      const double xh = (s[j] - mean) * rstd;
      ry[o] = xh * wd[j] + bd[j];
      sg += dyd[o] * wd[j];
      sgx += dyd[o] * wd[j] * xh;
      rdw[j] += dyd[o] * xh;
      rdb[j] += dyd[o];
    }
    for (int64_t j = 0; j < h; ++j) {
      const int64_t o = i * h + j;
      const double xh = (s[j] - mean) * rstd;
      rdres[o] = rstd * (dyd[o] * wd[j] - sg / h - xh * sgx / h);
      rdx[o] = rdres[o] * m[j];
    }
  }
  char what[200];
  auto report = [&](const char* out, double err) {
    std::snprintf(what, sizeof(what), "%s rows=%lld H=%lld p=%.2f offset=%d: %s rel err", name,
                  static_cast<long long>(rows), static_cast<long long>(h), p, offset_elems, out);
    check(err < tol, what, err, tol);
  };
  report("y", rel_err(to_host(d_y + offset_elems, n), ry));
  report("dresidual", rel_err(to_host(d_dres + offset_elems, n), rdres));
  if (p > 0.0f) report("dx", rel_err(to_host(d_dx + offset_elems, n), rdx));
  report("dweight", rel_err(to_host(d_dw, h), rdw));
  report("dbias", rel_err(to_host(d_db, h), rdb));
  if (p > 0.0f)
    check_masks(name, rows, h, p, offset_elems, rel_ulp<T>(), keep, xd, rd, wd, bd, eps,
                to_host(d_y + offset_elems, n), to_host(d_dx + offset_elems, n));

  for (void* ptr : {static_cast<void*>(d_x), static_cast<void*>(d_r), static_cast<void*>(d_dy),
                    static_cast<void*>(d_w), static_cast<void*>(d_b), static_cast<void*>(d_seed),
                    static_cast<void*>(d_y), static_cast<void*>(d_dres), static_cast<void*>(d_dx),
                    static_cast<void*>(d_mean), static_cast<void*>(d_rstd),
                    static_cast<void*>(d_dw), static_cast<void*>(d_db),
                    static_cast<void*>(d_work)})
    CUDA_OK(cudaFree(ptr));
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: nothing was tested\n");
    return 1;
  }
  std::mt19937 gen(std::random_device{}());
  // Hidden sizes: multiples of eight (16-byte path), multiples of four but not of eight (fp32
  // on the 16-byte path, fp16/bf16 per element with one Philox call per four), and sizes that
  // are not multiples of four (one Philox call per element). An offset of one element sends
  // every size down the per-element-load path.
  const int64_t shapes[][2] = {{1, 33},    {7, 768},  {97, 1000}, {97, 1024},  {31, 772},
                               {9, 770},   {5, 1027}, {513, 768}, {5, 4096},   {3, 8192},
                               {16384, 768}};
  for (const auto& shape : shapes) {
    for (float p : {0.0f, 0.1f}) {
      for (int offset : {0, 1}) {
        run_case<float, float>("fp32", shape[0], shape[1], p, 2e-6, offset, gen);
        run_case<__half, __half>("fp16", shape[0], shape[1], p, 2e-3, offset, gen);
        run_case<__half, float>("fp16/fp32 params", shape[0], shape[1], p, 2e-3, offset, gen);
        run_case<__nv_bfloat16, __nv_bfloat16>("bf16", shape[0], shape[1], p, 1.6e-2, offset,
                                               gen);
        run_case<__nv_bfloat16, float>("bf16/fp32 params", shape[0], shape[1], p, 1.6e-2, offset,
                                       gen);
      }
    }
  }
  run_case<float, float>("fp32 no rows", 0, 768, 0.1f, 2e-6, 0, gen);
  if (failures) {
    std::printf("%d checks failed\n", failures);
    return 1;
  }
  std::printf("all layer_norm_residual CUDA checks passed\n");
  return 0;
}
