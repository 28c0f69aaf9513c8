"""The ``roberta-fast`` command line: argument errors, ``bench``, ``profile`` and ``check``.

The benchmark and profile runs use the real suites and the real training loop at tiny sizes (the
suite's sizes are swapped for small ones) so that the whole file stays fast on a CPU.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import json
from pathlib import Path

import pytest
import torch

from roberta_fast import cli, profiling

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            vocab_size=1000, max_position_embeddings=130)
ENV_FIELDS = ("device_name", "torch", "triton", "cuda", "transformers", "python", "cpu_model",
              "cpu_count", "git", "date")
PATCH_IMPORTABLE = importlib.util.find_spec("roberta_fast.patch") is not None


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """``cli.main(argv)``: exit status, stdout, stderr (argparse errors exit through SystemExit)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["bench", "--op", "softmax"], "invalid choice: 'softmax'"),
    (["bench", "--dtype", "fp64"], "invalid choice: 'fp64'"),
    (["bench", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["profile", "--batch", "0"], "must be at least 1"),
    (["profile", "--steps", "two"], "expected a whole number"),
    (["profile", "--amp", "fp8"], "invalid choice: 'fp8'"),
    (["check", "--dtype", "int8"], "invalid choice: 'int8'"),
    ([], "required"),
])
def test_bad_arguments_exit_with_status_2_and_say_why(argv, words):
    code, _, err = run_main(argv)
    assert code == 2
    assert words in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="NOT RUN: checks the no-GPU error")
@pytest.mark.parametrize("command", ["bench", "profile", "check"])
def test_cuda_without_a_gpu_is_a_clear_error(command):
    code, _, err = run_main([command, "--device", "cuda"])
    assert code == 2
    assert "no CUDA device is available" in err


def test_profile_input_errors_are_one_line(tmp_path):
    code, _, err = run_main(["profile", "--config", str(tmp_path / "missing.json"),
                             "--device", "cpu"])
    assert code == 2 and "neither a preset" in err
    code, _, err = run_main(["profile", "--config", "tiny", "--seq", "400", "--device", "cpu"])
    assert code == 2 and "max_position_embeddings" in err
    bad = tmp_path / "ids.pt"
    torch.save(torch.tensor([[0, 5, 5000, 2]]), bad)  # 5000 is outside tiny's vocabulary
    code, _, err = run_main(["profile", "--config", "tiny", "--seq", "8", "--lengths", str(bad),
                             "--device", "cpu", "--steps", "1", "--warmup", "0",
                             "--out", str(tmp_path)])
    assert code == 2 and "outside the model's vocabulary" in err
    code, _, err = run_main(["profile", "--config", "tiny", "--device", "cpu", "--dtype", "bf16",
                             "--amp", "bf16"])
    assert code == 2 and "--amp none" in err
    code, _, err = run_main(["profile", "--config", "tiny", "--device", "cpu", "--dtype", "fp16"])
    assert code == 2 and "--dtype bf16 on the CPU" in err
    assert "Traceback" not in err


def test_bench_without_a_checkout_says_where_the_suites_live(monkeypatch):
    monkeypatch.setattr(profiling, "repo_root", lambda: None)
    code, _, err = run_main(["bench", "--device", "cpu", "--quick"])
    assert code == 2
    assert "benchmarks/ folder" in err and "pip install" in err


# ---------------------------------------------------------------------------------------------
# bench (the real bench_model suite at tiny sizes)
# ---------------------------------------------------------------------------------------------

def _tiny_sizes(device, quick):
    return ([("tiny", TINY, 1, 16), ("tiny", TINY, 2, 16)],
            [("tiny-mlm", TINY, 2, 2, 16)])


def _tiny_e2e_sizes(device, quick):
    return [("tiny", TINY, 2, "train", 3, 16), ("tiny", TINY, 2, "infer", 3, 16)]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    from benchmarks import bench_model

    out_dir = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_model, "_sizes", _tiny_sizes)
        mp.setattr(bench_model, "_e2e_sizes", _tiny_e2e_sizes)
        code, stdout, stderr = run_main(["bench", "--quick", "--op", "model", "--device", "cpu",
                                         "--dtype", "fp32", "--out", str(out_dir), "--plot"])
    return code, stdout, stderr, out_dir


