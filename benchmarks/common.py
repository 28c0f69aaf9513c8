"""What every benchmark suite shares: the Case record, timing, peak memory, pytest-benchmark glue.

A suite ``benchmarks/bench_<op>.py`` defines ``cases(device, dtype, quick)`` yielding ``Case``s whose
``setup()`` builds the inputs and returns the closure to time; listing cases is cheap and tensors
exist only while their case runs. ``roberta-fast bench`` and ``pytest benchmarks/`` time the same
closures.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch


@dataclass
class Case:
    """One implementation of one measured configuration.

    ``group`` names the configuration (rows of a group are compared with each other), ``impl`` the
    implementation ("torch eager", "torch.compile", "roberta_fast cpu", ...). ``setup()`` creates
    the inputs and returns ``fn``, which runs the work once (forward and backward where the group
    says so). ``bytes`` is what must move through memory (for GB/s), ``flops`` the arithmetic (for
    TFLOP/s). ``baseline`` marks a stock implementation that the others are compared with.
    """

    group: str
    impl: str
    setup: Callable[[], Callable[[], object]]
    bytes: float | None = None
    flops: float | None = None
    baseline: bool = False
    params: dict = field(default_factory=dict)
    # Timed round-robin with the other interleaved cases of its group, best of a few rounds
    # (``run_interleaved``): for cases long enough that a median per case, taken minutes apart on
    # a shared machine, would compare different loads.
    interleave: bool = False
    # Real (non-padding) tokens one call processes, for a tokens/s column.
    tokens: float | None = None

    @property
    def id(self) -> str:
        return f"{self.group} | {self.impl}"

    def row_fields(self) -> dict:
        """What every result row of this case says about it, measured or not."""
        return {"group": self.group, "impl": self.impl, "baseline": self.baseline,
                "params": self.params}


class Unavailable(Exception):
    """Raised by ``Case.setup()`` when its implementation cannot run here (a backend that is not
    built, an API not present); the runner lists the case as skipped and pytest skips it."""


CasesFn = Callable[[str, torch.dtype, bool], Iterable[Case]]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def env_settings() -> tuple[str, torch.dtype, bool]:
    """Device, dtype and quick flag for pytest runs (ROBERTA_FAST_BENCH_{DEVICE,DTYPE,QUICK})."""
    device = os.environ.get("ROBERTA_FAST_BENCH_DEVICE", default_device())
    dtype_name = os.environ.get("ROBERTA_FAST_BENCH_DTYPE")
    dtype = DTYPES[dtype_name] if dtype_name else default_dtype(device)
    quick = os.environ.get("ROBERTA_FAST_BENCH_QUICK", "1") == "1"
    return device, dtype, quick


def pytest_cases(cases_fn: CasesFn) -> list:
    """``pytest.param`` per case of ``cases_fn`` for the device/dtype/quick of ``env_settings``."""
    import pytest

    device, dtype, quick = env_settings()
    return [pytest.param(case, id=case.id) for case in cases_fn(device, dtype, quick)]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    median_s: float
    iqr_s: float
    runs: int


def measure(fn: Callable[[], object], device: str, *, quick: bool = False) -> Timing:
    """Median time of ``fn`` after warm-up.

    GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). CPU:
    ``torch.utils.benchmark.Timer.blocked_autorange`` (its thread count is torch's).
    """
    if device == "cuda":
        import triton.testing

        times_ms = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                           return_mode="all")
        times = sorted(t / 1e3 for t in times_ms)
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        return Timing(statistics.median(times), q[2] - q[0], len(times))
    from torch.utils import benchmark as tbench

    fn()  # warm-up (first-call allocations, lazy initialisation)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=0.3 if quick else 1.5)
    return Timing(m.median, m.iqr, len(m.times))


def _vm_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_memory(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory in bytes that one call of ``fn`` adds on top of what is already allocated.

    GPU: ``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set (VmHWM) during
    the call above its resident set before it, after resetting the peak through
    /proc/self/clear_refs; None where the kernel does not allow that.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _vm_kib("VmRSS")
        fn()
        return float(max(0, _vm_kib("VmHWM") - before) * 1024)
    except OSError:
        return None


def _row(case: Case, seconds: float, spread_s: float, runs: int, mem: float | None) -> dict:
    row = {**case.row_fields(), "median_s": seconds, "iqr_s": spread_s, "runs": runs,
           "peak_mem_bytes": mem}
    if case.bytes:
        row["gb_per_s"] = case.bytes / seconds / 1e9
    if case.flops:
        row["tflop_per_s"] = case.flops / seconds / 1e12
    if case.tokens:
        row["tokens_per_s"] = case.tokens / seconds
    return row


def run_case(case: Case, device: str, quick: bool = False) -> dict:
    """Set up, time and measure one case; a plain dict ready for JSON."""
    fn = case.setup()
    timing = measure(fn, device, quick=quick)
    row = _row(case, timing.median_s, timing.iqr_s, timing.runs, peak_memory(fn, device))
    del fn
    return row


def run_interleaved(cases: list[Case], device: str, *, rounds: int = 3,
                    min_round_s: float = 0.0) -> list[dict]:
    """Time ``cases`` (one group) round-robin: each round calls every case's closure in turn, and
    a case's time is its best call over the rounds (``best_times``), so that load from other work
    falls on all of them alike. Rows as ``run_case`` makes them, in the order of ``cases``; a
    case whose setup raises ``Unavailable`` gets ``{"status": "skipped"}`` fields instead.

    Every case is set up and called once (a warm-up, compiling where it compiles) before the
    first round, so their inputs and models live together for the group's duration.
    """
    fns: dict[str, Callable[[], object]] = {}
    skipped: dict[str, str] = {}
    for case in cases:
        try:
            fns[case.impl] = case.setup()
        except Unavailable as exc:
            skipped[case.impl] = str(exc)
    for fn in fns.values():  # warm-up (and compilation) outside the rounds
        fn()
        synchronize(device)
    best = best_times(fns, device, rounds=rounds, min_round_s=min_round_s) if fns else {}
    rows = []
    for case in cases:
        if case.impl in skipped:
            rows.append({**case.row_fields(), "status": "skipped",
                         "reason": skipped[case.impl]})
            continue
        row = _row(case, best[case.impl], 0.0, rounds, peak_memory(fns[case.impl], device))
        row["timing"] = f"best of {rounds} interleaved rounds"
        rows.append(row)
    return rows


def iter_cases(cases_fns: Iterable[CasesFn], device: str, dtype: torch.dtype,
               quick: bool) -> Iterator[Case]:
    for cases_fn in cases_fns:
        yield from cases_fn(device, dtype, quick)


def benchmark_case(benchmark, case: Case, device: str) -> None:
    """Time ``case`` with pytest-benchmark's ``benchmark`` fixture: the closure that
    ``roberta-fast bench`` times, synchronised on a GPU so that each round measures finished work.

    A case whose setup raises :class:`Unavailable` is skipped with its reason. The group, impl,
    and GB/s or TFLOP/s at the median go into the JSON's ``extra_info``.
    """
    import pytest

    try:
        fn = case.setup()
    except Unavailable as exc:
        pytest.skip(f"NOT RUN: {exc}")

    if device == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    timed()  # warm-up, as run_case does
    benchmark.group = case.group
    benchmark.extra_info.update(group=case.group, impl=case.impl, baseline=case.baseline,
                                params=case.params)
    benchmark(timed)
    median = benchmark.stats.stats.median
    if case.bytes:
        benchmark.extra_info["gb_per_s"] = case.bytes / median / 1e9
    if case.flops:
        benchmark.extra_info["tflop_per_s"] = case.flops / median / 1e12


def native_backends(device: str) -> list[str]:
    """The roberta_fast backends worth timing on ``device``: cuda and triton on a GPU, the C++
    ``cpu`` kernels on a CPU (Triton on a CPU is the interpreter: never timed)."""
    import roberta_fast

    found = roberta_fast.available_backends()
    if device == "cuda":
        return [name for name in ("cuda", "triton") if found[name] == "ok"]
    return ["cpu"] if found["cpu"] == "ok" else []


def best_times(fns: dict[str, Callable[[], object]], device: str = "cpu", *, rounds: int = 5,
               min_round_s: float = 0.25) -> dict[str, float]:
    """Best time of one call of each ``fn``, measured round-robin: every round calls each fn
    in turn, once and then again until ``min_round_s`` is spent, so that load from other
    processes falls on all of them alike; the minimum over every call of every round is kept
    (the least disturbed run).

    For side-by-side comparisons on a shared machine, where a median per implementation taken at
    different moments compares different loads.
    """
    import time

    best = {name: float("inf") for name in fns}
    for fn in fns.values():  # warm-up: first-call allocations, lazy initialisation
        fn()
    synchronize(device)
    for _ in range(rounds):
        for name, fn in fns.items():
            spent = 0.0
            while True:
                start = time.perf_counter()
                fn()
                synchronize(device)
                took = time.perf_counter() - start
                spent += took
                best[name] = min(best[name], took)
                if spent >= min_round_s:
                    break
    return best


def copy_fn(nbytes: int, device: str = "cpu", *, allocate: bool = True) -> Callable[[], object]:
    """A copy that moves ``nbytes`` through memory (``nbytes / 2`` read, as much written): the
    bandwidth ceiling of a kernel that moves ``nbytes``. ``allocate``: the destination is a new
    tensor per call (``torch.empty_like(a).copy_(a)``), as a kernel that returns new outputs pays
    for them; otherwise one destination is reused, as an in-place kernel does.
    """
    src = torch.empty(max(1, nbytes // 8), dtype=torch.float32, device=device).uniform_()
    if allocate:
        return lambda: torch.empty_like(src).copy_(src)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)
