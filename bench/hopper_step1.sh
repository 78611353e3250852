#!/usr/bin/env bash
# "Hopper speed, step 1" in one device call (planned at 5-7 minutes on an H200, limit 8): the GPU tests of
# the promotion-free W4A8 path, then the harness rows the table needs, then the table.
#
#   bash bench/hopper_step1.sh                 # from the repository root; logs and JSON under $OUT
#   STEP1_AUTOTUNE=0 bash bench/hopper_step1.sh   # skip the gemm8 tile search at the end
#
# What it writes under $OUT (each comes back from the device tool; commit the JSON to bench/results/):
#   step1.txt                the log and the table;  build.log
#   pytest_w4a8.log          tests/gpu/test_w4a8_gpu.py (+ the layout-dependent GPU tests)
#   kernels-step1.json       the harness report (M = 4608, 256, 16 on the six FLUX shapes)
#   step1-summary.json       bench/summarize_step1.py of it: medians, minimum / target met or missed
#   autotune.json            the gemm8 tile search at M = 4608 (LOWBIT_AUTOTUNE cache), when it ran
#
# The native module is built in the background into a private folder while the (Triton-only) GPU tests
# run, and copied in before the harness, which needs it for the CUDA-quantizer comparison rows: an
# in-place build would swap lowbit_engine/_C*.so under the running tests. Pass LOWBIT_COMMIT=<commit>
# (the device copy's .git may be stale) so the JSON names the right commit.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
log() { echo "== [$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/step1.txt"; }

log "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
log "commit: ${LOWBIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
log "python $(python3 -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)')"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -e lowbit_engine/kernels ] || ln -s ../kernels lowbit_engine/kernels  # setup.py's package_dir, by hand
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# 1. the native module (C++ references + CUDA kernels for sm_90a), built aside
rm -f lowbit_engine/_C*.so
( LOWBIT_CUDA=1 LOWBIT_CUDA_ARCHS=90a LOWBIT_NVCC_THREADS=8 python3 setup.py build_ext \
    --build-lib /tmp/lowbit_build --build-temp /tmp/lowbit_tmp >"$OUT/build.log" 2>&1; echo $? >/tmp/lowbit_build_rc ) &
build_pid=$!

# 2. the GPU tests of the new path (Triton only: they need no native module)
log "GPU tests: tests/gpu/test_w4a8_gpu.py"
timeout 240 python3 -m pytest -q -m gpu tests/gpu/test_w4a8_gpu.py -p no:cacheprovider >"$OUT/pytest_w4a8.log" 2>&1
log "pytest rc=$?"
tail -3 "$OUT/pytest_w4a8.log" | tee -a "$OUT/step1.txt"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_w4a8.log" | head -20 | tee -a "$OUT/step1.txt"

wait $build_pid
if [ "$(cat /tmp/lowbit_build_rc 2>/dev/null)" = 0 ]; then
  cp /tmp/lowbit_build/lowbit_engine/_C*.so lowbit_engine/ && log "native module built ($(ls lowbit_engine/_C*.so))"
else
  log "BUILD FAILED (the harness runs without the CUDA-quantizer rows); tail of build.log:"; tail -15 "$OUT/build.log"
fi
python3 -c "import lowbit_engine, json; print(json.dumps(lowbit_engine.build_info()))" | tee -a "$OUT/step1.txt"

# 3. the harness rows of the table (and the g64 rows beside them, for comparison)
log "harness"
python3 -m lowbit_engine.cli bench kernels --m 4608 256 16 --out "$OUT/kernels-step1.json" --kernels \
  cublas torch_fp8 gemm_w4a8 gemm8_ expand_ svdq_w4a8 exit_ quantize_act_int8 quantize_act_fp8 fp8_linear nvfp4_linear_fp8 \
  mxfp4_linear_fp8 >"$OUT/bench.log" 2>&1 || log "harness FAILED (tail of bench.log follows)"
tail -5 "$OUT/bench.log"

# 4. the table
python3 bench/summarize_step1.py "$OUT/kernels-step1.json" --out "$OUT/step1-summary.json" 2>&1 | tee -a "$OUT/step1.txt"

# 5. time left (the call's limit is 8 minutes): the gemm8 tile search at M = 4608 on the six shapes
if [ "${STEP1_AUTOTUNE:-1}" = 1 ] && [ $(( $(date +%s) - start )) -lt 330 ]; then
  log "gemm8 tile search (LOWBIT_AUTOTUNE=1), M=4608"
  LOWBIT_AUTOTUNE=1 LOWBIT_CACHE_DIR=/tmp/lowbit_cache timeout 120 python3 -m lowbit_engine.cli bench kernels --m 4608 \
    --kernels gemm8_ gemm_w4a8_f8l gemm_w4a8_i8q cublas_fp8 --repeat 20 >"$OUT/bench_autotune.log" 2>&1
  cp /tmp/lowbit_cache/triton_autotune.json "$OUT/autotune.json" 2>/dev/null && log "autotune: $OUT/autotune.json"
  grep -E "gemm8_|gemm_w4a8_(f8l|i8q)" "$OUT/bench_autotune.log" | tee -a "$OUT/step1.txt"
fi
log "done"
