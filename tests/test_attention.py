"""Fused attention: Triton kernels, the SDPA (cpu) path and the reference, against float64.

Without a GPU the Triton kernels run on CPU tensors in the interpreter (small shapes, fp32 mostly,
one tile size of 16). Tests marked ``gpu`` run RoBERTa-sized problems in fp16/bf16.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import roberta_fast
import roberta_fast.triton.attention as kernels
from roberta_fast import backends
from roberta_fast.ops._common import new_seed
from roberta_fast.ops.attention import attention, attention_varlen
from roberta_fast.reference.attention import forward_native, varlen_forward_native
from tests.helpers import (MAX_ERR, assert_close, binomial_bound, noncontiguous, poison, randn,
                           rel_err)

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

class _PoisonedTorch:
    """``torch`` as the launchers see it, except that ``torch.empty`` comes back NaN-filled."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return poison(torch.empty(*args, **kwargs))


@pytest.fixture
def poisoned(monkeypatch, triton_device):
    """Every buffer the Triton launchers allocate (O, LSE, delta, dQ, dK, dV) starts as NaN."""
    monkeypatch.setattr(kernels, "torch", _PoisonedTorch())
    return triton_device


def _mask(kind: str, batch: int, seqlen: int, device) -> torch.Tensor | None:
    """Key padding patterns (True = real token)."""
    if kind == "none":
        return None
    if kind == "right":  # right padding, the tokenizer's way; sequence 0 is full
        lengths = [seqlen] + [max(1, seqlen // (b + 2)) for b in range(1, batch)]
        mask = torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]
    elif kind == "single":  # a sequence of length 1 next to a full one
        mask = torch.zeros(batch, seqlen, dtype=torch.bool)
        mask[0, 0] = True
        mask[1:] = True
    elif kind == "holes":  # random holes anywhere, and a sequence that is all padding
        mask = torch.rand(batch, seqlen) < 0.7
        mask[0, torch.randint(seqlen, (1,))] = True
        mask[-1] = False
    else:
        raise ValueError(kind)
    return mask.to(device)


def _cu_seqlens(lengths: list[int], device) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _grads(fn, inputs, grad_out, dtype):
    """``fn`` run on copies of ``inputs`` cast to ``dtype``: output and gradients of them all."""
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, grad_out.to(dtype))
    return out, grads


def _triton(q, k, v, grad_out, *, mask=None, cu=None, max_seqlen=None, scale=None, p=0.0,
            seed=None, fwd=None):
    """The Triton custom op, or the forward op ``fwd`` of the same signature (forward +
    registered autograd): output and (dq, dk, dv)."""
    if max_seqlen is None:
        max_seqlen = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fwd = fwd or torch.ops.roberta_fast.attention_triton_fwd

    def fn(q, k, v):
        return fwd(q, k, v, mask, cu, max_seqlen, scale, p, seed)[0]

    return _grads(fn, (q, k, v), grad_out, q.dtype)


def _check_all(name, got, ref, base, dtype, factor=2.0):
    """Output and the three gradients against float64, at most ``factor`` x plain PyTorch."""
    (out, grads), (ref_out, ref_grads), (base_out, base_grads) = got, ref, base
    size = max(t.norm().item() for t in (ref_out, *ref_grads))
    for g, r, b, n in zip((out, *grads), (ref_out, *ref_grads), (base_out, *base_grads),
                          ("out", "dq", "dk", "dv")):
        # With one key per row (L = 1) plain PyTorch is exact (p = 1, so dq = dk = 0) while the
        # kernel's p = exp(s - LSE) and dP - delta are 1 and 0 only up to fp32 rounding.
        if r.norm() == 0:  # a relative error means nothing here: compare with the other results
            assert torch.isfinite(g).all() and g.norm() <= MAX_ERR[dtype] * size, f"{name} {n}"
            continue
        floor = 1e-6 if rel_err(b, r) == 0 and dtype == torch.float32 else None
        assert_close(g, r, baseline=b, dtype=dtype, name=f"{name} {n}", factor=factor,
                     floor=floor)


# --------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU; CUDA when there is one)
# --------------------------------------------------------------------------------------------

PADDED_CASES = [
    # B, L, heads, D, padding
    (1, 1, 1, 32, "none"),
    (2, 7, 2, 32, "right"),
    (2, 33, 2, 64, "holes"),
    (2, 33, 1, 32, "single"),
    (1, 97, 2, 32, "none"),
    (2, 97, 1, 64, "right"),
]


@pytest.mark.parametrize("batch,seqlen,heads,head_dim,padding", PADDED_CASES)
def test_triton_padded_matches_reference(poisoned, batch, seqlen, heads, head_dim, padding):
    dev = poisoned
    q, k, v = (randn(batch, seqlen, heads, head_dim, device=dev) for _ in range(3))
    grad_out = randn(batch, seqlen, heads, head_dim, device=dev)
    mask = _mask(padding, batch, seqlen, dev)

    got = _triton(q, k, v, grad_out, mask=mask)
    ref = _grads(lambda *x: forward_native(*x, key_padding_mask=mask), (q, k, v), grad_out, F64)
    base = _grads(lambda *x: forward_native(*x, key_padding_mask=mask), (q, k, v), grad_out,
                  q.dtype)
    _check_all(f"padded {padding}", got, ref, base, q.dtype)

    if mask is not None:
        out, (dq, dk, dv) = got
        pad = ~mask
        # Padded query rows are exactly zero and get no gradient; padded keys get no gradient.
        assert (out[pad] == 0).all() and (dq[pad] == 0).all()
        assert (dk[pad] == 0).all() and (dv[pad] == 0).all()


def test_triton_lse_convention(poisoned):
    dev = poisoned
    batch, seqlen, heads, head_dim = 2, 19, 2, 32
    q, k, v = (randn(batch, seqlen, heads, head_dim, device=dev) for _ in range(3))
    mask = _mask("holes", batch, seqlen, dev)
    scale = 0.3
    out, lse = kernels.attention_fwd(q, k, v, mask, None, seqlen, scale, 0.0, None)
    _check_lse_convention(lse, q, k, mask, scale)


def _check_lse_convention(lse, q, k, mask, scale):
    """LSE ``[B, heads, L]``: natural-log log-sum-exp of ``scale * q.k`` over the real keys."""
    batch, seqlen, heads, _ = q.shape
    assert lse.shape == (batch, heads, seqlen) and lse.dtype == torch.float32
    scores = torch.einsum("bihd,bjhd->bhij", q.to(F64), k.to(F64)) * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    expect = torch.logsumexp(scores, dim=-1)
    real = mask[:, None, :].expand(batch, heads, seqlen)
    assert rel_err(lse[real], expect[real]) < 1e-6
    # Padded query rows: LSE = +inf, so the backward's recomputed probabilities are exactly 0.
    assert torch.isposinf(lse[~real]).all()


def test_triton_noncontiguous_inputs(poisoned):
    dev = poisoned
    batch, seqlen, heads, head_dim = 2, 21, 2, 32
    # q, k, v as slices of one fused projection output (strided tokens and heads) ...
    qkv = randn(batch, seqlen, 3, heads, head_dim, device=dev)
    q, k, v = qkv.unbind(2)
    # ... and v with a strided last dimension as well.
    v = noncontiguous(v)
    grad_out = noncontiguous(randn(batch, seqlen, heads, head_dim, device=dev))
    mask = _mask("right", batch, seqlen, dev)
    got = _triton(q, k, v, grad_out, mask=mask)
    ref = _grads(lambda *x: forward_native(*x, key_padding_mask=mask), (q, k, v), grad_out, F64)
    base = _grads(lambda *x: forward_native(*x, key_padding_mask=mask), (q, k, v), grad_out,
                  q.dtype)
    _check_all("strided", got, ref, base, q.dtype)


