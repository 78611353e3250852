#!/usr/bin/env bash
# One call on a lent GPU: build for sm_90a (+ sm_80), run the GPU tests and the kernel benchmarks,
# and leave logs and JSON under $OUT (default ./out). With a 15-minute device budget, run
# bench/hopper_step1.sh first (the promotion-free path's tests and numbers, ~6 minutes), then this with
# GPU_CHECK_SKIP_BENCH=1 (its harness would repeat step 1's rows). Run from the repository root:
#   bash bench/gpu_check.sh            # everything
#   GPU_CHECK_SKIP_BENCH=1 bash bench/gpu_check.sh
#   GPU_CHECK_MICROBENCH=0 ...        # skip the sm90 schedule microbenchmark (on by default with 90a)
#   GPU_CHECK_SANITIZE=0 / GPU_CHECK_SOAK=0 ...   # skip compute-sanitizer / the soak (bench/soak.py)
#   GPU_CHECK_TESTS="tests/gpu/test_cuda_gemm.py" GPU_CHECK_BENCH_ARGS="--kernels cublas gemm_w4" bash bench/gpu_check.sh
# The device tool copies the working tree with a stale .git: pass LOWBIT_COMMIT=<the commit you built>
# in the device command so the JSON names the right commit.
# Needs torch with CUDA, nvcc, setuptools, pybind11 and pytest. The device image has no pybind11 (seen
# 2026-11-22): carry its wheel, made here with
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps -d .whl pybind11==3.1.0
# and name .whl in the device call's carry list; this script installs what it finds there.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

log "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
log "nvcc: $(nvcc --version | tail -1)"
log "commit: ${LOWBIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# Build in place (no pip: the device has no network). sm_80 is compiled too so both paths stay honest.
export LOWBIT_CUDA=1 LOWBIT_CUDA_ARCHS=${LOWBIT_CUDA_ARCHS:-"90a;80"} LOWBIT_NVCC_THREADS=8
start=$(date +%s)
if ! python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  log "BUILD FAILED (tail of build.log follows)"; tail -40 "$OUT/build.log"; exit 1
fi
log "build ok in $(( $(date +%s) - start ))s"
# setup.py installs kernels/ as lowbit_engine.kernels; an in-place build needs that mapping by hand.
[ -e lowbit_engine/kernels ] || ln -s ../kernels lowbit_engine/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import lowbit_engine, json; print(json.dumps(lowbit_engine.build_info()))" | tee "$OUT/build_info.json"

# Resource report of the CUDA objects (registers, smem, spills) and a SASS instruction census.
for obj in build/temp*/cuda/*.o; do
  [ -f "$obj" ] || continue
  cuobjdump --dump-resource-usage "$obj" >>"$OUT/resources.txt" 2>&1 || true
  cuobjdump --dump-sass "$obj" 2>/dev/null | grep -oE '^\s+/\*[0-9a-f]+\*/\s+[A-Z0-9_.]+' \
    | awk '{print $2}' | sort | uniq -c | sort -rn | head -40 >>"$OUT/sass_census.txt" || true
done

log "GPU tests"
python3 -m pytest -q -m gpu ${GPU_CHECK_TESTS:-tests} -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" >"$OUT/pytest_gpu.log" 2>&1
rc=$?; tail -5 "$OUT/pytest_gpu.log" | tee -a "$OUT/summary.txt"
[ $rc -eq 0 ] || [ $rc -eq 5 ] || { log "GPU tests FAILED (rc=$rc)"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" | head -30; }

if [ "${GPU_CHECK_SANITIZE:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  # Every GPU test (tests/gpu and the gpu-marked tests elsewhere), at small sizes: memcheck is ~50x slower.
  log "compute-sanitizer memcheck on the GPU tests (small sizes)"
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -m gpu ${GPU_CHECK_TESTS:-tests} \
    -k "not 4608 and not 15360" -p no:cacheprovider >"$OUT/sanitizer.log" 2>&1
  log "compute-sanitizer rc=$? ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer.log") clean summaries)"
fi

if [ "${GPU_CHECK_SOAK:-1}" = 1 ]; then
  # Issue 19: forward passes of a quantized tiny FLUX with LoRA swaps; fails if CUDA memory or the backend
  # record's tables grow (bench/soak.py). GPU_CHECK_SOAK_PASSES=1000 for the full run.
  log "soak (bench/soak.py, ${GPU_CHECK_SOAK_PASSES:-300} passes)"
  python3 bench/soak.py --device cuda --passes "${GPU_CHECK_SOAK_PASSES:-300}" --out "$OUT/soak-cuda.json" \
    2>&1 | tail -2 | tee -a "$OUT/summary.txt" || log "soak FAILED"
fi

if [ "${GPU_CHECK_MICROBENCH:-1}" = 1 ] && [[ "$LOWBIT_CUDA_ARCHS" == *90a* ]]; then
  # Both consumer schedules of the sm_90a GEMM, timed and compared element by element (docs/kernels.md).
  log "sm90 GEMM schedules (bench/microbench/gemm_w4_sm90_ablation.cu)"
  if nvcc -std=c++17 -O3 -Icsrc/include -DLOWBIT_HAVE_SM90A -DLOWBIT_SM90_ABLATE=0 \
      -gencode=arch=compute_90a,code=sm_90a bench/microbench/gemm_w4_sm90_ablation.cu -o /tmp/lowbit_sm90_sched \
      >"$OUT/microbench_build.log" 2>&1; then
    /tmp/lowbit_sm90_sched 2>&1 | tee "$OUT/gemm_w4_sm90_schedules.txt" | tee -a "$OUT/summary.txt"
  else
    log "microbench build FAILED"; tail -20 "$OUT/microbench_build.log"
  fi
fi

if [ "${GPU_CHECK_SKIP_BENCH:-0}" != 1 ]; then
  log "kernel benchmarks"
  python3 -m lowbit_engine.cli bench kernels --out "$OUT/kernels.json" ${GPU_CHECK_BENCH_ARGS:-} \
    >"$OUT/bench.log" 2>&1 || log "benchmark FAILED"
  cat "$OUT/bench.log"
fi
exit $rc
