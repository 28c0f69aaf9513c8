"""Every Triton kernel of roberta_fast compiled for sm_80 and sm_90a, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, how the other tests run the kernels here) accepts code that a
GPU compile rejects (a global that is not a constexpr, an op the backend cannot lower) and says
nothing about registers. Here each kernel goes through
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``
down to a cubin:

* Kernels: every ``JITFunction`` (bare or under an ``Autotuner``) defined in a module of
  ``roberta_fast.triton`` and called by no other jit function there (helpers compile inside their
  callers). A kernel found without a compile case fails the test.
* Cases: the launchers themselves run on meta or small CPU tensors with the kernels swapped for
  recorders, so signatures, specialisations (pointers and ints divisible by 16) and constexprs are
  what a GPU launch passes. Attention tiles come from ``pickable_tiles``, the rule the autotuner
  applies: every tile of each architecture's table at each of its limits (the largest head dim it
  takes with no dropout, with the grouped and with the per-element dropout draw; bf16, or fp32
  for fp32 tiles; key padding mask), compiled for that architecture; plus, on both, fp16, the
  other layouts and odd head dims with the untuned (first) tile. LayerNorm for H = 768 and 1024
  (one compile: H is a runtime argument) and 1001 (rows not on Philox counters), every dtype,
  dropout on and off; the MLM row kernel for both WRITE_GRAD values, every dtype and both block
  sizes a GPU launch uses. Identical compiles run once.
* Failures: a compile error; more shared memory than the architecture gives a block; local memory
  (register spills, read with ``cuobjdump -res-usage`` from the cubin: the ``n_spills`` Triton
  reports at run time) wherever fp16/bf16 at head dim 32, 64 or 128 can go; the attention
  forward's dropout costing more than a quarter of the per-element draw's ``mul.hi``
  instructions. Spills elsewhere (fp32, odd head dims) are listed, not failed.

The table of kernel / case / architecture -> registers, spills, shared memory prints with ``-s`` or
``-rA``. Cases run in worker processes (TRITON_INTERPRET unset there), one per core up to 8;
compiled kernels land in Triton's cache, so a second run takes seconds.
"""
from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import importlib
import importlib.util
import multiprocessing
import os
import re
import subprocess
import tempfile
import textwrap
import time
import warnings

import pytest

ARCHS = (80, 90)
ARCH_NAMES = {80: "sm_80", 90: "sm_90a"}
PACKAGE = "roberta_fast.triton"
WORKERS = max(1, min(8, len(os.sched_getaffinity(0))))  # compiles are single-threaded


# --------------------------------------------------------------------------------------------
# Cases and results (plain data: they cross process boundaries)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One compile: a kernel with its full specialisation and launch options."""

    source: str  # module name, or the path of a .py file
    kernel: str  # attribute of the module: a JITFunction or an Autotuner around one
    label: str
    signature: tuple  # ((arg, type), ...) as triton.compile takes it
    constexprs: tuple  # ((arg, value), ...)
    attrs: tuple  # ((arg index, specialisation), ...), e.g. (3, "D"): divisible by 16
    options: tuple  # (("num_warps", 8), ("num_stages", 3))
    archs: tuple = ARCHS
    no_spill: bool = False  # a spill fails the test
    group: str = "variant"  # "tile" | "variant" | "probe" | "plain"

    def key(self) -> tuple:
        return self.source, self.kernel, self.signature, self.constexprs, self.attrs, self.options


@dataclasses.dataclass
class Result:
    case: Case
    arch: int
    seconds: float = 0.0
    error: str | None = None
    regs: int = 0
    spill: int = 0
    shared: int = 0
    mulhi: int = 0


# --------------------------------------------------------------------------------------------
# Worker side: these import roberta_fast with TRITON_INTERPRET unset
# --------------------------------------------------------------------------------------------

