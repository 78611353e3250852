"""The w4a16 GEMV (kernels/w4a16_gemv.py) against cuBLAS bf16 on FLUX.1's adaLN shapes, on a GPU.

Shapes: 3072 -> 18432 (the double blocks' norm1 / norm1_context) and 3072 -> 9216 (the single blocks'
norm), M = 1, 2, 4, 16 tokens (batch of images). Per shape: cuBLAS bf16 (``x @ w.T``), the op
``lowbit::w4a16_linear`` with its default configuration, and a sweep of tile configurations and K splits
(the best one is reported next to the default, so a better default can be picked from the JSON). Weights
rotate over enough copies that the working set exceeds the L2 several times (a GEMV served from L2 would
flatter). Reported: median microseconds, achieved GB/s of the weight bytes, and the ratio to bf16
(issue 18's target: at least 2.5x at M = 1 and 2 on 3072 -> 18432).

Usage (on a GPU; the CPU has nothing to measure):
    python bench/w4a16_gemv.py [--out $OUT/w4a16-gemv.json] [--repeat 50] [--no-sweep]
    bash bench/issue18_gpu.sh           # this, the w4a16 GPU tests and the quantization timings, one call
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch

L2_BYTES = 60 * 2**20  # H100 50 MiB, H200 60 MiB: rotate past it
SHAPES = [(3072, 18432), (3072, 9216)]
MS = [1, 2, 4, 16]


def _time(fn, n_sets: int, repeat: int) -> float:
    """Median microseconds of ``fn(i)`` over CUDA events, cycling the input sets."""
    for i in range(n_sets):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for r in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(r % n_sets)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/w4a16-gemv.json")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/w4a16_gemv.py needs a CUDA GPU")
    from lowbit_engine import benchmark, ops, ops_w4a16
    from lowbit_engine.formats import w4a16
    from lowbit_engine.kernels import w4a16_gemv

    dev = torch.device("cuda")
    rows = []
    for K, N in SHAPES:
        w_bf16_bytes = 2 * N * K
        n_sets = max(2, -(-3 * L2_BYTES // w_bf16_bytes))
        g = torch.Generator(device=dev).manual_seed(0)
        ws = [torch.randn(N, K, generator=g, device=dev).to(torch.bfloat16) * 0.02 for _ in range(n_sets)]
        qs = []
        for w in ws:
            q, s, z = w4a16.quantize(w)
            qs.append((w4a16.pack(q), s, z))
        q_bytes = qs[0][0].numel() + 2 * qs[0][1].numel() + qs[0][2].numel()
        for M in MS:
            x = torch.randn(M, K, generator=g, device=dev).to(torch.bfloat16)
            bf_us = _time(lambda i: x @ ws[i].t(), n_sets, args.repeat)
            ref = x.double() @ w4a16.dequantize(*qs[0]).double().t()
            out = ops_w4a16.w4a16_linear(x, *qs[0], None, torch.float32)
            rel = float((out.double() - ref).norm() / ref.norm())
            backend = ops.last_backend("w4a16_linear")
            us = _time(lambda i: ops_w4a16.w4a16_linear(x, *qs[i]), n_sets, args.repeat)
            row = {"M": M, "K": K, "N": N, "cublas_bf16_us": round(bf_us, 2), "w4a16_us": round(us, 2),
                   "backend": backend, "rel_err_fp32_out": rel, "ratio_vs_bf16": round(bf_us / us, 3),
                   "bf16_gbps": round(w_bf16_bytes / bf_us / 1e3, 1), "w4a16_gbps": round(q_bytes / us / 1e3, 1),
                   "default_cfg": w4a16_gemv.config(M, N, K)}
            if not args.no_sweep and M <= 2:  # 16 configurations, compiled once each: about a minute
                best = None
                for bn, bk, st, warps, mult in itertools.product((64, 128), (128, 256), (3, 4), (4,), (1, 2)):
                    if K % bk:
                        continue
                    cfg = {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": st}
                    base = w4a16_gemv.split_k_for(-(-N // bn), K, bk)
                    sp = max(1, int(base * mult))
                    if K % sp or (K // sp) % bk:
                        continue
                    try:
                        t = _time(lambda i: w4a16_gemv.w4a16_triton(x, *qs[i], splits=sp, cfg=cfg), n_sets,
                                  max(10, args.repeat // 3))
                    except Exception as e:  # noqa: BLE001  (out of shared memory etc.: skip the config)
                        print(f"  cfg {cfg} splits {sp}: {type(e).__name__}")
                        continue
                    if best is None or t < best[0]:
                        best = (t, dict(cfg, splits=sp))
                if best:
                    row.update(best_us=round(best[0], 2), best_cfg=best[1], best_ratio_vs_bf16=round(bf_us / best[0], 3))
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"what": "w4a16 GEMV vs cuBLAS bf16 on FLUX adaLN shapes", "gpu": torch.cuda.get_device_name(),
              "commit": benchmark._commit(), "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