def test_bench_writes_json_with_environment_ceilings_and_rows(bench_run):
    code, _, stderr, out_dir = bench_run
    assert code == 0, stderr
    stamped = list(out_dir.glob("bench-model-*.json"))
    assert len(stamped) == 1
    report = json.loads((out_dir / "bench-latest.json").read_text())
    assert report == json.loads(stamped[0].read_text())
    assert report["device"] == "cpu" and report["dtype"] == "fp32" and report["quick"] is True
    for key in ENV_FIELDS:
        assert key in report["environment"], key
    assert report["environment"]["cpu_count"] >= 1
    assert report["ceilings"]["copy_gb_per_s"] > 0
    assert report["ceilings"]["matmul_tflop_per_s"] > 0

    rows = report["rows"]
    groups = {r["group"] for r in rows}
    # two layer sizes, one model size, and e2e training and inference at two length mixes
    assert len(groups) == 7
    baselines = [r for r in rows if r["baseline"]]
    assert baselines and all(r["status"] == "ok" for r in baselines)
    for r in baselines:
        assert r["median_s"] > 0 and r["tflop_per_s"] > 0
        assert 0 < r["fraction_of_ceiling"]
        others = [b for b in baselines if b["group"] == r["group"] and b is not r]
        assert set(r["speedup"]) == {b["impl"] for b in others}
    fast = [r for r in rows if not r["baseline"]]
    assert {r["impl"] for r in fast} == {"roberta_fast cpu", "roberta_fast unpad"}
    for r in fast:
        assert r["status"] in ("ok", "skipped"), r.get("reason")
        if r["status"] == "skipped":
            assert r["reason"]


def test_bench_e2e_rows_are_interleaved_throughput_of_real_tokens(bench_run):
    _, stdout, _, out_dir = bench_run
    report = json.loads((out_dir / "bench-latest.json").read_text())
    e2e = [r for r in report["rows"] if r["params"].get("kind") == "e2e"]
    # --quick on a CPU: stock and patched, no compiled rows, for 2 tasks x 2 length mixes
    assert len(e2e) == 8
    assert {r["impl"] for r in e2e} == {"HF sdpa", "roberta_fast unpad"}
    assert {(r["params"]["task"], r["params"]["lengths"]) for r in e2e} == {
        (t, n) for t in ("train", "infer") for n in ("realistic", "full")}
    for r in e2e:
        assert r["status"] == "ok", r.get("reason")
        assert r["timing"] == "best of 2 interleaved rounds"
        real = r["params"]["real_tokens"]
        full = r["params"]["batch"] * r["params"]["seq"]
        assert (real == full) == (r["params"]["lengths"] == "full") and real <= full
        assert r["tokens_per_s"] == pytest.approx(real / r["median_s"])
        assert r["tflop_per_s"] > 0
    for r in e2e:
        if not r["baseline"]:  # the speedup is measured against the group's stock row
            assert set(r["speedup"]) == {"HF sdpa"} and r["speedup"]["HF sdpa"] > 0
    assert "tok/s" in stdout and "(best of 2)" in stdout


def test_bench_prints_one_table_per_op_with_every_case(bench_run):
    _, stdout, _, out_dir = bench_run
    assert "ceilings:" in stdout
    for column in ("group", "impl", "time (median", "throughput", "of ceiling", "speedup"):
        assert column in stdout
    assert "layer tiny b2 s16 fwd+bwd" in stdout
    assert "HF sdpa" in stdout and "roberta_fast cpu" in stdout
    assert "TFLOP/s" in stdout
    assert str(out_dir) in stdout.replace("\n", "")


def test_bench_plot_writes_a_png(bench_run):
    _, _, _, out_dir = bench_run
    png = out_dir / "bench-model-speedup.png"
    assert png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out_dir / "bench-latest.json").read_text())
    assert report["plots"] == [str(png)]


def test_bench_interrupted_keeps_the_rows_measured_so_far(tmp_path, monkeypatch):
    """A SIGINT (what a time limit sends) mid-run: exit 130, the JSON written with the rows
    measured before it and every other case recorded as not run."""
    from benchmarks import bench_model, runner

    monkeypatch.setattr(bench_model, "_sizes", _tiny_sizes)
    monkeypatch.setattr(bench_model, "_e2e_sizes", _tiny_e2e_sizes)
    real_run_batch, calls = runner._run_batch, []

    def run_batch(batch, device, quick):
        calls.append(batch)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run_batch(batch, device, quick)

    monkeypatch.setattr(runner, "_run_batch", run_batch)
    code, _, err = run_main(["bench", "--quick", "--op", "model", "--device", "cpu",
                             "--out", str(tmp_path), "--plot"])
    assert code == 130 and "interrupted" in err
    report = json.loads((tmp_path / "bench-latest.json").read_text())
    assert report["interrupted"] is True and report["plots"] == []
    rows = report["rows"]
    planned = [(c.group, c.impl) for c in bench_model.cases("cpu", torch.float32, True)]
    assert [(r["group"], r["impl"]) for r in rows] == planned  # every case, in order
    measured = sum(len(b) for b in calls[:2])
    assert all(r["status"] == "ok" for r in rows[:measured])
    assert all(r["status"] == "skipped" and "interrupted" in r["reason"]
               for r in rows[measured:])


