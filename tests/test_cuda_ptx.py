"""What the CUDA LayerNorm kernels compile to, read from their PTX for sm_90a (no GPU needed).

The dropout mask follows csrc/common/philox.h: element ``o`` takes word ``o & 3`` of one
Philox4x32-10 call on counter ``o >> 2``. Where a thread's vector starts at a multiple of four
elements (``hidden % 4 == 0``) the kernels draw one call per four elements; this test counts the
``mul.hi`` instructions (two per Philox round) of each kernel instantiation to prove it. Skipped,
and reported as not run, where nvcc is not installed.
"""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda" / "layer_norm_residual.cu"
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="NOT RUN: nvcc is not installed, so the CUDA "
                                                     "kernels' PTX cannot be produced here")

DTYPES = {"f": ("fp32", 4), "6__half": ("fp16", 8), "13__nv_bfloat16": ("bf16", 8)}
# The kernels' Path enum (layer_norm_residual.cu), in declaration order.
PATHS = ("vec", "scalar4", "scalar")


def _setup_nvcc_flags() -> list[str]:
    """The ``nvcc`` flags setup.py builds the extension with (read from its source)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "nvcc":
                    return [ast.literal_eval(v) for v in value.elts]
    raise AssertionError("setup.py has no extra_compile_args['nvcc'] list")


def _mulhi_per_call() -> int:
    text = (ROOT / "csrc" / "common" / "philox.h").read_text()
    rounds = int(re.search(r"constexpr int kRounds = (\d+);", text).group(1))
    return 2 * rounds  # one mul.hi per multiplier per round


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> dict[tuple[str, str, int, str], dict]:
    """(kernel, dtype, NV, path) -> {"mulhi": count, "elems": elements per thread}."""
    out = tmp_path_factory.mktemp("ptx") / "layer_norm_residual.ptx"
    cmd = [NVCC, "-ptx", "-arch=sm_90a", "-std=c++17", f"-I{ROOT / 'csrc'}",
           *_setup_nvcc_flags(), str(SOURCE), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-3000:]}"
    found = {}
    for body in re.split(r"^(?:\.visible\s+)?\.entry\s+", out.read_text(), flags=re.M)[1:]:
        name = body.split("(", 1)[0]
        m = re.search(r"(fwd|bwd)_kernelI(\w+?)Li(\d+)ELN\w*?PathE(\d)E", name)
        if m is None:
            continue
        kind, mangled, nv, path = m.groups()
        dtype, vec = DTYPES[mangled]
        found[(kind, dtype, int(nv), PATHS[int(path)])] = {
            "mulhi": len(re.findall(r"\bmul\.hi\.", body)), "elems": int(nv) * vec}
    assert found, "no fwd_kernel/bwd_kernel instantiation found in the PTX"
    return found


def _per_element(kernels, kind, dtype, paths):
    rows = {k: v["mulhi"] / v["elems"] for k, v in kernels.items()
            if k[0] == kind and k[1] == dtype and k[3] in paths}
    assert rows, f"no {kind} {dtype} instantiation for paths {paths}"
    return rows


def test_forward_bf16_dropout_draws_one_philox_call_per_four_elements(kernels):
    per_call = _mulhi_per_call()
    rows = _per_element(kernels, "fwd", "bf16", ("vec",))
    # Every instantiation draws the mask: a count of 0 would mean the dropout path is gone.
    assert all(r > 0 for r in rows.values()), rows
    assert max(rows.values()) <= per_call / 4, rows


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_every_hidden_multiple_of_four_path_draws_per_four_elements(kernels, kind, dtype):
    # The 16-byte path and the per-element-load path with hidden % 4 == 0, forward and the
    # backward that regenerates the mask.
    per_call = _mulhi_per_call()
    rows = _per_element(kernels, kind, dtype, ("vec", "scalar4"))
    assert all(0 < r <= per_call / 4 for r in rows.values()), rows


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_other_hidden_sizes_keep_one_call_per_element(kernels, kind):
    # hidden % 4 != 0: the groups of four straddle the vectors, each element draws its own call
    # (the first round's product with the zero counter word folds away: 19 of 20 survive).
    per_call = _mulhi_per_call()
    rows = _per_element(kernels, kind, "bf16", ("scalar",))
    assert all(r >= per_call - 1 for r in rows.values()), rows
