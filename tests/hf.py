"""Tiny Hugging Face models, batches and comparisons for the tests that patch them, and what the
installed transformers release offers."""
from __future__ import annotations

import contextlib
import copy
import importlib
import random

import pytest
import torch
import transformers
from transformers.models.roberta.modeling_roberta import RobertaLayer

from roberta_fast.nn.encoder import layers_pass_kwargs
from roberta_fast.patch import patch as _patch
from tests.helpers import rel_err

#: Whether encoder layers pass keyword arguments on to their attention, which the unpadded
#: encoder needs (transformers 5.x; 4.x layers take a fixed list).
UNPAD_SUPPORTED = layers_pass_kwargs(RobertaLayer)


def patch(model, **options):
    """``roberta_fast.patch``, or a skip reported as not run when ``unpad=True`` is asked of a
    release whose layers cannot carry it (``patch`` raises there: see test_patch)."""
    if options.get("unpad") and not UNPAD_SUPPORTED:
        pytest.skip(f"NOT RUN: unpad=True needs transformers >= 5.0 "
                    f"(found {transformers.__version__})")
    return _patch(model, **options)


HEADS = ["Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
         "ForQuestionAnswering", "ForMultipleChoice"]
FAMILIES = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta", "bert": "Bert"}
VOCAB = 100
PAD = 1

OPTION_SETS = {
    "attention": dict(attention=True, layer_norm=False, mlm_loss=False),
    "layer_norm": dict(attention=False, layer_norm=True, mlm_loss=False),
    "mlm_loss": dict(attention=False, layer_norm=False, mlm_loss=True),
    "unpad": dict(attention=True, layer_norm=False, mlm_loss=False, unpad=True),
    "all": dict(),
    "all+unpad": dict(unpad=True),
}


def needs(options: dict, family: str = "roberta", head: str = "ForMaskedLM") -> None:
    """Skip, saying so, when an option's module (or its twin for ``family``) is not in this tree."""
    wanted = {"layer_norm": ("layer_norm_residual", "SelfOutput"),
              "mlm_loss": ("masked_lm_loss", "ForMaskedLM")}
    for option, (module, suffix) in wanted.items():
        if not options.get(option, True) or (option == "mlm_loss" and head != "ForMaskedLM"):
            continue  # mlm_loss only touches *ForMaskedLM models
        try:
            mod = importlib.import_module(f"roberta_fast.nn.{module}")
        except ImportError:
            pytest.skip(f"NOT RUN: roberta_fast.nn.{module} is not in this tree ({option}=True)")
        twin = f"Fast{FAMILIES[family]}{suffix}"
        if not hasattr(mod, twin):
            pytest.skip(f"NOT RUN: roberta_fast.nn.{module} has no {twin} ({option}=True)")


def make_config(family: str, *, dropout: float = 0.0, impl: str = "sdpa", num_labels: int = 3,
                **over):
    hidden, heads = random.choice([(32, 2), (48, 4), (64, 4)])
    cls = getattr(transformers, f"{FAMILIES[family]}Config")
    kwargs = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2,
                  num_attention_heads=heads, intermediate_size=2 * hidden,
                  max_position_embeddings=64, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout, pad_token_id=PAD, num_labels=num_labels,
                  attn_implementation=impl)
    kwargs.update(over)
    return cls(**kwargs)


def make_model(family: str, head: str, **config_kwargs):
    cls = getattr(transformers, f"{FAMILIES[family]}{head}")
    if head == "ForQuestionAnswering":
        config_kwargs.setdefault("num_labels", 2)  # start and end logits
    return cls(make_config(family, **config_kwargs))


