"""Fused residual + LayerNorm (+ dropout): ``layer_norm(dropout(x) + residual)`` in one pass.

This is the end of every RoBERTa/BERT attention and feed-forward block. The op checks its inputs,
picks a backend (``roberta_fast.backends.resolve``), flattens to ``[rows, H]`` and runs

- ``cuda``: the native op ``torch.ops.roberta_fast.layer_norm_residual_fwd`` on CUDA tensors,
- ``cpu``: the same native op on CPU tensors,
- ``triton``: ``torch.ops.roberta_fast.layer_norm_residual_triton_fwd``,
- ``reference``: ``reference.layer_norm_residual.forward_native`` with a torch-drawn mask.

Mixed precision: under ``torch.autocast`` the op does what ``F.layer_norm`` does there (fp32 on
CUDA, the inputs' dtype on CPU); the modules (``roberta_fast.nn.layer_norm_residual``) add x and
the residual in their common dtype, as the stock ``LayerNorm(x + residual)`` does.

Every kernel backend takes a dropout seed tensor (drawn only when dropout is active, never read on
the host) and regenerates the same mask in the backward, which recomputes ``s`` instead of storing
it; only fp32 mean/rstd are saved besides the inputs. Autograd and fake (meta) implementations are
registered here for the native and the Triton ops.
"""
from __future__ import annotations

import math

import torch

from .. import backends
from ..reference.layer_norm_residual import forward_native
from ._common import check_dropout_p, check_float, check_same, new_seed

__all__ = ["fused_residual_layer_norm"]

# The CUDA kernels keep a row in registers up to this size (see csrc/cuda/layer_norm_residual.cu);
# longer rows go to Triton under "auto".
CUDA_MAX_HIDDEN = 8192

_NATIVE_FWD = "roberta_fast::layer_norm_residual_fwd"
_NATIVE_BWD = "roberta_fast::layer_norm_residual_bwd"

try:  # Triton is optional at import time; the backend check says why it cannot run
    from ..triton import layer_norm_residual as _triton_kernels
except ImportError:  # pragma: no cover - triton is a dependency
    _triton_kernels = None


def _setup_context(ctx, inputs, output):
    x, residual, weight, _bias, _eps, dropout_p, seed = inputs
    _y, mean, rstd = output
    ctx.dropout_p = dropout_p
    ctx.save_for_backward(x, residual, weight, mean, rstd, seed)


def _make_backward(bwd_op):
    def backward(ctx, dy, _dmean, _drstd):
        x, residual, weight, mean, rstd, seed = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        dres, dx, dweight, dbias = bwd_op(dy.contiguous(), x, residual, weight, mean, rstd,
                                          ctx.dropout_p, seed)
        if ctx.dropout_p == 0.0:
            dx = dres  # no dropout: d/dx == d/dresidual, computed once
        return dx, dres, dweight, dbias, None, None, None

    return backward


def _fake_fwd(x, residual, weight, bias, eps, dropout_p, seed):
    rows = x.shape[0]
    return (torch.empty_like(x), x.new_empty(rows, dtype=torch.float32),
            x.new_empty(rows, dtype=torch.float32))


def _fake_bwd(dy, x, residual, weight, mean, rstd, dropout_p, seed):
    dx = torch.empty_like(x) if dropout_p > 0.0 else x.new_empty(0)
    return torch.empty_like(x), dx, torch.empty_like(weight), torch.empty_like(weight)


def _register_native() -> bool:
    """Fake impls and autograd for the native ops; False when ``_C`` is not built."""
    if backends.native_module() is None or not hasattr(torch.ops.roberta_fast,
                                                       "layer_norm_residual_fwd"):
        return False
    torch.library.register_fake(_NATIVE_FWD)(_fake_fwd)
    torch.library.register_fake(_NATIVE_BWD)(_fake_bwd)
    torch.library.register_autograd(
        _NATIVE_FWD, _make_backward(torch.ops.roberta_fast.layer_norm_residual_bwd),
        setup_context=_setup_context)
    return True


_HAS_NATIVE = _register_native()

