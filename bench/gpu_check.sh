#!/usr/bin/env bash
# The one prepared check for a GPU machine (an H200 with CUDA 13, torch, Triton, no network).
#
#   bash bench/gpu_check.sh OUT_DIR                # the real run, on the GPU machine (<= 8 min)
#   bash bench/gpu_check.sh --dry-run OUT_DIR      # every stage's plumbing here, on the CPU (~3 min)
#
# Through the device tool (one command, carrying nothing: the GPU machine has every tool; the
# build stage runs `python3 -m pip install --no-build-isolation --no-deps -e .` there):
#
#   run(command="bash bench/gpu_check.sh $OUT", timeout_s=540)
#
# $OUT then comes back with 6 files: gpu_check.json (the report), gpu_check.log (everything
# printed), build.log, pytest.log, sanitizer.log, bench.json (the device tool returns at most 8
# files; intermediate files live in a temporary folder). A rerun of some stages on the still-warm
# machine (the build stays): GPU_CHECK_ONLY=tests_kernels,bench bash bench/gpu_check.sh $OUT
#
# Stages, in order; each one's result goes into OUT/gpu_check.json as soon as it ends (status
# ok / partial / failed / skipped, seconds, its time limit, what it measured), and a failing
# stage never stops the later ones. `partial`: the stage ran out of time before its last case,
# with no failure in the cases it ran (the report says how many ran): never `ok`, not `failed`.
#   preflight      the interpreter ($PY, default python3: the one that holds torch there), torch,
#                  torch.cuda, the GPU, numpy (nm_optim imports it), triton, pybind11, expecttest,
#                  nvcc, cmake, ninja, compute-sanitizer: lists what is missing.
#   build          nm_optim._C for this GPU's architecture (NM_OPTIM_CUDA=1), the CUDA kernel as
#                  always (nvcc -O3), the CPU kernel at -O0 (NM_OPTIM_DEBUG=1) and without
#                  pybind11's link-time optimisation (NM_OPTIM_LTO=0): its one translation unit
#                  takes about 180 s of CPU time to compile at -O3 (or to link under -flto), 15 s
#                  at -O0, on one core whatever the machine; the check runs no CPU kernel on the
#                  GPU machine (its cases select CUDA and Triton; the references are torch's and
#                  the Python reference backend's). Skipped when nvcc, cmake or pybind11 is
#                  missing; when it fails the check goes on with Triton alone (the package imports
#                  from the source tree: PYTHONPATH).
#   tests_kernels  what only a GPU can tell, first: our CUDA and Triton kernels against torch's
#                  fused CUDA SGD (test_amp), the statistics against float64 (test_stats), CUDA
#                  graphs (test_graphs), the launch types Triton binds (test_triton_binder); then
#                  test_triton, and the product-only statistics variants of both backends
#                  (test_stats_by_need_gpu), test_layouts, test_op. The cases that run our kernels: -k "(cuda
#                  or triton or graphs) and not cuda-reference" (cuda-reference cases test torch,
#                  not us). Left to the CPU, which checks them on every commit: the plan's tables
#                  (test_plan), the interpreter's bitwise emulation (test_bitwise) and the
#                  ahead-of-time compilation (test_triton's compile tests). Three pytest processes
#                  side by side (Triton compiles each kernel variant on first use, on the CPU).
#   tests_more     the same selection in test_api, test_recorder, test_errors, test_parity.
#                  Both test stages stop with SIGINT at their limit, so pytest still prints its
#                  summary and writes its junit XML (digested into the report).
#   memcheck       compute-sanitizer memcheck over bench/sanitize_step.py (offset views, odd
#                  tails, channels_last / transposed tracked params, every dtype, both backends),
#                  PyTorch's caching allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1).
#   racecheck      compute-sanitizer racecheck over bench/racecheck_stats.py (the statistics
#                  kernels, run twice: bitwise identical).
#   bench          bench/gpu_bench.py: copy bandwidth, bitwise agreement of one step with
#                  torch.optim.SGD(fused=True) per dtype and hyper-parameter set, then step times
#                  on 1000 x 4096, ResNet-50, VGG-16. GPU_CHECK_COMPILE=1 adds torch.compile(step +
#                  sums) on VGG-16 (a minute or more: off by default).
#
# Time: each stage ends by a deadline, the budgets below added up from the start (time a stage
# leaves unused passes to the next), and a stage that ignores its SIGINT is killed GRACE seconds
# later. The real run's budgets plus every stage's grace add up to at most 480 s (printed at the
# start): inside the device call's 540 s, with the device tool's 15 minutes leaving room for a
# machine start and a partial rerun.
# The dry run: CPU tensors, Triton's interpreter (TRITON_INTERPRET=1), no build (the package is
# installed here), no compute-sanitizer (the same scripts run without it), tiny shapes and two
# rounds; its test stages stop at their (short) limits by design (reported `partial`).
# The last line printed says what passed; the exit status is 1 if any stage failed.
set -uo pipefail

