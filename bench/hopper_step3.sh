#!/usr/bin/env bash
# "Hopper speed, step 3" (issue 16) in one device call: one FLUX.1-dev-shaped denoising step at 1024x1024,
# bf16 against the engine with and without the fused blocks, eager / compiled / CUDA graphs, with the time
# split (GEMM / attention / other), the fused MLP exit's GPU test, and the harness rows of the exit GEMM.
#
#   bash bench/hopper_step3.sh                          # from the repository root; JSON and logs under $OUT
#   STEP3_VARIANTS="bf16-compile svdq-w4a8-fused-compile" bash bench/hopper_step3.sh
#
# The device image has no diffusers: carry it as wheels (.whl, ignored by git; ../.library/device/README.md):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# and, for the torchao rows, a torchao wheel built for the device's torch (2.11). Name .whl in carry.
# Pass LOWBIT_COMMIT=<commit> (the device copy's .git may be stale). Planned: 6-9 minutes on an H200 (two
# quantizations of a 12B model plus compilation); each variant's row is written as soon as it is measured,
# so a run cut by the limit still leaves what it measured in e2e_flux-step3.json.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
log() { echo "== [$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/step3.txt"; }

log "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
log "commit: ${LOWBIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -e lowbit_engine/kernels ] || ln -s ../kernels lowbit_engine/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import diffusers" 2>/dev/null || { log "diffusers is not importable: carry its wheel (see the header)"; exit 1; }

# The C++ CPU references are needed at import; the e2e path itself runs Triton kernels only.
LOWBIT_CUDA=0 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { log "BUILD FAILED"; tail -20 "$OUT/build.log"; }

log "GPU test of the exit op"
timeout 120 python3 -m pytest -q -m gpu tests/gpu/test_w4a8_gpu.py -k exit -p no:cacheprovider >"$OUT/pytest_exit.log" 2>&1
log "pytest rc=$?"; tail -2 "$OUT/pytest_exit.log" | tee -a "$OUT/step3.txt"

log "harness: the exit GEMM against its unfused chain (M = 4608)"
timeout 90 python3 -m lowbit_engine.cli bench kernels --m 4608 --kernels cublas exit_ svdq_w4a8_i8q svdq_w4a8_f8l \
  --out "$OUT/kernels-exit.json" >"$OUT/bench_exit.log" 2>&1 || log "harness FAILED (see bench_exit.log)"
grep -E "exit_|cublas_bf16" "$OUT/bench_exit.log" | head -30 | tee -a "$OUT/step3.txt"

variants=${STEP3_VARIANTS:-"bf16-compile svdq-w4a8 svdq-w4a8-compile svdq-w4a8-fused svdq-w4a8-fused-compile svdq-w4a8-fused-cudagraph torchao-fp8-compile"}
log "e2e: $variants"
left=$(( 560 - ($(date +%s) - start) ))
timeout $left python3 bench/e2e_flux.py --variants $variants --repeat 5 --profile \
  --out "$OUT/e2e_flux-step3.json" >"$OUT/e2e.log" 2>&1
log "e2e rc=$? (124: cut by the time limit; the JSON holds the rows measured)"
tail -16 "$OUT/e2e.log" | tee -a "$OUT/step3.txt"
log "done"
