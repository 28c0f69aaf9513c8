"""Backend dispatch: what is available, how a choice is made, and the errors for bad choices."""
import os

import pytest
import torch

import roberta_fast
from roberta_fast import backends


def test_available_backends_lists_every_backend_with_a_reason():
    found = roberta_fast.available_backends()
    assert set(found) == {"cuda", "triton", "cpu", "reference"}
    assert found["reference"] == "ok"
    for name, why in found.items():
        assert isinstance(why, str) and why, name


def test_native_extension_is_built_here():
    # CI builds the extension before the tests: the cpu backend must be usable.
    assert roberta_fast.available_backends()["cpu"] == "ok"
    assert backends.resolve("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="NOT RUN: checks the no-GPU reason")
def test_cuda_backend_names_its_reason_without_a_gpu():
    why = roberta_fast.available_backends()["cuda"]
    assert why != "ok" and ("CUDA" in why or "cuda" in why)
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        with roberta_fast.use_backend("cuda"):
            pass


def test_use_backend_nests_and_restores():
    assert backends.current() in ("auto",) + backends.BACKENDS
    outer = backends.current()
    with roberta_fast.use_backend("reference"):
        assert backends.resolve("cpu") == "reference"
        with roberta_fast.use_backend("cpu"):
            assert backends.resolve("cpu") == "cpu"
        assert backends.resolve("cpu") == "reference"
    assert backends.current() == outer


def test_env_variable_chooses_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve("cpu") == "reference"
    with roberta_fast.use_backend("cpu"):  # the context manager wins over the environment
        assert backends.resolve("cpu") == "cpu"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve("cpu")


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        with roberta_fast.use_backend("fastest"):
            pass


def test_cpu_backend_refuses_cuda_tensors_with_a_reason():
    with roberta_fast.use_backend("cpu"):
        with pytest.raises(backends.BackendUnavailableError, match="CPU tensors only"):
            backends.resolve("cuda")


def test_triton_runs_on_cpu_only_in_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("NOT RUN: checks the CPU interpreter path")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert roberta_fast.available_backends()["triton"] == "ok (interpreter)"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in roberta_fast.available_backends()["triton"]


def test_auto_picks_cpu_kernels_for_cpu_tensors():
    with roberta_fast.use_backend("auto"):
        assert backends.resolve(torch.device("cpu")) == "cpu"
