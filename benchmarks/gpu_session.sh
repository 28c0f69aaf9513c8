#!/usr/bin/env bash
# Everything the project needs from a lent GPU machine, in two runs that fit its device budget
# (15 minutes in all, machine start-up included, at most 10 minutes a call). Each run writes at
# most 8 files, at the top of $OUT, and prints the wall time of every phase.
#
#   bash benchmarks/gpu_session.sh run1    build (sm of this GPU only) + CUDA test programs +
#                                          `pytest -m gpu` (no autotuning): correctness
#   bash benchmarks/gpu_session.sh run2    `roberta-fast bench --quick` and `profile` on cuda,
#                                          autotuning on: the figures
#   bash benchmarks/gpu_session.sh run2 bench-attention profile    only these phases (a rerun)
#   bash benchmarks/gpu_session.sh --dry-run    here, without a GPU: checks the commands, the
#                                          time plan and the output files; prints the plan
#
# Plan (seconds; `--dry-run` prints it and checks the sums). Every phase runs under `timeout`:
# its limit below plus what the phases before it left unused, cut to what is left of its run, so a
# run always ends, with its logs, inside its limit; the phases come in order of importance, so
# time the plan did not foresee (run2's build on a bare machine) cuts the last ones.
#   machine start-up 120
#   run1 250:  check 15 | build 110 (extension || CUDA test programs: build, run) | pytest 105 |
#              wrapup 20
#   between the calls 30 (call run2 as soon as run1 returns: the machine stays warm 30 s)
#   run2 340:  check 15 | warm 65 | bench-attention 75 | autotune-tests 20 | profile 55 |
#              bench-layer_norm_residual 30 | bench-masked_lm_loss 25 | bench-model 35 |
#              wrapup 20
#   room for one rerun 125: a run that stopped in check or build (125 s at most), or a second
#              machine start-up (120 s) when the machine went idle between the calls
#   planned total 865 s = 14.42 min
# Call the device tool with timeout_s = the run's limit + 30 (280 and 370), and give the machine
# back right after run2.
#
# Build: `setup.py build_ext --inplace` with TORCH_CUDA_ARCH_LIST set from the device (9.0a on an
# H100/H200) and MAX_JOBS = all cores, while one plain nvcc build (every csrc/cuda/*.cu and
# csrc/tests/test_*_cuda.cu compiled once, in parallel, then linked per program) makes the CUDA
# test programs, which run as soon as they are linked. Not prebuilt here: measured on the 2-core
# development machine, an sm_90a-only nvcc build of csrc/cuda/*.cu takes 35 s serial (attention
# 8 s, layer_norm_residual 21 s, masked_lm_loss 5 s) and the C++ bindings about 50 s of CPU, so
# on 16 cores the build is about a minute of wall time, bounded by the single slowest file.
# Carrying a prebuilt .so would need torch 2.11.0+cu130 for Python 3.12 installed here to build
# against, for at most that minute. Instead run1 returns the .so it built (_C.<EXT_SUFFIX>):
# when the machine went idle before run2, copy it into roberta_fast/ and name it in the call's
# `carry`; run2 builds only when `roberta_fast._C` with CUDA kernels cannot be imported, and that
# build (110 s at most) then comes out of its last phases.
#
# run2's `warm` phase runs every benchmark case once, spread over 8 processes, before anything is
# timed: the Triton autotuner's compiles (about 1.7 s each, over 100 of them for attention) and
# torch.compile's land in the on-disk caches in parallel, so the timed phases that follow mostly
# load them instead of compiling one by one.
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

RUN1_PHASES=(check:15 build:110 pytest:105 wrapup:20)
RUN2_PHASES=(check:15 warm:65 bench-attention:75 autotune-tests:20 profile:55
             bench-layer_norm_residual:30 bench-masked_lm_loss:25 bench-model:35 wrapup:20)
RUN2_BUILD=110         # run2's build when the extension is missing, taken from its last phases
START_UP=120           # machine start-up
BETWEEN=30             # transfers and the idle wait between the two calls
RERUN=125              # one rerun: check + build of a run that stopped there, or a second start-up
BUDGET=900             # device time for the session
RUN_MAX=480            # the most one run may plan (device calls allow 600)
WRAPUP_RESERVE=20      # kept free for the wrapup phase whatever the others take
PYTEST_WORKERS=8       # pytest-xdist workers, and processes of the warm phase
TEST_TIMEOUT=90        # seconds per test (pytest-timeout)
# torch.compile's compile workers per process where 8 processes (pytest workers, warm) share the
# 16 cores.
INDUCTOR_THREADS=4
# The four benchmark suites, in the order run2 times them.
BENCH_OPS=(attention layer_norm_residual masked_lm_loss model)
BENCH_ARGS=(bench --device cuda --dtype bf16 --quick --plot)
PROFILE_ARGS=(profile --config base --batch 32 --seq 512 --steps 20 --amp bf16 --unpad
              --lengths uniform --device cuda)
