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

``FastRobertaForMaskedLM.convert(model)`` / ``FastBertForMaskedLM.convert(model)`` switch an existing
model in place: parameters keep their identity, ``state_dict()`` is unchanged and weight tying
(decoder weight = word embeddings, decoder bias = head bias) stays intact.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.bert.modeling_bert import BertForMaskedLM, BertLMPredictionHead
from transformers.models.roberta.modeling_roberta import RobertaForMaskedLM, RobertaLMHead
from transformers.models.roberta.modeling_roberta import gelu as _roberta_gelu

from ..ops.masked_lm_loss import _masked_lm_loss, gather_labelled

try:  # lets `return_dict=False` give a tuple, as in the stock forward
    from transformers.utils.generic import can_return_tuple as _can_return_tuple
except ImportError:  # pragma: no cover - older transformers
    def _can_return_tuple(fn):
        return fn

__all__ = ["MaskedLMHead", "MaskedLMPredictionHead", "FastRobertaForMaskedLM",
           "FastBertForMaskedLM", "LOGITS_MODES"]

LOGITS_MODES = ("masked", "full", "none")
IGNORE_INDEX = -100  # what Hugging Face's CrossEntropyLoss ignores


def _check_mode(mode: str) -> str:
    if mode not in LOGITS_MODES:
        raise ValueError(f"logits mode must be one of {', '.join(LOGITS_MODES)}; got {mode!r}")
    return mode


class _FusedLossHeadMixin:
    """The labelled forward shared by the RoBERTa and BERT heads.

    Subclasses provide ``_transform(x)`` (dense, activation, LayerNorm) and ``decoder`` /
    ``bias`` as in the stock heads.
    """

    logits_mode: str = "masked"

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


class MaskedLMHead(_FusedLossHeadMixin, RobertaLMHead):
    """``RobertaLMHead`` that, given labels, runs on the labelled positions only.

    Same parameters (``dense``, ``layer_norm``, ``decoder``, ``bias``) and state_dict as the stock
    head. ``forward(features)`` returns the stock logits; ``forward(features, labels)`` returns
    ``(loss, logits)`` with logits per ``logits_mode`` (see the module docstring).
    """

    def __init__(self, config, logits_mode: str = "masked"):
        super().__init__(config)
        self.logits_mode = _check_mode(logits_mode)

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        # The very activation the stock head calls, so that both agree bit for bit.
        return self.layer_norm(_roberta_gelu(self.dense(x)))

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        """Stock logits ``[..., V]`` without labels; ``(loss, logits)`` with labels."""
        if labels is None:
            return super().forward(features, **kwargs)
        return self._labelled_forward(features, labels)


class MaskedLMPredictionHead(_FusedLossHeadMixin, BertLMPredictionHead):
    """``BertLMPredictionHead`` that, given labels, runs on the labelled positions only.

    Same parameters (``transform.dense``, ``transform.LayerNorm``, ``decoder``, ``bias``) and
    behaviour as :class:`MaskedLMHead`.
    """

    def __init__(self, config, logits_mode: str = "masked"):
        super().__init__(config)
        self.logits_mode = _check_mode(logits_mode)

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x)

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor | None = None):
        """Stock logits ``[..., V]`` without labels; ``(loss, logits)`` with labels."""
        if labels is None:
            return super().forward(hidden_states)
        return self._labelled_forward(hidden_states, labels)


def _mlm_forward(encoder: nn.Module, full_head: nn.Module, masked_head: nn.Module,
                 labels: torch.Tensor | None, **encoder_kwargs) -> MaskedLMOutput:
    """The encoder, then stock logits without labels or the masked-only head and loss with them."""
    outputs = encoder(return_dict=True, **encoder_kwargs)
    sequence_output = outputs[0]
    if labels is None:
        loss, logits = None, full_head(sequence_output)
    else:
        loss, logits = masked_head(sequence_output, labels=labels)
    return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                          attentions=outputs.attentions)


class FastRobertaForMaskedLM(RobertaForMaskedLM):
    """``RobertaForMaskedLM`` whose labelled forward runs the LM head on masked positions only.

    Same signature and ``MaskedLMOutput`` as stock; ``loss`` equals stock's (0 instead of NaN when
    nothing is labelled); ``logits`` follow ``lm_head.logits_mode``. Build one from an existing
    model with :meth:`convert`.
    """

    @classmethod
    def convert(cls, model: RobertaForMaskedLM, logits: str = "masked") -> "FastRobertaForMaskedLM":
        """Switch ``model`` (a ``RobertaForMaskedLM``) to this class in place and return it.

        Only the classes of the model and its ``lm_head`` change: parameters keep their identity,
        ``state_dict()`` is unchanged and tying stays intact. ``logits``: "masked", "full" or "none".
        """
        if not isinstance(model, RobertaForMaskedLM):
            raise TypeError(f"convert expects a RobertaForMaskedLM, got {type(model).__name__}")
        if not isinstance(model.lm_head, RobertaLMHead):
            raise TypeError(f"model.lm_head must be a RobertaLMHead, got "
                            f"{type(model.lm_head).__name__}")
        _check_mode(logits)
        model.__class__ = cls
        model.lm_head.__class__ = MaskedLMHead
        model.lm_head.logits_mode = logits
        return model

    @_can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None,
                labels=None, **kwargs) -> MaskedLMOutput:
        return _mlm_forward(self.roberta, self.lm_head, self.lm_head, labels, input_ids=input_ids,
                            attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds,
                            encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=encoder_attention_mask, **kwargs)


class FastBertForMaskedLM(BertForMaskedLM):
    """``BertForMaskedLM`` whose labelled forward runs the MLM head on masked positions only;
    the BERT twin of :class:`FastRobertaForMaskedLM`."""

    @classmethod
    def convert(cls, model: BertForMaskedLM, logits: str = "masked") -> "FastBertForMaskedLM":
        """Switch ``model`` (a ``BertForMaskedLM``) to this class in place and return it; see
        :meth:`FastRobertaForMaskedLM.convert`."""
        if not isinstance(model, BertForMaskedLM):
            raise TypeError(f"convert expects a BertForMaskedLM, got {type(model).__name__}")
        head = model.cls.predictions
        if not isinstance(head, BertLMPredictionHead):
            raise TypeError(f"model.cls.predictions must be a BertLMPredictionHead, got "
                            f"{type(head).__name__}")
        _check_mode(logits)
        model.__class__ = cls
        head.__class__ = MaskedLMPredictionHead
        head.logits_mode = logits
        return model

    @_can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None,
                labels=None, **kwargs) -> MaskedLMOutput:
        return _mlm_forward(self.bert, self.cls, self.cls.predictions, labels, input_ids=input_ids,
                            attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds,
                            encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=encoder_attention_mask, **kwargs)
