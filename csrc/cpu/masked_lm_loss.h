// Cross-entropy rows for the masked-LM loss on the CPU: raw pointers, no at::Tensor.
//
// Each row of `logits` ([rows, vocab], `row_stride` elements between rows, unit stride inside a
// row) holds one token's scores over the vocabulary. Per row the kernel computes the log-sum-exp
// with a running maximum in fp32 and writes the row's loss `lse - logit[label]` to `row_losses`.
// With `write_grad` it then overwrites the row IN PLACE with the gradient of the mean loss,
// `(softmax(row) - onehot(label)) * scale` (scale = 1 / number of labelled rows).
//
// Rows labelled `ignore_index` get loss 0 and (with `write_grad`) a zero gradient row. A label
// outside [0, vocab) that is not `ignore_index` is never used to address memory: that row's loss
// and gradient become NaN, so the error shows in the result instead of corrupting it (callers
// check labels beforehand and raise a proper error; this is the last line of defence).
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace roberta_fast {
namespace cpu {

// T: float, c10::Half or c10::BFloat16. L: int32_t or int64_t. Rows run in parallel
// (at::parallel_for); all arithmetic is fp32.
template <typename T, typename L>
void masked_lm_loss_rows(T* logits, const L* labels, int64_t rows, int64_t vocab,
                         int64_t row_stride, int64_t ignore_index, float scale, bool write_grad,
                         float* row_losses);

}  // namespace cpu
}  // namespace roberta_fast
