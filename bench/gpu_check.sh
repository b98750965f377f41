#!/usr/bin/env bash
# The one prepared check for a GPU machine (CUDA 13, torch, Triton, no network). Written without
# a GPU: it has not run yet.
#   bash bench/gpu_check.sh OUT_DIR
# 1. builds nm_optim._C for the local GPU with the local nvcc;
# 2. runs the tests on CUDA: every test parametrized over the cuda and triton backends, the
#    gpu-marked ones (CUDA-graph capture) and tests/test_triton.py on CUDA tensors;
# 3. runs compute-sanitizer memcheck on small steps through every CUDA kernel path;
# 4. benchmarks (copy bandwidth; torch foreach / fused / fused + sums / torch.compile of step +
#    sums; nm_optim cuda and triton with and without tracks) on VGG-16, ResNet-50 and 1000 x 4096
#    (bench/gpu_bench.py; torch.compile on VGG-16 only: compiling 1000 tensors takes minutes);
# 5. writes OUT_DIR/gpu_check.json (+ logs). Each stage's status goes into OUT_DIR/summary.txt,
#    and a failing stage does not stop the later ones.
# Stage time limits (build ~1-2 min, tests 120 s, memcheck 60 s, bench 150 s) keep the whole run
# near the 6 minutes a GPU session can spare, with room for a rerun.
set -uo pipefail
OUT=${1:-bench/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: > "$summary"
stage() { local name=$1; shift; local t0=$SECONDS; "$@"; local rc=$?; echo "$name: rc=$rc ($((SECONDS - t0)) s)" | tee -a "$summary"; return $rc; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia_smi.txt"
stage build env NM_OPTIM_CUDA=1 NM_OPTIM_CUDA_ARCHS=native CMAKE_BUILD_PARALLEL_LEVEL=16 \
  pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python -c "import nm_optim, json; print(json.dumps(nm_optim.build_info()))" | tee "$OUT/build_info.json"
stage tests timeout 120 python -m pytest -q --maxfail=20 -k "cuda or triton" -m "not slow" tests > "$OUT/pytest.log" 2>&1
tail -15 "$OUT/pytest.log"
if command -v compute-sanitizer >/dev/null 2>&1; then
  stage memcheck timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 python bench/sanitize_step.py \
    > "$OUT/memcheck.log" 2>&1
  tail -5 "$OUT/memcheck.log"
else
  echo "memcheck: skipped (compute-sanitizer not found)" | tee -a "$summary"
fi
# torch.compile of (step + sums) compiles for a minute or more: VGG-16 only; GPU_CHECK_COMPILE=0 drops it.
compile_flag="--compile"
[[ "${GPU_CHECK_COMPILE:-1}" == 0 ]] && compile_flag=""
(cd bench && stage bench timeout 150 python gpu_bench.py --rounds 15 $compile_flag --json "$OUT/gpu_check.json") \
  2>&1 | tee "$OUT/bench.log"
cat "$summary"
