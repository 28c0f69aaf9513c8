"""Drop-in self-attention for Hugging Face RoBERTa, XLM-RoBERTa and BERT encoders.

``FastRobertaSelfAttention.convert(module)`` swaps the class of a stock ``RobertaSelfAttention``
instance in place (likewise ``FastBertSelfAttention`` / ``FastXLMRobertaSelfAttention``). The
module keeps its ``query`` / ``key`` / ``value`` Linear layers and every attribute, so the
state_dict is unchanged, and it stays an instance of the stock class, so Hugging Face's output
hooks and ``isinstance`` checks keep working.

The fast forward projects q, k, v to ``[B, L, heads, D]`` and runs ``ops.attention`` with a
``[B, L]`` key-padding mask. That mask is taken from the form of what arrives, never from its
values: None (nothing padded) or a 2-D ``[B, L]`` bool / integer mask. The patched base model
(``roberta_fast.nn.encoder``) hands its layers exactly that, the caller's 2-D ``attention_mask``
as a bool tensor, instead of the 4-D mask the stock model builds; ``flash_attention_*`` passes a
2-D mask too. So the forward never waits for the device, and ``torch.compile`` (fullgraph) and
``torch.export`` trace it without a data-dependent branch.

The three projections run as one ``[3H, H]`` matmul (:func:`project_qkv`); q, k and v are
strided views of its output. The input is read once, one GEMM launches instead of three, and the
backward's input gradient is one GEMM rather than three plus two additions. The parameters stay
the stock ``query`` / ``key`` / ``value`` Linear layers (state_dict, optimizers, tying and
sharding see no change). With gradients, their weights are concatenated on each call (autograd
splits the weight gradient back into views, no copy); without gradients (``no_grad``,
``inference_mode``) the concatenated weight, already in the autocast dtype under autocast, is
kept per module and rebuilt only when a parameter changes (its version counter or storage), so
inference pays no copy at all. That cache holds one ``[3H, H]`` weight per layer beside the
parameters.

Mixed precision: under ``torch.autocast`` the projection produces q, k, v in the autocast dtype,
as the stock module's three Linear layers do, and the fused op runs in that dtype with its softmax statistics in
fp32 (what SDPA does under autocast); the output keeps that dtype.

Packed input: when the caller passes Hugging Face's ``cu_seq_lens_q`` (and optionally
``max_length_q``) keyword arguments with hidden states of shape ``[1, T, H]``, each sequence
attends only to itself through ``ops.attention_varlen``. The unpadded encoder mode
(``roberta_fast.nn.encoder``) uses this.

The stock forward runs instead (documented fallbacks, same results as before the swap) when:

- attention probabilities are requested (``output_attentions``, or ``config.output_attentions``
  through Hugging Face's output collector): the fused kernels never materialize them;
- a key/value cache, cross-attention states or a head mask is passed;
- the position embeddings are not ``absolute`` (transformers 4.x's relative ones);
- the module is causal (decoder configs);
- the mask is not a key-padding mask by construction: a 4-D mask (causal, arbitrary, or a
  padding mask some caller expanded to 4-D), a flex-attention ``BlockMask``, a float 2-D mask.
  No mask is inspected on the device to find out whether it happens to be a padding mask.

When the stock forward runs on a 2-D key-padding mask, it gets the additive ``[B, 1, 1, L]`` bias
its eager / sdpa implementations expect (:func:`stock_attention_mask`).

Outputs at padded query positions are zeros here, where the stock module computes values that no
real token ever reads; everything at real positions, losses and gradients match.
"""
from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import Any, Callable

import torch
from torch import nn

from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.roberta.modeling_roberta import RobertaSelfAttention
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaSelfAttention

from .. import backends as _backends

__all__ = [
    "FastRobertaSelfAttention",
    "FastBertSelfAttention",
    "FastXLMRobertaSelfAttention",
    "key_padding_mask_from_attention_mask",
    "stock_attention_mask",
    "attentions_requested",
    "needs_stock_forward",
    "backend_scope",
    "ClassSwapMixin",
    "SavesAsStockMixin",
    "forward_in_stock_signature",
    "project_qkv",
]

def _op(name: str):
    """``roberta_fast.ops.<name>`` as a callable, looked up at call time."""
    import importlib

    from .. import ops

    fn = getattr(ops, name, None)
    if not callable(fn):  # not re-exported by the package: take it from its own module
        try:
            fn = getattr(importlib.import_module(f"{ops.__name__}.attention"), name)
        except (ImportError, AttributeError) as exc:
            raise RuntimeError(f"roberta_fast.ops.{name} is not available ({exc}); the fast "
                               "attention module needs it") from exc
    return fn


