"""The "Hopper speed, step 1" table from a harness report (``lowbit-engine bench kernels --out ...``).

For each token count M, the median over the FLUX.1 shapes of each row's ratio, against the minimum and
target the issue sets (the whole linear counts: quantizer + expand + GEMM + epilogue):

| row | kernel(s) | ratio | minimum | target |
|---|---|---|---|---|
| SVDQLinear W4A8, F8L / I8Q, whole linear | svdq_w4a8_{f8l,i8q}_linear_r32 | vs cuBLAS bf16 | 1.25 | 1.45 |
| the GEMM part alone (expand + 8-bit GEMM) | gemm_w4a8_{f8l,i8q}_r32 | vs cuBLAS fp8 | 0.85 | 0.95 |
| the 8-bit GEMM alone (weights already 8-bit) | gemm8_{fp8,int8}_r32 | vs cuBLAS fp8 | - | - |
| FP8Linear, whole linear | fp8_linear_dynamic | vs cuBLAS bf16 | 1.35 | 0.95 vs fp8 |
| FP4Linear nvfp4 x fp8 | nvfp4_linear_fp8 | vs cuBLAS bf16 | 1.2 | 1.4 |
| M=16: SVDQLinear W4A8 whole linear, N >= 9216 | svdq_w4a8_*_linear_r32 | vs cuBLAS bf16 | 1.5 | 2.5 |

Usage:
    python bench/summarize_step1.py REPORT.json [--out SUMMARY.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

# (label, kernel, ratio key, minimum, target, only shapes with N >= this, only this M)
ROWS: list[tuple[str, str, str, float | None, float | None, int, int | None]] = [
    ("SVDQLinear W4A8 F8L, whole linear", "svdq_w4a8_f8l_linear_r32", "ratio_vs_bf16", 1.25, 1.45, 0, None),
    ("SVDQLinear W4A8 I8Q, whole linear", "svdq_w4a8_i8q_linear_r32", "ratio_vs_bf16", 1.25, 1.45, 0, None),
    ("  F8L, CUDA quantizer", "svdq_w4a8_f8l_linear_r32_cudaquant", "ratio_vs_bf16", None, None, 0, None),
    ("  I8Q, CUDA quantizer", "svdq_w4a8_i8q_linear_r32_cudaquant", "ratio_vs_bf16", None, None, 0, None),
    ("GEMM part F8L (expand + 8-bit GEMM)", "gemm_w4a8_f8l_r32", "ratio_vs_fp8", 0.85, 0.95, 0, None),
    ("GEMM part I8Q (expand + 8-bit GEMM)", "gemm_w4a8_i8q_r32", "ratio_vs_fp8", 0.85, 0.95, 0, None),
    ("8-bit GEMM alone, fp8", "gemm8_fp8_r32", "ratio_vs_fp8", None, None, 0, None),
    ("8-bit GEMM alone, int8", "gemm8_int8_r32", "ratio_vs_fp8", None, None, 0, None),
    ("FP8Linear, whole linear", "fp8_linear_dynamic", "ratio_vs_bf16", 1.35, None, 0, None),
    ("FP8Linear vs _scaled_mm GEMM-only", "fp8_linear_dynamic", "ratio_vs_fp8", None, 0.95, 0, None),
    ("FP4Linear nvfp4 x fp8", "nvfp4_linear_fp8", "ratio_vs_bf16", 1.2, 1.4, 0, None),
    ("M=16 SVDQLinear F8L, N >= 9216", "svdq_w4a8_f8l_linear_r32", "ratio_vs_bf16", 1.5, 2.5, 9216, 16),
    ("M=16 SVDQLinear I8Q, N >= 9216", "svdq_w4a8_i8q_linear_r32", "ratio_vs_bf16", 1.5, 2.5, 9216, 16),
    # step 3 (issue 16): fc1 writing fc2's 8-bit input, against its unfused chain (informational)
    ("fc1 exit-fused F8L (GEMM + GELU + quantize)", "exit_f8l_gelu_r32", "ratio_vs_bf16", None, None, 0, None),
    ("  unfused chain F8L", "exit_f8l_gelu_r32_unfused", "ratio_vs_bf16", None, None, 0, None),
    ("fc1 exit-fused I8Q (GEMM + GELU + quantize)", "exit_i8q_gelu_r32", "ratio_vs_bf16", None, None, 0, None),
    ("  unfused chain I8Q", "exit_i8q_gelu_r32_unfused", "ratio_vs_bf16", None, None, 0, None),
]


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The table's rows per M: median ratio over the shapes, the shape count, and whether min/target are met."""
    results = [r for r in report["results"] if r.get("median_ms")]
    ms = sorted({r["M"] for r in results}, reverse=True)
    rows = []
    for M in ms:
        for label, kernel, key, minimum, target, min_n, only_m in ROWS:
            if only_m is not None and M != only_m:
                continue
            vals = [r[key] for r in results if r["kernel"] == kernel and r["M"] == M and r["N"] >= min_n
                    and r.get(key) is not None]
            if not vals:
                continue
            med = statistics.median(vals)
            rows.append({"M": M, "row": label, "kernel": kernel, "ratio": key, "median": round(med, 3),
                         "shapes": len(vals), "min": round(min(vals), 3), "max": round(max(vals), 3),
                         "minimum": minimum, "target": target,
                         "meets_minimum": None if minimum is None else med >= minimum,
                         "meets_target": None if target is None else med >= target})
    return {"gpu": report.get("gpu"), "commit": report.get("commit"), "rows": rows}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"# {summary['gpu']}  commit {summary['commit']}",
             "| M | row | median | range | minimum | target |", "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        mark = lambda ok: "" if ok is None else (" ok" if ok else " MISSED")  # noqa: E731
        lines.append(f"| {r['M']} | {r['row']} ({r['ratio'].replace('ratio_', '')}) | {r['median']:.2f} | "
                     f"{r['min']:.2f}-{r['max']:.2f} ({r['shapes']}) | {r['minimum'] or '-'}{mark(r['meets_minimum'])} | "
                     f"{r['target'] or '-'}{mark(r['meets_target'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    summary = summarize(json.loads(Path(args.report).read_text()))
    print(format_summary(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
