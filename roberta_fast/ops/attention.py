"""Fused softmax attention: input checks, backend dispatch, custom ops and autograd.

Public functions: :func:`attention` (padded ``[B, L, heads, D]``) and :func:`attention_varlen`
(packed ``[total_tokens, heads, D]`` with ``cu_seqlens``).

Backends (chosen by :func:`roberta_fast.backends.resolve` for the tensors' device):

* ``"triton"``: the Triton kernels of :mod:`roberta_fast.triton.attention` (forward and backward),
  wrapped as the custom ops ``roberta_fast::attention_triton_fwd`` / ``attention_triton_bwd``.
* ``"cuda"``: the CUDA C++ forward ``roberta_fast::attention_fwd`` when it is built, the dtype is
  fp16/bf16, the head dim is one it supports and there is no dropout; gradients come from the
  Triton backward (same LSE convention). Anything else falls back to the Triton kernels.
* ``"cpu"``: the C++ kernels ``roberta_fast::attention_fwd`` / ``attention_bwd`` (blocked online
  softmax, matrix products through ATen's brgemm, bf16 on AMX tiles where the CPU has them) for
  fp32, bf16 and fp16, with in-kernel dropout drawing the Triton kernels' Philox mask; other dtypes
  (float64) go to :func:`torch.nn.functional.scaled_dot_product_attention`, whose dropout draws
  from torch's generator.
* ``"reference"``: :func:`roberta_fast.reference.attention.forward_native`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference.attention import forward_native, varlen_forward_native
from .. import backends
from ._common import new_seed

__all__ = ["attention", "attention_varlen"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 128
# Head dims the CUDA C++ forward is instantiated for.
_NATIVE_HEAD_DIMS = (32, 64, 128)


# --------------------------------------------------------------------------------------------
# Triton custom ops
# --------------------------------------------------------------------------------------------

def _lse_shape(q: Tensor, cu_seqlens: Optional[Tensor]) -> tuple[int, ...]:
    if cu_seqlens is None:
        batch, seqlen, heads, _ = q.shape
        return (batch, heads, seqlen)
    total, heads, _ = q.shape
    return (heads, total)


@torch.library.custom_op("roberta_fast::attention_triton_fwd", mutates_args=())
def _attention_triton_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                          cu_seqlens: Optional[Tensor], max_seqlen: int, scale: float,
                          dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Triton forward: ``(o, lse)``; ``lse`` is fp32 ``[B, heads, L]`` or ``[heads, total]``."""
    from ..triton import attention as kernels  # triton is imported only when it is used

    return kernels.attention_fwd(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale,
                                 dropout_p, seed)


@_attention_triton_fwd.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens), dtype=torch.float32)


@torch.library.custom_op("roberta_fast::attention_triton_bwd", mutates_args=())
def _attention_triton_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                          lse: Tensor, key_padding_mask: Optional[Tensor],
                          cu_seqlens: Optional[Tensor], max_seqlen: int, scale: float,
                          dropout_p: float, seed: Optional[Tensor]
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: ``(dq, dk, dv)`` from the forward's output, LSE and seed."""
    from ..triton import attention as kernels

    return kernels.attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens,
                                 max_seqlen, scale, dropout_p, seed)


@_attention_triton_bwd.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p,
      seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_fwd_context(ctx, inputs, output):
    q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens, seed)
    ctx.max_seqlen, ctx.scale, ctx.dropout_p = max_seqlen, scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, grad_out, grad_lse, bwd=_attention_triton_bwd):
    q, k, v, out, lse, key_padding_mask, cu_seqlens, seed = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = bwd(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, ctx.max_seqlen,
                     ctx.scale, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("roberta_fast::attention_triton_fwd", _fwd_backward,
                                setup_context=_setup_fwd_context)


if backends.native_module() is not None:  # the schemas come with _C
    @torch.library.register_fake("roberta_fast::attention_fwd")
    def _(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None):
        return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens), dtype=torch.float32)

    @torch.library.register_fake("roberta_fast::attention_bwd")
    def _(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, scale,
          dropout_p, seed):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _setup_native_context(ctx, inputs, output):
        _setup_fwd_context(ctx, inputs, output)
        # The C++ backward on the CPU; on CUDA (forward only in C++) the Triton backward, which
        # reads the same out and LSE.
        cpu = inputs[0].device.type == "cpu"
        ctx.bwd = torch.ops.roberta_fast.attention_bwd if cpu else _attention_triton_bwd

    def _native_fwd_backward(ctx, grad_out, grad_lse):
        return _fwd_backward(ctx, grad_out, grad_lse, ctx.bwd)

    torch.library.register_autograd("roberta_fast::attention_fwd", _native_fwd_backward,
                                    setup_context=_setup_native_context)


