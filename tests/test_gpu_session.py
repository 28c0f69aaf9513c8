"""benchmarks/gpu_session.sh: its dry run passes here (commands, time plan, output files), the plan
fits the device budget, and the cuda-against-triton pairing that run2 prints."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
BUDGET_MIN = 15


@pytest.fixture(scope="module")
def dry_run() -> subprocess.CompletedProcess:
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("NOT RUN: needs bash and coreutils' timeout")
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})


def test_dry_run_passes_and_plans_under_the_budget(dry_run):
    out = dry_run.stdout + dry_run.stderr
    assert dry_run.returncode == 0, out
    assert "dry run: OK" in out, out
    planned = re.findall(r"^planned total: ([0-9.]+) min", dry_run.stdout, flags=re.M)
    assert len(planned) == 1, out
    assert float(planned[0]) < BUDGET_MIN, out


def test_dry_run_lists_at_most_eight_files_per_run(dry_run):
    runs = dict(re.findall(r"^  (run[12]): (\d+) files: ", dry_run.stdout, flags=re.M))
    assert set(runs) == {"run1", "run2"}, dry_run.stdout
    assert all(int(n) <= 8 for n in runs.values()), runs


def test_header_states_the_plan_the_dry_run_checks(dry_run):
    # The script's header comment and benchmarks/README.md quote the planned seconds.
    total = re.search(r"= (\d+) s\nplanned total", dry_run.stdout)
    assert total, dry_run.stdout
    header = SCRIPT.read_text()
    assert f"planned total {total.group(1)} s" in header
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    assert f"= {total.group(1)} s" in readme


def test_unknown_mode_is_refused():
    done = subprocess.run(["bash", str(SCRIPT), "run3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "usage:" in done.stderr


def test_backend_pairs_match_cuda_and_triton_rows_of_one_case():
    from benchmarks import runner

    group = "fwd B32 L512 full bfloat16"
    report = {"rows": [
        {"op": "attention", "group": group, "impl": "roberta_fast cuda", "status": "ok",
         "median_s": 2e-3},
        {"op": "attention", "group": group, "impl": "roberta_fast triton", "status": "ok",
         "median_s": 1e-3},
        {"op": "attention", "group": group, "impl": "roberta_fast cuda varlen", "status": "ok",
         "median_s": 1e-3},
        {"op": "attention", "group": group, "impl": "roberta_fast triton varlen",
         "status": "error"},
        {"op": "attention", "group": "other", "impl": "roberta_fast triton", "status": "ok",
         "median_s": 1e-3},
        {"op": "model", "group": group, "impl": "roberta_fast cuda unpad", "status": "ok",
         "median_s": 1e-3},
        {"op": "model", "group": group, "impl": "roberta_fast triton unpad", "status": "ok",
         "median_s": 3e-3},
    ]}
    pairs = runner.backend_pairs(report)
    assert [(p["op"], p["impl"], p["twin"]) for p in pairs] == [
        ("attention", "roberta_fast cuda", "roberta_fast triton"),
        ("model", "roberta_fast cuda unpad", "roberta_fast triton unpad")]
    assert pairs[0]["cuda_speedup"] == pytest.approx(0.5)
    assert pairs[1]["cuda_speedup"] == pytest.approx(3.0)
