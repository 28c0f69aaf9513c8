"""Runs the benchmark suites: measures the device's ceilings, times every case, renders one table
per op, and writes JSON (and, on request, PNG charts) under ``benchmarks/results/<device>/``.

``roberta-fast bench`` is its command line. A suite is a module ``benchmarks/bench_<op>.py`` with
``cases(device, dtype, quick)``; suites that do not exist yet are listed as missing.
"""
from __future__ import annotations

import importlib
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn)
from rich.table import Table

from benchmarks.common import Case, CasesFn, Unavailable, measure, run_case, run_interleaved
from roberta_fast.profiling import environment, save_report

BENCH_DIR = Path(__file__).resolve().parent
# The ops the project benchmarks, in display order; "model" is the end-to-end suite.
KNOWN_OPS = ("layer_norm_residual", "attention", "masked_lm_loss", "model")


@dataclass
class Suite:
    """A loaded suite, or the reason it could not be loaded."""

    op: str
    cases: CasesFn | None
    status: str = "ok"


def discover(ops: Iterable[str] | None = None) -> dict[str, Suite]:
    """The suites for ``ops`` (all known ops when None), in display order.

    A suite whose file is missing has status ``missing``; one that fails to import has the error as
    its status (the other suites still run).
    """
    wanted = list(ops) if ops is not None else list(KNOWN_OPS)
    found = {}
    for op in wanted:
        path = BENCH_DIR / f"bench_{op}.py"
        if not path.is_file():
            found[op] = Suite(op, None, "missing: no benchmarks/" + path.name + " yet")
            continue
        try:
            module = importlib.import_module(f"benchmarks.bench_{op}")
            cases = getattr(module, "cases")
        except Exception as exc:  # noqa: BLE001 - a broken suite must not stop the others
            found[op] = Suite(op, None, f"error: cannot load {path.name}: "
                                        f"{type(exc).__name__}: {exc}")
            continue
        found[op] = Suite(op, cases)
    return found


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------

def measure_ceilings(device: str, quick: bool = True, dtype: torch.dtype | None = None) -> dict:
    """Copy bandwidth (device-to-device copy of a large tensor) and dense matmul throughput.

    GPU: a 1 GiB copy and an 8192^3 bf16 matmul. CPU: a 256 MiB copy and a 2048^3 matmul in the
    run's ``dtype`` (fp32 by default; bf16 runs on AMX where the CPU has it, so a bf16 run is
    measured against the bf16 ceiling), on torch's threads.
    """
    if device == "cuda":
        n_bytes, size, mm_dtype = 1 << 30, 8192, torch.bfloat16
    else:
        n_bytes, size, mm_dtype = 256 << 20, 2048, dtype or torch.float32
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_t = measure(lambda: dst.copy_(src), device, quick=True)
    del src, dst
    a = torch.randn(size, size, device=device, dtype=mm_dtype)
    b = torch.randn(size, size, device=device, dtype=mm_dtype)
    mm_t = measure(lambda: torch.mm(a, b), device, quick=True)
    del a, b
    dtype_name = str(mm_dtype).replace("torch.", "")
    return {
        "copy_gb_per_s": 2 * n_bytes / copy_t.median_s / 1e9,  # read + write
        "copy_desc": f"{'device-to-device' if device == 'cuda' else 'memory-to-memory'} copy of "
                     f"{n_bytes >> 20} MiB (read + write)",
        "matmul_tflop_per_s": 2 * size ** 3 / mm_t.median_s / 1e12,
        "matmul_desc": f"{dtype_name} matmul {size}x{size}x{size}",
        "matmul_dtype": dtype_name,
    }


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def _matches(case: Case, needle: str | None) -> bool:
    if not needle:
        return True
    needle = needle.lower()
    return needle in case.group.lower() or needle in case.impl.lower()


def _add_comparisons(rows: list[dict], ceilings: dict) -> None:
    """Speedup over each baseline of the same op and group, and the fraction of the ceiling."""
    by_group: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_group.setdefault((row["op"], row["group"]), []).append(row)
    for group_rows in by_group.values():
        baselines = [r for r in group_rows if r["baseline"] and r.get("median_s")]
        for row in group_rows:
            if not row.get("median_s"):
                continue
            row["speedup"] = {b["impl"]: b["median_s"] / row["median_s"]
                              for b in baselines if b is not row}
            if "tflop_per_s" in row and ceilings.get("matmul_tflop_per_s"):
                row["fraction_of_ceiling"] = row["tflop_per_s"] / ceilings["matmul_tflop_per_s"]
                row["ceiling"] = "matmul"
            elif "gb_per_s" in row and ceilings.get("copy_gb_per_s"):
                row["fraction_of_ceiling"] = row["gb_per_s"] / ceilings["copy_gb_per_s"]
                row["ceiling"] = "copy"