def test_bench_filter_that_matches_nothing_is_an_error():
    code, _, err = run_main(["bench", "--op", "model", "--device", "cpu", "--quick",
                             "--filter", "no-such-case"])
    assert code == 2
    assert "matches no case" in err


def test_bench_model_cases_follow_the_case_contract():
    from benchmarks import bench_model
    from benchmarks.common import Case

    for device, quick in itertools.product(("cpu", "cuda"), (True, False)):
        cases = list(bench_model.cases(device, torch.float32, quick))
        assert cases and all(isinstance(c, Case) and c.flops > 0 for c in cases)
        by_group: dict[str, list[Case]] = {}
        for c in cases:
            by_group.setdefault(c.group, []).append(c)
        for group, members in by_group.items():
            assert members[0].baseline, group  # baselines are listed first
            assert any(not c.baseline for c in members), group
            assert len({c.impl for c in members}) == len(members), group
        e2e = [c for c in cases if c.params.get("kind") == "e2e"]
        assert e2e and all(c.interleave and c.tokens > 0 for c in e2e)
        compiled = {c.impl for c in e2e if c.impl.startswith("torch.compile")}
        assert compiled == (set() if quick else {"torch.compile(HF sdpa)",
                                                 "torch.compile(roberta_fast unpad)"})
    # Half-precision runs add mixed-precision training (fp32 weights under autocast).
    amp = [c for c in bench_model.e2e_cases("cpu", torch.bfloat16, True) if c.params["autocast"]]
    assert amp and all(c.group.endswith("autocast bf16") and c.params["task"] == "train"
                       for c in amp)
    gpu_impls = {c.impl for c in bench_model.cases("cuda", torch.bfloat16, True)}
    assert {"torch.compile(HF sdpa)", "roberta_fast triton", "roberta_fast cuda unpad"} <= gpu_impls


# ---------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def profile_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("profile")
    trace = out_dir / "trace.json"
    code, stdout, stderr = run_main(["profile", "--config", "tiny", "--steps", "2", "--warmup",
                                     "1", "--batch", "2", "--seq", "16", "--device", "cpu",
                                     "--out", str(out_dir), "--trace", str(trace)])
    return code, stdout, stderr, out_dir


def test_profile_reports_stock_throughput(profile_run):
    code, stdout, stderr, out_dir = profile_run
    assert code in (0, 1), stderr
    report = json.loads((out_dir / "profile-latest.json").read_text())
    assert list(out_dir.glob("profile-tiny-*.json"))
    for key in ENV_FIELDS:
        assert key in report["environment"], key
    stock = report["results"]["stock"]
    assert stock["tokens_per_s"] > 0 and stock["samples_per_s"] > 0
    assert len(stock["step_times_s"]) == 2 and stock["step_time_median_s"] > 0
    # Real tokens only: uniform lengths in [seq/4, seq] leave padding out of the count.
    assert 2 * 2 * 4 <= stock["real_tokens"] <= stock["padded_tokens"] == 2 * 2 * 16
    assert all(loss == loss for loss in stock["losses"])
    top = stock["breakdown"]["top"]
    assert top and all(t["self_ms_per_step"] >= 0 for t in top)
    assert Path(stock["trace"]).is_file()
    assert "tokens/s" in stdout and "stock" in stdout
    png = next(out_dir.glob("profile-tiny-*.png"))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_profile_reports_patched_throughput_and_speedup(profile_run):
    if not PATCH_IMPORTABLE:
        pytest.skip("NOT RUN: roberta_fast.patch is not available yet")
    code, _, stderr, out_dir = profile_run
    report = json.loads((out_dir / "profile-latest.json").read_text())
    patched = report["results"]["patched"]
    assert "error" not in patched, patched.get("error")
    assert code == 0, stderr
    assert patched["tokens_per_s"] > 0
    # Same batches for both runs: the same real tokens were trained on.
    assert patched["real_tokens"] == report["results"]["stock"]["real_tokens"]
    assert report["speedup"] == pytest.approx(
        patched["tokens_per_s"] / report["results"]["stock"]["tokens_per_s"])


def test_synthetic_batches_have_realistic_lengths_and_specials():
    config = profiling.build_config("tiny")
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    batches = profiling.make_batches(config, batch=8, seq=40, count=3, lengths="uniform",
                                     generator=gen)
    for b in batches:
        lengths = b.attention_mask.sum(1)
        assert bool((lengths >= 10).all() and (lengths <= 40).all())
        assert b.real_tokens == int(lengths.sum())
        assert bool((b.input_ids[:, 0] == profiling.BOS).all())
        rows = torch.arange(8)
        assert bool((b.input_ids[rows, lengths - 1] == profiling.EOS).all())
        assert bool((b.input_ids[b.attention_mask == 0] == config.pad_token_id).all())
        assert bool(b.special[b.attention_mask == 0].all())
    full = profiling.make_batches(config, batch=2, seq=12, count=1, lengths="full", generator=gen)
    assert full[0].real_tokens == 24


