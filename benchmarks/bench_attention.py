"""Benchmark of fused attention: ``softmax(q k^T * scale + key_padding) v``, non-causal.

Groups: forward and forward+backward over full-length batches of ``[B, L, heads, D]`` (TFLOP/s
with FLOPs = 4 * B * L^2 * heads * D forward, 2.5x that backward), and a realistic padded batch
(lengths uniform in [L/4, L]) where the varlen kernels on packed tokens are compared with padded
SDPA (FLOPs counted over real tokens only, so TFLOP/s compares useful work).

Baselines: Hugging Face's eager attention (matmul, additive mask, softmax, matmul) and PyTorch
SDPA (on a GPU each of its flash / efficient / cuDNN / math backends). Ours: every roberta_fast
backend that runs natively on the device (on a CPU that is the SDPA-based path, timed to show it
costs nothing over SDPA).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

import roberta_fast
from roberta_fast import ops

from . import common
from .common import Case, Unavailable

HEADS, HEAD_DIM = 12, 64
# (batch, seq): 16k tokens at L 512 and L 128 on a GPU; small batches on a CPU.
GPU_SHAPES = [(32, 512), (128, 128), (4, 4096)]
GPU_QUICK = [(32, 512), (128, 128)]
CPU_SHAPES = [(2, 128), (8, 128), (2, 512)]
CPU_QUICK = [(2, 128)]


def _hf_eager(q, k, v, mask):
    # Hugging Face's eager path: [B, H, L, D] matmuls with an additive mask.
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    scores = qt @ kt.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return (scores.softmax(-1) @ vt).transpose(1, 2)


def _sdpa(backend_name: str | None) -> Callable:
    def run(q, k, v, mask):
        attn_mask = None if mask is None else mask[:, None, None, :]
        ctx = contextlib.nullcontext()
        if backend_name is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel(getattr(SDPBackend, backend_name))
        with ctx:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), attn_mask=attn_mask)
        return out.transpose(1, 2)

    return run


def _ours(backend: str) -> Callable:
    def run(q, k, v, mask):
        with roberta_fast.use_backend(backend):
            return ops.attention(q, k, v, key_padding_mask=mask)

    return run


def _ours_varlen(backend: str) -> Callable:
    def run(q, k, v, cu_seqlens, max_seqlen):
        with roberta_fast.use_backend(backend):
            return ops.attention_varlen(q, k, v, cu_seqlens, max_seqlen)

    return run


def _lengths(batch: int, seq: int, realistic: bool, device: str) -> torch.Tensor:
    if not realistic:
        return torch.full((batch,), seq, dtype=torch.int32)
    gen = torch.Generator().manual_seed(batch * 7919 + seq)  # the same batch for every impl
    return torch.randint(seq // 4, seq + 1, (batch,), generator=gen, dtype=torch.int32)


def _setup(fn: Callable, batch: int, seq: int, dtype: torch.dtype, device: str, mode: str,
           realistic: bool, varlen: bool = False) -> Callable[[], Callable[[], object]]:
    def setup():
        lengths = _lengths(batch, seq, realistic, device)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(device) if realistic else None
        if varlen:
            total = int(lengths.sum())
            shape = (total, HEADS, HEAD_DIM)
            cu = torch.zeros(batch + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(lengths, 0)
            cu = cu.to(device)
        else:
            shape = (batch, seq, HEADS, HEAD_DIM)
        try:
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
        except RuntimeError as exc:  # pragma: no cover - out of memory on a small device
            raise Unavailable(str(exc)) from exc
        dout = torch.randn(shape, device=device, dtype=dtype)

        if varlen:
            def call():
                return fn(q, k, v, cu, seq)
        else:
            def call():
                return fn(q, k, v, mask)
        try:
            call()  # unsupported combinations (an SDPA backend refusing a shape) show as skipped
        except RuntimeError as exc:
            raise Unavailable(str(exc).splitlines()[0]) from exc
        if mode == "fwd":
            return lambda: call()
        return lambda: torch.autograd.grad(call(), (q, k, v), dout)

    return setup


def _flops(batch: int, seq: int, realistic: bool, mode: str) -> float:
    lengths = _lengths(batch, seq, realistic, "cpu").double()
    fwd = 4.0 * float((lengths * lengths).sum()) * HEADS * HEAD_DIM
    return fwd if mode == "fwd" else 3.5 * fwd


def cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    """Full-length and realistic padded batches, forward and forward+backward."""
    if device == "cuda":
        shapes = GPU_QUICK if quick else GPU_SHAPES
        sdpa = [("torch SDPA (flash)", "FLASH_ATTENTION"),
                ("torch SDPA (efficient)", "EFFICIENT_ATTENTION"),
                ("torch SDPA (cuDNN)", "CUDNN_ATTENTION"), ("torch SDPA (math)", "MATH")]
    else:
        shapes = CPU_QUICK if quick else CPU_SHAPES
        sdpa = [("torch SDPA", None)]
    dtype_name = str(dtype).replace("torch.", "")
    ours = common.native_backends(device)
    for batch, seq in shapes:
        for realistic in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                kind = "lengths U[L/4,L]" if realistic else "full"
                group = f"{mode} B{batch} L{seq} {kind} {dtype_name}"
                tokens = int(_lengths(batch, seq, realistic, device).sum())
                params = {"batch": batch, "seq": seq, "heads": HEADS, "head_dim": HEAD_DIM,
                          "realistic": realistic, "mode": mode, "real_tokens": tokens,
                          "dtype": dtype_name}
                flops = _flops(batch, seq, realistic, mode)

                def case(impl, fn, baseline=False, varlen=False):
                    return Case(group, impl, _setup(fn, batch, seq, dtype, device, mode, realistic,
                                                    varlen), flops=flops, baseline=baseline,
                                params=params)

                yield case("HF eager", _hf_eager, baseline=True)
                for name, backend_name in sdpa:
                    yield case(name, _sdpa(backend_name), baseline=True)
                for backend in ours:
                    yield case(f"roberta_fast {backend}", _ours(backend))
                    if realistic:
                        yield case(f"roberta_fast {backend} varlen", _ours_varlen(backend),
                                   varlen=True)


@pytest.mark.parametrize("case", common.pytest_cases(cases))
def test_attention(benchmark, case):
    common.benchmark_case(benchmark, case, common.env_settings()[0])
