"""The Triton kernels of the 8-bit path compile for sm_90a here, without a GPU, into the code they are meant to be.

bench/triton_aot.py binds each kernel to stand-in tensors of real shapes (so the specialization matches a
real launch) and compiles it with this machine's Triton for Hopper. These tests fail when a kernel stops
compiling for the target, spills registers to local memory, or loses what makes it fast: the wgmma
instructions (QGMMA for fp8, IGMMA for int8) in the main loop, and the cp.async pipelining of the 8-bit
GEMM. They say nothing about speed; the GPU run does (bench/hopper_step1.sh).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import triton_aot  # noqa: E402


def _nvidia_backend() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", 90, 32))
        return True
    except Exception:  # noqa: BLE001  (a Triton without the NVIDIA backend: nothing to compile for)
        return False


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="this Triton has no NVIDIA backend")

CASES = {name: (k, a, kw) for name, k, a, kw in triton_aot.cases()}
MAIN_LOOP_MMA = {"fp8": "QGMMA", "int8": "IGMMA", "f8l": "QGMMA", "i8q": "IGMMA", "nvfp4": "QGMMA",
                 "mxfp4": "QGMMA"}


def _compile(name: str) -> triton_aot.Report:
    kernel, args, kwargs = CASES[name]
    ck = triton_aot.compile_kernel(kernel, args, kwargs, 90)
    rep = triton_aot.sass_report(name, ck.asm["cubin"])
    assert rep.local_bytes == 0 and rep.stack_bytes == 0, f"{name}: spills ({rep.stack_bytes} B stack)"
    return rep


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("gemm8 ")])
def test_gemm8_is_a_pipelined_wgmma_loop(name):
    rep = _compile(name)
    mma = MAIN_LOOP_MMA[name.split()[1]]
    assert rep.loop_census.get(mma, 0) >= 4, rep.loop_census
    assert rep.loop_census.get("LDGSTS", 0) > 0, "the loads are not pipelined through cp.async"
    # the loop is the MMAs plus their feeding: a decode or a promotion left in it would show here
    assert rep.loop_instructions < 160, rep.loop_instructions


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("gemm8-exit")])
def test_exit_epilogue_keeps_the_wgmma_loop(name):
    """The exit epilogue (GELU, static quantize, the next lora-down on the MMA, atomics) sits after the loop:
    the loop stays the plain 8-bit GEMM's, and nothing spills."""
    rep = _compile(name)
    mma = MAIN_LOOP_MMA[name.split()[1]]
    main = [lp for lp in rep.loops if lp.get(mma, 0) >= 4 and lp.get("LDGSTS", 0) > 0]  # the K loop
    assert main, rep.loops
    assert min(lp["_size"] for lp in main) < 160, main


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("direct")])
def test_direct_kernels_multiply_on_wgmma(name):
    rep = _compile(name)
    assert rep.loop_census.get(MAIN_LOOP_MMA[name.split()[1]], 0) >= 2, rep.loop_census


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith(("expand", "finish", "quant8", "fp8 rowwise", "ln+"))])
def test_other_kernels_compile_without_spills(name):
    _compile(name)


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("w4a16 gemv")])
def test_w4a16_gemv_streams_on_wgmma_without_int_to_float(name):
    rep = _compile(name)
    assert rep.loop_census.get("HGMMA", 0) >= 2, rep.loop_census
    assert rep.loop_census.get("LDGSTS", 0) > 0, "the weight loads are not pipelined through cp.async"
    # the decode builds q - z from bit patterns: an I2F per weight (64 per thread and step) would be back
    assert rep.loop_census.get("I2F", 0) <= 8, rep.loop_census


def test_w4a16_finish_compiles_without_spills():
    _compile("w4a16 finish M=16")