def _init_worker() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    # Triton 3.9 says once per process that its FP-fusion default will change.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _load_module(source: str):
    if source.endswith(".py"):
        name = "_compile_probe_" + re.sub(r"\W", "_", os.path.basename(source)[:-3])
        spec = importlib.util.spec_from_file_location(name, source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(source)


def _jit_function(obj):
    """The JITFunction under an Autotuner / Heuristics chain, or None for anything else."""
    from triton.runtime.jit import JITFunction, KernelInterface

    while isinstance(obj, KernelInterface) and not isinstance(obj, JITFunction):
        obj = getattr(obj, "fn", None)
    return obj if isinstance(obj, JITFunction) else None


def find_kernels(module) -> list[str]:
    """Names of the module's kernels: its jit functions that none of its jit functions calls."""
    jitted = {}
    for name, obj in vars(module).items():
        fn = _jit_function(obj)
        if fn is not None and fn.module == module.__name__:
            jitted[name] = fn
    called = set()
    for name, fn in jitted.items():
        tree = ast.parse(textwrap.dedent(fn.src))
        called |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)
                   and node.id != name}
    return sorted(name for name in jitted if name not in called)


def _spec(fn, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) of a launch, specialised as the runtime does."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    options = {k: v for k, v in options.items() if v is not None}
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    missing = set(fn.arg_names) - set(bound)
    assert not missing, f"{fn.__name__}: the launcher passes no {sorted(missing)}"
    signature, constexprs, attrs = [], [], []
    for index, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = bound[name]
        if param.is_constexpr:
            signature.append((name, "constexpr"))
            constexprs.append((name, value))
            continue
        ty, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        signature.append((name, ty))
        if ty == "constexpr":  # an int equal to 1
            constexprs.append((name, value))
        elif attr:
            attrs.append((index, attr))
    return tuple(signature), tuple(constexprs), tuple(attrs), tuple(sorted(options.items()))


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](...)`` records the launch instead of running it."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, args, dict(kwargs), None))


def _record(module, kernel_names, call) -> list:
    """Launches ``call()`` makes of ``module``'s kernels: (name, args, kwargs, tuning info)."""
    launches: list = []
    saved = {name: getattr(module, name) for name in kernel_names}
    for name in kernel_names:
        setattr(module, name, _Recorder(name, launches))
    tuned_launch = getattr(module, "_launch", None)
    if tuned_launch is not None:
        def launch(kernel, tuning, lay, grid_block, dtype, dropout, args):
            info = dict(tuning=tuning, fp32=str(dtype) == "torch.float32", bucket=lay.bucket,
                        block_d=lay.block_d, draw=lay.draw(dropout))
            launches.append((kernel.name, args, lay.constexprs(dropout), info))
        module._launch = launch
    try:
        call()
    finally:
        for name, obj in saved.items():
            setattr(module, name, obj)
        if tuned_launch is not None:
            module._launch = tuned_launch
    return launches


# Attention problems: (dtype, head dim, layout, Lmax, dropout). Lmax 510 and 97 put rows off
# Philox counter boundaries (the per-element draw); "mask" is padded with a key padding mask.
# The tile sweep covers bf16 and fp32 with a key padding mask at D = 32..128 and every dropout
# draw on both architectures; these add fp16, the other layouts and the odd head dims (a padded
# 64- or 128-wide tile), each architecture seeing every dtype and layout.
_ATTN_VARIANTS = {
    80: [("float16", 40, "varlen", 97, True), ("float16", 128, "padded", 512, False),
         ("bfloat16", 32, "varlen", 512, False), ("float32", 40, "padded", 97, True)],
    90: [("float16", 128, "padded", 512, False), ("bfloat16", 80, "mask", 96, True),
         ("float32", 64, "varlen", 512, False)],
}
_TUNED_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


