"""Test session setup.

Without a CUDA device, Triton kernels run on CPU tensors in the interpreter: TRITON_INTERPRET must be
set before triton compiles anything, so it is set here, before any test module imports
roberta_fast. Tests marked ``gpu`` are skipped without CUDA, and the skip says they did not run.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import roberta_fast  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="NOT RUN: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    return [f"roberta_fast backends: {roberta_fast.available_backends()}",
            f"torch {torch.__version__}, CUDA device: {HAS_CUDA}"]


@pytest.fixture
def triton_device() -> str:
    """The device Triton kernels run on here: ``cuda``, or ``cpu`` through the interpreter."""
    if HAS_CUDA:
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("NOT RUN: no CUDA device and TRITON_INTERPRET is not 1")
    return "cpu"


@pytest.fixture
def triton_interpret(triton_device):
    """Alias of ``triton_device`` for tests that only need Triton to be runnable."""
    return triton_device


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread (and the machine's cores are shared); a module opts
    in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
