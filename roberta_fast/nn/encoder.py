"""The unpadded encoder mode: padding is removed once at the encoder's entry and put back at exit.

``FastRobertaEncoder.convert(encoder)`` (likewise ``FastBertEncoder`` / ``FastXLMRobertaEncoder``)
swaps the class of a stock encoder in place. Its forward packs the real tokens of the batch into
``[1, T, H]`` (``T`` = number of real tokens), runs every layer on them, and scatters the result
back to ``[B, L, H]`` with zeros at the padding. Only real tokens pass through the Linear layers,
the LayerNorms and the feed-forward; attention sees each sequence on its own through
``ops.attention_varlen``.

The layers learn the packing through Hugging Face's own keyword arguments for packed sequences
(``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k``), which the stock
layer forwards to its self-attention untouched. Keyword arguments are bound into the checkpointed
call by Hugging Face's gradient checkpointing, so the recomputation sees the same packing.

The self-attention modules must be the fast ones (``roberta_fast.nn.attention``): the stock
attention would let packed sequences attend to each other. ``output_hidden_states`` still
returns padded ``[B, L, H]`` tensors for every layer.

The stock (padded) forward runs instead when nothing is padded, when attention probabilities are
requested, when the mask is not a pure key-padding mask, for decoder use (cross-attention, key/value
cache, causal configs), with ``chunk_size_feed_forward`` (its chunks would split the packed
tokens), and when some layer's self-attention is not a fast one.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
from transformers.models.bert.modeling_bert import BertEncoder
from transformers.models.roberta.modeling_roberta import RobertaEncoder
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaEncoder

from .attention import (
    ClassSwapMixin,
    _active_collector,
    _FastSelfAttentionMixin,
    key_padding_mask_from_attention_mask,
    needs_stock_forward,
)
from .padding import pad_input, unpad_input

__all__ = ["FastRobertaEncoder", "FastBertEncoder", "FastXLMRobertaEncoder", "FAST_CLASSES",
           "layers_pass_kwargs"]


def layers_pass_kwargs(layer_cls: type) -> bool:
    """Whether an encoder layer class's forward takes ``**kwargs`` (and so can hand the packing
    arguments on to its attention): transformers 5.x layers do, 4.x layers do not."""
    params = inspect.signature(layer_cls.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class _UnpadEncoderMixin(ClassSwapMixin):
    """The forward shared by the unpadded encoders.

    Only ``hidden_states`` and ``attention_mask`` are named: the rest of the stock signature
    (the cache's name, ``cache_position``) changed between transformers releases and passes
    through untouched to the stock forward.
    """

    @classmethod
    def convert(cls, module, *, backend: str = "auto"):
        # Packing reaches the self-attention only through the layers' **kwargs, which transformers
        # 4.x layers do not take: refuse rather than run packed sequences through stock attention.
        first = next(iter(getattr(module, "layer", [])), None)
        if first is not None and not layers_pass_kwargs(type(first)):
            import transformers

            raise ValueError(
                f"unpad=True needs encoder layers that pass keyword arguments on to their "
                f"attention (transformers >= 5.0); {type(first).__name__}.forward of "
                f"transformers {transformers.__version__} does not. Pass unpad=False")
        return super().convert(module, backend=backend)

    def _can_unpad(self, hidden_states, args, kwargs) -> bool:
        if (needs_stock_forward(args, kwargs) or getattr(self.config, "is_decoder", False)
                or "cu_seq_lens_q" in kwargs or hidden_states.dim() != 3):
            return False
        for layer in self.layer:
            if getattr(layer, "chunk_size_feed_forward", 0):
                return False
            if not isinstance(layer.attention.self, _FastSelfAttentionMixin):
                return False
        wants_hidden = kwargs.get("output_hidden_states") or getattr(self.config,
                                                                     "output_hidden_states", False)
        # Hidden states are captured by hooks into HF's collector; without it they cannot be
        # padded back, so keep the padded path.
        return not (wants_hidden and _active_collector() is None)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args: Any, **kwargs: Any) -> BaseModelOutputWithPastAndCrossAttentions:
        stock = super().forward

        def padded():
            return stock(hidden_states, attention_mask, *args, **kwargs)

        if not self._can_unpad(hidden_states, args, kwargs):
            return padded()
        batch, seqlen, _ = hidden_states.shape
        usable, key_padding = key_padding_mask_from_attention_mask(attention_mask, batch, seqlen)
        if not usable or key_padding is None:
            return padded()
        packed, indices, cu_seqlens, max_seqlen = unpad_input(hidden_states, key_padding)
        if max_seqlen == 0:  # nothing real in the whole batch
            return padded()

        # Unset arguments are left out rather than passed on, since their names vary by release.
        layer_kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "use_cache"}
        layer_kwargs.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                            max_length_q=max_seqlen, max_length_k=max_seqlen)
        collected = _active_collector()
        captured = collected.get("hidden_states") if collected is not None else None
        first_captured = len(captured) if captured is not None else 0

        hidden = packed.unsqueeze(0)  # [1, T, H]: the layers' sequence dim is dim 1
        produced = [hidden]
        for layer in self.layer:
            hidden = layer(hidden, None, **layer_kwargs)
            produced.append(hidden)

        if captured is not None:
            # The capture hooks recorded the packed tensors this loop made; pad those back.
            ours = {id(t) for t in produced}
            for i in range(first_captured, len(captured)):
                if captured[i] is not None and id(captured[i]) in ours:
                    captured[i] = pad_input(captured[i][0], indices, batch, seqlen)

        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=pad_input(hidden[0], indices, batch, seqlen))


class FastRobertaEncoder(_UnpadEncoderMixin, RobertaEncoder):
    """``RobertaEncoder`` that runs its layers on unpadded tokens (see the module docstring)."""

    _stock_class = RobertaEncoder


class FastBertEncoder(_UnpadEncoderMixin, BertEncoder):
    """``BertEncoder`` that runs its layers on unpadded tokens."""

    _stock_class = BertEncoder


class FastXLMRobertaEncoder(_UnpadEncoderMixin, XLMRobertaEncoder):
    """``XLMRobertaEncoder`` that runs its layers on unpadded tokens."""

    _stock_class = XLMRobertaEncoder


#: stock class -> fast class, for ``roberta_fast.patch``.
FAST_CLASSES: dict[type, type] = {
    RobertaEncoder: FastRobertaEncoder,
    BertEncoder: FastBertEncoder,
    XLMRobertaEncoder: FastXLMRobertaEncoder,
}