def _attention_launches(attention, dtype_name, head_dim, layout, lmax, dropout):
    import torch

    dtype = getattr(torch, dtype_name)
    meta = dict(device="meta")
    heads, batch = 12, 8
    if layout == "varlen":
        total = batch * lmax // 2
        q = torch.empty(total, heads, head_dim, dtype=dtype, **meta)
        cu, mask, lse_shape = torch.empty(batch + 1, dtype=torch.int32, **meta), None, (heads,
                                                                                         total)
    else:
        q = torch.empty(batch, lmax, heads, head_dim, dtype=dtype, **meta)
        cu, lse_shape = None, (batch, heads, lmax)
        mask = torch.empty(batch, lmax, dtype=torch.bool, **meta) if layout == "mask" else None
    seed = torch.empty(1, dtype=torch.int64, **meta)
    p = 0.1 if dropout else 0.0
    lse = torch.empty(lse_shape, dtype=torch.float32, **meta)
    names = find_kernels(attention)

    def call():
        attention.attention_fwd(q, q, q, mask, cu, lmax, 0.125, p, seed)
        attention.attention_bwd(q, q, q, q, q, lse, mask, cu, lmax, 0.125, p, seed)

    return _record(attention, names, call)


def _must_not_spill(dtype_name: str, head_dim: int) -> bool:
    """The rule: no spill wherever fp16/bf16 at head dim 32, 64 or 128 can go."""
    return dtype_name in ("float16", "bfloat16") and head_dim in (32, 64, 128)


def _attention_case_list(attention, problem, arch, group, pick) -> list[Case]:
    """Cases of the launches ``problem`` makes on ``arch``; ``pick(name, tiles)`` chooses the
    tiles of each autotuned kernel (from those the rule allows); plain kernels come along in
    the "variant" group only."""
    dtype_name, head_dim, layout, lmax, dropout = problem
    what = (f"{dtype_name.replace('bfloat', 'bf').replace('float', 'fp')} D{head_dim} {layout} "
            f"L{lmax}{' drop' if dropout else ''}")
    cases = []
    for name, args, kwargs, info in _attention_launches(attention, *problem):
        fn = _jit_function(getattr(attention, name))
        if info is None:
            if group == "variant":
                cases.append(_make_case(attention.__name__, name, fn, args, kwargs, what,
                                        archs=(arch,), group="plain"))
            continue
        tiles = attention.pickable_tiles(info["tuning"], arch=arch, fp32=info["fp32"],
                                         bucket=info["bucket"], block_d=info["block_d"],
                                         draw=info["draw"])
        for tile in pick(name, tiles):
            label = f"{what} | {tile.block_m}x{tile.block_n} w{tile.warps} s{tile.stages}"
            cases.append(_make_case(
                attention.__name__, name, fn, args, {**kwargs, **tile.options()}, label,
                archs=(arch,), group=group,
                no_spill=group != "probe" and _must_not_spill(dtype_name, head_dim)))
    return cases


def _tile_limits(tile, attention) -> list[tuple[int, int]]:
    """(dropout draw, head dim) pairs at which a tile must fit: each of its limits."""
    points = [(attention.DRAW_GROUPED, tile.d_grouped), (attention.DRAW_ELEMENT, tile.d_element)]
    points = [(draw, d) for draw, d in points if d]
    if tile.d > max(tile.d_grouped, tile.d_element):
        points.append((attention.DRAW_NONE, tile.d))
    return points


