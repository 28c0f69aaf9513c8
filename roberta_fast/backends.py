"""Backend selection: which implementation of an op runs for tensors on a given device.

Backends are ``cuda`` (CUDA C++ kernels in ``roberta_fast._C``), ``triton`` (Triton kernels; on CPU
tensors only under ``TRITON_INTERPRET=1``), ``cpu`` (C++ kernels in ``roberta_fast._C``) and
``reference`` (plain PyTorch). ``auto`` picks per tensor device: CUDA tensors take the first built
GPU backend of the op's preference order, CPU tensors take ``cpu`` when ``_C`` is built, else
``reference``.

The choice comes from, in order: the innermost ``use_backend(...)`` block, the environment variable
``ROBERTA_FAST_BACKEND``, then ``auto``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from typing import Iterator, Sequence

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
_CHOICES = ("auto",) + BACKENDS
ENV_VAR = "ROBERTA_FAST_BACKEND"

_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("roberta_fast_backend",
                                                                   default=None)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why and what to do."""


@functools.lru_cache(maxsize=None)
def _native() -> tuple[object | None, str]:
    """The compiled extension module, or None and the reason it is missing."""
    try:
        module = importlib.import_module("roberta_fast._C")
    except ImportError as exc:
        return None, (f"roberta_fast._C is not built ({exc}); build it with "
                      "`pip install --no-build-isolation -e .`")
    return module, "ok"


def native_module():
    """The loaded ``roberta_fast._C`` (which registers the ``torch.ops.roberta_fast`` ops), or None."""
    return _native()[0]


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton is a dependency
        return f"triton is not installed ({exc})"
    return "ok"


def _reason(name: str, device_type: str | None = None) -> str:
    """'ok' or why backend ``name`` cannot run (for ``device_type`` tensors when given)."""
    cuda_device = torch.cuda.is_available()
    if name == "reference":
        return "ok"
    if name == "cpu":
        if device_type == "cuda":
            return "the cpu backend takes CPU tensors only"
        return _native()[1]
    if name == "cuda":
        if device_type == "cpu":
            return "the cuda backend takes CUDA tensors only"
        module, why = _native()
        if module is None:
            return why
        if not module.built_with_cuda():
            return ("roberta_fast._C was built without CUDA kernels (torch without CUDA, or no "
                    "nvcc at build time)")
        if not cuda_device:
            return "no CUDA device is available"
        return "ok"
    if name == "triton":
        why = _triton_import()
        if why != "ok":
            return why
        if device_type == "cpu" or (device_type is None and not cuda_device):
            if interpreting():
                return "ok (interpreter)"
            return ("Triton needs a CUDA device; set TRITON_INTERPRET=1 before importing "
                    "roberta_fast to run its Triton kernels on CPU in the interpreter")
        if not cuda_device:
            return "no CUDA device is available"
        return "ok"
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_CHOICES)}")


def available_backends() -> dict[str, str]:
    """Each backend's name mapped to ``"ok"`` (or ``"ok (interpreter)"``) or why it is unavailable."""
    return {name: _reason(name) for name in BACKENDS}


def _check_choice(name: str) -> str:
    name = name.strip().lower()
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_CHOICES)}")
    return name


def current() -> str:
    """The backend choice in force: a name from BACKENDS, or ``"auto"``."""
    chosen = _choice.get()
    if chosen is None:
        chosen = os.environ.get(ENV_VAR, "auto") or "auto"
    return _check_choice(chosen)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the ops in this block on backend ``name`` (``auto``, cuda, triton, cpu, reference).

    Fails at once with ``BackendUnavailableError`` if the backend cannot run on this machine.
    """
    name = _check_choice(name)
    if name != "auto":
        why = _reason(name)
        if not why.startswith("ok"):
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {why}")
    token = _choice.set(name)
    try:
        yield name
    finally:
        _choice.reset(token)


def has_native_op(name: str, device_type: str) -> bool:
    """Whether ``torch.ops.roberta_fast.<name>`` has a kernel for ``device_type`` ('cpu'/'cuda')."""
    if native_module() is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"roberta_fast::{name}",
                                                          device_type.upper())


def resolve(device: torch.device | str, gpu_order: Sequence[str] = ("cuda", "triton")) -> str:
    """The backend that runs an op on tensors living on ``device``.

    ``gpu_order`` is the op's preference among GPU backends for ``auto``. Raises
    ``BackendUnavailableError`` naming the reason when an explicitly chosen backend cannot run.
    Under ``torch.compile`` the choice is made once, when the graph is traced, and kept as a
    constant (it reads a ContextVar and the environment, which dynamo cannot trace).
    """
    return _resolve(torch.device(device).type, tuple(gpu_order))


@torch.compiler.assume_constant_result
def _resolve(device_type: str, gpu_order: tuple[str, ...]) -> str:
    chosen = current()
    if chosen != "auto":
        why = _reason(chosen, device_type)
        if not why.startswith("ok"):
            raise BackendUnavailableError(
                f"backend {chosen!r} cannot run on {device_type} tensors: {why}")
        return chosen
    if device_type == "cuda":
        for name in gpu_order:
            if _reason(name, "cuda").startswith("ok"):
                return name
        return "reference"
    if device_type == "cpu" and native_module() is not None:
        return "cpu"
    return "reference"
