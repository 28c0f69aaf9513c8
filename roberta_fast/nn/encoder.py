"""The entry of the encoder: how the key-padding mask reaches the layers, and the unpadded mode.

Two kinds of modules are swapped in (each keeps the stock class as its base, adds no parameters):

``FastRobertaModel`` (likewise ``FastBertModel`` / ``FastXLMRobertaModel``), the base model, takes
the key-padding mask from what the caller passed: the 2-D ``attention_mask`` at the model's entry
(None: nothing padded). For an encoder config whose self-attention modules are all fast ones and
whose attention implementation is ``eager`` or ``sdpa``, that mask (as a bool ``[B, L]`` tensor)
is what the layers receive instead of the 4-D mask stock builds: the fast attention reads it
from its form alone (``roberta_fast.nn.attention``), so no forward inspects a mask on the device,
and ``torch.compile`` / ``torch.export`` trace it without a data-dependent branch. Anything else
(a decoder, cross-attention inputs, a 4-D or float mask from the caller, ``flex_attention``) gets
the stock masks and, in the attention, the stock path. Transformers 5.x builds the masks in
``_create_attention_masks``, which the twin overrides (the stock 4-D mask is then never built,
nor its own "is anything padded?" device check run). Transformers 4.x builds them inline in
``forward``; there the twin's forward leaves the 2-D mask on the encoder for this call, and the
encoder passes it to its layers in place of the 4-D one. Either way the mask is an argument of
every layer call, so gradient checkpointing recomputes a layer with the same mask.

``FastRobertaEncoder`` (likewise ``FastBertEncoder`` / ``FastXLMRobertaEncoder``) does that
hand-over on 4.x and, with ``unpad=True``, runs the unpadded mode: its forward packs the real
tokens of the batch into ``[1, T, H]`` (``T`` = number of real tokens), runs every layer on them,
and scatters the result back to ``[B, L, H]`` with zeros at the padding. Only real tokens pass
through the Linear layers, the LayerNorms and the feed-forward; attention sees each sequence on
its own through ``ops.attention_varlen``. Packing needs two numbers on the host, the total of real
tokens (it sizes every packed tensor) and the longest row (it sizes the attention's grid): they
are read in one device sync per forward (``roberta_fast.nn.padding.unpad_input``).

The layers learn the packing through Hugging Face's own keyword arguments for packed sequences
(``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k``), which the stock
layer forwards to its self-attention untouched. Keyword arguments are bound into the checkpointed
call by Hugging Face's gradient checkpointing, so the recomputation sees the same packing.
The self-attention modules must be the fast ones (``roberta_fast.nn.attention``): the stock
attention would let packed sequences attend to each other. ``output_hidden_states`` still
returns padded ``[B, L, H]`` tensors for every layer.

The padded forward runs instead of the unpadded one when no key-padding mask reached the encoder
(no mask, or one the fast path does not take), when the mask pads nothing or leaves nothing,
when attention probabilities are requested, for decoder use (cross-attention, key/value cache,
causal configs), with ``chunk_size_feed_forward`` (its chunks would split the packed tokens),
when some layer's self-attention is not a fast one, and under ``torch.export`` (packing has
data-dependent shapes; the exported program runs the padded path, whose results at real positions
are the same).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
from transformers.models.bert.modeling_bert import BertEncoder, BertModel
from transformers.models.roberta.modeling_roberta import RobertaEncoder, RobertaModel
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaEncoder, XLMRobertaModel

from .attention import (
    ClassSwapMixin,
    SavesAsStockMixin,
    _active_collector,
    _FastSelfAttentionMixin,
    forward_in_stock_signature,
    key_padding_mask_from_attention_mask,
    needs_stock_forward,
)
from .padding import pad_input, unpad_input

__all__ = ["FastRobertaModel", "FastBertModel", "FastXLMRobertaModel", "FastRobertaEncoder",
           "FastBertEncoder", "FastXLMRobertaEncoder", "MODEL_CLASSES", "FAST_CLASSES",
           "layers_pass_kwargs"]

# Transformers 5.x builds the attention masks in a method of the base model; 4.x inline in forward.
_MASKS_IN_METHOD = hasattr(RobertaModel, "_create_attention_masks")
# Attention implementations whose stock masks the 2-D key-padding mask may replace: the fast
# attention's stock fallback turns it back into the bias they take (``stock_attention_mask``).
_ENTRY_IMPLEMENTATIONS = ("eager", "sdpa")
# Where the 4.x base model leaves the key-padding mask for its encoder, for one forward.
_ENTRY_ATTR = "_roberta_fast_entry_mask"


def layers_pass_kwargs(layer_cls: type) -> bool:
    """Whether an encoder layer class's forward takes ``**kwargs`` (and so can hand the packing
    arguments on to its attention): transformers 5.x layers do, 4.x layers do not."""
    params = inspect.signature(layer_cls.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _register_recordable_outputs(model) -> None:
    """Transformers 5.x looks up what a model can record (hidden states, attentions) in a registry
    keyed by the model's class, filled when a model is built: enter the swapped class too."""
    value = getattr(model, "_can_record_outputs", None)
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:
        try:  # the first 5.x releases: a plain dict keyed by the class's name
            from transformers.utils.generic import _CAN_RECORD_REGISTRY
        except ImportError:  # 4.x: no registry
            return
        _CAN_RECORD_REGISTRY[str(type(model))] = value
        return
    _CAN_RECORD_REGISTRY[model] = value