def _attention_cases() -> list[Case]:
    attention = importlib.import_module(f"{PACKAGE}.attention")
    tunings = dict(zip(_TUNED_KERNELS, (attention._FWD_TUNING, attention._DKDV_TUNING,
                                        attention._DQ_TUNING)))
    cases = []
    for arch in ARCHS:
        # Every tile of the architecture's table at each of its limits (Lmax 512 keeps every
        # tile in the running; 510 takes the per-element draw).
        for name, tuning in tunings.items():
            for tile in tuning.tables[arch]:
                for draw, head_dim in _tile_limits(tile, attention):
                    problem = ("float32" if tile.fp32 else "bfloat16", head_dim, "mask",
                               510 if draw == attention.DRAW_ELEMENT else 512,
                               draw != attention.DRAW_NONE)

                    def this_tile(kernel, tiles, name=name, tile=tile):
                        assert kernel != name or tile in tiles, f"{name}: {tile} not pickable"
                        return [tile] if kernel == name else []
                    cases += _attention_case_list(attention, problem, arch, "tile", this_tile)
        # Code paths: dtype x layout x dropout x head dim, with the untuned (first) tile.
        for problem in _ATTN_VARIANTS[arch]:
            cases += _attention_case_list(attention, problem, arch, "variant",
                                          lambda kernel, tiles: tiles[:1])
    # The forward's dropout draws on one tile (the first for the grouped draw), sm_90a.
    first = attention.pickable_tiles(attention._FWD_TUNING, arch=90, fp32=False, bucket=512,
                                     block_d=64, draw=attention.DRAW_GROUPED)[0]
    for lmax, dropout in ((512, False), (512, True), (510, True)):
        cases += _attention_case_list(
            attention, ("bfloat16", 64, "mask", lmax, dropout), 90, "probe",
            lambda kernel, tiles: [first] if kernel == "_attn_fwd_kernel" else [])
    cases.append(_dropout_mask_case(attention))
    return cases


def _dropout_mask_case(attention) -> Case:
    import torch

    seed = torch.empty(1, dtype=torch.int64, device="meta")
    launches = _record(attention, ["_dropout_mask_kernel"],
                       lambda: attention.dropout_mask(seed, 8, 12, 512, 0.1))
    (name, args, kwargs, _), = launches
    fn = _jit_function(getattr(attention, name))
    return _make_case(attention.__name__, name, fn, args, kwargs, "B8 H12 L512", group="plain")


def _layer_norm_cases() -> list[Case]:
    import torch

    module = importlib.import_module(f"{PACKAGE}.layer_norm_residual")
    names = find_kernels(module)
    cases = []
    for hidden in (768, 1024, 1001):  # 1001: rows do not start on Philox counters
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for p in (0.0, 0.1):
                rows = 64
                x = torch.randn(rows, hidden).to(dtype)
                w = torch.ones(hidden, dtype=dtype)
                seed = torch.zeros(1, dtype=torch.int64)
                mean = torch.zeros(rows)

                def call():
                    module.layer_norm_residual_triton_fwd(x, x, w, w, 1e-5, p, seed)
                    module.layer_norm_residual_triton_bwd(x, x, x, w, mean, mean, p, seed)

                what = f"H{hidden} {str(dtype)[6:]}{' drop' if p else ''}"
                for name, args, kwargs, _ in _record(module, names, call):
                    cases.append(_make_case(module.__name__, name, _jit_function(
                        getattr(module, name)), args, kwargs, what, group="plain"))
    return cases


def _masked_lm_loss_cases() -> list[Case]:
    import torch

    module = importlib.import_module(f"{PACKAGE}.masked_lm_loss")
    names = find_kernels(module)
    cases = []
    for vocab in (50265, 1000):  # 4096-wide blocks with 8 warps; a 1024-wide block with 4
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for write_grad in (False, True):
                logits = torch.zeros(2, vocab, dtype=dtype)
                labels = torch.zeros(2, dtype=torch.int64)
                scale = torch.ones(1)
                what = f"V{vocab} {str(dtype)[6:]}{' grad' if write_grad else ''}"
                for name, args, kwargs, _ in _record(module, names, lambda: (
                        module.masked_lm_loss_rows_triton(logits, labels, scale, -100,
                                                          write_grad))):
                    cases.append(_make_case(module.__name__, name, _jit_function(
                        getattr(module, name)), args, kwargs, what, group="plain"))
    return cases


def _make_case(source, name, fn, args, kwargs, label, **fields) -> Case:
    signature, constexprs, attrs, options = _spec(fn, args, dict(kwargs))
    return Case(source, name, label, signature, constexprs, attrs, options, **fields)


