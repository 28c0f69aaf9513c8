"""Triton row kernel of the masked-LM cross-entropy, as the custom op
``torch.ops.roberta_fast.masked_lm_loss_rows_triton``.

Same contract as the C++/CUDA ``roberta_fast::masked_lm_loss_rows``: per row of a logits chunk
``[rows, V]`` (unit stride along V) the loss ``lse - logit[label]`` (fp32, returned) and, with
``write_grad``, the gradient of the mean loss ``(softmax - onehot(label)) * scale`` written IN PLACE
over the logits. ``scale`` is a one-element fp32 tensor on the device (1 / number of labelled rows),
loaded by the kernel, so nothing waits for the device. Rows labelled ``ignore_index`` get loss 0 and
a zero gradient; a label outside ``[0, V)`` is never used as an address (its row becomes NaN).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, launch_context

# Lowest finite fp32: the running max starts here rather than at -inf so that -inf logits add
# exp(-inf) = 0 instead of exp(-inf - -inf) = NaN. A constexpr: kernels compiled for a GPU may
# read no other kind of global.
_LOWEST: tl.constexpr = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _round_bf16(x):
    """fp32 -> bf16 rounded to nearest even through the bits (the interpreter truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _mlm_rows_kernel(logits_ptr, labels_ptr, scale_ptr, losses_ptr, vocab, row_stride,
                     ignore_index, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
                     BF16_BY_BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    out_ty = logits_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    if label == ignore_index:
        tl.store(losses_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, vocab, BLOCK):
                offs = start + cols
                tl.store(base + offs, tl.zeros([BLOCK], dtype=out_ty), mask=offs < vocab)
    elif (label < 0) | (label >= vocab):
        tl.store(losses_ptr + row, float("nan"))
        if WRITE_GRAD:
            for start in range(0, vocab, BLOCK):
                offs = start + cols
                nan = tl.full([BLOCK], float("nan"), tl.float32).to(out_ty)
                tl.store(base + offs, nan, mask=offs < vocab)
    else:
        # Read pass: online max and sum of exponentials, one block of the row at a time.
        m = tl.zeros([], dtype=tl.float32) + _LOWEST
        s = tl.zeros([], dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            offs = start + cols
            x = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
            m = new_m
        # The target is read before the write pass overwrites the row.
        target = tl.load(base + label).to(tl.float32)
        tl.store(losses_ptr + row, m + tl.log(s) - target)
        if WRITE_GRAD:
            sc = tl.load(scale_ptr)
            inv = sc / s
            for start in range(0, vocab, BLOCK):
                offs = start + cols
                mask = offs < vocab
                x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
                g = tl.exp(x - m) * inv
                g = tl.where(offs == label, g - sc, g)
                if BF16_BY_BITS:
                    tl.store(base + offs, _round_bf16(g), mask=mask)
                else:
                    tl.store(base + offs, g.to(out_ty), mask=mask)


def _block_and_warps(vocab: int) -> tuple[int, int]:
    """Columns per step of the row loops, and warps per row."""
    if INTERPRET:
        # The interpreter runs a block as numpy arrays: larger blocks mean fewer Python steps.
        return min(triton.next_power_of_2(vocab), 16384), 4
    block = min(triton.next_power_of_2(vocab), 4096)
    return block, 8 if block >= 2048 else 4


def _check(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"masked_lm_loss_rows_triton: logits must be 2-D [rows, vocab], got "
                         f"{logits.dim()}-D")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"masked_lm_loss_rows_triton: logits must be float32, float16 or "
                        f"bfloat16, got {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError("masked_lm_loss_rows_triton: the vocabulary is empty")
    if logits.shape[0] > 0 and logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError("masked_lm_loss_rows_triton: logits rows must be contiguous (stride 1 "
                         "along the vocabulary)")
    if logits.shape[0] > 1 and logits.stride(0) < logits.shape[1]:
        raise ValueError("masked_lm_loss_rows_triton: logits rows must not overlap")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"masked_lm_loss_rows_triton: labels must be int64 or int32, got "
                        f"{labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"masked_lm_loss_rows_triton: labels must be 1-D with one label per "
                         f"logits row ({logits.shape[0]}), got shape {tuple(labels.shape)}")
    if scale.dtype != torch.float32 or scale.numel() != 1:
        raise TypeError("masked_lm_loss_rows_triton: scale must be a one-element float32 tensor")
    if labels.device != logits.device or scale.device != logits.device:
        raise ValueError(f"masked_lm_loss_rows_triton: logits, labels and scale must be on one "
                         f"device (got {logits.device}, {labels.device}, {scale.device})")


@torch.library.custom_op("roberta_fast::masked_lm_loss_rows_triton", mutates_args=("logits",))
def masked_lm_loss_rows_triton(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                               ignore_index: int, write_grad: bool) -> torch.Tensor:
    """Per-row cross-entropy of a logits chunk (fp32 ``[rows]``); with ``write_grad`` the chunk is
    overwritten in place with the gradient of the mean loss (see the module docstring)."""
    _check(logits, labels, scale)
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return losses
    if logits.device.type == "cpu":
        # Interpreter runs only: the check is free here, and an error beats a NaN.
        from roberta_fast.ops.masked_lm_loss import check_label_range

        check_label_range(labels, vocab, ignore_index)
    labels = labels.contiguous()
    block, num_warps = _block_and_warps(vocab)
    row_stride = logits.stride(0) if rows > 1 else vocab
    with launch_context(logits):
        _mlm_rows_kernel[(rows,)](logits, labels, scale, losses, vocab, row_stride, ignore_index,
                                  WRITE_GRAD=bool(write_grad), BLOCK=block,
                                  BF16_BY_BITS=INTERPRET and logits.dtype == torch.bfloat16,
                                  num_warps=num_warps)
    return losses


@masked_lm_loss_rows_triton.register_fake
def _(logits, labels, scale, ignore_index, write_grad):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)
