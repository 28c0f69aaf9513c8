"""Fused softmax attention in Triton: FlashAttention-2 style forward and backward.

Layouts (no transposes anywhere):

* padded: ``q, k, v`` are ``[B, L, heads, D]``; an optional ``key_padding_mask`` ``[B, L]`` (bool,
  True = real token) hides padded keys and zeroes padded query rows. LSE is ``[B, heads, L]``.
* varlen: ``q, k, v`` are ``[total_tokens, heads, D]`` with sequences packed end to end and
  described by ``cu_seqlens`` (int32 ``[batch + 1]``). LSE is ``[heads, total_tokens]``.

One kernel body serves both layouts: a sequence is a base token ``tok0`` plus a length, taken from
``cu_seqlens`` (varlen) or ``b * L`` through the batch stride (padded).

LSE is the natural-log log-sum-exp of ``scale * q.k`` over the real keys of a row. A padded query
row, or a row without any real key, gets ``O = 0`` and ``LSE = +inf`` so that the probabilities the
backward recomputes there are exactly 0.

Dropout (shared RNG contract, csrc/common/philox.h): element ``(b, h, i, j)`` has the int64
offset ``o = ((b * heads + h) * Lmax + i) * Lmax + j``, where ``Lmax`` is ``L`` (padded) or
``max_seqlen`` (varlen), and is kept iff the uniform float of word ``o & 3`` of
``tl.randint4x(seed, o >> 2)`` is > p -- the rule of the LayerNorm kernels and of the CPU and CUDA
code; kept values are scaled by ``1 / (1 - p)``. When ``Lmax % 4 == 0`` every row of offsets
starts on a counter, and one Philox call serves four consecutive keys (``_keep_rows``); other
``Lmax`` draw per element, four times the work, which only the smaller tiles hold in registers
(the fast attention modules' packed path therefore passes ``max_seqlen`` rounded up to a multiple
of 4 in training). The mask is regenerated in the backward, never stored. ``dropout_mask`` materialises it for tests.

The functions here are plain launchers with no autograd; ``roberta_fast.ops.attention`` wraps them.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import INTERPRET, launch_context

__all__ = ["attention_fwd", "attention_bwd", "dropout_mask", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128

# exp and log run as exp2 / log2 with these factors folded in.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
_LOG2E = LOG2E.value

# Set to "0" to skip autotuning (each problem kind then runs the first fitting tile of its table),
# e.g. in tests, where tuning every shape would cost minutes of compilation.
AUTOTUNE_ENV = "ROBERTA_FAST_AUTOTUNE"

# Rows per program of the backward's delta kernel, elements per program of dropout_mask (GPU).
DELTA_BLOCK_M = 16 if INTERPRET else 64
DROPOUT_MASK_BLOCK = 1024


# --------------------------------------------------------------------------------------------
# Autotuning configurations
# --------------------------------------------------------------------------------------------

MAXNREG = 255

# Dropout draws, lightest first: none; one Philox call per four elements (rows on counter
# boundaries: Lmax % 4 == 0); a Philox call per element (any other Lmax).
DRAW_NONE, DRAW_GROUPED, DRAW_ELEMENT = 0, 1, 2


class _Tile(NamedTuple):
    """One autotuning candidate and the head dims it takes without spilling registers.

    ``d``, ``d_grouped`` and ``d_element`` are the largest BLOCK_D the tile takes with no
    dropout, with the grouped draw and with the per-element draw (0: never), as the cubins for
    the table's architecture show (cuobjdump -res-usage); tests/test_triton_compile.py compiles
    every tile at each of its limits and fails on a spill. ``fp32`` tiles serve fp32 inputs only:
    exact fp32 dots run on FMA units with far larger register footprints, so those need small
    tiles, which in turn would starve the tensor cores for fp16/bf16.
    """

    block_m: int
    block_n: int
    warps: int
    stages: int
    d: int = 128
    d_grouped: int = 0
    d_element: int = 0
    fp32: bool = False

    def options(self) -> dict:
        """Launch options: the tile, and for fp16/bf16 tiles 255 registers per thread allowed.

        Left alone, ptxas aims at several blocks per SM (128 registers per thread at 8 warps,
        168 at 4 with the ptxas of Triton 3.6) and spills to get there; these tiles are sized to
        live in registers. The fp32 tiles measured better left to ptxas (``.maxnreg 255`` made
        some spill).
        """
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.warps,
                    num_stages=self.stages, maxnreg=None if self.fp32 else MAXNREG)

    def max_block_d(self, draw: int) -> int:
        return max(self.d, self.d_grouped, self.d_element) if draw == DRAW_NONE else \
            self.d_grouped if draw == DRAW_GROUPED else self.d_element


class _Tuning(NamedTuple):
    """The candidate tiles of one autotuned kernel, per architecture (80: Ampere and Ada's
    mma.sync; 90: Hopper's wgmma), and which tile side is which."""

    tables: dict[int, list[_Tile]]
    owned: str  # the _Tile field of the rows one program owns (its grid axis)
    streamed: str  # the _Tile field of the rows its loop streams


def _configs(tuning: _Tuning) -> list[triton.Config]:
    if INTERPRET:
        # The interpreter executes programs in numpy: one small tile keeps tests quick.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    tiles = {}
    for table in tuning.tables.values():
        for t in table:
            tiles.setdefault(_tile_key(t), t)
    return [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.warps,
                          num_stages=t.stages, maxnreg=t.options()["maxnreg"])
            for t in tiles.values()]