def test_triton_odd_head_dim_and_scale(poisoned):
    dev = poisoned
    batch, seqlen, heads, head_dim = 1, 23, 2, 40  # 40 is padded to a 64-wide tile
    q, k, v = (randn(batch, seqlen, heads, head_dim, device=dev, scale=2.0) for _ in range(3))
    grad_out = randn(batch, seqlen, heads, head_dim, device=dev)
    got = _triton(q, k, v, grad_out, scale=0.05)
    ref = _grads(lambda *x: forward_native(*x, scale=0.05), (q, k, v), grad_out, F64)
    base = _grads(lambda *x: forward_native(*x, scale=0.05), (q, k, v), grad_out, q.dtype)
    _check_all("D=40", got, ref, base, q.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(poisoned, dtype):
    dev = poisoned
    batch, seqlen, heads, head_dim = 1, 33, 2, 64
    q, k, v = (randn(batch, seqlen, heads, head_dim, device=dev, dtype=dtype) for _ in range(3))
    grad_out = randn(batch, seqlen, heads, head_dim, device=dev, dtype=dtype)
    mask = _mask("right", batch, seqlen, dev)
    got = _triton(q, k, v, grad_out, mask=mask)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1])
    ref = _grads(lambda *x: forward_native(*x, key_padding_mask=mask), (q, k, v), grad_out, F64)
    base = _grads(lambda *x: forward_native(*x, key_padding_mask=mask), (q, k, v), grad_out,
                  dtype)
    # The interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest): allow 3x there.
    factor = 3.0 if dtype == torch.bfloat16 and dev == "cpu" else 2.0
    _check_all(str(dtype), got, ref, base, dtype, factor=factor)


VARLEN_CASES = [
    [5, 1, 37],
    [16, 0, 20, 3],  # an empty sequence in the middle
    [97],
]


@pytest.mark.parametrize("lengths", VARLEN_CASES)
def test_triton_varlen_matches_reference(poisoned, lengths):
    dev = poisoned
    heads, head_dim = 2, 32
    total = sum(lengths)
    cu = _cu_seqlens(lengths, dev)
    q, k, v = (randn(total, heads, head_dim, device=dev) for _ in range(3))
    grad_out = randn(total, heads, head_dim, device=dev)
    # max_seqlen larger than needed is allowed: it only sizes the grid.
    max_seqlen = max(lengths) + 3
    got = _triton(q, k, v, grad_out, cu=cu, max_seqlen=max_seqlen)
    ref = _grads(lambda *x: varlen_forward_native(*x, cu), (q, k, v), grad_out, F64)
    base = _grads(lambda *x: varlen_forward_native(*x, cu), (q, k, v), grad_out, q.dtype)
    _check_all(f"varlen {lengths}", got, ref, base, q.dtype)
    _, lse = kernels.attention_fwd(q, k, v, None, cu, max_seqlen, head_dim ** -0.5, 0.0, None)
    assert lse.shape == (heads, total) and torch.isfinite(lse).all()


def _pad_packed(x: torch.Tensor, lengths: list[int], seqlen: int) -> torch.Tensor:
    out = torch.zeros(len(lengths), seqlen, *x.shape[1:], dtype=x.dtype, device=x.device)
    start = 0
    for b, n in enumerate(lengths):
        out[b, :n] = x[start:start + n]
        start += n
    return out


def _unpad(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    return torch.cat([x[b, :n] for b, n in enumerate(lengths)])


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_triton_padded_and_varlen_agree(poisoned, p):
    dev = poisoned
    lengths, heads, head_dim = [7, 18, 1], 2, 32
    seqlen, total = max(lengths), sum(lengths)
    cu = _cu_seqlens(lengths, dev)
    q, k, v, grad_out = (randn(total, heads, head_dim, device=dev) for _ in range(4))
    seed = new_seed(dev) if p > 0 else None
    packed = _triton(q, k, v, grad_out, cu=cu, max_seqlen=seqlen, p=p, seed=seed)
    mask = _mask_from_lengths(lengths, seqlen, dev)
    padded = _triton(*(_pad_packed(t, lengths, seqlen) for t in (q, k, v)),
                     _pad_packed(grad_out, lengths, seqlen), mask=mask, p=p, seed=seed)
    # The same sequences with the same seed: the same values, dropout mask included.
    for a, b in zip((packed[0], *packed[1]), (padded[0], *padded[1])):
        assert rel_err(_unpad(b, lengths), a) < 1e-6


def _mask_from_lengths(lengths, seqlen, device):
    return (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).to(device)


def test_triton_backward_is_deterministic(triton_device):
    dev = triton_device
    q, k, v, grad_out = (randn(2, 29, 2, 32, device=dev) for _ in range(4))
    mask = _mask("holes", 2, 29, dev)
    first = _triton(q, k, v, grad_out, mask=mask)
    second = _triton(q, k, v, grad_out, mask=mask)
    for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b)


def test_triton_empty_inputs(triton_device):
    dev = triton_device
    q = randn(0, 5, 2, 32, device=dev)
    out, lse = kernels.attention_fwd(q, q, q, None, None, 5, 0.2, 0.0, None)
    assert out.shape == q.shape and lse.shape == (0, 2, 5)
    no_tokens = randn(2, 0, 2, 32, device=dev)
    mask = torch.ones(2, 0, dtype=torch.bool, device=dev)
    out, lse = kernels.attention_fwd(no_tokens, no_tokens, no_tokens, mask, None, 0, 0.2, 0.0, None)
    assert out.shape == no_tokens.shape and lse.shape == (2, 2, 0)
    packed = randn(0, 2, 32, device=dev)
    cu = torch.zeros(3, dtype=torch.int32, device=dev)
    with roberta_fast.use_backend("triton"):
        out = attention_varlen(packed, packed, packed, cu, 0)
    assert out.shape == packed.shape


# --------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------

def test_dropout_mask_statistics_and_seeds(triton_device):
    dev = triton_device
    batch, heads, seqlen, p = 2, 2, 45, 0.3
    seed = new_seed(dev)
    mask = kernels.dropout_mask(seed, batch, heads, seqlen, p)
    assert mask.shape == (batch, heads, seqlen, seqlen) and mask.dtype == torch.bool
    kept = mask.float().mean().item()
    assert abs(kept - (1 - p)) <= binomial_bound(mask.numel(), 1 - p)
    # Same seed, same mask; another seed, another mask (about 2 p (1 - p) of the entries differ).
    assert torch.equal(mask, kernels.dropout_mask(seed.clone(), batch, heads, seqlen, p))
    other = kernels.dropout_mask(seed + 1, batch, heads, seqlen, p)
    differ = (mask != other).float().mean().item()
    assert abs(differ - 2 * p * (1 - p)) <= binomial_bound(mask.numel(), 2 * p * (1 - p))
    # Heads and sequences draw independent masks.
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])


# The numbers of uniform_words(), which follows csrc/common/philox.h step by step.
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)


def _philox_words(seed: int, counters: np.ndarray) -> list[np.ndarray]:
    """Philox4x32-10 of ``counters`` (uint64) under ``seed``: the four uint32 words."""
    low = np.uint64(0xFFFFFFFF)
    c0, c1 = counters & low, counters >> np.uint64(32)
    c2 = c3 = np.zeros_like(counters)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    round_a, round_b = (np.uint64(x) for x in _PHILOX_ROUND)
    for _ in range(10):
        prod_b, prod_a = round_b * c2, round_a * c0  # < 2**64: exact in uint64
        c0, c2 = (prod_b >> np.uint64(32)) ^ c1 ^ k0, (prod_a >> np.uint64(32)) ^ c3 ^ k1
        c1, c3 = prod_b & low, prod_a & low
        k0 = (k0 + np.uint64(_PHILOX_KEY[0])) & low
        k1 = (k1 + np.uint64(_PHILOX_KEY[1])) & low
    return [c0, c1, c2, c3]


def _contract_mask(seed: int, batch: int, heads: int, lmax: int, p: float) -> torch.Tensor:
    """The attention dropout contract written out: element (b, h, i, j) has offset
    o = ((b * heads + h) * Lmax + i) * Lmax + j and is kept iff the uniform float of word o & 3
    of Philox counter o >> 2 is > p."""
    offsets = np.arange(batch * heads * lmax * lmax, dtype=np.uint64)
    words = _philox_words(seed, offsets >> np.uint64(2))
    pick = (offsets & np.uint64(3)).astype(np.int64)
    bits = np.choose(pick, words).astype(np.uint32).view(np.int32)
    folded = np.where(bits < 0, ~bits, bits)
    uniform = folded.astype(np.float32) * np.float32(4.6566127342e-10)
    keep = uniform > np.float32(p)
    return torch.from_numpy(keep.reshape(batch, heads, lmax, lmax))


