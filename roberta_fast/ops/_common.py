"""Input checks and dropout seeds shared by the ops: clear Python errors before any kernel runs."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    """``t`` must be a floating tensor of one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")


def check_same(names_tensors: dict[str, torch.Tensor], *, dtype: bool = True) -> None:
    """All tensors on one device (and of one dtype when ``dtype``)."""
    items = list(names_tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "move them to one device")
        if dtype and t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                            "cast them to one dtype")


def check_dropout_p(p: float) -> float:
    """A dropout probability in [0, 1)."""
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return p


def new_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed: an int64 tensor of one element on ``device``.

    Drawn from torch's generator for that device (so ``torch.manual_seed`` makes runs repeatable)
    and kept on the device: kernels load it, so no host sync is needed, and CUDA graphs can replay.
    """
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)
