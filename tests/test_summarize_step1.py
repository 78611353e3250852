"""bench/summarize_step1.py: the issue table from a harness report (a synthetic one here)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from summarize_step1 import format_summary, summarize  # noqa: E402

from lowbit_engine.benchmark import FLUX_KN  # noqa: E402


def _report(ratio_of) -> dict:
    results = []
    for M in (4608, 16):
        for K, N in FLUX_KN:
            for kernel in ("svdq_w4a8_i8q_linear_r32", "gemm_w4a8_i8q_r32", "nvfp4_linear_fp8"):
                r_bf16, r_fp8 = ratio_of(kernel, M, N)
                results.append({"kernel": kernel, "M": M, "K": K, "N": N, "median_ms": 1.0,
                                "ratio_vs_bf16": r_bf16, "ratio_vs_fp8": r_fp8})
    results.append({"kernel": "fp8_linear_dynamic", "M": 4608, "K": 3072, "N": 3072, "median_ms": None,
                    "ratio_vs_bf16": None, "ratio_vs_fp8": None})  # a row that was not timed is left out
    return {"gpu": "NVIDIA H200", "commit": "abc", "results": results}


def test_medians_thresholds_and_the_small_m_row():
    rep = _report(lambda kernel, M, N: (1.0 + N / 21504, 0.9) if kernel.startswith("svdq") else (1.1, 0.8))
    s = summarize(rep)
    rows = {(r["M"], r["row"]): r for r in s["rows"]}
    whole = rows[(4608, "SVDQLinear W4A8 I8Q, whole linear")]
    # N over the six shapes: 9216, 3072, 12288, 3072, 21504, 3072 -> ratios 1 + N / 21504; median of six
    assert whole["shapes"] == 6 and abs(whole["median"] - (1 + (3072 + 9216) / 2 / 21504)) < 1e-3
    assert whole["meets_minimum"] is True and whole["meets_target"] is False  # 1.29: over 1.25, under 1.45
    small = rows[(16, "M=16 SVDQLinear I8Q, N >= 9216")]
    assert small["shapes"] == 3  # only the N >= 9216 shapes
    gemm = rows[(4608, "GEMM part I8Q (expand + 8-bit GEMM)")]
    assert gemm["median"] == 0.8 and gemm["meets_minimum"] is False
    assert not any(r["kernel"] == "fp8_linear_dynamic" for r in s["rows"])
    text = format_summary(s)
    assert "MISSED" in text and "NVIDIA H200" in text