@pytest.mark.parametrize("seqlen", [7, 36, 37])
def test_dropout_mask_follows_the_contract(triton_device, seqlen):
    batch, heads, p = 2, 3, 0.3
    seed = new_seed(triton_device)
    got = kernels.dropout_mask(seed, batch, heads, seqlen, p).cpu()
    assert torch.equal(got, _contract_mask(int(seed.item()), batch, heads, seqlen, p))


def _one_hot(batch, seqlen, heads, head_dim, device):
    """``[B, L, heads, D]`` (D >= L) whose token t is the unit vector e_t in every head."""
    eye = torch.eye(seqlen, head_dim, device=device)
    return eye[None, :, None, :].expand(batch, seqlen, heads, head_dim).contiguous()


# Lmax % 4 == 0 runs the one-Philox-call-per-four-elements path, other lengths the per-element one.
@pytest.mark.parametrize("layout,lengths", [("padded", [7, 3]), ("padded", [36, 20]),
                                            ("padded", [97, 60]), ("varlen", [7, 2]),
                                            ("varlen", [20, 36, 1]), ("varlen", [40, 97])],
                         ids=lambda x: x if isinstance(x, str) else f"Lmax{max(x)}")
def test_triton_dropout_is_dropout_mask(poisoned, layout, lengths):
    """The kernels' dropout element by element: with q = 0 every real key gets weight 1 / n,
    and V = (e_j)_j puts probability (i, j) in out[i, j]; dO = (e_i)_i puts it in dV[j, i]."""
    dev, heads, p = poisoned, 2, 0.3
    lmax, batch = max(lengths), len(lengths)
    head_dim = lmax if lmax % 2 == 0 else lmax + 1  # >= Lmax, and odd dims go through padding
    real = _mask_from_lengths(lengths, lmax, dev)
    q = torch.zeros(batch, lmax, heads, head_dim, device=dev)
    k = randn(batch, lmax, heads, head_dim, device=dev)
    v, grad_out = _one_hot(batch, lmax, heads, head_dim, dev), _one_hot(batch, lmax, heads,
                                                                         head_dim, dev)
    if layout == "padded":
        kwargs = dict(mask=real)
    else:
        q, k, v, grad_out = (t[real] for t in (q, k, v, grad_out))
        kwargs = dict(cu=_cu_seqlens(lengths, dev), max_seqlen=lmax)
    seed = new_seed(dev)
    out, (dq, dk, dv) = _triton(q, k, v, grad_out, p=p, seed=seed, **kwargs)
    if layout == "varlen":
        out, dv = (_pad_packed(t, lengths, lmax) for t in (out, dv))
    drop = kernels.dropout_mask(seed, batch, heads, lmax, p)
    both_real = real[:, None, :, None] & real[:, None, None, :]  # [B, 1, i, j]
    expect = drop & both_real
    # out[b, i, h, j] = keep / (n (1 - p)) and dV[b, j, h, i] = the same for real i and j.
    assert torch.equal(out[..., :lmax].permute(0, 2, 1, 3) > 0, expect)
    assert torch.equal(dv[..., :lmax].permute(0, 2, 3, 1) > 0, expect)
    n = real.sum(1).to(out.dtype)[:, None, None, None]
    scaled = expect.to(out.dtype) / (n * (1 - p))
    assert torch.allclose(out[..., :lmax].permute(0, 2, 1, 3), scaled, rtol=1e-6, atol=0)
    # dQ: its own kernel and its own dropout draws, checked against the reference fed the mask
    # (one wrong element moves it by about 1e-3 here).
    if layout == "padded":
        def reference(*x):
            return forward_native(*x, key_padding_mask=real, dropout_mask=drop, dropout_p=p)
    else:
        def reference(*x):
            return varlen_forward_native(*x, kwargs["cu"], dropout_mask=drop, dropout_p=p)
    ref_dq = _grads(reference, (q, k, v), grad_out, F64)[1][0]
    assert rel_err(dq, ref_dq) < 1e-5


@pytest.mark.parametrize("padding,seqlen", [("right", 37), ("holes", 36)])
def test_triton_dropout_matches_reference_fed_the_mask(poisoned, padding, seqlen):
    dev = poisoned
    batch, heads, head_dim, p = 2, 2, 32, 0.2
    q, k, v, grad_out = (randn(batch, seqlen, heads, head_dim, device=dev) for _ in range(4))
    mask = _mask(padding, batch, seqlen, dev)
    seed = new_seed(dev)
    drop = kernels.dropout_mask(seed, batch, heads, seqlen, p)

    def reference(*x):
        return forward_native(*x, key_padding_mask=mask, dropout_mask=drop, dropout_p=p)

    got = _triton(q, k, v, grad_out, mask=mask, p=p, seed=seed)
    ref = _grads(reference, (q, k, v), grad_out, F64)
    base = _grads(reference, (q, k, v), grad_out, q.dtype)
    # Matching in the forward and in all three gradients proves the backward regenerates the
    # forward's mask.
    _check_all(f"dropout {padding}", got, ref, base, q.dtype)
    # And dropout did something.
    no_drop = forward_native(q.to(F64), k.to(F64), v.to(F64), key_padding_mask=mask)
    assert rel_err(got[0], no_drop) > 0.05


def test_triton_varlen_dropout_matches_reference_fed_the_mask(poisoned):
    dev = poisoned
    lengths, heads, head_dim, p = [9, 30, 2], 2, 32, 0.35
    total, max_seqlen = sum(lengths), max(lengths)
    cu = _cu_seqlens(lengths, dev)
    q, k, v, grad_out = (randn(total, heads, head_dim, device=dev) for _ in range(4))
    seed = new_seed(dev)
    drop = kernels.dropout_mask(seed, len(lengths), heads, max_seqlen, p)

    def reference(*x):
        return varlen_forward_native(*x, cu, dropout_mask=drop, dropout_p=p)

    got = _triton(q, k, v, grad_out, cu=cu, max_seqlen=max_seqlen, p=p, seed=seed)
    ref = _grads(reference, (q, k, v), grad_out, F64)
    base = _grads(reference, (q, k, v), grad_out, q.dtype)
    _check_all("varlen dropout", got, ref, base, q.dtype)


def test_triton_dropout_zero_is_exactly_no_dropout(triton_device):
    dev = triton_device
    q, k, v, grad_out = (randn(2, 19, 2, 32, device=dev) for _ in range(4))
    mask = _mask("right", 2, 19, dev)
    plain = _triton(q, k, v, grad_out, mask=mask)
    with roberta_fast.use_backend("triton"):
        out = attention(q, k, v, key_padding_mask=mask, dropout_p=0.0)
    assert torch.equal(out, plain[0])
    # A probability so small that nothing is dropped runs the dropout code path of every kernel,
    # and its 1 / (1 - p) rounds to 1 in fp32: the result must be bit-identical.
    seed = new_seed(dev)
    tiny = _triton(q, k, v, grad_out, mask=mask, p=1e-12, seed=seed)
    for a, b in zip((plain[0], *plain[1]), (tiny[0], *tiny[1])):
        assert torch.equal(a, b)


def test_ops_dropout_draws_a_new_mask_per_call(triton_device):
    dev = triton_device
    q, k, v = (randn(1, 17, 2, 32, device=dev) for _ in range(3))
    cuda_devices = [torch.cuda.current_device()] if dev == "cuda" else []
    # Reseeding tests reproducibility; fork_rng keeps it from fixing the later tests' inputs.
    with roberta_fast.use_backend("triton"), torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(1234)
        first = attention(q, k, v, dropout_p=0.5)
        second = attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(1234)
        again = attention(q, k, v, dropout_p=0.5)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