def make_batch(head: str, *, batch: int = 3, seqlen: int = 11, pad: bool = True,
               choices: int = 2) -> dict:
    """Random ids with right padding (a full row, a length-1 row) and labels for ``head``."""
    shape = (batch * choices, seqlen) if head == "ForMultipleChoice" else (batch, seqlen)
    lengths = torch.randint(2, seqlen + 1, (shape[0],))
    if pad:
        lengths[0], lengths[-1] = seqlen, 1
    else:
        lengths[:] = seqlen
    mask = (torch.arange(seqlen)[None] < lengths[:, None]).long()
    ids = torch.randint(3, VOCAB, shape)
    ids[:, 0] = 0
    ids[mask == 0] = PAD
    out = {"input_ids": ids, "attention_mask": mask}
    if head == "ForMaskedLM":
        labels = torch.where(torch.rand(shape) < 0.3, ids, torch.full_like(ids, -100))
        labels[mask == 0] = -100
        labels[0, 1] = ids[0, 1]  # at least one masked token
        out["labels"] = labels
    elif head == "ForSequenceClassification":
        out["labels"] = torch.randint(0, 3, (batch,))
    elif head == "ForTokenClassification":
        labels = torch.randint(0, 3, shape)
        labels[mask == 0] = -100
        out["labels"] = labels
    elif head == "ForQuestionAnswering":
        out["start_positions"] = (torch.rand(batch) * lengths).long()
        out["end_positions"] = (torch.rand(batch) * lengths).long()
    elif head == "ForMultipleChoice":
        out = {k: v.view(batch, choices, seqlen) for k, v in out.items()}
        out["labels"] = torch.randint(0, choices, (batch,))
    return out


def real_positions(batch: dict) -> torch.Tensor:
    return batch["attention_mask"].bool()


def objective(model, batch: dict, **kwargs):
    """Forward; a scalar to differentiate (the loss, or a fixed projection of real outputs, taken
    in float64 so that only the model's own rounding differs between runs)."""
    out = model(**batch, **kwargs)
    if getattr(out, "loss", None) is not None:
        return out, out.loss
    hidden = out.last_hidden_state
    real = real_positions(batch)[..., None].to(hidden.device)
    gen = torch.Generator().manual_seed(0)  # same projection for every model of one case
    weight = torch.randn(hidden.shape, generator=gen).to(hidden.device, torch.float64)
    value = (hidden.double() * real * weight).sum() + out.pooler_output.double().sum()
    return out, value


def _check(name: str, got, want, base, tol: float, factor: float = 2.0,
           abs_floor: float = 0.0) -> None:
    """``got`` (fast) against ``want`` (stock, fp64): at most twice the stock model's own error
    ``base`` in the same regime plus ``tol`` (the form of tests.helpers.assert_close: sums over
    many positions, such as the token-type embedding gradient, cancel and lose relative precision
    in any fp32 run, and a ratio of two such errors alone is noisy)."""
    err, base_err = rel_err(got, want), rel_err(base, want)
    tol = tol + abs_floor / max(float(want.double().norm()), 1e-300)
    if got.numel() == 1 and got.dtype in (torch.float16, torch.bfloat16):
        # One half-precision number (a loss): its error is a single sample, not a norm over many,
        # and the last rounding alone is up to half an ulp in either model; the stock model's
        # error may land near 0 by chance. One ulp of floor.
        tol = max(tol, torch.finfo(got.dtype).eps)
    assert err < factor * base_err + tol, (
        f"{name}: rel err {err:.2e} (stock in the same regime: {base_err:.2e}, tol {tol:.0e})")


