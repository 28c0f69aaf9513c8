"""Benchmark of fused residual + LayerNorm (+ dropout): ``layer_norm(dropout(x) + residual)``.

Groups: forward, backward and forward+backward at rows x H in {4096, 16384, 65536} x {768, 1024}
(quick: 16384 x 768), dropout p = 0.1 in training mode. Implementations: PyTorch eager and
``torch.compile`` of the unfused expression (the baselines) and every roberta_fast backend that
runs natively on the device (the Triton interpreter on CPU is never timed).

Bytes that must move: forward reads x, residual, weight, bias and writes y (+ fp32 mean/rstd);
backward reads dy, x, residual, weight, mean/rstd and writes dx, dresidual, dweight, dbias.
"""
from __future__ import annotations

from typing import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

import roberta_fast
from roberta_fast import ops

from . import common
from .common import Case

P = 0.1
EPS = 1e-5
SHAPES = [(rows, h) for rows in (4096, 16384, 65536) for h in (768, 1024)]
QUICK_SHAPES = [(16384, 768)]


def _eager(x, r, w, b):
    return F.layer_norm(F.dropout(x, P, training=True) + r, (x.shape[-1],), w, b, EPS)


def _fused(backend: str) -> Callable:
    def run(x, r, w, b):
        with roberta_fast.use_backend(backend):
            return ops.fused_residual_layer_norm(x, r, w, b, EPS, dropout_p=P, training=True)

    return run


def _bytes(rows: int, h: int, dtype: torch.dtype, mode: str) -> float:
    e = torch.empty((), dtype=dtype).element_size()
    n = rows * h
    fwd = 3 * n * e + 2 * h * e + 2 * rows * 4
    bwd = 5 * n * e + 3 * h * e + 2 * rows * 4
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _setup(fn: Callable, rows: int, h: int, dtype: torch.dtype, device: str,
           mode: str) -> Callable[[], Callable[[], object]]:
    def setup():
        x = torch.randn(rows, h, device=device, dtype=dtype, requires_grad=True)
        r = torch.randn(rows, h, device=device, dtype=dtype, requires_grad=True)
        w = (1 + 0.1 * torch.randn(h, device=device)).to(dtype).requires_grad_()
        b = (0.1 * torch.randn(h, device=device)).to(dtype).requires_grad_()
        dy = torch.randn(rows, h, device=device, dtype=dtype)
        leaves = (x, r, w, b)
        if mode == "fwd":
            return lambda: fn(x, r, w, b)
        if mode == "bwd":
            y = fn(x, r, w, b)
            return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)
        return lambda: torch.autograd.grad(fn(x, r, w, b), leaves, dy)

    return setup


def _compiled_eager() -> Callable | None:
    """``torch.compile`` of the unfused expression, or None where compile cannot run."""
    try:
        return torch.compile(_eager)
    except Exception:  # noqa: BLE001 - no compiler on this machine: the baseline is left out
        return None


def cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    """The benchmark cases for ``device``/``dtype``; ``quick``: 16384 x 768 only, and no
    ``torch.compile`` on CPU (its compile alone takes longer than the quick budget)."""
    shapes = QUICK_SHAPES if quick else SHAPES
    dtype_name = str(dtype).replace("torch.", "")
    compiled = None if (quick and device == "cpu") else _compiled_eager()
    for rows, h in shapes:
        for mode in ("fwd", "bwd", "fwd+bwd"):
            group = f"{mode} {rows}x{h} p={P} {dtype_name}"
            params = {"rows": rows, "hidden": h, "p": P, "dtype": dtype_name, "mode": mode}
            nbytes = _bytes(rows, h, dtype, mode)
            yield Case(group, "torch eager", _setup(_eager, rows, h, dtype, device, mode),
                       bytes=nbytes, baseline=True, params=params)
            if compiled is not None:
                yield Case(group, "torch.compile", _setup(compiled, rows, h, dtype, device, mode),
                           bytes=nbytes, baseline=True, params=params)
            for backend in common.native_backends(device):
                yield Case(group, f"roberta_fast {backend}",
                           _setup(_fused(backend), rows, h, dtype, device, mode), bytes=nbytes,
                           params=params)


@pytest.mark.parametrize("case", common.pytest_cases(cases))
def test_layer_norm_residual(benchmark, case):
    benchmark(case.setup())
