"""Compile the Triton kernels ahead of time for a GPU that is not here (default sm_90a) and read the SASS.

Triton can compile for any NVIDIA target without a device: this script binds each kernel to stand-in CPU
tensors of the real shapes and dtypes (so the specialization - 16-byte alignment, divisibility by 16 - is
the one a real launch gets), compiles it for ``--arch`` with the Triton installed here, and reports per
kernel configuration: registers, spills (stack / local bytes), shared memory, and an instruction census of
the hottest loop (the backward branch whose body holds the most MMA instructions): its length, its MMAs
(``QGMMA`` fp8 / ``IGMMA`` int8 / ``HGMMA`` 16-bit wgmma, ``HMMA``/``IMMA`` mma.sync), its asynchronous copies
(``LDGSTS``: cp.async, ``UTMALDG``: TMA) and everything else.

It says nothing about speed on its own; it catches what makes a kernel slow without any other sign
(spills, a loop that lost its pipelining or its wgmma, a decode that costs more instructions per weight
than the memory time allows), and it checks that every kernel compiles for the target at all. The
device's Triton may differ from this one; the GPU run is the measurement.

Usage:
    python bench/triton_aot.py [--arch 90] [--out bench/results/triton-aot-sm90.json] [--only gemm8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MMA_OPS = ("QGMMA", "IGMMA", "HGMMA", "HMMA", "IMMA")


@dataclass
class Report:
    name: str
    ok: bool
    error: str = ""
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    shared_bytes: int | None = None
    sass_instructions: int | None = None
    loop_instructions: int | None = None
    loop_census: dict[str, int] = field(default_factory=dict)
    census: dict[str, int] = field(default_factory=dict)
    loops: list[dict[str, int]] = field(default_factory=list)  # every loop's census (innermost first by address)


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


def compile_kernel(kernel, args: tuple, kwargs: dict, arch: int = 90):
    """``kernel`` compiled for ``sm_<arch>`` as a real launch with ``args`` / ``kwargs`` would compile it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kw = dict(kwargs)
    bound, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, specialization, options)
    return triton_compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


_INSTR = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);", re.M)


