"""Removing padding from a batch and putting it back, both differentiable.

A padded batch ``[B, L, ...]`` with a ``[B, L]`` mask becomes the real tokens packed end to end,
``[T, ...]`` with ``T = mask.sum()``, plus what is needed to undo it (``indices``) and to run
attention per sequence (``cu_seqlens``, ``max_seqlen``). The real tokens of a row need not be
contiguous (left padding works too); their order inside the row is kept.

Both directions are single ``index_select`` / ``index_copy`` calls, so autograd, ``torch.compile``
and any dtype work without a custom autograd function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["unpad_input", "pad_input"]


def _check_mask(attention_mask: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seqlen):
        raise ValueError(f"attention_mask must have shape [batch, seqlen] = [{batch}, {seqlen}] to "
                         f"match the input; got {tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError("attention_mask must be bool or integer (1 = real token, 0 = padding); "
                        f"got dtype {attention_mask.dtype}")
    return attention_mask != 0


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Pack the real tokens of a padded batch.

    Args:
        hidden: ``[B, L, ...]``, any dtype.
        attention_mask: ``[B, L]`` bool or integer; True / nonzero marks a real token.

    Returns:
        ``(packed, indices, cu_seqlens, max_seqlen)``: ``packed`` is ``[T, ...]`` (the real tokens
        in row-major order), ``indices`` the int64 ``[T]`` positions of those tokens in the
        flattened ``[B * L]`` batch, ``cu_seqlens`` the int32 ``[B + 1]`` offsets of each row in
        ``packed`` (``cu_seqlens[b + 1] - cu_seqlens[b]`` is row ``b``'s length), and
        ``max_seqlen`` the longest row's length as a Python int.

    The call syncs with the device once: ``T`` sizes the packed tensors and ``max_seqlen`` the
    attention's launch grid, so both are read together, and the token positions are then found
    without a second wait (``nonzero_static`` with the known count).
    """
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have at least 2 dims [batch, seqlen, ...]; got shape "
                         f"{tuple(hidden.shape)}")
    batch, seqlen = hidden.shape[0], hidden.shape[1]
    mask = _check_mask(attention_mask, batch, seqlen)
    if mask.device != hidden.device:
        raise ValueError(f"attention_mask is on {mask.device} but hidden is on {hidden.device}")
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    if batch > 0 and seqlen > 0:
        total, max_seqlen = torch.stack([seqlens.sum(), seqlens.max()]).tolist()
    else:
        total = max_seqlen = 0
    indices = torch.nonzero_static(mask.reshape(-1), size=total).reshape(-1)
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    packed = hidden.reshape(batch * seqlen, *hidden.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Undo :func:`unpad_input`: scatter ``packed`` ``[T, ...]`` back to ``[batch, seqlen, ...]``.

    Positions not listed in ``indices`` (the padding) hold zeros; their gradient is dropped.
    """
    if not isinstance(packed, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise TypeError("packed and indices must be torch.Tensors")
    if packed.dim() < 1:
        raise ValueError("packed must have at least 1 dim [total_tokens, ...]")
    if indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"indices must be a 1-D int64 tensor; got shape {tuple(indices.shape)} "
                         f"and dtype {indices.dtype}")
    if indices.shape[0] != packed.shape[0]:
        raise ValueError(f"indices has {indices.shape[0]} entries but packed has {packed.shape[0]} "
                         "rows; they must come from the same unpad_input call")
    batch, seqlen = int(batch), int(seqlen)
    if batch < 0 or seqlen < 0:
        raise ValueError(f"batch and seqlen must be non-negative; got {batch}, {seqlen}")
    if indices.device != packed.device:
        raise ValueError(f"indices is on {indices.device} but packed is on {packed.device}")
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    out = out.index_copy(0, indices.long(), packed)
    return out.view(batch, seqlen, *packed.shape[1:])
