"""Masked-LM heads that run only on the labelled positions, with the fused chunked loss.

Hugging Face's ``RobertaForMaskedLM`` runs its LM head (dense, GELU, LayerNorm, then the
``H x V`` decoder) on every position, builds ``[batch, seq, V]`` logits and then a cross-entropy
that ignores ~85% of them. ``MaskedLMHead`` gathers the labelled positions first, runs the head
transform on those rows only and computes the loss with :func:`roberta_fast.ops.masked_lm_loss`
(logits only ever exist one chunk at a time).

The logits a labelled forward returns depend on ``logits_mode``:

- ``"masked"`` (default): ``[n_labelled, V]`` logits of the labelled positions, in order. They are
  copied out of each chunk before the kernel overwrites it with the gradient: ``n_labelled x V``
  extra memory and one copy, and they carry no gradient (they are for metrics).
- ``"full"``: the stock ``[batch, seq, V]`` logits (for evaluation code that needs them),
  computed as stock does and differentiable; the loss is the same. Costs as much as stock.
- ``"none"``: no logits (``None``): the fastest and leanest.

Mixed precision: under ``torch.autocast`` the head's transform runs as in stock (its Linear in the
autocast dtype) and the fused loss does what stock's decoder Linear and ``CrossEntropyLoss`` do:
logits in the autocast dtype, cross-entropy and loss in fp32, parameter gradients in the
parameters' dtype (see :mod:`roberta_fast.ops.masked_lm_loss`).

``FastRobertaForMaskedLM.convert(model)`` (likewise ``FastXLMRobertaForMaskedLM`` /
``FastBertForMaskedLM``) switches an existing model in place: parameters keep their identity,
``state_dict()`` is unchanged and weight tying (decoder weight = word embeddings, decoder bias =
head bias) stays intact.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.bert.modeling_bert import BertForMaskedLM, BertLMPredictionHead
from transformers.models.roberta.modeling_roberta import RobertaForMaskedLM, RobertaLMHead
from transformers.models.roberta.modeling_roberta import gelu as _roberta_gelu
from transformers.models.xlm_roberta.modeling_xlm_roberta import (
    XLMRobertaForMaskedLM,
    XLMRobertaLMHead,
)

from ..ops.masked_lm_loss import _masked_lm_loss, gather_labelled
from .attention import SavesAsStockMixin, forward_in_stock_signature

__all__ = ["MaskedLMHead", "XLMRobertaMaskedLMHead", "MaskedLMPredictionHead",
           "FastRobertaForMaskedLM", "FastXLMRobertaForMaskedLM", "FastBertForMaskedLM",
           "FAST_CLASSES", "LOGITS_MODES"]

LOGITS_MODES = ("masked", "full", "none")
IGNORE_INDEX = -100  # what Hugging Face's CrossEntropyLoss ignores


def _check_mode(mode: str) -> str:
    if mode not in LOGITS_MODES:
        raise ValueError(f"logits mode must be one of {', '.join(LOGITS_MODES)}; got {mode!r}")
    return mode


class _FusedLossHeadMixin:
    """The forward shared by the RoBERTa, XLM-R and BERT heads: stock without labels, the fused
    masked-only loss with them.

    Subclasses provide ``_transform(x)`` (dense, activation, LayerNorm) and ``decoder`` /
    ``bias`` as in the stock heads.
    """

    logits_mode: str = "masked"

    def __init__(self, config, logits_mode: str = "masked"):
        super().__init__(config)
        self.logits_mode = _check_mode(logits_mode)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        """Stock logits ``[..., V]`` without labels; ``(loss, logits)`` with labels."""
        if labels is None:
            return super().forward(features, **kwargs)
        return self._labelled_forward(features, labels)

    def _decoder_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        bias = self.decoder.bias
        if bias is None:
            bias = self.bias
        return self.decoder.weight, bias

    def _labelled_forward(self, features: torch.Tensor, labels: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mode = _check_mode(self.logits_mode)
        labels = labels.to(features.device)
        if tuple(labels.shape) != tuple(features.shape[:-1]):
            raise ValueError(f"labels have shape {tuple(labels.shape)} but the features' leading "
                             f"dimensions are {tuple(features.shape[:-1])}; they must match")
        weight, bias = self._decoder_weight_bias()
        if mode == "full":
            x = self._transform(features)
            logits = nn.functional.linear(x, weight, bias)
            rows, row_labels = gather_labelled(x, labels, IGNORE_INDEX)
            loss, _ = _masked_lm_loss(rows, weight, bias, row_labels, IGNORE_INDEX, None, False)
            return loss, logits
        rows, row_labels = gather_labelled(features, labels, IGNORE_INDEX)
        x = self._transform(rows)
        return _masked_lm_loss(x, weight, bias, row_labels, IGNORE_INDEX, None, mode == "masked")


class _RobertaStyleHeadMixin(_FusedLossHeadMixin):
    """The RoBERTa / XLM-RoBERTa LM head: ``dense``, GELU, ``layer_norm``, ``decoder``."""

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        # The very activation the stock head calls, so that both agree bit for bit.
        return self.layer_norm(_roberta_gelu(self.dense(x)))


class MaskedLMHead(_RobertaStyleHeadMixin, RobertaLMHead):
    """``RobertaLMHead`` that, given labels, runs on the labelled positions only.

    Same parameters (``dense``, ``layer_norm``, ``decoder``, ``bias``) and state_dict as the stock
    head. ``forward(features)`` returns the stock logits; ``forward(features, labels)`` returns
    ``(loss, logits)`` with logits per ``logits_mode`` (see the module docstring).
    """


class XLMRobertaMaskedLMHead(_RobertaStyleHeadMixin, XLMRobertaLMHead):
    """``XLMRobertaLMHead`` that, given labels, runs on the labelled positions only; the XLM-R
    twin of :class:`MaskedLMHead`."""


class MaskedLMPredictionHead(_FusedLossHeadMixin, BertLMPredictionHead):
    """``BertLMPredictionHead`` that, given labels, runs on the labelled positions only.

    Same parameters (``transform.dense``, ``transform.LayerNorm``, ``decoder``, ``bias``) and
    behaviour as :class:`MaskedLMHead`.
    """

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x)


class _FastMaskedLMMixin(SavesAsStockMixin):
    """``convert`` and the labelled forward shared by the ``*ForMaskedLM`` twins.

    Each twin names its stock class, the attribute of its encoder, the path of its LM head (and
    of the module that gives the full logits) and the head's stock and fast classes; its
    ``forward`` is made from the stock class's signature when the twin is defined.
    """

    _stock_class: type
    _encoder_attr: str
    _head_path: str          # the head that computes the loss: transform + decoder
    _full_head_path: str     # what the stock forward calls for logits
    _stock_head_class: type
    _fast_head_class: type
    _forward_names: tuple[str, ...]

    def __init_subclass__(cls, **kwargs):
        """Give the twin ``_fused_forward`` dressed in the stock ``forward``'s signature, and the
        names that signature takes positionally."""
        super().__init_subclass__(**kwargs)
        cls._forward_names = forward_in_stock_signature(cls, _FastMaskedLMMixin._fused_forward)

    @classmethod
    def convert(cls, model: nn.Module, logits: str = "masked") -> nn.Module:
        """Switch ``model`` (an instance of the stock class) to this class in place; return it.

        Only the classes of the model and its LM head change: parameters keep their identity,
        ``state_dict()`` is unchanged and tying stays intact. ``logits``: "masked", "full" or
        "none" (see the module docstring).
        """
        stock = cls._stock_class
        if not isinstance(model, stock):
            raise TypeError(f"{cls.__name__}.convert expects a {stock.__name__}, got "
                            f"{type(model).__name__}")
        head = model.get_submodule(cls._head_path)
        want = cls._stock_head_class
        if not isinstance(head, want):
            raise TypeError(f"model.{cls._head_path} must be a {want.__name__}, got "
                            f"{type(head).__name__}")
        _check_mode(logits)
        model.__class__ = cls
        head.__class__ = cls._fast_head_class
        head.logits_mode = logits
        return model

    def _fused_forward(self, *args, **kwargs):
        """The stock signature; with ``labels`` the LM head runs on the labelled positions only.

        Returns the stock ``MaskedLMOutput`` (a tuple with ``return_dict=False``); ``loss`` equals
        stock's (0 instead of NaN when nothing is labelled); ``logits`` follow
        ``logits_mode`` of the head.
        """
        if len(args) > len(self._forward_names):
            raise TypeError(f"{type(self).__name__}.forward takes at most "
                            f"{len(self._forward_names)} positional arguments, got {len(args)}")
        named = dict(zip(self._forward_names, args))
        for name in named.keys() & kwargs.keys():
            raise TypeError(f"{type(self).__name__}.forward got multiple values for {name!r}")
        named.update(kwargs)
        labels = named.pop("labels", None)
        return_dict = named.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)

        outputs = getattr(self, self._encoder_attr)(return_dict=True, **named)
        sequence_output = outputs[0]
        if labels is None:
            loss, logits = None, self.get_submodule(self._full_head_path)(sequence_output)
        else:
            loss, logits = self.get_submodule(self._head_path)(sequence_output, labels=labels)
        out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                             attentions=outputs.attentions)
        return out if return_dict else out.to_tuple()


class FastRobertaForMaskedLM(_FastMaskedLMMixin, RobertaForMaskedLM):
    """``RobertaForMaskedLM`` whose labelled forward runs the LM head on masked positions only.

    Same signature and ``MaskedLMOutput`` as stock; ``loss`` equals stock's (0 instead of NaN when
    nothing is labelled); ``logits`` follow ``lm_head.logits_mode``. Build one from an existing
    model with :meth:`convert`.
    """

    _stock_class = RobertaForMaskedLM
    _encoder_attr, _head_path, _full_head_path = "roberta", "lm_head", "lm_head"
    _stock_head_class, _fast_head_class = RobertaLMHead, MaskedLMHead


class FastXLMRobertaForMaskedLM(_FastMaskedLMMixin, XLMRobertaForMaskedLM):
    """``XLMRobertaForMaskedLM`` with the masked-only LM head; the XLM-R twin of
    :class:`FastRobertaForMaskedLM`."""

    _stock_class = XLMRobertaForMaskedLM
    _encoder_attr, _head_path, _full_head_path = "roberta", "lm_head", "lm_head"
    _stock_head_class, _fast_head_class = XLMRobertaLMHead, XLMRobertaMaskedLMHead


class FastBertForMaskedLM(_FastMaskedLMMixin, BertForMaskedLM):
    """``BertForMaskedLM`` whose labelled forward runs the MLM head on masked positions only;
    the BERT twin of :class:`FastRobertaForMaskedLM`."""

    _stock_class = BertForMaskedLM
    _encoder_attr, _head_path, _full_head_path = "bert", "cls.predictions", "cls"
    _stock_head_class, _fast_head_class = BertLMPredictionHead, MaskedLMPredictionHead


#: stock class -> fast class, for ``roberta_fast.patch``.
FAST_CLASSES: dict[type, type] = {
    RobertaForMaskedLM: FastRobertaForMaskedLM,
    XLMRobertaForMaskedLM: FastXLMRobertaForMaskedLM,
    BertForMaskedLM: FastBertForMaskedLM,
}