# --------------------------------------------------------------------------------------------
# Dispatch: the cpu (SDPA) and reference backends, and the Triton backend through ops
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("padding", ["none", "holes"])
def test_ops_attention_backends(backend, padding, triton_device):
    dev = "cpu" if backend != "triton" else triton_device
    batch, seqlen, heads, head_dim = 2, 13, 2, 32
    q, k, v, grad_out = (randn(batch, seqlen, heads, head_dim, device=dev) for _ in range(4))
    mask = _mask(padding, batch, seqlen, dev)

    def run(*x):
        return attention(*x, key_padding_mask=mask)

    with roberta_fast.use_backend(backend):
        got = _grads(run, (q, k, v), grad_out, q.dtype)
        # The cpu and reference paths also take float64.
        if backend != "triton":
            got64 = _grads(run, (q, k, v), grad_out, F64)
    ref = _grads(lambda *x: forward_native(*x, key_padding_mask=mask), (q, k, v), grad_out, F64)
    base = _grads(lambda *x: forward_native(*x, key_padding_mask=mask), (q, k, v), grad_out,
                  q.dtype)
    _check_all(backend, got, ref, base, q.dtype)
    if backend != "triton":
        for a, b in zip((got64[0], *got64[1]), (ref[0], *ref[1])):
            assert rel_err(a, b) < 1e-12
    if mask is not None:
        assert (got[0][~mask] == 0).all() and (got[1][0][~mask] == 0).all()


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_ops_attention_varlen_backends(backend, triton_device):
    dev = "cpu" if backend != "triton" else triton_device
    lengths, heads, head_dim = [4, 0, 21, 1], 2, 32
    total = sum(lengths)
    cu = _cu_seqlens(lengths, dev)
    q, k, v, grad_out = (randn(total, heads, head_dim, device=dev) for _ in range(4))

    def run(*x):
        return attention_varlen(*x, cu, max(lengths))

    with roberta_fast.use_backend(backend):
        got = _grads(run, (q, k, v), grad_out, q.dtype)
    ref = _grads(lambda *x: varlen_forward_native(*x, cu), (q, k, v), grad_out, F64)
    base = _grads(lambda *x: varlen_forward_native(*x, cu), (q, k, v), grad_out, q.dtype)
    _check_all(f"varlen {backend}", got, ref, base, q.dtype)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cpu_and_reference_dropout(backend):
    batch, seqlen, heads, head_dim, p = 2, 64, 2, 8, 0.4
    # q = 0 gives uniform attention and v = 1 makes the output count the surviving keys.
    q = torch.zeros(batch, seqlen, heads, head_dim)
    k = randn(batch, seqlen, heads, head_dim)
    v = torch.ones(batch, seqlen, heads, head_dim)
    with roberta_fast.use_backend(backend):
        out = attention(q, k, v, dropout_p=p)
        off = attention(q, k, v, dropout_p=0.0)
    # With uniform attention each output is (kept keys / L) / (1 - p): mean 1, not exactly 1.
    assert torch.allclose(off, torch.ones_like(off))
    assert not torch.allclose(out, off)
    kept = out.mean().item() * (1 - p)
    assert abs(kept - (1 - p)) <= binomial_bound(batch * heads * seqlen * seqlen, 1 - p)


# q . k of a NaN key is NaN before the mask replaces it: numpy says so in the interpreter.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("backend", ["triton", "reference", "cpu",
                                     pytest.param("cuda", marks=pytest.mark.gpu)])
def test_nan_in_padded_keys_and_values_stays_out_of_real_rows(backend, request):
    dev = {"triton": None, "cuda": "cuda"}.get(backend, "cpu")
    if dev is None:
        dev = request.getfixturevalue("triton_device")
    # bf16 on cuda: the C++ forward's dtype (fp32 would run the Triton kernels there)
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    batch, seqlen, heads, head_dim = 3, 37, 2, 32  # padding inside full key tiles too
    q, k, v, grad_out = (randn(batch, seqlen, heads, head_dim, device=dev, dtype=dtype)
                         for _ in range(4))
    mask = _mask("holes", batch, seqlen, dev)  # the last sequence is all padding
    mask[1, seqlen // 2:] = False
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[~mask] = float("nan")
    v_bad[~mask] = float("inf")
    v_bad[~mask & (torch.arange(seqlen, device=dev) % 2 == 0)] = float("nan")

    def run(*x):
        return attention(*x, key_padding_mask=mask)

    with roberta_fast.use_backend(backend):
        clean = _grads(run, (q, k, v), grad_out, q.dtype)
        dirty = _grads(run, (q, k_bad, v_bad), grad_out, q.dtype)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (clean[0], *clean[1]), (dirty[0], *dirty[1])):
        assert torch.isfinite(b).all(), f"{backend} {name}: non-finite values"
        assert torch.equal(a, b), f"{backend} {name}: padded keys changed real results"
    assert (dirty[0][~mask] == 0).all() and (dirty[1][1][~mask] == 0).all()


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def _bad_padded_cases():
    q = randn(2, 5, 2, 8)
    ok_mask = torch.ones(2, 5, dtype=torch.bool)
    return [
        ((q[0], q[0], q[0]), {}, ValueError, "must be"),
        ((q, q, q[:, :4]), {}, ValueError, "same shape"),
        ((q, q, q.double()), {}, TypeError, "share a dtype"),
        ((q.int(), q.int(), q.int()), {}, TypeError, "floating"),
        ((q, q, q.numpy()), {}, TypeError, "torch.Tensor"),
        ((q, q, q), {"key_padding_mask": ok_mask.int()}, TypeError, "bool"),
        ((q, q, q), {"key_padding_mask": ok_mask[:, :4]}, ValueError, r"\[B, L\]"),
        ((q, q, q), {"key_padding_mask": ok_mask.to("meta")}, ValueError, "meta"),
        ((q, q, q), {"dropout_p": 1.0}, ValueError, "dropout_p"),
        ((q, q, q), {"dropout_p": -0.1}, ValueError, "dropout_p"),
        ((q, q, q), {"dropout_p": "0.1"}, TypeError, "dropout_p"),
        ((q, q, q), {"scale": float("nan")}, ValueError, "scale"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_padded_cases())))
def test_attention_bad_input(case):
    args, kwargs, exc, match = _bad_padded_cases()[case]
    with roberta_fast.use_backend("reference"):
        with pytest.raises(exc, match=match):
            attention(*args, **kwargs)


def _bad_varlen_cases():
    q = randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    return [
        ((q, q, q, cu.long(), 6), TypeError, "int32"),
        ((q, q, q, cu[None], 6), ValueError, "1-D"),
        ((q, q, q, cu[:1], 6), ValueError, "1-D"),
        ((q, q, q, cu + 1, 6), ValueError, "start at 0"),
        ((q, q, q, torch.tensor([0, 6, 4, 10], dtype=torch.int32), 6), ValueError,
         "non-decreasing"),
        ((q, q, q, torch.tensor([0, 4, 9], dtype=torch.int32), 6), ValueError, "total_tokens"),
        ((q, q, q, cu, 5), ValueError, "max_seqlen"),
        ((q, q, q, cu, 6.0), TypeError, "max_seqlen"),
        ((q, q, q, cu.tolist(), 6), TypeError, "cu_seqlens"),
        ((q[None], q[None], q[None], cu, 6), ValueError, "total_tokens"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_varlen_cases())))
def test_attention_varlen_bad_input(case):
    args, exc, match = _bad_varlen_cases()[case]
    with roberta_fast.use_backend("reference"):
        with pytest.raises(exc, match=match):
            attention_varlen(*args)


class _FakeAutotuner:
    """Stands in for a triton.autotune kernel: records which way ``_launch`` launched it."""

    def __init__(self, calls):
        self.base_fn = test_launch_tunes_unless_off_or_capturing
        self.fn = self
        self.calls = calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            # The autotuner adds the tile itself; an untuned launch passes one.
            self.calls.append("untuned" if "BLOCK_M" in kwargs else "tuned")
            if "BLOCK_M" in kwargs:
                self.calls.append({k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps",
                                                          "num_stages", "maxnreg")})
        return launch


def test_launch_tunes_unless_off_or_capturing(monkeypatch):
    """Tuning times every candidate with device syncs: skipped with ROBERTA_FAST_AUTOTUNE=0, and
    while a CUDA graph is captured unless the problem was tuned before (launch logic only)."""
    capturing = [False]
    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(kernels, "_TUNED", set())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(kernels, "_arch", lambda device: 90)
    q = torch.empty(2, 100, 2, 64, dtype=torch.bfloat16)
    lay = kernels._Layout(q, torch.ones(2, 100, dtype=torch.bool), None, 100)
    first = kernels.pickable_tiles(kernels._DKDV_TUNING, arch=90, fp32=False, bucket=lay.bucket,
                                   block_d=64, draw=kernels.DRAW_GROUPED)[0]
    expect = first.options()
    calls = []

    class CudaArg:
        is_cuda = True
        device = "cuda"

    def launch():
        kernels._launch(_FakeAutotuner(calls), kernels._DKDV_TUNING, lay, "BLOCK_N",
                        torch.bfloat16, True, (CudaArg(),))
        return calls.pop(0)

    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "0")
    assert launch() == "untuned" and calls.pop() == expect
    monkeypatch.delenv(kernels.AUTOTUNE_ENV)
    capturing[0] = True
    assert launch() == "untuned" and calls.pop() == expect  # never tuned: no timing runs now
    capturing[0] = False
    assert launch() == "tuned"
    capturing[0] = True
    assert launch() == "tuned"  # tuned before: the autotuner's cached choice, no timing runs
    assert not calls


