"""The promotion-free W4A8 path compiled on a GPU: the Triton 8-bit quantizer, the expand / direct kernels,
the 8-bit GEMM, the ops' dispatch and SVDQLinear / FP8Linear / FP4Linear on it. Skipped without CUDA.

What compiled code adds to the interpreter tests (tests/test_w4a8_triton.py): the hardware e4m3
conversion (``cvt.rn.satfinite``) must give the reference's bytes; Hopper's fp8 MMA accumulates with
fewer bits than fp32, so fp8 results get the limits measured for that (1e-4 in norm, 2e-4 of max|ref| per
element at K up to 15360, as the earlier fp8 kernels); int8 sums stay exact; bf16 outputs round to
nearest even (compiled code does, the interpreter truncates).
"""

from __future__ import annotations

import pytest
import torch

from lowbit_engine import ops, ops_float, ops_w4a8, reference
from lowbit_engine.formats import f8l, fp8, i8q, mxfp4, nvfp4

pytestmark = pytest.mark.gpu
BF, FP32 = torch.bfloat16, torch.float32
E4M3 = torch.float8_e4m3fn
FP8_MMA_REL = 1e-4
FP8_MMA_ATOL = 2e-4


def _kernels():
    from lowbit_engine.kernels import gemm8, quant8, w4_expand

    assert not gemm8.interpreted(), "TRITON_INTERPRET=1 was set when the kernels were imported"
    return gemm8, quant8, w4_expand


def _need(cc: tuple[int, int]) -> None:
    if torch.cuda.get_device_capability() < cc:
        pytest.skip(f"needs sm_{cc[0]}{cc[1]} tensor cores")


def _check(out, ref, fp8_mma: bool, out_dtype=FP32):
    assert torch.isfinite(out).all(), "elements not written (NaN poison)"
    o, r = out.double(), ref.double()
    rel = ((o - r).norm() / r.norm()).item()
    limit = max(FP8_MMA_REL, 1e-5 if out_dtype == FP32 else 1e-2) if fp8_mma else (1e-5 if out_dtype == FP32 else 1e-2)
    assert rel < limit, rel
    rtol = 1e-5 if out_dtype == FP32 else 2.0**-8 + 1e-5
    atol = (FP8_MMA_ATOL if fp8_mma else 1e-5) * r.abs().max()
    bad = (o - r).abs() > rtol * r.abs() + atol
    assert not bad.any(), f"{bad.sum().item()} elements off"


def _layer(fmt, M, N, K, R, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * (1 + 20 * (torch.rand(K, generator=g) > 0.99))).to(BF)
    w = torch.randn(N, K, generator=g) * 0.02
    if fmt == "f8l":
        c, gs, row = f8l.quantize(w)
        wargs = (f8l.pack(c), gs, row)
    else:
        c, s, z, row = i8q.quantize(w)
        wargs = (i8q.pack(c), s, z, row)
    d = dict(x=x, smooth=torch.rand(K, generator=g) + 0.5, ld=(torch.randn(R, K, generator=g) / K**0.5).to(BF),
             lu=(torch.randn(N, R, generator=g) * 0.02).to(BF), bias=torch.randn(N, generator=g).to(BF))
    return {k: v.cuda() for k, v in d.items()}, tuple(t.cuda() for t in wargs)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("M, K, R", [(1, 3072, 32), (17, 3072, 0), (111, 15360, 32), (4608, 3072, 32)])
def test_quantizer_is_bit_exact_on_the_gpu(mode, M, K, R):
    _, quant8, _ = _kernels()
    d, _ = _layer("i8q", M, 64, K, R, seed=M + K)
    out = (torch.full((M, K), 0x5A, dtype=torch.uint8, device="cuda").view(E4M3 if mode == "fp8" else torch.int8),
           torch.full((M,), float("nan"), device="cuda"), torch.full((M, R), float("nan"), device="cuda"))
    q, s, la = quant8.quantize_8bit_triton(d["x"], d["smooth"], d["ld"] if R else None, mode, out=out)
    qr, sr, lar = reference.quantize_act(d["x"].cpu(), smooth=d["smooth"].cpu(), lora_down=d["ld"].cpu() if R else None,
                                         mode=mode)
    assert torch.equal(q.view(torch.uint8).cpu(), qr.view(torch.uint8)) and torch.equal(s.cpu(), sr)
    if R:
        assert ((la.cpu().double() - lar.double()).norm() / lar.double().norm()).item() < 1e-5


