"""The CUDA activation quantizer (csrc/cuda/quantize_act.cu) called directly through ``_C.cuda_quantize_act``.

q and scales must equal ``lowbit_engine.reference.quantize_act`` (run on the CPU) bit for bit; lora_act must
be within 1e-5 relative (norm) of a float64 x @ lora_down^T. Outputs are poisoned before each call (q bytes
0x5A, scales and lora_act NaN) so an element the kernel forgets to write fails the comparison.
Skipped without a GPU or without the CUDA build (tests/conftest.py, and the guards below).
"""

from __future__ import annotations

import pytest
import torch

from lowbit_engine import reference
from lowbit_engine._dtypes import ActQuant, code

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
_C = pytest.importorskip("lowbit_engine._C")
if not getattr(_C, "with_cuda", False):
    pytest.skip("lowbit_engine._C was built without CUDA", allow_module_level=True)

_MODES = {"int4": ActQuant.INT4_G64, "int8": ActQuant.INT8_TOKEN, "fp8": ActQuant.FP8_TOKEN}
_LORA_RTOL = 1e-5


def _inputs(M, K, R, dtype, smooth, seed):
    """Random activations with outlier channels and per-row scales, plus rows that probe the edge cases
    (zero row, rounding ties for each mode, signed zeros, half-zero groups) where M allows."""
    g = torch.Generator().manual_seed(seed)
    chan = 1 + 30 * (torch.rand(K, generator=g) > 0.98).float()
    rows = torch.exp(torch.rand(M, 1, generator=g) * 2 - 1)
    x = torch.randn(M, K, generator=g) * chan * rows
    k = torch.arange(K)
    special = {
        3: torch.zeros(K),
        # int4 ties: amax 7 -> scale 1, values n + 0.5
        4: torch.where(k % 64 == 0, torch.tensor(7.0),
                       ((k % 15) - 7).float() + torch.where(k % 2 == 1, 0.5, -0.5)),
        # int8 ties: amax 127 -> scale 1
        5: torch.where(k == 0, torch.tensor(127.0),
                       ((k * 37) % 255 - 127).float() + torch.where(k % 2 == 1, 0.5, -0.5)),
        # fp8: amax 448 -> scale 1, values between e4m3 neighbours
        6: torch.where(k == 0, torch.tensor(448.0),
                       (1 + (k % 16) / 16.0) * torch.where(k % 4 >= 2, 1.0, -1.0) * 2.0 ** (k % 9).float()),
        7: torch.where(k % 3 == 0, torch.tensor(-0.0), torch.randn(K, generator=g)),
        8: torch.where(k % 64 < 32, torch.tensor(0.0), torch.randn(K, generator=g)),
    }
    for r, v in special.items():
        if r < M:
            x[r] = v
    x = x.to(dtype)
    sm = torch.exp(torch.rand(K, generator=g) * 2 - 1) if smooth else None
    if sm is not None and K > 5:
        sm[5] = 1e-3  # an outlier smoothing factor
    ld = (torch.randn(R, K, generator=g) / K**0.5).to(dtype) if R > 0 else None
    return x, sm, ld


