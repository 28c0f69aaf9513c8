"""Benchmark of fused attention: ``softmax(q k^T * scale + key_padding) v``, non-causal.

Groups: forward and forward+backward over full-length batches of ``[B, L, heads, D]`` (TFLOP/s
with FLOPs = 4 * B * L^2 * heads * D forward, 2.5x that backward), and a realistic padded batch
(lengths uniform in [L/4, L]) where the varlen kernels on packed tokens are compared with padded
SDPA (FLOPs counted over real tokens only, so TFLOP/s compares useful work). On a CPU also
forward+backward with attention dropout p = 0.1 (training), and the varlen rows are compared with
SDPA on the re-padded batch (``_sdpa_varlen``, which the cpu backend ran before its C++ kernels).

Baselines: Hugging Face's eager attention (matmul, additive mask, softmax, matmul) and PyTorch
SDPA (on a GPU each of its flash / efficient / cuDNN / math backends; on a CPU given the broadcast
key-padding mask as ``_sdpa_padded`` does). Ours: every roberta_fast backend that runs natively on
the device (on a CPU, the C++ kernels of csrc/cpu/attention.cpp).

``python -m benchmarks.bench_attention`` times our CPU kernels and SDPA on the
RoBERTa-base training batch (B 8, L 128, 12 x 64, lengths U[32, 128]) interleaved in one
process, best of several rounds: the comparison to trust on a machine shared with other work.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

import roberta_fast
from roberta_fast import ops

from roberta_fast.ops.attention import _sdpa_padded, _sdpa_varlen

from . import common
from .common import Case, Unavailable

HEADS, HEAD_DIM = 12, 64
# (batch, seq): 16k tokens at L 512 and L 128 on a GPU; small batches on a CPU.
GPU_SHAPES = [(32, 512), (128, 128), (4, 4096)]
GPU_QUICK = [(32, 512), (128, 128)]
CPU_SHAPES = [(2, 128), (8, 128), (2, 512)]
CPU_QUICK = [(2, 128), (8, 128)]
# Timed modes: name -> (backward too, attention dropout p). Training (p > 0) on a CPU only.
MODES = {"fwd": (False, 0.0), "fwd+bwd": (True, 0.0), "fwd+bwd p=0.1": (True, 0.1)}
GPU_MODES = ("fwd", "fwd+bwd")


def _hf_eager(q, k, v, mask, p):
    # Hugging Face's eager path: [B, H, L, D] matmuls with an additive mask.
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    scores = qt @ kt.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return (F.dropout(scores.softmax(-1), p) @ vt).transpose(1, 2)


def _sdpa(backend_name: str | None) -> Callable:
    def run(q, k, v, mask, p):
        attn_mask = None if mask is None else mask[:, None, None, :]
        ctx = contextlib.nullcontext()
        if backend_name is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel(getattr(SDPBackend, backend_name))
        with ctx:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), attn_mask=attn_mask,
                                                 dropout_p=p)
        return out.transpose(1, 2)

    return run


def _sdpa_cpu(q, k, v, mask, p):
    # SDPA as the cpu backend ran it before its C++ kernels (broadcast mask, padded rows zeroed).
    return _sdpa_padded(q, k, v, mask, p, q.shape[-1] ** -0.5)


def _sdpa_cpu_varlen(q, k, v, cu_seqlens, max_seqlen, p):
    # ... and on packed input: re-pad, SDPA, gather the real rows back.
    return _sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, p, q.shape[-1] ** -0.5)


def _ours(backend: str) -> Callable:
    def run(q, k, v, mask, p):
        with roberta_fast.use_backend(backend):
            return ops.attention(q, k, v, key_padding_mask=mask, dropout_p=p)

    return run


def _ours_varlen(backend: str) -> Callable:
    def run(q, k, v, cu_seqlens, max_seqlen, p):
        with roberta_fast.use_backend(backend):
            return ops.attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=p)

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
        backward, p = MODES[mode]

        if varlen:
            def call():
                return fn(q, k, v, cu, seq, p)
        else:
            def call():
                return fn(q, k, v, mask, p)
        try:
            call()  # unsupported combinations (an SDPA backend refusing a shape) show as skipped
        except RuntimeError as exc:
            raise Unavailable(str(exc).splitlines()[0]) from exc
        if not backward:
            def forward():
                with torch.no_grad():
                    return call()
            return forward
        return lambda: torch.autograd.grad(call(), (q, k, v), dout)

    return setup


def _flops(batch: int, seq: int, realistic: bool, mode: str) -> float:
    lengths = _lengths(batch, seq, realistic, "cpu").double()
    fwd = 4.0 * float((lengths * lengths).sum()) * HEADS * HEAD_DIM
    return 3.5 * fwd if MODES[mode][0] else fwd


def cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    """Full-length and realistic padded batches, forward and forward+backward."""
    if device == "cuda":
        shapes = GPU_QUICK if quick else GPU_SHAPES
        sdpa = [(f"torch SDPA ({name})", _sdpa(backend_name))
                for name, backend_name in (("flash", "FLASH_ATTENTION"),
                                           ("efficient", "EFFICIENT_ATTENTION"),
                                           ("cuDNN", "CUDNN_ATTENTION"), ("math", "MATH"))]
        modes = GPU_MODES
    else:
        shapes = CPU_QUICK if quick else CPU_SHAPES
        sdpa = [("torch SDPA", _sdpa_cpu)]
        modes = tuple(MODES)
    dtype_name = str(dtype).replace("torch.", "")
    ours = common.native_backends(device)
    for batch, seq in shapes:
        for realistic in (False, True):
            for mode in modes:
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
                for name, fn in sdpa:
                    yield case(name, fn, baseline=True)
                if realistic and device == "cpu":
                    yield case("torch SDPA varlen (re-padded)", _sdpa_cpu_varlen, baseline=True,
                               varlen=True)
                for backend in ours:
                    yield case(f"roberta_fast {backend}", _ours(backend))
                    if realistic:
                        yield case(f"roberta_fast {backend} varlen", _ours_varlen(backend),
                                   varlen=True)


@pytest.mark.parametrize("case", common.pytest_cases(cases))
def test_attention(benchmark, case):
    common.benchmark_case(benchmark, case, common.env_settings()[0])


# The training batch of the CPU targets: RoBERTa-base attention, lengths U[32, 128].
TARGET_BATCH, TARGET_SEQ = 8, 128


def interleaved(rounds: int = 5, reps: int = 3, threads: int = 2) -> list[dict]:
    """Our CPU kernels and SDPA on the target batch, padded and packed, in fp32 and bf16 and every
    mode of ``MODES``: each round times every implementation in turn (best of ``reps`` calls);
    the result per implementation is its best round. Interleaving makes the comparison fair on
    a machine whose load changes while it runs."""
    torch.set_num_threads(threads)
    impls = [("torch SDPA", _sdpa_cpu, False), ("roberta_fast cpu", _ours("cpu"), False),
             ("torch SDPA varlen (re-padded)", _sdpa_cpu_varlen, True),
             ("roberta_fast cpu varlen", _ours_varlen("cpu"), True)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for mode in MODES:
            fns = [(name, _setup(fn, TARGET_BATCH, TARGET_SEQ, dtype, "cpu", mode, True, varlen)())
                   for name, fn, varlen in impls]
            best = {name: math.inf for name, _ in fns}
            for _ in range(rounds):
                for name, fn in fns:
                    for _ in range(reps):
                        start = time.perf_counter()
                        fn()
                        best[name] = min(best[name], time.perf_counter() - start)
            for name, seconds in best.items():
                rows.append({"dtype": str(dtype).replace("torch.", ""), "mode": mode,
                             "impl": name, "best_s": seconds,
                             "speedup_vs_sdpa": best["torch SDPA"] / seconds,
                             "speedup_vs_sdpa_varlen":
                                 best["torch SDPA varlen (re-padded)"] / seconds})
    return rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Our CPU attention kernels against torch SDPA, interleaved in one process "
                    f"(B {TARGET_BATCH}, L {TARGET_SEQ}, {HEADS} x {HEAD_DIM}, lengths "
                    f"U[{TARGET_SEQ // 4}, {TARGET_SEQ}]).")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3, help="calls per implementation and round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if common.native_backends("cpu") != ["cpu"]:
        raise SystemExit("roberta_fast._C is not built: nothing of ours to time")
    print(f"{'dtype':<9} {'mode':<14} {'impl':<30} {'best':>9}  {'vs SDPA':>8}  "
          f"{'vs SDPA varlen':>14}")
    for row in interleaved(args.rounds, args.reps, args.threads):
        print(f"{row['dtype']:<9} {row['mode']:<14} {row['impl']:<30} "
              f"{row['best_s'] * 1e3:7.2f} ms  {row['speedup_vs_sdpa']:7.2f}x  "
              f"{row['speedup_vs_sdpa_varlen']:13.2f}x", flush=True)


if __name__ == "__main__":
    main()