def test_triton_backend_rejects_what_it_cannot_run(triton_device):
    dev = triton_device
    with roberta_fast.use_backend("triton"):
        big = randn(1, 4, 1, 136, device=dev)
        with pytest.raises(ValueError, match="head dims up to 128"):
            attention(big, big, big)
        wide = randn(1, 4, 1, 8, device=dev, dtype=F64)
        with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
            attention(wide, wide, wide)
    # More sequences than the launch grid can hold is an error, not a partial result.
    many = randn(70000, 1, 8, device=dev)
    cu = torch.arange(70001, dtype=torch.int32, device=dev)
    with pytest.raises(ValueError, match="65535"):
        kernels.attention_fwd(many, many, many, None, cu, 1, 0.3, 0.0, None)
    with pytest.raises(TypeError, match="seed"):
        kernels.dropout_mask(torch.zeros(1, dtype=torch.int32, device=dev), 1, 1, 4, 0.1)
    with pytest.raises(ValueError, match="seed"):
        q = randn(1, 4, 1, 8, device=dev)
        kernels.attention_fwd(q, q, q, None, None, 4, 0.3, 0.1, None)


# --------------------------------------------------------------------------------------------
# torch.library
# --------------------------------------------------------------------------------------------

def test_opcheck_triton_ops(triton_device):
    dev = triton_device
    batch, seqlen, heads, head_dim = 2, 5, 1, 16
    q, k, v = (randn(batch, seqlen, heads, head_dim, device=dev, requires_grad=True)
               for _ in range(3))
    mask = _mask("right", batch, seqlen, dev)
    scale = head_dim ** -0.5
    fwd = torch.ops.roberta_fast.attention_triton_fwd.default
    torch.library.opcheck(fwd, (q, k, v, mask, None, seqlen, scale, 0.0, None))

    cu = _cu_seqlens([3, 6], dev)
    qp, kp, vp = (randn(9, heads, head_dim, device=dev, requires_grad=True) for _ in range(3))
    seed = new_seed(dev)
    torch.library.opcheck(fwd, (qp, kp, vp, None, cu, 6, scale, 0.3, seed))

    with torch.no_grad():
        out, lse = fwd(q, k, v, mask, None, seqlen, scale, 0.0, None)
    grad_out = randn(batch, seqlen, heads, head_dim, device=dev)
    bwd = torch.ops.roberta_fast.attention_triton_bwd.default
    torch.library.opcheck(bwd, (grad_out, q.detach(), k.detach(), v.detach(), out, lse, mask,
                                None, seqlen, scale, 0.0, None))


# --------------------------------------------------------------------------------------------
# CPU C++ kernels (csrc/cpu/attention.cpp): roberta_fast::attention_fwd / attention_bwd
# --------------------------------------------------------------------------------------------
# The ops allocate their outputs in C++, out of reach of NaN poisoning; csrc/tests/
# test_attention.cpp runs the kernels on NaN-filled outputs. Here every output is checked
# against float64 (so an unwritten element would fail anyway) and padded rows are exactly 0.

needs_cpu_kernel = pytest.mark.skipif(not backends.has_native_op("attention_fwd", "cpu"),
                                      reason="NOT RUN: roberta_fast._C is not built")


def _cpu_kernel(q, k, v, grad_out, **kwargs):
    """The C++ CPU op (forward + registered autograd): output and (dq, dk, dv)."""
    return _triton(q, k, v, grad_out, fwd=torch.ops.roberta_fast.attention_fwd, **kwargs)


def _check_varlen_dropout(name, run, device, mask_device, dtype, lengths, max_seqlen, *, heads,
                          head_dim, p):
    """``run`` (``_triton`` or ``_cpu_kernel``) on a packed batch with dropout against the float64
    reference fed the mask the Triton kernels draw (on ``mask_device``) for the same seed."""
    cu = _cu_seqlens(lengths, device)
    q, k, v, grad_out = (randn(sum(lengths), heads, head_dim, device=device, dtype=dtype)
                         for _ in range(4))
    seed = new_seed(device)
    drop = kernels.dropout_mask(seed.to(mask_device), len(lengths), heads, max_seqlen,
                                p).to(device)

    def reference(*x):
        return varlen_forward_native(*x, cu, dropout_mask=drop, dropout_p=p)

    got = run(q, k, v, grad_out, cu=cu, max_seqlen=max_seqlen, p=p, seed=seed)
    ref = _grads(reference, (q, k, v), grad_out, F64)
    base = _grads(reference, (q, k, v), grad_out, dtype)
    _check_all(name, got, ref, base, dtype)


def _check_padded_rows_zero(got, mask):
    out, (dq, dk, dv) = got
    pad = ~mask
    # Padded query rows are exactly zero and get no gradient; padded keys get no gradient.
    assert (out[pad] == 0).all() and (dq[pad] == 0).all()
    assert (dk[pad] == 0).all() and (dv[pad] == 0).all()


CPU_PADDED_CASES = PADDED_CASES + [
    # B, L, heads, D, padding
    (2, 97, 2, 128, "right"),
    (1, 97, 1, 40, "holes"),
    (3, 130, 2, 33, "right"),  # two key blocks, an odd head dim
    (1, 513, 1, 32, "holes"),  # several query and key blocks
]


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seqlen,heads,head_dim,padding", CPU_PADDED_CASES)
def test_cpu_kernel_padded_matches_reference(batch, seqlen, heads, head_dim, padding, dtype):
    q, k, v, grad_out = (randn(batch, seqlen, heads, head_dim, dtype=dtype) for _ in range(4))
    mask = _mask(padding, batch, seqlen, "cpu")

    def reference(*x):
        return forward_native(*x, key_padding_mask=mask)

    got = _cpu_kernel(q, k, v, grad_out, mask=mask)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1])
    ref = _grads(reference, (q, k, v), grad_out, F64)
    base = _grads(reference, (q, k, v), grad_out, dtype)
    _check_all(f"cpu padded {padding} {dtype}", got, ref, base, dtype)
    if mask is not None:
        _check_padded_rows_zero(got, mask)


@needs_cpu_kernel
def test_cpu_kernel_float16():
    batch, seqlen, heads, head_dim = 2, 45, 2, 64
    q, k, v, grad_out = (randn(batch, seqlen, heads, head_dim, dtype=torch.float16)
                         for _ in range(4))
    mask = _mask("right", batch, seqlen, "cpu")

    def reference(*x):
        return forward_native(*x, key_padding_mask=mask)

    got = _cpu_kernel(q, k, v, grad_out, mask=mask)
    ref = _grads(reference, (q, k, v), grad_out, F64)
    base = _grads(reference, (q, k, v), grad_out, torch.float16)
    _check_all("cpu float16", got, ref, base, torch.float16)


@needs_cpu_kernel
def test_cpu_kernel_lse_convention():
    batch, seqlen, heads, head_dim = 2, 19, 2, 32
    q, k, v = (randn(batch, seqlen, heads, head_dim) for _ in range(3))
    mask = _mask("holes", batch, seqlen, "cpu")
    scale = -0.3  # any finite scale, negative included
    out, lse = torch.ops.roberta_fast.attention_fwd(q, k, v, mask, None, seqlen, scale)
    _check_lse_convention(lse, q, k, mask, scale)
    assert rel_err(out, forward_native(q.to(F64), k.to(F64), v.to(F64), mask, scale)) < 1e-5