def test_token_rows_from_npy_and_pt(tmp_path):
    import numpy as np

    config = profiling.build_config("tiny")
    pad = config.pad_token_id
    rows = np.array([[0, 7, 8, 2, pad, pad], [0, 9, 2, pad, pad, pad]], dtype=np.int64)
    np.save(tmp_path / "ids.npy", rows)
    torch.save({"input_ids": [torch.tensor([0, 5, 6, 7, 8, 2])]}, tmp_path / "ids.pt")
    gen = torch.Generator()
    b = profiling.make_batches(config, batch=2, seq=5, count=1,
                               lengths=str(tmp_path / "ids.npy"), generator=gen)[0]
    assert b.attention_mask.sum(1).tolist() == [4, 3]
    b = profiling.make_batches(config, batch=1, seq=5, count=1,
                               lengths=str(tmp_path / "ids.pt"), generator=gen)[0]
    assert b.input_ids[0].tolist() == [0, 5, 6, 7, 8]  # cut to --seq


# ---------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------

def test_check_lists_backends_and_checks_the_ops_that_exist():
    code, stdout, stderr = run_main(["check", "--device", "cpu", "--dtype", "fp32"])
    assert code == 0, stdout + stderr
    assert "backends" in stdout and "reference" in stdout
    assert "torch " + torch.__version__ in stdout
    ops_present = [spec.name for spec in cli.CHECKS
                   if importlib.util.find_spec(f"roberta_fast.ops.{spec.stem}") is not None]
    for name in ops_present:
        assert f"{name} " in stdout
    assert "pass" in stdout or not ops_present
    for spec in cli.CHECKS:
        if spec.name not in ops_present:
            assert f"ops.{spec.name}: skipped" in stdout


def test_check_fails_on_a_wrong_op(monkeypatch):
    def reference(x, weight):
        return x * weight

    def wrong(x, weight):
        return x * weight * 1.001  # a 0.1% error is far above fp32's ceiling

    spec = cli.OpSpec("scale", "scale", "forward_native",
                      lambda device, dtype: {"x": torch.randn(5, 7, device=device, dtype=dtype),
                                             "weight": torch.randn(7, device=device, dtype=dtype)},
                      positional=2)
    monkeypatch.setattr(cli, "CHECKS", (spec,))
    monkeypatch.setattr(cli, "_find", lambda package, stem, attr: (
        (wrong if package.endswith("ops") else reference), "ok"))
    code, stdout, _ = run_main(["check", "--device", "cpu", "--dtype", "fp32"])
    assert code == 1
    assert "FAIL" in stdout and "check(s) failed" in stdout


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_bench_on_gpu_reports_fraction_of_measured_ceilings(tmp_path, monkeypatch):
    from benchmarks import bench_model

    monkeypatch.setattr(bench_model, "_sizes", _tiny_sizes)
    monkeypatch.setattr(bench_model, "_e2e_sizes", _tiny_e2e_sizes)
    code, stdout, stderr = run_main(["bench", "--quick", "--op", "model", "--device", "cuda",
                                     "--filter", "HF sdpa", "--out", str(tmp_path)])
    assert code == 0, stdout + stderr
    report = json.loads((tmp_path / "bench-latest.json").read_text())
    assert report["environment"]["device_dir"].startswith("cuda-")
    assert report["ceilings"]["matmul_dtype"] == "bfloat16"
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    assert ok and all(0 < r["fraction_of_ceiling"] for r in ok)


@pytest.mark.parametrize("amp, dtype", [("bf16", "fp32"), ("none", "bf16")])
def test_profile_in_half_precision_on_cpu(tmp_path, amp, dtype):
    """``profile --amp bf16`` (autocast) and ``--dtype bf16`` (the whole model cast) on the CPU:
    stock and patched masked-LM training both run, with finite losses."""
    code, _, stderr = run_main(["profile", "--config", "tiny", "--steps", "1", "--warmup", "0",
                                "--batch", "2", "--seq", "16", "--device", "cpu", "--amp", amp,
                                "--dtype", dtype, "--out", str(tmp_path)])
    report = json.loads((tmp_path / "profile-latest.json").read_text())
    assert report["options"]["amp"] == amp and report["options"]["dtype"] == dtype
    for name in ("stock", "patched") if PATCH_IMPORTABLE else ("stock",):
        run = report["results"][name]
        assert "error" not in run, run.get("error")
        assert run["tokens_per_s"] > 0
        assert all(abs(loss) < float("inf") for loss in run["losses"])
    assert code == 0, stderr
