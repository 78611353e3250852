"""Kernel benchmark harness: every lowbit kernel against cuBLAS bf16 and fp8 on real model shapes.

On a GPU it times, per shape, cuBLAS bf16 (``x @ w.T``), cuBLAS fp8 (``torch._scaled_mm`` on pre-quantized
e4m3 with row-wise scales), torch's unfused dynamic fp8 (quantize + ``_scaled_mm``), and each lowbit op
through :mod:`lowbit_engine.ops` with the backend that dispatch picks (recorded in the results). Inputs
rotate over enough copies that the working set is several times the L2, so the cache does not flatter.
Ops that would run on the torch reference are reported as ``fallback`` and not timed, unless asked.

On the CPU it runs the same ops on small shapes (C++ reference and torch reference) so that CI
exercises the harness; those timings are reference timings and say nothing about the kernels. No ratios
are computed there: the CPU's torch bf16 matmul is no stand-in for cuBLAS (12 ms at M=1 on a loaded
2-core machine, which made a C++ reference look 463x faster), so nothing is ranked against it.

The cuBLAS baselines always run on a GPU, whatever ``kernels`` selects: the ratios need them.

Example:
    >>> from lowbit_engine import benchmark
    >>> report = benchmark.run(device="cpu", shapes=[(1, 128, 64)], repeat=2)
    >>> sorted(report)[:2]
    ['build_info', 'commit']
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import _dispatch, ops, ops_gemm8_cuda, ops_w4a8
from ._build_info import build_info
from .formats import int4, w4_layouts

# FLUX.1 at 1024x1024: 4608 image+text tokens; (K, N) of its linear layers.
FLUX_KN = [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]
FLUX_M = [4608, 256, 16]
# FLUX.1's adaLN modulation linears (double block 3072 -> 18432, single block 3072 -> 9216) run on one token
# per image: the w4a16 GEMV shapes, at batch 1 and 2 (on a GPU run, with every other kernel too).
GEMV_SHAPES = [(M, 3072, N) for N in (18432, 9216) for M in (1, 2)]
CPU_SHAPES = [(1, 256, 128), (17, 256, 192), (111, 128, 64)]
RANK = 32
L2_BYTES = 50 * 2**20  # H100; rotation makes the working set at least 3x this
BASELINES = ("cublas_bf16", "cublas_fp8_scaled_mm", "torch_fp8_dynamic_unfused", "torch_matmul_bf16")
CPU_NOTE = ("CPU run: reference timings (C++ and torch references on small shapes), not kernel performance; "
            "no ratios: the CPU torch matmul is not a representative baseline")
# Column widths of the streamed rows (--verbose); a table widens them to its longest name.
NAME_WIDTH, BACKEND_WIDTH = 36, 12


@dataclass
class Result:
    kernel: str
    backend: str
    M: int
    K: int
    N: int
    median_ms: float | None
    tflops: float | None
    gbps: float | None
    ratio_vs_bf16: float | None = None
    ratio_vs_fp8: float | None = None
    fallback: bool = False
    note: str = ""


@dataclass
class Case:
    """One thing to time on one shape: ``fn(i)`` runs it on the i-th of the rotated input sets."""

    kernel: str
    flops: float
    bytes_moved: float
    fn: Callable[[int], object]
    op: str | None = None  # the lowbit op whose backend is reported (None: a torch/cuBLAS baseline)
    op_args: Callable[[int], tuple] | None = None
    label: str | None = None  # backend column of a kernel called directly (not through an op's dispatch)


def _commit() -> str:
    env = os.environ.get("LOWBIT_COMMIT")
    if env:
        return env
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _time_gpu(fn: Callable[[int], object], n_sets: int, repeat: int) -> float:
    """Median milliseconds of fn over rotating input sets, timed with CUDA events after warm-up."""
    counter = [0]

    def call():
        counter[0] += 1
        fn(counter[0] % n_sets)

    try:
        from triton.testing import do_bench

        return float(do_bench(call, warmup=25, rep=max(repeat, 20), return_mode="median"))
    except ImportError:
        for _ in range(10):
            call()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def _time_cpu(fn: Callable[[int], object], n_sets: int, repeat: int) -> float:
    for i in range(3):  # warm-up: first calls pay for allocation and lazy initialisation
        fn(i % n_sets)
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        fn(i % n_sets)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _inputs(M: int, K: int, N: int, device: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One set of random inputs for every kernel of a shape (never zeros; a few outlier channels).

    Drawn on ``device`` directly: FLUX-sized weights drawn on the host would take longer than the timing.
    """
    dt = torch.bfloat16
    r = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    x = r(M, K) * (1 + 20 * (torch.rand(K, generator=gen, device=device) > 0.99))
    w = r(N, K) * 0.02
    qw, sw = int4.quantize(w, scale_dtype=torch.bfloat16)
    return {
        "x": x.to(dt), "w": w.to(dt), "bias": r(N).to(dt), "w4": int4.pack(qw), "w4_scales": sw,
        "smooth": torch.rand(K, generator=gen, device=device) + 0.5,
        "lora_down": (r(RANK, K) / math.sqrt(K)).to(dt), "lora_up": (r(N, RANK) * 0.02).to(dt),
        # the promotion-free layouts (quantized where the weights are: on the GPU in a GPU run)
        "f8l": w4_layouts.quantize(w, "f8l"), "i8q": w4_layouts.quantize(w, "i8q"),
    }