# The attention tests that run the autotuner (run1 pins one tile per kernel): bf16 (dtype0) at
# the two RoBERTa shapes, whose tiles run2's benchmarks have compiled by then.
AUTOTUNE_TESTS=(tests/test_attention.py::test_gpu_triton_roberta_shapes
                -k "(32-128-12-64 or 32-512-12-64) and dtype0")
# What each run leaves in $OUT (at most 8 files, no folders). <EXT> is the extension's suffix.
RUN1_FILES=(run1.log build.log cuda-tests.log pytest-gpu.log pytest-gpu.xml "_C<EXT>")
RUN2_FILES=(run2.log bench-all-cuda.json profile-base.json profile-base.png
            bench-attention-speedup.png bench-layer_norm_residual-speedup.png
            bench-masked_lm_loss-speedup.png bench-model-speedup.png)
NVCC_FLAGS=(-O3 --use_fast_math -lineinfo --expt-relaxed-constexpr -std=c++17 -Icsrc)

say() { echo "=== $(date +%T) $*"; }
cap_of() { echo "${1##*:}"; }
name_of() { echo "${1%%:*}"; }
sum_caps() { local t=0 p; for p in "$@"; do t=$((t + $(cap_of "$p"))); done; echo "$t"; }

# ---------------------------------------------------------------------------------------------
# Phases (each runs as `bash gpu_session.sh __phase NAME` under timeout; state in $WORK/state)
# ---------------------------------------------------------------------------------------------

load_state() { [ -f "$WORK/state" ] && . "$WORK/state"; return 0; }

# Prerequisites: one line each; a missing fatal one fails the phase.
phase_check() {
  local fatal=0
  ok() { echo "  ok       $*"; }
  miss() { echo "  MISSING  $*"; }
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
      | sed 's/^/  gpu      /'
  else
    miss "nvidia-smi: no NVIDIA driver tools on the PATH"
  fi
  # One Python process: torch's CUDA view of the device and the Python packages.
  local info
  info=$("$PY" - <<'PY' 2>&1
import importlib.util, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", f"{p.major}.{p.minor}", p.multi_processor_count, p.name.replace(" ", "_"))
else:
    print("device none")
for mod in ("triton", "rich", "matplotlib", "transformers", "pytest", "pytest_timeout", "xdist",
            "ninja"):
    spec = importlib.util.find_spec(mod)
    version = ""
    if spec is not None:
        try:
            from importlib.metadata import version as v
            version = v({"xdist": "pytest-xdist", "pytest_timeout": "pytest-timeout"}.get(mod, mod))
        except Exception:  # noqa: BLE001 - a module without metadata still counts as found
            version = "?"
    print("module", mod, version if spec is not None else "-")
import sysconfig
print("ext", sysconfig.get_config_var("EXT_SUFFIX"))
PY
)
  if [ $? -ne 0 ]; then
    echo "$info" | tail -5
    miss "a Python with torch ($PY): nothing can run"
    return 1
  fi
  local cuda_torch cap sms name ext pydir
  cuda_torch=$(echo "$info" | awk '$1 == "torch" {print $4}')
  read -r cap sms name <<< "$(echo "$info" | awk '$1 == "device" {print $2, $3, $4}')"
  ext=$(echo "$info" | awk '$1 == "ext" {print $2}')
  echo "$info" | grep -E "^(python|torch) " | sed 's/^/  /'
  if [ "$cap" = none ] || [ -z "$cap" ]; then
    miss "a visible GPU: torch.cuda.is_available() is False"; fatal=1
  else
    ok "GPU: $name, compute capability $cap, $sms SMs"
  fi
  [ "$cuda_torch" != None ] || { miss "a CUDA build of torch (torch.version.cuda is None)"; fatal=1; }
  while read -r _ mod version; do
    case "$mod" in
      triton|pytest) [ "$version" != - ] && ok "$mod $version" || { miss "$mod: needed"; fatal=1; } ;;
      rich) [ "$version" != - ] && ok "rich $version" \
              || { miss "rich: roberta-fast bench/profile cannot print"; fatal=1; } ;;
      matplotlib) [ "$version" != - ] && ok "matplotlib $version" \
                    || miss "matplotlib: no PNG plots (the JSON is still written)" ;;
      transformers) [ "$version" != - ] && ok "transformers $version" \
                      || miss "transformers: the model/MLM benchmarks, profile and HF tests skip" ;;
      pytest_timeout) [ "$version" != - ] && ok "pytest-timeout $version" \
                        || miss "pytest-timeout: no per-test timeout (only the phase's)" ;;
      xdist) [ "$version" != - ] && ok "pytest-xdist $version" \
               || miss "pytest-xdist: tests run in one process (slower)" ;;
      ninja) ;;
    esac
  done <<< "$(echo "$info" | grep '^module ')"
  # ninja: the binary that torch's BuildExtension runs (the pip package puts it next to python).
  pydir=$(dirname "$(echo "$info" | awk '$1 == "python" {print $3}')")
  local path_add=""
  if command -v ninja > /dev/null; then
    ok "ninja $(ninja --version)"
  elif [ -x "$pydir/ninja" ]; then
    ok "ninja $("$pydir/ninja" --version) ($pydir, added to PATH)"; path_add=$pydir
  else
    miss "ninja: the extension cannot be built"; fatal=1
  fi
  if command -v nvcc > /dev/null; then
    local nv
    nv=$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
    if [ "${nv%%.*}" != "${cuda_torch%%.*}" ]; then
      miss "nvcc matching torch: nvcc $nv, torch built with CUDA $cuda_torch"; fatal=1
    elif [ "$nv" != "$cuda_torch" ]; then
      ok "nvcc $nv (torch built with CUDA $cuda_torch: same major, builds with a warning)"
    else
      ok "nvcc $nv = torch's CUDA $cuda_torch"
    fi
  else
    miss "nvcc: neither the extension nor the CUDA test programs can be built"; fatal=1
  fi
  command -v c++ > /dev/null && ok "c++ $(c++ -dumpversion)" \
    || { miss "c++: the extension cannot be built"; fatal=1; }
  echo "  ok       cmake: not needed (the test programs are built by nvcc directly)"
  # The architecture to build for: this device's only (Hopper's wgmma/setmaxnreg need 9.0a).
  local arch=${cap:-9.0}
  [ "$arch" = 9.0 ] && arch=9.0a
  [ "$arch" = none ] && arch=9.0a
  {
    echo "ARCH=${TORCH_CUDA_ARCH_LIST:-$arch}"
    echo "SM=$(echo "$arch" | tr -d .)"
    echo "EXT=$ext"
    [ -n "$path_add" ] && echo "export PATH=\"$path_add:\$PATH\""
    echo "HAS_TIMEOUT=$(echo "$info" | awk '$2 == "pytest_timeout" {print $3}')"
    echo "HAS_XDIST=$(echo "$info" | awk '$2 == "xdist" {print $3}')"
  } > "$WORK/state"
  echo "  build target: TORCH_CUDA_ARCH_LIST=$(. "$WORK/state"; echo "$ARCH")"
  return $fatal
}