class _FastModelMixin(SavesAsStockMixin, ClassSwapMixin):
    """The base model's part: the caller's 2-D mask becomes the layers' key-padding mask."""

    @classmethod
    def convert(cls, module, *, backend: str = "auto"):
        module = super().convert(module, backend=backend)
        _register_recordable_outputs(module)
        return module

    def _entry_key_padding(self, attention_mask, batch: int, seqlen: int,
                           encoder_hidden_states=None, encoder_attention_mask=None
                           ) -> tuple[bool, torch.Tensor | None]:
        """``(usable, key-padding mask or None)`` for this forward, from the forms of the
        arguments and the model's structure alone (no device work beyond ``mask != 0``)."""
        config = self.config
        if (getattr(config, "is_decoder", False) or encoder_hidden_states is not None
                or encoder_attention_mask is not None
                or getattr(config, "_attn_implementation", None) not in _ENTRY_IMPLEMENTATIONS):
            return False, None
        if not all(isinstance(layer.attention.self, _FastSelfAttentionMixin)
                   for layer in self.encoder.layer):
            return False, None
        return key_padding_mask_from_attention_mask(attention_mask, batch, seqlen)

    def _create_attention_masks(self, attention_mask=None, encoder_attention_mask=None,
                                embedding_output=None, encoder_hidden_states=None, **kwargs):
        """Transformers 5.x: the 2-D key-padding mask (or None) for the layers when the fast path
        takes it, else the stock masks."""
        batch, seqlen = embedding_output.shape[:2]
        usable, key_padding = self._entry_key_padding(attention_mask, batch, seqlen,
                                                      encoder_hidden_states, encoder_attention_mask)
        if usable:
            return key_padding, None
        return super()._create_attention_masks(
            attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask,
            embedding_output=embedding_output, encoder_hidden_states=encoder_hidden_states,
            **kwargs)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not _MASKS_IN_METHOD:
            cls._forward_names = forward_in_stock_signature(cls, _FastModelMixin._forward_4x)

    def _forward_4x(self, *args, **kwargs):
        """Transformers 4.x: the stock forward, with the caller's key-padding mask left on the
        encoder for this call (the stock 4-D mask is still built, and not read)."""
        stock = type(self)._stock_class.forward
        named = {**dict(zip(self._forward_names, args)), **kwargs}
        ids, embeds = named.get("input_ids"), named.get("inputs_embeds")
        shape = ids.shape if ids is not None else (
            embeds.shape[:-1] if embeds is not None else None)
        usable = shape is not None and len(shape) == 2
        if usable:
            usable, key_padding = self._entry_key_padding(
                named.get("attention_mask"), shape[0], shape[1],
                named.get("encoder_hidden_states"), named.get("encoder_attention_mask"))
        if not usable:
            return stock(self, *args, **kwargs)
        self.encoder.__dict__[_ENTRY_ATTR] = (key_padding,)
        try:
            return stock(self, *args, **kwargs)
        finally:
            self.encoder.__dict__.pop(_ENTRY_ATTR, None)