def _tile_key(t: _Tile) -> tuple:
    return t.block_m, t.block_n, t.warps, t.stages, t.options()["maxnreg"]


def _arch(device: torch.device) -> int:
    """The tile table for ``device``: 90 from Hopper on, else 80."""
    return _arch_of_index(device.index if device.index is not None else
                          torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _arch_of_index(index: int) -> int:
    return 90 if torch.cuda.get_device_capability(index)[0] >= 9 else 80


# Each table lists the expected winner first: ROBERTA_FAST_AUTOTUNE=0 and CUDA graph captures
# take the first tile that fits. Hopper (90) favours 128-row query tiles with 8 warps (two
# warpgroups); below 64 rows Triton falls back to mma.sync there. The per-element dropout draw
# (Lmax % 4 != 0) needs the smallest tiles; the sm_80 tables (Ampere, Ada: operands in registers)
# hold less than Hopper's, whose wgmma reads them from shared memory.
_FWD_TUNING = _Tuning({
    90: [
        _Tile(128, 64, 8, 3, d=128, d_grouped=64),
        _Tile(128, 128, 8, 3, d=64),
        _Tile(128, 64, 8, 2, d=128, d_grouped=128),
        _Tile(128, 32, 8, 3, d=128, d_grouped=128, d_element=64),
        _Tile(64, 32, 4, 2, d=128, d_grouped=128, d_element=64),
        _Tile(32, 64, 4, 2, d=128, d_element=128),
        _Tile(32, 32, 4, 2, d=64, d_grouped=64, d_element=64, fp32=True),
        _Tile(16, 16, 4, 2, d=128, d_grouped=128, d_element=128, fp32=True),
    ],
    80: [
        _Tile(128, 64, 8, 3, d=64, d_grouped=64),
        _Tile(128, 128, 8, 3, d=64),
        _Tile(64, 64, 4, 3, d=128, d_grouped=64),
        _Tile(128, 32, 8, 3, d=128, d_element=128),
        _Tile(64, 32, 4, 2, d=128, d_grouped=128, d_element=128),
        _Tile(32, 32, 4, 2, d=64, d_grouped=64, d_element=64, fp32=True),
        _Tile(16, 32, 4, 2, d=128, d_grouped=128, d_element=128, fp32=True),
    ],
}, "block_m", "block_n")
# dK/dV: BLOCK_N key rows are owned by a program, BLOCK_M query rows are streamed.
_DKDV_TUNING = _Tuning({
    90: [
        _Tile(64, 128, 8, 3, d=64),
        _Tile(32, 128, 8, 3, d=128, d_grouped=64, d_element=64),
        _Tile(32, 64, 4, 2, d=64, d_grouped=64, d_element=64),
        _Tile(32, 32, 4, 2, d=128, d_grouped=128, d_element=128),
        _Tile(32, 32, 4, 2, d=64, d_grouped=64, d_element=64, fp32=True),
        _Tile(16, 32, 4, 2, d=128, d_grouped=128, d_element=128, fp32=True),
    ],
    80: [
        _Tile(32, 128, 8, 3, d=64, d_element=64),
        _Tile(32, 64, 4, 3, d=64, d_element=64),
        _Tile(32, 32, 4, 2, d=128, d_grouped=128, d_element=128),
        _Tile(32, 32, 4, 2, d=64, d_grouped=64, fp32=True),
        _Tile(16, 32, 4, 2, d=128, d_grouped=128, d_element=128, fp32=True),
    ],
}, "block_n", "block_m")
# dQ: BLOCK_M query rows are owned by a program, BLOCK_N key rows are streamed.
_DQ_TUNING = _Tuning({
    90: [
        _Tile(128, 64, 8, 3, d=128, d_grouped=64),
        _Tile(128, 128, 8, 2, d=64),
        _Tile(128, 32, 8, 3, d=128, d_grouped=128, d_element=64),
        _Tile(64, 32, 4, 2, d=128, d_grouped=128, d_element=64),
        _Tile(32, 32, 4, 2, d=128, d_element=128),
        _Tile(32, 32, 4, 2, d=128, d_grouped=128, d_element=64, fp32=True),
        _Tile(16, 32, 4, 2, d=128, d_grouped=128, d_element=128, fp32=True),
    ],
    80: [
        _Tile(128, 64, 8, 3, d=64, d_grouped=64),
        _Tile(128, 32, 8, 3, d=128, d_grouped=64, d_element=64),
        _Tile(64, 32, 4, 2, d=128, d_grouped=128, d_element=64),
        _Tile(32, 32, 4, 2, d=128, d_grouped=128, d_element=128),
        _Tile(32, 32, 4, 2, d=64, d_grouped=64, d_element=64, fp32=True),
        _Tile(16, 32, 4, 2, d=128, d_grouped=128, d_element=128, fp32=True),
    ],
}, "block_m", "block_n")


def pickable_tiles(tuning: _Tuning, *, arch: int, fp32: bool, bucket: int, block_d: int,
                   draw: int) -> list[_Tile]:
    """The tiles of ``tuning`` worth trying for a problem on ``arch``, the expected winner first.

    Tiles that would spill (``block_d`` past the tile's limit for the dropout ``draw``) or serve
    the other precision never qualify; tiles much longer than the longest sequence (``bucket``)
    only add masked work, unless nothing shorter fits. The GPU compile test applies this same
    rule to decide which tiles must compile without spilling.
    """
    fits = [t for t in tuning.tables[arch]
            if t.fp32 == fp32 and block_d <= t.max_block_d(draw)]
    if not fits:
        raise ValueError(f"attention: no tile for fp32={fp32}, BLOCK_D={block_d}, "
                         f"dropout draw {draw} on sm_{arch}")
    kept = [t for t in fits if getattr(t, tuning.owned) <= max(bucket, 64)
            and getattr(t, tuning.streamed) <= max(bucket, 32)]
    return kept or [min(fits, key=lambda t: t.block_m * t.block_n)]


def _config_key(c: triton.Config) -> tuple:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.maxnreg


def _prune(tuning: _Tuning):
    """The autotuner's pruning hook: :func:`pickable_tiles` on the launch arguments."""
    if INTERPRET:
        return None

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        draw = DRAW_NONE if not args["DROPOUT"] else \
            DRAW_GROUPED if args["DROP_ALIGNED4"] else DRAW_ELEMENT
        tiles = pickable_tiles(tuning, arch=_arch(args["Q"].device),
                               fp32=args["Q"].dtype == torch.float32, bucket=args["SEQ_BUCKET"],
                               block_d=args["BLOCK_D"], draw=draw)
        wanted = {_tile_key(t) for t in tiles}
        return [c for c in configs if _config_key(c) in wanted]

    return {"early_config_prune": prune}


_TUNE_KEY = ["BLOCK_D", "SEQ_BUCKET", "VARLEN", "KEY_MASK", "DROPOUT", "DROP_ALIGNED4"]


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _load_rows(ptrs, row_ok, offs_d, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr,
               EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; rows where ``row_ok`` is False read as zeros when
    ``CHECK_ROWS`` (masks only where the tile can leave the data or meet padding)."""
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _keep(seed, offs, p_drop):
    """Dropout decisions of the elements with int64 offsets ``offs`` (module docstring), one
    Philox call per element."""
    r0, r1, r2, r3 = tl.randint4x(seed, offs >> 2)
    word = offs & 3
    bits = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return tl.uint_to_uniform_float(bits) > p_drop


@triton.jit
def _keep_rows(seed, row_offs, p_drop, BLOCK_N: tl.constexpr, ALIGNED4: tl.constexpr):
    """Dropout decisions ``[rows, BLOCK_N]`` of the elements ``row_offs[:, None] + j`` (int64).

    ``ALIGNED4``: every ``row_offs`` is a multiple of 4, so counters ``row_offs / 4 + c`` hold
    the row's elements ``4c .. 4c + 3`` in word order: one Philox call per four elements, its
    words interleaved into place. Otherwise each element draws its own counter's words.
    """
    if ALIGNED4:
        counters = (row_offs >> 2)[:, None] + tl.arange(0, BLOCK_N // 4).to(tl.int64)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, counters)
        bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
        keep = tl.uint_to_uniform_float(bits) > p_drop
    else:
        keep = _keep(seed, row_offs[:, None] + tl.arange(0, BLOCK_N).to(tl.int64)[None, :],
                     p_drop)
    return keep


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr):
    """``a @ b (+ acc)`` accumulated in fp32."""
    if DOT_PREC == "upcast":
        # Only under the interpreter, whose bf16 dot multiplies the raw bit patterns.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _store_rows(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    if EVEN_D:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _sequence(CU, KV_END, b, seq_len, VARLEN: tl.constexpr, KEY_MASK: tl.constexpr):
    """(first token, length, end of the keys worth visiting) of sequence ``b``."""
    if VARLEN:
        tok0 = tl.load(CU + b)
        seqlen = tl.load(CU + b + 1) - tok0
        n_end = seqlen
    else:
        tok0 = b * 0
        seqlen = seq_len
        if KEY_MASK:
            # One past the last real key: later keys (and query rows) are all padding.
            n_end = tl.load(KV_END + b)
        else:
            n_end = seq_len
    return tok0.to(tl.int64), seqlen, n_end


@triton.jit
def _key_ok(kpm_base, cols, n_end, KEY_MASK: tl.constexpr):
    """Which keys ``cols`` are real: inside the sequence and, with a mask, not padding."""
    if KEY_MASK:
        ok = tl.load(kpm_base + cols, mask=cols < n_end, other=0) != 0
    else:
        ok = cols < n_end
    return ok


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, kpm_base, drop_rows, seed,
                 lo, hi, n_end, qk_scale, p_drop, offs_n, offs_d,
                 HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 KEY_MASK: tl.constexpr, CHECK_N: tl.constexpr, DROPOUT: tl.constexpr,
                 DROP_ALIGNED4: tl.constexpr, DOT_PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        key_ok = _key_ok(kpm_base, cols, n_end, KEY_MASK)
        k = _load_rows(k_base + cols[:, None] * stride_kt + offs_d[None, :], cols < n_end, offs_d,
                       HEAD_DIM, CHECK_N, EVEN_D)
        s = _mma(q, tl.trans(k), None, DOT_PREC) * qk_scale
        if KEY_MASK or CHECK_N:
            s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps
        # exp2(-inf - -inf) from turning into NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            # The normaliser l_i counts every probability; only the PV product sees the mask.
            keep = _keep_rows(seed, drop_rows + start_n, p_drop, BLOCK_N, DROP_ALIGNED4)
            p = tl.where(keep, p, 0.0)
        # Padded keys' rows of V read as zeros: their p is 0, but 0 * NaN would still be NaN.
        v = _load_rows(v_base + cols[:, None] * stride_vt + offs_d[None, :], key_ok, offs_d,
                       HEAD_DIM, KEY_MASK or CHECK_N, EVEN_D)
        acc = _mma(p.to(v.dtype), v, acc, DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs(_FWD_TUNING), key=_TUNE_KEY,
                  prune_configs_by=_prune(_FWD_TUNING))
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KPM, KV_END, CU, SEED,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_mb, stride_lb, stride_lh,
    num_heads, seq_len, Lmax, qk_scale, p_drop, keep_scale, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    VARLEN: tl.constexpr, KEY_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    DROP_ALIGNED4: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    tok0, seqlen, n_end = _sequence(CU, KV_END, b, seq_len, VARLEN, KEY_MASK)
    if start_m * BLOCK_M >= seqlen:
        return

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    o_base = O + b64 * stride_ob + tok0 * stride_ot + h64 * stride_oh
    lse_base = LSE + b64 * stride_lb + h64 * stride_lh + tok0
    o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :]

    if start_m * BLOCK_M >= n_end:
        # Every row of this tile is padding (only reachable with a key padding mask).
        _store_rows(o_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=O.dtype.element_ty), offs_m,
                    seqlen, offs_d, HEAD_DIM, EVEN_D)
        tl.store(lse_base + offs_m, tl.full([BLOCK_M], float("inf"), tl.float32),
                 mask=offs_m < seqlen)
        return

    q_base = Q + b64 * stride_qb + tok0 * stride_qt + h64 * stride_qh
    k_base = K + b64 * stride_kb + tok0 * stride_kt + h64 * stride_kh
    v_base = V + b64 * stride_vb + tok0 * stride_vt + h64 * stride_vh
    kpm_base = KPM + b64 * stride_mb
    q = _load_rows(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], offs_m < seqlen, offs_d,
                   HEAD_DIM, True, EVEN_D)

    if DROPOUT:
        seed = tl.load(SEED)
        drop_rows = ((b64 * num_heads + h64) * Lmax + offs_m.to(tl.int64)) * Lmax
    else:
        seed = 0
        drop_rows = offs_m.to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Full key tiles need no bounds checks; the ragged last tile is handled on its own.
    n_full = (n_end // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, kpm_base,
                                 drop_rows, seed, 0, n_full, n_end, qk_scale, p_drop, offs_n,
                                 offs_d, HEAD_DIM, EVEN_D, BLOCK_N, KEY_MASK, False, DROPOUT,
                                 DROP_ALIGNED4, DOT_PREC)
    acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, kpm_base,
                                 drop_rows, seed, n_full, n_end, n_end, qk_scale, p_drop, offs_n,
                                 offs_d, HEAD_DIM, EVEN_D, BLOCK_N, KEY_MASK, True, DROPOUT,
                                 DROP_ALIGNED4, DOT_PREC)

    row_ok = l_i > 0.0
    if KEY_MASK:
        q_real = tl.load(kpm_base + offs_m, mask=offs_m < n_end, other=0)
        row_ok = row_ok & (q_real != 0)
    l_safe = tl.where(row_ok, l_i, 1.0)
    inv_l = 1.0 / l_safe
    if DROPOUT:
        inv_l = inv_l * keep_scale
    o = tl.where(row_ok[:, None], acc * inv_l[:, None], 0.0)
    lse = tl.where(row_ok, (m_i + tl.math.log2(l_safe)) * LN2, float("inf"))
    _store_rows(o_ptrs, o.to(O.dtype.element_ty), offs_m, seqlen, offs_d, HEAD_DIM, EVEN_D)
    tl.store(lse_base + offs_m, lse, mask=offs_m < seqlen)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------

@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, CU,
                      stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
                      stride_lb, stride_lh, seq_len,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                      VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id in fp32, laid out like LSE."""
    start_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    tok0, seqlen, n_end = _sequence(CU, CU, b, seq_len, VARLEN, False)
    if start_m * BLOCK_M >= seqlen:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    o = _load_rows(O + b64 * stride_ob + tok0 * stride_ot + h64 * stride_oh
                   + offs_m[:, None] * stride_ot + offs_d[None, :], offs_m < seqlen, offs_d,
                   HEAD_DIM, True, EVEN_D)
    do = _load_rows(DO + b64 * stride_dob + tok0 * stride_dot + h64 * stride_doh
                    + offs_m[:, None] * stride_dot + offs_d[None, :], offs_m < seqlen, offs_d,
                    HEAD_DIM, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + tok0 + offs_m, delta, mask=offs_m < seqlen)


@triton.jit
def _bwd_head_setup(Q, K, V, DO, LSE, DELTA, SEED, b64, h64, tok0,
                    stride_qb, stride_qt, stride_qh,
                    stride_kb, stride_kt, stride_kh,
                    stride_vb, stride_vt, stride_vh,
                    stride_dob, stride_dot, stride_doh,
                    stride_lb, stride_lh,
                    DROPOUT: tl.constexpr):
    """Inputs of one (sequence, head) for both backward kernels.

    Returns the pointers to token 0 of the sequence in Q, K, V and dO and in LSE and delta (laid
    out alike), then the dropout seed (0 without dropout). Called after the all-padding early
    exit, so that padding-only programs skip the seed load. The key padding mask pointer stays in
    the kernels: dK/dV reads it only after its loop, and computing it here would keep it live
    across that loop.
    """
    q_base = Q + b64 * stride_qb + tok0 * stride_qt + h64 * stride_qh
    k_base = K + b64 * stride_kb + tok0 * stride_kt + h64 * stride_kh
    v_base = V + b64 * stride_vb + tok0 * stride_vt + h64 * stride_vh
    do_base = DO + b64 * stride_dob + tok0 * stride_dot + h64 * stride_doh
    lse_base = LSE + b64 * stride_lb + h64 * stride_lh + tok0
    delta_base = DELTA + b64 * stride_lb + h64 * stride_lh + tok0
    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    return q_base, k_base, v_base, do_base, lse_base, delta_base, seed


@triton.jit
def _dkdv_q_loop(dk, dv, k, v, q_base, do_base, stride_qt, stride_dot, lse_base, delta_base,
                 drop_base, seed, lo, hi, q_end, qk_scale, p_drop, keep_scale, Lmax, offs_m, offs_d,
                 HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CHECK_M: tl.constexpr, DROPOUT: tl.constexpr,
                 DROP_ALIGNED4: tl.constexpr, DOT_PREC: tl.constexpr):
    # Works on transposed tiles ([keys, queries]) so that dK and dV come out of plain dots.
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        q = _load_rows(q_base + rows[:, None] * stride_qt + offs_d[None, :], rows < q_end, offs_d,
                       HEAD_DIM, CHECK_M, EVEN_D)
        do = _load_rows(do_base + rows[:, None] * stride_dot + offs_d[None, :], rows < q_end,
                        offs_d, HEAD_DIM, CHECK_M, EVEN_D)
        if CHECK_M:
            # Rows past the end get LSE = +inf, hence probability 0.
            lse2 = tl.load(lse_base + rows, mask=rows < q_end, other=float("inf")) * LOG2E
            delta = tl.load(delta_base + rows, mask=rows < q_end, other=0.0)
        else:
            lse2 = tl.load(lse_base + rows) * LOG2E
            delta = tl.load(delta_base + rows)
        s_t = _mma(k, tl.trans(q), None, DOT_PREC) * qk_scale
        p_t = tl.math.exp2(s_t - lse2[None, :])
        dp_t = _mma(v, tl.trans(do), None, DOT_PREC)
        if DROPOUT:
            # Offsets run along the keys (axis 0 here): drawn query-major, then transposed.
            keep = tl.trans(_keep_rows(seed, drop_base + rows.to(tl.int64) * Lmax, p_drop,
                                       BLOCK_N, DROP_ALIGNED4))
            pd_t = tl.where(keep, p_t * keep_scale, 0.0)
            dp_t = tl.where(keep, dp_t * keep_scale, 0.0)
        else:
            pd_t = p_t
        dv = _mma(pd_t.to(do.dtype), do, dv, DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _mma(ds_t.to(q.dtype), q, dk, DOT_PREC)
    return dk, dv


@triton.autotune(configs=_configs(_DKDV_TUNING), key=_TUNE_KEY,
                  prune_configs_by=_prune(_DKDV_TUNING))
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM, KV_END, CU, SEED,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_mb, stride_lb, stride_lh,
    num_heads, seq_len, Lmax, qk_scale, sm_scale, p_drop, keep_scale, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    VARLEN: tl.constexpr, KEY_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    DROP_ALIGNED4: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    tok0, seqlen, n_end = _sequence(CU, KV_END, b, seq_len, VARLEN, KEY_MASK)
    if start_n * BLOCK_N >= seqlen:
        return

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    dk_ptrs = DK + b64 * stride_dkb + tok0 * stride_dkt + h64 * stride_dkh \
        + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + b64 * stride_dvb + tok0 * stride_dvt + h64 * stride_dvh \
        + offs_n[:, None] * stride_dvt + offs_d[None, :]

    if start_n * BLOCK_N >= n_end:
        # Only padded keys here: they receive no gradient.
        zero = tl.zeros([BLOCK_N, BLOCK_D], dtype=DK.dtype.element_ty)
        _store_rows(dk_ptrs, zero, offs_n, seqlen, offs_d, HEAD_DIM, EVEN_D)
        _store_rows(dv_ptrs, zero.to(DV.dtype.element_ty), offs_n, seqlen, offs_d, HEAD_DIM, EVEN_D)
        return

    q_base, k_base, v_base, do_base, lse_base, delta_base, seed = _bwd_head_setup(
        Q, K, V, DO, LSE, DELTA, SEED, b64, h64, tok0,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
        stride_lb, stride_lh, DROPOUT)
    k = _load_rows(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], offs_n < n_end, offs_d,
                   HEAD_DIM, True, EVEN_D)
    v = _load_rows(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], offs_n < n_end, offs_d,
                   HEAD_DIM, True, EVEN_D)
    if DROPOUT:
        # Offset of (this program's first key, query 0); query m adds m * Lmax.
        drop_base = (b64 * num_heads + h64) * Lmax * Lmax + start_n * BLOCK_N
    else:
        drop_base = b64 * 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query rows at or past n_end are padding (LSE = +inf) and contribute nothing: skip them.
    m_full = (n_end // BLOCK_M) * BLOCK_M
    dk, dv = _dkdv_q_loop(dk, dv, k, v, q_base, do_base, stride_qt, stride_dot, lse_base,
                          delta_base, drop_base, seed, 0, m_full, n_end, qk_scale, p_drop,
                          keep_scale, Lmax, offs_m, offs_d, HEAD_DIM, EVEN_D, BLOCK_M, BLOCK_N,
                          False, DROPOUT, DROP_ALIGNED4, DOT_PREC)
    dk, dv = _dkdv_q_loop(dk, dv, k, v, q_base, do_base, stride_qt, stride_dot, lse_base,
                          delta_base, drop_base, seed, m_full, n_end, n_end, qk_scale, p_drop,
                          keep_scale, Lmax, offs_m, offs_d, HEAD_DIM, EVEN_D, BLOCK_M, BLOCK_N,
                          True, DROPOUT, DROP_ALIGNED4, DOT_PREC)

    # Rows of dK/dV depend only on their own key, so masked keys are zeroed once here instead of
    # being masked inside the loop.
    key_ok = offs_n < n_end
    if KEY_MASK:
        real = tl.load(KPM + b64 * stride_mb + offs_n, mask=key_ok, other=0)
        key_ok = key_ok & (real != 0)
    dk = tl.where(key_ok[:, None], dk * sm_scale, 0.0)
    dv = tl.where(key_ok[:, None], dv, 0.0)
    _store_rows(dk_ptrs, dk.to(DK.dtype.element_ty), offs_n, seqlen, offs_d, HEAD_DIM, EVEN_D)
    _store_rows(dv_ptrs, dv.to(DV.dtype.element_ty), offs_n, seqlen, offs_d, HEAD_DIM, EVEN_D)


@triton.jit
def _dq_kv_loop(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, kpm_base, drop_rows,
                seed, lo, hi, n_end, qk_scale, p_drop, keep_scale, offs_n, offs_d,
                HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                KEY_MASK: tl.constexpr, CHECK_N: tl.constexpr, DROPOUT: tl.constexpr,
                DROP_ALIGNED4: tl.constexpr, DOT_PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        key_ok = _key_ok(kpm_base, cols, n_end, KEY_MASK)
        # Padded keys' rows of K and V read as zeros: ds is 0 there, but 0 * NaN is NaN.
        k = _load_rows(k_base + cols[:, None] * stride_kt + offs_d[None, :], key_ok, offs_d,
                       HEAD_DIM, KEY_MASK or CHECK_N, EVEN_D)
        v = _load_rows(v_base + cols[:, None] * stride_vt + offs_d[None, :], key_ok, offs_d,
                       HEAD_DIM, KEY_MASK or CHECK_N, EVEN_D)
        s = _mma(q, tl.trans(k), None, DOT_PREC) * qk_scale
        if KEY_MASK or CHECK_N:
            s = tl.where(key_ok[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = _mma(do, tl.trans(v), None, DOT_PREC)
        if DROPOUT:
            keep = _keep_rows(seed, drop_rows + start_n, p_drop, BLOCK_N, DROP_ALIGNED4)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, DOT_PREC)
    return dq


@triton.autotune(configs=_configs(_DQ_TUNING), key=_TUNE_KEY,
                  prune_configs_by=_prune(_DQ_TUNING))
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KPM, KV_END, CU, SEED,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_mb, stride_lb, stride_lh,
    num_heads, seq_len, Lmax, qk_scale, sm_scale, p_drop, keep_scale, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    VARLEN: tl.constexpr, KEY_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    DROP_ALIGNED4: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    tok0, seqlen, n_end = _sequence(CU, KV_END, b, seq_len, VARLEN, KEY_MASK)
    if start_m * BLOCK_M >= seqlen:
        return

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    dq_ptrs = DQ + b64 * stride_dqb + tok0 * stride_dqt + h64 * stride_dqh \
        + offs_m[:, None] * stride_dqt + offs_d[None, :]

    if start_m * BLOCK_M >= n_end:
        _store_rows(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=DQ.dtype.element_ty), offs_m,
                    seqlen, offs_d, HEAD_DIM, EVEN_D)
        return

    q_base, k_base, v_base, do_base, lse_base, delta_base, seed = _bwd_head_setup(
        Q, K, V, DO, LSE, DELTA, SEED, b64, h64, tok0,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
        stride_lb, stride_lh, DROPOUT)
    q = _load_rows(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], offs_m < seqlen, offs_d,
                   HEAD_DIM, True, EVEN_D)
    do = _load_rows(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], offs_m < seqlen,
                    offs_d, HEAD_DIM, True, EVEN_D)
    lse2 = tl.load(lse_base + offs_m, mask=offs_m < seqlen, other=float("inf")) * LOG2E
    delta = tl.load(delta_base + offs_m, mask=offs_m < seqlen, other=0.0)
    kpm_base = KPM + b64 * stride_mb
    if DROPOUT:
        drop_rows = ((b64 * num_heads + h64) * Lmax + offs_m.to(tl.int64)) * Lmax
    else:
        drop_rows = offs_m.to(tl.int64)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (n_end // BLOCK_N) * BLOCK_N
    dq = _dq_kv_loop(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, kpm_base,
                     drop_rows, seed, 0, n_full, n_end, qk_scale, p_drop, keep_scale, offs_n,
                     offs_d, HEAD_DIM, EVEN_D, BLOCK_N, KEY_MASK, False, DROPOUT, DROP_ALIGNED4,
                     DOT_PREC)
    dq = _dq_kv_loop(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, kpm_base,
                     drop_rows, seed, n_full, n_end, n_end, qk_scale, p_drop, keep_scale, offs_n,
                     offs_d, HEAD_DIM, EVEN_D, BLOCK_N, KEY_MASK, True, DROPOUT, DROP_ALIGNED4,
                     DOT_PREC)
    _store_rows(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), offs_m, seqlen, offs_d, HEAD_DIM,
                EVEN_D)


# --------------------------------------------------------------------------------------------
# Dropout mask, materialised (for tests and debugging)
# --------------------------------------------------------------------------------------------

@triton.jit
def _dropout_mask_kernel(OUT, SEED, plane, p_drop, BLOCK: tl.constexpr):
    """``plane`` = Lmax * Lmax, computed on the host (an int64 argument once it needs one)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    num_heads = tl.num_programs(1)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    # ((b * H + h) * Lmax + i) * Lmax + j == (b * H + h) * Lmax * Lmax + (i * Lmax + j)
    offset = (b.to(tl.int64) * num_heads + h) * plane + idx
    keep = _keep(tl.load(SEED), offset, p_drop)
    tl.store(OUT + offset, keep.to(tl.uint8), mask=idx < plane)


def dropout_mask(seed: torch.Tensor, batch: int, heads: int, seqlen: int, p: float) -> torch.Tensor:
    """The keep-mask the attention kernels draw for ``seed``: bool ``[batch, heads, L, L]``.

    ``seqlen`` is ``L`` for the padded layout and ``max_seqlen`` for varlen; for a varlen batch the
    mask of sequence ``b`` is ``mask[b, :, :len_b, :len_b]``. True means kept.
    """
    if not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1):
        raise TypeError("seed must be an int64 tensor with one element")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    out = torch.empty(batch, heads, seqlen, seqlen, dtype=torch.uint8, device=seed.device)
    if out.numel() == 0:
        return out.bool()
    block = 256 if INTERPRET else DROPOUT_MASK_BLOCK
    grid = (triton.cdiv(seqlen * seqlen, block), heads, batch)
    with launch_context(seed):
        _dropout_mask_kernel[grid](out, seed, seqlen * seqlen, float(p), BLOCK=block)
    return out.bool()


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; the batch stride of a packed tensor is 0."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _seq_bucket(n: int) -> int:
    # Autotuning keyed on the exact length would retune for every varlen batch.
    return max(16, triton.next_power_of_2(max(n, 1)))


class _Layout:
    """What the kernels need to know about the batch, computed once per call."""

    def __init__(self, q: torch.Tensor, key_padding_mask: torch.Tensor | None,
                 cu_seqlens: torch.Tensor | None, max_seqlen: int):
        self.varlen = cu_seqlens is not None
        dummy = q
        if self.varlen:
            total, self.heads, self.head_dim = q.shape
            self.batch = cu_seqlens.shape[0] - 1
            self.seq_len = 0
            self.lmax = int(max_seqlen)
            self.lse_shape = (self.heads, total)
            self.stride_lb, self.stride_lh = 0, total
            self.cu = cu_seqlens.contiguous()
        else:
            self.batch, self.seq_len, self.heads, self.head_dim = q.shape
            self.lmax = self.seq_len
            self.lse_shape = (self.batch, self.heads, self.seq_len)
            self.stride_lb, self.stride_lh = self.heads * self.seq_len, self.seq_len
            self.cu = dummy
        self.key_mask = key_padding_mask is not None and not self.varlen
        if self.key_mask:
            mask = key_padding_mask
            if mask.stride(-1) != 1:
                mask = mask.contiguous()
            self.kpm = mask.view(torch.uint8)
            self.stride_mb = self.kpm.stride(0)
            # One past the last real key of each sequence, computed on the device (no sync).
            pos = torch.arange(1, self.seq_len + 1, device=q.device, dtype=torch.int32)
            if self.seq_len > 0:
                self.kv_end = torch.where(mask, pos, 0).amax(dim=1).to(torch.int32)
            else:
                self.kv_end = pos
        else:
            self.kpm, self.kv_end, self.stride_mb = dummy, dummy, 0
        self.block_d = max(16, triton.next_power_of_2(self.head_dim))
        self.even_d = self.block_d == self.head_dim
        self.bucket = _seq_bucket(self.lmax)
        # fp32 attention is the accuracy path: no TF32 truncation.
        if q.dtype == torch.float32:
            self.dot_prec = "ieee"
        elif q.dtype == torch.bfloat16 and INTERPRET:
            self.dot_prec = "upcast"
        else:
            self.dot_prec = "tf32"

    def empty(self) -> bool:
        return self.batch == 0 or self.lmax == 0 or self.heads == 0

    def check_limits(self, *tensors: torch.Tensor) -> None:
        """Reject what the launch grid or the kernels' int32 in-sequence offsets cannot cover."""
        if self.batch > 65535 or self.heads > 65535:
            raise ValueError(f"attention kernels take at most 65535 sequences and heads per call, "
                             f"got {self.batch} and {self.heads}")
        token_dim = 0 if self.varlen else 1
        widest = max(t.stride(token_dim) for t in tensors)
        if (self.lmax + 256) * widest >= 2 ** 31:
            raise ValueError(f"attention kernels: sequences of {self.lmax} tokens with a token "
                             f"stride of {widest} elements overflow 32-bit offsets")

    def grid(self, block: str):
        return lambda meta: (triton.cdiv(self.lmax, meta[block]), self.heads, self.batch)

    def draw(self, dropout: bool) -> int:
        """The dropout draw: Lmax % 4 == 0 puts every row on a Philox counter boundary."""
        if not dropout:
            return DRAW_NONE
        return DRAW_GROUPED if self.lmax % 4 == 0 else DRAW_ELEMENT

    def constexprs(self, dropout: bool) -> dict:
        return dict(HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, EVEN_D=self.even_d,
                    VARLEN=self.varlen, KEY_MASK=self.key_mask, DROPOUT=dropout,
                    DROP_ALIGNED4=self.draw(dropout) == DRAW_GROUPED, DOT_PREC=self.dot_prec)


# Autotuning keys (kernel, dtype, constexprs) the autotuner has already settled, in this process.
_TUNED: set = set()


def _launch(kernel, tuning: _Tuning, lay: _Layout, grid_block: str, dtype: torch.dtype,
            dropout: bool, args: tuple) -> None:
    """Launch an autotuned kernel, or its table's first fitting tile without tuning.

    Tuning compiles and times every candidate, with device syncs: skipped when
    ``ROBERTA_FAST_AUTOTUNE=0`` and while a CUDA graph is being captured (a sync would break the
    capture), unless this problem was tuned before.
    """
    constexprs = lay.constexprs(dropout)
    grid = lay.grid(grid_block)
    if INTERPRET:  # one configuration there, nothing to tune
        kernel[grid](*args, **constexprs)
        return
    key = (kernel.base_fn.__name__, dtype, lay.bucket, tuple(constexprs.values()))
    capturing = args[0].is_cuda and torch.cuda.is_current_stream_capturing()
    if os.environ.get(AUTOTUNE_ENV, "1") != "0" and (key in _TUNED or not capturing):
        kernel[grid](*args, **constexprs)
        _TUNED.add(key)
        return
    tile = pickable_tiles(tuning, arch=_arch(args[0].device), fp32=dtype == torch.float32,
                          bucket=lay.bucket, block_d=lay.block_d, draw=lay.draw(dropout))[0]
    kernel.fn[grid](*args, **constexprs, **tile.options())


def _check_dropout(dropout_p: float, seed: torch.Tensor | None) -> bool:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and (seed is None or seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError("dropout_p > 0 needs a one-element int64 seed tensor")
    return dropout_p > 0.0


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_padding_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                  max_seqlen: int, scale: float, dropout_p: float,
                  seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns ``(o, lse)``; inputs are assumed validated.

    Padded layout when ``cu_seqlens`` is None (``q`` ``[B, L, H, D]``, optional
    ``key_padding_mask``); varlen otherwise (``q`` ``[T, H, D]``, ``max_seqlen`` >= every length).
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    lay = _Layout(q, key_padding_mask, cu_seqlens, max_seqlen)
    dropout = _check_dropout(dropout_p, seed)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lay.lse_shape, dtype=torch.float32, device=q.device)
    if lay.empty() or o.numel() == 0:
        return o, lse.fill_(float("inf"))
    lay.check_limits(q, k, v, o)
    varlen = lay.varlen
    args = (q, k, v, o, lse, lay.kpm, lay.kv_end, lay.cu, seed if dropout else q,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(o, varlen),
            lay.stride_mb, lay.stride_lb, lay.stride_lh,
            lay.heads, lay.seq_len, lay.lmax, float(scale) * _LOG2E, float(dropout_p),
            1.0 / (1.0 - dropout_p), lay.bucket)
    with launch_context(q):
        _launch(_attn_fwd_kernel, _FWD_TUNING, lay, "BLOCK_M", q.dtype, dropout, args)
    return o, lse


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  o: torch.Tensor, lse: torch.Tensor, key_padding_mask: torch.Tensor | None,
                  cu_seqlens: torch.Tensor | None, max_seqlen: int, scale: float,
                  dropout_p: float, seed: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels (delta, then dK/dV over key tiles, then dQ over query tiles).

    Deterministic: no atomics. ``lse`` is the forward's; ``seed`` must be the forward's seed.
    """
    do, q, k, v, o = (_last_dim_contiguous(t) for t in (do, q, k, v, o))
    lay = _Layout(q, key_padding_mask, cu_seqlens, max_seqlen)
    dropout = _check_dropout(dropout_p, seed)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if lay.empty() or q.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lay.check_limits(do, q, k, v, o, dq, dk, dv)
    lse = lse.contiguous()
    varlen = lay.varlen
    delta = torch.empty(lay.lse_shape, dtype=torch.float32, device=q.device)
    seed_arg = seed if dropout else q
    common = (lay.stride_mb, lay.stride_lb, lay.stride_lh, lay.heads, lay.seq_len, lay.lmax,
              float(scale) * _LOG2E, float(scale), float(dropout_p), 1.0 / (1.0 - dropout_p),
              lay.bucket)
    with launch_context(q):
        _bwd_delta_kernel[(triton.cdiv(lay.lmax, DELTA_BLOCK_M), lay.heads, lay.batch)](
            o, do, delta, lay.cu, *_strides(o, varlen), *_strides(do, varlen),
            lay.stride_lb, lay.stride_lh, lay.seq_len,
            HEAD_DIM=lay.head_dim, BLOCK_D=lay.block_d, EVEN_D=lay.even_d, VARLEN=varlen,
            BLOCK_M=DELTA_BLOCK_M,
        )
        _launch(_attn_bwd_dkdv_kernel, _DKDV_TUNING, lay, "BLOCK_N", q.dtype, dropout,
                (q, k, v, do, dk, dv, lse, delta, lay.kpm, lay.kv_end, lay.cu, seed_arg,
                 *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
                 *_strides(do, varlen), *_strides(dk, varlen), *_strides(dv, varlen), *common))
        _launch(_attn_bwd_dq_kernel, _DQ_TUNING, lay, "BLOCK_M", q.dtype, dropout,
                (q, k, v, do, dq, lse, delta, lay.kpm, lay.kv_end, lay.cu, seed_arg,
                 *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
                 *_strides(do, varlen), *_strides(dq, varlen), *common))
    return dq, dk, dv