CPU_VARLEN_CASES = [
    [5, 1, 37],
    [16, 0, 20, 3],  # an empty sequence in the middle
    [97],
    [0, 0],  # no tokens at all
    [130, 2, 64],  # two key blocks next to short sequences
]


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", CPU_VARLEN_CASES)
def test_cpu_kernel_varlen_matches_reference(lengths, dtype):
    heads, head_dim = 2, 64
    total = sum(lengths)
    cu = _cu_seqlens(lengths, "cpu")
    q, k, v, grad_out = (randn(total, heads, head_dim, dtype=dtype) for _ in range(4))
    max_seqlen = max(lengths) + 3  # more than needed is allowed
    got = _cpu_kernel(q, k, v, grad_out, cu=cu, max_seqlen=max_seqlen)
    if total == 0:
        assert got[0].shape == q.shape and all(g.shape == q.shape for g in got[1])
        return
    ref = _grads(lambda *x: varlen_forward_native(*x, cu), (q, k, v), grad_out, F64)
    base = _grads(lambda *x: varlen_forward_native(*x, cu), (q, k, v), grad_out, dtype)
    _check_all(f"cpu varlen {lengths} {dtype}", got, ref, base, dtype)
    _, lse = torch.ops.roberta_fast.attention_fwd(q, k, v, None, cu, max_seqlen, 0.125)
    assert lse.shape == (heads, total) and torch.isfinite(lse).all()


@needs_cpu_kernel
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_cpu_kernel_padded_and_varlen_agree(p):
    lengths, heads, head_dim = [7, 18, 1], 2, 32
    seqlen, total = max(lengths), sum(lengths)
    cu = _cu_seqlens(lengths, "cpu")
    q, k, v, grad_out = (randn(total, heads, head_dim) for _ in range(4))
    seed = new_seed("cpu") if p > 0 else None
    packed = _cpu_kernel(q, k, v, grad_out, cu=cu, max_seqlen=seqlen, p=p, seed=seed)
    mask = _mask_from_lengths(lengths, seqlen, "cpu")
    padded = _cpu_kernel(*(_pad_packed(t, lengths, seqlen) for t in (q, k, v)),
                         _pad_packed(grad_out, lengths, seqlen), mask=mask, p=p, seed=seed)
    for a, b in zip((packed[0], *packed[1]), (padded[0], *padded[1])):
        assert rel_err(_unpad(b, lengths), a) < 1e-6


@needs_cpu_kernel
@pytest.mark.parametrize("layout", ["right", "holes", "varlen"])
def test_cpu_kernel_dropout_mask_is_the_triton_mask(layout, triton_device):
    # Uniform attention (q = 0) over n real keys with one-hot values (v[j] = e_j) makes the
    # output the kept mask itself: out[i, j] = keep[i, j] / (n (1 - p)).
    batch, seqlen, heads, p = 3, 45, 2, 0.3
    seed = new_seed("cpu")
    drop = kernels.dropout_mask(seed.to(triton_device), batch, heads, seqlen, p).cpu()
    eye = torch.eye(seqlen).reshape(1, seqlen, 1, seqlen).expand(batch, seqlen, heads, seqlen)
    q = torch.zeros(batch, seqlen, heads, seqlen)
    k = randn(batch, seqlen, heads, seqlen)
    if layout == "varlen":
        lengths = [45, 0, 17]
        cu = _cu_seqlens(lengths, "cpu")
        real = _mask_from_lengths(lengths, seqlen, "cpu")
        out, _ = torch.ops.roberta_fast.attention_fwd(
            q[real], k[real], eye[real].contiguous(), None, cu, seqlen, 1.0, p, seed)
        out = _pad_packed(out, lengths, seqlen)
    else:
        real = _mask(layout, batch, seqlen, "cpu")
        out, _ = torch.ops.roberta_fast.attention_fwd(q, k, eye.contiguous(), real, None,
                                                      seqlen, 1.0, p, seed)
    n = real.sum(1).clamp(min=1).reshape(batch, 1, 1, 1)
    kept = (out * n * (1 - p)).permute(0, 2, 1, 3) > 0.5  # [B, heads, L, L]
    pair = (real[:, None, :, None] & real[:, None, None, :]).expand_as(kept)
    assert torch.equal(kept[pair], drop[pair])
    assert not kept[~pair].any()
    assert abs(kept[pair].float().mean().item() - (1 - p)) <= binomial_bound(
        int(pair.sum()), 1 - p)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding", ["right", "holes"])
def test_cpu_kernel_dropout_matches_reference_fed_the_mask(padding, dtype, triton_device):
    batch, seqlen, heads, head_dim, p = 2, 37, 2, 32, 0.2
    q, k, v, grad_out = (randn(batch, seqlen, heads, head_dim, dtype=dtype) for _ in range(4))
    mask = _mask(padding, batch, seqlen, "cpu")
    seed = new_seed("cpu")
    drop = kernels.dropout_mask(seed.to(triton_device), batch, heads, seqlen, p).cpu()

    def reference(*x):
        return forward_native(*x, key_padding_mask=mask, dropout_mask=drop, dropout_p=p)

    got = _cpu_kernel(q, k, v, grad_out, mask=mask, p=p, seed=seed)
    ref = _grads(reference, (q, k, v), grad_out, F64)
    base = _grads(reference, (q, k, v), grad_out, dtype)
    # Matching in the forward and in all three gradients proves the backward regenerates the
    # forward's mask.
    _check_all(f"cpu dropout {padding} {dtype}", got, ref, base, dtype)
    _check_padded_rows_zero(got, mask)
    no_drop = forward_native(q.to(F64), k.to(F64), v.to(F64), key_padding_mask=mask)
    assert rel_err(got[0], no_drop) > 0.05


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_varlen_dropout_matches_reference_fed_the_mask(dtype, triton_device):
    lengths = [9, 30, 0, 2]
    _check_varlen_dropout(f"cpu varlen dropout {dtype}", _cpu_kernel, "cpu", triton_device, dtype,
                          lengths, max(lengths) + 2, heads=2, head_dim=40, p=0.35)


@needs_cpu_kernel
def test_cpu_kernel_dropout_seeds():
    q, k, v = (randn(2, 33, 2, 16) for _ in range(3))
    seed = new_seed("cpu")

    def run(s, p=0.4):
        return torch.ops.roberta_fast.attention_fwd(q, k, v, None, None, 33, 0.25, p, s)[0]

    assert torch.equal(run(seed), run(seed.clone()))
    assert not torch.equal(run(seed), run(seed + 1))
    # p = 0 and a p so small that nothing is dropped (1 / (1 - p) rounds to 1): identical.
    assert torch.equal(run(None, 0.0), run(seed, 1e-12))
    # Through ops: a fresh seed per call, reproducible under torch.manual_seed.
    with roberta_fast.use_backend("cpu"), torch.random.fork_rng():
        torch.manual_seed(1234)
        first = attention(q, k, v, dropout_p=0.5)
        second = attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(1234)
        again = attention(q, k, v, dropout_p=0.5)
    assert not torch.equal(first, second) and torch.equal(first, again)


@needs_cpu_kernel
def test_cpu_kernel_noncontiguous_inputs():
    batch, seqlen, heads, head_dim = 2, 21, 2, 32
    # q, k, v as slices of one fused projection output (strided tokens and heads) ...
    q, k, v = randn(batch, seqlen, 3, heads, head_dim).unbind(2)
    # ... and v with a strided last dimension as well (ops makes that one contiguous).
    v = noncontiguous(v)
    grad_out = noncontiguous(randn(batch, seqlen, heads, head_dim))
    mask = _mask("right", batch, seqlen, "cpu")

    def run(*x):
        return attention(*x, key_padding_mask=mask)

    with roberta_fast.use_backend("cpu"):
        got = _grads(run, (q, k, v), grad_out, q.dtype)
    ref = _grads(lambda *x: forward_native(*x, key_padding_mask=mask), (q, k, v), grad_out, F64)
    base = _grads(lambda *x: forward_native(*x, key_padding_mask=mask), (q, k, v), grad_out,
                  q.dtype)
    _check_all("cpu strided", got, ref, base, q.dtype)
    # The op itself reads the strided views as they are (no copy in between).
    qkv = randn(batch, seqlen, 3, heads, head_dim)
    direct, _ = torch.ops.roberta_fast.attention_fwd(*qkv.unbind(2), mask, None, seqlen, 0.2)
    copied, _ = torch.ops.roberta_fast.attention_fwd(*(t.contiguous() for t in qkv.unbind(2)),
                                                     mask, None, seqlen, 0.2)
    assert torch.equal(direct, copied)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_nonfinite_padding_does_not_leak(dtype):
    batch, seqlen, heads, head_dim = 2, 40, 2, 64
    q, k, v, grad_out = (randn(batch, seqlen, heads, head_dim, dtype=dtype) for _ in range(4))
    mask = _mask("holes", batch, seqlen, "cpu")
    clean = _cpu_kernel(q, k, v, grad_out, mask=mask, p=0.1, seed=torch.tensor([7]))
    for t, bad in zip((q, k, v, grad_out), (float("nan"), float("inf"), float("nan"),
                                            float("-inf"))):
        t[~mask] = bad
    dirty = _cpu_kernel(q, k, v, grad_out, mask=mask, p=0.1, seed=torch.tensor([7]))
    for a, b in zip((clean[0], *clean[1]), (dirty[0], *dirty[1])):
        assert torch.equal(a, b)
    _check_padded_rows_zero(dirty, mask)