@pytest.mark.parametrize("fmt", ["f8l", "i8q", "nvfp4", "mxfp4"])
def test_expand_hardware_conversion_gives_the_reference_bytes(fmt):
    _, _, w4_expand = _kernels()
    g = torch.Generator().manual_seed(7)
    N, K = 1000, 3072
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g)
    if fmt == "f8l":
        c, gs, _ = f8l.quantize(w)
        p = f8l.pack(c)
        ref, args = f8l.expand(p, gs), (p, gs)
        kw = {}
    elif fmt == "i8q":
        c, s, z, _ = i8q.quantize(w)
        p = i8q.pack(c)
        ref, args, kw = i8q.expand(p, s, z), (p, s, z), {}
    else:
        if fmt == "nvfp4":
            p, bs, ts = nvfp4.quantize(w)
            ref, _ = nvfp4.dequantize_to_fp8(p, bs, ts)
        else:
            p, bs = mxfp4.quantize(w)
            ts = None
            ref, _ = mxfp4.dequantize_to_fp8(p, bs)
        w_inv, _, _ = ops_float.fp4_fp8_scales(fmt, p, bs, ts)
        args, kw = (p, bs), {"row_inv": w_inv.cuda()}
    got = w4_expand.expand_triton(fmt, *(t.cuda() for t in args), **kw)
    assert torch.equal(got.view(torch.uint8).cpu(), ref.view(torch.uint8))


def test_expand_f8l_random_bytes_including_nan_scales():
    _, _, w4_expand = _kernels()
    g = torch.Generator().manual_seed(8)
    codes = torch.randint(0, 256, (256, 1024), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 256, (256, 32), generator=g, dtype=torch.uint8).view(E4M3)
    got = w4_expand.expand_triton("f8l", codes.cuda(), scales.cuda())
    assert torch.equal(got.view(torch.uint8).cpu(), f8l.expand(codes, scales).view(torch.uint8))


@pytest.mark.parametrize("fmt", ["f8l", "i8q"])
@pytest.mark.parametrize("M, N, K", [(1, 3072, 3072), (16, 9216, 3072), (64, 3072, 15360), (65, 200, 320),
                                     (111, 1000, 3072), (300, 136, 320), (4608, 3072, 3072)])
def test_gemm_ops_match_float64(fmt, M, N, K):
    _need((8, 9) if fmt == "f8l" else (8, 0))
    d, wargs = _layer(fmt, M, N, K, 32, seed=M * 7 + N)
    mode = "fp8" if fmt == "f8l" else "int8"
    qa, sa, la = ops.quantize_act(d["x"], d["smooth"], d["ld"], mode)
    op = ops_w4a8.gemm_w4a8_f8l if fmt == "f8l" else ops_w4a8.gemm_w4a8_i8q
    with ops.record_backends() as used:
        out = op(qa, sa, *wargs, la, d["lu"], d["bias"], FP32)
        out16 = op(qa, sa, *wargs, la, d["lu"], d["bias"], BF)
    assert used == {f"gemm_w4a8_{fmt}": {"triton"}}
    ref_fn = reference.gemm_w4a8_f8l if fmt == "f8l" else reference.gemm_w4a8_i8q
    ref = ref_fn(qa, sa, *wargs, la, d["lu"], d["bias"], torch.float64, torch.float64)
    _check(out, ref, fp8_mma=fmt == "f8l")
    assert torch.equal(out16, out.to(BF))  # one RNE rounding of the fp32 result


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
def test_direct_i8q_is_exact_for_any_split(splits):
    _, _, w4_expand = _kernels()
    g = torch.Generator().manual_seed(splits)
    M, N, K = 16, 3072, 3072
    a = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    c, s, z, _ = i8q.quantize(torch.randn(N, K, generator=g))
    p = i8q.pack(c)
    out = w4_expand.direct_triton("i8q", a.cuda(), torch.ones(M, device="cuda"), p.cuda(), s.cuda(), z.cuda(), None,
                                  torch.ones(N, device="cuda"), out_dtype=FP32, splits=splits)
    exact = a.double() @ i8q.expand(p, s, z).double().T
    assert torch.equal(out.double().cpu(), exact)


