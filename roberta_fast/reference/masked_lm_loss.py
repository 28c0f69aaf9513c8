"""Plain-PyTorch reference of the masked-LM loss: the full logits and ``F.cross_entropy``.

Written for clarity, not memory: it builds ``[tokens, V]`` logits. Runs in any float dtype,
float64 included, which makes it the tests' oracle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def forward_native(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` over positions whose label is not
    ``ignore_index``; 0 (with zero gradients) when no position is labelled.

    ``hidden``: ``[..., H]``; ``weight``: ``[V, H]``; ``bias``: ``[V]`` or None; ``labels``:
    ``[...]`` integer class indices. Unlike ``F.cross_entropy`` (NaN for an empty mean), nothing
    labelled gives 0, and the divisor stays a tensor, so there is no host sync.
    """
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    flat = labels.reshape(-1).long()
    total = F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="sum")
    count = (flat != ignore_index).sum().clamp(min=1)
    return total / count.to(total.dtype)