def sass_report(name: str, cubin: bytes) -> Report:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", path], capture_output=True, text=True).stdout
    rep = Report(name, True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m:
        rep.registers, rep.stack_bytes, _, rep.local_bytes = (int(g) for g in m.groups())
    instrs = [(int(a, 16), op, rest) for a, op, rest in _INSTR.findall(sass)]
    rep.sass_instructions = len(instrs)
    rep.census = dict(Counter(op.split(".")[0] for _, op, _ in instrs).most_common())
    # Loops: a BRA whose target lies before it. Keep the one with the most MMAs (ties: the longest).
    best = None
    for i, (addr, op, rest) in enumerate(instrs):
        if op != "BRA":
            continue
        t = re.search(r"0x([0-9a-f]+)", rest)
        if not t or int(t.group(1), 16) >= addr:
            continue
        start = int(t.group(1), 16)
        body = [o for a, o, _ in instrs if start <= a <= addr]
        mmas = sum(o.split(".")[0] in MMA_OPS for o in body)
        key = (mmas, len(body))
        rep.loops.append(dict(Counter(o.split(".")[0] for o in body).most_common()) | {"_size": len(body)})
        if best is None or key > best[0]:
            best = (key, body)
    if best is not None:
        rep.loop_instructions = len(best[1])
        rep.loop_census = dict(Counter(o.split(".")[0] for o in best[1]).most_common())
    return rep


# --------------------------------------------------------------------------------------------------
# the kernels and configurations to compile


def _t(shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype)


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _checkout_kernel(stem: str):
    """``kernels/<stem>.py`` of this checkout, imported by path in compiled mode: an installed
    ``lowbit_engine.kernels`` may point at another tree (an editable install of a different checkout)."""
    import importlib.util
    import sys

    name = f"_lowbit_aot_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "kernels" / f"{stem}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def w4a16_cases(K: int = 3072, N: int = 18432) -> list[tuple[str, object, tuple, dict]]:
    """The w4a16 GEMV at M = 1 and 16 on FLUX's adaLN shape, in the configuration a GPU launch uses."""
    gemv = _checkout_kernel("w4a16_gemv")
    bf, u8 = torch.bfloat16, torch.uint8
    out = []
    for M in (1, 16):
        c = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
        splits = gemv.split_k_for(N // c["BLOCK_N"], K, c["BLOCK_K"])
        args = (_t((M, K), bf), _t((N, K // 2), u8), _t((N, K // 64), bf), _t((N, K // 64), u8),
                _t((splits, M, N)), M, N, K, K // splits)
        kw = dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], EVEN_N=True,
                  EMULATE_16BIT_DOT=False, **gemv.MAGIC[bf], num_warps=c["num_warps"], num_stages=c["num_stages"])
        out.append((f"w4a16 gemv M={M} {K}->{N} split{splits}", gemv._w4a16_kernel, args, kw))
    args = (_t((2, 16, N)), _t((N,), bf), _t((16, N), bf), 16, N, 2)
    out.append(("w4a16 finish M=16", gemv._finish_kernel, args, dict(HAS_BIAS=True, BLOCK=1024, num_warps=4)))
    return out


def cases(M: int = 4608, K: int = 3072, N: int = 3072, R: int = 32) -> list[tuple[str, object, tuple, dict]]:
    from lowbit_engine.kernels import gemm8, quant8, w4_expand

    bf, e4, i8, u8 = torch.bfloat16, torch.float8_e4m3fn, torch.int8, torch.uint8
    out = []
    for is_int8 in (False, True):
        dt = i8 if is_int8 else e4
        for cfg in (gemm8.DEFAULTS[2**62], gemm8.DEFAULTS[256]):
            head = (_t((M, K), dt), _t((M,)), _t((N, K), dt), _t((N,)), _t((M, R)), _t((N, R), bf), _t((N,), bf),
                    _t((M, N), bf), M, N, K, R)
            kw = dict(IS_INT8=is_int8, HAS_LORA=True, LORA_16BIT=True, EMULATE_16BIT_DOT=False, HAS_BIAS=True,
                      EVEN_K=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=32,
                      GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            tag = f"{'int8' if is_int8 else 'fp8'} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} " \
                  f"s{cfg.num_stages}"
            no_exit = (_t((1,)), _t((1,)), _t((1,)), _t((1,)), _t((1,)), 1.0, 0, 0, 0, 0)
            out.append((f"gemm8 {tag}", gemm8._gemm8_kernel, head + no_exit, kw))
        cfg = gemm8.EXIT_DEFAULTS[2**62]  # the exit epilogue (fc1 writing fc2's 8-bit input), large-M tile
        head = (_t((M, K), dt), _t((M,)), _t((N, K), dt), _t((N,)), _t((M, R)), _t((N, R), bf), _t((N,), bf),
                _t((1,), bf), M, N, K, R)
        ex = (_t((M, N), u8), _t((M,)), _t((N,)), _t((R, N), bf), _t((M, R)), 0.02, N, 0, R, N)
        kw = dict(IS_INT8=is_int8, HAS_LORA=True, LORA_16BIT=True, EMULATE_16BIT_DOT=False, HAS_BIAS=True,
                  EVEN_K=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=32,
                  GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages, EXIT=2,
                  NEXT_FP8=not is_int8, HAS_NSMOOTH=True, HAS_NLORA=True, BLOCK_R2=32)
        out.append((f"gemm8-exit {'int8' if is_int8 else 'fp8'} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} "
                    f"w{cfg.num_warps} s{cfg.num_stages}", gemm8._gemm8_kernel, head + ex, kw))
    for fmt, code in w4_expand.FMTS.items():
        g = w4_expand.GROUPS[code]
        s1 = _t((N, K // g), u8)
        args = (_t((N, K // 2), u8), s1, s1, _t((N,)), _t((N, K), u8), N, K)
        kw = dict(FMT=code, HW_CVT=True, GROUP=g, BLOCK_N=32, BLOCK_K=256, EVEN=True, num_warps=4)
        out.append((f"expand {fmt}", w4_expand._expand_kernel, args, kw))
    for fmt, code in w4_expand.FMTS.items():
        g = w4_expand.GROUPS[code]
        s1 = _t((N, K // g), u8)
        a = _t((16, K), i8 if code == w4_expand.FMT_I8Q else e4)
        ws = _t((6, 16, N), torch.int32 if code == w4_expand.FMT_I8Q else torch.float32)
        args = (a, _t((N, K // 2), u8), s1, s1, _t((N,)), ws, 16, N, K, K // 6)
        kw = dict(FMT=code, HW_CVT=True, GROUP=g, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, EVEN=True, num_warps=4,
                  num_stages=3)
        out.append((f"direct {fmt} M=16", w4_expand._direct_kernel, args, kw))
    for is_int in (False, True):
        ws = _t((6, 16, N), torch.int32 if is_int else torch.float32)
        args = (ws, _t((16,)), _t((N,)), _t((16, R)), _t((N, R), bf), _t((N,), bf), _t((16, N), bf), 16, N, R, 6)
        kw = dict(IS_INT=is_int, HAS_LORA=True, EMULATE_16BIT_DOT=False, HAS_BIAS=True, BLOCK_M=16, BLOCK_N=128,
                  BLOCK_R=32, num_warps=4)
        out.append((f"finish {'int32' if is_int else 'fp32'} M=16", w4_expand._finish_kernel, args, kw))
    from lowbit_engine.kernels import fp8_gemm

    args = (_t((M, K), bf), _t((M, K), u8), _t((M,)), K)
    out.append(("fp8 rowwise quantizer", fp8_gemm._quantize_fp8_rowwise_kernel, args,
                dict(BLOCK_K=triton_next_pow2(K), num_warps=4)))
    for mode in ("int8", "fp8"):
        x = _t((M, K), bf)
        q = _t((M, K), u8)
        args = (x, _t((K,)), _t((R, K), bf), q, _t((M,)), _t((M, R)), M, K, R, 1.0, K)
        kw = dict(IS_FP8=mode == "fp8", HAS_SMOOTH=True, HAS_LORA=True, EMULATE_16BIT_DOT=False, BLOCK_M=16,
                  BLOCK_K=256, BLOCK_R=32, num_warps=4, num_stages=2)
        out.append((f"quant8 {mode} smooth r{R}", quant8._quant8_kernel, args, kw))
        args = (x, _t((2, K), bf), _t((2, K), bf), _t((K,)), _t((R, K), bf), q, _t((M,)), _t((M, R)), x, M, K, R,
                M // 2, 1e-6)
        kw = dict(IS_FP8=mode == "fp8", HAS_SMOOTH=True, HAS_LORA=True, STORE_Y=False, EMULATE_16BIT_DOT=False,
                  BLOCK_M=16, BLOCK_K=256, BLOCK_R=32, num_warps=4, num_stages=2)
        out.append((f"ln+modulate+quant8 {mode} r{R}", quant8._ln_mod_quant8_kernel, args, kw))
    return out + w4a16_cases(K)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of the case names to compile")
    args = ap.parse_args()
    import triton

    reports = []
    for name, kernel, kargs, kwargs in cases():
        if args.only and not any(s in name for s in args.only):
            continue
        try:
            ck = compile_kernel(kernel, kargs, kwargs, args.arch)
            rep = sass_report(name, ck.asm["cubin"])
            rep.shared_bytes = int(ck.metadata.shared)
        except Exception as e:  # noqa: BLE001  (reported per case: one failing kernel must not hide the rest)
            rep = Report(name, False, error=f"{type(e).__name__}: {str(e)[:400]}")
        reports.append(rep)
        loop = rep.loop_census
        mmas = {k: v for k, v in loop.items() if k in MMA_OPS}
        print(f"{name:<36} {'ok' if rep.ok else 'FAILED ' + rep.error[:80]:<6} regs={rep.registers} "
              f"stack={rep.stack_bytes} local={rep.local_bytes} smem={rep.shared_bytes} "
              f"loop={rep.loop_instructions} mma={mmas} ldgsts={loop.get('LDGSTS', 0)}", flush=True)
    if args.out:
        from lowbit_engine import benchmark

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "what": f"Triton kernels compiled ahead of time for sm_{args.arch} (no GPU), SASS census",
            "triton": triton.__version__, "commit": benchmark._commit(),
            "reports": [asdict(r) for r in reports]}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
