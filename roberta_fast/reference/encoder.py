"""Plain-PyTorch RoBERTa (and BERT) encoder: the oracle the fast kernels are checked against.

Written for clarity rather than speed: every step of the Hugging Face ``RobertaModel`` /
``RobertaForMaskedLM`` forward pass appears here as ordinary tensor code, in whatever dtype the
module is in (float64 included). Module and parameter names mirror Hugging Face's, so a
``transformers`` state_dict loads unchanged with ``strict=True`` and the reference reproduces
Hugging Face's outputs from it.

Only the encoder use of the architecture is covered: absolute position embeddings, no decoder
mode, no cross-attention, no key/value cache.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RobertaReferenceModel",
    "RobertaReferenceForMaskedLM",
    "reference_from_hf",
    "roberta_position_ids",
]

# model_type -> whether position ids count from ``padding_idx + 1`` (RoBERTa) or from 0 (BERT).
_POSITIONS_AFTER_PADDING = {"roberta": True, "bert": False}

# Keys Hugging Face keeps as buffers in older checkpoints; they carry no learned values.
_IGNORED_BUFFER_KEYS = ("position_ids", "token_type_ids")

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------
# Input and config checks. The reference is used as an oracle on GPUs too, where an index out of
# range would be a device-side assert instead of a readable error, so every index is checked.
# ----------------------------------------------------------------------------------------------

def _check_config(config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in _POSITIONS_AFTER_PADDING:
        raise ValueError(
            f"config.model_type={model_type!r} is not supported; expected one of "
            f"{sorted(_POSITIONS_AFTER_PADDING)} (a transformers RobertaConfig or BertConfig)")
    if config.hidden_size % config.num_attention_heads != 0:
        raise ValueError(
            f"hidden_size ({config.hidden_size}) must be a multiple of num_attention_heads "
            f"({config.num_attention_heads})")
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        raise ValueError(
            f"position_embedding_type={position_type!r} is not supported; only 'absolute' is")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("decoder configs (is_decoder / add_cross_attention) are not supported; "
                         "the reference is a bidirectional encoder")
    if _POSITIONS_AFTER_PADDING[model_type] and config.pad_token_id is None:
        raise ValueError("RoBERTa position ids need config.pad_token_id; it is None")


def _check_index_tensor(name: str, t: torch.Tensor, shape: torch.Size, low: int, high: int,
                        allowed: int | None = None) -> None:
    """Raise unless ``t`` is an integer tensor of ``shape`` with values in ``[low, high)``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    valid = (t >= low) & (t < high)
    if allowed is not None:
        valid |= t == allowed
    if not bool(valid.all()):
        bad = t[~valid][0].item()
        extra = f" or {allowed}" if allowed is not None else ""
        raise ValueError(f"{name} holds {bad}, outside the valid range [{low}, {high}){extra}")


