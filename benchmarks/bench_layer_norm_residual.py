"""Benchmark of fused residual + LayerNorm (+ dropout): ``layer_norm(dropout(x) + residual)``.

Groups: forward, backward and forward+backward at rows x H in {4096, 16384, 65536} x {768, 1024}
(quick: 16384 x 768), dropout p = 0.1 in training mode. Implementations: PyTorch eager and
``torch.compile`` of the unfused expression (the baselines) and every roberta_fast backend that
runs natively on the device (the Triton interpreter on CPU is never timed).

Bytes that must move: forward reads x, residual, weight, bias and writes y (+ fp32 mean/rstd);
backward reads dy, x, residual, weight, mean/rstd and writes dx, dresidual, dweight, dbias.

``python -m benchmarks.bench_layer_norm_residual`` instead prints forward and backward (fp32 and
bf16) of the native op and of eager PyTorch next to copies of the same byte count, timed
round-robin in one process (GB/s, fraction of the copy ceiling, ratio to eager). Where a fresh
page costs a fault (as in a VM, several microseconds), outputs of tens of MB pay more for their
pages than for their bytes, in the op and in the new-destination copy alike; running it with
glibc keeping freed memory (``MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184``)
or with ``THP_MEM_ALLOC_ENABLE=1`` measures the kernels rather than the page faults.
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


def min_bytes(rows: int, h: int, dtype: torch.dtype, mode: str, dropout: bool = True) -> int:
    """The bytes the fused op cannot avoid moving (parameters left out): forward reads x and
    residual and writes y and the fp32 mean/rstd; backward reads dy, x, residual (and mean/rstd)
    and writes dresidual and, with dropout, dx."""
    e = torch.empty((), dtype=dtype).element_size()
    n = rows * h
    if mode == "fwd":
        return 3 * n * e + 8 * rows
    return (5 if dropout else 4) * n * e + 8 * rows


def roofline(rows: int, h: int, dtypes, rounds: int, device: str = "cpu") -> list[dict]:
    """Forward and backward of roberta_fast's native backend and of PyTorch eager, timed
    round-robin in this process next to two copies of the same byte count, the ceilings: one into
    a new tensor per call (the op allocates its outputs, so this is the like-for-like ceiling)
    and one into a reused tensor (pure bandwidth; where a new page costs a fault, as in a VM,
    the two differ by the price of those faults). Rows of GB/s and fractions of both."""
    backend = "cuda" if device == "cuda" else "cpu"
    out = []
    for dtype in dtypes:
        for mode in ("fwd", "bwd"):
            nbytes = min_bytes(rows, h, dtype, mode)
            fns = {"copy, new dst": common.copy_fn(nbytes, device),
                   "copy, reused dst": common.copy_fn(nbytes, device, allocate=False),
                   f"roberta_fast {backend}": _setup(_fused(backend), rows, h, dtype, device,
                                                     mode)(),
                   "torch eager": _setup(_eager, rows, h, dtype, device, mode)()}
            best = common.best_times(fns, device, rounds=rounds)
            for impl, t in best.items():
                out.append({"dtype": str(dtype).replace("torch.", ""), "mode": mode, "impl": impl,
                            "ms": t * 1e3, "gb_per_s": nbytes / t / 1e9,
                            "of_copy": best["copy, new dst"] / t,
                            "of_reused_copy": best["copy, reused dst"] / t,
                            "vs_eager": best["torch eager"] / t})
            del fns
    return out


def main() -> None:
    """``python -m benchmarks.bench_layer_norm_residual``: the fused op against the copy ceiling
    and eager PyTorch (forward and backward, fp32 and bf16, p = 0.1), in one process."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default=common.default_device())
    args = parser.parse_args()
    dtypes = [common.DTYPES[d] for d in args.dtypes.split(",")]
    print(f"{args.rows} x {args.hidden}, p = {P}, {torch.get_num_threads()} threads, best of "
          f"{args.rounds} interleaved rounds; bytes that must move: fwd reads x, residual and "
          "writes y, mean/rstd; bwd reads dy, x, residual and writes dresidual, dx")
    print(f"{'dtype':<9} {'mode':<4} {'impl':<18} {'time':>8}    {'GB/s':>6}  "
          f"{'of copy (new dst)':>17}  {'of copy (reused)':>16}  {'vs eager':>8}")
    for row in roofline(args.rows, args.hidden, dtypes, args.rounds, args.device):
        print(f"{row['dtype']:<9} {row['mode']:<4} {row['impl']:<18} {row['ms']:8.2f} ms "
              f"{row['gb_per_s']:6.1f}  {100 * row['of_copy']:16.0f}%  "
              f"{100 * row['of_reused_copy']:15.0f}%  {row['vs_eager']:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
