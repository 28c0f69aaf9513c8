// Cross-entropy rows for the masked-LM loss on the GPU: raw pointers + cudaStream_t, no ATen.
//
// Same contract as csrc/cpu/masked_lm_loss.h: per row of `logits` ([rows, vocab], `row_stride`
// elements between rows, unit stride inside a row) the loss `lse - logit[label]` goes to
// `row_losses` (fp32) and, with `write_grad`, the row is overwritten IN PLACE with
// `(softmax(row) - onehot(label)) * (*scale)`. `scale` points to one float on the device, so the
// launch needs no host sync and can be captured in a CUDA graph. Rows labelled `ignore_index` get
// loss 0 and a zero gradient. A label outside [0, vocab) that is not `ignore_index` is never used
// as an address: that row's loss and gradient become NaN.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/dtype.h"

namespace roberta_fast {
namespace cuda {

// One thread block per row. Returns the launch error (cudaSuccess when queued).
cudaError_t masked_lm_loss_rows(void* logits, DType dtype, const void* labels,
                                bool labels_int64, int64_t rows, int64_t vocab,
                                int64_t row_stride, int64_t ignore_index, const float* scale,
                                float* row_losses, bool write_grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace roberta_fast
