"""The README's one-call example runs as written (it builds its model from a config)."""
import contextlib
import io
import math
import pathlib

import pytest

pytest.importorskip("transformers")

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    start = text.index("```python", text.index("## One call on a model")) + len("```python")
    return text[start:text.index("```", start)]


def test_one_call_example_runs(one_thread):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(_example(), str(README), "exec"), {"__name__": "readme"})
    lines = printed.getvalue().splitlines()
    assert len(lines) == 3  # one line per training step
    for line in lines:
        step, loss, _ = line.split(" ", 2)
        assert math.isfinite(float(loss))