def _check_inputs(config: Any, device: torch.device, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None,
                  token_type_ids: torch.Tensor | None) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape [batch, seq_len] with both at least 1, got "
                         f"{tuple(input_ids.shape)}")
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    _check_index_tensor("input_ids", input_ids, input_ids.shape, 0, config.vocab_size)
    if token_type_ids is not None:
        _check_index_tensor("token_type_ids", token_type_ids, input_ids.shape, 0,
                            config.type_vocab_size)
        if token_type_ids.device != device:
            raise ValueError(f"token_type_ids is on {token_type_ids.device}, model on {device}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError("attention_mask must be a torch.Tensor of 1 (attend) / 0 (padding)")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"{tuple(input_ids.shape)} like input_ids")
        if attention_mask.device != device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, model on {device}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 1 (real token) and 0 (padding)")


# ----------------------------------------------------------------------------------------------
# Building blocks, named like Hugging Face's modules
# ----------------------------------------------------------------------------------------------

def roberta_position_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """RoBERTa's position ids: non-padding tokens count up from ``padding_idx + 1``.

    Padding tokens (``input_ids == padding_idx``) get ``padding_idx`` itself, whose position
    embedding is never trained. The count skips padding, so a padding token in the middle of a
    row does not shift the positions after it. Same result as Hugging Face's
    ``create_position_ids_from_input_ids`` (fairseq's ``make_positions``).

    Args:
        input_ids: integer tensor ``[batch, seq_len]``.
        padding_idx: the padding token id (``config.pad_token_id``).

    Returns:
        int64 tensor of the same shape.
    """
    is_token = (input_ids != padding_idx).long()
    return torch.cumsum(is_token, dim=1) * is_token + padding_idx


def _activation(hidden_act: str | Callable[[torch.Tensor], torch.Tensor]
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(hidden_act):
        return hidden_act
    if hidden_act == "gelu":
        # The common case needs no transformers import: exact (erf) GELU, as ACT2FN["gelu"].
        return nn.GELU()
    try:
        from transformers.activations import ACT2FN
    except ImportError as exc:  # pragma: no cover - transformers is an optional dependency
        raise ImportError(f"hidden_act={hidden_act!r} needs transformers installed") from exc
    if hidden_act not in ACT2FN:
        raise ValueError(f"unknown hidden_act {hidden_act!r}; known: {sorted(ACT2FN)}")
    return ACT2FN[hidden_act]


class RobertaReferenceEmbeddings(nn.Module):
    """word + token type + position embeddings, then LayerNorm and dropout."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.positions_after_padding = _POSITIONS_AFTER_PADDING[config.model_type]
        self.padding_idx = config.pad_token_id
        self.max_position_embeddings = config.max_position_embeddings
        # padding_idx only matters for gradients (that row gets none), exactly as in HF.
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(
            config.max_position_embeddings, config.hidden_size,
            padding_idx=config.pad_token_id if self.positions_after_padding else None)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Position ids for ``input_ids`` (RoBERTa- or BERT-style per the config)."""
        if self.positions_after_padding:
            position_ids = roberta_position_ids(input_ids, self.padding_idx)
        else:
            seq_len = input_ids.shape[1]
            position_ids = torch.arange(seq_len, device=input_ids.device).expand_as(input_ids)
        longest = int(position_ids.max())
        if longest >= self.max_position_embeddings:
            raise ValueError(
                f"sequence too long: it needs position id {longest} but the model has only "
                f"max_position_embeddings={self.max_position_embeddings}")
        return position_ids

    def forward(self, input_ids: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(self.position_ids(input_ids))
        return self.dropout(self.LayerNorm(embeddings))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Older HF checkpoints saved the position_ids / token_type_ids buffers; they hold no
        # learned values, so they are dropped rather than reported as unexpected keys.
        for name in _IGNORED_BUFFER_KEYS:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RobertaReferenceSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with an additive key-padding mask."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        return x.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor,
                additive_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq_len, hidden = hidden_states.shape
        q = self._split_heads(self.query(hidden_states))  # [B, heads, L, D]
        k = self._split_heads(self.key(hidden_states))
        v = self._split_heads(self.value(hidden_states))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        if additive_mask is not None:
            scores = scores + additive_mask  # [B, 1, 1, L]: the same keys hidden for every query
        probs = self.dropout(torch.softmax(scores, dim=-1))
        context = torch.matmul(probs, v)  # [B, heads, L, D]
        return context.transpose(1, 2).reshape(batch, seq_len, hidden)


class RobertaReferenceSelfOutput(nn.Module):
    """dense, dropout, LayerNorm(x + residual) after attention."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class RobertaReferenceAttention(nn.Module):
    """Self-attention followed by its output projection and post-LayerNorm."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.self = RobertaReferenceSelfAttention(config)
        self.output = RobertaReferenceSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor,
                additive_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(hidden_states, additive_mask), hidden_states)


class RobertaReferenceIntermediate(nn.Module):
    """dense to intermediate_size, then config.hidden_act."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _activation(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class RobertaReferenceOutput(nn.Module):
    """dense back to hidden_size, dropout, LayerNorm(x + residual)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class RobertaReferenceLayer(nn.Module):
    """One post-LayerNorm transformer encoder layer."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.attention = RobertaReferenceAttention(config)
        self.intermediate = RobertaReferenceIntermediate(config)
        self.output = RobertaReferenceOutput(config)

    def forward(self, hidden_states: torch.Tensor,
                additive_mask: torch.Tensor | None = None) -> torch.Tensor:
        attention_output = self.attention(hidden_states, additive_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class RobertaReferenceEncoder(nn.Module):
    """The stack of encoder layers (``encoder.layer.N``)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            RobertaReferenceLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor, additive_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, ...]:
        """Returns every layer's output, in order."""
        outputs = []
        for layer in self.layer:
            hidden_states = layer(hidden_states, additive_mask)
            outputs.append(hidden_states)
        return tuple(outputs)


class RobertaReferencePooler(nn.Module):
    """dense + tanh on the first token's hidden state."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


def additive_attention_mask(attention_mask: torch.Tensor | None,
                            dtype: torch.dtype) -> torch.Tensor | None:
    """Turn a ``[B, L]`` mask of 1 (real) / 0 (padding) into ``[B, 1, 1, L]`` additive scores.

    Hidden keys get the most negative finite value of ``dtype`` (as Hugging Face's eager
    attention does), not ``-inf``: a row whose keys are all padding then gets a uniform softmax
    instead of NaN.
    """
    if attention_mask is None:
        return None
    hidden = attention_mask[:, None, None, :] == 0
    scores = torch.zeros(hidden.shape, dtype=dtype, device=attention_mask.device)
    return scores.masked_fill(hidden, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------
# Public models
# ----------------------------------------------------------------------------------------------

class RobertaReferenceModel(nn.Module):
    """Plain-PyTorch twin of Hugging Face's ``RobertaModel`` (and ``BertModel``).

    Args:
        config: a ``transformers`` ``RobertaConfig`` or ``BertConfig`` (anything with the same
            attributes and ``model_type`` ``"roberta"`` or ``"bert"``). RoBERTa position ids
            count from ``pad_token_id + 1`` and skip padding; BERT's count from 0.
        add_pooling_layer: build ``pooler`` (dense + tanh on the first token), as HF's flag.

    Dropout uses the config's probabilities and follows ``train()`` / ``eval()``.
    """

    def __init__(self, config: Any, add_pooling_layer: bool = True) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        self.embeddings = RobertaReferenceEmbeddings(config)
        self.encoder = RobertaReferenceEncoder(config)
        self.pooler = RobertaReferencePooler(config) if add_pooling_layer else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...]]:
        """Run the encoder.

        Args:
            input_ids: integer ``[batch, seq_len]`` token ids.
            attention_mask: ``[batch, seq_len]`` of 1 (real token) / 0 (padding); None attends
                to every token.
            token_type_ids: integer ``[batch, seq_len]``; None means all zeros.

        Returns:
            ``(last_hidden_state [B, L, H], pooler_output [B, H] or None, all_hidden_states)``
            where ``all_hidden_states`` is the embedding output followed by each layer's output
            (``num_hidden_layers + 1`` tensors, as HF's ``output_hidden_states=True``).
        """
        _check_inputs(self.config, self.embeddings.word_embeddings.weight.device, input_ids,
                      attention_mask, token_type_ids)
        hidden_states = self.embeddings(input_ids, token_type_ids)
        additive_mask = additive_attention_mask(attention_mask, hidden_states.dtype)
        layer_outputs = self.encoder(hidden_states, additive_mask)
        all_hidden_states = (hidden_states, *layer_outputs)
        last_hidden_state = all_hidden_states[-1]
        pooled = self.pooler(last_hidden_state) if self.pooler is not None else None
        return last_hidden_state, pooled, all_hidden_states


class RobertaReferenceLMHead(nn.Module):
    """dense, GELU, layer_norm, then the vocabulary projection ``decoder`` plus ``bias``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """The part before the vocabulary projection (what ``ops.masked_lm_loss`` takes)."""
        # The LM head's GELU is the exact (erf) one whatever config.hidden_act says, as in HF.
        return self.layer_norm(F.gelu(self.dense(features)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(features))


class RobertaReferenceForMaskedLM(nn.Module):
    """Plain-PyTorch twin of Hugging Face's ``RobertaForMaskedLM``.

    ``roberta`` is a :class:`RobertaReferenceModel` without pooler and ``lm_head`` the MLM head.
    As in HF, when ``config.tie_word_embeddings`` (the default) is true the head's
    ``decoder.weight`` is the word-embedding matrix and ``decoder.bias`` is ``lm_head.bias``.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.roberta = RobertaReferenceModel(config, add_pooling_layer=False)
        self.lm_head = RobertaReferenceLMHead(config)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.decoder.weight = self.roberta.embeddings.word_embeddings.weight
            self.lm_head.decoder.bias = self.lm_head.bias

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Encoder, LM head over every position, and the masked-LM loss when labels are given.

        Args:
            input_ids, attention_mask, token_type_ids: as :meth:`RobertaReferenceModel.forward`.
            labels: integer ``[batch, seq_len]``; a vocabulary id where the loss is taken,
                ``-100`` elsewhere.

        Returns:
            ``(loss, logits [B, L, vocab])``. ``loss`` is None without labels, else the mean
            cross-entropy over positions whose label is not -100; like HF (0 / 0) it is NaN
            when every label is -100.
        """
        if labels is not None:
            if not isinstance(input_ids, torch.Tensor):
                raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
            _check_index_tensor("labels", labels, input_ids.shape, 0, self.config.vocab_size,
                                allowed=IGNORE_INDEX)
        sequence_output, _, _ = self.roberta(input_ids, attention_mask, token_type_ids)
        logits = self.lm_head(sequence_output)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                   labels.to(logits.device).reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return loss, logits


def reference_from_hf(hf_model: nn.Module) -> RobertaReferenceModel | RobertaReferenceForMaskedLM:
    """Build the reference twin of a Hugging Face model, with its weights, dtype and device.

    ``RobertaModel`` and ``BertModel`` give a :class:`RobertaReferenceModel` (with a pooler
    exactly when the HF model has one); ``RobertaForMaskedLM`` gives a
    :class:`RobertaReferenceForMaskedLM`. The HF state_dict is loaded unchanged with
    ``strict=True``. The result is in the same train/eval mode as ``hf_model``.
    """
    try:
        from transformers import BertModel, RobertaForMaskedLM, RobertaModel
    except ImportError as exc:  # pragma: no cover - transformers is an optional dependency
        raise ImportError("reference_from_hf needs transformers installed") from exc

    if isinstance(hf_model, RobertaForMaskedLM):
        reference: nn.Module = RobertaReferenceForMaskedLM(hf_model.config)
    elif isinstance(hf_model, (RobertaModel, BertModel)):
        reference = RobertaReferenceModel(hf_model.config,
                                          add_pooling_layer=hf_model.pooler is not None)
    else:
        raise TypeError(
            f"reference_from_hf takes a transformers RobertaModel, BertModel or "
            f"RobertaForMaskedLM, got {type(hf_model).__name__}")
    first = next(hf_model.parameters())
    reference.to(device=first.device, dtype=first.dtype)
    reference.load_state_dict(hf_model.state_dict(), strict=True)
    reference.train(hf_model.training)
    return reference