def _run_cuda(x, sm, ld, mode):
    """Poisoned outputs, one call of the kernel on the current stream, then a sync."""
    M, K = x.shape
    R = 0 if ld is None else ld.shape[0]
    dev = "cuda"
    xd = x.to(dev)
    smd = None if sm is None else sm.to(dev)
    ldd = None if ld is None else ld.to(dev)
    qbytes = (M, K // 2) if mode == "int4" else (M, K)
    q = torch.full(qbytes, 0x5A, dtype=torch.uint8, device=dev)
    s = torch.full((M, K // 64) if mode == "int4" else (M,), float("nan"), dtype=torch.float32, device=dev)
    la = torch.full((M, R), float("nan"), dtype=torch.float32, device=dev) if R > 0 else None
    _C.cuda_quantize_act(
        xd.data_ptr(), code(x.dtype), M, K,
        0 if smd is None else smd.data_ptr(),
        0 if ldd is None else ldd.data_ptr(), R, int(_MODES[mode]),
        q.data_ptr(), s.data_ptr(), 0 if la is None else la.data_ptr(),
        torch.cuda.current_stream().cuda_stream,
    )
    torch.cuda.synchronize()
    return q.cpu(), s.cpu(), None if la is None else la.cpu()


def _check(x, sm, ld, mode):
    q, s, la = _run_cuda(x, sm, ld, mode)
    q_ref, s_ref, la_ref = reference.quantize_act(x, smooth=sm, lora_down=ld, mode=mode)
    q_ref = q_ref.view(torch.uint8)  # compare the stored bits (int8 / e4m3 / packed int4)
    bad_q = (q != q_ref).nonzero()
    assert bad_q.numel() == 0, f"{bad_q.shape[0]} q bytes differ, first at {bad_q[0].tolist()}"
    same_s = s.view(torch.int32) == s_ref.view(torch.int32)
    assert bool(same_s.all()), f"{int((~same_s).sum())} scales differ, first at {(~same_s).nonzero()[0].tolist()}"
    if ld is None:
        assert la is None and la_ref is None
        return
    assert bool(torch.isfinite(la).all()), "lora_act has unwritten (NaN) elements"
    exact = x.double() @ ld.double().T
    err = ((la.double() - exact).norm() / exact.norm()).item()
    assert err < _LORA_RTOL, f"lora_act relative error {err:.3g}"


def _id(M, K, R, dtype, smooth, mode):
    return f"M{M}-K{K}-R{R}-{str(dtype)[6:]}-{'sm' if smooth else 'nosm'}-{mode}"


_SMALL = [
    pytest.param(M, K, R, dtype, smooth, mode, id=_id(M, K, R, dtype, smooth, mode))
    for M in (1, 17, 111)
    for K in (64, 3072, 15360)
    for R in (0, 16, 32, 256)
    for dtype in (torch.bfloat16, torch.float16)
    for smooth in (False, True)
    for mode in ("int4", "int8", "fp8")
]


@pytest.mark.parametrize("M, K, R, dtype, smooth, mode", _SMALL)
def test_quantize_act_matches_reference(M, K, R, dtype, smooth, mode):
    _check(*_inputs(M, K, R, dtype, smooth, seed=M * 7 + K + R), mode)


_LARGE = [
    pytest.param(4608, K, R, dtype, smooth, mode, id=_id(4608, K, R, dtype, smooth, mode))
    for (K, R) in ((3072, 32), (15360, 32), (3072, 256), (15360, 16), (64, 0))
    for dtype in (torch.bfloat16, torch.float16)
    for smooth in (False, True)
    for mode in ("int4", "int8", "fp8")
    if not (K == 15360 and dtype == torch.float16 and smooth)  # keep the CPU reference time in bounds
]


@pytest.mark.parametrize("M, K, R, dtype, smooth, mode", _LARGE)
def test_quantize_act_matches_reference_at_flux_size(M, K, R, dtype, smooth, mode):
    _check(*_inputs(M, K, R, dtype, smooth, seed=K + R), mode)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("K", [8, 200, 1000])
def test_8bit_modes_take_k_not_a_multiple_of_64(K, mode):
    _check(*_inputs(29, K, 16, torch.bfloat16, True, seed=K), mode)


@pytest.mark.parametrize("mode", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("R", [0, 32, 40])
def test_k_beyond_one_pass(R, mode):
    # K = 20480: more columns than one cluster of CTAs holds, so the 8-bit modes read x twice and ranks
    # beyond 32 accumulate in shared memory.
    _check(*_inputs(47, 20480, R, torch.bfloat16, True, seed=R), mode)


def test_extreme_values_take_the_exact_fallbacks():
    x, sm, ld = _inputs(40, 3072, 32, torch.bfloat16, True, seed=5)
    x[9] = (torch.randn(3072) * 1e-30).to(torch.bfloat16)  # tiny rows: scales below 2^-60
    x[10] = (torch.randn(3072) * 1e20).to(torch.bfloat16)  # huge rows: scales above 2^60
    sm[7] = 1e-15  # a tiny smoothing factor (x / smooth stays finite: overflow to inf is out of contract)
    for mode in ("int4", "int8", "fp8"):
        _check(x, sm, ld, mode)


def test_lora_act_is_deterministic():
    x, sm, ld = _inputs(4608, 3072, 32, torch.bfloat16, True, seed=11)
    a = _run_cuda(x, sm, ld, "int4")[2]
    b = _run_cuda(x, sm, ld, "int4")[2]
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(K=96), "multiple of 64"),
        (dict(K=100, mode=int(ActQuant.INT8_TOKEN)), "multiple of 8"),
        (dict(R=257), "R must be in"),
        (dict(M=0), "M must be"),
        (dict(x_dtype=0), "x_dtype"),
        (dict(mode=7), "mode must be"),
        (dict(q=0), "q_out is null"),
        (dict(lora_down=0), "lora_down is null"),
        (dict(x_offset=2), "16-byte aligned"),
    ],
)
def test_bad_arguments_raise_value_error(change, match):
    change = dict(change)
    M, K, R = 4, 128, 8
    x = torch.randn(M, K + 8, device="cuda").to(torch.bfloat16)
    ld = torch.randn(R, K, device="cuda").to(torch.bfloat16)
    q = torch.empty(M, K, dtype=torch.uint8, device="cuda")
    s = torch.empty(M, K // 64 + 1, device="cuda")
    la = torch.empty(M, R, device="cuda")
    args = dict(x=x.data_ptr() + change.pop("x_offset", 0), x_dtype=code(torch.bfloat16), M=M, K=K, smooth=0,
                lora_down=ld.data_ptr(), R=R, mode=int(ActQuant.INT4_G64), q=q.data_ptr(), s=s.data_ptr(),
                la=la.data_ptr(), stream=torch.cuda.current_stream().cuda_stream)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        _C.cuda_quantize_act(*args.values())
