#!/usr/bin/env bash
# Issue 18's GPU numbers in one device call (about 5 minutes on an H100/H200; Triton and torch only, no
# CUDA build needed): the w4a16 GPU tests, the w4a16 GEMV against cuBLAS bf16 on FLUX's adaLN shapes with
# a configuration sweep, and the quantization time of one FLUX.1-dev-sized double and single block on the
# GPU. Writes JSON and logs under $OUT (default ./out). Run from the repository root:
#   LOWBIT_COMMIT=<commit> bash bench/issue18_gpu.sh
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
log "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1)"
log "commit: ${LOWBIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
# setup.py installs kernels/ as lowbit_engine.kernels; a source tree needs that mapping by hand.
[ -e lowbit_engine/kernels ] || ln -s ../kernels lowbit_engine/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

log "w4a16 GPU tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_w4a16_gpu.py >"$OUT/pytest_w4a16_gpu.log" 2>&1
log "rc=$? $(tail -1 "$OUT/pytest_w4a16_gpu.log")"

log "w4a16 GEMV vs cuBLAS bf16"
timeout 300 python3 bench/w4a16_gemv.py --out "$OUT/w4a16-gemv.json" 2>&1 | tee "$OUT/w4a16_gemv.log" | grep -v "^  cfg"

if [ -f bench/quant_time.py ]; then
  log "quantization time of one FLUX.1-dev double / single block on the GPU"
  timeout 300 python3 bench/quant_time.py --device cuda --vq3 --out "$OUT/quant-time-gpu.json" 2>&1 | tee "$OUT/quant_time.log"
fi