def test_gemm8_int8_is_exact_and_fp8_within_the_mma_limit():
    gemm8, _, _ = _kernels()
    g = torch.Generator().manual_seed(3)
    M, N, K = 4608, 3072, 15360
    a = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8).cuda()
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8).cuda()
    ones_m, ones_n = torch.ones(M, device="cuda"), torch.ones(N, device="cuda")
    out = gemm8.gemm8_triton(a, ones_m, w, ones_n, out_dtype=FP32)
    exact = (a.double() @ w.double().T)
    assert torch.equal(out.double(), exact.float().double())  # exact int32 sums, one rounding to fp32
    af = (torch.randn(M, K, generator=g) * 30).clamp(-448, 448).to(E4M3).cuda()
    wf = (torch.randn(N, K, generator=g) * 30).clamp(-448, 448).to(E4M3).cuda()
    out = gemm8.gemm8_triton(af, ones_m, wf, ones_n, out_dtype=FP32)
    _check(out, af.double() @ wf.double().T, fp8_mma=True)


_LAYERS: dict[str, torch.nn.Module] = {}


def _svdq_layer(layout: str):
    """One 3072 x 3072 layer per layout, quantized once (on the CPU) for the tests below."""
    import copy

    import lowbit_engine as engine

    if layout not in _LAYERS:
        torch.manual_seed(0)
        lin = torch.nn.Linear(3072, 3072, dtype=BF)
        calib = torch.randn(128, 3072, dtype=BF)
        _LAYERS[layout] = engine.quantize_linear(lin, "svdq-w4a8", calib=calib, rank=32, weight_layout=layout,
                                                 alphas=(0.5,))
    return copy.deepcopy(_LAYERS[layout])


@pytest.mark.parametrize("layout, gemm", [("i8q", "gemm_w4a8_i8q"), ("f8l", "gemm_w4a8_f8l")])
@pytest.mark.parametrize("M", [1, 16, 64, 65, 4608])
def test_svdq_linear_runs_triton_and_matches_its_cpu_forward(layout, gemm, M):
    q = _svdq_layer(layout)
    x = torch.randn(M, 3072, dtype=BF)
    y_cpu = q(x).float()
    q = q.cuda()
    with ops.record_backends() as used:
        y = q(x.cuda())
    assert used == {"quantize_act": {"triton"}, gemm: {"triton"}}
    rel = ((y.float().cpu() - y_cpu).norm() / y_cpu.norm()).item()
    assert rel < 1e-2, rel  # bf16 outputs; fp8 MMA accumulation for f8l


def test_scratch_is_shared_and_cuda_graphs_capture_after_warm_up():
    import lowbit_engine as engine
    from lowbit_engine.kernels import w4_expand

    torch.manual_seed(1)
    layers = torch.nn.Sequential(*[
        engine.quantize_linear(torch.nn.Linear(1024, 1024, dtype=BF), "svdq-w4a8", calib=torch.randn(64, 1024, dtype=BF),
                               rank=16, alphas=(0.5,)) for _ in range(3)]).cuda()
    x = torch.randn(512, 1024, dtype=BF, device="cuda")
    with torch.no_grad():
        want = layers(x)
        before = w4_expand.scratch.nbytes()
        layers(x)
        assert w4_expand.scratch.nbytes() == before  # one buffer per (device, stream), reused by every layer
        static = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layers(static)  # warm-up on the capture stream: its scratch exists before the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = layers(static)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured, want)


def test_svdq_linear_compiles_fullgraph_on_the_gpu():
    import lowbit_engine as engine

    torch.manual_seed(2)
    q = engine.quantize_linear(torch.nn.Linear(512, 256, dtype=BF), "svdq-w4a8", calib=torch.randn(64, 512, dtype=BF),
                               rank=16, alphas=(0.5,)).cuda()
    x = torch.randn(300, 512, dtype=BF, device="cuda")
    compiled = torch.compile(q, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), q(x))


@pytest.mark.parametrize("M", [16, 4608])
def test_fp8_linear_on_the_8bit_gemm(M):
    _need((8, 9))
    from lowbit_engine.nn import FP8Linear

    torch.manual_seed(3)
    lin = torch.nn.Linear(3072, 1024, dtype=BF)
    q = FP8Linear.from_linear(lin).cuda()
    x = torch.randn(M, 3072, dtype=BF, device="cuda")
    with ops.record_backends() as used:
        y = q(x)
    assert used == {"fp8_linear": {"triton"}}
    qa, sa = fp8.quantize(x.float())
    ref = fp8.dequantize(qa, sa).double() @ fp8.dequantize(q.weight, q.weight_scale).double().T + q.bias.double()
    _check(y.float(), ref, fp8_mma=True, out_dtype=BF)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("M", [16, 4608])
