"""LoRA load / swap / per-step cost on a FLUX.1-dev-shaped quantized transformer (engine.lora).

What is measured
    (a) ``lora.load`` of a rank-32 LoRA from a safetensors file on disk over all FLUX.1-dev attention and
        MLP layers (19 double + 38 single blocks, 3072 hidden): first load (reads, parses, maps, allocates
        the slot capacity on every layer, writes) and a load into existing capacity (another file, cold);
    (b) ``lora.swap`` to another LoRA: from disk (cold cache) and back to a cached one (the switch a UI
        makes), median of ``--repeat``;
    (c) ``--device cuda`` only: one transformer forward (1024x1024: 4096 image + 512 text tokens) with no
        LoRA capacity and with rank 32, 64, 128 loaded: the per-step overhead of the wider low-rank branch.

How
    Quantizing 12B parameters would take an hour, so the quantized structure is built directly: the
    transformer on the ``meta`` device, Q/K/V fused as ``engine.load`` does, every layer the FLUX policy
    quantizes replaced by ``SVDQLinear.from_config`` (rank 32), then storage on the device (``to_empty``;
    random values on a GPU, where (c) runs forwards). The LoRA files are synthetic with the real shapes, in
    diffusers naming on the unfused model (to_q / to_k / to_v land on the fused to_qkv), written to a
    temporary directory. Targets (the issue): load < 2 s, swap < 100 ms.

    python bench/lora_swap.py                       # CPU: (a) and (b)
    python bench/lora_swap.py --device cuda         # + (c)
    python bench/lora_swap.py --double 4 --single 8 # a smaller model where memory is short
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lowbit_engine
from lowbit_engine import lora
from lowbit_engine.benchmark import _commit
from lowbit_engine.integrations.diffusers import fuse_qkv
from lowbit_engine.integrations.policies import FLUX, QUANTIZE
from lowbit_engine.nn import SVDQLinear

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FLUX_DEV: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56))
BASE_RANK = 32
TARGETS_MS = {"load": 2000.0, "swap": 100.0}
# the layers a typical FLUX LoRA trains (diffusers names of the unfused model)
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2", "proj_mlp", "proj_out")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_quantized(config: dict[str, Any], device: str) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    """The quantized FLUX structure with random buffers, and the logical LoRA targets' ``(K, N)``."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FluxTransformer2DModel(**config).to(torch.bfloat16)
    # the LoRA targets are named on the unfused model; record their shapes before fusion removes them
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n.startswith(("transformer_blocks.", "single_transformer_blocks."))
              and n.split(".", 2)[2] in LORA_TARGETS}
    fused, note, _ = fuse_qkv(model)
    if not fused:
        raise RuntimeError(f"QKV fusion failed on the meta model: {note}")
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and FLUX.decide(name, mod.in_features).action == QUANTIZE:
            q = SVDQLinear(mod.in_features, mod.out_features, rank=BASE_RANK, bias=mod.bias is not None,
                           device="meta")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    if device.startswith("cuda"):  # forwards run in (c): give every tensor sane random values
        _init_random_(model)
    return model, shapes


@torch.no_grad()
def _init_random_(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, SVDQLinear):
            mod.qweight.random_(0, 256)
            mod.wscales.fill_(0.02 / math.sqrt(mod.in_features / 64))
            mod.smooth.fill_(1.0)
            mod.lora_down.normal_(0, 1 / math.sqrt(mod.in_features))
            mod.lora_up.normal_(0, 0.02)
            if mod.bias is not None:
                mod.bias.zero_()
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)