def _fp8_rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = t.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    scale = amax / 448.0
    return (t.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def _cases(M: int, K: int, N: int, sets: list[dict[str, torch.Tensor]], on_gpu: bool) -> list[Case]:
    flops = 2.0 * M * N * K
    bf, out_b = 2.0, 2.0 * M * N
    cases: list[Case] = []
    if on_gpu:
        cases.append(Case("cublas_bf16", flops, bf * (M * K + N * K) + out_b,
                          lambda i: torch.matmul(sets[i]["x"], sets[i]["w"].t())))
        fp8 = []
        for s in sets:
            xa, sa = _fp8_rowwise(s["x"])
            wb, sb = _fp8_rowwise(s["w"])
            fp8.append((xa, sa, wb.t(), sb.t().contiguous()))
        cases.append(Case("cublas_fp8_scaled_mm", flops, M * K + N * K + out_b,
                          lambda i: torch._scaled_mm(fp8[i][0], fp8[i][2], scale_a=fp8[i][1], scale_b=fp8[i][3],
                                                     out_dtype=torch.bfloat16)))

        def fp8_dynamic(i):
            xa, sa = _fp8_rowwise(sets[i]["x"])
            return torch._scaled_mm(xa, fp8[i][2], scale_a=sa, scale_b=fp8[i][3], out_dtype=torch.bfloat16)

        cases.append(Case("torch_fp8_dynamic_unfused", flops, bf * M * K + N * K + out_b, fp8_dynamic))
        if M > 64 and ops_gemm8_cuda.available():
            # The persistent sm_90a skeleton as a plain fp8 GEMM (weights already e4m3): issue 15's gate.
            gate = [(xa.contiguous(), sa.reshape(-1).float().contiguous(), wt.t().contiguous(),
                     sb.reshape(-1).float().contiguous()) for xa, sa, wt, sb in fp8]
            cases.append(Case("gemm8_fp8_sm90", flops, M * K + N * K + out_b,
                              lambda i: ops_gemm8_cuda.gemm_fp8_sm90(*gate[i]), label="cuda"))
    else:
        cases.append(Case("torch_matmul_bf16", flops, bf * (M * K + N * K) + out_b,
                          lambda i: torch.matmul(sets[i]["x"], sets[i]["w"].t())))

    # Activation quantizers: bytes = x read + q and scales written + lora_act written.
    q4_bytes = bf * M * K + M * K / 2 + 4 * M * K / 64 + 4 * M * RANK + bf * RANK * K
    q4_args = lambda i: (sets[i]["x"], sets[i]["smooth"], sets[i]["lora_down"], "int4")  # noqa: E731
    cases.append(Case("quantize_act_int4_r32", 2.0 * M * K * RANK, q4_bytes,
                      lambda i: ops.quantize_act(*q4_args(i)), "quantize_act", q4_args))
    q8_args = lambda i: (sets[i]["x"], sets[i]["smooth"], sets[i]["lora_down"], "int8")  # noqa: E731
    cases.append(Case("quantize_act_int8_r32", 2.0 * M * K * RANK, bf * M * K + M * K + 4 * M + 4 * M * RANK,
                      lambda i: ops.quantize_act(*q8_args(i)), "quantize_act", q8_args))

    # GEMMs on pre-quantized activations, and the whole SVDQuant linear (quantizer + GEMM) per layer.
    pre = [ops.quantize_act(*q4_args(i)) for i in range(len(sets))] if _runs_natively(
        "quantize_act", q4_args(0)) else None
    w_bytes = N * K / 2 + 2 * N * K / 64 + bf * N * RANK + bf * N

    def w4a4_args(i):
        q, s, la = pre[i]
        d = sets[i]
        return (q, s, d["w4"], d["w4_scales"], la, d["lora_up"], d["bias"], torch.bfloat16)

    if pre is not None:
        cases.append(Case("gemm_w4a4_r32", flops, M * K / 2 + 4 * M * K / 64 + 4 * M * RANK + w_bytes + out_b,
                          lambda i: torch.ops.lowbit.gemm_w4a4(*w4a4_args(i)), "gemm_w4a4", w4a4_args))

    w4a8_bytes = M * K + 4 * M + 4 * M * RANK + w_bytes + out_b  # 8-bit tokens, per-token scales
    pre8 = [ops.quantize_act(*q8_args(i)) for i in range(len(sets))] if _runs_natively(
        "quantize_act", q8_args(0)) else None

    def w4a8_args(i):
        q, s, la = pre8[i]
        d = sets[i]
        return (q, s, d["w4"], d["w4_scales"], la, d["lora_up"], d["bias"], torch.bfloat16)

    if pre8 is not None:
        cases.append(Case("gemm_w4a8_r32", flops, w4a8_bytes,
                          lambda i: torch.ops.lowbit.gemm_w4a8(*w4a8_args(i)), "gemm_w4a8", w4a8_args))

    # W4A8 with fp8 e4m3 tokens (on Hopper: the wgmma kernel).
    qf_args = lambda i: (sets[i]["x"], sets[i]["smooth"], sets[i]["lora_down"], "fp8")  # noqa: E731
    pre_f = [ops.quantize_act(*qf_args(i)) for i in range(len(sets))] if _runs_natively(
        "quantize_act", qf_args(0)) else None

    def w4a8f_args(i):
        q, s, la = pre_f[i]
        d = sets[i]
        return (q, s, d["w4"], d["w4_scales"], la, d["lora_up"], d["bias"], torch.bfloat16)

    if pre_f is not None:
        cases.append(Case("gemm_w4a8fp8_r32", flops, w4a8_bytes,
                          lambda i: torch.ops.lowbit.gemm_w4a8(*w4a8f_args(i)), "gemm_w4a8", w4a8f_args))

    if on_gpu and pre is not None:
        # The W4A4 GEMM on the wgmma kernel (the dispatch default is the mma.sync one): kernel comparison.
        w4a4_bytes = M * K / 2 + 4 * M * K / 64 + 4 * M * RANK + w_bytes + out_b
        cases.append(Case("gemm_w4a4_r32_wgmma", flops, w4a4_bytes, _with_env(
            lambda i: torch.ops.lowbit.gemm_w4a4(*w4a4_args(i)), LOWBIT_GEMM_W4_KERNEL="wgmma"), "gemm_w4a4"))
        # The same with the split consumer schedule (docs/kernels.md): not the default until measured faster.
        cases.append(Case("gemm_w4a4_r32_wgmma_split", flops, w4a4_bytes, _with_env(
            lambda i: torch.ops.lowbit.gemm_w4a4(*w4a4_args(i)), LOWBIT_GEMM_W4_KERNEL="wgmma",
            LOWBIT_GEMM_W4_SM90_SCHEDULE="split"), "gemm_w4a4"))
    if on_gpu and pre_f is not None:
        cases.append(Case("gemm_w4a8fp8_r32_split", flops, w4a8_bytes, _with_env(
            lambda i: torch.ops.lowbit.gemm_w4a8(*w4a8f_args(i)), LOWBIT_GEMM_W4_SM90_SCHEDULE="split"), "gemm_w4a8"))

    # The promotion-free path (docs/kernels.md, "The 8-bit path"): the 8-bit GEMM alone on an expanded
    # weight, the expand alone, the W4A8 ops (expand + GEMM above 64 tokens, the direct kernel at or
    # below), the quantizers (Triton, and the CUDA one for comparison), and the whole linear.
    for layout, mode in (("f8l", "fp8"), ("i8q", "int8")):
        qargs = (lambda i, mode=mode: (sets[i]["x"], sets[i]["smooth"], sets[i]["lora_down"], mode))
        if not _runs_natively("quantize_act", qargs(0)):
            continue
        toks = [ops.quantize_act(*qargs(i)) for i in range(len(sets))]
        wb = [s[layout] for s in sets]
        s2 = "wzeros" if layout == "i8q" else None
        op_args = (lambda i, layout=layout, toks=toks, wb=wb, s2=s2: (
            toks[i][0], toks[i][1], wb[i]["qweight"], wb[i]["wscales"], *((wb[i][s2],) if s2 else ()),
            wb[i]["wrow"], toks[i][2], sets[i]["lora_up"], sets[i]["bias"], torch.bfloat16))
        op_name = f"gemm_w4a8_{layout}"
        op_fn = getattr(torch.ops.lowbit, op_name)
        if not _runs_natively(op_name, op_args(0)):
            continue
        w_bytes_l = N * K / 2 + N * K / 64 * (1 if layout == "f8l" else 2) + 4 * N + bf * N * RANK + bf * N
        tok_bytes = M * K + 4 * M + 4 * M * RANK
        cases.append(Case(f"gemm_w4a8_{layout}_r32", flops, tok_bytes + w_bytes_l + out_b,
                          lambda i, f=op_fn, a=op_args: f(*a(i)), op_name, op_args))
        if on_gpu:
            from .kernels import gemm8, w4_expand

            w8 = []
            for i in range(len(sets)):
                b = wb[i]
                w8.append(w4_expand.expand_triton(layout, b["qweight"], b["wscales"], b.get("wzeros")))
            cases.append(Case(f"expand_{layout}", 0.0, N * K / 2 + N * K / 64 * 2 + N * K,
                              lambda i, L=layout, wb=wb, s2=s2: w4_expand.expand_triton(
                                  L, wb[i]["qweight"], wb[i]["wscales"], wb[i][s2] if s2 else None,
                                  out=w4_expand.scratch.get(N * K, wb[i]["qweight"].device).view(
                                      torch.int8 if L == "i8q" else torch.float8_e4m3fn).view(N, K))))
            if layout == "f8l" and ops_gemm8_cuda.available():
                # The persistent TMA / wgmma kernel (csrc/cuda/gemm8_sm90.cu) on the same inputs.
                cases.append(Case("gemm_w4a8_f8l_r32_sm90", flops, tok_bytes + w_bytes_l + out_b,
                                  lambda i, a=op_args: ops_gemm8_cuda.gemm_w4a8_f8l_sm90(*a(i)), label="cuda"))
            cases.append(Case(f"gemm8_{'int8' if layout == 'i8q' else 'fp8'}_r32", flops,
                              tok_bytes + N * K + 4 * N + bf * N * RANK + bf * N + out_b,
                              lambda i, w8=w8, toks=toks, wb=wb: gemm8.gemm8_triton(
                                  toks[i][0], toks[i][1], w8[i], wb[i]["wrow"], toks[i][2], sets[i]["lora_up"],
                                  sets[i]["bias"], torch.bfloat16)))
            if "cuda" in ops.backends("quantize_act"):
                cases.append(Case(f"quantize_act_{mode}_r32_cuda", 2.0 * M * K * RANK, bf * M * K + M * K + 4 * M
                                  + 4 * M * RANK, _with_env(lambda i, a=qargs: ops.quantize_act(*a(i)),
                                                            LOWBIT_QUANTIZE_ACT_KERNEL="cuda"), "quantize_act"))

        def linear(i, layout=layout, mode=mode, wb=wb, s2=s2, f=op_fn):
            d = sets[i]
            q, s, la = ops.quantize_act(d["x"], d["smooth"], d["lora_down"], mode)
            b = wb[i]
            return f(q, s, b["qweight"], b["wscales"], *((b[s2],) if s2 else ()), b["wrow"], la, d["lora_up"],
                     d["bias"], torch.bfloat16)

        cases.append(Case(f"svdq_w4a8_{layout}_linear_r32", flops, bf * M * K + w_bytes_l + out_b, linear, op_name))

        # An MLP's fc1 as an exit producer (docs/formats.md, "Exit quantizer"): the GEMM writes the next
        # linear's 8-bit input (static scale, GELU-tanh, the next lora-down) against the unfused chain of
        # GEMM -> bf16 -> GELU -> per-token quantizer. Both end with the same tensors for fc2.
        next_smooth = [torch.rand(N, generator=torch.Generator().manual_seed(i), dtype=torch.float32).add_(0.5)
                       .to(d["x"].device) for i, d in enumerate(sets)]
        next_ld = [(d["lora_up"].t() * 0.1).contiguous() for d in sets]  # any [R, N] 16-bit tensor
        exit_args = (lambda i, layout=layout, mode=mode, toks=toks, wb=wb, s2=s2: (
            layout, toks[i][0], toks[i][1], wb[i]["qweight"], wb[i]["wscales"], wb[i][s2] if s2 else None,
            wb[i]["wrow"], toks[i][2], sets[i]["lora_up"], sets[i]["bias"], torch.bfloat16, "gelu_tanh", 0.02,
            next_smooth[i], next_ld[i], mode))

        def unfused_exit(i, mode=mode, f=op_fn, a=op_args):
            h = torch.nn.functional.gelu(f(*a(i)), approximate="tanh")
            return ops.quantize_act(h, next_smooth[i], next_ld[i], mode)

        next_in = M * N + 4 * M + 4 * M * RANK + bf * RANK * N
        cases.append(Case(f"exit_{layout}_gelu_r32", flops, tok_bytes + w_bytes_l + next_in,
                          lambda i, a=exit_args: torch.ops.lowbit.gemm_w4a8_exit(*a(i)), "gemm_w4a8_exit", exit_args))
        cases.append(Case(f"exit_{layout}_gelu_r32_unfused", flops,
                          tok_bytes + w_bytes_l + out_b + 2 * out_b + out_b + next_in, unfused_exit, op_name))
        if on_gpu and "cuda" in ops.backends("quantize_act"):
            cases.append(Case(f"svdq_w4a8_{layout}_linear_r32_cudaquant", flops, bf * M * K + w_bytes_l + out_b,
                              _with_env(linear, LOWBIT_QUANTIZE_ACT_KERNEL="cuda"), op_name))

    def svdq_linear(i, mode):
        d = sets[i]
        q, s, la = ops.quantize_act(d["x"], d["smooth"], d["lora_down"], mode)
        gemm = ops.gemm_w4a4 if mode == "int4" else ops.gemm_w4a8
        return gemm(q, s, d["w4"], d["w4_scales"], la, d["lora_up"], d["bias"])

    lin_bytes = bf * M * K + w_bytes + out_b
    # op_args None: a composite case; its backends are read off one recorded call.
    cases.append(Case("svdq_w4a4_linear_r32", flops, lin_bytes, lambda i: svdq_linear(i, "int4"), "gemm_w4a4"))
    cases.append(Case("svdq_w4a8_linear_r32", flops, lin_bytes, lambda i: svdq_linear(i, "int8"), "gemm_w4a8"))
    cases.append(Case("svdq_w4a8fp8_linear_r32", flops, lin_bytes, lambda i: svdq_linear(i, "fp8"), "gemm_w4a8"))

    # Float formats: whole modules (dynamic token quantization included), built once per input set.
    from .nn import FP4Linear, FP8Linear, W4A16Linear

    def float_case(name: str, op: str, w_bytes_per_weight: float, build) -> None:
        mods = []
        for d in sets:
            lin = torch.nn.Linear(K, N, device=d["w"].device, dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.copy_(d["w"])
                lin.bias.copy_(d["bias"])
            mods.append(build(lin))
        cases.append(Case(name, flops, bf * M * K + w_bytes_per_weight * N * K + out_b,
                          lambda i: mods[i](sets[i]["x"]), op))

    float_case("fp8_linear_dynamic", "fp8_linear", 1.0, lambda lin: FP8Linear.from_linear(lin))
    float_case("nvfp4_linear_fp8", "fp4_linear", 0.5 + 1 / 16, lambda lin: FP4Linear.from_linear(lin, fmt="nvfp4"))
    float_case("mxfp4_linear_fp8", "fp4_linear", 0.5 + 1 / 32, lambda lin: FP4Linear.from_linear(lin, fmt="mxfp4"))
    float_case("nvfp4_linear_bf16_weight_only", "fp4_linear", 0.5 + 1 / 16,
               lambda lin: FP4Linear.from_linear(lin, fmt="nvfp4", act="bf16"))
    # weight-only uint4 + bf16 step + uint8 zero per 64: 0.5 + 3/64 bytes per weight
    float_case("w4a16_linear_weight_only", "w4a16_linear", 0.5 + 3 / 64, lambda lin: W4A16Linear.from_linear(lin))
    return cases


def _with_env(fn: Callable[[int], Any], **env: str) -> Callable[[int], Any]:
    """``fn`` run with environment variables set for the call (the kernel choices the CUDA ops read per
    call), leaving the caller's values as they were."""

    def run(i: int) -> Any:
        before = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn(i)
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return run


def _runs_natively(op: str, args: tuple | None) -> bool:
    if args is None:
        return False
    return _dispatch.select(op, *args).name != "torch"


def measure_copy_gbps(nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth (bytes read + written), the ceiling for memory-bound kernels."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = _time_gpu(lambda i: dst.copy_(src), 1, 50)
    return 2 * nbytes / ms / 1e6


def _gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"


def run(
    device: str | None = None,
    shapes: Sequence[tuple[int, int, int]] | None = None,
    repeat: int = 50,
    include_reference: bool = False,
    kernels: Sequence[str] | None = None,
    verbose: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Time every kernel on ``shapes`` ((M, K, N) triples) and return the report (also see :func:`save`).

    ``device`` defaults to CUDA when available. ``include_reference`` also times ops that would fall back
    to the torch reference (slow; off by default on a GPU). ``kernels`` filters by name substring (the
    cuBLAS baselines run regardless on a GPU). ``verbose`` prints each row as it is measured (after a
    header); ``progress`` shows a progress bar (tqdm, on stderr) over the cases.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    if shapes is None:
        shapes = [(M, K, N) for M in FLUX_M for (K, N) in FLUX_KN] + GEMV_SHAPES if on_gpu else CPU_SHAPES
    gen = torch.Generator(device=device).manual_seed(0)
    results: list[Result] = []
    bar = _bar(len(shapes), progress)
    say = bar.write if bar is not None else print
    if verbose:
        say(format_header())
    for M, K, N in shapes:
        set_bytes = 2 * (M * K + N * K)
        n_sets = max(1, min(8, math.ceil(3 * L2_BYTES / set_bytes))) if on_gpu else 2
        if bar is not None:
            bar.set_postfix_str(f"M={M} K={K} N={N}: inputs")
        sets = [_inputs(M, K, N, device, gen) for _ in range(n_sets)]
        baseline: dict[str, float] = {}
        cases = [c for c in _cases(M, K, N, sets, on_gpu)
                 if not kernels or any(k in c.kernel for k in kernels) or (on_gpu and c.kernel in BASELINES[:2])]
        if bar is not None:  # the bar counts cases; the total is known shape by shape
            bar.total += len(cases) - 1
            bar.refresh()
        for case in cases:
            if bar is not None:
                bar.set_postfix_str(f"M={M} K={K} N={N}: {case.kernel}")
            backend, fallback = case.label or "torch", False
            if case.op is not None:
                args = case.op_args(0) if case.op_args is not None else None
                if args is not None:
                    backend = _dispatch.select(case.op, *args).name
                else:  # composite case: run it once and see what ran
                    with ops.record_backends() as used:
                        case.fn(0)
                    backend = "+".join(sorted({b for bs in used.values() for b in bs}))
                fallback = "torch" in backend.split("+")
            if fallback and on_gpu and not include_reference:
                results.append(Result(case.kernel, backend, M, K, N, None, None, None, fallback=True,
                                      note="no CUDA/Triton kernel yet: would run the torch reference"))
                if bar is not None:
                    bar.update()
                continue
            with ops.record_backends() as used:
                ms = (_time_gpu if on_gpu else _time_cpu)(case.fn, n_sets, repeat)
            if case.op is not None:
                backend = "+".join(sorted({b for bs in used.values() for b in bs})) or backend
            res = Result(case.kernel, backend, M, K, N, ms, case.flops / ms / 1e9, case.bytes_moved / ms / 1e6,
                         fallback=fallback)
            if case.op is None:
                baseline[case.kernel] = ms
            # Ratios against cuBLAS only (a GPU run): the CPU's torch matmul would rank references against
            # an unrepresentative baseline.
            bf_ms, fp8_ms = baseline.get("cublas_bf16"), baseline.get("cublas_fp8_scaled_mm")
            res.ratio_vs_bf16 = bf_ms / ms if bf_ms else None
            res.ratio_vs_fp8 = fp8_ms / ms if fp8_ms else None
            results.append(res)
            if verbose:
                say(format_row(res))
            if bar is not None:
                bar.update()
        del sets
        if on_gpu:
            torch.cuda.empty_cache()
    if bar is not None:
        bar.close()
    copy_gbps = measure_copy_gbps() if on_gpu else None
    return {
        "gpu": _gpu_name(),
        "copy_gbps": copy_gbps,
        "device": device,
        "commit": _commit(),
        "torch": torch.__version__,
        "build_info": build_info(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "" if on_gpu else CPU_NOTE,
        "results": [asdict(r) for r in results],
    }


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm  # a dependency of diffusers; imported only when a bar is asked for

    return tqdm(total=total, desc="bench kernels", unit="case")


def _widths(rows: Sequence[dict[str, Any]] = ()) -> tuple[int, int]:
    return (max([NAME_WIDTH, *(len(r["kernel"]) for r in rows)]),
            max([BACKEND_WIDTH, *(len(r["backend"]) for r in rows)]))


def format_header(widths: tuple[int, int] | None = None) -> str:
    """The column header of :func:`format_row` (same widths)."""
    nw, bw = widths or _widths()
    return (f"{'kernel':<{nw}} {'backend':<{bw}} {'M':>5} {'K':>6} {'N':>6} {'ms':>9} {'TFLOP/s':>8} "
            f"{'GB/s':>8} {'xbf16':>6} {'xfp8':>6}")


def format_row(r: Result | dict, widths: tuple[int, int] | None = None) -> str:
    """One result as a table row; ``-`` where a value is absent (not timed, or no baseline to compare with).

    Example:
        >>> row = format_row({"kernel": "gemm_w4a4_r32", "backend": "cpu", "M": 1, "K": 64, "N": 64,
        ...                   "median_ms": 0.5, "tflops": 0.1, "gbps": 2.0, "ratio_vs_bf16": None,
        ...                   "ratio_vs_fp8": None, "note": ""})
        >>> row.split()
        ['gemm_w4a4_r32', 'cpu', '1', '64', '64', '0.5000', '0.1', '2.0', '-', '-']
    """
    d = asdict(r) if isinstance(r, Result) else r
    nw, bw = widths or _widths()
    # "-" right-aligned to the column width, so absent values keep the columns straight
    f = lambda v, fmt: ("-" if v is None else format(v, fmt)).rjust(int(fmt.split(".")[0]))  # noqa: E731
    return (f"{d['kernel']:<{nw}} {d['backend']:<{bw}} {d['M']:>5} {d['K']:>6} {d['N']:>6} "
            f"{f(d['median_ms'], '9.4f')} {f(d['tflops'], '8.1f')} {f(d['gbps'], '8.1f')} "
            f"{f(d['ratio_vs_bf16'], '6.2f')} {f(d['ratio_vs_fp8'], '6.2f')} {d['note']}").rstrip()


def format_title(report: dict[str, Any]) -> str:
    """The first line of a table: device, commit, torch, copy bandwidth; and the CPU note on a CPU run."""
    copy = report.get("copy_gbps")
    line = (f"# {report['gpu']}  commit {report['commit']}  torch {report['torch']}"
            + (f"  device copy {copy:.0f} GB/s" if copy else ""))
    return line + (f"\n# {report['note']}" if report.get("note") else "")


def format_table(report: dict[str, Any]) -> str:
    """The whole report as an aligned table (columns as wide as the longest kernel and backend names)."""
    widths = _widths(report["results"])
    lines = [format_title(report), format_header(widths)]
    lines += [format_row(r, widths) for r in report["results"]]
    return "\n".join(lines)


def save(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path