# The extension, for this device's architecture only, with every core.
build_extension() {  # build_extension LOG
  TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$(nproc) "$PY" setup.py build_ext --inplace > "$1" 2>&1
}

extension_ok() {
  "$PY" -c "import sys, roberta_fast._C as c; sys.exit(0 if c.built_with_cuda() else 1)" \
    > /dev/null 2>&1
}

# The CUDA test programs with one direct nvcc build: every kernel and test source compiled once,
# in parallel, then each test linked with all kernel objects; each program runs once linked.
build_and_run_programs() {
  local dir=build/gpu-tests gen=(-gencode="arch=compute_$SM,code=sm_$SM") start src pids=() rc=0
  mkdir -p "$dir"
  start=$(date +%s)
  for src in csrc/cuda/*.cu csrc/tests/test_*_cuda.cu; do
    nvcc "${NVCC_FLAGS[@]}" "${gen[@]}" -c "$src" -o "$dir/$(basename "$src" .cu).o" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  if [ $rc -ne 0 ]; then echo "CUDA test programs: compile FAILED"; return 1; fi
  local kernels=() t
  for src in csrc/cuda/*.cu; do kernels+=("$dir/$(basename "$src" .cu).o"); done
  pids=()
  for src in csrc/tests/test_*_cuda.cu; do
    t=$(basename "$src" .cu)
    nvcc "${gen[@]}" "$dir/$t.o" "${kernels[@]}" -o "$dir/$t" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  echo "CUDA test programs built in $(( $(date +%s) - start )) s (sm_$SM)"
  [ $rc -eq 0 ] || { echo "CUDA test programs: link FAILED"; return 1; }
  start=$(date +%s)
  pids=()
  for src in csrc/tests/test_*_cuda.cu; do
    t=$(basename "$src" .cu)
    ( s=$(date +%s); timeout 75 "$dir/$t" > "$dir/$t.out" 2>&1; r=$?
      echo "$t: rc=$r in $(( $(date +%s) - s )) s$( [ $r -eq 124 ] && echo ' (TIMED OUT)')" \
        > "$dir/$t.rc"; exit $r ) &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  for src in csrc/tests/test_*_cuda.cu; do
    t=$(basename "$src" .cu)
    echo "----- $(cat "$dir/$t.rc")"
    cat "$dir/$t.out"
  done
  echo "CUDA test programs ran in $(( $(date +%s) - start )) s: $([ $rc -eq 0 ] && echo PASSED || echo FAILED)"
  return $rc
}

phase_build() {
  load_state
  local ext_rc prog_rc
  ( s=$(date +%s); build_extension "$OUT/build.log"; r=$?
    echo "extension build: rc=$r in $(( $(date +%s) - s )) s (TORCH_CUDA_ARCH_LIST=$ARCH," \
         "MAX_JOBS=$(nproc))"; exit $r ) &
  local ext_pid=$!
  build_and_run_programs > "$OUT/cuda-tests.log" 2>&1
  prog_rc=$?
  wait $ext_pid
  ext_rc=$?
  grep -E "^----- |^CUDA test programs|FAIL|error" "$OUT/cuda-tests.log" | head -40
  grep -E "error" "$OUT/build.log" | head -20
  if [ $ext_rc -ne 0 ]; then
    echo "extension build FAILED; the end of build.log:"; tail -30 "$OUT/build.log"
  fi
  extension_ok && echo "roberta_fast._C: CUDA kernels built" \
    || echo "roberta_fast._C: NOT importable with CUDA kernels (GPU tests of the cuda backend skip)"
  "$PY" -c "import roberta_fast; print('backends:', roberta_fast.available_backends())" 2>&1 | tail -1
  [ $ext_rc -eq 0 ] && [ $prog_rc -eq 0 ]
}

phase_build-ext() {
  load_state
  build_extension "$WORK/build.log"
  local rc=$?
  [ $rc -eq 0 ] || { echo "extension build FAILED; the end of its log:"; tail -30 "$WORK/build.log"; }
  extension_ok
}

phase_pytest() {
  load_state
  export TORCHINDUCTOR_COMPILE_THREADS=$INDUCTOR_THREADS
  local args=(tests -m gpu -q -rfEs --tb=short -p no:cacheprovider
              --junitxml="$OUT/pytest-gpu.xml" -o junit_family=xunit2)
  if [ -n "${HAS_TIMEOUT:-}" ] && [ "$HAS_TIMEOUT" != - ]; then
    args+=(--timeout="$TEST_TIMEOUT")
    # --session-timeout (pytest-timeout >= 2.3) ends the session cleanly before the phase's limit.
    if [ "$PHASE_LIMIT" -gt 40 ] && "$PY" -c "import sys; from importlib.metadata import \
version as v; sys.exit(0 if tuple(map(int, v('pytest-timeout').split('.')[:2])) >= (2, 3) else 1)"
    then
      args+=(--session-timeout="$(( PHASE_LIMIT - 20 ))")
    fi
  fi
  if [ -n "${HAS_XDIST:-}" ] && [ "$HAS_XDIST" != - ]; then
    args+=(-n "$PYTEST_WORKERS")
  fi
  echo "ROBERTA_FAST_AUTOTUNE=0 $PY -m pytest ${args[*]}"
  ROBERTA_FAST_AUTOTUNE=0 "$PY" -m pytest "${args[@]}" > "$OUT/pytest-gpu.log" 2>&1
  local rc=$?
  # What did not run, what failed, and pytest's last line (the counts).
  grep -E "^SKIPPED" "$OUT/pytest-gpu.log" | head -10
  grep -E "^(FAILED|ERROR) " "$OUT/pytest-gpu.log" | head -30
  tail -1 "$OUT/pytest-gpu.log"
  return $rc
}

# Every benchmark case once, spread over processes by group, to fill the compile caches.
phase_warm() {
  load_state
  export TORCHINDUCTOR_COMPILE_THREADS=$INDUCTOR_THREADS
  local n=$PYTEST_WORKERS i pids=() ops
  ops=$(IFS=,; echo "${BENCH_OPS[*]}")
  for ((i = 0; i < n; i++)); do
    "$PY" - "$i" "$n" "$ops" > "$WORK/warm-$i.log" 2>&1 <<'PY' &
import sys
import time

import torch

from benchmarks import runner

idx, n, ops = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
planned = runner.plan(runner.discover(ops), "cuda", torch.bfloat16, True)
groups = list(dict.fromkeys((op, case.group) for op, case in planned))
mine = {g for i, g in enumerate(groups) if i % n == idx}
done = 0
start = time.time()
for op, case in planned:
    if (op, case.group) not in mine:
        continue
    try:
        fn = case.setup()
        fn()
        torch.cuda.synchronize()
        done += 1
    except Exception as exc:  # noqa: BLE001 - a case that cannot run is the benchmark's to report
        print(f"warm: {op} | {case.id}: {type(exc).__name__}: {str(exc)[:160]}")
    fn = None
    torch.cuda.empty_cache()
print(f"warm worker {idx}: {done} cases in {time.time() - start:.0f} s")
PY
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  cat "$WORK"/warm-*.log | grep -E "^warm" | head -30
  return 0
}

bench_op() {
  load_state
  "$PY" -m roberta_fast.cli "${BENCH_ARGS[@]}" --op "$1" --out "$WORK/bench-$1"
}
phase_bench-attention() { bench_op attention; }
phase_bench-layer_norm_residual() { bench_op layer_norm_residual; }
phase_bench-masked_lm_loss() { bench_op masked_lm_loss; }
phase_bench-model() { bench_op model; }

phase_autotune-tests() {
  load_state
  "$PY" -m pytest "${AUTOTUNE_TESTS[@]}" -q -rfEs --tb=short -p no:cacheprovider
}

phase_profile() {
  load_state
  "$PY" -m roberta_fast.cli "${PROFILE_ARGS[@]}" --out "$WORK/profile"
}

# Copies what run1 leaves in $OUT and prints its summary last.
wrapup_run1() {
  load_state
  local so="roberta_fast/_C${EXT:-.so}"
  if [ -f "$so" ] && extension_ok; then
    if [ "$(stat -c %s "$so")" -lt $((16 * 1024 * 1024)) ]; then
      cp "$so" "$OUT/" && echo "returned $(basename "$so") ($(( $(stat -c %s "$so") / 1024 )) KiB):" \
        "copy it into roberta_fast/ and name it in run2's carry if the machine goes idle"
    else
      echo "$(basename "$so") is over 16 MiB: not returned (run2 builds again on a fresh machine)"
    fi
  fi
  [ -f "$OUT/pytest-gpu.xml" ] && "$PY" - "$OUT/pytest-gpu.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(f"pytest -m gpu: {total['tests']} tests, {total['failures']} failed, {total['errors']} errors, "
      f"{total['skipped']} skipped")
for case in root.iter("testcase"):
    for tag in ("failure", "error"):
        el = case.find(tag)
        if el is not None:
            msg = (el.get("message") or "").splitlines()[0][:150] if el.get("message") else ""
            print(f"  {tag.upper()}: {case.get('classname')}::{case.get('name')}  {msg}")
PY
  return 0
}

# Merges the per-op benchmark JSONs, copies plots and the profile into $OUT, prints the figures.
wrapup_run2() {
  load_state
  "$PY" - "$WORK" "$OUT" "${BENCH_OPS[@]}" <<'PY'
import json
import shutil
import sys
from pathlib import Path

from rich.console import Console

from benchmarks import runner

work, out, ops = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
console = Console(width=160, highlight=False)
merged = None
for op in ops:
    latest = work / f"bench-{op}" / "bench-latest.json"
    if not latest.is_file():
        console.print(f"bench {op}: no result (phase skipped, failed or cut short)")
        continue
    report = json.loads(latest.read_text())
    if merged is None:
        merged = {**report, "ops": [], "rows": [], "suites": {}, "ceilings_by_op": {}}
    merged["ops"] += report["ops"]
    merged["rows"] += report["rows"]
    merged["suites"].update(report["suites"])
    merged["ceilings_by_op"][op] = report["ceilings"]
    png = work / f"bench-{op}" / f"bench-{op}-speedup.png"
    if png.is_file():
        shutil.copy(png, out / png.name)
if merged is not None:
    merged.pop("plots", None)
    (out / "bench-all-cuda.json").write_text(json.dumps(merged, indent=1))
    errors = [r for r in merged["rows"] if r.get("status") == "error"]
    console.print(f"bench: {len(merged['rows'])} rows over {', '.join(merged['ops'])}; "
                  f"{len(errors)} errors -> bench-all-cuda.json")
    for r in errors[:10]:
        console.print(f"  ERROR {r['op']} | {r['group']} | {r['impl']}: {r.get('reason', '')[:120]}")
    runner.render_backend_pairs(merged, console)
profile = work / "profile" / "profile-latest.json"
if profile.is_file():
    report = json.loads(profile.read_text())
    shutil.copy(profile, out / "profile-base.json")
    pngs = sorted((work / "profile").glob("profile-*.png"))
    if pngs:
        shutil.copy(pngs[-1], out / "profile-base.png")
    for name, r in report["results"].items():
        if "error" in r:
            console.print(f"profile {name}: not run: {r['error'][:150]}")
        else:
            console.print(f"profile {name}: {r['tokens_per_s']:,.0f} tokens/s, step "
                          f"{r['step_time_median_s'] * 1e3:.1f} ms, peak "
                          f"{(r['peak_mem_bytes'] or 0) / 2**30:.2f} GiB")
    if report.get("speedup") is not None:
        console.print(f"profile speedup (tokens/s, patched / stock): {report['speedup']:.2f}x")
else:
    console.print("profile: no result (phase skipped, failed or cut short)")
PY
  return 0
}

phase_wrapup() {
  if [ "$MODE" = run1 ]; then wrapup_run1; else wrapup_run2; fi
}

# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------

PHASE_LOG=()

# Runs a phase under timeout. Its limit is its planned one plus what the phases before it left
# unused (never less than planned), cut to what is left of the run: a phase that finishes early
# hands its time on, and time the plan did not foresee (run2's build) comes out of the last ones.
run_phase() {  # run_phase NAME PLANNED_LIMIT [unplanned]
  local name=$1 cap=$2 now left t start rc slack
  now=$(date +%s)
  left=$(( DEADLINE - now ))
  [ "$name" = wrapup ] || left=$(( left - WRAPUP_RESERVE ))
  slack=$(( PLANNED_DONE - (now - RUN_START) ))
  [ "$slack" -gt 0 ] || slack=0
  [ "${3:-}" = unplanned ] || PLANNED_DONE=$(( PLANNED_DONE + cap ))
  t=$(( cap + slack ))
  [ "$t" -le "$left" ] || t=$left
  if [ "$t" -lt 5 ]; then
    say "$name: SKIPPED, no time left in this run's $RUN_LIMIT s"
    PHASE_LOG+=("$(printf '%-28s %5s %7s  %s' "$name" - "$cap" "skipped: no time left")")
    return 124
  fi
  say "$name (limit ${t} s)"
  start=$(date +%s)
  # SIGINT first (pytest still writes its report, bench the rows it has), SIGKILL at the limit.
  # timeout leads a process group of its own: whatever the phase left running (background jobs
  # ignore SIGINT, and would hold the log's pipe open) is killed with that group when the phase
  # returns.
  PHASE_LIMIT=$t bash -c 'echo $$ > "$1"; shift; exec "$@"' _ "$WORK/phase.pid" \
    timeout -s INT -k 4 $(( t > 8 ? t - 4 : t )) bash "$SELF" __phase "$name"
  rc=$?
  kill -KILL -- "-$(cat "$WORK/phase.pid")" 2> /dev/null
  local wall=$(( $(date +%s) - start )) note="ok"
  [ $rc -eq 0 ] || note="rc=$rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && note="TIMED OUT"
  say "$name: $note, wall ${wall} s of ${t} s"
  PHASE_LOG+=("$(printf '%-28s %5s %7s  %s' "$name" "$wall" "$t" "$note")")
  return $rc
}

run() {  # run MODE [PHASE...]
  local phases=() only=("${@:2}") p name cap
  if [ "$MODE" = run1 ]; then phases=("${RUN1_PHASES[@]}"); else phases=("${RUN2_PHASES[@]}"); fi
  local selected=() known=" "
  for p in "${phases[@]}"; do known+="$(name_of "$p") "; done
  for p in "${only[@]}"; do
    [[ "$known" == *" $p "* ]] || { echo "unknown $MODE phase '$p'; phases:$known"; return 2; }
  done
  for p in "${phases[@]}"; do
    name=$(name_of "$p")
    if [ ${#only[@]} -eq 0 ] || [ "$name" = check ] || [ "$name" = wrapup ] \
       || [[ " ${only[*]} " == *" $name "* ]]; then
      selected+=("$p")
    fi
  done
  RUN_LIMIT=$(sum_caps "${selected[@]}")
  RUN_START=$(date +%s)
  DEADLINE=$(( RUN_START + RUN_LIMIT ))
  PLANNED_DONE=0
  say "$MODE: phases ${selected[*]}; limit $RUN_LIMIT s; OUT=$OUT"
  local fatal=0
  for p in "${selected[@]}"; do
    name=$(name_of "$p"); cap=$(cap_of "$p")
    [ "$name" = wrapup ] && continue
    if [ $fatal -ne 0 ]; then
      PLANNED_DONE=$(( PLANNED_DONE + cap ))
      PHASE_LOG+=("$(printf '%-28s %5s %7s  %s' "$name" - "$cap" "not run: prerequisites")")
      continue
    fi
    run_phase "$name" "$cap"
    rc=$?
    if [ "$name" = check ] && [ $rc -ne 0 ]; then
      fatal=1
      echo "prerequisites missing (above): the other phases are not run"
      continue
    fi
    if [ "$name" = check ] && [ "$MODE" = run2 ]; then
      if timeout 60 bash "$SELF" __extension_ok; then
        echo "roberta_fast._C with CUDA kernels is there: no build"
      else
        echo "roberta_fast._C with CUDA kernels is missing: building (from the last phases' time)"
        run_phase build-ext "$RUN2_BUILD" unplanned
      fi
    fi
  done
  run_phase wrapup "$(cap_of "${phases[-1]}")"
  local failed=0
  for p in "${PHASE_LOG[@]}"; do [[ "$p" == *"  ok" ]] || failed=1; done
  echo
  say "$MODE: phase times (seconds)"
  printf '  %-28s %5s %7s  %s\n' phase wall limit result
  for p in "${PHASE_LOG[@]}"; do echo "  $p"; done
  echo "  total $(( $(date +%s) - RUN_START )) s of $RUN_LIMIT s"
  echo "files in \$OUT ($OUT):"
  local count=0 f
  for f in "$OUT"/*; do
    [ -e "$f" ] || continue
    count=$((count + 1))
    echo "  $(basename "$f") ($(( $(stat -c %s "$f") / 1024 )) KiB)"
  done
  [ "$count" -le 8 ] || echo "WARNING: $count files in \$OUT; only 8 come back"
  [ $failed -eq 0 ] && say "$MODE: every phase ok" || say "$MODE: some phase did not finish ok (above)"
  return $failed
}

# ---------------------------------------------------------------------------------------------
# Dry run (this machine, no GPU)
# ---------------------------------------------------------------------------------------------

check_files() {  # check_files RUN NAME...: at most 8, plain names (<EXT>: the GPU's suffix)
  local run=$1 f names=() rc=0
  shift
  for f in "$@"; do names+=("${f/<EXT>/.cpython-312-x86_64-linux-gnu.so}"); done
  [ "${#names[@]}" -le 8 ] || { echo "  FAIL     $run writes ${#names[@]} files"; rc=1; }
  for f in "${names[@]}"; do
    [[ "$f" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "  FAIL     $run: bad file name $f"; rc=1; }
  done
  echo "  $run: ${#names[@]} files: ${names[*]}"
  return $rc
}

dry_run() {
  local bad=0 c p name
  fail() { echo "  FAIL     $*"; bad=1; }
  echo "gpu_session.sh dry run: the commands, the time plan and the output files of run1 and run2"
  echo "commands:"
  for c in bash timeout date stat tee awk sed grep "$PY" c++; do
    command -v "$c" > /dev/null && echo "  ok       $c" || fail "$c not found"
  done
  timeout --help 2>&1 | grep -q -- "--kill-after" || fail "timeout without --kill-after"
  for c in nvcc ninja; do
    if command -v "$c" > /dev/null; then
      echo "  ok       $c (here too)"
    else
      echo "  skipped  $c: not here; the GPU machine has it (the build phases need it)"
    fi
  done
  echo "  skipped  nvidia-smi and the GPU itself: GPU-only (check, build's test runs, pytest," \
       "warm, bench, profile)"
  if command -v nvcc > /dev/null; then
    # The test-program compile and link lines, as nvcc would run them for sm_90a.
    nvcc --dryrun "${NVCC_FLAGS[@]}" -gencode=arch=compute_90a,code=sm_90a \
      -c csrc/tests/test_layer_norm_residual_cuda.cu -o /tmp/gpu-session-dry.o > /dev/null 2>&1 \
      && echo "  ok       nvcc accepts the test programs' flags (--dryrun, sm_90a)" \
      || fail "nvcc --dryrun rejects: ${NVCC_FLAGS[*]} -gencode=arch=compute_90a,code=sm_90a"
  fi
  local progs=()
  for c in csrc/tests/test_*_cuda.cu; do [ -f "$c" ] && progs+=("$(basename "$c")"); done
  [ ${#progs[@]} -gt 0 ] && echo "  ok       ${#progs[@]} CUDA test programs: ${progs[*]}" \
    || fail "no csrc/tests/test_*_cuda.cu"
  echo "python (here; the GPU machine has torch 2.11.0+cu130, Python 3.12):"
  "$PY" - "${BENCH_ARGS[*]}" "${PROFILE_ARGS[*]}" "${BENCH_OPS[*]}" <<'PY' || bad=1
import importlib.util
import os
import sys

for mod in ("torch", "triton", "rich", "matplotlib", "transformers", "pytest", "pytest_timeout",
            "xdist"):
    found = importlib.util.find_spec(mod) is not None
    print(f"  {'ok      ' if found else 'info    '} {mod}{'' if found else ': not here (checked on the GPU machine)'}")
from roberta_fast.cli import build_parser
from torch.utils.cpp_extension import _get_cuda_arch_flags

from benchmarks import runner

bench, profile, ops = (a.split() for a in sys.argv[1:4])
parser = build_parser()
bad = 0
for op in ops:
    try:
        parser.parse_args(bench + ["--op", op, "--out", "/tmp/x"])
    except SystemExit:
        print(f"  FAIL     roberta-fast {' '.join(bench)} --op {op}: rejected")
        bad = 1
if set(ops) != set(runner.KNOWN_OPS):
    print(f"  FAIL     the run2 suites {ops} are not the runner's {list(runner.KNOWN_OPS)}")
    bad = 1
try:
    parser.parse_args(profile + ["--out", "/tmp/x"])
except SystemExit:
    print(f"  FAIL     roberta-fast {' '.join(profile)}: rejected")
    bad = 1
if not bad:
    print(f"  ok       roberta-fast bench (--op {', '.join(ops)}) and profile accept the run2 arguments")
os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
flags = _get_cuda_arch_flags()
if flags != ["-gencode=arch=compute_90a,code=sm_90a"]:
    print(f"  FAIL     TORCH_CUDA_ARCH_LIST=9.0a gives {flags}")
    bad = 1
else:
    print(f"  ok       TORCH_CUDA_ARCH_LIST=9.0a builds {flags[0]} only")
sys.exit(bad)
PY
  echo "tests:"
  local n_gpu n_auto
  n_gpu=$("$PY" -m pytest tests -m gpu --collect-only -q -p no:cacheprovider 2> /dev/null \
          | grep -c "::")
  [ "$n_gpu" -gt 0 ] && echo "  ok       pytest -m gpu selects $n_gpu tests" \
    || fail "pytest -m gpu selects no test"
  n_auto=$("$PY" -m pytest "${AUTOTUNE_TESTS[@]}" -m gpu --collect-only -q -p no:cacheprovider \
           2> /dev/null | grep -c "::")
  [ "$n_auto" -gt 0 ] && echo "  ok       autotune-tests selects $n_auto tests" \
    || fail "autotune-tests selects no test"

  echo "time plan (seconds; every phase runs under timeout with this limit):"
  local r1 r2 total
  r1=$(sum_caps "${RUN1_PHASES[@]}")
  r2=$(sum_caps "${RUN2_PHASES[@]}")
  echo "  run1: ${RUN1_PHASES[*]}  = $r1 s"
  echo "  run2: ${RUN2_PHASES[*]}  = $r2 s"
  echo "        (+ build-ext:$RUN2_BUILD on a machine without the extension: it comes out of the"
  echo "         last phases, bench-model first)"
  for c in "$r1:run1" "$r2:run2"; do
    [ "${c%%:*}" -le "$RUN_MAX" ] && echo "  ok       ${c#*:} plans ${c%%:*} s <= $RUN_MAX s" \
      || fail "${c#*:} plans ${c%%:*} s > $RUN_MAX s"
  done
  [ "$RERUN" -ge $(( $(cap_of "${RUN1_PHASES[0]}") + $(cap_of "${RUN1_PHASES[1]}") )) ] \
    && [ "$RERUN" -ge "$START_UP" ] \
    && echo "  ok       rerun room $RERUN s covers a run stopped in check+build, or a second start-up" \
    || fail "rerun room $RERUN s covers neither check+build of run1 nor a second start-up"
  total=$(( START_UP + r1 + BETWEEN + r2 + RERUN ))
  echo "  start-up $START_UP + run1 $r1 + between $BETWEEN + run2 $r2 + rerun $RERUN = $total s"
  [ "$total" -lt "$BUDGET" ] || fail "the plan ($total s) does not fit the $BUDGET s budget"
  echo "planned total: $(awk "BEGIN {printf \"%.2f\", $total / 60}") min (budget $((BUDGET / 60)) min)"

  echo "output files (at most 8 per run, at the top of \$OUT, names of [A-Za-z0-9._-]):"
  check_files run1 "${RUN1_FILES[@]}" || bad=1
  check_files run2 "${RUN2_FILES[@]}" || bad=1
  if [ $bad -eq 0 ]; then echo "dry run: OK"; else echo "dry run: FAILED"; fi
  return $bad
}

# ---------------------------------------------------------------------------------------------

MODE=${1:-}
case "$MODE" in
  __phase)
    MODE=$(cat "$WORK/mode")
    "phase_$2"
    ;;
  __extension_ok)
    extension_ok
    ;;
  --dry-run|dry-run)
    dry_run
    ;;
  run1|run2)
    OUT=${OUT:-/tmp/roberta_fast_gpu/$MODE}
    WORK=/tmp/roberta_fast_gpu_work/$MODE
    rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
    echo "$MODE" > "$WORK/mode"
    export OUT WORK
    run "$@" 2>&1 | tee "$OUT/$MODE.log"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh run1|run2 [PHASE...] | --dry-run" >&2
    exit 2
    ;;
esac