@needs_cpu_kernel
def test_cpu_kernel_degenerate_shapes():
    fwd, bwd = torch.ops.roberta_fast.attention_fwd, torch.ops.roberta_fast.attention_bwd
    for shape in [(0, 5, 2, 32), (2, 0, 2, 32), (2, 5, 0, 32)]:
        q = randn(*shape)
        mask = torch.ones(shape[:2], dtype=torch.bool)
        out, lse = fwd(q, q, q, mask, None, shape[1], 0.2, 0.1, torch.tensor([3]))
        assert out.shape == q.shape and lse.shape == (shape[0], shape[2], shape[1])
        grads = bwd(q, q, q, q, out, lse, mask, None, shape[1], 0.2, 0.1, torch.tensor([3]))
        assert all(g.shape == q.shape for g in grads)
    # Every token padded: zeros, LSE = +inf, zero gradients.
    q, k, v, grad_out = (randn(2, 6, 2, 16) for _ in range(4))
    none = torch.zeros(2, 6, dtype=torch.bool)
    out, lse = fwd(q, k, v, none, None, 6, 0.2)
    assert (out == 0).all() and torch.isposinf(lse).all()
    assert all((g == 0).all() for g in bwd(grad_out, q, k, v, out, lse, none, None, 6, 0.2, 0.0,
                                           None))
    # Batch of one, L = 1, a head dim above 128 and D = 1. With D = 1 plain PyTorch's sums have
    # a handful of terms and come out nearly exact, while the kernel recomputes P from the LSE
    # (FlashAttention's way): its gradients measured up to 4.1x PyTorch's error over 150 draws.
    for shape in [(1, 1, 1, 8), (1, 9, 3, 160), (2, 17, 1, 1)]:
        q, k, v, grad_out = (randn(*shape) for _ in range(4))
        got = _cpu_kernel(q, k, v, grad_out)
        ref = _grads(forward_native, (q, k, v), grad_out, F64)
        base = _grads(forward_native, (q, k, v), grad_out, q.dtype)
        _check_all(f"cpu {shape}", got, ref, base, q.dtype, factor=5.0 if shape[-1] == 1 else 2.0)


@needs_cpu_kernel
def test_cpu_kernel_backward_is_deterministic():
    q, k, v, grad_out = (randn(2, 150, 2, 32) for _ in range(4))
    mask = _mask("holes", 2, 150, "cpu")
    first = _cpu_kernel(q, k, v, grad_out, mask=mask, p=0.1, seed=torch.tensor([5]))
    second = _cpu_kernel(q, k, v, grad_out, mask=mask, p=0.1, seed=torch.tensor([5]))
    for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b)


@needs_cpu_kernel
def test_cpu_backend_dispatch():
    # fp32 / bf16 / fp16 run the C++ kernels, float64 runs SDPA: both match the reference.
    q, k, v = (randn(2, 9, 2, 16) for _ in range(3))
    mask = _mask("right", 2, 9, "cpu")
    with roberta_fast.use_backend("cpu"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, F64):
            x = [t.to(dtype) for t in (q, k, v)]
            out = attention(*x, key_padding_mask=mask)
            ref = forward_native(*(t.to(F64) for t in x), key_padding_mask=mask)
            assert out.dtype == dtype and rel_err(out, ref) < MAX_ERR[dtype]
        packed = torch.cat([q[0, :9], q[1, :4]])
        cu = _cu_seqlens([9, 4], "cpu")
        out = attention_varlen(packed, packed, packed, cu, 9)
        assert rel_err(out, varlen_forward_native(*(packed.to(F64),) * 3, cu)) < 1e-5


@needs_cpu_kernel
def test_opcheck_cpu_kernel_ops():
    batch, seqlen, heads, head_dim = 2, 5, 1, 16
    q, k, v = (randn(batch, seqlen, heads, head_dim, requires_grad=True) for _ in range(3))
    mask = _mask("right", batch, seqlen, "cpu")
    scale = head_dim ** -0.5
    fwd = torch.ops.roberta_fast.attention_fwd.default
    torch.library.opcheck(fwd, (q, k, v, mask, None, seqlen, scale, 0.0, None))

    cu = _cu_seqlens([3, 6], "cpu")
    qp, kp, vp = (randn(9, heads, head_dim, requires_grad=True) for _ in range(3))
    torch.library.opcheck(fwd, (qp, kp, vp, None, cu, 6, scale, 0.3, new_seed("cpu")))

    with torch.no_grad():
        out, lse = fwd(q, k, v, mask, None, seqlen, scale, 0.0, None)
    grad_out = randn(batch, seqlen, heads, head_dim)
    bwd = torch.ops.roberta_fast.attention_bwd.default
    torch.library.opcheck(bwd, (grad_out, q.detach(), k.detach(), v.detach(), out, lse, mask,
                                None, seqlen, scale, 0.2, new_seed("cpu")))


