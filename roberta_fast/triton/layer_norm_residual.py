"""Triton kernels of fused residual + LayerNorm (+ dropout): ``y = layer_norm(dropout(x) + residual)``.

Forward: one row per program, the whole row in one block (BLOCK = next power of two >= H).
Backward: each program loops over a contiguous range of rows, recomputing s = dropout(x) + residual
from the seed (the forward stores only mean/rstd), and writes its partial dweight/dbias row
``[programs, H]`` in fp32; the partials are summed afterwards (no atomics).

Dropout: element ``o = row * H + col`` is kept iff the uniform float of word ``o & 3`` of
``tl.randint4x(seed, o >> 2)`` is > p, the rule of the CPU and CUDA kernels too
(csrc/common/philox.h). When ``H % 4 == 0`` (every RoBERTa size) one Philox call serves four
elements, as there; otherwise each element computes its counter's four words.

The kernels are exposed as the custom ops ``roberta_fast::layer_norm_residual_triton_fwd`` and
``..._bwd`` (autograd is registered in ``roberta_fast.ops.layer_norm_residual``).
"""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import backends
from . import launch_context


@triton.jit
def _round_bf16(v):
    """fp32 -> the nearest-even bfloat16 value, still as fp32. The interpreter's fp32 -> bf16 cast
    truncates where the GPU rounds to nearest even; rounding first makes that cast exact."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = (bits >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _uniform(seed, offs, row_base, BLOCK: tl.constexpr, ALIGNED4: tl.constexpr):
    """Uniform floats of the elements ``offs`` (``row_base + arange(BLOCK)``): word ``o & 3`` of
    Philox counter ``o >> 2`` (csrc/common/philox.h)."""
    if ALIGNED4:
        # row_base is a multiple of 4, so counters row_base / 4 + i cover elements 4i .. 4i + 3
        # in word order: one Philox call per four elements, its words interleaved into place.
        r0, r1, r2, r3 = tl.randint4x(seed, (row_base >> 2) + tl.arange(0, BLOCK // 4))
        bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    else:
        # Rows that start mid-counter: every element computes its counter's four words.
        r0, r1, r2, r3 = tl.randint4x(seed, offs >> 2)
        word = offs & 3
        bits = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return tl.uint_to_uniform_float(bits)


@triton.jit
def _fwd_kernel(X, R, W, B, Y, Mean, Rstd, Seed, H, eps, p,
                HAS_DROPOUT: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
                ALIGNED4: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    offs = row * H + cols  # int64: also the dropout counter
    x = tl.load(X + offs, mask=inside, other=0.0).to(tl.float32)
    r = tl.load(R + offs, mask=inside, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
        keep = _uniform(seed, offs, row * H, BLOCK, ALIGNED4) > p
        x = tl.where(keep, x * (1.0 / (1.0 - p)), 0.0)
    s = x + r
    mean = tl.sum(s, axis=0) / H
    d = tl.where(inside, s - mean, 0.0)
    var = tl.sum(d * d, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=inside, other=0.0).to(tl.float32)
    y = d * rstd * w + b
    if ROUND_BF16:
        y = _round_bf16(y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=inside)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _bwd_kernel(DY, X, R, W, Mean, Rstd, Seed, DRes, DX, DWPart, DBPart, rows, H, rows_per_prog,
                p, HAS_DROPOUT: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
                ALIGNED4: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < H
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_prog  # int64 rows: row * H may pass 2**31
    row_end = tl.minimum(row_start + rows_per_prog, rows)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    for row in range(row_start, row_end):
        offs = row * H + cols
        x = tl.load(X + offs, mask=inside, other=0.0).to(tl.float32)
        r = tl.load(R + offs, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=inside, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = _uniform(seed, offs, row * H, BLOCK, ALIGNED4) > p
            x = tl.where(keep, x * (1.0 / (1.0 - p)), 0.0)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(inside, (x + r - mean) * rstd, 0.0)
        g = dy * w
        a = tl.sum(g, axis=0) / H
        c = tl.sum(g * xhat, axis=0) / H
        ds = rstd * (g - a - xhat * c)
        if ROUND_BF16:
            tl.store(DRes + offs, _round_bf16(ds).to(DRes.dtype.element_ty), mask=inside)
        else:
            tl.store(DRes + offs, ds.to(DRes.dtype.element_ty), mask=inside)
        if HAS_DROPOUT:
            dx = tl.where(keep, ds * (1.0 / (1.0 - p)), 0.0)
            if ROUND_BF16:
                dx = _round_bf16(dx)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=inside)
        dw += dy * xhat
        db += dy
    tl.store(DWPart + pid * H + cols, dw, mask=inside)
    tl.store(DBPart + pid * H + cols, db, mask=inside)


def _round_bf16_by_hand(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and backends.interpreting()


def _aligned4(hidden: int, block: int) -> bool:
    """Whether every row starts on a Philox counter (H % 4 == 0), so that one call serves four
    elements (the block then spans whole counters too)."""
    return hidden % 4 == 0 and block >= 4


def _num_warps(block: int) -> int:
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    if block >= 1024:
        return 4
    return 2


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bwd_programs(rows: int, device: torch.device) -> int:
    if rows == 0:
        return 0
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else
                               torch.cuda.current_device())
    else:
        target = 4  # the interpreter runs programs one after another: keep the grid small
    return min(rows, target)


def _check_2d(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or residual.shape != x.shape:
        raise ValueError(f"layer_norm_residual_triton: x and residual must be one 2-D shape, got "
                         f"{tuple(x.shape)} and {tuple(residual.shape)}")
    if weight.shape != (x.shape[1],):
        raise ValueError(f"layer_norm_residual_triton: weight must have shape ({x.shape[1]},), "
                         f"got {tuple(weight.shape)}")


@torch.library.custom_op("roberta_fast::layer_norm_residual_triton_fwd", mutates_args=())
def layer_norm_residual_triton_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor, eps: float, dropout_p: float,
                                   seed: Optional[torch.Tensor]
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward on contiguous ``[rows, H]`` tensors: ``(y, mean, rstd)``, mean/rstd fp32."""
    _check_2d(x, residual, weight)
    rows, hidden = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    has_dropout = dropout_p > 0.0
    if has_dropout and seed is None:
        raise ValueError("layer_norm_residual_triton: dropout_p > 0 needs a seed tensor")
    if rows > 0:
        block = triton.next_power_of_2(hidden)
        with launch_context(x):
            _fwd_kernel[(rows,)](x, residual, weight, bias, y, mean, rstd,
                                 seed if has_dropout else mean, hidden, eps, dropout_p,
                                 HAS_DROPOUT=has_dropout, ROUND_BF16=_round_bf16_by_hand(x),
                                 BLOCK=block, ALIGNED4=_aligned4(hidden, block),
                                 num_warps=_num_warps(block))
    return y, mean, rstd