def write_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int, path: Path) -> int:
    """A synthetic diffusers-format LoRA of ``rank`` on every target; returns its size in bytes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (k, n) in shapes.items():
        sd[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, k, generator=g) / math.sqrt(k)).to(torch.bfloat16)
        sd[f"transformer.{name}.lora_B.weight"] = (torch.randn(n, rank, generator=g) * 0.01).to(torch.bfloat16)
    save_file(sd, str(path))
    return path.stat().st_size


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t) * 1e3


def bench_load_swap(model: nn.Module, files: list[Path], device: str, repeat: int) -> dict[str, Any]:
    a, b, c = files
    out: dict[str, Any] = {}
    out["load_first_ms"] = timed(lambda: lora.load(model, str(a), "style"), device)
    out["capacity"] = lora.capacity(model)
    lora.unload(model, "style")
    out["load_into_capacity_ms"] = timed(lambda: lora.load(model, str(b), "style"), device)
    out["swap_from_disk_ms"] = timed(lambda: lora.swap(model, "style", str(c)), device)
    cached = []
    for i in range(repeat):  # a, b and c are all cached now: a switch between known adapters
        cached.append(timed(lambda: lora.swap(model, "style", str((a, b)[i % 2])), device))
    out["swap_cached_ms"] = statistics.median(cached)
    out["swap_cached_ms_all"] = cached
    out["set_strength_ms"] = timed(lambda: lora.set_strength(model, "style", 0.5), device)
    out["unload_ms"] = timed(lambda: lora.unload(model, "style"), device)
    out["meets_targets"] = {"load < 2 s": out["load_first_ms"] < TARGETS_MS["load"],
                            "swap < 100 ms (cached)": out["swap_cached_ms"] < TARGETS_MS["swap"],
                            "swap < 100 ms (from disk)": out["swap_from_disk_ms"] < TARGETS_MS["swap"]}
    return out


def make_inputs(config: dict[str, Any], device: str) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(7)
    bf = dict(device=device, dtype=torch.bfloat16)
    h = w = 64
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1], ids[..., 2] = torch.arange(h, device=device)[:, None], torch.arange(w, device=device)[None, :]
    return dict(hidden_states=torch.randn(1, h * w, config["in_channels"], generator=g, **bf),
                encoder_hidden_states=torch.randn(1, 512, config["joint_attention_dim"], generator=g, **bf),
                pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g, **bf),
                timestep=torch.ones(1, **bf), guidance=torch.full((1,), 4.0, **bf),
                img_ids=ids.reshape(h * w, 3), txt_ids=torch.zeros(512, 3, device=device), return_dict=False)


@torch.no_grad()
def bench_step(model: nn.Module, shapes: dict[str, tuple[int, int]], tmp: Path, device: str,
               repeat: int) -> dict[str, Any]:
    """(c): ms per forward with no LoRA capacity, then with rank 32, 64, 128 loaded."""
    x = make_inputs(FLUX_DEV, device)
    rows: dict[str, Any] = {}
    for rank in (0, 32, 64, 128):
        lora.release(model)
        lora.clear_cache(model)
        if rank:
            path = tmp / f"step_r{rank}.safetensors"
            write_lora(shapes, rank, seed=rank, path=path)
            lora.load(model, str(path), "step", max_rank=rank)
        model(**x)  # warm-up
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        rows[f"rank_{rank}" if rank else "none"] = statistics.median(times)
    base = rows["none"]
    rows["overhead_pct"] = {k: 100.0 * (v / base - 1.0) for k, v in rows.items() if k != "none"}
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--double", type=int, default=19, help="double blocks (19 in FLUX.1-dev)")
    ap.add_argument("--single", type=int, default=38, help="single blocks (38 in FLUX.1-dev)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    config = dict(FLUX_DEV, num_layers=args.double, num_single_layers=args.single)
    t = time.perf_counter()
    model, shapes = build_quantized(config, args.device)
    n_svdq = sum(isinstance(m, SVDQLinear) for m in model.modules())
    n_lin = sum(type(m) is nn.Linear for m in model.modules())
    print(f"built {args.double}+{args.single} blocks on {args.device}: {n_svdq} SVDQLinear, {n_lin} nn.Linear, "
          f"{len(shapes)} LoRA targets ({time.perf_counter() - t:.1f} s)")
    result: dict[str, Any] = {
        "benchmark": "lora_swap", "commit": _commit(), "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "lowbit_engine": lowbit_engine.__version__,
        "model": {"double_blocks": args.double, "single_blocks": args.single, "hidden": 3072,
                  "base_rank": BASE_RANK, "svdq_layers": n_svdq, "bf16_linear_layers": n_lin,
                  "lora_targets": len(shapes)},
        "lora_rank": args.rank, "targets_ms": TARGETS_MS,
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        files = [tmp / f"lora_{i}.safetensors" for i in range(3)]
        sizes = [write_lora(shapes, args.rank, seed=i, path=f) for i, f in enumerate(files)]
        result["lora_file_mib"] = sizes[0] / 2**20
        result["load_swap"] = bench_load_swap(model, files, args.device, args.repeat)
        if args.device.startswith("cuda"):
            result["step_ms"] = bench_step(model, shapes, tmp, args.device, args.repeat)
        else:
            result["step_ms"] = None
            result["note"] = ("CPU numbers: (a) and (b) only, timed on the CPU; (c), the per-step overhead of rank "
                              "32/64/128, needs --device cuda (the CPU reference kernels are not performance)")
    ls = result["load_swap"]
    print(f"rank-{args.rank} LoRA file: {result['lora_file_mib']:.0f} MiB; capacity {ls['capacity']} slots per layer")
    for k in ("load_first_ms", "load_into_capacity_ms", "swap_from_disk_ms", "swap_cached_ms", "set_strength_ms",
              "unload_ms"):
        print(f"  {k:24s} {ls[k]:9.1f} ms")
    print(f"  targets: {ls['meets_targets']}")
    if result["step_ms"]:
        print(f"  per step: {result['step_ms']}")
    elif "note" in result:
        print(f"  {result['note']}")
    out = args.out or RESULTS_DIR / f"lora_swap-{'cuda' if args.device.startswith('cuda') else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