def compare(stock, fast, batch: dict, *, tol: float = 1e-5, check_logits: bool = True,
            regime=contextlib.nullcontext, loss_scale: float = 1.0, grad_floor: float = 1e-5,
            **kwargs):
    """Forward + backward of both models against the stock model run in float64: losses,
    real-position outputs and every parameter gradient agree.

    ``regime`` (a context-manager factory, such as ``lambda: torch.autocast("cpu", bf16)``) wraps
    the forward of the stock and the patched model, not the float64 reference; ``loss_scale``
    multiplies the value before backward, as a ``GradScaler`` does, and is divided out of the
    gradients. ``tol`` is the relative floor of every comparison, ``grad_floor`` an absolute one
    for parameter gradients, as a fraction of the largest gradient.
    """
    ref = copy.deepcopy(stock).double()
    outs, grads = [], []
    for model, context, scale in ((ref, contextlib.nullcontext, 1.0), (stock, regime, loss_scale),
                                  (fast, regime, loss_scale)):
        model.zero_grad(set_to_none=True)
        with context():
            out, value = objective(model, batch, **kwargs)
        assert torch.isfinite(value)
        (value * scale).backward()
        outs.append((out, value))
        grads.append({n: (p.grad.double() / scale if p.grad is not None
                          else torch.zeros_like(p, dtype=torch.float64))
                      for n, p in model.named_parameters()})
    (out_r, val_r), (out_s, val_s), (out_f, val_f) = outs
    _check("loss/objective", val_f, val_r, val_s, tol)
    real = real_positions(batch).to(val_r.device)
    for key in ("last_hidden_state", "logits", "start_logits", "end_logits"):
        a, b, r = (getattr(o, key, None) for o in (out_f, out_s, out_r))
        if a is None or b is None or not check_logits or a.shape != b.shape:
            continue
        if a.dim() >= real.dim() and a.shape[:real.dim()] == real.shape:
            a, b, r = a[real], b[real], r[real]
        _check(key, a, r, b, tol)
    g_ref, g_stock, g_fast = grads
    scale = max(float(g.norm()) for g in g_ref.values())
    assert scale > 0
    for name, want in g_ref.items():
        assert g_fast[name].isfinite().all(), f"grad {name} is not finite"
        if float(want.norm()) < 1e-7 * scale:
            # Vanishes in exact arithmetic (the key bias; the multiple-choice classifier bias):
            # judged against the largest gradient, next to the stock fp32 model's own noise.
            # The floor is 1e-4 of the largest gradient: such a gradient is a sum of terms that
            # cancel (the choice probabilities minus one-hot), so its float32 value is rounding
            # noise of those terms; stock sometimes lands on exactly 0, the patched model on
            # 1.1e-5 of the largest gradient in one run. A wrong gradient is of the terms' size.
            err = float((g_fast[name] - want).norm()) / scale
            base_err = float((g_stock[name] - want).norm()) / scale
            assert err < 2 * base_err + max(tol, 1e-4, 10 * grad_floor), (
                f"grad {name}: {err:.2e} of the largest gradient (stock: {base_err:.2e})")
        else:
            # A parameter gradient is a sum over every token; the packed (unpadded) path sums in
            # another order than stock, and its error measured 2.0-2.3x stock's on cancelling bias
            # gradients over repeated runs, so gradients get 3x.
            # An absolute floor (1e-5 of the largest gradient in fp32) too: the smallest
            # gradients (norm ~1e-3 of the largest) are the most cancelling sums, and the ratio of
            # two such rounding errors reached 3.3x in about one case in 10^4.
            _check(f"grad {name}", g_fast[name], want, g_stock[name], tol, factor=3.0,
                   abs_floor=grad_floor * scale)
    return out_s, out_f


def stock_and_patched(family, head, options=None, **config_kwargs):
    stock = make_model(family, head, **config_kwargs).eval()
    fast = patch(copy.deepcopy(stock), **(options or {}))
    return stock, fast


def skip_if_stock_fails(stock, batch: dict) -> None:
    """Some transformers releases ship heads that fail on their own (5.0.0's
    XLMRobertaForMultipleChoice reads a pooler output it never builds): nothing to compare."""
    try:
        with torch.no_grad():
            stock(**batch)
    except (IndexError, AttributeError, TypeError) as exc:
        pytest.skip(f"NOT RUN: the stock {type(stock).__name__} fails in transformers "
                    f"{transformers.__version__}: {type(exc).__name__}: {exc}")


def batch_for(head):
    # QA losses run a softmax over every position, padding included, and padded positions are
    # where the patched model's values differ; its loss is compared on unpadded batches.
    return make_batch(head, pad=head != "ForQuestionAnswering")