def plan(suites: dict[str, Suite], device: str, dtype: torch.dtype, quick: bool,
         filter: str | None = None) -> list[tuple[str, Case]]:
    """The (op, case) pairs to run; a suite whose ``cases`` raises gets that error as status."""
    planned: list[tuple[str, Case]] = []
    for op, suite in suites.items():
        if suite.cases is None:
            continue
        try:
            planned.extend((op, c) for c in suite.cases(device, dtype, quick)
                           if _matches(c, filter))
        except Exception as exc:  # noqa: BLE001 - a broken suite must not stop the others
            suite.status = f"error: listing cases failed: {type(exc).__name__}: {exc}"
    return planned


def _batches(planned: list[tuple[str, Case]]) -> list[tuple[str, list[Case]]]:
    """The planned cases in timing units: a case alone, or the consecutive interleaved cases of
    one op and group together."""
    units: list[tuple[str, list[Case]]] = []
    for op, case in planned:
        last = units[-1] if units else None
        if (case.interleave and last is not None and last[0] == op and last[1][0].interleave
                and last[1][0].group == case.group):
            last[1].append(case)
        else:
            units.append((op, [case]))
    return units


def _run_batch(batch: list[Case], device: str, quick: bool) -> list[dict]:
    """Rows of one timing unit (see ``_batches``); failures become rows, never exceptions."""
    base = [c.row_fields() for c in batch]
    try:
        if batch[0].interleave:
            rows = run_interleaved(batch, device, rounds=2 if quick else 3)
        else:
            rows = [run_case(batch[0], device, quick)]
    except Unavailable as exc:
        return [{**b, "status": "skipped", "reason": str(exc)} for b in base]
    except Exception as exc:  # noqa: BLE001 - one failing case must not stop the run
        return [{**b, "status": "error", "reason": f"{type(exc).__name__}: {exc}",
                 "traceback": traceback.format_exc(limit=6)} for b in base]
    for row in rows:
        row.setdefault("status", "ok")
    return rows


