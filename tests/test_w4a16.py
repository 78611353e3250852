"""The weight-only ``w4a16`` format: torch reference, C++ reference, the op, the Triton GEMV under the
interpreter, W4A16Linear (checkpoints, quantize_linear, LoRA).

Limits (relative Frobenius error against a float64 product of the same dequantized weight, which is exact
in fp32): the products x * (q - z) are exact for 16-bit tokens and the kernels add fp32 roundings only (the
group sums, one scale multiply per group, the bias): fp32 out 1e-5; bf16 out: the final rounding, up to
2^-8 per element: 1e-2 (fp16: 1e-3). Outputs are poisoned with NaN so an unwritten element shows.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn

import lowbit_engine
from lowbit_engine.errors import CheckpointError
from lowbit_engine import ops_w4a16
from lowbit_engine._build_info import native
from lowbit_engine._dtypes import code
from lowbit_engine.errors import OpInputError
from lowbit_engine.formats import w4a16
from lowbit_engine.nn import W4A16Linear

BF, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
REL = {FP32: 1e-5, BF: 1e-2, FP16: 1e-3}


def _rel(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _weights(N: int, K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w[:, :64] *= 5  # groups of very different ranges
    q, s, z = w4a16.quantize(w)
    return w, w4a16.pack(q), s, z


def _ref64(x, packed, s, z, bias=None):
    acc = x.double() @ w4a16.dequantize(packed, s, z).double().t()
    return acc + bias.double() if bias is not None else acc


# ---- format ---------------------------------------------------------------------------------------


def test_dequantize_is_q_minus_z_times_s_and_exact():
    w, packed, s, z = _weights(5, 192)
    q = w4a16.unpack(packed)
    assert torch.equal(w4a16.pack(q), packed) and int(q.max()) <= 15 and int(z.max()) <= 15
    want = (q.double().reshape(5, 3, 64) - z.double()[..., None]) * s.double()[..., None]
    assert torch.equal(w4a16.dequantize(packed, s, z).double(), want.reshape(5, 192))  # fp32 holds it exactly
    err = (w4a16.dequantize(packed, s, z) - w).norm() / w.norm()
    assert err < 0.12, err


def test_zero_constant_and_one_signed_groups():
    w = torch.zeros(3, 128)
    w[1, 64:] = 0.5          # a constant positive group
    w[2, :64] = -torch.rand(64) - 0.1   # an all-negative group
    q, s, z = w4a16.quantize(w, search=False)  # min-max: the error bound is half a step
    d = w4a16.dequantize(w4a16.pack(q), s, z)
    assert torch.equal(d[0], torch.zeros(128)) and (s > 0).all()   # zero rows stay exactly zero
    assert (d[1, 64:] - 0.5).abs().max() < 0.5 / 15
    assert (d[2, :64] - w[2, :64]).abs().max() <= 1.1 / 15 / 2 + 1e-6


def test_search_never_worse_than_min_max():
    w = torch.distributions.StudentT(3.0).sample((64, 512)) * 0.02
    plain = w4a16.dequantize(w4a16.pack(w4a16.quantize(w, search=False)[0]), *w4a16.quantize(w, search=False)[1:])
    best = w4a16.quantize(w)
    searched = w4a16.dequantize(w4a16.pack(best[0]), *best[1:])
    e_plain = (plain - w).square().reshape(64, 8, 64).sum(-1)
    e_best = (searched - w).square().reshape(64, 8, 64).sum(-1)
    assert (e_best <= e_plain + 1e-12).all() and e_best.sum() < e_plain.sum()


@pytest.mark.parametrize("bad", [torch.full((2, 64), float("nan")), torch.zeros(2, 96), torch.zeros(64)])
def test_quantize_rejects_bad_weights(bad):
    with pytest.raises(ValueError):
        w4a16.quantize(bad)


def test_check_rejects_invalid_buffers():
    _, packed, s, z = _weights(4, 128)
    w4a16.check(packed, s, z)
    with pytest.raises(ValueError, match="zero points"):
        w4a16.check(packed, s, torch.full_like(z, 16))
    with pytest.raises(ValueError, match="positive"):
        w4a16.check(packed, torch.zeros_like(s), z)
    with pytest.raises(ValueError, match="bfloat16"):
        w4a16.check(packed, s.float(), z)


# ---- C++ reference and the op ------------------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 17, 111])
@pytest.mark.parametrize("x_dtype,out_dtype", [(BF, BF), (BF, FP32), (FP16, FP16), (FP32, FP32)])
def test_cpu_reference_matches_float64(M, x_dtype, out_dtype):
    N, K = 67, 192  # odd N, three groups
    _, packed, s, z = _weights(N, K, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M + 1)).to(x_dtype)
    bias = torch.randn(N).to(BF) if M != 17 else None
    out = ops_w4a16.w4a16_linear(x, packed, s, z, bias, out_dtype)
    assert lowbit_engine.ops.last_backend("w4a16_linear") == "cpu"
    assert out.dtype == out_dtype and out.shape == (M, N)
    assert _rel(out, _ref64(x, packed, s, z, bias)) < REL[out_dtype]
    with lowbit_engine.ops.use_backend("torch"):
        ref = ops_w4a16.w4a16_linear(x, packed, s, z, bias, out_dtype)
    assert _rel(ref, _ref64(x, packed, s, z, bias)) < REL[out_dtype]


def test_cpu_reference_writes_every_element():
    N, K, M = 33, 128, 5
    _, packed, s, z = _weights(N, K)
    x = torch.randn(M, K).to(BF)
    out = torch.full((M, N), float("nan"))
    native().cpu_gemm_w4a16(x.data_ptr(), code(BF), M, K, packed.data_ptr(), s.data_ptr(), z.data_ptr(), N, 0, 0,
                            out.data_ptr(), code(FP32))
    assert torch.isfinite(out).all()
    assert _rel(out, _ref64(x, packed, s, z)) < 1e-5


def test_op_rejects_bad_inputs():
    _, packed, s, z = _weights(8, 128)
    x = torch.randn(2, 128).to(BF)
    with pytest.raises(OpInputError, match="'scales' expected dtype"):
        ops_w4a16.w4a16_linear(x, packed, s.float(), z)
    with pytest.raises(OpInputError, match="'zeros' expected shape"):
        ops_w4a16.w4a16_linear(x, packed, s, z[:, :1].contiguous())
    with pytest.raises(OpInputError, match="multiple of 64"):
        ops_w4a16.w4a16_linear(torch.randn(2, 96).to(BF), packed[:, :48].contiguous(), s[:, :1].contiguous(),
                               z[:, :1].contiguous())


def test_op_traces_with_fake_tensors():
    _, packed, s, z = _weights(8, 128)
    f = torch.compile(lambda x: ops_w4a16.w4a16_linear(x, packed, s, z), fullgraph=True, backend="eager")
    x = torch.randn(3, 128).to(BF)
    assert torch.equal(f(x), ops_w4a16.w4a16_linear(x, packed, s, z))


# ---- Triton under the interpreter ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemv():
    pytest.importorskip("triton")
    from triton_interp import load_interpreted

    mod = load_interpreted("w4a16_gemv.py")
    if not mod.interpreted():
        pytest.skip("this Triton did not honour TRITON_INTERPRET=1 at decoration time")
    return mod


@pytest.mark.parametrize("M", [1, 2, 17])
@pytest.mark.parametrize("N,K,splits", [(67, 192, 1), (96, 256, 2), (45, 512, 4)])
def test_triton_gemv_matches_reference(gemv, M, N, K, splits):
    _, packed, s, z = _weights(N, K, seed=N + M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(BF)
    bias = torch.randn(N).to(BF) if splits != 2 else None
    ref = _ref64(x, packed, s, z, bias)
    for out_dtype in (FP32, BF):
        out = torch.full((M, N), float("nan"), dtype=out_dtype)
        gemv.w4a16_triton(x, packed, s, z, bias, out_dtype, splits=splits, out=out)
        assert torch.isfinite(out).all(), "unwritten elements (NaN poison)"
        assert _rel(out, ref) < REL[out_dtype], (out_dtype, _rel(out, ref))


def test_triton_gemv_fp16_tokens_and_bad_splits(gemv):
    _, packed, s, z = _weights(40, 256)
    x = torch.randn(3, 256).to(FP16)
    out = gemv.w4a16_triton(x, packed, s, z, None, FP32)
    assert _rel(out, _ref64(x, packed, s, z)) < 1e-5
    with pytest.raises(ValueError, match="splits"):
        gemv.w4a16_triton(x, packed, s, z, None, FP32, splits=3)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        gemv.w4a16_triton(x.float(), packed, s, z)


def test_split_k_gives_waves_on_flux_shapes(gemv):
    # 3072 -> 18432 and 3072 -> 9216 at BLOCK_N = 64: enough programs for 4 waves on 132 SMs
    for N in (18432, 9216):
        tiles = N // 64
        sp = gemv.split_k_for(tiles, 3072, 128)
        assert tiles * sp >= 4 * 132 and 3072 % (sp * 128) == 0


# ---- the module ------------------------------------------------------------------------------------


def test_module_forward_checkpoint_and_quantize_linear():
    lin = nn.Linear(128, 80).to(BF)
    q = lowbit_engine.quantize_linear(lin, "w4a16")
    assert isinstance(q, W4A16Linear) and q.nbytes < lin.weight.numel()  # under one byte per weight
    x = torch.randn(2, 3, 128).to(BF)
    y = q(x)
    ref = (x.reshape(-1, 128).double() @ q.dequantize().double().t() + lin.bias.double()).reshape(2, 3, 80)
    assert y.shape == (2, 3, 80) and _rel(y, ref) < 1e-2
    assert _rel(y, lin(x)) < 0.15
    with tempfile.TemporaryDirectory() as d:
        path = lowbit_engine.checkpoint.save(q, os.path.join(d, "q.safetensors"))
        again = lowbit_engine.load_checkpoint(path)
        assert isinstance(again, W4A16Linear)
        assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), again.state_dict().values()))
        bad = W4A16Linear.from_config(q.config())
        bad.load_state_dict(q.state_dict())
        bad.zeros.fill_(16)  # not a valid zero point: the load must refuse it
        lowbit_engine.checkpoint.save(bad, os.path.join(d, "bad.safetensors"))
        with pytest.raises(CheckpointError, match="zero points"):  # the load runs check_buffers
            lowbit_engine.load_checkpoint(os.path.join(d, "bad.safetensors"))


def test_module_rejects_bad_config_and_shapes():
    with pytest.raises(ValueError, match="multiple of 64"):
        W4A16Linear(100, 8)
    cfg = W4A16Linear(128, 8).config()
    with pytest.raises(ValueError, match="group_size"):
        W4A16Linear.from_config(dict(cfg, group_size=128))
    with pytest.raises(ValueError, match="rank"):
        W4A16Linear.from_linear(nn.Linear(128, 8), rank=4)


def test_lora_on_w4a16_leaves_the_4bit_weights_untouched():
    pytest.importorskip("safetensors")
    g = torch.Generator().manual_seed(3)
    model = nn.Module()
    model.proj = W4A16Linear.from_linear(nn.Linear(128, 64).to(BF))
    before = {k: v.clone() for k, v in model.proj.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.proj.state_dict().items()}
    x = torch.randn(4, 128, generator=g).to(BF)
    y0 = model.proj(x)
    a, b = torch.randn(4, 128, generator=g) / 128 ** 0.5, torch.randn(64, 4, generator=g) * 0.5
    sd = {"transformer.proj.lora_A.weight": a.to(BF), "transformer.proj.lora_B.weight": b.to(BF)}
    lowbit_engine.lora.load(model, sd, name="style", strength=1.0)
    y1 = model.proj(x)
    want = x.double() @ (model.proj.dequantize().double() + (b.to(BF).double() @ a.to(BF).double())).t() \
        + model.proj.bias.double()
    assert _rel(y1, want) < 1e-2 and _rel(y1, y0) > 0.05  # the LoRA moved the output, correctly
    assert set(model.proj.state_dict()) == set(before)      # the LoRA buffers are not persistent
    for k, v in model.proj.state_dict().items():
        assert torch.equal(v, before[k]) and v.data_ptr() == ptrs[k], k
    lowbit_engine.lora.unload(model, "style")
    assert torch.equal(model.proj(x), y0)                  # unload: back bit for bit
