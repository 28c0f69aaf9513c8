"""Swap the fast modules into a Hugging Face RoBERTa / XLM-RoBERTa / BERT model, and back.

``patch(model)`` changes one model instance in place (never the ``transformers`` classes): each
stock submodule that has a fast twin gets its class swapped to the twin, a subclass of the stock
class that adds no parameters. Weights stay the same tensor objects, so state_dict keys and values,
``save_pretrained`` output and optimizers created before the patch are unaffected.
``unpatch(model)`` swaps every class back.

What each option swaps:

- ``attention``: every ``*SelfAttention`` -> ``roberta_fast.nn.attention`` (``ops.attention``),
  and the base model (``RobertaModel`` / ``BertModel`` / ``XLMRobertaModel``, the model itself or
  its ``roberta`` / ``bert`` submodule) and its ``*Encoder`` -> ``roberta_fast.nn.encoder``, which
  hand the caller's 2-D ``attention_mask`` to the attention as its key-padding mask (no mask is
  inspected on the device).
- ``layer_norm``: every ``*SelfOutput`` / ``*Output`` -> ``roberta_fast.nn.layer_norm_residual``
  (``ops.fused_residual_layer_norm``).
- ``mlm_loss``: a ``*ForMaskedLM`` model -> ``roberta_fast.nn.masked_lm_loss`` (the loss on masked
  tokens only; ``mlm_logits`` says which logits it still returns). Ignored for other heads.
- ``unpad``: the encoder's unpadded mode (padding removed once at the encoder's entry; needs
  ``attention=True``).
"""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from . import backends as _backends

__all__ = ["patch", "unpatch", "is_patched"]

_RECORD = "_roberta_fast_patch"
_MLM_LOGITS = ("masked", "full", "none")


def _load(module_name: str):
    """The module ``roberta_fast.nn.<module_name>``, or None with the reason when it cannot load."""
    try:
        return importlib.import_module(f"roberta_fast.nn.{module_name}"), ""
    except ImportError as exc:
        return None, str(exc)


def _twins(module) -> dict[type, type]:
    """Stock transformers class -> fast class, from a module's ``FAST_CLASSES`` or its classes."""
    table = getattr(module, "FAST_CLASSES", None)
    if isinstance(table, dict):
        return dict(table)
    found: dict[type, type] = {}
    for obj in vars(module).values():
        if not (isinstance(obj, type) and obj.__module__ == module.__name__
                and callable(getattr(obj, "convert", None))):
            continue
        for base in obj.__mro__[1:]:
            if base.__module__.startswith("transformers."):
                found.setdefault(base, obj)
                break
    return found


def _fast_family(twins: dict[type, type]) -> dict[type, type]:
    """Also map each fast class to itself, so already-swapped modules are recognized."""
    out = dict(twins)
    out.update({fast: fast for fast in twins.values()})
    return out


def _stock_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _BackendHook:
    """Forward pre-hook + always-called forward hook that run a model's forward on one backend."""

    def __init__(self, name: str):
        self.name = name
        self._stack: list = []

    def enter(self, module, args):
        ctx = _backends.use_backend(self.name)
        ctx.__enter__()
        self._stack.append(ctx)

    def exit(self, module, args, output):
        if self._stack:
            self._stack.pop().__exit__(None, None, None)

    def __getstate__(self):  # contexts in flight are not state
        return {"name": self.name, "_stack": []}


