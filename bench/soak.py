"""Soak: many forward passes of a quantized tiny FLUX with LoRA swaps in between, watching for growth.

What is measured
    ``--passes`` forward passes (default 1000) of a tiny FLUX.1 transformer quantized by ``engine.load``
    (svdq-int4, calibrated), with a LoRA loaded and, every ``--swap-every`` passes, swapped for another one
    (alternating two in-memory adapters, with a strength change in between). Every ``--sample-every``
    passes it records:

    - memory: on the CPU, Python's traced allocations (``tracemalloc``, current bytes) and the process RSS;
      on CUDA, ``torch.cuda.memory_allocated``;
    - the size of the backend record's tables (:mod:`lowbit_engine._dispatch`: the ``last`` map, the
      ``(op, backend)`` call counter's keys, open scopes, warned reasons, forced backends) and of the LoRA
      state (adapters, cached sources).

Pass criterion (``ok`` in the JSON; exit status 1 otherwise)
    After a warm-up (the first 10% of passes: the first swaps fill the LoRA cache, the allocator settles),
    the tables must not change size at all, and memory may not grow by more than a small allowance
    (``LIMITS``) between the median of the first post-warm-up samples and the median of the last ones.
    A leak of one tensor per pass (10 KiB) or one record entry per call fails it. Measured on the CPU
    (2026-12-03, bench/results/soak-cpu-2026-12-03.json): tables constant, RSS +12 KiB, traced Python
    memory +29 KiB over the 900 post-warm-up passes (about 32 bytes per pass, spread over torch, diffusers
    and regex caches with no single growing site in a tracemalloc diff; under the 64 KiB allowance, and
    the number to watch if it climbs in a longer run).

    python bench/soak.py                          # CPU, 1000 passes -> bench/results/soak-cpu-<date>.json
    python bench/soak.py --device cuda --out $OUT/soak-cuda.json
    python bench/soak.py --passes 50 --no-trace   # the quick variant tests/test_soak.py runs
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Allowed growth after warm-up, per metric (bytes). RSS moves with the allocator's arenas, so it gets room;
# traced Python memory and CUDA tensors are exact enough for tight limits.
LIMITS = {"traced_bytes": 64 << 10, "rss_bytes": 32 << 20, "cuda_allocated_bytes": 1 << 20}
BF16 = torch.bfloat16


def _tiny_flux(device: str, calibrate: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A quantized tiny FLUX transformer (svdq-int4, calibrated on one batch unless ``calibrate`` is False:
    the quick test skips the alpha search) and one batch of inputs."""
    import diffusers

    import lowbit_engine as engine

    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64,
        axes_dims_rope=[4, 14, 14]).to(BF16).eval().to(device)
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(BF16).to(device)

    # 16 image + 8 text tokens: the soak is about growth, not speed, and the CPU runs it 1000 times.
    inputs = dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 8, 64), pooled_projections=r(1, 64),
                  timestep=torch.rand(1, generator=g).to(device), img_ids=torch.zeros(16, 3, device=device),
                  txt_ids=torch.zeros(8, 3, device=device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NoCalibrationWarning when calibrate is False
        engine.load(model, "svdq-int4", rank=16, calib=[inputs] if calibrate else None, progress=False,
                    quant_opts={"alphas": (0.5,), "refine_iters": 0})
    return model, inputs


def _lora_state_dict(seed: int, device: str) -> dict[str, torch.Tensor]:
    """A rank-4 diffusers-named LoRA on the attention output and the MLPs of the tiny model."""
    g = torch.Generator().manual_seed(seed)
    targets = {"transformer_blocks.0.attn.to_out.0": (64, 64), "transformer_blocks.0.ff.net.2": (256, 64),
               "single_transformer_blocks.0.proj_mlp": (64, 256)}
    sd = {}
    for name, (k, n) in targets.items():
        sd[f"transformer.{name}.lora_A.weight"] = (torch.randn(4, k, generator=g) * 0.1).to(BF16).to(device)
        sd[f"transformer.{name}.lora_B.weight"] = (torch.randn(n, 4, generator=g) * 0.1).to(BF16).to(device)
    return sd


def table_sizes(model: nn.Module) -> dict[str, int]:
    """Sizes of the tables that a leak per call would grow: the backend record and the LoRA state."""
    from lowbit_engine import _dispatch
    from lowbit_engine.lora.apply import state_of

    rec = _dispatch._RECORD
    st = state_of(model)
    return {"record.last": len(rec.last), "record.calls": len(rec.calls), "record.scopes": len(rec.scopes),
            "warned": len(_dispatch._WARNED), "forced": len(_dispatch._FORCED),
            "lora.adapters": len(st.adapters), "lora.cache": len(st.cache)}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: no RSS sample
        return 0


def memory_sample(device: str, trace: bool) -> dict[str, int]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return {"cuda_allocated_bytes": int(torch.cuda.memory_allocated())}
    out = {"rss_bytes": _rss_bytes()}
    if trace:
        # Leave out what the soak itself allocates (its growing list of samples, ~1 KiB each) and
        # tracemalloc's own bookkeeping: only the engine's, torch's and diffusers' allocations count.
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, __file__), tracemalloc.Filter(False, tracemalloc.__file__)])
        out["traced_bytes"] = sum(stat.size for stat in snap.statistics("filename"))
    return out