def test_fp4_linear_on_the_8bit_path(fmt, M):
    _need((8, 9))
    from lowbit_engine.nn import FP4Linear

    torch.manual_seed(4)
    q = FP4Linear.from_linear(torch.nn.Linear(3072, 1024, dtype=BF), fmt=fmt).cuda()
    x = torch.randn(M, 3072, dtype=BF, device="cuda")
    with ops.record_backends() as used:
        y = q(x)
    assert used == {"fp4_linear": {"triton"}}
    ref = ops_float.fp4_linear_torch(x, q.qweight, q.block_scales, q.w_inv, q.w_scale_fp8, q.w_scale_bf16, q.bias,
                                     fmt, "fp8", FP32)
    _check(y.float(), ref, fp8_mma=True, out_dtype=BF)


def test_capture_without_a_warm_up_says_what_to_do():
    import lowbit_engine as engine

    q = engine.quantize_linear(torch.nn.Linear(1024, 2048, dtype=BF), "svdq-w4a8", calib=torch.randn(64, 1024, dtype=BF),
                               rank=16, alphas=(0.5,)).cuda()
    x = torch.randn(256, 1024, dtype=BF, device="cuda")
    stream = torch.cuda.Stream()  # a stream that never ran the layer: no scratch yet
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before capturing a CUDA graph"):
        with torch.no_grad(), torch.cuda.graph(graph, stream=stream):
            q(x)


@pytest.mark.parametrize("fmt", ["f8l", "i8q"])
@pytest.mark.parametrize("next_mode", ["int8", "fp8"])
@pytest.mark.parametrize("M", [17, 111, 4608])  # 17: the small-M path (direct kernel + torch exit)
def test_exit_op_matches_its_unfused_chain_on_the_gpu(fmt, next_mode, M):
    """lowbit::gemm_w4a8_exit compiled (expand + the 8-bit GEMM with the exit epilogue above 64 tokens)
    against the op's own chain: the same GEMM's bf16 output, reference GELU, reference static quantizer.
    The fp8 MMA and FMA contraction may move a rare h by a bf16 ulp: codes may differ by one step on at
    most 0.5% of the elements; the scales are exact."""
    from lowbit_engine import ops_exit

    _need((8, 9) if fmt == "f8l" else (8, 0))
    N, K, R = 640, 1024, 32
    d, w = _layer(fmt, M, N, K, R, seed=M)
    tok = "fp8" if fmt == "f8l" else "int8"
    qa, sa, la = ops.quantize_act(d["x"], d["smooth"], d["ld"], tok)
    s1, s2, row = (w[1], None, w[2]) if fmt == "f8l" else (w[1], w[2], w[3])
    g = torch.Generator().manual_seed(3)
    nsm = (torch.rand(N, generator=g) + 0.5).cuda()
    nld = (torch.randn(R, N, generator=g) * 0.05).to(BF).cuda()
    gemm = ops_w4a8.gemm_w4a8_f8l if fmt == "f8l" else ops_w4a8.gemm_w4a8_i8q
    h = gemm(qa, sa, w[0], *((s1, row) if fmt == "f8l" else (s1, s2, row)), la, d["lu"], d["bias"], BF)
    act = reference.exit_activation(h, "gelu_tanh")
    scale = float((act.float() / nsm).abs().amax()) / (127.0 if next_mode == "int8" else 448.0) * 0.8
    qr, sr, lr = reference.quantize_act_static(act, scale, nsm, nld, next_mode)
    with ops.record_backends() as used:
        q, s, lq = ops_exit.gemm_w4a8_exit(fmt, qa, sa, w[0], s1, s2, row, la, d["lu"], d["bias"], next_scale=scale,
                                           next_smooth=nsm, next_lora_down=nld, next_mode=next_mode)
    assert used["gemm_w4a8_exit"] == {"triton"}
    a, b = q.view(torch.uint8).int(), qr.view(torch.uint8).int()
    if next_mode == "int8":
        a, b = q.view(torch.int8).int(), qr.view(torch.int8).int()
    diff = (a - b).abs()
    assert (diff > 0).float().mean().item() <= 5e-3 and (next_mode == "fp8" or int(diff.max()) <= 1)
    assert torch.equal(s, sr)
    assert ((lq - lr).norm() / lr.norm()).item() < 1e-3
