"""Plain-PyTorch softmax attention: the oracle for the fused kernels.

Written for clarity, not speed. It runs in whatever dtype it is given (tests use float64) and is
differentiable by autograd.
"""
from __future__ import annotations

import torch

__all__ = ["forward_native", "varlen_forward_native"]


def forward_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                   dropout_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """``softmax(q k^T * scale + key_padding) v`` on ``[B, L, heads, D]`` tensors.

    Args:
        q, k, v: ``[B, L, heads, D]``.
        key_padding_mask: optional bool ``[B, L]``, True = real token. Padded keys get no weight;
            padded query rows output zeros.
        scale: defaults to ``D ** -0.5``.
        dropout_mask: optional bool ``[B, heads, L, L]``, True = keep. Kept probabilities are
            scaled by ``1 / (1 - dropout_p)``, dropped ones are zeroed.
        dropout_p: the drop probability the mask was drawn with.

    Returns:
        ``[B, L, heads, D]`` in the dtype of ``q``.
    """
    batch, seqlen, heads, head_dim = q.shape
    if scale is None:
        scale = head_dim ** -0.5
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, heads, L, L]

    if key_padding_mask is not None:
        # A sequence without any real token would give a row of -inf (NaN after softmax); let it
        # attend everywhere instead: all its query rows are zeroed below anyway.
        attend = key_padding_mask | ~key_padding_mask.any(dim=1, keepdim=True)
        scores = scores.masked_fill(~attend[:, None, None, :], float("-inf"))

    probs = torch.softmax(scores, dim=-1)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    out = torch.matmul(probs, vh).transpose(1, 2)  # [B, L, heads, D]

    if key_padding_mask is not None:
        out = out.masked_fill(~key_padding_mask[:, :, None, None], 0.0)
    return out


def varlen_forward_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cu_seqlens: torch.Tensor, scale: float | None = None,
                          dropout_mask: torch.Tensor | None = None,
                          dropout_p: float = 0.0) -> torch.Tensor:
    """Attention over sequences packed end to end: ``q, k, v`` ``[total_tokens, heads, D]``.

    ``cu_seqlens`` (``[batch + 1]``) holds the offsets of the sequences. ``dropout_mask``, when
    given, is bool ``[batch, heads, Lmax, Lmax]`` and sequence ``b`` uses its top-left
    ``[len_b, len_b]`` corner. Each sequence attends only to itself.
    """
    bounds = [int(x) for x in cu_seqlens.tolist()]
    pieces = []
    for b in range(len(bounds) - 1):
        start, end = bounds[b], bounds[b + 1]
        n = end - start
        if n == 0:
            continue
        mask = None if dropout_mask is None else dropout_mask[b:b + 1, :, :n, :n]
        out = forward_native(q[None, start:end], k[None, start:end], v[None, start:end],
                             scale=scale, dropout_mask=mask, dropout_p=dropout_p)
        pieces.append(out[0])
    if not pieces:
        return q.new_zeros(q.shape)
    return torch.cat(pieces, dim=0)
