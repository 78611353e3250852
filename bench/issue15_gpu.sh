#!/usr/bin/env bash
# Issue 15 ("Hopper speed, step 2": the persistent TMA / wgmma 8-bit GEMM, csrc/cuda/gemm8_sm90.cu) in one
# device call, planned at 5-7 minutes on an H100/H200 (give the call timeout_s=540). Every step has its own
# timeout: a protocol bug in a persistent, clustered kernel hangs rather than fails, and must not eat the
# session's device time.
#
#   LOWBIT_COMMIT=$(git rev-parse --short HEAD) bash bench/issue15_gpu.sh      # logs and JSON under $OUT
#
# What it writes under $OUT (commit the JSON to bench/results/ with the GPU name in the file name):
#   issue15.txt            the log, with the table of the issue (medians over the six FLUX shapes)
#   build.log              the native module build (C++ references + CUDA for sm_90a)
#   sanitizer.log          compute-sanitizer memcheck over the small-shape GPU tests of the kernel
#   pytest_gemm8.log       tests/gpu/test_gemm8_sm90.py (odd M, K splits, GELU, the plain fp8 gate, dispatch)
#   kernels-issue15.json   the harness: cuBLAS bf16 / fp8, the skeleton as plain fp8 (gemm8_fp8_sm90), the
#                          F8L kernel (gemm_w4a8_f8l_r32_sm90) and the Triton F8L path, M = 4608 and 16
#   issue15-summary.json   the table: minimum / target met or missed
#   sass-census.json       the main-loop census of the kernels as built on the device's toolchain
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
log() { echo "== [$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/issue15.txt"; }

log "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
log "commit: ${LOWBIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
[ -e lowbit_engine/kernels ] || ln -s ../kernels lowbit_engine/kernels  # setup.py's package_dir, by hand
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# 1. the native module with the CUDA kernels (sm_90a)
log "build"
rm -f lowbit_engine/_C*.so
if ! LOWBIT_CUDA=1 LOWBIT_CUDA_ARCHS=90a LOWBIT_NVCC_THREADS=8 timeout 300 python3 setup.py build_ext --inplace \
    >"$OUT/build.log" 2>&1; then
  log "BUILD FAILED; tail of build.log:"; tail -20 "$OUT/build.log" | tee -a "$OUT/issue15.txt"; exit 1
fi
python3 -c "import lowbit_engine, json; print(json.dumps(lowbit_engine.build_info()))" | tee -a "$OUT/issue15.txt"
python3 -c "from lowbit_engine import ops_gemm8_cuda as g; print('gemm8_sm90 available:', g.available())" \
  | tee -a "$OUT/issue15.txt"

# 2. memcheck over the small shapes first (a hang or an illegal address shows here, in a bounded run)
log "compute-sanitizer (memcheck), small shapes"
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
timeout 150 "$SAN" --tool memcheck --error-exitcode 9 python3 -m pytest -q -x -p no:cacheprovider \
  tests/gpu/test_gemm8_sm90.py -k "not 4608 and not repeated and not gate" >"$OUT/sanitizer.log" 2>&1
log "sanitizer rc=$? (0 clean, 9 errors found, 124 timed out)"
grep -E "ERROR SUMMARY|Invalid|passed|failed" "$OUT/sanitizer.log" | tail -5 | tee -a "$OUT/issue15.txt"

# 3. the GPU tests at full speed
log "GPU tests: tests/gpu/test_gemm8_sm90.py"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gemm8_sm90.py >"$OUT/pytest_gemm8.log" 2>&1
rc=$?
log "pytest rc=$rc"
tail -3 "$OUT/pytest_gemm8.log" | tee -a "$OUT/issue15.txt"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_gemm8.log" | head -20 | tee -a "$OUT/issue15.txt"

# 4. the harness rows of the table (timed even when a test failed: the numbers say how far it is)
log "harness"
timeout 200 python3 -m lowbit_engine.cli bench kernels --m 4608 16 --out "$OUT/kernels-issue15.json" --kernels \
  cublas gemm8_fp8_sm90 gemm_w4a8_f8l_r32 >"$OUT/bench.log" 2>&1 || log "harness FAILED or timed out (tail follows)"
tail -5 "$OUT/bench.log"

# 5. the table
python3 - "$OUT/kernels-issue15.json" "$OUT/issue15-summary.json" <<'EOF' 2>&1 | tee -a "$OUT/issue15.txt"
import json, statistics, sys
rep = json.load(open(sys.argv[1]))
rows = [r for r in rep["results"] if r["median_ms"]]
def med(kernel, M, key):
    v = [r[key] for r in rows if r["kernel"] == kernel and r["M"] == M and r[key] is not None]
    return statistics.median(v) if v else None
table = [
    ("plain fp8 on the skeleton, PTOP/s, M=4608", (med("gemm8_fp8_sm90", 4608, "tflops") or 0) / 1000, 1.1, 1.3),
    ("W4A8 F8L + low-rank vs cuBLAS fp8, M=4608", med("gemm_w4a8_f8l_r32_sm90", 4608, "ratio_vs_fp8"), 0.85, 1.0),
    ("the same at M=16 vs cuBLAS fp8", med("gemm_w4a8_f8l_r32_sm90", 16, "ratio_vs_fp8"), 1.4, 2.0),
    ("Triton F8L path vs cuBLAS fp8, M=4608 (what it must beat)", med("gemm_w4a8_f8l_r32", 4608, "ratio_vs_fp8"), None, None),
    ("Triton F8L path vs cuBLAS fp8, M=16", med("gemm_w4a8_f8l_r32", 16, "ratio_vs_fp8"), None, None),
]
out = {"gpu": rep.get("gpu"), "commit": rep.get("commit"), "rows": []}
for name, value, lo, hi in table:
    verdict = "" if lo is None or value is None else ("target met" if value >= hi else "minimum met" if value >= lo else "MISSED")
    print(f"{name:62s} {'n/a' if value is None else f'{value:.3f}':>8s}  min {lo}  target {hi}  {verdict}")
    out["rows"].append({"what": name, "value": value, "minimum": lo, "target": hi, "verdict": verdict})
json.dump(out, open(sys.argv[2], "w"), indent=1)
EOF

# 6. the SASS census with the device's toolchain (same as the offline one unless nvcc differs)
timeout 60 python3 bench/sass_census_gemm8.py --json "$OUT/sass-census.json" >>"$OUT/issue15.txt" 2>&1
log "done"