DRY=0 BUDGET_ONLY=0
case "${1:-}" in
  --dry-run) DRY=1; shift ;;
  --budget) BUDGET_ONLY=1; shift ;;  # print the real run's budget line and stop
esac
ORDER=(preflight build tests_kernels tests_more memcheck racecheck bench)
GRACE=5  # seconds between a stage's SIGINT and its SIGKILL
((DRY)) && GRACE=15  # the dry run's interpreter unwinds slowly on 2 busy cores
if ((DRY)); then
  declare -A BUDGET=([preflight]=90 [build]=60 [tests_kernels]=40 [tests_more]=25 [memcheck]=150
                     [racecheck]=90 [bench]=120)
else
  declare -A BUDGET=([preflight]=25 [build]=100 [tests_kernels]=120 [tests_more]=30 [memcheck]=60
                     [racecheck]=30 [bench]=65)
fi
TOTAL=0
for s in "${ORDER[@]}"; do TOTAL=$((TOTAL + BUDGET[$s])); done
BUDGET_LINE="gpu_check: budgets $(for s in "${ORDER[@]}"; do printf '%s %s + ' "$s" "${BUDGET[$s]}"; done | sed 's/ + $//')\
 = $TOTAL s, + ${#ORDER[@]} x $GRACE s of grace = $((TOTAL + ${#ORDER[@]} * GRACE)) s\
 $( ((DRY)) && echo "(dry run: each stage its own budget)" || echo "(at most 480 s)")"
if ((BUDGET_ONLY)); then
  echo "$BUDGET_LINE"
  exit 0
