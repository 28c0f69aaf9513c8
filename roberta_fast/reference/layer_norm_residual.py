"""Plain-PyTorch reference of fused residual + LayerNorm: ``layer_norm(dropout(x) + residual)``.

Written for clarity, not speed: the oracle of the kernels' tests and the ``reference`` backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def forward_native(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float = 1e-5,
                   dropout_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """``layer_norm(x * dropout_mask / (1 - dropout_p) + residual)`` over the last dimension.

    ``dropout_mask`` (bool or 0/1, broadcastable to ``x``) marks the kept elements; ``None`` means
    no dropout. Computes in at least float32 (float64 inputs stay float64, so this is the float64
    oracle) and returns ``x``'s dtype. Differentiable in every tensor argument.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    kept = x.to(compute)
    if dropout_mask is not None:
        kept = kept * dropout_mask.to(compute) / (1.0 - dropout_p)
    s = kept + residual.to(compute)
    y = F.layer_norm(s, (x.shape[-1],), weight.to(compute), bias.to(compute), eps)
    return y.to(x.dtype)