class _NativeForwardTritonBackward(torch.autograd.Function):
    """CUDA C++ forward (no dropout) with the Triton backward for gradients."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale):
        out, lse = torch.ops.roberta_fast.attention_fwd(q, k, v, key_padding_mask, cu_seqlens,
                                                        max_seqlen, scale)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _attention_triton_bwd(grad_out, q, k, v, out, lse, key_padding_mask,
                                           cu_seqlens, ctx.max_seqlen, ctx.scale, 0.0, None)
        return dq, dk, dv, None, None, None, None


# --------------------------------------------------------------------------------------------
# CPU: the C++ kernels, and torch SDPA for what they do not take (and as a baseline)
# --------------------------------------------------------------------------------------------

_CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.compiler.assume_constant_result
def _cpu_kernels_built() -> bool:
    # Loading _C is not traceable: under torch.compile the answer is a constant of the graph.
    return backends.has_native_op("attention_fwd", "cpu")


def _cpu_kernel_usable(q: Tensor) -> bool:
    """Whether the C++ CPU kernels take this call (float64 and builds without _C use SDPA)."""
    return q.dtype in _CPU_KERNEL_DTYPES and _cpu_kernels_built()


def _run_cpu_kernel(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                    cu_seqlens: Optional[Tensor], max_seqlen: int, dropout_p: float,
                    scale: float) -> Tensor:
    # The kernels read strided views (a fused projection's slices) as they are.
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    seed = new_seed(q.device) if dropout_p > 0.0 else None
    out, _ = torch.ops.roberta_fast.attention_fwd(q, k, v, key_padding_mask, cu_seqlens,
                                                  max_seqlen, scale, float(dropout_p), seed)
    return out


def _sdpa_padded(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                 dropout_p: float, scale: float) -> Tensor:
    attn_mask = None
    if key_padding_mask is not None:
        # A broadcast [B, 1, 1, L] mask: one that varies by query row costs SDPA a [B, L, L]
        # mask. A sequence with no real token would leave every key blocked and its rows NaN, so
        # its rows see all keys; padded rows are zeroed below, by a multiply (cheaper here than
        # masked_fill; the rows are finite for finite inputs).
        allowed = key_padding_mask | ~key_padding_mask.any(-1, keepdim=True)
        attn_mask = allowed[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    out = out.transpose(1, 2)
    if key_padding_mask is not None:
        out = out * key_padding_mask[:, :, None, None].to(out.dtype)
    return out.contiguous()


def _varlen_index(cu_seqlens: Tensor, max_seqlen: int, total: int) -> Tensor:
    """Row of each packed token in the padded ``[batch * max_seqlen]`` layout."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    batch = lengths.shape[0]
    seq_of_token = torch.repeat_interleave(torch.arange(batch, device=cu.device), lengths,
                                           output_size=total)
    pos = torch.arange(total, device=cu.device) - cu[seq_of_token]
    return seq_of_token * max_seqlen + pos


def _sdpa_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                 dropout_p: float, scale: float) -> Tensor:
    total, heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    rows = _varlen_index(cu_seqlens, max_seqlen, total)

    def pad(x: Tensor) -> Tensor:
        padded = x.new_zeros(batch * max_seqlen, heads, head_dim).index_copy(0, rows, x)
        return padded.view(batch, max_seqlen, heads, head_dim)

    mask = torch.zeros(batch * max_seqlen, dtype=torch.bool, device=q.device)
    mask[rows] = True
    out = _sdpa_padded(pad(q), pad(k), pad(v), mask.view(batch, max_seqlen), dropout_p, scale)
    return out.view(batch * max_seqlen, heads, head_dim)[rows]