def collect_cases() -> tuple[list[Case], dict[str, list[str]]]:
    """Every compile case (deduplicated), and the kernels found in each module."""
    package = importlib.import_module(PACKAGE)
    import pkgutil

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{PACKAGE}.{info.name}")
        found[module.__name__] = find_kernels(module)
    cases: dict[tuple, Case] = {}
    for case in _attention_cases() + _layer_norm_cases() + _masked_lm_loss_cases():
        key = case.key() + (case.group == "probe",)  # probes stay apart: they are looked up
        old = cases.get(key)
        if old is None:
            cases[key] = case
        else:  # the same compile reached twice: one case that carries both demands
            cases[key] = dataclasses.replace(
                old, archs=tuple(sorted(set(old.archs) | set(case.archs))),
                no_spill=old.no_spill or case.no_spill,
                group="tile" if "tile" in (old.group, case.group) else old.group)
    return list(cases.values()), found


# Philox's two round multipliers (0xCD9E8D57, 0xD2511F53) as PTX may print them.
_PHILOX_CONSTANTS = (r"(?:-845247145|-766435501|3449720151|3528531795|0[xX][cC][dD]9[eE]8[dD]57|"
                     r"0[xX][dD]2511[fF]53)")


def _philox_mulhi(ptx: str) -> int:
    """Philox's multiply-highs in ``ptx``: mul.hi.u32 by a round multiplier, given inline
    (Triton 3.9) or through a register it was moved into (Triton 3.6)."""
    holders = set(re.findall(r"mov\.[bsu]32\s+(%r\d+),\s*" + _PHILOX_CONSTANTS + r"\s*;", ptx))
    count = 0
    for operands in re.findall(r"mul\.hi\.u32\s+([^;]*);", ptx):
        sources = [o.strip() for o in operands.split(",")[1:]]
        count += any(o in holders or re.fullmatch(_PHILOX_CONSTANTS, o) for o in sources)
    return count


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes per thread) of the cubin's kernel, from cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    assert match, f"cuobjdump -res-usage printed no resource line:\n{out}"
    return int(match[1]), int(match[2]) + int(match[3])