if _triton_kernels is not None:
    torch.library.register_autograd(
        "roberta_fast::layer_norm_residual_triton_fwd",
        _make_backward(_triton_kernels.layer_norm_residual_triton_bwd),
        setup_context=_setup_context)


def _validate(x, residual, weight, bias, eps, dropout_p) -> float:
    check_float("x", x)
    check_float("residual", residual)
    check_float("weight", weight)
    check_float("bias", bias)
    check_same({"x": x, "residual": residual})
    check_same({"x": x, "weight": weight, "bias": bias}, dtype=False)
    check_same({"weight": weight, "bias": bias})
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"weight/bias must have x's dtype ({x.dtype}) or float32; got "
                        f"{weight.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape "
                         f"{tuple(x.shape)}")
    hidden = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (hidden,):
            raise ValueError(f"{name} must have shape ({hidden},) to match x's last dimension; "
                             f"got {tuple(t.shape)}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return check_dropout_p(dropout_p)


# The backend choice reads a ContextVar and the environment, which torch.compile cannot trace:
# under compile it is made once, when the graph is traced, and kept as a constant.
@torch.compiler.assume_constant_result
def _pick_backend(device_type: str, hidden: int) -> str:
    backend = backends.resolve(device_type)
    if backend == "cuda" and hidden > CUDA_MAX_HIDDEN:
        if backends.current() != "auto":
            raise ValueError(f"the cuda backend takes H <= {CUDA_MAX_HIDDEN}, got H = {hidden}; "
                             "use the triton backend")
        backend = "triton" if backends.available_backends()["triton"].startswith("ok") \
            else "reference"
    if backend in ("cuda", "cpu") and not _HAS_NATIVE:  # pragma: no cover - resolve checks _C
        raise backends.BackendUnavailableError("roberta_fast._C has no layer_norm_residual op")
    return backend


def fused_residual_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor, eps: float = 1e-5, *, dropout_p: float = 0.0,
                              training: bool = False) -> torch.Tensor:
    """``layer_norm(dropout(x) + residual)`` over the last dimension, in one fused kernel.

    Args:
        x, residual: ``[..., H]`` tensors of one float dtype (float32, float16, bfloat16) and
            device; non-contiguous inputs are copied to contiguous ones.
        weight, bias: ``[H]``, of x's dtype or float32.
        eps: added to the variance (> 0).
        dropout_p: dropout probability on ``x`` in [0, 1); applied only when ``training``.
        training: dropout is active iff ``training and dropout_p > 0``.

    Returns ``y`` of x's shape and dtype. Differentiable in x, residual, weight and bias; the
    backward regenerates the forward's dropout mask from its seed. Statistics are fp32.

    Under ``torch.autocast`` the op follows ``F.layer_norm``: on CUDA every input is cast to fp32
    and ``y`` is fp32; on CPU nothing is cast (``y`` in x's dtype, with fp32 statistics).
    """
    if (isinstance(x, torch.Tensor) and x.device.type == "cuda"
            and torch.is_autocast_enabled("cuda")):
        # F.layer_norm's autocast policy on CUDA: computed and returned in fp32 (on CPU autocast
        # leaves it alone, and so does this op).
        x, residual, weight, bias = (t.float() if isinstance(t, torch.Tensor)
                                     and t.is_floating_point() else t
                                     for t in (x, residual, weight, bias))
    p = _validate(x, residual, weight, bias, eps, dropout_p)
    p = p if training else 0.0
    hidden = x.shape[-1]
    backend = _pick_backend(x.device.type, hidden)
    if backend == "reference":
        mask = torch.rand(x.shape, device=x.device) > p if p > 0.0 else None
        return forward_native(x, residual, weight, bias, float(eps), mask, p)
    shape = x.shape
    x2 = x.reshape(-1, hidden).contiguous()
    r2 = residual.reshape(-1, hidden).contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous()
    seed = new_seed(x.device) if p > 0.0 else None
    if backend == "triton":
        op = torch.ops.roberta_fast.layer_norm_residual_triton_fwd
    else:
        op = torch.ops.roberta_fast.layer_norm_residual_fwd
    y, _mean, _rstd = op(x2, r2, weight, bias, float(eps), p, seed)
    return y.view(shape)