def _zero_padded_keys(k: Tensor, v: Tensor, key_padding_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``k`` and ``v`` with the rows of padded tokens set to 0, so that a NaN or inf there
    cannot reach real rows (a zero probability times NaN is NaN; so is a masked multiply)."""
    real = key_padding_mask[:, :, None, None]
    return torch.where(real, k, 0.0), torch.where(real, v, 0.0)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def _check_qkv(q: Tensor, k: Tensor, v: Tensor, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"attention: {name} must be {layout}, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be a floating-point tensor, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError("attention: q, k and v must have the same shape (self-attention), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k and v must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}")
    if q.shape[-1] == 0:
        raise ValueError("attention: head dim must be at least 1")


def _check_common(dropout_p: float, scale: Optional[float], head_dim: int) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"attention: dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"attention: scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _check_key_padding_mask(mask: Tensor, q: Tensor) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError("attention: key_padding_mask must be a bool tensor [B, L] or None")
    if mask.dtype != torch.bool:
        raise TypeError(f"attention: key_padding_mask must be bool (True = real token), got "
                        f"{mask.dtype}")
    if tuple(mask.shape) != tuple(q.shape[:2]):
        raise ValueError(f"attention: key_padding_mask must be [B, L] = {tuple(q.shape[:2])}, got "
                         f"{tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"attention: key_padding_mask is on {mask.device}, q on {q.device}")


def _check_cu_seqlens(cu_seqlens: Tensor, max_seqlen: int, q: Tensor) -> None:
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError("attention_varlen: cu_seqlens must be an int32 tensor [batch + 1]")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"attention_varlen: cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError("attention_varlen: cu_seqlens must be 1-D with batch + 1 >= 2 entries, "
                         f"got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"attention_varlen: cu_seqlens is on {cu_seqlens.device}, q on "
                         f"{q.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)):
        raise TypeError(f"attention_varlen: max_seqlen must be an int, got "
                        f"{type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"attention_varlen: max_seqlen must be >= 0, got {max_seqlen}")
    # Value checks read cu_seqlens on the host: only where that costs no device sync and does
    # not break a compiled graph.
    if cu_seqlens.device.type != "cpu" or torch.compiler.is_compiling():
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"attention_varlen: cu_seqlens must start at 0, got {cu[0]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if min(lengths) < 0:
        raise ValueError("attention_varlen: cu_seqlens must be non-decreasing")
    if cu[-1] != q.shape[0]:
        raise ValueError(f"attention_varlen: cu_seqlens[-1] = {cu[-1]} must equal total_tokens "
                         f"= {q.shape[0]}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"attention_varlen: max_seqlen = {max_seqlen} is shorter than the "
                         f"longest sequence ({max(lengths)})")


def _check_gpu_kernel_input(q: Tensor, backend: str) -> None:
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"attention: the {backend} backend supports float16, bfloat16 and float32, "
                        f"got {q.dtype}; use the 'cpu' or 'reference' backend for it")
    if q.shape[-1] > _TRITON_MAX_HEAD_DIM:
        raise ValueError(f"attention: the {backend} backend supports head dims up to "
                         f"{_TRITON_MAX_HEAD_DIM}, got {q.shape[-1]}; use the 'cpu' backend "
                         f"(torch SDPA) for larger heads")
    if q.device.type == "cpu" and not backends.interpreting():
        raise RuntimeError("attention: the Triton kernels need CUDA tensors, or "
                           "TRITON_INTERPRET=1 (set before triton is imported) for CPU tensors")


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

def _native_forward_usable(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
    """Whether the CUDA C++ forward takes this call (else the Triton kernels do)."""

    if dropout_p != 0.0 or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if q.shape[-1] not in _NATIVE_HEAD_DIMS:
        return False
    # The C++ op has no fake implementation; compiled graphs use the Triton custom op.
    if torch.compiler.is_compiling():
        return False
    # The kernel loads 16-byte vectors: it needs the last dim contiguous, the other strides and
    # the start offset in multiples of 8 elements (allocations themselves are 256-byte aligned).
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.storage_offset() % 8 != 0:
            return False
        if any(st % 8 != 0 for st in t.stride()[:-1]):
            return False
    return backends.has_native_op("attention_fwd", "cuda")


def _run_kernels(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                 cu_seqlens: Optional[Tensor], max_seqlen: int, dropout_p: float, scale: float,
                 backend: str) -> Tensor:
    _check_gpu_kernel_input(q, backend)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    if backend == "cuda" and _native_forward_usable(q, k, v, dropout_p):
        return _NativeForwardTritonBackward.apply(q, k, v, key_padding_mask, cu_seqlens,
                                                  max_seqlen, scale)
    seed = new_seed(q.device) if dropout_p > 0.0 else None
    out, _ = _attention_triton_fwd(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale,
                                   float(dropout_p), seed)
    return out


def attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, scale: Optional[float] = None) -> Tensor:
    """Softmax self-attention ``softmax(q k^T * scale + key_padding) v`` per head, non-causal.

    Args:
        q, k, v: ``[B, L, heads, D]`` (the layout linear projections produce; any strides).
        key_padding_mask: optional bool ``[B, L]``, True = real token. Padded keys get no
            attention; padded query rows output zeros and get zero gradient. The values at
            padded positions do not affect the result as long as they are finite (a zero
            weight times inf or NaN is still NaN).
        dropout_p: dropout on the attention probabilities, used as given (pass 0.0 in eval).
        scale: defaults to ``D ** -0.5``.

    Returns:
        ``[B, L, heads, D]`` (contiguous) in the dtype of ``q``.

    The backend follows :func:`roberta_fast.use_backend` / ``ROBERTA_FAST_BACKEND`` / the device
    (see the module docstring). The GPU backends take fp16, bf16 and fp32 with ``D <= 128``;
    the ``"cuda"`` backend runs its C++ forward only for fp16/bf16, ``D`` in (32, 64, 128), no
    dropout, strides in multiples of 8 elements and outside ``torch.compile``, and the Triton
    kernels otherwise. The ``"cpu"`` backend runs its C++ kernels for fp32, bf16 and fp16 (any
    ``D``; dropout drawn in-kernel like the Triton kernels' mask) and SDPA for float64.
    """
    _check_qkv(q, k, v, 4, "[B, L, heads, D]")
    scale = _check_common(dropout_p, scale, q.shape[-1])
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, q)
    backend = backends.resolve(q.device)
    if backend in ("triton", "cuda"):
        return _run_kernels(q, k, v, key_padding_mask, None, q.shape[1], dropout_p, scale,
                            backend)
    if backend == "cpu" and _cpu_kernel_usable(q):  # reads only real keys: needs no zeroing
        return _run_cpu_kernel(q, k, v, key_padding_mask, None, q.shape[1], dropout_p, scale)
    if key_padding_mask is not None:
        k, v = _zero_padded_keys(k, v, key_padding_mask)
    if backend == "cpu":
        return _sdpa_padded(q, k, v, key_padding_mask, dropout_p, scale)
    if backend == "reference":
        drop = None
        if dropout_p > 0.0:
            batch, seqlen, heads, _ = q.shape
            drop = torch.rand(batch, heads, seqlen, seqlen, device=q.device) > dropout_p
        return forward_native(q, k, v, key_padding_mask, scale, drop, dropout_p).contiguous()
    raise ValueError(f"attention: unknown backend {backend!r}")


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *,
                     dropout_p: float = 0.0, scale: Optional[float] = None) -> Tensor:
    """Softmax self-attention over sequences packed end to end (no padding anywhere).

    Args:
        q, k, v: ``[total_tokens, heads, D]``.
        cu_seqlens: int32 ``[batch + 1]``, offsets of the sequences: sequence ``b`` is tokens
            ``cu_seqlens[b]:cu_seqlens[b + 1]``; starts at 0, non-decreasing, ends at
            ``total_tokens``.
        max_seqlen: at least the longest sequence; it sizes the launch grid and the dropout
            offsets (``Lmax``). Checked against ``cu_seqlens`` for CPU tensors only: on CUDA
            the check would cost a host sync.
        dropout_p, scale: as in :func:`attention`.

    Returns:
        ``[total_tokens, heads, D]`` (contiguous) in the dtype of ``q``.

    For the same data and seed the Triton and the cpu kernels draw the same dropout mask here
    as :func:`attention` with ``L = max_seqlen`` does.
    """
    _check_qkv(q, k, v, 3, "[total_tokens, heads, D]")
    scale = _check_common(dropout_p, scale, q.shape[-1])
    _check_cu_seqlens(cu_seqlens, max_seqlen, q)
    max_seqlen = int(max_seqlen)
    backend = backends.resolve(q.device)
    if backend in ("triton", "cuda"):
        return _run_kernels(q, k, v, None, cu_seqlens, max_seqlen, dropout_p, scale, backend)
    if q.shape[0] == 0:
        return q.new_zeros(q.shape)
    if backend == "cpu":
        if _cpu_kernel_usable(q):
            return _run_cpu_kernel(q, k, v, None, cu_seqlens, max_seqlen, dropout_p, scale)
        return _sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale)
    if backend == "reference":
        drop = None
        if dropout_p > 0.0:
            batch, heads = cu_seqlens.shape[0] - 1, q.shape[1]
            drop = torch.rand(batch, heads, max_seqlen, max_seqlen, device=q.device) > dropout_p
        return varlen_forward_native(q, k, v, cu_seqlens, scale, drop, dropout_p)
    raise ValueError(f"attention_varlen: unknown backend {backend!r}")