fi
OUT=${1:-bench/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
REPORT="$OUT/gpu_check.json"
rm -f "$OUT/gpu_check.log" "$OUT/build.log" "$OUT/pytest.log" "$OUT/sanitizer.log" "$OUT/bench.json"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
echo "$BUDGET_LINE"

# The interpreter: $PY, else python3; here (the dry run) python3 may lack torch and the project's
# virtual environment has it.
if [[ -z "${PY:-}" ]]; then
  PY=python3
  if ! python3 -c "import torch" >/dev/null 2>&1 && [[ -x "$REPO/.venv/bin/python" ]]; then
    PY="$REPO/.venv/bin/python"
  fi
fi
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check: no interpreter '$PY' (set PY=...)"
  printf '{"format": "nm_optim.gpu_check", "stages": [], "final": "no interpreter %s"}\n' "$PY" > "$REPORT"
  exit 1
fi
# Tools installed as Python packages (cmake, ninja) live beside the interpreter; nvcc and
# compute-sanitizer in the CUDA toolkit.
PY_BIN=$("$PY" -c "import sys, os; print(os.path.dirname(sys.executable))" 2>/dev/null || true)
export PATH="${PY_BIN:+$PY_BIN:}$PATH:/usr/local/cuda/bin:/usr/local/cuda/compute-sanitizer"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # the package imports even if the build fails
REP() { "$PY" "$REPO/bench/gpu_check_report.py" "$@"; }

if ((DRY)); then
  export TRITON_INTERPRET=1
  DEVICE=cpu
  REP init "$REPORT" --mode dry-run
else
  DEVICE=cuda
  REP init "$REPORT" --mode real
fi
T0=$SECONDS

# Seconds stage $1 may run: real run, its deadline (budgets summed from the start) minus now;
# dry run, its own budget (its test stages would otherwise take up every second left over).
limit_for() {
  if ((DRY)); then
    echo "${BUDGET[$1]}"
    return
  fi
  local cum=0 s
  for s in "${ORDER[@]}"; do
    cum=$((cum + BUDGET[$s]))
    [[ $s == "$1" ]] && break
  done
  local left=$((T0 + cum - SECONDS))
  ((left < 10)) && left=10
  echo "$left"
}

# run_limited LIMIT LOG CMD...: CMD with SIGINT at LIMIT seconds (SIGKILL GRACE s later), output
# appended to LOG; sets RC (124: stopped at the limit) and ELAPSED.
run_limited() {
  local limit=$1 log=$2 t0=$SECONDS
  shift 2
  echo "+ $* (limit ${limit} s)" >> "$log"
  timeout -s INT -k "$GRACE" "$limit" "$@" >> "$log" 2>&1
  RC=$?
  ELAPSED=$((SECONDS - t0))
}

# wanted STAGE: false when GPU_CHECK_ONLY lists stages and this is not one of them.
wanted() {
  [[ -z "${GPU_CHECK_ONLY:-}" || ",${GPU_CHECK_ONLY}," == *",$1,"* ]]
}

skip_stage() { REP stage "$REPORT" "$1" skipped 0 --note "$2"; }

jget() { "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); print(d.get(sys.argv[2], ''))" "$1" "$2" 2>/dev/null; }

# -- preflight ----------------------------------------------------------------------------------
echo "gpu_check: $( ((DRY)) && echo dry run || echo real run ) in $REPO, interpreter $PY, output in $OUT"
t0=$SECONDS
LIMIT=$(limit_for preflight)
timeout -k "$GRACE" "$LIMIT" "$PY" - "$WORK/preflight.json" "$DEVICE" <<'EOF'
import importlib, json, os, shutil, subprocess, sys
out, device = sys.argv[1], sys.argv[2]
info = dict(python=sys.executable, python_version=sys.version.split()[0], device=device, missing=[])
def tool(name, *extra):
    path = shutil.which(name) or next((p for p in extra if os.access(p, os.X_OK)), None)
    info[name] = path
    if path is None:
        info["missing"].append(name)
    return path
for name in ("numpy", "torch", "triton", "pybind11", "expecttest", "hypothesis", "pytest"):
    try:
        mod = importlib.import_module(name)
        info[name] = getattr(mod, "__version__", "present")
    except Exception as e:  # noqa: BLE001
        info[name] = None
        info["missing"].append(name + ("" if isinstance(e, ImportError) else f" ({type(e).__name__})"))
if info["torch"]:
    import torch
    info["torch_cuda_version"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
    elif device == "cuda":
        info["missing"].append("torch.cuda")
tool("nvcc", "/usr/local/cuda/bin/nvcc")
tool("cmake")
if tool("ninja") is None and importlib.util.find_spec("ninja") is not None:
    info["missing"].remove("ninja")
    info["ninja"] = "python module"
tool("compute-sanitizer", "/usr/local/cuda/bin/compute-sanitizer")
tool("nvidia-smi")
if info.get("nvidia-smi"):
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=30)
    info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
try:
    import nm_optim
    info["backends"] = nm_optim.available_backends(device)
except Exception as e:  # noqa: BLE001
    info["nm_optim_import_error"] = f"{type(e).__name__}: {e}"
json.dump(info, open(out, "w"), indent=1)
print("preflight:", json.dumps(info))
EOF
RC=$?
if [[ ! -s "$WORK/preflight.json" ]]; then
  echo "{\"error\": \"the probe did not finish (rc $RC)\"}" > "$WORK/preflight.json"
fi
MISSING=$(jget "$WORK/preflight.json" missing | tr -d "[]'")
CUDA_OK=$(jget "$WORK/preflight.json" cuda_available)
# a probe that did not finish says nothing: let the stages try (each one fails on its own)
((!DRY)) && [[ -z "$CUDA_OK" ]] && CUDA_OK=True
CAP=$(jget "$WORK/preflight.json" capability)
status=ok
note="missing: ${MISSING:-nothing}"
if [[ $RC != 0 ]]; then
  status=failed
  note="the probe failed (rc $RC); $note"
elif ((!DRY)) && [[ "$CUDA_OK" != True ]]; then
  status=failed
  note="torch sees no CUDA device; $note"
fi
REP stage "$REPORT" preflight $status $((SECONDS - t0)) --limit "$LIMIT" --note "$note" --measured "$WORK/preflight.json"
# has TOOL: the probe found it (or, if the probe did not finish, it is on PATH / importable)
has() {
  [[ -n "$(jget "$WORK/preflight.json" "$1")" && "$(jget "$WORK/preflight.json" "$1")" != None ]] && return 0
  command -v "$1" >/dev/null 2>&1 || { [[ $1 == pybind11 ]] && "$PY" -c "import pybind11" 2>/dev/null; }
}

# -- build ----------------------------------------------------------------------------------------
build_info() {  # at most 20 s, counted in the build's budget
  timeout -k 2 18 "$PY" -c "import json, nm_optim; i = nm_optim.build_info(); i['backends_$DEVICE'] = nm_optim.available_backends('$DEVICE'); print(json.dumps(i))" \
    > "$WORK/build_info.json" 2>> "$OUT/build.log" || echo '{"error": "nm_optim.build_info() failed: see build.log"}' > "$WORK/build_info.json"
  cat "$WORK/build_info.json"
}
if ! wanted build; then
  skip_stage build "not in GPU_CHECK_ONLY"
elif ((DRY)); then
  build_info
  REP stage "$REPORT" build skipped 0 --note "dry run: the package is already installed here" --measured "$WORK/build_info.json"
else
  need=()
  for t in nvcc cmake pybind11; do has "$t" || need+=("$t"); done
  if ((${#need[@]})); then
    build_info
    REP stage "$REPORT" build skipped 0 --note "missing ${need[*]}: no CUDA kernel; going on with Triton alone" \
      --measured "$WORK/build_info.json"
  else
    ARCHS=${CAP/./}
    LIMIT=$(( $(limit_for build) - 20 ))  # build_info's 20 s after it
    ((LIMIT < 10)) && LIMIT=10
    export CUDACXX=${CUDACXX:-$(command -v nvcc)}
    run_limited "$LIMIT" "$OUT/build.log" env NM_OPTIM_CUDA=1 NM_OPTIM_LTO=0 NM_OPTIM_DEBUG=1 \
      NM_OPTIM_CUDA_ARCHS="${ARCHS:-native}" \
      CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}" \
      "$PY" -m pip install --no-build-isolation --no-deps -e .
    build_info
    compiled=$(jget "$WORK/build_info.json" cuda_compiled)
    if [[ $RC == 0 && $compiled == True ]]; then
      REP stage "$REPORT" build ok $ELAPSED --limit "$LIMIT" --note "sm_${ARCHS:-native}" --measured "$WORK/build_info.json"
    else
      tail -30 "$OUT/build.log"
      REP stage "$REPORT" build failed $ELAPSED --limit "$LIMIT" --measured "$WORK/build_info.json" \
        --note "rc $RC, cuda_compiled=$compiled (see build.log); going on with Triton alone"
    fi
  fi
fi

# -- tests ----------------------------------------------------------------------------------------
SELECT="(cuda or triton or graphs) and not cuda-reference"
# Shards: pytest processes run side by side (Triton compiles each kernel variant on first use, on
# the CPU: three processes compile on three cores), each stopped with SIGINT at the stage's limit
# (a single-process pytest then prints its summary and writes its junit XML; pytest-xdist's
# workers do neither). The first shard holds what only a GPU can tell, in that order; the files
# the CPU alone can check are left out (see the header), and so are test_triton's ahead-of-time
# compile tests.
shard() {  # the files of tests/test_NAME.py for each NAME that exists, on one line
  local f out=()
  for f in "$@"; do [[ -f tests/test_$f.py ]] && out+=("tests/test_$f.py"); done
  echo "${out[*]}"
}
KERNEL_SHARDS=("$(shard amp stats graphs triton_binder)" "$(shard triton)"
               "$(shard stats_by_need_gpu column_blocks layouts op)")
MORE_SHARDS=("$(shard api recorder)" "$(shard errors parity)")
CPU_CHECKED=(--deselect tests/test_triton.py::test_kernels_compile_for_sm90_without_spilling
             --deselect tests/test_triton.py::test_every_kernel_variant_compiles_for_sm80_and_sm90)

test_stage() {  # test_stage NAME SHARD...
  local name=$1
  shift
  if ! wanted "$name"; then
    skip_stage "$name" "not in GPU_CHECK_ONLY"
    return
  fi
  if ((!DRY)) && [[ "$CUDA_OK" != True ]]; then
    skip_stage "$name" "torch sees no CUDA device"
    return
  fi
  LIMIT=$(limit_for "$name")
  echo "gpu_check: $name: ${#@} shards side by side ($*), -k \"$SELECT\", limit $LIMIT s"
  local i=0 t0=$SECONDS pids=() pairs=() shard_files
  for shard_files in "$@"; do
    i=$((i + 1))
    [[ -z "$shard_files" ]] && continue
    # shellcheck disable=SC2086  # a shard is a list of files
    {
      run_limited "$LIMIT" "$WORK/${name}_$i.log" "$PY" -m pytest -q -rfE -p no:cacheprovider --durations=5 \
        --junitxml="$WORK/junit_${name}_$i.xml" -k "$SELECT" "${CPU_CHECKED[@]}" $shard_files
      echo "$RC" > "$WORK/${name}_$i.rc"
    } &
    pids+=($!)
    pairs+=("$WORK/junit_${name}_$i.xml" "$WORK/${name}_$i.log")
  done
  wait "${pids[@]}"
  ELAPSED=$((SECONDS - t0))
  # the stage's rc: 124 if a shard was cut, else the first other failure; pytest's 5 (nothing
  # selected in a shard) is no failure
  RC=0
  local rc
  for ((i = 1; i <= $#; i++)); do
    [[ -f "$WORK/${name}_$i.rc" ]] || continue
    rc=$(cat "$WORK/${name}_$i.rc")
    { echo "==== $name, shard $i (rc $rc) ===="; cat "$WORK/${name}_$i.log"; } >> "$OUT/pytest.log"
    if [[ $rc == 124 || $rc == 137 ]]; then
      RC=124
    elif [[ $rc != 0 && $rc != 5 && $RC == 0 ]]; then
      RC=$rc
    fi
  done
  REP pytest "${pairs[@]}" > "$WORK/$name.json"
  local summary failed errors passed
  summary=$(jget "$WORK/$name.json" summary_line)
  failed=$(jget "$WORK/$name.json" failed)
  errors=$(jget "$WORK/$name.json" errors)
  passed=$(jget "$WORK/$name.json" passed)
  echo "gpu_check: $name: $summary"
  local status=ok note="$summary"
  if ((${failed:-0} + ${errors:-0} > 0)); then
    status=failed
  elif [[ $RC == 124 ]]; then
    # cut at the limit with no failure so far: the tests it reached passed, the others did not run
    status=partial
    note="cut at its $LIMIT s limit after ${passed:-0} passed$( ((DRY)) && echo " (dry run: by design)"); $summary"
  elif [[ $RC != 0 ]]; then
    status=failed
    note="pytest rc $RC; $summary"
  fi
  REP stage "$REPORT" "$name" $status $ELAPSED --limit "$LIMIT" --note "$note" --measured "$WORK/$name.json"
}
: > "$OUT/pytest.log"
test_stage tests_kernels "${KERNEL_SHARDS[@]}"
test_stage tests_more "${MORE_SHARDS[@]}"

# -- compute-sanitizer ----------------------------------------------------------------------------
: > "$OUT/sanitizer.log"
sanitizer_stage() {  # sanitizer_stage NAME TOOL SCRIPT [ARGS...]
  local name=$1 tool=$2 script=$3
  shift 3
  if ! wanted "$name"; then
    skip_stage "$name" "not in GPU_CHECK_ONLY"
    return
  fi
  LIMIT=$(limit_for "$name")
  local log="$WORK/$name.log"
  # the script starts no case after its time budget, so that it ends, and the sanitizer with it,
  # before the limit (the sanitizer's start and end take seconds)
  set -- "$@" --time-budget $((LIMIT > 40 ? LIMIT - 20 : LIMIT / 2))
  if ((DRY)); then
    run_limited "$LIMIT" "$log" "$PY" "$script" --device cpu "$@"
  elif [[ "$CUDA_OK" != True ]]; then
    skip_stage "$name" "torch sees no CUDA device"
    return
  elif ! has compute-sanitizer; then
    skip_stage "$name" "compute-sanitizer not found"
    return
  else
    run_limited "$LIMIT" "$log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
      --error-exitcode 9 "$PY" "$script" "$@"
  fi
  { echo "==== $name ===="; cat "$log"; } >> "$OUT/sanitizer.log"
  tail -4 "$log"
  REP sanitizer "$log" > "$WORK/$name.json"
  local status=ok note summary not_run
  summary=$(jget "$WORK/$name.json" script_summary)
  not_run=$(jget "$WORK/$name.json" cases_not_run)
  case $RC in
    0) note="no errors" ;;
    9) status=failed note="compute-sanitizer $tool reported errors: $(jget "$WORK/$name.json" tool_summary)" ;;
    124|137) status=failed note="cut at its $LIMIT s limit" ;;
    *) status=failed note="rc $RC (a case failed, or the script or the sanitizer broke): $(tail -1 "$log")" ;;
  esac
  if [[ $status == ok ]] && [[ -z "$summary" || "${not_run:-0}" != 0 ]]; then
    # no error in what ran, but not every case ran (or the script never said): never `ok`
    status=partial
    note="no errors in $(jget "$WORK/$name.json" cases_run) of $(jget "$WORK/$name.json" cases_total) cases (${not_run:-?} not run: time budget)"
  fi
  note="$note; ${summary:-the script printed no summary}"
  ((DRY)) && note="dry run, without compute-sanitizer: $note"
  REP stage "$REPORT" "$name" $status $ELAPSED --limit "$LIMIT" --note "$note" --measured "$WORK/$name.json"
}
if ((DRY)); then
  sanitizer_stage memcheck memcheck bench/sanitize_step.py --quick
else
  sanitizer_stage memcheck memcheck bench/sanitize_step.py
fi
sanitizer_stage racecheck racecheck bench/racecheck_stats.py

# -- benchmark ------------------------------------------------------------------------------------
if ! wanted bench; then
  skip_stage bench "not in GPU_CHECK_ONLY"
elif ((!DRY)) && [[ "$CUDA_OK" != True ]]; then
  skip_stage bench "torch sees no CUDA device"
else
  LIMIT=$(limit_for bench)
  args=(--json "$OUT/bench.json")
  if ((DRY)); then
    args+=(--device cpu --quick --rounds 2 --warmup 1)
  else
    args+=(--rounds 15)
  fi
  [[ "${GPU_CHECK_COMPILE:-0}" == 1 ]] && args+=(--compile)
  run_limited "$LIMIT" "$WORK/bench.log" "$PY" bench/gpu_bench.py "${args[@]}"
  cat "$WORK/bench.log"
  REP bench "$OUT/bench.json" > "$WORK/bench_digest.json"
  case $RC in
    0) status=ok note="" ;;
    124|137) status=partial note="cut at its $LIMIT s limit (bench.json holds the sections that ended)" ;;
    *) status=failed note="rc $RC (a section failed: see gpu_check.log)" ;;
  esac
  REP stage "$REPORT" bench $status $ELAPSED --limit "$LIMIT" --note "$note" --measured "$WORK/bench_digest.json"
fi

echo "gpu_check: $((SECONDS - T0)) s in all; report $REPORT"
REP final "$REPORT"
RC=$?
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $RC
