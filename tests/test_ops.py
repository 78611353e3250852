"""The ops layer: input validation, dispatch and its record, fallback warnings, torch.compile tracing."""

from __future__ import annotations

import warnings

import pytest
import torch

from lowbit_engine import _dispatch, ops
from lowbit_engine.errors import OpInputError, ReferenceFallbackWarning
from lowbit_engine.formats import int4, vq

BF = torch.bfloat16


def _layer(gen, M=17, K=128, N=48, R=16):
    x = torch.randn(M, K, generator=gen).to(BF)
    qw, sw = int4.quantize(torch.randn(N, K, generator=gen), scale_dtype=BF)
    return {
        "x": x, "w": int4.pack(qw), "w_scales": sw, "smooth": torch.rand(K, generator=gen) + 0.5,
        "lora_down": torch.randn(R, K, generator=gen).to(BF), "lora_up": torch.randn(N, R, generator=gen).to(BF),
        "bias": torch.randn(N, generator=gen).to(BF),
    }


# ------------------------------------------------------------------------------------------------ validation


def _bad_quantize_act_cases(d):
    x = d["x"]
    return [
        ("x", dict(x=x.float()), "dtype in (bfloat16, float16)"),
        ("x", dict(x=x[:, :100].contiguous()), "multiple of 64"),
        ("x", dict(x=x.t()), "2-d tensor" if x.dim() != 2 else "contiguous"),
        ("x", dict(x=x.reshape(1, *x.shape)), "2-d tensor"),
        ("x", dict(x=x[:0]), "at least one row"),
        ("mode", dict(mode="int3"), "one of ['int4', 'int8', 'fp8']"),
        ("smooth", dict(smooth=d["smooth"][:64]), "shape (128,)"),
        ("smooth", dict(smooth=d["smooth"].to(BF)), "dtype in (float32)"),
        ("smooth", dict(smooth=d["smooth"].to("meta")), "a tensor on cpu"),
        ("lora_down", dict(lora_down=d["lora_down"].half()), "dtype in (bfloat16)"),
        ("lora_down", dict(lora_down=d["lora_down"][:, :64].contiguous()), "dim 1 = 128"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_quantize_act_rejects_bad_input(gen, case):
    d = _layer(gen)
    arg, change, expected = _bad_quantize_act_cases(d)[case]
    kw = dict(x=d["x"], smooth=None, lora_down=None, mode="int4") | change
    with pytest.raises(OpInputError) as info:
        ops.quantize_act(**kw)
    msg = str(info.value)
    assert "lowbit::quantize_act" in msg and f"'{arg}'" in msg and expected in msg, msg
    assert isinstance(info.value, ValueError)


def _gemm_inputs(d, mode="int4"):
    q, s, la = ops.quantize_act(d["x"], d["smooth"], d["lora_down"], mode)
    return dict(act=q, act_scales=s, w=d["w"], w_scales=d["w_scales"], lora_act=la, lora_up=d["lora_up"],
                bias=d["bias"], out_dtype=BF)


GEMM_BAD = [
    ("act", lambda g: dict(act=g["act"].to(torch.int8)), "dtype in (uint8)"),
    ("act_scales", lambda g: dict(act_scales=g["act_scales"][:-1].contiguous()), "shape (17, 2)"),
    ("w", lambda g: dict(w=g["w"][:, :32].contiguous()), "dim 1 = 64"),
    ("w_scales", lambda g: dict(w_scales=g["w_scales"].float()), "dtype in (bfloat16)"),
    ("lora_act/lora_up", lambda g: dict(lora_up=None), "both or neither"),
    ("lora_up", lambda g: dict(lora_up=g["lora_up"][:, :8].contiguous()), "shape (48, 16)"),
    ("bias", lambda g: dict(bias=g["bias"][:7]), "shape (48,)"),
    ("out_dtype", lambda g: dict(out_dtype=torch.int8), "one of"),
    ("w", lambda g: dict(w=g["w"].to("meta")), "a tensor on cpu"),
    ("act", lambda g: dict(act=g["act"][:, :40].contiguous(), act_scales=g["act_scales"][:, :1].contiguous()),
     "multiple of 64"),
]


@pytest.mark.parametrize("case", range(len(GEMM_BAD)))
def test_gemm_w4a4_rejects_bad_input(gen, case):
    g = _gemm_inputs(_layer(gen))
    arg, change, expected = GEMM_BAD[case]
    with pytest.raises(OpInputError) as info:
        ops.gemm_w4a4(**(g | change(g)))
    msg = str(info.value)
    assert "lowbit::gemm_w4a4" in msg and f"'{arg}'" in msg and expected in msg, msg


def test_gemm_w4a8_rejects_bad_input(gen):
    g = _gemm_inputs(_layer(gen), mode="int8")
    for change, expected in [
        (dict(act=g["act"].float()), "dtype in (int8, float8_e4m3fn)"),
        (dict(act_scales=g["act_scales"][:, None].contiguous()), "1-d tensor"),
        (dict(w_scales=g["w_scales"][:1].contiguous()), "shape (48, 2)"),
    ]:
        with pytest.raises(OpInputError, match=r"lowbit::gemm_w4a8") as info:
            ops.gemm_w4a8(**(g | change))
        assert expected in str(info.value), str(info.value)


def test_vq_ops_reject_bad_input(gen):
    cb = torch.randn(256, 4, generator=gen)
    codes = torch.randint(0, 256, (8, 32), dtype=torch.uint8, generator=gen)
    x = torch.randn(3, 128, generator=gen)
    cases = [
        (lambda: ops.vq_dequantize(codes, cb, 8, 128, 10), "'index_bits' expected one of [8, 12]"),
        (lambda: ops.vq_dequantize(codes, torch.randn(300, 4), 8, 128, 8), "1 to 256 centroids"),
        (lambda: ops.vq_dequantize(codes, cb, 8, 130, 8), "multiple of 4"),
        (lambda: ops.vq_dequantize(codes[:, :31].contiguous(), cb, 8, 128, 8), "shape (8, 32)"),
        (lambda: ops.vq_dequantize(codes, cb, 8, 128, 12), "shape (8, 48)"),
        (lambda: ops.vq_gemm(x[:, :64].contiguous(), codes, cb, 8, 128, 8), "'x' expected shape (*, 128)"),
        (lambda: ops.vq_gemm(x, codes, cb, 8, 128, 8, channel_scale=torch.ones(7)), "'channel_scale'"),
        (lambda: ops.vq_gemm(x, codes, cb, 8, 128, 8, bias=torch.ones(8, dtype=torch.int32)), "'bias'"),
    ]
    for call, expected in cases:
        with pytest.raises(OpInputError) as info:
            call()
        assert expected in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------------------ dispatch


def test_cpu_tensors_run_the_cpp_reference_and_agree_with_torch(gen):
    d = _layer(gen)
    with ops.record_backends() as used:
        q, s, la = ops.quantize_act(d["x"], d["smooth"], d["lora_down"], "int4")
        out = ops.gemm_w4a4(q, s, d["w"], d["w_scales"], la, d["lora_up"], d["bias"], torch.float32)
    assert used == {"quantize_act": {"cpu"}, "gemm_w4a4": {"cpu"}}
    assert ops.last_backend("gemm_w4a4") == "cpu"
    with ops.use_backend("torch"), ops.record_backends() as used_ref:
        q_ref, s_ref, la_ref = ops.quantize_act(d["x"], d["smooth"], d["lora_down"], "int4")
        out_ref = ops.gemm_w4a4(q, s, d["w"], d["w_scales"], la, d["lora_up"], d["bias"], torch.float32)
    assert used_ref == {"quantize_act": {"torch"}, "gemm_w4a4": {"torch"}}
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    torch.testing.assert_close(la, la_ref, rtol=1e-5, atol=1e-4)
    assert (out - out_ref).norm() / out_ref.norm() < 1e-5


def test_missing_native_module_falls_back_with_one_warning(gen, monkeypatch):
    d = _layer(gen)
    monkeypatch.setattr(ops, "_has_native", lambda: False)
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    with pytest.warns(ReferenceFallbackWarning, match="lowbit::quantize_act: the native module"):
        ops.quantize_act(d["x"])
    assert ops.last_backend("quantize_act") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        ops.quantize_act(d["x"])


def test_forcing_an_unregistered_backend_is_an_error(gen):
    d = _layer(gen)
    cb, codes = torch.randn(16, 4), torch.randint(0, 16, (8, 32), dtype=torch.uint8)
    with ops.use_backend("cuda", op="vq_gemm"), pytest.raises(ValueError, match="not registered"):
        ops.vq_gemm(d["x"], codes, cb, 8, 128, 8)
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("opencl"):
            pass


def test_backend_registry_lists_priorities():
    assert ops.backends("quantize_act")[-2:] == ["cpu", "torch"]
    assert ops.backends("gemm_w4a4") == ["cpu", "torch"] or ops.backends("gemm_w4a4")[0] in ("cuda", "triton")


def test_vq_ops_dispatch_to_cpu(gen):
    k, d, N, K = 256, 4, 8, 128
    cb = torch.randn(k, d, generator=gen)
    idx = torch.randint(0, k, (N, K // d), generator=gen)
    codes = vq.pack_indices(idx, 8)
    x = torch.randn(5, K, generator=gen)
    w = ops.vq_dequantize(codes, cb, N, K, 8, out_dtype=torch.float32)
    assert ops.last_backend("vq_dequantize") == "cpu"
    torch.testing.assert_close(w, cb[idx].reshape(N, K))
    out = ops.vq_gemm(x, codes, cb, N, K, 8)
    torch.testing.assert_close(out, x @ w.t(), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------ compile


class _SVDQLinearProbe(torch.nn.Module):
    """The call pattern of a quantized linear: quantize (+ lora down) then GEMM (+ lora up + bias)."""

    def __init__(self, d):
        super().__init__()
        for k in ("w", "w_scales", "smooth", "lora_down", "lora_up", "bias"):
            self.register_buffer(k, d[k])

    def forward(self, x):
        q, s, la = ops.quantize_act(x, self.smooth, self.lora_down, "int4")
        return ops.gemm_w4a4(q, s, self.w, self.w_scales, la, self.lora_up, self.bias, x.dtype)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_traces_the_ops(gen, backend):
    torch._dynamo.reset()
    d = _layer(gen)
    mod = _SVDQLinearProbe(d)
    eager = mod(d["x"])
    compiled = torch.compile(mod, fullgraph=True, backend=backend)
    with ops.record_backends() as used:
        out = compiled(d["x"])
    assert torch.equal(out, eager)
    assert used == {"quantize_act": {"cpu"}, "gemm_w4a4": {"cpu"}}


def test_fake_kernels_give_shapes_without_running(gen):
    from torch._subclasses.fake_tensor import FakeTensorMode

    d = _layer(gen)
    x32 = d["x"].float()
    with FakeTensorMode() as mode:
        x = mode.from_tensor(d["x"])
        q, s, la = torch.ops.lowbit.quantize_act(x, None, mode.from_tensor(d["lora_down"]), "fp8")
        assert (q.shape, q.dtype, s.shape, la.shape) == ((17, 128), torch.float8_e4m3fn, (17,), (17, 16))
        with pytest.raises(OpInputError):
            torch.ops.lowbit.quantize_act(mode.from_tensor(x32), None, None, "int4")
