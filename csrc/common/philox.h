// Philox4x32-10 dropout random numbers, bit-identical to Triton's `tl.randint4x`, so that
// the CPU, CUDA and Triton kernels draw the same dropout mask for the same seed.
//
// Contract (the residual LayerNorm kernels on every backend): element `offset` (int64) takes word
// `offset & 3` of Philox4x32 with 10 rounds on counter (lo32(g), hi32(g), 0, 0), g = offset >> 2,
// and key (lo32(seed), hi32(seed)) -- so one Philox call serves four consecutive elements, as in
// Triton's `tl.randint4x(seed, offset >> 2)`. The word x becomes
//     u = float(x as int32 < 0 ? ~x : x) * 4.6566127342e-10f      (in [0, 1))
// and the element is kept iff u > p; kept values are scaled by 1 / (1 - p).
//
// Host and device: compiled by nvcc the functions are __host__ __device__.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RF_PHILOX_FN __host__ __device__ __forceinline__
#else
#define RF_PHILOX_FN inline
#endif

namespace roberta_fast {
namespace philox {

constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr int kRounds = 10;
// Largest float scale with INT32_MAX * scale < 1 after rounding (Triton's constant).
constexpr float kUniformScale = 4.6566127342e-10f;

RF_PHILOX_FN uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct Words {
  uint32_t w[4];
};

// The four output words of Philox4x32-10 for (seed, counter).
RF_PHILOX_FN Words random_words(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u;
  uint32_t c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kRounds; ++round) {
    const uint32_t a = c0;
    const uint32_t b = c2;
    c0 = mulhi(kRoundB, b) ^ c1 ^ k0;
    c2 = mulhi(kRoundA, a) ^ c3 ^ k1;
    c1 = kRoundB * b;
    c3 = kRoundA * a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return Words{{c0, c1, c2, c3}};
}

// The random word of the element with counter `offset` (word offset & 3 of counter offset >> 2).
RF_PHILOX_FN uint32_t random_bits(uint64_t seed, uint64_t offset) {
  return random_words(seed, offset >> 2).w[offset & 3];
}

// Triton's uint -> uniform float map: fold the negative half of int32 onto the positive one.
RF_PHILOX_FN float bits_to_uniform(uint32_t bits) {
  const int32_t v = static_cast<int32_t>(bits);
  const int32_t folded = v < 0 ? ~v : v;
  return static_cast<float>(folded) * kUniformScale;
}

// u in [0, 1) for the element with counter `offset`.
RF_PHILOX_FN float uniform(uint64_t seed, uint64_t offset) {
  return bits_to_uniform(random_bits(seed, offset));
}

// Whether dropout with probability p keeps the element with counter `offset`.
RF_PHILOX_FN bool keep(uint64_t seed, uint64_t offset, float p) {
  return uniform(seed, offset) > p;
}

}  // namespace philox
}  // namespace roberta_fast

#undef RF_PHILOX_FN