class FastRobertaModel(_FastModelMixin, RobertaModel):
    """``RobertaModel`` that hands the caller's 2-D mask to its layers as the key-padding mask
    (see the module docstring)."""

    _stock_class = RobertaModel


class FastBertModel(_FastModelMixin, BertModel):
    """``BertModel`` that hands the caller's 2-D mask to its layers as the key-padding mask."""

    _stock_class = BertModel


class FastXLMRobertaModel(_FastModelMixin, XLMRobertaModel):
    """``XLMRobertaModel`` that hands the caller's 2-D mask to its layers as the key-padding
    mask."""

    _stock_class = XLMRobertaModel


class _FastEncoderMixin(ClassSwapMixin):
    """The forward shared by the fast encoders: the 4.x mask hand-over, then the unpadded mode
    when it is on (``unpad``) and applies, else the stock forward.

    Only ``hidden_states`` and ``attention_mask`` are named: the rest of the stock signature
    (the cache's name, ``cache_position``) changed between transformers releases and passes
    through untouched to the stock forward.
    """

    @classmethod
    def convert(cls, module, *, backend: str = "auto", unpad: bool = False):
        """Swap a stock encoder to this class in place; ``unpad`` turns the unpadded mode on."""
        if unpad:
            # Packing reaches the self-attention only through the layers' **kwargs, which
            # transformers 4.x layers do not take: refuse rather than run packed sequences
            # through stock attention.
            first = next(iter(getattr(module, "layer", [])), None)
            if first is not None and not layers_pass_kwargs(type(first)):
                import transformers

                raise ValueError(
                    f"unpad=True needs encoder layers that pass keyword arguments on to their "
                    f"attention (transformers >= 5.0); {type(first).__name__}.forward of "
                    f"transformers {transformers.__version__} does not. Pass unpad=False")
        module = super().convert(module, backend=backend)
        module._roberta_fast_unpad = bool(unpad)
        return module

    @classmethod
    def revert(cls, module):
        module.__dict__.pop("_roberta_fast_unpad", None)
        return super().revert(module)

    def _can_unpad(self, hidden_states, args, kwargs) -> bool:
        if (not getattr(self, "_roberta_fast_unpad", False) or torch.compiler.is_exporting()
                or needs_stock_forward(args, kwargs) or getattr(self.config, "is_decoder", False)
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
        entry = self.__dict__.pop(_ENTRY_ATTR, None)  # transformers 4.x: the caller's mask
        if entry is not None:
            attention_mask = entry[0]

        def padded():
            return stock(hidden_states, attention_mask, *args, **kwargs)

        if not self._can_unpad(hidden_states, args, kwargs):
            return padded()
        batch, seqlen, _ = hidden_states.shape
        usable, key_padding = key_padding_mask_from_attention_mask(attention_mask, batch, seqlen)
        if not usable or key_padding is None:
            return padded()
        packed, indices, cu_seqlens, max_seqlen = unpad_input(hidden_states, key_padding)
        if max_seqlen == 0 or packed.shape[0] == batch * seqlen:
            return padded()  # nothing real in the whole batch, or nothing padded: no packing

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


class FastRobertaEncoder(_FastEncoderMixin, RobertaEncoder):
    """``RobertaEncoder`` that takes the key-padding mask from its base model (transformers 4.x)
    and, with ``unpad``, runs its layers on unpadded tokens (see the module docstring)."""

    _stock_class = RobertaEncoder


class FastBertEncoder(_FastEncoderMixin, BertEncoder):
    """``BertEncoder`` with the fast mask hand-over and the unpadded mode."""

    _stock_class = BertEncoder


class FastXLMRobertaEncoder(_FastEncoderMixin, XLMRobertaEncoder):
    """``XLMRobertaEncoder`` with the fast mask hand-over and the unpadded mode."""

    _stock_class = XLMRobertaEncoder


#: stock base model class -> fast class, for ``roberta_fast.patch``.
MODEL_CLASSES: dict[type, type] = {
    RobertaModel: FastRobertaModel,
    BertModel: FastBertModel,
    XLMRobertaModel: FastXLMRobertaModel,
}

#: stock encoder class -> fast class, for ``roberta_fast.patch``.
FAST_CLASSES: dict[type, type] = {
    RobertaEncoder: FastRobertaEncoder,
    BertEncoder: FastBertEncoder,
    XLMRobertaEncoder: FastXLMRobertaEncoder,
}