def growth_failures(samples: list[dict[str, Any]], warmup: int) -> list[str]:
    """What grew after the first ``warmup`` passes: table sizes (any change) and memory (over ``LIMITS``).

    Example:
        >>> s = [{"pass": i, "tables": {"t": 1}, "memory": {"rss_bytes": 0}} for i in range(10)]
        >>> growth_failures(s, 2)
        []
        >>> s[-1]["tables"]["t"] = 2
        >>> growth_failures(s, 2)
        ['table t: 1 -> 2']
    """
    after = [s for s in samples if s["pass"] >= warmup]
    if len(after) < 2:
        return [f"too few samples after the warm-up ({len(after)}): run more passes or sample more often"]
    failures = []
    first = after[0]["tables"]
    for s in after[1:]:
        for name, size in s["tables"].items():
            if size != first.get(name):
                failures.append(f"table {name}: {first.get(name)} -> {size}")
        if failures:
            break
    n = max(1, len(after) // 5)  # medians of the first and last fifth: robust to a stray sample
    for metric, limit in LIMITS.items():
        if metric not in after[0]["memory"]:
            continue
        start = statistics.median(s["memory"][metric] for s in after[:n])
        end = statistics.median(s["memory"][metric] for s in after[-n:])
        if end - start > limit:
            failures.append(f"{metric}: {start} -> {end} bytes (+{end - start}, allowed +{limit})")
    return failures


def run_soak(passes: int = 1000, swap_every: int = 10, sample_every: int = 10, device: str = "cpu",
             trace: bool = True, calibrate: bool = True) -> dict[str, Any]:
    """Run the soak; returns the JSON record (``ok``, ``failures``, the samples, timings)."""
    from lowbit_engine import lora

    model, inputs = _tiny_flux(device, calibrate)
    adapters = [_lora_state_dict(10, device), _lora_state_dict(11, device)]
    lora.load(model, adapters[0], "style", strength=0.8)
    if trace and not device.startswith("cuda"):
        tracemalloc.start()
    samples: list[dict[str, Any]] = []
    start = time.perf_counter()
    swaps = 0
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(passes):
                if i and i % swap_every == 0:
                    swaps += 1
                    lora.swap(model, "style", adapters[swaps % 2])
                    lora.set_strength(model, "style", 0.5 + 0.1 * (swaps % 3))
                y = model(**inputs, return_dict=False)[0]
                if not bool(y.isfinite().all()):
                    raise RuntimeError(f"pass {i}: non-finite output")
                del y
                if i % sample_every == 0 or i == passes - 1:
                    samples.append({"pass": i, "memory": memory_sample(device, trace),
                                    "tables": table_sizes(model)})
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
    seconds = time.perf_counter() - start
    warmup = max(swap_every * 2 + 1, passes // 10)
    failures = growth_failures(samples, warmup)
    from lowbit_engine.benchmark import _commit

    return {"bench": "soak", "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "commit": _commit(), "date": dt.date.today().isoformat(), "passes": passes, "swaps": swaps,
            "swap_every": swap_every, "warmup_passes": warmup, "limits": LIMITS, "traced": trace,
            "seconds": round(seconds, 2), "ms_per_pass": round(1000 * seconds / passes, 2),
            "ok": not failures, "failures": failures, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passes", type=int, default=1000)
    ap.add_argument("--swap-every", type=int, default=10)
    ap.add_argument("--sample-every", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-trace", action="store_true", help="no tracemalloc (faster; RSS only on the CPU)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    result = run_soak(args.passes, args.swap_every, args.sample_every, args.device, trace=not args.no_trace)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    out = args.out or RESULTS_DIR / f"soak-{kind}-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    first, last = result["samples"][0]["memory"], result["samples"][-1]["memory"]
    print(f"soak {kind}: {result['passes']} passes, {result['swaps']} swaps, {result['ms_per_pass']} ms/pass; "
          f"memory {first} -> {last}; tables {result['samples'][-1]['tables']}")
    print("ok" if result["ok"] else "GROWTH: " + "; ".join(result["failures"]), f"({out})")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
