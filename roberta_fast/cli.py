"""``roberta-fast``: benchmark the kernels, profile training throughput, check the environment.

    roberta-fast bench   [--op OP] [--device D] [--dtype T] [--quick] [--out DIR] [--plot] ...
    roberta-fast profile [--config base|large|tiny|config.json] [--batch N] [--seq N] ...
    roberta-fast check   [--device D] [--dtype T|all]

``bench`` runs the suites in the source checkout's ``benchmarks/`` folder; ``profile`` and ``check``
need only the installed package.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

import torch

OPS = ("layer_norm_residual", "attention", "masked_lm_loss", "model")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKEND_CHOICES = ("auto", "cuda", "triton", "cpu", "reference")


class CliError(Exception):
    """A user mistake or a missing prerequisite: printed as one line, exit status 2."""


def _console():
    from rich.console import Console

    # Piped output (CI logs, tests) gets a fixed width wide enough for the tables.
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
                       f"built with CUDA {torch.version.cuda}); use --device cpu")
    return name


def _dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device == "cuda" else torch.float32
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------

def _load_runner() -> ModuleType:
    """``benchmarks.runner`` from the source checkout this package is installed from."""
    from .profiling import repo_root

    root = repo_root()
    if root is None:
        here = Path(__file__).resolve().parent.parent
        raise CliError("the benchmark suites live in the repository's benchmarks/ folder, which is "
                       f"not next to this installation ({here}); run `roberta-fast bench` from a "
                       "source checkout installed with `pip install --no-build-isolation -e .`, or "
                       "`pytest benchmarks/ --benchmark-only` inside the checkout")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    runner = importlib.import_module("benchmarks.runner")
    if Path(runner.__file__).resolve().parent != root / "benchmarks":
        raise CliError(f"`import benchmarks` found {runner.__file__}, not the checkout's "
                       f"{root / 'benchmarks'}; another package named 'benchmarks' shadows it")
    return runner


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the suites, print one table per op, write JSON (and PNGs with --plot)."""
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    runner = _load_runner()
    console = _console()
    ops = list(runner.KNOWN_OPS) if args.op == "all" else [args.op]
    suites = runner.discover(ops)
    if args.op != "all" and suites[args.op].cases is None:
        raise CliError(f"--op {args.op}: {suites[args.op].status}")
    planned = runner.plan(suites, device, dtype, args.quick, args.filter)
    if args.filter and not planned:
        raise CliError(f"--filter {args.filter!r} matches no case of {', '.join(ops)}")
    report = runner.run(ops, device, dtype, quick=args.quick, filter=args.filter,
                        console=console, suites=suites, planned=planned)
    runner.render(report, console)
    from .profiling import results_dir

    out = Path(args.out) if args.out else results_dir(device)
    # Interrupted (a time limit's SIGINT): the JSON first and alone, while there is time.
    interrupted = report.get("interrupted", False)
    paths = runner.save(report, out, runner.safe_tag(args.op), plot=args.plot and not interrupted)
    console.print(f"results: {paths['json']} (and {Path(paths['latest']).name})")
    for p in paths["plots"]:
        console.print(f"plot: {p}")
    if interrupted:
        print("roberta-fast bench: interrupted; the rows measured so far are saved",
              file=sys.stderr)
        return 130
    return 1 if any(r.get("status") == "error" for r in report["rows"]) else 0


# ---------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------

