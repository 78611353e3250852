"""bench/feasibility_w4_linear.py: the GEMM rate a linear-ratio goal demands, checked on hand-made numbers.

The script is not a package module, so it is imported from its path.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "feasibility_w4_linear.py"


def _load():
    spec = importlib.util.spec_from_file_location("feasibility_w4_linear", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(M: int, K: int, N: int, bf16_ms: float, fp8_ms: float) -> dict:
    rows = [("cublas_bf16", bf16_ms), ("cublas_fp8_scaled_mm", fp8_ms), ("gemm_w4a4_r32", 2 * bf16_ms)]
    return {"gpu": "test", "commit": "0", "copy_gbps": 1000.0,
            "results": [{"kernel": k, "M": M, "K": K, "N": N, "median_ms": t} for k, t in rows]}


def test_needed_rate_matches_hand_arithmetic() -> None:
    mod = _load()
    M, K, N = 4096, 2048, 8192
    rows = mod.analyse(_results(M, K, N, bf16_ms=1.0, fp8_ms=0.5), quant_fraction=0.5)
    w4a4 = next(r for r in rows if r["format"] == "w4a4")
    q_bytes = 2 * M * K + M * K / 2 + 4 * M * K / 64 + 4 * M * 32
    t_q = q_bytes / (0.5 * 1000e9)
    flops = 2.0 * M * N * K
    assert w4a4["quantizer_us_at_goal"] == pytest.approx(t_q * 1e6)
    assert w4a4["minimum_gemm_tflops_needed"] == pytest.approx(flops / (1e-3 / 1.3 - t_q) / 1e12)
    assert w4a4["target_needed_vs_cublas_fp8"] == pytest.approx(
        flops / (1e-3 / 1.6 - t_q) / 1e12 / (flops / 0.5e-3 / 1e12))
    assert w4a4["ratio_if_gemm_at_cublas_fp8"] == pytest.approx(1e-3 / (t_q + 0.5e-3))
    assert w4a4["gemm_tflops_measured"] == pytest.approx(flops / 2e-3 / 1e12)
    w4a8 = next(r for r in rows if r["format"] == "w4a8")
    assert w4a8["quantizer_us_at_goal"] > w4a4["quantizer_us_at_goal"]  # 8-bit q is written
    assert w4a8["gemm_tflops_measured"] is None  # no fp8 GEMM row in the input


def test_budget_spent_by_the_quantizer_is_infinite_rate() -> None:
    mod = _load()
    rows = mod.analyse(_results(4608, 15360, 64, bf16_ms=0.001, fp8_ms=0.001), quant_fraction=0.6)
    assert all(math.isinf(r["minimum_gemm_tflops_needed"]) for r in rows)


def test_committed_h100_bound_is_reproducible() -> None:
    committed = ROOT / "bench" / "results" / "feasibility-w4-linear-h100-2026-11-23.json"
    data = json.loads(committed.read_text())
    mod = _load()
    source = json.loads((ROOT / data["source"]).read_text())
    again = mod.analyse(source, data["quant_fraction"])
    assert len(again) == len(data["rows"]) == 12
    for a, b in zip(again, data["rows"]):
        assert a["minimum_gemm_tflops_needed"] == pytest.approx(b["minimum_gemm_tflops_needed"])
