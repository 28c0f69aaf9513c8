"""Triton kernels, one module per op, and the launch context they share."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from typing import Iterator

import torch

__all__ = ["INTERPRET", "launch_context"]

# Whether the kernels run in Triton's interpreter. Read once, at import, as triton.jit does: it
# decides between compiled and interpreted kernels for the whole process.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# CUstreamCaptureMode of the CUDA driver API.
_CAPTURE_MODE_RELAXED = 2


@functools.lru_cache(maxsize=None)
def _exchange_capture_mode():
    """The driver's ``cuThreadExchangeStreamCaptureMode``, or None where it cannot be found."""
    try:
        return ctypes.CDLL("libcuda.so.1").cuThreadExchangeStreamCaptureMode
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def _relaxed_capture() -> Iterator[None]:
    """Let this thread make driver calls that a CUDA graph capture otherwise forbids.

    A kernel's first launch compiles it and loads its module (``cuModuleLoadData``): harmless to
    the graph, but an error under the default (global) capture mode. The caching allocator
    relaxes the mode around ``cudaMalloc`` the same way.
    """
    exchange = _exchange_capture_mode()
    if exchange is None:
        yield
        return
    mode = ctypes.c_int(_CAPTURE_MODE_RELAXED)
    if exchange(ctypes.byref(mode)) != 0:
        yield
        return
    try:
        yield
    finally:
        exchange(ctypes.byref(mode))  # puts the previous mode back


@contextlib.contextmanager
def launch_context(t: torch.Tensor) -> Iterator[None]:
    """Where kernels on ``t``'s device launch: that device made current (Triton launches on the
    current device and stream), and first-launch compilation allowed inside a CUDA graph capture.
    A no-op for CPU tensors (the interpreter)."""
    if t.device.type != "cuda":
        yield
        return
    with torch.cuda.device(t.device):
        if torch.cuda.is_current_stream_capturing():
            with _relaxed_capture():
                yield
        else:
            yield