# module -> (key, weight, bias): the concatenated q/k/v parameters for forwards without
# gradients. Kept beside the modules (not in them) so that state_dict, deepcopy and pickling of a
# patched model never carry it.
_QKV_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _qkv_parameters(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    linears = (module.query, module.key, module.value)
    return [m.weight for m in linears], [m.bias for m in linears]


def _cached_qkv(module: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated weight and bias for a forward without gradients (see module docstring)."""
    weights, biases = _qkv_parameters(module)
    dtype = weights[0].dtype
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)  # what F.linear would cast to, once
    key = (dtype, tuple((p.data_ptr(), p._version) for p in (*weights, *biases)))
    hit = _QKV_CACHE.get(module)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    with torch.no_grad():
        weight = torch.cat(weights).to(dtype)
        bias = torch.cat(biases).to(dtype)
    _QKV_CACHE[module] = (key, weight, bias)
    return weight, bias


def project_qkv(module: nn.Module, x: torch.Tensor, heads: int, head_dim: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``module.query(x)``, ``module.key(x)``, ``module.value(x)`` as ``[..., heads, head_dim]``
    views of one ``[..., 3, heads, head_dim]`` product (see the module docstring)."""
    weights, biases = _qkv_parameters(module)
    if any(b is None for b in biases):  # not a stock configuration: three plain projections
        shape = (*x.shape[:-1], heads, head_dim)
        return module.query(x).view(shape), module.key(x).view(shape), module.value(x).view(shape)
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        weight, bias = torch.cat(weights), torch.cat(biases)
    else:
        weight, bias = _cached_qkv(module, x.device)
    out = nn.functional.linear(x, weight, bias)
    return out.view(*x.shape[:-1], 3, heads, head_dim).unbind(-3)


def backend_scope(module: nn.Module):
    """A context that pins the backend stored on ``module`` (``auto`` follows the global choice)."""
    name = getattr(module, "_roberta_fast_backend", "auto")
    if name == "auto":
        return contextlib.nullcontext()
    return _backends.use_backend(name)


try:  # looked up once: a failing import inside a compiled forward would break its graph
    from transformers.utils.output_capturing import _active_collector as _COLLECTOR
except ImportError:  # older or newer transformers without this mechanism
    _COLLECTOR = None


def _active_collector() -> dict | None:
    """The dict Hugging Face's ``capture_outputs`` is filling during this forward, if any."""
    collector = _COLLECTOR
    if collector is None:
        return None
    if torch.compiler.is_compiling():
        # Under torch.compile transformers keeps the collector in a plain attribute (ContextVar
        # reads break the graph), set only when a compiled forward started collecting.
        got = collector.global_var if getattr(collector, "compiling", False) else None
    else:
        got = collector.get()
    return got if isinstance(got, dict) else None


def attentions_requested(kwargs: dict[str, Any]) -> bool:
    """Whether this forward must produce attention probabilities.

    True when ``output_attentions`` is passed down, or when Hugging Face's output collector is
    recording ``attentions`` (``config.output_attentions=True`` arrives that way).
    """
    if kwargs.get("output_attentions"):
        return True
    collected = _active_collector()
    return collected is not None and "attentions" in collected


def key_padding_mask_from_attention_mask(attention_mask: Any, batch: int, seqlen: int
                                         ) -> tuple[bool, torch.Tensor | None]:
    """The ``[B, L]`` key-padding mask (True = real token) a mask stands for, read from its form.

    Returns ``(usable, mask)``. Only masks that are key-padding masks by construction are usable:
    None (nothing padded: ``mask`` is None) and a 2-D ``[B, L]`` bool or integer mask (nonzero =
    real token), which is what the patched base model hands its layers. Anything else (a 4-D
    mask, a float mask, a flex-attention ``BlockMask``, another shape) is not: its values are
    never read, so nothing here waits for the device or depends on data.
    """
    if attention_mask is None:
        return True, None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return False, None
    if tuple(attention_mask.shape) != (batch, seqlen):
        return False, None
    if attention_mask.dtype == torch.bool:
        return True, attention_mask
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        return False, None
    return True, attention_mask != 0


def stock_attention_mask(module: nn.Module, attention_mask: Any, hidden_states: torch.Tensor
                         ) -> Any:
    """The mask to hand the stock forward of ``module`` when it runs instead of the fast path.

    A 2-D key-padding mask (what the patched base model passes) becomes the additive
    ``[B, 1, 1, L]`` bias the eager and sdpa attention of every supported transformers release
    takes (0 for real keys, the dtype's minimum for padding), built on the device without reading
    it. The flash-attention implementations take the 2-D mask as it is; any other mask passes
    through unchanged.
    """
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        return attention_mask
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None) or "eager"
    if impl.startswith("flash"):
        return attention_mask
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    dtype = hidden_states.dtype if hidden_states.is_floating_point() else torch.float32
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    bias = bias.masked_fill(~keep, torch.finfo(dtype).min)
    return bias[:, None, None, :]


class ClassSwapMixin:
    """``convert`` / ``revert`` by swapping an instance's class in place.

    The fast class subclasses the stock one and adds no parameters or buffers, so the instance
    keeps its weights (same tensor objects), state_dict keys, hooks and ``isinstance`` identity.
    """

    _stock_class: type = nn.Module  # set by each concrete class

    @classmethod
    def convert(cls, module: nn.Module, *, backend: str = "auto") -> nn.Module:
        """Swap ``module`` (an instance of the stock class) to this class in place; return it.

        ``backend`` pins the op backend for this module (``auto`` follows the global choice).
        Converting a module that is already of this class only updates ``backend``.
        """
        stock = cls._stock_class
        if type(module) is not cls:
            if type(module) is not stock:
                raise TypeError(f"{cls.__name__}.convert expects a {stock.__module__}."
                                f"{stock.__name__}; got {type(module).__module__}."
                                f"{type(module).__name__}")
            module.__class__ = cls
        module._roberta_fast_backend = backend
        return module

    @classmethod
    def revert(cls, module: nn.Module) -> nn.Module:
        """Swap a converted module back to the stock class in place; return it."""
        if type(module) is cls:
            module.__class__ = cls._stock_class
            module.__dict__.pop("_roberta_fast_backend", None)
        return module


def forward_in_stock_signature(cls: type, impl: Callable) -> tuple[str, ...]:
    """Give ``cls`` a ``forward`` that calls ``impl(self, *args, **kwargs)`` and shows the
    signature of ``cls._stock_class.forward``; return the names that signature takes positionally.

    The stock signature differs between transformers releases (4.x has ``head_mask`` fifth), so
    it is read, not written out; what inspects it sees the stock one: the ``Trainer`` (which keeps
    only the dataset columns ``forward`` names) and ``torch.export`` (which binds inputs by it).
    """
    signature = inspect.signature(cls._stock_class.forward)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def forward(self, *args, **kwargs):
        return impl(self, *args, **kwargs)

    forward.__signature__ = signature
    forward.__doc__ = impl.__doc__
    cls.forward = forward
    return tuple(p.name for p in list(signature.parameters.values())[1:] if p.kind in kinds)


class SavesAsStockMixin:
    """``save_pretrained`` of a swapped Hugging Face model, run as its stock class.

    ``config.json`` names the architecture after the model's class, and it must be the stock one
    for stock transformers (and pipelines, and the hub) to read the model back.
    """

    _stock_class: type

    def save_pretrained(self, *args, **kwargs):
        fast = type(self)
        stock = fast._stock_class
        self.__class__ = stock
        try:
            return stock.save_pretrained(self, *args, **kwargs)
        finally:
            self.__class__ = fast


# What a caller may pass that the fused path cannot honour; any of them set (not None) sends the
# call to the stock forward. The key/value cache is ``past_key_values`` up to transformers 5.23
# and ``cache`` from 5.24 (``past_key_value`` in 4.x).
_STOCK_ONLY_ARGS = ("cache", "past_key_values", "past_key_value", "encoder_hidden_states",
                    "encoder_attention_mask", "head_mask")


def needs_stock_forward(args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a call must take the stock path: a cache, cross-attention, a head mask or attention
    probabilities asked for, by keyword or among the positional ``args`` after the mask (whose
    order differs between transformers releases, so any set one counts)."""
    if any(a is not None and a is not False for a in args):
        return True
    return (any(kwargs.get(name) is not None for name in _STOCK_ONLY_ARGS)
            or attentions_requested(kwargs))


class _FastSelfAttentionMixin(ClassSwapMixin):
    """The forward shared by the fast self-attention classes.

    Only ``hidden_states`` and ``attention_mask`` are named: the rest of the stock signature
    changed between transformers releases, and passes through untouched to the stock forward.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        stock = super().forward  # the replaced class's forward, next in the MRO
        if getattr(self, "is_causal", False) or getattr(self, "is_decoder", False):
            return stock(hidden_states, attention_mask, *args, **kwargs)
        if (getattr(self, "position_embedding_type", "absolute") != "absolute"
                or needs_stock_forward(args, kwargs)):
            return stock(hidden_states, stock_attention_mask(self, attention_mask, hidden_states),
                         *args, **kwargs)

        dropout_p = self.dropout.p if self.training else 0.0
        scale = getattr(self, "scaling", self.attention_head_size ** -0.5)
        heads, head_dim = self.num_attention_heads, self.attention_head_size

        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is not None:
            return self._forward_packed(hidden_states, attention_mask, cu_seqlens, kwargs,
                                        dropout_p, scale), None

        if hidden_states.dim() != 3:
            raise ValueError(f"{type(self).__name__} expects hidden_states [batch, seqlen, hidden]; "
                             f"got shape {tuple(hidden_states.shape)}")
        batch, seqlen, _ = hidden_states.shape
        usable, key_padding = key_padding_mask_from_attention_mask(attention_mask, batch, seqlen)
        if not usable:
            return stock(hidden_states, attention_mask, *args, **kwargs)

        q, k, v = project_qkv(self, hidden_states, heads, head_dim)
        with backend_scope(self):
            out = _op("attention")(q, k, v, key_padding_mask=key_padding, dropout_p=dropout_p,
                                   scale=scale)
        return out.reshape(batch, seqlen, heads * head_dim), None

    def _forward_packed(self, hidden_states, attention_mask, cu_seqlens, kwargs, dropout_p,
                        scale) -> torch.Tensor:
        """Sequences packed end to end in ``[1, T, H]`` (or ``[T, H]``), bounded by ``cu_seqlens``."""
        if attention_mask is not None:
            raise ValueError("cu_seq_lens_q marks packed sequences, so attention_mask must be None; "
                             "pass one or the other")
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and cu_k is not cu_seqlens and not torch.equal(cu_k, cu_seqlens):
            raise ValueError("cu_seq_lens_k differs from cu_seq_lens_q; self-attention needs them "
                             "equal")
        if hidden_states.dim() == 3 and hidden_states.shape[0] == 1:
            lead = (1,)
        elif hidden_states.dim() == 2:
            lead = ()
        else:
            raise ValueError("packed sequences (cu_seq_lens_q given) need hidden_states of shape "
                             f"[1, total_tokens, hidden]; got {tuple(hidden_states.shape)}")
        total = hidden_states.shape[-2]
        max_seqlen = kwargs.get("max_length_q")
        if cu_seqlens.dtype != torch.int32:
            cu_seqlens = cu_seqlens.to(torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        max_seqlen = int(max_seqlen)
        if dropout_p > 0.0:
            # max_seqlen may exceed the longest sequence: a multiple of 4 puts every row of
            # dropout offsets (stride max_seqlen) on a Philox counter boundary, so the GPU kernels
            # draw one Philox call per four elements instead of one per element.
            max_seqlen = (max_seqlen + 3) // 4 * 4
        heads, head_dim = self.num_attention_heads, self.attention_head_size
        x = hidden_states.reshape(total, hidden_states.shape[-1])
        q, k, v = project_qkv(self, x, heads, head_dim)
        with backend_scope(self):
            out = _op("attention_varlen")(q, k, v, cu_seqlens, max_seqlen,
                                          dropout_p=dropout_p, scale=scale)
        return out.reshape(*lead, total, heads * head_dim)



class FastRobertaSelfAttention(_FastSelfAttentionMixin, RobertaSelfAttention):
    """``RobertaSelfAttention`` whose forward runs ``roberta_fast.ops.attention``.

    See the module docstring for when it runs the stock forward instead.
    """

    _stock_class = RobertaSelfAttention


class FastBertSelfAttention(_FastSelfAttentionMixin, BertSelfAttention):
    """``BertSelfAttention`` whose forward runs ``roberta_fast.ops.attention``."""

    _stock_class = BertSelfAttention


class FastXLMRobertaSelfAttention(_FastSelfAttentionMixin, XLMRobertaSelfAttention):
    """``XLMRobertaSelfAttention`` whose forward runs ``roberta_fast.ops.attention``."""

    _stock_class = XLMRobertaSelfAttention


#: stock class -> fast class, for ``roberta_fast.patch``.
FAST_CLASSES: dict[type, type] = {
    RobertaSelfAttention: FastRobertaSelfAttention,
    BertSelfAttention: FastBertSelfAttention,
    XLMRobertaSelfAttention: FastXLMRobertaSelfAttention,
}


def _sdpa_twins() -> None:
    """Transformers 4.x picks a ``*SdpaSelfAttention`` subclass for ``attn_implementation="sdpa"``
    (its default); each one that exists gets a fast twin too, so ``patch`` never skips it."""
    import importlib

    for family in ("roberta", "bert", "xlm_roberta"):
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        for name, stock in vars(module).items():
            if (name.endswith("SdpaSelfAttention") and isinstance(stock, type)
                    and stock.__module__ == module.__name__):
                fast = type(f"Fast{name}", (_FastSelfAttentionMixin, stock), {
                    "_stock_class": stock, "__module__": __name__,
                    "__doc__": f"``{name}`` whose forward runs ``roberta_fast.ops.attention``."})
                FAST_CLASSES[stock] = globals()[fast.__name__] = fast  # found by name: pickle


_sdpa_twins()