def _fmt_bytes(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def cmd_profile(args: argparse.Namespace) -> int:
    """Train stock and patched masked-LM models; print throughput, memory, breakdown; save."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .profiling import (ProfileInputError, ProfileOptions, results_dir, run_profile,
                            save_report, write_profile_plot)

    device = _device(args.device)
    # Mixed precision by default on a GPU, unless the whole model is cast to a half dtype.
    amp = args.amp or ("bf16" if device == "cuda" and args.dtype == "fp32" else "none")
    opts = ProfileOptions(config=args.config, batch=args.batch, seq=args.seq, steps=args.steps,
                          warmup=args.warmup, grad_accum=args.grad_accum, amp=amp, dtype=args.dtype,
                          unpad=args.unpad, lengths=args.lengths, device=device,
                          backend=args.backend, trace=args.trace, seed=args.seed,
                          attention=not args.no_attention, layer_norm=not args.no_layer_norm,
                          mlm_loss=not args.no_mlm_loss)
    console = _console()
    tasks: dict[str, int] = {}
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            def on_step(label: str, done: int, total: int) -> None:
                if label not in tasks:
                    tasks[label] = progress.add_task(f"{label} steps", total=total)
                progress.update(tasks[label], completed=done)

            report = run_profile(opts, progress=on_step)
    except ProfileInputError as exc:
        raise CliError(str(exc)) from exc

    results = report["results"]
    table = Table(title=f"masked-LM training, {opts.config}, batch {opts.batch} x seq {opts.seq}"
                        f" x accum {opts.grad_accum}, amp {amp}, model {opts.dtype}, lengths {opts.lengths}"
                        + (", unpad" if opts.unpad else ""), title_justify="left")
    for col in ("run", "tokens/s (real)", "samples/s", "step (median)", "peak memory",
                "roberta_fast ops"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in results.items():
        if "error" in r:
            table.add_row(name, "[red]not run[/red]", "", "", "", "")
            continue
        bd = r["breakdown"]
        table.add_row(name, f"{r['tokens_per_s']:,.0f}", f"{r['samples_per_s']:.2f}",
                      f"{r['step_time_median_s'] * 1e3:.1f} ms", _fmt_bytes(r["peak_mem_bytes"]),
                      f"{bd['ours_percent']:.1f}% ({bd['ours_ms_per_step']:.1f} ms/step)")
    console.print(table)
    if report["speedup"] is not None:
        console.print(f"[bold]speedup (tokens/s, patched / stock): {report['speedup']:.2f}x[/bold]")
    for name, r in results.items():
        if "error" in r:
            console.print(f"[red]{name} run not done:[/red] {r['error']}")
            continue
        bd = r["breakdown"]
        top = Table(title=f"{name}: top ops by self {bd['clock']} time "
                          f"({bd['total_ms_per_step']:.1f} ms/step profiled)", title_justify="left")
        for col in ("op", "calls/step", "ms/step", "%"):
            top.add_column(col, justify="left" if col == "op" else "right", overflow="fold")
        for t in r["breakdown"]["top"]:
            label = f"[green]{t['name']}  (ours)[/green]" if t["ours"] else t["name"]
            top.add_row(label, f"{t['calls_per_step']:.0f}", f"{t['self_ms_per_step']:.2f}",
                        f"{t['percent']:.1f}")
        console.print(top)
        if r.get("trace"):
            console.print(f"trace: {r['trace']}")
    kinds = [r["peak_mem_kind"] for r in results.values() if "peak_mem_kind" in r]
    console.print(f"masking: {report['masking']}"
                  + (f"; peak memory is the {kinds[0]}" if kinds else ""))

    out = Path(args.out) if args.out else results_dir(device)
    name = Path(opts.config).stem if opts.config not in ("base", "large", "tiny") else opts.config
    path, _ = save_report(report, out, f"profile-{name}", "profile-latest.json")
    console.print(f"results: {path} (and profile-latest.json)")
    try:
        png = write_profile_plot(report, path.with_suffix(".png"))
        console.print(f"plot: {png}")
    except ImportError as exc:
        console.print(f"[yellow]no plot: matplotlib is not installed ({exc})[/yellow]")
    return 1 if any("error" in r for r in results.values()) else 0


# ---------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------

# Ceilings of the relative error against float64, and the factor over plain PyTorch in the same
# dtype that a kernel may reach (the project's test rule).
MAX_ERR = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
FACTOR = 2.0
# Added to the allowance so that a near-exact plain PyTorch does not demand an exact kernel; a
# tenth of the ceiling keeps one random draw from failing a correct kernel.
FLOOR = 0.1


@dataclass
class OpSpec:
    """How to call one op and its float64 reference on small random inputs."""

    name: str                    # attribute of roberta_fast.ops
    stem: str                    # roberta_fast/ops/<stem>.py and roberta_fast/reference/<stem>.py
    reference: str               # function in the reference module
    make: Callable[[str, torch.dtype], dict]   # named inputs, in the op's argument order
    positional: int              # how many leading inputs the op takes positionally


def _rand(*shape, device, dtype, grad=True):
    return torch.randn(*shape, device=device, dtype=torch.float32).to(dtype).requires_grad_(grad)


def _ln_inputs(device, dtype):
    rows, hidden = 14, 96
    return {"x": _rand(rows, hidden, device=device, dtype=dtype),
            "residual": _rand(rows, hidden, device=device, dtype=dtype),
            "weight": (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_(),
            "bias": _rand(hidden, device=device, dtype=dtype),
            "eps": 1e-5}


def _attn_inputs(device, dtype):
    batch, seq, heads, dim = 2, 13, 2, 32
    mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    mask[1, 9:] = False  # a padded row
    return {"q": _rand(batch, seq, heads, dim, device=device, dtype=dtype),
            "k": _rand(batch, seq, heads, dim, device=device, dtype=dtype),
            "v": _rand(batch, seq, heads, dim, device=device, dtype=dtype),
            "key_padding_mask": mask}


def _varlen_inputs(device, dtype):
    lengths, heads, dim = (5, 8), 2, 32
    total = sum(lengths)
    return {"q": _rand(total, heads, dim, device=device, dtype=dtype),
            "k": _rand(total, heads, dim, device=device, dtype=dtype),
            "v": _rand(total, heads, dim, device=device, dtype=dtype),
            "cu_seqlens": torch.tensor([0, lengths[0], total], dtype=torch.int32, device=device),
            "max_seqlen": max(lengths)}


def _mlm_inputs(device, dtype):
    tokens, hidden, vocab = 18, 64, 301
    labels = torch.randint(0, vocab, (tokens,), device=device)
    keep = torch.rand(tokens, device=device) < 0.3
    keep[0] = True
    return {"hidden": _rand(tokens, hidden, device=device, dtype=dtype),
            "weight": _rand(vocab, hidden, device=device, dtype=dtype),
            "bias": _rand(vocab, device=device, dtype=dtype),
            "labels": labels.masked_fill(~keep, -100)}


CHECKS = (
    OpSpec("fused_residual_layer_norm", "layer_norm_residual", "forward_native", _ln_inputs, 4),
    OpSpec("attention", "attention", "forward_native", _attn_inputs, 3),
    OpSpec("attention_varlen", "attention", "varlen_forward_native", _varlen_inputs, 5),
    OpSpec("masked_lm_loss", "masked_lm_loss", "forward_native", _mlm_inputs, 4),
)


def _find(package: str, stem: str, attr: str) -> tuple[Callable | None, str]:
    """``package.<stem>.<attr>`` (or ``package.<attr>``); None and a note when it does not exist."""
    pkg = importlib.import_module(package)
    fn = getattr(pkg, attr, None)
    if callable(fn) and not isinstance(fn, ModuleType):
        return fn, "ok"
    try:
        module = importlib.import_module(f"{package}.{stem}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{package}.{stem}":
            return None, f"{package}.{stem} does not exist yet"
        raise
    fn = getattr(module, attr, None)
    if not callable(fn):
        return None, f"{package}.{stem} has no {attr} yet"
    return fn, "ok"


def _call_reference(ref: Callable, inputs: dict, positional: int):
    """Call a reference with the inputs it names; inputs it does not name are passed in order."""
    params = inspect.signature(ref).parameters
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if all(n in inputs for n in required):
        return ref(**{n: v for n, v in inputs.items() if n in params})
    names = list(inputs)
    extra = {n: inputs[n] for n in names[positional:] if n in params}
    return ref(*(inputs[n] for n in names[:positional]), **extra)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom else 1.0)


def _clone_inputs(inputs: dict, dtype: torch.dtype | None) -> dict:
    out = {}
    for n, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(dtype or v.dtype).requires_grad_(True)
        out[n] = v
    return out


def _forward_backward(fn: Callable, inputs: dict, grad_out: torch.Tensor | None):
    out = fn(inputs)
    grad = grad_out if grad_out is not None else torch.randn_like(out, dtype=torch.float32)
    out.backward(grad.to(out.dtype))
    grads = {n: v.grad for n, v in inputs.items()
             if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return out, grads, grad


def check_op(spec: OpSpec, op: Callable, ref: Callable, backend: str, device: str,
             dtype: torch.dtype) -> dict:
    """One op on one backend in one dtype: errors of the output and every gradient against the
    float64 reference, next to plain PyTorch's errors in the same dtype."""
    import roberta_fast

    base_inputs = spec.make(device, dtype)
    names = list(base_inputs)

    def call_op(inp):
        return op(*(inp[n] for n in names[:spec.positional]),
                  **{n: inp[n] for n in names[spec.positional:]})

    def call_ref(inp):
        return _call_reference(ref, inp, spec.positional)

    ref64, ref64_grads, grad = _forward_backward(
        call_ref, _clone_inputs(base_inputs, torch.float64), None)
    plain_out, plain_grads, _ = _forward_backward(call_ref, _clone_inputs(base_inputs, None), grad)
    with roberta_fast.use_backend(backend):
        out, grads, _ = _forward_backward(call_op, _clone_inputs(base_inputs, None), grad)

    ceiling = MAX_ERR[dtype]
    figures = {"output": (_rel_err(out, ref64), _rel_err(plain_out, ref64))}
    for n in ref64_grads:
        if grads.get(n) is None:
            figures[f"d{n}"] = (float("inf"), 0.0)
        else:
            figures[f"d{n}"] = (_rel_err(grads[n], ref64_grads[n]),
                                _rel_err(plain_grads[n], ref64_grads[n]))
    failures = [n for n, (err, plain) in figures.items()
                if not (err < ceiling and err <= FACTOR * plain + FLOOR * ceiling)]
    return {"figures": figures, "failures": failures, "ceiling": ceiling}


def _check_backends(device: str) -> list[tuple[str, str | None]]:
    """(backend, None) to check, or (backend, why not) to report as not checked."""
    import roberta_fast

    found = roberta_fast.available_backends()
    order = ["cuda", "triton", "reference"] if device == "cuda" else ["cpu", "triton", "reference"]
    out = []
    for name in order:
        why = found[name]
        if device == "cpu" and name == "triton" and not why.startswith("ok"):
            why = ("not checked: on a CPU the Triton kernels run only in the interpreter; run "
                   "`TRITON_INTERPRET=1 roberta-fast check` to check them")
        out.append((name, None if why.startswith("ok") else why))
    return out


def cmd_check(args: argparse.Namespace) -> int:
    """Backends, versions, and a numerical check of every available backend of every op."""
    from rich.table import Table

    import roberta_fast
    from roberta_fast.backends import BackendUnavailableError

    from .profiling import environment

    device = _device(args.device)
    console = _console()
    if args.dtype == "all" or args.dtype is None:
        dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
        if args.dtype == "all" and device == "cpu":
            dtypes.append(torch.float16)
    else:
        dtypes = [DTYPES[args.dtype]]

    env = environment(device)
    console.print(f"[bold]roberta_fast {env['roberta_fast']}[/bold]  torch {env['torch']}  "
                  f"triton {env['triton']}  CUDA {env['cuda']}  transformers "
                  f"{env['transformers']}  Python {env['python']}")
    console.print(f"device: {env['device_name']} ({device}); CPU: {env['cpu_model']}, "
                  f"{env['cpu_count']} cores; "
                  f"TRITON_INTERPRET={'1' if env['triton_interpret'] else '0'}")
    btable = Table(title="backends", title_justify="left")
    btable.add_column("backend")
    btable.add_column("status", overflow="fold")
    for name, why in env["backends"].items():
        btable.add_row(name, f"[green]{why}[/green]" if why.startswith("ok") else why)
    console.print(btable)

    results = Table(title=f"numerical check against float64 (pass: under the dtype's ceiling "
                          f"and at most {FACTOR:g}x plain PyTorch's error in the same dtype "
                          f"+ {FLOOR:g}x the ceiling)", title_justify="left")
    for col in ("op", "backend", "dtype", "result", "output err (plain)", "worst grad err (plain)"):
        results.add_column(col, overflow="fold")
    notes: list[str] = []
    failed = checked = 0
    backends = _check_backends(device)
    for name, why in backends:
        if why is not None:
            notes.append(f"backend {name}: {why}")
    for spec in CHECKS:
        try:
            op, why_op = _find("roberta_fast.ops", spec.stem, spec.name)
            ref, why_ref = _find("roberta_fast.reference", spec.stem, spec.reference)
        except Exception as exc:  # noqa: BLE001 - an op module that fails to import is a failure
            results.add_row(spec.name, "", "", "[red]FAIL[/red]",
                            f"import failed: {type(exc).__name__}: {exc}", "")
            failed += 1
            continue
        if op is None or ref is None:
            notes.append(f"ops.{spec.name}: skipped, " + (why_op if op is None else why_ref))
            continue
        for backend, why in backends:
            if why is not None:
                continue
            for dtype in dtypes:
                dname = str(dtype).replace("torch.", "")
                try:
                    res = check_op(spec, op, ref, backend, device, dtype)
                except (BackendUnavailableError, NotImplementedError) as exc:
                    results.add_row(spec.name, backend, dname, "[yellow]n/a[/yellow]",
                                    str(exc)[:200], "")
                    continue
                except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported
                    results.add_row(spec.name, backend, dname, "[red]FAIL[/red]",
                                    f"{type(exc).__name__}: {str(exc)[:300]}", "")
                    failed += 1
                    continue
                checked += 1
                figs = res["figures"]
                out_err, out_plain = figs["output"]
                grads = {n: f for n, f in figs.items() if n != "output"}
                worst = max(grads, key=lambda n: grads[n][0]) if grads else None
                ok = not res["failures"]
                failed += not ok
                verdict = "[green]pass[/green]" if ok else \
                    f"[red]FAIL[/red] ({', '.join(res['failures'])})"
                results.add_row(spec.name, backend, dname, verdict,
                                f"{out_err:.2e} ({out_plain:.2e})",
                                f"{worst} {grads[worst][0]:.2e} ({grads[worst][1]:.2e})"
                                if worst else "")
    console.print(results)
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if failed:
        console.print(f"[red bold]{failed} check(s) failed[/red bold] ({checked} ran)")
        return 1
    if checked == 0:
        console.print("[yellow]no op could be checked here (see the notes)[/yellow]")
        return 0
    console.print(f"[green bold]all {checked} checks passed[/green bold]")
    return 0


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``roberta-fast`` and its three commands."""
    parser = argparse.ArgumentParser(
        prog="roberta-fast", description="Fast RoBERTa kernels: benchmark, profile, check.")
    sub = parser.add_subparsers(dest="command", metavar="{bench,profile,check}")
    sub.required = True

    bench = sub.add_parser("bench", help="time the kernels and the model against the baselines",
                           description="Run the benchmark suites of the source checkout's "
                                       "benchmarks/ folder; print tables and write JSON.")
    bench.add_argument("--op", choices=OPS + ("all",), default="all", help="suite to run")
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None,
                       help="default: cuda when available, else cpu")
    bench.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                       help="default: bf16 on cuda, fp32 on cpu")
    bench.add_argument("--quick", action="store_true", help="fewer sizes and shorter timing")
    bench.add_argument("--out", default=None,
                       help="result folder (default: benchmarks/results/<device-name>/)")
    bench.add_argument("--plot", action="store_true", help="also write speedup charts (PNG)")
    bench.add_argument("--filter", default=None, metavar="SUBSTRING",
                       help="only cases whose group or impl contains SUBSTRING (case-insensitive)")
    bench.set_defaults(func=cmd_bench)

    prof = sub.add_parser("profile", help="masked-LM training throughput, stock vs patched",
                          description="Train RoBERTa masked-LM stock and patched from the same "
                                      "weights on the same batches and masks; report tokens/s, "
                                      "memory and a per-op breakdown.")
    prof.add_argument("--config", default="base",
                      help="base, large, tiny, or a path to a RobertaConfig config.json")
    prof.add_argument("--batch", type=_positive, default=16)
    prof.add_argument("--seq", type=_positive, default=512, help="padded sequence length")
    prof.add_argument("--steps", type=_positive, default=20, help="timed optimizer steps")
    prof.add_argument("--warmup", type=_non_negative, default=5, help="untimed steps first")
    prof.add_argument("--grad-accum", type=_positive, default=1,
                      help="micro-batches per optimizer step")
    prof.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None,
                      help="autocast dtype (default: bf16 on cuda with an fp32 model, else none)")
    prof.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                      help="dtype of the whole model (model.to(dtype)); bf16/fp16 train in pure "
                           "half precision, with --amp none")
    prof.add_argument("--unpad", action="store_true",
                      help="patched model drops padding (varlen attention)")
    prof.add_argument("--lengths", default="uniform",
                      help="uniform (in [seq/4, seq]), full, or a .pt/.npy file of token-id rows")
    prof.add_argument("--device", choices=("cpu", "cuda"), default=None,
                      help="default: cuda when available, else cpu")
    prof.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                      help="roberta_fast backend of the patched model")
    prof.add_argument("--trace", default=None, metavar="PATH",
                      help="write Chrome traces of the profiled steps (PATH.stock.json, "
                           "PATH.patched.json)")
    for name in ("attention", "layer-norm", "mlm-loss"):
        prof.add_argument(f"--no-{name}", action="store_true",
                          help=f"patch without the fast {name.replace('-', ' ')}")
    prof.add_argument("--seed", type=int, default=0, help="seed of weights, data and masks")
    prof.add_argument("--out", default=None,
                      help="result folder (default: benchmarks/results/<device-name>/)")
    prof.set_defaults(func=cmd_profile)

    check = sub.add_parser("check", help="backends, versions and a quick numerical check",
                           description="List the backends and check every available backend of "
                                       "every op against the float64 reference.")
    check.add_argument("--device", choices=("cpu", "cuda"), default=None,
                       help="default: cuda when available, else cpu")
    check.add_argument("--dtype", choices=tuple(DTYPES) + ("all",), default=None,
                       help="default: fp32 and bf16 (and fp16 on cuda)")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``roberta-fast`` with ``argv`` (default: the process arguments); the exit status.

    Bad arguments exit through argparse (status 2, usage on stderr); a user mistake found later
    prints one ``error:`` line and returns 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"roberta-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"roberta-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
