"""pytest entry point of the suites: ``pytest benchmarks/ --benchmark-only``.

The suites are named ``bench_<op>.py`` (the same stem as the op everywhere), which pytest does not
collect by default; this collects them. Device, dtype and size come from
``ROBERTA_FAST_BENCH_DEVICE`` / ``_DTYPE`` / ``_QUICK`` (see ``benchmarks.common.env_settings``).
"""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
