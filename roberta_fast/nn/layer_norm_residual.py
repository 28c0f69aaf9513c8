"""Drop-in modules for fused residual + LayerNorm (+ dropout).

- ``FusedResidualLayerNorm``: an ``nn.LayerNorm`` (same parameters, same state_dict) whose
  ``forward(x, residual, dropout_p)`` computes ``layer_norm(dropout(x) + residual)`` in one kernel.
- ``FastRobertaSelfOutput`` / ``FastRobertaOutput`` (and the BERT twins ``FastBertSelfOutput`` /
  ``FastBertOutput``): Hugging Face's block outputs ``LayerNorm(dropout(dense(h)) + input)`` with
  the stock sub-modules and parameters, whose forward runs the fused op. ``convert(module)`` turns
  an existing stock instance into the fast class in place.

Mixed precision: x and the residual are added in their common dtype, as the stock
``LayerNorm(x + residual)`` does (under autocast the dense output is half precision and the
residual stream fp32, so the fused op runs in fp32), and the op follows ``F.layer_norm``'s
autocast policy (see :mod:`roberta_fast.ops.layer_norm_residual`).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertOutput, BertSelfOutput
from transformers.models.roberta.modeling_roberta import RobertaOutput, RobertaSelfOutput
from transformers.models.xlm_roberta.modeling_xlm_roberta import (XLMRobertaOutput,
                                                                 XLMRobertaSelfOutput)

from ..ops.layer_norm_residual import fused_residual_layer_norm

__all__ = [
    "FusedResidualLayerNorm",
    "FastRobertaSelfOutput",
    "FastRobertaOutput",
    "FastBertSelfOutput",
    "FastBertOutput",
    "FastXLMRobertaSelfOutput",
    "FastXLMRobertaOutput",
]


def _affine(norm: nn.LayerNorm, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LayerNorm's weight and bias, with ones/zeros standing in for absent ones."""
    if len(norm.normalized_shape) != 1:
        raise ValueError("fused residual LayerNorm normalizes the last dimension only; got "
                         f"normalized_shape={tuple(norm.normalized_shape)}")
    hidden = norm.normalized_shape[0]
    weight = norm.weight
    if weight is None:
        weight = torch.ones(hidden, dtype=like.dtype, device=like.device)
    bias = norm.bias
    if bias is None:
        bias = torch.zeros(hidden, dtype=weight.dtype, device=weight.device)
    return weight, bias


def _common_dtype(x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Under autocast the dense output is half while the residual may be fp32: compute in the wider
    # dtype, as the unfused LayerNorm(x + residual) would.
    if x.dtype != residual.dtype:
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    return x, residual


class FusedResidualLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension whose forward also adds a residual and applies
    dropout to ``x`` first: ``layer_norm(dropout(x) + residual)``, one fused kernel.

    Same constructor and parameters as ``nn.LayerNorm`` (its state_dict is a LayerNorm's).
    Dropout is active only in training mode.
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor,  # type: ignore[override]
                dropout_p: float = 0.0) -> torch.Tensor:
        x, residual = _common_dtype(x, residual)
        weight, bias = _affine(self, x)
        return fused_residual_layer_norm(x, residual, weight, bias, self.eps,
                                         dropout_p=dropout_p, training=self.training)


class _FusedOutputMixin:
    """``forward`` of Hugging Face's ``*SelfOutput`` / ``*Output``: dense, then the fused
    dropout + residual + LayerNorm, with the stock ``dense``, ``dropout`` and ``LayerNorm``."""

    _stock: type[nn.Module]

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        x, residual = _common_dtype(self.dense(hidden_states), input_tensor)
        weight, bias = _affine(self.LayerNorm, x)
        return fused_residual_layer_norm(x, residual, weight, bias, self.LayerNorm.eps,
                                         dropout_p=self.dropout.p, training=self.training)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Turn a stock ``module`` into this class in place and return it.

        Only the class changes: parameters keep their identity and state_dict keys are unchanged.
        """
        if isinstance(module, cls):
            return module
        if type(module) is not cls._stock:
            raise TypeError(f"{cls.__name__}.convert takes a {cls._stock.__name__}, got "
                            f"{type(module).__name__}")
        module.__class__ = cls
        return module


class FastRobertaSelfOutput(_FusedOutputMixin, RobertaSelfOutput):
    """``RobertaSelfOutput`` with the fused dropout + residual + LayerNorm."""

    _stock = RobertaSelfOutput


class FastRobertaOutput(_FusedOutputMixin, RobertaOutput):
    """``RobertaOutput`` with the fused dropout + residual + LayerNorm."""

    _stock = RobertaOutput


class FastBertSelfOutput(_FusedOutputMixin, BertSelfOutput):
    """``BertSelfOutput`` with the fused dropout + residual + LayerNorm."""

    _stock = BertSelfOutput


class FastBertOutput(_FusedOutputMixin, BertOutput):
    """``BertOutput`` with the fused dropout + residual + LayerNorm."""

    _stock = BertOutput


class FastXLMRobertaSelfOutput(_FusedOutputMixin, XLMRobertaSelfOutput):
    """``XLMRobertaSelfOutput`` with the fused dropout + residual + LayerNorm."""

    _stock = XLMRobertaSelfOutput


class FastXLMRobertaOutput(_FusedOutputMixin, XLMRobertaOutput):
    """``XLMRobertaOutput`` with the fused dropout + residual + LayerNorm."""

    _stock = XLMRobertaOutput
