"""What GEMM rate the issue-4 linear targets demand, from the cuBLAS rates measured in the same run.

Why: the SVDQuant linear is two kernels (activation quantizer, then the W4 GEMM), and its ratio to cuBLAS
bf16 is ``t_bf16 / (t_quant + t_gemm)``. Given a ratio to reach and the quantizer at its own target
(a fraction of the measured copy bandwidth), the GEMM has a time budget, hence a minimum rate. Comparing
that rate with cuBLAS fp8 (``torch._scaled_mm``, a plain fp8 GEMM with no int4 conversion and no
per-group promotion) on the same shape says how hard the target is on this GPU: every W4 GEMM on Hopper
runs on the same 8-bit tensor cores and does strictly more work per MAC than that one.

Nothing is run on a GPU here: the script reads a committed harness JSON (bench/results/kernels-*.json).

Usage:
    python bench/feasibility_w4_linear.py bench/results/kernels-wgmma-h100-2026-11-23.json \
        [--quant-fraction 0.6] [--out bench/results/feasibility-w4-linear-h100-2026-11-23.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RANK = 32
# (format, minimum ratio vs cuBLAS bf16, target ratio): the issue-4 table.
GOALS = {"w4a4": (1.3, 1.6), "w4a8": (1.4, 1.7)}


def quantizer_bytes(fmt: str, M: int, K: int) -> float:
    """Bytes the activation quantizer must move: x (bf16) read; q, scales and lora_act (fp32) written.

    The lora_down read (R x K bf16, L2-resident) is left out: the bound is for DRAM traffic.
    """
    x = 2.0 * M * K
    lora = 4.0 * M * RANK
    if fmt == "w4a4":
        return x + M * K / 2 + 4.0 * M * K / 64 + lora
    return x + M * K + 4.0 * M + lora


def analyse(results: dict, quant_fraction: float) -> list[dict]:
    rows: dict[tuple[int, int, int], dict[str, float]] = {}
    for r in results["results"]:
        rows.setdefault((r["M"], r["K"], r["N"]), {})[r["kernel"]] = r["median_ms"]
    copy_bps = results["copy_gbps"] * 1e9
    out = []
    for (M, K, N), t in rows.items():
        if "cublas_bf16" not in t or "cublas_fp8_scaled_mm" not in t:
            continue
        flops = 2.0 * M * N * K
        t_bf16, t_fp8 = t["cublas_bf16"] * 1e-3, t["cublas_fp8_scaled_mm"] * 1e-3
        fp8_rate = flops / t_fp8 / 1e12
        for fmt, (lo, hi) in GOALS.items():
            t_q_goal = quantizer_bytes(fmt, M, K) / (quant_fraction * copy_bps)
            measured_q = t.get("quantize_act_int4_r32" if fmt == "w4a4" else "quantize_act_int8_r32")
            measured_gemm = t.get("gemm_w4a4_r32" if fmt == "w4a4" else "gemm_w4a8fp8_r32")
            row = {
                "M": M, "K": K, "N": N, "format": fmt,
                "cublas_bf16_tflops": flops / t_bf16 / 1e12,
                "cublas_fp8_tflops": fp8_rate,
                "quantizer_us_at_goal": t_q_goal * 1e6,
                "quantizer_us_measured": measured_q * 1e3 if measured_q else None,
                "gemm_tflops_measured": flops / (measured_gemm * 1e-3) / 1e12 if measured_gemm else None,
            }
            for name, ratio in (("minimum", lo), ("target", hi)):
                budget = t_bf16 / ratio - t_q_goal
                need = flops / budget / 1e12 if budget > 0 else float("inf")
                row[f"{name}_ratio"] = ratio
                row[f"{name}_gemm_tflops_needed"] = need
                row[f"{name}_needed_vs_cublas_fp8"] = need / fp8_rate
            # The most the linear can reach if the GEMM ran exactly at cuBLAS fp8 speed.
            row["ratio_if_gemm_at_cublas_fp8"] = t_bf16 / (t_q_goal + t_fp8)
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a harness JSON with cuBLAS bf16 and fp8 rows")
    ap.add_argument("--quant-fraction", type=float, default=0.6,
                    help="quantizer bandwidth as a fraction of the measured copy bandwidth (issue target 0.6)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    data = json.loads(args.results.read_text())
    rows = analyse(data, args.quant_fraction)
    print(f"{data['gpu']}, commit {data['commit']}, copy {data['copy_gbps']:.0f} GB/s, "
          f"quantizer at {args.quant_fraction:.0%} of it")
    print("| K x N | fmt | bf16 | fp8 | quant us | GEMM needed for min (x fp8) | for target (x fp8) "
          "| linear if GEMM = cuBLAS fp8 | GEMM now |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        now = f"{r['gemm_tflops_measured']:.0f}" if r["gemm_tflops_measured"] else "-"
        print(f"| {r['K']}x{r['N']} | {r['format']} | {r['cublas_bf16_tflops']:.0f} | {r['cublas_fp8_tflops']:.0f} "
              f"| {r['quantizer_us_at_goal']:.1f} "
              f"| {r['minimum_gemm_tflops_needed']:.0f} ({r['minimum_needed_vs_cublas_fp8']:.2f}) "
              f"| {r['target_gemm_tflops_needed']:.0f} ({r['target_needed_vs_cublas_fp8']:.2f}) "
              f"| {r['ratio_if_gemm_at_cublas_fp8']:.2f}x | {now} |")
    summary = {}
    for fmt, (lo, _) in GOALS.items():
        best = sorted(r["ratio_if_gemm_at_cublas_fp8"] for r in rows if r["format"] == fmt)
        med = statistics.median(best) if best else float("nan")
        summary[fmt] = {"median_ratio_if_gemm_at_cublas_fp8": med, "minimum": lo}
        print(f"{fmt}: median over the shapes of the linear's ratio with the GEMM at cuBLAS fp8 speed: "
              f"{med:.2f}x (minimum {lo}x)")
    if args.out:
        args.out.write_text(json.dumps({
            "source": str(args.results), "gpu": data["gpu"], "commit": data["commit"],
            "copy_gbps": data["copy_gbps"], "quant_fraction": args.quant_fraction, "rank": RANK,
            "summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