@layer_norm_residual_triton_fwd.register_fake
def _(x, residual, weight, bias, eps, dropout_p, seed):
    rows = x.shape[0]
    return (torch.empty_like(x), x.new_empty(rows, dtype=torch.float32),
            x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("roberta_fast::layer_norm_residual_triton_bwd", mutates_args=())
def layer_norm_residual_triton_bwd(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                                   weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                                   dropout_p: float, seed: Optional[torch.Tensor]
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor]:
    """Backward: ``(dresidual, dx, dweight, dbias)``; dx is empty when dropout is off (it equals
    dresidual then, and a custom op may not return aliased outputs)."""
    _check_2d(x, residual, weight)
    rows, hidden = x.shape
    has_dropout = dropout_p > 0.0
    if has_dropout and seed is None:
        raise ValueError("layer_norm_residual_triton: dropout_p > 0 needs a seed tensor")
    dres = torch.empty_like(x)
    dx = torch.empty_like(x) if has_dropout else x.new_empty(0)
    programs = _bwd_programs(rows, x.device)
    if programs == 0:
        zeros = torch.zeros_like(weight)
        return dres, dx, zeros, zeros.clone()
    rows_per_prog = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_prog)
    dw_part = torch.empty(programs, hidden, dtype=torch.float32, device=x.device)
    db_part = torch.empty(programs, hidden, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(hidden)
    with launch_context(x):
        _bwd_kernel[(programs,)](dy, x, residual, weight, mean, rstd,
                                 seed if has_dropout else mean, dres, dx if has_dropout else dres,
                                 dw_part, db_part, rows, hidden, rows_per_prog, dropout_p,
                                 HAS_DROPOUT=has_dropout, ROUND_BF16=_round_bf16_by_hand(x),
                                 BLOCK=block, ALIGNED4=_aligned4(hidden, block),
                                 num_warps=_num_warps(block))
    return dres, dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


@layer_norm_residual_triton_bwd.register_fake
def _(dy, x, residual, weight, mean, rstd, dropout_p, seed):
    dx = torch.empty_like(x) if dropout_p > 0.0 else x.new_empty(0)
    return torch.empty_like(x), dx, torch.empty_like(weight), torch.empty_like(weight)