def compile_case(case: Case, arch: int) -> Result:
    """Compile ``case`` for ``arch`` down to a cubin; errors come back in the result."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    start = time.perf_counter()
    result = Result(case, arch)
    try:
        fn = _jit_function(getattr(_load_module(case.source), case.kernel))
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        attrs = {(index,): backend.parse_attr(attr) for index, attr in case.attrs}
        kernel = triton.compile(ASTSource(fn, dict(case.signature), dict(case.constexprs), attrs),
                                target=target, options=dict(case.options))
        result.regs, result.spill = _resources(kernel.asm["cubin"])
        result.shared = kernel.metadata.shared
        result.mulhi = _philox_mulhi(kernel.asm["ptx"])
    except Exception as exc:  # noqa: BLE001 - every failure is a finding to report
        text = f"{type(exc).__name__}: {exc}"
        result.error = text if len(text) < 4000 else text[:2000] + "\n...\n" + text[-2000:]
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------
# Test side
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pool():
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=context,
                                                initializer=_init_worker) as executor:
        yield executor


def _run(pool, cases: list[Case]) -> list[Result]:
    jobs = [(case, arch) for case in cases for arch in case.archs]
    # Slow compiles first, so that two workers finish together.
    jobs.sort(key=lambda job: (job[0].group not in ("tile", "probe"), -job[1]))
    return list(pool.map(compile_case, *zip(*jobs))) if jobs else []


@pytest.fixture(scope="session")
def compiled(pool):
    start = time.perf_counter()
    cases, found = pool.submit(collect_cases).result()
    results = _run(pool, cases)
    return cases, found, results, time.perf_counter() - start


# Shared memory a block may use: sm_86 / sm_89 (99 KB) for the sm_80 tables, which serve all of
# Ampere and Ada (the A100 itself has 163 KB); 227 KB on Hopper.
SMEM_LIMIT = {80: 99 * 1024, 90: 227 * 1024}


def _verdict(r: Result) -> str:
    if r.error:
        return "ERROR"
    if r.shared > SMEM_LIMIT[r.arch]:
        return "SMEM"
    if r.spill:
        return "SPILL" if r.case.no_spill else "spill (allowed)"
    return ""


def _table(results: list[Result]) -> str:
    rows = [f"{'kernel':<24} {'case':<58} {'arch':<7} {'regs':>4} {'spill B':>7} "
            f"{'smem B':>7} {'s':>5}"]
    for r in sorted(results, key=lambda r: (r.case.kernel, r.case.group, r.case.label, r.arch)):
        rows.append(f"{r.case.kernel:<24} {r.case.label[:58]:<58} {ARCH_NAMES[r.arch]:<7} "
                    f"{r.regs:>4} {r.spill:>7} {r.shared:>7} {r.seconds:>5.1f} {_verdict(r)}")
    return "\n".join(rows)


def _listing(results: list[Result]) -> str:
    return "\n".join(f"{r.case.kernel} [{r.case.label}] {ARCH_NAMES[r.arch]}: {r.spill} B "
                     f"spilled, {r.shared} B shared" for r in results)


def test_every_kernel_compiles_for_sm80_and_sm90a(compiled):
    import triton

    cases, found, results, seconds = compiled
    print(f"\nTriton {triton.__version__}: {len(results)} compiles of {len(cases)} cases in "
          f"{seconds:.0f} s wall ({sum(r.seconds for r in results):.0f} s of compiling, "
          f"{WORKERS} workers)")
    print(_table(results))
    errors = [f"{r.case.kernel} [{r.case.label}] {ARCH_NAMES[r.arch]}:\n{r.error}"
              for r in results if r.error]
    assert not errors, "GPU compile errors:\n\n" + "\n\n".join(errors)
    too_big = [r for r in results if _verdict(r) == "SMEM"]
    assert not too_big, "more shared memory than the architecture has:\n" + _listing(too_big)


def test_every_kernel_found_has_a_compile_case(compiled):
    cases, found, _, _ = compiled
    assert sum(len(names) for names in found.values()) >= 8, found
    covered = {(case.source, case.kernel) for case in cases}
    missing = [f"{module}.{name}" for module, names in found.items() for name in names
               if (module, name) not in covered]
    assert not missing, f"kernels without a GPU compile case: {missing}"


def test_no_spills_where_half_precision_can_go(compiled):
    _, _, results, _ = compiled
    allowed = [r for r in results if _verdict(r) == "spill (allowed)"]
    if allowed:
        print("\nspills allowed (fp32, odd head dims, the per-element probe):\n"
              + _listing(allowed))
    spills = [r for r in results if _verdict(r) == "SPILL"]
    assert not spills, "fp16/bf16 at head dim 32/64/128 spill registers:\n" + _listing(spills)


def test_every_tile_is_compiled_at_its_limits(compiled):
    """A table tile left out of the sweep would go unchecked."""
    import roberta_fast.triton.attention as attention

    cases, _, _, _ = compiled
    tunings = dict(zip(_TUNED_KERNELS, (attention._FWD_TUNING, attention._DKDV_TUNING,
                                        attention._DQ_TUNING)))
    for name, tuning in tunings.items():
        for arch in ARCHS:
            swept = {(dict(c.constexprs)["BLOCK_M"], dict(c.constexprs)["BLOCK_N"],
                      dict(c.options)["num_warps"], dict(c.options)["num_stages"])
                     for c in cases if c.kernel == name and c.group == "tile"
                     and arch in c.archs}
            table = {(t.block_m, t.block_n, t.warps, t.stages) for t in tuning.tables[arch]}
            assert table <= swept, f"{name} sm_{arch}: tiles not swept: {sorted(table - swept)}"


def test_every_problem_has_a_tile():
    """Every dtype, head dim and dropout draw the ops accept finds a tile on each architecture
    (else a ValueError at launch)."""
    import roberta_fast.triton.attention as attention

    for tuning in (attention._FWD_TUNING, attention._DKDV_TUNING, attention._DQ_TUNING):
        for arch in ARCHS:
            for fp32 in (False, True):
                for block_d in (16, 32, 64, 128):
                    for draw in (attention.DRAW_NONE, attention.DRAW_GROUPED,
                                 attention.DRAW_ELEMENT):
                        for bucket in (16, 64, 512, 4096):
                            assert attention.pickable_tiles(
                                tuning, arch=arch, fp32=fp32, bucket=bucket, block_d=block_d,
                                draw=draw)


def _probe(results, label_part):
    (r,) = [r for r in results if r.case.group == "probe" and label_part in r.case.label]
    return r


def test_attention_dropout_draws_one_philox_call_per_four_elements(compiled):
    """Philox's mul.hi (2 per round) in the sm_90a PTX of the forward kernel, bf16, D = 64, one
    tile: rows on counter boundaries (Lmax = 512) against the per-element draw (Lmax = 510), each
    less the same kernel without dropout. A quarter, give or take one instruction (Triton 3.6
    keeps one outside the draws: 305 against 1217)."""
    _, _, results, _ = compiled
    base, grouped, per_element = (_probe(results, part)
                                  for part in ("L512 |", "L512 drop", "L510 drop"))
    tile = dict(grouped.case.constexprs)
    # Each thread draws for BLOCK_M * BLOCK_N / threads elements, in each of the two key loops.
    per_thread = 2 * tile["BLOCK_M"] * tile["BLOCK_N"] // (32 * dict(grouped.case.options)[
        "num_warps"])
    after = (grouped.mulhi - base.mulhi) / per_thread
    before = (per_element.mulhi - base.mulhi) / per_thread
    print(f"\nattention forward {grouped.case.label.split('|')[1].strip()}, sm_90a: mul.hi per "
          f"dropout element {before:.2f} (per-element draw) -> {after:.2f} (one call per four); "
          f"registers {base.regs} without dropout, {per_element.regs} + {per_element.spill} B "
          f"spilled per element, {grouped.regs} + {grouped.spill} B one call per four")
    assert grouped.mulhi - base.mulhi <= (per_element.mulhi - base.mulhi) / 4 + 1
    assert before >= 16  # ten rounds of two, less what constant folding removes


# --------------------------------------------------------------------------------------------
# The checker checked
# --------------------------------------------------------------------------------------------

_PLANTED = '''
import triton
import triton.language as tl

SCALE = 2.0  # a plain float: the interpreter reads it, a GPU compile may not
FACTOR: tl.constexpr = tl.constexpr(2.0)


@triton.jit
def _twice(x):
    return x * FACTOR


@triton.jit
def reads_a_global(X, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs) * SCALE)


@triton.jit
def reads_a_constexpr(X, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, _twice(tl.load(X + offs)))
'''


def test_the_checker_reports_a_non_constexpr_global(pool, tmp_path):
    path = tmp_path / "planted_kernels.py"
    path.write_text(_PLANTED)

    def case(kernel):
        return Case(str(path), kernel, "planted", (("X", "*fp32"), ("BLOCK", "constexpr")),
                    (("BLOCK", 128),), ((0, "D"),), (("num_warps", 4),), archs=(80,))

    bad, good = _run(pool, [case("reads_a_global"), case("reads_a_constexpr")])
    assert bad.error and "SCALE" in bad.error, bad.error
    assert good.error is None and good.regs > 0, good.error
    # Kernels are what no other jit function calls: the helper is compiled inside its caller.
    found = pool.submit(_find_kernels_of_file, str(path)).result()
    assert found == ["reads_a_constexpr", "reads_a_global"]


def _find_kernels_of_file(path: str) -> list[str]:
    return find_kernels(_load_module(path))