def _check_options(attention, layer_norm, mlm_loss, unpad, backend, mlm_logits) -> dict[str, Any]:
    for name, value in (("attention", attention), ("layer_norm", layer_norm),
                        ("mlm_loss", mlm_loss), ("unpad", unpad)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    backend = backend.strip().lower()
    with _backends.use_backend(backend):  # unknown names and unusable backends raise here
        pass
    if mlm_logits not in _MLM_LOGITS:
        raise ValueError(f"mlm_logits must be one of {_MLM_LOGITS}, got {mlm_logits!r}")
    if unpad and not attention:
        raise ValueError("unpad=True needs attention=True: the stock attention would let the "
                         "packed sequences attend to each other")
    return dict(attention=attention, layer_norm=layer_norm, mlm_loss=mlm_loss, unpad=unpad,
                backend=backend, mlm_logits=mlm_logits)


def _plan(model: nn.Module, options: dict[str, Any]) -> list[tuple[str, Any]]:
    """Everything to swap, as (module name, converter); raises before anything is changed."""
    from .nn import attention as attention_mod
    from .nn import encoder as encoder_mod

    attention_twins = _fast_family(attention_mod.FAST_CLASSES)
    encoder_twins = _fast_family(encoder_mod.FAST_CLASSES)
    model_twins = _fast_family(encoder_mod.MODEL_CLASSES)

    modules = dict(model.named_modules())
    encoders = [n for n, m in modules.items() if type(m) in encoder_twins]
    if not encoders:
        supported = ", ".join(sorted(c.__name__ for c in attention_mod.FAST_CLASSES))
        raise TypeError(
            f"roberta_fast.patch cannot patch a {type(model).__module__}.{type(model).__name__}: "
            f"it holds no RoBERTa, XLM-RoBERTa or BERT encoder (looked for the modules around "
            f"{supported}). Pass a transformers Roberta*/XLMRoberta*/Bert* model")

    plan: list[tuple[str, Any]] = []
    if options["attention"]:
        for name, m in modules.items():
            if type(m) in attention_twins:
                plan.append((name, attention_twins[type(m)].convert))
            elif type(m) in model_twins:
                plan.append((name, model_twins[type(m)].convert))
        for name in encoders:
            plan.append((name, lambda m, _c=encoder_twins[type(modules[name])].convert:
                         _c(m, unpad=options["unpad"])))

    if options["layer_norm"]:
        ln_mod, why = _load("layer_norm_residual")
        if ln_mod is None:
            raise RuntimeError(f"layer_norm=True needs roberta_fast.nn.layer_norm_residual, which "
                               f"does not load ({why}); pass layer_norm=False")
        ln_twins = _fast_family(_twins(ln_mod))
        for enc in encoders:
            for layer_name, layer in modules[enc].layer.named_children():
                base = f"{enc}.layer.{layer_name}"
                for sub in ("attention.output", "output"):
                    name = f"{base}.{sub}"
                    m = modules.get(name)
                    if m is None:
                        continue
                    if type(m) not in ln_twins:
                        raise TypeError(f"layer_norm=True: no fast twin for {name} "
                                        f"({_stock_name(type(m))}); pass layer_norm=False")
                    plan.append((name, ln_twins[type(m)].convert))

    if options["mlm_loss"]:
        mlm_mod, why = _load("masked_lm_loss")
        mlm_twins = _fast_family(_twins(mlm_mod)) if mlm_mod is not None else {}
        is_mlm = type(model).__name__.endswith("ForMaskedLM") or type(model) in mlm_twins
        if is_mlm:
            if mlm_mod is None:
                raise RuntimeError(f"mlm_loss=True needs roberta_fast.nn.masked_lm_loss, which "
                                   f"does not load ({why}); pass mlm_loss=False")
            if type(model) not in mlm_twins:
                raise TypeError(f"mlm_loss=True: no fast twin for {_stock_name(type(model))}; "
                                "pass mlm_loss=False")
            fast = mlm_twins[type(model)]
            plan.append(("", lambda m, _f=fast: _f.convert(m, logits=options["mlm_logits"])))

    return plan


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` carries a ``roberta_fast.patch`` that ``unpatch`` would undo."""
    return isinstance(getattr(model, _RECORD, None), dict)


def patch(model: nn.Module, *, attention: bool = True, layer_norm: bool = True,
          mlm_loss: bool = True, unpad: bool = False, backend: str = "auto",
          mlm_logits: str = "masked") -> nn.Module:
    """Swap roberta_fast's modules into a Hugging Face encoder model, in place.

    Works on ``RobertaModel`` / ``XLMRobertaModel`` / ``BertModel`` and their heads (``ForMaskedLM``,
    ``ForSequenceClassification``, ``ForTokenClassification``, ``ForQuestionAnswering``,
    ``ForMultipleChoice``, ...): anything built around one of their encoders.

    Args:
        model: the model; changed in place.
        attention: fused attention in every self-attention module.
        layer_norm: fused residual + LayerNorm after attention and after the feed-forward.
        mlm_loss: for a ``*ForMaskedLM`` model, the masked-token-only LM head and loss.
        unpad: remove padding once at the encoder's entry and run every layer on real tokens only
            (needs ``attention``).
        backend: pin the ops of the patched model to ``cuda`` / ``triton`` / ``cpu`` /
            ``reference``; ``auto`` follows ``roberta_fast.use_backend`` and the environment.
        mlm_logits: with ``mlm_loss``, which logits the model still returns: ``masked`` (only the
            masked positions), ``full`` (all of them) or ``none``.

    Returns:
        ``model``.

    Patching a patched model with the same options does nothing; with other options it is
    unpatched and patched again with the new ones. Nothing is changed when the model cannot be
    patched: the ``TypeError`` / ``ValueError`` / ``RuntimeError`` says what was found.

    Padded positions of the outputs (``last_hidden_state``, ``hidden_states``, token logits) hold
    values that differ from the stock model's (zeros, or values computed from zeros); real
    positions, losses and gradients match.

    The patched model runs wherever the stock one does: under ``torch.autocast`` (computing what
    stock computes there), ``torch.inference_mode`` / ``torch.no_grad``, ``torch.compile`` (one
    graph without ``unpad``) and ``torch.export``; its padded forward and backward never wait for
    the device (README, "Regimes").
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"roberta_fast.patch needs a torch.nn.Module (a transformers model); got "
                        f"{type(model).__module__}.{type(model).__name__}")
    options = _check_options(attention, layer_norm, mlm_loss, unpad, backend, mlm_logits)
    record = getattr(model, _RECORD, None)
    if isinstance(record, dict):
        if record["options"] == options:
            return model
        # Validate the new plan on a stock view first so a bad option changes nothing.
        _plan_on_unpatched(model, record, options)
        unpatch(model)
    plan = _plan(model, options)

    before = {name: type(m) for name, m in model.named_modules()}
    try:
        for name, convert in plan:
            module = model.get_submodule(name) if name else model
            convert(module)
    except BaseException:
        for name, m in model.named_modules():  # never leave the model half patched
            if name in before:
                m.__class__ = before[name]
        raise

    swapped = {name: before[name] for name, m in model.named_modules()
               if name in before and type(m) is not before[name]}
    for name in swapped:
        module = model.get_submodule(name) if name else model
        module._roberta_fast_backend = options["backend"]
    hooks = []
    if options["backend"] != "auto":
        # The pin covers every op in the model's forward, the fast modules of all kinds included.
        pin = _BackendHook(options["backend"])
        hooks = [model.register_forward_pre_hook(pin.enter).id,
                 model.register_forward_hook(pin.exit, always_call=True).id]
    object.__setattr__(model, _RECORD, {"options": options, "classes": swapped, "hooks": hooks})
    return model


def _plan_on_unpatched(model: nn.Module, record: dict, options: dict[str, Any]) -> None:
    """Raise if ``options`` could not be applied once ``model`` is unpatched; change nothing."""
    current = {name: type(m) for name, m in model.named_modules()}
    try:
        for name, cls in record["classes"].items():
            (model.get_submodule(name) if name else model).__class__ = cls
        _plan(model, options)
    finally:
        for name, m in model.named_modules():
            if name in current:
                m.__class__ = current[name]


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` in place: every swapped module gets its stock class back.

    Weights are untouched (the same tensors), so what was trained while patched stays. A model that
    is not patched is returned unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"roberta_fast.unpatch needs a torch.nn.Module; got "
                        f"{type(model).__module__}.{type(model).__name__}")
    record = getattr(model, _RECORD, None)
    if not isinstance(record, dict):
        return model
    # Hook ids rather than handles are kept so that a deep copy of the model unpatches itself.
    for hook_id in record.get("hooks", []):
        for table in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_always_called"):
            getattr(model, table, {}).pop(hook_id, None)
    for name, cls in record["classes"].items():
        module = model.get_submodule(name) if name else model
        module.__class__ = cls
        for attr in ("_roberta_fast_backend", "_roberta_fast_unpad"):
            module.__dict__.pop(attr, None)
    del model.__dict__[_RECORD]
    return model
