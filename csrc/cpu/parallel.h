// Work sharing of the CPU kernels: fixed chunks of rows, claimed one at a time by ATen's threads.
//
// A static split (at::parallel_for's) ends when its slowest share ends; on a machine whose cores
// also run other processes one share is often slowed, and a kernel whose rows cost arithmetic
// (dropout's Philox) waits for it. Here a thread that is slowed simply claims fewer chunks. The
// chunks depend on the problem alone, not on the threads, so that per-chunk partial results (the
// LayerNorm backward's dweight/dbias) summed in chunk order do not depend on scheduling.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>

namespace roberta_fast {
namespace cpu {

// Calls f(chunk) once for every chunk in [0, chunks), in parallel.
template <typename F>
inline void parallel_chunks(int64_t chunks, const F& f) {
  if (chunks <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1) {
    for (int64_t c = 0; c < chunks; ++c) f(c);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) f(c);
  });
}

// Rows [begin, end) of chunk c when `rows` rows are cut into `chunks` near-equal chunks.
inline std::pair<int64_t, int64_t> chunk_rows(int64_t rows, int64_t chunks, int64_t c) {
  return {rows * c / chunks, rows * (c + 1) / chunks};
}

}  // namespace cpu
}  // namespace roberta_fast
