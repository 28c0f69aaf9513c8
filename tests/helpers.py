"""Numerical test helpers: the method of DESIGN.md in one place.

- compare against a float64 reference with the relative-norm error ``rel_err``;
- a kernel passes when its error is at most ``2 x`` the error of plain PyTorch doing the same
  computation in the same dtype, and in any case under the per-dtype ceiling ``MAX_ERR``;
- outputs are poisoned with NaN before a kernel writes them (``poison``);
- inputs are fresh random tensors (``randn``), never zeros and never a reused seed.
"""
from __future__ import annotations

import torch

# Ceilings of the relative-norm error, whatever the baseline achieves.
MAX_ERR = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN or inf anywhere gives ``inf``."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(out: torch.Tensor, ref: torch.Tensor, *, baseline: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, name: str = "output", factor: float = 2.0,
                 floor: float | None = None) -> float:
    """Assert ``out`` matches the float64 ``ref`` the way DESIGN.md says.

    ``baseline`` is plain PyTorch's result for the same computation in the kernel's dtype; when
    given, the kernel's error may be at most ``factor`` times the baseline's plus a floor (the
    largest of ``floor``, 1% of the ceiling and the error of rounding ``ref`` to ``dtype``), so
    that an exact or lucky baseline does not demand a kernel better than rounding. The error must always be under
    ``MAX_ERR[dtype]``. Returns the error.
    """
    dtype = dtype or out.dtype
    err = rel_err(out, ref)
    ceiling = MAX_ERR.get(dtype, 1e-2)
    assert err == err and err < ceiling, f"{name}: rel err {err:.3e} >= {ceiling:.1e} ({dtype})"
    if baseline is not None:
        base = rel_err(baseline, ref)
        # No kernel that returns ``dtype`` beats the rounding of the exact answer to ``dtype``;
        # a baseline that happens to land closer (few elements, lucky cancellation) must not
        # demand that.
        floor = max(floor or 0.0, ceiling / 100, rel_err(ref.to(dtype), ref))
        allowed = factor * base + floor
        assert err <= allowed, (
            f"{name}: rel err {err:.3e} > {factor} x plain PyTorch's {base:.3e} ({dtype})")
    return err


def randn(*shape, dtype=torch.float32, device="cpu", scale: float = 1.0,
          requires_grad: bool = False) -> torch.Tensor:
    """Fresh normal samples from the global generator (tests never reseed it per case)."""
    t = torch.randn(*shape, dtype=torch.float32, device=device) * scale
    t = t.to(dtype)
    return t.requires_grad_(requires_grad)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (or the dtype's max for integers) so an unwritten element shows."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a tensor whose last dimension is strided."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous()
    return view.requires_grad_(t.requires_grad)


def binomial_bound(n: int, p_keep: float, sigmas: float = 6.0) -> float:
    """Half-width of a ``sigmas``-sigma interval for the kept fraction of ``n`` Bernoulli draws."""
    return sigmas * (p_keep * (1 - p_keep) / max(n, 1)) ** 0.5
