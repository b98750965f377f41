#!/usr/bin/env bash
# The GPU machine, simulated on a CPU box as closely as it allows, before calling
# bench/gpu_check.sh ready for its one real run (not in CI: it downloads torch's CUDA wheel and
# its CUDA libraries, about 4 GB, once, and builds the CUDA kernel on the CPU).
#
#   bash bench/gpu_box_sim.sh [OUT_FILE]     # default OUT_FILE: bench/results/gpu_box_sim.txt
#
# What the GPU machine has (docs of the device tool, as a session saw it): Python 3.12, torch
# 2.11.0 with its CUDA 13 libraries, Triton 3.6.0, numpy 2.5.2, pybind11, cmake, ninja, pytest,
# hypothesis, pytest-xdist, nvcc 13.0; no expecttest. Here:
#
# 1. a virtual environment OUTSIDE the repository ($GPU_BOX_CACHE, default ../.cache beside the
#    repository: gpu_box_venv, and pip's cache for the wheels) from pyenv's newest Python 3.12,
#    with those packages at those versions (installed once; checked every run);
# 2. a copy of the repository's HEAD (what is committed; GPU_BOX_TREE=worktree: the working
#    tree, tracked and untracked-but-not-ignored files) in a temporary folder, so that the
#    editable build's nm_optim/_C*.so lands there and not in this checkout;
# 3. the build with the GPU check's command (its build stage: NM_OPTIM_CUDA=1 NM_OPTIM_LTO=0
#    NM_OPTIM_DEBUG=1, sm_90, `pip install --no-build-isolation --no-deps -e .`), timed, each
#    output line stamped with the seconds since the start (ninja prints a step when it ends);
#    then nm_optim.build_info() (cuda_compiled must be true);
# 4. tests/test_triton_binder.py (the types Triton's launch binder gives the kernels' arguments
#    for sm_90, on this Triton);
# 5. `bash bench/gpu_check.sh --dry-run` with the simulated interpreter;
# 6. each stage's time against its budget: the dry run's own, and the real run's budget line.
#
# Every step's output goes to OUT_FILE too; the exit status is 1 if a step failed.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT_FILE=${1:-$REPO/bench/results/gpu_box_sim.txt}
mkdir -p "$(dirname "$OUT_FILE")"
OUT_FILE=$(cd "$(dirname "$OUT_FILE")" && pwd)/$(basename "$OUT_FILE")
CACHE=${GPU_BOX_CACHE:-$(dirname "$REPO")/.cache}
VENV=$CACHE/gpu_box_venv
case "$CACHE/" in
  "$REPO"/*) echo "gpu_box_sim: GPU_BOX_CACHE must be outside the repository ($REPO)"; exit 2 ;;
esac
TORCH=2.11.0 TRITON=3.6.0 NUMPY=2.5.2
PACKAGES=("torch==$TORCH" "triton==$TRITON" "numpy==$NUMPY" pybind11 cmake ninja pytest hypothesis pytest-xdist
          setuptools wheel)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_box_sim.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT_FILE") 2>&1
FAILED=()
T0=$SECONDS
step() { echo; echo "== $* (t=$((SECONDS - T0)) s)"; }
stamp() {  # prefix each line with the seconds since $1
  local t0=$1 line
  while IFS= read -r line; do printf '[%4d s] %s\n' $((SECONDS - t0)) "$line"; done
}

TREE=${GPU_BOX_TREE:-head}
echo "gpu_box_sim: $(date -u +%Y-%m-%dT%H:%M:%SZ), repository $REPO at $(git -C "$REPO" rev-parse --short HEAD)" \
  "($( [[ $TREE == worktree ]] && echo "the working tree" || echo "its HEAD")), $(nproc) cores" \
  "(load $(cut -d' ' -f1 /proc/loadavg)), cache $CACHE"

# -- 1. the environment --------------------------------------------------------------------------
step "1. virtual environment $VENV"
if [[ ! -x "$VENV/bin/python" ]]; then
  ROOT=$(pyenv root 2>/dev/null) || { echo "gpu_box_sim: pyenv not found (it provides Python 3.12)"; exit 2; }
  BASE=$(ls -d "$ROOT"/versions/3.12.* 2>/dev/null | sort -V | tail -1)
  [[ -x "$BASE/bin/python" ]] || { echo "gpu_box_sim: no Python 3.12 under $ROOT/versions"; exit 2; }
  mkdir -p "$CACHE"
  "$BASE/bin/python" -m venv "$VENV" || exit 2
fi
PY=$VENV/bin/python
# pip skips what is installed at the pinned versions; the wheels stay in $CACHE/pip
PIP_CACHE_DIR=$CACHE/pip "$PY" -m pip install -q "${PACKAGES[@]}" 2>&1 | grep -v "^WARNING: Location" || true
if "$PY" -m pip show expecttest >/dev/null 2>&1; then
  "$PY" -m pip uninstall -q -y expecttest  # the GPU machine has none (test_parity / test_errors skip)
fi
"$PY" - "$TORCH" "$TRITON" "$NUMPY" <<'EOF' || FAILED+=(environment)
import importlib.util, sys
import numpy, torch, triton
want = dict(torch=sys.argv[1], triton=sys.argv[2], numpy=sys.argv[3])
got = dict(torch=torch.__version__.split("+")[0], triton=triton.__version__, numpy=numpy.__version__)
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"numpy {numpy.__version__}, expecttest {'present' if importlib.util.find_spec('expecttest') else 'absent'}")
sys.exit(0 if got == want else f"versions {got} are not the GPU machine's {want}")
EOF

# -- 2. the copy ---------------------------------------------------------------------------------
step "2. copy of the repository ($TREE) in $WORK/repo"
mkdir -p "$WORK/repo"
if [[ $TREE == worktree ]]; then
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/repo" 2>/dev/null)
else
  git -C "$REPO" archive HEAD | tar -x -C "$WORK/repo"
fi
find "$WORK/repo/nm_optim" -maxdepth 1 -name "_C*.so" -delete  # a build of this checkout's own Python
echo "$(find "$WORK/repo" -type f | wc -l) files"
cd "$WORK/repo" || exit 2

# -- 3. the build, as the GPU check's build stage runs it ----------------------------------------
step "3. build: NM_OPTIM_CUDA=1 NM_OPTIM_LTO=0 NM_OPTIM_DEBUG=1 NM_OPTIM_CUDA_ARCHS=90 pip install --no-build-isolation --no-deps -e ."
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
t0=$SECONDS
env PATH="$VENV/bin:$PATH:/usr/local/cuda/bin" CUDACXX="$NVCC" NM_OPTIM_CUDA=1 NM_OPTIM_LTO=0 NM_OPTIM_DEBUG=1 \
  NM_OPTIM_CUDA_ARCHS=90 \
  CMAKE_BUILD_PARALLEL_LEVEL=16 "$PY" -m pip install -v --no-build-isolation --no-deps -e . 2>&1 \
  | grep --line-buffered -E "\[[0-9]+/[0-9]+\]|error|Error|Successfully|nm_optim:|CUDA" | stamp "$t0"
BUILD_RC=${PIPESTATUS[0]}
BUILD_S=$((SECONDS - t0))
INFO=$("$PY" -c "import json, nm_optim; print(json.dumps(nm_optim.build_info()))" 2>&1 | tail -1)
echo "build: rc $BUILD_RC in $BUILD_S s on $(nproc) cores at load $(cut -d' ' -f1 /proc/loadavg) (the real run's build" \
  "budget: 100 s, 20 of them for build_info, on 16 cores); build_info: $INFO"
[[ $BUILD_RC == 0 && $INFO == *'"cuda_compiled": true'* ]] || FAILED+=(build)

# -- 4. the launch binder ------------------------------------------------------------------------
step "4. tests/test_triton_binder.py (Triton $TRITON's launch binder for sm_90)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_triton_binder.py 2>&1 | tail -5
[[ ${PIPESTATUS[0]} == 0 ]] || FAILED+=(binder)

# -- 5. the dry run ------------------------------------------------------------------------------
step "5. PY=$PY bash bench/gpu_check.sh --dry-run"
t0=$SECONDS
PY="$PY" bash bench/gpu_check.sh --dry-run "$WORK/out" > "$WORK/dry.log" 2>&1
DRY_RC=$?
grep -E "^gpu_check" "$WORK/dry.log"
echo "dry run: rc $DRY_RC in $((SECONDS - t0)) s"
[[ $DRY_RC == 0 ]] || { FAILED+=(dry-run); grep -E "FAIL|Error" "$WORK/out/pytest.log" | head -20; }

# -- 6. time against budget ----------------------------------------------------------------------
step "6. each stage's time against its budget"
"$PY" - "$WORK/out/gpu_check.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
print(f"{'stage':15s} {'status':8s} {'seconds':>8s} {'limit':>6s}")
for s in doc["stages"]:
    print(f"{s['name']:15s} {s['status']:8s} {s['seconds']:8.1f} {s.get('limit_s', '-')!s:>6s}")
print("dry run total:", round(sum(s["seconds"] for s in doc["stages"]), 1), "s")
EOF
echo "real run: $(bash bench/gpu_check.sh --budget)"

echo
if ((${#FAILED[@]})); then
  echo "gpu_box_sim: FAILED: ${FAILED[*]} ($((SECONDS - T0)) s)"
  exit 1
fi
echo "gpu_box_sim: every step passed ($((SECONDS - T0)) s); output in $OUT_FILE"
