"""How long quantizing takes at FLUX.1-dev size: one double block, one single block, one vq3 layer.

FLUX.1-dev (hidden 3072) has 19 double blocks and 38 single blocks. Their linears, as ``engine.load``
quantizes them (QKV fused, policy ``flux``):

- double block: ``attn.to_qkv`` and ``attn.to_added_qkv`` 3072 -> 9216, ``attn.to_out.0`` and
  ``attn.to_add_out`` 3072 -> 3072, ``ff`` / ``ff_context`` 3072 -> 12288 -> 3072 (8 SVDQuant layers), and
  ``norm1.linear`` / ``norm1_context.linear`` 3072 -> 18432 (w4a16);
- single block: ``attn.to_qkv`` 3072 -> 9216, ``proj_mlp`` 3072 -> 12288, ``proj_out`` 15360 -> 3072
  (SVDQuant) and ``norm.linear`` 3072 -> 9216 (w4a16).

Each layer gets random weights and 256 random calibration tokens (the alpha search costs the same for any
values) and is quantized with ``quantize_linear`` on ``--device``; the script prints per-layer seconds,
the block totals and the whole-model estimate ``19 * double + 38 * single`` (+ norm_out), and writes JSON.
``--vq3`` also times the k-means of one 3072 x 3072 vq3 layer (``formats.vq.quantize``, 10 Lloyd steps).
Timings on a shared CPU are noisy: the JSON records the load average and, per layer, the process CPU
time (on an otherwise idle 2-core machine the wall time is about half of it when both cores work).

Usage:
    python bench/quant_time.py [--device cpu|cuda] [--only single|double] [--vq3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import lowbit_engine
from lowbit_engine import benchmark

DOUBLE = [("attn.to_qkv", 3072, 9216, "svdq"), ("attn.to_added_qkv", 3072, 9216, "svdq"),
          ("attn.to_out.0", 3072, 3072, "svdq"), ("attn.to_add_out", 3072, 3072, "svdq"),
          ("ff.net.0.proj", 3072, 12288, "svdq"), ("ff.net.2", 12288, 3072, "svdq"),
          ("ff_context.net.0.proj", 3072, 12288, "svdq"), ("ff_context.net.2", 12288, 3072, "svdq"),
          ("norm1.linear", 3072, 18432, "w4a16"), ("norm1_context.linear", 3072, 18432, "w4a16")]
SINGLE = [("attn.to_qkv", 3072, 9216, "svdq"), ("proj_mlp", 3072, 12288, "svdq"),
          ("proj_out", 15360, 3072, "svdq"), ("norm.linear", 3072, 9216, "w4a16")]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_block(layers, fmt: str, device: str, tokens: int = 256) -> list[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for name, K, N, kind in layers:
        lin = torch.nn.Linear(K, N, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(N, K, generator=g, device=device) * 0.02)
        calib = torch.randn(tokens, K, generator=g, device=device).to(torch.bfloat16)
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        if kind == "w4a16":
            lowbit_engine.quantize_linear(lin, "w4a16")
        else:
            lowbit_engine.quantize_linear(lin, fmt, calib=calib, rank=32)
        _sync(device)
        rows.append({"layer": name, "K": K, "N": N, "format": "w4a16" if kind == "w4a16" else fmt,
                     "seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 2)})
        print(f"  {name:<24} {K:>5} -> {N:<5} {rows[-1]['format']:<10} {rows[-1]['seconds']:7.2f} s "
              f"(process CPU {rows[-1]['cpu_seconds']:.1f} s)", flush=True)
        del lin, calib
    return rows


def time_vq3(device: str) -> dict:
    from lowbit_engine.formats import vq

    w = torch.randn(3072, 3072, generator=torch.Generator(device=device).manual_seed(0), device=device) * 0.02
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    codes, cb, _ = vq.quantize(w, 4096, 4, iters=10, seed=0)
    _sync(device)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    rel = float((vq.dequantize(codes, cb, 3072, 3072, 12) - w).norm() / w.norm())
    print(f"  vq3 k-means 3072 x 3072: {secs:.1f} s (process CPU {cpu:.1f} s), relative weight error {rel:.4f}",
          flush=True)
    return {"seconds": round(secs, 1), "cpu_seconds": round(cpu, 1), "rel_weight_error": round(rel, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fmt", default="svdq-w4a8")
    ap.add_argument("--only", choices=["single", "double"], default=None)
    ap.add_argument("--vq3", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    report = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "threads": torch.get_num_threads(), "loadavg_before": os.getloadavg(), "fmt": args.fmt,
              "commit": benchmark._commit()}
    if args.vq3:  # first: the number with a target (60 s on 2 CPU cores)
        report["vq3_kmeans_3072"] = time_vq3(args.device)
    blocks = {}
    for kind, layers in (("double", DOUBLE), ("single", SINGLE)):
        if args.only and args.only != kind:
            continue
        print(f"{kind} block ({args.device}):", flush=True)
        rows = time_block(layers, args.fmt, args.device)
        blocks[kind] = {"layers": rows, "seconds": round(sum(r["seconds"] for r in rows), 1),
                        "cpu_seconds": round(sum(r["cpu_seconds"] for r in rows), 1)}
        print(f"  total {blocks[kind]['seconds']} s", flush=True)
    report["blocks"] = blocks
    if "double" in blocks and "single" in blocks:
        report["flux_dev_estimate_seconds"] = round(19 * blocks["double"]["seconds"] + 38 * blocks["single"]["seconds"], 0)
        print(f"FLUX.1-dev estimate (19 double + 38 single): {report['flux_dev_estimate_seconds'] / 60:.1f} min")
    report["loadavg_after"] = os.getloadavg()
    out = args.out or f"bench/results/quant-time-{'gpu' if args.device.startswith('cuda') else 'cpu'}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