@needs_cpu_kernel
def test_cpu_kernel_under_torch_compile():
    q, k, v = (randn(2, 9, 2, 16, requires_grad=True) for _ in range(3))
    mask = _mask("right", 2, 9, "cpu")

    def run(q, k, v):
        with roberta_fast.use_backend("cpu"):
            return attention(q, k, v, key_padding_mask=mask, dropout_p=0.1)

    torch._dynamo.reset()
    assert torch._dynamo.explain(run)(q, k, v).graph_break_count == 0
    out = torch.compile(run)(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert out.shape == q.shape and all(torch.isfinite(g).all() for g in grads)
    assert (out[~mask] == 0).all()


def _bad_cpu_kernel_cases():
    q = randn(2, 5, 2, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    p = randn(10, 2, 8)
    seed = torch.tensor([1])
    return [
        ((q.int(), q.int(), q.int(), None, None, 5, 0.1), TypeError, "float32"),
        ((q.double(), q.double(), q.double(), None, None, 5, 0.1), TypeError, "float32"),
        ((q, q, q[:, :4], None, None, 5, 0.1), ValueError, "shape"),
        ((q, q, q.half(), None, None, 5, 0.1), TypeError, "dtype"),
        ((q[0], q[0], q[0], None, None, 5, 0.1), ValueError, "B, L, heads, D"),
        ((q, q, q, mask.int(), None, 5, 0.1), TypeError, "bool"),
        ((q, q, q, mask[:, :4], None, 5, 0.1), ValueError, r"\[B, L\]"),
        ((q, q, q, None, None, 6, 0.1), ValueError, "max_seqlen"),
        ((q, q, q, None, None, 5, float("inf")), ValueError, "scale"),
        ((q, q, q, None, None, 5, 0.1, 1.0, seed), ValueError, "dropout_p"),
        ((q, q, q, None, None, 5, 0.1, 0.1, None), ValueError, "seed"),
        ((q, q, q, None, None, 5, 0.1, 0.1, seed.int()), TypeError, "int64"),
        ((p, p, p, None, cu.long(), 6, 0.1), TypeError, "int32"),
        ((p, p, p, None, cu + 1, 6, 0.1), ValueError, "start at 0"),
        ((p, p, p, None, torch.tensor([0, 6, 4, 10], dtype=torch.int32), 6, 0.1), ValueError,
         "non-decreasing"),
        ((p, p, p, None, torch.tensor([0, 4, 9], dtype=torch.int32), 6, 0.1), ValueError,
         "total_tokens"),
        ((p, p, p, None, cu, 5, 0.1), ValueError, "max_seqlen"),
        ((p, p, p, mask, cu, 6, 0.1), ValueError, "key_padding_mask"),
        ((q, q, q, None, cu, 6, 0.1), ValueError, "T, heads, D"),
    ]


@needs_cpu_kernel
@pytest.mark.parametrize("case", range(len(_bad_cpu_kernel_cases())))
def test_cpu_kernel_bad_input(case):
    args, exc, match = _bad_cpu_kernel_cases()[case]
    with pytest.raises(exc, match=match):
        torch.ops.roberta_fast.attention_fwd(*args)


@needs_cpu_kernel
def test_cpu_kernel_backward_bad_input():
    q = randn(2, 5, 2, 8)
    out, lse = torch.ops.roberta_fast.attention_fwd(q, q, q, None, None, 5, 0.1)
    bwd = torch.ops.roberta_fast.attention_bwd
    with pytest.raises(ValueError, match="lse"):
        bwd(q, q, q, q, out, lse[:, :, :4], None, None, 5, 0.1, 0.0, None)
    with pytest.raises(ValueError, match="lse"):
        bwd(q, q, q, q, out, lse.transpose(1, 2).contiguous().transpose(1, 2), None, None, 5,
            0.1, 0.0, None)
    with pytest.raises(ValueError, match="shape"):
        bwd(q[:, :4], q, q, q, out, lse, None, None, 5, 0.1, 0.0, None)


# --------------------------------------------------------------------------------------------
# GPU: RoBERTa shapes in fp16 / bf16
# --------------------------------------------------------------------------------------------

GPU_CASES = [
    # B, L, heads, D, padding
    (32, 128, 12, 64, "right"),
    (32, 512, 12, 64, "none"),
    (8, 512, 12, 64, "holes"),
    (3, 513, 4, 64, "right"),
    (2, 97, 4, 32, "single"),
    (2, 1000, 2, 128, "holes"),
    (1, 4096, 2, 64, "none"),
    (4, 77, 3, 40, "right"),
]


def _gpu_compare(q, k, v, grad_out, mask, backend):
    """The op through ``backend`` against float32, with plain PyTorch in the same dtype as base."""

    def run(*x):
        return attention(*x, key_padding_mask=mask)

    def reference(*x):
        return forward_native(*x, key_padding_mask=mask)

    with roberta_fast.use_backend(backend):
        got = _grads(run, (q, k, v), grad_out, q.dtype)
    ref = _grads(reference, (q, k, v), grad_out, torch.float32)
    base = _grads(reference, (q, k, v), grad_out, q.dtype)
    _check_all(f"{backend} {tuple(q.shape)}", got, ref, base, q.dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,seqlen,heads,head_dim,padding", GPU_CASES)
def test_gpu_triton_roberta_shapes(dtype, batch, seqlen, heads, head_dim, padding, monkeypatch):
    monkeypatch.setattr(kernels, "torch", _PoisonedTorch())
    # The two RoBERTa shapes run the autotuner (whose timing runs must leave outputs intact);
    # the rest take the first tile of each table rather than compiling every candidate.
    if (batch, seqlen, heads, head_dim) not in ((32, 128, 12, 64), (32, 512, 12, 64)):
        monkeypatch.setenv(kernels.AUTOTUNE_ENV, "0")
    q, k, v, grad_out = (randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype)
                         for _ in range(4))
    mask = _mask(padding, batch, seqlen, "cuda")
    _gpu_compare(q, k, v, grad_out, mask, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,seqlen,heads,head_dim,padding", GPU_CASES)
def test_gpu_cuda_forward_roberta_shapes(dtype, batch, seqlen, heads, head_dim, padding,
                                        monkeypatch):
    if not backends.has_native_op("attention_fwd", "cuda"):
        pytest.skip("NOT RUN: roberta_fast::attention_fwd has no CUDA kernel in this build")
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "0")
    q, k, v, grad_out = (randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype)
                         for _ in range(4))
    mask = _mask(padding, batch, seqlen, "cuda")
    _gpu_compare(q, k, v, grad_out, mask, "cuda")


@pytest.mark.gpu
def test_gpu_cuda_forward_and_triton_forward_agree(monkeypatch):
    if not backends.has_native_op("attention_fwd", "cuda"):
        pytest.skip("NOT RUN: roberta_fast::attention_fwd has no CUDA kernel in this build")
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "0")
    q, k, v = (randn(4, 200, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = _mask("holes", 4, 200, "cuda")
    native_out, native_lse = torch.ops.roberta_fast.attention_fwd(q, k, v, mask, None, 200, 0.125)
    out, lse = kernels.attention_fwd(q, k, v, mask, None, 200, 0.125, 0.0, None)
    assert rel_err(native_out, out) < 1e-2
    finite = torch.isfinite(lse)
    assert torch.equal(finite, torch.isfinite(native_lse))
    assert rel_err(native_lse[finite], lse[finite]) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_triton_varlen_and_dropout(dtype, monkeypatch):
    monkeypatch.setattr(kernels, "torch", _PoisonedTorch())
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "0")
    lengths = [128, 1, 511, 300, 77]
    _check_varlen_dropout(f"gpu varlen dropout {dtype}", _triton, "cuda", "cuda", dtype, lengths,
                          max(lengths), heads=12, head_dim=64, p=0.1)


def _untuned(monkeypatch):
    """Forget every autotuning result of this process, as if no attention had run yet."""
    monkeypatch.setattr(kernels, "_TUNED", set())
    for kernel in (kernels._attn_fwd_kernel, kernels._attn_bwd_dkdv_kernel,
                   kernels._attn_bwd_dq_kernel):
        monkeypatch.setattr(kernel, "cache", {})


@pytest.mark.gpu
def test_gpu_autotune_off_never_runs_the_autotuner(monkeypatch):
    _untuned(monkeypatch)
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "0")
    q, k, v, grad_out = (randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16)
                         for _ in range(4))
    mask = _mask("right", 2, 300, "cuda")
    got = _triton(q, k, v, grad_out, mask=mask, p=0.1, seed=new_seed("cuda"))
    assert all(torch.isfinite(t).all() for t in (got[0], *got[1]))
    for kernel in (kernels._attn_fwd_kernel, kernels._attn_bwd_dkdv_kernel,
                   kernels._attn_bwd_dq_kernel):
        assert not kernel.cache, f"{kernel.base_fn.__name__} was autotuned"


@pytest.mark.gpu
def test_gpu_cuda_graph_of_forward_and_backward(monkeypatch):
    """Captured before any attention ran (no tuning, no compiled kernel yet), replayed on new
    inputs: the same results as the eager ops with the same dropout seed."""
    _untuned(monkeypatch)
    batch, seqlen, heads, head_dim, p = 3, 200, 4, 64, 0.1
    dtype, scale = torch.bfloat16, head_dim ** -0.5
    mask = _mask("holes", batch, seqlen, "cuda")
    seed = new_seed("cuda")
    static = [randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype,
                    requires_grad=True) for _ in range(3)]
    static_grad_out = randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype)
    fwd = torch.ops.roberta_fast.attention_triton_fwd
    # Autograd's own lazy set-up (its device thread) happens outside the capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm = torch.ones(2, device="cuda", requires_grad=True)
        (warm * 2).sum().backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fwd(*static, mask, None, seqlen, scale, p, seed)[0]
        static_grads = torch.autograd.grad(static_out, static, static_grad_out)

    for _ in range(2):
        inputs = [randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype)
                  for _ in range(4)]
        with torch.no_grad():
            for dst, src in zip((*static, static_grad_out), inputs):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        eager = _triton(*inputs, mask=mask, p=p, seed=seed)
        drop = kernels.dropout_mask(seed, batch, heads, seqlen, p)

        def reference(*x):
            return forward_native(*x, key_padding_mask=mask, dropout_mask=drop, dropout_p=p)

        ref = _grads(reference, inputs[:3], inputs[3], torch.float32)
        base = _grads(reference, inputs[:3], inputs[3], dtype)
        _check_all("graph", (static_out, static_grads), ref, base, dtype)
        for a, b in zip((static_out, *static_grads), (eager[0], *eager[1])):
            assert rel_err(a, b) < 1e-2  # the eager call may tune to another tile


@pytest.mark.gpu
def test_gpu_triton_on_a_device_that_is_not_current(monkeypatch):
    if torch.cuda.device_count() < 2:
        pytest.skip("NOT RUN: needs two CUDA devices")
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "0")
    monkeypatch.setattr(kernels, "torch", _PoisonedTorch())
    assert torch.cuda.current_device() == 0
    q, k, v, grad_out = (randn(2, 77, 3, 64, device="cuda:1", dtype=torch.bfloat16)
                         for _ in range(4))
    mask = _mask("right", 2, 77, "cuda:1")
    _gpu_compare(q, k, v, grad_out, mask, "triton")
    assert torch.cuda.current_device() == 0