def run(ops: Iterable[str] | None, device: str, dtype: torch.dtype, *, quick: bool,
        filter: str | None = None, console: Console | None = None,
        suites: dict[str, Suite] | None = None, ceilings: dict | None = None,
        planned: list[tuple[str, Case]] | None = None) -> dict:
    """Time every case of the selected suites; the report as a plain dict (rows, ceilings, env).

    ``suites`` replaces discovery and ``planned`` the case listing (see ``plan``); ``ceilings``
    skips measuring them. A case whose setup raises ``Unavailable`` is recorded as skipped, one
    that fails as an error; neither stops the run. An interrupt (SIGINT, as a time limit sends
    it) stops the run but keeps it: the cases not finished are recorded as skipped and the
    report has ``"interrupted": True``, so the rows measured so far are not lost.
    """
    console = console or Console()
    suites = suites if suites is not None else discover(ops)
    dtype_name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    if planned is None:
        planned = plan(suites, device, dtype, quick, filter)

    rows: list[dict] = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=False) as progress:
        task = progress.add_task("ceilings", total=len(planned) + (0 if ceilings else 1))
        if ceilings is None:
            ceilings = measure_ceilings(device, quick, dtype)
            progress.advance(task)
        units = _batches(planned)
        interrupted = False
        for i, (op, batch) in enumerate(units):
            first = batch[0]
            what = first.group if len(batch) > 1 else f"{first.group} | {first.impl}"
            progress.update(task, description=f"{op}: {what}")
            try:
                rows.extend({"op": op, **row} for row in _run_batch(batch, device, quick))
            except KeyboardInterrupt:
                interrupted = True
                for op_left, left in units[i:]:
                    rows.extend({"op": op_left, **c.row_fields(), "status": "skipped",
                                 "reason": "not run: the run was interrupted"} for c in left)
                break
            progress.advance(task, len(batch))
            if device == "cuda":
                torch.cuda.empty_cache()
        progress.update(task, description="interrupted" if interrupted else "done")

    _add_comparisons(rows, ceilings)
    return {
        "kind": "bench",
        "ops": list(suites),
        "device": device,
        "dtype": dtype_name,
        "quick": quick,
        "filter": filter,
        "environment": environment(device),
        "ceilings": ceilings,
        "suites": {op: s.status for op, s in suites.items()},
        "interrupted": interrupted,
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render(report: dict, console: Console | None = None) -> None:
    """One table per op: group, impl, time, throughput, fraction of ceiling, speedups, memory."""
    console = console or Console()
    ceil = report["ceilings"]
    on_gpu = report["device"] == "cuda"
    console.print(f"[bold]{report['environment']['device_name']}[/bold] ({report['device']}, "
                  f"{report['dtype']}{', quick' if report['quick'] else ''})  ceilings: "
                  f"{ceil['copy_gb_per_s']:.1f} GB/s ({ceil['copy_desc']}), "
                  f"{ceil['matmul_tflop_per_s']:.3g} TFLOP/s ({ceil['matmul_desc']})")
    mem_label = "peak mem" if on_gpu else "peak RSS +"
    for op in report["ops"]:
        status = report["suites"].get(op, "ok")
        rows = [r for r in report["rows"] if r["op"] == op]
        if status != "ok" and not rows:
            console.print(f"[yellow]{op}[/yellow]: {status}")
            continue
        table = Table(title=f"{op}" + ("" if status == "ok" else f" ({status})"),
                      title_justify="left", show_lines=False)
        for name, justify in (("group", "left"), ("impl", "left"), ("time (median ± IQR)", "right"),
                              ("throughput", "right"), ("of ceiling", "right"),
                              ("speedup", "left"), (mem_label, "right")):
            table.add_column(name, justify=justify, overflow="fold")
        last_group = None
        for r in rows:
            group = escape(r["group"]) if r["group"] != last_group else ""
            if last_group is not None and group:
                table.add_section()
            last_group = r["group"]
            impl = escape(r["impl"]) + (" [dim](baseline)[/dim]" if r["baseline"] else "")
            if r.get("status") != "ok":
                color = "yellow" if r.get("status") == "skipped" else "red"
                reason = r.get("reason", "")
                reason = reason if len(reason) <= 90 else reason[:87] + "..."
                table.add_row(group, impl, f"[{color}]{r.get('status')}[/{color}]", "", "",
                              f"[{color}]{escape(reason)}[/{color}]", "")
                continue
            if r.get("timing"):  # interleaved: the best of its rounds
                spread = f"(best of {r['runs']})"
            else:
                spread = f"± {_fmt_time(r['iqr_s'])}" if r.get("runs", 0) > 1 else "(1 run)"
            timing = f"{_fmt_time(r['median_s'])} {spread}"
            if "tokens_per_s" in r:
                throughput = f"{r['tokens_per_s']:,.0f} tok/s"
                if "tflop_per_s" in r:
                    throughput += f", {r['tflop_per_s']:.3g} TFLOP/s"
            elif "tflop_per_s" in r:
                throughput = f"{r['tflop_per_s']:.3g} TFLOP/s"
            elif "gb_per_s" in r:
                throughput = f"{r['gb_per_s']:.3g} GB/s"
            else:
                throughput = ""
            frac = r.get("fraction_of_ceiling")
            frac_s = f"{100 * frac:.1f}% {r['ceiling']}" if frac is not None else ""
            speed = ", ".join(
                f"[{'green' if s >= 1.0 else 'red'}]{s:.2f}x[/] vs {escape(name)}"
                for name, s in r.get("speedup", {}).items())
            table.add_row(group, impl, timing, throughput, frac_s, speed or "",
                          _fmt_bytes(r.get("peak_mem_bytes")))
        console.print(table)
    missing = [op for op, s in report["suites"].items() if s.startswith("missing")]
    if missing:
        console.print(f"[yellow]no suite yet for: {', '.join(missing)}[/yellow]")
    render_backend_pairs(report, console)
    errors = [r for r in report["rows"] if r.get("status") == "error"]
    if errors:
        console.print(f"[red]{len(errors)} case(s) failed; the reasons are in the table and the "
                      "JSON (rows[].traceback)[/red]")


def backend_pairs(report: dict) -> list[dict]:
    """The cases timed on both GPU backends, side by side: each ok row whose impl names ``cuda``
    (``roberta_fast cuda``, ``roberta_fast cuda varlen``, ...) with the row of the same op and group
    whose impl names ``triton`` in its place. ``cuda_speedup`` is the triton time over the cuda
    time: above 1 the cuda backend, which ``auto`` takes where it is built, is the faster."""
    rows = [r for r in report["rows"] if r.get("status") == "ok" and r.get("median_s")]
    by_impl = {(r["op"], r["group"], r["impl"]): r for r in rows}
    pairs = []
    for r in rows:
        words = r["impl"].split()
        if "cuda" not in words:
            continue
        twin = " ".join("triton" if w == "cuda" else w for w in words)
        t = by_impl.get((r["op"], r["group"], twin))
        if t is None:
            continue
        pairs.append({"op": r["op"], "group": r["group"], "impl": r["impl"], "twin": twin,
                      "cuda_s": r["median_s"], "triton_s": t["median_s"],
                      "cuda_speedup": t["median_s"] / r["median_s"]})
    return pairs


def render_backend_pairs(report: dict, console: Console | None = None) -> None:
    """One table of :func:`backend_pairs` (nothing when no case ran on both GPU backends)."""
    pairs = backend_pairs(report)
    if not pairs:
        return
    console = console or Console()
    table = Table(title="cuda against triton on the same case (auto takes cuda where it is built; "
                        "triton / cuda > 1: cuda is faster)", title_justify="left")
    for name, justify in (("op", "left"), ("group", "left"), ("impl", "left"), ("cuda", "right"),
                          ("triton", "right"), ("triton / cuda", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    for p in pairs:
        ratio = p["cuda_speedup"]
        table.add_row(p["op"], escape(p["group"]), escape(p["impl"]), _fmt_time(p["cuda_s"]),
                      _fmt_time(p["triton_s"]),
                      f"[{'green' if ratio >= 1.0 else 'red'}]{ratio:.2f}[/]")
    console.print(table)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

_SIZE_KEYS = ("tokens", "seqlen", "seq", "seq_len", "hidden", "rows", "batch", "size", "n")


def _x_axis(rows: list[dict]) -> tuple[str | None, Callable[[dict], float] | None]:
    """A numeric ``params`` key that varies across the groups of ``rows``, if there is one."""
    for key in _SIZE_KEYS:
        values = {}
        for r in rows:
            v = r.get("params", {}).get(key)
            if not isinstance(v, (int, float)):
                break
            values[r["group"]] = v
        else:
            if len(set(values.values())) == len({r["group"] for r in rows}) > 1:
                return key, lambda r, k=key: float(r["params"][k])
    return None, None


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    """Per op, ``bench-<op>-speedup.png``: each implementation's speedup over the group's first
    baseline against the size (a varying numeric param, else the group names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op in report["ops"]:
        rows = [r for r in report["rows"] if r["op"] == op and r.get("status") == "ok"]
        groups = list(dict.fromkeys(r["group"] for r in rows))
        first_base = {}
        for g in groups:
            base = next((r for r in rows if r["group"] == g and r["baseline"]), None)
            if base:
                first_base[g] = base
        if not first_base:
            continue
        key, x_of = _x_axis([r for r in rows if r["group"] in first_base])
        fig, ax = plt.subplots(figsize=(8, 4.5))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        for impl in impls:
            points = []
            for i, g in enumerate(groups):
                r = next((r for r in rows if r["group"] == g and r["impl"] == impl), None)
                if r is None or g not in first_base:
                    continue
                x = x_of(r) if x_of else i
                points.append((x, first_base[g]["median_s"] / r["median_s"]))
            if points:
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        if x_of:
            ax.set_xscale("log", base=2)
            ax.set_xlabel(key)
        else:
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=7)
        bases = sorted({b["impl"] for b in first_base.values()})
        ax.set_ylabel(f"speedup over {' / '.join(bases)}")
        ax.set_title(f"{op} — {report['environment']['device_name']} ({report['dtype']})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"bench-{op}-speedup.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def save(report: dict, out_dir: Path, tag: str, plot: bool) -> dict[str, list[str] | str]:
    """Write the JSON (``bench-<tag>-<timestamp>.json`` and ``bench-latest.json``) and the plots."""
    plots = [str(p) for p in write_plots(report, out_dir)] if plot else []
    report["plots"] = plots
    path, latest = save_report(report, out_dir, f"bench-{tag}", "bench-latest.json")
    return {"json": str(path), "latest": str(latest), "plots": plots}


def safe_tag(text: str) -> str:
    """``text`` reduced to characters that are safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
